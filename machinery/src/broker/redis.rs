//! The Redis broker (`redis://`, and `rediss://` with the `redis-tls` feature), in Go
//! Machinery's layout (Go: `v2/brokers/redis/redis.go`), so Go and Rust producers and workers
//! can share one Redis.
//!
//! # Go's keys, kept exactly
//!
//! - A message is the signature JSON `RPUSH`ed onto the list named by its routing key (the
//!   default queue when the signature has none, Go's `AdjustRoutingKey`).
//! - A delayed message is `ZADD`ed to the sorted set `delayed_tasks` (Go's
//!   `redis.delayed_tasks_key`), scored by its ETA in Unix nanoseconds. Every consuming broker
//!   moves the due ones, every `delayed_tasks_poll_period` (500 ms by default, Go's), onto the
//!   list named by their `RoutingKey`, each removed with `ZREM` and pushed in one Lua script,
//!   so two workers never both move one (Go does the same under `WATCH`/`MULTI`).
//! - [`RedisBroker::pending_tasks`] is Go's `GetPendingTasks` (`LRANGE`),
//!   [`RedisBroker::delayed_tasks`] Go's `GetDelayedTasks` (`ZRANGE`).
//!
//! # Reliability beyond Go's
//!
//! Go takes a message with `BLPOP`: if its worker dies before the task ends, the message is
//! gone. Here a consumer takes messages with one Lua script that moves them (as `LMOVE`
//! does) from the queue onto its own **processing list**, `<queue>.processing.<consumer id>`,
//! at most as many as its prefetch allows unsettled. When the queue is empty, it waits with
//! `BLMOVE <queue> <queue> LEFT LEFT` (which takes nothing: it returns once a message is
//! there) for at most `normal_tasks_poll_period` (Go's `BLPOP` timeout), then takes again.
//!
//! - **ack**: `LREM` from the processing list (a consumer's concurrent acks share one script
//!   call, up to 256);
//! - **requeue**: moved back to the head of the queue, its delivery counted;
//! - **dead-letter**: moved to the list `<queue>.dead_letter` (the AMQP broker's dead-letter
//!   queue name, [`RedisBroker::dead_letter_list`]) with the reason in the hash
//!   `<queue>.dead_letter.reasons`, keyed by the SHA-1 of the body (hex, as Lua's
//!   `redis.sha1hex`); [`RedisBroker::dead_letters`] reads both. The list holds the bodies
//!   unchanged, so `LMOVE <queue>.dead_letter <queue> LEFT RIGHT` puts one back.
//!
//! Each consumer refreshes a heartbeat, the key `<queue>.heartbeat.<consumer id>` with a TTL of
//! [`HEARTBEAT_TTL`], every [`HEARTBEAT_EVERY`], and lists its id in the set
//! `<queue>.consumers`. With each heartbeat it also recovers the processing lists of the
//! consumers whose heartbeat is gone (a process killed, a machine lost): their messages go
//! back to the head of the queue, and each one's delivery is counted in the hash
//! `<queue>.deliveries` (SHA-1 of the body → deliveries before). The count comes with the
//! next delivery ([`Delivery::delivery_count`]), so the worker's usual policy dead-letters a
//! message that kills its worker every time after `MAX_DELIVERIES`, as on a quorum queue.
//!
//! A message larger than `MAX_MESSAGE_SIZE` is dead-lettered by the take script itself, never
//! sent to the worker (only the `BLMOVE` wait reads one message, the head of the queue).
//! Everything the Redis scripts use runs inside Redis: nothing read from the wire can make
//! them fail half-way, and bodies are compared as bytes, never parsed, except for the
//! `RoutingKey` of a due delayed message (`cjson`, in a protected call: a body that does not
//! parse goes to the default queue, where the worker dead-letters it).
//!
//! Redis Cluster and Sentinel are not supported: the scripts touch keys they compute.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, trace, warn};

mod admin;

use super::{Acker, Broker, Consumer, Delivery, Message, Rejection};
use crate::config::{Config, DEAD_LETTER_SUFFIX};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use crate::wire::Signature;

/// How often a consumer refreshes its heartbeat and looks for dead consumers' messages.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a consumer's heartbeat lives: a consumer silent this long is taken for dead, and
/// its processing list goes back to the queue. Twice the reply timeout of the connection the
/// heartbeat is sent on, so a stalled Redis reply does not make a live consumer's running tasks
/// run again elsewhere.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(30);
/// Go's default `delayed_tasks_key` (`defaultRedisDelayedTasksKey`).
pub const DEFAULT_DELAYED_TASKS_KEY: &str = "delayed_tasks";

/// How many messages one take moves at most.
const TAKE_BATCH: usize = 64;
/// How many due delayed messages one move handles.
const MOVE_BATCH: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Moves up to `ARGV[1]` messages from the queue to the processing list; dead-letters those
/// over `ARGV[2]` bytes. Returns body, previous deliveries, body, ...
const TAKE_LUA: &str = r"
local out = {}
local counted = redis.call('HLEN', KEYS[3]) > 0
local max = tonumber(ARGV[2])
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('LPOP', KEYS[1])
  if not m then break end
  if string.len(m) > max then
    local d = redis.sha1hex(m)
    redis.call('RPUSH', KEYS[4], m)
    redis.call('HSET', KEYS[5], d, 'message of ' .. string.len(m) ..
      ' bytes is larger than max_message_size (' .. ARGV[2] .. ' bytes)')
    redis.call('HDEL', KEYS[3], d)
  else
    redis.call('RPUSH', KEYS[2], m)
    local c = 0
    if counted then c = tonumber(redis.call('HGET', KEYS[3], redis.sha1hex(m)) or '0') end
    out[#out + 1] = m
    out[#out + 1] = c
  end
end
return out
";

/// Acks, several at once: removes each body (`ARGV`) from the processing list and forgets its
/// count. Returns 1 or 0 per body (0: no longer there).
const ACK_LUA: &str = r"
local out = {}
local counted = redis.call('HLEN', KEYS[2]) > 0
for i, body in ipairs(ARGV) do
  local n = redis.call('LREM', KEYS[1], 1, body)
  if n == 1 and counted then redis.call('HDEL', KEYS[2], redis.sha1hex(body)) end
  out[i] = n
end
return out
";

/// How many acks one script call settles at most.
const ACK_BATCH: usize = 256;

/// An ack waiting for the consumer's ack flusher: the body, and where its outcome goes.
type AckRequest = (Bytes, oneshot::Sender<Result<i64>>);

/// Requeue: back to the head of the queue; `ARGV[2] == '1'` counts the delivery.
const REQUEUE_LUA: &str = r"
local n = redis.call('LREM', KEYS[1], 1, ARGV[1])
if n == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[3], redis.sha1hex(ARGV[1]), 1) end
end
return n
";

/// Dead-letter: to the dead-letter list, the reason in its hash.
const DEAD_LETTER_LUA: &str = r"
local n = redis.call('LREM', KEYS[1], 1, ARGV[1])
if n == 1 then
  local d = redis.sha1hex(ARGV[1])
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[3], d, ARGV[2])
  redis.call('HDEL', KEYS[4], d)
