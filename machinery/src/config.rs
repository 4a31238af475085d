//! Configuration, with Go Machinery's names and defaults.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

mod redis;
mod registry;
#[cfg(feature = "yaml")]
mod yaml;

pub use self::redis::RedisConfig;
pub use self::registry::RegistryConfig;

/// Server and worker configuration.
///
/// The defaults are Go Machinery's, so a Go and a Rust process started without configuration
/// meet on the same exchange and queue. [`Config::from_env`] reads Go's environment variables;
/// [`Config::builder`] sets values in code.
///
/// ```
/// use machinery::Config;
///
/// let config = Config::builder()
///     .broker("memory://")
///     .default_queue("jobs")
///     .results_expire_in(600)
///     .build()?;
/// assert_eq!(config.default_queue, "jobs");
/// assert_eq!(config.amqp.exchange, "machinery_exchange");
/// # Ok::<(), machinery::Error>(())
/// ```
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Broker URL: `amqp://`, `amqps://` or `memory://[name]` (`BROKER`).
    pub broker: String,
    /// The queue workers consume by default (`DEFAULT_QUEUE`).
    pub default_queue: String,
    /// Result backend URL: `redis://`, `amqp://` (Go's AMQP layout, the `amqp` feature) or
    /// `memory://[name]`; empty for none (`RESULT_BACKEND`).
    /// With a `memory://` broker and no backend set, the memory backend of the same name is used.
    pub result_backend: String,
    /// Seconds a task state is kept (`RESULTS_EXPIRE_IN`).
    pub results_expire_in: u64,
    /// AMQP settings.
    pub amqp: AmqpConfig,
    /// When true, [`worker::launch`](crate::worker::launch) does not handle SIGINT/SIGTERM
    /// (`NO_UNIX_SIGNALS`).
    pub no_unix_signals: bool,
    /// Largest message body accepted, in bytes, when sending and when consuming
    /// (`MAX_MESSAGE_SIZE`, default 4 MiB). Larger incoming messages are dead-lettered.
    pub max_message_size: usize,
    /// How far ahead of its ETA a message may arrive and still run (clock skew between
    /// machines); a message that arrives earlier is delayed again (`ETA_TOLERANCE_MS`).
    pub eta_tolerance: Duration,
    /// How long a worker holds a message for a task it does not have before handing it back
    /// to the broker, so that it does not spin (`REQUEUE_DELAY_MS`, default 1 s).
    pub requeue_delay: Duration,
    /// How long producers and workers keep trying to reach a broker that went away before
    /// they report an error (`RECONNECT_TIMEOUT_MS`, default 60 s).
    pub reconnect_timeout: Duration,
    /// How many times a worker tries one message before it dead-letters it (`MAX_DELIVERIES`,
    /// default 5): deliveries that could not be settled (the result store or the broker kept
    /// failing, the worker died while running it) and hand-backs of a task no worker has. Task
    /// retries (`RetryCount`) are not deliveries and do not count.
    pub max_deliveries: u32,
    /// The bytes of message bodies a worker decodes and runs at once (`MAX_INFLIGHT_BYTES`,
    /// default 16 MiB, four messages of the default `MAX_MESSAGE_SIZE`): a burst of large
    /// messages waits for room instead of growing the worker (decoding a message takes several
    /// times its size). A message larger than the budget runs alone. The broker's prefetch
    /// buffer comes on top: up to `AMQP_PREFETCH_COUNT` (at least the concurrency) undecoded
    /// messages.
    pub max_inflight_bytes: usize,
    /// How long a worker keeps retrying a result-store write before it gives the message back
    /// (`STORE_RETRY_TIMEOUT_MS`, default 60 s). Meanwhile it takes no new messages, so an
    /// outage of the store pauses the worker instead of failing tasks.
    pub store_retry_timeout: Duration,

    // Go's keys read from its YAML config and environment (`Config::from_yaml_file`).
    /// The lock periodic tasks take so that each tick fires once across processes (`LOCK`, Go's
    /// `lock`): `redis://[password@]host[:port]` (Go's `LockFactory` form), `eager` or none for
    /// a lock within this process only; see [`periodic`](crate::periodic).
    pub lock: Option<String>,
    /// Go's `multiple_broker_separator` (env `MULTIPLE_BROKEN_SEPARATOR`, Go's spelling, or
    /// `MULTIPLE_BROKER_SEPARATOR`): the separator of several broker URLs in `broker`, the
    /// nodes of one RabbitMQ cluster; see [`Config::broker_urls`].
    pub multiple_broker_separator: Option<String>,
    /// Redis settings (Go's `redis:` block); see [`RedisConfig`] for which are used.
    pub redis: RedisConfig,
    /// How often a worker reads the states of the tasks it is running, to cancel those that
    /// were revoked ([`Server::revoke`](crate::Server::revoke)) while they run
    /// (`REVOKE_POLL_MS`, default 1 s; `0` turns it off: revoked tasks still never start).
    /// One read per interval for all of them (Redis: one `MGET`), and none while the worker
    /// runs nothing.
    pub revoke_poll: Duration,
    /// The worker registry, recent-task index and throughput counters kept in Redis for
    /// operators (machinery's own `REGISTRY*` and `RECENT_*` variables); see
    /// [`RegistryConfig`].
    pub registry: RegistryConfig,
}

