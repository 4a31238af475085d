//! The whole path on the embedded broker: Go Machinery's suite cases, chains, callbacks,
//! retries, bad input and concurrency. Each test uses its own broker.
//!
//! `embedded_redis.rs` runs this same file as a module against the Redis broker
//! (`redis://`, each test on its own queue, results in the embedded backend): see
//! [`on_redis`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use machinery::broker::memory::MemoryBroker;
use machinery::broker::redis::RedisBroker;
use machinery::wire::{self, State};
use machinery::{task, Config, ErrorKind, Group, Server, TaskError, WorkerHandle};

// ---- tasks (Go Machinery's example tasks, and a few of our own) ----

#[task]
fn add(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().sum()
}

#[task]
fn multiply(#[variadic] args: Vec<i64>) -> i64 {
    args.iter().product()
}

#[task]
fn sum_ints(numbers: Vec<i64>) -> i64 {
    numbers.iter().sum()
}

#[task]
fn sum_floats(numbers: Vec<f64>) -> f64 {
    numbers.iter().sum()
}

#[task]
fn concat(strs: Vec<String>) -> String {
    strs.concat()
}

#[task]
fn split(s: String) -> Vec<String> {
    s.split("")
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

#[task]
fn return_just_error() -> Result<(), TaskError> {
    Err(TaskError::new("kaboom"))
}

#[task]
fn return_multiple_values(a: String, b: String) -> (String, String) {
    (a, b)
}

#[task]
fn panic_task() -> String {
    panic!("oops")
}

#[task]
async fn async_panic_task() -> String {
    panic!("async oops")
}

#[task(name = "fadd")]
fn float_add(a: f64, b: f64) -> f64 {
    a + b
}

#[task(name = "fmultiply")]
async fn float_multiply(factor: f64, #[chained] x: f64) -> Result<f64, TaskError> {
    Ok(factor * x)
}

#[task]
fn add_pair(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
fn record_error(#[error_message] error: String, tag: String) -> String {
    format!("{tag}: {error}")
}

static CALLS: Mutex<Option<HashMap<u64, u32>>> = Mutex::new(None);

#[task]
async fn count_call(id: u64) -> u64 {
    let mut calls = CALLS.lock().unwrap();
    *calls
        .get_or_insert_with(HashMap::new)
        .entry(id)
        .or_default() += 1;
    id
}

static FLAKY: AtomicU32 = AtomicU32::new(0);

#[task]
fn flaky(fail_times: u32) -> Result<u32, String> {
    let n = FLAKY.fetch_add(1, Ordering::SeqCst);
    if n < fail_times {
        Err(format!("attempt {n} failed"))
    } else {
        Ok(n)
    }
}

#[task]
async fn sleepy(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

#[task]
fn blocking_sleepy(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

// ---- helpers ----

const WAIT: Duration = Duration::from_secs(10);

/// Whether this file runs as `embedded_redis`'s module: then every test runs on the Redis
/// broker instead of the embedded one.
fn on_redis() -> bool {
    module_path!().starts_with("embedded_redis")
}

/// The queue of test `name`: Go's default on the embedded broker (one broker per test), a
/// name of its own on Redis (unique per run, so nothing left from another run is read).
fn queue(name: &str) -> String {
    if on_redis() {
        static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let run = RUN.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..10].to_owned());
        format!("embedded_{name}_{run}")
    } else {
        "machinery_tasks".to_owned()
    }
}

fn config(name: &str) -> Config {
    let builder = Config::builder().requeue_delay(Duration::from_millis(50));
    let builder = if on_redis() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        builder
            .broker(url)
            .result_backend(format!("memory://{name}"))
            .default_queue(queue(name))
    } else {
        builder.broker(format!("memory://{name}"))
    };
    let mut config = builder.build().unwrap();
    // Delayed messages of this test only.
    config.redis.delayed_tasks_key = format!("{}.delayed", queue(name));
    config
}

/// The broker of test `name`, for putting raw bytes in its queue and looking at it.
enum Raw {
    Memory(MemoryBroker),
    Redis(RedisBroker),
}

impl Raw {
    async fn open(name: &str) -> (Raw, String) {
        let raw = if on_redis() {
            Raw::Redis(RedisBroker::connect(&config(name)).await.unwrap())
        } else {
            Raw::Memory(MemoryBroker::open(
                name,
                "machinery_tasks",
                "machinery_task",
            ))
        };
        (raw, queue(name))
    }

    async fn push_raw(&self, queue: &str, body: Vec<u8>) {
        match self {
            Raw::Memory(b) => b.push_raw(queue, body),
            Raw::Redis(b) => b.push_raw(queue, body).await.unwrap(),
        }
    }

    async fn depth(&self, queue: &str) -> (usize, usize) {
        match self {
            Raw::Memory(b) => b.depth(queue),
            Raw::Redis(b) => b.depth(queue).await.unwrap(),
        }
    }

    async fn dead_letters(&self, queue: &str) -> Vec<bytes::Bytes> {
        match self {
            Raw::Memory(b) => b.dead_letters(queue),
            Raw::Redis(b) => b
                .dead_letters(queue)
                .await
                .unwrap()
                .into_iter()
                .map(|(body, _)| body)
                .collect(),
        }
    }
}

async fn setup(name: &str) -> (Server, WorkerHandle) {
    let server = Server::new(config(name)).await.unwrap();
    let worker = server.worker().concurrency(8).spawn().await.unwrap();
    (server, worker)
}

async fn final_state(server: &Server, uuid: &str) -> wire::TaskState {
    let deadline = tokio::time::Instant::now() + WAIT;
    server
        .backend()
        .unwrap()
        .wait_final(uuid, Some(deadline))
        .await
        .unwrap()
}

// ---- the design card and the seed ----

#[tokio::test(flavor = "multi_thread")]
async fn design_card_chain_is_8() {
    let (server, worker) = setup("design-card").await;
    let chain = float_add::signature(1.0, 1.0).then(float_multiply::signature(4.0));
    let result: f64 = server
        .send(chain)
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(result, 8.0);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_chain_is_52() {
    let (server, worker) = setup("seed-chain").await;
    // ((1 + 1) + (5 + 6)) * 4: each link's result is appended to the next link's arguments.
    let chain = add::signature(vec![1, 1])
        .then(add::signature(vec![5, 6]))
        .then(multiply::signature(vec![4]));
    let handle = server.send(chain).await.unwrap();
    assert_eq!(handle.task_uuids().len(), 3);
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 52);
    worker.shutdown().await.unwrap();
}

// ---- Go Machinery's integration suite ----

#[tokio::test(flavor = "multi_thread")]
async fn go_suite_send_task() {
    let (server, worker) = setup("go-suite-send").await;
    let r = server.send(add::signature(vec![1, 1])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 2);
    let r = server.send(sum_ints::signature(vec![1, 2])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    let r = server
        .send(sum_floats::signature(vec![1.5, 2.25]))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3.75);
    let r = server
        .send(concat::signature(vec!["foo".into(), "bar".into()]))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), "foobar");
    let r = server.send(split::signature("abc".into())).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), ["a", "b", "c"]);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn go_suite_chain_is_60() {
    let (server, worker) = setup("go-suite-chain").await;
    let chain = add::signature(vec![2, 2])
        .then(add::signature(vec![5, 6]))
        .then(multiply::signature(vec![4]));
    let r = server.send(chain).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 60);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn go_suite_return_just_error() {
    let (server, worker) = setup("go-suite-error").await;
    let r = server.send(return_just_error::signature()).await.unwrap();
    let err = r.get_timeout(WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Task);
    assert_eq!(err.task_error(), Some("kaboom"));
    let state = r.state().await.unwrap().unwrap();
    assert_eq!(
        (state.state, state.error.as_str()),
        (State::Failure, "kaboom")
    );
    assert_eq!(state.task_name, "return_just_error");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn go_suite_multiple_results() {
    let (server, worker) = setup("go-suite-multiple").await;
    let r = server
        .send(return_multiple_values::signature(
            "foo".into(),
            "bar".into(),
        ))
        .await
        .unwrap();
    assert_eq!(
        r.get_timeout(WAIT).await.unwrap(),
        ("foo".to_owned(), "bar".to_owned())
    );
    let state = r.state().await.unwrap().unwrap();
    let results = state.results.unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].type_name, "string");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn go_suite_panic_is_failure_and_worker_continues() {
    let (server, worker) = setup("go-suite-panic").await;
    let err = server
        .send(panic_task::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.task_error(), Some("oops"));
    let err = server
        .send(async_panic_task::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.task_error(), Some("async oops"));
    // The worker is still there.
    let r = server.send(add::signature(vec![20, 22])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 42);
    assert!(!worker.is_finished());
    worker.shutdown().await.unwrap();
}

