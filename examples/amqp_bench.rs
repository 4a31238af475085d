//! Throughput on a real RabbitMQ, against the broker's own ceiling measured in the same run.
//!
//! ```sh
//! tests/services.sh
//! cargo run --release --example amqp_bench [tasks]      # default 50,000
//! ```
//!
//! Prints: raw lapin publish (persistent, confirms windowed), raw lapin consume (acks batched
//! with `multiple = true` every 32 deliveries) of a bare body and of the message machinery
//! sends (its UUID, routing key and `traceparent` in the body), a raw consume that also stores
//! each message's STARTED and SUCCESS in Redis with Go's plain `SET` (a lean hand-written
//! baseline for a drain with Redis results: one pipelined round trip a batch), machinery's
//! send rate and a
//! worker's drain rate of no-op tasks without a result backend and with Redis results, the
//! ratios machinery/raw, the time a worker takes to be ready, and a worker's RSS while 100,000
//! tasks wait in its queue.
//!
//! ```sh
//! cargo run --release --example amqp_bench obs [tasks] [rounds]   # overhead of spans + metrics
//! ```
//!
//! `obs` measures the drain without a result backend with observability off (no subscriber, no
//! metrics listener) and on (an INFO `tracing` `fmt` subscriber formatting every span and event
//! into a sink without colours, as for a log file, and the Prometheus listener on), each in a
//! fresh process, interleaved (which runs first alternates), three times each with a raw lapin
//! consume beside; prints the medians, the overhead and the ratios. `BENCH_ANSI=1` formats with
//! terminal colours, `BENCH_OBS=spans` or `BENCH_OBS=metrics` turns on only that part.
//! `amqp_bench drain-child off|on [tasks]` is one such run alone; `BENCH_RESULTS=1` gives it the
//! Redis result backend. In every mode, `BENCH_IN_PLACE=1` runs the worker's deliveries in place
//! and `BENCH_IN_PLACE=0` spawned (`WorkerBuilder::placement`; unset, the default, adaptive),
//! `BENCH_REGISTRY=0` turns the worker registry off (`REGISTRY=false`), and `BENCH_YIELD=1` makes
//! the no-op body wait once (`yield_now`) before it ends. `amqp_bench raw-child [tasks]` is the
//! raw consume alone, of the bare body, of machinery's message, of that message with its
//! `traceparent` in the AMQP headers too (what a header table costs), and of machinery's message
//! storing its states. `BENCH_PIDS=pid,pid` also prints the CPU
//! those processes (RabbitMQ's, Redis's) spend per task during each drain and raw consume;
//! `BENCH_SIGNAL=1` (drain-child) prints `drain starts` on stderr when the drain starts (to attach
//! a profiler).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use machinery::{task, Config, Server};
use tokio::sync::Notify;

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/placement.rs"]
mod placement;
#[path = "common/raw.rs"]
mod raw;
use cpu::cpu_seconds_of;
use raw::consume_acking;

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static FINISHED: Notify = Notify::const_new();

/// `BENCH_YIELD=1`: the no-op body waits once (`yield_now`) before it ends, as a body that
/// awaits anything does; in place, it then goes on as a task of its own.
static YIELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[task]
async fn noop(n: i64) {
    let _ = n;
    if YIELD.load(Ordering::Relaxed) {
        tokio::task::yield_now().await;
    }
    if DONE.fetch_add(1, Ordering::Relaxed) + 1 == TARGET.load(Ordering::Relaxed) {
        FINISHED.notify_one();
    }
}

