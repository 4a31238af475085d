//! Failure paths on the embedded broker and backend, with faults injected on command
//! (`machinery::testing`): a finished task never runs again, no follow-up is lost, deliveries
//! are bounded, and no message loops, starves or stalls the worker. Executions are counted,
//! never inferred.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::backend::ResultBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Broker;
use machinery::testing::{BackendOp, BrokerOp, Fault, FaultyBackend, FaultyBroker};
use machinery::wire::{self, State};
use machinery::{task, Config, ErrorKind, Group, Server, TaskError};

const QUEUE: &str = "machinery_tasks";
const WAIT: Duration = Duration::from_secs(10);

static FIRST_RUNS: AtomicUsize = AtomicUsize::new(0);
static SECOND_RUNS: AtomicUsize = AtomicUsize::new(0);
static CALLBACK_RUNS: AtomicUsize = AtomicUsize::new(0);
static HANG_RUNS: AtomicUsize = AtomicUsize::new(0);
static FAILING_RUNS: AtomicUsize = AtomicUsize::new(0);
static ERRBACK_RUNS: AtomicUsize = AtomicUsize::new(0);
static BIG_RUNS: AtomicUsize = AtomicUsize::new(0);
static BIG_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static BIG_MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Runs of `fp_good`, by the tag each test gives it.
static RUNS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

fn runs(tag: &str) -> usize {
    RUNS.lock()
        .unwrap()
        .as_ref()
        .and_then(|runs| runs.get(tag).copied())
        .unwrap_or(0)
}

/// Returns `a`, counting its runs under `tag`.
#[task]
fn fp_good(tag: String, a: i64) -> i64 {
    *RUNS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(tag)
        .or_default() += 1;
    a
}

#[task]
fn fp_first(a: i64) -> i64 {
    FIRST_RUNS.fetch_add(1, Ordering::SeqCst);
    a + 1
}

#[task]
fn fp_second(k: i64, #[chained] x: i64) -> i64 {
    SECOND_RUNS.fetch_add(1, Ordering::SeqCst);
    k * x
}

#[task]
fn fp_callback(#[variadic] xs: Vec<i64>) -> i64 {
    CALLBACK_RUNS.fetch_add(1, Ordering::SeqCst);
    xs.iter().sum()
}

#[task]
async fn fp_hang() -> i64 {
    HANG_RUNS.fetch_add(1, Ordering::SeqCst);
    std::future::pending::<()>().await;
    0
}

#[task]
fn fp_failing() -> Result<i64, TaskError> {
    FAILING_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::new("always fails"))
}

#[task]
fn fp_errback(#[error_message] message: String) -> String {
    ERRBACK_RUNS.fetch_add(1, Ordering::SeqCst);
    message
}

#[task]
fn fp_big(s: String) -> String {
    BIG_RUNS.fetch_add(1, Ordering::SeqCst);
    let now = BIG_IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
    BIG_MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    BIG_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    s.chars().take(3).collect()
}

#[task]
fn fp_long_result(n: i64) -> String {
    "x".repeat(usize::try_from(n).unwrap())
}

struct Rig {
    server: Server,
    memory: MemoryBroker,
    broker: FaultyBroker,
    backend: FaultyBackend,
}

