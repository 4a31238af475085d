//! The Redis broker (`BROKER=redis://...`) against the Redis on 127.0.0.1:6379, in Go
//! Machinery's layout (Go: v2/brokers/redis/redis.go): Go-format messages `RPUSH`ed and
//! `ZADD`ed by hand run; a worker killed with -9 loses nothing; ETA tasks run once each with
//! two workers; a message that kills its worker is dead-lettered after the delivery limit; the
//! fault-injection doubles show that a lost ack or a failing store loses nothing.
//!
//! Each test has its own queue and delayed-tasks key, and deletes them when it ends.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{redis_url, WorkerProcess, WAIT};
use machinery::backend::redis::RedisBackend;
use machinery::backend::ResultBackend;
use machinery::broker::redis::{RedisBroker, HEARTBEAT_TTL};
use machinery::broker::Broker;
use machinery::testing::{BackendOp, BrokerOp, Fault, FaultyBackend, FaultyBroker};
use machinery::wire::State;
use machinery::{Config, Server};

include!("../src/tasks.rs");

/// Runs of `rb_count` by id, with the time of each.
static RUNS: Mutex<Option<HashMap<String, Vec<chrono::DateTime<chrono::Utc>>>>> = Mutex::new(None);

#[machinery::task]
fn rb_count(tag: String, id: i64) -> i64 {
    RUNS.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(format!("{tag}/{id}"))
        .or_default()
        .push(chrono::Utc::now());
    id
}

fn runs(tag: &str) -> HashMap<i64, Vec<chrono::DateTime<chrono::Utc>>> {
    let prefix = format!("{tag}/");
    RUNS.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.parse().ok()?, v.clone())))
        .collect()
}