/// How many [`hold`] bodies started in this process.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Holds its worker busy, so that the queue stays full while RSS is measured.
#[task]
async fn hold(ms: u64) {
    HELD.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The prefetch (and the worker's concurrency) of every consumer here, raw and machinery's.
const PREFETCH: u16 = 256;

/// This process's configuration for `tag` (its names carry the process id).
fn config(tag: &str, redis: bool) -> Config {
    config_named(&format!("{tag}_{}", std::process::id()), redis)
}

/// A configuration on the exchange, queue and binding key named by `name`.
fn config_named(name: &str, redis: bool) -> Config {
    let mut b = Config::builder()
        .broker(amqp_url())
        .exchange(format!("bench_{name}"))
        .default_queue(format!("bench_{name}_tasks"))
        .binding_key(format!("bench_{name}_key"))
        .prefetch_count(PREFETCH);
    if redis {
        b = b.result_backend(redis_url());
    }
    let mut config = b.build().expect("config");
    if std::env::var("BENCH_REGISTRY").is_ok_and(|v| v == "0") {
        config.registry.enabled = false;
    }
    config
}

/// The `traceparent` of the raw client's messages.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A message for the raw client: a body, and AMQP headers or none; and whether the raw
/// consumer also keeps each message's states in Redis ([`consume_with_states`]).
struct RawMessage {
    body: Vec<u8>,
    headers: Option<FieldTable>,
    states: bool,
}

impl RawMessage {
    /// A no-op task's signature as the body, no headers.
    fn bare() -> Self {
        RawMessage {
            body: noop::signature(1).as_wire().to_json().expect("encode"),
            headers: None,
            states: false,
        }
    }

    /// The message machinery sends for a no-op task (the same properties, a body of the same
    /// size): its producer gives every message a UUID, its routing key and a W3C `traceparent`
    /// in the signature's `Headers`. It has no AMQP headers: machinery keeps the trace context
    /// out of them (README, "differs on purpose").
    fn as_machinery_sends() -> Self {
        let mut signature = noop::signature(1).as_wire().clone();
        signature.uuid = "task_c448db08-75dd-43dd-95ce-12ca74189120".into();
        signature.routing_key = format!("bench_plain_{}_key", std::process::id());
        signature
            .headers
            .insert("traceparent".into(), TRACEPARENT.into());
        RawMessage {
            body: signature.to_json().expect("encode"),
            headers: None,
            states: false,
        }
    }

    /// [`RawMessage::as_machinery_sends`], consumed by a raw consumer that stores each
    /// message's STARTED and SUCCESS in Redis: the ceiling of a drain with Redis results.
    fn with_states() -> Self {
        RawMessage {
            states: true,
            ..RawMessage::as_machinery_sends()
        }
    }

    /// [`RawMessage::as_machinery_sends`] with the `traceparent` in the AMQP headers as well,
    /// as Go's `Publish` (`v2/brokers/amqp/amqp.go`) copies `signature.Headers` there and
    /// machinery did before.
    fn with_header_table() -> Self {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(TRACEPARENT.into()),
        );
        RawMessage {
            headers: Some(headers),
            ..RawMessage::as_machinery_sends()
        }
    }

    fn properties(&self) -> BasicProperties {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        match &self.headers {
            Some(headers) => properties.with_headers(headers.clone()),
            None => properties,
        }
    }
}

/// [`raw`] of each message in turn, starting at the one the process id picks (so that none is
/// always the one run right after another's messages); the rates in the order given.
async fn raw_in_turn(tasks: usize, messages: &[RawMessage]) -> Vec<(f64, f64)> {
    let first = std::process::id() as usize;
    let mut rates = vec![(0.0, 0.0); messages.len()];
    for i in 0..messages.len() {
        let at = (first + i) % messages.len();
        rates[at] = raw(tasks, &messages[at]).await;
    }
    rates
}

async fn raw(tasks: usize, message: &RawMessage) -> (f64, f64) {
    let states = message.states;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (tests/services.sh)");
    let channel = conn.create_channel().await.expect("channel");
    let queue = format!("bench_raw_{}", std::process::id());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let started = Instant::now();
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(512) {
        let mut pending = Vec::with_capacity(chunk.len());
        for _ in chunk {
            pending.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &message.body,
                        message.properties(),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for p in pending {
            p.await.expect("confirm");
        }
    }
    let publish = tasks as f64 / started.elapsed().as_secs_f64();

    let consumer_channel = conn.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
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
    let redis = if states {
        let client = redis::Client::open(redis_url()).expect("Redis URL");
        Some(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis on 127.0.0.1:6379 (tests/services.sh)"),
        )
    } else {
        None
    };
    let others = Others::now();
    let started = Instant::now();
    let keys = match redis {
        Some(redis) => consume_with_states(&mut consumer, &consumer_channel, redis, tasks).await,
        None => {
            consume_acking(&mut consumer, &consumer_channel, tasks).await;
            Vec::new()
        }
    };
    let consume = tasks as f64 / started.elapsed().as_secs_f64();
    others.print(
        if states {
            "raw consume + states"
        } else {
            "raw consume"
        },
        tasks,
    );
    // Leftover keys would grow Redis's keyspace under the runs after this one.
    cpu::forget_keys(&redis_url(), &keys).await;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    (publish, consume)
}

/// A lean hand-written consumer that also keeps each message's state in Redis with Go's own
/// command, `SET <uuid> <TaskState JSON> EX <expiry>` per state (`updateState` in
/// `v2/backends/redis/goredis.go`; `redis.go` sends `SET`, then `EXPIREAT`), but batched, which
/// Go's worker does not do (one round trip per state). STARTED goes before the (no-op) run and
/// SUCCESS
/// after, with no read and no guard. Each turn takes every delivery ready (up to the
/// prefetch), writes the SUCCESS of the previous turn's deliveries and the STARTED of these in
/// one pipeline, then acks the previous turn's with one `multiple` ack: one Redis round trip a
/// turn, the fewest a consumer that stores STARTED before it runs can make. It does not decode
/// the body: the keys are the process id and the delivery tag. Returns the keys written.
async fn consume_with_states(
    consumer: &mut lapin::Consumer,
    channel: &lapin::Channel,
    mut redis: redis::aio::MultiplexedConnection,
    tasks: usize,
) -> Vec<String> {
    use futures_util::FutureExt as _;
    let id = std::process::id();
    let state = |tag: u64, state: &str, results: &str| {
        format!(
            r#"{{"TaskUUID":"bench_raw_{id}_{tag}","TaskName":"noop","State":"{state}","Results":{results},"Error":"","CreatedAt":"0001-01-01T00:00:00Z","TTL":0}}"#
        )
    };
    let mut keys = Vec::with_capacity(tasks);
    let (mut ran, mut fresh): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    let mut taken = 0;
    let mut done = 0;
    while done < tasks {
        if ran.is_empty() && taken < tasks {
            let delivery = consumer.next().await.expect("open").expect("delivery");
            fresh.push(delivery.delivery_tag);
            taken += 1;
        }
        while fresh.len() < usize::from(PREFETCH) && taken < tasks {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => {
                    fresh.push(delivery.expect("delivery").delivery_tag);
                    taken += 1;
                }
                _ => break,
            }
        }
        let mut pipe = redis::pipe();
        for (tags, name, results) in [(&ran, "SUCCESS", "[]"), (&fresh, "STARTED", "null")] {
            for &tag in tags.iter() {
                pipe.cmd("SET")
                    .arg(format!("bench_raw_{id}_{tag}"))
                    .arg(state(tag, name, results))
                    .arg("EX")
                    .arg(60)
                    .ignore();
            }
        }
        pipe.query_async::<()>(&mut redis).await.expect("SET");
        if let Some(&last) = ran.last() {
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
        done += ran.len();
        keys.extend(fresh.iter().map(|tag| format!("bench_raw_{id}_{tag}")));
        ran = std::mem::take(&mut fresh);
    }
    keys
}

/// machinery: send `tasks` no-op tasks, then let a worker drain them.
async fn machinery_rates(tasks: usize, redis: bool) -> (f64, f64, Duration) {
    machinery_rates_with(tasks, redis, false).await
}

/// [`machinery_rates`], with the worker's metrics listener on if `metrics`.
async fn machinery_rates_with(tasks: usize, redis: bool, metrics: bool) -> (f64, f64, Duration) {
    let (send, drain, ready, _) = machinery_rates_cpu(tasks, redis, metrics).await;
    (send, drain, ready)
}

/// The CPU time this process's live threads have run so far, in seconds.
fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// `BENCH_PIDS=pid,pid`: the CPU those processes (RabbitMQ's, Redis's) spend during a
/// measured stretch.
struct Others(Vec<(String, f64)>);

impl Others {
    fn now() -> Self {
        let pids = std::env::var("BENCH_PIDS").unwrap_or_default();
        Self(
            pids.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| (p.to_owned(), cpu_seconds_of(p)))
                .collect(),
        )
    }

    /// Prints each one's CPU per task since [`Others::now`].
    fn print(&self, what: &str, tasks: usize) {
        for (pid, before) in &self.0 {
            let used = cpu_seconds_of(pid) - before;
            println!(
                "{what} cpu_us_per_task[{pid}]={:.2}",
                used * 1e6 / tasks as f64
            );
        }
    }
}

/// [`machinery_rates_with`], and the CPU seconds the process spent during the drain.
async fn machinery_rates_cpu(
    tasks: usize,
    redis: bool,
    metrics: bool,
) -> (f64, f64, Duration, f64) {
    let config = config(if redis { "redis" } else { "plain" }, redis);
    let server = Server::new(config.clone()).await.expect("server");
    let started = Instant::now();
    let mut uuids = Vec::with_capacity(if redis { tasks } else { 0 });
    for start in (0..tasks).step_by(1000) {
        let end = (start + 1000).min(tasks);
        let sent = server
            .send_all((start..end).map(|i| noop::signature(i as i64)))
            .await
            .expect("send");
        if redis {
            uuids.extend(sent.iter().map(|r| r.task_uuid().to_owned()));
        }
    }
    let send = tasks as f64 / started.elapsed().as_secs_f64();

    DONE.store(0, Ordering::SeqCst);
    TARGET.store(tasks, Ordering::SeqCst);
    let finished = FINISHED.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let ready_started = Instant::now();
    let mut builder = server
        .worker()
        .concurrency(usize::from(PREFETCH))
        // `BENCH_IN_PLACE`: where the deliveries run (see `common/placement.rs`).
        .placement(placement::from_env());
    // `BENCH_SUCCESS_INFO=1`: the `task succeeded` event at INFO (default DEBUG).
    if std::env::var("BENCH_SUCCESS_INFO").is_ok_and(|v| v == "1") {
        builder = builder.success_level(tracing::Level::INFO);
    }
    if metrics {
        builder = builder.metrics_addr("127.0.0.1:0".parse().expect("address"));
    }
    let worker = builder.spawn().await.expect("worker");
    let ready = ready_started.elapsed();
    let others = Others::now();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    // For a profiler to attach to the drain alone.
    if std::env::var("BENCH_SIGNAL").is_ok_and(|v| v == "1") {
        eprintln!("drain starts");
    }
    finished.await;
    let drain = tasks as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    others.print("drain", tasks);
    worker.shutdown().await.expect("shutdown");
    cleanup(&config).await;
    cpu::forget_keys(&redis_url(), &uuids).await;
    (send, drain, ready, cpu)
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Child mode: a worker alone in its process, on the parent's queue (`name`, see
/// [`config_named`]) that holds 100,000 tasks; prints its RSS.
async fn rss_worker(name: &str) {
    let mut config = config_named(name, false);
    config.amqp.prefetch_count = 16;
    let server = Server::new(config).await.expect("server");
    let worker = server
        .worker()
        .concurrency(16)
        .spawn()
        .await
        .expect("worker");
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("rss_kib={}", rss_kib());
    println!("held={}", HELD.load(Ordering::Relaxed));
    drop(worker);
}

#[tokio::main]
async fn main() {
    YIELD.store(
        std::env::var("BENCH_YIELD").is_ok_and(|v| v == "1"),
        Ordering::Relaxed,
    );
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("rss-worker") {
        rss_worker(&args[2]).await;
        return;
    }
    if args.get(1).map(String::as_str) == Some("drain-child") {
        let on = args[2] == "on";
        let tasks: usize = args[3].parse().expect("tasks");
        // For a breakdown: `BENCH_OBS=spans` or `BENCH_OBS=metrics` turns on only that part.
        let part = std::env::var("BENCH_OBS").unwrap_or_default();
        let (spans, metrics) = (on && part != "metrics", on && part != "spans");
        if spans {
            use tracing_subscriber::layer::SubscriberExt as _;
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::filter::LevelFilter::INFO)
                .with(
                    tracing_subscriber::fmt::layer()
                        // A log written to a file or a collector: no colours (`BENCH_ANSI=1`
                        // turns them on, as on a terminal).
                        .with_ansi(std::env::var("BENCH_ANSI").is_ok_and(|v| v == "1"))
                        .with_writer(std::io::sink),
                );
            tracing::subscriber::set_global_default(subscriber).expect("subscriber");
        }
        // `BENCH_RESULTS=1`: with the Redis result backend.
        let results = std::env::var("BENCH_RESULTS").is_ok_and(|v| v == "1");
        let (_, drain, _, cpu) = machinery_rates_cpu(tasks, results, metrics).await;
        println!("drain={drain}");
        println!("cpu_us_per_task={}", cpu * 1e6 / tasks as f64);
        return;
    }
    // `amqp_bench raw-child [tasks]`: the raw consume alone, of the bare body, of the message
    // machinery sends, of that message with its `traceparent` in the AMQP headers too, and of
    // machinery's message storing its states, in an order set by the process id.
    if args.get(1).map(String::as_str) == Some("raw-child") {
        let tasks: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
        let messages = [
            RawMessage::bare(),
            RawMessage::as_machinery_sends(),
            RawMessage::with_header_table(),
            RawMessage::with_states(),
        ];
        let rates = raw_in_turn(tasks, &messages).await;
        for (name, (_, consume)) in ["bare", "same", "header_table", "states"].iter().zip(rates) {
            println!("raw_{name}={consume:.0}");
        }
        return;
    }
    if args.get(1).map(String::as_str) == Some("obs") {
        let tasks: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
        let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
        observability_overhead(tasks, rounds).await;
        return;
    }
    let tasks: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let rates = raw_in_turn(
        tasks,
        &[
            RawMessage::bare(),
            RawMessage::as_machinery_sends(),
            RawMessage::with_states(),
        ],
    )
    .await;
    let ((raw_publish, raw_consume), (_, raw_same), (_, raw_states)) =
        (rates[0], rates[1], rates[2]);
    println!("raw lapin publish (persistent, confirms windowed): {raw_publish:>8.0} msg/s");
    println!("raw lapin consume (acks batched every 32):         {raw_consume:>8.0} msg/s");
    println!("raw lapin consume, machinery's message:            {raw_same:>8.0} msg/s");
    println!("raw lapin consume + Redis SET of STARTED, SUCCESS: {raw_states:>8.0} msg/s");

    let (send, drain, ready) = machinery_rates(tasks, false).await;
    println!(
        "machinery send:                   {send:>8.0} tasks/s  = {:.2}x raw publish (target >= 0.9)",
        send / raw_publish
    );
    println!(
        "machinery drain, no results:      {drain:>8.0} tasks/s  = {:.2}x raw consume, {:.2}x of the same message (target >= 0.78)",
        drain / raw_consume,
        drain / raw_same
    );
    println!(
        "worker ready (consuming) after:   {:>8.1} ms (target <= 200)",
        ready.as_secs_f64() * 1e3
    );

    let (send_r, drain_r, _) = machinery_rates(tasks, true).await;
    println!(
        "machinery send, Redis PENDING:    {send_r:>8.0} tasks/s  = {:.2}x raw publish",
        send_r / raw_publish
    );
    println!(
        "machinery drain, Redis results:   {drain_r:>8.0} tasks/s  = {:.2}x raw consume, {:.2}x of the same message (target >= 0.5), {:.2}x of the raw consume that stores states",
        drain_r / raw_consume,
        drain_r / raw_same,
        drain_r / raw_states
    );

    // RSS of a worker process while 100,000 tasks wait in its queue.
    let tag = "rss";
    let config = config(tag, false);
    let server = Server::new(config.clone()).await.expect("server");
    for start in (0..100_000).step_by(1000) {
        server
            .send_all((start..start + 1000).map(|_| hold::signature(60_000)))
            .await
            .expect("send");
    }
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["rss-worker", &format!("{tag}_{}", std::process::id())])
        .output()
        .expect("rss worker");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| -> &str {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}: {text} {}", String::from_utf8_lossy(&out.stderr)))
    };
    let rss: u64 = value("rss_kib=").parse().expect("rss_kib");
    let held = value("held=");
    println!(
        "worker RSS with 100,000 tasks queued: {:.1} MB (target < 30), {held} of them running",
        rss as f64 / 1024.0
    );
    cleanup(&config).await;
}