end
return n
";

/// Heartbeat (when `ARGV[1]` is not empty) and recovery of the consumers without one.
/// `ARGV[3]` is the queue name, the prefix of the per-consumer keys.
const HEARTBEAT_LUA: &str = r"
local prefix = ARGV[3]
if ARGV[1] ~= '' then
  redis.call('SET', prefix .. '.heartbeat.' .. ARGV[1], '1', 'PX', ARGV[2])
  redis.call('SADD', KEYS[1], ARGV[1])
end
local recovered = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', prefix .. '.heartbeat.' .. id) == 0 then
    local proc = prefix .. '.processing.' .. id
    while true do
      local m = redis.call('RPOP', proc)
      if not m then break end
      redis.call('LPUSH', KEYS[2], m)
      redis.call('HINCRBY', KEYS[3], redis.sha1hex(m), 1)
      recovered = recovered + 1
    end
    redis.call('SREM', KEYS[1], id)
  end
end
return recovered
";

/// Moves the due delayed messages (score <= `ARGV[1]`, at most `ARGV[2]`) onto the list named
/// by their `RoutingKey` (`ARGV[3]`, the default queue, when they have none or it is unusable).
const MOVE_DUE_LUA: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local max = tonumber(ARGV[4])
for _, m in ipairs(due) do
  local queue = ARGV[3]
  if string.len(m) <= max then
    local ok, sig = pcall(cjson.decode, m)
    if ok and type(sig) == 'table' and type(sig.RoutingKey) == 'string' and sig.RoutingKey ~= '' then
      queue = sig.RoutingKey
    end
  end
  if redis.call('ZREM', KEYS[1], m) == 1 then
    local pushed = redis.pcall('RPUSH', queue, m)
    if type(pushed) == 'table' and pushed.err then redis.call('RPUSH', ARGV[3], m) end
  end
end
return #due
";

/// A Redis broker in Go Machinery's layout; see the [module docs](self).
///
/// ```no_run
/// use machinery::broker::redis::RedisBroker;
/// use machinery::Config;
///
/// # async fn demo() -> machinery::Result<()> {
/// let config = Config::builder().broker("redis://127.0.0.1:6379/").build()?;
/// let broker = RedisBroker::connect(&config).await?;
/// for signature in broker.pending_tasks("machinery_tasks").await? {
///     println!("{} waits", signature.uuid);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBroker {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    conn: ConnectionManager,
    display: String,
    default_queue: String,
    delayed_key: String,
    poll: Duration,
    delayed_poll: Duration,
    max_message_size: usize,
    reconnect_timeout: Duration,
    take: Script,
    ack: Script,
    requeue: Script,
    dead_letter: Script,
    heartbeat: Script,
    move_due: Script,
    mover: Mutex<Option<JoinHandle<()>>>,
    link: LinkHealth,
}

/// Counts the times the connection to Redis was lost and made again: a call failed on the
/// connection (an error after which redis-rs replaces it, or a refusal), then a call that
/// started after that failure succeeded. The connections reconnect by themselves; this is what
/// [`Broker::reconnects`] reports.
///
/// Each call takes a ticket when it starts, so that calls in flight across a reconnect count
/// it once: a failure of a call that started before the last recovery belongs to the old
/// connection, and a success of a call that started before the failure says nothing of the
/// new one.
#[derive(Debug, Default)]
struct LinkHealth {
    /// Tickets handed out so far.
    issued: AtomicU64,
    /// 0 while the connection is up, else the tickets issued when it was found lost.
    lost_at: AtomicU64,
    /// The tickets issued when it was last found made again.
    recovered_at: AtomicU64,
    reconnects: AtomicU64,
}

impl LinkHealth {
    /// Makes the call `reply`, recording how it ended.
    async fn watch<T>(
        &self,
        reply: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        let ticket = self.ticket();
        let reply = reply.await;
        self.saw(ticket, &reply);
        reply
    }

