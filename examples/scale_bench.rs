//! How cost grows with the work: 1, 2 and 4 worker processes drain one RabbitMQ queue that was
//! filled to 1k, 100k and 1M messages before they started, against raw lapin on the same depth.
//!
//! ```sh
//! tests/services.sh
//! cargo build --release --example scale_bench
//! target/release/examples/scale_bench                                  # 1k, 100k, 1M × 1, 2, 4 workers, both backends
//! target/release/examples/scale_bench --depths 1000,10000 --workers 1,2 --backend none   # CI-sized
//! target/release/examples/scale_bench --depths 100000 --runs 3 --backend redis
//! ```
//!
//! Flags: `--depths` (default `1000,100000,1000000`), `--workers` (`1,2,4`), `--backend`
//! (`none`, `redis` or `both`, the default), `--runs` (`1`), `--concurrency` (tasks at once per
//! worker process and its prefetch, `256`), `--queue-mode` (`lazy`, the default, declares the
//! queues with `x-queue-mode: lazy`; `default` leaves it out), `--no-raw` (skip the raw
//! reference). `AMQP_URL` and `REDIS_URL` override the loopback defaults.
//!
//! Per run and depth, first the raw reference: the depth is published to a fresh queue
//! (persistent, confirms), then one lapin consumer (prefetch 256, acks batched every 32) drains
//! it. Then, per backend and worker count, a fresh queue (unique name) is filled with `depth`
//! no-op tasks by `Server::send_all`, each carrying its enqueue time (Unix µs) as its argument;
//! the worker processes (this binary re-run as `scale_bench worker …`) connect, report ready,
//! and are all told to go at once. Each records, at the start of each task body, the latency
//! since enqueue in a histogram, and the time of its last start. Printed per cell:
//!
//! - tasks/s: depth / (last start in any worker − go), and its ratio to the raw consume rate
//!   (one lapin consumer);
//! - p50/p99 latency from enqueue to the start of the body (`p50ms`, `p99ms`). With a
//!   pre-filled queue it is mostly the time the message waited: the rest of the fill, the gap
//!   from the end of the fill to the go (`gapms`), then its place in the queue. `gp50ms` and
//!   `gp99ms` count from `max(enqueue, go)`: the part the drain itself causes;
//! - the worker processes' peak RSS (`VmHWM` of each: the largest, `wRSSmx`, and their sum);
//! - RabbitMQ's memory: the queue process's `memory` from `rabbitmqctl list_queues` when the
//!   queue is full (`qMiB`; from a depth of 100,000 on, as the call takes about half a second,
//!   which would dominate a small depth's latency), and the beam process's RSS (`VmRSS`,
//!   sampled every 200 ms) before the fill (`beam0`) and its peak during fill and drain
//!   (`beamPk`), in MiB;
//! - where the CPU goes during the drain (go to the last start), in cores: the beam's
//!   (`bCPU`), the worker processes' together (`wCPU`) and the Redis server's (`rCPU`), from
//!   `/proc/<pid>/stat` at 100 ticks/s;
//! - the fill rate (`fill/s`, `send_all` in batches of 1,000, PENDING states included with
//!   Redis);
//! - the load average (`/proc/loadavg`) before the cell, since the machine is shared.
//!
//! With the Redis backend the results expire after 300 s (`results_expire_in`), so the shared
//! Redis does not keep a million states for an hour.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use machinery::{task, Config, Server};

#[path = "common/raw.rs"]
mod raw;

// ---------------------------------------------------------------------------------------------
// A small log-linear latency histogram (µs): 128 sub-buckets per power of two, so a percentile
// is within 1% of the true value. 40 × 128 counters, about 40 KiB: it does not grow with the
// depth, so it does not distort the worker's RSS as a Vec of a million samples would.

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (40 * SUB) as usize;

struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros() - SUB_BITS; // v >> exp is in [SUB, 2·SUB)
        let i = (exp as u64 + 1) * SUB + ((v >> exp) - SUB);
        (i as usize).min(BUCKETS - 1)
    }

    /// The middle of the bucket `i` covers.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let exp = i / SUB - 1;
        let low = (SUB + i % SUB) << exp;
        low + ((1u64 << exp) >> 1)
    }

    fn record_n(&mut self, v: u64, n: u64) {
        self.counts[Self::index(v)] += n;
        self.total += n;
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(BUCKETS - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Worker process.

static HIST: Mutex<Option<Histogram>> = Mutex::new(None);
/// Latency from `max(enqueue, go)` to the start: the part of the wait that the drain causes.
static HIST_GO: Mutex<Option<Histogram>> = Mutex::new(None);
static GO_US: AtomicU64 = AtomicU64::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);
static LAST_US: AtomicU64 = AtomicU64::new(0);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A no-op task that records the time from its enqueue (its argument, Unix µs) to its start.
#[task]
async fn stamp(enqueued_us: i64) {
    let now = now_us();
    let latency = now.saturating_sub(u64::try_from(enqueued_us).unwrap_or(0));
    if let Some(h) = HIST.lock().unwrap().as_mut() {
        h.record_n(latency, 1);
    }
    let from = GO_US
        .load(Ordering::Relaxed)
        .max(u64::try_from(enqueued_us).unwrap_or(0));
    if let Some(h) = HIST_GO.lock().unwrap().as_mut() {
        h.record_n(now.saturating_sub(from), 1);
    }
    LAST_US.fetch_max(now, Ordering::Relaxed);
    COUNT.fetch_add(1, Ordering::Relaxed);
}

/// CPU time (user + system) of a process in clock ticks (`/proc/<pid>/stat` fields 14 and 15;
/// 100 ticks a second on Linux).
fn cpu_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name (field 2) may hold spaces; count from the closing parenthesis.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// `scale_bench worker <tag> <none|redis> <concurrency> <queue-mode>`: connects, prints `ready`,
/// waits for `go` on stdin, consumes, prints `count=N` every 20 ms while it changes, and on
/// `stop` (or end of input) finishes the tasks in flight and prints its figures.
async fn worker_main(args: &[String]) {
    let tag = &args[2];
    let redis = args[3] == "redis";
    let concurrency: usize = args[4].parse().expect("concurrency");
    let lazy = args[5] == "lazy";
    *HIST.lock().unwrap() = Some(Histogram::new());
    *HIST_GO.lock().unwrap() = Some(Histogram::new());
    let server = Server::new(config(tag, redis, concurrency, lazy))
        .await
        .expect("server");
    let worker = server
        .worker()
        .concurrency(concurrency)
        .build()
        .expect("worker");

    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<u64>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut go_tx = Some(go_tx);
        for line in std::io::stdin().lock().lines() {
            match line.as_deref() {
                Ok(l) if l.starts_with("go ") => {
                    if let Some(tx) = go_tx.take() {
                        let _ = tx.send(l[3..].parse().unwrap_or(0));
                    }
                }
                Ok("stop") | Err(_) => break,
                Ok(_) => {}
            }
        }
        drop(go_tx);
        let _ = stop_tx.send(());
    });
    println!("ready");
    std::io::stdout().flush().ok();
    let Ok(go_us) = go_rx.await else { return };
    GO_US.store(go_us, Ordering::Relaxed);
    let cpu_at_go = cpu_ticks("self");
    let done = Arc::new(AtomicBool::new(false));
    let reporter = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = u64::MAX;
            while !done.load(Ordering::Relaxed) {
                let n = COUNT.load(Ordering::Relaxed);
                if n != last {
                    println!("count={n}");
                    std::io::stdout().flush().ok();
                    last = n;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    worker
        .run_until(async move {
            let _ = stop_rx.await;
        })
        .await
        .expect("worker run");
    done.store(true, Ordering::Relaxed);
    let _ = reporter.await;
    let cpu = cpu_ticks("self").saturating_sub(cpu_at_go);
    for (name, hist) in [("hist", &HIST), ("histgo", &HIST_GO)] {
        let hist = hist.lock().unwrap().take().expect("histogram");
        let buckets: Vec<String> = hist
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| format!("{}:{c}", Histogram::value(i)))
            .collect();
        println!("{name}={}", buckets.join(","));
    }
    println!("cpu_ticks={cpu}");
    println!("last_us={}", LAST_US.load(Ordering::Relaxed));
    println!("hwm_kib={}", proc_status_kib("self", "VmHWM:"));
    println!("final={}", COUNT.load(Ordering::Relaxed));
    std::io::stdout().flush().ok();
}

