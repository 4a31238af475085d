//! What waiting for results costs in Redis: many concurrent `wait_final` calls (what
//! `AsyncResult::get()` does) on tasks that stay pending for a while, then finish.
//!
//! ```sh
//! cargo run --release --example wait_bench [waiters] [seconds] [runs]   # 10000 10 3
//! ```
//!
//! Each run measures two ways of waiting, in the same process against the same server:
//!
//! - `shared`: the backend's `wait_final`, where every waiter shares one poller that reads the
//!   waited keys with batched `MGET`s;
//! - `per-get`: the loop each waiter ran before, one `GET` per waiter per poll with a backoff
//!   from 1 ms to 100 ms (reimplemented here on `get_state`).
//!
//! For each it prints the Redis commands per second and the socket reads per second the server
//! processed (`INFO stats`: `total_commands_processed`, `total_reads_processed`) while the
//! waiters wait: every round trip's request takes at least one read, a large one (a pipeline
//! of `MGET`s of 1,000 keys each) several, so reads per second bound round trips per second
//! from above, the CPU the producer
//! (this process) and the server used in that time, and how long after the tasks finished the
//! last waiter woke. The last lines are the medians over the runs.
//!
//! `WAIT_BENCH_SHARED_ONLY=1` measures only the shared way (for profiling).
//!
//! It starts a private `redis-server` on a free port (without persistence) so that no other
//! client's commands are counted; with `REDIS_URL` set it uses that server instead (and
//! counts whatever else runs there).

#[path = "common/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;

use std::process::Command;
use std::time::Duration;