/// Runs `drain-child on|off` in a fresh process; its drain rate and CPU µs per task.
fn drain_child(on: bool, tasks: usize) -> (f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "drain-child",
            if on { "on" } else { "off" },
            &tasks.to_string(),
        ])
        .output()
        .expect("drain child");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}: {text} {}", String::from_utf8_lossy(&out.stderr)))
    };
    (value("drain="), value("cpu_us_per_task="))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The drain with spans + metrics off and on, interleaved, medians of `rounds` (3 by default).
async fn observability_overhead(tasks: usize, rounds: usize) {
    let message = RawMessage::bare();
    let (mut raws, mut offs, mut ons) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_offs, mut cpu_ons) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (_, raw_consume) = raw(tasks, &message).await;
        // Alternate which runs first, so that neither is always the one after the raw run.
        let ((off, cpu_off), (on, cpu_on)) = if round % 2 == 1 {
            let off = drain_child(false, tasks);
            (off, drain_child(true, tasks))
        } else {
            let on = drain_child(true, tasks);
            (drain_child(false, tasks), on)
        };
        println!(
            "round {round}: raw consume {raw_consume:>8.0} msg/s, drain off {off:>8.0} tasks/s ({cpu_off:.1} CPU us/task), on {on:>8.0} tasks/s ({cpu_on:.1} CPU us/task)"
        );
        raws.push(raw_consume);
        offs.push(off);
        ons.push(on);
        cpu_offs.push(cpu_off);
        cpu_ons.push(cpu_on);
    }
    // Each round's off and on run back to back, under the same load from other processes: the
    // median of the per-round ratios is steadier than the ratio of the medians.
    let pair_ratio = median(ons.iter().zip(&offs).map(|(on, off)| on / off).collect());
    let pair_cpu = median(
        cpu_ons
            .iter()
            .zip(&cpu_offs)
            .map(|(on, off)| on / off)
            .collect(),
    );
    let (raw, off, on) = (median(raws), median(offs), median(ons));
    let (cpu_off, cpu_on) = (median(cpu_offs), median(cpu_ons));
    println!("medians of {rounds}, {tasks} tasks, no result backend:");
    println!("raw lapin consume:                        {raw:>8.0} msg/s");
    println!(
        "drain, spans + metrics off:               {off:>8.0} tasks/s  = {:.2}x raw consume",
        off / raw
    );
    println!(
        "drain, spans (INFO) + metrics on:         {on:>8.0} tasks/s  = {:.2}x raw consume",
        on / raw
    );
    println!(
        "on / off: {:.3}  (overhead {:.1}%, target < 5%)",
        on / off,
        (1.0 - on / off) * 100.0
    );
    println!(
        "worker CPU per task: off {cpu_off:.1} us, on {cpu_on:.1} us  (+{:.1}%; the load of other processes does not enter it)",
        (cpu_on / cpu_off - 1.0) * 100.0
    );
    println!(
        "median of the per-round ratios: drain on/off {pair_ratio:.3} (overhead {:.1}%), CPU per task on/off {pair_cpu:.3}",
        (1.0 - pair_ratio) * 100.0
    );
}
