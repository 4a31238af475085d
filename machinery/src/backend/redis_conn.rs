//! Opening Redis: the one way the result backend, the periodic lock and the worker's
//! cluster-wide rate limits connect, to one server or to the master that a set of Redis
//! Sentinels names, with the timeouts of Go's `redis:` block.
//!
//! # URLs, as Go reads them
//!
//! - `redis://[[user]:password@]host[:port][/db]` (and `rediss://`): one server (see
//!   [`RedisBackend`](super::redis::RedisBackend)).
//! - `redis://[[user]:password@]sentinel1:port,sentinel2:port,.../db` with
//!   [`RedisConfig::master_name`] set: the sentinels, asked for the master of that name. As in
//!   Go (v1/factories.go, `BackendFactory` splits the address part on `,`; `ParseBrokers`
//!   takes the database after the last address; v2/backends/redis/goredis.go, `NewGR`, takes
//!   the password from the first), the password and user are the master's, and
//!   [`RedisConfig::sentinel_password`] is the sentinels'. A sentinel's port defaults to
//!   26379. One address with `master_name` set is a sentinel too (go-redis's
//!   `NewUniversalClient`, which `NewGR` calls, makes a failover client whenever
//!   `MasterName` is set).
//! - Several addresses without `master_name`, or `cluster_enabled`, are Go's Redis Cluster
//!   client: not supported, a [`ErrorKind::Config`] error.
//!
//! # Through a failover
//!
//! The master is found as the Sentinel client guidelines say: the sentinels are asked in turn
//! (`SENTINEL get-master-addr-by-name`), the one that answers moves to the front, and the
//! server it names must say `ROLE` master. The connection is kept until a command fails with
//! a connection error, a timeout or `READONLY` (a demoted master); then the next command
//! asks the sentinels again. The failed command is not retried here: it fails, and the
//! caller's policy applies (the worker retries its writes for `store_retry_timeout` and
//! gives the message back after that, so a delivery is never acknowledged on a lost write).
//!
//! Redis replicates asynchronously: a write the old master acknowledged just before a
//! failover, or during the second in which a forced failover has promoted the replica but not
//! yet demoted the old master, is lost with the old master's data. So under Sentinel, when
//! the sentinels know a live replica of the master, the result backend's and the lock's
//! writes are confirmed with `WAIT 1 <read_timeout / 2>` on the same connection; a write no
//! replica acknowledged is an error (and retried by the caller). Go does not wait.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tracing::{debug, info, warn};

