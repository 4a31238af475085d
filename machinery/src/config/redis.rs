//! Go's `RedisConfig` (v2/config/config.go): the `redis:` block of Go's YAML and its
//! `REDIS_*` environment variables.

use std::fmt;
use std::time::Duration;

/// Redis settings, with Go's keys and defaults (`defaultCnf.Redis` in v2/config/config.go).
///
/// They are read so that a Go configuration loads unchanged. The poll periods and the delayed
/// tasks key tune the Redis broker ([`crate::broker::redis`]). The result backend, the
/// periodic-task lock and the worker's cluster-wide rate limits use `master_name`,
/// `sentinel_password`, `connect_timeout` and `read_timeout` (Redis Sentinel: see
/// [`RedisBackend::connect_with`](crate::backend::redis::RedisBackend::connect_with)). The pool
/// settings tune Go's redigo pool, which machinery does not have, and are kept but **not used**
/// (each field says so). The result backend's URL is [`Config::result_backend`](super::Config);
/// the periodic-task lock's is [`Config::lock`](super::Config).
///
/// ```
/// use std::time::Duration;
/// use machinery::Config;
///
/// let config = Config::from_yaml_str("redis:\n  read_timeout: 5\n  master_name: mymaster\n")?;
/// assert_eq!(config.redis.read_timeout, Duration::from_secs(5));
/// assert_eq!(config.redis.connect_timeout, Duration::from_secs(15)); // Go's default
/// assert_eq!(config.redis.master_name, "mymaster");
/// # Ok::<(), machinery::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Idle connections in Go's pool (`max_idle`, `REDIS_MAX_IDLE`, default 3). Not used: the
    /// Redis backend multiplexes one connection.
    pub max_idle: u32,
    /// Connections in Go's pool, 0 for no limit (`max_active`, `REDIS_MAX_ACTIVE`). Not used.
    pub max_active: u32,
    /// When Go's pool closes an idle connection (`max_idle_timeout` in seconds, as Go spells
    /// the YAML key; `REDIS_IDLE_TIMEOUT`; default 240 s). Not used.
    pub idle_timeout: Duration,
    /// Whether Go's pool waits for a free connection (`wait`, `REDIS_WAIT`). Not used.
    pub wait: bool,
    /// Timeout for one reply (`read_timeout` in seconds, `REDIS_READ_TIMEOUT`, default 15 s):
    /// the result backend's, the lock's and their connections' response timeout, also the
    /// bound on one backend operation; under Sentinel, `WAIT` waits half of it.
    pub read_timeout: Duration,
    /// Timeout for writing one command (`write_timeout` in seconds, `REDIS_WRITE_TIMEOUT`,
    /// default 15 s). Not used: the `redis` crate has no write timeout; sending a command
    /// counts against `read_timeout`.
    pub write_timeout: Duration,
    /// Timeout for connecting (`connect_timeout` in seconds, `REDIS_CONNECT_TIMEOUT`, default
    /// 15 s): dialling a Redis server, or finding the master through the sentinels.
    pub connect_timeout: Duration,
    /// How long the Redis broker's consumer waits for a message in one `BLMOVE` before it
    /// looks again (`normal_tasks_poll_period` in milliseconds,
    /// `REDIS_NORMAL_TASKS_POLL_PERIOD`, default 1000 ms; Go's `BLPOP` timeout).
    pub normal_tasks_poll_period: Duration,
    /// How often the Redis broker moves due delayed tasks to their queues
    /// (`delayed_tasks_poll_period` in milliseconds, `REDIS_DELAYED_TASKS_POLL_PERIOD`,
    /// default 500 ms).
    pub delayed_tasks_poll_period: Duration,
    /// The sorted set of the Redis broker's delayed tasks (`delayed_tasks_key`,
    /// `REDIS_DELAYED_TASKS_KEY`; empty means Go's `delayed_tasks`).
    pub delayed_tasks_key: String,
    /// The client name Go sets on its connections (`client_name`, `REDIS_CLIENT_NAME`). Not
    /// used.
    pub client_name: String,
    /// A Sentinel master name (`master_name`, `REDIS_MASTER_NAME`). When set, the addresses
    /// of the Redis URLs (result backend, lock, cluster rate limits) are sentinels, asked for
    /// this master, as Go's go-redis failover client does.
    pub master_name: String,
    /// Cluster mode (`cluster_enabled`, `REDIS_CLUSTER_ENABLED`). Redis Cluster is not
    /// supported: `true` is a configuration error when a Redis URL is opened.
    pub cluster_enabled: bool,
    /// The sentinels' password (`sentinel_password`, `REDIS_SENTINEL_PASSWORD`); the URL's
    /// password is the master's. Never printed by `Debug`.
    pub sentinel_password: String,
}

impl Default for RedisConfig {
    /// Go's `defaultCnf.Redis`; the keys it does not set have Go's zero values.
    fn default() -> Self {
        RedisConfig {
            max_idle: 3,
            max_active: 0,
            idle_timeout: Duration::from_secs(240),
            wait: false,
            read_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(15),
            normal_tasks_poll_period: Duration::from_millis(1000),
            delayed_tasks_poll_period: Duration::from_millis(500),
            delayed_tasks_key: String::new(),
            client_name: String::new(),
            master_name: String::new(),
            cluster_enabled: false,
            sentinel_password: String::new(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.sentinel_password.is_empty() {
            ""
        } else {
            "***"
        };
        f.debug_struct("RedisConfig")
            .field("max_idle", &self.max_idle)
            .field("max_active", &self.max_active)
            .field("idle_timeout", &self.idle_timeout)
            .field("wait", &self.wait)
            .field("read_timeout", &self.read_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("normal_tasks_poll_period", &self.normal_tasks_poll_period)
            .field("delayed_tasks_poll_period", &self.delayed_tasks_poll_period)
            .field("delayed_tasks_key", &self.delayed_tasks_key)
            .field("client_name", &self.client_name)
            .field("master_name", &self.master_name)
            .field("cluster_enabled", &self.cluster_enabled)
            .field("sentinel_password", &password)
            .finish()
    }
}
