//! One delivery, from its bytes to its settlement.
//!
//! [`process`] decodes the message, counts the [`Attempt`], handles it to an [`Outcome`] and
//! settles it as the [`SettlePolicy`] decides. Handling records RECEIVED with
//! [`ResultBackend::transition`](crate::backend::ResultBackend::transition), which also returns
//! what was stored before:
//!
//! - a first delivery of a task some worker already received or finished is a duplicate (a
//!   follow-up sent again after a lost acknowledgement, a publish retried after a lost
//!   confirm): it is acknowledged and not run;
//! - a later delivery of a finished task does not run its body: it only completes what may be
//!   missing (follow-ups, the chord callback, error callbacks), from the stored results;
//! - anything else runs.
//!
//! Follow-ups are checked before the task's final state is stored, and their UUIDs are fixed
//! (derived from the task's own when a producer left them empty), so sending them again sends
//! the same messages.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures_util::FutureExt as _;
use tracing::{debug, error, warn, Instrument as _};

use super::policy::{
    carried_attempts, Attempt, Outcome, Settlement, ATTEMPTS_HEADER, LAST_ERROR_HEADER,
};
use super::Ctx;
use crate::broker::{Delivery, Message};
use crate::error::{Error, Result};
use crate::task::{Runner, TaskDescriptor, TaskError, TaskErrorKind, TaskOutcome};
use crate::wire::{Arg, GoTime, Signature, State, TaskResult, TaskState};

/// The longest a task's retry waits (`RetryTimeout` is clamped to it), a week: far beyond any
/// Fibonacci schedule in use, and far from the overflow a hostile `RetryTimeout` aims at.
pub(crate) const MAX_RETRY_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Handles one delivery, from decoding to settling it.
pub(crate) async fn process(ctx: &Ctx, delivery: Delivery) {
    let config = ctx.server.config();
    let size = delivery.body().len();
    if size > config.max_message_size {
        let reason = format!(
            "message of {size} bytes is larger than max_message_size ({} bytes)",
            config.max_message_size
        );
        error!(
            size,
            limit = config.max_message_size,
            "message too large; dead-lettering it"
        );
        return poison(ctx, delivery, reason).await;
    }
    let signature = match Signature::from_json(delivery.body()) {
        Ok(sig) if sig.name.is_empty() || sig.uuid.is_empty() => {
            error!(task.id = %sig.uuid, task.name = %sig.name, "message has no task name or UUID; dead-lettering it");
            let reason = "message has no task name or UUID".to_owned();
            return poison(ctx, delivery, reason).await;
        }
        Ok(sig) => sig,
        Err(e) => {
            error!(error = %e, size, "message is not a task signature; dead-lettering it");
            return poison(ctx, delivery, e.to_string()).await;
        }
    };
    let attempt = Attempt::of(&delivery, &signature);
    let span = tracing::debug_span!(
        "task",
        task.name = %signature.name,
        task.id = %signature.uuid,
        attempt = attempt.number
    );
    async move {
        if let Some(settlement) = ctx.policy.exhausted(attempt) {
            return settle(ctx, delivery, Some(signature), settlement).await;
        }
        let outcome = handle(ctx, signature, attempt).await;
        let settlement = ctx.policy.decide(outcome, attempt);
        settle(ctx, delivery, None, settlement).await;
    }
    .instrument(span)
    .await;
}

/// A message that is no task at all: settled without a signature.
async fn poison(ctx: &Ctx, delivery: Delivery, reason: String) {
    let attempt = Attempt::of_unknown(&delivery);
    let settlement = ctx.policy.decide(Outcome::Poison(reason), attempt);
    settle(ctx, delivery, None, settlement).await;
}

