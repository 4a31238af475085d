//! RabbitMQ over AMQP 0-9-1 (`amqp://`, `amqps://`), through [`lapin`].
//!
//! Topology, as Go Machinery declares it: a durable exchange (`AMQP_EXCHANGE`, of type
//! `AMQP_EXCHANGE_TYPE`), the durable default queue (`DEFAULT_QUEUE`, with
//! `AMQP_QUEUE_DECLARE_ARGS`) bound to it with `AMQP_BINDING_KEY` (and
//! `AMQP_QUEUE_BINDING_ARGS`). A worker consuming another queue declares it and binds it with
//! its own name, so signatures sent with that routing key reach it. No other queue is declared,
//! except on use:
//!
//! - `delay.<ms>.<exchange>.<routing key>`: delayed messages (a future ETA, retries) wait there
//!   with `x-message-ttl = ms` and dead-letter back to the exchange with their routing key and
//!   priority, as Go Machinery does (`delay` in `v2/brokers/amqp/amqp.go`). On a direct
//!   exchange, as in Go, the queue is bound to the exchange with its own name and messages are
//!   published to it through the exchange; on other kinds, through the default exchange. It
//!   expires (with the messages in it) `2 * ms` after its last declaration, as Go declares it;
//!   unlike Go, the broker declares it again every `ms / 2` while a message it published may
//!   still be inside, so that a broker slow to answer does not cost messages
//!   (`broker/amqp/lease.rs`). RabbitMQ refuses `x-message-ttl` and `x-expires` over ten
//!   years (315,360,000,000 ms on 3.10), where Go's declaration fails; here `ms` is at most
//!   [`AmqpBroker::MAX_DELAY_HOP`] (2^31 - 1 ms, 24.8 days): a message due later comes out
//!   early and the worker delays it again, hop by hop.
//! - `<queue>.dead_letter`: messages that can never succeed (not a signature, larger than
//!   `max_message_size`) are moved there (the source queue in the `x-machinery-source-queue`
//!   header, the reason in `x-machinery-reason`), never requeued in a loop and never silently
//!   dropped.
//!
//! These side queues are declared on a channel of their own, one declaration at a time: the
//! broker closes the channel of a declaration it refuses (a delay queue that exists with other
//! arguments), and that must not fail the publishes in flight on the publishing channel, touch
//! the consumers' channels or reconnect. The declaration fails with [`ErrorKind::Rejected`] and
//! the channel is opened again for the next one. If the broker closes the publishing channel
//! itself, another is opened on the same connection. [`AmqpBroker::reconnects`] counts the times
//! either had to be opened again.
//!
//! Messages are published persistent (`delivery_mode` 2) as `application/json`, with the
//! signature's priority and its headers as AMQP headers (except the trace context, which stays
//! in the body: see `property_headers`), `mandatory` and with publisher confirms;
//! [`publish_many`](Broker::publish_many) keeps a window of confirms in flight instead of one
//! round trip each, and reports an outcome per message. One task per publishing channel makes
//! every publish and awaits every confirm, so that each publish gets the return that is its own
//! (`broker/amqp/confirms.rs`: lapin can hand a return to another confirm of the same `multiple`
//! ack, reporting an unroutable message sent). A message is handed to that task as soon as it
//! is routed: dropping a `publish` future after that does not withdraw it (delivery is at least
//! once). Errors are classified:
//!
//! - [`ErrorKind::Encode`]: a routing key, delay queue name or header key (at any depth) longer
//!   than the 255 bytes AMQP can carry, refused before anything is sent ([`Broker::validate`];
//!   amq-protocol would panic on it). Configured names that long (exchange, queue, binding key,
//!   argument keys) are an [`ErrorKind::Config`] error at startup.
//! - [`ErrorKind::Rejected`]: no queue is bound to the routing key (the message came back), or
//!   the broker refuses a declaration (`PRECONDITION_FAILED`: other arguments than an existing
//!   queue's, an argument out of range; `ACCESS_REFUSED`). Sending again cannot help, so the
//!   reconnect loop does not retry these either.
//! - [`ErrorKind::Broker`]: a nack, a lost connection: retryable.
//!
//! On a quorum queue (`x-queue-type: quorum`), RabbitMQ counts deliveries: a delivery carries
//! that count ([`Delivery::delivery_count`]), from the `x-delivery-count` header, and the
//! queue's `x-delivery-limit`, if it has one ([`Delivery::delivery_limit`]), on which the worker
//! dead-letters the broker's last delivery. Its dead-letter queue is a quorum queue too; delay
//! queues stay classic, as Go declares them.
//!
//! # Clusters
//!
//! `broker` may list the nodes of a cluster, split by `multiple_broker_separator`
//! ([`Config::broker_urls`]; Go: `AMQPConnector.Connect` in v2/common/amqp.go, which dials them
//! in order). The broker connects to the first node that answers. When its connection drops, it
//! goes on with the next node, round robin, at once, and publishers and consumers resume there;
//! only after a whole round of failed nodes does it pause, with the capped backoff, until
//! `reconnect_timeout`. [`AmqpBroker::node`] says which node it is on.
//!
//! Consumers use manual acknowledgements and the prefetch count; acknowledgements leave the
//! consume loop for a per-channel task that coalesces contiguous delivery tags into one
//! `basic.ack(multiple)`. A dropped connection or a broker restart is survived: publishers and
//! consumers reconnect with a capped backoff, redeclare the topology and resume; unacknowledged
//! deliveries are redelivered by the broker. If the broker stays unreachable longer than
//! `reconnect_timeout`, the operation fails with an error of kind
//! [`ErrorKind::Broker`](crate::ErrorKind).
//!
//! # Passwords and logs
//!
//! Passwords never appear in errors or in machinery's logs (URLs are masked). lapin logs every
//! AMQP frame it writes or handles at TRACE, and the login frame (`connection.start-ok`)
//! carries the password; it logs from its own tasks and its own I/O thread. machinery connects
//! with a runtime that runs those tasks and that thread with a dispatcher wrapping the caller's
//! current one (captured at connect time), which drops lapin's frame-level TRACE events (those
//! with a `next_msg`, `frame` or `frames` field) and its WARN event of a message the broker
//! returned, which prints the message's body (a task's arguments may hold secrets; the
//! publisher gets the return as a [`Rejected`](ErrorKind::Rejected) error), and forwards
//! everything else. Nothing is installed globally. To see the frames anyway, when debugging the
//! protocol, set the environment variable [`MACHINERY_TRACE_AMQP_FRAMES`](TRACE_FRAMES_ENV)`=1`:
//! the frames, login included, and returned messages, bodies included, are then logged as
//! lapin writes them.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

mod acks;
mod admin;
mod confirms;
mod lease;
pub(crate) mod recycle;

use acks::{Frame, Settle};
use confirms::{Confirms, Outcome, Publish};
use lease::{Held, Leases, Next};

use super::{Acker, Broker, Consumer, Delivery, Message, Rejection};
use crate::config::{mask_url, overlong, overlong_key, Config, AMQP_MAX_NAME, DEAD_LETTER_SUFFIX};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use crate::worker::is_trace_key;

/// Set to `1`, lets lapin log the AMQP frames it sends and receives at TRACE, the login frame
/// (with the password) included; see the [module docs](self).
pub const TRACE_FRAMES_ENV: &str = "MACHINERY_TRACE_AMQP_FRAMES";

/// [`AmqpBroker::MAX_DELAY_HOP`] in milliseconds. With `x-expires` = 2 × hop, both arguments
/// stay below 2^32 ms: far within RabbitMQ 3.10's ten-year limit, and within the 32-bit timer
/// range older brokers have.
const MAX_HOP_MS: u64 = 2_147_483_647;

/// How many times a message is published before its publish is reported failed, when the
/// connection is lost before its confirm comes (or its delay queue was deleted).
const PUBLISH_ATTEMPTS: u32 = 5;

/// The pause before publishing again after an interrupted try, times the tries so far.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long a message the dead-letter queue refused waits before it goes back to the queue.
const DEAD_LETTER_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How many publishes [`Broker::publish_many`] keeps unconfirmed at once.
const CONFIRM_WINDOW: usize = 512;

/// A RabbitMQ broker; see the [module docs](self).
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// The nodes of the cluster (`broker` split by `multiple_broker_separator`), one or more.
    nodes: Vec<Node>,
    /// Every node's URL, masked, for errors that are not about one node.
    masked_url: String,
    /// The node the current connection is to, or the next one tried: an index into `nodes`.
    node: AtomicUsize,
    exchange: String,
    exchange_kind: ExchangeKind,
    binding_key: String,
    default_queue: String,
    default_routing_key: String,
    queue_args: FieldTable,
    binding_args: FieldTable,
    /// Queues are declared quorum queues (`x-queue-type: quorum`), which count deliveries.
    quorum: bool,
    /// The quorum queue's `x-delivery-limit`: deliveries carry it ([`Delivery::with_delivery_limit`]).
    delivery_limit: Option<u32>,
    /// Let lapin log whole frames (the login frame included) at TRACE; see the module docs.
    trace_frames: bool,
    reconnect_timeout: Duration,
    link: tokio::sync::Mutex<Option<Link>>,
    generation: AtomicU64,
    /// The channel side queues are declared on, apart from the publishing channel: the broker
    /// closes the channel of a declaration it refuses. Locked for the whole declaration, so that
    /// a refusal never fails someone else's declaration.
    side: tokio::sync::Mutex<Option<SideChannel>>,
    /// Dead-letter queues declared on the current connection.
    declared: Mutex<Declared>,
    /// Delay queues kept declared while messages may be inside ([`lease`]).
    leases: Mutex<Leases>,
    /// This broker, for the keepers of delay queues and their holds: a keeper holds it only
    /// while it declares.
    me: Weak<Inner>,
    /// Dead-letter queues a depth reading found missing, and when (see
    /// [`AmqpBroker::dead_letter_depth`](Broker::dead_letter_depth)).
    missing: Mutex<HashMap<String, Instant>>,
    /// A connection of its own for looking at queues that may not exist (the depth of a
    /// dead-letter queue, the admin's reads), replaced after the broker closed half its
    /// channels (1,024 at most): lapin poisons the number of a channel the broker closed
    /// ([`recycle`]), and on the main connection each such look took one of its numbers for
    /// good.
    inspect: recycle::Recycled,
}