    /// A ticket for a call about to start.
    fn ticket(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records how the call with `ticket` ended.
    fn saw<T>(&self, ticket: u64, reply: &redis::RedisResult<T>) {
        match reply {
            Ok(_) => self.succeeded(ticket),
            Err(e) if e.is_unrecoverable_error() || e.is_connection_refusal() => self.lost(ticket),
            Err(_) => {}
        }
    }

    /// The call with `ticket` failed on its connection.
    fn lost(&self, ticket: u64) {
        if ticket > self.recovered_at.load(Ordering::SeqCst) {
            let now = self.issued.load(Ordering::SeqCst);
            let _ = self
                .lost_at
                .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    fn succeeded(&self, ticket: u64) {
        let lost_at = self.lost_at.load(Ordering::SeqCst);
        if lost_at != 0
            && ticket > lost_at
            && self
                .lost_at
                .compare_exchange(lost_at, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.recovered_at
                .store(self.issued.load(Ordering::SeqCst), Ordering::SeqCst);
            self.reconnects.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(mover) = lock(&self.mover).take() {
            mover.abort();
        }
    }
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.shared.display)
            .field("default_queue", &self.shared.default_queue)
            .field("delayed_tasks_key", &self.shared.delayed_key)
            .finish_non_exhaustive()
    }
}

fn broker_error(what: String, e: redis::RedisError) -> Error {
    Error::with_source(ErrorKind::Broker, what, e)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

impl RedisBroker {
    /// Connects to the Redis server named by `config.broker` (the URL forms of the Redis
    /// result backend, [`crate::backend::redis`]), with the `redis:` settings of `config`
    /// (`normal_tasks_poll_period`, `delayed_tasks_poll_period`, `delayed_tasks_key`).
    ///
    /// Fails with [`ErrorKind::Config`] for a URL it cannot read and [`ErrorKind::Broker`]
    /// when the server cannot be reached.
    ///
    /// ```no_run
    /// # async fn demo() -> machinery::Result<()> {
    /// let config = machinery::Config::builder().broker("redis://127.0.0.1:6379/").build()?;
    /// let broker = machinery::broker::redis::RedisBroker::connect(&config).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(config: &Config) -> Result<RedisBroker> {
        if !config.redis.master_name.is_empty() || config.redis.cluster_enabled {
            // The URL would name sentinels (or cluster nodes) and be dialled as one server.
            return Err(Error::config(
                "the Redis broker does not support Redis Sentinel or Cluster \
                 (redis.master_name, redis.cluster_enabled); they are for the result backend",
            ));
        }
        let (client, display) = crate::backend::redis::client(&config.broker)?;
        let cannot = |e| broker_error(format!("cannot connect to Redis at {display}"), e);
        let probe = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        drop(
            client
                .get_multiplexed_async_connection_with_config(&probe)
                .await
                .map_err(cannot)?,
        );
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), manager)
            .await
            .map_err(cannot)?;
        let delayed_key = if config.redis.delayed_tasks_key.is_empty() {
            DEFAULT_DELAYED_TASKS_KEY.to_owned()
        } else {
            config.redis.delayed_tasks_key.clone()
        };
        // Go: a poll period of 0 means its default (1000 ms, 500 ms).
        let or = |d: Duration, default: u64| {
            if d.is_zero() {
                Duration::from_millis(default)
            } else {
                d
            }
        };
        Ok(RedisBroker {
            shared: Arc::new(Shared {
                client,
                conn,
                display,
                default_queue: config.default_queue.clone(),
                delayed_key,
                poll: or(config.redis.normal_tasks_poll_period, 1000),
                delayed_poll: or(config.redis.delayed_tasks_poll_period, 500),
                max_message_size: config.max_message_size,
                reconnect_timeout: config.reconnect_timeout,
                take: Script::new(TAKE_LUA),
                ack: Script::new(ACK_LUA),
                requeue: Script::new(REQUEUE_LUA),
                dead_letter: Script::new(DEAD_LETTER_LUA),
                heartbeat: Script::new(HEARTBEAT_LUA),
                move_due: Script::new(MOVE_DUE_LUA),
                mover: Mutex::new(None),
                link: LinkHealth::default(),
            }),
        })
    }

    /// The list messages from `queue` are dead-lettered to (the AMQP broker's dead-letter
    /// queue name).
    ///
    /// ```
    /// use machinery::broker::redis::RedisBroker;
    /// assert_eq!(RedisBroker::dead_letter_list("tasks"), "tasks.dead_letter");
    /// ```
    pub fn dead_letter_list(queue: &str) -> String {
        format!("{queue}{DEAD_LETTER_SUFFIX}")
    }

    /// The hash of the dead-letter reasons of `queue`, keyed by the SHA-1 (hex) of the body.
    ///
    /// ```
    /// use machinery::broker::redis::RedisBroker;
    /// assert_eq!(RedisBroker::dead_letter_reasons("tasks"), "tasks.dead_letter.reasons");
    /// ```
    pub fn dead_letter_reasons(queue: &str) -> String {
        format!("{queue}{DEAD_LETTER_SUFFIX}.reasons")
    }

