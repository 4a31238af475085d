//! One delivery, from its bytes to its settlement.
//!
//! [`process`] decodes the message, counts the [`Attempt`], handles it to an [`Outcome`] and
//! settles it as the [`SettlePolicy`] decides. Handling records STARTED with
//! [`ResultBackend::start`](crate::backend::ResultBackend::start), which also returns what was
//! stored before (a final record whole, any other by its state):
//!
//! - a first delivery of a task some worker already received or finished is a duplicate (a
//!   follow-up sent again after a lost acknowledgement, a publish retried after a lost
//!   confirm): it is acknowledged and not run;
//! - a later delivery of a finished task does not run its body: it only completes what may be
//!   missing (follow-ups, the chord callback, error callbacks), from the stored results;
//! - anything else runs.
//!
//! Success callbacks are encoded and checked before SUCCESS is stored (one that can never be
//! sent makes the task a FAILURE instead); every follow-up's UUID is fixed (derived from the
//! task's own when a producer left it empty), so sending it again sends the same task.
//!
//! A delivery that is counted (see [`policy`](super::policy)) but whose previous delivery never
//! reached the task (it sat in a prefetch buffer when a worker restarted) is not held against
//! the message: the stored state, not the broker's flag, says whether a body ran.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use tracing::{debug, error, info, warn, Instrument as _};

use super::layers::{Admit, Call, Slot};
use super::observe::UNDECODABLE;
use super::policy::{Attempt, Outcome, Settlement, ATTEMPTS_HEADER, LAST_ERROR_HEADER};
use super::store::Revoked;
use super::trace::{self, Next, Ran, Report, Settled};
use super::Ctx;
use crate::backend::is_revoked;
use crate::broker::{Delivery, Message};
use crate::error::{Error, Result};
use crate::options::{header_u64, Resolved, RETRY_LATER_HEADER};
use crate::task::{TaskDescriptor, TaskError, TaskErrorKind};
use crate::wire::{self, Arg, GoTime, Signature, State, TaskResult, TaskState};

/// The longest a task's retry waits (`RetryTimeout` is clamped to it), a week: far beyond any
/// Fibonacci schedule in use, and far from the overflow a hostile `RetryTimeout` aims at.
pub(crate) const MAX_RETRY_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Handles one delivery, from decoding to settling it.
pub(crate) async fn process(ctx: &Ctx, delivery: Delivery, mut slot: Slot) {
    let config = ctx.server.config();
    let size = delivery.body().len();
    if size > config.max_message_size {
        let reason = format!(
            "message of {size} bytes is larger than max_message_size ({} bytes)",
            config.max_message_size
        );
        return poison(ctx, delivery, reason).await;
    }
    let mut signature = match Signature::from_json(delivery.body()).map(Box::new) {
        Ok(sig) if sig.name.is_empty() => {
            // (The UUID is not quoted: it is untrusted and unbounded.)
            let reason = "message has no task name".to_owned();
            return poison(ctx, delivery, reason).await;
        }
        // Boxed: it is carried through every stage, and each stage's future would otherwise
        // hold copies of it.
        Ok(sig) => sig,
        Err(e) => {
            let reason = format!("message of {size} bytes is not a task signature: {e}");
            return poison(ctx, delivery, reason).await;
        }
    };
    // Go runs a message without a UUID (Go Machinery's README shows one) and stores its state
    // under the empty key. It runs here under a fresh id; settling hands over the signature
    // with that id, so a copy sent back to the broker or a FAILURE recorded for it carries the
    // same id (the body has none).
    let assigned = signature.uuid.is_empty().then(|| {
        signature.uuid = wire::new_uuid("task_");
        warn!(task.id = %signature.uuid, task.name = %signature.name, "message has no UUID; running it under a fresh one");
        signature.clone()
    });
    let attempt = Attempt::of(&delivery, &signature);
    let label = ctx.label(&signature.name);
    let (span, execution) = trace::start(
        &ctx.tracing,
        &signature,
        attempt.number,
        &ctx.queue,
        &ctx.name,
    );
    let unsettled = ctx.observers.received(label);
    // Handling and settling are boxed (in `poison` too), as is the signature: the delivery's
    // own future stays under 1 KiB instead of 10 KiB, and a future is copied whole each time
    // it is moved into the one that awaits it (a box, the span, the trace scope, the worker's
    // set). README, "Embedded, and the allocator"; the test
    // `the_stages_every_delivery_goes_through_are_small_futures` holds the sizes.
    let work = async move {
        let settled = match ctx.policy.exhausted(attempt) {
            Some(settlement) => {
                Box::pin(settle(ctx, delivery, Some(signature), attempt, settlement)).await
            }
            None => {
                let outcome = Box::pin(handle(ctx, signature, attempt, &mut slot)).await;
                let settlement = ctx.policy.decide(outcome, attempt);
                Box::pin(settle(ctx, delivery, assigned, attempt, settlement)).await
            }
        };
        trace::with_report(|report| unsettled.settled(report, &settled));
    };
    trace::scope(execution, work.instrument(span)).await;
}

