//! The producer side: connect, send signatures, get results.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;

use crate::backend::memory::MemoryBackend;
use crate::backend::ResultBackend;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, Message};
use crate::config::{mask_url, Config};
use crate::error::{Error, ErrorKind, PartialSend, Result};
use crate::group::{Chord, Group};
use crate::result::{AsyncResult, GroupResult};
use crate::signature::{Sendable, Signature};
use crate::wire::{self, GoTime, State, TaskState};
use crate::worker::WorkerBuilder;

/// The future of [`Server::send`] and [`Server::send_all`].
pub type SendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A connection to a broker and a result backend: sends tasks, builds workers.
///
/// Cheap to clone; clones share the connections.
///
/// ```
/// use machinery::{task, Config, Server};
///
/// #[task]
/// fn add(a: i64, b: i64) -> i64 { a + b }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// let server = Server::new(Config::builder().broker("memory://server-docs").build()?).await?;
/// let worker = server.worker().spawn().await?;
/// let sum = server.send(add::signature(2, 3)).await?.get().await?;
/// assert_eq!(sum, 5);
/// worker.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    broker: Arc<dyn Broker>,
    backend: Option<Arc<dyn ResultBackend>>,
}

impl Server {
    /// Connects to the broker and result backend named in `config`.
    pub async fn new(config: Config) -> Result<Server> {
        config.validate()?;
        let broker = open_broker(&config).await?;
        let backend = open_backend(&config).await?;
        Ok(Server::from_parts(config, broker, backend))
    }

    /// Connects with [`Config::from_env`].
    pub async fn from_env() -> Result<Server> {
        Server::new(Config::from_env()?).await
    }