// ---- chains and callbacks ----

#[tokio::test(flavor = "multi_thread")]
async fn full_link_makes_parent_immutable() {
    let (server, worker) = setup("immutable").await;
    // add_pair(5, 5) is a full signature: it must not receive add_pair(1, 1)'s result.
    let chain = add_pair::signature(1, 1).then(add_pair::signature(5, 5));
    assert!(chain.as_wire().immutable);
    let r = server.send(chain).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 10);
    // The first link ran and succeeded too.
    let first = final_state(&server, &r.task_uuids()[0]).await;
    assert_eq!(first.state, State::Success);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn error_callback_receives_the_message() {
    let (server, worker) = setup("on-error").await;
    let handler = record_error::signature("job-7".into());
    let handler_uuid = handler.task_uuids()[0].clone();
    let r = server
        .send(return_just_error::signature().on_error(handler))
        .await
        .unwrap();
    assert_eq!(
        r.get_timeout(WAIT).await.unwrap_err().task_error(),
        Some("kaboom")
    );
    let state = final_state(&server, &handler_uuid).await;
    assert_eq!(state.state, State::Success, "{state:?}");
    let results = state.results.unwrap();
    assert_eq!(results[0].value, "job-7: kaboom");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_link_ends_the_chain_with_its_error() {
    let (server, worker) = setup("chain-failure").await;
    let chain = add::signature(vec![1]).then(panic_task::signature());
    let err = server
        .send(chain)
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.task_error(), Some("oops"));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn chained_link_given_its_input_runs_alone() {
    let (server, worker) = setup("with-input").await;
    let r = server
        .send(float_multiply::signature(3.0).with_input(2.5))
        .await
        .unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 7.5);
    worker.shutdown().await.unwrap();
}

