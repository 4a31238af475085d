//! Revoke (`Server::revoke`, `revoke_many`) on RabbitMQ with Redis results, and on the embedded
//! broker: a revoked task never runs (in the queue, delayed by an ETA, between retries, a chain
//! link sent later), a running async body is cancelled, a blocking one abandoned, a finished
//! task keeps its outcome, and the worker's revoke watcher rides out a store outage.
//!
//! Go Machinery has no revoke; Go readers see the state FAILURE with the error "revoked".

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::backend::ResultBackend;
use machinery::testing::{BackendOp, Fault, FaultyBackend};
use machinery::wire::{State, TaskState};
use machinery::{task, Config, ErrorKind, Server, TaskError, REVOKED};

use common::{cleanup, unique_config};

const WAIT: Duration = Duration::from_secs(30);

// ---- tasks: every body counts its starts and its ends by tag ----

static STARTS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
static ENDS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

fn bump(counter: &Mutex<Option<HashMap<String, usize>>>, tag: &str) {
    *counter
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(tag.to_owned())
        .or_default() += 1;
}

fn count(counter: &Mutex<Option<HashMap<String, usize>>>, tag: &str) -> usize {
    counter
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|c| c.get(tag).copied())
        .unwrap_or(0)
}

fn starts(tag: &str) -> usize {
    count(&STARTS, tag)
}

fn ends(tag: &str) -> usize {
    count(&ENDS, tag)
}

#[task]
fn rv_count(tag: String) -> u64 {
    bump(&STARTS, &tag);
    bump(&ENDS, &tag);
    1
}

#[task]
async fn rv_sleep(tag: String, ms: u64) -> u64 {
    bump(&STARTS, &tag);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    bump(&ENDS, &tag);
    ms
}

#[task]
fn rv_block(tag: String, ms: u64) -> u64 {
    bump(&STARTS, &tag);
    std::thread::sleep(Duration::from_millis(ms));
    bump(&ENDS, &tag);
    ms
}

#[task]
fn rv_next(tag: String, #[chained] x: u64) -> u64 {
    bump(&STARTS, &tag);
    bump(&ENDS, &tag);
    x + 1
}

#[task]
fn rv_fail(tag: String) -> Result<u64, TaskError> {
    bump(&STARTS, &tag);
    bump(&ENDS, &tag);
    Err(TaskError::new("always fails"))
}

#[task]
fn rv_errback(#[error_message] error: String, tag: String) -> String {
    bump(&STARTS, &tag);
    error
}

// ---- helpers ----

