//! Go Machinery's AMQP result backend (`RESULT_BACKEND=amqp://...` or `amqps://`), for
//! deployments that run RabbitMQ and no Redis, laid out as Go's `v2/backends/amqp/amqp.go`
//! lays it out, so that Go producers read the states Rust workers write and the other way round.
//!
//! # Go's layout
//!
//! - A task's states are persistent `application/json` messages (Go's `tasks.TaskState` JSON,
//!   byte for byte) in a queue named by the task UUID: not durable, auto-delete, declared with
//!   `x-message-ttl` and `x-expires` both `ResultsExpireIn * 1000` as a 32-bit integer (zero
//!   means Go's default, one hour), bound to the configured exchange (`AMQP_EXCHANGE`) with
//!   the UUID as binding key. Each state is published through that exchange with the UUID as
//!   routing key, with publisher confirms (Go: `updateState`).
//! - A group member's final state is also published to a queue named by the group UUID, laid
//!   out the same way (Go: `markTaskCompleted`); Go's `GroupCompleted` counts its messages
//!   ([`AmqpBackend::group_completed`]).
//! - A chord's trigger is the queue `<group UUID>_chord_triggered` (Go:
//!   `amqmChordTriggeredQueue`): Go's `TriggerChord` fires when it does not exist.
//!
//! # What this backend adds, and why
//!
//! Go's reads consume: `GetState` takes the oldest message off the queue (`basic.get` and
//! ack), so each state can be read once, and the worker-side guards of
//! [`ResultBackend`] (a finished task never runs again, revokes, states never move backwards)
//! cannot be built on it. Here every operation on a task queue holds a lock, reads the whole
//! queue without acknowledging it, and:
//!
//! - a read ([`get_state`](ResultBackend::get_state)) returns the latest state and gives every
//!   message back before it releases the lock (`basic.nack` with requeue, then a passive
//!   declaration of the queue, whose reply RabbitMQ sends after the requeue: RabbitMQ puts
//!   them back in their places), so the state stays readable, by Go readers too;
//! - a write ([`transition`](ResultBackend::transition), [`set_state`](ResultBackend::set_state))
//!   checks the guard against the latest state, publishes the new state (with the task name and
//!   creation time carried forward) and waits for its confirm, and only then acknowledges the
//!   older messages: the queue holds one message, the latest state, which is what Go's next
//!   `GetState` returns. If the process dies before the acknowledgements, the older messages
//!   come back ahead of the new one; the latest is still last. No final state is dropped before
//!   its successor is confirmed.
//!
//! The lock is an exclusive consumer on the queue `<name>.lock` (auto-delete; a name Go never
//! uses): RabbitMQ grants one exclusive consumer per queue, across all connections, and ends it
//! with the channel, so a worker that dies releases its locks. Go's processes take no lock, so
//! a Go writer's state can interleave with a Rust write, and a Go reader consumes what it reads
//! (the README's "differs on purpose" list has the consequences).
//!
//! A group's member list (Go keeps none in AMQP) is kept as a [`GroupMeta`] message in the
//! queue `<group UUID>_meta`, for the worker's chord logic.
//!
//! # Bounds
//!
//! A message larger than `max_message_size`, or that is not a task state, is skipped with a
//! warning (left in place on reads); a queue holding more than 1,000 messages is an error
//! rather than an unbounded read. Names longer than AMQP's 255 bytes are an
//! [`ErrorKind::Encode`] error. The URL's password never appears in errors or logs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{allowed, ResultBackend};
use crate::broker::amqp::recycle::{open_channel, Counted, Losses, Recycled};
use crate::broker::amqp::{amqp_uri, open_connection, short, TRACE_FRAMES_ENV};
use crate::config::{mask_url, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::wire::{GoTime, GroupMeta, TaskState};

/// Go Machinery's `DefaultResultsExpireIn` (3600 s), in milliseconds.
const DEFAULT_EXPIRY_MS: i32 = 3_600_000;

/// The suffix of a lock queue (see the [module docs](self)).
const LOCK_SUFFIX: &str = ".lock";

/// Go's `amqmChordTriggeredQueue` suffix.
const CHORD_TRIGGERED_SUFFIX: &str = "_chord_triggered";

/// The suffix of the queue holding a group's member list.
const GROUP_META_SUFFIX: &str = "_meta";

/// How long an unused lock queue is kept (`x-expires`). Not auto-delete: creating and
/// deleting a queue per operation would cost more than the operation.
const LOCK_QUEUE_EXPIRY_MS: i32 = 10_000;

/// The most messages one operation reads from a queue.
const MAX_MESSAGES: usize = 1_000;

/// How long an operation waits for a lock held by another process.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long one whole operation may take (a broker that stopped answering), and how long it
/// may wait for its turn ([`MAX_OPS`]) before that.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The most operations a backend (with its clones) runs at once; the others wait their turn.
/// Each opens a channel or two (its lock's, its own) whose closes may end after it, and a
/// connection has as many as its negotiated `channel_max` (RabbitMQ's default 2,047): waiting
/// on a group of a few thousand members at once reads them all together. On a connection with
/// fewer than 8 × this many channels, an eighth of them ([`Shares`]).
const MAX_OPS: usize = 256;

/// The most lock channels a backend keeps open or closing: a lock's channel is closed after
/// its operation ends, by a task of its own, which holds one of these until the broker has
/// closed it. On a connection with fewer than 4 × this many channels, a quarter of them.
const MAX_LOCKS: usize = 2 * MAX_OPS;

/// How a backend shares out its connection's channels ([`Counted::channels`]): an eighth to
/// operations, a quarter to lock channels, and half to channels the broker closes before the
/// connection is replaced ([`Recycled`]), each rounded up; the last eighth or so is slack. At
/// RabbitMQ's default `channel_max` of 2,047: 256, 512 and 1,024. Set by the first connection
/// (a later one to the same broker negotiates the same; one that allows fewer still ends in
/// a new connection when a channel is refused for the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shares {
    ops: usize,
    locks: usize,
}

