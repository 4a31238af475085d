//! Periodic tasks, chains, groups and chords (Go's `RegisterPeriodicTask`,
//! `RegisterPeriodicChain`, `RegisterPeriodicGroup`, `RegisterPeriodicChord`).
//!
//! A [`Scheduler`] built from a [`Server`] sends a fresh copy of each registered signature on
//! every tick of its [`Schedule`] (a five-field cron spec or a descriptor such as `@every 1m`,
//! read as Go's `cron.ParseStandard` reads it). Before it sends, it takes a lock for the tick,
//! so that any number of scheduler processes (Go's and Rust's alike) send each tick once:
//!
//! - the key is Go's `machinery_lock_<binary basename><name><spec>` ([`lock_key`]); the
//!   binary-name part defaults to this process's (Go's `os.Args[0]`) and is set with
//!   [`Scheduler::binary_name`] to share ticks with a Go binary of another name;
//! - the value is the next tick in Unix nanoseconds minus one, and the key expires then;
//! - the lock is the Redis server named by `LOCK` ([`Config::lock`](crate::Config::lock)), as
//!   Go's `LockFactory` reads it, or, without one, the in-process [`MemoryLock`] (Go's eager
//!   lock): then every process sends every tick.
//!
//! Each tick sends new task UUIDs (a group and a chord also a new group UUID), so every run has
//! its own result. A tick whose lock or send fails is logged and counted
//! ([`PeriodicInfo`]); the next tick runs as usual.
//!
//! ```
//! use machinery::{task, Config, Server};
//!
//! #[task]
//! fn report(kind: String) -> String { kind }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> machinery::Result<()> {
//! let server = Server::new(Config::builder().broker("memory://periodic-docs").build()?).await?;
//! let scheduler = server.scheduler();
//! scheduler.register_task("@every 1m", "daily-report", report::signature("daily".into()))?;
//! assert!(scheduler.register_task("61 * * * *", "bad", report::signature("x".into())).is_err());
//!
//! let running = scheduler.spawn().await?;
//! assert_eq!(scheduler.list()[0].name, "daily-report");
//! assert!(scheduler.remove("daily-report"));
//! running.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod lock;
mod schedule;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tracing::{debug, error, trace, warn};

use crate::error::{Error, ErrorKind, Result};
use crate::group::{Chord, Group};
use crate::server::Server;
use crate::signature::{Sendable, Signature};
use crate::wire::{self, TaskResult};

#[cfg(feature = "redis")]
pub use self::lock::RedisLock;
pub use self::lock::{default_binary_name, lock_key, MemoryLock, PeriodicLock};
pub use self::schedule::Schedule;

/// Sends registered signatures on their schedules; see the [module docs](self).
///
/// Cheap to clone; clones share the registered schedules, which can be added, listed and
/// removed before and while the scheduler runs.
///
/// ```
/// use machinery::{task, Config, Server};
/// # #[task] fn tick() {}
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// let server = Server::new(Config::builder().broker("memory://scheduler-type-docs").build()?).await?;
/// let scheduler = server.scheduler();
/// let running = scheduler.spawn().await?;
/// // Registered while running: fires from the next whole second on.
/// scheduler.register_task("@every 1s", "tick", tick::signature())?;
/// running.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Scheduler {
    server: Server,
    binary_name: String,
    lock: Option<Arc<dyn PeriodicLock>>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    entries: Mutex<Vec<Entry>>,
    changed: Notify,
    running: AtomicBool,
}

struct Entry {
    name: String,
    schedule: Schedule,
    kind: PeriodicKind,
    job: Arc<Job>,
    next: Option<DateTime<Utc>>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
}

/// What a registered schedule sends.
enum Job {
    /// A task or a chain (the links nested in `OnSuccess`).
    Task(wire::Signature),
    Group(Vec<wire::Signature>),
    Chord {
        members: Vec<wire::Signature>,
        callback: wire::Signature,
    },
}

