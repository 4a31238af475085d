//! The layers around a task call: the one home of every control over running work.
//!
//! A delivery that passed decoding and the settle policy's checks becomes a [`Call`]: the
//! signature, its task, and the options in force for this run ([`Resolved`], layered signature
//! → task → worker). Each [`Layer`] may act at four points, in the style of tower's and
//! apalis's layers:
//!
//! 1. [`admit`](Layer::admit), before STARTED is recorded: run now, or not yet
//!    ([`Admit::Later`]: the message is sent again to arrive later, which is not an attempt).
//!    The ETA and rate limits decide here. A layer that waits gives up its concurrency
//!    [`Slot`] while it waits.
//! 2. [`before`](Layer::before), just before the body runs (Go's pre-task handler).
//! 3. [`wrap`](Layer::wrap), around the body's future: time limits, and revoking a running
//!    task, end it early with an error.
//! 4. [`after`](Layer::after), with the body's outcome (Go's post-task and error handlers).
//!
//! The layers run in the order [`Layers::new`] lists them; `wrap` nests them so that the first
//! layer is the outermost.

#[cfg(feature = "redis")]
mod census;
mod eta;
mod hooks;
pub(crate) mod offload;
mod rate;
mod revoke;
mod time_limit;

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::options::Resolved;
use crate::task::{Runner, TaskDescriptor, TaskError, TaskOutcome};
use crate::wire::{Arg, Signature};

#[cfg(feature = "redis")]
pub(crate) use census::CensusLayer;
pub(crate) use hooks::Hooks;
pub(crate) use rate::RateLimiter;
pub(crate) use revoke::{watch as watch_revokes, InFlight, Revoke};
pub(crate) use time_limit::TimeLimits;
pub use time_limit::HARD_LIMIT_EXIT_CODE;

/// The body of a task, as the layers wrap it.
pub(crate) type Body = Pin<Box<dyn Future<Output = TaskOutcome> + Send + 'static>>;

/// One run of a task, as the layers see it.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub(crate) signature: &'a Signature,
    pub(crate) task: &'static TaskDescriptor,
    pub(crate) options: Resolved,
}

/// Whether a call may run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Run it.
    Run,
    /// Not yet: send the message again to arrive after this delay (not an attempt).
    Later(Duration),
}

/// A control around the task call. Every method has a default that does nothing.
#[async_trait]
pub(crate) trait Layer: Send + Sync + fmt::Debug {
    /// Whether this layer implements [`admit`](Self::admit). Only those are asked, so a layer
    /// that never holds a call back costs no future per delivery.
    fn admits(&self) -> bool {
        false
    }

    /// Decides, before STARTED is recorded, whether the call runs now. A layer that waits
    /// releases `slot` while it waits ([`Slot::released`]).
    async fn admit(&self, call: &Call<'_>, slot: &mut Slot) -> Admit {
        let _ = (call, slot);
        Admit::Run
    }

    /// Runs just before the body.
    fn before(&self, call: &Call<'_>) {
        let _ = call;
    }

    /// Wraps the body's future.
    fn wrap(&self, call: &Call<'_>, body: Body) -> Body {
        let _ = call;
        body
    }

    /// Sees the body's outcome.
    fn after(&self, call: &Call<'_>, outcome: &TaskOutcome) {
        let _ = (call, outcome);
    }
}

/// The worker's layers, in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layers {
    layers: Vec<Arc<dyn Layer>>,
    /// The layers that [`admit`](Layer::admit) calls, in order.
    admitting: Vec<Arc<dyn Layer>>,
    /// Also among `layers`; runs blocking bodies.
    limits: TimeLimits,
}

impl Layers {
    /// The worker's layers: the ETA, `others` in order, then the time limit (innermost, so
    /// that it times the body alone).
    pub(crate) fn new(
        eta_tolerance: Duration,
        others: Vec<Arc<dyn Layer>>,
        limits: TimeLimits,
    ) -> Self {
        let mut layers: Vec<Arc<dyn Layer>> = vec![Arc::new(eta::Eta {
            tolerance: eta_tolerance,
        })];
        layers.extend(others);
        layers.push(Arc::new(limits.clone()));
        let admitting = layers.iter().filter(|l| l.admits()).cloned().collect();
        Layers {
            layers,
            admitting,
            limits,
        }
    }

