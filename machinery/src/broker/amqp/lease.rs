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
//! arguments stay Go's, so Go and Rust producers share the queue. What is left to chance is a
//! broker that takes more than 1.5 delays longer to handle one declaration than the one before.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// How many delay queues are kept at once; a publish to another one while this many are kept
/// declares the queue as Go does, without a lease.
pub(super) const MAX_LEASES: usize = 4096;

/// The shortest time between two declarations of one queue.
const MIN_EVERY: Duration = Duration::from_millis(1);

/// The delay queues kept declared, and when each was last declared.
#[derive(Default)]
pub(super) struct Leases {
    entries: HashMap<String, Lease>,
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
}

/// What [`Leases::hold`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// The queue is kept; no keeper ran for it: the caller starts one.
    Start,
    /// The queue is kept, by the keeper running for it.
    Kept,
    /// [`MAX_LEASES`] queues are kept already: this one is declared as Go does, unkept.
    Full,
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
            return Held::Kept;
        }
        if self.entries.len() >= MAX_LEASES {
            return Held::Full;
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
            },
        );
        Held::Start
    }

    /// A publish to `queue` ended at `now` (confirmed, failed or dropped): the queue is kept
    /// until a declaration is sent after it, so that the broker keeps the queue for two
    /// delays past the confirm, one past the message's exit.
    pub(super) fn release(&mut self, queue: &str, now: Instant) {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.pending = lease.pending.saturating_sub(1);
            lease.until = lease.until.max(now);
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

    /// A declaration of `queue` failed at `now`: the keeper tries again a period later.
    pub(super) fn failed(&mut self, queue: &str, now: Instant) {
        if let Some(lease) = self.entries.get_mut(queue) {
            lease.due = now + lease.every;
        }
    }

    /// For the keeper of `queue`: when to declare it next, or that the lease is over (then
    /// the queue is forgotten and the keeper ends).
    pub(super) fn next(&mut self, queue: &str) -> Next {
        let Some(lease) = self.entries.get(queue) else {
            return Next::Done;
        };
        if lease.pending == 0 && lease.sent.is_some_and(|sent| sent >= lease.until) {
            self.entries.remove(queue);
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
        assert_eq!(leases.next("q"), Next::At(ms(t0, 50)));
        // Its confirm comes late (380 ms), the second's at 60 ms: kept all along.
        leases.release("q", ms(t0, 60));
        for sent in [50, 100, 150, 200, 250, 300, 350] {
            leases.declared("q", ms(t0, sent));
            assert_eq!(leases.next("q"), Next::At(ms(t0, sent + 50)), "at {sent}");
        }
        leases.release("q", ms(t0, 380));
        leases.declared("q", ms(t0, 400));
        assert_eq!(leases.next("q"), Next::Done);
        assert_eq!(leases.len(), 0, "forgotten once its lease is over");
        assert_eq!(leases.hold("q", D, ms(t0, 500)), Held::Start, "a new lease");
    }

    #[test]
    fn an_older_answer_does_not_move_the_last_declaration_back() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.hold("q", D, t0);
        leases.declared("q", ms(t0, 60));
        leases.declared("q", ms(t0, 10));
        assert_eq!(leases.next("q"), Next::At(ms(t0, 110)));
    }

    #[test]
    fn a_failed_or_forgotten_declaration_is_tried_again_a_period_later() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.hold("q", D, t0);
        assert_eq!(leases.next("q"), Next::At(ms(t0, 50)), "never answered");
        leases.declared("q", t0);
        leases.failed("q", ms(t0, 70));
        assert_eq!(leases.next("q"), Next::At(ms(t0, 120)));
        // Unroutable: deleted. Publishes declare it again, and so does the keeper.
        leases.forget("q");
        assert!(!leases.covers("q", D, ms(t0, 71)));
        leases.release("q", ms(t0, 71));
        assert_eq!(
            leases.next("q"),
            Next::At(ms(t0, 120)),
            "not over: never declared after"
        );
        leases.forget_all();
        leases.declared("q", ms(t0, 200));
        assert!(leases.covers("q", D, ms(t0, 201)));
        assert_eq!(leases.next("q"), Next::Done);
    }

    #[test]
    fn leases_are_bounded() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        for i in 0..MAX_LEASES {
            assert_eq!(leases.hold(&format!("delay.{i}"), D, t0), Held::Start);
        }
        assert_eq!(leases.hold("one.more", D, t0), Held::Full);
        assert!(!leases.covers("one.more", D, t0));
        assert_eq!(leases.len(), MAX_LEASES);
    }
}
