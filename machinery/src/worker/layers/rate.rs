//! Rate limits: how often a task may start (`#[task(rate_limit = "100/s")]`,
//! [`WorkerBuilder::rate_limit`](crate::WorkerBuilder::rate_limit)). Go Machinery has none
//! (machinery #697).
//!
//! Each limited task has a GCRA ("generic cell rate algorithm"): a limit of `count` per
//! `period` is one start per [`interval`](crate::options::RateLimit::interval), and each
//! delivery reserves the next free start, `interval` after the one reserved before it. The
//! burst is one start: starts are evenly spaced, never `count` at once, as Celery's
//! `TokenBucket(rate, capacity=1)` spaces them (`celery/worker/consumer/consumer.py`,
//! `bucket_for_task`). So the measured rate of a backlog is the limit itself, not the limit
//! plus a burst.
//!
//! A delivery whose start is at most [`MAX_WAIT`] away waits for it in the worker without its
//! concurrency slot ([`Slot::released`]). One that is further away reserves nothing: it goes
//! back to the broker to arrive later ([`Admit::Later`], not an attempt). The deliveries sent
//! back are spread over the starts after the last one reserved, one interval apart, so that a
//! backlog does not all come back at once; that spread is only advice and holds no start, so a
//! delivery that arrives meanwhile still starts at the next free one.
//!
//! Reserved starts are an interval apart, but the deliveries waiting for them can wake late
//! and together (the process was stalled, or they waited for a slot). A second GCRA, over the
//! starts themselves, spaces those too, with a tolerance of half an interval (at least 2 ms)
//! for the timers' jitter: a start lost to a stall is not made up with a burst, so the rate
//! over a backlog can fall a little below the limit, never above it by more than one start in
//! any window.
//!
//! With [`WorkerBuilder::cluster_rate_limits`](crate::WorkerBuilder::cluster_rate_limits), the
//! reservation is made in Redis instead, by one Lua script per start, so that all workers
//! sharing the Redis server share each task's limit; see [`cluster`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::{debug, trace};

use super::{Admit, Call, Layer, Slot};
use crate::error::Result;
use crate::lock;

/// The longest a delivery waits in the worker for its start; a later start sends it back to
/// the broker.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(1);

/// The longest interval between two starts that is honoured (`1/1000h` is 41 days): the longest
/// a message is delayed (the retry waits' bound).
const MAX_INTERVAL: Duration = crate::worker::delivery::MAX_RETRY_WAIT;

/// How early a delivery may start before its turn among the starts themselves, at least
/// (about two ticks of Tokio's millisecond timer); see [`Gcra::space`].
const SPACING_TOLERANCE: Duration = Duration::from_millis(2);

/// The rate-limit layer: one GCRA per limited task the worker runs.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Fixed when the worker is built: looking a task up takes no lock.
    tasks: HashMap<&'static str, Gcra>,
    max_wait: Duration,
    #[cfg(feature = "redis")]
    cluster: Option<cluster::Cluster>,
}

impl RateLimiter {
    /// A limiter for the tasks named in `limited` (those with a limit, their own or the
    /// worker's); the limits are kept in Redis at `cluster` when it is given.
    pub(crate) fn new(
        limited: impl IntoIterator<Item = &'static str>,
        #[cfg(feature = "redis")] cluster: Option<(&str, &crate::config::RedisConfig)>,
    ) -> Result<RateLimiter> {
        Ok(RateLimiter {
            tasks: limited
                .into_iter()
                .map(|name| (name, Gcra::default()))
                .collect(),
            max_wait: MAX_WAIT,
            #[cfg(feature = "redis")]
            cluster: cluster
                .map(|(url, redis)| cluster::Cluster::new(url, redis))
                .transpose()?,
        })
    }

