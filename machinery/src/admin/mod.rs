//! Operating a deployment: queues, dead letters, live workers, recent tasks, task trees,
//! throughput and revokes, for the `machinery` CLI and the web dashboard alike.
//!
//! [`Admin`] connects with the same [`Config`] as the workers. What it reads:
//!
//! - **queues and dead letters** from the broker: on RabbitMQ a passive declare of each queue
//!   and its `<queue>.dead_letter` queue (depth and consumers), and the dead letters through
//!   `basic.get` on a channel of its own (unacknowledged, so they go back in order when the
//!   channel closes); on Redis the broker's lists (`<queue>`, `<queue>.dead_letter` with its
//!   `.reasons` hash, the processing lists, `delayed_tasks`);
//! - **task states and groups** from the result backend;
//! - **workers, recent tasks, throughput and task links** from the keys that workers write in
//!   Redis (the result backend's when it is Redis, else the broker's; see
//!   [`RegistryConfig`](crate::config::RegistryConfig) and the README's "Operate it" section,
//!   which lists every key). Without Redis these calls fail with
//!   [`ErrorKind::Unsupported`].
//!
//! Everything that lists is paginated ([`Page`]); nothing loads a whole queue or index.
//!
//! ```no_run
//! use machinery::admin::{Admin, Page};
//! use machinery::wire::State;
//!
//! # async fn demo() -> machinery::Result<()> {
//! let admin = Admin::from_config(&machinery::Config::from_env()?).await?;
//! for queue in admin.queues().await? {
//!     println!("{}: {} ready, {} dead", queue.name, queue.depth, queue.dead_letters);
//! }
//! for worker in admin.workers().await? {
//!     println!("{} on {}: {} in flight", worker.name, worker.host, worker.in_flight);
//! }
//! let failed = admin.recent(State::Failure, Page::first(20)).await?;
//! for task in failed.items {
//!     println!("{} failed at {}", task.uuid, task.at_ms);
//! }
//! # Ok(())
//! # }
//! ```

// Without both network brokers, parts of the broker-side helpers have no caller.
#![cfg_attr(not(all(feature = "amqp", feature = "redis")), allow(unused))]

pub(crate) mod keys;
#[cfg(feature = "redis")]
mod ops;
mod tree;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::ResultBackend;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::server::Server;
use crate::wire::{Signature, State, TaskState};

#[cfg(feature = "redis")]
pub(crate) use ops::{registry_redis_url, state_key};
pub(crate) use tree::Shape;
pub use tree::{Link, NodeKind, TreeNode};

/// A page of a listing: skip `offset` items, return at most `limit`.
///
/// ```
/// use machinery::admin::Page;
/// let page = Page::first(50);
/// assert_eq!(page.next().offset, 50);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Items skipped.
    pub offset: usize,
    /// Items returned at most (capped at [`Page::MAX_LIMIT`]).
    pub limit: usize,
}

impl Page {
    /// The largest page served.
    pub const MAX_LIMIT: usize = 1000;

    /// The first `limit` items.
    pub fn first(limit: usize) -> Page {
        Page { offset: 0, limit }
    }

    /// The page after this one.
    pub fn next(self) -> Page {
        Page {
            offset: self.offset.saturating_add(self.limit),
            limit: self.limit,
        }
    }

    /// The limit actually served: at least 1, at most [`MAX_LIMIT`](Self::MAX_LIMIT).
    pub fn capped_limit(self) -> usize {
        self.limit.clamp(1, Page::MAX_LIMIT)
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Paged<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// How many items the whole listing holds, when known cheaply.
    pub total: Option<u64>,
    /// The next page, if there are more items.
    pub next: Option<Page>,
}

impl<T> Paged<T> {
    /// `items`, one page of a listing of `total` that started at `page`'s offset and asked for
    /// `limit` items: there is a next page when the listing holds more and this one was full.
    pub(crate) fn of(items: Vec<T>, total: u64, page: Page, limit: usize) -> Paged<T> {
        let served = items.len();
        let more = u64::try_from(page.offset.saturating_add(served)).unwrap_or(u64::MAX) < total;
        Paged {
            items,
            total: Some(total),
            next: (more && served == limit).then(|| page.next()),
        }
    }
}

/// A queue, as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Messages ready in the queue.
    pub depth: u64,
    /// Consumers of the queue (RabbitMQ's count; on Redis the consumers with a heartbeat
    /// list).
    pub consumers: u64,
    /// Messages taken by consumers and not yet settled (Redis: the processing lists; `None`
    /// on RabbitMQ, whose passive declare does not say).
    pub unsettled: Option<u64>,
    /// Messages in the queue's dead-letter queue (`<queue>.dead_letter`).
    pub dead_letters: u64,
    /// Whether the queue exists (RabbitMQ: the passive declare found it).
    pub exists: bool,
}