/// The longest `results_expire_in` accepted: 100 years.
const MAX_RESULTS_EXPIRE_IN: u64 = 100 * 365 * 24 * 3600;

/// RabbitMQ settings (Go's `AMQPConfig`).
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// Exchange name (`AMQP_EXCHANGE`).
    pub exchange: String,
    /// Exchange type: `direct`, `fanout`, `topic`, `headers` (`AMQP_EXCHANGE_TYPE`).
    pub exchange_type: String,
    /// Key the default queue is bound with (`AMQP_BINDING_KEY`).
    pub binding_key: String,
    /// Unacknowledged deliveries per consumer (`AMQP_PREFETCH_COUNT`).
    pub prefetch_count: u16,
    /// Extra queue declaration arguments, such as `x-queue-type` or `x-max-priority`
    /// (`AMQP_QUEUE_DECLARE_ARGS`, `key:value,key:value`).
    pub queue_declare_args: Map<String, Value>,
    /// Extra queue binding arguments (`AMQP_QUEUE_BINDING_ARGS`, `key:value,key:value`).
    pub queue_binding_args: Map<String, Value>,
    /// Go's `auto_delete` (`AMQP_AUTO_DELETE`): declare the queue auto-delete. Read and kept,
    /// **not used**: machinery's queues are durable and never auto-deleted.
    pub auto_delete: bool,
    /// Go's `delayed_queue` (`AMQP_DELAYED_QUEUE`), the one queue Go's broker parks delayed
    /// tasks in. Read and kept, **not used**: machinery parks them in per-delay queues named
    /// `delay.<ms>.<exchange>.<routing key>`.
    pub delayed_queue: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: "amqp://guest:guest@localhost:5672/".to_owned(),
            default_queue: "machinery_tasks".to_owned(),
            result_backend: String::new(),
            results_expire_in: 3600,
            amqp: AmqpConfig::default(),
            no_unix_signals: false,
            max_message_size: 4 * 1024 * 1024,
            eta_tolerance: Duration::from_millis(500),
            requeue_delay: Duration::from_secs(1),
            reconnect_timeout: Duration::from_secs(60),
            max_deliveries: 5,
            max_inflight_bytes: 16 * 1024 * 1024,
            store_retry_timeout: Duration::from_secs(60),
            lock: None,
            multiple_broker_separator: None,
            redis: RedisConfig::default(),
            revoke_poll: Duration::from_secs(1),
            registry: RegistryConfig::default(),
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            exchange: "machinery_exchange".to_owned(),
            exchange_type: "direct".to_owned(),
            binding_key: "machinery_task".to_owned(),
            prefetch_count: 3,
            queue_declare_args: Map::new(),
            queue_binding_args: Map::new(),
            auto_delete: false,
            delayed_queue: String::new(),
        }
    }
}