    /// Reserves the next start of `name`'s task: in Redis when the limits are cluster-wide
    /// and Redis answers, in this worker otherwise.
    async fn reserve(&self, name: &str, gcra: &Gcra, interval: Duration) -> Turn {
        #[cfg(feature = "redis")]
        if let Some(cluster) = &self.cluster {
            if let Some(reply) = cluster.reserve(name, interval, self.max_wait).await {
                return match reply {
                    cluster::Reply::Reserved(wait) => {
                        // Kept here too: if Redis fails, this worker goes on from there.
                        gcra.follow(Instant::now() + wait + interval);
                        Turn::after(wait)
                    }
                    cluster::Reply::Full(wait) => {
                        let now = Instant::now();
                        Turn::Later(gcra.defer(now, now + wait, interval))
                    }
                };
            }
        }
        let _ = name;
        gcra.reserve(Instant::now(), interval, self.max_wait)
    }
}

#[async_trait]
impl Layer for RateLimiter {
    fn admits(&self) -> bool {
        true
    }

    async fn admit(&self, call: &Call<'_>, slot: &mut Slot) -> Admit {
        let Some(limit) = call.options.rate_limit else {
            return Admit::Run;
        };
        let Some(gcra) = self.tasks.get(call.signature.name.as_str()) else {
            return Admit::Run;
        };
        let interval = limit.interval().min(MAX_INTERVAL);
        match self.reserve(&call.signature.name, gcra, interval).await {
            Turn::Now => {}
            Turn::In(wait) => {
                trace!(?wait, %limit, "rate limit: waiting for its start, without a slot");
                slot.released(tokio::time::sleep(wait)).await;
            }
            Turn::Later(wait) => {
                debug!(?wait, %limit, "rate limit: its start is too far; sending it back to arrive then");
                return Admit::Later(wait);
            }
        }
        // Deliveries that woke late together (the process was stalled, or waited for a slot)
        // still start an interval apart.
        while let Some(wait) = gcra.space(Instant::now(), interval) {
            trace!(?wait, %limit, "rate limit: woke with another; spacing them");
            slot.released(tokio::time::sleep(wait)).await;
        }
        Admit::Run
    }
}

/// When a delivery may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Now.
    Now,
    /// After this wait, in the worker; the start is reserved.
    In(Duration),
    /// Not within [`MAX_WAIT`]: send it back, to arrive after this delay. Nothing is reserved.
    Later(Duration),
}

impl Turn {
    fn after(wait: Duration) -> Turn {
        if wait.is_zero() {
            Turn::Now
        } else {
            Turn::In(wait)
        }
    }
}

/// One task's GCRA in this worker.
#[derive(Debug, Default)]
struct Gcra(Mutex<GcraState>);

#[derive(Debug, Default)]
struct GcraState {
    /// The next free start (the "theoretical arrival time"); `None` before the first.
    next: Option<Instant>,
    /// Where the next delivery sent back is told to arrive (advice, not a reservation).
    deferred: Option<Instant>,
    /// The next start that [`Gcra::space`] lets through without waiting.
    admitted: Option<Instant>,
}

impl Gcra {
    /// Reserves the next free start if it is at most `max_wait` after `now`; otherwise
    /// reserves nothing and says when to come back.
    fn reserve(&self, now: Instant, interval: Duration, max_wait: Duration) -> Turn {
        let mut state = lock(&self.0);
        let next = state.next.map_or(now, |next| next.max(now));
        let wait = next - now;
        if wait <= max_wait {
            state.next = Some(next + interval);
            Turn::after(wait)
        } else {
            Turn::Later(state.defer(now, next, interval))
        }
    }

