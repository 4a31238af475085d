//! The lock that makes each tick of a periodic task fire once across processes: Go Machinery's
//! `iface.Lock`, with its Redis lock (`v2/locks/redis/redis.go`) and its in-process "eager" lock
//! (`v2/locks/eager/eager.go`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use chrono::Utc;

#[cfg(feature = "redis")]
use crate::error::ErrorKind;
use crate::error::{Error, Result};

/// Go: `v2/utils/utils.go`, `LockKeyPrefix`.
const LOCK_KEY_PREFIX: &str = "machinery_lock_";

/// The lock key of a periodic task, as Go's `utils.GetLockName` builds it:
/// `machinery_lock_<binary basename><name><spec>`, all run together.
///
/// ```
/// assert_eq!(
///     machinery::periodic::lock_key("worker", "report", "@every 1m"),
///     "machinery_lock_workerreport@every 1m",
/// );
/// ```
pub fn lock_key(binary_name: &str, name: &str, spec: &str) -> String {
    // Go: v2/utils/utils.go, GetLockName: `LockKeyPrefix + filepath.Base(os.Args[0]) + name + spec`.
    format!("{LOCK_KEY_PREFIX}{binary_name}{name}{spec}")
}

/// The basename of this process's `argv[0]`, as Go's `filepath.Base(os.Args[0])` gives it:
/// the binary-name part of [`lock_key`] unless set with
/// [`Scheduler::binary_name`](super::Scheduler::binary_name).
///
/// ```
/// let name = machinery::periodic::default_binary_name();
/// assert!(!name.is_empty() && !name.contains('/'));
/// ```
pub fn default_binary_name() -> String {
    let arg0 = std::env::args_os().next().unwrap_or_default();
    go_base(&arg0.to_string_lossy())
}

/// Go's `filepath.Base` on Unix: the last element after trailing slashes are removed; `.` for
/// an empty path, `/` for a path of slashes.
fn go_base(path: &str) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".to_owned();
    }
    Path::new(trimmed)
        .file_name()
        .map_or_else(|| trimmed.to_owned(), |n| n.to_string_lossy().into_owned())
}

/// A lock that one process takes per tick (Go's `iface.Lock`, `LockWithRetries`).
///
/// `expires_at_ns` is Go's value: the next tick in Unix nanoseconds, minus one. The lock is
/// held until then; whoever asks for `key` before gets `false`.
///
/// ```
/// use machinery::periodic::{MemoryLock, PeriodicLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// let lock = MemoryLock::new();
/// let until = chrono::Utc::now().timestamp_nanos_opt().unwrap() + 60_000_000_000;
/// assert!(lock.lock("machinery_lock_docs", until).await?);
/// assert!(!lock.lock("machinery_lock_docs", until).await?);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait PeriodicLock: Send + Sync + fmt::Debug {
    /// Takes `key` until `expires_at_ns`; `Ok(false)` when another holder has it. See the
    /// trait's example.
    async fn lock(&self, key: &str, expires_at_ns: i64) -> Result<bool>;
}

/// The in-process lock (Go's eager lock, `v2/locks/eager/eager.go`): a key is taken when it is
/// free or its value has passed.
///
/// [`MemoryLock::shared`] is one lock for the whole process, the default of every scheduler
/// without a `LOCK`: two schedulers in one process fire each tick once; schedulers in other
/// processes each fire it too.
///
/// ```
/// use machinery::periodic::MemoryLock;
/// let a = MemoryLock::shared();
/// let b = MemoryLock::shared();
/// assert!(std::sync::Arc::ptr_eq(&a, &b));
/// ```
#[derive(Debug, Default)]
pub struct MemoryLock {
    held: Mutex<HashMap<String, i64>>,
}

impl MemoryLock {
    /// A lock of its own.
    ///
    /// ```
    /// let lock = machinery::periodic::MemoryLock::new();
    /// # let _ = lock;
    /// ```
    pub fn new() -> MemoryLock {
        MemoryLock::default()
    }

    /// The lock shared by everything in this process (the default of schedulers without a
    /// `LOCK`).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use machinery::periodic::MemoryLock;
    /// assert!(Arc::ptr_eq(&MemoryLock::shared(), &MemoryLock::shared()));
    /// ```
    pub fn shared() -> Arc<MemoryLock> {
        static SHARED: OnceLock<Arc<MemoryLock>> = OnceLock::new();
        SHARED.get_or_init(Arc::default).clone()
    }

