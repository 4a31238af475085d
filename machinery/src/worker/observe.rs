//! What the worker tells about its deliveries: the one interface that the delivery path calls
//! at defined points, and that both the outcome log events and the metrics are made from.
//!
//! The points, for each delivery:
//!
//! 1. [`received`](Observer::received): decoded (or found undecodable);
//! 2. [`started`](Observer::started) and [`finished`](Observer::finished): around the task's
//!    body, when it runs;
//! 3. [`settled`](Observer::settled): acknowledged, sent again, dead-lettered or handed back,
//!    with the execution's [`Report`] (the body's run, and what was decided after a failure).
//!
//! and, apart from deliveries, [`store_error`](Observer::store_error) for each failed call to
//! the result store.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, trace, warn, Level};

use super::trace::{Next, Report, Settled};

/// The task label of a message that is not a task signature.
pub(crate) const UNDECODABLE: &str = "(undecodable)";
/// The task label of a task no worker here has: names from the wire are not labels, so that
/// a stream of made-up names cannot grow the metrics without bound.
pub(crate) const UNREGISTERED: &str = "(unregistered)";

/// Sees the deliveries of one worker. Every method has a default that does nothing; `task` is
/// the name of a registered task, or [`UNDECODABLE`] / [`UNREGISTERED`].
pub(crate) trait Observer: Send + Sync + fmt::Debug {
    /// A delivery was received.
    fn received(&self, task: &'static str) {
        let _ = task;
    }
    /// The task's body starts.
    fn started(&self, task: &'static str) {
        let _ = task;
    }
    /// The task's body ended after `elapsed`; `ok`: it succeeded.
    fn finished(&self, task: &'static str, elapsed: Duration, ok: bool) {
        let _ = (task, elapsed, ok);
    }
    /// The delivery left the worker as `settled`, after what `report` says.
    fn settled(&self, task: &'static str, report: &Report, settled: &Settled) {
        let _ = (task, report, settled);
    }
    /// The delivery left the worker without being counted as settled: its handling panicked
    /// outside the task's body, or the worker was aborted. Unless it was settled with the
    /// broker before that, the broker has it back. (Only the in-flight count is made whole:
    /// a body's own start and end are counted around the body.)
    fn abandoned(&self, task: &'static str) {
        let _ = task;
    }
    /// A call to the result store failed.
    fn store_error(&self) {}
}

/// The worker's observers, called in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observers(Vec<Arc<dyn Observer>>);

impl Observers {
    pub(crate) fn new(observers: Vec<Arc<dyn Observer>>) -> Self {
        Observers(observers)
    }

    /// Tells the observers a delivery was received. The delivery is settled through the
    /// returned [`Unsettled`]; dropped instead, it tells them the delivery was abandoned, so
    /// that a panic cannot leave it counted in flight.
    pub(crate) fn received(&self, task: &'static str) -> Unsettled<'_> {
        self.0.iter().for_each(|o| o.received(task));
        Unsettled {
            observers: self,
            task,
            told: 0,
        }
    }
    pub(crate) fn started(&self, task: &'static str) {
        self.0.iter().for_each(|o| o.started(task));
    }
    pub(crate) fn finished(&self, task: &'static str, elapsed: Duration, ok: bool) {
        self.0.iter().for_each(|o| o.finished(task, elapsed, ok));
    }

    pub(crate) fn store_error(&self) {
        self.0.iter().for_each(|o| o.store_error());
    }
}

/// A delivery the observers heard of and that has not left the worker yet.
#[must_use = "settle it, or dropping it tells the observers the delivery was abandoned"]
pub(crate) struct Unsettled<'a> {
    observers: &'a Observers,
    task: &'static str,
    /// The observers told already (of `settled`); the others hear `abandoned` on drop, also
    /// when one of them panics while it is told.
    told: usize,
}

impl Unsettled<'_> {
    /// The delivery left the worker as `settled`, after what `report` says.
    pub(crate) fn settled(mut self, report: &Report, settled: &Settled) {
        while let Some(observer) = self.observers.0.get(self.told) {
            self.told += 1;
            observer.settled(self.task, report, settled);
        }
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        for observer in self.observers.0.iter().skip(self.told) {
            observer.abandoned(self.task);
        }
    }
}

/// How a settled delivery is counted: the one reading of a [`Report`] and a [`Settled`] that
/// the log events and the metrics share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    /// The body ran and succeeded, and the delivery is acknowledged.
    Succeeded,
    /// The task failed for good: FAILURE is stored (its error callbacks sent).
    Failed,
    /// The task runs again: a RETRY, or a delivery sent again after its handling failed.
    Retried,
    /// The message went to the dead-letter queue.
    DeadLettered,
    /// None of those (a duplicate, an early ETA, a revoke, a hand-back).
    Other,
}

