//! Which acknowledgement frames a consumer channel sends, and when: the one home of the ack
//! coalescing ([`AckWindow`]); [`settle_loop`] only moves settlements in and frames out.
//!
//! Every `basic.ack` frame costs the worker (a lapin promise and a socket write on its I/O
//! thread) and the broker. Acks of contiguous tags from the lowest unsettled one become one
//! `basic.ack(multiple = true)`, once the run reaches an eighth of the prefetch (at least 1,
//! at most 32, as the raw consumer of the benchmark acks) or its oldest ack has waited
//! [`ACK_LINGER`]: held acks are credit the broker does not get back.
//!
//! An ack above a gap (a task still running below it) is held too, to be covered by a later
//! multiple ack if the gap closes meanwhile. Such a gap is common: a worker that stores its
//! states in Redis ends its tasks in the order their writes come back, and a task whose write
//! went one batch later leaves a gap for about one round trip while dozens of tasks above it
//! end. Held above a gap for [`ACK_LINGER`] alone, those acks went one frame each: 3,000-5,000
//! single acks for 20,000 tasks, where the raw consumer sends 625 multiple ones. So the acks
//! above a gap wait longer, up to [`GAP_LINGER`], then go one by one, so that a long task never
//! holds back the acks of the tasks after it for longer than that. They go at once when half
//! the prefetch is held above the gap (at most [`MAX_HOLD`]). And whenever the broker's window
//! is full while acks are held here ([`Delivered`]: a settlement, or the delivery that fills
//! it, wakes the loop), the run goes at once, or without a run everything held: held acks
//! never keep the broker from sending more. The run below a gap goes as before. Rejections
//! are sent at once.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// How long the acks of a run may wait to be sent with others. Short beside any task's run
/// time, and short enough that held acks never starve the prefetch window for long.
const ACK_LINGER: Duration = Duration::from_millis(1);

/// How long an ack above a gap may wait for the gap to close: a few round trips of a state
/// write under load (1.5-3 ms to Redis in the benchmark's drain). The deadline runs from when
/// the first of the acks held above a gap arrived, so the ones that came after may go sooner.
const GAP_LINGER: Duration = Duration::from_millis(5);

/// The most acks held above a gap.
const MAX_HOLD: usize = 256;

/// The most acks one multiple ack waits for.
const MAX_EVERY: u64 = 32;

/// How many deliveries settled after a still-running one the window remembers; past that it
/// stops coalescing on this channel (every ack is then single).
const MAX_SETTLED_AHEAD: usize = 65_536;

/// What to do with a delivery tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack(u64),
    Reject(u64, bool),
}

/// A frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    /// `basic.ack(tag, multiple = true)`.
    AckUpTo(u64),
    /// `basic.ack(tag, multiple = false)`.
    Ack(u64),
    /// `basic.reject(tag, requeue)`.
    Reject(u64, bool),
}

/// The highest delivery tag a channel's consumer has received, shared with its
/// [`settle_loop`]: with the acks sent, it tells how full the broker's window is. While the
/// loop holds acks it also leaves here the tag that fills the window, and the delivery with
/// that tag wakes it.
#[derive(Debug, Clone)]
pub(super) struct Delivered(Arc<DeliveredInner>);

#[derive(Debug)]
struct DeliveredInner {
    highest: AtomicU64,
    /// The tag that fills the window while acks are held ([`u64::MAX`]: none).
    full_at: AtomicU64,
    full: Notify,
}

impl Default for Delivered {
    fn default() -> Self {
        Delivered(Arc::new(DeliveredInner {
            highest: AtomicU64::new(0),
            full_at: AtomicU64::new(u64::MAX),
            full: Notify::new(),
        }))
    }
}

impl Delivered {
    /// A delivery with `tag` arrived (tags only grow, and one consumer task sees them).
    pub(super) fn saw(&self, tag: u64) {
        // Sequentially consistent with `wake_at`: of a delivery and a threshold published at
        // the same time, at least one side sees the other.
        self.0.highest.store(tag, Ordering::SeqCst);
        if tag >= self.0.full_at.load(Ordering::SeqCst) {
            self.0.full.notify_one();
        }
    }