/// How many dead-letter queue declarations [`Declared`] remembers; beyond this many, the
/// oldest is forgotten (and declared again on its next use).
const MAX_DECLARED: usize = 4096;

/// How long a dead-letter queue found missing is taken to hold 0 messages before its depth is
/// read again (unless this process makes it meanwhile).
const MISSING_RECHECK: Duration = Duration::from_secs(60);

/// How long opening the inspection connection may take ([`Inner::inspect`]).
const INSPECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The dead-letter queues declared on the current connection, in the order declared. Bounded
/// by [`MAX_DECLARED`]; a queue that was forgotten is only declared again.
#[derive(Default)]
struct Declared {
    entries: HashMap<String, u64>,
    count: u64,
}

impl Declared {
    /// Whether `queue` was declared on this connection.
    fn is_fresh(&self, queue: &str) -> bool {
        self.entries.contains_key(queue)
    }

    /// Records that `queue` was declared, making room if the cache is full.
    fn insert(&mut self, queue: String) {
        if self.entries.len() >= MAX_DECLARED && !self.entries.contains_key(&queue) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(queue, _)| queue.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.count += 1;
        self.entries.insert(queue, self.count);
    }

    fn remove(&mut self, queue: &str) {
        self.entries.remove(queue);
    }

    fn clear(&mut self) {
        self.entries.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Where a message is published.
struct Route {
    exchange: ShortString,
    routing_key: ShortString,
    /// The delay queue it waits in, if it is delayed.
    delay_queue: Option<String>,
    /// Keeps that delay queue declared until the publish ends.
    hold: Option<LeaseHold>,
}

/// A publish handed to the channel's collector, its outcome still to come.
struct Started {
    /// The confirm, with the publish's own return ([`confirms`]).
    confirm: tokio::sync::oneshot::Receiver<Outcome>,
    delay_queue: Option<String>,
    /// Dropped when the publish ends: from then the delay queue is kept until a declaration is
    /// sent, and no longer.
    _hold: Option<LeaseHold>,
}

/// Keeps a delay queue declared ([`lease`]) while it lives, for one publish to that queue.
struct LeaseHold {
    broker: Weak<Inner>,
    queue: String,
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.upgrade() {
            lock(&broker.leases).release(&self.queue, Instant::now());
        }
    }
}

/// The outcome of one attempt to publish a message.
enum Attempt {
    /// Final: published, or refused for good.
    Done(Result<()>),
    /// Publish it again: the connection was lost before its confirm came, or its delay queue
    /// was deleted since it was declared.
    Again(Error),
}

/// The channel for side-queue declarations, and the connection it belongs to.
struct SideChannel {
    connection: Arc<Connection>,
    channel: Channel,
}

/// The connection lock was held by someone else.
struct Busy;

/// Why a publish has no confirmation.
enum Unconfirmed {
    /// It was not written.
    NotSent(Error),
    /// Written, but its confirm failed or was lost: the broker may have it.
    Lost(Error),
}

impl Unconfirmed {
    fn into_error(self) -> Error {
        match self {
            Unconfirmed::NotSent(e) | Unconfirmed::Lost(e) => e,
        }
    }
}

/// One connection and its publishing channel (publisher confirms on).
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    /// The collector of the channel's confirms.
    confirms: Confirms,
    generation: u64,
    /// The node it is connected to (an index into `Inner::nodes`).
    node: usize,
}

/// One node of the cluster.
struct Node {
    /// Its URL, as lapin reads it ([`amqp_uri`]).
    url: String,
    /// Its URL with the password masked, for logs and errors.
    masked: String,
}

impl AmqpBroker {
    /// Connects to the broker in `config.broker` and declares the topology, retrying for up to
    /// `config.reconnect_timeout` if it cannot be reached.
    pub async fn connect(config: &Config) -> Result<AmqpBroker> {
        // Names longer than AMQP can carry are refused here, before the client library sees them.
        config.validate()?;
        let exchange_kind = match config.amqp.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_owned()),
        };
        let queue_args = field_table(&config.amqp.queue_declare_args)?;
        let binding_args = field_table(&config.amqp.queue_binding_args)?;
        let broker = AmqpBroker {
            inner: Arc::new_cyclic(|me| Inner {
                nodes: config
                    .broker_urls()
                    .into_iter()
                    .map(|url| Node {
                        url: amqp_uri(url),
                        masked: mask_url(url),
                    })
                    .collect(),
                masked_url: config.masked_broker(),
                node: AtomicUsize::new(0),
                exchange: config.amqp.exchange.clone(),
                exchange_kind,
                binding_key: config.amqp.binding_key.clone(),
                default_queue: config.default_queue.clone(),
                default_routing_key: config.default_routing_key().to_owned(),
                queue_args,
                binding_args,
                quorum: config.quorum_queues(),
                delivery_limit: config.delivery_limit(),
                trace_frames: std::env::var(TRACE_FRAMES_ENV).is_ok_and(|v| v == "1"),
                reconnect_timeout: config.reconnect_timeout,
                link: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                side: tokio::sync::Mutex::new(None),
                declared: Mutex::new(Declared::default()),
                leases: Mutex::new(Leases::default()),
                me: me.clone(),
                missing: Mutex::new(HashMap::new()),
                inspect: recycle::Recycled::default(),
            }),
        };
        broker.inner.link().await?;
        Ok(broker)
    }

    /// How many times the publishing connection or its channel had to be opened again since
    /// [`connect`](Self::connect): 0 while the first ones last.
    pub fn reconnects(&self) -> u64 {
        self.inner
            .generation
            .load(Ordering::SeqCst)
            .saturating_sub(1)
    }

    /// The node the broker is connected to (or, while it reconnects, the one it tries next),
    /// its URL with the password masked. With one URL, that URL.
    ///
    /// ```no_run
    /// # async fn f() -> machinery::Result<()> {
    /// let config = machinery::Config::builder()
    ///     .broker("amqp://guest:guest@127.0.0.1:5701/,amqp://guest:guest@127.0.0.1:5702/")
    ///     .multiple_broker_separator(",")
    ///     .build()?;
    /// let broker = machinery::broker::amqp::AmqpBroker::connect(&config).await?;
    /// println!("connected to {}", broker.node()); // amqp://guest:***@127.0.0.1:5701/
    /// # Ok(()) }
    /// ```
    pub fn node(&self) -> String {
        self.inner
            .node_url(self.inner.node.load(Ordering::SeqCst))
            .to_owned()
    }

    /// The longest hop a delayed message makes through a delay queue: 2^31 - 1 ms (24.8 days).
    ///
    /// RabbitMQ refuses a queue whose `x-message-ttl` or `x-expires` exceeds ten years
    /// (315,360,000,000 ms, measured on 3.10), and a delay queue expires after twice its delay.
    /// A longer delay travels in several hops: the message comes out of the delay queue before
    /// its ETA and the worker delays it again for the rest.
    pub const MAX_DELAY_HOP: Duration = Duration::from_millis(MAX_HOP_MS);

    /// The name of the queue messages from `queue` are dead-lettered to.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}{DEAD_LETTER_SUFFIX}")
    }

    /// The name of the queue Go Machinery and machinery hold a delayed message in.
    pub fn delay_queue(delay_ms: u64, exchange: &str, routing_key: &str) -> String {
        format!("delay.{delay_ms}.{exchange}.{routing_key}")
    }
}

impl Inner {
    fn broker_error(
        &self,
        what: &str,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        // lapin's errors carry no credentials; the URL we add is masked.
        let node = self.node_url(self.node.load(Ordering::SeqCst));
        Error::with_source(ErrorKind::Broker, format!("{what} ({node}): {err}"), err)
    }

    /// The masked URL of node `index`.
    fn node_url(&self, index: usize) -> &str {
        self.nodes
            .get(index)
            .map_or(self.masked_url.as_str(), |node| node.masked.as_str())
    }

    /// Moves on from node `from` to the next one, round robin (unless another caller moved on
    /// already); returns the node to try now.
    fn next_node(&self, from: usize) -> usize {
        let next = (from + 1) % self.nodes.len().max(1);
        match self
            .node
            .compare_exchange(from, next, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => next,
            Err(current) => current,
        }
    }

