//! Typed signatures and chains.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::wire::{self, GoTime, TaskResult};

/// Decodes a finished task's results into its typed output.
pub(crate) type Decoder<O> = fn(&[TaskResult]) -> Result<O>;

/// A task message with a typed output, ready to send or to chain.
///
/// `O` is what the (last) task returns; `K` says what the signature still needs:
///
/// - [`Full`]: all arguments are given; it can be sent, and as a chain link it ignores the
///   previous result (the previous task is marked `Immutable`).
/// - [`Needs<T>`]: built by a task with a `#[chained]` parameter of type `T`; it can only follow
///   a task returning `T`, whose result is appended to its arguments.
/// - [`Variadic<T>`]: built by a task with a `#[variadic]` `Vec<T>` parameter; it can be sent,
///   and as a chain link it takes a `T` appended to its arguments.
/// - [`ErrorHandler`]: built by a task with an `#[error_message]` parameter; it can only be
///   attached with [`on_error`](Signature::on_error).
///
/// ```
/// use machinery::task;
///
/// #[task]
/// fn add(a: f64, b: f64) -> f64 { a + b }
///
/// #[task]
/// fn multiply(factor: f64, #[chained] x: f64) -> f64 { factor * x }
///
/// // Typed as Signature<f64>: `get()` on it returns an f64.
/// let chain = add::signature(1.0, 1.0).then(multiply::signature(4.0));
/// assert_eq!(chain.task_uuids().len(), 2);
/// ```
#[must_use = "a signature does nothing until it is sent"]
pub struct Signature<O, K = Full> {
    raw: wire::Signature,
    links: Vec<String>,
    decode: Decoder<O>,
    error: Option<Error>,
    _kind: PhantomData<fn() -> K>,
}

/// Marker: every argument is given. See [`Signature`].
#[derive(Debug)]
pub enum Full {}

/// Marker: waits for a chained input of type `T`. See [`Signature`].
#[derive(Debug)]
pub struct Needs<T>(PhantomData<fn(T)>);

/// Marker: variadic, takes further `T`s from a chain. See [`Signature`].
#[derive(Debug)]
pub struct Variadic<T>(PhantomData<fn(T)>);

/// Marker: an error callback, waiting for the error message. See [`Signature`].
#[derive(Debug)]
pub enum ErrorHandler {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Full {}
    impl<T> Sealed for super::Needs<T> {}
    impl<T> Sealed for super::Variadic<T> {}
    impl Sealed for super::ErrorHandler {}
}

/// Implemented by the signature kinds that can be sent on their own.
#[diagnostic::on_unimplemented(
    message = "this signature waits for an input and cannot be sent on its own",
    label = "`{Self}` cannot be sent alone",
    note = "a signature built from a task with a `#[chained]` parameter must follow another task: `first.then(this)`; give it its input directly with `.with_input(value)`"
)]
pub trait Sendable: sealed::Sealed {}
impl Sendable for Full {}
impl<T> Sendable for Variadic<T> {}

/// Implemented by the signature kinds that can follow a task returning `T` in a chain.
#[diagnostic::on_unimplemented(
    message = "this chain link cannot take the previous task's result of type `{T}` as its input",
    label = "expects a different input than `{T}`",
    note = "the link's kind is `{Self}`: its `#[chained]` or `#[variadic]` parameter must have the type the previous task returns"
)]
pub trait Accepts<T>: sealed::Sealed {
    /// Whether the previous task's results are appended to this link's arguments.
    const APPENDS: bool;
}
impl<T> Accepts<T> for Full {
    const APPENDS: bool = false;
}
impl<T> Accepts<T> for Needs<T> {
    const APPENDS: bool = true;
}
impl<T> Accepts<T> for Variadic<T> {
    const APPENDS: bool = true;
}

impl<O, K> Signature<O, K> {
    pub(crate) fn from_parts(
        raw: wire::Signature,
        decode: Decoder<O>,
        error: Option<Error>,
    ) -> Self {
        Signature {
            links: vec![raw.uuid.clone()],
            raw,
            decode,
            error,
            _kind: PhantomData,
        }
    }

    fn map_kind<K2>(self) -> Signature<O, K2> {
        Signature {
            raw: self.raw,
            links: self.links,
            decode: self.decode,
            error: self.error,
            _kind: PhantomData,
        }
    }

    /// The wire form of the signature (for a chain, the first link, with the others nested in
    /// `OnSuccess`).
    pub fn as_wire(&self) -> &wire::Signature {
        &self.raw
    }

    /// The task name of the first link.
    pub fn name(&self) -> &str {
        &self.raw.name
    }

    /// The UUIDs of the chain's links in order (one for a single task).
    pub fn task_uuids(&self) -> &[String] {
        &self.links
    }

    /// Appends a task to run after this one (after the last link of a chain), as Go's
    /// `NewChain` nests them in `OnSuccess`.
    ///
    /// A link built from a `#[chained]` or `#[variadic]` task receives this task's result as
    /// its last argument, and must take the type this task returns. A [`Full`] signature runs
    /// with its own arguments only: this task is then marked `Immutable`.
    pub fn then<O2, K2: Accepts<O>>(mut self, next: Signature<O2, K2>) -> Signature<O2, K> {
        let tail = tail_mut(&mut self.raw);
        tail.immutable = !K2::APPENDS;
        tail.on_success = vec![next.raw];
        self.links.extend(next.links);
        Signature {
            raw: self.raw,
            links: self.links,
            decode: next.decode,
            error: self.error.or(next.error),
            _kind: PhantomData,
        }
    }

