//! Prometheus metrics (the `metrics` feature, enabled for the tests through this crate's
//! dependency on machinery): a test scrapes `/metrics` during a run and checks the counts
//! against the tasks sent, on the embedded broker, on RabbitMQ with Redis results, and with
//! faults injected in the result store and the broker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::backend::ResultBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Broker;
use machinery::testing::{BackendOp, BrokerOp, Fault, FaultyBackend, FaultyBroker};
use machinery::{task, Config, Server, TaskError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// Runs of `mx_flaky`, by tag.
static FLAKY: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
static SLOW_RUNNING: AtomicUsize = AtomicUsize::new(0);

#[task]
fn mx_ok(a: i64) -> i64 {
    a
}

#[task]
fn mx_add(k: i64, #[chained] x: i64) -> i64 {
    k + x
}

#[task]
async fn mx_async_ok(a: i64) -> i64 {
    a
}

#[task]
fn mx_fail() -> Result<i64, TaskError> {
    Err(TaskError::new("boom"))
}

/// Asks to be retried once (50 ms later), then succeeds.
#[task]
fn mx_flaky(tag: String) -> Result<i64, TaskError> {
    let mut runs = FLAKY.lock().unwrap();
    let n = runs
        .get_or_insert_with(HashMap::new)
        .entry(tag)
        .or_default();
    *n += 1;
    if *n == 1 {
        return Err(TaskError::retry_in("not yet", Duration::from_millis(50)));
    }
    Ok(1)
}

#[task]
async fn mx_slow(ms: u64) {
    SLOW_RUNNING.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    SLOW_RUNNING.fetch_sub(1, Ordering::SeqCst);
}

/// GETs `/metrics` (a plain HTTP/1.1 request: the test checks the listener, not a client).
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("application/openmetrics-text"),
        "{response}"
    );
    response
}

