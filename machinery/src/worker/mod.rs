//! The worker: consumes task messages, runs the tasks, records their outcome.
//!
//! Per delivery: decode the signature, find the task, record STARTED (Go records RECEIVED
//! first; see the README), run the body (blocking bodies on Tokio's blocking pool, so they never stall the runtime), record
//! SUCCESS with the results or FAILURE with the error (or RETRY and republish it later), send
//! the follow-ups (`OnSuccess` with the results appended unless the task is `Immutable`;
//! `OnError` with the error message prepended), and only then acknowledge the message.
//!
//! Bad input never crashes a worker: a body that is not a signature, or is larger than
//! `max_message_size`, is dead-lettered with a logged reason; arguments that do not fit the task
//! make it a FAILURE with a clear error, so the producer's `get()` returns that error. A
//! panicking task is a FAILURE with the panic message.

mod chord;
mod delivery;
mod in_flight;
mod layers;
#[cfg(feature = "metrics")]
mod metrics;
mod observe;
#[cfg(feature = "opentelemetry")]
mod otel;
mod policy;
#[cfg(feature = "redis")]
mod registry;
mod store;
mod trace;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::broker::Consumer;
use crate::error::{Error, ErrorKind, Result};
use crate::options::{RateLimit, WorkerDefaults};
use crate::server::Server;
use crate::task::Registry;
use crate::task::TaskOutcome;
use crate::wire::Signature;
use crate::TaskError;
#[cfg_attr(not(feature = "redis"), allow(unused_imports))]
pub(crate) use delivery::{derived_uuid, will_retry};
pub use in_flight::Placement;
pub use layers::HARD_LIMIT_EXIT_CODE;
use layers::{AbortOnDrop, Hooks, InFlight, Layer, Layers, RateLimiter, Revoke, Slot, TimeLimits};
use observe::{LogOutcome, Observer, Observers};
use policy::SettlePolicy;
pub(crate) use policy::{ATTEMPTS_HEADER, LAST_ERROR_HEADER};
use store::Store;
pub(crate) use trace::inject as inject_trace_context;
pub(crate) use trace::is_trace_key;
pub(crate) use trace::share as share_trace_context;
pub use trace::{
    DefaultMakeSpan, MakeSpan, TaskSpan, TraceContext, ROOT_HEADER, TRACEPARENT_HEADER,
    TRACESTATE_HEADER,
};

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
    placement: Placement,
    only: Option<Vec<String>>,
    defaults: WorkerDefaults,
    hard_time_limit: Option<Duration>,
    hooks: Hooks,
    tracing: trace::Tracing,
    /// The outcome events.
    log: LogOutcome,
    /// Where the Prometheus metrics are served (over `METRICS_ADDR`).
    metrics_addr: Option<std::net::SocketAddr>,
    /// Redis URL of the cluster-wide rate limits.
    #[cfg(feature = "redis")]
    cluster_rate_limits: Option<String>,
}

impl WorkerBuilder {
    pub(crate) fn new(server: Server) -> Self {
        WorkerBuilder {
            server,
            name: None,
            queue: None,
            concurrency: 16,
            placement: Placement::default(),
            only: None,
            defaults: WorkerDefaults::default(),
            hard_time_limit: None,
            hooks: Hooks::default(),
            tracing: trace::Tracing::default(),
            log: LogOutcome::default(),
            metrics_addr: None,
            #[cfg(feature = "redis")]
            cluster_rate_limits: None,
        }
    }

    /// Makes the span each execution of a task runs in (default: [`DefaultMakeSpan`], an INFO
    /// span `task` with `task.name`, `task.id`, `attempt`, `queue`, `worker`, and `group`,
    /// `chain` where present, and `trace_id`), as tower-http's `MakeSpan` makes a request's.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// use machinery::worker::{DefaultMakeSpan, TaskSpan};
    /// // The default span, at DEBUG:
    /// let builder = server.worker().make_span(DefaultMakeSpan::new().level(tracing::Level::DEBUG));
    /// // Or a span of your own:
    /// let builder = server.worker().make_span(|task: &TaskSpan<'_>| {
    ///     tracing::info_span!("job", job = task.name, id = task.id, trace_id = %task.trace.trace_id_display())
    /// });
    /// # }
    /// ```
    pub fn make_span(mut self, make_span: impl MakeSpan) -> Self {
        self.tracing.make_span = Box::new(make_span);
        self
    }

