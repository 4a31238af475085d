//! Coalesces concurrent state writes of one [`RedisBackend`] (and its clones) into shared runs
//! of the guarded write script, as the brokers coalesce acknowledgements.
//!
//! A worker running many tasks at once writes STARTED and then SUCCESS for each. Sent one by
//! one, every write is a round trip and a script call of its own, and that per-command cost on
//! both sides, not the script's work, bounds the drain. Here at most [`FLUSHERS`] writes or
//! batches are in flight. A write that finds room and nothing queued is made at once by its
//! caller, so a lone write costs one round trip as before. Any other write joins a queue, and
//! a flusher task takes everything queued (up to [`MAX_BATCH`]) and writes it in one round
//! trip, while the next batch gathers. Flushers are started when a write in flight ends with
//! writes queued, and end when the queue is empty: nothing runs while the backend is idle.
//!
//! A write made at once is made by its caller's future: until that future is polled to the
//! end (or dropped), the writes queued behind it wait. A worker polls its deliveries all the
//! time; code that keeps a `set_state` future unpolled holds up the backend's other writes.
//!
//! Every write keeps its own outcome: it is encoded by its caller (a state that cannot be
//! encoded fails alone), the script writes and guards each key on its own, and each caller
//! gets its own reply. A batch that fails fails each of its writes with the same error, which
//! the worker retries like any other ([`Error::is_retryable`]). A flusher dropped with its
//! runtime fails the writes it leaves queued, when no other writer is left to take them,
//! instead of stranding them.

use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::future::Either;

use tokio::sync::oneshot;

use super::redis::{Encoded, RedisBackend};
use crate::error::{Error, ErrorKind, Result};

/// The most writes one batch carries (the script runs over them in chunks, pipelined).
pub(super) const MAX_BATCH: usize = 1_000;

/// The most bytes one batch carries (a write larger than this goes alone), so that a batch of
/// large results stays far from the server's query buffer limit and within one reply timeout.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// The most writes or batches in flight at once. One: while it is in flight the next batch
/// gathers, so batches grow with the load and the round trip (`state_bench 20000 16`, 16 tasks
/// at once: 28,000 tasks/s and 15.5 us of client CPU per task with one, 21,000-25,600 and
/// 23-28 us with two; the drain with Redis results, in place, 7% faster).
const FLUSHERS: usize = 1;

/// What the write script returned for one write: whether it wrote, the stored record and the
/// state name it read from it.
pub(super) type Reply = [redis::Value; 3];

/// The writes waiting for a flusher, shared by a backend and its clones.
#[derive(Default)]
pub(super) struct Batcher {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Job>,
    /// Flushers running.
    flushers: usize,
}

