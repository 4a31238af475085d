//! Time limits: `#[task(timeout = "30s")]`, `.with_timeout(d)`, the worker's default, and an
//! opt-in hard limit.
//!
//! At the deadline the body's future is dropped and the task fails with "time limit exceeded"
//! (retried if it has retries left, else FAILURE and its `OnError` callbacks), and its
//! concurrency slot is free again:
//!
//! - an **async** body is cancelled: it stops at its next `.await`;
//! - a **blocking** body cannot be stopped from outside its thread: the thread keeps running
//!   until the function returns, and its result is discarded. It still holds one thread of
//!   Tokio's blocking pool (512 by default) meanwhile.
//!
//! With a hard limit ([`WorkerBuilder::hard_time_limit`](crate::WorkerBuilder::hard_time_limit)),
//! a body still running `grace` after its deadline (a blocking body, or an async body that
//! blocks its thread and so never reaches an `.await`) ends the whole process with exit code
//! [`HARD_LIMIT_EXIT_CODE`], as Celery's hard time limit kills its child process. The deliveries
//! in hand go back to the queue; the stored FAILURE keeps the timed-out task from running again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::error;

use super::{joined, AbortOnDrop, Body, Call, Layer};
use crate::task::{TaskError, TaskOutcome};

/// The exit code of a process ended by a hard time limit (`EX_SOFTWARE`).
pub const HARD_LIMIT_EXIT_CODE: i32 = 70;

/// How often the hard-limit watchdog looks at the running bodies.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);

/// The time-limit layer; also runs blocking bodies, so that a hard limit sees them.
#[derive(Debug, Clone, Default)]
pub(crate) struct TimeLimits {
    /// The grace past the deadline before the process exits; `None`: no hard limit.
    hard: Option<Duration>,
    watchdog: Arc<Watchdog>,
}

impl TimeLimits {
    pub(crate) fn new(hard: Option<Duration>) -> Self {
        TimeLimits {
            hard,
            watchdog: Arc::default(),
        }
    }

    /// Runs a blocking body on Tokio's blocking pool, watched by the hard limit if one is set.
    ///
    /// A body abandoned (time limit, revoke) before the pool started it never starts: its
    /// handle is aborted when dropped. The hard limit counts from the body's start, not from
    /// its wait for a thread.
    pub(crate) fn blocking(
        &self,
        call: &Call<'_>,
        body: impl FnOnce() -> TaskOutcome + Send + 'static,
    ) -> Body {
        let watch = self.watch_from_start(call);
        // The body runs inside the task's span, on its pool thread too.
        let span = tracing::Span::current();
        let handle = AbortOnDrop(tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let watched = watch.map(|start| start());
            let outcome = body();
            drop(watched);
            outcome
        }));
        Box::pin(async move {
            let mut handle = handle;
            joined((&mut handle.0).await)
        })
    }

    /// Registers the call with the watchdog, when a hard limit applies to it; the entry goes
    /// when the returned guard is dropped (the body ended).
    fn watch(&self, call: &Call<'_>) -> Option<Watched> {
        self.watch_from_start(call).map(|start| start())
    }

    /// What registers the call with the watchdog when its body starts, if a hard limit applies.
    fn watch_from_start(&self, call: &Call<'_>) -> Option<impl FnOnce() -> Watched + Send> {
        let (Some(grace), Some(limit)) = (self.hard, call.options.timeout) else {
            return None;
        };
        let span = limit.saturating_add(grace);
        let label = format!("{} ({})", call.signature.name, call.signature.uuid);
        let watchdog = self.watchdog.clone();
        Some(move || {
            // Beyond what an `Instant` holds, the deadline is never reached.
            let deadline = Instant::now()
                .checked_add(span)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
            watchdog.watch(deadline, label)
        })
    }
}

impl Layer for TimeLimits {
    fn wrap(&self, call: &Call<'_>, body: Body) -> Body {
        let Some(limit) = call.options.timeout else {
            return body;
        };
        // An async body is watched here; a blocking one inside its thread (see `blocking`).
        let watch = match call.task.runner {
            crate::task::Runner::Async(_) => self.watch(call),
            _ => None,
        };
        Box::pin(async move {
            let outcome = tokio::time::timeout(limit, body).await;
            drop(watch);
            outcome.unwrap_or_else(|_| Err(TaskError::time_limit(limit)))
        })
    }
}

/// One thread per worker that ends the process when a watched body outlives its hard deadline.
#[derive(Debug, Default)]
struct Watchdog {
    entries: Arc<Mutex<HashMap<u64, (Instant, String)>>>,
    next: AtomicU64,
    started: OnceLock<()>,
}

/// Removes its entry from the watchdog when dropped.
struct Watched {
    id: u64,
    entries: Arc<Mutex<HashMap<u64, (Instant, String)>>>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&self.id);
        }
    }
}

impl Watchdog {
    fn watch(&self, deadline: Instant, label: String) -> Watched {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(id, (deadline, label));
        }
        self.started.get_or_init(|| {
            let entries = Arc::downgrade(&self.entries);
            let spawned = std::thread::Builder::new()
                .name("machinery-hard-limit".to_owned())
                .spawn(move || watchdog(&entries));
            if let Err(e) = spawned {
                error!(error = %e, "cannot start the hard time limit's watchdog thread");
            }
        });
        Watched {
            id,
            entries: self.entries.clone(),
        }
    }
}

fn watchdog(entries: &std::sync::Weak<Mutex<HashMap<u64, (Instant, String)>>>) {
    loop {
        std::thread::sleep(WATCHDOG_TICK);
        // The worker is gone: so is the watchdog.
        let Some(entries) = entries.upgrade() else {
            return;
        };
        let now = Instant::now();
        let overdue = entries.lock().ok().and_then(|entries| {
            entries
                .values()
                .find(|(deadline, _)| *deadline <= now)
                .map(|(_, label)| label.clone())
        });
        if let Some(task) = overdue {
            error!(
                task = %task,
                exit_code = HARD_LIMIT_EXIT_CODE,
                "hard time limit: a task body is still running past its deadline and grace; ending the process"
            );
            std::process::exit(HARD_LIMIT_EXIT_CODE);
        }
    }
}