use super::redis::RedisUrl;
use crate::config::{mask_url, RedisConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;

/// A sentinel's port when the URL gives none (Redis Sentinel's default).
const SENTINEL_PORT: u16 = 26379;

/// How many times the connection manager re-dials a single server, 100 ms, 200 ms, 400 ms
/// apart at most, before a command fails (go-redis's `MaxRetries`, 3).
const RECONNECT_RETRIES: usize = 3;

/// Where Redis is and how long to wait for it: a parsed URL with Go's `redis:` settings.
#[derive(Clone)]
pub(crate) struct RedisTarget {
    how: How,
    connect_timeout: Duration,
    response_timeout: Duration,
    display: String,
}

#[derive(Clone)]
enum How {
    Direct(RedisUrl),
    Sentinel(Arc<Sentinels>),
}

/// The sentinels of one master.
struct Sentinels {
    /// With the sentinel password; the one that answered last first.
    addrs: Mutex<Vec<RedisUrl>>,
    master_name: String,
    /// The master's scheme, credentials and database; its host and port are the sentinels'
    /// answer.
    master: RedisUrl,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.display)
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// Reads `url` with the settings of Go's `redis:` block (see the [module docs](self));
    /// nothing is dialled yet. Errors never quote the URL (a password may be anywhere in it).
    pub(crate) fn parse(url: &str, redis: &RedisConfig) -> Result<RedisTarget> {
        if redis.cluster_enabled {
            return Err(Error::config(
                "Redis Cluster (`redis.cluster_enabled`) is not supported",
            ));
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            Error::config("invalid Redis URL: expected redis://[password@]host[:port][/db]")
        })?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let how = if !rest.contains(',') && redis.master_name.is_empty() {
            How::Direct(RedisUrl::parse(url)?)
        } else if redis.master_name.is_empty() {
            return Err(Error::config(format!(
                "a Redis URL with several addresses is Go's Redis Cluster client, which is not \
                 supported; set `redis.master_name` (REDIS_MASTER_NAME) to use them as Redis \
                 Sentinels (`{}`)",
                mask_url(url)
            )));
        } else {
            How::Sentinel(Arc::new(Sentinels::parse(scheme, rest, redis)?))
        };
        let display = match &how {
            How::Direct(url) => url.display(),
            How::Sentinel(s) => s.display(),
        };
        Ok(RedisTarget {
            how,
            connect_timeout: redis.connect_timeout,
            response_timeout: redis.read_timeout,
            display,
        })
    }

    /// The URL as messages show it, without passwords.
    pub(crate) fn display(&self) -> &str {
        &self.display
    }

    /// Whether this is a Sentinel deployment.
    pub(crate) fn is_sentinel(&self) -> bool {
        matches!(self.how, How::Sentinel(_))
    }

    /// How long a command may wait for its reply (Go's `read_timeout`).
    pub(crate) fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    fn async_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
    }

    /// One connection to the server, or to the master the sentinels name now, with
    /// `config`'s timeouts, the whole of it (sentinels asked, master checked) within `bound`.
    /// For the rate limiter, which keeps it until it fails.
    pub(crate) async fn dial(
        &self,
        config: &AsyncConnectionConfig,
        bound: Duration,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let dialled = async {
            match &self.how {
                How::Direct(url) => {
                    redis::Client::open(url.connection_info().map_err(to_redis)?)?
                        .get_multiplexed_async_connection_with_config(config)
                        .await
                }
                How::Sentinel(sentinels) => sentinels.find_master(config).await.map(|(c, _)| c),
            }
        };
        match tokio::time::timeout(bound, dialled).await {
            Ok(outcome) => outcome,
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "cannot connect in time",
            ))),
        }
    }

    /// A connection that reconnects by itself (through the sentinels under Sentinel). One
    /// attempt is made first, so that a refused password or an unreachable server (or no
    /// sentinel answering) fails at once. `what` names the user in errors ("Redis", "the
    /// lock's Redis").
    pub(crate) async fn connect(&self, what: &str) -> Result<RedisConn> {
        let cannot_connect = |e: RedisError| {
            Error::with_source(
                ErrorKind::Backend,
                format!("cannot connect to {what} at {}: {e}", self.display),
                e,
            )
        };
        match &self.how {
            How::Direct(url) => {
                let info = url.connection_info()?;
                let client = redis::Client::open(info).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Backend,
                        format!("invalid Redis settings for {}", self.display),
                        e,
                    )
                })?;
                drop(
                    client
                        .get_multiplexed_async_connection_with_config(&self.async_config())
                        .await
                        .map_err(cannot_connect)?,
                );
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.response_timeout))
                    .set_number_of_retries(RECONNECT_RETRIES)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(cannot_connect)?;
                Ok(RedisConn::Direct(conn))
            }
            How::Sentinel(sentinels) => {
                let link = Arc::new(Link {
                    sentinels: sentinels.clone(),
                    target: self.clone(),
                    current: Mutex::new(None),
                    dial: tokio::sync::Mutex::new(()),
                    next_id: AtomicU64::new(0),
                });
                let mut conn = RedisConn::Sentinel {
                    db: sentinels.master.db,
                    link,
                    pinned: None,
                };
                conn.pin().await.map_err(cannot_connect)?;
                Ok(conn.unpinned())
            }
        }
    }
}

