//! Fault injection: a broker and a result backend that fail chosen calls on command.
//!
//! [`FaultyBroker`] and [`FaultyBackend`] wrap a real broker or backend (usually the embedded
//! one) and pass every call through, except the calls a [`Fault`] is armed for: those fail with
//! the fault's error (or, for a backend, lose their reply or go through late:
//! [`Fault::reply_lost`], [`Fault::slow`]), once, N times, forever, or only after a number of
//! calls went through or a delay passed. Every call is counted, so a test can assert how often
//! a state was written or a message published. [`SlowLink`] sits between a client and a real
//! server (RabbitMQ, Redis) and delays their bytes on command: a slow broker. Enabled with the
//! `testing` feature.
//!
//! ```
//! use std::sync::Arc;
//! use machinery::backend::memory::MemoryBackend;
//! use machinery::testing::{BackendOp, Fault, FaultyBackend};
//! use machinery::backend::ResultBackend;
//! use machinery::wire::{State, TaskState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let backend = FaultyBackend::new(Arc::new(MemoryBackend::open("faults-doc", std::time::Duration::from_secs(60))));
//! backend.arm(BackendOp::SetState, Fault::times(2));
//! let state = TaskState::new("task_1", State::Started);
//! assert!(backend.set_state(state.clone()).await.is_err());
//! assert!(backend.set_state(state.clone()).await.is_err());
//! assert!(backend.set_state(state).await.is_ok());
//! assert_eq!(backend.calls(BackendOp::SetState), 3);
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::backend::ResultBackend;
use crate::broker::{Acker, Broker, Consumer, Delivery, Message, Rejection};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use crate::wire::{GroupMeta, State, TaskState};

mod slow_link;
pub use slow_link::SlowLink;

/// When and how an armed call fails (or, for a backend, loses its reply or goes through late).
#[derive(Debug, Clone)]
pub struct Fault {
    /// Calls that still go through before the fault starts.
    skip: u64,
    /// Failures left; `None` is forever.
    left: Option<u64>,
    /// The fault starts only once this much time has passed since it was armed.
    after: Option<Duration>,
    armed_at: Instant,
    kind: Option<ErrorKind>,
    /// Only calls about this state fail (set_state, set_states, transition, start, record).
    state: Option<State>,
    /// Only publishes to this routing key fail.
    routing_key: Option<String>,
    /// The call goes through, and only its reply is lost.
    reply_lost: bool,
    /// The call panics (a backend or broker with a bug).
    panics: bool,
    /// The call goes through after this wait (a slow store).
    slow: Option<Duration>,
}

impl Fault {
    fn new(left: Option<u64>) -> Fault {
        Fault {
            skip: 0,
            left,
            after: None,
            armed_at: Instant::now(),
            kind: None,
            state: None,
            routing_key: None,
            reply_lost: false,
            panics: false,
            slow: None,
        }
    }

    /// Fails the next call only.
    pub fn once() -> Fault {
        Fault::new(Some(1))
    }

    /// Fails the next `n` calls.
    pub fn times(n: u64) -> Fault {
        Fault::new(Some(n))
    }

    /// Fails every call until [`heal`](FaultyBackend::heal)ed.
    pub fn always() -> Fault {
        Fault::new(None)
    }

    /// Lets `n` calls through first.
    #[must_use]
    pub fn after_calls(mut self, n: u64) -> Fault {
        self.skip = n;
        self
    }

    /// Starts failing only once `delay` has passed.
    #[must_use]
    pub fn after(mut self, delay: Duration) -> Fault {
        self.after = Some(delay);
        self
    }

    /// The kind of the injected error (default: [`ErrorKind::Backend`] for backend calls,
    /// [`ErrorKind::Broker`] for broker calls).
    #[must_use]
    pub fn kind(mut self, kind: ErrorKind) -> Fault {
        self.kind = Some(kind);
        self
    }

    /// Fails only the writes of this state.
    #[must_use]
    pub fn on_state(mut self, state: State) -> Fault {
        self.state = Some(state);
        self
    }

    /// Lets the call reach the backend and loses only its reply (a timeout after the write
    /// landed). Backend calls only.
    #[must_use]
    pub fn reply_lost(mut self) -> Fault {
        self.reply_lost = true;
        self
    }

    /// Lets the call through after waiting `by` instead of failing it: a store that is slow
    /// to answer. It takes precedence over [`panics`](Self::panics),
    /// [`reply_lost`](Self::reply_lost) and [`kind`](Self::kind). Backend calls only: armed on
    /// a [`FaultyBroker`], a strike lets the call through at once (and still counts).
    ///
    /// ```
    /// use std::time::Duration;
    /// use machinery::testing::Fault;
    ///
    /// // Every state write waits 20 ms, then lands.
    /// let slow = Fault::always().slow(Duration::from_millis(20));
    /// # let _ = slow;
    /// ```
    #[must_use]
    pub fn slow(mut self, by: Duration) -> Fault {
        self.slow = Some(by);
        self
    }