    fn highest(&self) -> u64 {
        self.0.highest.load(Ordering::Relaxed)
    }

    /// Leaves the tag that fills the window (`None`: no acks held, nothing to wake for);
    /// whether a delivery has reached it already (then no wake comes for that delivery).
    fn wake_at(&self, full_at: Option<u64>) -> bool {
        let at = full_at.unwrap_or(u64::MAX);
        self.0.full_at.store(at, Ordering::SeqCst);
        self.0.highest.load(Ordering::SeqCst) >= at
    }

    /// Completes when a delivery filled the window, or at once if one did since the last call
    /// (a permit that may be stale: the loop then finds nothing due).
    async fn filled(&self) {
        self.0.full.notified().await;
    }
}

/// The acks of one channel not yet sent, and the tags already settled.
#[derive(Debug)]
struct AckWindow {
    /// The lowest tag not settled (tags start at 1).
    low: u64,
    /// The highest tag of the contiguous run below `low` that no frame has acked yet.
    top: Option<u64>,
    /// How many acks that run holds.
    run: u64,
    /// Acked above `low`, not sent yet.
    held: BTreeSet<u64>,
    /// Above `low`, settled by a frame already sent (a reject, a single ack).
    settled: BTreeSet<u64>,
    /// Whether acks are still coalesced (see [`MAX_SETTLED_AHEAD`]).
    coalesce: bool,
    /// The prefetch: how many deliveries the broker leaves unacknowledged at most (0: no
    /// limit).
    limit: u64,
    /// How many acks in the run make it due.
    every: u64,
    /// How many acks held above a gap make them all due (each sent alone).
    hold: usize,
}

impl AckWindow {
    /// A window for a channel with `prefetch` unacknowledged deliveries at most (0: no
    /// limit): the run goes once it reaches an eighth of that (at least 1, at most 32), so
    /// held acks take little of the window from the broker. (A quarter, at most 64, sent
    /// fewer frames but slowed a worker running its deliveries in place: its deliveries came
    /// in bursts.) The acks above a gap go once they reach half of it (at least 1, at most
    /// [`MAX_HOLD`]), or once the window is full (see [`due`](Self::due)).
    fn new(prefetch: u16) -> AckWindow {
        let (every, hold) = match prefetch {
            0 => (MAX_EVERY, MAX_HOLD),
            limit => (
                (u64::from(limit) / 8).clamp(1, MAX_EVERY),
                (usize::from(limit) / 2).clamp(1, MAX_HOLD),
            ),
        };
        AckWindow {
            low: 1,
            top: None,
            run: 0,
            held: BTreeSet::new(),
            settled: BTreeSet::new(),
            coalesce: true,
            limit: u64::from(prefetch),
            every,
            hold,
        }
    }

    /// Whether nothing waits to be sent (no deadline is needed).
    fn is_idle(&self) -> bool {
        !self.has_run() && !self.has_gap()
    }

    /// Whether a run of acks waits to be sent (its deadline is [`ACK_LINGER`]).
    fn has_run(&self) -> bool {
        self.top.is_some()
    }

    /// Whether acks above a gap wait (their deadline is [`GAP_LINGER`]).
    fn has_gap(&self) -> bool {
        !self.held.is_empty()
    }

    /// Takes one settlement; pushes a rejection (due at once) onto `out`. Call [`due`] after
    /// each batch of settlements.
    ///
    /// [`due`]: AckWindow::due
    fn settle(&mut self, settle: Settle, out: &mut Vec<Frame>) {
        match settle {
            Settle::Reject(tag, requeue) => {
                out.push(Frame::Reject(tag, requeue));
                if self.coalesce {
                    self.settled.insert(tag);
                }
            }
            Settle::Ack(tag) if !self.coalesce => out.push(Frame::Ack(tag)),
            Settle::Ack(tag) => {
                self.held.insert(tag);
            }
        }
        if !self.coalesce {
            return;
        }
        loop {
            if self.held.remove(&self.low) {
                self.top = Some(self.low);
                self.run += 1;
            } else if !self.settled.remove(&self.low) {
                break;
            }
            self.low += 1;
        }
    }