use machinery::backend::redis::RedisBackend;
use machinery::backend::ResultBackend;
use machinery::wire::{GoTime, State, TaskState};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Shared,
    PerGet,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Shared => "shared",
            Way::PerGet => "per-get",
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Figures {
    commands_per_sec: f64,
    reads_per_sec: f64,
    producer_cpu: f64,
    server_cpu: f64,
    wake_ms: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (waiters, secs, runs) = (arg(1, 10_000) as usize, arg(2, 10), arg(3, 3) as usize);
    let server = RedisServer::start()?;
    println!(
        "wait_bench: {waiters} waiters, {secs} s pending, {runs} runs, Redis at {}{}",
        server.url,
        if server.pid().is_some() {
            " (private)"
        } else {
            " (shared: other clients count too)"
        }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut all: Vec<(Way, Figures)> = Vec::new();
        for run in 0..runs {
            // Alternate which way goes first.
            let ways = if std::env::var_os("WAIT_BENCH_SHARED_ONLY").is_some() {
                [Way::Shared, Way::Shared]
            } else if run % 2 == 0 {
                [Way::Shared, Way::PerGet]
            } else {
                [Way::PerGet, Way::Shared]
            };
            for way in ways {
                let f = measure(&server, way, waiters, Duration::from_secs(secs)).await?;
                println!(
                    "run {} {:>8}: {:>9.0} commands/s {:>8.0} socket reads/s  producer CPU {:>5.1}%  \
                     redis CPU {:>5.1}%  last wake-up {:>6.1} ms after the finish",
                    run + 1,
                    way.name(),
                    f.commands_per_sec,
                    f.reads_per_sec,
                    f.producer_cpu,
                    f.server_cpu,
                    f.wake_ms
                );
                all.push((way, f));
            }
        }
        println!("medians of {runs} runs:");
        for way in [Way::Shared, Way::PerGet] {
            if !all.iter().any(|(w, _)| *w == way) {
                continue;
            }
            let pick = |get: fn(&Figures) -> f64| {
                median(
                    all.iter()
                        .filter(|(w, _)| *w == way)
                        .map(|(_, f)| get(f))
                        .collect(),
                )
            };
            println!(
                "  {:>8}: {:>9.0} commands/s {:>8.0} socket reads/s  producer CPU {:>5.1}%  \
                 redis CPU {:>5.1}%  last wake-up {:>6.1} ms after the finish",
                way.name(),
                pick(|f| f.commands_per_sec),
                pick(|f| f.reads_per_sec),
                pick(|f| f.producer_cpu),
                pick(|f| f.server_cpu),
                pick(|f| f.wake_ms),
            );
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}

async fn measure(
    server: &RedisServer,
    way: Way,
    waiters: usize,
    pending_for: Duration,
) -> Result<Figures, Box<dyn std::error::Error>> {
    let backend = RedisBackend::connect(&server.url, TTL).await?;
    let run = uuid();
    let ids: Vec<String> = (0..waiters)
        .map(|i| format!("wait_bench_{run}_{i}"))
        .collect();
    backend
        .set_states(
            ids.iter()
                .map(|id| TaskState {
                    task_name: "bench".into(),
                    created_at: GoTime::now(),
                    ..TaskState::new(id.clone(), State::Pending)
                })
                .collect(),
        )
        .await?;

    let (commands, reads) = (
        server.stat("total_commands_processed")?,
        server.stat("total_reads_processed")?,
    );
    let (cpu, server_cpu, started) = (
        process_cpu(None)?,
        server.pid().map(|pid| process_cpu(Some(pid))).transpose()?,
        Instant::now(),
    );
    let deadline = Some(Instant::now() + pending_for + Duration::from_secs(120));
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (backend, id) = (backend.clone(), id.clone());
            tokio::spawn(async move {
                match way {
                    Way::Shared => backend.wait_final(&id, deadline).await,
                    Way::PerGet => per_get_wait(&backend, &id, deadline).await,
                }
            })
        })
        .collect();
    tokio::time::sleep(pending_for).await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = process_cpu(None)? - cpu;
    let server_cpu = server
        .pid()
        .map(|pid| process_cpu(Some(pid)))
        .transpose()?
        .zip(server_cpu)
        .map(|(after, before)| after - before);
    let commands = server.stat("total_commands_processed")? - commands - 1;
    let reads = server.stat("total_reads_processed")? - reads - 2;

    let finished = Instant::now();
    backend
        .set_states(
            ids.iter()
                .map(|id| TaskState {
                    results: Some(Vec::new()),
                    ..TaskState::new(id.clone(), State::Success)
                })
                .collect(),
        )
        .await?;
    for task in tasks {
        let state = task.await??;
        if state.state != State::Success {
            return Err(format!("{} ended {}", state.task_uuid, state.state).into());
        }
    }
    let wake_ms = finished.elapsed().as_secs_f64() * 1e3;
    for chunk in ids.chunks(1_000) {
        for id in chunk {
            backend.purge_state(id).await?;
        }
    }
    Ok(Figures {
        commands_per_sec: commands as f64 / wall,
        reads_per_sec: reads as f64 / wall,
        producer_cpu: cpu / wall * 100.0,
        server_cpu: server_cpu.map_or(f64::NAN, |c| c / wall * 100.0),
        wake_ms,
    })
}

/// The loop `RedisBackend::wait_final` ran before it shared a poller: its own `GET` per poll,
/// backing off from 1 ms to 100 ms.
async fn per_get_wait(
    backend: &RedisBackend,
    task_uuid: &str,
    deadline: Option<Instant>,
) -> machinery::Result<TaskState> {
    let mut pause = Duration::from_millis(1);
    loop {
        let read = backend.get_state(task_uuid);
        let state = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, read)
                .await
                .map_err(|_| machinery::Error::new(machinery::ErrorKind::Timeout, "deadline"))??,
            None => read.await?,
        };
        if let Some(state) = state {
            if state.state.is_final() {
                return Ok(state);
            }
        }
        let wake = Instant::now() + pause;
        match deadline {
            Some(deadline) if deadline <= Instant::now() => {
                return Err(machinery::Error::new(
                    machinery::ErrorKind::Timeout,
                    "deadline",
                ))
            }
            Some(deadline) => tokio::time::sleep_until(wake.min(deadline)).await,
            None => tokio::time::sleep_until(wake).await,
        }
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n => values[n / 2],
    }
}

fn uuid() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}

/// User + system CPU seconds of a process (this one when `pid` is `None`), from /proc.
fn process_cpu(pid: Option<u32>) -> Result<f64, Box<dyn std::error::Error>> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("unexpected /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).ok_or("no utime")?.parse::<f64>()?
        + fields.get(12).ok_or("no stime")?.parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