/// A message that is no task at all: settled without a signature.
async fn poison(ctx: &Ctx, delivery: Delivery, reason: String) {
    let unsettled = ctx.observers.received(UNDECODABLE);
    let attempt = Attempt::by_broker(&delivery, 0);
    let settlement = ctx.policy.decide(Outcome::Poison(reason), attempt);
    let settled = Box::pin(settle(ctx, delivery, None, attempt, settlement)).await;
    unsettled.settled(&Report::default(), &settled);
}

async fn handle(
    ctx: &Ctx,
    signature: Box<Signature>,
    attempt: Attempt,
    slot: &mut Slot,
) -> Outcome {
    let Some(task) = ctx.registry.get(&signature.name) else {
        if signature.ignore_when_task_not_registered {
            // Go drops it (v2/brokers/amqp/amqp.go, consumeOne).
            warn!("task is not registered; dropping it (IgnoreWhenTaskNotRegistered)");
            return Outcome::Done;
        }
        warn!("task is not registered here; handing it back to the broker, behind other work");
        return Outcome::Unregistered;
    };
    let options = ctx.defaults.resolve(&signature, &task.options);
    let admitted = {
        let call = Call {
            signature: &signature,
            task,
            options,
        };
        ctx.layers.admit(&call, slot).await
    };
    if let Admit::Later(wait) = admitted {
        return Outcome::Early(wait);
    }
    // STARTED is recorded in the same atomic step that reads what was stored before, so one
    // round trip both claims the task and tells a duplicate; RECEIVED is not written (README,
    // "differs on purpose": Go's v2/worker.go `Process` writes RECEIVED, then STARTED).
    let (previous, retried) = match ctx.store.transition(&signature, State::Started).await {
        Ok(found) => found,
        Err(e) => return Outcome::Failed(e),
    };
    let stored = match previous.as_ref().map(|s| s.state) {
        // A retried write may have landed the first time: the STARTED we read can be our own.
        Some(State::Started) if retried => None,
        stored => stored,
    };
    let revoked = previous.as_deref().is_some_and(is_revoked);
    match stored {
        Some(State::Failure) if revoked => {
            info!("the task was revoked; not running it");
            Outcome::Done
        }
        Some(State::Received | State::Started | State::Success | State::Failure)
            if attempt.is_first() =>
        {
            warn!("another copy of this task was received already; not running it again");
            Outcome::Duplicate
        }
        Some(state) if state.is_final() => {
            warn!(%state, "the task already finished; completing its follow-ups without running it again");
            let previous = previous.map(|p| *p).unwrap_or_default();
            // Rare: boxed, so that every task's future does not carry its state.
            outcome_of(Box::pin(complete(ctx, signature, previous)).await)
        }
        // Without a store nothing says whether it ran: count every uncounted redelivery.
        Some(State::Received | State::Started) | None
            if attempt.uncounted && (stored.is_some() || ctx.store.backend().is_none()) =>
        {
            // A worker got this far with it before and the broker did not count: count it
            // before running it again.
            debug!("redelivered after it started, by a broker that does not count deliveries; counting it first");
            Outcome::Checkpoint
        }
        _ => execute(ctx, signature, task, options).await,
    }
}

fn outcome_of(result: Result<()>) -> Outcome {
    match result {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Failed(e),
    }
}

