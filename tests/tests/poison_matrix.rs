//! The poison matrix on RabbitMQ and Redis: every hostile message of issue 6's table, sent in
//! Go's JSON with a plain AMQP client between good tasks. The worker stays up and does not
//! reconnect; each poison message ends, within a bounded time, in the dead-letter queue or as
//! FAILURE with a reason (or, for a far ETA, waits in a delay queue without looping); its state
//! is written a bounded number of times; every good task runs exactly once (executions are
//! counted, not inferred).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cleanup, publish_raw, queue_depth, raw_channel, unique_config};
use machinery::backend::redis::RedisBackend;
use machinery::backend::ResultBackend;
use machinery::broker::amqp::AmqpBroker;
use machinery::broker::Broker;
use machinery::testing::FaultyBackend;
use machinery::wire::{self, State};
use machinery::{task, Server, TaskError};
use serde_json::{json, Value};

static GOOD: Mutex<Option<HashMap<i64, usize>>> = Mutex::new(None);
static HEAD_RUNS: AtomicUsize = AtomicUsize::new(0);
static FAIL_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
fn pm_good(id: i64) -> i64 {
    let mut good = GOOD.lock().unwrap();
    *good.get_or_insert_with(HashMap::new).entry(id).or_default() += 1;
    id
}

#[task]
fn pm_head(id: i64) -> i64 {
    HEAD_RUNS.fetch_add(1, Ordering::SeqCst);
    id
}

#[task]
fn pm_big(n: i64) -> String {
    HEAD_RUNS.fetch_add(1, Ordering::SeqCst);
    "z".repeat(usize::try_from(n).unwrap())
}

#[task]
fn pm_fail() -> Result<i64, TaskError> {
    FAIL_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::new("no"))
}

