//! Publisher confirms, each with the message the broker returned for its own publish.
//!
//! RabbitMQ returns an unroutable `mandatory` message (`basic.return`) before it acknowledges
//! that publish, and may acknowledge several publishes in one `basic.ack` (`multiple`). lapin 4
//! keeps returned messages in one queue per channel and hands the next one to whichever
//! confirm it completes first (`Acknowledgements::complete_pending`; a `multiple` ack walks its
//! pending confirms in `HashMap` order). Two publishes acknowledged together can swap outcomes:
//! the routed one reported unroutable, and the unroutable one reported sent, then dropped by
//! the broker without a trace (`tests/tests/slow_broker.rs` saw 4 of 2,000 on one channel).
//!
//! So one task per publishing channel, the collector, makes every publish on it and awaits
//! every confirm. Each time it wakes it first takes every publish that has been written
//! (lapin's `basic_publish` ends when the frames are on the socket, and hands back the
//! confirm), then every confirm that has completed, and again until neither has more. It
//! takes the returned messages out of those confirms and gives each publish the return that is
//! its own: the one with its exchange, routing key and body (headers, which RabbitMQ may add to,
//! only choose between equals). The broker sends a
//! message's return before its ack, and acks only what it received, so when a confirm holding
//! a publish's return completes, the collector already holds that publish.
//!
//! A confirm without a return of its own is settled as routed only when no return is waiting
//! for a publish still pending: lapin completes the confirms of one `multiple` ack one by one,
//! and the collector may wake between two of them, seeing the confirm that holds another's
//! return before the one that holds its own. Such a confirm waits (deferred) until the returns
//! are claimed: every routed confirm of the channel waits while any return waits for its
//! publish's confirm (a few microseconds, or as long as the broker takes to ack that one). A return that no pending publish can claim (its publish already settled) is
//! dropped with an error.
//!
//! What is left to chance: the collector sees completed confirms in the order of its futures'
//! wakes, which follows lapin's completion order, except for a confirm handed over (and so
//! queued) before it completed, ahead of one that completed earlier and holds its return. If
//! `FuturesUnordered` stops short between the two on two drains in a row (with a yield
//! between), the first is settled as routed. That needs a `multiple` ack, a return, and a
//! transient stop at that one place.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

/// A message to publish, as its return, if any, would carry it.
pub(super) struct Publish {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) body: Bytes,
    pub(super) options: BasicPublishOptions,
    pub(super) properties: BasicProperties,
}

impl Publish {
    /// Whether `returned` is this message: the same exchange, routing key and body. Headers do
    /// not count (RabbitMQ may add some before routing: `timestamp_in_ms`, `x-routed-by`), but
    /// choose between returns that match otherwise ([`Ledger::claim`]).
    fn owns(&self, returned: &BasicReturnMessage) -> bool {
        returned.delivery.exchange == self.exchange
            && returned.delivery.routing_key == self.routing_key
            && returned.delivery.data[..] == self.body[..]
    }

    /// What [`owns`](Self::owns) compares, hashed: which returns a pending publish may claim.
    fn key(&self) -> u64 {
        key(&self.exchange, &self.routing_key, &self.body)
    }
}

fn key(exchange: &ShortString, routing_key: &ShortString, body: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    exchange.as_str().hash(&mut hasher);
    routing_key.as_str().hash(&mut hasher);
    body.hash(&mut hasher);
    hasher.finish()
}

fn return_key(returned: &BasicReturnMessage) -> u64 {
    let delivery = &returned.delivery;
    key(&delivery.exchange, &delivery.routing_key, &delivery.data)
}

/// What became of a publish.
pub(super) enum Outcome {
    /// It could not be written (the channel or connection is gone).
    NotSent(lapin::Error),
    /// Its confirm, with its own return.
    Confirmed(Box<lapin::Result<Confirmation>>),
}

struct Request {
    publish: Publish,
    /// [`Publish::key`], hashed once, by the caller.
    key: u64,
    reply: oneshot::Sender<Outcome>,
}

/// The collector of one publishing channel. It ends when every handle is dropped and every
/// publish it holds has its outcome.
#[derive(Clone)]
pub(super) struct Confirms {
    requests: mpsc::UnboundedSender<Request>,
}

impl Confirms {
    /// Starts the collector of `channel`, on the current Tokio runtime; `None` outside one.
    pub(super) fn start(channel: Channel) -> Option<Confirms> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (requests, incoming) = mpsc::unbounded_channel();
        runtime.spawn(collect(channel, incoming));
        Some(Confirms { requests })
    }

    /// Whether the collector still runs: it ends with its runtime.
    pub(super) fn is_alive(&self) -> bool {
        !self.requests.is_closed()
    }

    /// Publishes `publish` on the channel, even if the caller stops waiting. The receiver gets
    /// its outcome, or is closed if the collector is gone (its runtime ended).
    pub(super) fn publish(&self, publish: Publish) -> oneshot::Receiver<Outcome> {
        let (reply, outcome) = oneshot::channel();
        // If the collector is gone, `reply` is dropped with the request: the receiver closes.
        let key = publish.key();
        let _ = self.requests.send(Request {
            publish,
            key,
            reply,
        });
        outcome
    }
}