/// A dead-lettered message.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id: the task UUID when the body is a signature with one, else `sha1:` and the
    /// SHA-1 of the body (hex).
    pub id: String,
    /// The queue it was dead-lettered from.
    pub queue: String,
    /// Why it was dead-lettered (empty when the broker did not keep a reason).
    pub reason: String,
    /// The task's name, when the body is a signature.
    pub task_name: Option<String>,
    /// The body's size in bytes.
    pub size: usize,
    /// The decoded signature, when the body is one.
    pub signature: Option<Signature>,
    /// The body, lossily as UTF-8, cut to 64 KiB (for a body that is no signature).
    pub body_preview: String,
}

/// Which dead letters to requeue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message in the dead-letter queue (those there when the requeue starts).
    All,
    /// The messages with these ids ([`DeadLetter::id`]).
    Ids(Vec<String>),
}

/// Progress of a long operation: `done` of `total` (when known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Messages handled so far.
    pub done: u64,
    /// Messages to handle, when known.
    pub total: Option<u64>,
}

/// What a requeue did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RequeueReport {
    /// Messages published again to their queue and removed from the dead-letter queue.
    pub requeued: u64,
    /// Ids asked for that were not found in the dead-letter queue.
    pub not_found: Vec<String>,
    /// Messages that are no signature: left in the dead-letter queue (they would only be
    /// dead-lettered again).
    pub skipped: u64,
}

/// A live worker, as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Unique id of this worker process (`name@host/pid`).
    pub id: String,
    /// The worker's name (its consumer tag).
    pub name: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The machinery version it runs.
    pub version: String,
    /// The queues it consumes.
    pub queues: Vec<String>,
    /// How many tasks it runs at once at most.
    pub concurrency: usize,
    /// Tasks running now.
    pub in_flight: u64,
    /// Tasks run since it started.
    pub processed: u64,
    /// Of those, the failed runs (retries included).
    pub failed: u64,
    /// When it started (Unix ms).
    pub started_at_ms: i64,
    /// When it last sent a heartbeat (Unix ms).
    pub heartbeat_at_ms: i64,
    /// Its heartbeat period (ms); the record expires after three.
    pub heartbeat_ms: u64,
}

/// A task in the recent index.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RecentTask {
    /// The task's UUID.
    pub uuid: String,
    /// When it reached the state of the index (Unix ms).
    pub at_ms: i64,
    /// Its stored state now (`None` when the result backend has none: expired, or none
    /// configured).
    pub state: Option<TaskState>,
}

/// Tasks run and failed in one time bucket, over every worker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ThroughputBucket {
    /// The bucket's start (Unix seconds).
    pub start: i64,
    /// The bucket's width in seconds.
    pub seconds: i64,
    /// Task runs that ended in the bucket.
    pub processed: u64,
    /// Of those, the failed ones (retries included).
    pub failed: u64,
    /// `processed / seconds`.
    pub tasks_per_sec: f64,
    /// `failed / seconds`.
    pub failures_per_sec: f64,
}

/// A task's stored state and what the index knows of it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct TaskInfo {
    /// The task's UUID.
    pub uuid: String,
    /// Its stored state, if any.
    pub state: Option<TaskState>,
    /// When it entered each state of the recent index (`STARTED`, `RETRY`, `SUCCESS`,
    /// `FAILURE`), oldest first, as Unix ms; empty without the registry or once the index
    /// dropped it.
    pub timeline: Vec<(State, i64)>,
}

/// The broker side of [`Admin`].
#[derive(Clone)]
enum BrokerOps {
    #[cfg(feature = "amqp")]
    Amqp(crate::broker::amqp::AmqpBroker),
    #[cfg(feature = "redis")]
    Redis(crate::broker::redis::RedisBroker),
    /// The embedded broker, or one built by hand: no queue inspection.
    Other,
}