/// What kind of work a schedule sends.
///
/// ```
/// # use machinery::task;
/// use machinery::periodic::PeriodicKind;
/// # #[task] fn tick() {}
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://kind-docs").build()?).await?;
/// let scheduler = server.scheduler();
/// scheduler.register_task("@hourly", "tick", tick::signature())?;
/// assert_eq!(scheduler.list()[0].kind, PeriodicKind::Task);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeriodicKind {
    /// [`Scheduler::register_task`] (Go's `RegisterPeriodicTask`).
    Task,
    /// [`Scheduler::register_chain`] (Go's `RegisterPeriodicChain`).
    Chain,
    /// [`Scheduler::register_group`] (Go's `RegisterPeriodicGroup`).
    Group,
    /// [`Scheduler::register_chord`] (Go's `RegisterPeriodicChord`).
    Chord,
}

/// A registered schedule, as [`Scheduler::list`] reports it.
///
/// ```
/// # use machinery::task;
/// # #[task] fn tick() {}
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://info-docs").build()?).await?;
/// let scheduler = server.scheduler();
/// scheduler.register_task("@every 5s", "tick", tick::signature())?;
/// let info = &scheduler.list()[0];
/// assert_eq!((info.sent, info.failed, info.skipped), (0, 0, 0));
/// assert!(info.next.is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeriodicInfo {
    /// The name it was registered with.
    pub name: String,
    /// The spec it was registered with.
    pub spec: String,
    /// What it sends.
    pub kind: PeriodicKind,
    /// When it fires next (`None` when it never will, or once removed).
    pub next: Option<DateTime<Utc>>,
    /// Ticks this process sent.
    pub sent: u64,
    /// Ticks this process took the lock for but could not send, or could not ask the lock for.
    pub failed: u64,
    /// Ticks another process (or scheduler) had the lock for.
    pub skipped: u64,
}

impl Server {
    /// A [`Scheduler`] of periodic tasks that sends with this server (Go registers them on
    /// its `Server`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let server = machinery::Server::new(
    ///     machinery::Config::builder().broker("memory://scheduler-docs").build()?,
    /// ).await?;
    /// let scheduler = server.scheduler().binary_name("machinery-worker");
    /// assert!(scheduler.list().is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn scheduler(&self) -> Scheduler {
        Scheduler::new(self.clone())
    }
}

