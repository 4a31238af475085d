//! Where an async body runs when the deliveries run in place
//! ([`WorkerBuilder::in_place`](crate::WorkerBuilder::in_place)): in the delivery until it
//! first waits, then as a Tokio task of its own.
//!
//! A body that ends in its first poll (most no-op and CPU-light tasks) costs no spawn and no
//! wake of another thread. A body that waits (I/O, a timer, another service) goes on beside
//! the worker's task, as every delivery's does when they are spawned: a sibling that holds
//! the worker's thread does not hold it up, and the layers inside it (time limits, revoke)
//! keep their time on its own task. Only one body at a time, in its first poll, can hold up
//! the deliveries beside it.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;

use super::{joined, AbortOnDrop, Body};
use crate::task::TaskOutcome;
use crate::worker::trace;

/// Runs `body` in place until it first waits, then as a task of its own (aborted if this
/// future is dropped: a time limit, a revoke, the worker's end). It runs as the same
/// execution, inside the same span.
pub(crate) async fn offload(mut body: Body) -> TaskOutcome {
    if let Poll::Ready(outcome) = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll(cx))).await {
        return outcome;
    }
    let mut handle = AbortOnDrop(tokio::spawn(trace::carried(body)));
    mark(true);
    joined((&mut handle.0).await)
}

thread_local! {
    /// A body was offloaded on this thread since the worker's task was last polled.
    static SPAWNED: Cell<bool> = const { Cell::new(false) };
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