#[task]
fn pm_link(#[variadic] xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

fn sig(name: &str, args: Value) -> Value {
    json!({
        "UUID": wire::Signature::new(name).uuid, "Name": name, "RoutingKey": "", "ETA": null,
        "GroupUUID": "", "GroupTaskCount": 0, "Args": args, "Headers": {}, "Priority": 0,
        "Immutable": false, "RetryCount": 0, "RetryTimeout": 0, "OnSuccess": null,
        "OnError": null, "ChordCallback": null, "BrokerMessageGroupId": "",
        "SQSReceiptHandle": "", "StopTaskDeletionOnError": false,
        "IgnoreWhenTaskNotRegistered": false
    })
}

fn int(v: i64) -> Value {
    json!([{"Name": "", "Type": "int64", "Value": v}])
}

/// A Go-style chain of `n` links of `pm_link`, nested in OnSuccess.
fn chain(n: usize) -> Value {
    let mut tail: Option<Value> = None;
    for _ in 0..n {
        let mut link = sig("pm_link", int(1));
        if let Some(next) = tail.take() {
            link["OnSuccess"] = json!([next]);
        }
        tail = Some(link);
    }
    tail.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_end_bounded_and_good_tasks_run_once() {
    let config = unique_config("poison");
    let exchange = config.amqp.exchange.clone();
    let key = config.amqp.binding_key.clone();
    let queue = config.default_queue.clone();
    let broker = Arc::new(AmqpBroker::connect(&config).await.unwrap());
    let redis = RedisBackend::connect(&config.result_backend, Duration::from_secs(600))
        .await
        .unwrap();
    let counted = FaultyBackend::new(Arc::new(redis));
    let server = Server::from_parts(
        config.clone(),
        broker.clone() as Arc<dyn Broker>,
        Some(Arc::new(counted.clone()) as Arc<dyn ResultBackend>),
    );
    let worker = server
        .worker()
        .tasks([
            pm_good::NAME,
            pm_head::NAME,
            pm_big::NAME,
            pm_fail::NAME,
            pm_link::NAME,
        ])
        .spawn()
        .await
        .unwrap();
    let reconnects = broker.reconnects();

    let mut poison: Vec<(&str, Value)> = Vec::new();
    // 1. A chain link with a 300-byte routing key; a header key over 255 bytes with an ETA.
    let mut head = sig("pm_head", int(1));
    let mut link = sig("pm_link", Value::Null);
    link["RoutingKey"] = json!("r".repeat(300));
    head["OnSuccess"] = json!([link]);
    poison.push(("long routing key", head));
    let mut early = sig("pm_head", int(2));
    early["Headers"] = json!({ "h".repeat(300): 1 });
    early["ETA"] = json!((chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339());
    poison.push(("long header key with ETA", early));
    // 2. An ETA RabbitMQ cannot hold in one delay queue.
    let mut far = sig("pm_head", int(3));
    far["ETA"] = json!("9999-12-31T23:59:59Z");
    poison.push(("far ETA", far));
    // 3. Follow-ups that can never be sent; a chord member whose group is itself.
    let mut unbound = sig("pm_head", int(4));
    let mut to_nowhere = sig("pm_link", Value::Null);
    to_nowhere["RoutingKey"] = json!("nobody_binds_this_key");
    unbound["OnSuccess"] = json!([to_nowhere]);
    poison.push(("unroutable follow-up", unbound));
    let mut big = sig("pm_big", int(5 * 1024 * 1024));
    big["OnSuccess"] = json!([sig("pm_link", Value::Null)]);
    poison.push(("oversized follow-up", big));
    let mut own_group = sig("pm_head", int(6));
    own_group["GroupUUID"] = own_group["UUID"].clone();
    own_group["GroupTaskCount"] = json!(1);
    own_group["ChordCallback"] = sig("pm_link", Value::Null);
    poison.push(("chord member of its own group", own_group));
    // 10. A RetryTimeout at the edge of int64.
    let mut retry = sig("pm_fail", Value::Null);
    retry["RetryCount"] = json!(1);
    retry["RetryTimeout"] = json!(i64::MAX);
    poison.push(("huge RetryTimeout", retry));
    // 11. Times Go rejects.
    let mut offset = sig("pm_head", int(7));
    offset["ETA"] = json!("9999-12-31T23:59:59-23:59");
    poison.push(("year 10000 after the offset", offset));
    let mut leap = sig("pm_head", int(8));
    leap["ETA"] = json!("2016-12-31T23:59:60Z");
    poison.push(("leap second", leap));

    let (_conn, channel) = raw_channel().await;
    let publish = |body: Vec<u8>| {
        let (channel, exchange, key) = (channel.clone(), exchange.clone(), key.clone());
        async move { publish_raw(&channel, &exchange, &key, &body).await }
    };
    let mut good_id = 0i64;
    let mut send_good = |n: usize| {
        let bodies: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                good_id += 1;
                serde_json::to_vec(&sig("pm_good", int(good_id))).unwrap()
            })
            .collect();
        bodies
    };
    let mut poison_uuids = Vec::new();
    for (what, message) in &poison {
        for body in send_good(3) {
            publish(body).await;
        }
        poison_uuids.push((*what, message["UUID"].as_str().unwrap().to_owned()));
        publish(serde_json::to_vec(message).unwrap()).await;
    }
    // 4. Unregistered tasks, more than the prefetch, then good ones.
    for _ in 0..80 {
        publish(serde_json::to_vec(&sig("pm_nobody_has_this", Value::Null)).unwrap()).await;
    }
    for body in send_good(10) {
        publish(body).await;
    }
    // 6. Go-style chains of 64 and 200 links.
    let long_chains = [chain(64), chain(200)];
    for c in &long_chains {
        publish(serde_json::to_vec(c).unwrap()).await;
    }
    let total_good = usize::try_from(good_id).unwrap();

    // Every good task runs, exactly once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = GOOD.lock().unwrap().as_ref().map_or(0, HashMap::len);
        if done == total_good {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {total_good} good tasks ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each poison message ends bounded: FAILURE with a reason, or dead-lettered.
    let backend = server.backend().unwrap().clone();
    let dlq = AmqpBroker::dead_letter_queue(&queue);
    for (what, uuid) in &poison_uuids {
        if matches!(*what, "year 10000 after the offset" | "leap second") {
            // Not a signature Go would accept: dead-lettered undecoded (counted below).
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            let state = backend.get_state(uuid).await.unwrap();
            match state {
                Some(s) if s.state == State::Failure => break format!("FAILURE: {}", s.error),
                // Its chord is ignored (it is no member of the group it names); it ran once.
                Some(s) if *what == "chord member of its own group" && s.state.is_final() => {
                    break format!("{}: chord ignored", s.state)
                }
                _ if *what == "far ETA" => {
                    // Nothing recorded it (it was published raw); it waits one clamped hop.
                    let hop = AmqpBroker::delay_queue(2_147_483_647, &exchange, &key);
                    if queue_depth(&channel, &hop).await >= 1 {
                        break format!("held in `{hop}`");
                    }
                    assert!(Instant::now() < deadline, "{what}: not in a delay queue");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // RETRY (saying the wait was clamped), then the retry's fresh PENDING, as Go
                // records a retry; the retry waits a week in a delay queue.
                Some(s)
                    if *what == "huge RetryTimeout"
                        && matches!(s.state, State::Retry | State::Pending)
                        && counted.writes(uuid, State::Retry) == 1 =>
                {
                    break format!("{} after one RETRY", s.state)
                }
                _ if Instant::now() > deadline => panic!("{what}: no bounded end ({state:?})"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        eprintln!("{what}: {outcome}");
        for state in [
            State::Received,
            State::Started,
            State::Success,
            State::Failure,
        ] {
            let writes = counted.writes(uuid, state);
            assert!(writes <= 2, "{what}: {state} written {writes} times");
        }
    }
    // The chains ran to their end.
    for c in &long_chains {
        let mut last = c.clone();
        while let Some(next) = last["OnSuccess"].get(0).cloned() {
            last = next;
        }
        let uuid = last["UUID"].as_str().unwrap();
        let state = backend
            .wait_final(
                uuid,
                Some(tokio::time::Instant::now() + Duration::from_secs(60)),
            )
            .await
            .unwrap();
        assert_eq!(state.state, State::Success);
    }
    // The unregistered ones end in the dead-letter queue, the time-rejected ones too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue_depth(&channel, &dlq).await < 80 + 3 {
        assert!(
            Instant::now() < deadline,
            "dead letters: {}",
            queue_depth(&channel, &dlq).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        HEAD_RUNS.load(Ordering::SeqCst),
        4,
        "a poison task body ran again"
    );
    assert_eq!(FAIL_RUNS.load(Ordering::SeqCst), 1);
    assert!(GOOD
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .values()
        .all(|n| *n == 1));
    assert_eq!(broker.reconnects(), reconnects, "the worker reconnected");
    assert!(!worker.is_finished());
    worker.shutdown().await.unwrap();
    // The far ETA and the clamped retry wait in delay queues that live for weeks.
    for ms in [2_147_483_647, 604_799_999, 604_800_000] {
        let queue = AmqpBroker::delay_queue(ms, &exchange, &key);
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    cleanup(&config).await;
}
