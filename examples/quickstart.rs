//! The whole path in one process, on the embedded broker: a worker and a producer, a typed
//! chain, its result.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use machinery::{task, Config, Server, TaskError};

/// Adds two numbers.
#[task]
fn add(a: f64, b: f64) -> f64 {
    a + b
}

/// Multiplies the previous task's result by `factor`.
#[task]
async fn multiply(factor: f64, #[chained] x: f64) -> Result<f64, TaskError> {
    Ok(factor * x)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    // The embedded broker and result backend: nothing to install.
    let config = Config::builder().broker("memory://quickstart").build()?;
    let server = Server::new(config).await?;

    // A worker with every task in this binary, in the background.
    let worker = server.worker().concurrency(4).spawn().await?;

    // (1 + 1) * 4, as a chain: multiply receives add's result.
    let chain = add::signature(1.0, 1.0).then(multiply::signature(4.0));
    let result: f64 = server.send(chain).await?.get().await?;
    println!("(1 + 1) * 4 = {result}");

    worker.shutdown().await?;
    Ok(())
}
