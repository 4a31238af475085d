//! The worker: consumes task messages, runs the tasks, records their outcome.
//!
//! Per delivery: decode the signature, find the task, record RECEIVED then STARTED, run the
//! body (blocking bodies on Tokio's blocking pool, so they never stall the runtime), record
//! SUCCESS with the results or FAILURE with the error (or RETRY and republish it later), send
//! the follow-ups (`OnSuccess` with the results appended unless the task is `Immutable`;
//! `OnError` with the error message prepended), and only then acknowledge the message.
//!
//! Bad input never crashes a worker: a body that is not a signature, or is larger than
//! `max_message_size`, is dead-lettered with a logged reason; arguments that do not fit the task
//! make it a FAILURE with a clear error, so the producer's `get()` returns that error. A
//! panicking task is a FAILURE with the panic message.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt as _;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn, Instrument as _};

use crate::broker::{Consumer, Delivery, Message};
use crate::error::{Error, ErrorKind, Result};
use crate::server::Server;
use crate::task::{Registry, Runner, TaskDescriptor, TaskError, TaskErrorKind, TaskOutcome};
use crate::wire::{Arg, GoTime, Signature, State, TaskResult, TaskState};

/// Runs a worker configured from the environment ([`Config::from_env`](crate::Config::from_env))
/// with every task compiled into the binary, until SIGINT or SIGTERM.
///
/// On the first signal the worker stops taking messages, finishes the tasks in flight,
/// acknowledges them and returns `Ok(())`; a second signal returns at once with an error of kind
/// [`ErrorKind::Shutdown`] (unacknowledged messages go back to the queue).
///
/// ```no_run
/// #[machinery::task]
/// fn add(a: i64, b: i64) -> i64 { a + b }
///
/// #[tokio::main]
/// async fn main() -> machinery::Result<()> {
///     machinery::worker::launch().await
/// }
/// ```
pub async fn launch() -> Result<()> {
    Server::from_env().await?.worker().build()?.run().await
}

/// Configures a [`Worker`]; made by [`Server::worker`].
#[derive(Debug)]
#[must_use]
pub struct WorkerBuilder {
    server: Server,
    name: Option<String>,
    queue: Option<String>,
    concurrency: usize,
    only: Option<Vec<String>>,
}

impl WorkerBuilder {
    pub(crate) fn new(server: Server) -> Self {
        WorkerBuilder {
            server,
            name: None,
            queue: None,
            concurrency: 16,
            only: None,
        }
    }

    /// The worker's name (its consumer tag); default `machinery-<pid>-<n>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Consumes `queue` instead of the configured default queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Runs at most `n` tasks at once (default 16; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Registers only the named tasks instead of every task in the binary.
    pub fn tasks<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Builds the task registry and the worker. Fails if two tasks share a name.
    pub fn build(self) -> Result<Worker> {
        let registry = Registry::build(self.only.as_deref())?;
        let queue = self
            .queue
            .unwrap_or_else(|| self.server.config().default_queue.clone());
        let name = self.name.unwrap_or_else(|| {
            format!(
                "machinery-{}-{}",
                std::process::id(),
                &crate::wire::new_uuid("")[..8]
            )
        });
        Ok(Worker {
            ctx: Arc::new(Ctx {
                registry,
                server: self.server,
                name,
            }),
            queue,
            concurrency: self.concurrency,
        })
    }

    /// Builds the worker, starts consuming, and runs it in the background until
    /// [`WorkerHandle::shutdown`]. When this returns, the worker's queue is declared and
    /// consumed: tasks sent from now on reach it.
    pub async fn spawn(self) -> Result<WorkerHandle> {
        let worker = self.build()?;
        let consumer = worker.consume().await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(worker.serve(consumer, async move {
            let _ = stopped.await;
        }));
        Ok(WorkerHandle { stop, join })
    }
}

/// A worker in the background; see [`WorkerBuilder::spawn`].
#[derive(Debug)]
pub struct WorkerHandle {
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// Stops taking messages, waits for the tasks in flight and returns the worker's result.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        self.join
            .await
            .map_err(|e| Error::new(ErrorKind::Shutdown, format!("the worker task failed: {e}")))?
    }

    /// Whether the worker has stopped (after an error, or a shutdown).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// A worker; see the [module docs](self).