impl Config {
    /// A builder starting from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// Reads Go Machinery's environment variables over the defaults: `BROKER`,
    /// `DEFAULT_QUEUE`, `RESULT_BACKEND`, `RESULTS_EXPIRE_IN`, `AMQP_EXCHANGE`,
    /// `AMQP_EXCHANGE_TYPE`, `AMQP_BINDING_KEY`, `AMQP_PREFETCH_COUNT`,
    /// `AMQP_QUEUE_DECLARE_ARGS`, `AMQP_QUEUE_BINDING_ARGS`, `NO_UNIX_SIGNALS`, and
    /// machinery's own `MAX_MESSAGE_SIZE`, `ETA_TOLERANCE_MS`, `REQUEUE_DELAY_MS`,
    /// `RECONNECT_TIMEOUT_MS`, `MAX_DELIVERIES`, `MAX_INFLIGHT_BYTES`,
    /// `STORE_RETRY_TIMEOUT_MS`; and Go's `LOCK` (the lock of periodic tasks),
    /// `MULTIPLE_BROKEN_SEPARATOR`, `AMQP_AUTO_DELETE`, `AMQP_DELAYED_QUEUE` and `REDIS_*` (see
    /// [`RedisConfig`]).
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`.
    ///
    /// ```
    /// use machinery::Config;
    /// let config = Config::from_lookup(|name| match name {
    ///     "BROKER" => Some("memory://".to_owned()),
    ///     "AMQP_PREFETCH_COUNT" => Some("10".to_owned()),
    ///     _ => None,
    /// })?;
    /// assert_eq!(config.amqp.prefetch_count, 10);
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        c.apply_env(&lookup)?;
        c.validate()?;
        Ok(c)
    }

    /// Sets every value that `lookup` has a variable for (Go's names): the one place where
    /// the environment is applied, over the defaults or over a YAML file.
    fn apply_env(&mut self, lookup: &impl Fn(&str) -> Option<String>) -> Result<()> {
        let c = self;
        let text = |name: &str, slot: &mut String| {
            if let Some(v) = lookup(name) {
                *slot = v;
            }
        };
        text("BROKER", &mut c.broker);
        text("DEFAULT_QUEUE", &mut c.default_queue);
        text("RESULT_BACKEND", &mut c.result_backend);
        text("AMQP_EXCHANGE", &mut c.amqp.exchange);
        text("AMQP_EXCHANGE_TYPE", &mut c.amqp.exchange_type);
        text("AMQP_BINDING_KEY", &mut c.amqp.binding_key);
        if let Some(v) = parsed(lookup, "RESULTS_EXPIRE_IN")? {
            c.results_expire_in = v;
        }
        if let Some(v) = parsed(lookup, "AMQP_PREFETCH_COUNT")? {
            c.amqp.prefetch_count = v;
        }
        if let Some(v) = parsed(lookup, "MAX_MESSAGE_SIZE")? {
            c.max_message_size = v;
        }
        if let Some(v) = parsed(lookup, "ETA_TOLERANCE_MS")? {
            c.eta_tolerance = Duration::from_millis(v);
        }
        if let Some(v) = parsed(lookup, "REQUEUE_DELAY_MS")? {
            c.requeue_delay = Duration::from_millis(v);
        }
        if let Some(v) = parsed(lookup, "RECONNECT_TIMEOUT_MS")? {
            c.reconnect_timeout = Duration::from_millis(v);
        }
        if let Some(v) = parsed(lookup, "MAX_DELIVERIES")? {
            c.max_deliveries = v;
        }
        if let Some(v) = parsed(lookup, "MAX_INFLIGHT_BYTES")? {
            c.max_inflight_bytes = v;
        }
        if let Some(v) = parsed(lookup, "STORE_RETRY_TIMEOUT_MS")? {
            c.store_retry_timeout = Duration::from_millis(v);
        }
        if let Some(v) = parsed(&lookup, "REVOKE_POLL_MS")? {
            c.revoke_poll = Duration::from_millis(v);
        }
        if let Some(v) = lookup("NO_UNIX_SIGNALS") {
            c.no_unix_signals = parse_bool("NO_UNIX_SIGNALS", &v)?;
        }
        if let Some(v) = lookup("AMQP_QUEUE_DECLARE_ARGS") {
            c.amqp.queue_declare_args = parse_table("AMQP_QUEUE_DECLARE_ARGS", &v)?;
        }
        if let Some(v) = lookup("AMQP_QUEUE_BINDING_ARGS") {
            c.amqp.queue_binding_args = parse_table("AMQP_QUEUE_BINDING_ARGS", &v)?;
        }
        c.apply_go_env(lookup)?;
        c.registry.apply_env(lookup)?;
        Ok(())
    }

    /// Checks the values that cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.broker.is_empty() {
            return Err(Error::config("the broker URL is empty"));
        }
        if self.default_queue.is_empty() {
            return Err(Error::config("the default queue name is empty"));
        }
        if self.max_message_size == 0 {
            return Err(Error::config("max_message_size must be positive"));
        }
        if self.results_expire_in > MAX_RESULTS_EXPIRE_IN {
            return Err(Error::config(format!(
                "results_expire_in must be at most {MAX_RESULTS_EXPIRE_IN} seconds (100 years)"
            )));
        }
        if self.max_deliveries == 0 {
            return Err(Error::config("max_deliveries must be at least 1"));
        }
        self.registry.validate()?;
        if self.max_inflight_bytes == 0 {
            return Err(Error::config("max_inflight_bytes must be positive"));
        }
        if !matches!(
            self.amqp.exchange_type.as_str(),
            "direct" | "fanout" | "topic" | "headers"
        ) {
            return Err(Error::config(format!(
                "unknown AMQP exchange type `{}` (expected direct, fanout, topic or headers)",
                self.amqp.exchange_type
            )));
        }
        if self.broker.starts_with("amqp://") || self.broker.starts_with("amqps://") {
            self.validate_amqp_names()?;
            self.validate_cluster()?;
        }
        Ok(())
    }

    /// AMQP carries names (exchange, queue, binding key, argument keys) as short strings of at
    /// most [`AMQP_MAX_NAME`] bytes; the dead-letter queue `<default queue>.dead_letter` too.
    fn validate_amqp_names(&self) -> Result<()> {
        let dead_letter = format!("{}{DEAD_LETTER_SUFFIX}", self.default_queue);
        for (what, name) in [
            ("AMQP exchange name", self.amqp.exchange.as_str()),
            ("AMQP binding key", self.amqp.binding_key.as_str()),
            ("default queue name", self.default_queue.as_str()),
            ("dead-letter queue name", dead_letter.as_str()),
        ] {
            if name.len() > AMQP_MAX_NAME {
                return Err(Error::config(overlong(what, name)));
            }
        }
        for (what, args) in [
            ("AMQP queue declare argument", &self.amqp.queue_declare_args),
            ("AMQP queue binding argument", &self.amqp.queue_binding_args),
        ] {
            if let Some(key) = overlong_key(args) {
                return Err(Error::config(overlong(&format!("{what} key"), key)));
            }
        }
        Ok(())
    }

    /// The routing key Go's `AdjustRoutingKey` gives a signature without one: the binding key
    /// on a direct exchange, else the default queue.
    pub fn default_routing_key(&self) -> &str {
        if self.amqp.exchange_type == "direct" {
            &self.amqp.binding_key
        } else {
            &self.default_queue
        }
    }
}