async fn handle(ctx: &Ctx, signature: Signature, attempt: Attempt) -> Outcome {
    let config = ctx.server.config();
    let Some(task) = ctx.registry.get(&signature.name) else {
        if signature.ignore_when_task_not_registered {
            // Go drops it (v2/brokers/amqp/amqp.go, consumeOne).
            warn!("task is not registered; dropping it (IgnoreWhenTaskNotRegistered)");
            return Outcome::Done;
        }
        warn!("task is not registered here; handing it back to the broker, behind other work");
        return Outcome::Unregistered;
    };
    if let Some(wait) = too_early(&signature, config.eta_tolerance) {
        debug!(?wait, "message arrived before its ETA; delaying it again");
        return Outcome::Early(wait);
    }
    if attempt.uncounted {
        debug!("redelivered by a broker that does not count deliveries; counting it first");
        return Outcome::Checkpoint;
    }
    let previous = match ctx.store.transition(&signature, State::Received).await {
        Ok(previous) => previous,
        Err(e) => return Outcome::Failed(e),
    };
    match previous.as_ref().map(|s| s.state) {
        Some(State::Received | State::Started | State::Success | State::Failure)
            if attempt.is_first() =>
        {
            warn!("another copy of this task was received already; not running it again");
            Outcome::Duplicate
        }
        Some(state) if state.is_final() => {
            warn!(%state, "the task already finished; completing its follow-ups without running it again");
            let previous = previous.unwrap_or_default();
            outcome_of(complete(ctx, signature, previous).await)
        }
        _ => outcome_of(execute(ctx, task, signature).await),
    }
}

fn outcome_of(result: Result<()>) -> Outcome {
    match result {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Failed(e),
    }
}

/// Runs the task and records its outcome; an error means the outcome could not be recorded or
/// its follow-ups not sent.
async fn execute(ctx: &Ctx, task: &'static TaskDescriptor, mut signature: Signature) -> Result<()> {
    ctx.store
        .set(&signature, State::Started, None, String::new())
        .await?;
    // A task that may be retried keeps its arguments for the retry.
    let args = if signature.retry_count > 0 {
        signature.args.clone()
    } else {
        std::mem::take(&mut signature.args)
    };
    match run(task, args).await {
        Ok(results) => succeeded(ctx, signature, results).await,
        // Failures are the rare path: keep their state out of every task's future.
        Err(err) => Box::pin(failed(ctx, signature, err)).await,
    }
}

async fn run(task: &'static TaskDescriptor, args: Vec<Arg>) -> TaskOutcome {
    match task.runner {
        Runner::Blocking(body) => match tokio::task::spawn_blocking(move || body(args)).await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => Err(TaskError::panicked(panic_message(e.into_panic()))),
            Err(_) => Err(TaskError::new("the task was cancelled")),
        },
        Runner::Async(start) => {
            let future = match std::panic::catch_unwind(AssertUnwindSafe(|| start(args))) {
                Ok(future) => future,
                Err(payload) => return Err(TaskError::panicked(panic_message(payload))),
            };
            match AssertUnwindSafe(future).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(payload) => Err(TaskError::panicked(panic_message(payload))),
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "the task panicked".to_owned(),
        },
    }
}

/// How a task ended, as its follow-ups need it.
enum Final {
    Success(Vec<TaskResult>),
    Failure(String),
}

async fn succeeded(ctx: &Ctx, signature: Signature, results: Vec<TaskResult>) -> Result<()> {
    debug!(results = results.len(), "task succeeded");
    // Check the follow-ups before the result is stored: one that can never be sent makes the
    // task a FAILURE now, instead of a SUCCESS whose chain silently stops.
    let callbacks = success_callbacks(&signature, &results);
    for callback in &callbacks {
        if let Err(e) = ctx.server.prepare(callback.clone()) {
            let message = unsendable(callback, &e);
            return Box::pin(failed(ctx, signature, TaskError::permanent(message))).await;
        }
    }
    ctx.store
        .set(
            &signature,
            State::Success,
            Some(results.clone()),
            String::new(),
        )
        .await?;
    Box::pin(follow_up(ctx, signature, Final::Success(results), false)).await
}