    /// The sorted set of delayed messages (Go's `delayed_tasks_key`).
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) {
    /// assert_eq!(broker.delayed_tasks_key(), "delayed_tasks");
    /// # }
    /// ```
    pub fn delayed_tasks_key(&self) -> &str {
        &self.shared.delayed_key
    }

    /// The signatures waiting in `queue` (the default queue when empty), head first (Go:
    /// `GetPendingTasks`, an `LRANGE`). Fails on a message that is not a signature, as Go's
    /// does, or that is larger than `max_message_size`. It reads the whole queue; for a long
    /// one, read it in pages with [`pending_tasks_range`](Self::pending_tasks_range).
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// let waiting = broker.pending_tasks("machinery_tasks").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn pending_tasks(&self, queue: &str) -> Result<Vec<Signature>> {
        self.read_queue(queue, 0, -1).await
    }

    /// Like [`pending_tasks`](Self::pending_tasks), at most `count` signatures from position
    /// `start` (0 is the head): one page of a queue, so that a long queue is never held in
    /// memory whole. Past the end, it is empty.
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// let mut start = 0;
    /// loop {
    ///     let page = broker.pending_tasks_range("machinery_tasks", start, 500).await?;
    ///     if page.is_empty() {
    ///         break;
    ///     }
    ///     start += page.len();
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn pending_tasks_range(
        &self,
        queue: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<Signature>> {
        match range(start, count) {
            Some((start, stop)) => self.read_queue(queue, start, stop).await,
            None => Ok(Vec::new()),
        }
    }

    async fn read_queue(&self, queue: &str, start: i64, stop: i64) -> Result<Vec<Signature>> {
        let queue = if queue.is_empty() {
            self.shared.default_queue.as_str()
        } else {
            queue
        };
        let bodies: Vec<Vec<u8>> = self
            .shared
            .query(
                redis::cmd("LRANGE").arg(queue).arg(start).arg(stop),
                "read a queue",
            )
            .await?;
        self.shared.decode_all(&bodies)
    }

    /// The delayed signatures, earliest first (Go: `GetDelayedTasks`, a `ZRANGE`). It reads
    /// them all; read many in pages with [`delayed_tasks_range`](Self::delayed_tasks_range).
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// let later = broker.delayed_tasks().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delayed_tasks(&self) -> Result<Vec<Signature>> {
        self.read_delayed(0, -1).await
    }

    /// Like [`delayed_tasks`](Self::delayed_tasks), at most `count` signatures from position
    /// `start` (0 is the earliest). Past the end, it is empty.
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// let next_ten = broker.delayed_tasks_range(0, 10).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delayed_tasks_range(&self, start: usize, count: usize) -> Result<Vec<Signature>> {
        match range(start, count) {
            Some((start, stop)) => self.read_delayed(start, stop).await,
            None => Ok(Vec::new()),
        }
    }

    async fn read_delayed(&self, start: i64, stop: i64) -> Result<Vec<Signature>> {
        let bodies: Vec<Vec<u8>> = self
            .shared
            .query(
                redis::cmd("ZRANGE")
                    .arg(&self.shared.delayed_key)
                    .arg(start)
                    .arg(stop),
                "read the delayed tasks",
            )
            .await?;
        self.shared.decode_all(&bodies)
    }

    /// The messages dead-lettered from `queue`, oldest first, each with its reason (empty if
    /// the reason is missing). It reads the whole list; for a long one, read it in pages with
    /// [`dead_letters_range`](Self::dead_letters_range).
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// for (body, reason) in broker.dead_letters("machinery_tasks").await? {
    ///     println!("{} bytes: {reason}", body.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<(Bytes, String)>> {
        self.dead_letters_range(queue, 0, usize::MAX).await
    }

    /// Like [`dead_letters`](Self::dead_letters), at most `count` messages from position
    /// `start` (0 is the oldest), with the reasons of those alone: one page of the list, so
    /// that a long one is never held in memory whole. Past the end, it is empty.
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// let first = broker.dead_letters_range("machinery_tasks", 0, 100).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn dead_letters_range(
        &self,
        queue: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<(Bytes, String)>> {
        let Some((start, stop)) = range(start, count) else {
            return Ok(Vec::new());
        };
        let bodies: Vec<Vec<u8>> = self
            .shared
            .query(
                redis::cmd("LRANGE")
                    .arg(RedisBroker::dead_letter_list(queue))
                    .arg(start)
                    .arg(stop),
                "read a dead-letter list",
            )
            .await?;
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        // A thousand reasons a command: a long list read whole stays far below the argument
        // limit of Redis before 7 (1,048,576), where going over closes the connection.
        let hash = RedisBroker::dead_letter_reasons(queue);
        let mut pipe = redis::pipe();
        for chunk in bodies.chunks(1_000) {
            let hmget = pipe.cmd("HMGET").arg(&hash);
            for body in chunk {
                hmget.arg(sha1_hex(body));
            }
        }
        let what = "read dead-letter reasons";
        let reasons = self
            .shared
            .query_pipe(&pipe, what)
            .await?
            .into_iter()
            .map(redis::from_redis_value::<Vec<Option<String>>>)
            .collect::<std::result::Result<Vec<_>, redis::ParsingError>>()
            .map_err(|e| {
                broker_error(
                    format!("Redis at {}: cannot {what}", self.shared.display),
                    e.into(),
                )
            })?;
        Ok(bodies
            .into_iter()
            .zip(reasons.into_iter().flatten().chain(std::iter::repeat(None)))
            .map(|(body, reason)| (Bytes::from(body), reason.unwrap_or_default()))
            .collect())
    }

    /// Puts raw bytes at the tail of `queue`, as any producer's `RPUSH` would: for tests of
    /// bad input.
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// broker.push_raw("machinery_tasks", b"not json".to_vec()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push_raw(&self, queue: &str, body: impl Into<Bytes>) -> Result<()> {
        let body: Bytes = body.into();
        self.shared
            .query::<i64>(redis::cmd("RPUSH").arg(queue).arg(&body[..]), "push")
            .await
            .map(drop)
    }

    /// How many messages wait in `queue`, and how many its consumers hold unsettled (the
    /// lengths of all its processing lists).
    ///
    /// ```no_run
    /// # async fn demo(broker: machinery::broker::redis::RedisBroker) -> machinery::Result<()> {
    /// let (ready, unsettled) = broker.depth("machinery_tasks").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn depth(&self, queue: &str) -> Result<(usize, usize)> {
        let ready: usize = self
            .shared
            .query(redis::cmd("LLEN").arg(queue), "read a queue length")
            .await?;
        let consumers: Vec<String> = self
            .shared
            .query(
                redis::cmd("SMEMBERS").arg(Keys::consumers_of(queue)),
                "read the consumers",
            )
            .await?;
        let mut unsettled = 0;
        for id in consumers {
            let n: usize = self
                .shared
                .query(
                    redis::cmd("LLEN").arg(Keys::processing_of(queue, &id)),
                    "read a processing list",
                )
                .await?;
            unsettled += n;
        }
        Ok((ready, unsettled))
    }

    /// Starts the mover of due delayed messages, once per broker (Go starts it with
    /// `StartConsuming`).
    fn start_mover(&self) {
        let mut mover = lock(&self.shared.mover);
        if mover.is_some() {
            return;
        }
        let weak = Arc::downgrade(&self.shared);
        let every = self.shared.delayed_poll;
        *mover = Some(tokio::spawn(async move {
            loop {
                let Some(shared) = weak.upgrade() else { return };
                let moved = shared.move_due().await;
                drop(shared);
                match moved {
                    Ok(n) if n >= MOVE_BATCH => continue,
                    Ok(n) => {
                        if n > 0 {
                            debug!(moved = n, "delayed messages are due");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot move due delayed messages"),
                }
                tokio::time::sleep(every).await;
            }
        }));
    }
}

impl Shared {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, what: &str) -> Result<T> {
        let mut conn = self.conn.clone();
        let reply = self.link.watch(cmd.query_async(&mut conn)).await;
        reply.map_err(|e| broker_error(format!("Redis at {}: cannot {what}", self.display), e))
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        what: &str,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        let reply = self.link.watch(invocation.invoke_async(&mut conn)).await;
        reply.map_err(|e| broker_error(format!("Redis at {}: cannot {what}", self.display), e))
    }

    fn decode_all(&self, bodies: &[Vec<u8>]) -> Result<Vec<Signature>> {
        bodies
            .iter()
            .map(|body| {
                if body.len() > self.max_message_size {
                    return Err(Error::new(
                        ErrorKind::Decode,
                        format!(
                            "a message of {} bytes is larger than max_message_size ({} bytes)",
                            body.len(),
                            self.max_message_size
                        ),
                    ));
                }
                Signature::from_json(body)
            })
            .collect()
    }

    async fn move_due(&self) -> Result<usize> {
        self.script(
            self.move_due
                .key(&self.delayed_key)
                .arg(now_nanos())
                .arg(MOVE_BATCH)
                .arg(&self.default_queue)
                .arg(self.max_message_size),
            "move due delayed messages",
        )
        .await
    }

    async fn beat(&self, keys: &Keys, alive: bool) -> Result<usize> {
        let ttl = u64::try_from(HEARTBEAT_TTL.as_millis()).unwrap_or(u64::MAX);
        self.script(
            self.heartbeat
                .key(&keys.consumers)
                .key(&keys.queue)
                .key(&keys.deliveries)
                .arg(if alive { keys.id.as_str() } else { "" })
                .arg(ttl)
                .arg(&keys.queue),
            "refresh the heartbeat",
        )
        .await
    }
}

