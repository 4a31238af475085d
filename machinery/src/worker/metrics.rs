//! A worker's Prometheus metrics (the `metrics` feature): an [`Observer`] that counts, and the
//! HTTP listener that serves them on `/metrics`.
//!
//! Counts come from the delivery path's observer points only (see [`observe`](super::observe)),
//! read through the same [`Count`] as the outcome log events; the queue's depth, its
//! dead-letter queue's depth and the broker's reconnects are sampled every [`SAMPLE_EVERY`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::observe::{Count, Observer};
use super::trace::{Report, Settled};
use crate::broker::Broker;
use crate::error::{Error, ErrorKind, Result};

/// How often the queue's depth, the dead-letter depth and the broker's reconnects are read.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The OpenMetrics text format's content type, which Prometheus reads.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

type Durations = Family<TaskLabel, Histogram, fn() -> Histogram>;

/// One registered task's series, taken from the families when the worker is built: a
/// delivery then counts without the families' lock or hashing its label. The series start at
/// 0, so that every task the worker runs is listed before it first runs.
#[derive(Debug)]
struct TaskSeries {
    received: Counter,
    succeeded: Counter,
    failed: Counter,
    retried: Counter,
    dead_lettered: Counter,
    duration: Histogram,
}

/// One worker's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    received: Family<TaskLabel, Counter>,
    succeeded: Family<TaskLabel, Counter>,
    failed: Family<TaskLabel, Counter>,
    retried: Family<TaskLabel, Counter>,
    dead_lettered: Family<TaskLabel, Counter>,
    durations: Durations,
    in_flight: Gauge,
    running: Gauge,
    reconnects: Counter<u64, AtomicU64>,
    store_errors: Counter,
    queue_depth: Family<QueueLabel, Gauge>,
    dead_letter_depth: Family<QueueLabel, Gauge>,
    /// The registered tasks' series, by the address of their name (the label the delivery
    /// path hands over); other labels go through the families.
    series: HashMap<(usize, usize), TaskSeries>,
}

/// A label's address and length: the registry hands over its own strings.
fn key(task: &'static str) -> (usize, usize) {
    (task.as_ptr() as usize, task.len())
}

fn durations() -> Histogram {
    // 0.5 ms to about 65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Metrics {
    pub(crate) fn new(concurrency: usize, tasks: &[&'static str]) -> Metrics {
        let mut registry = Registry::with_prefix("machinery");
        let received = Family::<TaskLabel, Counter>::default();
        let succeeded = Family::<TaskLabel, Counter>::default();
        let failed = Family::<TaskLabel, Counter>::default();
        let retried = Family::<TaskLabel, Counter>::default();
        let dead_lettered = Family::<TaskLabel, Counter>::default();
        let durations: Durations = Family::new_with_constructor(durations);
        let in_flight = Gauge::default();
        let running = Gauge::default();
        let limit = Gauge::<i64>::default();
        limit.set(i64::try_from(concurrency).unwrap_or(i64::MAX));
        let reconnects = Counter::<u64, AtomicU64>::default();
        let store_errors = Counter::default();
        let queue_depth = Family::<QueueLabel, Gauge>::default();
        let dead_letter_depth = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "tasks_received",
            "Deliveries received, by task",
            received.clone(),
        );
        registry.register(
            "tasks_succeeded",
            "Tasks whose body succeeded and whose outcome is recorded, by task",
            succeeded.clone(),
        );
        registry.register(
            "tasks_failed",
            "Tasks that failed for good (FAILURE stored, error callbacks sent), by task",
            failed.clone(),
        );
        registry.register(
            "tasks_retried",
            "Tasks that run again: a RETRY, or a delivery sent again after it could not be settled, by task",
            retried.clone(),
        );
        registry.register(
            "tasks_dead_lettered",
            "Messages moved to the dead-letter queue, by task",
            dead_lettered.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "How long task bodies ran, by task",
            durations.clone(),
        );
        registry.register(
            "tasks_in_flight",
            "Deliveries received and not yet settled",
            in_flight.clone(),
        );
        registry.register(
            "concurrency_in_use",
            "Task bodies running now",
            running.clone(),
        );
        registry.register(
            "concurrency_limit",
            "The most task bodies the worker runs at once",
            limit,
        );
        registry.register(
            "broker_reconnects",
            "Times the broker's connection was opened again",
            reconnects.clone(),
        );
        registry.register(
            "result_store_errors",
            "Calls to the result store that failed",
            store_errors.clone(),
        );
        registry.register(
            "queue_depth",
            "Messages waiting in the queue, as the broker reports it",
            queue_depth.clone(),
        );
        registry.register(
            "dead_letter_depth",
            "Messages waiting in the queue's dead-letter queue, as the broker reports it",
            dead_letter_depth.clone(),
        );
        let series = tasks
            .iter()
            .map(|&task| {
                let label = TaskLabel { task };
                let series = TaskSeries {
                    received: received.get_or_create(&label).clone(),
                    succeeded: succeeded.get_or_create(&label).clone(),
                    failed: failed.get_or_create(&label).clone(),
                    retried: retried.get_or_create(&label).clone(),
                    dead_lettered: dead_lettered.get_or_create(&label).clone(),
                    duration: durations.get_or_create(&label).clone(),
                };
                (key(task), series)
            })
            .collect();
        Metrics {
            series,
            registry,
            received,
            succeeded,
            failed,
            retried,
            dead_lettered,
            durations,
            in_flight,
            running,
            reconnects,
            store_errors,
            queue_depth,
            dead_letter_depth,
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub(crate) fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(error = %e, "cannot encode the metrics");
        }
        text
    }
}

