//! The operator's calls on RabbitMQ ([`Admin`](crate::admin::Admin)): queue depths by
//! passive declare, the dead-letter queue read with `basic.get` (unacknowledged: closing the
//! channel puts the messages back, in order), requeue and purge. Each call opens a channel of
//! its own and closes it. Passive declarations, which a missing queue refuses (closing the
//! channel, whose number lapin then keeps), go over the broker's inspection connection
//! (`Inner::inspect`); reads and purges of a queue found there, over the main one.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::AMQPValue;
use lapin::Channel;

use super::{short, AmqpBroker};
use crate::admin::{
    describe, Admin, DeadLetter, Page, Paged, Progress, QueueInfo, RequeueReport, Selection,
};
use crate::error::{Error, Result};
use crate::wire::Signature;

/// How many dead letters one listing takes off the queue at most (offset included).
const MAX_SCAN: usize = 10_000;

/// The header the dead-letter publish puts the reason in.
const REASON_HEADER: &str = "x-machinery-reason";
/// The header naming the queue a dead letter came from.
const SOURCE_HEADER: &str = "x-machinery-source-queue";

impl AmqpBroker {
    /// A channel on the main connection, for reading or purging a queue known to exist.
    async fn admin_channel(&self) -> Result<Channel> {
        let link = self.inner.link().await?;
        super::recycle::open_channel(&link.connection)
            .await
            .map_err(|e| self.inner.broker_error("cannot open a channel", e))
    }

    /// `(messages, consumers)` of `queue`, or `None` if it does not exist. Asked on the
    /// inspection connection: a missing queue closes the channel that asked, and lapin keeps
    /// its number.
    async fn passive(&self, queue: &str) -> Result<Option<(u64, u64)>> {
        let name = short("queue name", queue)?;
        let (channel, losses) = self.inner.inspect_channel().await?;
        // NOT_FOUND is no queue; anything else that closed the channel is the same answer for
        // an operator (the queue cannot be read).
        let counts = super::passive_declare(&channel, name, &losses)
            .await
            .map_err(|e| {
                self.inner
                    .broker_error(&format!("cannot inspect queue `{queue}`"), e)
            })?;
        Ok(counts.map(|(ready, consumers)| (u64::from(ready), u64::from(consumers))))
    }

    /// The next message of the dead-letter queue `dlq`, taken without acknowledging it (closing
    /// `channel` gives it back).
    async fn get_unacked(
        &self,
        channel: &Channel,
        dlq: &str,
    ) -> Result<Option<lapin::message::BasicGetMessage>> {
        channel
            .basic_get(short("queue name", dlq)?, BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| {
                self.inner
                    .broker_error("cannot read the dead-letter queue", e)
            })
    }

    pub(crate) async fn admin_queue(&self, queue: &str) -> Result<QueueInfo> {
        let main = self.passive(queue).await?;
        let dead = self.passive(&AmqpBroker::dead_letter_queue(queue)).await?;
        Ok(QueueInfo {
            name: queue.to_owned(),
            depth: main.map_or(0, |m| m.0),
            consumers: main.map_or(0, |m| m.1),
            unsettled: None,
            dead_letters: dead.map_or(0, |d| d.0),
            exists: main.is_some(),
        })
    }

    pub(crate) async fn admin_dead_letters(
        &self,
        queue: &str,
        page: Page,
    ) -> Result<Paged<DeadLetter>> {
        let dlq = AmqpBroker::dead_letter_queue(queue);
        let Some((total, _)) = self.passive(&dlq).await? else {
            return Ok(Paged {
                items: Vec::new(),
                total: Some(0),
                next: None,
            });
        };
        let limit = page.capped_limit();
        let end = page.offset.saturating_add(limit).min(MAX_SCAN);
        let channel = self.admin_channel().await?;
        let mut items = Vec::new();
        let mut taken = 0usize;
        while taken < end {
            let got = self.get_unacked(&channel, &dlq).await?;
            let Some(got) = got else { break };
            taken += 1;
            if taken > page.offset {
                let delivery = got.delivery;
                let reason = header(&delivery.properties, REASON_HEADER).unwrap_or_default();
                items.push(describe(queue, &bytes::Bytes::from(delivery.data), reason));
            }
        }
        // Unacknowledged: closing the channel gives them back, in their order.
        let _ = channel.close(200, "listed".into()).await;
        Ok(Paged::of(items, total, page, limit))
    }

    pub(crate) async fn admin_requeue(
        &self,
        admin: &Admin,
        queue: &str,
        which: &Selection,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<RequeueReport> {
        let dlq = AmqpBroker::dead_letter_queue(queue);
        let mut report = RequeueReport::default();
        let Some((count, _)) = self.passive(&dlq).await? else {
            if let Selection::Ids(ids) = which {
                report.not_found.clone_from(ids);
            }
            return Ok(report);
        };
        let mut wanted: Vec<String> = match which {
            Selection::All => Vec::new(),
            Selection::Ids(ids) => ids.clone(),
        };
        let total = match which {
            Selection::All => count,
            Selection::Ids(ids) => u64::try_from(ids.len()).unwrap_or(u64::MAX),
        };
        let channel = self.admin_channel().await?;
        let mut done = 0u64;
        // Only the messages there at the start: one dead-lettered again meanwhile is not
        // taken twice.
        for _ in 0..count {
            if matches!(which, Selection::Ids(_)) && wanted.is_empty() {
                break;
            }
            let got = self.get_unacked(&channel, &dlq).await?;
            let Some(got) = got else { break };
            let delivery = got.delivery;
            let body = bytes::Bytes::from(delivery.data);
            let source = header(&delivery.properties, SOURCE_HEADER)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| queue.to_owned());
            let letter = describe(queue, &body, String::new());
            let selected = match which {
                Selection::All => true,
                Selection::Ids(_) => match wanted.iter().position(|id| *id == letter.id) {
                    Some(i) => {
                        wanted.swap_remove(i);
                        true
                    }
                    None => false,
                },
            };
            if !selected {
                continue;
            }
            match letter.signature {
                Some(signature) => {
                    send_and_ack(admin, &source, signature, &channel, delivery.delivery_tag)
                        .await?;
                    report.requeued += 1;
                }
                None => report.skipped += 1,
            }
            done += 1;
            progress(Progress {
                done,
                total: Some(total),
            });
        }
        let _ = channel.close(200, "requeued".into()).await;
        report.not_found = wanted;
        Ok(report)
    }

    /// Purges `queue`; 0 when it does not exist.
    pub(crate) async fn admin_purge(&self, queue: &str) -> Result<u64> {
        if self.passive(queue).await?.is_none() {
            return Ok(0);
        }
        let channel = self.admin_channel().await?;
        let purged = channel
            .queue_purge(short("queue name", queue)?, QueuePurgeOptions::default())
            .await
            .map_err(|e| {
                self.inner
                    .broker_error(&format!("cannot purge queue `{queue}`"), e)
            })?;
        let _ = channel.close(200, "purged".into()).await;
        Ok(u64::from(purged))
    }
}

/// Publishes the signature again, then acknowledges the dead letter (at least once: a crash
/// in between leaves both).
async fn send_and_ack(
    admin: &Admin,
    source: &str,
    signature: Signature,
    channel: &Channel,
    tag: u64,
) -> Result<()> {
    admin.send_again(source, signature).await?;
    channel
        .basic_ack(tag, BasicAckOptions::default())
        .await
        .map_err(|e| {
            Error::new(
                crate::ErrorKind::Broker,
                format!("cannot remove a requeued dead letter: {e}"),
            )
        })
}

fn header(properties: &lapin::BasicProperties, key: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