// ---------------------------------------------------------------------------------------------
// Orchestrator.

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn config(tag: &str, redis: bool, concurrency: usize, lazy: bool) -> Config {
    let mut b = Config::builder()
        .broker(amqp_url())
        .exchange(format!("scale_{tag}"))
        .default_queue(format!("scale_{tag}_tasks"))
        .binding_key(format!("scale_{tag}_key"))
        .prefetch_count(u16::try_from(concurrency).unwrap_or(u16::MAX))
        .results_expire_in(300);
    if lazy {
        b = b.queue_declare_arg("x-queue-mode", "lazy");
    }
    if redis {
        b = b.result_backend(redis_url());
    }
    b.build().expect("config")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The pid of the RabbitMQ node's beam process (`rabbitmqctl status` names it).
fn beam_pid() -> Option<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "status"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.trim()
            .strip_prefix("OS PID:")
            .map(|p| p.trim().to_owned())
    })
}

/// The pid of the Redis server on `REDIS_URL`'s port (`redis-cli info server`).
fn redis_pid() -> Option<String> {
    let url = redis_url();
    let port = url
        .rsplit(':')
        .next()
        .map(|p| p.trim_end_matches('/').split('/').next().unwrap_or("6379"))
        .unwrap_or("6379")
        .to_owned();
    let out = Command::new("redis-cli")
        .args(["-p", &port, "info", "server"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("process_id:").map(str::to_owned))
}

/// The queue process's memory in bytes and its message count (`rabbitmqctl list_queues`).
fn queue_memory(queue: &str) -> (u64, u64) {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages",
            "memory",
        ])
        .output();
    let Ok(out) = out else { return (0, 0) };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[0] == queue)
                .then(|| (f[2].parse().unwrap_or(0), f[1].parse().unwrap_or(0)))
        })
        .unwrap_or((0, 0))
}

/// Samples the beam's VmRSS every 200 ms and keeps the peak, until dropped.
struct BeamSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl BeamSampler {
    fn start(pid: Option<String>) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(pid) = pid {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(proc_status_kib(&pid, "VmRSS:"), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        BeamSampler { peak, stop }
    }

    fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for BeamSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lazy_args(lazy: bool) -> FieldTable {
    let mut t = FieldTable::default();
    if lazy {
        t.insert("x-queue-mode".into(), AMQPValue::LongString("lazy".into()));
    }
    t
}

/// Raw lapin: publish `depth` messages of `payload` (persistent, confirms), then drain them
/// with one consumer (prefetch 256, acks batched every 32). Returns the consume rate.
async fn raw_consume(depth: usize, payload: &[u8], lazy: bool) -> f64 {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (tests/services.sh)");
    let channel = conn.create_channel().await.expect("channel");
    let queue = format!("scale_raw_{}", std::process::id());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lazy_args(lazy),
        )
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut sent = 0;
    while sent < depth {
        let n = (depth - sent).min(1000);
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            pending.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        payload,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into()),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for p in pending {
            p.await.expect("confirm");
        }
        sent += n;
    }
    let consumer_channel = conn.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    raw::consume_acking(&mut consumer, &consumer_channel, depth).await;
    let rate = depth as f64 / started.elapsed().as_secs_f64();
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    rate
}