/// The keys of one consumer of one queue.
#[derive(Debug)]
struct Keys {
    id: String,
    queue: String,
    processing: String,
    heartbeat: String,
    consumers: String,
    deliveries: String,
    dead_letter: String,
    reasons: String,
}

impl Keys {
    fn new(queue: &str) -> Keys {
        let uuid = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{}-{}", std::process::id(), &uuid[..12]);
        Keys {
            processing: Keys::processing_of(queue, &id),
            heartbeat: format!("{queue}.heartbeat.{id}"),
            consumers: Keys::consumers_of(queue),
            deliveries: format!("{queue}.deliveries"),
            dead_letter: RedisBroker::dead_letter_list(queue),
            reasons: RedisBroker::dead_letter_reasons(queue),
            queue: queue.to_owned(),
            id,
        }
    }

    fn processing_of(queue: &str, id: &str) -> String {
        format!("{queue}.processing.{id}")
    }

    fn consumers_of(queue: &str) -> String {
        format!("{queue}.consumers")
    }
}

/// The SHA-1 of `body` in hex, as Lua's `redis.sha1hex` computes it (the key of a dead
/// letter's reason).
fn sha1_hex(body: &[u8]) -> String {
    sha1_smol::Sha1::from(body).digest().to_string()
}

#[async_trait]
impl Broker for RedisBroker {
    /// Go's `AdjustRoutingKey` on its Redis broker: the default queue.
    fn default_routing_key(&self) -> &str {
        &self.shared.default_queue
    }

    /// The queue list's length (`LLEN`).
    async fn queue_depth(&self, queue: &str) -> Result<Option<u64>> {
        let ready: u64 = self
            .shared
            .query(redis::cmd("LLEN").arg(queue), "read a queue length")
            .await?;
        Ok(Some(ready))
    }

    /// The dead-letter list's length (`LLEN`).
    async fn dead_letter_depth(&self, queue: &str) -> Result<Option<u64>> {
        let dead: u64 = self
            .shared
            .query(
                redis::cmd("LLEN").arg(RedisBroker::dead_letter_list(queue)),
                "read a dead-letter list's length",
            )
            .await?;
        Ok(Some(dead))
    }

    /// The times a call failed on the connection and a later one succeeded: the connection
    /// was made again.
    fn reconnects(&self) -> u64 {
        self.shared.link.reconnects.load(Ordering::Relaxed)
    }

    fn validate(&self, message: &Message) -> Result<()> {
        if message.routing_key.is_empty() {
            return Err(Error::encode(
                "a message for Redis needs a routing key (a list name)",
            ));
        }
        Ok(())
    }

