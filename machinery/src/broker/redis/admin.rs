//! The operator's calls on the Redis broker ([`Admin`](crate::admin::Admin)): list lengths,
//! the dead-letter list with its reasons hash, requeue and purge, on the keys the broker's
//! scripts maintain ([`RedisBroker::dead_letter_list`], [`RedisBroker::dead_letter_reasons`]).

use redis::Value;

use super::{sha1_hex, Keys, RedisBroker};
use crate::admin::{
    describe, Admin, DeadLetter, Page, Paged, Progress, QueueInfo, RequeueReport, Selection,
};
use crate::error::Result;

/// How many dead letters one read of the list takes while requeueing.
const CHUNK: usize = 100;

impl RedisBroker {
    pub(crate) async fn admin_queue(&self, queue: &str) -> Result<QueueInfo> {
        let (depth, unsettled) = self.depth(queue).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("SCARD").arg(Keys::consumers_of(queue));
        pipe.cmd("LLEN").arg(RedisBroker::dead_letter_list(queue));
        let (consumers, dead_letters): (u64, u64) = {
            let replies = self.shared.query_pipe(&pipe, "read a queue").await?;
            let mut n = replies.into_iter().map(|v| match v {
                Value::Int(n) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            });
            (n.next().unwrap_or(0), n.next().unwrap_or(0))
        };
        Ok(QueueInfo {
            name: queue.to_owned(),
            depth: u64::try_from(depth).unwrap_or(u64::MAX),
            consumers,
            unsettled: Some(u64::try_from(unsettled).unwrap_or(u64::MAX)),
            dead_letters,
            exists: true,
        })
    }

    pub(crate) async fn admin_dead_letters(
        &self,
        queue: &str,
        page: Page,
    ) -> Result<Paged<DeadLetter>> {
        let total: u64 = self
            .shared
            .query(
                redis::cmd("LLEN").arg(RedisBroker::dead_letter_list(queue)),
                "read a dead-letter list",
            )
            .await?;
        let limit = page.capped_limit();
        let items: Vec<DeadLetter> = self
            .dead_letters_range(queue, page.offset, limit)
            .await?
            .into_iter()
            .map(|(body, reason)| describe(queue, &body, reason))
            .collect();
        Ok(Paged::of(items, total, page, limit))
    }

    pub(crate) async fn admin_requeue(
        &self,
        admin: &Admin,
        queue: &str,
        which: &Selection,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<RequeueReport> {
        let list = RedisBroker::dead_letter_list(queue);
        let reasons = RedisBroker::dead_letter_reasons(queue);
        let count: usize = self
            .shared
            .query(redis::cmd("LLEN").arg(&list), "read a dead-letter list")
            .await?;
        let mut wanted: Vec<String> = match which {
            Selection::All => Vec::new(),
            Selection::Ids(ids) => ids.clone(),
        };
        let total = match which {
            Selection::All => u64::try_from(count).unwrap_or(u64::MAX),
            Selection::Ids(ids) => u64::try_from(ids.len()).unwrap_or(u64::MAX),
        };
        let mut report = RequeueReport::default();
        let (mut index, mut examined, mut done) = (0usize, 0usize, 0u64);
        // Only the messages there at the start: one dead-lettered again meanwhile (at the
        // tail) is not taken twice.
        'scan: while examined < count {
            if matches!(which, Selection::Ids(_)) && wanted.is_empty() {
                break;
            }
            let chunk = self
                .dead_letters_range(queue, index, CHUNK.min(count - examined))
                .await?;
            if chunk.is_empty() {
                break;
            }
            for (body, _) in chunk {
                examined += 1;
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
                match (selected, letter.signature) {
                    (true, Some(signature)) => {
                        admin.send_again(queue, signature).await?;
                        let mut pipe = redis::pipe();
                        pipe.cmd("LREM").arg(&list).arg(1).arg(&body[..]);
                        pipe.cmd("HDEL").arg(&reasons).arg(sha1_hex(&body));
                        self.shared
                            .query_pipe(&pipe, "remove a requeued dead letter")
                            .await?;
                        report.requeued += 1;
                        done += 1;
                        progress(Progress {
                            done,
                            total: Some(total),
                        });
                        // The list moved up by one: re-read from the same index.
                        continue 'scan;
                    }
                    (true, None) => {
                        report.skipped += 1;
                        done += 1;
                        progress(Progress {
                            done,
                            total: Some(total),
                        });
                        index += 1;
                    }
                    (false, _) => index += 1,
                }
            }
        }
        report.not_found = wanted;
        Ok(report)
    }

    pub(crate) async fn admin_purge_dead_letters(&self, queue: &str) -> Result<u64> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("LLEN").arg(RedisBroker::dead_letter_list(queue));
        pipe.cmd("DEL")
            .arg(RedisBroker::dead_letter_list(queue))
            .arg(RedisBroker::dead_letter_reasons(queue));
        first_count(
            self.shared
                .query_pipe(&pipe, "purge a dead-letter list")
                .await?,
        )
    }

    pub(crate) async fn admin_purge(&self, queue: &str) -> Result<u64> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("LLEN").arg(queue);
        pipe.cmd("DEL").arg(queue);
        first_count(self.shared.query_pipe(&pipe, "purge a queue").await?)
    }
}

/// The first reply of a transaction, a count.
fn first_count(replies: Vec<Value>) -> Result<u64> {
    // A MULTI/EXEC pipeline returns the EXEC reply: one array of the replies.
    let replies = match replies.into_iter().next() {
        Some(Value::Array(inner)) => inner,
        Some(other) => vec![other],
        None => Vec::new(),
    };
    Ok(match replies.first() {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    })
}