    /// Sends `handler`, with the error message prepended to its arguments, if this task fails.
    ///
    /// On a chain, every link built so far gets the handler, so whichever link fails (and
    /// thereby ends the chain) reports it.
    pub fn on_error<O2>(mut self, handler: Signature<O2, ErrorHandler>) -> Self {
        if self.error.is_none() {
            self.error = handler.error;
        }
        self.for_each_link(|sig| sig.on_error.push(handler.raw.clone()));
        self
    }

    /// Retries the task up to `count` times on failure, waiting 1, 2, 3, 5, 8, ... seconds
    /// (for a chain: its first link).
    pub fn with_retries(mut self, count: u32) -> Self {
        self.raw.retry_count = i64::from(count);
        self
    }

    /// Sets the first retry's wait in seconds, from which the Fibonacci waits grow (Go's
    /// `RetryTimeout`; for a chain: its first link).
    pub fn with_retry_timeout(mut self, seconds: u32) -> Self {
        self.raw.retry_timeout = i64::from(seconds);
        self
    }

    /// Limits one run of the task's body to `limit` (for a chain: every link built so far).
    ///
    /// At the deadline an async body is cancelled and a blocking one abandoned; the task fails
    /// with "time limit exceeded" (and is retried if it has retries left). The limit travels in
    /// the message's `Headers` (`x-machinery-timeout-ms`), which Go passes through: a Rust
    /// worker enforces it whoever sent the task. It overrides the task's `timeout` option.
    ///
    /// ```
    /// use std::time::Duration;
    /// #[machinery::task]
    /// async fn crawl(url: String) -> usize { url.len() }
    ///
    /// let sig = crawl::signature("https://example.com".into()).with_timeout(Duration::from_secs(30));
    /// assert_eq!(sig.as_wire().headers["x-machinery-timeout-ms"], 30_000);
    /// ```
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        self.for_each_link(|sig| {
            sig.headers
                .insert(crate::options::TIMEOUT_HEADER.to_owned(), millis.into());
        });
        self
    }

    /// How many times the task may ask to be retried later ([`TaskError::retry_in`]) before it
    /// fails (for a chain: every link built so far). Overrides the task's `max_retry_later`.
    ///
    /// [`TaskError::retry_in`]: crate::TaskError::retry_in
    pub fn with_max_retry_later(mut self, count: u32) -> Self {
        self.for_each_link(|sig| {
            sig.headers.insert(
                crate::options::MAX_RETRY_LATER_HEADER.to_owned(),
                count.into(),
            );
        });
        self
    }

    fn for_each_link(&mut self, mut f: impl FnMut(&mut wire::Signature)) {
        let mut link = Some(&mut self.raw);
        while let Some(sig) = link {
            f(sig);
            link = sig.on_success.first_mut();
        }
    }

    /// Runs the task no earlier than `eta`.
    pub fn with_eta(mut self, eta: DateTime<Utc>) -> Self {
        self.raw.eta = Some(GoTime::from(eta));
        self
    }

    /// Runs the task no earlier than `delay` from now.
    pub fn with_delay(self, delay: Duration) -> Self {
        match chrono::Duration::from_std(delay)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
        {
            Some(eta) => self.with_eta(eta),
            None => self.fail(Error::encode(format!("delay {delay:?} is out of range"))),
        }
    }

    /// Sets the message priority (used by queues declared with `x-max-priority`).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.raw.priority = priority;
        self
    }

    /// Sends the task to `routing_key` instead of the default queue.
    pub fn with_routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.raw.routing_key = routing_key.into();
        self
    }

    /// Adds a message header. It travels in the signature's `Headers`; on RabbitMQ it is also
    /// an AMQP header, as in Go, unless it is a trace context key (`traceparent`, `tracestate`,
    /// `x-machinery-root`).
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.raw.headers.insert(key.into(), value.into());
        self
    }

    /// Asks workers that do not have this task to drop it instead of handing it back.
    pub fn ignore_when_not_registered(mut self) -> Self {
        self.raw.ignore_when_task_not_registered = true;
        self
    }

    fn fail(mut self, error: Error) -> Self {
        self.error.get_or_insert(error);
        self
    }

    pub(crate) fn into_parts(self) -> Result<(wire::Signature, Vec<String>, Decoder<O>)> {
        match self.error {
            Some(error) => Err(error),
            None => Ok((self.raw, self.links, self.decode)),
        }
    }
}

impl<O, T: serde::Serialize + 'static> Signature<O, Needs<T>> {
    /// Gives a `#[chained]` task its input directly, making a signature that can be sent alone.
    pub fn with_input(mut self, input: T) -> Signature<O, Full> {
        match crate::value::encode_arg(&input) {
            Ok(arg) => self.raw.args.push(arg),
            Err(e) => self = self.fail(e),
        }
        self.map_kind()
    }
}

fn tail_mut(mut sig: &mut wire::Signature) -> &mut wire::Signature {
    while !sig.on_success.is_empty() {
        sig = &mut sig.on_success[0];
    }
    sig
}

impl<O, K> Clone for Signature<O, K> {
    fn clone(&self) -> Self {
        Signature {
            raw: self.raw.clone(),
            links: self.links.clone(),
            decode: self.decode,
            error: self
                .error
                .as_ref()
                .map(|e| Error::new(e.kind(), e.message())),
            _kind: PhantomData,
        }
    }
}

impl<O, K> fmt::Debug for Signature<O, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signature")
            .field("name", &self.raw.name)
            .field("uuid", &self.raw.uuid)
            .field("links", &self.links.len())
            .field("output", &std::any::type_name::<O>())
            .finish_non_exhaustive()
    }
}