/// The operator's view of a deployment; see the [module docs](self).
///
/// Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    server: Server,
    broker: BrokerOps,
    #[cfg(feature = "redis")]
    ops: Option<ops::OpsStore>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Connects to the broker, the result backend and the registry's Redis of `config`.
    ///
    /// Fails as [`Server::new`] does (a bad URL: [`ErrorKind::Config`]; an unreachable
    /// broker: [`ErrorKind::Broker`]). Errors never contain a password.
    ///
    /// ```no_run
    /// # async fn demo() -> machinery::Result<()> {
    /// let config = machinery::Config::builder()
    ///     .broker("amqp://guest:guest@127.0.0.1:5672/")
    ///     .result_backend("redis://127.0.0.1:6379/")
    ///     .build()?;
    /// let admin = machinery::admin::Admin::from_config(&config).await?;
    /// # drop(admin);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_config(config: &Config) -> Result<Admin> {
        config.validate()?;
        let (broker, ops_broker) = open_broker(config).await?;
        let backend = crate::server::open_backend(config).await?;
        let server = Server::from_parts(config.clone(), ops_broker, backend);
        #[cfg(feature = "redis")]
        let ops = match ops::registry_redis_url(config) {
            Some(url) => Some(ops::OpsStore::connect(&url, config).await?),
            None => None,
        };
        Ok(Admin {
            server,
            broker,
            #[cfg(feature = "redis")]
            ops,
        })
    }

    /// The server `Admin` uses (to send tasks, wait for results).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.server.config()
    }

    /// The queues to report: the default queue, the queues the live workers consume, and
    /// `extra`, each once, sorted.
    async fn queue_names(&self, extra: &[String]) -> Vec<String> {
        let mut names = BTreeSet::new();
        names.insert(self.config().default_queue.clone());
        if let Ok(workers) = self.workers().await {
            for worker in workers {
                names.extend(worker.queues);
            }
        }
        names.extend(extra.iter().cloned());
        names.into_iter().collect()
    }

    /// Depth, consumers and dead-letter depth of every machinery queue: the default queue
    /// and those the live workers consume.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>> {
        self.queues_with(&[]).await
    }

    /// Like [`queues`](Self::queues), with `extra` queues as well.
    pub async fn queues_with(&self, extra: &[String]) -> Result<Vec<QueueInfo>> {
        let names = self.queue_names(extra).await;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.queue(&name).await?);
        }
        Ok(out)
    }

    /// One queue's depth, consumers and dead-letter depth.
    pub async fn queue(&self, queue: &str) -> Result<QueueInfo> {
        check_queue_name(queue)?;
        match &self.broker {
            #[cfg(feature = "amqp")]
            BrokerOps::Amqp(b) => b.admin_queue(queue).await,
            #[cfg(feature = "redis")]
            BrokerOps::Redis(b) => b.admin_queue(queue).await,
            BrokerOps::Other => Err(no_broker_ops()),
        }
    }

    /// The dead letters of `queue` (the default queue when `None`), oldest first.
    pub async fn dead_letters(&self, queue: Option<&str>, page: Page) -> Result<Paged<DeadLetter>> {
        let queue = self.queue_or_default(queue)?;
        match &self.broker {
            #[cfg(feature = "amqp")]
            BrokerOps::Amqp(b) => b.admin_dead_letters(&queue, page).await,
            #[cfg(feature = "redis")]
            BrokerOps::Redis(b) => b.admin_dead_letters(&queue, page).await,
            BrokerOps::Other => Err(no_broker_ops()),
        }
    }

    /// One dead letter of `queue` by id ([`DeadLetter::id`]), if it is there.
    pub async fn dead_letter(&self, queue: Option<&str>, id: &str) -> Result<Option<DeadLetter>> {
        let mut page = Page::first(Page::MAX_LIMIT);
        loop {
            let listed = self.dead_letters(queue, page).await?;
            if let Some(found) = listed.items.into_iter().find(|d| d.id == id) {
                return Ok(Some(found));
            }
            match listed.next {
                Some(next) => page = next,
                None => return Ok(None),
            }
        }
    }

    /// Publishes dead letters of `queue` again, to the queue their signature names (its
    /// `RoutingKey`, else `queue`), with a fresh attempt count: the attempt and last-error
    /// headers are dropped, and the stored state is replaced by PENDING so that the task runs
    /// again, unless it is SUCCESS or revoked. `progress` is called after each message. A message is removed from the
    /// dead-letter queue only after it was published.
    pub async fn requeue(
        &self,
        queue: Option<&str>,
        which: &Selection,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<RequeueReport> {
        let queue = self.queue_or_default(queue)?;
        match &self.broker {
            #[cfg(feature = "amqp")]
            BrokerOps::Amqp(b) => b.admin_requeue(self, &queue, which, progress).await,
            #[cfg(feature = "redis")]
            BrokerOps::Redis(b) => b.admin_requeue(self, &queue, which, progress).await,
            BrokerOps::Other => {
                let _ = (which, progress);
                Err(no_broker_ops())
            }
        }
    }

    /// Deletes every dead letter of `queue`; returns how many there were.
    pub async fn purge_dead_letters(&self, queue: Option<&str>) -> Result<u64> {
        let queue = self.queue_or_default(queue)?;
        match &self.broker {
            #[cfg(feature = "amqp")]
            BrokerOps::Amqp(b) => {
                b.admin_purge(&crate::broker::amqp::AmqpBroker::dead_letter_queue(&queue))
                    .await
            }
            #[cfg(feature = "redis")]
            BrokerOps::Redis(b) => b.admin_purge_dead_letters(&queue).await,
            BrokerOps::Other => Err(no_broker_ops()),
        }
    }

    /// Deletes every message waiting in `queue` (not those consumers hold); returns how many
    /// there were.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        check_queue_name(queue)?;
        match &self.broker {
            #[cfg(feature = "amqp")]
            BrokerOps::Amqp(b) => b.admin_purge(queue).await,
            #[cfg(feature = "redis")]
            BrokerOps::Redis(b) => b.admin_purge(queue).await,
            BrokerOps::Other => Err(no_broker_ops()),
        }
    }

    /// The live workers (those whose record has not expired), by name.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.ops()?.workers().await
    }

    /// The tasks that reached `state` recently, newest first, with their stored states
    /// (one read of the index page and one of the backend). The index has `STARTED`,
    /// `SUCCESS`, `FAILURE` and `RETRY`.
    pub async fn recent(&self, state: State, page: Page) -> Result<Paged<RecentTask>> {
        let (ids, total) = self.ops()?.recent(state, page).await?;
        let states = match self.server.backend() {
            Some(backend) if !ids.is_empty() => {
                let uuids: Vec<String> = ids.iter().map(|(u, _)| u.clone()).collect();
                backend.get_states(&uuids).await?
            }
            _ => vec![None; ids.len()],
        };
        let served = ids.len();
        let items = ids
            .into_iter()
            .zip(states)
            .map(|((uuid, at_ms), state)| RecentTask { uuid, at_ms, state })
            .collect();
        let next = (page.offset.saturating_add(served)
            < usize::try_from(total).unwrap_or(usize::MAX)
            && served > 0)
            .then(|| Page {
                offset: page.offset + served,
                limit: page.limit,
            });
        Ok(Paged {
            items,
            total: Some(total),
            next,
        })
    }

    /// A task's stored state.
    pub async fn task(&self, uuid: &str) -> Result<TaskInfo> {
        check_uuid(uuid)?;
        let state = self.backend()?.get_state(uuid).await?;
        #[cfg(feature = "redis")]
        let timeline = match &self.ops {
            Some(ops) => ops.timeline(uuid).await?,
            None => Vec::new(),
        };
        #[cfg(not(feature = "redis"))]
        let timeline = Vec::new();
        Ok(TaskInfo {
            uuid: uuid.to_owned(),
            state,
            timeline,
        })
    }

    /// The chain, group or chord `uuid` belongs to, with each member's state; see
    /// [`TreeNode`] for what can be recovered.
    pub async fn tree(&self, uuid: &str) -> Result<TreeNode> {
        check_uuid(uuid)?;
        tree::build(self, uuid).await
    }

    /// Tasks/s and failures/s per bucket over the last `window` (at most an hour), oldest
    /// first; buckets without runs count 0.
    pub async fn throughput(&self, window: Duration) -> Result<Vec<ThroughputBucket>> {
        self.ops()?.throughput(window).await
    }

    /// Revokes a task ([`Server::revoke`]).
    pub async fn revoke(&self, uuid: &str) -> Result<bool> {
        self.server.revoke(uuid).await
    }

    fn backend(&self) -> Result<&Arc<dyn ResultBackend>> {
        self.server.backend().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "no result backend is configured (RESULT_BACKEND)",
            )
        })
    }

    #[cfg(feature = "redis")]
    fn ops(&self) -> Result<&ops::OpsStore> {
        self.ops.as_ref().ok_or_else(no_registry)
    }

    #[cfg(not(feature = "redis"))]
    fn ops(&self) -> Result<&NoOps> {
        Err(no_registry())
    }

    fn queue_or_default(&self, queue: Option<&str>) -> Result<String> {
        let queue = queue.unwrap_or(&self.config().default_queue).to_owned();
        check_queue_name(&queue)?;
        Ok(queue)
    }
}