impl Scheduler {
    /// A scheduler that sends with `server`; the same as [`Server::scheduler`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://new-docs").build()?).await?;
    /// let scheduler = machinery::periodic::Scheduler::new(server.clone());
    /// # let _ = scheduler;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(server: Server) -> Scheduler {
        Scheduler {
            server,
            binary_name: default_binary_name(),
            lock: None,
            shared: Arc::default(),
        }
    }

    /// Sets the binary-name part of the lock keys (default: [`default_binary_name`]), to share
    /// ticks with Go schedulers whose binary has that name. Takes effect at
    /// [`spawn`](Self::spawn).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://bn-docs").build()?).await?;
    /// let scheduler = server.scheduler().binary_name("my-go-worker");
    /// // Ticks of "report" every minute lock `machinery_lock_my-go-workerreport@every 1m`.
    /// # let _ = scheduler;
    /// # Ok(())
    /// # }
    /// ```
    pub fn binary_name(mut self, name: impl Into<String>) -> Scheduler {
        self.binary_name = name.into();
        self
    }

    /// Uses `lock` instead of the one the server's configuration names (`LOCK`).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use machinery::periodic::MemoryLock;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://lock-docs").build()?).await?;
    /// let scheduler = server.scheduler().with_lock(Arc::new(MemoryLock::new()));
    /// # let _ = scheduler;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lock(mut self, lock: Arc<dyn PeriodicLock>) -> Scheduler {
        self.lock = Some(lock);
        self
    }

    /// Sends `signature` on every tick of `spec` (Go's `RegisterPeriodicTask`). A chain works
    /// too; [`register_chain`](Self::register_chain) only labels it as one.
    ///
    /// Fails with [`ErrorKind::Config`] for a spec Go's `cron.ParseStandard` refuses or a name
    /// already registered, and with the signature's own error if it could not be built.
    ///
    /// ```
    /// # use machinery::task;
    /// # #[task] fn cleanup() {}
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://rt-docs").build()?).await?;
    /// let scheduler = server.scheduler();
    /// scheduler.register_task("0 3 * * *", "nightly-cleanup", cleanup::signature())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn register_task<O, K: Sendable>(
        &self,
        spec: &str,
        name: &str,
        signature: Signature<O, K>,
    ) -> Result<()> {
        let (raw, _, _) = signature.into_parts()?;
        self.register(spec, name, PeriodicKind::Task, Job::Task(raw))
    }

    /// Sends a chain on every tick of `spec` (Go's `RegisterPeriodicChain`).
    ///
    /// ```
    /// # use machinery::task;
    /// # #[task] fn add(a: i64, b: i64) -> i64 { a + b }
    /// # #[task] fn double(#[chained] x: i64) -> i64 { 2 * x }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://rc-docs").build()?).await?;
    /// let chain = add::signature(1, 2).then(double::signature());
    /// server.scheduler().register_chain("@hourly", "sums", chain)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn register_chain<O, K: Sendable>(
        &self,
        spec: &str,
        name: &str,
        chain: Signature<O, K>,
    ) -> Result<()> {
        let (raw, _, _) = chain.into_parts()?;
        self.register(spec, name, PeriodicKind::Chain, Job::Task(raw))
    }

    /// Sends a group on every tick of `spec` (Go's `RegisterPeriodicGroup`; Go's
    /// `sendConcurrency` has no counterpart: the members are published in one batch).
    ///
    /// ```
    /// # use machinery::{task, Group};
    /// # #[task] fn ping(host: String) -> bool { !host.is_empty() }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://rg-docs").build()?).await?;
    /// let group = Group::new([ping::signature("a".into()), ping::signature("b".into())]);
    /// server.scheduler().register_group("*/5 * * * *", "pings", group)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn register_group<O>(&self, spec: &str, name: &str, group: Group<O>) -> Result<()> {
        if let Some(error) = group.error {
            return Err(error);
        }
        let members = group.members.into_iter().map(|(raw, _)| raw).collect();
        self.register(spec, name, PeriodicKind::Group, Job::Group(members))
    }

    /// Sends a chord on every tick of `spec` (Go's `RegisterPeriodicChord`). A chord needs a
    /// result backend; without one this is an error of kind [`ErrorKind::Unsupported`] here,
    /// where Go fails on every tick.
    ///
    /// ```
    /// # use machinery::{task, Group};
    /// # #[task] fn count(table: String) -> i64 { table.len() as i64 }
    /// # #[task] fn total(#[variadic] counts: Vec<i64>) -> i64 { counts.iter().sum() }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://rch-docs").build()?).await?;
    /// let chord = Group::new([count::signature("a".into()), count::signature("b".into())])
    ///     .chord(total::signature(vec![]));
    /// server.scheduler().register_chord("@daily", "totals", chord)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn register_chord<O>(&self, spec: &str, name: &str, chord: Chord<O>) -> Result<()> {
        if let Some(error) = chord.error {
            return Err(error);
        }
        let Some((callback, _, _)) = chord.callback else {
            return Err(Error::encode("a chord needs a callback"));
        };
        if chord.members.is_empty() {
            return Err(Error::encode(
                "a chord needs at least one task in its group",
            ));
        }
        if self.server.backend().is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "a chord needs a result backend to know when its group has finished",
            ));
        }
        let job = Job::Chord {
            members: chord.members,
            callback,
        };
        self.register(spec, name, PeriodicKind::Chord, job)
    }

    fn register(&self, spec: &str, name: &str, kind: PeriodicKind, job: Job) -> Result<()> {
        let schedule = Schedule::parse(spec)?;
        let mut entries = crate::lock(&self.shared.entries);
        if entries.iter().any(|e| e.name == name) {
            return Err(Error::config(format!(
                "a periodic task named `{name}` is already registered"
            )));
        }
        entries.push(Entry {
            name: name.to_owned(),
            next: schedule.next_after(Utc::now()),
            schedule,
            kind,
            job: Arc::new(job),
            stats: Arc::default(),
        });
        drop(entries);
        debug!(
            periodic.name = name,
            periodic.spec = spec,
            "periodic task registered"
        );
        self.shared.changed.notify_one();
        Ok(())
    }

    /// The registered schedules, in registration order.
    ///
    /// ```
    /// # use machinery::task;
    /// # #[task] fn tick() {}
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://list-docs").build()?).await?;
    /// let scheduler = server.scheduler();
    /// scheduler.register_task("@every 10s", "tick", tick::signature())?;
    /// let listed = scheduler.list();
    /// assert_eq!((listed[0].name.as_str(), listed[0].spec.as_str()), ("tick", "@every 10s"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn list(&self) -> Vec<PeriodicInfo> {
        crate::lock(&self.shared.entries)
            .iter()
            .map(|e| PeriodicInfo {
                name: e.name.clone(),
                spec: e.schedule.spec().to_owned(),
                kind: e.kind,
                next: e.next,
                sent: e.stats.sent.load(Ordering::Relaxed),
                failed: e.stats.failed.load(Ordering::Relaxed),
                skipped: e.stats.skipped.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Removes the schedule named `name`; `false` if there was none. A tick already being sent
    /// finishes; no later tick fires. (Go cannot remove one: machinery #794.)
    ///
    /// ```
    /// # use machinery::task;
    /// # #[task] fn tick() {}
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://rm-docs").build()?).await?;
    /// let scheduler = server.scheduler();
    /// scheduler.register_task("@every 10s", "tick", tick::signature())?;
    /// assert!(scheduler.remove("tick"));
    /// assert!(!scheduler.remove("tick"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn remove(&self, name: &str) -> bool {
        let mut entries = crate::lock(&self.shared.entries);
        let before = entries.len();
        entries.retain(|e| e.name != name);
        let removed = entries.len() != before;
        drop(entries);
        if removed {
            debug!(periodic.name = name, "periodic task removed");
            self.shared.changed.notify_one();
        }
        removed
    }

    /// Opens the lock (`LOCK`, or the one given with [`with_lock`](Self::with_lock)) and starts
    /// sending in the background. Fails when the lock cannot be opened or this scheduler (or a
    /// clone) is already running.
    ///
    /// Dropping the handle stops the scheduler as [`shutdown`](SchedulerHandle::shutdown)
    /// does, without waiting: keep it for as long as the scheduler should run.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://spawn-docs").build()?).await?;
    /// let running = server.scheduler().spawn().await?;
    /// running.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn spawn(&self) -> Result<SchedulerHandle> {
        let lock = match &self.lock {
            Some(lock) => lock.clone(),
            None => {
                let config = self.server.config();
                lock::from_config(config.lock.as_deref(), &config.redis).await?
            }
        };
        if self.shared.running.swap(true, Ordering::SeqCst) {
            return Err(Error::config("this scheduler is already running"));
        }
        // Go: robfig/cron v3 cron.go, run: every entry's next tick counts from the start.
        let now = Utc::now();
        for entry in crate::lock(&self.shared.entries).iter_mut() {
            entry.next = entry.schedule.next_after(now);
        }
        let (stop, stopped) = oneshot::channel();
        let run = Run {
            server: self.server.clone(),
            binary_name: self.binary_name.clone(),
            lock,
            shared: self.shared.clone(),
        };
        debug!(
            periodic.binary_name = %self.binary_name,
            periodic.lock = ?run.lock,
            "scheduler started"
        );
        let task = tokio::spawn(run.run(stopped));
        Ok(SchedulerHandle {
            stop: Some(stop),
            task: Some(task),
        })
    }
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("binary_name", &self.binary_name)
            .field("lock", &self.lock)
            .field("schedules", &self.list())
            .finish_non_exhaustive()
    }
}