impl Shares {
    fn of(channels: usize) -> Shares {
        Shares {
            ops: channels.div_ceil(8).clamp(1, MAX_OPS),
            locks: channels.div_ceil(4).clamp(1, MAX_LOCKS),
        }
    }
}

/// A result backend in RabbitMQ queues, in Go Machinery's layout; see the [module docs](self).
///
/// Cheap to clone; clones share one connection, opened again when it is lost.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// use machinery::backend::amqp::AmqpBackend;
/// use machinery::backend::ResultBackend;
/// use machinery::wire::{State, TaskState};
/// use machinery::Config;
///
/// let config = Config::builder()
///     .result_backend("amqp://guest:guest@127.0.0.1:5672/")
///     .build()?;
/// let backend = AmqpBackend::connect(&config).await?;
/// backend.set_state(TaskState::new("task_1", State::Pending)).await?;
/// assert_eq!(backend.get_state("task_1").await?.map(|s| s.state), Some(State::Pending));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AmqpBackend {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    masked_url: String,
    exchange: String,
    exchange_kind: ExchangeKind,
    expiry_ms: i32,
    max_message_size: usize,
    trace_frames: bool,
    /// Replaced once the broker has closed half its channels, 1,024 at most (reading a state
    /// that does not exist yet, checking a chord, a refused lock): lapin never frees their
    /// numbers (see [`Recycled`]).
    connection: Recycled,
    /// Turns for operations ([`Shares::ops`], [`MAX_OPS`] at most).
    turns: tokio::sync::Semaphore,
    /// Lock channels open or closing ([`Shares::locks`], [`MAX_LOCKS`] at most).
    lock_channels: Arc<tokio::sync::Semaphore>,
}

/// A channel holding the lock on one name (its exclusive consumer); dropping it closes the
/// channel, which releases the lock and gives back every message not acknowledged.
struct Locked {
    channel: Channel,
    /// The lock itself; `None` once handed to the closing task.
    consumer: Option<lapin::Consumer>,
    /// Counts the channel among [`MAX_LOCKS`] until it is closed.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Where a channel the broker closed is counted.
    losses: Losses,
}

impl Locked {
    /// Releases the lock (see [`Drop`]).
    async fn release(self) {
        drop(self);
    }
}

/// A channel of one operation: closed by [`Held::close`], or by lapin when dropped (an error
/// on the way, a timeout); either way counted first if the broker had closed it by then.
struct Held {
    channel: Channel,
    losses: Losses,
    /// Whether [`Held::close`] counted it already.
    counted: bool,
}

impl Held {
    /// The channel, to work on. Never close it through this (nor hand it to what closes it):
    /// the guard would then count the client's close as the broker's.
    fn get(&self) -> &Channel {
        &self.channel
    }

    async fn close(mut self) {
        self.losses.check(&self.channel);
        self.counted = true;
        let _ = self.channel.close(200, "done".into()).await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.counted {
            self.losses.check(&self.channel);
        }
    }
}

impl Drop for Locked {
    /// Sends `channel.close` without waiting for the broker's reply (the broker handles what
    /// was sent on the channel before the close first), on every path, errors included. The
    /// consumer is dropped only after the close completes: dropping it earlier makes lapin
    /// send a `basic.cancel` for its channel number, which a new channel may have taken by
    /// then.
    fn drop(&mut self) {
        self.losses.check(&self.channel);
        let channel = self.channel.clone();
        let consumer = self.consumer.take();
        let slot = self.slot.take();
        let close = async move {
            // Bounded, so that a broker that stopped answering cannot keep the slot.
            let _ = tokio::time::timeout(OP_TIMEOUT, channel.close(200, "done".into())).await;
            drop(consumer);
            drop(slot);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(close)),
            // No runtime (a backend used outside one cannot get here: its calls need one).
            Err(_) => drop(close),
        }
    }
}

/// What one operation read from a queue: the decoded messages in queue order, and the tag of
/// the last message taken (to acknowledge every message up to it).
struct Taken<T> {
    items: Vec<T>,
    last_tag: Option<u64>,
}

