//! The embedded in-process broker (`memory://`).
//!
//! It takes the same path as a network broker: signatures are encoded to bytes when published,
//! decoded by the worker, and every delivery is acknowledged, requeued or dead-lettered
//! explicitly; a delivery dropped unsettled is redelivered. Brokers are shared by name within a
//! process: every [`Server`](crate::Server) and worker configured with `memory://jobs` uses the
//! same broker, so producers and workers meet without any setup.
//!
//! Messages are delivered in publication order (priorities are carried but not reordered), and
//! nothing survives the process. Each delivery says how many times the message was delivered
//! before ([`Delivery::delivery_count`]), as a RabbitMQ quorum queue does. The dead letters of a
//! queue are kept with their reason, the newest [`MAX_DEAD_LETTERS`] of them.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::{Acker, Broker, Consumer, Delivery, Message, Rejection};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;

/// How many dead letters a queue of the embedded broker keeps; older ones are dropped (and
/// counted in [`MemoryBroker::dead_letters_dropped`]).
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// An in-process broker; see the [module docs](self).
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    default_routing_key: String,
}

struct Shared {
    name: String,
    /// routing key -> queues bound with it
    routes: Mutex<HashMap<String, Vec<Arc<Queue>>>>,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
}

struct Queue {
    name: String,
    inner: Mutex<QueueInner>,
    ready: Notify,
}

#[derive(Default)]
struct QueueInner {
    ready: VecDeque<Stored>,
    unacked: HashMap<u64, Stored>,
    dead: VecDeque<(Bytes, String)>,
    dead_dropped: u64,
    next_tag: u64,
}

#[derive(Clone)]
struct Stored {
    body: Bytes,
    /// How many times it was delivered before.
    deliveries: u32,
}

impl Stored {
    fn new(body: Bytes) -> Stored {
        Stored {
            body,
            deliveries: 0,
        }
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Shared>>> {
    static BROKERS: OnceLock<Mutex<HashMap<String, Arc<Shared>>>> = OnceLock::new();
    BROKERS.get_or_init(Default::default)
}

impl MemoryBroker {
    /// Opens the process-wide broker called `name` (created on first use) and binds
    /// `default_queue` to `binding_key`, as an AMQP producer declares its topology.
    ///
    /// ```
    /// use machinery::broker::memory::MemoryBroker;
    /// let a = MemoryBroker::open("docs", "tasks", "task");
    /// let b = MemoryBroker::open("docs", "tasks", "task");
    /// assert!(a.same_broker(&b));
    /// ```
    pub fn open(name: &str, default_queue: &str, binding_key: &str) -> MemoryBroker {
        let shared = lock(registry())
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Shared {
                    name: name.to_owned(),
                    routes: Mutex::new(HashMap::new()),
                    queues: Mutex::new(HashMap::new()),
                })
            })
            .clone();
        shared.bind(default_queue, binding_key);
        MemoryBroker {
            shared,
            default_routing_key: binding_key.to_owned(),
        }
    }

    /// Whether both handles are the same broker.
    pub fn same_broker(&self, other: &MemoryBroker) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Puts raw bytes into `queue`, bypassing encoding: for tests of bad input.
    pub fn push_raw(&self, queue: &str, body: impl Into<Bytes>) {
        self.shared.queue(queue).push(Stored::new(body.into()));
    }

    /// The messages dead-lettered from `queue`, oldest first.
    pub fn dead_letters(&self, queue: &str) -> Vec<Bytes> {
        let q = self.shared.queue(queue);
        let inner = lock(&q.inner);
        inner.dead.iter().map(|(body, _)| body.clone()).collect()
    }

    /// The messages dead-lettered from `queue` with the reason given for each, oldest first.
    pub fn dead_letters_with_reasons(&self, queue: &str) -> Vec<(Bytes, String)> {
        lock(&self.shared.queue(queue).inner)
            .dead
            .iter()
            .cloned()
            .collect()
    }

    /// How many dead letters of `queue` were dropped to keep at most [`MAX_DEAD_LETTERS`].
    pub fn dead_letters_dropped(&self, queue: &str) -> u64 {
        lock(&self.shared.queue(queue).inner).dead_dropped
    }

    /// How many messages wait in `queue` and how many are delivered but not yet settled.
    pub fn depth(&self, queue: &str) -> (usize, usize) {
        let q = self.shared.queue(queue);
        let inner = lock(&q.inner);
        (inner.ready.len(), inner.unacked.len())
    }
}