    /// A server over a broker and backend built by hand (custom implementations).
    pub fn from_parts(
        config: Config,
        broker: Arc<dyn Broker>,
        backend: Option<Arc<dyn ResultBackend>>,
    ) -> Server {
        Server {
            inner: Arc::new(Inner {
                config,
                broker,
                backend,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// The result backend, if one is configured.
    pub fn backend(&self) -> Option<&Arc<dyn ResultBackend>> {
        self.inner.backend.as_ref()
    }

    /// A builder for a worker that consumes with this server's connections.
    pub fn worker(&self) -> WorkerBuilder {
        WorkerBuilder::new(self.clone())
    }

    /// Sends a task or a chain. Records it as PENDING, publishes it, and returns a handle whose
    /// [`get`](AsyncResult::get) waits for the result typed as the (last) task's output.
    // Not an `async fn`: the returned future must not capture `K`, or a signature that is not
    // `Sendable` would be reported at every use of the future instead of once.
    pub fn send<'a, O: 'a, K: Sendable>(
        &'a self,
        signature: Signature<O, K>,
    ) -> SendFuture<'a, AsyncResult<O>> {
        let parts = signature.into_parts();
        Box::pin(async move {
            let (raw, links, decode) = parts?;
            self.publish(raw).await?;
            Ok(AsyncResult::new(self.inner.backend.clone(), links, decode))
        })
    }

    /// Sends many tasks at once; brokers pipeline the publishes.
    ///
    /// If the broker takes only some of them, the error's
    /// [`partial_send`](Error::partial_send) says which tasks were sent and which were not.
    pub fn send_all<'a, O: 'a, K: Sendable>(
        &'a self,
        signatures: impl IntoIterator<Item = Signature<O, K>>,
    ) -> SendFuture<'a, Vec<AsyncResult<O>>> {
        let parts: Result<Vec<_>> = signatures.into_iter().map(Signature::into_parts).collect();
        Box::pin(async move {
            let parts = parts?;
            let mut raws = Vec::with_capacity(parts.len());
            let mut handles = Vec::with_capacity(parts.len());
            for (raw, links, decode) in parts {
                raws.push(raw);
                handles.push(AsyncResult::new(self.inner.backend.clone(), links, decode));
            }
            self.publish_all(raws).await?;
            Ok(handles)
        })
    }

    /// Sends a group of tasks to run in parallel (Go's `SendGroup`): records the group in the
    /// result backend, then publishes every member.
    pub async fn send_group<O>(&self, group: Group<O>) -> Result<GroupResult<O>> {
        if let Some(error) = group.error {
            return Err(error);
        }
        let group_uuid = wire::new_uuid("group_");
        let count = i64::try_from(group.members.len()).unwrap_or(i64::MAX);
        let uuids: Vec<String> = group
            .members
            .iter()
            .map(|(raw, _)| raw.uuid.clone())
            .collect();
        if let Some(backend) = &self.inner.backend {
            backend.init_group(&group_uuid, &uuids).await?;
        }
        let mut raws = Vec::with_capacity(group.members.len());
        let mut handles = Vec::with_capacity(group.members.len());
        for (mut raw, decode) in group.members {
            raw.group_uuid = group_uuid.clone();
            raw.group_task_count = count;
            handles.push(AsyncResult::new(
                self.inner.backend.clone(),
                vec![raw.uuid.clone()],
                decode,
            ));
            raws.push(raw);
        }
        crate::worker::share_trace_context(&mut raws);
        self.publish_all(raws).await?;
        Ok(GroupResult::new(group_uuid, handles))
    }

    /// Sends a chord (Go's `SendChord`): the group's members, each carrying the callback, which
    /// the worker that finishes the last member sends, exactly once. The handle's
    /// [`get`](AsyncResult::get) returns the callback's result, or the first member's failure.
    pub async fn send_chord<O>(&self, chord: Chord<O>) -> Result<AsyncResult<O>> {
        if let Some(error) = chord.error {
            return Err(error);
        }
        let Some((mut callback, mut links, decode)) = chord.callback else {
            return Err(Error::encode("a chord needs a callback"));
        };
        if chord.members.is_empty() {
            // Nothing would ever finish to trigger the callback.
            return Err(Error::encode(
                "a chord needs at least one task in its group",
            ));
        }
        let backend = self.inner.backend.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "a chord needs a result backend to know when its group has finished",
            )
        })?;
        callback.uuid = wire::new_uuid("chord_");
        if let Some(first) = links.first_mut() {
            first.clone_from(&callback.uuid);
        }
        let group_uuid = wire::new_uuid("group_");
        let count = i64::try_from(chord.members.len()).unwrap_or(i64::MAX);
        let uuids: Vec<String> = chord.members.iter().map(|raw| raw.uuid.clone()).collect();
        backend.init_group(&group_uuid, &uuids).await?;
        let mut raws = chord.members;
        for raw in &mut raws {
            raw.group_uuid = group_uuid.clone();
            raw.group_task_count = count;
            raw.chord_callback = Some(Box::new(callback.clone()));
        }
        crate::worker::share_trace_context(&mut raws);
        self.publish_all(raws).await?;
        Ok(AsyncResult::new(Some(backend), links, decode).after(uuids))
    }

    /// Sends a signature in its wire form, as Go's `SendTask` does (for tools and for tasks
    /// that only exist in another language).
    pub async fn send_wire(&self, signature: wire::Signature) -> Result<()> {
        self.publish(signature).await
    }

    /// Revokes a task: records it as FAILURE with the error [`REVOKED`](crate::REVOKED) in the
    /// result backend (expiring with the results, as every state does), unless it already
    /// finished. Returns whether the task is revoked: `false` when it had finished, and keeps
    /// its SUCCESS or FAILURE.
    ///
    /// Go Machinery has no revoke; Go readers see FAILURE "revoked". What a revoke does:
    ///
    /// - A task that has not started never runs: workers find the revoke when they receive the
    ///   message, whether it waited in the queue, for its ETA or between retries, or is a chain
    ///   link sent later. A task unknown to the backend can be revoked ahead.
    /// - A running task is cancelled by the worker's revoke watcher, within
    ///   [`Config::revoke_poll`]: an async body is dropped at its next `.await`; a blocking
    ///   body's thread runs to its end, its result discarded, while its concurrency slot is
    ///   freed at once (as with a time limit).
    /// - The revoke wins: a body that finishes after it was revoked records nothing and sends
    ///   no follow-ups. A revoked task sends no `OnSuccess`, `OnError` or chord callback.
    ///
    /// Fails with [`ErrorKind::Config`] when no result backend is configured, and with
    /// [`ErrorKind::Encode`] for an empty UUID or one longer than 256 bytes.
    ///
    /// ```
    /// use machinery::{task, Config, Server, REVOKED};
    ///
    /// #[task]
    /// fn add(a: i64, b: i64) -> i64 { a + b }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = Server::new(Config::builder().broker("memory://revoke-docs").build()?).await?;
    /// let handle = server.send(add::signature(2, 3)).await?;    // no worker runs yet
    /// assert!(server.revoke(handle.task_uuid()).await?);
    /// let err = handle.get().await.unwrap_err();
    /// assert_eq!(err.task_error(), Some(REVOKED));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke(&self, task_uuid: &str) -> Result<bool> {
        let revoked = self.revoke_many([task_uuid]).await?;
        Ok(revoked.first().copied().unwrap_or(false))
    }

    /// Revokes several tasks, as [`revoke`](Self::revoke) does each, in one round trip to a
    /// network backend; returns whether each is revoked, in the order given. Every UUID is
    /// checked before anything is written.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://revoke-many-docs").build()?).await?;
    /// let revoked = server.revoke_many(["task_a", "task_b"]).await?;
    /// assert_eq!(revoked, [true, true]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn revoke_many<I, S>(&self, task_uuids: I) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let uuids = task_uuids
            .into_iter()
            .map(|uuid| revocable(uuid.as_ref()))
            .collect::<Result<Vec<String>>>()?;
        let backend = self.inner.backend.as_ref().ok_or_else(|| {
            Error::config(
                "revoke needs a result backend (RESULT_BACKEND): workers read revokes from it",
            )
        })?;
        if uuids.is_empty() {
            return Ok(Vec::new());
        }
        let revoked = backend.revoke(&uuids).await?;
        for (uuid, revoked) in uuids.iter().zip(&revoked) {
            tracing::debug!(task.id = %uuid, revoked, "revoke");
        }
        let count = revoked.iter().filter(|r| **r).count();
        tracing::info!(tasks = uuids.len(), revoked = count, "revoked tasks");
        Ok(revoked)
    }

    /// Records PENDING for every signature in one batch (a network backend pipelines the
    /// writes), then publishes them all in one window.
    async fn publish_all(&self, signatures: Vec<wire::Signature>) -> Result<()> {
        let mut messages = Vec::with_capacity(signatures.len());
        let mut states = Vec::with_capacity(signatures.len());
        for signature in signatures {
            let (message, state) = self.prepare(signature)?;
            messages.push(message);
            states.push(state);
        }
        let uuids: Vec<String> = states.iter().map(|s| s.task_uuid.clone()).collect();
        if let Some(backend) = &self.inner.backend {
            backend.set_states(states).await?;
        }
        let outcomes = self.inner.broker.publish_many(messages).await;
        let mut sent = Vec::with_capacity(uuids.len());
        let mut failed = Vec::new();
        let mut outcomes = outcomes.into_iter();
        for uuid in uuids {
            match outcomes.next() {
                Some(Ok(())) => sent.push(uuid),
                Some(Err(e)) => failed.push((uuid, e)),
                None => failed.push((
                    uuid,
                    Error::new(ErrorKind::Broker, "the broker reported no outcome for it"),
                )),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        let kind = failed[0].1.kind();
        let report = PartialSend { sent, failed };
        Err(Error::with_source(kind, report.to_string(), report))
    }

    /// Records PENDING and publishes.
    pub(crate) async fn publish(&self, signature: wire::Signature) -> Result<()> {
        let (message, state) = self.prepare(signature)?;
        if let Some(backend) = &self.inner.backend {
            backend.set_state(state).await?;
        }
        self.inner.broker.publish(message).await
    }

    /// The routing key a signature is published with: its own, or the broker's default (Go's
    /// `AdjustRoutingKey`).
    pub(crate) fn routing_key(&self, signature: &wire::Signature) -> String {
        if signature.routing_key.is_empty() {
            self.inner.broker.default_routing_key().to_owned()
        } else {
            signature.routing_key.clone()
        }
    }

    /// Adjusts the routing key and encodes; returns the message and its PENDING state (which
    /// must be recorded before the message is published).
    pub(crate) fn prepare(&self, mut signature: wire::Signature) -> Result<(Message, TaskState)> {
        if signature.uuid.is_empty() {
            signature.uuid = wire::new_uuid("task_");
        }
        if signature.routing_key.is_empty() {
            signature.routing_key = self.routing_key(&signature);
        }
        // W3C trace context: a new trace, or a child of the task that sends it.
        crate::worker::inject_trace_context(&mut signature);
        let body = signature.to_json()?;
        if body.len() > self.inner.config.max_message_size {
            return Err(Error::encode(format!(
                "task {} ({}) encodes to {} bytes, more than max_message_size ({} bytes)",
                signature.name,
                signature.uuid,
                body.len(),
                self.inner.config.max_message_size
            )));
        }
        let state = TaskState {
            task_uuid: signature.uuid,
            task_name: signature.name,
            state: State::Pending,
            created_at: GoTime::now(),
            ..TaskState::default()
        };
        let delay = signature
            .eta
            .and_then(|eta| eta.datetime())
            .and_then(|eta| (eta - Utc::now()).to_std().ok())
            .filter(|d| *d >= Duration::from_millis(1));
        let mut message = Message::new(signature.routing_key, Bytes::from(body));
        message.priority = signature.priority;
        message.headers = signature.headers;
        message.delay = delay;
        // Whatever the broker could never carry fails here, before PENDING is recorded.
        self.inner.broker.validate(&message)?;
        Ok((message, state))
    }
}

/// The longest task UUID [`Server::revoke`] accepts, in bytes (ours are 41: `task_` and a UUID).
const MAX_REVOKE_UUID_LEN: usize = 256;

/// Checks a UUID given to revoke: not empty, not longer than [`MAX_REVOKE_UUID_LEN`].
fn revocable(uuid: &str) -> Result<String> {
    if uuid.is_empty() {
        return Err(Error::encode("cannot revoke a task with an empty UUID"));
    }
    if uuid.len() > MAX_REVOKE_UUID_LEN {
        return Err(Error::encode(format!(
            "cannot revoke a task whose UUID is {} bytes long (at most {MAX_REVOKE_UUID_LEN})",
            uuid.len()
        )));
    }
    Ok(uuid.to_owned())
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.inner.config)
            .field("broker", &self.inner.broker)
            .field("backend", &self.inner.backend)
            .finish()
    }
}