impl Sentinels {
    fn parse(scheme: &str, rest: &str, redis: &RedisConfig) -> Result<Sentinels> {
        let invalid = |what: &str| Error::config(format!("invalid Redis Sentinel URL: {what}"));
        let mut addrs: Vec<&str> = rest.split(',').collect();
        // Go: NewGR, the user info on the first address; ParseBrokers, `/db` after the last.
        let first = addrs.first().copied().unwrap_or_default();
        let (userinfo, first_host) = match first.rfind('@') {
            Some(i) => (Some(&first[..i]), &first[i + 1..]),
            None => (None, first),
        };
        if let Some(slot) = addrs.first_mut() {
            *slot = first_host;
        }
        let last = addrs.last().copied().unwrap_or_default();
        let (last_host, path) = match last.find('/') {
            Some(i) => (&last[..i], &last[i + 1..]),
            None => (last, ""),
        };
        if let Some(slot) = addrs.last_mut() {
            *slot = last_host;
        }
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        // Scheme, credentials and database, read as for one server.
        let mut master = RedisUrl::parse(&format!("{scheme}://{auth}master/{path}"))?;
        let mut sentinels = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if addr.is_empty() {
                return Err(invalid("an empty address"));
            }
            if addr.contains(['@', '/']) {
                return Err(invalid(
                    "only the first address may carry a password, and only the last a database",
                ));
            }
            let mut sentinel = RedisUrl::parse(&format!("{scheme}://{addr}"))?;
            if !has_port(addr) {
                sentinel.port = SENTINEL_PORT;
            }
            sentinel.password = Some(redis.sentinel_password.clone()).filter(|p| !p.is_empty());
            sentinels.push(sentinel);
        }
        master.host = String::new();
        master.port = 0;
        Ok(Sentinels {
            addrs: Mutex::new(sentinels),
            master_name: redis.master_name.clone(),
            master,
        })
    }

    /// `redis://***@s1:26379,s2:26379/0 (sentinel master NAME)`.
    fn display(&self) -> String {
        let addrs = lock(&self.addrs);
        let scheme = if self.master.tls { "rediss" } else { "redis" };
        let auth = if self.master.password.is_some() || self.master.username.is_some() {
            "***@"
        } else {
            ""
        };
        let hosts: Vec<String> = addrs
            .iter()
            .map(|a| {
                if a.host.contains(':') {
                    format!("[{}]:{}", a.host, a.port)
                } else {
                    format!("{}:{}", a.host, a.port)
                }
            })
            .collect();
        format!(
            "{scheme}://{auth}{}/{} (sentinel master {})",
            hosts.join(","),
            self.master.db,
            self.master_name
        )
    }

    /// Asks the sentinels in turn for the master; connects to it and checks its `ROLE`.
    /// Also returns how many replicas a write must reach: 1 when the sentinel that answered
    /// knows a live replica, else 0.
    async fn find_master(
        &self,
        config: &AsyncConnectionConfig,
    ) -> redis::RedisResult<(MultiplexedConnection, usize)> {
        let sentinels = lock(&self.addrs).clone();
        let mut last = RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinel"));
        for (i, sentinel) in sentinels.iter().enumerate() {
            match self.ask(sentinel, config).await {
                Ok((host, port, replicas)) => {
                    if i != 0 {
                        // Go through the sentinel that answered first next time.
                        let mut addrs = lock(&self.addrs);
                        if let Some(pos) = addrs.iter().position(|a| a == sentinel) {
                            let answered = addrs.remove(pos);
                            addrs.insert(0, answered);
                        }
                    }
                    let mut master = self.master.clone();
                    master.host = host;
                    master.port = port;
                    let client = redis::Client::open(master.connection_info().map_err(to_redis)?)?;
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(config)
                        .await?;
                    let role: redis::Role = redis::cmd("ROLE").query_async(&mut conn).await?;
                    if !matches!(role, redis::Role::Primary { .. }) {
                        return Err(RedisError::from((
                            redis::ErrorKind::Io,
                            "the sentinels name a server that is not a master (a failover is under way)",
                            master.display(),
                        )));
                    }
                    debug!(master = %master.display(), replicas, "Redis Sentinel: connected to the master");
                    return Ok((conn, replicas.min(1)));
                }
                Err(e) => {
                    debug!(sentinel = %sentinel.display(), error = %e, "Redis Sentinel: no answer");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// One sentinel's answer: the master's address and how many live replicas it knows.
    /// A master the sentinel is failing over, or takes to be down, is no answer: writes to it
    /// could be lost with it (a forced failover promotes the replica a moment before it
    /// demotes the old master).
    async fn ask(
        &self,
        sentinel: &RedisUrl,
        config: &AsyncConnectionConfig,
    ) -> redis::RedisResult<(String, u16, usize)> {
        let mut conn = sentinel_connection(sentinel, config).await?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        let (host, port) = addr.ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "the sentinel does not know the master name",
                self.master_name.clone(),
            ))
        })?;
        let master: HashMap<String, String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        let flags = master.get("flags").map(String::as_str).unwrap_or_default();
        if flags
            .split(',')
            .any(|f| matches!(f, "failover_in_progress" | "s_down" | "o_down"))
        {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "the master is being failed over",
                flags.to_owned(),
            )));
        }
        let replicas = self.live_replicas(&mut conn).await?;
        Ok((host, port, replicas))
    }

    /// How many replicas of the master the sentinel on `conn` sees up and in sync with it
    /// (`master-link-status` ok).
    async fn live_replicas(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<usize> {
        let replicas: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(&self.master_name)
            .query_async(conn)
            .await?;
        Ok(replicas
            .iter()
            .filter(|r| {
                r.get("master-link-status").is_some_and(|s| s == "ok")
                    && r.get("flags").is_some_and(|flags| {
                        !flags
                            .split(',')
                            .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
                    })
            })
            .count())
    }

    /// How many live replicas the first sentinel that answers sees (for a master that had
    /// none when it was found: after a failover the old master rejoins as a replica).
    async fn replicas_now(&self, config: &AsyncConnectionConfig) -> redis::RedisResult<usize> {
        let sentinels = lock(&self.addrs).clone();
        let mut last = RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinel"));
        for sentinel in &sentinels {
            match sentinel_connection(sentinel, config).await {
                Ok(mut conn) => match self.live_replicas(&mut conn).await {
                    Ok(n) => return Ok(n),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

async fn sentinel_connection(
    sentinel: &RedisUrl,
    config: &AsyncConnectionConfig,
) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(sentinel.connection_info().map_err(to_redis)?)?
        .get_multiplexed_async_connection_with_config(config)
        .await
}

/// Whether a port follows the host in `addr` (`host:port`, `[v6]:port`).
fn has_port(addr: &str) -> bool {
    match addr.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => addr.contains(':'),
    }
}

fn to_redis(e: Error) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "invalid address",
        e.to_string(),
    ))
}