    fn lock_at(&self, key: &str, value: i64, now: i64) -> bool {
        let mut held = crate::lock(&self.held);
        // Go: eager.go, Lock: `if !exist || time.Now().UnixNano() > timeout`.
        if held.get(key).is_some_and(|until| now <= *until) {
            return false;
        }
        if held.len() >= 1024 {
            held.retain(|_, until| now <= *until);
        }
        held.insert(key.to_owned(), value);
        true
    }
}

#[async_trait]
impl PeriodicLock for MemoryLock {
    async fn lock(&self, key: &str, expires_at_ns: i64) -> Result<bool> {
        Ok(self.lock_at(key, expires_at_ns, now_ns()))
    }
}

pub(crate) fn now_ns() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

#[cfg(any(feature = "redis", test))]
/// How a `SET ... NX` with an expiry is written, as go-redis v9's `SetNX` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// `PX <ms>`: a duration that is not whole seconds.
    Millis(i64),
    /// `EX <s>`: whole seconds.
    Secs(i64),
}

#[cfg(any(feature = "redis", test))]
/// The expiry of Go's `SetNX(key, value, expiration)` with `expiration = value + 1 - now`
/// nanoseconds. Go: v2/locks/redis/redis.go, Lock; go-redis v9 `usePrecise`, `formatMs`.
pub(crate) fn set_expiry(value: i64, now: i64) -> Expiry {
    const SEC: i64 = 1_000_000_000;
    const MS: i64 = 1_000_000;
    let expiration = value.saturating_add(1).saturating_sub(now);
    if expiration <= 0 {
        // Go would send `SETNX` (no expiry) for zero and an invalid negative expiry below it;
        // a lock that is already due lasts one millisecond instead.
        return Expiry::Millis(1);
    }
    if expiration < SEC || expiration % SEC != 0 {
        // formatMs: at least 1 ms for a positive duration.
        Expiry::Millis((expiration / MS).max(1))
    } else {
        Expiry::Secs(expiration / SEC)
    }
}

#[cfg(any(feature = "redis", test))]
/// The seconds of Go's `Expire(key, expiration)` after a `GETSET` (go-redis `formatSec`: at
/// least 1 for a positive duration, whole seconds rounded down).
pub(crate) fn getset_expire_secs(value: i64, now: i64) -> i64 {
    let expiration = value.saturating_add(1).saturating_sub(now);
    (expiration / 1_000_000_000).max(1)
}

/// Go: v2/locks/redis/redis.go, Lock: `SET key value PX ms NX` (go-redis's argument order).
#[cfg(feature = "redis")]
pub(crate) fn set_nx_command(key: &str, value: i64, now: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    match set_expiry(value, now) {
        Expiry::Millis(ms) => cmd.arg("PX").arg(ms),
        Expiry::Secs(s) => cmd.arg("EX").arg(s),
    };
    cmd.arg("NX");
    cmd
}

/// The Redis lock (Go's `v2/locks/redis`), shared with Go schedulers that use the same key.
///
/// Each attempt is Go's `Lock`: `SET key <value> PX <until value> NX`; when the key is held, a
/// value that has passed (a key left without expiry) is taken over with `GETSET` and a new
/// `EXPIRE`. Go's `LockWithRetries` makes 1 + 3 attempts without pause; this lock retries the
/// same way after an error (a held key is final: another attempt a microsecond later finds it
/// held too).
///
/// ```no_run
/// use machinery::periodic::{PeriodicLock, RedisLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> machinery::Result<()> {
/// let lock = RedisLock::connect("redis://127.0.0.1:6379").await?;
/// let until = chrono::Utc::now().timestamp_nanos_opt().unwrap() + 1_000_000_000;
/// let mine = lock.lock("machinery_lock_workerreport@every 1s", until).await?;
/// # let _ = mine;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "redis")]
#[derive(Clone)]
pub struct RedisLock {
    conn: crate::backend::redis_conn::RedisConn,
    display: String,
}

/// Go: v1/factories.go, LockFactory: `redislock.New(cnf, locks, 0, 3)`.
#[cfg(feature = "redis")]
const LOCK_RETRIES: usize = 3;