type Written = (Request, lapin::Result<lapin::PublisherConfirm>);
type Completed = (Request, lapin::Result<Confirmation>);

/// The collector's state besides its futures.
#[derive(Default)]
struct Ledger {
    /// Returns not claimed yet. Each can be claimed by a publish in `pending` (the others are
    /// dropped), so there are never more than publishes in flight.
    returns: VecDeque<BasicReturnMessage>,
    /// Publishes received whose confirm has not completed (being written, or written), by
    /// [`Publish::key`]: who may still claim a return.
    pending: HashMap<u64, u32>,
    /// Confirms without a return of their own, held while returns wait for their publishes.
    deferred: Vec<Completed>,
}

async fn collect(channel: Channel, mut incoming: mpsc::UnboundedReceiver<Request>) {
    let mut writing: FuturesUnordered<BoxFuture<'static, Written>> = FuturesUnordered::new();
    let mut confirming: FuturesUnordered<BoxFuture<'static, Completed>> = FuturesUnordered::new();
    let mut ledger = Ledger::default();
    let mut open = true;
    loop {
        tokio::select! {
            request = incoming.recv(), if open => match request {
                Some(request) => {
                    ledger.received(&request);
                    writing.push(write(&channel, request));
                }
                None => open = false,
            },
            Some(written) = writing.next(), if !writing.is_empty() => {
                ledger.written(written, &mut confirming);
            }
            Some(first) = confirming.next(), if !confirming.is_empty() => {
                let mut batch = vec![first];
                // Every publish written so far, then every confirm completed so far, until
                // neither has more twice in a row, with a yield between: `FuturesUnordered`
                // can answer `Pending` short of what is ready (its queue caught mid-update,
                // or its cooperative yield), waking itself to be asked again.
                let mut quiet = 0;
                while quiet < 2 {
                    let mut more = false;
                    while let Some(Some(written)) = writing.next().now_or_never() {
                        ledger.written(written, &mut confirming);
                        more = true;
                    }
                    while let Some(Some(completed)) = confirming.next().now_or_never() {
                        batch.push(completed);
                        more = true;
                    }
                    if more {
                        quiet = 0;
                    } else {
                        quiet += 1;
                        if quiet < 2 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
                ledger.settle(batch);
            }
            else => return,
        }
    }
}

/// Starts writing `request`'s message; the future ends when it is on the socket.
fn write(channel: &Channel, request: Request) -> BoxFuture<'static, Written> {
    let channel = channel.clone();
    async move {
        let publish = &request.publish;
        let written = channel
            .basic_publish(
                publish.exchange.clone(),
                publish.routing_key.clone(),
                publish.options,
                &publish.body,
                publish.properties.clone(),
            )
            .await;
        (request, written)
    }
    .boxed()
}

impl Ledger {
    /// Which waiting return is `publish`'s: one it [owns](Publish::owns), with its headers if
    /// there is a choice.
    fn claim(&self, publish: &Publish) -> Option<usize> {
        let same_headers = |r: &BasicReturnMessage| {
            r.delivery.properties.headers() == publish.properties.headers()
        };
        let mut owned = self
            .returns
            .iter()
            .enumerate()
            .filter(|(_, r)| publish.owns(r));
        let first = owned.next()?;
        Some(
            std::iter::once(first)
                .chain(owned)
                .find(|(_, r)| same_headers(r))
                .unwrap_or(first)
                .0,
        )
    }

    /// A publish was received: until its confirm completes, it may claim a return.
    fn received(&mut self, request: &Request) {
        *self.pending.entry(request.key).or_default() += 1;
    }

    /// A publish's confirm completed, or it was not written: it claims no more returns.
    fn done(&mut self, request: &Request) {
        let key = request.key;
        if let Some(n) = self.pending.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&key);
            }
        }
    }

    /// A publish was written: await its confirm, or tell it that it could not be written.
    fn written(
        &mut self,
        (request, written): Written,
        confirming: &mut FuturesUnordered<BoxFuture<'static, Completed>>,
    ) {
        match written {
            Ok(confirm) => {
                confirming.push(confirm.map(move |outcome| (request, outcome)).boxed());
            }
            Err(e) => {
                self.done(&request);
                // The publish may have given up waiting (dropped): nothing to tell.
                let _ = request.reply.send(Outcome::NotSent(e));
            }
        }
    }

    /// Gives each completed confirm of `batch`, and each deferred one, its own return, and
    /// settles those it can (see the module docs).
    fn settle(&mut self, mut batch: Vec<Completed>) {
        for (request, outcome) in &mut batch {
            self.done(request);
            if let Some(returned) = slot(outcome).and_then(Option::take) {
                self.returns.push_back(returned);
            }
        }
        batch.append(&mut self.deferred);
        let mut unclaimed = Vec::new();
        for (request, mut outcome) in batch {
            let Some(slot) = slot(&mut outcome) else {
                self.send(request, outcome);
                continue;
            };
            match self.claim(&request.publish) {
                Some(at) => {
                    *slot = self.returns.remove(at);
                    self.send(request, outcome);
                }
                None => unclaimed.push((request, outcome)),
            }
        }
        // A return that no publish still awaiting its confirm can claim: its own publish
        // completed already (with another return, or none).
        let pending = &self.pending;
        self.returns.retain(|orphan| {
            let claimable = pending.get(&return_key(orphan)).is_some_and(|n| *n > 0);
            if !claimable {
                error!(
                    exchange = %orphan.delivery.exchange,
                    routing_key = %orphan.delivery.routing_key,
                    "the broker returned a message that matches no publish waiting for its confirm"
                );
            }
            claimable
        });
        if self.returns.is_empty() {
            for (request, outcome) in unclaimed {
                self.send(request, outcome);
            }
        } else {
            self.deferred = unclaimed;
        }
    }

    /// Settles a publish: tells it its outcome.
    fn send(&self, request: Request, outcome: lapin::Result<Confirmation>) {
        // The publish may have given up waiting (dropped): nothing to tell.
        let _ = request.reply.send(Outcome::Confirmed(Box::new(outcome)));
    }
}