    async fn publish(&self, message: Message) -> Result<()> {
        self.validate(&message)?;
        let mut pipe = redis::pipe();
        push(&mut pipe, &self.shared.delayed_key, &message);
        let _: Vec<Value> = self.shared.query_pipe(&pipe, "publish").await?;
        Ok(())
    }

    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<()>> {
        let mut outcomes: Vec<Option<Result<()>>> = Vec::with_capacity(messages.len());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for message in &messages {
            match self.validate(message) {
                Ok(()) => {
                    push(&mut pipe, &self.shared.delayed_key, message);
                    outcomes.push(None);
                }
                Err(e) => outcomes.push(Some(Err(e))),
            }
        }
        if pipe.is_empty() {
            return outcomes.into_iter().map(|o| o.unwrap_or(Ok(()))).collect();
        }
        let mut conn = self.shared.conn.clone();
        let replies: redis::RedisResult<Vec<redis::RedisResult<Value>>> =
            self.shared.link.watch(pipe.query_async(&mut conn)).await;
        let display = &self.shared.display;
        match replies {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                outcomes
                    .into_iter()
                    .map(|o| match o {
                        Some(done) => done,
                        None => match replies.next() {
                            Some(Ok(_)) => Ok(()),
                            Some(Err(e)) => Err(broker_error(
                                format!("Redis at {display}: cannot publish"),
                                e,
                            )),
                            None => Err(Error::new(
                                ErrorKind::Broker,
                                format!("Redis at {display}: a publish got no reply"),
                            )),
                        },
                    })
                    .collect()
            }
            Err(e) => {
                let message = format!("Redis at {display}: cannot publish: {e}");
                outcomes
                    .into_iter()
                    .map(|o| {
                        o.unwrap_or_else(|| Err(Error::new(ErrorKind::Broker, message.clone())))
                    })
                    .collect()
            }
        }
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>> {
        let keys = Arc::new(Keys::new(queue));
        self.shared.beat(&keys, true).await?;
        let blocking = self.shared.blocking_connection().await?;
        self.start_mover();
        let heartbeat = tokio::spawn({
            let shared = Arc::downgrade(&self.shared);
            let keys = keys.clone();
            async move {
                loop {
                    tokio::time::sleep(HEARTBEAT_EVERY).await;
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    match shared.beat(&keys, true).await {
                        Ok(0) => trace!(consumer = %keys.id, "heartbeat"),
                        Ok(n) => warn!(
                            consumer = %keys.id,
                            queue = %keys.queue,
                            recovered = n,
                            "took back the messages of consumers whose heartbeat is gone"
                        ),
                        Err(e) => warn!(consumer = %keys.id, error = %e, "heartbeat failed"),
                    }
                }
            }
        });
        let (acks, requests) = mpsc::unbounded_channel();
        // Ends when the consumer and all its deliveries are gone.
        tokio::spawn(flush_acks(self.shared.clone(), keys.clone(), requests));
        debug!(queue, consumer = %keys.id, prefetch, "consuming from Redis");
        Ok(Box::new(RedisConsumer {
            shared: self.shared.clone(),
            keys,
            blocking: Some(blocking),
            unsettled: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
            buffer: VecDeque::new(),
            cancelled: false,
            heartbeat: Some(heartbeat),
            acks,
            taking: None,
        }))
    }
}

/// Settles the acks of one consumer, as many as are waiting (up to [`ACK_BATCH`]) in one
/// script call: acks from concurrent tasks share round trips.
async fn flush_acks(
    shared: Arc<Shared>,
    keys: Arc<Keys>,
    mut requests: mpsc::UnboundedReceiver<AckRequest>,
) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while requests.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let mut invocation = shared.ack.key(&keys.processing);
        invocation.key(&keys.deliveries);
        for (body, _) in &batch {
            invocation.arg(&body[..]);
        }
        let outcome: Result<Vec<i64>> = shared.script(&invocation, "acknowledge messages").await;
        match outcome {
            Ok(moved) if moved.len() == batch.len() => {
                for ((_, reply), n) in batch.drain(..).zip(moved) {
                    let _ = reply.send(Ok(n));
                }
            }
            Ok(_) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(Error::new(
                        ErrorKind::Broker,
                        "the ack script returned an unexpected reply",
                    )));
                }
            }
            Err(e) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(Error::new(ErrorKind::Broker, e.to_string())));
                }
            }
        }
    }
}

/// Adds the command publishing `message`: `RPUSH` now, or `ZADD` to the delayed set scored by
/// the time it is due in Unix nanoseconds (Go: `Publish` in v2/brokers/redis/redis.go).
fn push(pipe: &mut redis::Pipeline, delayed_key: &str, message: &Message) {
    match message.delay {
        Some(delay) if !delay.is_zero() => {
            let due =
                now_nanos().saturating_add(i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX));
            pipe.cmd("ZADD")
                .arg(delayed_key)
                .arg(due)
                .arg(&message.body[..]);
        }
        _ => {
            pipe.cmd("RPUSH")
                .arg(&message.routing_key)
                .arg(&message.body[..]);
        }
    }
}

impl Shared {
    async fn query_pipe(&self, pipe: &redis::Pipeline, what: &str) -> Result<Vec<Value>> {
        let mut conn = self.conn.clone();
        let reply = self.link.watch(pipe.query_async(&mut conn)).await;
        reply.map_err(|e| broker_error(format!("Redis at {}: cannot {what}", self.display), e))
    }

    /// A connection of its own for `BLMOVE`, which holds its connection while it waits.
    async fn blocking_connection(&self) -> Result<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| broker_error(format!("cannot connect to Redis at {}", self.display), e))
    }
}

/// A message taken, not yet handed out.
struct Taken {
    body: Bytes,
    deliveries: u32,
    permit: OwnedSemaphorePermit,
}

struct RedisConsumer {
    shared: Arc<Shared>,
    keys: Arc<Keys>,
    blocking: Option<MultiplexedConnection>,
    unsettled: Arc<Semaphore>,
    buffer: VecDeque<Taken>,
    cancelled: bool,
    heartbeat: Option<JoinHandle<()>>,
    acks: mpsc::UnboundedSender<AckRequest>,
    /// A take whose reply is not buffered yet (see [`RedisConsumer::take`]).
    taking: Option<JoinHandle<TakeReply>>,
}

/// The take script's reply, and the permits it was given.
type TakeReply = (Result<Vec<Value>>, Vec<OwnedSemaphorePermit>);

impl fmt::Debug for RedisConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConsumer")
            .field("queue", &self.keys.queue)
            .field("consumer", &self.keys.id)
            .field("buffered", &self.buffer.len())
            .field("cancelled", &self.cancelled)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }
}

/// Runs the take script: up to `n` messages moved from the queue into the processing list.
async fn take_script(shared: &Shared, k: &Keys, n: usize) -> Result<Vec<Value>> {
    shared
        .script(
            shared
                .take
                .key(&k.queue)
                .key(&k.processing)
                .key(&k.deliveries)
                .key(&k.dead_letter)
                .key(&k.reasons)
                .arg(n)
                .arg(shared.max_message_size),
            "take messages",
        )
        .await
}