/// A running [`Scheduler`]; see [`Scheduler::spawn`].
///
/// Dropping it stops the scheduler as [`shutdown`](Self::shutdown) does, without waiting.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://handle-docs").build()?).await?;
/// let running = server.scheduler().spawn().await?;
/// drop(running); // stops it
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SchedulerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SchedulerHandle {
    /// Stops ticking and waits for the sends in flight.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// # let server = machinery::Server::new(machinery::Config::builder().broker("memory://stop-docs").build()?).await?;
    /// server.scheduler().spawn().await?.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| {
                Error::with_source(ErrorKind::Shutdown, "the scheduler task failed", e)
            }),
            None => Ok(()),
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The scheduler loop's state.
struct Run {
    server: Server,
    binary_name: String,
    lock: Arc<dyn PeriodicLock>,
    shared: Arc<Shared>,
}

/// One due tick, taken out of the entries.
struct Tick {
    name: String,
    schedule: Schedule,
    job: Arc<Job>,
    stats: Arc<Stats>,
    at: DateTime<Utc>,
}

impl Run {
    /// Go: robfig/cron v3 cron.go, `run`: sleep until the earliest entry is due, start every
    /// due entry's job (concurrently), and count each one's next tick from now.
    async fn run(self, mut stopped: oneshot::Receiver<()>) {
        let run = Arc::new(self);
        let mut in_flight = JoinSet::new();
        loop {
            let now = Utc::now();
            let mut due = Vec::new();
            let mut earliest: Option<DateTime<Utc>> = None;
            for entry in crate::lock(&run.shared.entries).iter_mut() {
                if let Some(next) = entry.next.filter(|next| *next <= now) {
                    due.push(Tick {
                        name: entry.name.clone(),
                        schedule: entry.schedule.clone(),
                        job: entry.job.clone(),
                        stats: entry.stats.clone(),
                        at: next,
                    });
                    entry.next = entry.schedule.next_after(now);
                }
                if let Some(next) = entry.next {
                    earliest = Some(earliest.map_or(next, |e| e.min(next)));
                }
            }
            for tick in due {
                in_flight.spawn(run.clone().fire(tick));
            }
            while in_flight.try_join_next().is_some() {}
            let wait = earliest
                .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                // Nothing scheduled: wait for a registration.
                .unwrap_or(Duration::from_secs(3600));
            trace!(wait_ms = wait.as_millis(), "scheduler sleeping");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = run.shared.changed.notified() => {}
                _ = &mut stopped => break,
            }
        }
        while in_flight.join_next().await.is_some() {}
        run.shared.running.store(false, Ordering::SeqCst);
        debug!("scheduler stopped");
    }

    /// One tick (Go: v2/server.go, the function `RegisterPeriodicTask` registers): fresh copies
    /// of the signatures, the lock until the next tick, then the send.
    async fn fire(self: Arc<Self>, tick: Tick) {
        let Tick {
            name,
            schedule,
            job,
            stats,
            at,
        } = tick;
        let tick_ms = at.timestamp_millis();
        let Some((key, until)) = tick_lock(&self.binary_name, &name, &schedule, Utc::now()) else {
            return;
        };
        match self.lock.lock(&key, until).await {
            Ok(true) => {}
            Ok(false) => {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                trace!(periodic.name = %name, periodic.tick = tick_ms, "tick taken elsewhere");
                return;
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(periodic.name = %name, periodic.tick = tick_ms, error = %e, "periodic lock failed; tick skipped");
                return;
            }
        }
        match self.send(&job).await {
            Ok(uuid) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                debug!(
                    periodic.name = %name,
                    periodic.tick = tick_ms,
                    periodic.lock_until = until,
                    task.uuid = %uuid,
                    "periodic task sent"
                );
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                error!(periodic.name = %name, periodic.tick = tick_ms, error = %e, "periodic task failed");
            }
        }
    }

    /// Sends fresh copies; returns the UUID of the first task (or the group).
    async fn send(&self, job: &Job) -> Result<String> {
        match job {
            Job::Task(raw) => {
                let copy = fresh(raw);
                let uuid = copy.uuid.clone();
                self.server.send_wire(copy).await?;
                Ok(uuid)
            }
            Job::Group(members) => {
                let group = Group::<()> {
                    members: members.iter().map(|m| (fresh(m), ignore as _)).collect(),
                    error: None,
                };
                Ok(self.server.send_group(group).await?.group_uuid().to_owned())
            }
            Job::Chord { members, callback } => {
                let chord = Chord::<()> {
                    members: members.iter().map(fresh).collect(),
                    callback: Some((fresh(callback), vec![String::new()], ignore as _)),
                    error: None,
                };
                let sent = self.server.send_chord(chord).await?;
                Ok(sent.task_uuid().to_owned())
            }
        }
    }
}