    /// The level of the `task succeeded` event each successful execution logs (default DEBUG,
    /// as tower-http's `DefaultOnResponse`: a line per task at INFO costs a formatting
    /// subscriber about as much as the span itself); failures log at WARN (retried) and ERROR
    /// (failed for good, dead-lettered), whatever this says.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// let builder = server.worker().success_level(tracing::Level::INFO);
    /// # }
    /// ```
    pub fn success_level(mut self, level: tracing::Level) -> Self {
        self.log.success = level;
        self
    }

    /// Serves this worker's Prometheus metrics on `addr` (`/metrics`), replacing the config's
    /// `METRICS_ADDR`; port 0 picks a free port ([`WorkerHandle::metrics_addr`] says which).
    /// Needs the `metrics` feature: without it, [`build`](Self::build) fails.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
    /// let worker = server.worker().metrics_addr(([127, 0, 0, 1], 9090).into()).spawn().await?;
    /// println!("metrics on http://{}/metrics", worker.metrics_addr().unwrap());
    /// # Ok(()) }
    /// ```
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
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

    /// Where the deliveries run ([`Placement`]; default [`Placement::Adaptive`]: in place,
    /// as futures of the worker's own task, while that task has time to spare, and each a
    /// Tokio task of its own while it is the busy one).
    ///
    /// In place, the worker's own work for each delivery (decoding, spans, recording the
    /// outcome) needs no spawn and no wake of another thread: on a drain of no-op tasks from
    /// RabbitMQ with Redis results it took about an eighth less CPU per task than spawned, and
    /// drained faster (README, "Placement"). An async body runs in its delivery until it
    /// first waits, then goes on as a task of its own, inside its layers (time limits,
    /// revoke); with [`Placement::Adaptive`], one that starts after the worker's pass over its
    /// deliveries in place has run 2 ms, just after such a long pass, or while the worker
    /// spawns its deliveries, goes on its own task at once. Blocking (sync) bodies run on Tokio's blocking threads either
    /// way. With [`Worker::run`] the worker's task is the caller's.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
    /// use machinery::worker::Placement;
    ///
    /// let worker = server.worker().placement(Placement::InPlace).spawn().await?;
    /// # Ok(()) }
    /// ```
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// `true`: [`Placement::InPlace`], every delivery in place; `false`:
    /// [`Placement::Spawned`], each a Tokio task of its own, as Go runs each delivery in a
    /// goroutine of its own (`v2/brokers/amqp/amqp.go`, `consume`). Without either, the
    /// worker chooses as it goes ([`Placement::Adaptive`]; see [`placement`](Self::placement)).
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
    /// let worker = server.worker().in_place(true).spawn().await?;
    /// # Ok(()) }
    /// ```
    pub fn in_place(self, in_place: bool) -> Self {
        self.placement(if in_place {
            Placement::InPlace
        } else {
            Placement::Spawned
        })
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

    /// The time limit of tasks whose signature and `#[task]` set none (the "app" layer of the
    /// task options). See [`Signature::with_timeout`](crate::Signature::with_timeout).
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
    /// use std::time::Duration;
    /// server.worker().default_timeout(Duration::from_secs(300)).build()?.run().await
    /// # }
    /// ```
    pub fn default_timeout(mut self, limit: Duration) -> Self {
        self.defaults.timeout = Some(limit);
        self
    }

    /// Ends the process (exit code [`HARD_LIMIT_EXIT_CODE`]) when a task body is still running
    /// `grace` after its time limit: a blocking body cannot be cancelled, and an async body
    /// that blocks its thread never reaches the `.await` where it would be. Off by default.
    /// Celery's hard time limit kills its child process the same way.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
    /// use std::time::Duration;
    /// let worker = server.worker().hard_time_limit(Duration::from_secs(10)).build()?;
    /// # Ok(()) }
    /// ```
    pub fn hard_time_limit(mut self, grace: Duration) -> Self {
        self.hard_time_limit = Some(grace);
        self
    }

    /// How many times a task may ask to be retried later ([`TaskError::retry_in`]) when its
    /// signature and `#[task]` set no `max_retry_later`; the default is
    /// [`DEFAULT_MAX_RETRY_LATER`](crate::options::DEFAULT_MAX_RETRY_LATER).
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// let builder = server.worker().max_retry_later(10);
    /// # }
    /// ```
    pub fn max_retry_later(mut self, count: u32) -> Self {
        self.defaults.max_retry_later = Some(count);
        self
    }

    /// Limits how often this worker starts the task `name`, replacing the task's own
    /// `rate_limit`. The limit is `"100/s"`, `"10/m"`, `"1/h"` or `"N/<duration>"`.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// let builder = server.worker().rate_limit("send_email", "10/s".parse().unwrap());
    /// # }
    /// ```
    pub fn rate_limit(mut self, name: impl Into<String>, limit: RateLimit) -> Self {
        self.defaults.rate_limits.insert(name.into(), limit);
        self
    }

    /// Keeps the rate limits of this worker's tasks in the Redis server at `url` (read as the
    /// Redis result backend reads it; often the same server), so that all workers using it
    /// share each task's limit: N workers together start a `"100/s"` task at most 100 times a
    /// second. Each task's next free start is kept under the key `machinery_rate_<task name>`,
    /// on Redis's clock. While Redis does not answer, each worker keeps to the limits on its
    /// own (and logs it once); the tasks never fail for it. Go has no rate limits.
    ///
    /// ```
    /// # let server = machinery::Server::from_parts(machinery::Config::default(), std::sync::Arc::new(machinery::broker::memory::MemoryBroker::open("docs", "machinery_tasks", "machinery_task")), None);
    /// let builder = server.worker().cluster_rate_limits("redis://127.0.0.1:6379/");
    /// ```
    #[cfg(feature = "redis")]
    pub fn cluster_rate_limits(mut self, url: impl Into<String>) -> Self {
        self.cluster_rate_limits = Some(url.into());
        self
    }

    /// Calls `handler` with the signature just before each task body runs (Go's
    /// `SetPreTaskHandler`). A handler that panics is logged; the task runs as usual.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// let builder = server.worker().pre_task_handler(|sig| println!("running {}", sig.uuid));
    /// # }
    /// ```
    pub fn pre_task_handler(
        mut self,
        handler: impl Fn(&Signature) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.pre = Some(Arc::new(handler));
        self
    }

    /// Calls `handler` with the signature and the body's outcome after each task body (Go's
    /// `SetPostTaskHandler`). A handler that panics is logged; the outcome is recorded as usual.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// let builder = server
    ///     .worker()
    ///     .post_task_handler(|sig, outcome| println!("{} ok: {}", sig.uuid, outcome.is_ok()));
    /// # }
    /// ```
    pub fn post_task_handler(
        mut self,
        handler: impl Fn(&Signature, &TaskOutcome) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.post = Some(Arc::new(handler));
        self
    }

    /// Calls `handler` with the signature and the error of each task body that fails (Go's
    /// `SetErrorHandler`). It is called for every failed run, a retried one too (Go calls it only
    /// when the task fails for good, from `taskFailed`). A handler that panics is logged.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) {
    /// let builder = server
    ///     .worker()
    ///     .error_handler(|sig, err| eprintln!("{} failed: {err}", sig.name));
    /// # }
    /// ```
    pub fn error_handler(
        mut self,
        handler: impl Fn(&Signature, &TaskError) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.error = Some(Arc::new(handler));
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
        let config = self.server.config();
        let policy = SettlePolicy {
            max_deliveries: config.max_deliveries,
            backoff: config.requeue_delay,
        };
        #[cfg_attr(not(feature = "metrics"), allow(unused_mut))]
        let mut observers: Vec<Arc<dyn Observer>> = vec![Arc::new(self.log)];
        let metrics_addr = self.metrics_addr.or(config.metrics_addr);
        #[cfg(feature = "metrics")]
        let metrics = metrics_addr.map(|addr| {
            let metrics = Arc::new(metrics::Metrics::new(self.concurrency, &registry.names()));
            observers.push(metrics.clone());
            (addr, metrics)
        });
        #[cfg(not(feature = "metrics"))]
        if let Some(addr) = metrics_addr {
            return Err(Error::config(format!(
                "metrics are asked for on {addr} (METRICS_ADDR), but machinery was built without its `metrics` feature"
            )));
        }
        let observers = Observers::new(observers);
        let store = Store::new(self.server.backend().cloned(), config.store_retry_timeout)
            .observed_by(observers.clone());
        let mut others: Vec<Arc<dyn Layer>> = Vec::new();
        // The worker registry and recent-task index: a census layer feeding a writer.
        #[cfg(feature = "redis")]
        let census = registry::Registry::plan(config, &name, self.concurrency)?;
        #[cfg(feature = "redis")]
        if let Some(census) = &census {
            others.push(Arc::new(layers::CensusLayer {
                census: census.census(),
            }));
        }
        // Rate limits: a layer only when a task this worker runs has one.
        let limited: Vec<&'static str> = registry
            .names()
            .into_iter()
            .filter(|name| {
                self.defaults.rate_limits.contains_key(*name)
                    || registry
                        .get(name)
                        .is_some_and(|task| task.options.get_rate_limit().is_some())
            })
            .collect();
        if !limited.is_empty() {
            others.push(Arc::new(RateLimiter::new(
                limited,
                #[cfg(feature = "redis")]
                self.cluster_rate_limits
                    .as_deref()
                    .map(|url| (url, &config.redis)),
            )?));
        }
        if !self.hooks.is_empty() {
            others.push(Arc::new(self.hooks));
        }
        // Revokes are read from the store: without one, or with `revoke_poll` 0, nothing
        // watches the running tasks (a revoked task still never starts).
        let revokes = match store.backend() {
            Some(backend) if !config.revoke_poll.is_zero() => {
                let layer = Revoke::default();
                let watcher = RevokeWatcher {
                    in_flight: layer.in_flight(),
                    backend: backend.clone(),
                    every: config.revoke_poll,
                };
                others.push(Arc::new(layer));
                Some(watcher)
            }
            _ => None,
        };
        let layers = Layers::new(
            config.eta_tolerance,
            others,
            TimeLimits::new(self.hard_time_limit),
        );
        Ok(Worker {
            ctx: Arc::new(Ctx {
                registry,
                queue: queue.clone(),
                tracing: self.tracing,
                observers,
                #[cfg(feature = "metrics")]
                metrics,
                name,
                policy,
                store,
                groups: chord::GroupCache::default(),
                layers,
                revokes,
                #[cfg(feature = "redis")]
                census,
                defaults: self.defaults,
                server: self.server,
            }),
            queue,
            concurrency: self.concurrency,
            placement: self.placement,
        })
    }

    /// Builds the worker, starts consuming, and runs it in the background until
    /// [`WorkerHandle::shutdown`]. When this returns, the worker's queue is declared and
    /// consumed: tasks sent from now on reach it.
    pub async fn spawn(self) -> Result<WorkerHandle> {
        let worker = self.build()?;
        let metrics = worker.serve_metrics().await?;
        let consumer = worker.consume().await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics_addr = metrics.as_ref().map(|m| m.addr);
        let join = tokio::spawn(layers::offload::passes(worker.serve(
            consumer,
            metrics,
            async move {
                let _ = stopped.await;
            },
        )));
        Ok(WorkerHandle {
            stop,
            join,
            metrics_addr,
        })
    }
}

/// A worker in the background; see [`WorkerBuilder::spawn`].
///
/// Dropping the handle stops the worker as [`shutdown`](Self::shutdown) does, without waiting:
/// keep it for as long as the worker should run.
#[derive(Debug)]
#[must_use = "dropping a WorkerHandle stops the worker at once; keep it, then call shutdown()"]
pub struct WorkerHandle {
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<()>>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl WorkerHandle {
    /// Where the worker serves its Prometheus metrics, if it does
    /// ([`WorkerBuilder::metrics_addr`], `METRICS_ADDR`): the bound address, with the port
    /// picked when 0 was asked for.
    ///
    /// ```no_run
    /// # async fn doc(server: machinery::Server) -> machinery::Result<()> {
    /// let worker = server.worker().spawn().await?;
    /// assert_eq!(worker.metrics_addr(), None); // neither METRICS_ADDR nor the builder asked
    /// # Ok(()) }
    /// ```
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Stops taking messages, waits for the tasks in flight and returns the worker's result.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        self.join
            .await
            .map_err(|e| Error::new(ErrorKind::Shutdown, format!("the worker task failed: {e}")))?
    }