    /// Panics instead of failing, as a backend or broker with a bug would: the worker must
    /// lose nothing and count nothing twice.
    #[must_use]
    pub fn panics(mut self) -> Fault {
        self.panics = true;
        self
    }

    /// Fails only publishes with this routing key.
    #[must_use]
    pub fn on_routing_key(mut self, key: impl Into<String>) -> Fault {
        self.routing_key = Some(key.into());
        self
    }

    /// Whether this call fails; consumes one failure if so.
    fn strike(&mut self, state: Option<State>, routing_key: Option<&str>) -> bool {
        if self.state.is_some() && state != self.state {
            return false;
        }
        if let Some(key) = &self.routing_key {
            if routing_key != Some(key.as_str()) {
                return false;
            }
        }
        if self
            .after
            .is_some_and(|after| self.armed_at.elapsed() < after)
        {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        match &mut self.left {
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
            None => true,
        }
    }
}

/// The result backend calls a [`FaultyBackend`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendOp {
    /// `set_state` and `set_states`.
    SetState,
    /// `get_state` and `get_states`.
    GetState,
    /// `transition`, `start` and `record` (a worker records STARTED, then its outcome).
    Transition,
    /// `init_group`.
    InitGroup,
    /// `group_meta`.
    GroupMeta,
    /// `trigger_chord`.
    TriggerChord,
    /// `mark_group_member`.
    MarkGroupMember,
}

/// The broker calls a [`FaultyBroker`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BrokerOp {
    /// A publish fails before anything is sent.
    Publish,
    /// A publish is sent, but its confirm is lost: the message is in the queue, the caller
    /// gets an error (as when a connection drops after the broker took the message).
    Confirm,
    /// `consume` fails; a delivery is lost on its way to the worker (it goes back to the queue
    /// and comes again, redelivered), as one sitting in a prefetch buffer when a worker stops.
    Consume,
    /// An acknowledgement is lost: the caller sees success, the message stays unsettled and
    /// goes back to the queue when its delivery is dropped.
    Ack,
}

#[derive(Debug)]
struct Faults<Op> {
    armed: HashMap<Op, Fault>,
    calls: HashMap<Op, u64>,
    /// State writes per (task UUID, state).
    writes: HashMap<(String, State), u64>,
    /// Deliveries carry no count, only the redelivered flag (a classic RabbitMQ queue).
    classic: bool,
}

impl<Op> Default for Faults<Op> {
    fn default() -> Self {
        Faults {
            armed: HashMap::new(),
            calls: HashMap::new(),
            writes: HashMap::new(),
            classic: false,
        }
    }
}

impl<Op: Copy + Eq + std::hash::Hash + fmt::Debug> Faults<Op> {
    fn arm(&mut self, op: Op, mut fault: Fault) {
        fault.armed_at = Instant::now();
        self.armed.insert(op, fault);
    }

    fn calls(&self, op: Op) -> u64 {
        self.calls.get(&op).copied().unwrap_or(0)
    }

    /// `Err` when the call fails; else how it goes through.
    fn check(
        &mut self,
        op: Op,
        default: ErrorKind,
        state: Option<State>,
        key: Option<&str>,
    ) -> Result<Strike> {
        *self.calls.entry(op).or_default() += 1;
        let Some(fault) = self.armed.get_mut(&op) else {
            return Ok(Strike::Through);
        };
        if !fault.strike(state, key) {
            return Ok(Strike::Through);
        }
        if let Some(by) = fault.slow {
            return Ok(Strike::Wait(by));
        }
        if fault.panics {
            // Panicking on command is what this fault is for (opt-in, `testing` feature only,
            // never armed by the library). The faults' lock is poison-tolerant (`crate::lock`).
            #[allow(clippy::panic)]
            {
                panic!("injected panic: {op:?}");
            }
        }
        let kind = fault.kind.unwrap_or(default);
        let error = Error::new(kind, format!("injected fault: {op:?}"));
        if fault.reply_lost {
            return Ok(Strike::LoseReply(error));
        }
        Err(error)
    }
}

/// How an armed call that does not fail goes through.
#[derive(Debug)]
enum Strike {
    /// As it is.
    Through,
    /// It reaches the backend, and only its reply is lost (replaced by this error).
    LoseReply(Error),
    /// After a wait.
    Wait(Duration),
}

impl Strike {
    /// Makes `call` as this says.
    async fn run<T>(self, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match self {
            Strike::Through => call.await,
            Strike::LoseReply(error) => {
                // The call lands; only its reply is lost.
                drop(call.await);
                Err(error)
            }
            Strike::Wait(by) => {
                tokio::time::sleep(by).await;
                call.await
            }
        }
    }
}