/// Runs the task and records its outcome. `Failed`: the outcome could not be recorded or its
/// follow-ups not sent.
async fn execute(
    ctx: &Ctx,
    mut signature: Box<Signature>,
    task: &'static TaskDescriptor,
    options: Resolved,
) -> Outcome {
    // A task that may be retried keeps its arguments for the retry.
    let args = if signature.retry_count > 0 || options.max_retry_later > 0 {
        signature.args.clone()
    } else {
        std::mem::take(&mut signature.args)
    };
    let call = Call {
        signature: &signature,
        task,
        options,
    };
    ctx.observers.started(task.name);
    let started = Instant::now();
    let outcome = ctx.layers.call(&call, args).await;
    let ran = Ran {
        elapsed: started.elapsed(),
        ok: outcome.is_ok(),
    };
    ctx.observers.finished(task.name, ran.elapsed, ran.ok);
    trace::note(|report| {
        report.ran = Some(ran);
        report.error = outcome.as_ref().err().map(ToString::to_string);
    });
    let recorded = match outcome {
        Ok(results) => succeeded(ctx, signature, results).await,
        // Failures are the rare path: keep their state out of every task's future.
        Err(err) => Box::pin(failed(ctx, signature, err, options.max_retry_later)).await,
    };
    outcome_of(recorded)
}

/// How a task ended, as its follow-ups need it.
enum Final {
    Success(Vec<TaskResult>),
    Failure(String),
}

async fn succeeded(ctx: &Ctx, signature: Box<Signature>, results: Vec<TaskResult>) -> Result<()> {
    debug!(results = results.len(), "task succeeded");
    // Encode and check the success callbacks before the result is stored: one that can never
    // be sent makes the task a FAILURE now, instead of a SUCCESS whose chain silently stops.
    // (Prepared before any await: only the prepared list, not the callbacks being built, is
    // held in this future.)
    let prepared: std::result::Result<Vec<Outgoing>, String> =
        success_callbacks(&signature, &results)
            .into_iter()
            .map(|callback| Outgoing::prepare(ctx, callback))
            .collect();
    let outgoing = match prepared {
        Ok(outgoing) => outgoing,
        Err(message) => {
            return Box::pin(failed(ctx, signature, TaskError::permanent(message), 0)).await;
        }
    };
    let stored = ctx
        .store
        .record(&signature, State::Success, Some(&results), String::new())
        .await?;
    if stored == Revoked::Yes {
        return discarded("SUCCESS");
    }
    follow_up(
        ctx,
        signature,
        Final::Success(results),
        false,
        Some(outgoing),
    )
    .await
}

/// Records a failed run: a retry (counted, or a retry-later), or FAILURE and the error
/// callbacks. A revoked task is FAILURE "revoked", with no follow-ups.
async fn failed(
    ctx: &Ctx,
    mut signature: Box<Signature>,
    err: TaskError,
    max_retry_later: u32,
) -> Result<()> {
    let mut message = err.message().to_owned();
    match retry_of(&mut signature, &err, max_retry_later) {
        Retry::After { wait, note } => {
            trace::note(|report| {
                report.error = Some(err.to_string());
                report.next = Next::Retry {
                    wait,
                    retries_left: signature.retry_count,
                };
            });
            let stored = ctx
                .store
                .record(&signature, State::Retry, None, format!("{message}{note}"))
                .await?;
            if stored == Revoked::Yes {
                return discarded("RETRY");
            }
            let eta = chrono::Duration::from_std(wait)
                .ok()
                .and_then(|d| Utc::now().checked_add_signed(d));
            signature.eta = eta.map(GoTime::from);
            // A retry is a new delivery of the task, not another attempt at this one.
            signature.headers.remove(ATTEMPTS_HEADER);
            signature.headers.remove(LAST_ERROR_HEADER);
            // The retry keeps its UUID and arguments; publishing records a fresh PENDING state.
            return match send(ctx, (*signature).clone()).await {
                Err(e) if e.is_permanent() => {
                    let message = format!("{message}; the retry cannot be sent: {e}");
                    signature.retry_count = 0;
                    Box::pin(failed(ctx, signature, TaskError::permanent(message), 0)).await
                }
                other => other,
            };
        }
        Retry::No { note } => message.push_str(&note),
    }
    if err.kind() == TaskErrorKind::Revoked {
        // Cancelled by the revoke layer: the revoke is the stored FAILURE already.
        trace::note(|report| report.next = Next::Revoked);
        return ctx
            .store
            .record(&signature, State::Failure, None, message)
            .await
            .map(drop);
    }
    trace::note(|report| {
        report.error = Some(message.clone());
        report.next = Next::Failure {
            on_error: signature.on_error.len(),
        };
    });
    let stored = ctx
        .store
        .record(&signature, State::Failure, None, message.clone())
        .await?;
    if stored == Revoked::Yes {
        return discarded("FAILURE");
    }
    follow_up(ctx, signature, Final::Failure(message), false, None).await
}