#[cfg(feature = "redis")]
impl RedisLock {
    /// Connects to the Redis server at `url`: `redis://[password@]host[:port][/db]` (Go's
    /// `LOCK` form; `rediss://` with the `redis-tls` feature), with Go's default `redis:`
    /// settings. Go's list of several addresses is refused: it needs
    /// [`connect_with`](Self::connect_with) and a Sentinel master name.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let lock = machinery::periodic::RedisLock::connect("redis://secret@127.0.0.1:6379").await?;
    /// println!("{lock:?}"); // RedisLock { url: "redis://***@127.0.0.1:6379/0", .. }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<RedisLock> {
        RedisLock::connect_with(url, &crate::config::RedisConfig::default()).await
    }

    /// Like [`connect`](Self::connect), with the settings of Go's `redis:` block, as Go's
    /// `LockFactory` passes them (Go: v2/locks/redis/redis.go, `New`): with
    /// [`master_name`](crate::config::RedisConfig::master_name) set, `url` lists the
    /// sentinels (`redis://password@s1:port,s2:port,.../db`, the password the master's;
    /// [`sentinel_password`](crate::config::RedisConfig::sentinel_password) the sentinels'),
    /// and the lock asks them for the master again after a failover; `connect_timeout` and
    /// `read_timeout` bound each call. Under Sentinel, a lock taken counts only once a replica
    /// has it (`WAIT 1`), so that a failover does not hand the same tick to a second
    /// scheduler. Several addresses without `master_name` (Go's Redis Cluster client) are
    /// refused. The scheduler connects with [`Config::redis`](crate::Config).
    ///
    /// ```no_run
    /// use machinery::config::RedisConfig;
    /// use machinery::periodic::RedisLock;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// let mut redis = RedisConfig::default();
    /// redis.master_name = "mymaster".into();
    /// let lock =
    ///     RedisLock::connect_with("redis://secret@10.0.0.1:26379,10.0.0.2:26379", &redis).await?;
    /// # drop(lock);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with(url: &str, redis: &crate::config::RedisConfig) -> Result<RedisLock> {
        let target = crate::backend::redis_conn::RedisTarget::parse(url, redis)?;
        crate::backend::redis_conn::log_target(&target, "periodic lock");
        let conn = target.connect("the lock's Redis").await?;
        Ok(RedisLock {
            conn,
            display: target.display().to_owned(),
        })
    }

    /// One attempt: Go's `Lock`.
    async fn attempt(&self, key: &str, value: i64) -> Result<bool> {
        let now = now_ns();
        let mut conn = self.conn.clone();
        let error = |what: &str, e: redis::RedisError| {
            Error::with_source(
                ErrorKind::Backend,
                format!("lock {what} at {} failed", self.display),
                e,
            )
        };
        let set: Option<String> = set_nx_command(key, value, now)
            .query_async(&mut conn)
            .await
            .map_err(|e| error("SET NX", e))?;
        if set.is_some() {
            conn.confirm().await.map_err(|e| error("WAIT", e))?;
            return Ok(true);
        }
        let held: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| error("GET", e))?;
        // Go: a key gone between the two calls is `redis.Nil`, an error (and a retry).
        let held = held.ok_or_else(|| Error::new(ErrorKind::Backend, "the lock key vanished"))?;
        let timeout = parse_go_int(&held)?;
        if timeout != 0 && now > timeout {
            let old: Option<String> = redis::cmd("GETSET")
                .arg(key)
                .arg(value)
                .query_async(&mut conn)
                .await
                .map_err(|e| error("GETSET", e))?;
            let old = old.ok_or_else(|| Error::new(ErrorKind::Backend, "the lock key vanished"))?;
            if now > parse_go_int(&old)? {
                let () = redis::cmd("EXPIRE")
                    .arg(key)
                    .arg(getset_expire_secs(value, now))
                    .query_async(&mut conn)
                    .await
                    .map(|_: i64| ())
                    .map_err(|e| error("EXPIRE", e))?;
                conn.confirm().await.map_err(|e| error("WAIT", e))?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Go's `strconv.Atoi` of the stored value.
#[cfg(feature = "redis")]
fn parse_go_int(text: &str) -> Result<i64> {
    text.parse().map_err(|_| {
        let start: String = text.chars().take(32).collect();
        Error::new(
            ErrorKind::Decode,
            format!("the lock holds `{start}`, not a Unix time in nanoseconds"),
        )
    })
}

#[cfg(feature = "redis")]
#[async_trait]
impl PeriodicLock for RedisLock {
    async fn lock(&self, key: &str, expires_at_ns: i64) -> Result<bool> {
        // Go: redis.go, LockWithRetries: `for i := 0; i <= r.retries; i++`, no pause.
        let mut last = None;
        for _ in 0..=LOCK_RETRIES {
            match self.attempt(key, expires_at_ns).await {
                Ok(taken) => return Ok(taken),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Backend, "redis lock: failed")))
    }
}

#[cfg(feature = "redis")]
impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("url", &self.display)
            .finish_non_exhaustive()
    }
}