/// The name in a `memory://name` URL (`default` when empty).
fn memory_name(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("memory://")?;
    let name = rest.trim_end_matches('/');
    Some(if name.is_empty() { "default" } else { name })
}

/// Whether `url` names a Redis server (`redis://`, `rediss://`, any case), Go's Redis broker.
#[cfg(feature = "redis")]
fn is_redis_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        matches!(scheme.to_ascii_lowercase().as_str(), "redis" | "rediss")
    })
}

pub(crate) async fn open_broker(config: &Config) -> Result<Arc<dyn Broker>> {
    if let Some(name) = memory_name(&config.broker) {
        return Ok(Arc::new(MemoryBroker::open(
            name,
            &config.default_queue,
            config.default_routing_key(),
        )));
    }
    #[cfg(feature = "amqp")]
    if config.broker.starts_with("amqp://") || config.broker.starts_with("amqps://") {
        return Ok(Arc::new(
            crate::broker::amqp::AmqpBroker::connect(config).await?,
        ));
    }
    #[cfg(feature = "redis")]
    if is_redis_url(&config.broker) {
        return Ok(Arc::new(
            crate::broker::redis::RedisBroker::connect(config).await?,
        ));
    }
    Err(Error::new(
        ErrorKind::Config,
        format!(
            "unsupported broker URL `{}` (supported: amqp://, amqps://, redis://, rediss://, memory://)",
            config.masked_broker()
        ),
    ))
}