/// Without the `redis` feature: no registry.
#[cfg(not(feature = "redis"))]
#[derive(Debug)]
struct NoOps;

#[cfg(not(feature = "redis"))]
impl NoOps {
    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        Err(no_registry())
    }
    async fn recent(&self, _: State, _: Page) -> Result<(Vec<(String, i64)>, u64)> {
        Err(no_registry())
    }
    async fn throughput(&self, _: Duration) -> Result<Vec<ThroughputBucket>> {
        Err(no_registry())
    }
}

fn no_registry() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "the worker registry needs Redis (a redis:// result backend or broker, or REGISTRY_REDIS)",
    )
}

fn no_broker_ops() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "queue inspection needs a RabbitMQ (amqp://) or Redis (redis://) broker",
    )
}

/// The longest queue name accepted (AMQP's limit).
const MAX_QUEUE_NAME: usize = 255;
/// The longest task UUID accepted.
const MAX_UUID: usize = 256;

fn check_queue_name(queue: &str) -> Result<()> {
    if queue.is_empty() || queue.len() > MAX_QUEUE_NAME {
        return Err(Error::config(format!(
            "a queue name must be 1 to {MAX_QUEUE_NAME} bytes long"
        )));
    }
    Ok(())
}

pub(crate) fn check_uuid(uuid: &str) -> Result<()> {
    if uuid.is_empty() || uuid.len() > MAX_UUID {
        return Err(Error::config(format!(
            "a task UUID must be 1 to {MAX_UUID} bytes long"
        )));
    }
    Ok(())
}

