//! The one place that decides how a delivery leaves the worker.
//!
//! Handling a delivery ends in an [`Outcome`]; [`SettlePolicy::decide`] turns the outcome and
//! the delivery's [`Attempt`] into a [`Settlement`]: acknowledge it, republish it (later, with
//! its attempt counted or not), or dead-letter it. Nothing else in the worker chooses between
//! those.
//!
//! Attempts are counted durably. A message the worker gives back is republished with the
//! attempts so far in the signature's `Headers` (`x-machinery-attempts`, which Go passes
//! through untouched) and the last error (`x-machinery-last-error`); the broker's own count is
//! added where it keeps one (a RabbitMQ quorum queue's `x-delivery-count`, the embedded
//! broker). A classic queue only says "redelivered": such a message is first republished with
//! its count (a checkpoint), so that a message whose worker dies every time it runs is still
//! dead-lettered after `max_deliveries`.

use std::time::Duration;

use serde_json::Value;

use crate::broker::Delivery;
use crate::error::Error;
use crate::wire::Signature;

/// The `Headers` key carrying how many deliveries of this message came before.
pub(crate) const ATTEMPTS_HEADER: &str = "x-machinery-attempts";
/// The `Headers` key carrying the error of the last delivery that could not be settled.
pub(crate) const LAST_ERROR_HEADER: &str = "x-machinery-last-error";

/// The longest pause before a message given back is delivered again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Which delivery of a message this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The deliveries counted so far, this one included: 1 for the first.
    pub(crate) number: u32,
    /// The broker said "redelivered" without counting (a classic queue). Such a redelivery is
    /// not counted by itself: the message may never have reached a task (it sat in a prefetch
    /// buffer). The worker counts it once the stored state shows that a task started.
    pub(crate) uncounted: bool,
    /// The broker delivered it before (counted or not).
    pub(crate) redelivered: bool,
    /// The last delivery number the broker makes of this copy, where it has a limit (a quorum
    /// queue's `x-delivery-limit`): the deliveries carried, plus the limit. `None`: no limit.
    pub(crate) ceiling: Option<u32>,
    /// The broker's limit itself, for the dead-letter reason.
    pub(crate) delivery_limit: Option<u32>,
}

impl Attempt {
    /// Counts the deliveries before this one: those carried in the signature, plus the
    /// broker's count where it keeps one.
    pub(crate) fn of(delivery: &Delivery, signature: &Signature) -> Attempt {
        Attempt::by_broker(delivery, carried_attempts(signature))
    }

    /// The attempt, given the deliveries `carried` in the message itself.
    pub(crate) fn by_broker(delivery: &Delivery, carried: u32) -> Attempt {
        Attempt {
            // Returned more than `limit` times, the broker drops the message: the delivery with
            // count `limit` is its last (number carried + limit + 1), which must not run.
            ceiling: delivery
                .delivery_limit()
                .map(|limit| carried.saturating_add(limit)),
            delivery_limit: delivery.delivery_limit(),
            number: carried
                .saturating_add(delivery.delivery_count().unwrap_or(0))
                .saturating_add(1),
            uncounted: delivery.redelivered() && delivery.delivery_count().is_none(),
            redelivered: delivery.redelivered(),
        }
    }

    /// What a copy of this message sent again carries: the deliveries counted before this one,
    /// plus this one if it `attempted` anything, or if it is an uncounted redelivery (which
    /// may have run).
    pub(crate) fn carried(self, attempted: bool) -> u32 {
        (self.number - 1).saturating_add(u32::from(attempted || self.uncounted))
    }

    /// Whether no delivery of this message came before (a broker that says "redelivered" with
    /// a count of 0 is believed on the flag).
    pub(crate) fn is_first(self) -> bool {
        self.number == 1 && !self.redelivered
    }
}