impl Shared {
    fn bind(&self, queue: &str, key: &str) {
        let queue = self.queue(queue);
        let mut routes = lock(&self.routes);
        let bound = routes.entry(key.to_owned()).or_default();
        if !bound.iter().any(|q| Arc::ptr_eq(q, &queue)) {
            bound.push(queue);
        }
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        let mut queues = lock(&self.queues);
        if let Some(queue) = queues.get(name) {
            return queue.clone();
        }
        let queue = Arc::new(Queue {
            name: name.to_owned(),
            inner: Mutex::new(QueueInner::default()),
            ready: Notify::new(),
        });
        queues.insert(name.to_owned(), queue.clone());
        queue
    }

    fn route(&self, message: &Message) {
        let stored = || Stored::new(message.body.clone());
        let routes = lock(&self.routes);
        match routes.get(&message.routing_key) {
            Some(bound) => bound.iter().for_each(|queue| queue.push(stored())),
            None => {
                drop(routes);
                // A key nobody bound goes to the queue of that name, as AMQP's default
                // exchange does.
                self.queue(&message.routing_key).push(stored());
            }
        }
    }
}

impl Queue {
    fn push(&self, message: Stored) {
        lock(&self.inner).ready.push_back(message);
        self.ready.notify_one();
    }

    fn settle(&self, tag: u64, how: Option<Rejection>) {
        let mut inner = lock(&self.inner);
        let Some(mut message) = inner.unacked.remove(&tag) else {
            return;
        };
        match how {
            None => {}
            Some(Rejection::DeadLetter { reason }) => {
                if inner.dead.len() >= MAX_DEAD_LETTERS {
                    inner.dead.pop_front();
                    inner.dead_dropped += 1;
                }
                inner.dead.push_back((message.body, reason));
            }
            Some(Rejection::Requeue) => {
                message.deliveries = message.deliveries.saturating_add(1);
                inner.ready.push_front(message);
                drop(inner);
                self.ready.notify_one();
            }
        }
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn default_routing_key(&self) -> &str {
        &self.default_routing_key
    }

    /// The messages ready in the queue.
    async fn queue_depth(&self, queue: &str) -> Result<Option<u64>> {
        Ok(Some(u64::try_from(self.depth(queue).0).unwrap_or(u64::MAX)))
    }

    async fn dead_letter_depth(&self, queue: &str) -> Result<Option<u64>> {
        let dead = lock(&self.shared.queue(queue).inner).dead.len();
        Ok(Some(u64::try_from(dead).unwrap_or(u64::MAX)))
    }

    async fn publish(&self, message: Message) -> Result<()> {
        match message.delay {
            Some(delay) if !delay.is_zero() => {
                let shared = self.shared.clone();
                let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                    Error::new(
                        ErrorKind::Broker,
                        "the memory broker needs a Tokio runtime for delayed messages",
                    )
                })?;
                handle.spawn(async move {
                    tokio::time::sleep(delay).await;
                    shared.route(&message);
                });
            }
            _ => self.shared.route(&message),
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, _prefetch: u16) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(MemoryConsumer {
            queue: self.shared.queue(queue),
            cancelled: false,
        }))
    }
}

struct MemoryConsumer {
    queue: Arc<Queue>,
    cancelled: bool,
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("queue", &self.queue.name)
            .field("cancelled", &self.cancelled)
            .finish()
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.cancelled {
                return None;
            }
            {
                let mut inner = lock(&self.queue.inner);
                if let Some(message) = inner.ready.pop_front() {
                    inner.next_tag += 1;
                    let tag = inner.next_tag;
                    let delivery = Delivery::new(
                        message.body.clone(),
                        message.deliveries > 0,
                        Box::new(MemoryAcker {
                            queue: self.queue.clone(),
                            tag,
                            settled: AtomicBool::new(false),
                        }),
                    )
                    .with_delivery_count(message.deliveries);
                    inner.unacked.insert(tag, message);
                    let more = !inner.ready.is_empty();
                    drop(inner);
                    if more {
                        // Pass the wake-up on to another consumer of this queue.
                        self.queue.ready.notify_one();
                    }
                    return Some(Ok(delivery));
                }
            }
            self.queue.ready.notified().await;
        }
    }

    async fn cancel(&mut self) -> Result<()> {
        self.cancelled = true;
        Ok(())
    }
}

struct MemoryAcker {
    queue: Arc<Queue>,
    tag: u64,
    settled: AtomicBool,
}

impl fmt::Debug for MemoryAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAcker")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl MemoryAcker {
    fn settle(&self, how: Option<Rejection>) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.queue.settle(self.tag, how);
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        self.settle(None);
        Ok(())
    }

    async fn reject(&self, how: Rejection) -> Result<()> {
        self.settle(Some(how));
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // Unsettled when dropped (a worker stopped mid-task): back to the queue.
        self.settle(Some(Rejection::Requeue));
    }
}
