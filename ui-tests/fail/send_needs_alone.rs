use machinery::{task, Config, Server, TaskError};

#[task]
async fn multiply(factor: f64, #[chained] x: f64) -> Result<f64, TaskError> {
    Ok(factor * x)
}

#[tokio::main]
async fn main() -> machinery::Result<()> {
    let server = Server::new(Config::builder().broker("memory://ui").build()?).await?;
    let _result = server.send(multiply::signature(4.0)).await?;
    Ok(())
}
