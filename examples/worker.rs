//! A worker with Go Machinery's example tasks, configured like a Go worker: from the
//! environment (`BROKER`, `RESULT_BACKEND`, `DEFAULT_QUEUE`, `AMQP_EXCHANGE`,
//! `AMQP_EXCHANGE_TYPE`, `AMQP_BINDING_KEY`, `AMQP_PREFETCH_COUNT`, ...), with Go's defaults.
//!
//! ```sh
//! tests/services.sh                       # RabbitMQ and Redis on 127.0.0.1
//! RESULT_BACKEND=redis://127.0.0.1:6379/ cargo run --example worker
//! ```
//!
//! Stop it with Ctrl-C: it finishes the tasks in flight first (Ctrl-C again to quit now).

#[path = "common/go_tasks.rs"]
mod go_tasks;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // The tasks are registered by `#[task]`; naming one keeps the module linked in.
    let _ = go_tasks::add::NAME;
    machinery::worker::launch().await?;
    Ok(())
}
