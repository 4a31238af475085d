//! The cost of the worker registry and recent-task index: no-op tasks end to end on the
//! embedded broker and backend, with the registry off, and on (writing to Redis DB 12 at
//! `REDIS_URL`, default `redis://127.0.0.1:6379/`), alternated, three runs each.
//!
//! ```sh
//! cargo run --release --example registry_bench [tasks]
//! ```
//!
//! Prints each run's tasks/s, the medians and the ratio on/off. The raw reference is the same
//! path with the registry off, measured in the same run.

use std::time::{Duration, Instant};

use machinery::{task, Config, Server};

#[task]
async fn registry_noop(n: i64) -> i64 {
    n
}

async fn run(tasks: usize, registry: Option<&str>) -> f64 {
    // A fresh embedded broker and backend per run: states do not pile up across runs.
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("registry-bench-{}-{run}", std::process::id());
    let mut config = Config::builder()
        .broker(format!("memory://{name}"))
        .build()
        .expect("config");
    match registry {
        Some(url) => config.registry.redis_url = Some(url.to_owned()),
        None => config.registry.enabled = false,
    }
    let server = Server::new(config).await.expect("server");
    let worker = server
        .worker()
        .concurrency(64)
        .spawn()
        .await
        .expect("worker");
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(1000) {
        let sigs: Vec<_> = chunk
            .iter()
            .map(|n| registry_noop::signature(i64::try_from(*n).unwrap_or(0)))
            .collect();
        handles.extend(server.send_all(sigs).await.expect("send"));
    }
    for handle in handles {
        handle
            .get_timeout(Duration::from_secs(120))
            .await
            .expect("result");
    }
    let secs = started.elapsed().as_secs_f64();
    worker.shutdown().await.expect("shutdown");
    tasks as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000);
    let base = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let (scheme, rest) = base.split_once("://").expect("a redis:// URL");
    let url = format!("{scheme}://{}/12", rest.split('/').next().unwrap_or(""));
    // Warm-up.
    run(tasks / 10, None).await;
    run(tasks / 10, Some(&url)).await;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let a = run(tasks, None).await;
        let b = run(tasks, Some(&url)).await;
        println!("run {i}: registry off {a:>9.0} tasks/s, on {b:>9.0} tasks/s");
        off.push(a);
        on.push(b);
    }
    let (off, on) = (median(off), median(on));
    println!(
        "median of 3, {tasks} no-op tasks: off {off:.0} tasks/s, on {on:.0} tasks/s, on/off {:.3} ({:+.1}%)",
        on / off,
        (on / off - 1.0) * 100.0
    );
}
