//! Rate limits (`#[task(rate_limit = "20/s")]`, `WorkerBuilder::rate_limit`,
//! `WorkerBuilder::cluster_rate_limits`) on the embedded broker, and cluster-wide through
//! Redis. Start times are recorded by the tasks themselves, never inferred.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::backend::ResultBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Broker;
use machinery::testing::{BrokerOp, FaultyBroker};
use machinery::{task, Config, Server};

const QUEUE: &str = "machinery_tasks";
const WAIT: Duration = Duration::from_secs(20);

/// Start times of the tasks below, by the tag each test gives them.
static STARTS: Mutex<Option<HashMap<String, Vec<Instant>>>> = Mutex::new(None);

fn record(tag: String) {
    STARTS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(tag)
        .or_default()
        .push(Instant::now());
}

fn starts(tag: &str) -> Vec<Instant> {
    let mut starts = STARTS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|s| s.get(tag).cloned())
        .unwrap_or_default();
    starts.sort();
    starts
}

#[task(rate_limit = "20/s")]
fn rl_twenty(tag: String) {
    record(tag);
}

#[task(rate_limit = "4/s")]
fn rl_four(tag: String) {
    record(tag);
}

#[task]
fn rl_free(tag: String) {
    record(tag);
}

/// One start per 2 s: longer than a delivery waits in the worker (1 s).
#[task(rate_limit = "1/2s")]
fn rl_slow(tag: String) {
    record(tag);
}

#[task(rate_limit = "2/s")]
fn rl_overridden(tag: String) {
    record(tag);
}

#[task(rate_limit = "100/s")]
fn rl_tightened(tag: String) {
    record(tag);
}

#[task(rate_limit = "20/s")]
fn rl_cluster(tag: String) {
    record(tag);
}

#[task(rate_limit = "10/s")]
fn rl_fallback(tag: String) {
    record(tag);
}

fn memory_server(name: &str) -> Server {
    let config = Config::builder()
        .broker(format!("memory://rl-{name}"))
        .requeue_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let memory = MemoryBroker::open(&format!("rl-{name}"), QUEUE, "machinery_task");
    let backend = MemoryBackend::open(&format!("rl-{name}"), Duration::from_secs(3600));
    Server::from_parts(
        config,
        Arc::new(memory),
        Some(Arc::new(backend) as Arc<dyn ResultBackend>),
    )
}

