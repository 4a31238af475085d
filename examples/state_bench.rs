//! The worker-side cost of the Redis result backend's state writes, apart from any broker:
//! `tasks` tasks, `concurrency` at a time, each a STARTED write then a SUCCESS write, as
//! a worker makes them. Prints tasks/s and the CPU per task of this process, and of Redis
//! with `BENCH_REDIS_PID=<pid>`. Then, in the same run, the same two states written as Go's
//! Redis backend writes them (a plain `SET` with its expiry: `updateState` in
//! `v2/backends/redis/goredis.go`), `concurrency` tasks a pipeline, with no read and no guard:
//! what machinery's guarded write script costs beside a bare write.
//!
//! ```sh
//! cargo run --release --example state_bench [tasks] [concurrency]
//! ```

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use machinery::backend::redis::RedisBackend;
use machinery::backend::ResultBackend;
use machinery::wire::{GoTime, State, TaskState};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::{cpu_seconds_of, forget_keys};

/// PENDING for each of `uuids`, as a producer writes it.
fn pending_of(uuids: &[String]) -> Vec<TaskState> {
    uuids
        .iter()
        .map(|u| TaskState {
            task_uuid: u.clone(),
            task_name: "noop".into(),
            state: State::Pending,
            created_at: GoTime::now(),
            ..TaskState::default()
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tasks: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(256);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let backend = RedisBackend::connect(&url, Duration::from_secs(600))
        .await
        .expect("Redis");
    let uuids: Vec<String> = (0..tasks)
        .map(|i| format!("task_state_bench_{}_{i}", std::process::id()))
        .collect();
    for chunk in pending_of(&uuids).chunks(1000) {
        backend.set_states(chunk.to_vec()).await.expect("pending");
    }
    let redis_pid = std::env::var("BENCH_REDIS_PID").ok();
    let redis_cpu = || redis_pid.as_deref().map(cpu_seconds_of);
    let (cpu0, redis0) = (cpu_seconds_of("self"), redis_cpu());
    let started = Instant::now();
    let mut running = FuturesUnordered::new();
    let mut next = uuids.iter();
    loop {
        while running.len() < concurrency {
            let Some(uuid) = next.next() else { break };
            let backend = backend.clone();
            running.push(async move {
                backend
                    .start(TaskState::new(uuid, State::Started))
                    .await
                    .expect("STARTED");
                let done = TaskState {
                    task_name: "noop".into(),
                    results: Some(Vec::new()),
                    ..TaskState::new(uuid, State::Success)
                };
                backend.record(done).await.expect("SUCCESS");
            });
        }
        if running.next().await.is_none() {
            break;
        }
    }
    // The rate since `started`, and this process's and Redis's CPU per task since `cpu0` and
    // `redis0` (Redis's when its pid is known).
    let report = |what: String, started: Instant, cpu0: f64, redis0: Option<f64>| {
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds_of("self") - cpu0;
        let redis = match (redis_cpu(), redis0) {
            (Some(now), Some(before)) => {
                format!(", redis {:.2} us/task", (now - before) * 1e6 / tasks as f64)
            }
            _ => String::new(),
        };
        println!(
            "{what}: {:.0} tasks/s, client {:.2} us/task{redis}",
            tasks as f64 / elapsed,
            cpu * 1e6 / tasks as f64,
        );
    };
    report(
        format!("{tasks} tasks, {concurrency} at once"),
        started,
        cpu0,
        redis0,
    );
    forget_keys(&url, &uuids).await;

    // The same writes as Go makes them: the raw client's floor.
    let raw: Vec<String> = (0..tasks)
        .map(|i| format!("task_state_bench_raw_{}_{i}", std::process::id()))
        .collect();
    // PENDING first, as for machinery's run: each write replaces a stored record.
    for chunk in pending_of(&raw).chunks(1000) {
        backend.set_states(chunk.to_vec()).await.expect("pending");
    }
    let client = redis::Client::open(url.as_str()).expect("Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let record = |uuid: &str, state: &str, results: &str| {
        format!(
            r#"{{"TaskUUID":"{uuid}","TaskName":"noop","State":"{state}","Results":{results},"Error":"","CreatedAt":"0001-01-01T00:00:00Z","TTL":0}}"#
        )
    };
    let (cpu0, redis0) = (cpu_seconds_of("self"), redis_cpu());
    let started = Instant::now();
    for chunk in raw.chunks(concurrency.max(1)) {
        for (state, results) in [("STARTED", "null"), ("SUCCESS", "[]")] {
            let mut pipe = redis::pipe();
            for uuid in chunk {
                pipe.cmd("SET")
                    .arg(uuid)
                    .arg(record(uuid, state, results))
                    .arg("EX")
                    .arg(600)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await.expect("SET");
        }
    }
    report(
        format!("raw SET, {concurrency} a pipeline"),
        started,
        cpu0,
        redis0,
    );
    forget_keys(&url, &raw).await;
}