/// A body finished after its task was revoked: the revoke wins (see [`Server::revoke`]); its
/// outcome is dropped and nothing follows it.
///
/// [`Server::revoke`]: crate::Server::revoke
fn discarded(outcome: &str) -> Result<()> {
    info!(
        outcome,
        "the task was revoked while it ran; its outcome is discarded and its follow-ups are not sent"
    );
    Ok(())
}

/// Whether a failed run is retried.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// After `wait`; `note` is appended to the RETRY state's error.
    After { wait: Duration, note: String },
    /// Not retried; `note` is appended to the FAILURE's error.
    No { note: String },
}

/// Decides the retry of a failed run and updates the signature for it.
///
/// - [`TaskError::retry_in`] is Go's `ErrRetryTaskLater` (v2/tasks/errors.go; v2/worker.go
///   `taskRetryIn`): a retry after the given wait that does not use up `RetryCount`, bounded
///   by `max_retry_later` (Go has no bound, machinery #640) and counted in the
///   `x-machinery-retry-later` header.
/// - Any other failure with `RetryCount > 0` is retried after the next Fibonacci wait
///   (v2/worker.go `taskRetry`, `retry.FibonacciNext`), using one retry.
/// - Permanent and revoked failures are never retried.
///
/// Every wait is clamped to [`MAX_RETRY_WAIT`].
fn retry_of(signature: &mut Signature, err: &TaskError, max_retry_later: u32) -> Retry {
    let no = || Retry::No {
        note: String::new(),
    };
    let wait = match err.kind() {
        TaskErrorKind::Permanent | TaskErrorKind::Revoked => return no(),
        TaskErrorKind::RetryIn(wait) => {
            let used = header_u64(signature, RETRY_LATER_HEADER).unwrap_or(0);
            if used >= u64::from(max_retry_later) {
                return Retry::No {
                    note: format!(
                        " (asked to be retried later {used} times; max_retry_later is {max_retry_later})"
                    ),
                };
            }
            signature
                .headers
                .insert(RETRY_LATER_HEADER.to_owned(), (used + 1).into());
            wait
        }
        TaskErrorKind::Failed | TaskErrorKind::Panicked if signature.retry_count > 0 => {
            signature.retry_count -= 1;
            signature.retry_timeout = fibonacci_next(signature.retry_timeout);
            Duration::from_secs(u64::try_from(signature.retry_timeout).unwrap_or(0))
        }
        TaskErrorKind::Failed | TaskErrorKind::Panicked => return no(),
    };
    if wait <= MAX_RETRY_WAIT {
        return Retry::After {
            wait,
            note: String::new(),
        };
    }
    if !matches!(err.kind(), TaskErrorKind::RetryIn(_)) {
        signature.retry_timeout = i64::try_from(MAX_RETRY_WAIT.as_secs()).unwrap_or(0);
    }
    Retry::After {
        wait: MAX_RETRY_WAIT,
        note: format!(
            " (retry wait of {}s clamped to {}s)",
            wait.as_secs(),
            MAX_RETRY_WAIT.as_secs()
        ),
    }
}

/// Whether a run that failed with `err` is retried ([`retry_of`], on a copy): for observers
/// that name the outcome without changing the signature.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn will_retry(signature: &Signature, err: &TaskError, max_retry_later: u32) -> bool {
    let mut copy = signature.clone();
    matches!(
        retry_of(&mut copy, err, max_retry_later),
        Retry::After { .. }
    )
}