/// The attempts a signature carries (a missing or malformed header counts as none).
fn carried_attempts(signature: &Signature) -> u32 {
    signature
        .headers
        .get(ATTEMPTS_HEADER)
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// How handling a delivery ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The task's final state is stored and its follow-ups are sent (or it was dropped as Go
    /// drops a task with `IgnoreWhenTaskNotRegistered`).
    Done,
    /// Another copy of this message is running or ran: nothing to do.
    Duplicate,
    /// No task of that name is registered here.
    Unregistered,
    /// It arrived before its ETA: send it again to arrive then (not an attempt).
    Early(Duration),
    /// A redelivery the broker did not count: count it before running it.
    Checkpoint,
    /// The outcome could not be recorded or the follow-ups not sent; trying again may work.
    Failed(Error),
    /// It can never be handled (not a signature, too large); the reason.
    Poison(String),
}

/// How a delivery leaves the worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Acknowledge it: done.
    Ack,
    /// Publish it again, after `delay`, and acknowledge this delivery. `attempted` counts this
    /// delivery as an attempt; `last_error` is recorded with it.
    Republish {
        delay: Duration,
        attempted: bool,
        last_error: Option<String>,
    },
    /// Move it to the dead-letter queue. `record_failure`: also store FAILURE with the reason
    /// (when it is a signature whose state can be recorded).
    DeadLetter {
        reason: String,
        record_failure: bool,
    },
}

/// The limits the policy applies.
#[derive(Debug, Clone)]
pub(crate) struct SettlePolicy {
    /// Deliveries of one message before it is dead-lettered.
    pub(crate) max_deliveries: u32,
    /// The first pause before a message given back is delivered again; it doubles with each
    /// attempt, up to [`MAX_BACKOFF`].
    pub(crate) backoff: Duration,
}

impl SettlePolicy {
    /// Whether this delivery is past the limit before anything is done with it (a message
    /// whose worker died on every delivery): past `max_deliveries`, or the last delivery the
    /// broker makes before it drops the message (a quorum queue's `x-delivery-limit`; Go has
    /// no such limit).
    pub(crate) fn exhausted(&self, attempt: Attempt) -> Option<Settlement> {
        let limit = self.max_deliveries.min(attempt.ceiling.unwrap_or(u32::MAX));
        (attempt.number > limit).then(|| Settlement::DeadLetter {
            reason: format!(
                "delivered {} times without being settled (max_deliveries {}{})",
                attempt.number - 1,
                self.max_deliveries,
                attempt.delivery_limit.map_or(String::new(), |l| format!(
                    ", the queue's x-delivery-limit {l}"
                )),
            ),
            record_failure: true,
        })
    }

    /// The settlement for `outcome` on `attempt`.
    pub(crate) fn decide(&self, outcome: Outcome, attempt: Attempt) -> Settlement {
        let last = attempt.number >= self.max_deliveries;
        match outcome {
            Outcome::Done | Outcome::Duplicate => Settlement::Ack,
            Outcome::Early(delay) => Settlement::Republish {
                delay,
                attempted: false,
                last_error: None,
            },
            // Counts the delivery that started before (the broker did not).
            Outcome::Checkpoint => Settlement::Republish {
                delay: Duration::ZERO,
                attempted: true,
                last_error: Some("redelivered by the broker".to_owned()),
            },
            Outcome::Poison(reason) => Settlement::DeadLetter {
                reason,
                record_failure: false,
            },
            Outcome::Unregistered if last => Settlement::DeadLetter {
                reason: format!(
                    "task not registered on the workers that received it ({} deliveries)",
                    attempt.number
                ),
                record_failure: true,
            },
            Outcome::Unregistered => Settlement::Republish {
                delay: self.backoff_for(attempt),
                attempted: true,
                last_error: Some("task not registered".to_owned()),
            },
            Outcome::Failed(e) if last || e.is_permanent() => Settlement::DeadLetter {
                reason: format!(
                    "could not be settled after {} deliveries: {e}",
                    attempt.number
                ),
                record_failure: true,
            },
            Outcome::Failed(e) => Settlement::Republish {
                delay: self.backoff_for(attempt),
                attempted: true,
                last_error: Some(e.to_string()),
            },
        }
    }