impl Count {
    pub(crate) fn of(report: &Report, settled: &Settled) -> Count {
        match (settled, &report.next) {
            (Settled::DeadLettered { .. }, _) => Count::DeadLettered,
            // The broker gets the delivery back: it comes again, so whatever it did is not
            // its outcome yet.
            (Settled::HandedBack { .. }, _) => Count::Other,
            (_, Next::Retry { .. }) => Count::Retried,
            (
                Settled::Republished {
                    attempted: true, ..
                },
                _,
            ) => Count::Retried,
            (_, Next::Failure { .. }) => Count::Failed,
            (Settled::Acked, Next::Nothing) if report.ran.is_some_and(|r| r.ok) => Count::Succeeded,
            _ => Count::Other,
        }
    }
}

/// Logs one event per settled delivery, inside the task's span: the outcome, its duration,
/// and for a failure the error and what happens next.
#[derive(Debug)]
pub(crate) struct LogOutcome {
    /// The level of `task succeeded` (failures have their own: WARN, ERROR).
    pub(crate) success: Level,
}

impl Default for LogOutcome {
    fn default() -> Self {
        LogOutcome {
            success: DEFAULT_SUCCESS_LEVEL,
        }
    }
}

/// The default level of the `task succeeded` event: DEBUG, as tower-http's
/// `DefaultOnResponse`. At INFO, a formatting subscriber spends about as much on that one line
/// per task as on the rest of the span (amqp_bench `obs`: +11% drain time at INFO, none at
/// DEBUG); failures are always logged at WARN or ERROR.
pub(crate) const DEFAULT_SUCCESS_LEVEL: Level = Level::DEBUG;

impl Observer for LogOutcome {
    fn settled(&self, _task: &'static str, report: &Report, settled: &Settled) {
        let duration_ms = report.ran.map(|r| millis(r.elapsed));
        let error = report.error.as_deref();
        match (Count::of(report, settled), settled, &report.next) {
            (_, Settled::HandedBack { error: e }, _) => warn!(
                duration_ms,
                error = %e,
                task_error = error,
                next = "handed back to the broker",
                "task not settled; the broker gets it back"
            ),
            (Count::Succeeded, _, _) => match self.success {
                Level::ERROR => error!(duration_ms, "task succeeded"),
                Level::WARN => warn!(duration_ms, "task succeeded"),
                Level::INFO => info!(duration_ms, "task succeeded"),
                Level::DEBUG => debug!(duration_ms, "task succeeded"),
                _ => trace!(duration_ms, "task succeeded"),
            },
            (Count::DeadLettered, Settled::DeadLettered { reason }, _) => error!(
                duration_ms,
                error,
                next = "dead-lettered",
                reason = %reason,
                "task dead-lettered"
            ),
            (Count::Retried, _, Next::Retry { wait, retries_left }) => warn!(
                duration_ms,
                error,
                next = "retry",
                retry_in_s = wait.as_secs_f64(),
                retries_left,
                "task failed; retrying"
            ),
            (Count::Retried, Settled::Republished { delay, reason, .. }, _) => warn!(
                duration_ms,
                error = reason.as_deref().or(error),
                next = "delivered again",
                retry_in_s = delay.as_secs_f64(),
                "task not settled; its message is sent again"
            ),
            (Count::Failed, _, Next::Failure { on_error }) => error!(
                duration_ms,
                error,
                next = "FAILURE stored",
                on_error_sent = on_error,
                "task failed"
            ),
            (_, _, Next::Revoked) => info!(duration_ms, "task revoked while it ran"),
            _ => debug!(duration_ms, ?settled, "delivery settled"),
        }
    }
}

/// Milliseconds, with microseconds, for log fields.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Counts what it hears; panics when told `settled` if `panics`.
    #[derive(Debug, Default)]
    struct Counting {
        panics: bool,
        settled: AtomicU32,
        abandoned: AtomicU32,
    }

    impl Observer for Counting {
        fn settled(&self, _task: &'static str, _report: &Report, _settled: &Settled) {
            self.settled.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panics, "an observer that panics");
        }
        fn abandoned(&self, _task: &'static str) {
            self.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn heard(o: &Counting) -> (u32, u32) {
        (
            o.settled.load(Ordering::SeqCst),
            o.abandoned.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn each_observer_hears_settled_or_abandoned_once() {
        let (a, b) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let observers = Observers::new(vec![a.clone(), b.clone()]);
        observers
            .received("t")
            .settled(&Report::default(), &Settled::Acked);
        assert_eq!((heard(&a), heard(&b)), ((1, 0), (1, 0)));
        drop(observers.received("t"));
        assert_eq!((heard(&a), heard(&b)), ((1, 1), (1, 1)));
    }

    #[test]
    fn an_observer_that_panics_leaves_the_others_whole() {
        let first = Arc::new(Counting {
            panics: true,
            ..Counting::default()
        });
        let second = Arc::new(Counting::default());
        let observers = Observers::new(vec![first.clone(), second.clone()]);
        let unsettled = observers.received("t");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            unsettled.settled(&Report::default(), &Settled::Acked);
        }));
        assert!(panicked.is_err());
        // The first was told (and panicked); the second hears the delivery abandoned.
        assert_eq!((heard(&first), heard(&second)), ((1, 0), (0, 1)));
    }
}
