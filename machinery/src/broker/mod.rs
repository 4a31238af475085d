//! The broker abstraction: publish messages, consume deliveries, settle them.
//!
//! A [`Broker`] moves encoded messages; it knows nothing of tasks. The worker settles every
//! [`Delivery`] exactly once, and only after the task's outcome is recorded and its follow-up
//! messages are published:
//!
//! - [`Delivery::ack`]: done, remove it;
//! - [`Delivery::requeue`]: hand it back for another consumer (a task this worker does not have);
//! - [`Delivery::dead_letter`]: it can never succeed (undecodable, oversized): move it to the
//!   dead-letter queue, never back into the queue.
//!
//! A delivery dropped without being settled goes back to the queue, as an unacknowledged AMQP
//! message does when its channel closes: nothing is lost if a worker stops mid-task.
//!
//! Delayed messages ([`Message::delay`]) are held by the broker and delivered when the delay has
//! passed (AMQP does this with dead-lettering TTL queues).

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::Result;

/// A message to publish.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Message {
    /// Where the message goes (a queue or binding key).
    pub routing_key: String,
    /// The encoded signature.
    pub body: Bytes,
    /// Message priority (0 = none).
    pub priority: u8,
    /// Message headers. The RabbitMQ broker sends them as the message's AMQP headers, except
    /// the trace context keys (`traceparent`, `tracestate`, `x-machinery-root`), which travel
    /// in the body's `Headers` only; the other brokers keep them in the body alone.
    pub headers: Map<String, Value>,
    /// Hold the message this long before delivering it.
    pub delay: Option<Duration>,
}

impl Message {
    /// A message with the given routing key and body.
    pub fn new(routing_key: impl Into<String>, body: impl Into<Bytes>) -> Message {
        Message {
            routing_key: routing_key.into(),
            body: body.into(),
            ..Message::default()
        }
    }
}

/// A message broker: RabbitMQ, or the embedded in-process broker.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// The routing key a message with an empty `RoutingKey` is published with
    /// (Go's `AdjustRoutingKey`).
    fn default_routing_key(&self) -> &str;

    /// Publishes one message; returns once the broker has accepted it.
    async fn publish(&self, message: Message) -> Result<()>;

    /// Publishes several messages; brokers pipeline them. Returns one outcome per message, in
    /// order, so that a caller knows exactly which messages the broker accepted.
    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<()>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            outcomes.push(self.publish(message).await);
        }
        outcomes
    }

    /// Checks that the broker can carry `message` at all (name lengths, header keys, delay
    /// range), without sending anything. An error here is permanent
    /// ([`Error::is_permanent`](crate::Error::is_permanent)); [`publish`](Self::publish) makes
    /// the same check, so nothing the broker cannot carry reaches the wire (or panics in the
    /// client library).
    fn validate(&self, message: &Message) -> Result<()> {
        let _ = message;
        Ok(())
    }

    /// Starts consuming `queue` with at most `prefetch` unsettled deliveries at a time.
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>>;

    /// How many messages wait in `queue`, as the broker reports it: RabbitMQ's count from a
    /// passive declare, the Redis list's length, the embedded queue's length. `None`: this
    /// broker cannot say. Workers sample it for their `machinery_queue_depth` metric.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// use machinery::broker::{memory::MemoryBroker, Broker};
    /// let broker = MemoryBroker::open("depth-docs", "machinery_tasks", "machinery_task");
    /// broker.push_raw("machinery_tasks", &b"{}"[..]);
    /// assert_eq!(broker.queue_depth("machinery_tasks").await?, Some(1));
    /// # Ok(()) }
    /// ```
    async fn queue_depth(&self, queue: &str) -> Result<Option<u64>> {
        let _ = queue;
        Ok(None)
    }

    /// How many messages wait in `queue`'s dead-letter queue, as the broker reports it; `None`
    /// if the broker cannot tell. A dead-letter queue not made yet holds 0.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// use machinery::broker::{memory::MemoryBroker, Broker};
    /// let broker = MemoryBroker::open("dead-depth-docs", "machinery_tasks", "machinery_task");
    /// assert_eq!(broker.dead_letter_depth("machinery_tasks").await?, Some(0));
    /// # Ok(()) }
    /// ```
    async fn dead_letter_depth(&self, queue: &str) -> Result<Option<u64>> {
        let _ = queue;
        Ok(None)
    }

    /// How many times the broker had to open its connection again since it was opened.
    fn reconnects(&self) -> u64 {
        0
    }
}