    /// `backoff * 2^(attempt - 1)`, capped.
    fn backoff_for(&self, attempt: Attempt) -> Duration {
        let doublings = attempt.number.saturating_sub(1).min(16);
        self.backoff
            .saturating_mul(1 << doublings)
            .min(MAX_BACKOFF.max(self.backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn policy() -> SettlePolicy {
        SettlePolicy {
            max_deliveries: 5,
            backoff: Duration::from_secs(1),
        }
    }

    fn attempt(number: u32) -> Attempt {
        Attempt {
            number,
            uncounted: false,
            redelivered: number > 1,
            ceiling: None,
            delivery_limit: None,
        }
    }

    #[test]
    fn transient_failures_are_given_back_with_a_capped_backoff_then_dead_lettered() {
        let p = policy();
        let delays: Vec<_> = (1..5)
            .map(|n| {
                match p.decide(
                    Outcome::Failed(Error::new(ErrorKind::Backend, "down")),
                    attempt(n),
                ) {
                    Settlement::Republish {
                        delay, attempted, ..
                    } => {
                        assert!(attempted);
                        delay.as_secs()
                    }
                    other => panic!("attempt {n}: {other:?}"),
                }
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8]);
        assert!(matches!(
            p.decide(
                Outcome::Failed(Error::new(ErrorKind::Backend, "down")),
                attempt(5)
            ),
            Settlement::DeadLetter {
                record_failure: true,
                ..
            }
        ));
        let far = SettlePolicy {
            max_deliveries: 100,
            ..policy()
        };
        assert_eq!(
            far.decide(Outcome::Unregistered, attempt(40)),
            Settlement::Republish {
                delay: MAX_BACKOFF,
                attempted: true,
                last_error: Some("task not registered".to_owned())
            }
        );
    }

    #[test]
    fn permanent_errors_never_go_round_again() {
        let s = policy().decide(
            Outcome::Failed(Error::new(ErrorKind::Rejected, "unroutable")),
            attempt(1),
        );
        assert!(matches!(s, Settlement::DeadLetter { .. }), "{s:?}");
    }

    #[test]
    fn early_messages_do_not_use_up_attempts() {
        let s = policy().decide(Outcome::Early(Duration::from_secs(9)), attempt(5));
        assert_eq!(
            s,
            Settlement::Republish {
                delay: Duration::from_secs(9),
                attempted: false,
                last_error: None
            }
        );
    }

    #[derive(Debug)]
    struct NoAck;

    #[async_trait::async_trait]
    impl crate::broker::Acker for NoAck {
        async fn ack(&self) -> crate::Result<()> {
            Ok(())
        }
        async fn reject(&self, _: crate::broker::Rejection) -> crate::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_brokers_delivery_limit_caps_max_deliveries() {
        // A quorum queue with x-delivery-limit 2 drops a message returned a third time: the
        // delivery with x-delivery-count 2 is the last one, so it is dead-lettered there, as a
        // delivery past max_deliveries is, instead of running into the broker's drop.
        let delivery = |count: u32| {
            Delivery::new(bytes::Bytes::new(), count > 0, Box::new(NoAck))
                .with_delivery_count(count)
                .with_delivery_limit(2)
        };
        let p = policy();
        assert!(p.exhausted(Attempt::by_broker(&delivery(1), 0)).is_none());
        let Some(Settlement::DeadLetter { reason, .. }) =
            p.exhausted(Attempt::by_broker(&delivery(2), 0))
        else {
            panic!("the broker's last delivery must be dead-lettered");
        };
        assert!(reason.contains("x-delivery-limit 2"), "{reason}");
        // A copy sent again starts a new count at the broker; the deliveries it carries count
        // against max_deliveries as before.
        assert!(p.exhausted(Attempt::by_broker(&delivery(1), 3)).is_none());
        assert!(p.exhausted(Attempt::by_broker(&delivery(2), 3)).is_some());
        assert!(p.exhausted(Attempt::by_broker(&delivery(0), 5)).is_some());
        // Above max_deliveries, the broker's limit changes nothing.
        let high = |count: u32| delivery(count).with_delivery_limit(20);
        assert!(p.exhausted(Attempt::by_broker(&high(4), 0)).is_none());
        assert!(p.exhausted(Attempt::by_broker(&high(5), 0)).is_some());
    }

    #[test]
    fn a_message_past_the_limit_is_dead_lettered_before_it_runs() {
        assert!(policy().exhausted(attempt(5)).is_none());
        assert!(policy().exhausted(attempt(6)).is_some());
    }
}