/// Go's environment variables for the keys of Go's YAML config that `apply_env` did not read
/// before: `LOCK`, the broker separator, `AMQP_AUTO_DELETE`, `AMQP_DELAYED_QUEUE`, `REDIS_*`
/// (Go: the `envconfig` tags in v2/config/config.go).
impl Config {
    fn apply_go_env(&mut self, lookup: &impl Fn(&str) -> Option<String>) -> Result<()> {
        let non_empty = |v: String| (!v.is_empty()).then_some(v);
        if let Some(v) = lookup("LOCK") {
            self.lock = non_empty(v);
        }
        // Go's tag is `MULTIPLE_BROKEN_SEPARATOR` (sic); the correct spelling is read too.
        if let Some(v) =
            lookup("MULTIPLE_BROKEN_SEPARATOR").or_else(|| lookup("MULTIPLE_BROKER_SEPARATOR"))
        {
            self.multiple_broker_separator = non_empty(v);
        }
        if let Some(v) = lookup("AMQP_AUTO_DELETE") {
            self.amqp.auto_delete = parse_bool("AMQP_AUTO_DELETE", &v)?;
        }
        if let Some(v) = lookup("AMQP_DELAYED_QUEUE") {
            self.amqp.delayed_queue = v;
        }
        let r = &mut self.redis;
        let secs = |name: &str, slot: &mut Duration| -> Result<()> {
            if let Some(v) = parsed(lookup, name)? {
                *slot = Duration::from_secs(v);
            }
            Ok(())
        };
        secs("REDIS_IDLE_TIMEOUT", &mut r.idle_timeout)?;
        secs("REDIS_READ_TIMEOUT", &mut r.read_timeout)?;
        secs("REDIS_WRITE_TIMEOUT", &mut r.write_timeout)?;
        secs("REDIS_CONNECT_TIMEOUT", &mut r.connect_timeout)?;
        for (name, slot) in [
            (
                "REDIS_NORMAL_TASKS_POLL_PERIOD",
                &mut r.normal_tasks_poll_period,
            ),
            (
                "REDIS_DELAYED_TASKS_POLL_PERIOD",
                &mut r.delayed_tasks_poll_period,
            ),
        ] {
            if let Some(v) = parsed(lookup, name)? {
                *slot = Duration::from_millis(v);
            }
        }
        for (name, slot) in [
            ("REDIS_MAX_IDLE", &mut r.max_idle),
            ("REDIS_MAX_ACTIVE", &mut r.max_active),
        ] {
            if let Some(v) = parsed(lookup, name)? {
                *slot = v;
            }
        }
        for (name, slot) in [
            ("REDIS_WAIT", &mut r.wait),
            ("REDIS_CLUSTER_ENABLED", &mut r.cluster_enabled),
        ] {
            if let Some(v) = lookup(name) {
                *slot = parse_bool(name, &v)?;
            }
        }
        for (name, slot) in [
            ("REDIS_DELAYED_TASKS_KEY", &mut r.delayed_tasks_key),
            ("REDIS_CLIENT_NAME", &mut r.client_name),
            ("REDIS_MASTER_NAME", &mut r.master_name),
            ("REDIS_SENTINEL_PASSWORD", &mut r.sentinel_password),
        ] {
            if let Some(v) = lookup(name) {
                *slot = v;
            }
        }
        Ok(())
    }
}

