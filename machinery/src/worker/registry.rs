//! The worker's entry in the registry, its recent-task index entries, throughput counters and
//! task links, written to Redis for operators (see [`admin`](crate::admin) and the keys in
//! `admin::keys`).
//!
//! The [`Census`] is fed by the census layer (`layers/census.rs`), which sees every call; a
//! background writer drains it every `flush_every` (or as soon as `flush_batch` entries wait)
//! in one pipeline, and refreshes the worker's record every `heartbeat`. Tasks never wait for
//! Redis: the layer only appends to a bounded buffer. While Redis is unreachable the writer
//! keeps the throughput counts (coalesced per bucket, at most an hour of buckets) and drops
//! index entries beyond the buffer, logging once at WARN per outage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::admin::keys;
use crate::admin::WorkerInfo;
use crate::admin::{state_key, Shape};
use crate::backend::redis_conn::{RedisConn, RedisTarget};
use crate::config::{Config, RegistryConfig};
use crate::error::Result;
use crate::lock;
use crate::wire::{Signature, State};

/// The most index entries waiting to be written; more are dropped.
const MAX_PENDING: usize = 20_000;
/// The most task shapes waiting to be written; more are dropped.
const MAX_SHAPES: usize = 2_000;
/// The most throughput buckets kept while Redis is unreachable (an hour).
const MAX_BUCKETS: usize = 360;
/// How long one write may take before it is abandoned.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a graceful stop waits for the last write.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What the census layer has seen and the writer has not written yet.
#[derive(Debug, Default)]
struct Pending {
    /// (state key, task UUID, Unix µs).
    recent: Vec<(&'static str, String, i64)>,
    shapes: Vec<Shape>,
    /// Bucket start → (processed, failed).
    buckets: BTreeMap<i64, (u64, u64)>,
    dropped: u64,
}

/// The counts and pending index entries of one worker.
#[derive(Debug)]
pub(crate) struct Census {
    in_flight: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    pending: Mutex<Pending>,
    wake: Notify,
    batch: usize,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The index's scores: Unix µs (exact in a double until the year 2255), so that tasks ending
/// in the same millisecond keep their order.
fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Census {
    fn new(batch: usize) -> Census {
        Census {
            in_flight: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            batch: batch.max(1),
        }
    }

    fn push(&self, pending: &mut Pending, state: &'static str, uuid: &str) {
        if pending.recent.len() >= MAX_PENDING {
            pending.dropped += 1;
            return;
        }
        pending.recent.push((state, uuid.to_owned(), now_us()));
        if pending.recent.len() == self.batch {
            self.wake.notify_one();
        }
    }

    /// A call is about to run.
    pub(crate) fn started(&self, signature: &Signature) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut pending = lock(&self.pending);
        self.push(&mut pending, state_key(State::Started), &signature.uuid);
        if Shape::has_links(signature) {
            if pending.shapes.len() < MAX_SHAPES {
                pending.shapes.push(Shape::of(signature));
            } else {
                pending.dropped += 1;
            }
        }
    }

    /// A call ended in `state` (SUCCESS, FAILURE or RETRY).
    pub(crate) fn finished(&self, signature: &Signature, state: State) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.processed.fetch_add(1, Ordering::Relaxed);
        let failed = state != State::Success;
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let bucket = keys::bucket_of(now_ms().div_euclid(1000));
        let mut pending = lock(&self.pending);
        self.push(&mut pending, state_key(state), &signature.uuid);
        let counts = pending.buckets.entry(bucket).or_default();
        counts.0 += 1;
        counts.1 += u64::from(failed);
        while pending.buckets.len() > MAX_BUCKETS {
            pending.buckets.pop_first();
        }
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Puts back the counts of a write that failed (the index entries are dropped).
    fn restore(&self, failed: Pending) {
        let mut pending = lock(&self.pending);
        pending.dropped += failed.dropped + u64::try_from(failed.recent.len()).unwrap_or(0);
        for (bucket, (processed, failures)) in failed.buckets {
            let counts = pending.buckets.entry(bucket).or_default();
            counts.0 += processed;
            counts.1 += failures;
        }
        while pending.buckets.len() > MAX_BUCKETS {
            pending.buckets.pop_first();
        }
    }
}

/// A worker's registry, ready to run: see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Registry {
    census: Arc<Census>,
    target: RedisTarget,
    settings: RegistryConfig,
    results_ttl_secs: u64,
    name: String,
    concurrency: usize,
}