/// After a redelivery of a finished task: sends what may not have been sent.
async fn complete(ctx: &Ctx, signature: Box<Signature>, stored: TaskState) -> Result<()> {
    if is_revoked(&stored) {
        // A revoked task sends nothing (a dead-lettered message of a revoked task ends here).
        return Ok(());
    }
    let done = match stored.state {
        State::Success => Final::Success(stored.results.unwrap_or_default()),
        _ => Final::Failure(stored.error),
    };
    follow_up(ctx, signature, done, true, None).await
}

/// Sends a finished task's follow-ups: the chord step, then the success or error callbacks
/// (`outgoing`, when the caller already prepared them). `again`: they may have been sent before
/// (a redelivery).
///
/// Each await here that only some tasks reach (a group member's mark, the chord step, the
/// callbacks' sends) is boxed: a task with nothing to follow up, the common case, then carries
/// none of their state in its future.
async fn follow_up(
    ctx: &Ctx,
    signature: Box<Signature>,
    done: Final,
    again: bool,
    outgoing: Option<Vec<Outgoing>>,
) -> Result<()> {
    let group_task_count = usize::try_from(signature.group_task_count).unwrap_or(0);
    if !signature.group_uuid.is_empty() && group_task_count > 0 {
        // Go's AMQP backend counts a group's finished members apart (markTaskCompleted).
        let member = match &done {
            Final::Success(results) => super::store::task_state(
                &signature,
                State::Success,
                Some(results.clone()),
                String::new(),
            ),
            Final::Failure(message) => {
                super::store::task_state(&signature, State::Failure, None, message.clone())
            }
        };
        let (group, count) = (signature.group_uuid.as_str(), group_task_count);
        // A try after a failed one may follow a mark that landed (a lost confirm): it checks
        // first, as a redelivery does.
        let tried = std::sync::atomic::AtomicBool::new(again);
        Box::pin(ctx.store.call("record a finished group member", |b| {
            let again = tried.swap(true, std::sync::atomic::Ordering::Relaxed);
            b.mark_group_member(group, count, &member, again)
        }))
        .await?;
    }
    if signature.chord_callback.is_some() {
        let error = match &done {
            Final::Success(_) => None,
            Final::Failure(message) => Some(message.as_str()),
        };
        Box::pin(super::chord::finish_group_member(
            ctx, &signature, error, again,
        ))
        .await?;
    }
    let callbacks = match (outgoing, &done) {
        (Some(outgoing), _) => outgoing.into_iter().map(Ok).collect(),
        (None, Final::Success(results)) => success_callbacks(&signature, results)
            .into_iter()
            .map(|callback| Outgoing::prepare(ctx, callback))
            .collect(),
        (None, Final::Failure(message)) => error_callbacks(&signature, message)
            .into_iter()
            .map(|callback| Outgoing::prepare(ctx, callback))
            .collect::<Vec<_>>(),
    };
    if callbacks.is_empty() {
        return Ok(());
    }
    Box::pin(send_callbacks(ctx, signature, done, again, callbacks)).await
}

/// Sends a finished task's callbacks, in order (see [`follow_up`]); boxed apart, as only a task
/// with callbacks needs its state.
async fn send_callbacks(
    ctx: &Ctx,
    mut signature: Box<Signature>,
    done: Final,
    again: bool,
    callbacks: Vec<std::result::Result<Outgoing, String>>,
) -> Result<()> {
    for callback in callbacks {
        let sent = match callback {
            Ok(callback) => Box::pin(callback.send(ctx)).await,
            Err(message) => Err(SendError::Unsendable(message)),
        };
        let message = match sent {
            Ok(()) => continue,
            Err(SendError::Unsendable(message)) => message,
            Err(SendError::Transient(e)) => return Err(e),
        };
        if let Final::Success(_) = done {
            // The result is stored, but the chain cannot go on: the task fails, as if the check
            // before storing had caught it.
            error!(error = %message, "a follow-up cannot be sent; the task fails");
            Box::pin(
                ctx.store
                    .set(&signature, State::Failure, None, message.clone()),
            )
            .await?;
            signature.chord_callback = None;
            return Box::pin(follow_up(
                ctx,
                signature,
                Final::Failure(message),
                again,
                None,
            ))
            .await;
        }
        error!(error = %message, "an error callback cannot be sent; dropping it");
    }
    Ok(())
}

