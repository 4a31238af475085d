//! The settings of the worker registry and the recent-task index (machinery's own; Go has
//! neither): see [`RegistryConfig`].

use std::fmt;
use std::time::Duration;

use crate::config::mask_url;
use crate::error::Result;

/// Settings of the worker registry, the recent-task index and the throughput counters that
/// workers keep in Redis for operators ([`admin`](crate::admin), the `machinery` CLI).
///
/// Which Redis: [`redis_url`](Self::redis_url) when set, else the result backend's when it is
/// Redis, else the broker's when it is Redis. Without Redis the registry is off (the worker
/// says so once, at INFO).
///
/// ```
/// use std::time::Duration;
/// use machinery::Config;
///
/// let config = Config::from_lookup(|name| match name {
///     "BROKER" => Some("memory://".to_owned()),
///     "REGISTRY_HEARTBEAT_MS" => Some("2000".to_owned()),
///     "RECENT_MAX" => Some("500".to_owned()),
///     _ => None,
/// })?;
/// assert_eq!(config.registry.heartbeat, Duration::from_secs(2));
/// assert_eq!(config.registry.recent_max, 500);
/// assert_eq!(config.registry.recent_max_age, Duration::from_secs(3600));
/// # Ok::<(), machinery::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistryConfig {
    /// Whether workers write the registry, the index and the counters (`REGISTRY`, default
    /// true).
    pub enabled: bool,
    /// How often a worker refreshes its record (`REGISTRY_HEARTBEAT_MS`, default 5 s); the
    /// record expires after three heartbeats.
    pub heartbeat: Duration,
    /// How many task ids the index keeps per state (`RECENT_MAX`, default 10,000).
    pub recent_max: usize,
    /// How long the index keeps a task id (`RECENT_MAX_AGE_S`, default 3600 s, Go's default
    /// `results_expire_in`).
    pub recent_max_age: Duration,
    /// How often a worker writes its index entries and counters, in one pipeline
    /// (`REGISTRY_FLUSH_MS`, default 100 ms); sooner when [`flush_batch`](Self::flush_batch)
    /// entries wait.
    pub flush_every: Duration,
    /// How many index entries make a write at once (default 256).
    pub flush_batch: usize,
    /// The Redis to use instead of the result backend's or the broker's (`REGISTRY_REDIS`).
    pub redis_url: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            enabled: true,
            heartbeat: Duration::from_secs(5),
            recent_max: 10_000,
            recent_max_age: Duration::from_secs(3600),
            flush_every: Duration::from_millis(100),
            flush_batch: 256,
            redis_url: None,
        }
    }
}

impl RegistryConfig {
    /// Reads `REGISTRY`, `REGISTRY_HEARTBEAT_MS`, `RECENT_MAX`, `RECENT_MAX_AGE_S`,
    /// `REGISTRY_FLUSH_MS` and `REGISTRY_REDIS`.
    pub(crate) fn apply_env(&mut self, lookup: &impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(v) = lookup("REGISTRY") {
            self.enabled = super::parse_bool("REGISTRY", &v)?;
        }
        if let Some(v) = super::parsed(lookup, "REGISTRY_HEARTBEAT_MS")? {
            self.heartbeat = Duration::from_millis(v);
        }
        if let Some(v) = super::parsed(lookup, "RECENT_MAX")? {
            self.recent_max = v;
        }
        if let Some(v) = super::parsed(lookup, "RECENT_MAX_AGE_S")? {
            self.recent_max_age = Duration::from_secs(v);
        }
        if let Some(v) = super::parsed(lookup, "REGISTRY_FLUSH_MS")? {
            self.flush_every = Duration::from_millis(v);
        }
        if let Some(v) = lookup("REGISTRY_REDIS") {
            self.redis_url = (!v.is_empty()).then_some(v);
        }
        Ok(())
    }

    /// Checks the values that cannot work.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.heartbeat.is_zero() {
            return Err(crate::Error::config(
                "REGISTRY_HEARTBEAT_MS must be above 0",
            ));
        }
        if self.flush_every.is_zero() {
            return Err(crate::Error::config("REGISTRY_FLUSH_MS must be above 0"));
        }
        Ok(())
    }

    /// How long a worker's record lives without a heartbeat: three heartbeats.
    ///
    /// ```
    /// let registry = machinery::config::RegistryConfig::default();
    /// assert_eq!(registry.record_ttl(), std::time::Duration::from_secs(15));
    /// ```
    pub fn record_ttl(&self) -> Duration {
        self.heartbeat.saturating_mul(3)
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("enabled", &self.enabled)
            .field("heartbeat", &self.heartbeat)
            .field("recent_max", &self.recent_max)
            .field("recent_max_age", &self.recent_max_age)
            .field("flush_every", &self.flush_every)
            .field("flush_batch", &self.flush_batch)
            .field("redis_url", &self.redis_url.as_deref().map(mask_url))
            .finish()
    }
}