impl AmqpBackend {
    /// Connects to the RabbitMQ server in `config.result_backend` and declares the exchange
    /// (`config.amqp.exchange`, durable, of `config.amqp.exchange_type`), as Go's backend does
    /// on each call. States expire after `config.results_expire_in` seconds (0: one hour).
    ///
    /// Fails with [`ErrorKind::Config`] for a URL that is not `amqp://` or `amqps://` and with
    /// [`ErrorKind::Backend`] when the server cannot be reached.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let config = machinery::Config::builder()
    ///     .result_backend("amqp://guest:guest@127.0.0.1:5672/")
    ///     .results_expire_in(600)
    ///     .build()?;
    /// let backend = machinery::backend::amqp::AmqpBackend::connect(&config).await?;
    /// # let _ = backend;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(config: &Config) -> Result<AmqpBackend> {
        let url = config.result_backend.as_str();
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("amqp" | "amqps")) {
            return Err(Error::config(format!(
                "the AMQP result backend needs an amqp:// or amqps:// URL, not `{}`",
                mask_url(url)
            )));
        }
        short("exchange name", &config.amqp.exchange)?;
        let exchange_kind = match config.amqp.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_owned()),
        };
        let backend = AmqpBackend {
            inner: Arc::new(Inner {
                url: amqp_uri(url),
                masked_url: mask_url(url),
                exchange: config.amqp.exchange.clone(),
                exchange_kind,
                expiry_ms: expiry_ms(config.results_expire_in),
                max_message_size: config.max_message_size,
                trace_frames: std::env::var(TRACE_FRAMES_ENV).is_ok_and(|v| v == "1"),
                connection: Recycled::default(),
                turns: tokio::sync::Semaphore::new(MAX_OPS),
                lock_channels: Arc::new(tokio::sync::Semaphore::new(MAX_LOCKS)),
            }),
        };
        let first = backend.inner.connection().await?;
        let shares = Shares::of(first.channels());
        backend.inner.turns.forget_permits(MAX_OPS - shares.ops);
        backend
            .inner
            .lock_channels
            .forget_permits(MAX_LOCKS - shares.locks);
        Ok(backend)
    }

    /// The queue whose existence marks a group's chord as triggered (Go's
    /// `amqmChordTriggeredQueue`): `<group UUID>_chord_triggered`.
    ///
    /// ```
    /// use machinery::backend::amqp::AmqpBackend;
    /// assert_eq!(AmqpBackend::chord_triggered_queue("group_1"), "group_1_chord_triggered");
    /// ```
    pub fn chord_triggered_queue(group_uuid: &str) -> String {
        format!("{group_uuid}{CHORD_TRIGGERED_SUFFIX}")
    }

    /// The queue holding a group's member list (machinery's; Go keeps none):
    /// `<group UUID>_meta`.
    ///
    /// ```
    /// use machinery::backend::amqp::AmqpBackend;
    /// assert_eq!(AmqpBackend::group_meta_queue("group_1"), "group_1_meta");
    /// ```
    pub fn group_meta_queue(group_uuid: &str) -> String {
        format!("{group_uuid}{GROUP_META_SUFFIX}")
    }

    /// Records a group member's final state in the group's queue, as Go's `markTaskCompleted`
    /// does, unless a state of that task is there already (so a redelivery does not count it
    /// twice). Go's [`group_completed`](Self::group_completed) counts these messages.
    ///
    /// This reads the group's queue (up to `group_task_count` and 1,000 more messages) under
    /// the group's lock; a worker does so only for a member that may have been recorded
    /// before, and otherwise only publishes (see
    /// [`mark_group_member`](ResultBackend::mark_group_member)).
    ///
    /// ```no_run
    /// # async fn f(backend: machinery::backend::amqp::AmqpBackend) -> machinery::Result<()> {
    /// use machinery::wire::{State, TaskState};
    /// backend.mark_completed("group_1", 2, &TaskState::new("task_1", State::Success)).await?;
    /// assert!(!backend.group_completed("group_1", 2).await?);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn mark_completed(
        &self,
        group_uuid: &str,
        group_task_count: usize,
        state: &TaskState,
    ) -> Result<()> {
        let inner = &self.inner;
        inner
            .bounded("record a group member", async {
                let queue = queue_name("group queue", group_uuid)?;
                let locked = inner.lock(group_uuid).await?;
                inner.declare_result_queue(&locked.channel, &queue).await?;
                let limit = group_task_count.saturating_add(MAX_MESSAGES);
                let taken: Taken<TaskState> = inner
                    .take_all(&locked.channel, &queue, false, limit)
                    .await?;
                if !taken
                    .items
                    .iter()
                    .any(|s| s.task_uuid == state.task_uuid && s.state.is_final())
                {
                    inner
                        .publish(&locked.channel, &queue, &encode_state(state)?)
                        .await?;
                }
                // The other members' states stay.
                inner
                    .give_back(&locked.channel, &queue, taken.last_tag)
                    .await;
                locked.release().await;
                Ok(())
            })
            .await
    }

    /// Publishes a group member's final state to the group's queue, as Go's
    /// `markTaskCompleted` does (no read, no lock).
    async fn publish_member(&self, group_uuid: &str, state: &TaskState) -> Result<()> {
        let inner = &self.inner;
        inner
            .bounded("record a group member", async {
                let queue = queue_name("group queue", group_uuid)?;
                let held = inner.channel().await?;
                inner.declare_result_queue(held.get(), &queue).await?;
                inner
                    .publish(held.get(), &queue, &encode_state(state)?)
                    .await?;
                held.close().await;
                Ok(())
            })
            .await
    }

    /// Whether `group_task_count` members of the group have recorded a final state in the
    /// group's queue (Go's `GroupCompleted`: the queue's message count). A group whose queue
    /// does not exist has not completed.
    ///
    /// ```no_run
    /// # async fn f(backend: machinery::backend::amqp::AmqpBackend) -> machinery::Result<()> {
    /// let done: bool = backend.group_completed("group_1", 3).await?;
    /// # let _ = done;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn group_completed(&self, group_uuid: &str, group_task_count: usize) -> Result<bool> {
        let count = self
            .inner
            .bounded("count a group", self.inner.message_count(group_uuid))
            .await?;
        Ok(count.is_some_and(|n| usize::try_from(n).is_ok_and(|n| n == group_task_count)))
    }

    /// Deletes a group's queues: the member states, the member list and the chord trigger
    /// (Go's `PurgeGroupMeta`, which deletes the first and the last).
    ///
    /// ```no_run
    /// # async fn f(backend: machinery::backend::amqp::AmqpBackend) -> machinery::Result<()> {
    /// backend.purge_group_meta("group_1").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn purge_group_meta(&self, group_uuid: &str) -> Result<()> {
        let inner = &self.inner;
        inner
            .bounded("delete a group", async {
                for queue in [
                    Self::chord_triggered_queue(group_uuid),
                    Self::group_meta_queue(group_uuid),
                    group_uuid.to_owned(),
                ] {
                    inner.delete_queue(&queue).await?;
                }
                Ok(())
            })
            .await
    }
}

