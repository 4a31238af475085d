//! Task options, layered as app → task → signature.
//!
//! A task's defaults are written in its attribute, `#[task(retries = 3, timeout = "30s")]`, and
//! kept in its [`TaskDescriptor`](crate::TaskDescriptor) as a [`TaskOptions`]. A signature can
//! override each of them (`.with_retries(5)`, `.with_timeout(..)`), and a worker supplies the
//! defaults for what neither sets (rusty-celery's `TaskOptions` layering: app → task →
//! signature, the most specific wins).
//!
//! Where Go's signature has a field for an option, the option travels in that field, so Go
//! workers honour it too: `retries` → `RetryCount`, `retry_timeout` → `RetryTimeout`, `queue` →
//! `RoutingKey`, `priority` → `Priority`. The options Go lacks travel in the signature's
//! `Headers`, which Go passes through untouched (v2/tasks/signature.go): a Rust worker enforces
//! them whoever sent the task.
//!
//! ```
//! use std::time::Duration;
//! use machinery::task;
//!
//! #[task(retries = 3, timeout = "30s", queue = "slow", max_retry_later = 10)]
//! async fn fetch(url: String) -> String {
//!     url
//! }
//!
//! let sig = fetch::signature("https://example.com".into());
//! assert_eq!(sig.as_wire().retry_count, 3);
//! assert_eq!(sig.as_wire().routing_key, "slow");
//! // A signature overrides the task's default; the limit travels in the headers.
//! let sig = sig.with_timeout(Duration::from_secs(5));
//! assert_eq!(sig.as_wire().headers["x-machinery-timeout-ms"], 5000);
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use crate::wire::Signature;

/// The `Headers` key carrying the signature's time limit, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-machinery-timeout-ms";
/// The `Headers` key carrying how many retry-laters the signature allows.
pub const MAX_RETRY_LATER_HEADER: &str = "x-machinery-max-retry-later";
/// The `Headers` key carrying how many retry-laters this task has used so far.
pub const RETRY_LATER_HEADER: &str = "x-machinery-retry-later";

/// How many times a task may ask to be retried later ([`TaskError::retry_in`]) when neither
/// the signature, the task nor the worker sets `max_retry_later`. Go has no bound
/// (machinery #640).
///
/// [`TaskError::retry_in`]: crate::TaskError::retry_in
pub const DEFAULT_MAX_RETRY_LATER: u32 = 100;

/// A task's default options, as `#[task(..)]` sets them. Every option is unset by default.
///
/// Built in a `const` context by the macro; by hand:
///
/// ```
/// use std::time::Duration;
/// use machinery::options::{RateLimit, TaskOptions};
///
/// const OPTIONS: TaskOptions = TaskOptions::new()
///     .retries(3)
///     .timeout(Duration::from_secs(30))
///     .rate_limit(RateLimit::per_second(100));
/// assert_eq!(OPTIONS.get_retries(), Some(3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskOptions {
    retries: Option<u32>,
    retry_timeout: Option<u32>,
    timeout: Option<Duration>,
    rate_limit: Option<RateLimit>,
    queue: Option<&'static str>,
    priority: Option<u8>,
    max_retry_later: Option<u32>,
}

impl TaskOptions {
    /// No option set.
    pub const fn new() -> Self {
        TaskOptions {
            retries: None,
            retry_timeout: None,
            timeout: None,
            rate_limit: None,
            queue: None,
            priority: None,
            max_retry_later: None,
        }
    }

    /// Retries on failure (Go's `RetryCount`).
    pub const fn retries(mut self, count: u32) -> Self {
        self.retries = Some(count);
        self
    }

    /// The first retry's wait in seconds, from which the Fibonacci waits grow (Go's
    /// `RetryTimeout`).
    pub const fn retry_timeout(mut self, seconds: u32) -> Self {
        self.retry_timeout = Some(seconds);
        self
    }

    /// The time limit of one run of the body.
    pub const fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// How often the task may start, per worker (or across the cluster, see
    /// [`WorkerBuilder::cluster_rate_limits`](crate::WorkerBuilder)).
    pub const fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// The queue (routing key) it is sent to (Go's `RoutingKey`).
    pub const fn queue(mut self, queue: &'static str) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The message priority (Go's `Priority`).
    pub const fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// How many times it may ask to be retried later before it fails.
    pub const fn max_retry_later(mut self, count: u32) -> Self {
        self.max_retry_later = Some(count);
        self
    }

