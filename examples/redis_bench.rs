//! The Redis broker's drain rate against raw `RPUSH`/`BLPOP` on the same Redis, measured in
//! the same run.
//!
//! ```sh
//! tests/services.sh
//! cargo run --release --example redis_bench [tasks]      # default 50,000
//! ```
//!
//! Raw: the same signature bodies `RPUSH`ed in pipelines of 1,000, then popped by one
//! connection doing `BLPOP` after `BLPOP` (Go's Redis broker takes messages this way, one
//! round trip each, and loses the message if its worker dies), and by 64 `BLPOP` loops sharing
//! one multiplexed connection (pipelined: the raw ceiling for a consumer). machinery: `send_all` of no-op
//! tasks in batches of 1,000, then one worker (concurrency 64, prefetch `PREFETCH` or 256, no result backend) drains them
//! through processing lists (taken in batches, each acked with its own `LREM` script).
//! Prints both rates and the ratios machinery/raw.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use machinery::{task, Config, Server};
use tokio::sync::Notify;

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static FINISHED: Notify = Notify::const_new();

#[task]
async fn noop(n: i64) {
    let _ = n;
    if DONE.fetch_add(1, Ordering::Relaxed) + 1 == TARGET.load(Ordering::Relaxed) {
        FINISHED.notify_one();
    }
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// `PREFETCH` (default 256): how many messages the worker may hold unsettled; above its
/// concurrency (64), takes move many messages per round trip.
fn prefetch() -> u16 {
    std::env::var("PREFETCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config(tag: &str) -> Config {
    let id = std::process::id();
    let mut config = Config::builder()
        .broker(redis_url())
        .default_queue(format!("bench_{tag}_{id}_tasks"))
        .prefetch_count(prefetch())
        .build()
        .expect("config");
    config.redis.delayed_tasks_key = format!("bench_{tag}_{id}_delayed");
    config
}

async fn connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection_with_config(
            // A loaded machine can take longer than the default 500 ms for a pipeline.
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .expect("Redis on 127.0.0.1:6379 (tests/services.sh)")
}

/// Raw RPUSH (pipelined) and BLPOP (one at a time; then 64 at once on one multiplexed
/// connection, so pipelined): tasks/s each.
async fn raw(bodies: &[Vec<u8>]) -> (f64, f64, f64) {
    let queue = format!("bench_raw_{}", std::process::id());
    let mut conn = connection().await;
    let started = Instant::now();
    for chunk in bodies.chunks(1000) {
        let mut pipe = redis::pipe();
        for body in chunk {
            pipe.cmd("RPUSH").arg(&queue).arg(&body[..]).ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("RPUSH");
    }
    let push = bodies.len() as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..bodies.len() {
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
            .arg(&queue)
            .arg(1)
            .query_async(&mut conn)
            .await
            .expect("BLPOP");
        assert!(popped.is_some(), "the raw queue ran dry");
    }
    let pop = bodies.len() as f64 / started.elapsed().as_secs_f64();
    for chunk in bodies.chunks(1000) {
        let mut pipe = redis::pipe();
        for body in chunk {
            pipe.cmd("RPUSH").arg(&queue).arg(&body[..]).ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("RPUSH");
    }
    let started = Instant::now();
    let left = std::sync::Arc::new(AtomicUsize::new(bodies.len()));
    let mut poppers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (mut conn, queue, left) = (conn.clone(), queue.clone(), left.clone());
        poppers.spawn(async move {
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let popped: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
                    .arg(&queue)
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .expect("BLPOP");
                assert!(popped.is_some(), "the raw queue ran dry");
            }
        });
    }
    while poppers.join_next().await.is_some() {}
    let pop64 = bodies.len() as f64 / started.elapsed().as_secs_f64();
    let _: i64 = redis::cmd("DEL")
        .arg(&queue)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    (push, pop, pop64)
}

/// machinery: send, then drain with one worker: tasks/s each.
async fn machinery_rates(tasks: usize) -> (f64, f64) {
    let config = config("drain");
    let server = Server::new(config.clone()).await.expect("server");
    let started = Instant::now();
    for start in (0..tasks).step_by(1000) {
        let end = (start + 1000).min(tasks);
        server
            .send_all((start..end).map(|i| noop::signature(i as i64)))
            .await
            .expect("send");
    }
    let send = tasks as f64 / started.elapsed().as_secs_f64();
    DONE.store(0, Ordering::SeqCst);
    TARGET.store(tasks, Ordering::SeqCst);
    let finished = FINISHED.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let started = Instant::now();
    let worker = server
        .worker()
        .concurrency(64)
        .spawn()
        .await
        .expect("worker");
    finished.await;
    let drain = tasks as f64 / started.elapsed().as_secs_f64();
    worker.shutdown().await.expect("shutdown");
    let mut conn = connection().await;
    let q = &config.default_queue;
    let _: i64 = redis::cmd("DEL")
        .arg(&[
            q.clone(),
            format!("{q}.consumers"),
            format!("{q}.deliveries"),
        ])
        .query_async(&mut conn)
        .await
        .expect("DEL");
    (send, drain)
}

#[tokio::main]
async fn main() {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000);
    // The bodies machinery sends, so both sides move the same bytes.
    let bodies: Vec<Vec<u8>> = (0..tasks)
        .map(|i| {
            let mut sig = machinery::wire::Signature::new("noop");
            sig.routing_key = "bench".into();
            sig.args = vec![machinery::value::encode_arg(&(i as i64)).expect("arg")];
            sig.to_json().expect("json")
        })
        .collect();
    let (raw_push, raw_pop, raw_pop64) = raw(&bodies).await;
    let (send, drain) = machinery_rates(tasks).await;
    println!("tasks: {tasks} ({} bytes each)", bodies[0].len());
    println!("raw RPUSH (pipelined 1000)  {raw_push:>10.0}/s");
    println!("raw BLPOP (one at a time)   {raw_pop:>10.0}/s");
    println!("raw BLPOP (64 at once)      {raw_pop64:>10.0}/s");
    println!(
        "machinery send_all          {send:>10.0}/s   {:.2}x raw RPUSH",
        send / raw_push
    );
    println!(
        "machinery drain (no results){drain:>10.0}/s   {:.2}x raw BLPOP, {:.2}x raw BLPOP x64",
        drain / raw_pop,
        drain / raw_pop64
    );
}