    /// An error from a declaration: [`ErrorKind::Rejected`] when the broker refuses it for
    /// good (PRECONDITION_FAILED: an existing queue or exchange declared with other arguments, an
    /// argument out of range; ACCESS_REFUSED: a reserved name or no permission), else
    /// [`ErrorKind::Broker`].
    fn declare_error(&self, what: &str, err: lapin::Error) -> Error {
        let refused = match err.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => matches!(
                amqp.kind(),
                lapin::protocol::AMQPErrorKind::Soft(
                    lapin::protocol::AMQPSoftError::PRECONDITIONFAILED
                        | lapin::protocol::AMQPSoftError::ACCESSREFUSED
                )
            ),
            _ => false,
        };
        if refused {
            Error::with_source(
                ErrorKind::Rejected,
                format!("the broker refuses to {what}: {err}"),
                err,
            )
        } else {
            self.broker_error(&format!("cannot {what}"), err)
        }
    }

    /// The current connection, reconnecting (with a capped backoff, up to
    /// `reconnect_timeout`) when there is none or it is closed.
    async fn link(&self) -> Result<Link> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_ref() {
            if link_alive(link) {
                return Ok(link.clone());
            }
            if link.connection.status().connected() {
                // The broker closed the publishing channel only (a channel error), or its
                // confirm collector ended with its runtime: open another one on the same
                // connection.
                if link.channel.status().connected() {
                    let _ = link.channel.close(200, "reopening".into()).await;
                }
                warn!(node = %self.node_url(link.node), "publishing channel closed by the broker (or its confirm collector ended); reopening it");
                match self
                    .open_publisher(link.connection.clone(), link.node)
                    .await
                {
                    Ok(link) => {
                        *current = Some(link.clone());
                        return Ok(link);
                    }
                    Err(e) if e.is_permanent() => return Err(e),
                    Err(e) => {
                        warn!(node = %self.node_url(link.node), error = %e.message(), "cannot reopen the publishing channel; reconnecting");
                    }
                }
            } else {
                // A cluster: go on with the next node, round robin; the lost one may be down.
                let next = self.next_node(link.node);
                warn!(node = %self.node_url(link.node), next = %self.node_url(next), "connection to the broker lost; reconnecting");
            }
        }
        *current = None;
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut refusals = 0;
        // Attempts in this round through the nodes; the backoff pause comes after each round.
        let mut tried = 0;
        loop {
            let node = self.node.load(Ordering::SeqCst);
            match self.connect_once(node).await {
                Ok(link) => {
                    if started.elapsed() > Duration::from_millis(1) && link.generation > 1 {
                        info!(node = %self.node_url(node), generation = link.generation, reconnected_in = ?started.elapsed(), "reconnected to the broker");
                    }
                    *current = Some(link.clone());
                    return Ok(link);
                }
                Err((e, refused)) if refused && refusals >= 2 => {
                    // The broker answers but refuses our credentials: waiting won't help.
                    return Err(e);
                }
                Err((e, _)) if e.is_permanent() || e.kind() == ErrorKind::Unsupported => {
                    // The broker refuses our topology (a queue declared with other arguments):
                    // the same declaration will be refused again. (Or there is no tokio
                    // runtime to connect with.)
                    return Err(e);
                }
                Err((e, _)) if started.elapsed() + pause > self.reconnect_timeout => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        format!(
                            "the broker at {} stayed unreachable for {:?} (reconnect_timeout): {}",
                            self.masked_url,
                            started.elapsed(),
                            e.message()
                        ),
                    ));
                }
                Err((e, refused)) => {
                    refusals = if refused { refusals + 1 } else { 0 };
                    let next = self.next_node(node);
                    tried += 1;
                    if tried < self.nodes.len() {
                        warn!(node = %self.node_url(node), next = %self.node_url(next), error = %e.message(), "cannot reach this broker node; trying the next one");
                        continue;
                    }
                    tried = 0;
                    warn!(broker = %self.masked_url, error = %e.message(), retry_in = ?pause, "cannot reach the broker");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A channel on the inspection connection ([`Inner::inspect`]), opened to the node of
    /// the main connection (waiting for it as every call does while the broker is away), and
    /// where to count it if the broker closes it.
    async fn inspect_channel(&self) -> Result<(Channel, recycle::Losses)> {
        let counted = self
            .inspect
            .get("the broker's inspection connection", || async {
                let node = self.link().await?.node;
                let url = self
                    .nodes
                    .get(node)
                    .map(|n| n.url.as_str())
                    .ok_or_else(|| Error::config("no broker URL"))?;
                let connect = open_connection(url, "machinery-inspect", self.trace_frames);
                let connected = tokio::time::timeout(INSPECT_CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| {
                        Error::new(
                            ErrorKind::Broker,
                            format!(
                                "cannot connect to the broker ({}): no answer within {INSPECT_CONNECT_TIMEOUT:?}",
                                self.node_url(node)
                            ),
                        )
                    })??;
                connected.map(Arc::new).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Broker,
                        format!("cannot connect to the broker ({})", self.node_url(node)),
                        e,
                    )
                })
            })
            .await?;
        let channel = counted
            .channel()
            .await
            .map_err(|e| self.broker_error("cannot open a channel", e))?;
        Ok((channel, counted.losses))
    }

    /// Connects once to node `node`; the flag says whether the broker refused us (bad
    /// credentials) rather than being unreachable.
    async fn connect_once(&self, node: usize) -> std::result::Result<Link, (Error, bool)> {
        let Some(url) = self.nodes.get(node).map(|n| n.url.as_str()) else {
            let error = Error::config("no broker URL");
            return Err((error, false));
        };
        let connected = open_connection(url, "machinery", self.trace_frames)
            .await
            .map_err(|e| (e, false))?;
        let connection = connected.map_err(|e| {
            // Only refusals that a restart cannot cure: bad credentials. (A vhost that is
            // "not found" or "down" can be a broker still starting: keep retrying.)
            let refused = match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) => matches!(
                    amqp.kind(),
                    lapin::protocol::AMQPErrorKind::Soft(
                        lapin::protocol::AMQPSoftError::ACCESSREFUSED
                    )
                ),
                lapin::ErrorKind::AuthProviderError(_)
                | lapin::ErrorKind::InvalidProtocolVersion(_) => true,
                _ => false,
            };
            (
                self.broker_error("cannot connect to the broker", e),
                refused,
            )
        })?;
        // Side queues are declared anew on a new connection (the broker may have restarted).
        lock(&self.declared).clear();
        lock(&self.leases).forget_all();
        self.open_publisher(Arc::new(connection), node)
            .await
            .map_err(|e| (e, false))
    }

    /// Opens the publishing channel on `connection` (to node `node`) and declares the topology
    /// on it.
    async fn open_publisher(&self, connection: Arc<Connection>, node: usize) -> Result<Link> {
        let channel = recycle::open_channel(&connection)
            .await
            .map_err(|e| self.broker_error("cannot open a channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.broker_error("cannot enable publisher confirms", e))?;
        self.declare_queue(&channel, &self.default_queue).await?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        debug!(node = %self.node_url(node), generation, "connected");
        Ok(Link {
            connection,
            confirms: Confirms::start(channel.clone()).ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    "the AMQP broker publishes from a Tokio runtime: none is running here",
                )
            })?,
            channel,
            generation,
            node,
        })
    }

    /// Declares the exchange, and `queue` bound to it: with the binding key for the default
    /// queue, with its own name for another queue.
    async fn declare_queue(&self, channel: &Channel, queue: &str) -> Result<()> {
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
            .map_err(|e| self.declare_error(&format!("declare exchange `{}`", self.exchange), e))?;
        channel
            .queue_declare(
                short("queue name", queue)?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_args.clone(),
            )
            .await
            .map_err(|e| self.declare_error(&format!("declare queue `{queue}`"), e))?;
        let key = if queue == self.default_queue {
            self.binding_key.as_str()
        } else {
            queue
        };
        channel
            .queue_bind(
                short("queue name", queue)?,
                short("exchange name", &self.exchange)?,
                short("binding key", key)?,
                QueueBindOptions::default(),
                self.binding_args.clone(),
            )
            .await
            .map_err(|e| self.declare_error(&format!("bind queue `{queue}`"), e))
    }

    /// The arguments of a dead-letter queue: a classic queue, also beside a quorum queue.
    /// Earlier releases declared it classic, and a queue's type cannot change: declaring it
    /// quorum on an existing deployment would fail every dead-letter (PRECONDITION_FAILED).
    fn dead_letter_args(&self) -> FieldTable {
        FieldTable::default()
    }

    /// Whether the dead-letter queue `queue` was declared on this connection.
    fn is_fresh(&self, queue: &str) -> bool {
        lock(&self.declared).is_fresh(queue)
    }

    /// Declares a dead-letter queue, unless it was declared on this connection.
    async fn declare_dead_letter_queue(&self, link: &Link, queue: &str) -> Result<()> {
        let fresh = |broker: &Inner| broker.is_fresh(queue);
        if self
            .declare_side_queue(link, queue, self.dead_letter_args(), false, fresh)
            .await?
            .is_some()
        {
            lock(&self.declared).insert(queue.to_owned());
        }
        Ok(())
    }

    /// Declares a side queue (delay or dead-letter), unless `fresh` says it need not be, asked
    /// again once the declaring channel is ours. Returns when the declaration was sent, or
    /// `None` if it was not needed.
    ///
    /// The declaration goes on a channel of its own, one at a time: a declaration the broker
    /// refuses (an existing queue with other arguments) closes that channel only, never the
    /// publishing channel or a consumer's, and never the connection. The channel is opened
    /// again for the next declaration.
    ///
    /// `bind`: also bind the queue to the exchange with its own name as binding key (and the
    /// configured binding arguments), as Go binds a delay queue.
    async fn declare_side_queue(
        &self,
        link: &Link,
        queue: &str,
        args: FieldTable,
        bind: bool,
        fresh: impl Fn(&Inner) -> bool,
    ) -> Result<Option<Instant>> {
        if fresh(self) {
            return Ok(None);
        }
        let name = short("queue name", queue)?;
        let exchange = short("exchange name", &self.exchange)?;
        let mut side = self.side.lock().await;
        if fresh(self) {
            // Declared while we waited for the channel.
            return Ok(None);
        }
        let channel = match side.as_ref() {
            Some(open)
                if Arc::ptr_eq(&open.connection, &link.connection)
                    && open.channel.status().connected() =>
            {
                open.channel.clone()
            }
            _ => {
                let channel = recycle::open_channel(&link.connection)
                    .await
                    .map_err(|e| self.broker_error("cannot open a channel for declarations", e))?;
                *side = Some(SideChannel {
                    connection: link.connection.clone(),
                    channel: channel.clone(),
                });
                channel
            }
        };
        let sent = Instant::now();
        channel
            .queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|e| self.declare_error(&format!("declare queue `{queue}`"), e))?;
        if bind {
            channel
                .queue_bind(
                    name.clone(),
                    exchange,
                    name,
                    QueueBindOptions::default(),
                    self.binding_args.clone(),
                )
                .await
                .map_err(|e| self.declare_error(&format!("bind queue `{queue}`"), e))?;
        }
        Ok(Some(sent))
    }

    /// The arguments of the delay queue for `delay_ms` and `routing_key`, Go's exactly
    /// (v2/brokers/amqp/amqp.go `delay`).
    fn delay_queue_args(&self, delay_ms: u64, routing_key: &str) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), long_string(&self.exchange));
        args.insert("x-dead-letter-routing-key".into(), long_string(routing_key));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(saturating_i64(delay_ms)),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(saturating_i64(delay_ms.saturating_mul(2))),
        );
        args
    }

    /// Holds the delay queue `queue` for a publish: starts its keeper if none runs. `None`:
    /// the queue is not kept ([`lease::MAX_LEASES`] are, or there is no runtime to keep it
    /// on), and is declared on each publish, as Go does.
    fn hold_delay_queue(
        &self,
        queue: &str,
        delay: Duration,
        args: &FieldTable,
    ) -> Option<LeaseHold> {
        let held = lock(&self.leases).hold(queue, delay, Instant::now());
        match held {
            Held::Start => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let keeper = runtime.spawn(keep_delay_queue(
                        self.me.clone(),
                        queue.to_owned(),
                        args.clone(),
                    ));
                    lock(&self.leases).kept_by(queue, keeper.abort_handle());
                }
                Err(_) => {
                    lock(&self.leases).end(queue);
                    return None;
                }
            },
            Held::Kept => {}
            Held::Full(first) => {
                if first {
                    warn!(
                        kept = lease::MAX_LEASES,
                        queue = %queue,
                        "too many delay queues in use to keep them all declared; the others are declared on each publish, as Go does"
                    );
                }
                return None;
            }
        }
        Some(LeaseHold {
            broker: self.me.clone(),
            queue: queue.to_owned(),
        })
    }

    /// The current connection, if it is up, without waiting for it or reconnecting: `Err`
    /// if someone holds it (a publish, for a moment; or a reconnect, for longer).
    fn current_link(&self) -> std::result::Result<Option<Link>, Busy> {
        let current = self.link.try_lock().map_err(|_| Busy)?;
        Ok(current.as_ref().filter(|link| link_alive(link)).cloned())
    }

    /// Where a message goes: the exchange with its routing key, or (delayed) the delay queue,
    /// declared (and bound) here: through the exchange with the queue's name as routing key, as
    /// Go's `delay` publishes it (v2/brokers/amqp/amqp.go), on a direct exchange; through the
    /// default exchange on others, where a binding by name would not route that one queue only
    /// (a fanout exchange would copy every message into every delay queue, a topic binding such
    /// as `#` would take delayed messages at once).
    async fn route(&self, link: &Link, message: &Message) -> Result<Route> {
        let Some(delay_ms) = hop_ms(message.delay) else {
            return Ok(Route {
                exchange: short("exchange name", &self.exchange)?,
                routing_key: short("routing key", &message.routing_key)?,
                delay_queue: None,
                hold: None,
            });
        };
        let queue = AmqpBroker::delay_queue(delay_ms, &self.exchange, &message.routing_key);
        let args = self.delay_queue_args(delay_ms, &message.routing_key);
        let delay = Duration::from_millis(delay_ms);
        // Held before it is declared: the keeper keeps it from the declaration on.
        let hold = self.hold_delay_queue(&queue, delay, &args);
        let through_exchange = matches!(self.exchange_kind, ExchangeKind::Direct);
        // A publish that can rely on the last declaration skips its own; unkept ones
        // (`hold` is `None`: too many queues kept) are declared each time, as Go does.
        let fresh = |broker: &Inner| {
            hold.is_some() && lock(&broker.leases).covers(&queue, delay, Instant::now())
        };
        if let Some(sent) = self
            .declare_side_queue(link, &queue, args, through_exchange, fresh)
            .await?
        {
            lock(&self.leases).declared(&queue, sent);
        }
        Ok(Route {
            exchange: if through_exchange {
                short("exchange name", &self.exchange)?
            } else {
                ShortString::default()
            },
            routing_key: short("delay queue name", &queue)?,
            delay_queue: Some(queue),
            hold,
        })
    }

    /// Checks that every short string of `message` fits AMQP; see [`Broker::validate`].
    fn validate(&self, message: &Message) -> Result<()> {
        if message.routing_key.len() > AMQP_MAX_NAME {
            return Err(Error::encode(overlong("routing key", &message.routing_key)));
        }
        if let Some(delay_ms) = hop_ms(message.delay) {
            let queue = AmqpBroker::delay_queue(delay_ms, &self.exchange, &message.routing_key);
            if queue.len() > AMQP_MAX_NAME {
                return Err(Error::encode(overlong("delay queue name", &queue)));
            }
        }
        if let Some(key) = overlong_key(&message.headers) {
            return Err(Error::encode(overlong("header key", key)));
        }
        Ok(())
    }

    /// Validates `message`, routes it and hands it to `link`'s collector, which writes it;
    /// does not wait for it to be written or confirmed.
    async fn start_publish(&self, link: &Link, message: &Message) -> Result<Started> {
        self.validate(message)?;
        let route = self.route(link, message).await?;
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if message.priority > 0 {
            properties = properties.with_priority(message.priority);
        }
        if let Some(headers) = property_headers(&message.headers)? {
            properties = properties.with_headers(headers);
        }
        let confirm = link.confirms.publish(Publish {
            exchange: route.exchange,
            routing_key: route.routing_key,
            body: message.body.clone(),
            options: BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            properties,
        });
        Ok(Started {
            confirm,
            delay_queue: route.delay_queue,
            _hold: route.hold,
        })
    }

    /// Waits for the confirm of a started publish.
    async fn confirmed(&self, link: &Link, started: Started, message: &Message) -> Attempt {
        let delay_queue = started.delay_queue.clone();
        match self.confirmation(link, started).await {
            Ok(confirmation) => self.resolve(confirmation, delay_queue, message),
            Err(again) => again,
        }
    }

    /// The confirm of a started publish, or the attempt's end when it never came.
    async fn confirmation(
        &self,
        link: &Link,
        started: Started,
    ) -> std::result::Result<Confirmation, Attempt> {
        let outcome = match self.outcome(started.confirm.await, "publish") {
            Err(Unconfirmed::NotSent(err)) => {
                return Err(if interrupted(&err, link) {
                    Attempt::Again(err)
                } else {
                    Attempt::Done(Err(err))
                });
            }
            Err(Unconfirmed::Lost(err)) => Err(err),
            Ok(confirmation) => Ok(confirmation),
        };
        outcome.map_err(|err| {
            if link_alive(link) {
                Attempt::Done(Err(err))
            } else {
                // Lost with the connection or the channel: the broker may not have it.
                Attempt::Again(err)
            }
        })
    }

    /// What the collector said of a publish (`what`): its confirmation, or why there is none.
    fn outcome(
        &self,
        received: std::result::Result<Outcome, tokio::sync::oneshot::error::RecvError>,
        what: &str,
    ) -> std::result::Result<Confirmation, Unconfirmed> {
        match received {
            Ok(Outcome::Confirmed(outcome)) => (*outcome).map_err(|e| {
                Unconfirmed::Lost(self.broker_error(&format!("{what}: confirm failed"), e))
            }),
            Ok(Outcome::NotSent(e)) => Err(Unconfirmed::NotSent(
                self.broker_error(&format!("{what} failed"), e),
            )),
            // Its collector ended with its runtime.
            Err(gone) => Err(Unconfirmed::Lost(
                self.broker_error(&format!("{what}: confirm lost"), gone),
            )),
        }
    }

    /// What a confirm means for `message`.
    fn resolve(
        &self,
        confirmation: Confirmation,
        delay_queue: Option<String>,
        message: &Message,
    ) -> Attempt {
        let outcome = self.check_confirmation(confirmation, &message.routing_key);
        match (outcome, delay_queue) {
            (Err(e), Some(queue)) if e.kind() == ErrorKind::Rejected => {
                // The delay queue was deleted since we declared it: declare it again.
                lock(&self.leases).forget(&queue);
                Attempt::Again(e)
            }
            (outcome, _) => Attempt::Done(outcome),
        }
    }

    fn check_confirmation(&self, confirmation: Confirmation, routing_key: &str) -> Result<()> {
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "no queue is bound to routing key `{routing_key}` on exchange `{}` ({}); \
                     start a worker for that queue first, or fix the routing key",
                    self.exchange, returned.reply_text
                ),
            )),
            Confirmation::Nack(_) => Err(Error::new(
                ErrorKind::Broker,
                format!("the broker refused a message for `{routing_key}` (nack)"),
            )),
        }
    }

    /// Publishes one message and waits for its confirm, publishing it again (up to
    /// [`PUBLISH_ATTEMPTS`] times) if the connection was lost before the confirm came, or its
    /// delay queue had been deleted. The message may then be published twice: delivery is at
    /// least once.
    async fn publish_one(&self, message: &Message) -> Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let link = self.link().await?;
            let attempt = match self.start_publish(&link, message).await {
                Ok(started) => self.confirmed(&link, started, message).await,
                Err(e) if interrupted(&e, &link) => Attempt::Again(e),
                Err(e) => Attempt::Done(Err(e)),
            };
            match attempt {
                Attempt::Done(outcome) => return outcome,
                Attempt::Again(e) if attempts < PUBLISH_ATTEMPTS => {
                    warn!(error = %e.message(), attempts, "publish interrupted; publishing again");
                    // Give lapin time to see the connection gone (its status can lag the
                    // error by a moment), so that the next try reconnects instead of failing
                    // on the same socket.
                    tokio::time::sleep(PUBLISH_RETRY_PAUSE * attempts).await;
                }
                Attempt::Again(e) => return Err(e),
            }
        }
    }

    /// Publishes a window of messages on `link` with all their confirms in flight at once, and
    /// returns one outcome per message. A message the broker cannot take fails alone; the ones
    /// interrupted by a lost connection go again one by one ([`publish_one`](Self::publish_one)).
    async fn publish_window(&self, link: &Link, window: &[Message]) -> Vec<Result<()>> {
        // `None`: not handed over, the connection was lost (routing it) before its turn.
        let mut started = Vec::with_capacity(window.len());
        let mut lost = false;
        for message in window {
            if lost {
                started.push(None);
                continue;
            }
            match self.start_publish(link, message).await {
                Ok(start) => started.push(Some(Ok(start))),
                Err(e) if interrupted(&e, link) => {
                    debug!(error = %e.message(), "windowed publish interrupted");
                    lost = true;
                    started.push(None);
                }
                Err(e) => started.push(Some(Err(e))),
            }
        }
        // Every confirm first (each with its own return: `confirms`), then the ones to send
        // again, one by one.
        let mut confirms = Vec::with_capacity(window.len());
        for start in started {
            confirms.push(match start {
                Some(Ok(started)) => {
                    let delay_queue = started.delay_queue.clone();
                    Some(Ok((self.confirmation(link, started).await, delay_queue)))
                }
                Some(Err(e)) => Some(Err(e)),
                None => None,
            });
        }
        let mut outcomes = Vec::with_capacity(window.len());
        for (message, confirm) in window.iter().zip(confirms) {
            let outcome = match confirm {
                Some(Ok((confirmation, delay_queue))) => {
                    let attempt = match confirmation {
                        Ok(confirmation) => self.resolve(confirmation, delay_queue, message),
                        Err(attempt) => attempt,
                    };
                    match attempt {
                        Attempt::Done(outcome) => outcome,
                        Attempt::Again(e) => {
                            debug!(error = %e.message(), "publishing again");
                            self.publish_one(message).await
                        }
                    }
                }
                Some(Err(e)) => Err(e),
                None => self.publish_one(message).await,
            };
            outcomes.push(outcome);
        }
        outcomes
    }
}