    /// Lets a delivery whose start has come through at `now`, unless that would put it
    /// closer than an interval (less a tolerance) to the ones let through before: then how
    /// much longer it waits. Reserved starts are an interval apart, but their deliveries can
    /// wake late and together (the process was stalled, or they waited for a slot); this is a
    /// second GCRA, over the starts themselves. Its tolerance, half an interval and at least
    /// [`SPACING_TOLERANCE`], absorbs the timers' jitter, so that punctual deliveries never
    /// wait here; it lets at most one start more into any window.
    fn space(&self, now: Instant, interval: Duration) -> Option<Duration> {
        let tolerance = (interval / 2).max(SPACING_TOLERANCE);
        let mut state = lock(&self.0);
        let next = state.admitted.map_or(now, |next| next.max(now));
        if next - now <= tolerance {
            state.admitted = Some(next + interval);
            None
        } else {
            Some(next - tolerance - now)
        }
    }

    /// Notes a start reserved elsewhere: the next free one is not before `next`.
    #[cfg(feature = "redis")]
    fn follow(&self, next: Instant) {
        let mut state = lock(&self.0);
        state.next = Some(state.next.map_or(next, |mine| mine.max(next)));
    }

    /// The delay of a delivery sent back when the next free start (in Redis) is `next`.
    #[cfg(feature = "redis")]
    fn defer(&self, now: Instant, next: Instant, interval: Duration) -> Duration {
        lock(&self.0).defer(now, next, interval)
    }
}

impl GcraState {
    fn defer(&mut self, now: Instant, next: Instant, interval: Duration) -> Duration {
        let back = self.deferred.map_or(next, |deferred| deferred.max(next));
        self.deferred = Some(back + interval);
        back - now
    }
}

#[cfg(feature = "redis")]
pub(crate) mod cluster {
    //! Cluster-wide rate limits, kept in Redis.
    //!
    //! Each limited task has one key, `machinery_rate_<task name>`, holding its next free
    //! start in microseconds of the Redis server's clock (`TIME`), so that the workers' own
    //! clocks do not matter. [`RATE_LUA`] reserves a start atomically; the key expires a
    //! second after its last reserved start.
    //!
    //! When Redis does not answer within [`CALL_TIMEOUT`], the worker logs it once and uses
    //! its own limits (per worker, so N workers may then start up to N times the rate); it
    //! tries Redis again after [`RETRY_AFTER`], never in a loop, and a task never fails for it.

    use std::fmt;
    use std::sync::Mutex;
    use std::time::Duration;

    use redis::aio::MultiplexedConnection;
    use tokio::time::Instant;
    use tracing::{info, warn};

    use crate::backend::redis_conn::RedisTarget;
    use crate::config::RedisConfig;
    use crate::error::Result;
    use crate::lock;

    /// The prefix of each task's key; the task name follows.
    pub(crate) const KEY_PREFIX: &str = "machinery_rate_";

    /// How long a connection attempt or a reservation may take before the worker uses its own
    /// limits instead.
    pub(crate) const CALL_TIMEOUT: Duration = Duration::from_millis(500);

    /// How long the worker keeps to its own limits after Redis failed, before it asks again.
    pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

    /// Reserves the next start of a task (GCRA).
    ///
    /// `KEYS[1]`: the task's key. `ARGV[1]`: the interval between starts and `ARGV[2]`: the
    /// longest wait to reserve, both in microseconds. Returns `{1, wait}` when a start was
    /// reserved `wait` microseconds from now, `{0, wait}` when the next free start is further
    /// than `ARGV[2]` (then nothing is reserved).
    pub(crate) const RATE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next = tonumber(redis.call('GET', KEYS[1])) or now
if next < now then next = now end
local wait = next - now
if wait > tonumber(ARGV[2]) then return {0, wait} end
local after = next + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.0f', after),
           'PX', string.format('%.0f', math.ceil((after - now) / 1000) + 1000))