impl Count {
    /// Of `[succeeded, failed, retried, dead-lettered]`, the one this outcome counts in.
    fn pick<T>(self, [succeeded, failed, retried, dead_lettered]: [&T; 4]) -> Option<&T> {
        match self {
            Count::Succeeded => Some(succeeded),
            Count::Failed => Some(failed),
            Count::Retried => Some(retried),
            Count::DeadLettered => Some(dead_lettered),
            Count::Other => None,
        }
    }
}

impl TaskSeries {
    /// The counter of an outcome.
    fn outcome(&self, count: Count) -> Option<&Counter> {
        count.pick([
            &self.succeeded,
            &self.failed,
            &self.retried,
            &self.dead_lettered,
        ])
    }
}

impl Metrics {
    /// The family of an outcome's counters.
    fn outcome(&self, count: Count) -> Option<&Family<TaskLabel, Counter>> {
        count.pick([
            &self.succeeded,
            &self.failed,
            &self.retried,
            &self.dead_lettered,
        ])
    }

    /// `task`'s series, if it is a registered task named by the registry's own string.
    fn series(&self, task: &'static str) -> Option<&TaskSeries> {
        self.series.get(&key(task))
    }
}

impl Observer for Metrics {
    fn received(&self, task: &'static str) {
        match self.series(task) {
            Some(series) => series.received.inc(),
            None => self.received.get_or_create(&TaskLabel { task }).inc(),
        };
        self.in_flight.inc();
    }

    fn started(&self, _task: &'static str) {
        self.running.inc();
    }

    fn finished(&self, task: &'static str, elapsed: Duration, _ok: bool) {
        self.running.dec();
        match self.series(task) {
            Some(series) => series.duration.observe(elapsed.as_secs_f64()),
            None => self
                .durations
                .get_or_create(&TaskLabel { task })
                .observe(elapsed.as_secs_f64()),
        }
    }

    fn settled(&self, task: &'static str, report: &Report, settled: &Settled) {
        self.in_flight.dec();
        let count = Count::of(report, settled);
        match self.series(task) {
            Some(series) => series.outcome(count).map(Counter::inc),
            None => self
                .outcome(count)
                .map(|family| family.get_or_create(&TaskLabel { task }).inc()),
        };
    }

    fn abandoned(&self, _task: &'static str) {
        self.in_flight.dec();
    }

    fn store_error(&self) {
        self.store_errors.inc();
    }
}

/// Binds `addr` and serves the metrics on `/metrics` until the returned task is aborted.
///
/// axum (with `http1` and `tokio` only) rather than a hand-written responder: the request
/// parsing of a listener that may face a network is hyper's, and the dashboard uses the same
/// axum, so the two share one dependency tree.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot listen for metrics on {addr}: {e}"),
            e,
        )
    })?;
    let bound = listener.local_addr().map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot read the metrics listener's address: {e}"),
            e,
        )
    })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    metrics.render(),
                )
            }
        }),
    );
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok((bound, server))
}

/// Reads the queue's depth, the dead-letter depth and the broker's reconnects every
/// [`SAMPLE_EVERY`].
pub(crate) async fn sample(metrics: Arc<Metrics>, broker: Arc<dyn Broker>, queue: String) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = 0;
    let label = QueueLabel {
        queue: queue.clone(),
    };
    loop {
        tick.tick().await;
        let reconnects = broker.reconnects();
        if reconnects > seen {
            metrics.reconnects.inc_by(reconnects - seen);
            seen = reconnects;
        }
        let depth = broker.queue_depth(&queue).await;
        set_depth(&metrics.queue_depth, &label, depth, "the queue's depth");
        let dead = broker.dead_letter_depth(&queue).await;
        set_depth(
            &metrics.dead_letter_depth,
            &label,
            dead,
            "the dead-letter depth",
        );
    }
}

/// Sets `label`'s gauge in `family` to a depth the broker read, if it could tell.
fn set_depth(
    family: &Family<QueueLabel, Gauge>,
    label: &QueueLabel,
    depth: Result<Option<u64>>,
    what: &str,
) {
    match depth {
        Ok(Some(n)) => {
            family
                .get_or_create(label)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(None) => {}
        Err(e) => debug!(error = %e, queue = %label.queue, "cannot read {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::trace::Ran;

    fn succeeded() -> Report {
        Report {
            ran: Some(Ran {
                elapsed: Duration::from_millis(3),
                ok: true,
            }),
            ..Report::default()
        }
    }

    #[test]
    fn registered_tasks_are_listed_at_0_and_counted_in_their_own_series() {
        static NAME: &str = "m_add";
        let metrics = Metrics::new(4, &[NAME]);
        let text = metrics.render();
        assert!(
            text.contains("machinery_tasks_received_total{task=\"m_add\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("machinery_tasks_failed_total{task=\"m_add\"} 0"),
            "{text}"
        );
        metrics.received(NAME);
        metrics.started(NAME);
        metrics.finished(NAME, Duration::from_millis(3), true);
        metrics.settled(NAME, &succeeded(), &Settled::Acked);
        // A label the registry did not hand over (a message no task of this worker takes).
        let other: &'static str = Box::leak(String::from("m_add").into_boxed_str());
        metrics.received(other);
        metrics.received(super::super::observe::UNDECODABLE);
        let text = metrics.render();
        assert!(
            text.contains("machinery_tasks_received_total{task=\"m_add\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("machinery_tasks_succeeded_total{task=\"m_add\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("machinery_task_duration_seconds_count{task=\"m_add\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("machinery_tasks_received_total{task=\"(undecodable)\"} 1"),
            "{text}"
        );
        assert!(text.contains("machinery_tasks_in_flight 2"), "{text}");
    }
}