impl Inner {
    fn error(&self, what: &str, err: lapin::Error) -> Error {
        // lapin's errors carry no credentials; the URL we add is masked.
        let kind = match soft_error(&err) {
            Some(AMQPSoftError::PRECONDITIONFAILED) => ErrorKind::Rejected,
            _ => ErrorKind::Backend,
        };
        Error::with_source(
            kind,
            format!("RabbitMQ at {}: {what}: {err}", self.masked_url),
            err,
        )
    }

    /// Runs one operation when its turn comes ([`Shares::ops`] at once), failing with a
    /// retryable [`ErrorKind::Backend`] error when its turn does not come within
    /// [`OP_TIMEOUT`], or it takes longer than that (its wait for a lock slot included). Every
    /// operation that opens a channel runs through here, once: none waits for a second turn
    /// while it holds one.
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        // The semaphore is never closed; a closed one would only let the operation run.
        let Ok(turn) = tokio::time::timeout(OP_TIMEOUT, self.turns.acquire()).await else {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "RabbitMQ at {}: cannot {what}: no turn within {OP_TIMEOUT:?} (too many operations at once)",
                    self.masked_url
                ),
            ));
        };
        let _turn = turn.ok();
        tokio::time::timeout(OP_TIMEOUT, op)
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "RabbitMQ at {}: cannot {what}: no reply within {OP_TIMEOUT:?}",
                        self.masked_url
                    ),
                ))
            })
    }

    /// The connection to open a channel on, opened again (and the exchange declared again)
    /// when it was lost or the broker has closed its share of its channels ([`Recycled`]).
    async fn connection(&self) -> Result<Counted> {
        self.connection
            .get("the result backend", || self.connect())
            .await
    }

    /// A new connection, with the exchange declared.
    async fn connect(&self) -> Result<Arc<Connection>> {
        let connected = open_connection(&self.url, "machinery-results", self.trace_frames).await?;
        let connection =
            Arc::new(connected.map_err(|e| self.error("cannot connect to the result backend", e))?);
        if !self.exchange.is_empty() {
            let channel = open_channel(&connection)
                .await
                .map_err(|e| self.error("cannot open a channel", e))?;
            // Go: AMQPConnector.Connect, ExchangeDeclare(durable, not auto-delete).
            channel
                .exchange_declare(
                    short("exchange name", &self.exchange)?,
                    self.exchange_kind.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.error("cannot declare the exchange", e))?;
            let _ = channel.close(200, "declared".into()).await;
        }
        debug!(backend = %self.masked_url, "connected to the result backend");
        Ok(connection)
    }

    /// A channel, and where to count it if the broker closes it.
    async fn counted_channel(&self) -> Result<(Channel, Losses)> {
        let counted = self.connection().await?;
        let channel = counted
            .channel()
            .await
            .map_err(|e| self.error("cannot open a channel", e))?;
        Ok((channel, counted.losses))
    }

    /// A channel that counts itself, when it goes, if the broker closed it.
    async fn channel(&self) -> Result<Held> {
        let (channel, losses) = self.counted_channel().await?;
        Ok(Held {
            channel,
            losses,
            counted: false,
        })
    }

    /// Takes the lock on `name`: an exclusive consumer on `<name>.lock`, waiting (up to
    /// [`LOCK_WAIT`]) while another channel, of any process, holds it.
    async fn lock(&self, name: &str) -> Result<Locked> {
        let lock_queue = queue_name("lock queue", &format!("{name}{LOCK_SUFFIX}"))?;
        // Never closed (a closed one would only let the lock go uncounted).
        let slot = Arc::clone(&self.lock_channels).acquire_owned().await.ok();
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let counted = self.connection().await?;
            let channel = counted.channel().await;
            let opened = channel.as_ref().ok().cloned();
            let mut args = FieldTable::default();
            args.insert("x-expires".into(), AMQPValue::LongInt(LOCK_QUEUE_EXPIRY_MS));
            let attempt = async {
                let channel = channel?;
                channel
                    .queue_declare(
                        lock_queue.clone(),
                        QueueDeclareOptions {
                            durable: false,
                            auto_delete: false,
                            // A refusal closes the channel: the consume below reports it.
                            nowait: true,
                            ..QueueDeclareOptions::default()
                        },
                        args,
                    )
                    .await?;
                channel
                    .basic_consume(
                        lock_queue.clone(),
                        ShortString::from(""),
                        BasicConsumeOptions {
                            exclusive: true,
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map(|consumer| (channel, consumer))
            }
            .await;
            // A refusal closed the channel (lapin keeps its number).
            if let (Err(_), Some(channel)) = (&attempt, &opened) {
                counted.losses.check(channel);
            }
            match attempt {
                Ok((channel, consumer)) => {
                    return Ok(Locked {
                        channel,
                        consumer: Some(consumer),
                        slot,
                        losses: counted.losses,
                    })
                }

                // Held by another channel (ACCESS_REFUSED, which closes this channel; lapin
                // may find that channel closing): try again on a new channel.
                Err(e)
                    if matches!(
                        soft_error(&e),
                        Some(
                            AMQPSoftError::ACCESSREFUSED
                                | AMQPSoftError::NOTFOUND
                                | AMQPSoftError::RESOURCELOCKED
                        )
                    ) || matches!(e.kind(), lapin::ErrorKind::InvalidChannelState(..)) =>
                {
                    if started.elapsed() > LOCK_WAIT {
                        return Err(Error::new(
                            ErrorKind::Backend,
                            format!("the lock on `{name}` stayed held for {LOCK_WAIT:?}"),
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(self.error(&format!("cannot lock `{name}`"), e)),
            }
        }
    }

    /// Go's queue arguments for state and group queues: `x-message-ttl` and `x-expires`,
    /// `int32` milliseconds.
    fn result_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(self.expiry_ms));
        args.insert("x-expires".into(), AMQPValue::LongInt(self.expiry_ms));
        args
    }

    /// Declares and binds a state (or group) queue exactly as Go's `AMQPConnector.Connect`
    /// does from `updateState`: not durable, auto-delete, Go's arguments, bound to the exchange
    /// with its own name.
    async fn declare_result_queue(&self, channel: &Channel, queue: &ShortString) -> Result<()> {
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: false,
                    auto_delete: true,
                    // A refusal (a queue declared with other arguments) closes the channel:
                    // the next call that waits for a reply reports it.
                    nowait: true,
                    ..QueueDeclareOptions::default()
                },
                self.result_queue_args(),
            )
            .await
            .map_err(|e| self.error(&format!("cannot declare the queue `{queue}`"), e))?;
        if !self.exchange.is_empty() {
            channel
                .queue_bind(
                    queue.clone(),
                    short("exchange name", &self.exchange)?,
                    queue.clone(),
                    QueueBindOptions { nowait: true },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.error(&format!("cannot bind the queue `{queue}`"), e))?;
        }
        Ok(())
    }

    /// Whether `queue` exists, asked on a channel of its own (the broker closes the channel
    /// of a passive declaration of a missing queue).
    async fn exists(&self, queue: &str) -> Result<bool> {
        Ok(self.message_count(queue).await?.is_some())
    }

    /// The number of ready messages in `queue`, `None` when it does not exist.
    async fn message_count(&self, queue: &str) -> Result<Option<u32>> {
        let name = queue_name("queue name", queue)?;
        let (channel, losses) = self.counted_channel().await?;
        let counts = crate::broker::amqp::passive_declare(&channel, name, &losses)
            .await
            .map_err(|e| self.error(&format!("cannot inspect the queue `{queue}`"), e))?;
        Ok(counts.map(|(ready, _)| ready))
    }

    /// Like [`exists`](Self::exists), on `channel` (which a missing queue closes).
    async fn exists_on(&self, channel: &Channel, queue: &ShortString) -> Result<bool> {
        let declared = channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => Ok(true),
            Err(e) if matches!(soft_error(&e), Some(AMQPSoftError::NOTFOUND)) => Ok(false),
            Err(e) => Err(self.error(&format!("cannot inspect the queue `{queue}`"), e)),
        }
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let name = queue_name("queue name", queue)?;
        let held = self.channel().await?;
        held.get()
            .queue_delete(name, QueueDeleteOptions::default())
            .await
            .map_err(|e| self.error(&format!("cannot delete the queue `{queue}`"), e))?;
        held.close().await;
        Ok(())
    }

    /// Takes every message of `queue` without acknowledging it, decoding those that are a `T`
    /// and no larger than `max_message_size` (the others are skipped with a warning).
    ///
    /// `missing_is_empty`: a queue that does not exist (or expired since it was seen) has
    /// nothing to read; otherwise (the caller has just declared it) that is an error.
    async fn take_all<T: DeserializeOwned>(
        &self,
        channel: &Channel,
        queue: &ShortString,
        missing_is_empty: bool,
        limit: usize,
    ) -> Result<Taken<T>> {
        let mut taken = Taken {
            items: Vec::new(),
            last_tag: None,
        };
        for _ in 0..limit {
            let got = match channel
                .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(got) => got,
                // The queue expired (x-expires) since it was seen: nothing more to read.
                Err(e)
                    if missing_is_empty
                        && matches!(soft_error(&e), Some(AMQPSoftError::NOTFOUND)) =>
                {
                    return Ok(taken);
                }
                Err(e) => return Err(self.error(&format!("cannot read the queue `{queue}`"), e)),
            };
            let Some(message) = got else {
                return Ok(taken);
            };
            let last = message.message_count == 0;
            let delivery = message.delivery;
            taken.last_tag = Some(delivery.delivery_tag);
            if delivery.data.len() > self.max_message_size {
                warn!(queue = %queue, bytes = delivery.data.len(), "a message in a result queue is larger than max_message_size; skipped");
                continue;
            }
            match serde_json::from_slice::<T>(&delivery.data) {
                Ok(item) => taken.items.push(item),
                Err(e) => {
                    warn!(queue = %queue, error = %e, "a message in a result queue does not decode; skipped");
                }
            }
            if last {
                // The queue had nothing left behind it (a message published since is newer
                // than this operation).
                return Ok(taken);
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            format!("the result queue `{queue}` holds more than {limit} messages"),
        ))
    }

    /// Publishes `body` to `queue` through the exchange, as Go's `updateState` does
    /// (persistent, `application/json`), and waits for the broker's confirm. Published
    /// `mandatory`, so a state that no queue takes is an error, never silently dropped.
    async fn publish(&self, channel: &Channel, queue: &ShortString, body: &[u8]) -> Result<()> {
        if body.len() > self.max_message_size {
            return Err(Error::encode(format!(
                "a result for `{queue}` of {} bytes is larger than max_message_size ({})",
                body.len(),
                self.max_message_size
            )));
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.error("cannot enable publisher confirms", e))?;
        let exchange = short("exchange name", &self.exchange)?;
        // On the default exchange ("") a queue is reached by its name, as Go's publish does.
        let confirm = channel
            .basic_publish(
                exchange,
                queue.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                BasicProperties::default()
                    .with_content_type(ShortString::from("application/json"))
                    .with_delivery_mode(2),
            )
            .await
            .map_err(|e| self.error(&format!("cannot publish to `{queue}`"), e))?
            .await
            .map_err(|e| self.error(&format!("no confirm for `{queue}`"), e))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "no queue took the result for `{queue}` on exchange `{}`",
                    self.exchange
                ),
            )),
            Confirmation::Nack(_) => Err(Error::new(
                ErrorKind::Backend,
                format!("RabbitMQ refused the result for `{queue}` (nack)"),
            )),
        }
    }

    /// Puts every message taken (up to `last_tag`) back in `queue`, in their places, and
    /// returns once the queue has them: the `basic.nack` (requeue) and the passive
    /// declaration that follows it go from this channel to the queue in order, so the
    /// declaration's reply comes after the requeue. Only then may the lock be released: the
    /// next holder (or a Go reader) sees the messages. If this fails, closing the channel still
    /// requeues them, without that ordering.
    async fn give_back(&self, channel: &Channel, queue: &ShortString, last_tag: Option<u64>) {
        let Some(tag) = last_tag else {
            return;
        };
        let requeued = channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
        let synced = match requeued {
            Ok(()) => self.exists_on(channel, queue).await.map(drop),
            Err(e) => Err(self.error("cannot give messages back", e)),
        };
        if let Err(e) = synced {
            warn!(queue = %queue, error = %e, "cannot confirm that read messages are back in their queue; closing the channel gives them back");
        }
    }

    /// Acknowledges every message taken, up to `last_tag`.
    async fn ack_all(&self, channel: &Channel, last_tag: Option<u64>) -> Result<()> {
        if let Some(tag) = last_tag {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| self.error("cannot acknowledge replaced states", e))?;
        }
        Ok(())
    }

    /// The guarded write: under the task's lock, reads the latest state, and unless the write
    /// would move the task backwards publishes the new state (carrying the name and creation
    /// time forward), then acknowledges the older messages. Returns the previous state.
    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        let queue = queue_name("task UUID", &state.task_uuid)?;
        let locked = self.lock(&state.task_uuid).await?;
        self.declare_result_queue(&locked.channel, &queue).await?;
        let taken: Taken<TaskState> = self
            .take_all(&locked.channel, &queue, false, MAX_MESSAGES)
            .await?;
        let previous = latest(&taken.items);
        if allowed(previous.as_ref(), &state) {
            let mut state = state;
            if let Some(previous) = &previous {
                if state.task_name.is_empty() {
                    state.task_name.clone_from(&previous.task_name);
                }
                if state.created_at.is_zero() {
                    state.created_at = previous.created_at;
                }
            }
            self.publish(&locked.channel, &queue, &encode_state(&state)?)
                .await?;
            self.ack_all(&locked.channel, taken.last_tag).await?;
        } else {
            debug!(task = %state.task_uuid, state = %state.state, previous = ?previous.as_ref().map(|p| p.state), "refused a backward transition");
            self.give_back(&locked.channel, &queue, taken.last_tag)
                .await;
        }
        locked.release().await;
        Ok(previous)
    }

    /// Reads the latest state under the task's lock and gives every message back.
    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        let queue = queue_name("task UUID", task_uuid)?;
        let locked = self.lock(task_uuid).await?;
        // A read never creates the queue: `basic.get` on a missing one is no state (the
        // broker closes the channel, and the lock with it).
        let taken: Taken<TaskState> = self
            .take_all(&locked.channel, &queue, true, MAX_MESSAGES)
            .await?;
        self.give_back(&locked.channel, &queue, taken.last_tag)
            .await;
        locked.release().await;
        Ok(latest(&taken.items))
    }
}