/// Go's AMQP client reads `amqp://host/` (or no path) as the default vhost `/`; lapin reads it
/// as the vhost named "". Spell the default vhost out so Go's URLs mean the same here.
pub(crate) fn amqp_uri(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let after = scheme_end + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    match base[after..].find('/') {
        None => format!("{base}/%2f{query}"),
        Some(slash) if base.len() == after + slash + 1 => format!("{base}%2f{query}"),
        Some(_) => url.to_owned(),
    }
}

/// A connection to `url` named `<name>-<process id>`, with lapin's frames hidden from logs
/// unless `trace_frames` ([`TRACE_FRAMES_ENV`]); an error only without a tokio runtime.
pub(crate) async fn open_connection(
    url: &str,
    name: &str,
    trace_frames: bool,
) -> Result<std::result::Result<Connection, lapin::Error>> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("{name}-{}", std::process::id())));
    if trace_frames {
        return Ok(Connection::connect(url, properties).await);
    }
    let handle = tokio::runtime::Handle::try_current().map_err(|e| {
        Error::with_source(
            ErrorKind::Unsupported,
            "RabbitMQ connections need a tokio runtime",
            e,
        )
    })?;
    Ok(quiet::connect(url, properties, handle).await)
}

/// A passive declaration of `queue` on `channel`: its ready messages and consumers, or `None`
/// when it does not exist (RabbitMQ then closes the channel, counted in `losses`). The channel
/// is closed after.
pub(crate) async fn passive_declare(
    channel: &Channel,
    queue: ShortString,
    losses: &recycle::Losses,
) -> std::result::Result<Option<(u32, u32)>, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    // A missing queue closed the channel (lapin keeps its number); else it is closed here.
    losses.check(channel);
    if channel.status().connected() {
        let _ = channel.close(200, "declared".into()).await;
    }
    match declared {
        Ok(q) => Ok(Some((q.message_count(), q.consumer_count()))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `e` is RabbitMQ's NOT_FOUND (a missing queue).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
        ),
        _ => false,
    }
}

