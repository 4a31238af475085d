//! Delay queues kept declared while a message published to them may still be inside.
//!
//! Go declares a delay queue with `x-expires` = 2 * delay (v2/brokers/amqp/amqp.go `delay`), and
//! RabbitMQ deletes an expired queue with the messages in it. Publishing to a queue does not
//! renew it; declaring it does, from the moment the broker handles the declaration. Go declares
//! before each publish and relies on the message arriving soon after: a message that reaches
//! the queue more than one delay after that declaration (the declaration answered late, the
//! publish slow to arrive: a loaded broker, a slow network) is deleted before its delay is over.
//!
//! Here each delay queue has a lease: from a publish until a declaration was *sent* after that
//! publish was confirmed, the queue is declared again every half delay, so that the broker never
//! goes a whole `x-expires` without a declaration, however late the publish arrived. The
//! arguments stay Go's, so Go and Rust producers share the queue.
//!
//! What is left to chance: two declarations of one queue handled more than two delays apart.
//! The declarations of every side queue share one channel, one at a time (see
//! `declare_side_queue`), so with a round trip longer than half a delay, or several busy delay
//! queues, they come less often than every half delay; and a broker that handles one
//! declaration more than 1.5 delays later than the one before. A lease whose declarations all
//! fail ends two delays after its last publish: by then the queue has expired, if it existed.

use std::collections::HashMap;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How many delay queues are kept at once; a publish to another one while this many are kept
/// declares the queue as Go does, without a lease.
pub(super) const MAX_LEASES: usize = 4096;

/// The shortest time between two declarations of one queue.
const MIN_EVERY: Duration = Duration::from_millis(1);

/// The shortest pause after a failed declaration.
const MIN_RETRY: Duration = Duration::from_millis(50);

/// At most this long after the last publish to a queue ends, its last declaration is sent and
/// the lease ends (a queue with a delay of hours is not kept for half of it).
pub(super) const FINAL_WITHIN: Duration = Duration::from_secs(1);

/// How soon a keeper looks again when the connection is not free to declare on.
pub(super) const RELOOK: Duration = Duration::from_millis(10);

/// The delay queues kept declared, and when each was last declared.
#[derive(Default)]
pub(super) struct Leases {
    entries: HashMap<String, Lease>,
    /// [`Held::Full`] was reported since the leases were last below half their cap.
    full_reported: bool,
}

/// The task that keeps a queue declared.
enum Keeper {
    /// [`Leases::hold`] said to start one; [`Leases::kept_by`] not called yet.
    Starting,
    Running(AbortHandle),
}

struct Lease {
    /// Half the queue's delay: how often it is declared again while kept.
    every: Duration,
    /// When the last declaration the broker answered was sent, on the current connection:
    /// the broker keeps the queue at least 2 * delay past then.
    sent: Option<Instant>,
    /// When the keeper declares it next.
    due: Instant,
    /// Publishes to it whose confirm has not come: kept at least until they end.
    pending: u32,
    /// Then kept until a declaration is sent at or after this: when the last publish ended.
    until: Instant,
    keeper: Keeper,
}

/// What [`Leases::hold`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// The queue is kept; no keeper runs for it: the caller starts one
    /// ([`kept_by`](Leases::kept_by), or [`end`](Leases::end) if it cannot).
    Start,
    /// The queue is kept, by the keeper running for it.
    Kept,
    /// [`MAX_LEASES`] queues are kept already: this one is declared as Go does, unkept.
    /// `true` the first time since the leases were below half their cap.
    Full(bool),
}

/// What the keeper of a queue does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Declare the queue again at this instant.
    At(Instant),
    /// The lease is over: the last message published is out before the queue can expire.
    Done,
}

impl Leases {
    /// Whether a message published now to `queue` (delay `delay`) can rely on its last
    /// declaration: sent less than one delay ago, so the queue lives at least one more delay.
    pub(super) fn covers(&self, queue: &str, delay: Duration, now: Instant) -> bool {
        self.entries
            .get(queue)
            .and_then(|lease| lease.sent)
            .is_some_and(|sent| now.saturating_duration_since(sent) < delay)
    }