/// A [`ResultBackend`] that fails chosen calls; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct FaultyBackend {
    inner: Arc<dyn ResultBackend>,
    faults: Arc<Mutex<Faults<BackendOp>>>,
}

impl FaultyBackend {
    /// Wraps `inner`; no call fails until a fault is armed.
    pub fn new(inner: Arc<dyn ResultBackend>) -> FaultyBackend {
        FaultyBackend {
            inner,
            faults: Arc::default(),
        }
    }

    /// Arms `fault` for `op`, replacing the one armed before.
    pub fn arm(&self, op: BackendOp, fault: Fault) {
        lock(&self.faults).arm(op, fault);
    }

    /// Disarms `op`.
    pub fn heal(&self, op: BackendOp) {
        lock(&self.faults).armed.remove(&op);
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: BackendOp) -> u64 {
        lock(&self.faults).calls(op)
    }

    /// How many times `state` was written for `task_uuid` (attempts that failed included).
    pub fn writes(&self, task_uuid: &str, state: State) -> u64 {
        lock(&self.faults)
            .writes
            .get(&(task_uuid.to_owned(), state))
            .copied()
            .unwrap_or(0)
    }

    fn check(&self, op: BackendOp, state: Option<&TaskState>) -> Result<Strike> {
        let mut faults = lock(&self.faults);
        if let Some(state) = state {
            *faults
                .writes
                .entry((state.task_uuid.clone(), state.state))
                .or_default() += 1;
        }
        faults.check(op, ErrorKind::Backend, state.map(|s| s.state), None)
    }
}

#[async_trait]
impl ResultBackend for FaultyBackend {
    async fn set_state(&self, state: TaskState) -> Result<()> {
        self.check(BackendOp::SetState, Some(&state))?
            .run(self.inner.set_state(state))
            .await
    }

    async fn set_states(&self, states: Vec<TaskState>) -> Result<()> {
        // Each write is counted until one fails; of the others, the first that strikes decides.
        let mut strike = Strike::Through;
        for state in &states {
            let next = self.check(BackendOp::SetState, Some(state))?;
            if matches!(strike, Strike::Through) {
                strike = next;
            }
        }
        strike.run(self.inner.set_states(states)).await
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        self.check(BackendOp::GetState, None)?
            .run(self.inner.get_state(task_uuid))
            .await
    }

    async fn get_states(&self, task_uuids: &[String]) -> Result<Vec<Option<TaskState>>> {
        self.check(BackendOp::GetState, None)?
            .run(self.inner.get_states(task_uuids))
            .await
    }

    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        self.check(BackendOp::Transition, Some(&state))?
            .run(self.inner.transition(state))
            .await
    }

    async fn start(&self, state: TaskState) -> Result<Option<TaskState>> {
        self.check(BackendOp::Transition, Some(&state))?
            .run(self.inner.start(state))
            .await
    }

    async fn record(&self, state: TaskState) -> Result<Option<TaskState>> {
        self.check(BackendOp::Transition, Some(&state))?
            .run(self.inner.record(state))
            .await
    }

    async fn wait_final(&self, task_uuid: &str, deadline: Option<Instant>) -> Result<TaskState> {
        self.inner.wait_final(task_uuid, deadline).await
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<()> {
        self.inner.purge_state(task_uuid).await
    }

    async fn init_group(&self, group_uuid: &str, task_uuids: &[String]) -> Result<()> {
        self.check(BackendOp::InitGroup, None)?
            .run(self.inner.init_group(group_uuid, task_uuids))
            .await
    }

    async fn group_meta(&self, group_uuid: &str) -> Result<Option<GroupMeta>> {
        self.check(BackendOp::GroupMeta, None)?
            .run(self.inner.group_meta(group_uuid))
            .await
    }

    async fn trigger_chord(&self, group_uuid: &str) -> Result<bool> {
        self.check(BackendOp::TriggerChord, None)?
            .run(self.inner.trigger_chord(group_uuid))
            .await
    }

    async fn mark_group_member(
        &self,
        group_uuid: &str,
        group_task_count: usize,
        state: &TaskState,
        again: bool,
    ) -> Result<()> {
        self.check(BackendOp::MarkGroupMember, Some(state))?
            .run(
                self.inner
                    .mark_group_member(group_uuid, group_task_count, state, again),
            )
            .await
    }
}

/// A [`Broker`] that fails chosen calls; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct FaultyBroker {
    inner: Arc<dyn Broker>,
    faults: Arc<Mutex<Faults<BrokerOp>>>,
}

