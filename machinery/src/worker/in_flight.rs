//! Where a worker runs its deliveries ([`Placement`]): each as a Tokio task of its own, or in
//! place, as futures of the worker's own task (an async body that waits then goes on as a task
//! of its own, see the layers' `offload`), or, by default, in place while the worker's task has
//! time to spare and spawned while it is the busy one ([`Busy`]). The choice is made here, per
//! delivery, and nowhere else.
//!
//! Either way the deliveries live in the sets: when the worker's task is aborted, so are they,
//! and their unsettled deliveries go back to the broker.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::{CatchUnwind, Map};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::task::JoinSet;
use tracing::{debug, error};

use super::layers::offload;

type DeliveryFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A delivery that keeps its panic (see [`Deliveries::push`]); a named type, so that a
/// delivery in place needs no box beyond its own.
type Caught = Map<CatchUnwind<AssertUnwindSafe<DeliveryFuture>>, fn(std::thread::Result<()>)>;

/// Where a worker runs its deliveries ([`WorkerBuilder::placement`]).
///
/// [`WorkerBuilder::placement`]: crate::WorkerBuilder::placement
///
/// ```no_run
/// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
/// use machinery::worker::Placement;
///
/// let worker = server.worker().placement(Placement::Spawned).spawn().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// In place while the worker's task has time to spare; spawned while it is the busy one
    /// (the default).
    ///
    /// The worker times its task's passes over the deliveries in place. Once those took half
    /// of a window of at least 50 ms, each new delivery is a task of its own for a second
    /// (then two, four, ... up to a minute while the first window after each hold is busy
    /// again), after which the worker tries in place again. And a body that starts after a
    /// pass over the deliveries in place has run 2 ms, within 10 ms of the end of a pass that
    /// took 2 ms or more, or while deliveries are being spawned, goes on its own task at once.
    /// A body that computes without waiting still holds up the deliveries beside it while it
    /// runs, as no poll can be cut short; the bodies that were waiting behind it, and the
    /// deliveries after the worker finds its task busy, run on their own tasks, beside each
    /// other on every thread of the runtime, as spawned.
    #[default]
    Adaptive,
    /// Each delivery a Tokio task of its own, as Go runs each delivery in a goroutine of its
    /// own (`v2/brokers/amqp/amqp.go`, `consume`): async bodies of different deliveries run
    /// beside each other on the runtime's threads.
    Spawned,
    /// Every delivery a future of the worker's own task: no spawn and no wake of another
    /// thread per delivery. An async body runs in its delivery until it first waits, then goes
    /// on as a task of its own; its code before that first wait holds up the deliveries beside
    /// it, and an async body that never waits runs on the worker's one thread, one after
    /// another.
    InPlace,
}

/// A delivery in place, not polled after a body was offloaded until the worker's task has
/// yielded (see the layers' `offload`): it asks to be polled again, and the new task runs
/// first.
pub(crate) struct Gated(Caught);

impl Future for Gated {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if offload::spawned_here() {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut self.0).poll(cx)
    }
}

/// The deliveries a worker has in flight: each a task of its own, or a future of the worker's
/// task, as its [`Placement`] says.
pub(crate) struct Deliveries {
    placement: Placement,
    /// Each a task of its own: async bodies of different deliveries run in parallel on the
    /// runtime's threads.
    spawned: JoinSet<()>,
    /// Futures of the worker's task, polled while the worker waits for the next message: no
    /// spawn and no wake of another thread per delivery. An async body's first poll holds up
    /// the deliveries beside it; after its first wait it is a task of its own.
    in_place: FuturesUnordered<Gated>,
    /// How busy the worker's task is with the deliveries in place ([`Placement::Adaptive`]).
    busy: Busy,
}

impl Deliveries {
    /// The deliveries of the worker named `worker` (for its log events).
    pub(crate) fn new(placement: Placement, worker: &str) -> Deliveries {
        Deliveries {
            placement,
            spawned: JoinSet::new(),
            in_place: FuturesUnordered::new(),
            busy: Busy::new(Instant::now(), worker),
        }
    }

