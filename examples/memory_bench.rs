//! A worker's memory under a burst of large messages, on a real RabbitMQ.
//!
//! ```sh
//! tests/services.sh
//! cargo run --release --example memory_bench [messages]     # default 32
//! ```
//!
//! Publishes `messages` bodies of about 3.9 MB each (`mem_sum_ints` over 2,000,000 zeros, Go's
//! `sum_ints` shape) with a plain AMQP client, lets an in-process worker (concurrency 16,
//! prefetch 16) run them all (each task takes 200 ms, so they overlap), and prints the process's RSS before, its peak (`VmHWM`) and after,
//! next to the bytes published. The worker's in-flight byte budget (`MAX_INFLIGHT_BYTES`) is
//! what keeps the peak down: decoding a message takes several times its size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use machinery::{task, Config, Server};

static DONE: AtomicUsize = AtomicUsize::new(0);

#[task]
fn mem_sum_ints(numbers: Vec<i64>) -> i64 {
    // Some real work: the tasks overlap, each holding its decoded arguments.
    std::thread::sleep(Duration::from_millis(200));
    DONE.fetch_add(1, Ordering::SeqCst);
    numbers.iter().sum()
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(32);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let id = std::process::id();
    let config = Config::builder()
        .broker(url.clone())
        .exchange(format!("memory_bench_{id}"))
        .default_queue(format!("memory_bench_{id}_tasks"))
        .binding_key(format!("memory_bench_{id}_key"))
        .prefetch_count(16)
        .no_unix_signals(true)
        .build()?;
    let server = Server::new(config.clone()).await?;
    let zeros = vec!["0"; 2_000_000].join(",");
    let body = format!(
        r#"{{"UUID":"task_{{}}","Name":"mem_sum_ints","Args":[{{"Name":"","Type":"[]int64","Value":[{zeros}]}}]}}"#
    );
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let before = status_kb("VmRSS:");
    // The worker's queue exists once it consumes: start it, then publish.
    let worker = server.worker().tasks([mem_sum_ints::NAME]).spawn().await?;
    for i in 0..messages {
        let body = body.replacen("{}", &i.to_string(), 1);
        channel
            .basic_publish(
                config.amqp.exchange.as_str().into(),
                config.amqp.binding_key.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
    }
    let started = Instant::now();
    while DONE.load(Ordering::SeqCst) < messages {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("the worker did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_kb("VmRSS:");
    let peak = status_kb("VmHWM:");
    worker.shutdown().await?;
    println!(
        "{messages} messages of {:.1} MB ({:.0} MB in all) in {:.1} s",
        body.len() as f64 / 1e6,
        (body.len() * messages) as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    println!(
        "RSS before {:.0} MB, peak {:.0} MB, after {:.0} MB",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );
    channel
        .queue_delete(
            config.default_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    Ok(())
}