/// A follow-up encoded and checked, ready to be recorded as PENDING and published.
struct Outgoing {
    name: String,
    uuid: String,
    message: Message,
    pending: TaskState,
}

/// Why a follow-up was not sent.
enum SendError {
    /// It can never be sent as it is: the message says why.
    Unsendable(String),
    /// The store or the broker failed; trying again may work.
    Transient(Error),
}

impl Outgoing {
    /// Encodes and checks `callback`; the error says why it can never be sent.
    fn prepare(ctx: &Ctx, callback: Signature) -> std::result::Result<Outgoing, String> {
        let (name, uuid) = (callback.name.clone(), callback.uuid.clone());
        match ctx.server.prepare(callback) {
            Ok((message, pending)) => Ok(Outgoing {
                name,
                uuid,
                message,
                pending,
            }),
            Err(e) => Err(unsendable(&name, &uuid, &e)),
        }
    }

    /// Records PENDING (retried through a store outage, like the worker's own writes) and
    /// publishes, as [`Server::send_wire`](crate::Server::send_wire) does.
    async fn send(self, ctx: &Ctx) -> std::result::Result<(), SendError> {
        let pending = self.pending;
        ctx.store
            .call("record a follow-up as PENDING", |b| {
                b.set_state(pending.clone())
            })
            .await
            .map_err(SendError::Transient)?;
        match ctx.server.broker().publish(self.message).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Unsendable(unsendable(
                &self.name, &self.uuid, &e,
            ))),
            Err(e) => Err(SendError::Transient(e)),
        }
    }
}

/// Sends one follow-up; an error that can never be cured keeps a permanent kind.
pub(super) async fn send(ctx: &Ctx, signature: Signature) -> Result<()> {
    let outgoing = Outgoing::prepare(ctx, signature)
        .map_err(|message| SendError::Unsendable(message).into_error())?;
    outgoing.send(ctx).await.map_err(SendError::into_error)
}

impl SendError {
    fn into_error(self) -> Error {
        match self {
            SendError::Unsendable(message) => Error::new(crate::ErrorKind::Encode, message),
            SendError::Transient(e) => e,
        }
    }
}

fn unsendable(name: &str, uuid: &str, e: &Error) -> String {
    format!(
        "follow-up task `{name}` ({uuid}) cannot be sent: {}",
        e.message()
    )
}

/// The success callbacks, with the results appended unless the task is immutable, and fixed
/// UUIDs.
fn success_callbacks(signature: &Signature, results: &[TaskResult]) -> Vec<Signature> {
    let mut callbacks = signature.on_success.clone();
    for (i, callback) in callbacks.iter_mut().enumerate() {
        fix_uuid(callback, &signature.uuid, "on_success", i);
        if !signature.immutable {
            callback.args.extend(results.iter().cloned().map(Arg::from));
        }
    }
    callbacks
}

/// The error callbacks, with the error message prepended, and fixed UUIDs.
pub(super) fn error_callbacks(signature: &Signature, message: &str) -> Vec<Signature> {
    let mut callbacks = signature.on_error.clone();
    for (i, callback) in callbacks.iter_mut().enumerate() {
        fix_uuid(callback, &signature.uuid, "on_error", i);
        callback.args.insert(0, string_arg(message));
    }
    callbacks
}

/// Gives a follow-up without a UUID one derived from its parent's, so that sending it again
/// sends the same task.
pub(super) fn fix_uuid(callback: &mut Signature, parent: &str, role: &str, index: usize) {
    if callback.uuid.is_empty() {
        callback.uuid = derived_uuid(parent, role, index);
    }
}