    /// Starts running `delivery`, where its [`Placement`] says. A panic stays in its delivery
    /// and is logged at once, as a task of its own would keep it; the delivery's message was
    /// not settled.
    pub(crate) fn push(&mut self, delivery: DeliveryFuture) {
        let delivery: Caught = AssertUnwindSafe(delivery)
            .catch_unwind()
            .map(log_panic as fn(_));
        let in_place = match self.placement {
            Placement::Spawned => false,
            Placement::InPlace => true,
            Placement::Adaptive => self.busy.in_place(Instant::now()),
        };
        // Reaped here, without waking the worker when each ends.
        while self.spawned.try_join_next().is_some() {}
        if in_place {
            self.in_place.push(Gated(delivery));
        } else {
            self.spawned.spawn(delivery);
            if !self.in_place.is_empty() {
                // The new task sits in this thread's LIFO slot: no delivery in place runs
                // before the worker's task yields (see the layers' `offload`).
                offload::spawned();
            }
        }
    }

    /// Polls the deliveries in place until none is ready (or the set asks to be polled again);
    /// whether none is left. With [`Placement::Adaptive`] the pass is timed, and a body that
    /// starts after [`PASS_BUDGET`] of it, soon after a pass that took that long, or while the
    /// worker's task is found busy, goes on its own task at once (see
    /// [`Busy::bodies_until`]): the pass goes on, and every body ready after it goes so too.
    fn pass(&mut self, cx: &mut Context<'_>) -> bool {
        if self.in_place.is_empty() {
            return true;
        }
        let Deliveries {
            placement,
            in_place,
            busy,
            ..
        } = self;
        let adaptive = *placement == Placement::Adaptive;
        let started = adaptive.then(Instant::now);
        if let Some(at) = started {
            // A window that began long before (the worker idle, bodies waiting on a slow
            // store) is over: this pass is timed in a window of its own.
            busy.look(at);
        }
        let bodies = match started {
            Some(at) => offload::Bodies::Until(busy.bodies_until(at)),
            None => offload::Bodies::Here,
        };
        let empty = offload::in_place(bodies, || loop {
            match in_place.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => {}
                Poll::Ready(None) => break true,
                Poll::Pending => break false,
            }
        });
        if let Some(started) = started {
            let now = Instant::now();
            busy.passed(now.saturating_duration_since(started), now);
            busy.look(now);
        }
        empty
    }

    /// Runs the deliveries in place (nothing for spawned ones, which run by themselves). Never
    /// ends: await it beside what the worker waits for.
    pub(crate) async fn drive(&mut self) -> Infallible {
        poll_fn(|cx| {
            self.pass(cx);
            Poll::Pending
        })
        .await
    }

    /// Waits until every delivery has ended.
    pub(crate) async fn drain(&mut self) {
        poll_fn(|cx| {
            if self.pass(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        while self.spawned.join_next().await.is_some() {}
    }
}

/// How long the worker's task is looked at before deciding again ([`Placement::Adaptive`]).
const WINDOW: Duration = Duration::from_millis(50);
/// How long deliveries are spawned, the first time the worker's task was found busy.
const FIRST_HOLD: Duration = Duration::from_secs(1);
/// The longest they are spawned before trying in place again.
const MAX_HOLD: Duration = Duration::from_secs(60);
/// How long a pass over the deliveries in place may have run for a body that starts in it to
/// take its first poll there ([`Placement::Adaptive`]); later ones go on their own tasks at
/// once. A pass of a drain of no-op tasks with Redis results, which starts the bodies whose
/// STARTED came back in one batch, takes well under a millisecond: in `amqp_bench drain-child
/// off 20000` 1 to 3 of the 20,000 bodies started past the budget.
const PASS_BUDGET: Duration = Duration::from_millis(2);
/// How long after a pass that took [`PASS_BUDGET`] or more no body starts in place. (In the
/// same drain, 330 and 771 of the 20,000 bodies went on their own tasks so, in 2 runs.)
const AWAY: Duration = Duration::from_millis(10);

/// Whether the worker's task has time to spare for deliveries in place: the time it spent
/// running them in the current window (at least [`WINDOW`]) against the window. Busy half the
/// window or more, the next deliveries are spawned for a hold (from [`FIRST_HOLD`], doubled
/// each time the first window after a hold is busy again, up to [`MAX_HOLD`]).
#[derive(Debug)]
struct Busy {
    /// The worker's name, for the log events.
    worker: String,
    /// When the current window began.
    since: Instant,
    /// The time spent running deliveries in place since then.
    spent: Duration,
    /// While deliveries are spawned: until when.
    until: Option<Instant>,
    /// After a pass that took [`PASS_BUDGET`] or more: until when bodies do not start in place.
    away_until: Option<Instant>,
    /// The next hold.
    hold: Duration,
    /// Whether the current window is the first after a hold.
    probing: bool,
}

impl Busy {
    fn new(now: Instant, worker: &str) -> Busy {
        Busy {
            worker: worker.to_owned(),
            since: now,
            spent: Duration::ZERO,
            until: None,
            away_until: None,
            hold: FIRST_HOLD,
            probing: false,
        }
    }

    /// Counts time spent running deliveries in place.
    fn add(&mut self, spent: Duration) {
        self.spent = self.spent.saturating_add(spent);
    }

    /// Counts a pass over the deliveries in place that took `took` and ended at `now`.
    fn passed(&mut self, took: Duration, now: Instant) {
        self.add(took);
        if took >= PASS_BUDGET {
            self.away_until = now.checked_add(AWAY);
        }
    }

    /// Until when a body that starts in a pass begun at `at` takes its first poll in place:
    /// for [`PASS_BUDGET`] of the pass; not at all within [`AWAY`] of the end of a pass that
    /// took that long (a body held the worker's task: the ones that were waiting behind it go
    /// on their own tasks, also when their wakes come in a later pass, as they do when the
    /// runtime's other threads were asleep meanwhile and no thread turned its timers), nor
    /// while deliveries are being spawned.
    fn bodies_until(&self, at: Instant) -> Instant {
        if self.spawning(at) || self.away_until.is_some_and(|until| at < until) {
            return at;
        }
        at.checked_add(PASS_BUDGET).unwrap_or(at)
    }

    /// Whether deliveries are being spawned at `now` (a hold is on).
    fn spawning(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Whether the delivery taken at `now` runs in place; see [`look`](Self::look).
    fn in_place(&mut self, now: Instant) -> bool {
        self.look(now);
        !self.spawning(now)
    }

    /// Looks at the worker's task at `now`: ends a hold that is over (the next window is a
    /// probe), and once a window has passed, starts a hold if the task was busy for half of
    /// it, else starts the next window.
    fn look(&mut self, now: Instant) {
        if let Some(until) = self.until {
            if now < until {
                return;
            }
            debug!(worker = %self.worker, "trying the deliveries in place again");
            self.until = None;
            self.probing = true;
            self.restart(now);
            return;
        }
        let window = now.saturating_duration_since(self.since);
        if window < WINDOW {
            return;
        }
        if self.spent.saturating_mul(2) >= window {
            if self.probing {
                self.hold = self.hold.saturating_mul(2).min(MAX_HOLD);
            }
            debug!(
                worker = %self.worker,
                busy_ms = self.spent.as_millis(),
                window_ms = window.as_millis(),
                hold_ms = self.hold.as_millis(),
                "the worker's task is busy with its deliveries; spawning them for a while"
            );
            // An instant too far to represent ends the hold at once.
            self.until = Some(now.checked_add(self.hold).unwrap_or(now));
        } else if self.probing {
            self.hold = FIRST_HOLD;
        }
        self.probing = false;
        self.restart(now);
    }

    fn restart(&mut self, now: Instant) {
        self.since = now;
        self.spent = Duration::ZERO;
    }
}

/// Logs a delivery that panicked outside its task's body.
fn log_panic(outcome: std::thread::Result<()>) {
    let Err(payload) = outcome else { return };
    let panic = super::layers::panic_message(payload);
    error!(%panic, "a delivery panicked outside its task's body; unless it was settled before the panic, the broker gets it back");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn busy(t0: Instant) -> Busy {
        Busy::new(t0, "w")
    }

    #[test]
    fn a_task_with_time_to_spare_runs_its_deliveries_in_place() {
        let t0 = Instant::now();
        let mut busy = busy(t0);
        busy.add(ms(10));
        assert!(busy.in_place(t0 + ms(10)), "within the window");
        busy.add(ms(14));
        assert!(busy.in_place(t0 + ms(50)), "busy under half the window");
        // Busy more than half of the time so far, but the window is not over: not looked at.
        busy.add(ms(40));
        assert!(busy.in_place(t0 + ms(99)), "a new window, not over yet");
    }

    #[test]
    fn a_busy_task_spawns_for_a_hold_that_grows_while_it_stays_busy() {
        let t0 = Instant::now();
        let mut busy = busy(t0);
        busy.add(ms(25));
        assert!(!busy.in_place(t0 + ms(50)), "busy half the window");
        assert!(!busy.in_place(t0 + ms(1049)), "held for a second");
        // The hold is over: one window in place, busy again, so the next hold is doubled.
        let t1 = t0 + ms(1050);
        assert!(busy.in_place(t1));
        busy.add(ms(40));
        assert!(!busy.in_place(t1 + ms(60)));
        assert!(!busy.in_place(t1 + ms(2059)), "held for two seconds");
        let t2 = t1 + ms(2060);
        assert!(busy.in_place(t2));
        // Calm for a window: the hold starts from a second again.
        assert!(busy.in_place(t2 + ms(50)));
        busy.add(ms(30));
        let t3 = t2 + ms(100);
        assert!(!busy.in_place(t3));
        assert!(busy.in_place(t3 + FIRST_HOLD), "held for a second again");
    }

    #[test]
    fn time_spent_during_a_hold_does_not_count_after_it() {
        let t0 = Instant::now();
        let mut busy = busy(t0);
        busy.add(ms(50));
        assert!(!busy.in_place(t0 + ms(50)));
        // Deliveries taken in place before the hold still ran during it.
        busy.add(ms(900));
        let t1 = t0 + ms(50) + FIRST_HOLD;
        assert!(busy.in_place(t1), "the hold is over");
        assert!(busy.in_place(t1 + ms(60)), "a calm first window after it");
    }

    #[test]
    fn a_pass_looks_at_the_task_too() {
        // One body held the worker's task for 200 ms in a pass: the next delivery is spawned,
        // and a body that starts in the next pass goes on its own task at once.
        let t0 = Instant::now();
        let mut busy = busy(t0);
        assert!(busy.in_place(t0));
        busy.add(ms(200));
        busy.look(t0 + ms(200));
        assert!(busy.spawning(t0 + ms(201)));
        assert!(!busy.in_place(t0 + ms(201)));
    }

    #[test]
    fn bodies_start_in_place_for_a_pass_budget_unless_a_pass_was_long_just_before() {
        let t0 = Instant::now();
        let mut busy = busy(t0);
        assert_eq!(busy.bodies_until(t0), t0 + PASS_BUDGET);
        busy.passed(ms(1), t0 + ms(1));
        assert_eq!(busy.bodies_until(t0 + ms(1)), t0 + ms(1) + PASS_BUDGET);
        // A body held the worker's task for 30 ms: for the next 10 ms, bodies go on their own,
        // also after a short pass meanwhile.
        busy.passed(ms(30), t0 + ms(31));
        assert_eq!(busy.bodies_until(t0 + ms(31)), t0 + ms(31));
        busy.passed(ms(1), t0 + ms(32));
        assert_eq!(busy.bodies_until(t0 + ms(40)), t0 + ms(40));
        assert_eq!(busy.bodies_until(t0 + ms(41)), t0 + ms(41) + PASS_BUDGET);
        // During a hold, none does.
        busy.add(ms(40));
        busy.look(t0 + ms(60));
        assert_eq!(busy.bodies_until(t0 + ms(61)), t0 + ms(61));
    }

    #[test]
    fn the_hold_is_bounded() {
        let t0 = Instant::now();
        let mut busy = busy(t0);
        let mut now = t0;
        for _ in 0..20 {
            busy.add(WINDOW);
            now += WINDOW;
            assert!(!busy.in_place(now));
            now += MAX_HOLD;
            assert!(
                busy.in_place(now),
                "tried in place again after at most a minute"
            );
        }
        assert_eq!(busy.hold, MAX_HOLD);
    }
}