impl RedisConsumer {
    /// Takes up to `permits.len()` messages; returns how many.
    ///
    /// The take script runs in a task of its own, kept in `self.taking` until its reply is
    /// buffered: if this future is dropped meanwhile (the worker dropped `next()` to give a
    /// slot back), the messages the script moved into the processing list are not stranded
    /// there, the next call picks up the reply.
    async fn take(&mut self, permits: Option<Vec<OwnedSemaphorePermit>>) -> Result<usize> {
        if let Some(permits) = permits {
            let (shared, keys) = (self.shared.clone(), self.keys.clone());
            self.taking = Some(tokio::spawn(async move {
                let reply = take_script(&shared, &keys, permits.len()).await;
                (reply, permits)
            }));
        }
        let Some(taking) = self.taking.as_mut() else {
            return Ok(0);
        };
        let joined = taking.await;
        self.taking = None;
        let (reply, mut permits) = joined.map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("Redis at {}: the take stopped: {e}", self.shared.display),
            )
        })?;
        let mut taken = 0;
        let mut reply = reply?.into_iter();
        while let (Some(body), Some(count)) = (reply.next(), reply.next()) {
            let (Value::BulkString(body), Value::Int(count)) = (body, count) else {
                return Err(Error::new(
                    ErrorKind::Broker,
                    "the take script returned an unexpected reply",
                ));
            };
            let Some(permit) = permits.pop() else { break };
            self.buffer.push_back(Taken {
                body: Bytes::from(body),
                deliveries: u32::try_from(count).unwrap_or(u32::MAX),
                permit,
            });
            taken += 1;
        }
        Ok(taken)
    }

    /// Waits up to the poll period for a message in the queue, without taking it.
    async fn wait(&mut self) -> Result<()> {
        let conn = match &mut self.blocking {
            Some(conn) => conn,
            None => self
                .blocking
                .insert(self.shared.blocking_connection().await?),
        };
        let poll = self.shared.poll.as_secs_f64();
        let mut blmove = redis::cmd("BLMOVE");
        blmove
            .arg(&self.keys.queue)
            .arg(&self.keys.queue)
            .arg("LEFT")
            .arg("LEFT")
            .arg(poll);
        let ticket = self.shared.link.ticket();
        let wait = blmove.query_async::<Value>(conn);
        let reply = tokio::time::timeout(self.shared.poll + RESPONSE_TIMEOUT, wait).await;
        match &reply {
            Ok(reply) => self.shared.link.saw(ticket, reply),
            // No reply at all: the connection is replaced as a dead one.
            Err(_) => self.shared.link.lost(ticket),
        }
        match reply {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.blocking = None;
                Err(broker_error(
                    format!("Redis at {}: cannot wait for messages", self.shared.display),
                    e,
                ))
            }
            Err(_) => {
                self.blocking = None;
                Err(Error::new(
                    ErrorKind::Broker,
                    format!("Redis at {}: no reply while waiting", self.shared.display),
                ))
            }
        }
    }

    fn hand_out(&self, taken: Taken) -> Delivery {
        let acker = RedisAcker {
            shared: self.shared.clone(),
            keys: self.keys.clone(),
            body: taken.body.clone(),
            settled: AtomicBool::new(false),
            _permit: taken.permit,
            acks: self.acks.clone(),
        };
        Delivery::new(taken.body, taken.deliveries > 0, Box::new(acker))
            .with_delivery_count(taken.deliveries)
    }

    /// One step of taking: `Ok(true)` when something is buffered.
    async fn fill(&mut self) -> Result<bool> {
        if self.taking.is_some() {
            // A take cut short: its reply first.
            return Ok(self.take(None).await? > 0);
        }
        let first = self
            .unsettled
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::new(ErrorKind::Broker, "the consumer is closed"))?;
        let mut permits = vec![first];
        while permits.len() < TAKE_BATCH {
            match self.unsettled.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        if self.take(Some(permits)).await? > 0 {
            return Ok(true);
        }
        self.wait().await?;
        Ok(false)
    }
}