/// `task_` and a UUID-shaped 128-bit FNV-1a hash of the parent's UUID, role and index.
pub(crate) fn derived_uuid(parent: &str, role: &str, index: usize) -> String {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let index = index.to_le_bytes();
    for byte in parent
        .bytes()
        .chain([0])
        .chain(role.bytes())
        .chain([0])
        .chain(index)
    {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    let hex = format!("{hash:032x}");
    format!(
        "task_{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn string_arg(message: &str) -> Arg {
    Arg {
        name: String::new(),
        type_name: "string".to_owned(),
        value: message.into(),
    }
}

/// The next Fibonacci number above `n` (Go's `retry.FibonacciNext`): 0 -> 1 -> 2 -> 3 -> 5.
pub(crate) fn fibonacci_next(n: i64) -> i64 {
    let (mut a, mut b) = (0i64, 1i64);
    while a <= n {
        let next = a.saturating_add(b);
        a = b;
        b = next;
        if a == i64::MAX {
            break;
        }
    }
    a
}

/// Carries out a settlement. `signature`: the decoded message, when the caller still has it.
/// Republishing and dead-lettering are boxed, so that the common ack carries neither's state.
async fn settle(
    ctx: &Ctx,
    delivery: Delivery,
    signature: Option<Box<Signature>>,
    attempt: Attempt,
    settlement: Settlement,
) -> Settled {
    match settlement {
        Settlement::Ack => {
            log_settle(delivery.ack().await);
            Settled::Acked
        }
        Settlement::Republish {
            delay,
            attempted,
            last_error,
        } => {
            let carried = attempt.carried(attempted);
            let settled = Settled::Republished {
                delay,
                attempted,
                reason: last_error.clone(),
            };
            Box::pin(republish(
                ctx, delivery, signature, delay, carried, last_error,
            ))
            .await
            .unwrap_or(settled)
        }
        Settlement::DeadLetter {
            reason,
            record_failure,
        } => {
            let signature = if record_failure {
                signature.or_else(|| Signature::from_json(delivery.body()).ok().map(Box::new))
            } else {
                None
            };
            Box::pin(dead_letter(ctx, delivery, signature, reason)).await
        }
    }
}

/// Sends the message again, carrying `carried` earlier deliveries, and acknowledges this
/// delivery. If the broker does not take it now, hands the delivery back after a pause; if it
/// never can, dead-letters it. `None`: sent again.
async fn republish(
    ctx: &Ctx,
    delivery: Delivery,
    signature: Option<Box<Signature>>,
    delay: Duration,
    carried: u32,
    last_error: Option<String>,
) -> Option<Settled> {
    let message =
        match signature.map_or_else(|| Signature::from_json(delivery.body()).map(Box::new), Ok) {
            Ok(mut signature) => {
                if carried > 0 {
                    signature
                        .headers
                        .insert(ATTEMPTS_HEADER.to_owned(), carried.into());
                }
                if let Some(last_error) = last_error {
                    signature
                        .headers
                        .insert(LAST_ERROR_HEADER.to_owned(), last_error.into());
                }
                // The ETA is not re-derived here: the broker holds the message for `delay`.
                signature.to_json().map(|body| {
                    let mut message =
                        Message::new(ctx.server.routing_key(&signature), Bytes::from(body));
                    message.priority = signature.priority;
                    message.headers = signature.headers;
                    message.delay = (!delay.is_zero()).then_some(delay);
                    message
                })
            }
            Err(e) => Err(e),
        };
    let published = match message {
        Ok(message) => ctx.server.broker().publish(message).await,
        Err(e) => Err(e),
    };
    match published {
        Ok(()) => {
            log_settle(delivery.ack().await);
            None
        }
        Err(e) if e.is_permanent() => {
            // It can never be sent as it is (a header key the broker cannot carry, ...).
            let reason = format!("cannot be sent again: {e}");
            let signature = Signature::from_json(delivery.body()).ok().map(Box::new);
            Some(dead_letter(ctx, delivery, signature, reason).await)
        }
        Err(e) => {
            // Logged by the outcome event.
            let pause = ctx.server.config().requeue_delay;
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                log_settle(delivery.requeue().await);
            });
            Some(Settled::HandedBack {
                error: format!("cannot send the message again: {e}"),
            })
        }
    }
}