#[derive(Debug)]
pub struct Worker {
    ctx: Arc<Ctx>,
    queue: String,
    concurrency: usize,
}

#[derive(Debug)]
struct Ctx {
    registry: Registry,
    server: Server,
    name: String,
}

impl Worker {
    /// The names of the tasks this worker runs.
    pub fn task_names(&self) -> Vec<&'static str> {
        self.ctx.registry.names()
    }

    /// Runs until SIGINT or SIGTERM; see [`launch`].
    pub async fn run(self) -> Result<()> {
        if self.ctx.server.config().no_unix_signals {
            return self.run_until(std::future::pending()).await;
        }
        let (first_tx, first_rx) = oneshot::channel::<()>();
        let (second_tx, second_rx) = oneshot::channel::<()>();
        let signals = tokio::spawn(async move {
            if wait_for_signal().await.is_err() {
                return;
            }
            info!("signal received: finishing the tasks in flight (signal again to quit now)");
            let _ = first_tx.send(());
            if wait_for_signal().await.is_ok() {
                let _ = second_tx.send(());
            }
        });
        let graceful = self.run_until(async move {
            let _ = first_rx.await;
        });
        let result = tokio::select! {
            result = graceful => result,
            Ok(()) = second_rx => Err(Error::new(
                ErrorKind::Shutdown,
                "second signal received: quitting without waiting for the tasks in flight",
            )),
        };
        signals.abort();
        result
    }

    /// Runs until `shutdown` completes, then stops taking messages, finishes the tasks in
    /// flight and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let consumer = self.consume().await?;
        self.serve(consumer, shutdown).await
    }

    async fn consume(&self) -> Result<Box<dyn Consumer>> {
        let config = self.ctx.server.config();
        let prefetch = config
            .amqp
            .prefetch_count
            .max(u16::try_from(self.concurrency).unwrap_or(u16::MAX));
        self.ctx
            .server
            .broker()
            .consume(&self.queue, prefetch)
            .await
    }

    async fn serve(
        self,
        mut consumer: Box<dyn Consumer>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        info!(
            worker = %self.ctx.name,
            queue = %self.queue,
            concurrency = self.concurrency,
            tasks = self.ctx.registry.len(),
            "worker started"
        );
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut outcome = Ok(());
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                biased;
                () = &mut shutdown => break,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move {
                        process(&ctx, delivery).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    // The consumer already tried to reconnect for `reconnect_timeout`.
                    error!(worker = %self.ctx.name, error = %e, "the broker is gone; stopping");
                    outcome = Err(e);
                    break;
                }
                None => {
                    warn!(worker = %self.ctx.name, "the broker closed the consumer");
                    break;
                }
            }
        }
        if let Err(e) = consumer.cancel().await {
            warn!(worker = %self.ctx.name, error = %e, "cancelling the consumer failed");
        }
        debug!(worker = %self.ctx.name, "waiting for the tasks in flight");
        let all = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        let _ = permits.acquire_many(all).await;
        if let Err(e) = consumer.close().await {
            warn!(worker = %self.ctx.name, error = %e, "closing the consumer failed");
        }
        info!(worker = %self.ctx.name, "worker stopped");
        outcome
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}

/// Handles one delivery, from decoding to settling it.
async fn process(ctx: &Ctx, delivery: Delivery) {
    let config = ctx.server.config();
    let size = delivery.body().len();
    if size > config.max_message_size {
        error!(
            size,
            limit = config.max_message_size,
            "message larger than max_message_size; dead-lettering it"
        );
        let reason = format!("message of {size} bytes is larger than max_message_size");
        settle(delivery.dead_letter(reason).await);
        return;
    }
    let signature = match Signature::from_json(delivery.body()) {
        Ok(sig) if sig.name.is_empty() || sig.uuid.is_empty() => {
            error!(
                task.id = %sig.uuid,
                task.name = %sig.name,
                "message has no task name or UUID; dead-lettering it"
            );
            settle(
                delivery
                    .dead_letter("message has no task name or UUID")
                    .await,
            );
            return;
        }
        Ok(sig) => sig,
        Err(e) => {
            error!(error = %e, size, "message is not a task signature; dead-lettering it");
            settle(delivery.dead_letter(e.to_string()).await);
            return;
        }
    };
    let span = tracing::debug_span!("task", task.name = %signature.name, task.id = %signature.uuid);
    handle(ctx, delivery, signature).instrument(span).await;
}