struct Cell {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// From `max(enqueue, go)` to the start.
    go_p50_ms: f64,
    go_p99_ms: f64,
    /// From the end of the fill to the go (the `rabbitmqctl list_queues` call).
    gap_ms: f64,
    /// The beam's CPU during the drain, in cores.
    beam_cpu: f64,
    /// The Redis server's CPU during the drain, in cores.
    redis_cpu: f64,
    /// The worker processes' CPU during the drain, in cores (summed).
    worker_cpu: f64,
    hwm_max_kib: u64,
    hwm_sum_kib: u64,
    fill_rate: f64,
    queue_mem: u64,
    beam_before_kib: u64,
    beam_peak_kib: u64,
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
}

/// What every cell shares.
struct Setup {
    /// Tasks at once per worker process, and its prefetch.
    concurrency: usize,
    /// Queues declared with `x-queue-mode: lazy`.
    lazy: bool,
    /// The pid of RabbitMQ's beam process.
    beam: Option<String>,
    /// The pid of the Redis server.
    redis_server: Option<String>,
}

/// One cell: fill a fresh queue with `depth` tasks, then drain it with `workers` processes.
async fn cell(tag: &str, depth: usize, workers: usize, redis: bool, setup: &Setup) -> Cell {
    let Setup {
        concurrency,
        lazy,
        beam,
        redis_server,
    } = setup;
    let (concurrency, lazy) = (*concurrency, *lazy);
    let config = config(tag, redis, concurrency, lazy);
    let queue = config.default_queue.clone();
    let beam_before_kib = beam
        .as_deref()
        .map(|p| proc_status_kib(p, "VmRSS:"))
        .unwrap_or(0);
    let sampler = BeamSampler::start(beam.clone());
    let server = Server::new(config.clone()).await.expect("server");

    // Start the workers first (connected and built, not yet consuming), so that the time from
    // the end of the fill to the go is short. Each reports on its stdout, read by one thread
    // per process.
    let exe = std::env::current_exe().expect("exe");
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut procs = Vec::new();
    for i in 0..workers {
        let mut child = Command::new(&exe)
            .args([
                "worker",
                tag,
                if redis { "redis" } else { "none" },
                &concurrency.to_string(),
                if lazy { "lazy" } else { "default" },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("worker process");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((i, line)).is_err() {
                    break;
                }
            }
            let _ = tx.send((i, "eof".into()));
        });
        procs.push(Proc { child, stdin });
    }
    drop(tx);
    let rx = Arc::new(Mutex::new(rx));
    let recv = |timeout: Duration| {
        let rx = rx.clone();
        move || rx.lock().unwrap().recv_timeout(timeout)
    };
    let mut ready = 0;
    while ready < workers {
        let (i, line) = tokio::task::spawn_blocking(recv(Duration::from_secs(60)))
            .await
            .expect("join")
            .expect("a worker did not report ready within 60 s");
        match line.as_str() {
            "ready" => ready += 1,
            "eof" => panic!("worker {i} exited before it was ready"),
            _ => {}
        }
    }

    let started = Instant::now();
    let mut sent = 0;
    while sent < depth {
        let n = (depth - sent).min(1000);
        server
            .send_all((0..n).map(|_| stamp::signature(now_us() as i64)))
            .await
            .expect("send");
        sent += n;
    }
    let fill_rate = depth as f64 / started.elapsed().as_secs_f64();
    let filled_us = now_us();
    // `rabbitmqctl` takes about half a second, which would dominate the latency of a small
    // depth: the queue's memory is read from 100,000 messages on.
    let (queue_mem, queued) = if depth >= 100_000 {
        queue_memory(&queue)
    } else {
        (0, depth as u64)
    };
    if queued != depth as u64 {
        eprintln!("  (rabbitmqctl counted {queued} messages in {queue}, expected {depth})");
    }
    let beam_cpu_at_go = beam.as_deref().map(cpu_ticks).unwrap_or(0);
    let redis_cpu_at_go = redis_server.as_deref().map(cpu_ticks).unwrap_or(0);
    let go_at = Instant::now();
    let go_us = now_us();
    for p in &mut procs {
        writeln!(p.stdin, "go {go_us}").expect("go");
        p.stdin.flush().ok();
    }
    // Wait until the workers together have started `depth` tasks.
    let mut counts = vec![0u64; workers];
    let stall = Duration::from_secs(120);
    while counts.iter().sum::<u64>() < depth as u64 {
        let (i, line) = tokio::task::spawn_blocking(recv(stall))
            .await
            .expect("join")
            .unwrap_or_else(|_| panic!("no progress for {stall:?}: {counts:?} of {depth} started"));
        if let Some(n) = line.strip_prefix("count=") {
            counts[i] = n.parse().unwrap_or(counts[i]);
        } else if line == "eof" {
            panic!("worker {i} exited during the drain");
        }
    }
    let drain_secs = go_at.elapsed().as_secs_f64();
    let beam_cpu = beam
        .as_deref()
        .map(cpu_ticks)
        .unwrap_or(0)
        .saturating_sub(beam_cpu_at_go) as f64
        / 100.0
        / drain_secs;
    let redis_cpu = redis_server
        .as_deref()
        .map(cpu_ticks)
        .unwrap_or(0)
        .saturating_sub(redis_cpu_at_go) as f64
        / 100.0
        / drain_secs;
    for p in &mut procs {
        let _ = writeln!(p.stdin, "stop");
        p.stdin.flush().ok();
    }
    let mut hist = Histogram::new();
    let mut hist_go = Histogram::new();
    let mut worker_ticks = 0u64;
    let (mut last_us, mut hwm_max_kib, mut hwm_sum_kib, mut finished) = (0u64, 0u64, 0u64, 0);
    while finished < workers {
        let (_, line) = tokio::task::spawn_blocking(recv(Duration::from_secs(60)))
            .await
            .expect("join")
            .expect("a worker did not finish within 60 s of stop");
        let buckets = line
            .strip_prefix("hist=")
            .map(|b| (b, &mut hist))
            .or_else(|| line.strip_prefix("histgo=").map(|b| (b, &mut hist_go)));
        if let Some((b, h)) = buckets {
            for pair in b.split(',').filter(|s| !s.is_empty()) {
                if let Some((v, c)) = pair.split_once(':') {
                    h.record_n(v.parse().unwrap_or(0), c.parse().unwrap_or(0));
                }
            }
        } else if let Some(v) = line.strip_prefix("cpu_ticks=") {
            worker_ticks += v.parse::<u64>().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("last_us=") {
            last_us = last_us.max(v.parse().unwrap_or(0));
        } else if let Some(v) = line.strip_prefix("hwm_kib=") {
            let v: u64 = v.parse().unwrap_or(0);
            hwm_max_kib = hwm_max_kib.max(v);
            hwm_sum_kib += v;
        } else if line == "eof" {
            finished += 1;
        }
    }
    for mut p in procs {
        let _ = p.child.wait();
    }
    let beam_peak_kib = sampler.peak_kib();
    drop(sampler);
    if hist.total != depth as u64 {
        eprintln!("  (recorded {} starts for {depth} tasks)", hist.total);
    }
    cleanup(&config).await;
    Cell {
        rate: depth as f64 / (last_us.saturating_sub(go_us).max(1) as f64 / 1e6),
        p50_ms: hist.percentile(50.0) as f64 / 1e3,
        p99_ms: hist.percentile(99.0) as f64 / 1e3,
        go_p50_ms: hist_go.percentile(50.0) as f64 / 1e3,
        go_p99_ms: hist_go.percentile(99.0) as f64 / 1e3,
        gap_ms: go_us.saturating_sub(filled_us) as f64 / 1e3,
        beam_cpu,
        redis_cpu,
        worker_cpu: worker_ticks as f64 / 100.0 / drain_secs,
        hwm_max_kib,
        hwm_sum_kib,
        fill_rate,
        queue_mem,
        beam_before_kib,
        beam_peak_kib,
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
        let _ = conn.close(200, "done".into()).await;
    }
}