/// A fresh tag for one test's bodies.
fn tag(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

/// RabbitMQ + Redis on their own exchange and queue; the watcher polls every `poll`.
fn config(name: &str, poll: Duration) -> Config {
    let mut config = unique_config(&format!("revoke_{name}"));
    config.revoke_poll = poll;
    config
}

fn embedded(name: &str, poll: Duration) -> Config {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut config = Config::builder()
        .broker(format!("memory://revoke-{name}-{id}"))
        .build()
        .unwrap();
    config.revoke_poll = poll;
    config
}

async fn state(server: &Server, uuid: &str) -> Option<TaskState> {
    server.backend().unwrap().get_state(uuid).await.unwrap()
}

async fn final_state(server: &Server, uuid: &str) -> TaskState {
    let deadline = tokio::time::Instant::now() + WAIT;
    server
        .backend()
        .unwrap()
        .wait_final(uuid, Some(deadline))
        .await
        .unwrap()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn eventually_state(server: &Server, uuid: &str, expected: State) {
    let deadline = Instant::now() + WAIT;
    loop {
        if state(server, uuid)
            .await
            .is_some_and(|s| s.state == expected)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {uuid} to be {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_revoked(state: &TaskState) {
    assert_eq!(state.state, State::Failure, "{state:?}");
    assert_eq!(state.error, REVOKED, "{state:?}");
}

// ---- RabbitMQ + Redis ----

#[tokio::test(flavor = "multi_thread")]
async fn a_task_revoked_in_the_queue_never_runs() {
    let config = config("queue", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let tag = tag("queue");
    // No worker yet: the message waits in the queue.
    let handle = server.send(rv_count::signature(tag.clone())).await.unwrap();
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    // With one slot, the marker runs after the revoked message was handled.
    let marker = tag.clone() + "-marker";
    server
        .send(rv_count::signature(marker.clone()))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    let err = handle.get_timeout(WAIT).await.unwrap_err();
    assert_eq!(err.task_error(), Some(REVOKED), "{err}");
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    assert_eq!(starts(&tag), 0, "the revoked body ran");
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_with_an_eta_revoked_while_it_waits_never_runs() {
    let config = config("eta", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let tag = tag("eta");
    let handle = server
        .send(rv_count::signature(tag.clone()).with_delay(Duration::from_secs(5)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    // The message comes due after 5 s; give it time to arrive and be handled.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(starts(&tag), 0, "the revoked body ran when its ETA came");
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_async_task_is_cancelled_and_frees_its_slot() {
    let config = config("running", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let tag = tag("running");
    let handle = server
        .send(rv_sleep::signature(tag.clone(), 30_000))
        .await
        .unwrap();
    eventually("the body to start", || starts(&tag) == 1).await;
    let revoked_at = Instant::now();
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    // get() returns as soon as the revoke is stored; wait for the worker's acknowledgement
    // instead: the next task can only run once the slot is free.
    let after = tag.clone() + "-after";
    let next = server
        .send(rv_count::signature(after.clone()))
        .await
        .unwrap();
    next.get_timeout(WAIT).await.unwrap();
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(2), "cancelled after {took:?}");
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    assert_eq!(ends(&tag), 0, "the body ran to its end");
    assert_eq!(starts(&after), 1);
    worker.shutdown_timeout(WAIT).await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_blocking_task_is_abandoned_and_frees_its_slot() {
    let config = config("blocking", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let tag = tag("blocking");
    let handle = server
        .send(rv_block::signature(tag.clone(), 4_000))
        .await
        .unwrap();
    eventually("the body to start", || starts(&tag) == 1).await;
    let revoked_at = Instant::now();
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    let after = tag.clone() + "-after";
    server
        .send(rv_count::signature(after.clone()))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(2), "slot freed after {took:?}");
    assert_eq!(ends(&tag), 0, "the thread is still running");
    // The thread runs to its end; its result is discarded.
    eventually("the abandoned thread to end", || ends(&tag) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    worker.shutdown_timeout(WAIT).await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_link_revoked_before_the_first_finishes_never_runs() {
    let config = config("chain", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let tag = tag("chain");
    let chain =
        rv_sleep::signature(tag.clone(), 1_000).then(rv_next::signature(tag.clone() + "-next"));
    let uuids = chain.task_uuids().to_vec();
    let handle = server.send(chain).await.unwrap();
    eventually("the first link to start", || starts(&tag) == 1).await;
    assert_eq!(state(&server, &uuids[1]).await, None, "not sent yet");
    assert!(server.revoke(&uuids[1]).await.unwrap());
    let first = final_state(&server, &uuids[0]).await;
    assert_eq!(first.state, State::Success, "{first:?}");
    let err = handle.get_timeout(WAIT).await.unwrap_err();
    assert_eq!(err.task_error(), Some(REVOKED), "{err}");
    // The second link is sent, received and dropped; give it the time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(starts(&(tag.clone() + "-next")), 0, "the revoked link ran");
    assert_revoked(&final_state(&server, &uuids[1]).await);
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_revoked_between_retries_is_not_retried() {
    let config = config("retry", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let tag = tag("retry");
    // The first retry waits 1 s (Fibonacci), the next 2 s.
    let handle = server
        .send(rv_fail::signature(tag.clone()).with_retries(3))
        .await
        .unwrap();
    // After the failure: RETRY, then PENDING once the retry is published (delayed).
    eventually("the first run", || starts(&tag) == 1).await;
    eventually_state(&server, handle.task_uuid(), State::Pending).await;
    assert_eq!(starts(&tag), 1);
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(starts(&tag), 1, "the revoked task was retried");
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_finished_task_keeps_its_outcome() {
    let config = config("finished", Duration::from_millis(200));
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let tag = tag("finished");
    let done = server.send(rv_count::signature(tag.clone())).await.unwrap();
    assert_eq!(done.get_timeout(WAIT).await.unwrap(), 1);
    let failed = server.send(rv_fail::signature(tag.clone())).await.unwrap();
    failed.get_timeout(WAIT).await.unwrap_err();
    let unknown = format!("task_{}", uuid::Uuid::new_v4());
    let revoked = server
        .revoke_many([done.task_uuid(), failed.task_uuid(), unknown.as_str()])
        .await
        .unwrap();
    assert_eq!(revoked, [false, false, true]);
    let stored = state(&server, done.task_uuid()).await.unwrap();
    assert_eq!(stored.state, State::Success, "{stored:?}");
    assert_eq!(stored.results.unwrap().len(), 1);
    let stored = state(&server, failed.task_uuid()).await.unwrap();
    assert_eq!(stored.error, "always fails", "{stored:?}");
    assert_revoked(&state(&server, &unknown).await.unwrap());
    // Revoking again: still revoked.
    assert!(server.revoke(&unknown).await.unwrap());
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_needs_a_backend_and_a_sane_uuid() {
    let mut config = config("no_backend", Duration::from_millis(200));
    config.result_backend = String::new();
    let server = Server::new(config.clone()).await.unwrap();
    let err = server.revoke("task_1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("result backend"), "{err}");

    let server = Server::new(unique_config("revoke_bad_uuid")).await.unwrap();
    let err = server.revoke("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
    let long = "x".repeat(10_000);
    let err = server.revoke(&long).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
    assert!(!err.to_string().contains(&long), "the uuid is quoted whole");
    let err = server.revoke_many(["task_ok", ""]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode, "{err}");
    assert_eq!(
        state(&server, "task_ok").await,
        None,
        "nothing is written when one uuid is bad"
    );
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watcher_rides_out_a_store_outage() {
    let config = config("outage", Duration::from_millis(100));
    let plain = Server::new(config.clone()).await.unwrap();
    let faulty = Arc::new(FaultyBackend::new(plain.backend().unwrap().clone()));
    let server = Server::from_parts(
        config.clone(),
        plain.broker().clone(),
        Some(faulty.clone() as Arc<dyn ResultBackend>),
    );
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let tag = tag("outage");
    let handle = server
        .send(rv_sleep::signature(tag.clone(), 30_000))
        .await
        .unwrap();
    eventually("the body to start", || starts(&tag) == 1).await;
    // The watcher's reads fail for a while: it logs and keeps polling.
    let before = faulty.calls(BackendOp::GetState);
    faulty.arm(BackendOp::GetState, Fault::always());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = faulty.calls(BackendOp::GetState) - before;
    assert!(failed >= 3, "the watcher polled {failed} times");
    assert!(!worker.is_finished(), "the worker stopped");
    faulty.heal(BackendOp::GetState);
    let revoked_at = Instant::now();
    assert!(plain.revoke(handle.task_uuid()).await.unwrap());
    let after = tag.clone() + "-after";
    server
        .send(rv_count::signature(after.clone()))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(2), "cancelled after {took:?}");
    assert_eq!(ends(&tag), 0);
    assert_revoked(&final_state(&plain, handle.task_uuid()).await);
    worker.shutdown_timeout(WAIT).await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_finishes_after_its_revoke_stays_revoked() {
    // No watcher: the body finishes although its revoke is stored. The revoke wins: its
    // SUCCESS is not recorded and its follow-ups are not sent.
    let config = config("race", Duration::ZERO);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let tag = tag("race");
    let chain =
        rv_sleep::signature(tag.clone(), 1_000).then(rv_next::signature(tag.clone() + "-next"));
    let uuids = chain.task_uuids().to_vec();
    server.send(chain).await.unwrap();
    eventually("the body to start", || starts(&tag) == 1).await;
    assert!(server.revoke(&uuids[0]).await.unwrap());
    eventually("the body to end", || ends(&tag) == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_revoked(&state(&server, &uuids[0]).await.unwrap());
    assert_eq!(
        state(&server, &uuids[1]).await,
        None,
        "the next link was sent"
    );
    assert_eq!(starts(&(tag.clone() + "-next")), 0);
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_revoke_many_keeps_finished_tasks_and_guards_revoked_ones() {
    let server = Server::new(unique_config("revoke_redis")).await.unwrap();
    let backend = server.backend().unwrap();
    let id = || format!("task_{}", uuid::Uuid::new_v4());
    let (pending, success, failure, none) = (id(), id(), id(), id());
    let mut states = vec![
        TaskState::new(pending.clone(), State::Pending),
        TaskState::new(success.clone(), State::Success),
        TaskState::new(failure.clone(), State::Failure),
    ];
    states[0].task_name = "named".into();
    backend.set_states(states).await.unwrap();
    let uuids = [&pending, &success, &failure, &none].map(|s| s.to_string());
    assert_eq!(
        backend.revoke(&uuids).await.unwrap(),
        [true, false, false, true]
    );
    let stored = backend.get_states(&uuids).await.unwrap();
    assert_revoked(stored[0].as_ref().unwrap());
    assert_eq!(stored[0].as_ref().unwrap().task_name, "named", "carried");
    assert_eq!(stored[1].as_ref().unwrap().state, State::Success);
    assert_eq!(stored[2].as_ref().unwrap().state, State::Failure);
    assert_eq!(stored[2].as_ref().unwrap().error, "");
    assert_revoked(stored[3].as_ref().unwrap());
    // Nothing replaces "revoked": a late SUCCESS or FAILURE, a RECEIVED.
    for next in [State::Success, State::Failure, State::Received] {
        let previous = backend
            .transition(TaskState::new(pending.clone(), next))
            .await
            .unwrap();
        assert_revoked(previous.as_ref().unwrap());
        backend
            .set_state(TaskState::new(none.clone(), next))
            .await
            .unwrap();
    }
    assert_revoked(&state(&server, &pending).await.unwrap());
    assert_revoked(&state(&server, &none).await.unwrap());
    // A revoked task is still revoked.
    assert_eq!(backend.revoke(&uuids[..1]).await.unwrap(), [true]);
    // Go reads it as a FAILURE with the error "revoked".
    let mut conn = redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let raw: String = redis::cmd("GET")
        .arg(&none)
        .query_async(&mut conn)
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(json["State"], "FAILURE", "{raw}");
    assert_eq!(json["Error"], "revoked", "{raw}");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&none)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 3600, "expires with the results: {ttl}");
}

// ---- the embedded broker ----

#[tokio::test(flavor = "multi_thread")]
async fn embedded_a_task_revoked_in_the_queue_never_runs() {
    let server = Server::new(embedded("queue", Duration::from_millis(100)))
        .await
        .unwrap();
    let tag = tag("embedded-queue");
    let handle = server.send(rv_count::signature(tag.clone())).await.unwrap();
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    server
        .send(rv_count::signature(tag.clone() + "-marker"))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    let err = handle.get_timeout(WAIT).await.unwrap_err();
    assert_eq!(err.task_error(), Some(REVOKED), "{err}");
    assert_eq!(starts(&tag), 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_a_running_task_is_cancelled() {
    let server = Server::new(embedded("running", Duration::from_millis(100)))
        .await
        .unwrap();
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let tag = tag("embedded-running");
    let handle = server
        .send(rv_sleep::signature(tag.clone(), 30_000))
        .await
        .unwrap();
    eventually("the body to start", || starts(&tag) == 1).await;
    let revoked_at = Instant::now();
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    server
        .send(rv_count::signature(tag.clone() + "-after"))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(2), "cancelled after {took:?}");
    assert_eq!(ends(&tag), 0);
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    worker.shutdown_timeout(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_a_dead_lettered_revoked_task_sends_no_error_callbacks() {
    let config = embedded("dead-letter", Duration::from_millis(100));
    let queue = config.default_queue.clone();
    let binding_key = config.amqp.binding_key.clone();
    let name = config.broker.clone();
    let server = Server::new(config).await.unwrap();
    let tag = tag("embedded-dead-letter");
    let errback = tag.clone() + "-errback";
    // A message that already used up its deliveries: it is dead-lettered on arrival, and its
    // task recorded as FAILURE with its error callbacks, unless it finished (or was revoked).
    let signature = rv_count::signature(tag.clone())
        .with_header("x-machinery-attempts", 5)
        .on_error(rv_errback::signature(errback.clone()));
    let handle = server.send(signature).await.unwrap();
    assert!(server.revoke(handle.task_uuid()).await.unwrap());
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let broker = machinery::broker::memory::MemoryBroker::open(
        name.trim_start_matches("memory://"),
        &queue,
        &binding_key,
    );
    eventually("the message to be dead-lettered", || {
        broker.dead_letters(&queue).len() == 1
    })
    .await;
    server
        .send(rv_count::signature(tag.clone() + "-marker"))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(starts(&tag), 0);
    assert_eq!(starts(&errback), 0, "the revoked task's error callback ran");
    assert_revoked(&final_state(&server, handle.task_uuid()).await);
    worker.shutdown().await.unwrap();
}