/// A stream of deliveries from one queue.
#[async_trait]
pub trait Consumer: Send + fmt::Debug {
    /// The next delivery; `None` once the consumer is cancelled or the broker is gone for good.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Stops taking new deliveries. Deliveries already handed out can still be settled.
    async fn cancel(&mut self) -> Result<()>;

    /// After [`cancel`](Self::cancel) and once the deliveries handed out are settled: makes sure
    /// their acknowledgements reached the broker, and releases the consumer.
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// How a delivery that is not acknowledged leaves the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// Back into the queue, for this or another consumer.
    Requeue,
    /// To the dead-letter queue: it can never succeed.
    DeadLetter {
        /// Why, for the operator (the AMQP broker puts it in the `x-machinery-reason` header).
        reason: String,
    },
}

/// Settles one delivery with its broker.
#[async_trait]
pub trait Acker: Send + Sync + fmt::Debug {
    /// Acknowledges the delivery.
    async fn ack(&self) -> Result<()>;
    /// Rejects the delivery.
    async fn reject(&self, how: Rejection) -> Result<()>;
}

/// One message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    body: Bytes,
    redelivered: bool,
    delivery_count: Option<u32>,
    delivery_limit: Option<u32>,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery that `acker` settles.
    pub fn new(body: Bytes, redelivered: bool, acker: Box<dyn Acker>) -> Delivery {
        Delivery {
            body,
            redelivered,
            delivery_count: None,
            delivery_limit: None,
            acker,
        }
    }

    /// Records how many times the broker delivered this message before, for brokers that count
    /// (RabbitMQ quorum queues' `x-delivery-count`, the embedded broker).
    #[must_use]
    pub fn with_delivery_count(mut self, previous_deliveries: u32) -> Delivery {
        self.delivery_count = Some(previous_deliveries);
        self
    }

    /// The same delivery as a broker that does not count would hand it out.
    #[cfg(feature = "testing")]
    pub(crate) fn forget_delivery_count(mut self) -> Delivery {
        self.delivery_count = None;
        self
    }

    /// Records the broker's own limit on [`delivery_count`](Self::delivery_count): a RabbitMQ
    /// quorum queue's `x-delivery-limit`, past which the broker drops the message (or
    /// dead-letters it, if the queue has a dead-letter exchange) instead of delivering it. The
    /// worker dead-letters a message on the last delivery the broker allows, never running it
    /// into the broker's drop; see [`delivery_limit`](Self::delivery_limit).
    ///
    /// ```
    /// # use machinery::broker::{Acker, Delivery, Rejection};
    /// # #[derive(Debug)] struct NoAck;
    /// # #[async_trait::async_trait] impl Acker for NoAck {
    /// #     async fn ack(&self) -> machinery::Result<()> { Ok(()) }
    /// #     async fn reject(&self, _: Rejection) -> machinery::Result<()> { Ok(()) }
    /// # }
    /// let delivery = Delivery::new("{}".into(), true, Box::new(NoAck))
    ///     .with_delivery_count(2)
    ///     .with_delivery_limit(2);
    /// assert_eq!(delivery.delivery_limit(), Some(2));
    /// ```
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Delivery {
        self.delivery_limit = Some(limit);
        self
    }

    /// The broker's limit on [`delivery_count`](Self::delivery_count), if it has one: once the
    /// count reaches it, this is the last delivery the broker makes.
    pub fn delivery_limit(&self) -> Option<u32> {
        self.delivery_limit
    }

    /// How many times the broker delivered this message before, if it counts; `None` when it
    /// only knows [`redelivered`](Self::redelivered).
    pub fn delivery_count(&self) -> Option<u32> {
        self.delivery_count
    }

    /// The same delivery, settled through `wrap(acker)`: for layers that observe or alter
    /// settling (such as the `testing` feature's `FaultyBroker`).
    pub fn wrap_acker(mut self, wrap: impl FnOnce(Box<dyn Acker>) -> Box<dyn Acker>) -> Delivery {
        self.acker = wrap(self.acker);
        self
    }

    /// The message body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether the broker delivered this message before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Acknowledges: the message is done.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Hands the message back to the queue.
    pub async fn requeue(self) -> Result<()> {
        self.acker.reject(Rejection::Requeue).await
    }

    /// Moves the message to the dead-letter queue, saying why.
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<()> {
        self.acker
            .reject(Rejection::DeadLetter {
                reason: reason.into(),
            })
            .await
    }
}