/// Dead-letters the delivery. With the signature, and once the message is in the dead-letter
/// queue, records the task as FAILURE with the reason and sends its error callbacks, unless it
/// is already SUCCESS or FAILURE (a finished task keeps its outcome, and a message that comes
/// back after a failed move does not send its callbacks twice). The store is tried once, not
/// through an outage: it may be why the message is dead.
async fn dead_letter(
    ctx: &Ctx,
    delivery: Delivery,
    signature: Option<Box<Signature>>,
    reason: String,
) -> Settled {
    if let Err(e) = delivery.dead_letter(reason.clone()).await {
        // The broker hands it back (after a pause); it is recorded when the move succeeds.
        return Settled::HandedBack {
            error: format!("dead-lettering it failed ({reason}): {e}"),
        };
    }
    let settled = Settled::DeadLettered {
        reason: reason.clone(),
    };
    let (Some(signature), Some(backend)) = (signature, ctx.store.backend()) else {
        return settled;
    };
    let finish = async {
        match backend.get_state(&signature.uuid).await? {
            // A finished task keeps its outcome; what it may not have sent yet is sent now.
            Some(stored) if stored.state.is_final() => complete(ctx, signature, stored).await,
            _ => {
                let state =
                    super::store::task_state(&signature, State::Failure, None, reason.clone());
                backend.set_state(state).await?;
                follow_up(ctx, signature, Final::Failure(reason.clone()), true, None).await
            }
        }
    };
    if let Err(e) = Box::pin(finish).await {
        warn!(error = %e, "cannot record the dead-lettered task as FAILURE");
    }
    settled
}

fn log_settle(result: Result<()>) {
    if let Err(e) = result {
        warn!(error = %e, "settling the message with the broker failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::returned_size;

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = derived_uuid("task_1", "on_success", 0);
        assert_eq!(a, derived_uuid("task_1", "on_success", 0));
        assert_ne!(a, derived_uuid("task_1", "on_success", 1));
        assert_ne!(a, derived_uuid("task_1", "on_error", 0));
        assert_ne!(a, derived_uuid("task_2", "on_success", 0));
        assert_eq!(a.len(), "task_".len() + 36);
    }

    /// Every delivery's stages are boxed futures, built on the stack and copied into their
    /// boxes. They stay small when the signature and the stored record are boxed once and the
    /// rare paths (a finished duplicate, a republish, a dead letter, a follow-up's mark, chord
    /// step or sends) are boxed apart: on the common path at most 1 KiB (984 bytes for the
    /// handling, in the test build as in release), which glibc's `malloc` serves from its
    /// per-thread cache (larger blocks take its slower path, which also consolidates its free
    /// lists). Before, the handling was about 3.9 KiB, the settling 2.6 KiB and the follow-ups
    /// 2.4 KiB, for every task. The bounds hold for the toolchain CI builds with; a compiler
    /// that lays futures out otherwise may need them looked at again.
    #[test]
    fn the_stages_every_delivery_goes_through_are_small_futures() {
        let handling = returned_size(
            |(ctx, signature, attempt, slot): (
                &'static Ctx,
                Box<Signature>,
                Attempt,
                &'static mut Slot,
            )| handle(ctx, signature, attempt, slot),
        );
        let settling = returned_size(
            |(ctx, delivery, signature, attempt, settlement): (
                &'static Ctx,
                Delivery,
                Option<Box<Signature>>,
                Attempt,
                Settlement,
            )| settle(ctx, delivery, signature, attempt, settlement),
        );
        let following = returned_size(
            |(ctx, signature, done, outgoing): (
                &'static Ctx,
                Box<Signature>,
                Final,
                Option<Vec<Outgoing>>,
            )| follow_up(ctx, signature, done, false, outgoing),
        );
        let whole = returned_size(|(ctx, delivery, slot): (&'static Ctx, Delivery, Slot)| {
            process(ctx, delivery, slot)
        });
        assert!(handling <= 1024, "handle: {handling} bytes");
        assert!(settling <= 512, "settle: {settling} bytes");
        assert!(following <= 512, "follow_up: {following} bytes");
        assert!(whole <= 1024, "process: {whole} bytes");
    }

    #[test]
    fn fibonacci_like_go() {
        let mut n = 0;
        let seq: Vec<i64> = (0..6)
            .map(|_| {
                n = fibonacci_next(n);
                n
            })
            .collect();
        assert_eq!(seq, [1, 2, 3, 5, 8, 13]);
        assert_eq!(fibonacci_next(i64::MAX), i64::MAX);
    }
}