/// The longest name (or table key) AMQP 0-9-1 can carry: a short string is at most 255 bytes.
pub(crate) const AMQP_MAX_NAME: usize = 255;

/// The suffix of a queue's dead-letter queue (`<queue>.dead_letter`).
pub(crate) const DEAD_LETTER_SUFFIX: &str = ".dead_letter";

/// The first key of `map`, or of a table nested in it at any depth (in objects and arrays),
/// longer than [`AMQP_MAX_NAME`] bytes.
pub(crate) fn overlong_key(map: &Map<String, Value>) -> Option<&str> {
    fn in_value(value: &Value) -> Option<&str> {
        match value {
            Value::Object(map) => overlong_key(map),
            Value::Array(items) => items.iter().find_map(in_value),
            _ => None,
        }
    }
    map.iter().find_map(|(key, value)| {
        if key.len() > AMQP_MAX_NAME {
            Some(key.as_str())
        } else {
            in_value(value)
        }
    })
}

/// The message for a name longer than AMQP can carry (with the start of the name only).
pub(crate) fn overlong(what: &str, name: &str) -> String {
    let start: String = name.chars().take(32).collect();
    format!(
        "{what} `{start}...` is {} bytes long; AMQP carries at most {AMQP_MAX_NAME}",
        name.len()
    )
}

fn parsed<T: std::str::FromStr>(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>>
where
    T::Err: fmt::Display,
{
    match lookup(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| Error::config(format!("{name}={v:?} is not a valid number: {e}"))),
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "yes" => Ok(true),
        "0" | "f" | "false" | "no" | "" => Ok(false),
        _ => Err(Error::config(format!("{name}={v:?} is not a boolean"))),
    }
}

/// Go's `key:value,key:value` map syntax. Integer values become numbers (so that
/// `x-max-priority:10` works), others strings.
fn parse_table(name: &str, v: &str) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((key, value)) = pair.split_once(':') else {
            return Err(Error::config(format!(
                "{name}: invalid item {pair:?} (expected key:value)"
            )));
        };
        let value = value.trim();
        let value = match value.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::from(value),
        };
        map.insert(key.trim().to_owned(), value);
    }
    Ok(map)
}

