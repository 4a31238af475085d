//! Go Machinery's AMQP result backend (`RESULT_BACKEND=amqp://...`) against a real RabbitMQ on
//! 127.0.0.1:5672 (`tests/services.sh` starts it). These tests fail, never skip, when it is
//! not there. Every test runs on its own exchange and queue, with fresh task UUIDs.
//!
//! Go's layout (v2/backends/amqp/amqp.go): a task state is a persistent `application/json`
//! message in a queue named by the task UUID, non-durable and auto-delete, declared with
//! `x-message-ttl` and `x-expires` (int32 milliseconds, `ResultsExpireIn * 1000`), bound to
//! the configured exchange with the task UUID as its binding key.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{amqp_url, cleanup, raw_channel, unique_config, WAIT};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use machinery::backend::amqp::AmqpBackend;
use machinery::backend::ResultBackend;
use machinery::broker::Broker;
use machinery::testing::{BackendOp, Fault, FaultyBackend};
use machinery::wire::{self, GoTime, State, TaskResult, TaskState};
use machinery::{Config, Group, Server};
use serde_json::json;

include!("../src/tasks.rs");

/// A configuration on its own exchange and queue, with results in RabbitMQ.
fn config(tag: &str, expire_secs: u64) -> Config {
    let mut config = unique_config(tag);
    config.result_backend = amqp_url();
    config.results_expire_in = expire_secs;
    config
}

fn task_uuid() -> String {
    format!("task_{}", uuid::Uuid::new_v4())
}

/// Go's queue arguments for a state queue: `x-message-ttl` and `x-expires`, both `int32`
/// (AMQP type `I`), in milliseconds (Go: `int32(b.getExpiresIn())`).
fn go_queue_args(expire_ms: i32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(expire_ms));
    args.insert("x-expires".into(), AMQPValue::LongInt(expire_ms));
    args
}