static LOGGED_OFF: AtomicBool = AtomicBool::new(false);

impl Registry {
    /// The registry of a worker, or `None` when it is off (switched off, or no Redis: said
    /// once at INFO).
    pub(crate) fn plan(
        config: &Config,
        name: &str,
        concurrency: usize,
    ) -> Result<Option<Registry>> {
        if !config.registry.enabled {
            return Ok(None);
        }
        let Some(url) = crate::admin::registry_redis_url(config) else {
            if !LOGGED_OFF.swap(true, Ordering::Relaxed) {
                info!("worker registry off: no Redis (a redis:// result backend or broker, or REGISTRY_REDIS)");
            }
            return Ok(None);
        };
        let target = RedisTarget::parse(&url, &config.redis)?;
        Ok(Some(Registry {
            census: Arc::new(Census::new(config.registry.flush_batch)),
            target,
            settings: config.registry.clone(),
            results_ttl_secs: config.results_expire_in.max(1),
            name: name.to_owned(),
            concurrency,
        }))
    }

    /// The census the layer feeds.
    pub(crate) fn census(&self) -> Arc<Census> {
        self.census.clone()
    }

    /// Starts the writer for a worker consuming `queue`.
    pub(crate) fn start(&self, queue: &str) -> Running {
        let host = hostname();
        let pid = std::process::id();
        let record = WorkerInfo {
            id: format!("{}@{host}/{pid}", self.name),
            name: self.name.clone(),
            host,
            pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            queues: vec![queue.to_owned()],
            concurrency: self.concurrency,
            in_flight: 0,
            processed: 0,
            failed: 0,
            started_at_ms: now_ms(),
            heartbeat_at_ms: 0,
            heartbeat_ms: u64::try_from(self.settings.heartbeat.as_millis()).unwrap_or(u64::MAX),
        };
        let writer = Writer {
            census: self.census.clone(),
            target: self.target.clone(),
            settings: self.settings.clone(),
            results_ttl_secs: self.results_ttl_secs,
            record,
            conn: None,
            healthy: true,
            last_connect: None,
        };
        let (stop, stopped) = oneshot::channel();
        Running {
            stop: Some(stop),
            join: Some(tokio::spawn(writer.run(stopped))),
        }
    }
}

/// The running writer; [`stop`](Self::stop) removes the worker's record. Dropped without
/// `stop` (an aborted worker), the writer ends and the record expires.
#[derive(Debug)]
pub(crate) struct Running {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Running {
    /// Writes what is pending, removes the worker's record, and ends the writer.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            let abort = join.abort_handle();
            if tokio::time::timeout(STOP_TIMEOUT, join).await.is_err() {
                abort.abort();
                warn!("worker registry: the last write did not finish in time");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

struct Writer {
    census: Arc<Census>,
    target: RedisTarget,
    settings: RegistryConfig,
    results_ttl_secs: u64,
    record: WorkerInfo,
    conn: Option<RedisConn>,
    healthy: bool,
    last_connect: Option<tokio::time::Instant>,
}

impl Writer {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let mut flush = tokio::time::interval(self.settings.flush_every);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(self.settings.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let census = self.census.clone();
        loop {
            let heartbeat = tokio::select! {
                biased;
                _ = &mut stopped => break,
                _ = beat.tick() => true,
                _ = flush.tick() => false,
                () = census.wake.notified() => false,
            };
            self.write(heartbeat).await;
        }
        self.write(false).await;
        self.remove().await;
    }

    async fn connection(&mut self) -> Option<RedisConn> {
        if let Some(conn) = &self.conn {
            return Some(conn.clone());
        }
        // One attempt per heartbeat at most while Redis is down.
        if self
            .last_connect
            .is_some_and(|at| at.elapsed() < self.settings.heartbeat)
        {
            return None;
        }
        self.last_connect = Some(tokio::time::Instant::now());
        let connect = self.target.connect("the registry's Redis");
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(conn)) => {
                self.conn = Some(conn.clone());
                Some(conn)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("no answer while connecting");
                None
            }
        }
    }

    fn failed(&mut self, error: &str) {
        if self.healthy {
            warn!(redis = %self.target.display(), error, "worker registry: cannot write to Redis; dropping index entries until it is back (tasks are not affected)");
            self.healthy = false;
        } else {
            debug!(error, "worker registry: Redis still unreachable");
        }
    }