    /// The `retries` option.
    pub const fn get_retries(&self) -> Option<u32> {
        self.retries
    }

    /// The `retry_timeout` option, in seconds.
    pub const fn get_retry_timeout(&self) -> Option<u32> {
        self.retry_timeout
    }

    /// The `timeout` option.
    pub const fn get_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The `rate_limit` option.
    pub const fn get_rate_limit(&self) -> Option<RateLimit> {
        self.rate_limit
    }

    /// The `queue` option.
    pub const fn get_queue(&self) -> Option<&'static str> {
        self.queue
    }

    /// The `priority` option.
    pub const fn get_priority(&self) -> Option<u8> {
        self.priority
    }

    /// The `max_retry_later` option.
    pub const fn get_max_retry_later(&self) -> Option<u32> {
        self.max_retry_later
    }

    /// Writes the options that travel in Go's fields into a new signature.
    pub(crate) fn apply(&self, signature: &mut Signature) {
        if let Some(retries) = self.retries {
            signature.retry_count = i64::from(retries);
        }
        if let Some(seconds) = self.retry_timeout {
            signature.retry_timeout = i64::from(seconds);
        }
        if let Some(queue) = self.queue {
            queue.clone_into(&mut signature.routing_key);
        }
        if let Some(priority) = self.priority {
            signature.priority = priority;
        }
    }
}

/// A rate: at most `count` starts per `per`.
///
/// Parsed from `"100/s"`, `"10/m"`, `"1/h"`, or with a period: `"5/10s"`, `"1/500ms"`.
///
/// ```
/// use std::time::Duration;
/// use machinery::options::RateLimit;
///
/// let limit: RateLimit = "100/s".parse().unwrap();
/// assert_eq!(limit, RateLimit::per_second(100));
/// assert_eq!(limit.interval(), Duration::from_millis(10));
/// assert!("100/fortnight".parse::<RateLimit>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    count: u32,
    per: Duration,
}

impl RateLimit {
    /// `count` starts per `per`. A `count` of 0 or a zero period is refused (`None`).
    pub const fn new(count: u32, per: Duration) -> Option<RateLimit> {
        if count == 0 || per.is_zero() {
            None
        } else {
            Some(RateLimit { count, per })
        }
    }

    /// `count` per second (at least 1).
    pub const fn per_second(count: u32) -> RateLimit {
        RateLimit {
            count: if count == 0 { 1 } else { count },
            per: Duration::from_secs(1),
        }
    }

    /// The starts allowed per period.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.per
    }

    /// The even spacing between two starts (`period / count`), at least 1 ns.
    pub fn interval(&self) -> Duration {
        (self.per / self.count).max(Duration::from_nanos(1))
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, format_duration(self.per))
    }
}

impl FromStr for RateLimit {
    type Err = Error;

    fn from_str(s: &str) -> Result<RateLimit> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Config,
                format!("rate limit `{s}`: {why}; expected `N/s`, `N/m`, `N/h` or `N/<duration>`, such as `100/s` or `5/10s`"),
            )
        };
        let (count, per) = s.trim().split_once('/').ok_or_else(|| bad("no `/`"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad("the count is not a whole number"))?;
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => parse_duration(other).map_err(|e| bad(&e))?,
        };
        RateLimit::new(count, per).ok_or_else(|| bad("the count and the period must not be 0"))
    }
}