fn list<T: std::str::FromStr>(v: &str) -> Vec<T> {
    v.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .ok()
                .expect("a comma-separated list of numbers")
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        worker_main(&args).await;
        return;
    }
    let mut depths: Vec<usize> = vec![1_000, 100_000, 1_000_000];
    let mut workers: Vec<usize> = vec![1, 2, 4];
    let mut backends = vec![false, true];
    let mut runs = 1;
    let mut concurrency = 256;
    let mut lazy = true;
    let mut raw = true;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().expect("a value after the flag").clone();
        match a.as_str() {
            "--depths" => depths = list(&value()),
            "--workers" => workers = list(&value()),
            "--runs" => runs = value().parse().expect("--runs N"),
            "--concurrency" => concurrency = value().parse().expect("--concurrency N"),
            "--backend" => {
                backends = match value().as_str() {
                    "none" => vec![false],
                    "redis" => vec![true],
                    "both" => vec![false, true],
                    other => panic!("--backend none|redis|both, not {other}"),
                }
            }
            "--queue-mode" => lazy = value() == "lazy",
            "--no-raw" => raw = false,
            other => {
                panic!("unknown flag {other}; see the doc comment at the top of scale_bench.rs")
            }
        }
    }
    let beam = beam_pid();
    let redis_server = redis_pid();
    println!(
        "scale_bench: depths {depths:?}, workers {workers:?}, concurrency {concurrency} per process, \
         queue mode {}, beam pid {}",
        if lazy { "lazy" } else { "default" },
        beam.as_deref().unwrap_or("unknown")
    );
    println!(
        "{:<3} {:>7} {:>7} {:>2} {:>7} {:>5} {:>8} {:>8} {:>7} {:>7} {:>5} {:>6} {:>6} {:>6} {:>6} {:>6} {:>5} {:>5} {:>6} {:>5}  load",
        "run", "depth", "backend", "w", "tasks/s", "xraw", "p50ms", "p99ms", "gp50ms", "gp99ms",
        "gapms", "wRSSmx", "wRSSsm", "qMiB", "beam0", "beamPk", "bCPU", "wCPU", "fill/s", "rCPU"
    );
    let setup = Setup {
        concurrency,
        lazy,
        beam,
        redis_server,
    };
    let payload = stamp::signature(now_us() as i64)
        .as_wire()
        .to_json()
        .expect("encode");
    let mut n = 0;
    for run in 1..=runs {
        for &depth in &depths {
            let load = loadavg();
            let raw_rate = if raw {
                let r = raw_consume(depth, &payload, lazy).await;
                println!(
                    "{run:<3} {depth:>7} {:>7} {:>2} {r:>7.0} {:>5} {:>110}  {load}",
                    "raw", 1, "1.00", ""
                );
                r
            } else {
                f64::NAN
            };
            for &redis in &backends {
                for &w in &workers {
                    n += 1;
                    let tag = format!("{}_{n}", std::process::id());
                    let load = loadavg();
                    let c = cell(&tag, depth, w, redis, &setup).await;
                    println!(
                        "{run:<3} {depth:>7} {:>7} {w:>2} {:>7.0} {:>5.2} {:>8.1} {:>8.1} {:>7.1} {:>7.1} {:>5.0} {:>6.1} {:>6.1} {:>6.1} {:>6.0} {:>6.0} {:>5.2} {:>5.2} {:>6.0} {:>5.2}  {load}",
                        if redis { "redis" } else { "none" },
                        c.rate,
                        c.rate / raw_rate,
                        c.p50_ms,
                        c.p99_ms,
                        c.go_p50_ms,
                        c.go_p99_ms,
                        c.gap_ms,
                        mib(c.hwm_max_kib),
                        mib(c.hwm_sum_kib),
                        c.queue_mem as f64 / 1048576.0,
                        mib(c.beam_before_kib),
                        mib(c.beam_peak_kib),
                        c.beam_cpu,
                        c.worker_cpu,
                        c.fill_rate,
                        c.redis_cpu,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn percentiles_within_one_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record_n(v, 1);
        }
        for (p, want) in [(50.0, 50_000.0), (99.0, 99_000.0), (100.0, 100_000.0)] {
            let got = h.percentile(p) as f64;
            assert!((got - want).abs() / want < 0.01, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile(0.0), 1);
    }
}