impl RedisConsumer {
    /// [`Consumer::next`]: its future is the box every delivery makes.
    async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        let mut failing_since: Option<Instant> = None;
        loop {
            if self.cancelled {
                return None;
            }
            if let Some(taken) = self.buffer.pop_front() {
                return Some(Ok(self.hand_out(taken)));
            }
            // Boxed: under a backlog a fill serves many deliveries, and its future (over
            // 2 KiB) would otherwise be part of the one every delivery's `next` makes.
            match Box::pin(self.fill()).await {
                Ok(_) => failing_since = None,
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.shared.reconnect_timeout {
                        return Some(Err(e));
                    }
                    warn!(queue = %self.keys.queue, error = %e, "Redis broker: retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.next_delivery().await
    }

    async fn cancel(&mut self) -> Result<()> {
        self.cancelled = true;
        // A take cut short is finished first: its messages are given back with the rest.
        let mut outcome = self.take(None).await.map(drop);
        // Messages taken but never handed out go back to the head of the queue, in order and
        // not counted as deliveries.
        let k = &self.keys;
        while let Some(taken) = self.buffer.pop_back() {
            let released: Result<i64> = self
                .shared
                .script(
                    self.shared
                        .requeue
                        .key(&k.processing)
                        .key(&k.queue)
                        .key(&k.deliveries)
                        .arg(&taken.body[..])
                        .arg("0"),
                    "give back a message",
                )
                .await;
            if let Err(e) = released {
                outcome = Err(e);
            }
        }
        outcome
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        // What is left in the processing list (an ack that failed) goes back to the queue,
        // counted: the heartbeat is deleted and this consumer recovered like a dead one.
        let k = &self.keys;
        self.shared
            .query::<i64>(redis::cmd("DEL").arg(&k.heartbeat), "delete the heartbeat")
            .await?;
        let recovered = self.shared.beat(k, false).await?;
        if recovered > 0 {
            warn!(queue = %k.queue, consumer = %k.id, recovered, "unsettled messages went back to the queue");
        }
        Ok(())
    }
}

struct RedisAcker {
    shared: Arc<Shared>,
    keys: Arc<Keys>,
    body: Bytes,
    settled: AtomicBool,
    _permit: OwnedSemaphorePermit,
    acks: mpsc::UnboundedSender<AckRequest>,
}

impl fmt::Debug for RedisAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAcker")
            .field("consumer", &self.keys.id)
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl RedisAcker {
    async fn requeue(shared: &Shared, keys: &Keys, body: &[u8]) -> Result<i64> {
        shared
            .script(
                shared
                    .requeue
                    .key(&keys.processing)
                    .key(&keys.queue)
                    .key(&keys.deliveries)
                    .arg(body)
                    .arg("1"),
                "requeue a message",
            )
            .await
    }

    fn settled(&self, moved: i64) {
        self.settled.store(true, Ordering::Release);
        if moved == 0 {
            // Another consumer took it back, thinking this one dead: it will be delivered
            // again, and the store keeps it from running twice.
            warn!(consumer = %self.keys.id, "a settled message was no longer in the processing list");
        }
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self) -> Result<()> {
        let gone = || Error::new(ErrorKind::Broker, "the Redis consumer's acks stopped");
        let (tx, rx) = oneshot::channel();
        self.acks
            .send((self.body.clone(), tx))
            .map_err(|_| gone())?;
        let moved = rx.await.map_err(|_| gone())??;
        self.settled(moved);
        Ok(())
    }

    async fn reject(&self, how: Rejection) -> Result<()> {
        let k = &self.keys;
        let moved = match how {
            Rejection::Requeue => RedisAcker::requeue(&self.shared, k, &self.body).await?,
            Rejection::DeadLetter { reason } => {
                self.shared
                    .script(
                        self.shared
                            .dead_letter
                            .key(&k.processing)
                            .key(&k.dead_letter)
                            .key(&k.reasons)
                            .key(&k.deliveries)
                            .arg(&self.body[..])
                            .arg(reason),
                        "dead-letter a message",
                    )
                    .await?
            }
        };
        self.settled(moved);
        Ok(())
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Acquire) {
            return;
        }
        // Unsettled (a worker stopped mid-task, or the settling call failed): back to the
        // queue, counted. If this cannot run, the message stays in the processing list, which
        // `close` or another consumer's recovery gives back.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let keys = self.keys.clone();
        let body = self.body.clone();
        runtime.spawn(async move {
            if let Err(e) = RedisAcker::requeue(&shared, &keys, &body).await {
                warn!(consumer = %keys.id, error = %e, "cannot give back an unsettled message");
            }
        });
    }
}

/// The inclusive positions of `count` items from `start`, as `LRANGE` and `ZRANGE` take them;
/// `None` when there are none to read (a count of zero, or a start past what Redis indexes).
fn range(start: usize, count: usize) -> Option<(i64, i64)> {
    let start = i64::try_from(start).ok()?;
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    (count > 0).then(|| (start, start.saturating_add(count - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::returned_size;

    /// Every delivery is a call of `next`, whose future `async_trait` boxes (that of
    /// `next_delivery`, measured here, and a few bytes more). Filling the buffer
    /// (once for many deliveries) is boxed apart: with it inline, the future was about 2.3 KiB,
    /// above what glibc's `malloc` serves from its per-thread cache, so that every delivery
    /// took its slower path.
    #[test]
    fn the_future_of_each_delivery_is_small() {
        let size = returned_size(|consumer: &'static mut RedisConsumer| consumer.next_delivery());
        assert!(size <= 512, "next: {size} bytes");
    }

    fn dropped() -> redis::RedisResult<()> {
        Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe").into())
    }

    #[test]
    fn a_drop_seen_by_calls_in_flight_is_one_reconnect() {
        let link = LinkHealth::default();
        let (a, b) = (link.ticket(), link.ticket());
        // `a` fails on the dropped connection; `b` started before the failure and its reply
        // (from the old connection) comes after: no reconnect yet.
        link.saw(a, &dropped());
        link.saw(b, &Ok(()));
        assert_eq!(link.reconnects.load(Ordering::SeqCst), 0);
        // A call started after the failure succeeds: one reconnect.
        let c = link.ticket();
        let d = link.ticket();
        link.saw(c, &Ok(()));
        assert_eq!(link.reconnects.load(Ordering::SeqCst), 1);
        // `d` started before the recovery was seen and fails late: still one.
        link.saw(d, &dropped());
        let e = link.ticket();
        link.saw(e, &Ok(()));
        assert_eq!(link.reconnects.load(Ordering::SeqCst), 1);
        // A second drop is a second reconnect.
        let f = link.ticket();
        link.saw(f, &dropped());
        let g = link.ticket();
        link.saw(g, &Ok(()));
        assert_eq!(link.reconnects.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn errors_of_the_server_are_no_reconnect() {
        let link = LinkHealth::default();
        let a = link.ticket();
        let refused: redis::RedisResult<()> = Err(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        )));
        link.saw(a, &refused);
        let b = link.ticket();
        link.saw(b, &Ok(()));
        assert_eq!(link.reconnects.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn sha1_matches_known_digests() {
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(
            sha1_hex(&[b'a'; 1000]),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
    }

    #[test]
    fn key_names() {
        let keys = Keys::new("q");
        assert!(keys.processing.starts_with("q.processing."));
        assert_eq!(keys.dead_letter, "q.dead_letter");
        assert_eq!(keys.deliveries, "q.deliveries");
        assert_eq!(keys.consumers, "q.consumers");
    }
}