    /// Like [`shutdown`](Self::shutdown), but waits at most `timeout` for the tasks in flight;
    /// then aborts the worker and returns an error of kind [`ErrorKind::Shutdown`]. Messages
    /// not yet acknowledged go back to the queue (a sync task body already running on the
    /// blocking pool runs to its end, unobserved).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = machinery::Server::new(
    ///     machinery::Config::builder().broker("memory://shutdown-docs").build()?,
    /// ).await?;
    /// let worker = server.worker().spawn().await?;
    /// worker.shutdown_timeout(Duration::from_secs(5)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown_timeout(mut self, timeout: Duration) -> Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(timeout, &mut self.join).await {
            Ok(joined) => joined.map_err(|e| {
                Error::new(ErrorKind::Shutdown, format!("the worker task failed: {e}"))
            })?,
            Err(_) => {
                self.join.abort();
                Err(Error::new(
                    ErrorKind::Shutdown,
                    format!("the tasks in flight did not finish within {timeout:?}; aborted"),
                ))
            }
        }
    }

    /// Stops the worker at once, without waiting for the tasks in flight (their messages go
    /// back to the queue).
    pub fn abort(self) {
        self.join.abort();
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
    placement: Placement,
}

#[derive(Debug)]
struct Ctx {
    registry: Registry,
    server: Server,
    name: String,
    /// The queue the worker consumes.
    queue: String,
    tracing: trace::Tracing,
    observers: Observers,
    /// The metrics, and where to serve them.
    #[cfg(feature = "metrics")]
    metrics: Option<(std::net::SocketAddr, Arc<metrics::Metrics>)>,
    policy: SettlePolicy,
    store: Store,
    groups: chord::GroupCache,
    layers: Layers,
    /// The revoke watcher's part, when running tasks are watched for revokes.
    revokes: Option<RevokeWatcher>,
    /// The worker registry, when it is on.
    #[cfg(feature = "redis")]
    census: Option<registry::Registry>,
    defaults: WorkerDefaults,
}