impl Inner {
    /// The ready messages of `queue` (a passive declare on a channel of its own, as a missing
    /// queue closes the channel that asked); `None` if there is no such queue.
    async fn ready_count(&self, queue: &str) -> Result<Option<u64>> {
        let name = short("queue name", queue)?;
        let (channel, losses) = self.inspect_channel().await?;
        let depth = passive_declare(&channel, name, &losses)
            .await
            .map_err(|e| {
                self.broker_error(&format!("cannot read the depth of queue `{queue}`"), e)
            })?;
        Ok(depth.map(|(ready, _)| u64::from(ready)))
    }
}

/// Keeps the delay queue `queue` declared while its lease lasts ([`lease`]): declares it again
/// every half delay, on the side channel of the current connection. It never reconnects (nor
/// waits for a reconnect): publishes do, and declare the queue on the new connection. Ends
/// with the lease, when the broker refuses the declaration for good, or when the broker is
/// dropped.
///
/// It declares without binding: if the queue was deleted meanwhile and this declaration makes
/// it anew, unbound, the next publish through the exchange comes back unroutable, and is
/// published again after a declaration that binds it.
async fn keep_delay_queue(broker: Weak<Inner>, queue: String, args: FieldTable) {
    loop {
        let next = match broker.upgrade() {
            Some(inner) => lock(&inner.leases).next(&queue, Instant::now()),
            None => return,
        };
        let Next::At(at) = next else {
            return;
        };
        let now = Instant::now();
        if at > now {
            // A publish may declare it meanwhile, which moves the next declaration on, and
            // the end of the last publish can bring it closer: look again at least every
            // `lease::FINAL_WITHIN`.
            tokio::time::sleep_until(at.min(now + lease::FINAL_WITHIN)).await;
            continue;
        }
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let link = match inner.current_link() {
            Ok(Some(link)) => link,
            Ok(None) => {
                // Down, and nobody reconnecting: publishes reconnect, and declare it anew.
                lock(&inner.leases).failed(&queue, Instant::now());
                continue;
            }
            Err(Busy) => {
                // A publish holds the link a moment, or a reconnect for longer: look again
                // soon, then less often (a failed declaration's pause).
                drop(inner);
                tokio::time::sleep(lease::RELOOK).await;
                if let Some(inner) = broker.upgrade() {
                    if matches!(inner.current_link(), Err(Busy)) {
                        lock(&inner.leases).failed(&queue, Instant::now());
                    }
                }
                continue;
            }
        };
        match inner
            .declare_side_queue(&link, &queue, args.clone(), false, |_| false)
            .await
        {
            Ok(Some(sent)) => lock(&inner.leases).declared(&queue, sent),
            Ok(None) => lock(&inner.leases).failed(&queue, Instant::now()),
            Err(e) if e.is_permanent() => {
                warn!(queue = %queue, error = %e.message(), "the broker refuses to declare a delay queue again; it is no longer kept");
                lock(&inner.leases).end(&queue);
                return;
            }
            Err(e) => {
                warn!(queue = %queue, error = %e.message(), "cannot declare a delay queue again; trying again");
                lock(&inner.leases).failed(&queue, Instant::now());
            }
        }
    }
}

fn link_alive(link: &Link) -> bool {
    link.channel.status().connected()
        && link.connection.status().connected()
        && link.confirms.is_alive()
}

