//! Redis Sentinel for results and locks (issue 8, item 4), as Go configures it: the result
//! backend's URL lists the sentinels, `redis://password@s1:port,s2:port,s3:port/db` (Go:
//! v1/factories.go, BackendFactory and ParseBrokers; v2/backends/redis/goredis.go, NewGR), and
//! `redis.master_name` / `redis.sentinel_password` name the master and the sentinels' password
//! (Go: v2/config/config.go, RedisConfig).
//!
//! The deployment (one master, one replica, three sentinels on 6390/6391 and 26390-26392) is
//! started by `tests/sentinel.sh start` when it is not running; the tests take turns on it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{cleanup, unique_config};
use machinery::backend::redis::RedisBackend;
use machinery::backend::ResultBackend;
use machinery::config::RedisConfig;
use machinery::periodic::{PeriodicLock, RedisLock};
use machinery::wire::{GroupMeta, State, TaskState};
use machinery::{task, Config, Server};

const MASTER_NAME: &str = "machinery-sentinel";
const SENTINEL_PASSWORD: &str = "sentinel-secret";
/// Go's form: the master's password on the first address, the database after the last.
const SENTINEL_URL: &str = "redis://redis-secret@127.0.0.1:26390,127.0.0.1:26391,127.0.0.1:26392/0";

/// One test at a time on the shared deployment (a failover disturbs the others).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn script(arg: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sentinel.sh");
    let out = std::process::Command::new(path)
        .arg(arg)
        .output()
        .expect("run tests/sentinel.sh");
    assert!(
        out.status.success(),
        "tests/sentinel.sh {arg} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn redis_config() -> RedisConfig {
    let mut redis = RedisConfig::default();
    redis.master_name = MASTER_NAME.to_owned();
    redis.sentinel_password = SENTINEL_PASSWORD.to_owned();
    redis.connect_timeout = Duration::from_secs(2);
    redis.read_timeout = Duration::from_secs(2);
    redis
}

/// A result backend that counts the calls that failed, and when the first failure and the
/// first success after the last failure happened.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ResultBackend>,
    failed: AtomicU64,
    first_failure: Mutex<Option<Instant>>,
    last_failure: Mutex<Option<Instant>>,
    recovered: Mutex<Option<Instant>>,
}

impl Counting {
    fn new(inner: Arc<dyn ResultBackend>) -> Counting {
        Counting {
            inner,
            failed: AtomicU64::new(0),
            first_failure: Mutex::new(None),
            last_failure: Mutex::new(None),
            recovered: Mutex::new(None),
        }
    }

    fn count<T>(&self, outcome: machinery::Result<T>) -> machinery::Result<T> {
        let now = Instant::now();
        match &outcome {
            Ok(_) => {
                if self.last_failure.lock().unwrap().is_some() {
                    let mut recovered = self.recovered.lock().unwrap();
                    if recovered.is_none() {
                        *recovered = Some(now);
                    }
                }
            }
            Err(e) => {
                eprintln!("store call failed: {e}");
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_failure.lock().unwrap().get_or_insert(now);
                *self.last_failure.lock().unwrap() = Some(now);
                *self.recovered.lock().unwrap() = None;
            }
        }
        outcome
    }
}

#[async_trait]
impl ResultBackend for Counting {
    async fn set_state(&self, state: TaskState) -> machinery::Result<()> {
        self.count(self.inner.set_state(state).await)
    }
    async fn set_states(&self, states: Vec<TaskState>) -> machinery::Result<()> {
        self.count(self.inner.set_states(states).await)
    }
    async fn transition(&self, state: TaskState) -> machinery::Result<Option<TaskState>> {
        self.count(self.inner.transition(state).await)
    }
    async fn start(&self, state: TaskState) -> machinery::Result<Option<TaskState>> {
        self.count(self.inner.start(state).await)
    }
    async fn record(&self, state: TaskState) -> machinery::Result<Option<TaskState>> {
        self.count(self.inner.record(state).await)
    }
    async fn get_state(&self, task_uuid: &str) -> machinery::Result<Option<TaskState>> {
        self.count(self.inner.get_state(task_uuid).await)
    }
    async fn get_states(&self, uuids: &[String]) -> machinery::Result<Vec<Option<TaskState>>> {
        self.count(self.inner.get_states(uuids).await)
    }
    async fn purge_state(&self, task_uuid: &str) -> machinery::Result<()> {
        self.count(self.inner.purge_state(task_uuid).await)
    }
    async fn init_group(&self, group_uuid: &str, task_uuids: &[String]) -> machinery::Result<()> {
        self.count(self.inner.init_group(group_uuid, task_uuids).await)
    }
    async fn group_meta(&self, group_uuid: &str) -> machinery::Result<Option<GroupMeta>> {
        self.count(self.inner.group_meta(group_uuid).await)
    }
    async fn trigger_chord(&self, group_uuid: &str) -> machinery::Result<bool> {
        self.count(self.inner.trigger_chord(group_uuid).await)
    }
    async fn revoke(&self, task_uuids: &[String]) -> machinery::Result<Vec<bool>> {
        self.count(self.inner.revoke(task_uuids).await)
    }
}

