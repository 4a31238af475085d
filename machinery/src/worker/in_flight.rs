//! Where a worker runs its deliveries: each as a Tokio task of its own (the default), or all in
//! place, as futures of the worker's own task ([`WorkerBuilder::in_place`]; an async body that
//! waits then goes on as a task of its own, see the layers' `offload`).
//!
//! Either way the deliveries live in the set: when the worker's task is aborted, so are they,
//! and their unsettled deliveries go back to the broker.
//!
//! [`WorkerBuilder::in_place`]: crate::WorkerBuilder::in_place

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::{CatchUnwind, Map};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::task::JoinSet;
use tracing::error;

use super::layers::offload;

type DeliveryFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A delivery that keeps its panic (see [`Deliveries::push`]); a named type, so that a
/// delivery in place needs no box beyond its own.
type Caught = Map<CatchUnwind<AssertUnwindSafe<DeliveryFuture>>, fn(std::thread::Result<()>)>;

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

/// The deliveries a worker has in flight.
pub(crate) enum Deliveries {
    /// Each delivery a task of its own: async bodies of different deliveries run in parallel
    /// on the runtime's threads.
    Spawned(JoinSet<()>),
    /// Every delivery a future of the worker's task, polled while the worker waits for the
    /// next message: no spawn and no wake of another thread per delivery. An async body's
    /// first poll holds up the deliveries beside it; after its first wait it is a task of its
    /// own.
    InPlace(FuturesUnordered<Gated>),
}

impl Deliveries {
    pub(crate) fn new(in_place: bool) -> Deliveries {
        if in_place {
            Deliveries::InPlace(FuturesUnordered::new())
        } else {
            Deliveries::Spawned(JoinSet::new())
        }
    }

    /// Starts running `delivery`. A panic stays in its delivery and is logged at once, as a
    /// task of its own would keep it; the delivery's message was not settled.
    pub(crate) fn push(&mut self, delivery: DeliveryFuture) {
        let delivery: Caught = AssertUnwindSafe(delivery)
            .catch_unwind()
            .map(log_panic as fn(_));
        match self {
            Deliveries::Spawned(set) => {
                // Reaped here, without waking the worker when each ends.
                while set.try_join_next().is_some() {}
                set.spawn(delivery);
            }
            Deliveries::InPlace(set) => set.push(Gated(delivery)),
        }
    }

    /// Runs the deliveries in place (nothing for spawned ones, which run by themselves). Never
    /// ends: await it beside what the worker waits for.
    pub(crate) async fn drive(&mut self) -> Infallible {
        if let Deliveries::InPlace(set) = self {
            while set.next().await.is_some() {}
        }
        std::future::pending().await
    }

    /// Waits until every delivery has ended.
    pub(crate) async fn drain(&mut self) {
        match self {
            Deliveries::Spawned(set) => while set.join_next().await.is_some() {},
            Deliveries::InPlace(set) => while set.next().await.is_some() {},
        }
    }
}

/// Logs a delivery that panicked outside its task's body.
fn log_panic(outcome: std::thread::Result<()>) {
    let Err(payload) = outcome else { return };
    let panic = super::layers::panic_message(payload);
    error!(%panic, "a delivery panicked outside its task's body; unless it was settled before the panic, the broker gets it back");
}
