//! Revoking a running task ([`Server::revoke`](crate::Server::revoke)).
//!
//! A task revoked before it starts never runs: the worker finds FAILURE "revoked" when it
//! records STARTED (see [`delivery`](super::super::delivery)). This layer handles the tasks
//! already running. Its [`wrap`](Layer::wrap) races each body with a signal; the [`watch`]er,
//! one per worker, reads the states of every task in flight in one
//! [`get_states`](crate::backend::ResultBackend::get_states) call (Redis: one `MGET`) every
//! `revoke_poll`, and fires the signals of those that are revoked. The body then ends with
//! [`TaskError::revoked`], which records nothing more (the revoke is stored), never retries and
//! sends no follow-ups; the delivery is acknowledged and its concurrency slot is free:
//!
//! - an **async** body is cancelled: it stops at its next `.await`;
//! - a **blocking** body cannot be stopped from outside its thread: the thread runs until the
//!   function returns and its result is discarded, as with a time limit
//!   ([`time_limit`](super::time_limit)).
//!
//! A body that finishes before the watcher sees its revoke (the race is at most one
//! `revoke_poll` wide) does not undo it: the store never replaces a revoke, so its SUCCESS is
//! not recorded and its follow-ups are not sent.
//!
//! The watcher sleeps while nothing is in flight (no reads at all), logs a failed read and
//! tries again at the next interval, and stops with its worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, info, trace, warn};

use super::{Body, Call, Layer};
use crate::backend::{is_revoked, ResultBackend};
use crate::lock;
use crate::task::TaskError;

/// The revoke layer: every body it wraps is in flight until it ends.
#[derive(Debug, Clone, Default)]
pub(crate) struct Revoke {
    in_flight: Arc<InFlight>,
}

/// The task bodies running now, each with the signal that cancels it.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    calls: Mutex<HashMap<u64, Running>>,
    next: AtomicU64,
    /// Woken when a call starts, so that an idle watcher resumes polling.
    started: Notify,
}

#[derive(Debug)]
struct Running {
    uuid: String,
    revoked: Arc<Notify>,
}

/// Removes its call from [`InFlight`] when the body ends (or is dropped).
struct Registered {
    id: u64,
    in_flight: Arc<InFlight>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.in_flight.calls).remove(&self.id);
    }
}

impl Revoke {
    /// The calls in flight, for the watcher.
    pub(crate) fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }
}

impl Layer for Revoke {
    fn wrap(&self, call: &Call<'_>, body: Body) -> Body {
        let (registered, revoked) = self.in_flight.register(&call.signature.uuid);
        Box::pin(async move {
            let _registered = registered;
            tokio::select! {
                biased;
                outcome = body => outcome,
                () = revoked.notified() => {
                    info!("the task was revoked while it ran; cancelling it");
                    Err(TaskError::revoked())
                }
            }
        })
    }
}

impl InFlight {
    fn register(self: &Arc<Self>, uuid: &str) -> (Registered, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(Notify::new());
        lock(&self.calls).insert(
            id,
            Running {
                uuid: uuid.to_owned(),
                revoked: revoked.clone(),
            },
        );
        self.started.notify_one();
        let registered = Registered {
            id,
            in_flight: self.clone(),
        };
        (registered, revoked)
    }

    /// The UUIDs in flight, each once.
    fn uuids(&self) -> Vec<String> {
        let mut uuids: Vec<String> = lock(&self.calls)
            .values()
            .map(|running| running.uuid.clone())
            .collect();
        uuids.sort_unstable();
        uuids.dedup();
        uuids
    }

    /// Fires the signal of every call of `uuid` still in flight; returns how many.
    fn cancel(&self, uuid: &str) -> usize {
        let calls = lock(&self.calls);
        let mut fired = 0;
        for running in calls.values().filter(|running| running.uuid == uuid) {
            // A permit is kept if the body is not being polled right now.
            running.revoked.notify_one();
            fired += 1;
        }
        fired
    }

    /// Returns once something is in flight.
    async fn busy(&self) {
        loop {
            let started = self.started.notified();
            tokio::pin!(started);
            // Registered before the check, so a call that starts in between is seen.
            started.as_mut().enable();
            if !lock(&self.calls).is_empty() {
                return;
            }
            started.await;
        }
    }
}