async fn failed(ctx: &Ctx, mut signature: Signature, err: TaskError) -> Result<()> {
    let retryable = !matches!(err.kind(), TaskErrorKind::Permanent);
    if retryable && signature.retry_count > 0 {
        let mut clamped = String::new();
        let wait = match err.retry_delay() {
            Some(wait) => wait,
            None => {
                signature.retry_timeout = fibonacci_next(signature.retry_timeout);
                Duration::from_secs(u64::try_from(signature.retry_timeout).unwrap_or(0))
            }
        };
        let wait = if wait > MAX_RETRY_WAIT {
            clamped = format!(
                " (retry wait of {}s clamped to {}s)",
                wait.as_secs(),
                MAX_RETRY_WAIT.as_secs()
            );
            signature.retry_timeout = i64::try_from(MAX_RETRY_WAIT.as_secs()).unwrap_or(0);
            MAX_RETRY_WAIT
        } else {
            wait
        };
        signature.retry_count -= 1;
        warn!(error = %err, retries_left = signature.retry_count, ?wait, "task failed; retrying");
        ctx.store
            .set(
                &signature,
                State::Retry,
                None,
                format!("{}{clamped}", err.message()),
            )
            .await?;
        let eta = chrono::Duration::from_std(wait)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d));
        signature.eta = eta.map(GoTime::from);
        // A retry is a new delivery of the task, not another attempt at this one.
        signature.headers.remove(ATTEMPTS_HEADER);
        signature.headers.remove(LAST_ERROR_HEADER);
        // The retry keeps its UUID and arguments; publishing records a fresh PENDING state.
        match send(ctx, signature.clone()).await {
            Err(e) if e.is_permanent() => {
                let message = format!("{}; the retry cannot be sent: {e}", err.message());
                signature.retry_count = 0;
                return Box::pin(failed(ctx, signature, TaskError::permanent(message))).await;
            }
            other => return other,
        }
    }
    error!(error = %err, "task failed");
    ctx.store
        .set(&signature, State::Failure, None, err.message().to_owned())
        .await?;
    follow_up(
        ctx,
        signature,
        Final::Failure(err.message().to_owned()),
        false,
    )
    .await
}

/// After a redelivery of a finished task: sends what may not have been sent.
async fn complete(ctx: &Ctx, signature: Signature, stored: TaskState) -> Result<()> {
    let done = match stored.state {
        State::Success => Final::Success(stored.results.unwrap_or_default()),
        _ => Final::Failure(stored.error),
    };
    follow_up(ctx, signature, done, true).await
}

