//! Sends the scenarios of Go Machinery's example sender and prints the results: a task, slice
//! arguments and results, a group, a chord, a chain, a panicking task and a long one.
//!
//! ```sh
//! tests/services.sh
//! RESULT_BACKEND=redis://127.0.0.1:6379/ cargo run --example worker   # terminal 1 (or a Go worker)
//! RESULT_BACKEND=redis://127.0.0.1:6379/ cargo run --example send     # terminal 2
//! ```

#[path = "common/go_tasks.rs"]
mod go_tasks;

use go_tasks::{add, concat, long_running_task, multiply, panic_task, split, sum_floats, sum_ints};
use machinery::{Config, Group, Server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut config = Config::from_env()?;
    if config.result_backend.is_empty() {
        config.result_backend = "redis://127.0.0.1:6379/".into();
        println!("RESULT_BACKEND not set; using {}", config.result_backend);
    }
    let server = Server::new(config).await?;

    println!("Single task:");
    let r = server.send(add::signature(vec![1, 1])).await?;
    println!("1 + 1 = {}", r.get().await?);

    let r = server.send(sum_ints::signature(vec![1, 2])).await?;
    println!("sum([1, 2]) = {}", r.get().await?);
    let r = server.send(sum_floats::signature(vec![1.5, 2.7])).await?;
    println!("sum([1.5, 2.7]) = {}", r.get().await?);
    let r = server
        .send(concat::signature(vec!["foo".into(), "bar".into()]))
        .await?;
    println!("concat([\"foo\", \"bar\"]) = {}", r.get().await?);
    let r = server.send(split::signature("foo".into())).await?;
    println!("split([\"foo\"]) = {:?}", r.get().await?);

    println!("Group of tasks (parallel execution):");
    let pairs = [(1, 1), (2, 2), (5, 6)];
    let group = Group::new(pairs.map(|(a, b)| add::signature(vec![a, b])));
    let sums = server.send_group(group).await?.get().await?;
    for ((a, b), sum) in pairs.iter().zip(sums) {
        println!("{a} + {b} = {sum}");
    }

    println!("Group of tasks with a callback (chord):");
    let group = Group::new(pairs.map(|(a, b)| add::signature(vec![a, b])));
    let r = server
        .send_chord(group.chord(multiply::signature(vec![])))
        .await?;
    println!("(1 + 1) * (2 + 2) * (5 + 6) = {}", r.get().await?);

    println!("Chain of tasks:");
    let chain = add::signature(vec![1, 1])
        .then(add::signature(vec![2, 2]))
        .then(add::signature(vec![5, 6]))
        .then(multiply::signature(vec![4]));
    let r = server.send(chain).await?;
    println!("(((1 + 1) + (2 + 2)) + (5 + 6)) * 4 = {}", r.get().await?);

    let r = server.send(panic_task::signature()).await?;
    match r.get().await {
        Ok(v) => return Err(format!("the panicking task returned {v:?}").into()),
        Err(e) => println!(
            "Task panicked and returned error = {}",
            e.task_error().unwrap_or("?")
        ),
    }

    let r = server.send(long_running_task::signature()).await?;
    r.get().await?;
    println!("Long running task returned = []");
    Ok(())
}
