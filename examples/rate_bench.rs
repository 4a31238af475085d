//! Rate limits on a real RabbitMQ: the measured start rate against the limit, for one worker
//! and for three workers sharing a cluster-wide limit in Redis.
//!
//! ```sh
//! tests/services.sh
//! cargo run --release --example rate_bench [tasks] [limit]    # default 2000 at 200/s
//! RATE_BENCH_ONLY=three cargo run --release --example rate_bench   # one scenario: one, onecluster, three, threelocal
//! ```
//!
//! A backlog of `tasks` no-op tasks limited to `limit` is sent first; then the workers start
//! (16 tasks at once each). Each task records when it started. Prints, per scenario, the
//! measured rate (starts − 1 over the time from the first start to the last), its ratio to
//! the limit (target: within 5%), and the most starts in any one-second window. The last row,
//! three workers each with only its own limit, shows what the cluster-wide limit prevents.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use machinery::options::RateLimit;
use machinery::{task, Config, Server};
use tokio::sync::Notify;

static STARTS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
static TARGET: Mutex<usize> = Mutex::new(usize::MAX);
static FINISHED: Notify = Notify::const_new();

#[task(rate_limit = "200/s")]
async fn limited(n: i64) {
    let _ = n;
    let mut starts = STARTS.lock().unwrap();
    starts.push(Instant::now());
    if starts.len() == *TARGET.lock().unwrap() {
        FINISHED.notify_one();
    }
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn config(tag: &str) -> Config {
    let id = std::process::id();
    Config::builder()
        .broker(amqp_url())
        .exchange(format!("rate_bench_{tag}_{id}"))
        .default_queue(format!("rate_bench_{tag}_{id}_tasks"))
        .binding_key(format!("rate_bench_{tag}_{id}_key"))
        .prefetch_count(64)
        .build()
        .expect("config")
}

struct Figures {
    rate: f64,
    busiest_second: usize,
}

/// Sends `tasks` tasks, then runs `workers` workers until all have started.
async fn scenario(
    tag: &str,
    tasks: usize,
    limit: RateLimit,
    workers: usize,
    cluster: bool,
) -> Figures {
    let config = config(tag);
    // The Redis key of a scenario before expires a second after its last start.
    let server = Server::new(config.clone())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    // Connecting declared the queue: the backlog is there before the workers start.
    for start in (0..tasks).step_by(1000) {
        let end = (start + 1000).min(tasks);
        server
            .send_all((start..end).map(|i| limited::signature(i as i64)))
            .await
            .expect("send");
    }
    STARTS.lock().unwrap().clear();
    *TARGET.lock().unwrap() = tasks;
    let finished = FINISHED.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let mut handles = Vec::new();
    for _ in 0..workers {
        // Each worker on its own connection, with its own limiter.
        let server = Server::new(config.clone()).await.expect("server");
        let mut builder = server
            .worker()
            .concurrency(16)
            .tasks([limited::NAME])
            .rate_limit(limited::NAME, limit);
        if cluster {
            builder = builder.cluster_rate_limits(redis_url());
        }
        handles.push(builder.spawn().await.expect("worker"));
    }
    tokio::time::timeout(Duration::from_secs(600), finished)
        .await
        .expect("all tasks started");
    for handle in handles {
        handle.shutdown().await.expect("shutdown");
    }
    cleanup(&config).await;
    let mut starts = STARTS.lock().unwrap().clone();
    starts.sort();
    let span = *starts.last().expect("starts") - starts[0];
    let busiest_second = (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|s| **s < starts[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    Figures {
        rate: (starts.len() - 1) as f64 / span.as_secs_f64(),
        busiest_second,
    }
}

async fn cleanup(config: &Config) {
    if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .queue_delete(
                    config.default_queue.as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
            let _ = channel
                .exchange_delete(config.amqp.exchange.as_str().into(), Default::default())
                .await;
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let only = std::env::var("RATE_BENCH_ONLY").ok();
    let args: Vec<String> = std::env::args().collect();
    let tasks: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let limit: RateLimit = args
        .get(2)
        .map_or("200/s", String::as_str)
        .parse()
        .expect("a limit such as 200/s");
    let per_second = 1.0 / limit.interval().as_secs_f64();
    println!("{tasks} tasks limited to {limit} ({per_second:.0}/s), RabbitMQ, 16 tasks at once per worker");
    for (tag, workers, cluster, what) in [
        ("one", 1, false, "1 worker, its own limit      "),
        ("onecluster", 1, true, "1 worker, limit in Redis     "),
        ("three", 3, true, "3 workers, limit in Redis    "),
        ("threelocal", 3, false, "3 workers, each its own limit"),
    ] {
        if only.as_deref().is_some_and(|only| only != tag) {
            continue;
        }
        let f = scenario(tag, tasks, limit, workers, cluster).await;
        let target = if cluster || workers == 1 {
            "(target 0.95..1.05)"
        } else {
            "(no shared limit: ~3x)"
        };
        println!(
            "{what}: {:>7.1} starts/s = {:.3}x the limit {target}; busiest second: {} starts",
            f.rate,
            f.rate / per_second,
            f.busiest_second
        );
    }
}