/// The lock key and value of a tick fired at `now` (Go: v2/server.go, RegisterPeriodicTask:
/// `LockWithRetries(utils.GetLockName(name, spec), schedule.Next(time.Now()).UnixNano()-1)`);
/// `None` when the schedule never fires again.
fn tick_lock(
    binary_name: &str,
    name: &str,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> Option<(String, i64)> {
    let next = schedule.next_after(now)?;
    let until = next.timestamp_nanos_opt().unwrap_or(i64::MAX) - 1;
    Some((lock_key(binary_name, name, schedule.spec()), until))
}

/// The results of a periodic send are not awaited.
fn ignore(_: &[TaskResult]) -> Result<()> {
    Ok(())
}

/// A copy of `raw` with new UUIDs for it and every signature nested in it (follow-ups, error
/// callbacks, a chord callback), so that each tick is a run of its own. Go's `CopySignature`
/// keeps UUIDs and relies on them being empty; here a UUID names one task, and a resent one
/// would be taken for a duplicate.
fn fresh(raw: &wire::Signature) -> wire::Signature {
    let mut copy = raw.clone();
    // Iterative: a chain may be nested deeper than the stack allows recursion.
    let mut stack: Vec<&mut wire::Signature> = vec![&mut copy];
    while let Some(sig) = stack.pop() {
        sig.uuid = wire::new_uuid("task_");
        stack.extend(sig.on_success.iter_mut());
        stack.extend(sig.on_error.iter_mut());
        if let Some(callback) = sig.chord_callback.as_deref_mut() {
            stack.push(callback);
        }
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticks_lock_is_gos_with_a_fixed_clock() {
        use chrono::TimeZone;
        // 2024-01-01T00:00:00.250Z, just after a tick.
        let now = Utc.timestamp_nanos(1_704_067_200_250_000_000);
        let every = Schedule::parse("@every 1m").unwrap();
        let (key, until) = tick_lock("machinery-worker", "report", &every, now).unwrap();
        // Go: v2/utils/utils.go GetLockName; v2/server.go `schedule.Next(time.Now()).UnixNano()-1`.
        assert_eq!(key, "machinery_lock_machinery-workerreport@every 1m");
        assert_eq!(until, 1_704_067_260_000_000_000 - 1);
        // Go: v2/locks/redis/redis.go Lock, `SetNX(key, value, value + 1 - now)`: 59.75 s.
        #[cfg(feature = "redis")]
        {
            let now_ns = now.timestamp_nanos_opt().unwrap();
            let mut expected = redis::cmd("SET");
            expected
                .arg("machinery_lock_machinery-workerreport@every 1m")
                .arg("1704067259999999999")
                .arg("PX")
                .arg("59750")
                .arg("NX");
            assert_eq!(
                lock::set_nx_command(&key, until, now_ns).get_packed_command(),
                expected.get_packed_command()
            );
        }
        let cron = Schedule::parse("CRON_TZ=UTC */5 * * * *").unwrap();
        let (key, until) = tick_lock("w", "r", &cron, now).unwrap();
        assert_eq!(key, "machinery_lock_wrCRON_TZ=UTC */5 * * * *");
        assert_eq!(until, 1_704_067_500_000_000_000 - 1);
        let never = Schedule::parse("CRON_TZ=UTC 0 0 30 2 *").unwrap();
        assert!(tick_lock("w", "r", &never, now).is_none());
    }

    #[test]
    fn copies_have_new_uuids_throughout() {
        let mut raw = wire::Signature {
            uuid: "task_a".into(),
            name: "a".into(),
            ..Default::default()
        };
        let mut next = wire::Signature {
            uuid: "task_b".into(),
            name: "b".into(),
            ..Default::default()
        };
        next.on_error = vec![wire::Signature {
            uuid: "task_c".into(),
            ..Default::default()
        }];
        raw.on_success = vec![next];
        let copy = fresh(&raw);
        let again = fresh(&raw);
        for c in [&copy, &again] {
            assert_ne!(c.uuid, "task_a");
            assert!(c.uuid.starts_with("task_"));
            assert_ne!(c.on_success[0].uuid, "task_b");
            assert_ne!(c.on_success[0].on_error[0].uuid, "task_c");
            assert_eq!(c.on_success[0].name, "b");
        }
        assert_ne!(copy.uuid, again.uuid);
    }
}