/// A server over the embedded broker and backend named `name`, both wrapped in fault doubles.
fn rig(
    name: &str,
    tune: impl FnOnce(machinery::config::ConfigBuilder) -> machinery::config::ConfigBuilder,
) -> Rig {
    let config = tune(
        Config::builder()
            .broker(format!("memory://fp-{name}"))
            .requeue_delay(Duration::from_millis(20))
            .store_retry_timeout(Duration::from_millis(200)),
    )
    .build()
    .unwrap();
    let memory = MemoryBroker::open(&format!("fp-{name}"), QUEUE, "machinery_task");
    let broker = FaultyBroker::new(Arc::new(memory.clone()));
    let backend = FaultyBackend::new(Arc::new(MemoryBackend::open(
        &format!("fp-{name}"),
        Duration::from_secs(3600),
    )));
    let server = Server::from_parts(
        config,
        Arc::new(broker.clone()) as Arc<dyn Broker>,
        Some(Arc::new(backend.clone()) as Arc<dyn ResultBackend>),
    );
    Rig {
        server,
        memory,
        broker,
        backend,
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn state(server: &Server, uuid: &str) -> Option<wire::TaskState> {
    server.backend().unwrap().get_state(uuid).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_follow_up_publish_is_sent_again_without_running_the_task_again() {
    let rig = rig("lost-publish", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_first::NAME, fp_second::NAME])
        .spawn()
        .await
        .unwrap();
    let before = (
        FIRST_RUNS.load(Ordering::SeqCst),
        SECOND_RUNS.load(Ordering::SeqCst),
    );
    let chain = fp_first::signature(1).then(fp_second::signature(10));
    // The producer's publish is done; the next one (the chain's next link) fails once.
    rig.broker.arm(BrokerOp::Publish, Fault::once());
    let result = rig.server.send(chain).await;
    // The producer's own publish was the one that failed: send again, now unarmed.
    assert!(result.is_err());
    rig.broker
        .arm(BrokerOp::Publish, Fault::once().after_calls(1));
    let chain = fp_first::signature(1).then(fp_second::signature(10));
    let handle = rig.server.send(chain).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 20);
    // Give a duplicate time to show itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        FIRST_RUNS.load(Ordering::SeqCst) - before.0,
        1,
        "first link ran again"
    );
    assert_eq!(SECOND_RUNS.load(Ordering::SeqCst) - before.1, 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_ack_neither_reruns_the_task_nor_its_follow_up() {
    let rig = rig("lost-ack", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_first::NAME, fp_second::NAME])
        .spawn()
        .await
        .unwrap();
    // Both links' first acks are lost: each message is delivered again.
    rig.broker.arm(BrokerOp::Ack, Fault::times(2));
    let handle = rig
        .server
        .send(fp_first::signature(5).then(fp_second::signature(2)))
        .await
        .unwrap();
    let uuids = handle.task_uuids().to_vec();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 12);
    eventually("every message settled", || {
        rig.memory.depth(QUEUE) == (0, 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A body that ran again would record its SUCCESS again (each delivery writes STARTED,
    // which the stored SUCCESS refuses).
    for uuid in &uuids {
        assert_eq!(
            rig.backend.writes(uuid, State::Success),
            1,
            "{uuid} ran twice"
        );
    }
    assert!(rig.memory.dead_letters(QUEUE).is_empty());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_keeps_failing_is_tried_a_bounded_number_of_times() {
    let rig = rig("store-fails", |c| c.max_deliveries(3));
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME])
        .spawn()
        .await
        .unwrap();
    rig.backend.arm(
        BackendOp::Transition,
        Fault::always().on_state(State::Success),
    );
    let handle = rig
        .server
        .send(fp_good::signature("store".to_owned(), 7))
        .await
        .unwrap();
    let uuid = handle.task_uuid().to_owned();
    let err = handle.get_timeout(WAIT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Task);
    assert!(
        err.task_error()
            .unwrap()
            .contains("could not be settled after 3 deliveries"),
        "{err}"
    );
    let ran = runs("store");
    assert_eq!(ran, 3, "the body ran {ran} times");
    assert_eq!(rig.backend.writes(&uuid, State::Failure), 1);
    eventually("dead-lettered", || {
        rig.memory.dead_letters(QUEUE).len() == 1
    })
    .await;
    let dead = rig.memory.dead_letters_with_reasons(QUEUE);
    assert!(dead[0].1.contains("injected fault"), "{}", dead[0].1);
    // Nothing more happens to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs("store"), 3);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_task_names_never_starve_registered_ones() {
    let rig = rig("unknown", |c| c.max_deliveries(3).prefetch_count(4));
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME])
        .concurrency(4)
        .spawn()
        .await
        .unwrap();
    for _ in 0..20 {
        let sig = wire::Signature::new("fp_nobody_has_this");
        rig.memory.push_raw(QUEUE, sig.to_json().unwrap());
    }
    let started = Instant::now();
    let handles = rig
        .server
        .send_all((0..10).map(|i| fp_good::signature("unknown".to_owned(), i)))
        .await
        .unwrap();
    for handle in handles {
        handle.get_timeout(WAIT).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(runs("unknown"), 10);
    // The unknown ones end in the dead-letter queue after max_deliveries.
    eventually("unknown tasks dead-lettered", || {
        rig.memory.dead_letters(QUEUE).len() == 20
    })
    .await;
    let dead = rig.memory.dead_letters_with_reasons(QUEUE);
    assert!(dead[0].1.contains("not registered"), "{}", dead[0].1);
    // Recorded as FAILURE, so a producer waiting on one is told.
    let unknown = wire::Signature::from_json(&dead[0].0).unwrap();
    let stored = state(&rig.server, &unknown.uuid).await.unwrap();
    assert_eq!(stored.state, State::Failure);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_chord_callback_publish_is_not_lost_and_fires_once() {
    let rig = rig("chord", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME, fp_callback::NAME])
        .concurrency(3)
        .spawn()
        .await
        .unwrap();
    let before = CALLBACK_RUNS.load(Ordering::SeqCst);
    let chord = Group::new([
        fp_good::signature("chord".to_owned(), 1),
        fp_good::signature("chord".to_owned(), 2),
        fp_good::signature("chord".to_owned(), 3),
    ])
    .chord(fp_callback::signature(vec![]));
    // The members are published by the producer; the next publish is the callback's.
    rig.broker
        .arm(BrokerOp::Publish, Fault::once().after_calls(3));
    let handle = rig.server.send_chord(chord).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(CALLBACK_RUNS.load(Ordering::SeqCst) - before, 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_whose_worker_dies_every_time_is_dead_lettered() {
    let rig = rig("dies", |c| c.max_deliveries(2));
    let before = HANG_RUNS.load(Ordering::SeqCst);
    let handle = rig.server.send(fp_hang::signature()).await.unwrap();
    let uuid = handle.task_uuid().to_owned();
    for n in 1..=2 {
        let worker = rig
            .server
            .worker()
            .tasks([fp_hang::NAME])
            .spawn()
            .await
            .unwrap();
        eventually("the task started", || {
            HANG_RUNS.load(Ordering::SeqCst) - before == n
        })
        .await;
        // The worker dies mid-task: its delivery goes back to the queue.
        worker.abort();
        eventually("the delivery is back", || rig.memory.depth(QUEUE) == (1, 0)).await;
    }
    let worker = rig
        .server
        .worker()
        .tasks([fp_hang::NAME])
        .spawn()
        .await
        .unwrap();
    eventually("dead-lettered", || {
        rig.memory.dead_letters(QUEUE).len() == 1
    })
    .await;
    assert_eq!(HANG_RUNS.load(Ordering::SeqCst) - before, 2);
    let stored = state(&rig.server, &uuid).await.unwrap();
    assert_eq!(stored.state, State::Failure);
    assert!(
        stored.error.contains("delivered 2 times"),
        "{}",
        stored.error
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follow_up_that_can_never_be_sent_fails_the_task_with_its_error_callbacks() {
    let rig = rig("too-big", |c| c.max_message_size(4096));
    let worker = rig
        .server
        .worker()
        .tasks([fp_long_result::NAME, fp_errback::NAME, fp_good::NAME])
        .spawn()
        .await
        .unwrap();
    let errbacks = ERRBACK_RUNS.load(Ordering::SeqCst);
    let mut head = fp_long_result::signature(10_000)
        .on_error(fp_errback::signature())
        .as_wire()
        .clone();
    head.on_success = vec![fp_good::signature("too-big".to_owned(), 1)
        .as_wire()
        .clone()];
    let uuid = head.uuid.clone();
    rig.server.send_wire(head).await.unwrap();
    let stored = eventually_final(&rig.server, &uuid).await;
    assert_eq!(stored.state, State::Failure);
    assert!(stored.error.contains("cannot be sent"), "{}", stored.error);
    eventually("the error callback ran", || {
        ERRBACK_RUNS.load(Ordering::SeqCst) - errbacks == 1
    })
    .await;
    assert!(rig.memory.dead_letters(QUEUE).is_empty());
    worker.shutdown().await.unwrap();
}

async fn eventually_final(server: &Server, uuid: &str) -> wire::TaskState {
    server
        .backend()
        .unwrap()
        .wait_final(uuid, Some(tokio::time::Instant::now() + WAIT))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_retry_timeout_is_clamped_and_said_so() {
    let rig = rig("retry-timeout", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_failing::NAME])
        .spawn()
        .await
        .unwrap();
    let before = FAILING_RUNS.load(Ordering::SeqCst);
    let mut sig = fp_failing::signature().as_wire().clone();
    sig.retry_count = 1;
    sig.retry_timeout = i64::MAX;
    let uuid = sig.uuid.clone();
    rig.server.send_wire(sig).await.unwrap();
    eventually("the task ran", || {
        FAILING_RUNS.load(Ordering::SeqCst) - before == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Not retried at once (an overflowing ETA used to mean "now").
    assert_eq!(FAILING_RUNS.load(Ordering::SeqCst) - before, 1);
    let stored = state(&rig.server, &uuid).await.unwrap();
    assert!(
        matches!(stored.state, State::Retry | State::Pending),
        "{:?}",
        stored.state
    );
    worker.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_store_pauses_the_worker_and_loses_nothing() {
    let rig = rig("outage", |c| c.store_retry_timeout(Duration::from_secs(30)));
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME])
        .concurrency(2)
        .spawn()
        .await
        .unwrap();
    let handles = rig
        .server
        .send_all((0..10).map(|i| fp_good::signature("outage".to_owned(), i)))
        .await
        .unwrap();
    rig.backend.arm(BackendOp::Transition, Fault::always());
    rig.backend.arm(BackendOp::SetState, Fault::always());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, unacked) = rig.memory.depth(QUEUE);
    assert!(
        unacked <= 2,
        "the worker kept taking messages: {unacked} in hand"
    );
    rig.backend.heal(BackendOp::Transition);
    rig.backend.heal(BackendOp::SetState);
    for handle in handles {
        handle.get_timeout(WAIT).await.unwrap();
    }
    assert_eq!(runs("outage"), 10);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn large_messages_wait_for_the_in_flight_byte_budget() {
    let rig = rig("budget", |c| c.max_inflight_bytes(3000));
    let worker = rig
        .server
        .worker()
        .tasks([fp_big::NAME])
        .concurrency(8)
        .spawn()
        .await
        .unwrap();
    let handles = rig
        .server
        .send_all((0..6).map(|_| fp_big::signature("y".repeat(2000))))
        .await
        .unwrap();
    for handle in handles {
        handle.get_timeout(WAIT).await.unwrap();
    }
    assert_eq!(BIG_MAX_IN_FLIGHT.load(Ordering::SeqCst), 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_timeout_is_bounded() {
    let rig = rig("shutdown", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_hang::NAME])
        .spawn()
        .await
        .unwrap();
    let before = HANG_RUNS.load(Ordering::SeqCst);
    rig.server.send(fp_hang::signature()).await.unwrap();
    eventually("the task started", || {
        HANG_RUNS.load(Ordering::SeqCst) > before
    })
    .await;
    let started = Instant::now();
    let err = worker
        .shutdown_timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Shutdown);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The aborted task's message is back in the queue.
    eventually("requeued", || rig.memory.depth(QUEUE) == (1, 0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partly_refused_batch_says_which_tasks_were_sent() {
    let rig = rig("partial", |c| c);
    rig.broker
        .arm(BrokerOp::Publish, Fault::once().after_calls(2));
    let sigs: Vec<_> = (0..5)
        .map(|i| fp_good::signature("partial".to_owned(), i))
        .collect();
    let uuids: Vec<String> = sigs.iter().map(|s| s.as_wire().uuid.clone()).collect();
    let err = rig.server.send_all(sigs).await.unwrap_err();
    let report = err.partial_send().expect("a partial-send report");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, uuids[2]);
    assert_eq!(report.sent, [&uuids[..2], &uuids[3..]].concat());
    assert_eq!(rig.memory.depth(QUEUE), (4, 0));
}

static SKEW_RUNS: AtomicUsize = AtomicUsize::new(0);
static ACKLESS_ERRBACKS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn fp_skew(hang: bool) -> i64 {
    SKEW_RUNS.fetch_add(1, Ordering::SeqCst);
    if hang {
        std::future::pending::<()>().await;
    }
    1
}

#[task]
fn fp_ackless_errback(#[error_message] message: String) -> String {
    ACKLESS_ERRBACKS.fetch_add(1, Ordering::SeqCst);
    message
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_reply_to_received_does_not_make_the_task_a_duplicate() {
    let rig = rig("lost-reply", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME])
        .spawn()
        .await
        .unwrap();
    // RECEIVED is written, its reply lost; the retried write then reads that RECEIVED.
    rig.backend
        .arm(BackendOp::Transition, Fault::once().reply_lost());
    let handle = rig
        .server
        .send(fp_good::signature("lost-reply".to_owned(), 3))
        .await
        .unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 3);
    assert_eq!(runs("lost-reply"), 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliveries_that_never_reached_a_task_are_not_held_against_it() {
    // A classic queue: redeliveries are flagged, not counted.
    let rig = rig("prefetched", |c| c.max_deliveries(1));
    rig.broker.classic_queue();
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME])
        .spawn()
        .await
        .unwrap();
    // The message is lost on its way to the worker three times (a prefetch buffer dropped
    // by restarts), and never ran: it must still run, once.
    rig.broker.arm(BrokerOp::Consume, Fault::times(3));
    let handle = rig
        .server
        .send(fp_good::signature("prefetched".to_owned(), 4))
        .await
        .unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 4);
    assert_eq!(runs("prefetched"), 1);
    assert!(rig.memory.dead_letters(QUEUE).is_empty());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_classic_queue_a_task_whose_worker_dies_every_time_is_still_bounded() {
    let rig = rig("classic-dies", |c| c.max_deliveries(2));
    rig.broker.classic_queue();
    let before = HANG_RUNS.load(Ordering::SeqCst);
    let handle = rig.server.send(fp_hang::signature()).await.unwrap();
    for n in 1..=2 {
        let worker = rig
            .server
            .worker()
            .tasks([fp_hang::NAME])
            .spawn()
            .await
            .unwrap();
        eventually("the task started", || {
            HANG_RUNS.load(Ordering::SeqCst) - before == n
        })
        .await;
        worker.abort();
        eventually("the delivery is back", || rig.memory.depth(QUEUE).1 == 0).await;
    }
    let worker = rig
        .server
        .worker()
        .tasks([fp_hang::NAME])
        .spawn()
        .await
        .unwrap();
    eventually("dead-lettered", || {
        rig.memory.dead_letters(QUEUE).len() == 1
    })
    .await;
    assert_eq!(HANG_RUNS.load(Ordering::SeqCst) - before, 2);
    let err = handle.get_timeout(WAIT).await.unwrap_err();
    assert!(err.to_string().contains("delivered"), "{err}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_that_arrives_early_keeps_its_count() {
    // The first worker tolerates any clock skew; the second one none.
    let rig = rig("skew", |c| c.eta_tolerance(Duration::from_secs(60)));
    let strict = Server::from_parts(
        Config::builder()
            .broker("memory://fp-skew")
            .eta_tolerance(Duration::ZERO)
            .build()
            .unwrap(),
        rig.server.broker().clone(),
        rig.server.backend().cloned(),
    );
    let before = SKEW_RUNS.load(Ordering::SeqCst);
    let mut sig = fp_skew::signature(true).as_wire().clone();
    sig.eta = Some((chrono::Utc::now() + chrono::Duration::milliseconds(1500)).into());
    let uuid = sig.uuid.clone();
    rig.memory.push_raw(QUEUE, sig.to_json().unwrap());
    let worker = rig
        .server
        .worker()
        .tasks([fp_skew::NAME])
        .spawn()
        .await
        .unwrap();
    eventually("it started", || {
        SKEW_RUNS.load(Ordering::SeqCst) - before == 1
    })
    .await;
    // It dies mid-run; the redelivery reaches a worker that finds it early.
    worker.abort();
    let worker = strict
        .worker()
        .tasks([fp_skew::NAME])
        .spawn()
        .await
        .unwrap();
    // Delayed to its ETA, it must run again (a count lost on the way would make it look like
    // a duplicate of the first run and be dropped).
    eventually("it ran again", || {
        SKEW_RUNS.load(Ordering::SeqCst) - before == 2
    })
    .await;
    let stored = state(&rig.server, &uuid).await.unwrap();
    assert_eq!(stored.state, State::Started);
    worker.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_task_dead_lettered_after_lost_acks_keeps_its_success() {
    let rig = rig("ackless", |c| c.max_deliveries(2));
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME, fp_ackless_errback::NAME])
        .spawn()
        .await
        .unwrap();
    rig.broker.arm(BrokerOp::Ack, Fault::times(2));
    let errbacks = ACKLESS_ERRBACKS.load(Ordering::SeqCst);
    let handle = rig
        .server
        .send(fp_good::signature("ackless".to_owned(), 9).on_error(fp_ackless_errback::signature()))
        .await
        .unwrap();
    let uuid = handle.task_uuid().to_owned();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 9);
    eventually("dead-lettered", || {
        rig.memory.dead_letters(QUEUE).len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        state(&rig.server, &uuid).await.unwrap().state,
        State::Success
    );
    assert_eq!(ACKLESS_ERRBACKS.load(Ordering::SeqCst), errbacks);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_result_backend_a_classic_queue_crash_loop_is_still_bounded() {
    let memory = MemoryBroker::open("fp-no-backend", QUEUE, "machinery_task");
    let broker = FaultyBroker::new(Arc::new(memory.clone()));
    broker.classic_queue();
    let server = Server::from_parts(
        Config::builder()
            .broker("memory://fp-no-backend")
            .max_deliveries(2)
            .build()
            .unwrap(),
        Arc::new(broker.clone()) as Arc<dyn Broker>,
        None,
    );
    let before = HANG_RUNS.load(Ordering::SeqCst);
    server.send(fp_hang::signature()).await.unwrap();
    for n in 1..=2 {
        let worker = server
            .worker()
            .tasks([fp_hang::NAME])
            .spawn()
            .await
            .unwrap();
        eventually("the task started", || {
            HANG_RUNS.load(Ordering::SeqCst) - before == n
        })
        .await;
        worker.abort();
        eventually("the delivery is back", || memory.depth(QUEUE).1 == 0).await;
    }
    let worker = server
        .worker()
        .tasks([fp_hang::NAME])
        .spawn()
        .await
        .unwrap();
    eventually("dead-lettered", || memory.dead_letters(QUEUE).len() == 1).await;
    assert_eq!(HANG_RUNS.load(Ordering::SeqCst) - before, 2);
    worker.shutdown().await.unwrap();
}

static LATE_FOLLOW_UPS: AtomicUsize = AtomicUsize::new(0);

#[task]
fn fp_late_follow_up(#[chained] x: i64) -> i64 {
    LATE_FOLLOW_UPS.fetch_add(1, Ordering::SeqCst);
    x
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_task_dead_lettered_still_sends_its_follow_ups() {
    let rig = rig("late-follow-up", |c| c.max_deliveries(2));
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME, fp_late_follow_up::NAME])
        .spawn()
        .await
        .unwrap();
    // After the producer's publish: the follow-up (attempt 1), the message given back, and the
    // follow-up again (attempt 2, the last) fail; the dead-lettering's own attempt goes through.
    rig.broker
        .arm(BrokerOp::Publish, Fault::times(3).after_calls(1));
    let before = LATE_FOLLOW_UPS.load(Ordering::SeqCst);
    let handle = rig
        .server
        .send(
            fp_good::signature("late-follow-up".to_owned(), 6).then(fp_late_follow_up::signature()),
        )
        .await
        .unwrap();
    let head = handle.task_uuids()[0].clone();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 6);
    eventually("dead-lettered", || {
        rig.memory.dead_letters(QUEUE).len() == 1
    })
    .await;
    assert_eq!(
        state(&rig.server, &head).await.unwrap().state,
        State::Success
    );
    assert_eq!(LATE_FOLLOW_UPS.load(Ordering::SeqCst) - before, 1);
    worker.shutdown().await.unwrap();
}

/// The drain's store cost: a task takes two state writes, STARTED (which also reads what was
/// stored before, to tell a duplicate) and SUCCESS. RECEIVED is not written (see the README,
/// "differs on purpose"): Go's readers treat it as STARTED, and the round trip was a third of
/// the worker's store traffic.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_takes_two_state_writes_started_and_success() {
    let rig = rig("two-writes", |c| c);
    let worker = rig
        .server
        .worker()
        .tasks([fp_good::NAME])
        .spawn()
        .await
        .unwrap();
    let handle = rig
        .server
        .send(fp_good::signature("two-writes".to_owned(), 3))
        .await
        .unwrap();
    let uuid = handle.task_uuid().to_owned();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 3);
    worker.shutdown().await.unwrap();
    assert_eq!(rig.backend.writes(&uuid, State::Received), 0);
    assert_eq!(rig.backend.writes(&uuid, State::Started), 1);
    assert_eq!(rig.backend.writes(&uuid, State::Success), 1);
    assert_eq!(rig.backend.calls(BackendOp::Transition), 2);
}