async fn wait_for(tag: &str, n: usize) -> Vec<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        let starts = starts(tag);
        if starts.len() >= n {
            return starts;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: {} of {n} tasks started",
            starts.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The most starts in any window of `window` that opens at a start.
fn max_in_window(starts: &[Instant], window: Duration) -> usize {
    (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|s| **s < starts[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn span(starts: &[Instant]) -> Duration {
    *starts.last().unwrap() - starts[0]
}

/// Starts per second, from the first start to the last.
fn rate(starts: &[Instant]) -> f64 {
    (starts.len() - 1) as f64 / span(starts).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_tasks_at_20_per_second_take_2_5_s_and_never_exceed_the_rate() {
    let server = memory_server("fifty");
    let worker = server
        .worker()
        .concurrency(16)
        .tasks([rl_twenty::NAME])
        .spawn()
        .await
        .unwrap();
    for _ in 0..50 {
        server
            .send(rl_twenty::signature("fifty".into()))
            .await
            .unwrap();
    }
    let starts = wait_for("fifty", 50).await;
    // 49 intervals of 50 ms.
    let span = span(&starts);
    assert!(
        span >= Duration::from_millis(2350) && span <= Duration::from_millis(3200),
        "50 starts at 20/s took {span:?}"
    );
    let rate = rate(&starts);
    assert!((rate / 20.0 - 1.0).abs() < 0.05, "measured {rate:.2}/s");
    // Starts are spaced by the interval from their reserved times; a start that its timer
    // fires a little late can share a window with the 20 after it, never more.
    let most = max_in_window(&starts, Duration::from_secs(1));
    assert!(most <= 21, "{most} starts in one second");
    worker.shutdown().await.unwrap();
}

/// Concurrency 2; eight deliveries of a 4/s task arrive first. Waiting for their turn they
/// give their slot up, so the unlimited task behind them runs at once (holding the slots,
/// the waits of 250, 500, 750 and 1000 ms would keep it out for ~750 ms).
#[tokio::test(flavor = "multi_thread")]
async fn an_unlimited_task_is_not_starved_by_waiting_limited_ones() {
    let server = memory_server("starve");
    let worker = server
        .worker()
        .concurrency(2)
        .tasks([rl_four::NAME, rl_free::NAME])
        .spawn()
        .await
        .unwrap();
    let sent = Instant::now();
    for _ in 0..8 {
        server
            .send(rl_four::signature("starve-limited".into()))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        server
            .send(rl_free::signature("starve-free".into()))
            .await
            .unwrap();
    }
    let free = wait_for("starve-free", 2).await;
    let limited = wait_for("starve-limited", 8).await;
    let free_done = *free.last().unwrap() - sent;
    assert!(
        free_done < Duration::from_millis(300),
        "the unlimited task started {free_done:?} after it was sent"
    );
    // Seven intervals of 250 ms.
    assert!(
        span(&limited) >= Duration::from_millis(1650),
        "{:?}",
        span(&limited)
    );
    assert!(*free.last().unwrap() < *limited.last().unwrap());
    worker.shutdown().await.unwrap();
}

/// At 1/2s, the second and third deliveries would wait 2 s and 4 s: they go back to the
/// broker to arrive then, once each (the ones sent back are spread over the slots after the
/// last one reserved), and that is no attempt: with `max_deliveries` 1 a counted delivery
/// would be dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_wait_goes_back_with_a_delay_and_is_not_an_attempt() {
    let config = Config::builder()
        .broker("memory://rl-later")
        .max_deliveries(1)
        .build()
        .unwrap();
    let memory = MemoryBroker::open("rl-later", QUEUE, "machinery_task");
    let broker = FaultyBroker::new(Arc::new(memory));
    let server = Server::from_parts(
        config,
        Arc::new(broker.clone()) as Arc<dyn Broker>,
        Some(
            Arc::new(MemoryBackend::open("rl-later", Duration::from_secs(3600)))
                as Arc<dyn ResultBackend>,
        ),
    );
    let worker = server
        .worker()
        .tasks([rl_slow::NAME])
        .spawn()
        .await
        .unwrap();
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(
            server
                .send(rl_slow::signature("later".into()))
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.get_timeout(WAIT).await.unwrap();
    }
    let starts = starts("later");
    assert_eq!(starts.len(), 3);
    assert!(
        starts[1] - starts[0] >= Duration::from_millis(1950),
        "{:?}",
        starts[1] - starts[0]
    );
    assert!(
        starts[2] - starts[1] >= Duration::from_millis(1950),
        "{:?}",
        starts[2] - starts[1]
    );
    assert_eq!(
        broker.calls(BrokerOp::Publish),
        3 + 2,
        "three sends, and each of the two late deliveries sent back once"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_override_replaces_the_tasks_limit() {
    let server = memory_server("override");
    let worker = server
        .worker()
        .tasks([rl_overridden::NAME, rl_tightened::NAME])
        .rate_limit(rl_overridden::NAME, "50/s".parse().unwrap())
        .rate_limit(rl_tightened::NAME, "5/s".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    for _ in 0..6 {
        server
            .send(rl_overridden::signature("loosened".into()))
            .await
            .unwrap();
        server
            .send(rl_tightened::signature("tightened".into()))
            .await
            .unwrap();
    }
    let loosened = wait_for("loosened", 6).await;
    let tightened = wait_for("tightened", 6).await;
    // 50/s: five intervals of 20 ms, not of 500 ms.
    assert!(
        span(&loosened) >= Duration::from_millis(90),
        "{:?}",
        span(&loosened)
    );
    assert!(
        span(&loosened) < Duration::from_millis(600),
        "{:?}",
        span(&loosened)
    );
    // 5/s: five intervals of 200 ms, not of 10 ms.
    assert!(
        span(&tightened) >= Duration::from_millis(950),
        "{:?}",
        span(&tightened)
    );
    worker.shutdown().await.unwrap();
}

/// Two workers on one queue, each with its own limiter: through Redis they share the 20/s
/// limit (on their own, each would start 20 a second, 40 together).
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_a_cluster_wide_limit_in_redis() {
    let redis = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("machinery_rate_{}", rl_cluster::NAME);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let server = memory_server("cluster");
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(
            server
                .worker()
                .concurrency(8)
                .tasks([rl_cluster::NAME])
                .cluster_rate_limits(common::redis_url())
                .spawn()
                .await
                .unwrap(),
        );
    }
    for _ in 0..40 {
        server
            .send(rl_cluster::signature("cluster".into()))
            .await
            .unwrap();
    }
    let starts = wait_for("cluster", 40).await;
    // 39 intervals of 50 ms.
    assert!(
        span(&starts) >= Duration::from_millis(1850),
        "{:?}",
        span(&starts)
    );
    let rate = rate(&starts);
    assert!((rate / 20.0 - 1.0).abs() < 0.05, "measured {rate:.2}/s");
    let most = max_in_window(&starts, Duration::from_secs(1));
    assert!(most <= 21, "{most} starts in one second");
    // The next free start, in microseconds of Redis's clock, expiring a second after it.
    let next: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(next > 1_600_000_000_000_000, "{next}");
    assert!((0..=1100).contains(&ttl), "{ttl}");
    for worker in workers {
        worker.shutdown().await.unwrap();
    }
}

/// Redis dies halfway: the tasks still run, each worker keeping the limit on its own.
#[tokio::test(flavor = "multi_thread")]
async fn without_redis_a_worker_keeps_its_own_limit() {
    let mut redis = common::PrivateRedis::start();
    let server = memory_server("fallback");
    let worker = server
        .worker()
        .concurrency(8)
        .tasks([rl_fallback::NAME])
        .cluster_rate_limits(redis.url())
        .spawn()
        .await
        .unwrap();
    for _ in 0..5 {
        server
            .send(rl_fallback::signature("fallback-up".into()))
            .await
            .unwrap();
    }
    let up = wait_for("fallback-up", 5).await;
    assert!(span(&up) >= Duration::from_millis(380), "{:?}", span(&up));
    redis.kill9();
    for _ in 0..15 {
        server
            .send(rl_fallback::signature("fallback-down".into()))
            .await
            .unwrap();
    }
    let down = wait_for("fallback-down", 15).await;
    // 14 intervals of 100 ms, on the worker's own clock.
    assert!(
        span(&down) >= Duration::from_millis(1350),
        "{:?}",
        span(&down)
    );
    let rate = rate(&down);
    assert!(rate <= 10.5, "measured {rate:.2}/s");
    let most = max_in_window(&down, Duration::from_secs(1));
    assert!(most <= 11, "{most} starts in one second");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_cluster_url_fails_the_build_without_showing_the_password() {
    let server = memory_server("bad-url");
    let err = server
        .worker()
        .tasks([rl_cluster::NAME])
        .cluster_rate_limits("http://secret@127.0.0.1:6379/")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), machinery::ErrorKind::Config);
    assert!(!err.to_string().contains("secret"), "{err}");
}

/// Concurrency 1 and an in-flight byte budget that one message fills: a limited delivery waiting
/// for its turn holds the bytes and gives its slot up; the worker takes the next message with
/// that slot and waits for bytes. When the waiting delivery wants its slot back, the worker
/// gives it up while it waits for the bytes, so both go on (they used to wait for each other
/// until shutdown).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_waiting_for_bytes_gives_a_slot_back() {
    let name = "bytes";
    let mut config = Config::builder()
        .broker(format!("memory://rl-{name}"))
        .requeue_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    config.max_inflight_bytes = 16;
    let memory = MemoryBroker::open(&format!("rl-{name}"), QUEUE, "machinery_task");
    let backend = MemoryBackend::open(&format!("rl-{name}"), Duration::from_secs(3600));
    let server = Server::from_parts(
        config,
        Arc::new(memory),
        Some(Arc::new(backend) as Arc<dyn ResultBackend>),
    );
    let worker = server
        .worker()
        .concurrency(1)
        .tasks([rl_four::NAME])
        .spawn()
        .await
        .unwrap();
    for _ in 0..4 {
        server
            .send(rl_four::signature("bytes-limited".into()))
            .await
            .unwrap();
    }
    let limited = wait_for("bytes-limited", 4).await;
    assert!(
        span(&limited) >= Duration::from_millis(650),
        "{:?}",
        span(&limited)
    );
    worker.shutdown().await.unwrap();
}