struct Job {
    state: Encoded,
    reply: oneshot::Sender<Result<Reply>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl Batcher {
    /// Writes `state`: at once when fewer than [`FLUSHERS`] writes or batches are in flight,
    /// else in the next batch.
    ///
    /// Not an `async fn`: the choice is made here, and the future returned is only what waits.
    /// Await it at once: the write has taken its place (or the lead) when this returns.
    /// A write in the next batch (almost every one, under load) waits on its answer alone, a
    /// future of a few bytes; the write made at once is a box of its own. As an `async fn`,
    /// every write's future held the state three times over and the one made at once besides
    /// (7.8 KiB, then 576 bytes with that part boxed), and each task's `start` and `record`
    /// box that future.
    pub(super) fn write<'a>(
        self: &'a Arc<Self>,
        backend: &'a RedisBackend,
        state: Encoded,
    ) -> impl Future<Output = Result<Reply>> + Send + 'a {
        let (reply, answer) = oneshot::channel();
        let (now, start) = {
            let mut queue = lock(&self.queue);
            let room = queue.flushers < FLUSHERS;
            if room {
                queue.flushers += 1;
            }
            if room && queue.pending.is_empty() {
                (Some(state), false)
            } else {
                queue.pending.push(Job { state, reply });
                (None, room)
            }
        };
        if start {
            self.spawn_flusher(backend);
        }
        match now {
            // Nothing is waiting and there is room: write it now, and on the way out (also
            // when this future is dropped, polled or not) hand what gathered meanwhile to a
            // flusher.
            Some(state) => {
                let lead = Lead {
                    batcher: self,
                    backend,
                };
                Either::Left(Box::pin(async move {
                    let _lead = lead;
                    let mut values = backend
                        .write_encoded(std::slice::from_ref(&state), true, WHAT)
                        .await?
                        .into_iter();
                    match (values.next(), values.next(), values.next()) {
                        (Some(written), Some(old), Some(stored)) => Ok([written, old, stored]),
                        _ => Err(backend.unexpected_reply(WHAT)),
                    }
                }))
            }
            None => Either::Right(async move { answer.await.unwrap_or_else(|_| Err(cancelled())) }),
        }
    }

    /// The next batch, or `None` (and this flusher is counted out) when nothing is queued.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut queue = lock(&self.queue);
        if queue.pending.is_empty() {
            queue.flushers = queue.flushers.saturating_sub(1);
            return None;
        }
        let mut take = 0;
        let mut bytes = 0;
        for job in queue.pending.iter().take(MAX_BATCH) {
            bytes += job.state.len();
            if take > 0 && bytes > MAX_BATCH_BYTES {
                break;
            }
            take += 1;
        }
        let rest = queue.pending.split_off(take);
        Some(std::mem::replace(&mut queue.pending, rest))
    }

    /// Counts a writer out; if writes are queued and there is room, starts a flusher for them.
    fn release(self: &Arc<Self>, backend: &RedisBackend) {
        let start = {
            let mut queue = lock(&self.queue);
            queue.flushers = queue.flushers.saturating_sub(1);
            let start = !queue.pending.is_empty() && queue.flushers < FLUSHERS;
            if start {
                queue.flushers += 1;
            }
            start
        };
        if start {
            self.spawn_flusher(backend);
        }
    }

    /// Starts a flusher, already counted in. Outside a runtime (a write future dropped
    /// there), it is counted out at once and fails what it would have flushed.
    fn spawn_flusher(self: &Arc<Self>, backend: &RedisBackend) {
        // Made before the task: if the runtime drops the task unstarted, it still counts out.
        let flusher = Flusher {
            batcher: Arc::clone(self),
            done: false,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(flush(backend.clone(), flusher)));
        }
    }
}

const WHAT: &str = "store task state";

/// A write made at once; see [`Batcher::release`].
struct Lead<'a> {
    batcher: &'a Arc<Batcher>,
    backend: &'a RedisBackend,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.batcher.release(self.backend);
    }
}

/// Writes batches until the queue is empty.
async fn flush(backend: RedisBackend, mut flusher: Flusher) {
    while let Some(jobs) = flusher.batcher.next_batch() {
        // A write whose caller stopped waiting is not made: like a write never sent, and so
        // that it cannot land after a later write of the same task.
        let (states, replies): (Vec<Encoded>, Vec<_>) = jobs
            .into_iter()
            .filter(|job| !job.reply.is_closed())
            .map(|job| (job.state, job.reply))
            .unzip();
        if states.is_empty() {
            continue;
        }
        match backend.write_encoded(&states, true, WHAT).await {
            Ok(values) => {
                let mut values = values.into_iter();
                for reply in replies {
                    let answer = match (values.next(), values.next(), values.next()) {
                        (Some(written), Some(old), Some(stored)) => Ok([written, old, stored]),
                        _ => Err(backend.unexpected_reply(WHAT)),
                    };
                    // A caller that stopped waiting does not need its answer.
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::new(e.kind(), e.message())));
                }
            }
        }
    }
    flusher.done = true;
}

/// A flusher task's count. Dropped before it finished (its runtime shut down, or never
/// started it), it counts the flusher out and, if no other writer is left to take them,
/// fails the writes still queued: a caller on another runtime retries instead of waiting
/// forever.
struct Flusher {
    batcher: Arc<Batcher>,
    done: bool,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let stranded = {
            let mut queue = lock(&self.batcher.queue);
            queue.flushers = queue.flushers.saturating_sub(1);
            if queue.flushers == 0 {
                std::mem::take(&mut queue.pending)
            } else {
                Vec::new()
            }
        };
        for job in stranded {
            let _ = job.reply.send(Err(cancelled()));
        }
    }
}

fn cancelled() -> Error {
    Error::new(
        ErrorKind::Backend,
        "the state write was cancelled (its flusher's runtime shut down)",
    )
}

/// The queue's lock; a panic while it was held cannot leave it inconsistent (every change is
/// one push or one split), so a poisoned lock is used as it is.
fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