/// Declares and binds a state queue exactly as Go's `updateState` does through
/// `AMQPConnector.Connect`: durable false, auto-delete true, Go's arguments, bound to the
/// exchange with the queue's name. A declaration with other arguments than an existing
/// queue's fails (PRECONDITION_FAILED), so this also checks that our queues match Go's.
async fn go_declare(channel: &lapin::Channel, exchange: &str, queue: &str, expire_ms: i32) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: false,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            go_queue_args(expire_ms),
        )
        .await
        .expect("Go's declaration of the state queue");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("Go's binding of the state queue");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_of_a_task_a_chain_a_group_and_a_chord() {
    let config = config("ab_get", 600);
    let server = Server::new(config.clone())
        .await
        .expect("RabbitMQ on 127.0.0.1");
    let worker = server.worker().concurrency(4).spawn().await.unwrap();

    let r = server.send(add::signature(vec![1, 1])).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 2);

    let chain = add::signature(vec![2, 2])
        .then(add::signature(vec![5, 6]))
        .then(multiply::signature(vec![4]));
    assert_eq!(
        server
            .send(chain)
            .await
            .unwrap()
            .get_timeout(WAIT)
            .await
            .unwrap(),
        60
    );

    let group = Group::new([
        add::signature(vec![1, 1]),
        add::signature(vec![2, 2]),
        add::signature(vec![3, 3]),
    ]);
    let r = server.send_group(group).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), [2, 4, 6]);
    // Go's markTaskCompleted layout: each member's final state in the group's queue, which
    // Go's GroupCompleted counts.
    let backend = AmqpBackend::connect(&config).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !backend.group_completed(r.group_uuid(), 3).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group queue never held 3 states"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_conn, channel) = raw_channel().await;
    for _ in 0..3 {
        let got = channel
            .basic_get(r.group_uuid().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a member's state in the group queue");
        let member: TaskState = serde_json::from_slice(&got.delivery.data).unwrap();
        assert_eq!(member.state, State::Success);
    }
    drop(channel);

    let chord = Group::new([add::signature(vec![1, 1]), add::signature(vec![2, 2])])
        .chord(multiply::signature(vec![]));
    let r = server.send_chord(chord).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 8);

    // A failed task is read back as its failure.
    let err = server
        .send(return_just_error::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap_err();
    assert_eq!(err.task_error(), Some("kaboom"));

    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

/// Byte for byte what Go's `json.Marshal` writes for a `tasks.TaskState` (field order, the
/// zero `CreatedAt`, `TTL` 0).
fn go_state_json(uuid: &str) -> String {
    format!(
        r#"{{"TaskUUID":"{uuid}","TaskName":"add","State":"SUCCESS","Results":[{{"Type":"int64","Value":8}}],"Error":"","CreatedAt":"2026-11-29T20:17:52.337696883Z","TTL":0}}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn states_are_read_and_written_in_gos_exact_layout() {
    let config = config("ab_go", 600);
    let backend = AmqpBackend::connect(&config).await.expect("RabbitMQ");
    let exchange = config.amqp.exchange.clone();
    let (_conn, channel) = raw_channel().await;
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");

    // Go -> us: a state published as Go's updateState publishes it.
    let uuid = task_uuid();
    go_declare(&channel, &exchange, &uuid, 600_000).await;
    channel
        .basic_publish(
            exchange.as_str().into(),
            uuid.as_str().into(),
            Default::default(),
            go_state_json(&uuid).as_bytes(),
            lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let state = backend.get_state(&uuid).await.unwrap().expect("Go's state");
    assert_eq!(state.state, State::Success);
    assert_eq!(state.task_name, "add");
    assert_eq!(
        state.results,
        Some(vec![TaskResult {
            type_name: "int64".into(),
            value: json!(8)
        }])
    );
    // Reading is not destructive for us (Go's GetState consumes; ours leaves the state).
    assert!(backend.get_state(&uuid).await.unwrap().is_some());
    // And a Go reader (basic.get, as Go's GetState) still finds it.
    let got = channel
        .basic_get(uuid.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the state is still in its queue");
    assert_eq!(got.delivery.data, go_state_json(&uuid).as_bytes());

    // Us -> Go: what we write, a Go reader reads with basic.get and decodes as a TaskState.
    let uuid = task_uuid();
    let created = GoTime::from_datetime(
        chrono::DateTime::parse_from_rfc3339("2026-11-29T20:17:52.337696883Z")
            .unwrap()
            .with_timezone(&chrono::Utc),
    );
    backend
        .set_state(TaskState {
            task_name: "add".into(),
            created_at: created,
            ..TaskState::new(&uuid, State::Pending)
        })
        .await
        .unwrap();
    backend
        .set_state(TaskState {
            results: Some(vec![TaskResult {
                type_name: "int64".into(),
                value: json!(8),
            }]),
            ..TaskState::new(&uuid, State::Success)
        })
        .await
        .unwrap();
    // Go's own declaration of the same queue succeeds: same durability, auto-delete,
    // argument names, types and values (else PRECONDITION_FAILED).
    go_declare(&channel, &exchange, &uuid, 600_000).await;
    let got = channel
        .basic_get(uuid.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("our state, for Go's GetState");
    // The writes were compacted: the latest state, with the name and creation time carried
    // forward, is what Go's first GetState returns.
    assert_eq!(
        String::from_utf8(got.delivery.data.clone()).unwrap(),
        go_state_json(&uuid)
    );
    assert_eq!(
        got.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*got.delivery.properties.delivery_mode(), Some(2));
    let decoded: TaskState = serde_json::from_slice(&got.delivery.data).unwrap();
    assert_eq!(decoded.state, State::Success);

    cleanup(&config).await;
}

/// What a Go worker leaves in a state queue: one message per state, as `SetStatePending`,
/// `SetStateReceived`, `SetStateStarted` and `SetStateSuccess` publish them (only PENDING
/// names the task; Go's `NewReceivedTaskState` and the rest carry no name and a zero time).
#[tokio::test(flavor = "multi_thread")]
async fn a_go_workers_sequence_of_states_reads_as_its_latest_and_is_guarded() {
    let config = config("ab_goseq", 600);
    let backend = AmqpBackend::connect(&config).await.expect("RabbitMQ");
    let exchange = config.amqp.exchange.clone();
    let (_conn, channel) = raw_channel().await;
    channel.confirm_select(Default::default()).await.unwrap();
    let uuid = task_uuid();
    go_declare(&channel, &exchange, &uuid, 600_000).await;
    let zero = "0001-01-01T00:00:00Z";
    let bodies = [
        format!(
            r#"{{"TaskUUID":"{uuid}","TaskName":"add","State":"PENDING","Results":null,"Error":"","CreatedAt":"2026-11-29T20:17:52.337696883Z","TTL":0}}"#
        ),
        format!(
            r#"{{"TaskUUID":"{uuid}","TaskName":"","State":"RECEIVED","Results":null,"Error":"","CreatedAt":"{zero}","TTL":0}}"#
        ),
        format!(
            r#"{{"TaskUUID":"{uuid}","TaskName":"","State":"STARTED","Results":null,"Error":"","CreatedAt":"{zero}","TTL":0}}"#
        ),
        "not a task state".to_owned(),
        format!(
            r#"{{"TaskUUID":"{uuid}","TaskName":"","State":"SUCCESS","Results":[{{"Type":"int64","Value":8}}],"Error":"","CreatedAt":"{zero}","TTL":0}}"#
        ),
    ];
    for body in &bodies {
        channel
            .basic_publish(
                exchange.as_str().into(),
                uuid.as_str().into(),
                Default::default(),
                body.as_bytes(),
                lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let state = backend.get_state(&uuid).await.unwrap().expect("a state");
    assert_eq!(state.state, State::Success);
    assert_eq!(state.task_name, "add", "carried forward from PENDING");
    assert!(!state.created_at.is_zero(), "carried forward from PENDING");
    // A read leaves every message in place, in order.
    let depth = common::queue_depth(&channel, &uuid).await;
    assert_eq!(depth, 5);
    // A redelivery's RECEIVED sees SUCCESS and writes nothing.
    let previous = backend
        .transition(TaskState::new(&uuid, State::Received))
        .await
        .unwrap();
    assert_eq!(previous.map(|p| p.state), Some(State::Success));
    assert_eq!(common::queue_depth(&channel, &uuid).await, 5);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guarded_transitions_and_revoke_hold_on_amqp() {
    let config = config("ab_guard", 600);
    let backend = AmqpBackend::connect(&config).await.expect("RabbitMQ");
    let uuid = task_uuid();
    assert_eq!(
        backend
            .transition(TaskState::new(&uuid, State::Received))
            .await
            .unwrap(),
        None
    );
    backend
        .set_state(TaskState::new(&uuid, State::Success))
        .await
        .unwrap();
    // A redelivery's RECEIVED does not move the task backwards, and sees SUCCESS.
    let previous = backend
        .transition(TaskState::new(&uuid, State::Received))
        .await
        .unwrap();
    assert_eq!(previous.map(|p| p.state), Some(State::Success));
    assert_eq!(
        backend.get_state(&uuid).await.unwrap().map(|s| s.state),
        Some(State::Success)
    );
    // Revoke: false for the finished task, true for an unknown one, which then stays revoked.
    let fresh = task_uuid();
    assert_eq!(
        backend
            .revoke(&[uuid.clone(), fresh.clone()])
            .await
            .unwrap(),
        [false, true]
    );
    backend
        .set_state(TaskState::new(&fresh, State::Success))
        .await
        .unwrap();
    let stored = backend.get_state(&fresh).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.error.as_str()),
        (State::Failure, "revoked")
    );

    // Concurrent transitions: exactly one RECEIVED sees no previous state.
    let racer = task_uuid();
    let backend = Arc::new(backend);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let backend = backend.clone();
            let racer = racer.clone();
            tokio::spawn(async move {
                backend
                    .transition(TaskState::new(&racer, State::Received))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut firsts = 0;
    for handle in handles {
        if handle.await.unwrap().is_none() {
            firsts += 1;
        }
    }
    assert_eq!(
        firsts, 1,
        "one transition saw no state, the others saw RECEIVED"
    );
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn results_expire_with_results_expire_in() {
    let config = config("ab_expire", 2);
    let backend = AmqpBackend::connect(&config).await.expect("RabbitMQ");
    let uuid = task_uuid();
    backend
        .set_state(TaskState::new(&uuid, State::Success))
        .await
        .unwrap();
    assert!(backend.get_state(&uuid).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        backend.get_state(&uuid).await.unwrap(),
        None,
        "the state expired"
    );
    // x-expires: the queue itself is deleted once unused for 2 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_conn, probe) = raw_channel().await;
        let exists = probe
            .queue_declare(
                uuid.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if !exists {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the state queue {uuid} never went away"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(backend.get_state(&uuid).await.unwrap(), None);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_final_write_is_not_acked_and_the_result_is_not_lost() {
    let mut config = config("ab_fault", 600);
    config.store_retry_timeout = Duration::from_millis(300);
    let backend = FaultyBackend::new(Arc::new(
        AmqpBackend::connect(&config).await.expect("RabbitMQ"),
    ));
    let broker = machinery::broker::amqp::AmqpBroker::connect(&config)
        .await
        .expect("RabbitMQ");
    let server = Server::from_parts(
        config.clone(),
        Arc::new(broker) as Arc<dyn Broker>,
        Some(Arc::new(backend.clone()) as Arc<dyn ResultBackend>),
    );
    // Every SUCCESS write fails until healed.
    backend.arm(
        BackendOp::Transition,
        Fault::always().on_state(State::Success),
    );
    let worker = server.worker().spawn().await.unwrap();
    let r = server.send(add::signature(vec![20, 22])).await.unwrap();
    let uuid = r.task_uuid().to_owned();
    let deadline = tokio::time::Instant::now() + WAIT;
    while backend.calls(BackendOp::Transition) < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no SUCCESS write tried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not recorded, so not done: the state is not final and the message was not acked as
    // done (it is held or back in the queue).
    let state = backend.get_state(&uuid).await.unwrap().map(|s| s.state);
    assert!(
        !matches!(state, Some(State::Success | State::Failure)),
        "{state:?}"
    );
    backend.heal(BackendOp::Transition);
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), 42);
    let stored: wire::TaskState = backend.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Success);
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

/// Not a check, a figure: tasks/s end to end (send 500, `get` each) with results in RabbitMQ
/// against results in Redis, on the same RabbitMQ broker, in the same run.
///
/// `cargo test -p machinery-tests --test amqp_backend --release -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run it with --ignored --nocapture"]
async fn drain_rate_against_redis_results() {
    const TASKS: i64 = 500;
    for backend in ["amqp", "redis"] {
        let mut config = config("ab_rate", 600);
        if backend == "redis" {
            config.result_backend = common::redis_url();
        }
        let server = Server::new(config.clone()).await.unwrap();
        let worker = server.worker().concurrency(16).spawn().await.unwrap();
        let started = std::time::Instant::now();
        let mut handles = Vec::new();
        for i in 0..TASKS {
            handles.push(server.send(add::signature(vec![i, 1])).await.unwrap());
        }
        for (i, handle) in (0..TASKS).zip(handles) {
            assert_eq!(handle.get_timeout(WAIT * 4).await.unwrap(), i + 1);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{backend} results: {TASKS} tasks in {secs:.2} s = {:.0} tasks/s",
            TASKS as f64 / secs
        );
        worker.shutdown().await.unwrap();
        cleanup(&config).await;
    }
}

/// Reads `n` states that do not exist, 8 at a time, each expected to be `None`.
async fn read_missing_states(backend: &AmqpBackend, n: usize) {
    use futures_util::StreamExt as _;
    let reads = futures_util::stream::iter(0..n)
        .map(|i| {
            let backend = backend.clone();
            async move { (i, backend.get_state(&task_uuid()).await) }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (i, read) in reads {
        assert!(matches!(read, Ok(None)), "read {i}: {read:?}");
    }
}

/// Writes SUCCESS for every task in `uuids`, all at once, then reads each back, all at once.
async fn write_then_read_at_once(backend: &AmqpBackend, uuids: &[String]) {
    let writes = uuids.iter().map(|uuid| {
        let backend = backend.clone();
        async move {
            backend
                .set_state(TaskState::new(uuid, State::Success))
                .await
        }
    });
    for (i, write) in futures_util::future::join_all(writes)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(write.is_ok(), "write {i}: {write:?}");
    }
    let reads = uuids.iter().map(|uuid| {
        let backend = backend.clone();
        async move { backend.get_state(uuid).await }
    });
    for (i, read) in futures_util::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(
            matches!(&read, Ok(Some(state)) if state.state == State::Success),
            "read {i}: {read:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_operations_at_once_than_a_connection_has_channels_all_succeed() {
    // Every operation opens a channel or two (the lock's and the work's), and a connection has
    // at most 2,047. Waiting on a group of a few thousand members reads them all at once: the
    // backend must queue the operations beyond what the connection can carry, not fail them.
    // Every state here exists, so the broker closes no channel and the connection is never
    // replaced: the turns alone keep it under the limit.
    let config = config("many_ops", 60);
    let backend = AmqpBackend::connect(&config).await.unwrap();
    let uuids: Vec<String> = (0..2_500).map(|_| task_uuid()).collect();
    write_then_read_at_once(&backend, &uuids).await;
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_thousands_of_states_that_do_not_exist_keeps_working() {
    // A read of a state that does not exist has the broker close its channel (`basic.get` of a
    // missing queue), and lapin never gives such a channel's number back: after 2,047 of them
    // the connection could open no channel, and every operation failed until the process
    // restarted. A few at a time, so that only the closed channels add up.
    let config = config("missing_reads", 60);
    let backend = AmqpBackend::connect(&config).await.unwrap();
    read_missing_states(&backend, 2_200).await;
    // And the backend still writes.
    let uuid = task_uuid();
    backend
        .set_state(TaskState::new(&uuid, State::Success))
        .await
        .unwrap();
    backend.purge_state(&uuid).await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_few_channels_a_connection_is_used_within_them() {
    // A broker may allow far fewer channels a connection than RabbitMQ's default 2,047 (its
    // `channel_max`; the client may ask for fewer, as here with `?channel_max=`). The backend
    // sizes its turns, its lock channels and its recycling by what the connection negotiated:
    // many operations at once wait their turn, and channels the broker closed are replaced
    // before the connection runs out, not after an operation failed for it.
    let mut config = config("few_channels", 60);
    let separator = if config.result_backend.contains('?') {
        '&'
    } else {
        '?'
    };
    config.result_backend = format!("{}{separator}channel_max=24", config.result_backend);
    let backend = AmqpBackend::connect(&config).await.unwrap();
    let uuids: Vec<String> = (0..300).map(|_| task_uuid()).collect();
    write_then_read_at_once(&backend, &uuids).await;
    // Each read of a missing state leaves a channel number behind (lapin 4.12).
    read_missing_states(&backend, 200).await;
    // With so few numbers they soon come round again, and lapin 4.12 fails the opening of a
    // channel given a number that a channel the broker closed left poisoned, with that
    // channel's error (`recycle.rs`): these openings meet some and must open another.
    for uuid in &uuids {
        backend.purge_state(uuid).await.unwrap();
    }
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_more_than_a_thousand_members_is_counted_once_each() {
    // Each member's final state goes to the group's queue (Go's markTaskCompleted) without
    // reading the queue first; only a redelivered member reads it, so that it is not counted
    // twice. Reading it on every finish bounded groups to 1,000 members, and cost N² reads.
    let config = config("ab_big", 600);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(32).spawn().await.unwrap();
    let n = 1_200;
    let group = Group::new((0..n).map(|i| add::signature(vec![i, 1])));
    let r = server.send_group(group).await.unwrap();
    let backend = AmqpBackend::connect(&config).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !backend
        .group_completed(r.group_uuid(), n as usize)
        .await
        .unwrap()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group queue never held {n} states"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let uuids: Vec<String> = r
        .members()
        .iter()
        .map(|m| m.task_uuid().to_owned())
        .collect();
    for state in backend.get_states(&uuids).await.unwrap() {
        assert_eq!(state.unwrap().state, State::Success);
    }
    // Reading 1,200 members at once (more reads than a connection has channels): waiting on
    // them while they ran would have polled each one, slowing the worker beside it.
    let results = r.get_timeout(Duration::from_secs(60)).await.unwrap();
    assert_eq!(results, (0..n).map(|i| i + 1).collect::<Vec<_>>());
    // A redelivered member marks again: it finds itself and adds nothing.
    let member = TaskState::new(r.members()[7].task_uuid(), State::Success);
    backend
        .mark_group_member(r.group_uuid(), n as usize, &member, true)
        .await
        .unwrap();
    // The check held the queue's messages for a moment (a reader counting then sees fewer):
    // once they are back, the count is the same.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !backend
        .group_completed(r.group_uuid(), n as usize)
        .await
        .unwrap()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "counted twice, or lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await.unwrap();
    backend.purge_group_meta(r.group_uuid()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_mark_whose_reply_is_lost_is_not_counted_twice() {
    // The mark lands but its reply is lost: the worker tries again, checking the group queue
    // first, so Go's count (GroupCompleted: the queue's message count) stays exact.
    let mut config = config("ab_marklost", 600);
    config.store_retry_timeout = Duration::from_secs(10);
    let backend = FaultyBackend::new(Arc::new(
        AmqpBackend::connect(&config).await.expect("RabbitMQ"),
    ));
    let broker = machinery::broker::amqp::AmqpBroker::connect(&config)
        .await
        .expect("RabbitMQ");
    let server = Server::from_parts(
        config.clone(),
        Arc::new(broker) as Arc<dyn Broker>,
        Some(Arc::new(backend.clone()) as Arc<dyn ResultBackend>),
    );
    backend.arm(BackendOp::MarkGroupMember, Fault::times(3).reply_lost());
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let group = Group::new([
        add::signature(vec![1, 1]),
        add::signature(vec![2, 2]),
        add::signature(vec![3, 3]),
    ]);
    let r = server.send_group(group).await.unwrap();
    assert_eq!(r.get_timeout(WAIT).await.unwrap(), [2, 4, 6]);
    let amqp = AmqpBackend::connect(&config).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !amqp.group_completed(r.group_uuid(), 3).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group queue never held exactly 3 states"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(backend.calls(BackendOp::MarkGroupMember) >= 6);
    worker.shutdown().await.unwrap();
    amqp.purge_group_meta(r.group_uuid()).await.unwrap();
    cleanup(&config).await;
}