/// The value of the sample `name{labels}` (labels as they are written, `task="x"`), or 0.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .find_map(|line| {
            let (k, v) = line.rsplit_once(' ')?;
            (k == key).then(|| v.parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

fn task(name: &str) -> String {
    format!("task=\"{name}\"")
}

/// Scrapes until `check` holds (the counts settle after the results are read).
async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await;
        if check(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends 5 successes (sync and async), 2 failures, a task retried once, and a poison message;
/// checks every count against them, the histogram's count, and that nothing stays in flight.
async fn run_and_check(server: &Server, poison: impl std::future::Future<Output = ()>, tag: &str) {
    let worker = server
        .worker()
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let addr = worker.metrics_addr().expect("the listener's address");
    let before = scrape(addr).await;
    assert_eq!(
        sample(
            &before,
            "machinery_tasks_received_total",
            &task(mx_ok::NAME)
        ),
        0.0
    );
    assert_eq!(sample(&before, "machinery_concurrency_limit", ""), 16.0);

    let mut handles = Vec::new();
    for i in 0..3 {
        handles.push(server.send(mx_ok::signature(i)).await.unwrap());
    }
    let mut async_handles = Vec::new();
    for i in 0..2 {
        async_handles.push(server.send(mx_async_ok::signature(i)).await.unwrap());
    }
    let fails = [
        server.send(mx_fail::signature()).await.unwrap(),
        server.send(mx_fail::signature()).await.unwrap(),
    ];
    let flaky = server
        .send(mx_flaky::signature(tag.to_owned()))
        .await
        .unwrap();
    poison.await;
    for h in handles {
        h.get_timeout(WAIT).await.unwrap();
    }
    for h in async_handles {
        h.get_timeout(WAIT).await.unwrap();
    }
    for h in fails {
        assert!(h.get_timeout(WAIT).await.is_err());
    }
    assert_eq!(flaky.get_timeout(WAIT).await.unwrap(), 1);

    let text = scrape_until(addr, "the counts", |t| {
        sample(
            t,
            "machinery_tasks_dead_lettered_total",
            "task=\"(undecodable)\"",
        ) == 1.0
            && sample(t, "machinery_tasks_succeeded_total", &task(mx_flaky::NAME)) == 1.0
            && sample(t, "machinery_tasks_in_flight", "") == 0.0
    })
    .await;
    let count = |name: &str, t: &str| sample(&text, name, &task(t));
    assert_eq!(count("machinery_tasks_received_total", mx_ok::NAME), 3.0);
    assert_eq!(count("machinery_tasks_succeeded_total", mx_ok::NAME), 3.0);
    assert_eq!(
        count("machinery_tasks_received_total", mx_async_ok::NAME),
        2.0
    );
    assert_eq!(
        count("machinery_tasks_succeeded_total", mx_async_ok::NAME),
        2.0
    );
    assert_eq!(count("machinery_tasks_received_total", mx_fail::NAME), 2.0);
    assert_eq!(count("machinery_tasks_failed_total", mx_fail::NAME), 2.0);
    assert_eq!(count("machinery_tasks_succeeded_total", mx_fail::NAME), 0.0);
    // The retry is a second delivery of the same task.
    assert_eq!(count("machinery_tasks_received_total", mx_flaky::NAME), 2.0);
    assert_eq!(count("machinery_tasks_retried_total", mx_flaky::NAME), 1.0);
    assert_eq!(
        count("machinery_tasks_succeeded_total", mx_flaky::NAME),
        1.0
    );
    assert_eq!(count("machinery_tasks_failed_total", mx_flaky::NAME), 0.0);
    assert_eq!(
        sample(
            &text,
            "machinery_tasks_received_total",
            "task=\"(undecodable)\""
        ),
        1.0
    );
    assert_eq!(
        count("machinery_task_duration_seconds_count", mx_ok::NAME),
        3.0
    );
    assert_eq!(
        count("machinery_task_duration_seconds_count", mx_fail::NAME),
        2.0
    );
    assert_eq!(sample(&text, "machinery_concurrency_in_use", ""), 0.0);
    assert_eq!(
        sample(&text, "machinery_result_store_errors_total", ""),
        0.0
    );
    assert_eq!(sample(&text, "machinery_broker_reconnects_total", ""), 0.0);
    let queue = format!("queue=\"{}\"", server.config().default_queue);
    // Sampled every 2 s: a sample taken while the tasks waited may show until the next one.
    scrape_until(addr, "the queue depth of the drained queue", |t| {
        t.contains(&format!("machinery_queue_depth{{{queue}}} 0"))
    })
    .await;
    // The poison message waits in the dead-letter queue.
    scrape_until(addr, "the dead-letter depth", |t| {
        t.contains(&format!("machinery_dead_letter_depth{{{queue}}} 1"))
    })
    .await;
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_run_on_the_embedded_broker() {
    let name = "metrics-embedded";
    let server = Server::new(
        Config::builder()
            .broker(format!("memory://{name}"))
            .result_backend(format!("memory://{name}"))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let memory = MemoryBroker::open(name, "machinery_tasks", "machinery_task");
    let poison = async {
        memory.push_raw("machinery_tasks", &b"not a signature"[..]);
    };
    run_and_check(&server, poison, name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_run_on_rabbitmq_with_redis_results() {
    let mut config = common::unique_config("metrics");
    config.result_backend = format!("{}15", common::redis_url());
    let server = Server::new(config.clone()).await.unwrap();
    let poison = async {
        // A poison message published straight to the worker's queue.
        let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .basic_publish(
                "".into(),
                config.default_queue.as_str().into(),
                Default::default(),
                b"not a signature",
                Default::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    };
    run_and_check(&server, poison, "metrics-amqp").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_and_concurrency_in_use_show_running_tasks() {
    let name = "metrics-in-flight";
    let server = Server::new(
        Config::builder()
            .broker(format!("memory://{name}"))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let worker = server
        .worker()
        .concurrency(4)
        .tasks([mx_slow::NAME])
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let addr = worker.metrics_addr().unwrap();
    for _ in 0..3 {
        server.send(mx_slow::signature(1500)).await.unwrap();
    }
    let text = scrape_until(addr, "three running tasks", |t| {
        sample(t, "machinery_concurrency_in_use", "") == 3.0
    })
    .await;
    assert_eq!(sample(&text, "machinery_tasks_in_flight", ""), 3.0);
    assert_eq!(sample(&text, "machinery_concurrency_limit", ""), 4.0);
    scrape_until(addr, "the tasks to end", |t| {
        sample(t, "machinery_tasks_in_flight", "") == 0.0
            && sample(t, "machinery_concurrency_in_use", "") == 0.0
    })
    .await;
    worker.shutdown().await.unwrap();
}

struct Rig {
    server: Server,
    broker: FaultyBroker,
    backend: FaultyBackend,
}

fn rig(name: &str, max_deliveries: u32) -> Rig {
    let config = Config::builder()
        .broker(format!("memory://{name}"))
        .requeue_delay(Duration::from_millis(20))
        .store_retry_timeout(Duration::from_secs(5))
        .max_deliveries(max_deliveries)
        .build()
        .unwrap();
    let memory = MemoryBroker::open(name, "machinery_tasks", "machinery_task");
    let broker = FaultyBroker::new(Arc::new(memory));
    let backend = FaultyBackend::new(Arc::new(MemoryBackend::open(
        name,
        Duration::from_secs(3600),
    )));
    let server = Server::from_parts(
        config,
        Arc::new(broker.clone()) as Arc<dyn Broker>,
        Some(Arc::new(backend.clone()) as Arc<dyn ResultBackend>),
    );
    Rig {
        server,
        broker,
        backend,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn result_store_errors_are_counted() {
    let rig = rig("metrics-store-errors", 5);
    let worker = rig
        .server
        .worker()
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let addr = worker.metrics_addr().unwrap();
    // The worker's first three writes fail; it retries through them. (PENDING is written
    // with set_state; the worker's writes are `start` and `record`, both `Transition`.)
    rig.backend.arm(BackendOp::Transition, Fault::times(3));
    let handle = rig.server.send(mx_ok::signature(7)).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 7);
    let text = scrape_until(addr, "the success", |t| {
        sample(t, "machinery_tasks_succeeded_total", &task(mx_ok::NAME)) == 1.0
    })
    .await;
    assert_eq!(
        sample(&text, "machinery_result_store_errors_total", ""),
        3.0
    );
    assert_eq!(
        rig.backend.calls(BackendOp::Transition),
        5,
        "3 failed, STARTED, SUCCESS"
    );
    worker.shutdown().await.unwrap();
}

/// A delivery whose handling panics outside the task's body (here the result store panics)
/// goes back to the broker and runs again, spawned or in place; it is not left in flight.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_that_panics_is_not_left_in_flight() {
    for in_place in [false, true] {
        let rig = rig(&format!("metrics-panic-{in_place}"), 5);
        let worker = rig
            .server
            .worker()
            .in_place(in_place)
            .metrics_addr("127.0.0.1:0".parse().unwrap())
            .spawn()
            .await
            .unwrap();
        let addr = worker.metrics_addr().unwrap();
        rig.backend
            .arm(BackendOp::Transition, Fault::once().panics());
        let handle = rig.server.send(mx_ok::signature(3)).await.unwrap();
        assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 3);
        let text = scrape_until(addr, "the success", |t| {
            sample(t, "machinery_tasks_succeeded_total", &task(mx_ok::NAME)) == 1.0
        })
        .await;
        assert_eq!(
            sample(&text, "machinery_tasks_received_total", &task(mx_ok::NAME)),
            2.0,
            "in place: {in_place}"
        );
        scrape_until(addr, "nothing in flight", |t| {
            sample(t, "machinery_tasks_in_flight", "") == 0.0
        })
        .await;
        worker.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_faulty_broker_shows_in_retried_and_dead_lettered() {
    let rig = rig("metrics-faulty-broker", 2);
    let worker = rig
        .server
        .worker()
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let addr = worker.metrics_addr().unwrap();
    // The follow-up can never be published: the first delivery is sent again (retried), the
    // second, the last of `max_deliveries` 2, is dead-lettered.
    rig.broker.arm(
        BrokerOp::Publish,
        Fault::always().on_routing_key("metrics_nowhere"),
    );
    rig.server
        .send(mx_ok::signature(1).then(mx_add::signature(2).with_routing_key("metrics_nowhere")))
        .await
        .unwrap();
    let text = scrape_until(addr, "the dead letter", |t| {
        sample(t, "machinery_tasks_dead_lettered_total", &task(mx_ok::NAME)) == 1.0
    })
    .await;
    assert_eq!(
        sample(&text, "machinery_tasks_retried_total", &task(mx_ok::NAME)),
        1.0
    );
    assert_eq!(
        sample(&text, "machinery_tasks_received_total", &task(mx_ok::NAME)),
        2.0
    );
    assert_eq!(
        sample(&text, "machinery_tasks_succeeded_total", &task(mx_ok::NAME)),
        0.0
    );
    assert_eq!(sample(&text, "machinery_tasks_in_flight", ""), 0.0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_without_a_free_port_fail_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new(
        Config::builder()
            .broker("memory://metrics-port-taken")
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let err = server
        .worker()
        .metrics_addr(taken.local_addr().unwrap())
        .spawn()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot listen for metrics"),
        "{err}"
    );
}

#[tokio::test]
async fn queue_depth_is_what_the_broker_reports() {
    // RabbitMQ: a passive declare's message count.
    let config = common::unique_config("depth");
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    worker.shutdown().await.unwrap();
    for i in 0..4 {
        server.send(mx_ok::signature(i)).await.unwrap();
    }
    let broker = server.broker();
    let deadline = Instant::now() + WAIT;
    while broker.queue_depth(&config.default_queue).await.unwrap() != Some(4) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        broker.queue_depth("metrics_no_such_queue").await.is_err(),
        "a missing queue is an error"
    );
    // And the broker still works after the refused passive declare.
    assert_eq!(
        broker.queue_depth(&config.default_queue).await.unwrap(),
        Some(4)
    );
    // Nothing dead-lettered: 0, whether or not the dead-letter queue was made yet.
    assert_eq!(
        broker
            .dead_letter_depth(&config.default_queue)
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        broker
            .dead_letter_depth("metrics_no_such_queue")
            .await
            .unwrap(),
        Some(0)
    );
    // The embedded broker: its length.
    let memory = MemoryBroker::open("metrics-depth", "machinery_tasks", "machinery_task");
    memory.push_raw("machinery_tasks", &b"x"[..]);
    assert_eq!(
        memory.queue_depth("machinery_tasks").await.unwrap(),
        Some(1)
    );
}
