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
//! its own: the one with its exchange, routing key and body. The broker sends a message's
//! return before its ack, and acks only what it received: by the time any confirm that holds a
//! publish's return completes, that publish was written, so the collector holds its confirm
//! too, and the return is handed over no later than the publish's own confirm completes. A
//! return whose owner's confirm has not completed yet waits in the collector until it does.

use std::collections::VecDeque;

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
            && returned.delivery.data[..] == self.body[..]
    }
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
    /// Starts the collector of `channel`, on the current Tokio runtime.
    pub(super) fn start(channel: Channel) -> Confirms {
        let (requests, incoming) = mpsc::unbounded_channel();
        tokio::spawn(collect(channel, incoming));
        Confirms { requests }
    }

    /// Publishes `publish` on the channel. The receiver gets its outcome, or is closed if the
    /// collector is gone (its runtime ended).
    pub(super) fn publish(&self, publish: Publish) -> oneshot::Receiver<Outcome> {
        let (reply, outcome) = oneshot::channel();
        // If the collector is gone, `reply` is dropped with the request: the receiver closes.
        let _ = self.requests.send(Request { publish, reply });
        outcome
    }
}

type Written = (Request, lapin::Result<lapin::PublisherConfirm>);
type Completed = (Request, lapin::Result<Confirmation>);

async fn collect(channel: Channel, mut incoming: mpsc::UnboundedReceiver<Request>) {
    let mut writing: FuturesUnordered<BoxFuture<'static, Written>> = FuturesUnordered::new();
    let mut confirming: FuturesUnordered<BoxFuture<'static, Completed>> = FuturesUnordered::new();
    let mut returns = VecDeque::new();
    let mut open = true;
    loop {
        tokio::select! {
            request = incoming.recv(), if open => match request {
                Some(request) => writing.push(write(&channel, request)),
                None => open = false,
            },
            Some(written) = writing.next(), if !writing.is_empty() => {
                take_written(written, &mut confirming);
            }
            Some(first) = confirming.next(), if !confirming.is_empty() => {
                let mut batch = vec![first];
                // Every publish written so far, then every confirm completed so far, until
                // neither has more: a confirm holding a return completes after the return's
                // publish was written.
                loop {
                    let mut more = false;
                    while let Some(Some(written)) = writing.next().now_or_never() {
                        take_written(written, &mut confirming);
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
                settle(batch, &mut returns);
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

/// A publish was written: await its confirm, or tell it that it could not be written.
fn take_written(
    (request, written): Written,
    confirming: &mut FuturesUnordered<BoxFuture<'static, Completed>>,
) {
    match written {
        Ok(confirm) => confirming.push(confirm.map(move |outcome| (request, outcome)).boxed()),
        Err(e) => {
            // The publish may have given up waiting (dropped): nothing to tell.
            let _ = request.reply.send(Outcome::NotSent(e));
        }
    }
}

/// Gives each completed confirm of `batch` its own return, from the batch's returns and those
/// kept from earlier batches (`returns`), and sends it to its publish.
fn settle(mut batch: Vec<Completed>, returns: &mut VecDeque<BasicReturnMessage>) {
    for (_, outcome) in &mut batch {
        if let Some(returned) = slot(outcome).and_then(Option::take) {
            returns.push_back(returned);
        }
    }
    for (request, mut outcome) in batch {
        if let Some(slot) = slot(&mut outcome) {
            if let Some(at) = returns.iter().position(|r| request.publish.owns(r)) {
                *slot = returns.remove(at);
            }
        }
        // The publish may have given up waiting (dropped): nothing to tell.
        let _ = request.reply.send(Outcome::Confirmed(Box::new(outcome)));
    }
    while returns.len() > MAX_WAITING_RETURNS {
        if let Some(orphan) = returns.pop_front() {
            error!(
                exchange = %orphan.delivery.exchange,
                routing_key = %orphan.delivery.routing_key,
                "the broker returned a message that matches no publish waiting for its confirm"
            );
        }
    }
}

/// Where a confirm carries its returned message.
fn slot(outcome: &mut lapin::Result<Confirmation>) -> Option<&mut Option<BasicReturnMessage>> {
    match outcome {
        Ok(Confirmation::Ack(returned) | Confirmation::Nack(returned)) => Some(returned),
        Ok(Confirmation::NotRequested) | Err(_) => None,
    }
}