    /// A publish to `queue` (delay `delay`) starts at `now`: keep the queue until it ends
    /// ([`release`](Self::release)).
    pub(super) fn hold(&mut self, queue: &str, delay: Duration, now: Instant) -> Held {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.pending = lease.pending.saturating_add(1);
            if let Keeper::Running(task) = &lease.keeper {
                if task.is_finished() {
                    // Its runtime ended (or it failed): another one takes over.
                    lease.keeper = Keeper::Starting;
                    return Held::Start;
                }
            }
            return Held::Kept;
        }
        if self.entries.len() >= MAX_LEASES {
            let first = !self.full_reported;
            self.full_reported = true;
            return Held::Full(first);
        }
        let every = (delay / 2).max(MIN_EVERY);
        self.entries.insert(
            queue.to_owned(),
            Lease {
                every,
                sent: None,
                due: now + every,
                pending: 1,
                until: now,
                keeper: Keeper::Starting,
            },
        );
        Held::Start
    }

    /// The keeper of `queue` started ([`Held::Start`]).
    pub(super) fn kept_by(&mut self, queue: &str, task: AbortHandle) {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.keeper = Keeper::Running(task);
        }
    }

    /// Ends the lease of `queue`: its keeper could not start (no runtime; it is declared as
    /// Go does, unkept), the broker refuses its declaration for good, or the lease is over.
    pub(super) fn end(&mut self, queue: &str) {
        self.entries.remove(queue);
        if self.entries.len() < MAX_LEASES / 2 {
            self.full_reported = false;
        }
    }

    /// A publish to `queue` ended at `now` (confirmed, failed or dropped): the queue is kept
    /// until a declaration is sent after it, so that the broker keeps the queue for two
    /// delays past the confirm, one past the message's exit.
    pub(super) fn release(&mut self, queue: &str, now: Instant) {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.pending = lease.pending.saturating_sub(1);
            lease.until = lease.until.max(now);
            if lease.pending == 0 {
                lease.due = lease.due.min(lease.until + lease.every.min(FINAL_WITHIN));
            }
        }
    }

    /// Records a declaration of `queue` sent at `sent` and answered.
    pub(super) fn declared(&mut self, queue: &str, sent: Instant) {
        if let Some(lease) = self.entries.get_mut(queue) {
            if lease.sent.is_none_or(|last| last < sent) {
                lease.sent = Some(sent);
                lease.due = sent + lease.every;
            }
        }
    }

    /// A declaration of `queue` failed at `now`: the keeper tries again a period later (at
    /// least [`MIN_RETRY`]).
    pub(super) fn failed(&mut self, queue: &str, now: Instant) {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.due = now + lease.every.max(MIN_RETRY);
        }
    }

    /// For the keeper of `queue`, at `now`: when to declare it next, or that the lease is over
    /// (then the queue is forgotten and the keeper ends). It is over once no publish is
    /// pending and a declaration was sent after the last one ended, or, if none was, two
    /// delays after it ended: by then the queue has expired, if it existed.
    pub(super) fn next(&mut self, queue: &str, now: Instant) -> Next {
        let Some(lease) = self.entries.get(queue) else {
            return Next::Done;
        };
        let expired = now >= lease.until + lease.every * 4;
        if lease.pending == 0 && (lease.sent.is_some_and(|sent| sent >= lease.until) || expired) {
            self.end(queue);
            return Next::Done;
        }
        Next::At(lease.due)
    }

    /// The declarations of `queue` no longer count (a message to it came back unroutable: it
    /// was deleted).
    pub(super) fn forget(&mut self, queue: &str) {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.sent = None;
        }
    }

    /// A new connection: the broker may have lost every queue; declarations made on the old
    /// connection no longer count.
    pub(super) fn forget_all(&mut self) {
        for lease in self.entries.values_mut() {
            lease.sent = None;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(100);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_queue_is_declared_every_half_delay_until_a_declaration_follows_the_last_confirm() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        assert!(!leases.covers("q", D, t0), "never declared");
        // The publish holds the queue and declares it at t0.
        assert_eq!(leases.hold("q", D, t0), Held::Start);
        leases.declared("q", t0);
        assert!(leases.covers("q", D, ms(t0, 99)));
        assert!(
            !leases.covers("q", D, ms(t0, 100)),
            "one delay may be all it has left"
        );
        assert_eq!(
            leases.hold("q", D, ms(t0, 1)),
            Held::Kept,
            "a second publish"
        );
        assert_eq!(leases.next("q", ms(t0, 1)), Next::At(ms(t0, 50)));
        // Its confirm comes late (380 ms), the second's at 60 ms: kept all along.
        leases.release("q", ms(t0, 60));
        for sent in [50, 100, 150, 200, 250, 300, 350] {
            leases.declared("q", ms(t0, sent));
            let now = ms(t0, sent + 1);
            assert_eq!(
                leases.next("q", now),
                Next::At(ms(t0, sent + 50)),
                "at {sent}"
            );
        }
        leases.release("q", ms(t0, 380));
        assert_eq!(leases.next("q", ms(t0, 381)), Next::At(ms(t0, 400)));
        leases.declared("q", ms(t0, 400));
        assert_eq!(leases.next("q", ms(t0, 401)), Next::Done);
        assert_eq!(leases.len(), 0, "forgotten once its lease is over");
        assert_eq!(leases.hold("q", D, ms(t0, 500)), Held::Start, "a new lease");
    }

    #[test]
    fn a_long_delay_is_declared_a_last_time_soon_after_its_last_publish() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut leases = Leases::default();
        leases.hold("q", hour, t0);
        leases.declared("q", t0);
        assert_eq!(leases.next("q", t0), Next::At(t0 + hour / 2));
        leases.release("q", ms(t0, 5));
        assert_eq!(leases.next("q", ms(t0, 6)), Next::At(ms(t0, 1_005)));
        leases.declared("q", ms(t0, 1_005));
        assert_eq!(leases.next("q", ms(t0, 1_006)), Next::Done);
    }

    #[test]
    fn an_older_answer_does_not_move_the_last_declaration_back() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.hold("q", D, t0);
        leases.declared("q", ms(t0, 60));
        leases.declared("q", ms(t0, 10));
        assert_eq!(leases.next("q", ms(t0, 61)), Next::At(ms(t0, 110)));
    }

    #[test]
    fn a_failed_or_forgotten_declaration_is_tried_again_a_period_later() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.hold("q", D, t0);
        assert_eq!(leases.next("q", t0), Next::At(ms(t0, 50)), "never answered");
        leases.declared("q", t0);
        leases.failed("q", ms(t0, 70));
        assert_eq!(leases.next("q", ms(t0, 70)), Next::At(ms(t0, 120)));
        // Unroutable: deleted. Publishes declare it again, and so does the keeper.
        leases.forget("q");
        assert!(!leases.covers("q", D, ms(t0, 71)));
        leases.release("q", ms(t0, 71));
        assert_eq!(
            leases.next("q", ms(t0, 72)),
            Next::At(ms(t0, 120)),
            "never declared after"
        );
        leases.forget_all();
        leases.declared("q", ms(t0, 200));
        assert!(leases.covers("q", D, ms(t0, 201)));
        assert_eq!(leases.next("q", ms(t0, 201)), Next::Done);
    }

    #[test]
    fn a_lease_whose_declarations_all_fail_ends_two_delays_after_its_last_publish() {
        let t0 = Instant::now();
        let short = Duration::from_millis(2);
        let mut leases = Leases::default();
        leases.hold("q", short, t0);
        leases.release("q", t0);
        leases.failed("q", t0);
        assert_eq!(
            leases.next("q", t0),
            Next::At(ms(t0, 50)),
            "a failure waits at least MIN_RETRY, whatever the delay"
        );
        leases.failed("q", ms(t0, 50));
        assert_eq!(leases.next("q", ms(t0, 50)), Next::Done, "expired by now");
        // While a publish is pending, it is kept however long that takes.
        leases.hold("p", D, t0);
        assert_eq!(leases.next("p", ms(t0, 10_000)), Next::At(ms(t0, 50)));
        leases.end("p");
        assert_eq!(leases.next("p", ms(t0, 10_000)), Next::Done);
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn leases_are_bounded() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        for i in 0..MAX_LEASES {
            assert_eq!(leases.hold(&format!("delay.{i}"), D, t0), Held::Start);
        }
        assert_eq!(leases.hold("one.more", D, t0), Held::Full(true));
        assert_eq!(
            leases.hold("two.more", D, t0),
            Held::Full(false),
            "reported once"
        );
        assert!(!leases.covers("one.more", D, t0));
        assert_eq!(leases.len(), MAX_LEASES);
        for i in 0..=MAX_LEASES / 2 {
            leases.end(&format!("delay.{i}"));
        }
        leases.hold("delay.0", D, t0);
        for i in leases.len()..MAX_LEASES {
            assert_eq!(leases.hold(&format!("again.{i}"), D, t0), Held::Start);
        }
        assert_eq!(
            leases.hold("three.more", D, t0),
            Held::Full(true),
            "full again"
        );
    }

    #[tokio::test]
    async fn a_keeper_that_ended_is_replaced() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        assert_eq!(leases.hold("q", D, t0), Held::Start);
        assert_eq!(leases.hold("q", D, t0), Held::Kept, "starting");
        let task = tokio::spawn(async {});
        leases.kept_by("q", task.abort_handle());
        let _ = task.await;
        assert_eq!(leases.hold("q", D, t0), Held::Start);
        let task = tokio::spawn(std::future::pending::<()>());
        leases.kept_by("q", task.abort_handle());
        assert_eq!(leases.hold("q", D, t0), Held::Kept);
        task.abort();
    }
}