    /// The first layer that does not admit the call decides; a later one is not asked.
    pub(crate) async fn admit(&self, call: &Call<'_>, slot: &mut Slot) -> Admit {
        for layer in &self.admitting {
            if let Admit::Later(wait) = layer.admit(call, slot).await {
                return Admit::Later(wait);
            }
        }
        Admit::Run
    }

    /// Runs the task's body inside every layer, and returns its outcome.
    pub(crate) async fn call(&self, call: &Call<'_>, args: Vec<Arg>) -> TaskOutcome {
        for layer in &self.layers {
            layer.before(call);
        }
        let mut body = body(call, args, &self.limits);
        for layer in self.layers.iter().rev() {
            body = layer.wrap(call, body);
        }
        // A blocking body runs on the blocking pool already; only its handle is awaited here.
        // An async body in a delivery in place that waits goes on, inside its layers, as a
        // task of its own ([`offload`]).
        let outcome = match call.task.runner {
            Runner::Async(_) => offload::offload(body).await,
            _ => body.await,
        };
        for layer in &self.layers {
            layer.after(call, &outcome);
        }
        outcome
    }
}

/// The task's body as a future: a blocking body runs on Tokio's blocking pool (see
/// [`TimeLimits`] for what happens when it is abandoned), an async one on the worker's runtime.
/// A panic is the task's failure.
fn body(call: &Call<'_>, args: Vec<Arg>, limits: &TimeLimits) -> Body {
    match call.task.runner {
        Runner::Blocking(body) => limits.blocking(call, move || body(args)),
        Runner::Async(start) => {
            let future = match std::panic::catch_unwind(AssertUnwindSafe(|| start(args))) {
                Ok(future) => future,
                Err(payload) => {
                    return Box::pin(std::future::ready(Err(TaskError::panicked(panic_message(
                        payload,
                    )))))
                }
            };
            Box::pin(async move {
                match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(outcome) => outcome,
                    Err(payload) => Err(TaskError::panicked(panic_message(payload))),
                }
            })
        }
    }
}

/// The outcome of a body run as a task of its own: a panic is the task's failure, and so is a
/// cancelled task (the worker's own abort, or a spawn while the runtime shuts down).
fn joined(result: Result<TaskOutcome, tokio::task::JoinError>) -> TaskOutcome {
    match result {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => Err(TaskError::panicked(panic_message(e.into_panic()))),
        Err(_) => Err(TaskError::new("the task was cancelled")),
    }
}

/// A Tokio task aborted when its handle is dropped (a blocking one that has not started yet
/// never starts).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "the task panicked".to_owned(),
        },
    }
}

/// A delivery's share of the worker's concurrency.
#[derive(Debug)]
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    permits: Arc<Semaphore>,
    /// Tells the worker's intake that a call wants its slot back: the intake gives up the
    /// permit it holds while it waits for a message (the semaphore is fair, so the call gets
    /// it).
    reclaim: Arc<tokio::sync::Notify>,
}

impl Slot {
    pub(crate) fn new(
        permit: OwnedSemaphorePermit,
        permits: Arc<Semaphore>,
        reclaim: Arc<tokio::sync::Notify>,
    ) -> Self {
        Slot {
            permit: Some(permit),
            permits,
            reclaim,
        }
    }

    /// Gives the slot up while `wait` runs (another delivery may use it), then takes one
    /// again.
    pub(crate) async fn released<F: Future>(&mut self, wait: F) -> F::Output {
        self.permit = None;
        let output = wait.await;
        // The semaphore is closed only when the worker is gone; the call then runs without
        // a slot, as it would have with one.
        self.permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.reclaim.notify_one();
                self.permits.clone().acquire_owned().await.ok()
            }
        };
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_call_frees_its_slot() {
        let permits = Arc::new(Semaphore::new(1));
        let permit = permits.clone().acquire_owned().await.unwrap();
        let mut slot = Slot::new(permit, permits.clone(), Arc::default());
        assert_eq!(permits.available_permits(), 0);
        let seen = slot.released(async { permits.available_permits() }).await;
        assert_eq!(seen, 1, "the slot is free while the call waits");
        assert_eq!(permits.available_permits(), 0, "and taken again after");
    }
}