    /// While acks wait here, the delivery tag that fills the broker's window (`prefetch`
    /// deliveries it counts as unsettled); `None` with nothing held, or no limit.
    fn full_at(&self) -> Option<u64> {
        if self.limit == 0 || self.is_idle() {
            return None;
        }
        // Settled by frames already sent (acks and rejections): below `low` all but the run,
        // above it those in `settled`. (`run` never exceeds `low - 1`.)
        let sent = (self.low - 1 - self.run)
            .saturating_add(u64::try_from(self.settled.len()).unwrap_or(u64::MAX));
        Some(sent.saturating_add(self.limit))
    }

    /// Whether the broker's window is full while acks wait here, the highest tag the consumer
    /// has received being `delivered`.
    fn starves(&self, delivered: u64) -> bool {
        self.full_at().is_some_and(|at| delivered >= at)
    }

    /// Pushes what is due onto `out`, the highest tag delivered being `delivered`: everything
    /// once half the prefetch is held above a gap; while the broker's window is full, the run
    /// (or, without one, everything); else the run once it has reached an eighth of the
    /// prefetch.
    fn due(&mut self, delivered: u64, out: &mut Vec<Frame>) {
        if self.held.len() >= self.hold {
            self.flush(out);
        } else if self.starves(delivered) {
            if self.has_run() {
                self.send_run(out);
            } else {
                self.flush(out);
            }
        } else if self.run >= self.every {
            self.send_run(out);
        }
    }

    /// Pushes every frame still unsent onto `out`: the run as one multiple ack, the acks above
    /// a gap one by one.
    fn flush(&mut self, out: &mut Vec<Frame>) {
        self.send_run(out);
        for tag in std::mem::take(&mut self.held) {
            out.push(Frame::Ack(tag));
            self.settled.insert(tag);
        }
        if self.coalesce && self.settled.len() > MAX_SETTLED_AHEAD {
            tracing::debug!(
                low = self.low,
                "a delivery is taking long; acknowledging one by one from now on"
            );
            self.coalesce = false;
            self.settled = BTreeSet::new();
        }
    }

    /// Pushes the run, if any, as one multiple ack onto `out`; the acks above a gap stay.
    fn send_run(&mut self, out: &mut Vec<Frame>) {
        if let Some(top) = self.top.take() {
            out.push(Frame::AckUpTo(top));
            self.run = 0;
        }
    }
}

/// Where a channel's frames go.
#[async_trait]
pub(super) trait Frames: Send + Sync {
    /// Sends one frame; a frame that fails is left to the broker, which redelivers what it did
    /// not get settled. The future must queue its frame on its first poll, before it waits:
    /// [`settle_loop`] polls the frames due together in order and relies on that order (a
    /// rejection must reach the broker before a multiple ack above its tag). lapin 4's
    /// `basic_ack` and `basic_reject` queue the frame before their only await.
    async fn send(&self, frame: Frame);
}

/// Settles a channel's deliveries off the consume loop: settlements go into its [`AckWindow`],
/// and the frames it says are due go out, at once or when the oldest ack of the run has waited
/// [`ACK_LINGER`] (the run), or the first of the acks above a gap [`GAP_LINGER`] (everything),
/// or the broker's window is full (`delivered`: the consumer's highest delivery tag). Ends,
/// having sent every frame, when every sender of `rx` is gone.
pub(super) async fn settle_loop(
    frames: impl Frames,
    prefetch: u16,
    delivered: Delivered,
    mut rx: mpsc::UnboundedReceiver<Settle>,
) {
    let mut window = AckWindow::new(prefetch);
    let mut batch = Vec::new();
    let mut due = Vec::new();
    // When the run, and the acks above a gap, must be sent.
    let mut run_at: Option<Instant> = None;
    let mut gap_at: Option<Instant> = None;
    loop {
        // A delivery that filled the window already is looked at now: no wake comes for it.
        let full = delivered.wake_at(window.full_at());
        let deadline = [run_at, gap_at].into_iter().flatten().min();
        // `recv_many` is cancel safe: nothing is lost when the deadline, or a delivery that
        // fills the window, comes first. Then nothing was received, and what is due is looked
        // at below.
        let received = if full {
            usize::MAX
        } else {
            let settlements = async {
                match deadline {
                    None => rx.recv_many(&mut batch, 1024).await,
                    Some(at) => tokio::time::timeout_at(at, rx.recv_many(&mut batch, 1024))
                        .await
                        .unwrap_or(usize::MAX),
                }
            };
            tokio::select! {
                received = settlements => received,
                () = delivered.filled() => usize::MAX,
            }
        };
        if received == 0 {
            window.flush(&mut due);
            send(&frames, &mut due).await;
            return;
        }
        for settle in batch.drain(..) {
            window.settle(settle, &mut due);
        }
        window.due(delivered.highest(), &mut due);
        // Under a steady stream `recv_many` is always ready and the timeout never looks at
        // the deadlines: look here.
        let now = Instant::now();
        if gap_at.is_some_and(|at| now >= at) {
            window.flush(&mut due);
        } else if run_at.is_some_and(|at| now >= at) {
            window.send_run(&mut due);
        }
        send(&frames, &mut due).await;
        // A run that took in acks held above a closed gap keeps their deadline.
        let run_deadline = run_at.unwrap_or(now + ACK_LINGER);
        run_at = window
            .has_run()
            .then(|| gap_at.map_or(run_deadline, |gap| gap.min(run_deadline)));
        gap_at = window.has_gap().then(|| gap_at.unwrap_or(now + GAP_LINGER));
    }
}