/// Parses a duration such as `30s`, `500ms`, `2m`, `1h30m`, `1.5s` (Go's `time.ParseDuration`
/// units: `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(machinery::options::parse_duration("1m30s").unwrap(), Duration::from_secs(90));
/// assert!(machinery::options::parse_duration("30").is_err());
/// ```
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut rest = s;
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{s}`: a number needs a unit (ns, us, ms, s, m, h)"))?;
        if number_len == 0 {
            return Err(format!("`{s}`: expected a number"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| format!("`{s}`: `{}` is not a number", &rest[..number_len]))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            unit => return Err(format!("`{s}`: unknown unit `{unit}`")),
        };
        rest = &rest[unit_len..];
        total += number * nanos_per;
    }
    // Beyond ~584 years a u64 of nanoseconds overflows.
    if !total.is_finite() || total >= 1.8e19 {
        return Err(format!("`{s}` is out of range"));
    }
    // Truncation to whole nanoseconds is the intent; the range is checked above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(Duration::from_nanos(total as u64))
}

fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The options in force for one run of a task, once the layers are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_retry_later: u32,
    pub(crate) rate_limit: Option<RateLimit>,
}

/// A worker's defaults for the options a task and its signature leave unset (the "app" layer).
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkerDefaults {
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_retry_later: Option<u32>,
    /// Per task name; replaces the task's own rate limit.
    pub(crate) rate_limits: std::collections::HashMap<String, RateLimit>,
}

impl WorkerDefaults {
    /// Resolves signature → task → worker: the most specific setting wins. A worker's rate
    /// limit for a task overrides the task's (rate limits protect what the worker calls).
    pub(crate) fn resolve(&self, signature: &Signature, task: &TaskOptions) -> Resolved {
        Resolved {
            // A zero from the wire does not switch the task's or the worker's limit off.
            timeout: header_u64(signature, TIMEOUT_HEADER)
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .or(task.timeout)
                .or(self.timeout)
                .filter(|d| !d.is_zero()),
            max_retry_later: header_u64(signature, MAX_RETRY_LATER_HEADER)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .or(task.max_retry_later)
                .or(self.max_retry_later)
                .unwrap_or(DEFAULT_MAX_RETRY_LATER),
            rate_limit: self
                .rate_limits
                .get(&signature.name)
                .copied()
                .or(task.rate_limit),
        }
    }
}

/// A non-negative integer header; anything else (missing, negative, text) counts as unset.
pub(crate) fn header_u64(signature: &Signature, key: &str) -> Option<u64> {
    signature.headers.get(key).and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        for bad in ["", "30", "s", "1x", "1e400h", "9999999999999h", ".s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_parse() {
        assert_eq!(
            "10/m".parse::<RateLimit>().ok(),
            RateLimit::new(10, Duration::from_secs(60))
        );
        assert_eq!(
            "5/10s".parse::<RateLimit>().ok(),
            RateLimit::new(5, Duration::from_secs(10))
        );
        assert_eq!(
            "100/s"
                .parse::<RateLimit>()
                .map(|r| r.to_string())
                .ok()
                .as_deref(),
            Some("100/1s")
        );
        for bad in ["0/s", "1/0s", "x/s", "10", "10/", "-1/s", "1/fortnight"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_most_specific_layer_wins() {
        let task = TaskOptions::new()
            .timeout(Duration::from_secs(30))
            .max_retry_later(7)
            .rate_limit(RateLimit::per_second(10));
        let mut worker = WorkerDefaults {
            timeout: Some(Duration::from_secs(60)),
            max_retry_later: Some(3),
            ..WorkerDefaults::default()
        };
        let mut sig = Signature::new("t");
        let r = worker.resolve(&sig, &task);
        assert_eq!(r.timeout, Some(Duration::from_secs(30)));
        assert_eq!(r.max_retry_later, 7);
        assert_eq!(r.rate_limit, Some(RateLimit::per_second(10)));
        assert_eq!(
            worker.resolve(&sig, &TaskOptions::new()).timeout,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            WorkerDefaults::default()
                .resolve(&sig, &TaskOptions::new())
                .max_retry_later,
            DEFAULT_MAX_RETRY_LATER
        );
        sig.headers.insert(TIMEOUT_HEADER.into(), 250.into());
        sig.headers.insert(MAX_RETRY_LATER_HEADER.into(), 1.into());
        worker
            .rate_limits
            .insert("t".into(), RateLimit::per_second(2));
        let r = worker.resolve(&sig, &task);
        assert_eq!(r.timeout, Some(Duration::from_millis(250)));
        assert_eq!(r.max_retry_later, 1);
        assert_eq!(r.rate_limit, Some(RateLimit::per_second(2)));
        // A malformed header is ignored, not trusted.
        sig.headers.insert(TIMEOUT_HEADER.into(), (-5).into());
        assert_eq!(
            worker.resolve(&sig, &task).timeout,
            Some(Duration::from_secs(30))
        );
    }
}