/// The latest state in queue order, with the task name and creation time of earlier records
/// where it has none (Go's workers write RECEIVED, STARTED, ... without them).
fn latest(states: &[TaskState]) -> Option<TaskState> {
    let mut latest = states.last()?.clone();
    for earlier in states.iter().rev() {
        if latest.task_name.is_empty() && !earlier.task_name.is_empty() {
            latest.task_name.clone_from(&earlier.task_name);
        }
        if latest.created_at.is_zero() && !earlier.created_at.is_zero() {
            latest.created_at = earlier.created_at;
        }
    }
    Some(latest)
}

fn encode_state(state: &TaskState) -> Result<Vec<u8>> {
    state.to_json()
}

/// `name` as a queue name: an [`ErrorKind::Encode`] error naming `what` when it is empty
/// (`""` means "the last queue declared on this channel" to RabbitMQ), starts with the reserved
/// `amq.` (which RabbitMQ refuses) or is longer than AMQP's 255 bytes. Names come from the
/// wire (task and group UUIDs): they are checked before RabbitMQ or lapin sees them.
fn queue_name(what: &str, name: &str) -> Result<ShortString> {
    if name.is_empty() {
        return Err(Error::encode(format!("the {what} is empty")));
    }
    if name.starts_with("amq.") {
        return Err(Error::encode(format!(
            "the {what} `{name}` starts with `amq.`, which RabbitMQ reserves"
        )));
    }
    short(what, name)
}