pub(crate) async fn open_backend(config: &Config) -> Result<Option<Arc<dyn ResultBackend>>> {
    let ttl = Duration::from_secs(config.results_expire_in);
    let url = if config.result_backend.is_empty() {
        // The embedded broker comes with the embedded backend of the same name.
        match memory_name(&config.broker) {
            Some(_) => config.broker.as_str(),
            None => return Ok(None),
        }
    } else {
        config.result_backend.as_str()
    };
    if let Some(name) = memory_name(url) {
        return Ok(Some(Arc::new(MemoryBackend::open(name, ttl))));
    }
    #[cfg(feature = "redis")]
    {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some("redis" | "rediss")) {
            let backend =
                crate::backend::redis::RedisBackend::connect_with(url, ttl, &config.redis).await?;
            return Ok(Some(Arc::new(backend)));
        }
    }
    #[cfg(feature = "amqp")]
    {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some("amqp" | "amqps")) {
            let backend = crate::backend::amqp::AmqpBackend::connect(config).await?;
            return Ok(Some(Arc::new(backend)));
        }
    }
    let supported = match (cfg!(feature = "redis"), cfg!(feature = "amqp")) {
        (true, true) => "memory://, redis://, rediss://, amqp://, amqps://",
        (true, false) => "memory://, redis://, rediss:// (amqp:// needs the `amqp` feature)",
        (false, true) => "memory://, amqp://, amqps:// (redis:// needs the `redis` feature)",
        (false, false) => "memory:// (redis:// and amqp:// need their features)",
    };
    Err(Error::new(
        ErrorKind::Config,
        format!(
            "unsupported result backend URL `{}` (supported: {supported})",
            mask_url(url)
        ),
    ))
}