/// Whether `err` came from losing `link` (so that publishing again on a new one may work).
fn interrupted(err: &Error, link: &Link) -> bool {
    !err.is_permanent() && (!link_alive(link) || lost_connection(err))
}

/// Whether `err` is lapin saying the connection or channel is gone: the socket's error, or a
/// closed state. The connection's status can still say connected when a publish already
/// failed on the reset socket (a broker restarting).
fn lost_connection(err: &Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<lapin::Error>())
        .is_some_and(|e| {
            matches!(
                e.kind(),
                lapin::ErrorKind::IOError(_)
                    | lapin::ErrorKind::InvalidConnectionState(_)
                    | lapin::ErrorKind::InvalidChannelState(..)
            )
        })
}

/// `s` as an AMQP short string; an error of kind [`ErrorKind::Encode`] naming `what` if it is
/// longer than 255 bytes (amq-protocol would panic on it).
pub(crate) fn short(what: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| Error::encode(overlong(what, s)))
}

/// The delay of a message's next hop through a delay queue, in milliseconds; `None` for no
/// delay, at most [`AmqpBroker::MAX_DELAY_HOP`].
fn hop_ms(delay: Option<Duration>) -> Option<u64> {
    let ms = u64::try_from(delay?.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_HOP_MS);
    (ms > 0).then_some(ms)
}

/// The `x-delivery-count` header RabbitMQ's quorum queues put on a redelivered message.
fn delivery_count(headers: Option<&FieldTable>) -> Option<u32> {
    let count = match headers?.inner().get("x-delivery-count")? {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    };
    u32::try_from(count).ok()
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// JSON values as AMQP field values (headers, queue arguments).
fn amqp_value(value: &Value) -> Result<AMQPValue> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => AMQPValue::LongLongInt(i),
            (None, Some(u), _) => AMQPValue::LongLongInt(saturating_i64(u)),
            (_, _, Some(f)) => AMQPValue::Double(f),
            _ => AMQPValue::Void,
        },
        Value::String(s) => long_string(s),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(amqp_value).collect::<Result<Vec<_>>>()?,
        )),
        Value::Object(map) => AMQPValue::FieldTable(field_table(map)?),
    })
}

/// A JSON object as an AMQP table; an error of kind [`ErrorKind::Encode`] if a key, at any
/// depth, is longer than 255 bytes.
fn field_table<'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a Value)>,
) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(short("table key", key)?, amqp_value(value)?);
    }
    Ok(table)
}

/// A message's AMQP headers: its signature's `Headers`, as Go's `Publish`
/// (`v2/brokers/amqp/amqp.go`) puts them there, except the trace context machinery gives every
/// message (`traceparent`, `tracestate`, `x-machinery-root`). That stays in the body's `Headers`
/// alone, where Go's `consumeOne` and machinery's consumer read it: a header table costs the
/// broker and every consumer of every message, about 15% of a raw consume (README, "differs on
/// purpose"). `None` when no header is left.
fn property_headers(headers: &Map<String, Value>) -> Result<Option<FieldTable>> {
    let mut own = headers
        .iter()
        .filter(|(key, _)| !is_trace_key(key))
        .peekable();
    if own.peek().is_none() {
        return Ok(None);
    }
    field_table(own).map(Some)
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.inner.masked_url)
            .field("exchange", &self.inner.exchange)
            .field("default_queue", &self.inner.default_queue)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn default_routing_key(&self) -> &str {
        &self.inner.default_routing_key
    }

    /// A passive declare's message count, on a channel of its own (a missing queue closes
    /// the channel that asked).
    async fn queue_depth(&self, queue: &str) -> Result<Option<u64>> {
        let ready = self.inner.ready_count(queue).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Broker,
                format!("cannot read the depth of queue `{queue}`: it does not exist"),
            )
        })?;
        Ok(Some(ready))
    }

    /// The dead-letter queue's message count: 0 before anything was dead-lettered from
    /// `queue` (the queue is made with the first). A queue found missing is asked again only
    /// after 60 s, or at once when this process made it: RabbitMQ closes the
    /// channel of a passive declare of a missing queue, and logs an error each time.
    async fn dead_letter_depth(&self, queue: &str) -> Result<Option<u64>> {
        let dead = AmqpBroker::dead_letter_queue(queue);
        let now = Instant::now();
        let recently_missing = lock(&self.inner.missing)
            .get(&dead)
            .is_some_and(|at| now.saturating_duration_since(*at) < MISSING_RECHECK);
        if recently_missing && !lock(&self.inner.declared).is_fresh(&dead) {
            return Ok(Some(0));
        }
        let ready = self.inner.ready_count(&dead).await?;
        let mut missing = lock(&self.inner.missing);
        match ready {
            Some(_) => {
                missing.remove(&dead);
            }
            None => {
                if missing.len() >= MAX_DECLARED {
                    missing.clear();
                }
                missing.insert(dead, now);
            }
        }
        Ok(Some(ready.unwrap_or(0)))
    }

    fn reconnects(&self) -> u64 {
        AmqpBroker::reconnects(self)
    }

    async fn publish(&self, message: Message) -> Result<()> {
        self.inner.publish_one(&message).await
    }

    fn validate(&self, message: &Message) -> Result<()> {
        self.inner.validate(message)
    }

    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<()>> {
        let mut outcomes: Vec<Result<()>> = Vec::with_capacity(messages.len());
        for window in messages.chunks(CONFIRM_WINDOW) {
            match self.inner.link().await {
                Ok(link) => outcomes.extend(self.inner.publish_window(&link, window).await),
                Err(e) => {
                    // The broker stayed unreachable (or refuses our topology): nothing more can
                    // be sent.
                    let left = messages.len() - outcomes.len();
                    let (kind, message) = (e.kind(), e.message().to_owned());
                    outcomes.push(Err(e));
                    outcomes.extend((1..left).map(|_| Err(Error::new(kind, message.clone()))));
                    break;
                }
            }
        }
        outcomes
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>> {
        let dead_letter = AmqpBroker::dead_letter_queue(queue);
        for (what, name) in [
            ("queue name", queue),
            ("dead-letter queue name", &dead_letter),
        ] {
            if name.len() > AMQP_MAX_NAME {
                return Err(Error::config(overlong(what, name)));
            }
        }
        let mut consumer = AmqpConsumer {
            broker: self.inner.clone(),
            queue: Arc::from(queue),
            prefetch,
            tag: format!(
                "machinery-{}-{}",
                std::process::id(),
                crate::wire::new_uuid("")
            ),
            state: None,
            cancelled: false,
        };
        // Fail fast (after the reconnect timeout) if the queue cannot be consumed.
        consumer.open().await?;
        Ok(Box::new(consumer))
    }
}

struct AmqpConsumer {
    broker: Arc<Inner>,
    /// Shared with every delivery's acker (which names it when dead-lettering).
    queue: Arc<str>,
    prefetch: u16,
    tag: String,
    state: Option<ConsumerState>,
    cancelled: bool,
}

struct ConsumerState {
    channel: Channel,
    stream: lapin::Consumer,
    acks: mpsc::UnboundedSender<Settle>,
    /// The highest delivery tag received, for the settler to see how full the window is.
    delivered: acks::Delivered,
    settler: tokio::task::JoinHandle<()>,
    _link: Link,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("queue", &self.queue)
            .field("tag", &self.tag)
            .field("connected", &self.state.is_some())
            .finish()
    }
}

impl AmqpConsumer {
    async fn open(&mut self) -> Result<()> {
        let link = self.broker.link().await?;
        let b = &self.broker;
        let channel = recycle::open_channel(&link.connection)
            .await
            .map_err(|e| b.broker_error("cannot open a consumer channel", e))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| b.broker_error("cannot set the prefetch count", e))?;
        b.declare_queue(&channel, &self.queue).await?;
        let stream = channel
            .basic_consume(
                short("queue name", &self.queue)?,
                short("consumer tag", &self.tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| b.broker_error(&format!("cannot consume queue `{}`", self.queue), e))?;
        let (acks, rx) = mpsc::unbounded_channel();
        let frames = ChannelFrames(channel.clone());
        let delivered = acks::Delivered::default();
        let settler = tokio::spawn(acks::settle_loop(
            frames,
            self.prefetch,
            delivered.clone(),
            rx,
        ));
        info!(queue = %self.queue, prefetch = self.prefetch, node = %b.node_url(link.node), "consuming");
        self.state = Some(ConsumerState {
            channel,
            stream,
            acks,
            delivered,
            settler,
            _link: link,
        });
        Ok(())
    }
}

