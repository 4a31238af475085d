//! The worker's access to the result store: retried through an outage, and a gate that stops
//! the worker taking new messages while the store is unreachable.
//!
//! A write that fails with a retryable error ([`Error::is_retryable`]) is tried again with a
//! capped backoff for up to `store_retry_timeout`. Meanwhile the store is marked down and the
//! consume loop waits ([`Store::wait_up`]) instead of taking more messages: the deliveries in
//! hand stay unacknowledged, nothing runs twice, and the worker resumes by itself once a write
//! succeeds again. Only when the outage outlasts the timeout does the write fail, and the
//! settle policy gives the message back (counting the attempt).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backend::{is_revoked, ResultBackend};
use crate::error::Result;
use crate::wire::{Signature, State, TaskResult, TaskState};

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct Store {
    backend: Option<Arc<dyn ResultBackend>>,
    up: watch::Sender<bool>,
    retry_timeout: Duration,
    /// Told of every failed call (the result-store error count).
    observers: super::observe::Observers,
}

impl Store {
    pub(crate) fn new(backend: Option<Arc<dyn ResultBackend>>, retry_timeout: Duration) -> Store {
        Store {
            backend,
            up: watch::Sender::new(true),
            retry_timeout,
            observers: super::observe::Observers::default(),
        }
    }

    /// Tells `observers` of every failed call.
    pub(crate) fn observed_by(mut self, observers: super::observe::Observers) -> Store {
        self.observers = observers;
        self
    }

    pub(crate) fn backend(&self) -> Option<&Arc<dyn ResultBackend>> {
        self.backend.as_ref()
    }

    /// Whether the store is taken to be reachable.
    pub(crate) fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Returns at once while the store is up; during an outage, once it is back.
    pub(crate) async fn wait_up(&self) {
        if *self.up.borrow() {
            return;
        }
        let mut rx = self.up.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Runs `op` against the backend (if there is one), retrying through an outage.
    pub(crate) async fn call<'a, T, F, Fut>(&'a self, what: &str, op: F) -> Result<Option<T>>
    where
        F: Fn(&'a Arc<dyn ResultBackend>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        Ok(self.call_counted(what, op).await?.map(|(value, _)| value))
    }

    /// Like [`call`](Self::call); also says whether `op` failed before it succeeded (so a
    /// write may have landed twice).
    async fn call_counted<'a, T, F, Fut>(&'a self, what: &str, op: F) -> Result<Option<(T, bool)>>
    where
        F: Fn(&'a Arc<dyn ResultBackend>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        let Some(backend) = &self.backend else {
            return Ok(None);
        };
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut retried = false;
        loop {
            let e = match op(backend).await {
                Ok(value) => {
                    self.mark(true, None, what);
                    return Ok(Some((value, retried)));
                }
                Err(e) => e,
            };
            self.observers.store_error();
            if !(e.is_retryable() && started.elapsed() + pause < self.retry_timeout) {
                // Giving up hands the message to the settle policy; the next delivery probes
                // the store again (a gate left closed would never reopen).
                self.mark(true, None, what);
                return Err(e);
            }
            self.mark(false, Some(&e), what);
            retried = true;
            // The error is dropped and the pause boxed before waiting: every call's future
            // (one in each task's) then carries neither.
            drop(e);
            Box::pin(tokio::time::sleep(pause)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Opens or closes the gate, logging the change.
    fn mark(&self, up: bool, error: Option<&crate::Error>, what: &str) {
        self.up.send_if_modified(|current| {
            if *current == up {
                return false;
            }
            match error {
                Some(e) => warn!(error = %e, what, "the result store is unreachable; taking no new messages until it is back"),
                None => info!("the result store is reachable again; resuming"),
            }
            *current = up;
            true
        });
    }

    /// Records `state` for `signature` (retried through an outage).
    pub(crate) async fn set(
        &self,
        signature: &Signature,
        state: State,
        results: Option<&[TaskResult]>,
        error: String,
    ) -> Result<()> {
        self.call("store task state", |b| {
            b.set_state(task_state(
                signature,
                state,
                results.map(<[TaskResult]>::to_vec),
                error.clone(),
            ))
        })
        .await
        .map(|_| ())
    }

    /// Records a task's outcome (RETRY, SUCCESS or FAILURE) like [`set`](Self::set), and
    /// returns whether the task was revoked meanwhile: the store then kept the revoke, and the
    /// outcome must not be acted on (no retry, no follow-ups).
    pub(crate) async fn record(
        &self,
        signature: &Signature,
        state: State,
        results: Option<&[TaskResult]>,
        error: String,
    ) -> Result<Revoked> {
        let previous = self
            .call("store task state", |b| {
                b.record(task_state(
                    signature,
                    state,
                    results.map(<[TaskResult]>::to_vec),
                    error.clone(),
                ))
            })
            .await?
            .flatten();
        Ok(if previous.as_ref().is_some_and(is_revoked) {
            Revoked::Yes
        } else {
            Revoked::No
        })
    }

    /// Records `state` ([`ResultBackend::start`]) and returns the state stored before (`None`
    /// without a backend; a record that is not final by its UUID and state alone), and whether
    /// the write was tried more than once (the state read may then be this write's).
    pub(crate) async fn transition(
        &self,
        signature: &Signature,
        state: State,
    ) -> Result<(Option<Box<TaskState>>, bool)> {
        let found = self
            .call_counted("store task state", |b| {
                b.start(task_state(signature, state, None, String::new()))
            })
            .await?;
        let (previous, retried) = found.unwrap_or_default();
        // Boxed: the caller's future holds it while the task runs.
        Ok((previous.map(Box::new), retried))
    }
}

/// Whether a task was found revoked when its outcome was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Revoked {
    /// The revoke stays; the outcome was not recorded.
    Yes,
    /// The outcome was recorded.
    No,
}

pub(crate) fn task_state(
    signature: &Signature,
    state: State,
    results: Option<Vec<TaskResult>>,
    error: String,
) -> TaskState {
    TaskState {
        task_uuid: signature.uuid.clone(),
        task_name: signature.name.clone(),
        state,
        results,
        error,
        ..TaskState::default()
    }
}