/// What the revoke watcher needs; it runs while the worker serves (see [`Revoke`]).
#[derive(Debug)]
struct RevokeWatcher {
    in_flight: Arc<InFlight>,
    backend: Arc<dyn crate::backend::ResultBackend>,
    every: Duration,
}

impl Ctx {
    /// The label a task name is counted under: a registered task's own name, else
    /// [`observe::UNREGISTERED`] (names from the wire are not labels).
    fn label(&self, name: &str) -> &'static str {
        self.registry
            .get(name)
            .map_or(observe::UNREGISTERED, |task| task.name)
    }
}

/// The metrics listener of a running worker; stops with it.
struct MetricsServer {
    addr: std::net::SocketAddr,
    _tasks: Vec<AbortOnDrop<()>>,
}

impl Worker {
    /// Binds the metrics listener, when metrics are on, and starts sampling the queue's depth.
    #[cfg(feature = "metrics")]
    async fn serve_metrics(&self) -> Result<Option<MetricsServer>> {
        let Some((addr, metrics)) = &self.ctx.metrics else {
            return Ok(None);
        };
        let (addr, server) = metrics::serve(*addr, metrics.clone()).await?;
        let sampler = tokio::spawn(metrics::sample(
            metrics.clone(),
            self.ctx.server.broker().clone(),
            self.queue.clone(),
        ));
        info!(worker = %self.ctx.name, %addr, "serving metrics on /metrics");
        Ok(Some(MetricsServer {
            addr,
            _tasks: vec![AbortOnDrop(server), AbortOnDrop(sampler)],
        }))
    }