impl AmqpConsumer {
    /// [`Consumer::next`]: its future is the box every delivery makes.
    async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.cancelled {
                return None;
            }
            if self.state.is_none() {
                // Boxed: opening is rare, and its future (over a kilobyte) would otherwise be
                // part of the one every delivery's `next` makes.
                if let Err(e) = Box::pin(self.open()).await {
                    return Some(Err(e));
                }
            }
            let state = self.state.as_mut()?;
            match state.stream.next().await {
                Some(Ok(delivery)) => {
                    state.delivered.saw(delivery.delivery_tag);
                    let body = Bytes::from(delivery.data);
                    let acker = AmqpAcker {
                        acks: state.acks.clone(),
                        tag: delivery.delivery_tag,
                        settled: AtomicBool::new(false),
                        broker: self.broker.clone(),
                        queue: self.queue.clone(),
                        body: body.clone(),
                    };
                    let mut handed = Delivery::new(body, delivery.redelivered, Box::new(acker));
                    // A quorum queue counts the deliveries before this one in the header
                    // `x-delivery-count`, from the first redelivery on.
                    let count = delivery_count(delivery.properties.headers().as_ref())
                        .or(self.broker.quorum.then_some(0));
                    if let Some(count) = count {
                        handed = handed.with_delivery_count(count);
                    }
                    if let Some(limit) = self.broker.delivery_limit {
                        handed = handed.with_delivery_limit(limit);
                    }
                    return Some(Ok(handed));
                }
                Some(Err(e)) => {
                    warn!(queue = %self.queue, error = %e, "consumer interrupted; reconnecting");
                    self.state = None;
                }
                None => {
                    warn!(queue = %self.queue, "consumer closed by the broker; reconnecting");
                    self.state = None;
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.next_delivery().await
    }

    async fn close(&mut self) -> Result<()> {
        self.cancelled = true;
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        // The settle task ends once every delivery's acker is gone and it has sent their acks;
        // a delivery still held (a task handed back after a delay) must not keep us forever.
        drop(state.acks);
        if tokio::time::timeout(Duration::from_secs(5), state.settler)
            .await
            .is_err()
        {
            warn!(queue = %self.queue, "acknowledgements still pending at close; the broker will redeliver those messages");
        }
        // close-ok from the broker means every frame before it, acks included, has arrived.
        state
            .channel
            .close(200, "worker stopped".into())
            .await
            .map_err(|e| {
                self.broker
                    .broker_error("cannot close the consumer channel", e)
            })
    }

    async fn cancel(&mut self) -> Result<()> {
        self.cancelled = true;
        if let Some(state) = &self.state {
            state
                .channel
                .basic_cancel(
                    short("consumer tag", &self.tag)?,
                    BasicCancelOptions::default(),
                )
                .await
                .map_err(|e| self.broker.broker_error("cannot cancel the consumer", e))?;
        }
        Ok(())
    }
}

/// Sends a consumer channel's settlement frames (see [`acks::settle_loop`]).
struct ChannelFrames(Channel);

#[async_trait]
impl acks::Frames for ChannelFrames {
    async fn send(&self, frame: Frame) {
        let channel = &self.0;
        let sent = match frame {
            Frame::AckUpTo(tag) => {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
            }
            Frame::Ack(tag) => {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: false })
                    .await
            }
            Frame::Reject(tag, requeue) => {
                channel
                    .basic_reject(tag, BasicRejectOptions { requeue })
                    .await
            }
        };
        // The broker redelivers what it did not get settled.
        if let Err(e) = sent {
            debug!(error = %e, ?frame, "settling failed (the broker redelivers the message)");
        }
    }
}

struct AmqpAcker {
    acks: mpsc::UnboundedSender<Settle>,
    tag: u64,
    settled: AtomicBool,
    broker: Arc<Inner>,
    queue: Arc<str>,
    body: Bytes,
}

impl fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpAcker")
            .field("tag", &self.tag)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpAcker {
    fn send(&self, settle: Settle) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            // If the channel is gone, so is the delivery: the broker redelivers it.
            let _ = self.acks.send(settle);
        }
    }

    async fn move_to_dead_letter_queue(&self, reason: &str) -> Result<()> {
        let queue = AmqpBroker::dead_letter_queue(&self.queue);
        let link = self.broker.link().await?;
        self.broker.declare_dead_letter_queue(&link, &queue).await?;
        let mut headers = FieldTable::default();
        headers.insert("x-machinery-source-queue".into(), long_string(&self.queue));
        headers.insert("x-machinery-reason".into(), long_string(reason));
        // To the default exchange, which routes by queue name.
        let routing_key = short("queue name", &queue)?;
        let confirm = link.confirms.publish(Publish {
            exchange: ShortString::default(),
            routing_key,
            body: self.body.clone(),
            options: BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        });
        let confirmation = self
            .broker
            .outcome(confirm.await, "dead-letter publish")
            .map_err(Unconfirmed::into_error)?;
        self.broker.check_confirmation(confirmation, &queue)
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<()> {
        self.send(Settle::Ack(self.tag));
        Ok(())
    }

    async fn reject(&self, how: Rejection) -> Result<()> {
        match how {
            Rejection::Requeue => self.send(Settle::Reject(self.tag, true)),
            Rejection::DeadLetter { reason } => match self.move_to_dead_letter_queue(&reason).await
            {
                Ok(()) => self.send(Settle::Ack(self.tag)),
                Err(e) => {
                    // Keep the message: declare the dead-letter queue again next time (it may
                    // have been deleted) and let the broker deliver the message again.
                    // After a pause: a dead-letter queue that keeps refusing must not make the
                    // message spin through the worker.
                    error!(error = %e, pause = ?DEAD_LETTER_RETRY_PAUSE, "cannot move a message to the dead-letter queue; handing it back after a pause");
                    lock(&self.broker.declared).remove(&AmqpBroker::dead_letter_queue(&self.queue));
                    if !self.settled.swap(true, Ordering::AcqRel) {
                        let (acks, tag) = (self.acks.clone(), self.tag);
                        tokio::spawn(async move {
                            tokio::time::sleep(DEAD_LETTER_RETRY_PAUSE).await;
                            let _ = acks.send(Settle::Reject(tag, true));
                        });
                    }
                    return Err(e);
                }
            },
        }
        Ok(())
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        // Dropped unsettled (a worker stopping mid-task): back to the queue.
        self.send(Settle::Reject(self.tag, true));
    }
}

/// Keeps lapin's frame-level TRACE events, and with them the login frame that carries the
/// password, out of the logs, and its WARN event of a returned message, which prints the
/// message's body (a task's arguments may hold secrets); the publisher gets the return as a
/// `Rejected` error instead.
///
/// lapin logs every frame it writes at TRACE (`will write to buffer next_msg=...`), and the
/// `connection.start-ok` frame holds the SASL response `\0user\0password`. It logs from its
/// own tasks and from an I/O thread of its own, which use the process's global dispatcher
/// rather than the caller's. So the connection is given a runtime of ours: every task lapin
/// spawns, and the I/O thread (from the first future it blocks on there), run with a
/// dispatcher that forwards everything to the caller's dispatcher except those events.
pub(crate) mod quiet {
    use std::cell::RefCell;
    use std::future::Future;

    use async_rs::traits::Executor;
    use async_rs::util::{RuntimeParts, Task};
    use lapin::{Connection, ConnectionProperties};
    use tracing::dispatcher::{self, DefaultGuard, Dispatch};
    use tracing::instrument::WithSubscriber as _;
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::{Interest, Subscriber};
    use tracing::{Event, Level, Metadata};

    /// The name lapin gives its I/O thread.
    const IO_THREAD: &str = "lapin-io-loop";

    thread_local! {
        /// On lapin's I/O thread: our dispatcher, its default for the thread's lifetime.
        static IO_THREAD_DEFAULT: RefCell<Option<DefaultGuard>> = const { RefCell::new(None) };
    }

    /// Connects like [`Connection::connect`], with lapin's frame-level events hidden from the
    /// caller's dispatcher.
    pub(crate) async fn connect(
        uri: &str,
        properties: ConnectionProperties,
        handle: tokio::runtime::Handle,
    ) -> lapin::Result<Connection> {
        let dispatch = dispatcher::get_default(|current| {
            Dispatch::new(HideFrames {
                inner: current.clone(),
            })
        });
        let tokio = async_rs::Tokio::default().with_handle(handle);
        let executor = QuietExecutor {
            tokio: tokio.clone(),
            dispatch: dispatch.clone(),
        };
        let runtime = async_rs::Runtime::new(RuntimeParts::new(executor, tokio));
        Connection::connect_with_runtime(uri, properties, runtime)
            .with_subscriber(dispatch)
            .await
    }

    /// Whether `metadata` is one of lapin's TRACE events that print a whole frame: the frame
    /// it is about to write (`next_msg`), or frames it discards or handles (`frame`, `frames`).
    pub(super) fn carries_frames(metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
            && *metadata.level() == Level::TRACE
            && metadata.target().starts_with("lapin")
            && metadata
                .fields()
                .iter()
                .any(|field| matches!(field.name(), "next_msg" | "frame" | "frames"))
    }

    /// Whether `metadata` is lapin's event of a message the broker returned, which prints the
    /// whole message, body included (`returned_messages.rs`: "Server returned us a message").
    pub(super) fn carries_body(metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
            && metadata.target() == "lapin::returned_messages"
            && *metadata.level() == Level::WARN
    }

    /// Whether `metadata` is an event kept out of the logs: [`carries_frames`],
    /// [`carries_body`].
    pub(super) fn hidden(metadata: &Metadata<'_>) -> bool {
        carries_frames(metadata) || carries_body(metadata)
    }

    /// Forwards everything to `inner`, except [`hidden`] events.
    ///
    /// (`Dispatch` does not expose its subscriber's level hint or current span, so this one
    /// gives none: `Span::current()` inside lapin is `Span::none()`.)
    pub(super) struct HideFrames {
        pub(super) inner: Dispatch,
    }