return {1, wait}
";

    /// What Redis said.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Reply {
        /// A start is reserved after this wait.
        Reserved(Duration),
        /// The next free start is after this wait, too far: nothing is reserved.
        Full(Duration),
    }

    /// The connection to the Redis server that keeps the limits.
    pub(crate) struct Cluster {
        /// One server, or the master Redis Sentinel names (asked again on every dial).
        target: RedisTarget,
        /// The URL without its password.
        display: String,
        script: redis::Script,
        link: Mutex<Link>,
        /// Held while dialling: one attempt at a time.
        dial: tokio::sync::Mutex<()>,
    }

    enum Ready {
        Conn(MultiplexedConnection),
        /// Redis failed less than [`RETRY_AFTER`] ago.
        Down,
        Dial,
    }

    #[derive(Default)]
    struct Link {
        conn: Option<MultiplexedConnection>,
        /// No attempt before this, after a failure.
        retry_at: Option<Instant>,
        /// Redis failed and has not answered since (for logging once per outage).
        down: bool,
    }

    impl fmt::Debug for Cluster {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Cluster")
                .field("redis", &self.display)
                .finish_non_exhaustive()
        }
    }

    impl Cluster {
        /// Reads `url` with Go's `redis:` settings (as the Redis result backend reads them:
        /// one server, or Redis Sentinel with `master_name`); nothing is dialled yet.
        pub(crate) fn new(url: &str, redis: &RedisConfig) -> Result<Cluster> {
            let target = RedisTarget::parse(url, redis)?;
            Ok(Cluster {
                display: target.display().to_owned(),
                target,
                script: redis::Script::new(RATE_LUA),
                link: Mutex::default(),
                dial: tokio::sync::Mutex::new(()),
            })
        }

        /// Reserves the next start of the task `name` in Redis; `None` when Redis cannot be
        /// asked now (the caller uses its own limit).
        pub(crate) async fn reserve(
            &self,
            name: &str,
            interval: Duration,
            max_wait: Duration,
        ) -> Option<Reply> {
            let mut conn = self.connection().await?;
            let mut invocation = self.script.key(format!("{KEY_PREFIX}{name}"));
            invocation.arg(micros(interval)).arg(micros(max_wait));
            let reply = tokio::time::timeout(
                CALL_TIMEOUT,
                invocation.invoke_async::<(i64, i64)>(&mut conn),
            )
            .await;
            let mut link = lock(&self.link);
            match reply {
                Ok(Ok((reserved, wait))) => {
                    if link.down {
                        link.down = false;
                        info!(redis = %self.display, "cluster-wide rate limits: Redis answers again");
                    }
                    let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
                    Some(if reserved == 1 {
                        Reply::Reserved(wait)
                    } else {
                        Reply::Full(wait)
                    })
                }
                Ok(Err(e)) => {
                    self.failed(&mut link, &e.to_string());
                    None
                }
                Err(_) => {
                    self.failed(&mut link, "no reply in time");
                    None
                }
            }
        }

        /// The connection, dialled if there is none and Redis did not fail lately (`None`
        /// then). One delivery dials; the others wait for it, at most [`CALL_TIMEOUT`], rather
        /// than take starts from their own limit meanwhile.
        async fn connection(&self) -> Option<MultiplexedConnection> {
            match self.ready() {
                Ready::Conn(conn) => return Some(conn),
                Ready::Down => return None,
                Ready::Dial => {}
            }
            let _dialling = self.dial.lock().await;
            match self.ready() {
                Ready::Conn(conn) => return Some(conn),
                Ready::Down => return None,
                Ready::Dial => {}
            }
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT))
                .set_response_timeout(Some(CALL_TIMEOUT));
            let dialled = self.target.dial(&config, CALL_TIMEOUT).await;
            let mut link = lock(&self.link);
            match dialled {
                Ok(conn) => {
                    link.conn = Some(conn.clone());
                    Some(conn)
                }
                Err(e) => {
                    self.failed(&mut link, &e.to_string());
                    None
                }
            }
        }

        fn ready(&self) -> Ready {
            let link = lock(&self.link);
            match &link.conn {
                Some(conn) => Ready::Conn(conn.clone()),
                None if link.retry_at.is_some_and(|at| Instant::now() < at) => Ready::Down,
                None => Ready::Dial,
            }
        }

        /// Drops the connection and keeps away from Redis for [`RETRY_AFTER`]; logs the first
        /// failure of an outage.
        fn failed(&self, link: &mut Link, error: &str) {
            link.conn = None;
            link.retry_at = Some(Instant::now() + RETRY_AFTER);
            if !link.down {
                link.down = true;
                warn!(
                    redis = %self.display,
                    error,
                    "cluster-wide rate limits: Redis does not answer; each worker keeps its own limits until it does"
                );
            }
        }
    }

    /// Whole microseconds, at least 1 (Redis keeps microseconds).
    fn micros(d: Duration) -> u64 {
        u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn starts_are_spaced_by_the_interval_with_a_burst_of_one() {
        let gcra = Gcra::default();
        let t0 = Instant::now();
        assert_eq!(gcra.reserve(t0, 50 * MS, MAX_WAIT), Turn::Now);
        assert_eq!(gcra.reserve(t0, 50 * MS, MAX_WAIT), Turn::In(50 * MS));
        assert_eq!(gcra.reserve(t0, 50 * MS, MAX_WAIT), Turn::In(100 * MS));
        // Idle time is not saved up for a burst later.
        let later = t0 + 10 * MAX_WAIT;
        assert_eq!(gcra.reserve(later, 50 * MS, MAX_WAIT), Turn::Now);
        assert_eq!(gcra.reserve(later, 50 * MS, MAX_WAIT), Turn::In(50 * MS));
    }

    #[test]
    fn a_start_too_far_is_not_reserved_and_the_ones_sent_back_are_spread() {
        let gcra = Gcra::default();
        let t0 = Instant::now();
        let interval = 400 * MS;
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::Now);
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::In(400 * MS));
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::In(800 * MS));
        // 1200 ms away: sent back, each one an interval after the one before.
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::Later(1200 * MS));
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::Later(1600 * MS));
        // Nothing was reserved for them: a delivery 400 ms on still gets the 1200 ms start.
        let t1 = t0 + 400 * MS;
        assert_eq!(gcra.reserve(t1, interval, MAX_WAIT), Turn::In(800 * MS));
        // The first one sent back arrives at 1200 ms and finds the next start at 1600 ms.
        let t2 = t0 + 1200 * MS;
        assert_eq!(gcra.reserve(t2, interval, MAX_WAIT), Turn::In(400 * MS));
    }

    #[test]
    fn deliveries_that_wake_together_start_an_interval_apart() {
        let gcra = Gcra::default();
        let t0 = Instant::now();
        assert_eq!(gcra.space(t0, 50 * MS), None);
        // A little late, then on time: both go through.
        assert_eq!(gcra.space(t0 + 52 * MS, 50 * MS), None);
        assert_eq!(gcra.space(t0 + 100 * MS, 50 * MS), None);
        // Three woke together, 60 ms late: the second waits half an interval, the third one.
        let late = t0 + 210 * MS;
        assert_eq!(gcra.space(late, 50 * MS), None);
        assert_eq!(gcra.space(late, 50 * MS), Some(25 * MS));
        assert_eq!(gcra.space(late + 25 * MS, 50 * MS), None);
        assert_eq!(gcra.space(late + 25 * MS, 50 * MS), Some(50 * MS));
    }

    #[test]
    fn a_limit_slower_than_the_wait_sends_every_second_one_back() {
        let gcra = Gcra::default();
        let t0 = Instant::now();
        let interval = 2 * MAX_WAIT;
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::Now);
        assert_eq!(gcra.reserve(t0, interval, MAX_WAIT), Turn::Later(interval));
        assert_eq!(
            gcra.reserve(t0, interval, MAX_WAIT),
            Turn::Later(2 * interval)
        );
        assert_eq!(gcra.reserve(t0 + interval, interval, MAX_WAIT), Turn::Now);
    }
}