/// A connection to Redis, shared by clones: the connection manager of one server, or the
/// master the sentinels name (see the [module docs](self#through-a-failover)).
///
/// A clone that has not run a command yet is unpinned; under Sentinel, its first command
/// pins it to the master connection of the moment, and every later command and
/// [`confirm`](Self::confirm) use that one, so that `WAIT` confirms the writes this handle
/// made. Take a fresh clone per operation.
#[derive(Clone)]
pub(crate) enum RedisConn {
    Direct(ConnectionManager),
    Sentinel {
        db: i64,
        link: Arc<Link>,
        pinned: Option<Current>,
    },
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisConn::Direct(_) => f.write_str("RedisConn::Direct"),
            RedisConn::Sentinel { link, .. } => f
                .debug_struct("RedisConn::Sentinel")
                .field("sentinels", &link.target.display)
                .finish_non_exhaustive(),
        }
    }
}

/// The master connection of the moment, shared by every handle of one [`RedisConn`].
pub(crate) struct Link {
    sentinels: Arc<Sentinels>,
    target: RedisTarget,
    current: Mutex<Option<Current>>,
    /// Held while asking the sentinels: one discovery at a time.
    dial: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

#[derive(Clone)]
pub(crate) struct Current {
    id: u64,
    conn: MultiplexedConnection,
    /// How many replicas must acknowledge a write (`WAIT`): 0 or 1; with 0, when the
    /// sentinels were last asked whether a replica has joined since.
    replicas: Arc<Mutex<(usize, Instant)>>,
}

/// How often a master without a live replica has the sentinels asked again whether one
/// joined (then its writes are confirmed again).
const REPLICA_RECHECK: Duration = Duration::from_secs(2);

impl Link {
    async fn current(&self) -> redis::RedisResult<Current> {
        if let Some(current) = lock(&self.current).clone() {
            return Ok(current);
        }
        let _dialling = self.dial.lock().await;
        if let Some(current) = lock(&self.current).clone() {
            return Ok(current);
        }
        let (conn, replicas) = self.target.dial_sentinel(&self.sentinels).await?;
        let current = Current {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            conn,
            replicas: Arc::new(Mutex::new((replicas, Instant::now()))),
        };
        *lock(&self.current) = Some(current.clone());
        Ok(current)
    }

    /// Drops connection `id` (if it is still the current one): the next command asks the
    /// sentinels again.
    fn forget(&self, id: u64, error: &RedisError) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| c.id == id) {
            *current = None;
            warn!(sentinels = %self.target.display, error = %error, "Redis Sentinel: the master connection failed; asking the sentinels again");
        }
    }
}

impl RedisTarget {
    async fn dial_sentinel(
        &self,
        sentinels: &Sentinels,
    ) -> redis::RedisResult<(MultiplexedConnection, usize)> {
        match tokio::time::timeout(
            self.connect_timeout,
            sentinels.find_master(&self.async_config()),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "no sentinel named a reachable master in time",
            ))),
        }
    }
}