    impl Subscriber for HideFrames {
        fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
            if hidden(metadata) {
                Interest::never()
            } else {
                self.inner.register_callsite(metadata)
            }
        }

        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            !hidden(metadata) && self.inner.enabled(metadata)
        }

        fn new_span(&self, span: &Attributes<'_>) -> Id {
            self.inner.new_span(span)
        }

        fn record(&self, span: &Id, values: &Record<'_>) {
            self.inner.record(span, values);
        }

        fn record_follows_from(&self, span: &Id, follows: &Id) {
            self.inner.record_follows_from(span, follows);
        }

        fn event_enabled(&self, event: &Event<'_>) -> bool {
            !hidden(event.metadata())
        }

        fn event(&self, event: &Event<'_>) {
            // Asks the inner subscriber's `event_enabled` too.
            self.inner.event(event);
        }

        fn enter(&self, span: &Id) {
            self.inner.enter(span);
        }

        fn exit(&self, span: &Id) {
            self.inner.exit(span);
        }

        fn clone_span(&self, id: &Id) -> Id {
            self.inner.clone_span(id)
        }

        fn try_close(&self, id: Id) -> bool {
            self.inner.try_close(id)
        }
    }

    /// tokio's executor, running everything lapin hands it under `dispatch`.
    #[derive(Clone, Debug)]
    struct QuietExecutor {
        tokio: async_rs::Tokio,
        dispatch: Dispatch,
    }

    impl Executor for QuietExecutor {
        type Task<T: Send + 'static> = <async_rs::Tokio as Executor>::Task<T>;

        fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
            // lapin blocks on a future (connecting its socket) first thing on its I/O thread,
            // which it spawns without any dispatcher of ours; it logs frames there outside any
            // future. Make ours that thread's default for the thread's lifetime.
            if std::thread::current().name() == Some(IO_THREAD) {
                IO_THREAD_DEFAULT.with(|slot| {
                    let mut slot = slot.borrow_mut();
                    if slot.is_none() {
                        *slot = Some(dispatcher::set_default(&self.dispatch));
                    }
                });
            }
            self.tokio
                .block_on(f.with_subscriber(self.dispatch.clone()))
        }

        fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
            &self,
            f: F,
        ) -> Task<Self::Task<T>> {
            self.tokio.spawn(f.with_subscriber(self.dispatch.clone()))
        }

        fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
            &self,
            f: F,
        ) -> Task<Self::Task<T>> {
            let dispatch = self.dispatch.clone();
            self.tokio
                .spawn_blocking(move || dispatcher::with_default(&dispatch, f))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::returned_size;

    /// Every delivery is a call of `next`, whose future `async_trait` boxes (that of
    /// `next_delivery`, measured here, and a few bytes more). Opening the
    /// channel (rare) is boxed apart: with it inline, the future was about 1.2 KiB, above what
    /// glibc's `malloc` serves from its per-thread cache, so that every delivery took its
    /// slower path.
    #[test]
    fn the_future_of_each_delivery_is_small() {
        let size = returned_size(|consumer: &'static mut AmqpConsumer| consumer.next_delivery());
        assert!(size <= 512, "next: {size} bytes");
    }

    #[test]
    fn default_vhost_is_spelled_out() {
        assert_eq!(
            amqp_uri("amqp://guest:guest@localhost:5672/"),
            "amqp://guest:guest@localhost:5672/%2f"
        );
        assert_eq!(amqp_uri("amqp://localhost"), "amqp://localhost/%2f");
        assert_eq!(
            amqp_uri("amqp://h/?heartbeat=10"),
            "amqp://h/%2f?heartbeat=10"
        );
        assert_eq!(amqp_uri("amqp://h/prod"), "amqp://h/prod");
        assert_eq!(amqp_uri("amqps://h:5671/%2f"), "amqps://h:5671/%2f");
    }

    #[test]
    fn the_declared_cache_is_bounded() {
        let mut declared = Declared::default();
        // One dead-letter queue per consumed queue: the cache stops at its cap, forgetting
        // the oldest.
        for i in 0..MAX_DECLARED + 100 {
            declared.insert(format!("q{i}.dead_letter"));
        }
        assert_eq!(declared.len(), MAX_DECLARED);
        assert!(
            !declared.is_fresh("q0.dead_letter"),
            "the oldest was evicted"
        );
        assert!(!declared.is_fresh("q99.dead_letter"));
        assert!(declared.is_fresh("q100.dead_letter"));
        assert!(declared.is_fresh(&format!("q{}.dead_letter", MAX_DECLARED + 99)));
        // Declared again, it is the newest.
        declared.insert("q100.dead_letter".to_owned());
        declared.insert("new.dead_letter".to_owned());
        assert!(declared.is_fresh("q100.dead_letter"));
        assert!(!declared.is_fresh("q101.dead_letter"));
        declared.remove("q100.dead_letter");
        assert!(!declared.is_fresh("q100.dead_letter"));
    }

    #[test]
    fn overlong_table_keys_are_errors_at_any_depth() {
        let long = "k".repeat(256);
        for value in [
            serde_json::json!({ long.clone(): 1 }),
            serde_json::json!({ "a": { "b": [1, { long.clone(): 1 }] } }),
        ] {
            let map = value.as_object().cloned().unwrap_or_default();
            let err = field_table(&map).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Encode);
            assert_eq!(overlong_key(&map), Some(long.as_str()));
        }
        let fits = serde_json::json!({ "k".repeat(255): [{ "k".repeat(255): 1 }] });
        let map = fits.as_object().cloned().unwrap_or_default();
        assert!(field_table(&map).is_ok());
        assert_eq!(overlong_key(&map), None);
    }

    #[test]
    fn the_trace_context_is_kept_out_of_the_amqp_headers() {
        let headers = |v: serde_json::Value| v.as_object().cloned().unwrap_or_default();
        assert!(property_headers(&headers(serde_json::json!({})))
            .unwrap()
            .is_none());
        let trace_only = headers(serde_json::json!({
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "a=1",
            "x-machinery-root": "task_1",
        }));
        assert!(property_headers(&trace_only).unwrap().is_none());
        let mut mixed = trace_only;
        mixed.insert("tenant".into(), "acme".into());
        mixed.insert(
            "nested".into(),
            serde_json::json!({"traceparent": "kept inside"}),
        );
        mixed.insert("x-machinery-attempts".into(), 2.into());
        let table = property_headers(&mixed).unwrap().expect("a table");
        let mut keys: Vec<&str> = table.inner().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["nested", "tenant", "x-machinery-attempts"]);
    }

    #[test]
    fn a_reset_connection_interrupts_a_publish_before_lapin_says_it_is_closed() {
        // A publish can fail with the socket's error while the connection's status still says
        // connected (the broker restarting): the message must be sent again, not failed.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let err = Error::with_source(
            ErrorKind::Broker,
            "publish failed",
            lapin::Error::from(reset),
        );
        assert!(lost_connection(&err));
        let closed = lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
            lapin::ConnectionState::Closed,
        ));
        assert!(lost_connection(&Error::with_source(
            ErrorKind::Broker,
            "x",
            closed
        )));
        // Anything else is not a lost connection.
        let other = std::io::Error::other("a file");
        assert!(!lost_connection(&Error::with_source(
            ErrorKind::Broker,
            "x",
            other
        )));
        assert!(!lost_connection(&Error::new(ErrorKind::Broker, "x")));
        let limit = lapin::Error::from(lapin::ErrorKind::ChannelsLimitReached);
        assert!(!lost_connection(&Error::with_source(
            ErrorKind::Broker,
            "x",
            limit
        )));
    }

    #[test]
    fn delivery_counts_from_headers() {
        let mut headers = FieldTable::default();
        assert_eq!(delivery_count(None), None);
        assert_eq!(delivery_count(Some(&headers)), None);
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        assert_eq!(delivery_count(Some(&headers)), Some(2));
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(-1));
        assert_eq!(delivery_count(Some(&headers)), None);
        headers.insert("x-delivery-count".into(), long_string("3"));
        assert_eq!(delivery_count(Some(&headers)), None);
    }

    /// Counts the events it is given.
    struct Count(Arc<AtomicU64>);

    impl tracing::Subscriber for Count {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn frame_events_are_hidden_and_the_rest_forwarded() {
        let count = Arc::new(AtomicU64::new(0));
        let inner = tracing::Dispatch::new(Count(count.clone()));
        let hiding = tracing::Dispatch::new(quiet::HideFrames { inner });
        tracing::dispatcher::with_default(&hiding, || {
            tracing::trace!(target: "lapin::io_loop", next_msg = "StartOk", "will write to buffer");
            tracing::trace!(target: "lapin::frames", frame = "StartOk", "discarding");
            tracing::trace!(target: "lapin::io_loop", "io_loop run");
            tracing::debug!(target: "lapin::io_loop", next_msg = "x", "not a TRACE event");
            tracing::trace!(target: "elsewhere", frame = 1, "not lapin");
            tracing::warn!(target: "lapin::returned_messages", message = "{\"token\":1}", "Server returned us a message");
            tracing::trace!(target: "lapin::returned_messages", "storing it");
        });
        assert_eq!(count.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn json_to_amqp_values() {
        let table = field_table(&serde_json::json!({"x-max-priority": 10, "x-queue-type": "quorum", "f": 1.5, "b": true}).as_object().cloned().unwrap_or_default()).unwrap();
        let inner = table.inner();
        assert_eq!(
            inner.get("x-max-priority"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert_eq!(inner.get("b"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(inner.get("f"), Some(&AMQPValue::Double(1.5)));
        assert!(matches!(
            inner.get("x-queue-type"),
            Some(AMQPValue::LongString(_))
        ));
    }
}