/// Opens the broker as its concrete type (for the inspection calls) and as the trait object
/// the server sends with.
async fn open_broker(config: &Config) -> Result<(BrokerOps, Arc<dyn crate::broker::Broker>)> {
    let scheme = config
        .broker
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => {
            let broker = crate::broker::amqp::AmqpBroker::connect(config).await?;
            Ok((BrokerOps::Amqp(broker.clone()), Arc::new(broker)))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" => {
            let broker = crate::broker::redis::RedisBroker::connect(config).await?;
            Ok((BrokerOps::Redis(broker.clone()), Arc::new(broker)))
        }
        _ => Ok((BrokerOps::Other, crate::server::open_broker(config).await?)),
    }
}

/// Describes a message body taken from a dead-letter queue.
pub(crate) fn describe(queue: &str, body: &Bytes, reason: String) -> DeadLetter {
    const PREVIEW: usize = 64 * 1024;
    let signature = Signature::from_json(body).ok();
    let id = match &signature {
        Some(sig) if !sig.uuid.is_empty() => sig.uuid.clone(),
        _ => format!("sha1:{}", sha1_smol_hex(body)),
    };
    let preview = if signature.is_some() {
        String::new()
    } else {
        String::from_utf8_lossy(&body[..body.len().min(PREVIEW)]).into_owned()
    };
    DeadLetter {
        id,
        queue: queue.to_owned(),
        reason,
        task_name: signature.as_ref().map(|s| s.name.clone()),
        size: body.len(),
        signature,
        body_preview: preview,
    }
}

/// The SHA-1 of `body` in hex.
fn sha1_smol_hex(body: &[u8]) -> String {
    #[cfg(feature = "redis")]
    {
        sha1_smol::Sha1::from(body).digest().to_string()
    }
    #[cfg(not(feature = "redis"))]
    {
        // Without sha1_smol (a `redis` dependency): a stable 64-bit FNV-1a stand-in.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in body {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// A dead letter ready to go back: the signature with a fresh attempt count, and the routing
/// key to publish it with.
pub(crate) fn fresh_copy(queue: &str, mut signature: Signature) -> Signature {
    signature.headers.remove(crate::worker::ATTEMPTS_HEADER);
    signature.headers.remove(crate::worker::LAST_ERROR_HEADER);
    if signature.routing_key.is_empty() {
        signature.routing_key = queue.to_owned();
    }
    signature
}

impl Admin {
    /// Sends a dead letter's signature again as a fresh task. Its stored state is reset first
    /// unless it is SUCCESS (the task ran: the worker only completes its follow-ups) or a
    /// revoke (which wins): a worker takes a first delivery of a task stored STARTED or
    /// FAILURE (the FAILURE a dead-lettering records) for a duplicate and would not run it.
    pub(crate) async fn send_again(&self, queue: &str, signature: Signature) -> Result<()> {
        let signature = fresh_copy(queue, signature);
        if let Some(backend) = self.server.backend() {
            if !signature.uuid.is_empty() {
                if let Some(stored) = backend.get_state(&signature.uuid).await? {
                    if stored.state != State::Success && !crate::backend::is_revoked(&stored) {
                        backend.purge_state(&signature.uuid).await?;
                    }
                }
            }
        }
        self.server.send_wire(signature).await
    }
}

/// A state serialises as its wire name (`"SUCCESS"`).
impl Serialize for State {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