/// A queue, delayed-tasks key and Redis result backend of this test's own.
fn config(tag: &str) -> Config {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("rb_{tag}_{}", &id[..10]);
    let mut config = Config::builder()
        .broker(redis_url())
        .result_backend(redis_url())
        .default_queue(&queue)
        .requeue_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    config.redis.delayed_tasks_key = format!("{queue}.delayed");
    config.redis.delayed_tasks_poll_period = Duration::from_millis(100);
    config
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes the keys of the test's queue (its processing lists and heartbeats too).
async fn cleanup(config: &Config) {
    let mut conn = redis().await;
    let q = &config.default_queue;
    let consumers: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{q}.consumers"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut keys: Vec<String> = [
        "",
        ".consumers",
        ".deliveries",
        ".dead_letter",
        ".dead_letter.reasons",
        ".delayed",
    ]
    .iter()
    .map(|suffix| format!("{q}{suffix}"))
    .collect();
    for id in consumers {
        keys.push(format!("{q}.processing.{id}"));
        keys.push(format!("{q}.heartbeat.{id}"));
    }
    let _: i64 = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn broker(config: &Config) -> RedisBroker {
    RedisBroker::connect(config).await.unwrap()
}

async fn wait_depth_zero(broker: &RedisBroker, queue: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let depth = broker.depth(queue).await.unwrap();
        if depth == (0, 0) {
            return;
        }
        assert!(Instant::now() < deadline, "queue not drained: {depth:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A golden body Go's `json.Marshal` wrote (machinery/tests/golden), with its UUIDs made
/// unique and its routing key set to `queue`.
fn golden(file: &str, queue: &str, tag: &str) -> String {
    let path = format!(
        "{}/../machinery/tests/golden/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .replace("\"task_", &format!("\"{tag}_task_"))
        .replace(
            "\"RoutingKey\":\"machinery_task\"",
            &format!("\"RoutingKey\":\"{queue}\""),
        )
}

async fn final_state(server: &Server, uuid: &str) -> machinery::wire::TaskState {
    let deadline = tokio::time::Instant::now() + WAIT;
    server
        .backend()
        .unwrap()
        .wait_final(uuid, Some(deadline))
        .await
        .unwrap()
}

// ---- Go's format ----

#[tokio::test(flavor = "multi_thread")]
async fn go_format_messages_pushed_with_rpush_run() {
    // Go: Publish in v2/brokers/redis/redis.go is `RPUSH <routing key> <signature JSON>`.
    let config = config("gopush");
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(4).spawn().await.unwrap();
    let tag = &q[3..];
    let task = golden("task.json", &q, tag);
    let chain = golden("chain.json", &q, &format!("{tag}c"));
    let mut conn = redis().await;
    for body in [&task, &chain] {
        let _: i64 = redis::cmd("RPUSH")
            .arg(&q)
            .arg(body.as_str())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // task.json is add(1, 1).
    let state = final_state(&server, &format!("{tag}_task_1")).await;
    assert_eq!(state.state, State::Success, "{state:?}");
    assert_eq!(serde_json::to_value(&state.results).unwrap()[0]["Value"], 2);
    // chain.json is add(1, 1) -> add(5, 6) -> multiply(4): (1 + 1 + 5 + 6) * 4 = 52.
    let state = final_state(&server, &format!("{tag}c_task_3")).await;
    assert_eq!(state.state, State::Success, "{state:?}");
    assert_eq!(
        serde_json::to_value(&state.results).unwrap()[0]["Value"],
        52
    );
    let raw = broker(&config).await;
    wait_depth_zero(&raw, &q).await;
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn go_format_delayed_task_in_delayed_tasks_runs_on_time() {
    // Go: a future ETA is `ZADD delayed_tasks <ETA in Unix ns> <signature JSON>`; Go's own
    // key name here (other tests use keys of their own).
    let mut config = config("godelay");
    config.redis.delayed_tasks_key = String::new();
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let raw = broker(&config).await;
    assert_eq!(raw.delayed_tasks_key(), "delayed_tasks");
    let worker = server.worker().spawn().await.unwrap();
    let tag = &q[3..];
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let body = golden("task.json", &q, tag).replace(
        "\"ETA\":null,\"GroupUUID\":\"\",\"GroupTaskCount\":0,\"Args\":[{\"Name\":\"\",\"Type\":\"int64\",\"Value\":1}",
        &format!(
            "\"ETA\":\"{}\",\"GroupUUID\":\"\",\"GroupTaskCount\":0,\"Args\":[{{\"Name\":\"\",\"Type\":\"int64\",\"Value\":1}}",
            eta.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        ),
    );
    assert!(body.contains(&eta.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)));
    let mut conn = redis().await;
    let _: i64 = redis::cmd("ZADD")
        .arg("delayed_tasks")
        .arg(eta.timestamp_nanos_opt().unwrap())
        .arg(&body)
        .query_async(&mut conn)
        .await
        .unwrap();
    let uuid = format!("{tag}_task_1");
    let delayed = raw.delayed_tasks().await.unwrap();
    assert!(
        delayed.iter().any(|s| s.uuid == uuid),
        "GetDelayedTasks lists it"
    );
    let state = final_state(&server, &uuid).await;
    let done = chrono::Utc::now();
    assert_eq!(state.state, State::Success, "{state:?}");
    assert!(done >= eta, "ran before its ETA");
    assert!(
        done - eta < chrono::Duration::milliseconds(1500),
        "ran {:?} after its ETA",
        done - eta
    );
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_and_delayed_tasks_read_go_s_layout() {
    let config = config("inspect");
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let raw = broker(&config).await;
    let now = server.send(add::signature(vec![1, 2])).await.unwrap();
    let eta = chrono::Utc::now() + chrono::Duration::seconds(60);
    let later = server
        .send(add::signature(vec![3]).with_eta(eta))
        .await
        .unwrap();
    let pending = raw.pending_tasks(&q).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].uuid, now.task_uuid());
    assert_eq!(
        pending[0].routing_key, q,
        "Go's AdjustRoutingKey: the default queue"
    );
    assert_eq!(
        raw.pending_tasks("").await.unwrap().len(),
        1,
        "empty: the default queue"
    );
    let delayed = raw.delayed_tasks().await.unwrap();
    assert_eq!(delayed.len(), 1);
    assert_eq!(delayed[0].uuid, later.task_uuid());
    // Scored by the ETA in Unix nanoseconds.
    let mut conn = redis().await;
    let scores: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(raw.delayed_tasks_key())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    let off = (scores[0].1 - eta.timestamp_nanos_opt().unwrap() as f64).abs();
    assert!(off < 50e6, "score {} is {off} ns from the ETA", scores[0].1);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_and_delayed_tasks_read_in_pages() {
    let config = config("pages");
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let raw = broker(&config).await;
    let mut now = Vec::new();
    let mut later = Vec::new();
    for i in 0..7 {
        now.push(
            server
                .send(add::signature(vec![i]))
                .await
                .unwrap()
                .task_uuid()
                .to_owned(),
        );
        let eta = chrono::Utc::now() + chrono::Duration::seconds(60 + i);
        let sent = server
            .send(add::signature(vec![i]).with_eta(eta))
            .await
            .unwrap();
        later.push(sent.task_uuid().to_owned());
    }
    let uuids = |page: Vec<machinery::wire::Signature>| -> Vec<String> {
        page.into_iter().map(|s| s.uuid).collect()
    };
    // Head first, then the next page, a short last page, and nothing past the end.
    assert_eq!(
        uuids(raw.pending_tasks_range(&q, 0, 3).await.unwrap()),
        now[..3]
    );
    assert_eq!(
        uuids(raw.pending_tasks_range(&q, 3, 3).await.unwrap()),
        now[3..6]
    );
    assert_eq!(
        uuids(raw.pending_tasks_range("", 6, 3).await.unwrap()),
        now[6..]
    );
    assert!(raw.pending_tasks_range(&q, 7, 3).await.unwrap().is_empty());
    assert!(raw.pending_tasks_range(&q, 0, 0).await.unwrap().is_empty());
    assert!(raw
        .pending_tasks_range(&q, usize::MAX, 3)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        uuids(raw.pending_tasks_range(&q, 5, usize::MAX).await.unwrap()),
        now[5..]
    );
    // Earliest first.
    assert_eq!(
        uuids(raw.delayed_tasks_range(0, 4).await.unwrap()),
        later[..4]
    );
    assert_eq!(
        uuids(raw.delayed_tasks_range(4, 4).await.unwrap()),
        later[4..]
    );
    assert!(raw.delayed_tasks_range(7, 1).await.unwrap().is_empty());
    assert!(raw.delayed_tasks_range(1, 0).await.unwrap().is_empty());
    cleanup(&config).await;
}

// ---- reliability ----

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_consumer_s_messages_are_recovered_and_counted() {
    let config = config("recover");
    let q = config.default_queue.clone();
    let raw = broker(&config).await;
    raw.push_raw(&q, b"m1".to_vec()).await.unwrap();
    let mut a = raw.consume(&q, 1).await.unwrap();
    let first = a.next().await.unwrap().unwrap();
    assert_eq!(&first.body()[..], b"m1");
    assert_eq!(first.delivery_count(), Some(0));
    assert!(!first.redelivered());
    assert_eq!(
        raw.depth(&q).await.unwrap(),
        (0, 1),
        "in A's processing list"
    );
    // A dies holding it: nothing settles it, its heartbeat stops and expires.
    std::mem::forget(first);
    drop(a);
    let mut conn = redis().await;
    let consumers: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{q}.consumers"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let beats: Vec<String> = consumers
        .iter()
        .map(|id| format!("{q}.heartbeat.{id}"))
        .collect();
    assert_eq!(beats.len(), 1);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&beats[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= HEARTBEAT_TTL.as_millis() as i64, "{ttl}");
    let _: i64 = redis::cmd("DEL")
        .arg(&beats[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    // B's first heartbeat recovers A's list: the message comes again, counted.
    let mut b = raw.consume(&q, 1).await.unwrap();
    let again = tokio::time::timeout(WAIT, b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&again.body()[..], b"m1");
    assert_eq!(again.delivery_count(), Some(1));
    assert!(again.redelivered());
    again.ack().await.unwrap();
    assert_eq!(raw.depth(&q).await.unwrap(), (0, 0));
    let counts: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{q}.deliveries"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        counts.is_empty(),
        "the count is forgotten with the ack: {counts:?}"
    );
    b.cancel().await.unwrap();
    b.close().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_5000_tasks_then_restart_loses_nothing() {
    const TASKS: i64 = 5_000;
    let config = config("kill9");
    let producer = Server::new(config.clone()).await.unwrap();
    let env = [
        (
            "REDIS_DELAYED_TASKS_KEY",
            config.redis.delayed_tasks_key.as_str(),
        ),
        ("WORKER_CONCURRENCY", "32"),
    ];
    let mut worker = WorkerProcess::start(&config, &env);
    let mut handles = Vec::new();
    for start in (0..TASKS).step_by(100) {
        handles.extend(
            producer
                .send_all((start..start + 100).map(|i| long_task::signature(i, 2)))
                .await
                .unwrap(),
        );
    }
    // Kill it mid-run, holding messages. A kill once found it holding none (950 done, 0
    // held; cause not found: its 32 sleeps of 2 ms begin and end in bursts, so its processing
    // list may be empty for a moment between a burst's acks and the next take, and runs here
    // have found it holding 3). So it is frozen first (SIGSTOP) and what it holds is read: it
    // is killed holding some, else it goes on and is caught again; a worker that holds none
    // for a minute fails the test, with its log.
    let raw = broker(&config).await;
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut missed = 0;
    let (done_before, held) = loop {
        let done = count_success(&producer, &handles).await;
        assert!(
            done < TASKS as usize,
            "every task ended before the worker was caught holding one"
        );
        if done >= 500 {
            worker.signal("STOP");
            // A take or an ack it sent just before may still be on its way to Redis (on a
            // connection of its own): the list is read twice, 50 ms apart.
            let (_, first) = raw.depth(&config.default_queue).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (_, held) = raw.depth(&config.default_queue).await.unwrap();
            if held > 0 && held == first {
                break (count_success(&producer, &handles).await, held);
            }
            worker.signal("CONT");
            missed += 1;
            if Instant::now() >= give_up {
                panic!(
                    "the worker was not caught holding messages for 60 s while {} tasks waited; its log:\n{}",
                    TASKS as usize - done,
                    worker.drain_log().join("\n")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    worker.kill9();
    let (_, still) = raw.depth(&config.default_queue).await.unwrap();
    assert_eq!(still, held, "a frozen worker's list stays as it was");
    let _worker = WorkerProcess::start(&config, &env);
    let deadline = Instant::now() + Duration::from_secs(180);
    for (i, handle) in handles.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert_eq!(
            handle.get_timeout(left).await.unwrap(),
            i as i64,
            "task {i}"
        );
    }
    wait_depth_zero(&raw, &config.default_queue).await;
    assert!(raw
        .dead_letters(&config.default_queue)
        .await
        .unwrap()
        .is_empty());
    eprintln!(
        "kill -9 after {done_before} of {TASKS} done, {held} held by the dead worker \
         (caught holding none, or its list still moving, {missed} times first): 0 lost"
    );
    cleanup(&config).await;
}

async fn count_success(server: &Server, handles: &[machinery::AsyncResult<i64>]) -> usize {
    let uuids: Vec<String> = handles.iter().map(|h| h.task_uuid().to_owned()).collect();
    server
        .backend()
        .unwrap()
        .get_states(&uuids)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.as_ref().is_some_and(|s| s.state == State::Success))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn eta_tasks_run_on_time_once_each_with_two_workers() {
    const TASKS: i64 = 200;
    let config = config("eta2");
    let tag = config.default_queue.clone();
    let a = Server::new(config.clone()).await.unwrap();
    let b = Server::new(config.clone()).await.unwrap();
    let workers = [
        a.worker().concurrency(8).spawn().await.unwrap(),
        b.worker().concurrency(8).spawn().await.unwrap(),
    ];
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(2000);
    let handles = a
        .send_all((0..TASKS).map(|i| rb_count::signature(tag.clone(), i).with_eta(eta)))
        .await
        .unwrap();
    for h in &handles {
        h.get_timeout(WAIT).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = runs(&tag);
    assert_eq!(runs.len(), TASKS as usize);
    let mut latest = chrono::Duration::zero();
    for (id, times) in &runs {
        assert_eq!(times.len(), 1, "task {id} ran {} times", times.len());
        assert!(times[0] >= eta, "task {id} ran before its ETA");
        latest = latest.max(times[0] - eta);
    }
    assert!(
        latest < chrono::Duration::milliseconds(1500),
        "the last ran {latest:?} after the ETA"
    );
    let raw = broker(&config).await;
    assert!(raw.delayed_tasks().await.unwrap().is_empty());
    for w in workers {
        w.shutdown().await.unwrap();
    }
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_kills_its_worker_is_dead_lettered_after_the_limit() {
    // MAX_DELIVERIES 2: two workers die running it; the third delivery is past the limit.
    let config = config("poison");
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let env = [
        (
            "REDIS_DELAYED_TASKS_KEY",
            config.redis.delayed_tasks_key.as_str(),
        ),
        ("MAX_DELIVERIES", "2"),
    ];
    let poison = server.send(kill_worker::signature()).await.unwrap();
    let mut deaths = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    let state = loop {
        assert!(
            Instant::now() < deadline,
            "not dead-lettered after {deaths} deaths"
        );
        let mut worker = WorkerProcess::start(&config, &env);
        // It runs until the poison message kills it, or for good once it is dead-lettered.
        let until = Instant::now() + HEARTBEAT_TTL + Duration::from_secs(5);
        while Instant::now() < until && worker.child.try_wait().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state = poison.state().await.unwrap().unwrap();
        if state.state.is_final() {
            break state;
        }
        if worker.child.try_wait().unwrap().is_some() {
            deaths += 1;
        }
    };
    assert_eq!(deaths, 2, "dead-lettered after the limit, not before");
    assert_eq!(state.state, State::Failure);
    assert!(state.error.contains("delivered 2 times"), "{}", state.error);
    let raw = broker(&config).await;
    let dead = raw.dead_letters(&q).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        String::from_utf8_lossy(&dead[0].0).contains(poison.task_uuid()),
        "the body, unchanged"
    );
    assert!(
        dead[0].1.contains("delivered 2 times"),
        "reason: {}",
        dead[0].1
    );
    // The worker that took it last runs on.
    let _worker = WorkerProcess::start(&config, &env);
    let good = server.send(add::signature(vec![20, 22])).await.unwrap();
    assert_eq!(good.get_timeout(WAIT).await.unwrap(), 42);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bodies_are_dead_lettered_with_their_reason() {
    let config = config("garbage");
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let raw = broker(&config).await;
    raw.push_raw(&q, b"not json".to_vec()).await.unwrap();
    raw.push_raw(&q, vec![b' '; config.max_message_size + 1])
        .await
        .unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let deadline = Instant::now() + WAIT;
    let dead = loop {
        let dead = raw.dead_letters(&q).await.unwrap();
        if dead.len() == 2 {
            break dead;
        }
        assert!(Instant::now() < deadline, "{} dead letters", dead.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("larger than max_message_size")),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|r| !r.is_empty()), "{reasons:?}");
    // Each message with its own reason, read here apart from the broker: the list, and the
    // hash by the SHA-1 Redis computes.
    let mut conn = redis().await;
    let (list, hash) = (
        RedisBroker::dead_letter_list(&q),
        RedisBroker::dead_letter_reasons(&q),
    );
    let read_apart = |mut conn: redis::aio::MultiplexedConnection| {
        let (list, hash) = (list.clone(), hash.clone());
        async move {
            let bodies: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&list)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut read = Vec::new();
            for body in bodies {
                let sha: String = redis::cmd("EVAL")
                    .arg("return redis.sha1hex(ARGV[1])")
                    .arg(0)
                    .arg(&body)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let reason: Option<String> = redis::cmd("HGET")
                    .arg(&hash)
                    .arg(sha)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                read.push((body, reason.unwrap_or_default()));
            }
            read
        }
    };
    assert_eq!(owned(dead.clone()), read_apart(conn.clone()).await);
    // In pages: a count of 0 and past the end empty.
    let pages = [
        raw.dead_letters_range(&q, 0, 1).await.unwrap(),
        raw.dead_letters_range(&q, 1, 5).await.unwrap(),
    ];
    assert_eq!(pages.concat(), dead);
    assert_eq!(pages[0].len(), 1);
    for (start, count) in [(0, 0), (2, 1), (usize::MAX, 1)] {
        assert!(
            raw.dead_letters_range(&q, start, count)
                .await
                .unwrap()
                .is_empty(),
            "{start} {count}"
        );
    }
    wait_depth_zero(&raw, &q).await;
    // The dead-letter list's length, as the metrics read it.
    assert_eq!(raw.dead_letter_depth(&q).await.unwrap(), Some(2));
    // The same body twice: both with its one reason.
    let _: () = redis::cmd("RPUSH")
        .arg(&list)
        .arg(b"not json".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    let again = raw.dead_letters(&q).await.unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(owned(again.clone()), read_apart(conn.clone()).await);
    let first = again.iter().find(|(b, _)| &b[..] == b"not json").unwrap();
    assert_eq!(again[2], *first);
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

/// Dead letters as plain bytes, to compare with what a test reads itself.
fn owned(dead: Vec<(bytes::Bytes, String)>) -> Vec<(Vec<u8>, String)> {
    dead.into_iter().map(|(b, r)| (b.to_vec(), r)).collect()
}

/// A dead-letter list longer than one read of reasons (1,000 to a command): every message keeps
/// its own reason, whole and in a page across the seam.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_dead_letter_list_keeps_each_reason() {
    let config = config("deadlong");
    let q = config.default_queue.clone();
    let raw = broker(&config).await;
    let mut conn = redis().await;
    let n = 2_500;
    // The bodies and their reasons, keyed by the SHA-1 Redis computes.
    let _: () = redis::cmd("EVAL")
        .arg(
            "for i = 1, tonumber(ARGV[1]) do local b = 'm' .. i \
             redis.call('RPUSH', KEYS[1], b) \
             redis.call('HSET', KEYS[2], redis.sha1hex(b), 'reason ' .. i) end",
        )
        .arg(2)
        .arg(RedisBroker::dead_letter_list(&q))
        .arg(RedisBroker::dead_letter_reasons(&q))
        .arg(n)
        .query_async(&mut conn)
        .await
        .unwrap();
    let expected = |i: usize| (format!("m{i}").into_bytes(), format!("reason {i}"));
    let whole = owned(raw.dead_letters(&q).await.unwrap());
    assert_eq!(whole, (1..=n).map(expected).collect::<Vec<_>>());
    let page = owned(raw.dead_letters_range(&q, 995, 10).await.unwrap());
    assert_eq!(page, (996..=1005).map(expected).collect::<Vec<_>>());
    cleanup(&config).await;
}

// ---- fault injection ----

async fn faulty_server(config: &Config) -> (Server, Arc<FaultyBroker>, Arc<FaultyBackend>) {
    let broker = Arc::new(FaultyBroker::new(Arc::new(
        RedisBroker::connect(config).await.unwrap(),
    )));
    let backend = Arc::new(FaultyBackend::new(Arc::new(
        RedisBackend::connect(&config.result_backend, Duration::from_secs(600))
            .await
            .unwrap(),
    )));
    let server = Server::from_parts(
        config.clone(),
        broker.clone(),
        Some(backend.clone() as Arc<dyn ResultBackend>),
    );
    (server, broker, backend)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_ack_loses_nothing_and_runs_nothing_twice() {
    let config = config("lostack");
    let tag = config.default_queue.clone();
    let (server, faulty, _) = faulty_server(&config).await;
    faulty.arm(BrokerOp::Ack, Fault::once());
    let worker = server.worker().spawn().await.unwrap();
    let handle = server
        .send(rb_count::signature(tag.clone(), 7))
        .await
        .unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 7);
    // The ack never reached Redis: the delivery went back and came again, then was acked.
    let raw = broker(&config).await;
    wait_depth_zero(&raw, &tag).await;
    assert!(
        faulty.calls(BrokerOp::Ack) >= 2,
        "{}",
        faulty.calls(BrokerOp::Ack)
    );
    assert_eq!(runs(&tag)[&7].len(), 1, "ran once");
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_store_loses_nothing() {
    let config = config("store");
    let tag = config.default_queue.clone();
    let (server, _, backend) = faulty_server(&config).await;
    backend.arm(
        BackendOp::SetState,
        Fault::times(3).on_state(State::Success),
    );
    let worker = server.worker().spawn().await.unwrap();
    let handle = server
        .send(rb_count::signature(tag.clone(), 9))
        .await
        .unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 9);
    let raw = broker(&config).await;
    wait_depth_zero(&raw, &tag).await;
    assert!(raw.dead_letters(&tag).await.unwrap().is_empty());
    assert_eq!(runs(&tag)[&9].len(), 1, "ran once");
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_gives_back_messages_taken_but_not_handed_out() {
    // prefetch 64, concurrency 1: the consumer takes a batch; on shutdown the rest go back.
    let config = config("giveback");
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let handles = server
        .send_all((0..20).map(|i| long_task::signature(i, 50)))
        .await
        .unwrap();
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    // Until the first task runs (a fixed sleep is too short on a loaded machine).
    let deadline = Instant::now() + WAIT;
    loop {
        let mut started = false;
        for h in &handles {
            started |= h
                .state()
                .await
                .unwrap()
                .is_some_and(|s| s.state != State::Pending);
        }
        if started {
            break;
        }
        assert!(Instant::now() < deadline, "no task started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.shutdown().await.unwrap();
    let raw = broker(&config).await;
    let (ready, held) = raw.depth(&q).await.unwrap();
    assert_eq!(held, 0, "nothing left in a processing list");
    assert!(ready > 0 && ready < 20, "{ready} back in the queue");
    // Given back uncounted: a new worker runs them all.
    let worker = server.worker().spawn().await.unwrap();
    for h in &handles {
        h.get_timeout(WAIT).await.unwrap();
    }
    let counts: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{q}.deliveries"))
        .query_async(&mut redis().await)
        .await
        .unwrap();
    assert!(counts.is_empty(), "{counts:?}");
    worker.shutdown().await.unwrap();
    cleanup(&config).await;
}

/// The worker drops a waiting `next()` when a call wants its slot back (a rate limit that
/// waits): messages whose take was on the wire then are handed out by the next `next()`, not
/// stranded in the processing list until the worker stops.
#[tokio::test(flavor = "multi_thread")]
async fn a_take_cut_short_by_a_dropped_next_is_not_stranded() {
    use std::future::Future;
    let config = config("cut");
    let q = config.default_queue.clone();
    let raw = broker(&config).await;
    let mut consumer = raw.consume(&q, 4).await.unwrap();
    // A `next()` polled once, then dropped with its take on the wire. Under load the
    // connection's task can complete the take within that one poll; the message is then
    // handed out at once, and the setup is tried again with another.
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut cut = false;
    for _ in 0..20 {
        raw.push_raw(&q, b"m1".to_vec()).await.unwrap();
        let handed = {
            let mut next = Box::pin(consumer.next());
            match next.as_mut().poll(&mut cx) {
                std::task::Poll::Pending => None,
                std::task::Poll::Ready(delivery) => Some(delivery),
            }
        };
        match handed {
            None => {
                cut = true;
                break;
            }
            Some(delivery) => delivery.unwrap().unwrap().ack().await.unwrap(),
        }
    }
    assert!(cut, "the take is on the wire");
    // The take ran: the message is in this consumer's processing list.
    let deadline = Instant::now() + WAIT;
    while raw.depth(&q).await.unwrap() != (0, 1) {
        assert!(Instant::now() < deadline, "the take never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("the taken message is handed out")
        .unwrap()
        .unwrap();
    assert_eq!(&delivery.body()[..], b"m1");
    assert_eq!(delivery.delivery_count(), Some(0));
    delivery.ack().await.unwrap();
    assert_eq!(raw.depth(&q).await.unwrap(), (0, 0));
    consumer.cancel().await.unwrap();
    consumer.close().await.unwrap();
    cleanup(&config).await;
}

/// The broker's `reconnects` (the metric `broker_reconnects`) counts the times its connection
/// was lost and made again. The test's own Redis database, whose clients it kills (not the
/// killer's own).
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_is_counted_as_a_reconnect() {
    // A database no other test uses (the CLI tests use 11, the metrics tests 15).
    const DB: u8 = 7;
    let url = common::redis_db(DB);
    let mut config = config("reconnect");
    config.broker = url.clone();
    config.result_backend = url.clone();
    let tag = config.default_queue.clone();
    let broker = Arc::new(RedisBroker::connect(&config).await.unwrap());
    let backend = RedisBackend::connect(&url, Duration::from_secs(600))
        .await
        .unwrap();
    let server = Server::from_parts(
        config.clone(),
        broker.clone(),
        Some(Arc::new(backend) as Arc<dyn ResultBackend>),
    );
    let worker = server.worker().spawn().await.unwrap();
    let first = server
        .send(rb_count::signature(tag.clone(), 1))
        .await
        .unwrap();
    assert_eq!(first.get_timeout(WAIT).await.unwrap(), 1);
    assert_eq!(broker.reconnects(), 0, "no reconnect yet");

    // Every client of the database is dropped by the server (the broker's and the store's).
    let mut admin = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    let own: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut admin)
        .await
        .unwrap();
    let ids: Vec<&str> = clients
        .lines()
        .filter(|l| l.split(' ').any(|f| f == format!("db={DB}")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .filter(|id| *id != own.to_string())
        .collect();
    assert!(!ids.is_empty(), "{clients}");
    for id in &ids {
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut admin)
            .await
            .unwrap();
    }

    // The worker keeps going once the connections are made again.
    let deadline = Instant::now() + WAIT;
    let second = loop {
        match server.send(rb_count::signature(tag.clone(), 2)).await {
            Ok(handle) => break handle,
            Err(e) if Instant::now() < deadline => {
                eprintln!("send after the kill: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(second.get_timeout(WAIT).await.unwrap(), 2);
    assert!(broker.reconnects() >= 1, "{}", broker.reconnects());
    worker.shutdown().await.unwrap();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
}