/// The arguments RabbitMQ refuses on a quorum queue (`PRECONDITION_FAILED - invalid arg`,
/// measured on 3.10): they only mean something to a classic queue.
pub const CLASSIC_ONLY_QUEUE_ARGS: &[&str] = &["x-max-priority", "x-queue-mode"];

/// Several broker URLs (a RabbitMQ cluster) and quorum queues.
impl Config {
    /// The broker URLs: `broker` split by [`multiple_broker_separator`](Self::multiple_broker_separator)
    /// (Go: `AMQPConnector.Connect` in v2/common/amqp.go, `strings.Split(urls, urlSeparator)`),
    /// or `broker` alone without a separator. Unlike Go, blanks around each URL are trimmed and
    /// empty items skipped (Go would try to dial `""`).
    ///
    /// ```
    /// let config = machinery::Config::builder()
    ///     .broker("amqp://u:p@r1:5672/ | amqp://u:p@r2:5672/ |")
    ///     .multiple_broker_separator("|")
    ///     .build()?;
    /// assert_eq!(config.broker_urls(), ["amqp://u:p@r1:5672/", "amqp://u:p@r2:5672/"]);
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn broker_urls(&self) -> Vec<&str> {
        match self.multiple_broker_separator.as_deref() {
            Some(separator) if !separator.is_empty() => self
                .broker
                .split(separator)
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .collect(),
            _ => vec![self.broker.as_str()],
        }
    }

    /// `broker` for logs and errors: every URL of [`broker_urls`](Self::broker_urls) with its
    /// password masked ([`mask_url`]), joined by the separator.
    ///
    /// ```
    /// let config = machinery::Config::builder()
    ///     .broker("amqp://u:one@r1/,amqp://u:two@r2/")
    ///     .multiple_broker_separator(",")
    ///     .build()?;
    /// assert_eq!(config.masked_broker(), "amqp://u:***@r1/,amqp://u:***@r2/");
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn masked_broker(&self) -> String {
        let separator = self.multiple_broker_separator.as_deref().unwrap_or("");
        self.broker_urls()
            .into_iter()
            .map(mask_url)
            .collect::<Vec<_>>()
            .join(separator)
    }

    /// Whether the queues are declared quorum queues (`x-queue-type: quorum` among the
    /// declare arguments).
    ///
    /// ```
    /// let config = machinery::Config::builder().queue_declare_arg("x-queue-type", "quorum").build()?;
    /// assert!(config.quorum_queues());
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn quorum_queues(&self) -> bool {
        self.amqp.queue_declare_args.get("x-queue-type") == Some(&Value::from("quorum"))
    }

    /// Every broker URL is an AMQP one; a quorum queue gets no argument RabbitMQ refuses on it
    /// ([`CLASSIC_ONLY_QUEUE_ARGS`]), and a delivery limit that is a count. (The properties
    /// quorum queues refuse, exclusive, auto-delete and non-durable, machinery never declares.)
    fn validate_cluster(&self) -> Result<()> {
        let urls = self.broker_urls();
        if urls.is_empty() {
            return Err(Error::config("the broker URL list is empty"));
        }
        if let Some(url) = urls
            .iter()
            .find(|url| !(url.starts_with("amqp://") || url.starts_with("amqps://")))
        {
            return Err(Error::config(format!(
                "every broker URL of a list must be amqp:// or amqps:// (got `{}`)",
                mask_url(url)
            )));
        }
        if !self.quorum_queues() {
            return Ok(());
        }
        if let Some(arg) = CLASSIC_ONLY_QUEUE_ARGS
            .iter()
            .find(|arg| self.amqp.queue_declare_args.contains_key(**arg))
        {
            return Err(Error::config(format!(
                "RabbitMQ refuses `{arg}` on a quorum queue (x-queue-type: quorum); remove it \
                 from the queue declare arguments"
            )));
        }
        if let Some(limit) = self.amqp.queue_declare_args.get("x-delivery-limit") {
            // 0 would dead-letter every message on its first delivery.
            if limit
                .as_u64()
                .is_none_or(|n| n == 0 || u32::try_from(n).is_err())
            {
                return Err(Error::config(format!(
                    "x-delivery-limit must be a whole number from 1 to {} (got {limit})",
                    u32::MAX
                )));
            }
        }
        Ok(())
    }