/// Whether `e` means the connection (or the server behind it) is no longer the master's.
fn lost_master(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

impl RedisConn {
    /// Pins this handle to the current master connection (dialling it if needed).
    async fn pin(&mut self) -> redis::RedisResult<Option<Current>> {
        match self {
            RedisConn::Direct(_) => Ok(None),
            RedisConn::Sentinel { link, pinned, .. } => {
                if pinned.is_none() {
                    *pinned = Some(link.current().await?);
                }
                Ok(pinned.clone())
            }
        }
    }

    /// This handle, not pinned to a connection.
    fn unpinned(mut self) -> RedisConn {
        if let RedisConn::Sentinel { pinned, .. } = &mut self {
            *pinned = None;
        }
        self
    }

    fn failed(&mut self, e: &RedisError) {
        if let RedisConn::Sentinel { link, pinned, .. } = self {
            if lost_master(e) {
                if let Some(current) = pinned.take() {
                    link.forget(current.id, e);
                }
            }
        }
    }

    /// Under Sentinel, when the master had a live replica: waits until one replica has every
    /// write this handle made (`WAIT 1 <read_timeout / 2>`), and fails when none has it in
    /// time (the connection is then dropped: the next command asks the sentinels). A no-op
    /// for one server, and for a handle that has run nothing.
    pub(crate) async fn confirm(&mut self) -> redis::RedisResult<()> {
        let RedisConn::Sentinel { link, pinned, .. } = self else {
            return Ok(());
        };
        let Some(current) = pinned.clone() else {
            return Ok(());
        };
        let (mut replicas, checked) = *lock(&current.replicas);
        if replicas == 0 && checked.elapsed() >= REPLICA_RECHECK {
            let config = link.target.async_config();
            let now = link
                .sentinels
                .replicas_now(&config)
                .await
                .unwrap_or(0)
                .min(1);
            *lock(&current.replicas) = (now, Instant::now());
            if now > 0 {
                info!(sentinels = %link.target.display, "Redis Sentinel: the master has a live replica again; writes are confirmed with WAIT");
            }
            replicas = now;
        }
        if replicas == 0 {
            return Ok(());
        }
        let wait_ms = u64::try_from((link.target.response_timeout / 2).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut conn = current.conn.clone();
        let acked: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(replicas)
            .arg(wait_ms)
            .query_async(&mut conn)
            .await;
        let error = match acked {
            Ok(n) if usize::try_from(n).unwrap_or(0) >= replicas => return Ok(()),
            Ok(n) => RedisError::from((
                redis::ErrorKind::Io,
                "the write reached no replica",
                format!("{n} of {replicas} replicas acknowledged it within {wait_ms} ms"),
            )),
            Err(e) => e,
        };
        pinned.take();
        link.forget(current.id, &error);
        Err(error)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let outcome = match self.pin().await? {
                None => match self {
                    RedisConn::Direct(conn) => conn.req_packed_command(cmd).await,
                    RedisConn::Sentinel { .. } => unreachable_direct(),
                },
                Some(mut current) => current.conn.req_packed_command(cmd).await,
            };
            if let Err(e) = &outcome {
                self.failed(e);
            }
            outcome
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let outcome = match self.pin().await? {
                None => match self {
                    RedisConn::Direct(conn) => {
                        conn.req_packed_commands(pipeline, offset, count).await
                    }
                    RedisConn::Sentinel { .. } => unreachable_direct(),
                },
                Some(mut current) => {
                    current
                        .conn
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
            };
            if let Err(e) = &outcome {
                self.failed(e);
            }
            outcome
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Direct(conn) => conn.get_db(),
            RedisConn::Sentinel { db, .. } => *db,
        }
    }
}

/// `pin` returns `None` only for a direct connection.
fn unreachable_direct<T>() -> redis::RedisResult<T> {
    Err(RedisError::from((
        redis::ErrorKind::Client,
        "internal error: a Sentinel connection was not pinned",
    )))
}

/// Logs once that a Sentinel deployment is in use (with the URL masked).
pub(crate) fn log_target(target: &RedisTarget, what: &str) {
    if target.is_sentinel() {
        info!(redis = %target.display(), what, "connecting through Redis Sentinel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str, master: &str) -> Result<RedisTarget> {
        let redis = RedisConfig {
            master_name: master.to_owned(),
            sentinel_password: "s3cret".to_owned(),
            ..RedisConfig::default()
        };
        RedisTarget::parse(url, &redis)
    }

    fn sentinels(target: &RedisTarget) -> Arc<Sentinels> {
        match &target.how {
            How::Sentinel(s) => s.clone(),
            How::Direct(_) => panic!("not a sentinel target"),
        }
    }

    #[test]
    fn gos_sentinel_url_lists_the_sentinels() {
        // Go: v1/factories.go, BackendFactory (split on `,`) and ParseBrokers (the database
        // after the last address); v2/backends/redis/goredis.go, NewGR (the password on the
        // first address, `user:password` split at the first `:`).
        let target = sentinel(
            "redis://alice:pw@10.0.0.1:26390,10.0.0.2,[::1]:26392/3",
            "mymaster",
        )
        .unwrap();
        let s = sentinels(&target);
        let addrs = lock(&s.addrs).clone();
        let hosts: Vec<(&str, u16)> = addrs.iter().map(|a| (a.host.as_str(), a.port)).collect();
        assert_eq!(
            hosts,
            [("10.0.0.1", 26390), ("10.0.0.2", 26379), ("::1", 26392)]
        );
        assert!(addrs
            .iter()
            .all(|a| a.password.as_deref() == Some("s3cret") && a.username.is_none()));
        assert_eq!(s.master.username.as_deref(), Some("alice"));
        assert_eq!(s.master.password.as_deref(), Some("pw"));
        assert_eq!(s.master.db, 3);
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(
            target.display(),
            "redis://***@10.0.0.1:26390,10.0.0.2:26379,[::1]:26392/3 (sentinel master mymaster)"
        );
        assert!(!format!("{target:?}").contains("pw"));
    }

    #[test]
    fn one_address_with_a_master_name_is_a_sentinel() {
        // go-redis's NewUniversalClient (Go: NewGR) makes a failover client whenever
        // MasterName is set, whatever the number of addresses.
        let target = sentinel("redis://pw@127.0.0.1:26390", "m").unwrap();
        assert!(target.is_sentinel());
        assert_eq!(sentinels(&target).master.db, 0);
        // And without one, one address is one server.
        let direct =
            RedisTarget::parse("redis://pw@127.0.0.1:6390/1", &RedisConfig::default()).unwrap();
        assert!(!direct.is_sentinel());
        assert_eq!(direct.display(), "redis://***@127.0.0.1:6390/1");
    }

    #[test]
    fn no_sentinel_password_sends_none() {
        let redis = RedisConfig {
            master_name: "m".to_owned(),
            ..RedisConfig::default()
        };
        let target = RedisTarget::parse("redis://h1:1,h2:2", &redis).unwrap();
        let s = sentinels(&target);
        assert!(lock(&s.addrs).iter().all(|a| a.password.is_none()));
        assert!(s.master.password.is_none());
    }

    #[test]
    fn timeouts_come_from_the_redis_block() {
        let redis = RedisConfig {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(3),
            ..RedisConfig::default()
        };
        let target = RedisTarget::parse("redis://127.0.0.1:6379", &redis).unwrap();
        assert_eq!(target.connect_timeout, Duration::from_secs(2));
        assert_eq!(target.response_timeout(), Duration::from_secs(3));
        // Go's defaults: 15 s each.
        let target = RedisTarget::parse("redis://127.0.0.1", &RedisConfig::default()).unwrap();
        assert_eq!(target.connect_timeout, Duration::from_secs(15));
        assert_eq!(target.response_timeout(), Duration::from_secs(15));
    }

    #[test]
    fn refuses_what_go_would_make_a_cluster_client_of() {
        let e =
            RedisTarget::parse("redis://secret@h1:1,h2:2/0", &RedisConfig::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("master_name"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let redis = RedisConfig {
            cluster_enabled: true,
            ..RedisConfig::default()
        };
        let e = RedisTarget::parse("redis://h1:1", &redis).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
    }

    #[test]
    fn refuses_malformed_sentinel_lists_without_quoting_them() {
        for url in [
            "redis://secret@h1:1,,h3:3",
            "redis://secret@h1:1,",
            "redis://h1:1,secret@h2:2",
            "redis://h1:1/0,h2:2",
            "redis://secret@h1:1,h2:port",
            "redis://secret@h1:1,h2:2/db",
            "memcache://secret@h1:1,h2:2",
        ] {
            let e = sentinel(url, "m").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{url}");
            assert!(!e.to_string().contains("secret"), "{url}: {e}");
        }
    }

    #[test]
    fn lost_master_errors() {
        let readonly = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(lost_master(&readonly));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(lost_master(&io));
        let wrong = RedisError::from((redis::ErrorKind::UnexpectedReturnType, "wrong type"));
        assert!(!lost_master(&wrong));
    }
}
