//! A worker process for the integration tests: `machinery::worker::launch()` with the shared
//! test tasks, configured from the environment (BROKER, RESULT_BACKEND, DEFAULT_QUEUE,
//! AMQP_EXCHANGE, AMQP_BINDING_KEY, ...). Prints `ready` once consuming.

include!("../tasks.rs");

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let concurrency = std::env::var("WORKER_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let result = async {
        let server = machinery::Server::from_env().await?;
        let worker = server.worker().concurrency(concurrency).build()?;
        worker.run().await
    }
    .await;
    if let Err(e) = result {
        eprintln!("worker failed: {e}");
        std::process::exit(1);
    }
}