/// Sends a finished task's follow-ups: the chord step, then the success or error callbacks.
/// `again`: they may have been sent before (a redelivery).
async fn follow_up(ctx: &Ctx, mut signature: Signature, done: Final, again: bool) -> Result<()> {
    if signature.chord_callback.is_some() {
        let error = match &done {
            Final::Success(_) => None,
            Final::Failure(message) => Some(message.as_str()),
        };
        Box::pin(finish_group_member(ctx, &signature, error, again)).await?;
    }
    let callbacks = match &done {
        Final::Success(results) => success_callbacks(&signature, results),
        Final::Failure(message) => error_callbacks(&signature, message),
    };
    for callback in callbacks {
        match send(ctx, callback.clone()).await {
            Ok(()) => {}
            Err(e) if e.is_permanent() => {
                let message = unsendable(&callback, &e);
                if let Final::Success(_) = done {
                    // The result is stored, but the chain cannot go on: the task fails, as if
                    // the check before storing had caught it.
                    error!(error = %message, "a follow-up cannot be sent; the task fails");
                    ctx.store
                        .set(&signature, State::Failure, None, message.clone())
                        .await?;
                    signature.chord_callback = None;
                    return Box::pin(follow_up(ctx, signature, Final::Failure(message), again))
                        .await;
                }
                error!(error = %message, "an error callback cannot be sent; dropping it");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn unsendable(callback: &Signature, e: &Error) -> String {
    format!(
        "follow-up task `{}` ({}) cannot be sent: {}",
        callback.name,
        callback.uuid,
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
fn error_callbacks(signature: &Signature, message: &str) -> Vec<Signature> {
    let mut callbacks = signature.on_error.clone();
    for (i, callback) in callbacks.iter_mut().enumerate() {
        fix_uuid(callback, &signature.uuid, "on_error", i);
        callback.args.insert(0, string_arg(message));
    }
    callbacks
}

/// Gives a follow-up without a UUID one derived from its parent's, so that sending it again
/// sends the same task.
fn fix_uuid(callback: &mut Signature, parent: &str, role: &str, index: usize) {
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

/// After a chord member has finished: if every member has, trigger the chord exactly once and
/// send its callback with the results in the group's order, or, if a member failed, record the
/// callback as FAILURE and send its error callbacks.
///
/// `again` (a redelivery of a finished member): the chord may have been triggered by this
/// member's earlier delivery, whose callback publish then failed. The callback is sent again;
/// its UUID is fixed, and a worker receiving a second copy does not run it.
async fn finish_group_member(
    ctx: &Ctx,
    signature: &Signature,
    error: Option<&str>,
    again: bool,
) -> Result<()> {
    let Some(callback) = &signature.chord_callback else {
        return Ok(());
    };
    if signature.group_uuid.is_empty() {
        return Ok(());
    }
    let Some(backend) = ctx.store.backend() else {
        warn!("a chord member finished, but no result backend is configured to track its group");
        return Ok(());
    };
    let group = &signature.group_uuid;
    let Some(meta) = backend.group_meta(group).await? else {
        warn!(group = %group, "no record of this chord's group; its callback cannot be sent");
        return Ok(());
    };
    if meta.chord_triggered && !again {
        return Ok(());
    }
    if !meta.task_uuids.contains(&signature.uuid) {
        warn!(group = %group, "this task is not a member of the group it names; ignoring its chord");
        return Ok(());
    }
    // One batched read of every member (Go's GroupCompleted reads them with one MGET too:
    // v2/backends/redis/goredis.go, getStates).
    let mut states = Vec::with_capacity(meta.task_uuids.len());
    for state in backend.get_states(&meta.task_uuids).await? {
        match state {
            Some(state) if state.state.is_final() => states.push(state),
            _ => return Ok(()),
        }
    }
    if !meta.chord_triggered && !backend.trigger_chord(group).await? {
        return Ok(());
    }
    let mut callback = (**callback).clone();
    fix_uuid(&mut callback, group, "chord_callback", 0);
    let failed = states.iter().find(|s| s.state == State::Failure);
    if let Some(failed) = failed {
        warn!(group = %group, member = %failed.task_uuid, "a chord member failed; the callback will not run");
        let message = if failed.task_uuid == signature.uuid {
            error.unwrap_or(&failed.error).to_owned()
        } else {
            failed.error.clone()
        };
        ctx.store
            .set(&callback, State::Failure, None, message.clone())
            .await?;
        for on_error in error_callbacks(&callback, &message) {
            send(ctx, on_error).await?;
        }
        return Ok(());
    }
    debug!(group = %group, "chord complete; sending its callback");
    if !callback.immutable {
        for state in states {
            callback
                .args
                .extend(state.results.unwrap_or_default().into_iter().map(Arg::from));
        }
    }
    send(ctx, callback).await
}

/// Sends a follow-up as [`Server::send_wire`](crate::Server::send_wire) does (PENDING, then
/// publish), with the PENDING write retried through a store outage like the worker's own.
async fn send(ctx: &Ctx, signature: Signature) -> Result<()> {
    let (message, pending) = ctx.server.prepare(signature)?;
    ctx.store
        .call("record a follow-up as PENDING", |b| {
            b.set_state(pending.clone())
        })
        .await?;
    ctx.server.broker().publish(message).await
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

/// How long a message must still wait for its ETA, if it arrived too early.
fn too_early(signature: &Signature, tolerance: Duration) -> Option<Duration> {
    let eta = signature.eta?.datetime()?;
    let wait = (eta - Utc::now()).to_std().ok()?;
    (wait > tolerance).then_some(wait)
}

/// Carries out a settlement. `signature`: the decoded message, when the caller still has it.
async fn settle(
    ctx: &Ctx,
    delivery: Delivery,
    signature: Option<Signature>,
    settlement: Settlement,
) {
    match settlement {
        Settlement::Ack => log_settle(delivery.ack().await),
        Settlement::Republish {
            delay,
            attempted,
            last_error,
        } => republish(ctx, delivery, signature, delay, attempted, last_error).await,
        Settlement::DeadLetter {
            reason,
            record_failure,
        } => {
            let signature = if record_failure {
                signature.or_else(|| Signature::from_json(delivery.body()).ok())
            } else {
                None
            };
            error!(reason = %reason, "dead-lettering the message");
            dead_letter(ctx, delivery, signature, reason).await;
        }
    }
}

/// Sends the message again (with its attempts counted) and acknowledges this delivery; if the
/// broker does not take it, hands the delivery back after a pause instead.
async fn republish(
    ctx: &Ctx,
    delivery: Delivery,
    signature: Option<Signature>,
    delay: Duration,
    attempted: bool,
    last_error: Option<String>,
) {
    let message = match signature.map_or_else(|| Signature::from_json(delivery.body()), Ok) {
        Ok(mut signature) => {
            if attempted {
                let attempts = carried_attempts(&signature).saturating_add(1);
                signature
                    .headers
                    .insert(ATTEMPTS_HEADER.to_owned(), attempts.into());
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
        Ok(()) => log_settle(delivery.ack().await),
        Err(e) if e.is_permanent() => {
            // It can never be sent as it is (a header key the broker cannot carry, ...).
            let reason = format!("cannot be sent again: {e}");
            error!(reason = %reason, "dead-lettering the message");
            let signature = Signature::from_json(delivery.body()).ok();
            dead_letter(ctx, delivery, signature, reason).await;
        }
        Err(e) => {
            warn!(error = %e, "cannot send the message again; handing it back to the broker after a pause");
            let pause = ctx.server.config().requeue_delay;
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                log_settle(delivery.requeue().await);
            });
        }
    }
}

/// Dead-letters the delivery; with the signature, first records it as FAILURE with the reason
/// (once, without waiting out an outage: the store may be why the message is dead) and sends
/// its error callbacks.
async fn dead_letter(ctx: &Ctx, delivery: Delivery, signature: Option<Signature>, reason: String) {
    if let Some(signature) = signature {
        let finish = async {
            if let Some(backend) = ctx.store.backend() {
                let state =
                    super::store::task_state(&signature, State::Failure, None, reason.clone());
                backend.set_state(state).await?;
            }
            follow_up(ctx, signature, Final::Failure(reason.clone()), true).await
        };
        if let Err(e) = Box::pin(finish).await {
            warn!(error = %e, "cannot record the dead-lettered task as FAILURE");
        }
    }
    log_settle(delivery.dead_letter(reason).await);
}

fn log_settle(result: Result<()>) {
    if let Err(e) = result {
        warn!(error = %e, "settling the message with the broker failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = derived_uuid("task_1", "on_success", 0);
        assert_eq!(a, derived_uuid("task_1", "on_success", 0));
        assert_ne!(a, derived_uuid("task_1", "on_success", 1));
        assert_ne!(a, derived_uuid("task_1", "on_error", 0));
        assert_ne!(a, derived_uuid("task_2", "on_success", 0));
        assert_eq!(a.len(), "task_".len() + 36);
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
