//! Queue in/out rates, from samples the dashboard takes itself.
//!
//! Brokers report a queue's depth, not how many messages went in or out. So the dashboard
//! samples, every few seconds, each queue's depth and each live worker's `processed` counter
//! (from its registry heartbeat), and keeps 15 minutes of samples. Over the last minute:
//!
//! - **out/s** of a queue = the growth of `processed` of the workers consuming it, divided by
//!   the time between the samples (a worker consuming several queues counts a share in each);
//! - **in/s** = out/s + the growth of the depth over the same time (never below 0).
//!
//! Both are estimates: a worker that stopped between two samples drops out of the sum, and
//! the registry's counters move with its heartbeat period.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::admin::{QueueInfo, WorkerInfo};

/// How long samples are kept.
pub(crate) const KEEP: Duration = Duration::from_secs(15 * 60);
/// The span the rates are computed over.
pub(crate) const RATE_SPAN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    depths: HashMap<String, u64>,
    /// `processed` per worker id, with the queues it consumes.
    workers: HashMap<String, (u64, Vec<String>)>,
}

/// The rates of one queue, per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Rates {
    pub(crate) in_per_sec: f64,
    pub(crate) out_per_sec: f64,
}

/// The samples of one dashboard.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    history: VecDeque<Sample>,
}

impl Samples {
    /// Records the queues and workers seen at `at`, dropping samples older than [`KEEP`].
    pub(crate) fn record(&mut self, at: Instant, queues: &[QueueInfo], workers: &[WorkerInfo]) {
        self.history.push_back(Sample {
            at,
            depths: queues.iter().map(|q| (q.name.clone(), q.depth)).collect(),
            workers: workers
                .iter()
                .map(|w| (w.id.clone(), (w.processed, w.queues.clone())))
                .collect(),
        });
        while self
            .history
            .front()
            .is_some_and(|first| at.saturating_duration_since(first.at) > KEEP)
        {
            self.history.pop_front();
        }
    }

    /// The rates of `queue` over the last [`RATE_SPAN`], or `None` before two samples.
    pub(crate) fn rates(&self, queue: &str) -> Option<Rates> {
        let last = self.history.back()?;
        let first = self
            .history
            .iter()
            .find(|s| last.at.saturating_duration_since(s.at) <= RATE_SPAN && s.at < last.at)?;
        let seconds = last.at.saturating_duration_since(first.at).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let mut out = 0.0;
        for (id, (processed, queues)) in &last.workers {
            let Some((before, _)) = first.workers.get(id) else {
                continue;
            };
            if queues.is_empty() || !queues.iter().any(|q| q == queue) {
                continue;
            }
            #[allow(clippy::cast_precision_loss)]
            let grown = processed.saturating_sub(*before) as f64 / queues.len() as f64;
            out += grown;
        }
        #[allow(clippy::cast_precision_loss)]
        let depth_change = match (last.depths.get(queue), first.depths.get(queue)) {
            (Some(now), Some(then)) => *now as f64 - *then as f64,
            _ => 0.0,
        };
        Some(Rates {
            in_per_sec: ((out + depth_change) / seconds).max(0.0),
            out_per_sec: out / seconds,
        })
    }

    /// How many samples are kept.
    pub(crate) fn len(&self) -> usize {
        self.history.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str, depth: u64) -> QueueInfo {
        QueueInfo {
            name: name.to_owned(),
            depth,
            consumers: 1,
            unsettled: None,
            dead_letters: 0,
            exists: true,
        }
    }

    fn worker(id: &str, processed: u64, queues: &[&str]) -> WorkerInfo {
        WorkerInfo {
            id: id.to_owned(),
            name: id.to_owned(),
            host: "host".to_owned(),
            pid: 1,
            version: "0".to_owned(),
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            concurrency: 1,
            in_flight: 0,
            processed,
            failed: 0,
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            heartbeat_ms: 1000,
        }
    }

    #[test]
    fn out_from_processed_and_in_from_depth_change() {
        let mut samples = Samples::default();
        let t0 = Instant::now();
        assert_eq!(samples.rates("q"), None);
        samples.record(t0, &[queue("q", 100)], &[worker("w1", 0, &["q"])]);
        assert_eq!(samples.rates("q"), None);
        // 10 s later: 50 processed, depth grew by 20, so 70 came in.
        samples.record(
            t0 + Duration::from_secs(10),
            &[queue("q", 120)],
            &[worker("w1", 50, &["q"]), worker("w2", 7, &["q"])],
        );
        let rates = samples.rates("q").unwrap();
        assert!((rates.out_per_sec - 5.0).abs() < 1e-9, "{rates:?}");
        assert!((rates.in_per_sec - 7.0).abs() < 1e-9, "{rates:?}");
        // A queue nobody consumes: only its depth change.
        assert_eq!(samples.rates("other").unwrap().out_per_sec, 0.0);
    }

    #[test]
    fn draining_queue_has_no_negative_input_and_old_samples_go() {
        let mut samples = Samples::default();
        let t0 = Instant::now();
        samples.record(t0, &[queue("q", 100)], &[worker("w", 0, &["q", "r"])]);
        samples.record(
            t0 + Duration::from_secs(10),
            &[queue("q", 0)],
            &[worker("w", 40, &["q", "r"])],
        );
        let rates = samples.rates("q").unwrap();
        assert!((rates.out_per_sec - 2.0).abs() < 1e-9, "{rates:?}");
        assert_eq!(rates.in_per_sec, 0.0);
        for minute in 1..=20 {
            samples.record(t0 + Duration::from_secs(60 * minute), &[], &[]);
        }
        assert!(samples.len() <= 16);
    }
}