/// Where a confirm carries its returned message.
fn slot(outcome: &mut lapin::Result<Confirmation>) -> Option<&mut Option<BasicReturnMessage>> {
    match outcome {
        Ok(Confirmation::Ack(returned) | Confirmation::Nack(returned)) => Some(returned),
        Ok(Confirmation::NotRequested) | Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::message::Delivery;

    use super::*;

    fn publish(body: &str) -> (Request, oneshot::Receiver<Outcome>) {
        let (reply, outcome) = oneshot::channel();
        let publish = Publish {
            exchange: "x".into(),
            routing_key: "k".into(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            options: BasicPublishOptions::default(),
            properties: BasicProperties::default(),
        };
        let key = publish.key();
        (
            Request {
                publish,
                key,
                reply,
            },
            outcome,
        )
    }

    fn returned(body: &str) -> BasicReturnMessage {
        BasicReturnMessage {
            delivery: Delivery::mock(0, "x".into(), "k".into(), false, body.as_bytes().to_vec()),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    fn written(ledger: &mut Ledger, request: &Request) {
        ledger.received(request);
    }

    /// The return its publish was told, `None` for routed, or "waiting".
    fn told(outcome: &mut oneshot::Receiver<Outcome>) -> Option<Option<String>> {
        match outcome.try_recv().ok()? {
            Outcome::Confirmed(confirmed) => match *confirmed {
                Ok(Confirmation::Ack(back)) => {
                    Some(back.map(|r| String::from_utf8_lossy(&r.delivery.data).into_owned()))
                }
                _ => None,
            },
            Outcome::NotSent(_) => None,
        }
    }

    #[test]
    fn a_confirm_holding_another_return_waits_for_its_own() {
        // One `multiple` ack covers X, Z and Y; both X and Z were returned. lapin completes Z
        // first, with X's return, then X, with Z's, then Y, with none; the collector wakes
        // after Z alone.
        let mut ledger = Ledger::default();
        let ((x, mut x_told), (z, mut z_told), (y, mut y_told)) =
            (publish("X"), publish("Z"), publish("Y"));
        for request in [&x, &z, &y] {
            written(&mut ledger, request);
        }
        ledger.settle(vec![(z, Ok(Confirmation::Ack(Some(returned("X")))))]);
        assert_eq!(told(&mut z_told), None, "Z waits: X's return is X's");
        ledger.settle(vec![
            (x, Ok(Confirmation::Ack(Some(returned("Z"))))),
            (y, Ok(Confirmation::Ack(None))),
        ]);
        assert_eq!(told(&mut x_told), Some(Some("X".to_owned())));
        assert_eq!(told(&mut z_told), Some(Some("Z".to_owned())));
        assert_eq!(told(&mut y_told), Some(None), "routed");
        assert!(ledger.returns.is_empty() && ledger.deferred.is_empty());
    }

    #[test]
    fn a_return_is_claimed_though_the_broker_added_a_header() {
        let mut ledger = Ledger::default();
        let (a, mut a_told) = publish("A");
        written(&mut ledger, &a);
        let mut back = returned("A");
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "timestamp_in_ms".into(),
            lapin::types::AMQPValue::LongLongInt(1),
        );
        back.delivery.properties = BasicProperties::default().with_headers(headers);
        ledger.settle(vec![(a, Ok(Confirmation::Ack(Some(back))))]);
        assert_eq!(told(&mut a_told), Some(Some("A".to_owned())));
    }

    #[test]
    fn a_return_no_pending_publish_can_claim_holds_nobody_up() {
        let mut ledger = Ledger::default();
        let (a, mut a_told) = publish("A");
        written(&mut ledger, &a);
        // A return for a publish that was settled already (or never made here).
        ledger.settle(vec![(a, Ok(Confirmation::Ack(Some(returned("gone")))))]);
        assert_eq!(told(&mut a_told), Some(None));
        assert!(ledger.returns.is_empty() && ledger.deferred.is_empty());
    }
}
