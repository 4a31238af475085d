//! A periodic-task scheduler process for the integration tests (`tests/tests/periodic.rs`):
//! registers `noop(1)` under `PERIODIC_NAME` on `PERIODIC_SPEC`, with the lock key's binary
//! name `PERIODIC_BINARY`, and runs until SIGTERM or SIGINT. The server and the lock come from
//! the environment (BROKER, RESULT_BACKEND, LOCK, ...). Logs `scheduler ready`, then one
//! `periodic task sent ... periodic.tick=<unix ms>` line per tick it sent (stderr).

include!("../tasks.rs");

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,machinery::periodic=debug".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let result = async {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let server = machinery::Server::from_env().await?;
        let scheduler = server.scheduler().binary_name(var("PERIODIC_BINARY"));
        scheduler.register_task(
            &var("PERIODIC_SPEC"),
            &var("PERIODIC_NAME"),
            noop::signature(1),
        )?;
        let running = scheduler.spawn().await?;
        eprintln!("scheduler ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| machinery::Error::new(machinery::ErrorKind::Shutdown, e.to_string()))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        running.shutdown().await
    }
    .await;
    if let Err(e) = result {
        eprintln!("scheduler failed: {e}");
        std::process::exit(1);
    }
}
