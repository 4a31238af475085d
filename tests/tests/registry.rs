//! The worker registry, the recent-task index and the throughput counters in Redis (issue 9
//! item 3), read back through `machinery::admin::Admin`.
//!
//! Redis DB 11 holds the registries of the workers here (each test finds its own worker by
//! name or queue); DB 12 is used by the tests that count the whole index, one at a time.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{redis_db, unique_config, WorkerProcess, WAIT};
use machinery::admin::{Admin, Link, NodeKind, Page};
use machinery::wire::State;
use machinery::{task, Config, Group, Server, TaskError};

#[task]
fn reg_add(a: i64, b: i64) -> i64 {
    a + b
}

#[task]
fn reg_double(#[chained] x: i64) -> i64 {
    2 * x
}

#[task]
fn reg_fail() -> Result<i64, TaskError> {
    Err(TaskError::new("registry test failure"))
}

#[task]
fn reg_sum(#[variadic] parts: Vec<i64>) -> i64 {
    parts.iter().sum()
}

async fn redis_conn(db: u8) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_db(db))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be running (tests/services.sh starts it)")
}

/// DB 12 is shared by the tests that count the whole index: one at a time.
static DB12: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn flush_db12() {
    let mut conn = redis_conn(12).await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
}

/// An in-process deployment: embedded broker and backend, the registry in Redis `db`.
fn embedded_config(tag: &str, db: u8) -> Config {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut config = Config::builder()
        .broker(format!("memory://registry-{tag}-{id}"))
        .build()
        .unwrap();
    config.registry.redis_url = Some(redis_db(db));
    config.registry.heartbeat = Duration::from_millis(200);
    config.registry.flush_every = Duration::from_millis(20);
    config
}

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_registers_its_fields_and_leaves_at_once_on_shutdown() {
    let mut config = unique_config("registry");
    config.result_backend = redis_db(11);
    config.registry.heartbeat = Duration::from_millis(200);
    let name = format!("reg-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server
        .worker()
        .name(name.clone())
        .concurrency(3)
        .spawn()
        .await
        .unwrap();
    let admin = Admin::from_config(&config).await.unwrap();

    for i in 0..5 {
        assert_eq!(
            server
                .send(reg_add::signature(i, 1))
                .await
                .unwrap()
                .get_timeout(WAIT)
                .await
                .unwrap(),
            i + 1
        );
    }
    assert!(server
        .send(reg_fail::signature())
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .is_err());

    let me = wait_for("the worker's counts", async || {
        admin
            .workers()
            .await
            .unwrap()
            .into_iter()
            .find(|w| w.name == name && w.processed == 6)
    })
    .await;
    assert_eq!(me.failed, 1);
    assert_eq!(me.in_flight, 0);
    assert_eq!(me.pid, std::process::id());
    assert_eq!(me.queues, [config.default_queue.clone()]);
    assert_eq!(me.concurrency, 3);
    assert_eq!(me.version, env!("CARGO_PKG_VERSION"));
    assert!(!me.host.is_empty());
    assert_eq!(me.heartbeat_ms, 200);
    assert!(me.started_at_ms <= me.heartbeat_at_ms);
    assert_eq!(me.id, format!("{name}@{}/{}", me.host, me.pid));

    // The queue shows the worker's consumer.
    let queue = admin.queue(&config.default_queue).await.unwrap();
    assert!(queue.exists);
    assert_eq!(queue.consumers, 1);
    // Throughput counted the six runs, one failed.
    let buckets = admin.throughput(Duration::from_secs(900)).await.unwrap();
    assert_eq!(buckets.len(), 90);
    assert!(buckets.iter().map(|b| b.processed).sum::<u64>() >= 6);
    assert!(buckets.iter().map(|b| b.failed).sum::<u64>() >= 1);

    worker.shutdown().await.unwrap();
    let workers = admin.workers().await.unwrap();
    assert!(
        workers.iter().all(|w| w.name != name),
        "a graceful shutdown removes the record at once"
    );
    common::cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_disappears_when_its_record_expires() {
    let mut config = unique_config("registry-kill");
    config.result_backend = redis_db(11);
    let mut process = WorkerProcess::start(&config, &[("REGISTRY_HEARTBEAT_MS", "300")]);
    let admin = Admin::from_config(&config).await.unwrap();
    let queue = config.default_queue.clone();
    let pid = process.child.id();
    let listed = wait_for("the worker process in the registry", async || {
        admin
            .workers()
            .await
            .unwrap()
            .into_iter()
            .find(|w| w.pid == pid && w.queues.contains(&queue))
    })
    .await;
    assert_eq!(listed.heartbeat_ms, 300);

    process.kill9();
    let killed = Instant::now();
    wait_for("the killed worker to expire", async || {
        let workers = admin.workers().await.unwrap();
        (!workers
            .iter()
            .any(|w| w.pid == pid && w.queues.contains(&queue)))
        .then_some(())
    })
    .await;
    // The record lives three heartbeats (0.9 s) after the last one.
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "expired after {:?}",
        killed.elapsed()
    );
    common::cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_recent_index_stays_capped_by_count_and_age() {
    let _db = DB12.lock().await;
    flush_db12().await;
    let mut config = embedded_config("cap", 12);
    config.registry.recent_max = 1000;
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(64).spawn().await.unwrap();
    let admin = Admin::from_config(&config).await.unwrap();

    const TASKS: i64 = 10_500;
    let mut handles = Vec::new();
    for chunk in (0..TASKS).collect::<Vec<_>>().chunks(500) {
        let sigs: Vec<_> = chunk.iter().map(|i| reg_add::signature(*i, 0)).collect();
        handles.extend(server.send_all(sigs).await.unwrap());
    }
    for handle in handles {
        handle.get_timeout(WAIT).await.unwrap();
    }
    worker.shutdown().await.unwrap();

    let success = admin.recent(State::Success, Page::first(10)).await.unwrap();
    assert_eq!(success.total, Some(1000), "capped at RECENT_MAX");
    let started = admin.recent(State::Started, Page::first(10)).await.unwrap();
    assert_eq!(started.total, Some(1000));
    let buckets = admin.throughput(Duration::from_secs(900)).await.unwrap();
    assert_eq!(
        buckets.iter().map(|b| b.processed).sum::<u64>(),
        u64::try_from(TASKS).unwrap(),
        "every run is counted, coalesced per bucket"
    );

    // By age: entries older than RECENT_MAX_AGE_S go with the next write.
    config.registry.recent_max_age = Duration::from_secs(1);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server
        .send(reg_add::signature(1, 1))
        .await
        .unwrap()
        .get_timeout(WAIT)
        .await
        .unwrap();
    worker.shutdown().await.unwrap();
    let success = admin.recent(State::Success, Page::first(10)).await.unwrap();
    assert_eq!(
        success.total,
        Some(1),
        "only the task of the last second is left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn recent_tasks_are_paginated_newest_first() {
    let _db = DB12.lock().await;
    flush_db12().await;
    let config = embedded_config("pages", 12);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().concurrency(1).spawn().await.unwrap();
    let admin = Admin::from_config(&config).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..25 {
        let handle = server.send(reg_add::signature(i, 0)).await.unwrap();
        handle.get_timeout(WAIT).await.unwrap();
        sent.push(handle.task_uuid().to_owned());
    }
    worker.shutdown().await.unwrap();

    let mut page = Page::first(10);
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let listed = admin.recent(State::Success, page).await.unwrap();
        assert_eq!(listed.total, Some(25));
        sizes.push(listed.items.len());
        for task in &listed.items {
            let state = task.state.as_ref().expect("the stored state comes along");
            assert_eq!(state.state, State::Success);
            assert_eq!(state.task_name, "reg_add");
        }
        seen.extend(listed.items.into_iter().map(|t| (t.uuid, t.at_ms)));
        match listed.next {
            Some(next) => page = next,
            None => break,
        }
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert!(seen.windows(2).all(|w| w[0].1 >= w[1].1), "newest first");
    let uuids: Vec<String> = seen.into_iter().map(|(u, _)| u).collect();
    let mut newest_first = sent.clone();
    newest_first.reverse();
    let mut sorted_seen = uuids.clone();
    sorted_seen.sort();
    let mut sorted_sent = sent;
    sorted_sent.sort();
    assert_eq!(sorted_seen, sorted_sent, "every task once");
    assert_eq!(uuids.first(), newest_first.first(), "the last task first");

    // The timeline of one task: STARTED, then SUCCESS.
    let info = admin.task(&uuids[0]).await.unwrap();
    let states: Vec<State> = info.timeline.iter().map(|(s, _)| *s).collect();
    assert_eq!(states, [State::Started, State::Success]);
}

/// A TCP server that accepts connections and never answers: a Redis that hangs.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("redis://{addr}/0"), task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_neither_fails_nor_slows_tasks() {
    let (hanging, hole) = black_hole().await;
    for (what, url) in [
        ("refused", "redis://127.0.0.1:1/0".to_owned()),
        ("hanging", hanging),
    ] {
        let mut config = embedded_config(what, 11);
        config.registry.redis_url = Some(url);
        let server = Server::new(config).await.unwrap();
        let worker = server.worker().concurrency(8).spawn().await.unwrap();
        let started = Instant::now();
        let sigs: Vec<_> = (0..300).map(|i| reg_add::signature(i, 1)).collect();
        let handles = server.send_all(sigs).await.unwrap();
        for (i, handle) in handles.into_iter().enumerate() {
            assert_eq!(
                handle.get_timeout(WAIT).await.unwrap(),
                i64::try_from(i).unwrap() + 1,
                "{what}"
            );
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{what}: 300 tasks took {took:?}"
        );
        let stopping = Instant::now();
        worker.shutdown().await.unwrap();
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "{what}: the shutdown waited {:?}",
            stopping.elapsed()
        );
    }
    hole.abort();
}

static CHAINED: AtomicU32 = AtomicU32::new(0);

#[task]
fn reg_count(#[chained] x: i64) -> i64 {
    CHAINED.fetch_add(1, Ordering::SeqCst);
    x + 1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_and_a_chord_are_recovered_as_trees() {
    let config = embedded_config("tree", 11);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let admin = Admin::from_config(&config).await.unwrap();

    let chain = reg_add::signature(1, 2)
        .then(reg_double::signature())
        .then(reg_count::signature());
    let handle = server.send(chain).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 7);
    let uuids = handle.task_uuids().to_vec();
    assert_eq!(uuids.len(), 3);
    // From the last link: the whole chain, from its first task (the links are written
    // within `flush_every`).
    let tree = wait_for("the chain's links", async || {
        let tree = admin.tree(&uuids[2]).await.unwrap();
        (tree.uuid == uuids[0] && tree.walk().len() == 3).then_some(tree)
    })
    .await;
    assert_eq!(tree.link, Link::Root);
    let chain: Vec<(&str, &str, Option<State>)> = tree
        .walk()
        .into_iter()
        .map(|n| (n.uuid.as_str(), n.name.as_str(), n.state))
        .collect();
    assert_eq!(
        chain,
        [
            (uuids[0].as_str(), "reg_add", Some(State::Success)),
            (uuids[1].as_str(), "reg_double", Some(State::Success)),
            (uuids[2].as_str(), "reg_count", Some(State::Success)),
        ]
    );
    assert_eq!(tree.children[0].link, Link::OnSuccess);

    let chord = Group::new([reg_add::signature(1, 1), reg_add::signature(2, 2)])
        .chord(reg_sum::signature(vec![]));
    let handle = server.send_chord(chord).await.unwrap();
    assert_eq!(handle.get_timeout(WAIT).await.unwrap(), 6);
    let tree = wait_for("the chord's links", async || {
        let tree = admin.tree(handle.task_uuid()).await.unwrap();
        (tree.kind == NodeKind::Group && tree.children.len() == 3).then_some(tree)
    })
    .await;
    let links: Vec<(Link, Option<State>)> =
        tree.children.iter().map(|c| (c.link, c.state)).collect();
    assert_eq!(
        links,
        [
            (Link::Member, Some(State::Success)),
            (Link::Member, Some(State::Success)),
            (Link::ChordCallback, Some(State::Success)),
        ]
    );
    assert_eq!(tree.children[2].uuid, handle.task_uuid());
    worker.shutdown().await.unwrap();
}

/// Sends `reg_add(2, 3)` with its attempts used up: the worker dead-letters it.
async fn dead_letter_one(server: &Server) -> String {
    let mut signature = machinery::wire::Signature::new("reg_add");
    signature.uuid = format!("task_{}", uuid::Uuid::new_v4());
    for n in [2, 3] {
        signature.args.push(machinery::wire::Arg {
            name: String::new(),
            type_name: "int64".into(),
            value: serde_json::json!(n),
        });
    }
    signature
        .headers
        .insert("x-machinery-attempts".into(), serde_json::json!(100));
    let uuid = signature.uuid.clone();
    server.send_wire(signature).await.unwrap();
    uuid
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_brokers_queues_and_dead_letters_through_admin() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let mut config = Config::builder()
        .broker(redis_db(11))
        .result_backend(redis_db(11))
        .default_queue(format!("reg_redis_{id}_tasks"))
        .build()
        .unwrap();
    config.registry.flush_every = Duration::from_millis(20);
    let queue = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let worker = server.worker().spawn().await.unwrap();
    let admin = Admin::from_config(&config).await.unwrap();
    let broker = machinery::broker::redis::RedisBroker::connect(&config)
        .await
        .unwrap();

    let uuid = dead_letter_one(&server).await;
    broker
        .push_raw(&queue, b"not a signature".to_vec())
        .await
        .unwrap();
    let letters = wait_for("two dead letters", async || {
        let listed = admin.dead_letters(None, Page::first(10)).await.unwrap();
        (listed.total == Some(2)).then_some(listed)
    })
    .await;
    let ids: Vec<&str> = letters.items.iter().map(|d| d.id.as_str()).collect();
    assert!(ids.contains(&uuid.as_str()), "{ids:?}");
    let garbage = letters
        .items
        .iter()
        .find(|d| d.signature.is_none())
        .unwrap();
    assert!(garbage.id.starts_with("sha1:"));
    assert_eq!(garbage.body_preview, "not a signature");
    assert!(!garbage.reason.is_empty());
    let ours = admin.dead_letter(None, &uuid).await.unwrap().unwrap();
    assert!(ours.reason.contains("max_deliveries"), "{}", ours.reason);
    // Pages of one.
    let first = admin.dead_letters(None, Page::first(1)).await.unwrap();
    assert_eq!(first.items.len(), 1);
    assert_eq!(
        first.next,
        Some(Page {
            offset: 1,
            limit: 1
        })
    );

    let info = admin.queue(&queue).await.unwrap();
    assert_eq!(
        (info.dead_letters, info.consumers, info.exists),
        (2, 1, true)
    );

    // Requeue all: the task runs to SUCCESS, the garbage stays.
    let mut seen = Vec::new();
    let report = admin
        .requeue(None, &machinery::admin::Selection::All, &mut |p| {
            seen.push(p.done)
        })
        .await
        .unwrap();
    assert_eq!((report.requeued, report.skipped), (1, 1));
    assert_eq!(seen, [1, 2]);
    let state = machinery::AsyncResult::from_uuid(&server, uuid.clone())
        .typed::<i64>()
        .get_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(state, 5);
    assert_eq!(admin.purge_dead_letters(None).await.unwrap(), 1);
    assert_eq!(admin.queue(&queue).await.unwrap().dead_letters, 0);

    worker.shutdown().await.unwrap();
    for _ in 0..3 {
        broker.push_raw(&queue, b"x".to_vec()).await.unwrap();
    }
    assert_eq!(admin.queue(&queue).await.unwrap().depth, 3);
    assert_eq!(admin.purge(&queue).await.unwrap(), 3);
    assert_eq!(admin.queue(&queue).await.unwrap().depth, 0);
}