impl FaultyBroker {
    /// Wraps `inner`; no call fails until a fault is armed.
    pub fn new(inner: Arc<dyn Broker>) -> FaultyBroker {
        FaultyBroker {
            inner,
            faults: Arc::default(),
        }
    }

    /// Arms `fault` for `op`, replacing the one armed before.
    pub fn arm(&self, op: BrokerOp, fault: Fault) {
        lock(&self.faults).arm(op, fault);
    }

    /// Disarms `op`.
    pub fn heal(&self, op: BrokerOp) {
        lock(&self.faults).armed.remove(&op);
    }

    /// Makes deliveries carry no delivery count, only the redelivered flag, as a classic
    /// RabbitMQ queue does (the embedded broker counts, like a quorum queue).
    pub fn classic_queue(&self) {
        lock(&self.faults).classic = true;
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: BrokerOp) -> u64 {
        lock(&self.faults).calls(op)
    }

    fn check(faults: &Mutex<Faults<BrokerOp>>, op: BrokerOp, key: Option<&str>) -> Result<()> {
        match lock(faults).check(op, ErrorKind::Broker, None, key)? {
            Strike::LoseReply(lost) => Err(lost),
            // A slow fault is for backend calls only (`Fault::slow`).
            Strike::Through | Strike::Wait(_) => Ok(()),
        }
    }

    async fn publish_checked(&self, message: Message) -> Result<()> {
        Self::check(&self.faults, BrokerOp::Publish, Some(&message.routing_key))?;
        let key = message.routing_key.clone();
        self.inner.publish(message).await?;
        Self::check(&self.faults, BrokerOp::Confirm, Some(&key))
    }
}

#[async_trait]
impl Broker for FaultyBroker {
    fn default_routing_key(&self) -> &str {
        self.inner.default_routing_key()
    }

    async fn publish(&self, message: Message) -> Result<()> {
        self.publish_checked(message).await
    }

    async fn publish_many(&self, messages: Vec<Message>) -> Vec<Result<()>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            outcomes.push(self.publish_checked(message).await);
        }
        outcomes
    }

    fn validate(&self, message: &Message) -> Result<()> {
        self.inner.validate(message)
    }

    async fn queue_depth(&self, queue: &str) -> Result<Option<u64>> {
        self.inner.queue_depth(queue).await
    }

    async fn dead_letter_depth(&self, queue: &str) -> Result<Option<u64>> {
        self.inner.dead_letter_depth(queue).await
    }

    fn reconnects(&self) -> u64 {
        self.inner.reconnects()
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>> {
        Self::check(&self.faults, BrokerOp::Consume, None)?;
        let inner = self.inner.consume(queue, prefetch).await?;
        Ok(Box::new(FaultyConsumer {
            inner,
            faults: self.faults.clone(),
        }))
    }
}

#[derive(Debug)]
struct FaultyConsumer {
    inner: Box<dyn Consumer>,
    faults: Arc<Mutex<Faults<BrokerOp>>>,
}

#[async_trait]
impl Consumer for FaultyConsumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let mut delivery = match self.inner.next().await? {
            Ok(delivery) => delivery,
            Err(e) => return Some(Err(e)),
        };
        loop {
            if FaultyBroker::check(&self.faults, BrokerOp::Consume, None).is_err() {
                // Dropped unsettled: back to the queue, to be delivered again.
                drop(delivery);
                delivery = match self.inner.next().await? {
                    Ok(delivery) => delivery,
                    Err(e) => return Some(Err(e)),
                };
                continue;
            }
            break;
        }
        if lock(&self.faults).classic {
            delivery = delivery.forget_delivery_count();
        }
        Some(Ok(delivery.wrap_acker(|acker| {
            Box::new(FaultyAcker {
                inner: Some(acker),
                faults: self.faults.clone(),
            })
        })))
    }

    async fn cancel(&mut self) -> Result<()> {
        self.inner.cancel().await
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }
}

#[derive(Debug)]
struct FaultyAcker {
    inner: Option<Box<dyn Acker>>,
    faults: Arc<Mutex<Faults<BrokerOp>>>,
}

#[async_trait]
impl Acker for FaultyAcker {
    async fn ack(&self) -> Result<()> {
        if FaultyBroker::check(&self.faults, BrokerOp::Ack, None).is_err() {
            // Lost on the way: the delivery stays unsettled until it is dropped.
            return Ok(());
        }
        match &self.inner {
            Some(inner) => inner.ack().await,
            None => Ok(()),
        }
    }

    async fn reject(&self, how: Rejection) -> Result<()> {
        if FaultyBroker::check(&self.faults, BrokerOp::Ack, None).is_err() {
            return Ok(());
        }
        match &self.inner {
            Some(inner) => inner.reject(how).await,
            None => Ok(()),
        }
    }
}