const TASKS: i64 = 2_000;
const CONCURRENCY: usize = 8;

static RUNS: Mutex<Option<HashMap<i64, usize>>> = Mutex::new(None);

#[task]
async fn sentinel_task(id: i64) -> i64 {
    tokio::time::sleep(Duration::from_millis(8)).await;
    *RUNS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(id)
        .or_default() += 1;
    id
}

fn ran() -> usize {
    RUNS.lock().unwrap().as_ref().map_or(0, HashMap::len)
}

fn sentinel_config(tag: &str) -> Config {
    let mut config = unique_config(tag);
    config.result_backend = SENTINEL_URL.to_owned();
    config.redis = redis_config();
    config.store_retry_timeout = Duration::from_secs(60);
    config
}

// Apart from the main suite (`tests/sentinel_test.sh`): under the full suite's load one run in
// three timed out waiting for a result.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by tests/sentinel_test.sh"]
async fn a_sentinel_failover_during_2000_tasks_loses_nothing() {
    let _serial = SERIAL.lock().await;
    script("start");
    let config = sentinel_config("sentinel");
    let producer = Server::new(config.clone()).await.unwrap();
    let counting = Arc::new(Counting::new(producer.backend().unwrap().clone()));
    let backend: Arc<dyn ResultBackend> = counting.clone();
    let server = Server::from_parts(config.clone(), producer.broker().clone(), Some(backend));
    let worker = server
        .worker()
        .tasks([sentinel_task::NAME])
        .concurrency(CONCURRENCY)
        .spawn()
        .await
        .unwrap();
    let handles = producer
        .send_all((0..TASKS).map(sentinel_task::signature))
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while ran() < 300 {
        assert!(Instant::now() < deadline, "the run did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = script("master");
    let failover_started = Instant::now();
    let at_failover = ran();
    let after = script(if std::env::var("SENTINEL_KILL").is_ok() {
        "kill"
    } else {
        "failover"
    });
    let switched_in = failover_started.elapsed();
    assert_ne!(before, after, "the master did not change");

    for handle in &handles {
        handle.get_timeout(Duration::from_secs(120)).await.unwrap();
    }
    let finished_at = ran();
    assert!(!worker.is_finished(), "the worker stopped");
    worker.shutdown().await.unwrap();
    // Read the results only once the old master has rejoined as a replica and resynced (a
    // write that only the old master had is gone then), through a fresh connection.
    script("start");
    let reader = RedisBackend::connect_with(SENTINEL_URL, Duration::from_secs(60), &redis_config())
        .await
        .unwrap();
    let uuids: Vec<String> = handles.iter().map(|h| h.task_uuid().to_owned()).collect();
    let states = reader.get_states(&uuids).await.unwrap();
    let missing: Vec<&String> = uuids
        .iter()
        .zip(&states)
        .filter(|(_, s)| !s.as_ref().is_some_and(|s| s.state == State::Success))
        .map(|(u, _)| u)
        .collect();
    assert!(
        missing.is_empty(),
        "{} results are not SUCCESS: {missing:?}",
        missing.len()
    );
    let runs = RUNS.lock().unwrap().clone().unwrap();
    assert_eq!(runs.len(), usize::try_from(TASKS).unwrap());
    let twice = runs.values().filter(|n| **n > 1).count();
    let failed = counting.failed.load(Ordering::Relaxed);
    let first = *counting.first_failure.lock().unwrap();
    let recovered = *counting.recovered.lock().unwrap();
    let outage = match (first, recovered) {
        (Some(first), Some(recovered)) => format!("{:?}", recovered - first),
        _ => "none seen".to_owned(),
    };
    eprintln!(
        "sentinel failover: master {before} -> {after}, sentinels switched in {switched_in:?}; \
         ran before the failover: {at_failover}/{TASKS}; failed store calls: {failed}; \
         first failure to first success after: {outage}; tasks run twice (redelivered): {twice}; \
         ran at the end: {finished_at}"
    );
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_periodic_lock_works_through_sentinel_and_after_a_failover() {
    let _serial = SERIAL.lock().await;
    script("start");
    // Go: v1/factories.go, LockFactory: `redis://` and a comma-separated list, with
    // `redis.master_name` (v2/locks/redis/redis.go, New).
    let lock = RedisLock::connect_with(SENTINEL_URL, &redis_config())
        .await
        .unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let until = chrono::Utc::now().timestamp_nanos_opt().unwrap() + 60_000_000_000;
    let held = format!("machinery_lock_sentinel_{id}_held");
    assert!(lock.lock(&held, until).await.unwrap());
    assert!(!lock.lock(&held, until).await.unwrap(), "taken twice");

    let started = Instant::now();
    script("failover");
    // Through the new master: the held key was replicated before the lock said it was taken.
    let fresh = format!("machinery_lock_sentinel_{id}_fresh");
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken = loop {
        match lock.lock(&fresh, until).await {
            Ok(taken) => break taken,
            Err(e) => {
                failed += 1;
                assert!(Instant::now() < deadline, "the lock never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!(
        "lock through sentinel: failed attempts after the failover: {failed}, recovered in {:?}",
        started.elapsed()
    );
    assert!(taken);
    assert!(
        !lock.lock(&held, until).await.unwrap(),
        "the lock taken before the failover was lost"
    );
    script("start");
}

/// A `redis-cli`-like connection to one node of the deployment.
async fn node(port: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://:redis-secret@127.0.0.1:{port}/0"))
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_no_replica_acknowledges_is_a_retryable_error() {
    let _serial = SERIAL.lock().await;
    script("start");
    let backend =
        RedisBackend::connect_with(SENTINEL_URL, Duration::from_secs(60), &redis_config())
            .await
            .unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let uuid = format!("task_sentinel_{id}");
    backend
        .set_state(TaskState::new(&uuid, State::Pending))
        .await
        .unwrap();
    // The replica stops for 3 s: it acknowledges nothing within WAIT's 1 s (read_timeout / 2).
    let master = script("master");
    let replica = if master == "6390" { "6391" } else { "6390" };
    let mut replica_conn = node(replica).await;
    // Connected before it sleeps (a handshake with a sleeping server times out).
    let mut probe = node(replica).await;
    let sleeping = tokio::spawn(async move {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(3)
            .query_async(&mut replica_conn)
            .await
            .unwrap();
    });
    // Until the replica stops answering (a fixed pause is too short on a loaded machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ping = redis::cmd("PING");
        if tokio::time::timeout(
            Duration::from_millis(200),
            ping.query_async::<String>(&mut probe),
        )
        .await
        .is_err()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never slept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = backend
        .set_state(TaskState::new(&uuid, State::Started))
        .await
        .unwrap_err();
    eprintln!("unconfirmed write: {e}");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("replica"), "{e}");
    sleeping.await.unwrap();
    // Once the replica is back, the same write is confirmed (the worker's retry).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match backend
            .set_state(TaskState::new(&uuid, State::Started))
            .await
        {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "never confirmed: {e}"),
        }
    }
    let mut replica_conn = node(replica).await;
    let stored: Option<String> = redis::cmd("GET")
        .arg(&uuid)
        .query_async(&mut replica_conn)
        .await
        .unwrap();
    assert!(stored.unwrap().contains("\"STARTED\""));
}

static RATE_STARTS: Mutex<usize> = Mutex::new(0);

#[task(rate_limit = "50/s")]
fn sentinel_rate_limited() -> i64 {
    *RATE_STARTS.lock().unwrap() += 1;
    1
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_rate_limits_are_kept_on_the_master_sentinel_names() {
    let _serial = SERIAL.lock().await;
    script("start");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut config = Config::builder()
        .broker(format!("memory://sentinel-rate-{id}"))
        .build()
        .unwrap();
    config.redis = redis_config();
    let server = Server::new(config).await.unwrap();
    let worker = server
        .worker()
        .tasks([sentinel_rate_limited::NAME])
        .cluster_rate_limits(SENTINEL_URL)
        .spawn()
        .await
        .unwrap();
    let mut handles = Vec::new();
    for _ in 0..5 {
        handles.push(
            server
                .send(sentinel_rate_limited::signature())
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.get_timeout(Duration::from_secs(10)).await.unwrap();
    }
    let mut master = node(&script("master")).await;
    let next: Option<i64> = redis::cmd("GET")
        .arg(format!("machinery_rate_{}", sentinel_rate_limited::NAME))
        .query_async(&mut master)
        .await
        .unwrap();
    assert!(next.is_some_and(|n| n > 1_600_000_000_000_000), "{next:?}");
    worker.shutdown().await.unwrap();
}