async fn handle(ctx: &Ctx, delivery: Delivery, signature: Signature) {
    let config = ctx.server.config();
    let Some(task) = ctx.registry.get(&signature.name) else {
        if signature.ignore_when_task_not_registered {
            warn!("task is not registered; dropping it (IgnoreWhenTaskNotRegistered)");
            settle(delivery.ack().await);
        } else {
            warn!(
                delay = ?config.requeue_delay,
                "task is not registered here; handing it back to the broker"
            );
            let delay = config.requeue_delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                settle(delivery.requeue().await);
            });
        }
        return;
    };

    if let Some(wait) = too_early(&signature, config.eta_tolerance) {
        debug!(?wait, "message arrived before its ETA; delaying it again");
        let mut message = Message::new(ctx.server.routing_key(&signature), delivery.body().clone());
        message.priority = signature.priority;
        message.headers = signature.headers.clone();
        message.delay = Some(wait);
        match Box::pin(ctx.server.broker().publish(message)).await {
            Ok(()) => settle(delivery.ack().await),
            Err(e) => give_back(ctx, delivery, &e),
        }
        return;
    }

    match execute(ctx, task, signature).await {
        Ok(()) => settle(delivery.ack().await),
        Err(e) => give_back(ctx, delivery, &e),
    }
}