    /// The queue's own delivery limit (`x-delivery-limit` among the declare arguments of a
    /// quorum queue): RabbitMQ drops (or dead-letters) a message returned more often than that.
    ///
    /// ```
    /// let config = machinery::Config::builder()
    ///     .queue_declare_arg("x-queue-type", "quorum")
    ///     .queue_declare_arg("x-delivery-limit", 3)
    ///     .build()?;
    /// assert_eq!(config.delivery_limit(), Some(3));
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn delivery_limit(&self) -> Option<u32> {
        if !self.quorum_queues() {
            return None;
        }
        let limit = self.amqp.queue_declare_args.get("x-delivery-limit")?;
        u32::try_from(limit.as_u64()?).ok()
    }
}

/// A URL with its password replaced by `***`, for logs and errors.
///
/// ```
/// use machinery::config::mask_url;
/// assert_eq!(mask_url("amqp://guest:secret@host:5672/vhost"), "amqp://guest:***@host:5672/vhost");
/// assert_eq!(mask_url("amqp://u:ab/c@d@host/"), "amqp://u:***@host/");
/// assert_eq!(mask_url("redis://secret@host:6379/0"), "redis://***@host:6379/0");
/// assert_eq!(mask_url("memory://jobs"), "memory://jobs");
/// ```
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The user info ends at the last `@` before any query or fragment: a password may itself
    // contain `/` or `@`.
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_owned(),
    };
    format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("broker", &self.masked_broker())
            .field("default_queue", &self.default_queue)
            .field("result_backend", &mask_url(&self.result_backend))
            .field("results_expire_in", &self.results_expire_in)
            .field("amqp", &self.amqp)
            .field("no_unix_signals", &self.no_unix_signals)
            .field("max_message_size", &self.max_message_size)
            .field("eta_tolerance", &self.eta_tolerance)
            .field("requeue_delay", &self.requeue_delay)
            .field("reconnect_timeout", &self.reconnect_timeout)
            .field("max_deliveries", &self.max_deliveries)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("store_retry_timeout", &self.store_retry_timeout)
            .field("lock", &self.lock.as_deref().map(mask_url))
            .field("multiple_broker_separator", &self.multiple_broker_separator)
            .field("redis", &self.redis)
            .field("revoke_poll", &self.revoke_poll)
            .field("registry", &self.registry)
            .finish()
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("exchange", &self.exchange)
            .field("exchange_type", &self.exchange_type)
            .field("binding_key", &self.binding_key)
            .field("prefetch_count", &self.prefetch_count)
            .field("queue_declare_args", &self.queue_declare_args)
            .field("queue_binding_args", &self.queue_binding_args)
            .field("auto_delete", &self.auto_delete)
            .field("delayed_queue", &self.delayed_queue)
            .finish()
    }
}

/// Builds a [`Config`]; see [`Config::builder`].
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    config: Config,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: into $ty:ty => $($field:ident).+;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: impl Into<$ty>) -> Self {
            self.config.$($field).+ = value.into();
            self
        }
    )*};
}

macro_rules! value_setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $($field:ident).+;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$($field).+ = value;
            self
        }
    )*};
}

impl ConfigBuilder {
    setters! {
        /// Broker URL.
        broker: into String => broker;
        /// Default queue.
        default_queue: into String => default_queue;
        /// Result backend URL.
        result_backend: into String => result_backend;
        /// AMQP exchange name.
        exchange: into String => amqp.exchange;
        /// AMQP exchange type.
        exchange_type: into String => amqp.exchange_type;
        /// AMQP binding key.
        binding_key: into String => amqp.binding_key;
    }