/// The AMQP soft error (a channel-level refusal) behind `err`, if any.
fn soft_error(err: &lapin::Error) -> Option<AMQPSoftError> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Go's expiry: `ResultsExpireIn * 1000` milliseconds as an `int32`, one hour when zero. Go's
/// conversion wraps past 24.8 days; here it is capped at `i32::MAX` ms.
fn expiry_ms(results_expire_in: u64) -> i32 {
    if results_expire_in == 0 {
        return DEFAULT_EXPIRY_MS;
    }
    i32::try_from(results_expire_in.saturating_mul(1000)).unwrap_or(i32::MAX)
}

impl fmt::Debug for AmqpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBackend")
            .field("url", &self.inner.masked_url)
            .field("exchange", &self.inner.exchange)
            .field("expiry_ms", &self.inner.expiry_ms)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ResultBackend for AmqpBackend {
    /// A guarded write (see the [module docs](self)).
    async fn set_state(&self, state: TaskState) -> Result<()> {
        self.transition(state).await.map(drop)
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        self.inner
            .bounded("read task state", self.inner.get_state(task_uuid))
            .await
    }

    /// Under the task's lock (an exclusive consumer), so atomic against every other machinery
    /// process; Go's writers take no lock.
    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        self.inner
            .bounded("record task state", self.inner.transition(state))
            .await
    }

    /// Deletes the task's queue (Go's `PurgeState`).
    async fn purge_state(&self, task_uuid: &str) -> Result<()> {
        self.inner
            .bounded("delete task state", self.inner.delete_queue(task_uuid))
            .await
    }

    /// Go's `InitGroup` stores nothing; the member list is kept here as a [`GroupMeta`]
    /// message in `<group UUID>_meta`, laid out as a state queue.
    async fn init_group(&self, group_uuid: &str, task_uuids: &[String]) -> Result<()> {
        let inner = &self.inner;
        let meta = GroupMeta {
            group_uuid: group_uuid.to_owned(),
            task_uuids: task_uuids.to_vec(),
            created_at: GoTime::now(),
            ..GroupMeta::default()
        };
        let body = crate::wire::to_go_string(&meta)
            .map_err(|e| Error::encode(format!("group {group_uuid}: {e}")))?;
        let queue = queue_name("group queue", &AmqpBackend::group_meta_queue(group_uuid))?;
        inner
            .bounded("store group", async {
                let held = inner.channel().await?;
                inner.declare_result_queue(held.get(), &queue).await?;
                inner.publish(held.get(), &queue, body.as_bytes()).await?;
                held.close().await;
                Ok(())
            })
            .await
    }

    /// The member list from `<group UUID>_meta`, with `ChordTriggered` read from the
    /// existence of Go's `<group UUID>_chord_triggered` queue.
    async fn group_meta(&self, group_uuid: &str) -> Result<Option<GroupMeta>> {
        let inner = &self.inner;
        let name = AmqpBackend::group_meta_queue(group_uuid);
        let queue = queue_name("group queue", &name)?;
        inner
            .bounded("read group", async {
                let locked = inner.lock(&name).await?;
                if !inner.exists_on(&locked.channel, &queue).await? {
                    return Ok(None);
                }
                let taken: Taken<GroupMeta> = inner
                    .take_all(&locked.channel, &queue, true, MAX_MESSAGES)
                    .await?;
                inner
                    .give_back(&locked.channel, &queue, taken.last_tag)
                    .await;
                locked.release().await;
                let Some(mut meta) = taken.items.into_iter().last() else {
                    return Ok(None);
                };
                meta.chord_triggered = inner
                    .exists(&AmqpBackend::chord_triggered_queue(group_uuid))
                    .await?;
                Ok(Some(meta))
            })
            .await
    }

    /// Go's `markTaskCompleted`: the member's final state is published to the group's queue.
    /// `again` (a redelivery): first checked against the queue, see
    /// [`AmqpBackend::mark_completed`]. Like Go, only for a signature with a group UUID and a
    /// `GroupTaskCount`.
    async fn mark_group_member(
        &self,
        group_uuid: &str,
        group_task_count: usize,
        state: &TaskState,
        again: bool,
    ) -> Result<()> {
        if group_uuid.is_empty() || group_task_count == 0 || !state.state.is_final() {
            return Ok(());
        }
        if again {
            self.mark_completed(group_uuid, group_task_count, state)
                .await
        } else {
            self.publish_member(group_uuid, state).await
        }
    }

    /// Declares Go's `<group UUID>_chord_triggered` queue if it does not exist, under a lock:
    /// `true` to the one caller that declared it. Go's `TriggerChord` reads the same queue
    /// (and never declares it, so that Go alone may trigger a chord twice).
    async fn trigger_chord(&self, group_uuid: &str) -> Result<bool> {
        let inner = &self.inner;
        let name = AmqpBackend::chord_triggered_queue(group_uuid);
        let queue = queue_name("chord queue", &name)?;
        inner
            .bounded("trigger chord", async {
                let locked = inner.lock(&name).await?;
                if inner.exists(&name).await? {
                    locked.release().await;
                    return Ok(false);
                }
                let mut args = FieldTable::default();
                args.insert("x-expires".into(), AMQPValue::LongInt(inner.expiry_ms));
                locked
                    .channel
                    .queue_declare(
                        queue,
                        QueueDeclareOptions {
                            durable: false,
                            auto_delete: false,
                            ..QueueDeclareOptions::default()
                        },
                        args,
                    )
                    .await
                    .map_err(|e| inner.error("cannot declare the chord trigger", e))?;
                locked.release().await;
                Ok(true)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::State;

    #[test]
    fn the_channels_of_a_connection_are_shared_out() {
        // RabbitMQ's default `channel_max`.
        assert_eq!(
            Shares::of(2_047),
            Shares {
                ops: MAX_OPS,
                locks: MAX_LOCKS
            }
        );
        assert_eq!(
            Shares::of(65_535),
            Shares {
                ops: MAX_OPS,
                locks: MAX_LOCKS
            }
        );
        // `?channel_max=24`: with the losses' half (12), 21 of 24.
        assert_eq!(Shares::of(24), Shares { ops: 3, locks: 6 });
        assert_eq!(Shares::of(0), Shares { ops: 1, locks: 1 });
    }

    #[test]
    fn queue_names_from_the_wire_are_checked() {
        assert!(queue_name("task UUID", "task_1").is_ok());
        for bad in [String::new(), "amq.gen-1".to_owned(), "x".repeat(256)] {
            let err = queue_name("task UUID", &bad).err().map(|e| e.kind());
            assert_eq!(err, Some(ErrorKind::Encode), "{bad}");
        }
    }

    #[test]
    fn expiry_is_gos_int32_milliseconds() {
        assert_eq!(expiry_ms(0), 3_600_000);
        assert_eq!(expiry_ms(2), 2_000);
        assert_eq!(expiry_ms(3600), 3_600_000);
        assert_eq!(expiry_ms(10_000_000), i32::MAX);
    }

    #[test]
    fn the_latest_state_carries_name_and_creation_forward() {
        let pending = TaskState {
            task_name: "add".into(),
            created_at: GoTime::now(),
            ..TaskState::new("t", State::Pending)
        };
        let success = TaskState::new("t", State::Success);
        let got = latest(&[
            pending.clone(),
            TaskState::new("t", State::Received),
            success,
        ]);
        let got = got.map(|s| (s.state, s.task_name, s.created_at));
        assert_eq!(
            got,
            Some((State::Success, "add".to_owned(), pending.created_at))
        );
        assert_eq!(latest(&[]), None);
    }
}