// ---- concurrency, retries, delays, shutdown ----

#[tokio::test(flavor = "multi_thread")]
async fn thousand_concurrent_tasks_complete_exactly_once() {
    let (server, worker) = setup("thousand").await;
    let handles = server
        .send_all((0..1000u64).map(|id| count_call::signature(id + 1_000_000)))
        .await
        .unwrap();
    let mut sum = 0;
    for h in &handles {
        sum += h.get_timeout(WAIT).await.unwrap();
    }
    assert_eq!(sum, (0..1000u64).map(|i| i + 1_000_000).sum::<u64>());
    worker.shutdown().await.unwrap();
    let calls = CALLS.lock().unwrap();
    let calls = calls.as_ref().unwrap();
    for id in 1_000_000..1_001_000u64 {
        assert_eq!(
            calls.get(&id),
            Some(&1),
            "task {id} ran {:?} times",
            calls.get(&id)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_then_succeeds() {
    let (server, worker) = setup("retry").await;
    FLAKY.store(0, Ordering::SeqCst);
    let started = Instant::now();
    let r = server
        .send(flaky::signature(1).with_retries(3))
        .await
        .unwrap();
    // First attempt fails; the retry waits FibonacciNext(0) = 1 s.
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_args_are_not_retried() {
    let (server, worker) = setup("bad-args-no-retry").await;
    let mut sig = wire::Signature::new("add_pair");
    sig.args.push(machinery::value::encode_arg(&1i64).unwrap());
    sig.retry_count = 5;
    let uuid = sig.uuid.clone();
    server.send_wire(sig).await.unwrap();
    let state = final_state(&server, &uuid).await;
    assert_eq!(state.state, State::Failure);
    assert!(
        state.error.contains("takes 2 arguments, got 1"),
        "{}",
        state.error
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_task_runs_no_earlier_than_its_eta() {
    let (server, worker) = setup("delayed").await;
    let started = Instant::now();
    let r = server
        .send(add_pair::signature(2, 3).with_delay(Duration::from_millis(600)))
        .await
        .unwrap();
    assert_eq!(r.state().await.unwrap().unwrap().state, State::Pending);
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 5);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn early_message_is_delayed_again_by_the_worker() {
    // A message that reaches the queue before its ETA (a Go producer on another broker, clock
    // skew): the worker must not run it early.
    let server = Server::new(config("early")).await.unwrap();
    let (broker, q) = Raw::open("early").await;
    let mut sig = wire::Signature::new("add_pair");
    sig.args = vec![
        machinery::value::encode_arg(&1i64).unwrap(),
        machinery::value::encode_arg(&2i64).unwrap(),
    ];
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    sig.eta = Some(eta.into());
    let uuid = sig.uuid.clone();
    broker.push_raw(&q, sig.to_json().unwrap()).await;
    let worker = server.worker().spawn().await.unwrap();
    let state = final_state(&server, &uuid).await;
    assert_eq!(state.state, State::Success);
    assert!(chrono::Utc::now() >= eta);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_in_flight_tasks() {
    let server = Server::new(config("graceful")).await.unwrap();
    let worker = server.worker().concurrency(4).spawn().await.unwrap();
    let slow = server.send(sleepy::signature(400)).await.unwrap();
    let slow_sync = server.send(blocking_sleepy::signature(400)).await.unwrap();
    // Let the worker pick them up, then stop it while they run.
    tokio::time::sleep(Duration::from_millis(100)).await;
    worker.shutdown().await.unwrap();
    // Both finished before shutdown returned.
    assert_eq!(slow.state().await.unwrap().unwrap().state, State::Success);
    assert_eq!(
        slow_sync.state().await.unwrap().unwrap().state,
        State::Success
    );
    let (broker, q) = Raw::open("graceful").await;
    assert_eq!(broker.depth(&q).await, (0, 0), "everything acked");
}

#[tokio::test(flavor = "multi_thread")]
async fn blocking_tasks_do_not_stall_the_runtime() {
    let (server, worker) = setup("blocking").await;
    let slow: Vec<_> = server
        .send_all((0..4).map(|_| blocking_sleepy::signature(500)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // While four sync tasks block, async tasks still complete quickly.
    let started = Instant::now();
    let r = server.send(add::signature(vec![1, 2])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    for h in slow {
        h.get_timeout(WAIT).await.unwrap();
    }
    worker.shutdown().await.unwrap();
}

// ---- bad input ----

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_bodies_are_dead_lettered() {
    let (server, worker) = setup("garbage").await;
    let (broker, q) = Raw::open("garbage").await;
    let bodies: Vec<&[u8]> = vec![
        b"not json",
        b"[1,2,3]",
        br#"{"Name": 5}"#,
        br#"{"UUID":"task_x","Name":""}"#,
        b"\xff\xfe",
    ];
    for body in &bodies {
        broker.push_raw(&q, body.to_vec()).await;
    }
    // An oversized body (over max_message_size).
    let big = vec![b' '; server.config().max_message_size + 1];
    broker.push_raw(&q, big).await;
    let deadline = Instant::now() + WAIT;
    while broker.dead_letters(&q).await.len() < bodies.len() + 1 {
        assert!(
            Instant::now() < deadline,
            "not all bad messages were dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker.depth(&q).await, (0, 0));
    // And the worker keeps consuming.
    let r = server.send(add::signature(vec![1, 2])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn args_that_do_not_fit_are_failures_with_clear_errors() {
    let (server, worker) = setup("bad-args").await;
    let cases: Vec<(Vec<serde_json::Value>, &str)> = vec![
        (vec![], "task `add_pair` takes 2 arguments, got 0"),
        (
            vec![serde_json::json!({"Type":"int64","Value":1}); 3],
            "takes 2 arguments, got 3",
        ),
        (
            vec![
                serde_json::json!({"Type":"int64","Value":1.5}),
                serde_json::json!({"Type":"int64","Value":1}),
            ],
            "argument 0 (`a`): invalid `int64` value 1.5",
        ),
        (
            vec![
                serde_json::json!({"Type":"int64","Value":1}),
                serde_json::json!({"Type":"int128","Value":1}),
            ],
            "argument 1 (`b`): expected type `int64`, got `int128`",
        ),
        (
            vec![
                serde_json::json!({"Type":"int64","Value":"1"}),
                serde_json::json!({"Type":"int64","Value":1}),
            ],
            "invalid `int64` value \"1\"",
        ),
    ];
    for (args, expected) in cases {
        let mut sig = wire::Signature::new("add_pair");
        sig.args = args
            .into_iter()
            .map(|a| serde_json::from_value(a).unwrap())
            .collect();
        let uuid = sig.uuid.clone();
        server.send_wire(sig).await.unwrap();
        let state = final_state(&server, &uuid).await;
        assert_eq!(state.state, State::Failure);
        assert!(
            state.error.contains(expected),
            "{:?} should contain {expected:?}",
            state.error
        );
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unregistered_tasks_follow_ignore_when_task_not_registered() {
    let server = Server::new(config("unregistered")).await.unwrap();
    let (broker, q) = Raw::open("unregistered").await;
    // A worker that only has add_pair.
    let narrow = server.worker().tasks(["add_pair"]).spawn().await.unwrap();

    // Flagged: dropped.
    let mut ignored = wire::Signature::new("no_such_task");
    ignored.ignore_when_task_not_registered = true;
    server.send_wire(ignored).await.unwrap();

    // Not flagged, and only another worker has it: handed back until that worker takes it.
    let handle = server.send(add::signature(vec![4, 5])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handle.state().await.unwrap().unwrap().state, State::Pending);
    let full = server.worker().spawn().await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 9);

    narrow.shutdown().await.unwrap();
    full.shutdown().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while broker.depth(&q).await != (0, 0) {
        assert!(Instant::now() < deadline, "{:?}", broker.depth(&q).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(broker.dead_letters(&q).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_rejects_unknown_task_filter() {
    let server = Server::new(config("filter")).await.unwrap();
    let err = server.worker().tasks(["nope"]).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Registry);
    assert!(err.to_string().contains("nope"));
}

#[tokio::test(flavor = "multi_thread")]
async fn send_records_pending_and_get_times_out() {
    let server = Server::new(config("no-worker")).await.unwrap();
    let r = server.send(add_pair::signature(1, 2)).await.unwrap();
    let state = r.state().await.unwrap().unwrap();
    assert_eq!(state.state, State::Pending);
    assert_eq!(state.task_name, "add_pair");
    assert!(!state.created_at.is_zero());
    let err = r.get_timeout(Duration::from_millis(100)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
}

// ---- groups and chords ----

static CHORD_CALLS: AtomicU32 = AtomicU32::new(0);

#[task]
fn count_chord(#[variadic] parts: Vec<i64>) -> i64 {
    CHORD_CALLS.fetch_add(1, Ordering::SeqCst);
    parts.iter().sum()
}

#[task]
fn maybe_fail(n: i64) -> Result<i64, String> {
    if n < 0 {
        Err(format!("negative: {n}"))
    } else {
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn group_runs_in_parallel_and_keeps_order() {
    let (server, worker) = setup("group").await;
    let group = Group::new([
        add::signature(vec![1, 1]),
        add::signature(vec![2, 2]),
        add::signature(vec![5, 6]),
    ]);
    let r = server.send_group(group).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), [2, 4, 11]);
    let meta = server
        .backend()
        .unwrap()
        .group_meta(r.group_uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meta.task_uuids.len(), 3);
    assert!(r.group_uuid().starts_with("group_"));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn chord_callback_gets_results_in_group_order() {
    let (server, worker) = setup("chord").await;
    // (1 + 1) * (2 + 2), as Go's example sender does.
    let chord = Group::new([add::signature(vec![1, 1]), add::signature(vec![2, 2])])
        .chord(multiply::signature(vec![]));
    let r = server.send_chord(chord).await.unwrap();
    assert!(r.task_uuid().starts_with("chord_"));
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 8);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn chord_triggers_exactly_once_under_concurrency() {
    let server = Server::new(config("chord-once")).await.unwrap();
    let workers = [
        server.worker().concurrency(16).spawn().await.unwrap(),
        server.worker().concurrency(16).spawn().await.unwrap(),
    ];
    CHORD_CALLS.store(0, Ordering::SeqCst);
    let chord = Group::new((0..50).map(|i| sleepy::signature(i % 3)))
        .chord(concat_numbers::signature(vec![]));
    let r = server.send_chord(chord).await.unwrap();
    let text = r.get_timeout(WAIT).await.unwrap();
    // Results arrive in creation order, not finishing order.
    let expected: Vec<String> = (0..50).map(|i| (i % 3).to_string()).collect();
    assert_eq!(text, expected.join(","));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(CONCAT_CALLS.load(Ordering::SeqCst), 1);
    for w in workers {
        w.shutdown().await.unwrap();
    }
}

static CONCAT_CALLS: AtomicU32 = AtomicU32::new(0);

#[task]
fn concat_numbers(#[variadic] parts: Vec<u64>) -> String {
    CONCAT_CALLS.fetch_add(1, Ordering::SeqCst);
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread")]
async fn chord_with_a_failed_member_runs_the_error_path() {
    let (server, worker) = setup("chord-failure").await;
    CHORD_CALLS.store(0, Ordering::SeqCst);
    let handler = record_error::signature("chord".into());
    let handler_uuid = handler.task_uuids()[0].clone();
    let chord = Group::new([maybe_fail::signature(1), maybe_fail::signature(-2)])
        .chord(count_chord::signature(vec![]).on_error(handler));
    let r = server.send_chord(chord).await.unwrap();
    let err = r.get_timeout(WAIT).await.unwrap_err();
    assert_eq!(err.task_error(), Some("negative: -2"));
    let state = final_state(&server, &handler_uuid).await;
    assert_eq!(state.results.unwrap()[0].value, "chord: negative: -2");
    let callback = final_state(&server, r.task_uuid()).await;
    assert_eq!(callback.state, State::Failure);
    assert_eq!(CHORD_CALLS.load(Ordering::SeqCst), 0);
    worker.shutdown().await.unwrap();
}

// ---- deliveries run in place ----

#[task]
async fn nap(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// `in_place(true)`: the deliveries are futures of the worker's task. They still overlap, a
/// panicking body is still a FAILURE and leaves the worker running, chains and groups work,
/// and shutdown waits for the deliveries in flight.
#[tokio::test(flavor = "multi_thread")]
async fn deliveries_run_in_place_overlap_and_survive_a_panic() {
    let server = Server::new(config("in-place")).await.unwrap();
    let worker = server
        .worker()
        .concurrency(8)
        .in_place(true)
        .spawn()
        .await
        .unwrap();
    // Eight naps of 400 ms at once: far less than 3.2 s.
    let started = Instant::now();
    let group = server
        .send_group(Group::new((0..8).map(|_| nap::signature(400))))
        .await
        .unwrap();
    assert_eq!(group.get_timeout(WAIT).await.unwrap(), vec![400; 8]);
    assert!(
        started.elapsed() < Duration::from_millis(1600),
        "the naps did not overlap: {:?}",
        started.elapsed()
    );
    let err = server
        .send(async_panic_task::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.task_error(), Some("async oops"));
    let chain = add::signature(vec![1, 2]).then(multiply::signature(vec![4]));
    assert_eq!(
        server
            .send(chain)
            .await
            .unwrap()
            .get_timeout(WAIT)
            .await
            .unwrap(),
        12
    );
    // A nap in flight when shutdown starts is finished and recorded.
    let last = server.send(nap::signature(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    worker.shutdown().await.unwrap();
    assert_eq!(
        final_state(&server, last.task_uuids()[0].as_str())
            .await
            .state,
        State::Success
    );
}

static NAP_ENDS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

/// Waits `ms` for another thread (not a Tokio timer: while a runtime thread is held, the
/// others may not drive the timers), then notes when it ended.
#[task]
async fn nap_and_note(ms: u64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(ms));
        let _ = tx.send(());
    });
    let _ = rx.await;
    NAP_ENDS.lock().unwrap().push(Instant::now());
}

/// Holds its thread (no await) for `ms`: a body written wrongly, as they are.
#[task]
async fn hog(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// In place, an async body that waits goes on as a task of its own: a body that holds the
/// worker's thread afterwards does not hold it up. Both wait in the queue before the worker
/// starts, so the worker takes them one after the other: the nap waits first, then the hog
/// holds the worker's task for 1.5 s without an await. The nap still ends after its 100 ms,
/// on another thread (Tokio's LIFO slot, which no other thread steals, must not keep it on
/// the hog's). The nap reaches its body first: the queue is FIFO and the embedded backend
/// records STARTED without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_a_body_that_waits_is_not_held_up_by_a_sibling() {
    let server = Server::new(config("in-place-offload")).await.unwrap();
    let nap = server.send(nap_and_note::signature(100)).await.unwrap();
    let hog = server.send(hog::signature(1500)).await.unwrap();
    let worker = server
        .worker()
        .concurrency(2)
        .in_place(true)
        .spawn()
        .await
        .unwrap();
    let started = Instant::now();
    nap.get_timeout(WAIT).await.unwrap();
    hog.get_timeout(WAIT).await.unwrap();
    let ended = NAP_ENDS.lock().unwrap()[0];
    assert!(
        ended.duration_since(started) < Duration::from_millis(1000),
        "the nap was held up by the hog: it ended after {:?}",
        ended.duration_since(started)
    );
    worker.shutdown().await.unwrap();
}

static FOREVER_STARTED: AtomicBool = AtomicBool::new(false);
static FOREVER_DROPPED: AtomicBool = AtomicBool::new(false);

/// Sets [`FOREVER_DROPPED`] when the body holding it is dropped.
struct NotesDrop;

impl Drop for NotesDrop {
    fn drop(&mut self) {
        FOREVER_DROPPED.store(true, Ordering::SeqCst);
    }
}

/// Waits once (so that, in place, it goes on as a task of its own), then forever.
#[task]
async fn forever() {
    let _noted = NotesDrop;
    tokio::task::yield_now().await;
    FOREVER_STARTED.store(true, Ordering::SeqCst);
    std::future::pending::<()>().await;
}

/// In place, a body that went on as a task of its own ends with its worker: aborting the
/// worker drops it (its task is not left running).
#[tokio::test(flavor = "multi_thread")]
async fn in_place_a_body_on_its_own_task_ends_with_its_worker() {
    let server = Server::new(config("in-place-abort")).await.unwrap();
    let worker = server.worker().in_place(true).spawn().await.unwrap();
    server.send(forever::signature()).await.unwrap();
    until(&FOREVER_STARTED, "the body never started").await;
    assert!(!FOREVER_DROPPED.load(Ordering::SeqCst));
    worker.abort();
    until(&FOREVER_DROPPED, "the body's task outlived its worker").await;
}

/// Waits until `flag` is set, failing with `otherwise` after [`WAIT`].
async fn until(flag: &AtomicBool, otherwise: &str) {
    let deadline = Instant::now() + WAIT;
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "{otherwise}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// In place, a delivery that panics outside its task's body (here, in the application's
/// `make_span`) is caught in the worker: the worker runs on and the broker gets the message
/// back, which then runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_panicking_outside_its_body_in_place_comes_again() {
    static SPANS: AtomicU32 = AtomicU32::new(0);
    let server = Server::new(config("in-place-panic")).await.unwrap();
    let worker = server
        .worker()
        .in_place(true)
        .make_span(|t: &machinery::worker::TaskSpan<'_>| {
            if SPANS.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a span that cannot be made");
            }
            tracing::info_span!("task", task.name = %t.name)
        })
        .spawn()
        .await
        .unwrap();
    let r = server.send(add::signature(vec![1, 2])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 3);
    assert!(SPANS.load(Ordering::SeqCst) >= 2, "it came again");
    assert!(!worker.is_finished());
    worker.shutdown().await.unwrap();
}