/// Sends the frames due, in order, without waiting for one to be written before the next is
/// queued: lapin's I/O thread writes them together, where one at a time cost a wake of that
/// thread and of this task per frame.
async fn send(frames: &impl Frames, due: &mut Vec<Frame>) {
    match due.len() {
        0 => {}
        1 => frames.send(due[0]).await,
        _ => {
            futures_util::future::join_all(due.iter().map(|&frame| frames.send(frame))).await;
        }
    }
    due.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames sent, with when.
    #[derive(Default, Clone)]
    struct Sent(std::sync::Arc<std::sync::Mutex<Vec<(Frame, Instant)>>>);

    #[async_trait]
    impl Frames for Sent {
        async fn send(&self, frame: Frame) {
            self.0.lock().unwrap().push((frame, Instant::now()));
        }
    }

    impl Sent {
        fn frames(&self) -> Vec<Frame> {
            self.0.lock().unwrap().iter().map(|(f, _)| *f).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_ack_goes_after_the_linger_and_the_rest_when_the_senders_leave() {
        let sent = Sent::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let settler = tokio::spawn(settle_loop(sent.clone(), 256, Delivered::default(), rx));
        tx.send(Settle::Ack(1)).unwrap();
        tx.send(Settle::Ack(3)).unwrap();
        tokio::time::sleep(ACK_LINGER / 2).await;
        assert!(sent.frames().is_empty());
        tokio::time::sleep(ACK_LINGER).await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(1)]);
        let at = sent.0.lock().unwrap()[0].1;
        assert!(at - start >= ACK_LINGER && at - start <= ACK_LINGER * 2);
        // Tag 3, above the gap at 2, waits longer.
        tokio::time::sleep(GAP_LINGER).await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(1), Frame::Ack(3)]);
        // Nothing waits: no frame until the next settlement.
        tokio::time::sleep(ACK_LINGER * 10).await;
        assert_eq!(sent.frames().len(), 2);
        // The last acks go when every sender is gone, without waiting.
        tx.send(Settle::Ack(2)).unwrap();
        tx.send(Settle::Reject(4, false)).unwrap();
        tx.send(Settle::Ack(5)).unwrap();
        drop(tx);
        settler.await.unwrap();
        assert_eq!(
            sent.frames(),
            vec![
                Frame::AckUpTo(1),
                Frame::Ack(3),
                Frame::Reject(4, false),
                Frame::AckUpTo(5)
            ]
        );
    }

    /// Settles one batch, as the loop receives it, and returns the frames due after it.
    fn settle_all(window: &mut AckWindow, settles: &[Settle]) -> Vec<Frame> {
        let mut out = Vec::new();
        for s in settles {
            window.settle(*s, &mut out);
        }
        window.due(0, &mut out);
        out
    }

    /// What [`AckWindow::flush`] sends.
    fn flushed(window: &mut AckWindow) -> Vec<Frame> {
        let mut out = Vec::new();
        window.flush(&mut out);
        out
    }

    #[test]
    fn a_prefetch_of_three_never_holds_an_ack_above_a_gap() {
        // Prefetch 3, tag 1 still running: the broker has no room left until 2 and 3 are
        // acked, so they go at once, on their own.
        let mut window = AckWindow::new(3);
        let out = settle_all(&mut window, &[Settle::Ack(2), Settle::Ack(3)]);
        assert_eq!(out, vec![Frame::Ack(2), Frame::Ack(3)]);
        assert!(window.is_idle());
        let out = settle_all(&mut window, &[Settle::Ack(1)]);
        assert_eq!(out, vec![Frame::AckUpTo(1)]);
    }

    /// Records each frame when it is handed over, then holds it until the gate opens (a socket
    /// write lapin has not done yet).
    struct Gated {
        sent: Sent,
        gate: std::sync::Arc<tokio::sync::Semaphore>,
    }

    #[async_trait]
    impl Frames for Gated {
        async fn send(&self, frame: Frame) {
            self.sent.send(frame).await;
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
        }
    }

    #[tokio::test]
    async fn the_frames_due_together_are_handed_over_before_the_first_is_written() {
        let sent = Sent::default();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let frames = Gated {
            sent: sent.clone(),
            gate: gate.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Prefetch 2: each ack is due at once; above the gaps at 1 and 3 they go one by one.
        tx.send(Settle::Ack(2)).unwrap();
        tx.send(Settle::Ack(4)).unwrap();
        tx.send(Settle::Reject(5, false)).unwrap();
        let settler = tokio::spawn(settle_loop(frames, 2, Delivered::default(), rx));
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // In the order they fell due: the rejection at once, then the acks above the gaps.
        assert_eq!(
            sent.frames(),
            vec![Frame::Reject(5, false), Frame::Ack(2), Frame::Ack(4)],
            "one frame at a time waits a socket write per frame"
        );
        gate.add_permits(3);
        drop(tx);
        settler.await.unwrap();
    }

    #[test]
    fn a_batch_of_acks_goes_as_one_frame_whatever_the_prefetch() {
        for prefetch in [1, 3, 256] {
            let mut window = AckWindow::new(prefetch);
            let acks: Vec<Settle> = (1..=40).map(Settle::Ack).collect();
            let out = settle_all(&mut window, &acks);
            assert_eq!(out, vec![Frame::AckUpTo(40)], "{prefetch}");
        }
        // Prefetch 0 is no limit: acks gather as for the largest.
        assert_eq!(AckWindow::new(0).every, MAX_EVERY);
        // Above a gap: half the prefetch, at once for Go's default of 3.
        let holds = [0, 1, 3, 8, 256, 1024].map(|p| AckWindow::new(p).hold);
        assert_eq!(AckWindow::new(16).hold, 8);
        assert_eq!(holds, [MAX_HOLD, 1, 1, 4, 128, MAX_HOLD]);
    }

    #[test]
    fn in_order_acks_go_once_an_eighth_of_the_prefetch_has_gathered() {
        let mut window = AckWindow::new(256);
        assert_eq!(window.every, 32);
        assert_eq!(AckWindow::new(80).every, 10);
        let first: Vec<Settle> = (1..=20).map(Settle::Ack).collect();
        assert!(settle_all(&mut window, &first).is_empty());
        assert!(!window.is_idle());
        let second: Vec<Settle> = (21..=32).map(Settle::Ack).collect();
        assert_eq!(settle_all(&mut window, &second), vec![Frame::AckUpTo(32)]);
        assert!(window.is_idle());
        assert!(settle_all(&mut window, &[Settle::Ack(33)]).is_empty());
        assert_eq!(flushed(&mut window), vec![Frame::AckUpTo(33)]);
        assert!(window.is_idle());
    }

    #[test]
    fn a_small_prefetch_acks_at_once() {
        for prefetch in [1, 8, 15] {
            let mut window = AckWindow::new(prefetch);
            assert_eq!(
                settle_all(&mut window, &[Settle::Ack(1)]),
                vec![Frame::AckUpTo(1)]
            );
            assert_eq!(
                settle_all(&mut window, &[Settle::Ack(2)]),
                vec![Frame::AckUpTo(2)]
            );
            assert!(window.is_idle(), "{prefetch}");
        }
        let mut window = AckWindow::new(16);
        assert!(settle_all(&mut window, &[Settle::Ack(1)]).is_empty());
        assert_eq!(
            settle_all(&mut window, &[Settle::Ack(2)]),
            vec![Frame::AckUpTo(2)]
        );
    }

    #[test]
    fn acks_above_a_gap_wait_and_are_covered_when_it_closes() {
        let mut window = AckWindow::new(256);
        let out = settle_all(
            &mut window,
            &[Settle::Ack(2), Settle::Ack(3), Settle::Ack(5)],
        );
        assert!(out.is_empty());
        // Tag 1 ends: 1-3 are one run; 5 still waits above 4.
        let out = settle_all(&mut window, &[Settle::Ack(1)]);
        assert!(out.is_empty());
        assert_eq!(flushed(&mut window), vec![Frame::AckUpTo(3), Frame::Ack(5)]);
        // 5 was sent on its own: the run from 4 skips it.
        let out = settle_all(&mut window, &[Settle::Ack(4), Settle::Ack(6)]);
        assert!(out.is_empty());
        assert_eq!(flushed(&mut window), vec![Frame::AckUpTo(6)]);
        assert!(window.is_idle());
    }

    #[test]
    fn rejections_go_at_once_and_are_skipped_by_the_run() {
        let mut window = AckWindow::new(256);
        let out = settle_all(
            &mut window,
            &[Settle::Ack(1), Settle::Reject(2, true), Settle::Ack(3)],
        );
        assert_eq!(out, vec![Frame::Reject(2, true)]);
        assert_eq!(flushed(&mut window), vec![Frame::AckUpTo(3)]);
        let out = settle_all(&mut window, &[Settle::Reject(4, false)]);
        assert_eq!(out, vec![Frame::Reject(4, false)]);
        assert!(window.is_idle());
    }

    /// A worker storing states in Redis ends its tasks in the order their writes come back,
    /// so a task whose write went a batch later leaves a gap for about one round trip while
    /// dozens of tasks above it end. Their acks wait for it and go as one multiple ack, not one
    /// frame each.
    #[tokio::test(start_paused = true)]
    async fn acks_above_a_gap_of_a_round_trip_wait_and_go_as_one_frame() {
        let sent = Sent::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settle_loop(sent.clone(), 256, Delivered::default(), rx));
        // Tag 1's write is a batch late; 2-60 end now (more than an eighth of the prefetch).
        for tag in 2..=60 {
            tx.send(Settle::Ack(tag)).unwrap();
        }
        tokio::time::sleep(ACK_LINGER * 2).await;
        assert!(sent.frames().is_empty(), "{:?}", sent.frames());
        tx.send(Settle::Ack(1)).unwrap();
        tokio::time::sleep(ACK_LINGER * 2).await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(60)]);
        drop(tx);
        settler.await.unwrap();
    }

    /// The run below a gap is not held by it: it goes after [`ACK_LINGER`] as ever; the acks
    /// above a gap that does not close go one by one after [`GAP_LINGER`], or at once when
    /// half the prefetch is held above it.
    #[tokio::test(start_paused = true)]
    async fn acks_above_a_gap_that_stays_go_alone_after_the_gap_linger_or_at_half_the_prefetch() {
        let sent = Sent::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let settler = tokio::spawn(settle_loop(sent.clone(), 256, Delivered::default(), rx));
        tx.send(Settle::Ack(1)).unwrap();
        tx.send(Settle::Ack(3)).unwrap();
        tokio::time::sleep(ACK_LINGER * 3 / 2).await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(1)]);
        tokio::time::sleep(GAP_LINGER).await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(1), Frame::Ack(3)]);
        let at = sent.0.lock().unwrap()[1].1;
        assert!(at - start >= GAP_LINGER && at - start <= GAP_LINGER + ACK_LINGER);
        // Tag 2 still runs: 127 acks above it wait; the 128th (half of 256) sends them all.
        for tag in 4..=130 {
            tx.send(Settle::Ack(tag)).unwrap();
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(sent.frames().len(), 2);
        tx.send(Settle::Ack(131)).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let frames = sent.frames();
        let alone: Vec<Frame> = (4..=131).map(Frame::Ack).collect();
        assert_eq!(frames[2..], alone[..], "{frames:?}");
        drop(tx);
        settler.await.unwrap();
    }

    /// A worker's default prefetch is its concurrency, 16: nine slow tasks and seven quick
    /// ones fill it. The quick ones' acks, above the gap the slow ones leave, go once the
    /// window is full: held, they would keep the broker from sending anything for
    /// [`GAP_LINGER`].
    #[tokio::test(start_paused = true)]
    async fn acks_above_a_gap_go_at_once_when_the_brokers_window_is_full() {
        let sent = Sent::default();
        let delivered = Delivered::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settle_loop(sent.clone(), 16, delivered.clone(), rx));
        // Twelve of sixteen delivered: 10-12 end and wait above the gap (1-9 still run).
        delivered.saw(12);
        for tag in 10..=12 {
            tx.send(Settle::Ack(tag)).unwrap();
        }
        tokio::time::sleep(ACK_LINGER * 2).await;
        assert!(sent.frames().is_empty(), "{:?}", sent.frames());
        // All sixteen delivered: the window is full, and the delivery of the last wakes the
        // loop.
        delivered.saw(16);
        tokio::time::sleep(Duration::from_micros(10)).await;
        let alone: Vec<Frame> = (10..=12).map(Frame::Ack).collect();
        assert_eq!(sent.frames(), alone);
        // Three acked: 13 waits until the broker has sent three more.
        tx.send(Settle::Ack(13)).unwrap();
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(sent.frames().len(), 3);
        delivered.saw(18);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(sent.frames().len(), 3);
        delivered.saw(19);
        tokio::time::sleep(Duration::from_micros(10)).await;
        let alone: Vec<Frame> = (10..=13).map(Frame::Ack).collect();
        assert_eq!(sent.frames(), alone);
        drop(tx);
        settler.await.unwrap();
    }

    /// The delivery that fills the window, not only a settlement, sends the acks held: after
    /// the run went, 11 and 12 wait above slow tasks, and the broker sends 17, the last it
    /// may: the loop wakes for it.
    #[tokio::test(start_paused = true)]
    async fn the_delivery_that_fills_the_window_sends_the_acks_held() {
        let sent = Sent::default();
        let delivered = Delivered::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settle_loop(sent.clone(), 16, delivered.clone(), rx));
        delivered.saw(16);
        for tag in [1, 11, 12] {
            tx.send(Settle::Ack(tag)).unwrap();
        }
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(1)]);
        // 16 unsettled at the broker's count again, 2 of them held here.
        delivered.saw(17);
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(
            sent.frames(),
            vec![Frame::AckUpTo(1), Frame::Ack(11), Frame::Ack(12)]
        );
        drop(tx);
        settler.await.unwrap();
    }

    /// The broker's next delivery may arrive while the loop sends frames, before it has said
    /// which tag fills the window: the loop looks at the highest tag after saying so.
    #[tokio::test(start_paused = true)]
    async fn a_delivery_that_fills_the_window_while_frames_go_out_is_seen() {
        /// Frames sent; a rejection makes the broker deliver tag 17 during its send.
        struct Delivering {
            sent: Sent,
            delivered: Delivered,
        }
        #[async_trait]
        impl Frames for Delivering {
            async fn send(&self, frame: Frame) {
                self.sent.send(frame).await;
                if matches!(frame, Frame::Reject(..)) {
                    self.delivered.saw(17);
                }
            }
        }
        let sent = Sent::default();
        let delivered = Delivered::default();
        let frames = Delivering {
            sent: sent.clone(),
            delivered: delivered.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        delivered.saw(15);
        // 2 is rejected, 3 waits above 1: one sent, so the window fills at 17.
        tx.send(Settle::Reject(2, false)).unwrap();
        tx.send(Settle::Ack(3)).unwrap();
        let settler = tokio::spawn(settle_loop(frames, 16, delivered.clone(), rx));
        tokio::time::sleep(Duration::from_micros(10)).await;
        assert_eq!(sent.frames(), vec![Frame::Reject(2, false), Frame::Ack(3)]);
        drop(tx);
        settler.await.unwrap();
    }

    #[test]
    fn a_full_window_gets_the_run_first_then_the_acks_above_the_gap() {
        // Prefetch 64: the run goes at 8, the acks above a gap at 32.
        let mut window = AckWindow::new(64);
        let mut out = Vec::new();
        for tag in [1, 2, 3, 4, 6, 7, 8] {
            window.settle(Settle::Ack(tag), &mut out);
        }
        // 64 delivered, none acked: the run of four goes, 6-8 stay above tag 5.
        window.due(64, &mut out);
        assert_eq!(out, vec![Frame::AckUpTo(4)]);
        out.clear();
        window.settle(Settle::Ack(9), &mut out);
        window.due(64, &mut out);
        assert!(out.is_empty(), "four acked, room for four: {out:?}");
        // Four more delivered: full again, and no run: everything held goes.
        window.settle(Settle::Ack(10), &mut out);
        window.due(68, &mut out);
        assert_eq!(out, (6..=10).map(Frame::Ack).collect::<Vec<_>>());
        // Acks and rejections sent above the gap count as sent: 4 below it and 6-10 above,
        // so the window fills at tag 73, then at 74 with 11 sent too, and at 75 with 12
        // rejected.
        out.clear();
        window.settle(Settle::Ack(11), &mut out);
        window.due(72, &mut out);
        assert!(out.is_empty(), "{out:?}");
        window.due(73, &mut out);
        assert_eq!(out, vec![Frame::Ack(11)]);
        out.clear();
        window.settle(Settle::Reject(12, false), &mut out);
        window.settle(Settle::Ack(13), &mut out);
        window.due(74, &mut out);
        assert_eq!(out, vec![Frame::Reject(12, false)]);
        window.due(75, &mut out);
        assert_eq!(out, vec![Frame::Reject(12, false), Frame::Ack(13)]);
        // Unlimited (0): never full.
        let mut window = AckWindow::new(0);
        window.settle(Settle::Ack(2), &mut out);
        out.clear();
        window.due(u64::MAX, &mut out);
        assert!(out.is_empty());
    }

    /// A gap that closes just before its deadline: the run it joins goes by that deadline, not
    /// [`ACK_LINGER`] later.
    #[tokio::test(start_paused = true)]
    async fn a_gap_that_closes_keeps_its_deadline_for_the_run() {
        let sent = Sent::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let settler = tokio::spawn(settle_loop(sent.clone(), 256, Delivered::default(), rx));
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        tx.send(Settle::Ack(2)).unwrap();
        settle().await;
        // The clock moved by hand: timers fire on whole milliseconds.
        tokio::time::advance(GAP_LINGER - Duration::from_micros(500)).await;
        tx.send(Settle::Ack(1)).unwrap();
        settle().await;
        tokio::time::advance(Duration::from_micros(400)).await;
        settle().await;
        assert!(sent.frames().is_empty());
        tokio::time::advance(Duration::from_micros(100)).await;
        settle().await;
        assert_eq!(sent.frames(), vec![Frame::AckUpTo(2)]);
        let at = sent.0.lock().unwrap()[0].1;
        assert_eq!(at - start, GAP_LINGER);
        drop(tx);
        settler.await.unwrap();
    }

    #[test]
    fn a_task_that_never_ends_turns_coalescing_off() {
        let mut window = AckWindow::new(256);
        let mut out = Vec::new();
        // Tag 1 never settles.
        for tag in 2..=(MAX_SETTLED_AHEAD as u64 + 2) {
            window.settle(Settle::Ack(tag), &mut out);
        }
        assert!(
            out.is_empty(),
            "held, none due by count alone: {}",
            out.len()
        );
        let out = flushed(&mut window);
        assert_eq!(out.len(), MAX_SETTLED_AHEAD + 1);
        assert!(out.iter().all(|f| matches!(f, Frame::Ack(_))));
        // From now on, every ack goes at once and alone.
        let out = settle_all(&mut window, &[Settle::Ack(1_000_000)]);
        assert_eq!(out, vec![Frame::Ack(1_000_000)]);
        assert!(window.is_idle());
    }
}