/// The worker's revoke watcher: every `every` while tasks are in flight, reads their states in
/// one call and cancels the revoked ones. Runs until dropped (the worker aborts it when it
/// stops).
pub(crate) async fn watch(
    in_flight: Arc<InFlight>,
    backend: Arc<dyn ResultBackend>,
    every: Duration,
) {
    let mut failing = false;
    loop {
        in_flight.busy().await;
        tokio::time::sleep(every).await;
        let uuids = in_flight.uuids();
        if uuids.is_empty() {
            continue;
        }
        trace!(tasks = uuids.len(), "looking for revoked tasks in flight");
        let states = match backend.get_states(&uuids).await {
            Ok(states) => states,
            Err(e) => {
                // The store may be down: the tasks in flight keep running; try again later.
                if !failing {
                    warn!(error = %e, "cannot read the states of the tasks in flight to find revoked ones; trying again every {every:?}");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            info!("reading the states of the tasks in flight works again");
            failing = false;
        }
        for (uuid, state) in uuids.iter().zip(states) {
            if state.as_ref().is_some_and(is_revoked) {
                let fired = in_flight.cancel(uuid);
                debug!(task.id = %uuid, fired, "revoked while running");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::wire::TaskState;
    use async_trait::async_trait;

    /// Counts `get_states` calls and fails the first `fail` of them.
    #[derive(Debug)]
    struct Counted {
        inner: MemoryBackend,
        reads: AtomicU64,
        fail: u64,
    }

    impl Counted {
        fn new(name: &str, fail: u64) -> Arc<Counted> {
            Arc::new(Counted {
                inner: MemoryBackend::open(name, Duration::from_secs(60)),
                reads: AtomicU64::new(0),
                fail,
            })
        }

        fn reads(&self) -> u64 {
            self.reads.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl ResultBackend for Counted {
        async fn set_state(&self, state: TaskState) -> crate::Result<()> {
            self.inner.set_state(state).await
        }
        async fn get_state(&self, task_uuid: &str) -> crate::Result<Option<TaskState>> {
            self.inner.get_state(task_uuid).await
        }
        async fn get_states(&self, uuids: &[String]) -> crate::Result<Vec<Option<TaskState>>> {
            if self.reads.fetch_add(1, Ordering::SeqCst) < self.fail {
                return Err(crate::Error::new(crate::ErrorKind::Backend, "down"));
            }
            self.inner.get_states(uuids).await
        }
        async fn purge_state(&self, task_uuid: &str) -> crate::Result<()> {
            self.inner.purge_state(task_uuid).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_watcher_reads_nothing() {
        let backend = Counted::new("revoke-idle-test", 0);
        let in_flight = Arc::new(InFlight::default());
        let every = Duration::from_millis(100);
        let watcher = tokio::spawn(watch(in_flight.clone(), backend.clone(), every));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(backend.reads(), 0, "read while idle");
        let (registered, _revoked) = in_flight.register("task_a");
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let reads = backend.reads();
        assert!((9..=11).contains(&reads), "{reads} reads in 1 s at 100 ms");
        drop(registered);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reads = backend.reads();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(backend.reads(), reads, "read while idle");
        watcher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_fires_the_signal_after_failed_reads() {
        let backend = Counted::new("revoke-signal-test", 5);
        let in_flight = Arc::new(InFlight::default());
        let every = Duration::from_millis(100);
        let watcher = tokio::spawn(watch(in_flight.clone(), backend.clone(), every));
        let (_a, revoked_a) = in_flight.register("task_a");
        let (_b, revoked_b) = in_flight.register("task_b");
        backend.inner.revoke(&["task_a".to_owned()]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), revoked_a.notified())
            .await
            .expect("task_a's signal fired once the store came back");
        assert!(backend.reads() >= 6, "{} reads", backend.reads());
        let b = tokio::time::timeout(Duration::from_secs(1), revoked_b.notified()).await;
        assert!(b.is_err(), "task_b is not revoked");
        watcher.abort();
    }
}
