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
//! its own: the one with its exchange, routing key, headers and body. The broker sends a
//! message's return before its ack, and acks only what it received, so when a confirm holding
//! a publish's return completes, the collector already holds that publish.
//!
//! A confirm without a return of its own is settled as routed only when no return is waiting
//! for a publish still pending: lapin completes the confirms of one `multiple` ack one by one,
//! and the collector may wake between two of them, seeing the confirm that holds another's
//! return before the one that holds its own. Such a confirm waits (deferred) until the returns
//! are claimed. A return that no pending publish can claim (its publish already settled) is
//! dropped with an error.

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

/// Returned messages kept for a publish whose confirm has not completed; beyond this many the
/// oldest is dropped (with an error: it matched no publish).
const MAX_WAITING_RETURNS: usize = 1024;

/// A message to publish, as its return, if any, would carry it.
pub(super) struct Publish {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) body: Bytes,
    pub(super) options: BasicPublishOptions,
    pub(super) properties: BasicProperties,
}

impl Publish {
    fn owns(&self, returned: &BasicReturnMessage) -> bool {
        returned.delivery.exchange == self.exchange
            && returned.delivery.routing_key == self.routing_key
            && returned.delivery.properties.headers() == self.properties.headers()
            && returned.delivery.data[..] == self.body[..]
    }

    /// What [`owns`](Self::owns) compares but the headers, hashed: which returns a pending
    /// publish may claim.
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
        let _ = self.requests.send(Request { publish, reply });
        outcome
    }
}

type Written = (Request, lapin::Result<lapin::PublisherConfirm>);
type Completed = (Request, lapin::Result<Confirmation>);

/// The collector's state besides its futures.
#[derive(Default)]
struct Ledger {
    /// Returns not claimed yet.
    returns: VecDeque<BasicReturnMessage>,
    /// Publishes written whose confirm has not completed, by [`Publish::key`]: who may still
    /// claim a return.
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
                Some(request) => writing.push(write(&channel, request)),
                None => open = false,
            },
            Some(written) = writing.next(), if !writing.is_empty() => {
                ledger.written(written, &mut confirming);
            }
            Some(first) = confirming.next(), if !confirming.is_empty() => {
                let mut batch = vec![first];
                // Every publish written so far, then every confirm completed so far, until
                // neither has more.
                loop {
                    let mut more = false;
                    while let Some(Some(written)) = writing.next().now_or_never() {
                        ledger.written(written, &mut confirming);
                        more = true;
                    }
                    while let Some(Some(completed)) = confirming.next().now_or_never() {
                        batch.push(completed);
                        more = true;
                    }
                    if !more {
                        break;
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
    /// A publish was written: await its confirm, or tell it that it could not be written.
    fn written(
        &mut self,
        (request, written): Written,
        confirming: &mut FuturesUnordered<BoxFuture<'static, Completed>>,
    ) {
        match written {
            Ok(confirm) => {
                *self.pending.entry(request.publish.key()).or_default() += 1;
                confirming.push(confirm.map(move |outcome| (request, outcome)).boxed());
            }
            Err(e) => {
                // The publish may have given up waiting (dropped): nothing to tell.
                let _ = request.reply.send(Outcome::NotSent(e));
            }
        }
    }

    /// Gives each completed confirm of `batch`, and each deferred one, its own return, and
    /// settles those it can (see the module docs).
    fn settle(&mut self, mut batch: Vec<Completed>) {
        for (request, outcome) in &mut batch {
            let key = request.publish.key();
            if let Some(n) = self.pending.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.pending.remove(&key);
                }
            }
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
            match self.returns.iter().position(|r| request.publish.owns(r)) {
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
        while self.returns.len() > MAX_WAITING_RETURNS {
            self.returns.pop_front();
            error!("too many returned messages wait for their publishes; dropping the oldest");
        }
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
        (Request { publish, reply }, outcome)
    }

    fn returned(body: &str) -> BasicReturnMessage {
        BasicReturnMessage {
            delivery: Delivery::mock(0, "x".into(), "k".into(), false, body.as_bytes().to_vec()),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    fn written(ledger: &mut Ledger, request: &Request) {
        *ledger.pending.entry(request.publish.key()).or_default() += 1;
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