/// Runs the task and records its outcome; an error means the outcome could not be recorded or
/// its follow-ups not sent, and the message must be delivered again.
async fn execute(ctx: &Ctx, task: &'static TaskDescriptor, mut signature: Signature) -> Result<()> {
    set_state(ctx, &signature, State::Received, None, String::new()).await?;
    set_state(ctx, &signature, State::Started, None, String::new()).await?;
    // A task that may be retried keeps its arguments for the retry.
    let args = if signature.retry_count > 0 {
        signature.args.clone()
    } else {
        std::mem::take(&mut signature.args)
    };
    let outcome = run(task, args).await;
    match outcome {
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

async fn succeeded(ctx: &Ctx, mut signature: Signature, results: Vec<TaskResult>) -> Result<()> {
    debug!(results = results.len(), "task succeeded");
    let callbacks = std::mem::take(&mut signature.on_success);
    let pass_results = !signature.immutable && !callbacks.is_empty();
    let for_callbacks = if pass_results {
        results.clone()
    } else {
        Vec::new()
    };
    set_state(
        ctx,
        &signature,
        State::Success,
        Some(results),
        String::new(),
    )
    .await?;
    if signature.chord_callback.is_some() {
        Box::pin(finish_group_member(ctx, &signature)).await?;
    }
    for mut callback in callbacks {
        if pass_results {
            callback
                .args
                .extend(for_callbacks.iter().cloned().map(Arg::from));
        }
        Box::pin(ctx.server.publish(callback)).await?;
    }
    Ok(())
}

async fn failed(ctx: &Ctx, mut signature: Signature, err: TaskError) -> Result<()> {
    let retryable = !matches!(err.kind(), TaskErrorKind::BadArgs);
    if retryable && signature.retry_count > 0 {
        let wait = match err.retry_delay() {
            Some(wait) => wait,
            None => {
                signature.retry_timeout = fibonacci_next(signature.retry_timeout);
                Duration::from_secs(u64::try_from(signature.retry_timeout).unwrap_or(0))
            }
        };
        signature.retry_count -= 1;
        warn!(
            error = %err,
            retries_left = signature.retry_count,
            ?wait,
            "task failed; retrying"
        );
        set_state(
            ctx,
            &signature,
            State::Retry,
            None,
            err.message().to_owned(),
        )
        .await?;
        let eta = chrono::Duration::from_std(wait)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .unwrap_or_else(Utc::now);
        signature.eta = Some(GoTime::from(eta));
        // The retry keeps its UUID and arguments; publishing records a fresh PENDING state.
        return ctx.server.publish(signature).await;
    }
    error!(error = %err, "task failed");
    let callbacks = std::mem::take(&mut signature.on_error);
    set_state(
        ctx,
        &signature,
        State::Failure,
        None,
        err.message().to_owned(),
    )
    .await?;
    finish_group_member(ctx, &signature).await?;
    for mut callback in callbacks {
        callback.args.insert(0, string_arg(err.message()));
        ctx.server.publish(callback).await?;
    }
    Ok(())
}

/// After a chord member has finished: if every member has, trigger the chord exactly once. The
/// callback gets the results in the group's order, or, if a member failed, does not run: its
/// state becomes FAILURE and its error callbacks are sent with the member's error.
async fn finish_group_member(ctx: &Ctx, signature: &Signature) -> Result<()> {
    let Some(callback) = &signature.chord_callback else {
        return Ok(());
    };
    if signature.group_uuid.is_empty() {
        return Ok(());
    }
    let Some(backend) = ctx.server.backend() else {
        warn!("a chord member finished, but no result backend is configured to track its group");
        return Ok(());
    };
    let Some(meta) = backend.group_meta(&signature.group_uuid).await? else {
        warn!(group = %signature.group_uuid, "no record of this chord's group; its callback cannot be sent");
        return Ok(());
    };
    if meta.chord_triggered {
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
    if !backend.trigger_chord(&signature.group_uuid).await? {
        return Ok(());
    }
    let mut callback = (**callback).clone();
    if let Some(failed) = states.iter().find(|s| s.state == State::Failure) {
        warn!(group = %signature.group_uuid, member = %failed.task_uuid, "a chord member failed; the callback will not run");
        let message = failed.error.clone();
        set_state(ctx, &callback, State::Failure, None, message.clone()).await?;
        for mut on_error in std::mem::take(&mut callback.on_error) {
            on_error.args.insert(0, string_arg(&message));
            ctx.server.publish(on_error).await?;
        }
        return Ok(());
    }
    debug!(group = %signature.group_uuid, "chord complete; sending its callback");
    if !callback.immutable {
        for state in states {
            callback
                .args
                .extend(state.results.unwrap_or_default().into_iter().map(Arg::from));
        }
    }
    ctx.server.publish(callback).await
}

fn string_arg(message: &str) -> Arg {
    Arg {
        name: String::new(),
        type_name: "string".to_owned(),
        value: message.into(),
    }
}

/// The next Fibonacci number above `n` (Go's `retry.FibonacciNext`): 0 -> 1 -> 2 -> 3 -> 5.
fn fibonacci_next(n: i64) -> i64 {
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

async fn set_state(
    ctx: &Ctx,
    signature: &Signature,
    state: State,
    results: Option<Vec<TaskResult>>,
    error: String,
) -> Result<()> {
    let Some(backend) = ctx.server.backend() else {
        return Ok(());
    };
    backend
        .set_state(TaskState {
            task_uuid: signature.uuid.clone(),
            task_name: signature.name.clone(),
            state,
            results,
            error,
            ..TaskState::default()
        })
        .await
}

/// How long a message must still wait for its ETA, if it arrived too early.
fn too_early(signature: &Signature, tolerance: Duration) -> Option<Duration> {
    let eta = signature.eta?.datetime()?;
    let wait = (eta - Utc::now()).to_std().ok()?;
    (wait > tolerance).then_some(wait)
}

/// The outcome could not be recorded: hand the message back to be delivered again, after a
/// pause so that an unavailable backend does not make it spin.
fn give_back(ctx: &Ctx, delivery: Delivery, err: &Error) {
    error!(error = %err, "could not record the task's outcome; it will be delivered again");
    let delay = ctx.server.config().requeue_delay;
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        settle(delivery.requeue().await);
    });
}

fn settle(result: Result<()>) {
    if let Err(e) = result {
        warn!(error = %e, "settling the message with the broker failed");
    }
}