    /// One pipeline: the pending index entries, counters and links, and the heartbeat when
    /// `heartbeat`.
    async fn write(&mut self, heartbeat: bool) {
        let pending = self.census.take();
        let empty =
            pending.recent.is_empty() && pending.buckets.is_empty() && pending.shapes.is_empty();
        if empty && !heartbeat {
            return;
        }
        let Some(mut conn) = self.connection().await else {
            self.census.restore(pending);
            return;
        };
        let now = now_ms();
        let mut pipe = redis::pipe();
        self.index(&mut pipe, &pending, now);
        if heartbeat {
            self.heartbeat(&mut pipe, now);
        }
        let sent = tokio::time::timeout(WRITE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
        match sent {
            Ok(Ok(())) => {
                if !self.healthy {
                    info!("worker registry: writing to Redis again");
                    self.healthy = true;
                }
                if pending.dropped > 0 {
                    debug!(
                        dropped = pending.dropped,
                        "worker registry: index entries dropped"
                    );
                }
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                self.census.restore(pending);
            }
            Err(_) => {
                self.failed("no answer in time");
                self.census.restore(pending);
            }
        }
    }

    fn index(&self, pipe: &mut redis::Pipeline, pending: &Pending, now: i64) {
        let mut by_state: BTreeMap<&'static str, Vec<(i64, &str)>> = BTreeMap::new();
        for (state, uuid, at) in &pending.recent {
            by_state
                .entry(state)
                .or_default()
                .push((*at, uuid.as_str()));
        }
        let max_age = i64::try_from(self.settings.recent_max_age.as_micros()).unwrap_or(i64::MAX);
        let now_us = now.saturating_mul(1000);
        let keep = isize::try_from(self.settings.recent_max).unwrap_or(isize::MAX);
        for (state, entries) in by_state {
            let key = keys::recent(state);
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&key);
            for (at, uuid) in entries {
                zadd.arg(at).arg(uuid);
            }
            pipe.add_command(zadd).ignore();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(now_us.saturating_sub(max_age))
                .ignore();
            pipe.cmd("ZREMRANGEBYRANK")
                .arg(&key)
                .arg(0)
                .arg(-(keep.saturating_add(1)))
                .ignore();
        }
        for (bucket, (processed, failed)) in &pending.buckets {
            let key = keys::throughput(*bucket);
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg("processed")
                .arg(*processed)
                .ignore();
            if *failed > 0 {
                pipe.cmd("HINCRBY")
                    .arg(&key)
                    .arg("failed")
                    .arg(*failed)
                    .ignore();
            }
            pipe.cmd("EXPIRE")
                .arg(&key)
                .arg(keys::THROUGHPUT_TTL_SECS)
                .ignore();
        }
        let ttl = self.results_ttl_secs;
        for shape in &pending.shapes {
            if let Ok(json) = serde_json::to_string(shape) {
                pipe.cmd("SET")
                    .arg(keys::links(&shape.u))
                    .arg(json)
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
            let mut parents = Vec::new();
            shape.parents(&mut parents);
            for (child, parent) in parents {
                pipe.cmd("SET")
                    .arg(keys::parent(&child))
                    .arg(parent)
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
        }
    }

    fn heartbeat(&mut self, pipe: &mut redis::Pipeline, now: i64) {
        self.record.in_flight = self.census.in_flight.load(Ordering::Relaxed);
        self.record.processed = self.census.processed.load(Ordering::Relaxed);
        self.record.failed = self.census.failed.load(Ordering::Relaxed);
        self.record.heartbeat_at_ms = now;
        let ttl = u64::try_from(self.settings.record_ttl().as_millis()).unwrap_or(u64::MAX);
        if let Ok(json) = serde_json::to_string(&self.record) {
            pipe.cmd("SET")
                .arg(keys::worker(&self.record.id))
                .arg(json)
                .arg("PX")
                .arg(ttl.max(1))
                .ignore();
            pipe.cmd("ZADD")
                .arg(keys::workers())
                .arg(now)
                .arg(&self.record.id)
                .ignore();
            // Ids of workers gone for an hour: their records expired long ago.
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(keys::workers())
                .arg("-inf")
                .arg(now - 3_600_000)
                .ignore();
        }
    }

    /// Removes the worker's record (a graceful stop).
    async fn remove(&mut self) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(keys::worker(&self.record.id)).ignore();
        pipe.cmd("ZREM")
            .arg(keys::workers())
            .arg(&self.record.id)
            .ignore();
        match tokio::time::timeout(WRITE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => debug!(worker = %self.record.id, "worker registry: record removed"),
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("no answer in time"),
        }
    }
}

/// The host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}