    #[cfg(not(feature = "metrics"))]
    async fn serve_metrics(&self) -> Result<Option<MetricsServer>> {
        Ok(None)
    }

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
        let metrics = self.serve_metrics().await?;
        let consumer = self.consume().await?;
        layers::offload::passes(self.serve(consumer, metrics, shutdown)).await
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
        metrics: Option<MetricsServer>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        // Served until the worker stops.
        let _metrics = metrics;
        info!(
            worker = %self.ctx.name,
            queue = %self.queue,
            concurrency = self.concurrency,
            placement = ?self.placement,
            tasks = self.ctx.registry.len(),
            "worker started"
        );
        let permits = Arc::new(Semaphore::new(self.concurrency));
        // A call that gave its slot up while it waited (a rate limit) asks for one back here.
        let reclaim = Arc::new(tokio::sync::Notify::new());
        // The bytes of message bodies in flight (MAX_INFLIGHT_BYTES).
        let budget_bytes = self
            .ctx
            .server
            .config()
            .max_inflight_bytes
            .min(Semaphore::MAX_PERMITS);
        let budget = Arc::new(Semaphore::new(budget_bytes));
        // The revoke watcher ends with its worker, however the worker ends (returned, or
        // dropped when aborted).
        let _watcher = self.ctx.revokes.as_ref().map(|w| {
            AbortOnDrop(tokio::spawn(layers::watch_revokes(
                w.in_flight.clone(),
                w.backend.clone(),
                w.every,
            )))
        });
        #[cfg(feature = "redis")]
        let census = self.ctx.census.as_ref().map(|c| c.start(&self.queue));
        let mut outcome = Ok(());
        let mut in_flight = in_flight::Deliveries::new(self.placement, &self.ctx.name);
        tokio::pin!(shutdown);
        'serve: loop {
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                never = in_flight.drive() => match never {},
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            // While the result store is unreachable, take nothing new (the tasks in hand keep
            // retrying their writes).
            if !self.ctx.store.is_up() {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    never = in_flight.drive() => match never {},
                    () = self.ctx.store.wait_up() => {}
                }
            }
            let next = tokio::select! {
                biased;
                () = &mut shutdown => break,
                never = in_flight.drive() => match never {},
                // Yield the slot held for the next message to the call that wants it back.
                () = reclaim.notified() => {
                    drop(permit);
                    continue;
                }
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    // A message larger than the whole budget runs alone.
                    let size = delivery.body().len().clamp(1, budget_bytes);
                    let size = u32::try_from(size).unwrap_or(u32::MAX);
                    // While it waits for the bytes, the slot goes to a call that asks for it
                    // back (the bytes may be that call's), and is taken again after.
                    let mut held = Some(permit);
                    let bytes = match budget.clone().try_acquire_many_owned(size) {
                        Ok(bytes) => bytes,
                        Err(_) => loop {
                            tokio::select! {
                                biased;
                                () = &mut shutdown => break 'serve,
                                never = in_flight.drive() => match never {},
                                () = reclaim.notified(), if held.is_some() => held = None,
                                bytes = budget.clone().acquire_many_owned(size) => match bytes {
                                    Ok(bytes) => break bytes,
                                    Err(_) => break 'serve,
                                },
                            }
                        },
                    };
                    let permit = match held {
                        Some(permit) => permit,
                        None => tokio::select! {
                            biased;
                            () = &mut shutdown => break,
                            never = in_flight.drive() => match never {},
                            permit = permits.clone().acquire_owned() => match permit {
                                Ok(permit) => permit,
                                Err(_) => break,
                            },
                        },
                    };
                    let ctx = self.ctx.clone();
                    let slot = Slot::new(permit, permits.clone(), reclaim.clone());
                    // Deliveries live in the set: if the worker is aborted, so are they, and
                    // their unsettled deliveries go back to the queue. Boxed: the delivery's
                    // future (under 1 KiB) would be copied on each change of stage.
                    in_flight.push(Box::pin(async move {
                        delivery::process(&ctx, delivery, slot).await;
                        drop(bytes);
                    }));
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
        // Deliveries in place keep running while the consumer is cancelled.
        let cancelled = tokio::select! {
            cancelled = consumer.cancel() => cancelled,
            never = in_flight.drive() => match never {},
        };
        if let Err(e) = cancelled {
            warn!(worker = %self.ctx.name, error = %e, "cancelling the consumer failed");
        }
        debug!(worker = %self.ctx.name, "waiting for the tasks in flight");
        in_flight.drain().await;
        drop(permits);
        if let Err(e) = consumer.close().await {
            warn!(worker = %self.ctx.name, error = %e, "closing the consumer failed");
        }
        #[cfg(feature = "redis")]
        if let Some(census) = census {
            census.stop().await;
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