    value_setters! {
        /// Seconds results are kept.
        results_expire_in: u64 => results_expire_in;
        /// AMQP prefetch count.
        prefetch_count: u16 => amqp.prefetch_count;
        /// Disable signal handling in `worker::launch`.
        no_unix_signals: bool => no_unix_signals;
        /// Largest message body accepted.
        max_message_size: usize => max_message_size;
        /// Clock skew tolerance for ETAs.
        eta_tolerance: Duration => eta_tolerance;
        /// Delay before handing back a message for an unknown task.
        requeue_delay: Duration => requeue_delay;
        /// How long to keep trying to reach a broker that went away.
        reconnect_timeout: Duration => reconnect_timeout;
        /// How many times one message is tried before it is dead-lettered.
        max_deliveries: u32 => max_deliveries;
        /// The bytes of message bodies a worker holds at once.
        max_inflight_bytes: usize => max_inflight_bytes;
        /// How long a worker retries a result-store write before giving the message back.
        store_retry_timeout: Duration => store_retry_timeout;
        /// How often a worker looks for revoked tasks among those it runs (`0`: never).
        revoke_poll: Duration => revoke_poll;
    }

    /// The lock URL of periodic tasks (Go's `lock`): `redis://[password@]host[:port]`, or
    /// `eager` for a lock within this process.
    ///
    /// ```
    /// let config = machinery::Config::builder().lock("redis://secret@127.0.0.1:6379").build()?;
    /// assert_eq!(config.lock.as_deref(), Some("redis://secret@127.0.0.1:6379"));
    /// assert!(!format!("{config:?}").contains("secret"));
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn lock(mut self, url: impl Into<String>) -> Self {
        self.config.lock = Some(url.into());
        self
    }

    /// The separator of several broker URLs in `broker` (Go's `multiple_broker_separator`);
    /// see [`Config::broker_urls`].
    ///
    /// ```
    /// let config = machinery::Config::builder()
    ///     .broker("amqp://a:5672/,amqp://b:5672/")
    ///     .multiple_broker_separator(",")
    ///     .build()?;
    /// assert_eq!(config.broker_urls(), ["amqp://a:5672/", "amqp://b:5672/"]);
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn multiple_broker_separator(mut self, separator: impl Into<String>) -> Self {
        let separator = separator.into();
        self.config.multiple_broker_separator = (!separator.is_empty()).then_some(separator);
        self
    }

    /// Adds a queue declaration argument (`x-max-priority`, `x-queue-type`, ...).
    pub fn queue_declare_arg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.config
            .amqp
            .queue_declare_args
            .insert(key.into(), value.into());
        self
    }

    /// Adds a queue binding argument.
    pub fn queue_binding_arg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.config
            .amqp
            .queue_binding_args
            .insert(key.into(), value.into());
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<Config> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_path_settings_are_read_and_checked() {
        let config = Config::from_lookup(|name| match name {
            "MAX_DELIVERIES" => Some("7".into()),
            "MAX_INFLIGHT_BYTES" => Some("1024".into()),
            "STORE_RETRY_TIMEOUT_MS" => Some("250".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.max_deliveries, 7);
        assert_eq!(config.max_inflight_bytes, 1024);
        assert_eq!(config.store_retry_timeout, Duration::from_millis(250));
        for (name, value) in [
            ("MAX_DELIVERIES", "0"),
            ("MAX_INFLIGHT_BYTES", "0"),
            // A TTL that would overflow a clock (the embedded backend adds it to `now`).
            ("RESULTS_EXPIRE_IN", "18446744073709551615"),
        ] {
            let err = Config::from_lookup(|n| (n == name).then(|| value.to_owned())).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config, "{name}={value}");
        }
    }

    #[test]
    fn the_lock_url_is_read_from_lock_and_masked() {
        let config = Config::from_lookup(|name| {
            (name == "LOCK").then(|| "redis://secret@127.0.0.1:6379".to_owned())
        })
        .unwrap();
        assert_eq!(
            config.lock.as_deref(),
            Some("redis://secret@127.0.0.1:6379")
        );
        let shown = format!("{config:?}");
        assert!(shown.contains("redis://***@127.0.0.1:6379"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
        let unset = Config::from_lookup(|name| (name == "LOCK").then(String::new)).unwrap();
        assert_eq!(unset.lock, None);
    }

    #[test]
    fn revoke_poll_is_read_in_milliseconds() {
        assert_eq!(Config::default().revoke_poll, Duration::from_secs(1));
        let config =
            Config::from_lookup(|name| (name == "REVOKE_POLL_MS").then(|| "0".to_owned())).unwrap();
        assert_eq!(config.revoke_poll, Duration::ZERO);
    }
}
