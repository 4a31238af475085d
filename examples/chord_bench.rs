//! What a chord's completion check costs with the Redis result backend: the time to run a
//! group of `n` no-op tasks, and the same group as a chord with a callback, where each member
//! that finishes reads every member's state (`get_states`, batched `MGET`s).
//!
//! ```sh
//! cargo run --release --example chord_bench [members...]   # 2000 10000
//! ```
//!
//! The broker is the embedded one; the backend a private `redis-server` on a free port (or
//! `REDIS_URL`'s). Prints, for each size, the group's time, the chord's time (from the send to
//! the callback's result) and their ratio, and the time of one `get_states` of every member
//! (what each member's completion check reads).

#[path = "common/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;

use std::time::{Duration, Instant};

use machinery::{task, Config, Group, Server};

#[task]
fn chord_bench_one(n: i64) -> i64 {
    n
}

#[task]
fn chord_bench_count(#[variadic] args: Vec<i64>) -> i64 {
    args.len() as i64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![2_000, 10_000]
    } else {
        sizes
    };
    let redis = RedisServer::start()?;
    let url = redis.url.clone();
    println!("chord_bench: Redis at {url}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        for n in sizes {
            let config = Config::builder()
                .broker(format!("memory://chord-bench-{n}"))
                .result_backend(url.as_str())
                .build()?;
            let server = Server::new(config).await?;
            let worker = server.worker().concurrency(16).spawn().await?;
            let members = || Group::new((0..n as i64).map(chord_bench_one::signature));

            let started = Instant::now();
            let group = server.send_group(members()).await?;
            let results = group.get_timeout(Duration::from_secs(600)).await?;
            let group_time = started.elapsed();
            assert_eq!(results.len(), n);

            let started = Instant::now();
            let chord = server
                .send_chord(members().chord(chord_bench_count::signature(vec![])))
                .await?;
            let count = chord.get_timeout(Duration::from_secs(600)).await?;
            let chord_time = started.elapsed();
            assert_eq!(count, n as i64);

            // What each member's completion check reads: every member's state.
            let backend = server.backend().ok_or("no result backend")?;
            let uuids: Vec<String> = group
                .members()
                .iter()
                .map(|m| m.task_uuid().to_owned())
                .collect();
            let reads = 20;
            let started = Instant::now();
            for _ in 0..reads {
                backend.get_states(&uuids).await?;
            }
            let per_read = started.elapsed() / reads;

            println!("{n:>6} members: get_states of all {per_read:>9.2?},");
            println!(
                "{n:>6} members: group {:>8.2} s, chord {:>8.2} s, chord/group {:>5.2}",
                group_time.as_secs_f64(),
                chord_time.as_secs_f64(),
                chord_time.as_secs_f64() / group_time.as_secs_f64()
            );
            worker.shutdown().await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
