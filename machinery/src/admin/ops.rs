//! Reading the registry's keys ([`keys`](super::keys)) from Redis.

use std::time::Duration;

use redis::Value;

use super::keys;
use super::tree::{Shape, MAX_LINKS_BYTES};
use super::{Page, ThroughputBucket, WorkerInfo};
use crate::backend::redis_conn::{RedisConn, RedisTarget};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::wire::State;

/// The most workers listed.
const MAX_WORKERS: isize = 10_000;
/// The largest worker record read.
const MAX_RECORD_BYTES: usize = 64 * 1024;

/// The Redis of the registry: [`RegistryConfig::redis_url`](crate::config::RegistryConfig),
/// else the result backend's when it is Redis, else the broker's when it is Redis.
pub(crate) fn registry_redis_url(config: &Config) -> Option<String> {
    if let Some(url) = &config.registry.redis_url {
        return Some(url.clone());
    }
    [&config.result_backend, &config.broker]
        .into_iter()
        .find(|url| is_redis(url))
        .cloned()
}

fn is_redis(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        matches!(scheme.to_ascii_lowercase().as_str(), "redis" | "rediss")
    })
}

/// The lower-case name of a state in the index's keys.
pub(crate) fn state_key(state: State) -> &'static str {
    match state {
        State::Pending => "pending",
        State::Received => "received",
        State::Started => "started",
        State::Retry => "retry",
        State::Success => "success",
        State::Failure => "failure",
    }
}

/// A connection to the registry's Redis, for reading.
#[derive(Clone)]
pub(crate) struct OpsStore {
    conn: RedisConn,
    display: String,
}

impl OpsStore {
    pub(crate) async fn connect(url: &str, config: &Config) -> Result<OpsStore> {
        let target = RedisTarget::parse(url, &config.redis)?;
        let conn = target.connect("the registry's Redis").await?;
        Ok(OpsStore {
            conn,
            display: target.display().to_owned(),
        })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, what: &str) -> Result<T> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| self.error(what, e))
    }

    async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        what: &str,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn)
            .await
            .map_err(|e| self.error(what, e))
    }

    fn error(&self, what: &str, e: redis::RedisError) -> Error {
        Error::with_source(
            ErrorKind::Backend,
            format!(
                "the registry's Redis at {}: cannot {what}: {e}",
                self.display
            ),
            e,
        )
    }

    pub(crate) async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZREVRANGE")
                    .arg(keys::workers())
                    .arg(0)
                    .arg(MAX_WORKERS - 1),
                "list the workers",
            )
            .await?;
        let mut workers = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for chunk in ids.chunks(500) {
            let mut mget = redis::cmd("MGET");
            for id in chunk {
                mget.arg(keys::worker(id));
            }
            let records: Vec<Option<Vec<u8>>> = self.query(&mget, "read the workers").await?;
            for (id, record) in chunk.iter().zip(records) {
                match record {
                    Some(bytes) if bytes.len() <= MAX_RECORD_BYTES => {
                        if let Ok(info) = serde_json::from_slice::<WorkerInfo>(&bytes) {
                            workers.push(info);
                        }
                    }
                    Some(_) => {}
                    None => gone.push(id.clone()),
                }
            }
        }
        if !gone.is_empty() {
            // Expired records: tidy the listing (best effort).
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(keys::workers()).arg(&gone);
            let _: Result<i64> = self.query(&zrem, "tidy the workers").await;
        }
        workers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(workers)
    }

    /// A page of the index of `state`, newest first, and the index's size.
    pub(crate) async fn recent(
        &self,
        state: State,
        page: Page,
    ) -> Result<(Vec<(String, i64)>, u64)> {
        let key = keys::recent(state_key(state));
        let start = page.offset;
        let stop = start.saturating_add(page.capped_limit()) - 1;
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(&key);
        pipe.cmd("ZREVRANGE")
            .arg(&key)
            .arg(start)
            .arg(stop)
            .arg("WITHSCORES");
        let (total, page): (u64, Vec<(String, f64)>) =
            self.pipe(&pipe, "read the recent tasks").await?;
        #[allow(clippy::cast_possible_truncation)]
        let page = page
            .into_iter()
            .map(|(uuid, score)| (uuid, score as i64 / 1000))
            .collect();
        Ok((page, total))
    }

    /// When `uuid` entered each state's index, oldest first.
    pub(crate) async fn timeline(&self, uuid: &str) -> Result<Vec<(State, i64)>> {
        const STATES: [State; 4] = [State::Started, State::Retry, State::Success, State::Failure];
        let mut pipe = redis::pipe();
        for state in STATES {
            pipe.cmd("ZSCORE")
                .arg(keys::recent(state_key(state)))
                .arg(uuid);
        }
        let scores: Vec<Option<f64>> = self.pipe(&pipe, "read a task's timeline").await?;
        #[allow(clippy::cast_possible_truncation)]
        let mut timeline: Vec<(State, i64)> = STATES
            .into_iter()
            .zip(scores)
            .filter_map(|(state, score)| score.map(|s| (state, s as i64 / 1000)))
            .collect();
        timeline.sort_by_key(|(_, at)| *at);
        Ok(timeline)
    }

    pub(crate) async fn throughput(&self, window: Duration) -> Result<Vec<ThroughputBucket>> {
        let window = i64::try_from(window.as_secs())
            .unwrap_or(i64::MAX)
            .clamp(keys::BUCKET_SECS, keys::THROUGHPUT_TTL_SECS);
        let now = chrono::Utc::now().timestamp();
        let last = keys::bucket_of(now);
        let first = keys::bucket_of(now - window + keys::BUCKET_SECS);
        let starts: Vec<i64> = (0..)
            .map(|i| first + i * keys::BUCKET_SECS)
            .take_while(|s| *s <= last)
            .collect();
        let mut pipe = redis::pipe();
        for start in &starts {
            pipe.cmd("HMGET")
                .arg(keys::throughput(*start))
                .arg("processed")
                .arg("failed");
        }
        let counts: Vec<(Option<u64>, Option<u64>)> =
            self.pipe(&pipe, "read the throughput").await?;
        #[allow(clippy::cast_precision_loss)]
        let buckets = starts
            .into_iter()
            .zip(counts)
            .map(|(start, (processed, failed))| {
                let (processed, failed) = (processed.unwrap_or(0), failed.unwrap_or(0));
                let secs = keys::BUCKET_SECS as f64;
                ThroughputBucket {
                    start,
                    seconds: keys::BUCKET_SECS,
                    processed,
                    failed,
                    tasks_per_sec: processed as f64 / secs,
                    failures_per_sec: failed as f64 / secs,
                }
            })
            .collect();
        Ok(buckets)
    }

    /// The recorded links of each task, in order.
    pub(crate) async fn links(&self, uuids: &[String]) -> Result<Vec<Option<Shape>>> {
        if uuids.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for uuid in uuids {
            mget.arg(keys::links(uuid));
        }
        let values: Vec<Value> = self.query(&mget, "read task links").await?;
        Ok(values
            .into_iter()
            .map(|v| match v {
                Value::BulkString(bytes) if bytes.len() <= MAX_LINKS_BYTES => {
                    serde_json::from_slice(&bytes).ok()
                }
                _ => None,
            })
            .collect())
    }

    /// The task whose callback `uuid` is, if recorded.
    pub(crate) async fn parent(&self, uuid: &str) -> Result<Option<String>> {
        self.query(
            redis::cmd("GET").arg(keys::parent(uuid)),
            "read a task's parent",
        )
        .await
    }
}
