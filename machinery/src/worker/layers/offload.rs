//! Where an async body runs in a delivery in place (see
//! [`Placement`](crate::worker::Placement)): in the delivery until it first waits, then as a
//! Tokio task of its own, as Go runs each delivery in a goroutine (`v2/brokers/amqp/amqp.go`,
//! `consume`); or, when it starts late in a pass over the deliveries in place (its budget
//! spent, [`Bodies::Until`]), on a task of its own from the start. In a delivery spawned as a
//! task of its own, the body runs there.
//!
//! A body that ends in its first poll (most no-op and CPU-light tasks) costs no spawn and no
//! wake of another thread. A body that waits (I/O, a timer, another service) goes on beside
//! the worker's task, as every delivery's does when they are spawned: a sibling that holds
//! the worker's thread does not hold it up, and the layers inside it (time limits, revoke)
//! keep their time on its own task. Only one body at a time, in its first poll, can hold up
//! the deliveries beside it.
//!
//! Tokio puts a task spawned from a runtime thread in that thread's LIFO slot, which no other
//! thread steals: a sibling polled next, before the worker's task yields, that holds the
//! thread would hold the new task up too. So after a spawn here the worker polls no more
//! deliveries until its task has yielded once ([`spawned_here`], [`passes`]), and the new
//! task runs first. What this does not cover, as Tokio does not either: a task that the
//! worker's task wakes (not spawns) also waits in that slot, so a body woken by a sibling's
//! outcome (it awaits that sibling's result) waits for a sibling that holds the thread; and
//! the mark is per thread, so of several workers polled by one task (`join!` of their `run`s),
//! each clears the mark of the others.
//!
//! A panic in a layer around the body (none of the worker's own layers panics) is a panic of
//! the delivery while the body runs in place, and the task's failure once it runs on its own.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use super::{joined, AbortOnDrop, Body};
use crate::task::TaskOutcome;
use crate::worker::trace;

/// In a delivery in place, runs `body` there until it first waits, then as a task of its own
/// (or on a task of its own from the start, when the pass over the deliveries in place is past
/// its budget: see [`Bodies`]), as the same execution, inside the same span and subscriber. In
/// a delivery that is a task of its own, runs it there. The time limit and revoke are inside
/// `body` and end it there; the task is aborted when this future is dropped (the worker's
/// end: aborted, or out of time to shut down).
pub(crate) async fn offload(mut body: Body) -> TaskOutcome {
    let first_poll_here = match IN_PLACE.try_with(Cell::get).ok().flatten() {
        // A delivery that is a task of its own (spawned) runs its body there.
        None => return body.await,
        Some(Bodies::Here) => true,
        Some(Bodies::Until(until)) => Instant::now() < until,
    };
    if first_poll_here {
        if let Poll::Ready(outcome) = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll(cx))).await
        {
            return outcome;
        }
    }
    let mut handle = AbortOnDrop(tokio::spawn(trace::carried(body)));
    // A body that waited after its first poll here: the deliveries wait for the worker's next
    // poll (the LIFO slot). One past the pass's budget starts no body here: the pass goes on,
    // and what it polls now holds the new task up only for the worker's own short work.
    if first_poll_here {
        mark(true);
    }
    joined((&mut handle.0).await)
}

/// Where a body that starts in a delivery in place takes its first poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bodies {
    /// In place.
    Here,
    /// In place until this instant; from then on, at once on a task of its own.
    Until(Instant),
}

thread_local! {
    /// A body was offloaded on this thread since the worker's task was last polled.
    static SPAWNED: Cell<bool> = const { Cell::new(false) };
    /// The deliveries in place are being polled on this thread (by the worker's task): where
    /// a body that starts there takes its first poll.
    static IN_PLACE: Cell<Option<Bodies>> = const { Cell::new(None) };
}

/// Polls deliveries in place: a body that starts in them takes its first poll where `bodies`
/// says, and goes on as a task of its own if it waits ([`offload`]); a body in a delivery
/// spawned as a task of its own runs there.
pub(crate) fn in_place<T>(bodies: Bodies, poll: impl FnOnce() -> T) -> T {
    /// Restores the flag, also when the poll panics.
    struct Restore(Option<Bodies>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = IN_PLACE.try_with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(
        IN_PLACE
            .try_with(|c| c.replace(Some(bodies)))
            .unwrap_or(None),
    );
    poll()
}

/// Notes that the worker's task spawned a task on this thread: the deliveries in place wait
/// for its next poll, so that the new task, in the thread's LIFO slot, is not held up behind
/// them (see the [module docs](self)).
pub(crate) fn spawned() {
    mark(true);
}

/// Whether a body was offloaded on this thread since the worker's task was last polled: the
/// deliveries wait for its next poll.
pub(crate) fn spawned_here() -> bool {
    SPAWNED.try_with(Cell::get).unwrap_or(false)
}

/// Sets the mark (nothing on a thread that is ending).
fn mark(spawned: bool) {
    let _ = SPAWNED.try_with(|s| s.set(spawned));
}

/// Runs the worker's serving loop, each poll of it (each poll of its task) a new pass: what
/// was spawned before has had its turn.
pub(crate) async fn passes<F: Future>(serve: F) -> F::Output {
    let mut serve = std::pin::pin!(serve);
    poll_fn(|cx| {
        mark(false);
        serve.as_mut().poll(cx)
    })
    .await
}