/// The lock a configuration names (Go: v1/factories.go, `LockFactory`): `redis://` and
/// `rediss://` are [`RedisLock`]; none, empty or `eager...` the process-wide [`MemoryLock`].
/// Go falls back to the eager lock for any other value; a typo here would silently stop
/// processes from sharing ticks, so it is an error instead.
pub(crate) async fn from_config(
    url: Option<&str>,
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))] redis: &crate::config::RedisConfig,
) -> Result<Arc<dyn PeriodicLock>> {
    let url = url.unwrap_or_default();
    if url.is_empty() || url.starts_with("eager") {
        return Ok(MemoryLock::shared());
    }
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    #[cfg(feature = "redis")]
    if matches!(scheme.as_deref(), Some("redis" | "rediss")) {
        return Ok(Arc::new(RedisLock::connect_with(url, redis).await?));
    }
    let _ = scheme;
    Err(Error::config(format!(
        "unsupported lock URL `{}` (supported: redis://, rediss://, eager)",
        crate::config::mask_url(url)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_gos_get_lock_name() {
        // Go: v2/utils/utils.go, GetLockName.
        assert_eq!(
            lock_key("machinery-worker", "periodic-task", "*/1 * * * *"),
            "machinery_lock_machinery-workerperiodic-task*/1 * * * *"
        );
        assert_eq!(go_base("/usr/local/bin/worker"), "worker");
        assert_eq!(go_base("./worker/"), "worker");
        assert_eq!(go_base("worker"), "worker");
        assert_eq!(go_base(""), ".");
        assert_eq!(go_base("///"), "/");
    }

    #[test]
    fn expiry_is_go_redis_set_nx() {
        const S: i64 = 1_000_000_000;
        let now = 1_700_000_000 * S + 250_000_000;
        let next = 1_700_000_001 * S;
        // Go: redis.go, Lock: `expiration := time.Duration(unixTsToExpireNs + 1 - now)`.
        assert_eq!(set_expiry(next - 1, now), Expiry::Millis(750));
        assert_eq!(set_expiry(next - 1, now + 749_999_999), Expiry::Millis(1));
        assert_eq!(set_expiry(next - 1, next - S), Expiry::Secs(1));
        assert_eq!(set_expiry(next - 1, next + 5), Expiry::Millis(1));
        assert_eq!(
            set_expiry(next - 1, next - 60 * S - 1),
            Expiry::Millis(60_000)
        );
        assert_eq!(getset_expire_secs(next - 1, now), 1);
        assert_eq!(getset_expire_secs(next + 59 * S - 1, now), 59);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn the_set_command_is_gos() {
        const S: i64 = 1_000_000_000;
        let now = 1_700_000_000 * S + 250_000_000;
        let value = 1_700_000_001 * S - 1;
        let cmd = set_nx_command("machinery_lock_wtickspec", value, now);
        let mut expected = redis::cmd("SET");
        expected
            .arg("machinery_lock_wtickspec")
            .arg("1700000000999999999")
            .arg("PX")
            .arg("750")
            .arg("NX");
        assert_eq!(cmd.get_packed_command(), expected.get_packed_command());
    }

    #[test]
    fn the_memory_lock_is_gos_eager_lock() {
        let lock = MemoryLock::new();
        assert!(lock.lock_at("k", 100, 50));
        assert!(
            !lock.lock_at("k", 200, 100),
            "held up to and including its value"
        );
        assert!(lock.lock_at("k", 200, 101));
        assert!(lock.lock_at("other", 200, 101));
    }
}
