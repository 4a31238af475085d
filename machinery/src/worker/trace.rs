//! Task spans and W3C trace context: the one home of how an execution is traced.
//!
//! Every execution of a task runs inside one span made by the worker's [`MakeSpan`]
//! ([`DefaultMakeSpan`]: an INFO span `task` with `task.name`, `task.id`, `attempt`, `queue`,
//! `worker`, and `group`, `chain` and `trace_id` where present). Blocking bodies run inside it
//! too, on Tokio's blocking pool.
//!
//! # Trace context
//!
//! A message carries its trace context in the signature's `Headers` as W3C `traceparent` (and
//! `tracestate` when one came in), so a chain shows as one trace:
//!
//! - a producer ([`Server::send`](crate::Server::send) and the others) that is not inside a
//!   task starts a trace: a fresh trace id, and a span id standing for the send. A
//!   `traceparent` the caller put in the headers is kept;
//! - the worker extracts it: the execution's trace id is the message's, and the execution gets
//!   a span id of its own (with the `opentelemetry` feature, the exported span's ids, its
//!   parent set from the header);
//! - every message sent while a task runs (`OnSuccess`/`OnError` callbacks, a chord's callback,
//!   a retry, a task the body sends itself) carries the execution as its parent.
//!
//! Go passes these headers through untouched: `tasks.Headers` is a `map[string]interface{}`
//! (v2/tasks/signature.go) published as the AMQP headers and inside the JSON body
//! (v2/brokers/amqp/amqp.go `Publish`: `Headers: amqp.Table(signature.Headers)`), and the
//! consumer decodes the whole signature, headers included (`consumeOne`:
//! `decoder.Decode(signature)`). Go's own tracing (v2/tracing/tracing.go) injects and extracts
//! through opentracing's global tracer into the same map and leaves other keys alone.
//! machinery's RabbitMQ broker copies the other headers into the AMQP headers as Go does, but
//! keeps these keys in the body only (`is_trace_key`; README, "differs on purpose").
//!
//! # Chain id
//!
//! A follow-up carries the UUID of the task that started its workflow in the header
//! `x-machinery-root` (set when the worker sends it, from its parent's header or the parent's
//! own UUID). The span's `chain` field is that UUID: every task of one chain, and the
//! callbacks of its members, share it. A task sent on its own has none.

use std::cell::RefCell;
use std::fmt;
use std::time::Duration;

use futures_util::future::Either;
use serde_json::{Map, Value};
use tracing::instrument::{Instrumented, WithDispatch, WithSubscriber as _};
use tracing::Instrument as _;
use tracing::{Level, Span};

use crate::wire::Signature;

/// The `Headers` key of the W3C trace context's parent (`00-<trace id>-<span id>-<flags>`).
///
/// A producer that is itself traced can set it; machinery keeps it:
///
/// ```
/// # #[machinery::task] fn add(a: i64, b: i64) -> i64 { a + b }
/// use machinery::worker::TRACEPARENT_HEADER;
/// let signature = add::signature(1, 2)
///     .with_header(TRACEPARENT_HEADER, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The `Headers` key of the W3C vendor trace state, carried on when present.
pub const TRACESTATE_HEADER: &str = "tracestate";
/// The `Headers` key of the UUID of the task that started a workflow (the chain id).
pub const ROOT_HEADER: &str = "x-machinery-root";

/// Whether `key` is one of the trace context keys machinery puts in a signature's `Headers`.
pub(crate) fn is_trace_key(key: &str) -> bool {
    matches!(key, TRACEPARENT_HEADER | TRACESTATE_HEADER | ROOT_HEADER)
}

/// The longest `tracestate` carried on (the W3C recommendation's 512 characters); a longer one
/// is dropped.
const MAX_TRACESTATE: usize = 512;
/// The longest `x-machinery-root` read (ours are 41 bytes).
const MAX_ROOT: usize = 256;

/// A W3C trace context: a trace id, the id of the span that is the parent, and the flags.
///
/// ```
/// use machinery::worker::TraceContext;
/// let cx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(cx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(cx.span_id(), "00f067aa0ba902b7");
/// assert!(cx.sampled());
/// assert_eq!(cx.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace: u128,
    span: u64,
    flags: u8,
}

impl TraceContext {
    /// Reads a `traceparent` value. Version `00` is read exactly; a later version is read by
    /// its first four fields, as the W3C spec asks. `None` for anything malformed, the
    /// invalid version `ff`, or an all-zero id.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let bytes = value.as_bytes();
        if bytes.len() < 55 || !value.is_ascii() {
            return None;
        }
        let (version, trace, span, flags) =
            (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        if version == "ff" || (version == "00" && bytes.len() != 55) {
            return None;
        }
        if version != "00" && bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if ![version, trace, span, flags].into_iter().all(lower_hex) {
            return None;
        }
        let cx = TraceContext {
            trace: u128::from_str_radix(trace, 16).ok()?,
            span: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (cx.trace != 0 && cx.span != 0).then_some(cx)
    }

    /// A new trace: a random trace id and span id, sampled.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace: random_nonzero_u128(),
            span: random_span_id(),
            flags: 1,
        }
    }

    /// The same trace with a new span id.
    pub fn child(self) -> TraceContext {
        TraceContext {
            span: random_span_id(),
            ..self
        }
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        self.trace_id_display().to_string()
    }

    /// The span id, 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span)
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lower-case hex digits, formatted only when displayed (for span
    /// fields: `trace_id = %cx.trace_id_display()`).
    pub fn trace_id_display(&self) -> impl fmt::Display + Send + Sync + 'static {
        struct Hex(u128);
        impl fmt::Display for Hex {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_ascii(f, &hex::<32>(self.0))
            }
        }
        Hex(self.trace)
    }

    /// The trace id as a number.
    pub fn trace_id_u128(&self) -> u128 {
        self.trace
    }

    /// The span id as a number.
    pub fn span_id_u64(&self) -> u64 {
        self.span
    }

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// A context from its parts; `None` if an id is zero.
    ///
    /// ```
    /// # use machinery::worker::TraceContext;
    /// let cx = TraceContext::from_parts(1, 2, 1).unwrap();
    /// assert_eq!(cx.to_string(), "00-00000000000000000000000000000001-0000000000000002-01");
    /// ```
    pub fn from_parts(trace_id: u128, span_id: u64, flags: u8) -> Option<TraceContext> {
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace: trace_id,
            span: span_id,
            flags,
        })
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` value (version `00`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        out[3..35].copy_from_slice(&hex::<32>(self.trace));
        out[36..52].copy_from_slice(&hex::<16>(u128::from(self.span)));
        out[53..].copy_from_slice(&hex::<2>(u128::from(self.flags)));
        write_ascii(f, &out)
    }
}

/// `value`'s low `N` hex digits, lower case, zero-padded: the ids are formatted for every
/// execution's span and every message sent, and `{:032x}` costs several times this.
fn hex<const N: usize>(value: u128) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'0'; N];
    let mut n = value;
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
    out
}

/// Writes ASCII bytes (hex digits and dashes) in one call.
fn write_ascii(f: &mut fmt::Formatter<'_>, ascii: &[u8]) -> fmt::Result {
    f.write_str(std::str::from_utf8(ascii).map_err(|_| fmt::Error)?)
}

fn random_nonzero_u128() -> u128 {
    loop {
        let n = uuid::Uuid::new_v4().as_u128();
        if n != 0 {
            return n;
        }
    }
}

fn random_span_id() -> u64 {
    loop {
        // A v4 UUID is random but for its version (high half) and variant (low half) bits:
        // their xor is random in every bit.
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        let n = high ^ low;
        if n != 0 {
            return n;
        }
    }
}

/// The trace context a signature carries, and its `tracestate` (bounded).
pub(crate) fn extract(headers: &Map<String, Value>) -> (Option<TraceContext>, Option<String>) {
    let parent = headers
        .get(TRACEPARENT_HEADER)
        .and_then(Value::as_str)
        .and_then(TraceContext::parse);
    let state = parent.and_then(|_| {
        headers
            .get(TRACESTATE_HEADER)
            .and_then(Value::as_str)
            .filter(|s| s.len() <= MAX_TRACESTATE && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(str::to_owned)
    });
    (parent, state)
}

/// What a task span is made from; see [`MakeSpan`].
///
/// ```
/// use machinery::worker::TaskSpan;
/// fn make(task: &TaskSpan<'_>) -> tracing::Span {
///     tracing::info_span!(
///         "task",
///         task.name = task.name,
///         attempt = task.attempt,
///         group = task.group,
///         trace_id = %task.trace.trace_id_display(),
///     )
/// }
/// # fn takes(_: impl machinery::worker::MakeSpan) {}
/// # takes(make);
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TaskSpan<'a> {
    /// The task's name.
    pub name: &'a str,
    /// The task's UUID.
    pub id: &'a str,
    /// Which delivery of the message this is: 1 for the first.
    pub attempt: u32,
    /// The queue the worker consumes.
    pub queue: &'a str,
    /// The worker's name.
    pub worker: &'a str,
    /// The group's UUID (`GroupUUID`), for a member of a group or chord.
    pub group: Option<&'a str>,
    /// The chain id: the UUID of the task that started the workflow, for a follow-up.
    pub chain: Option<&'a str>,
    /// The execution's trace context: the message's trace, and a span id of the execution's
    /// own. (With the `opentelemetry` feature and a message that carries no `traceparent`, the
    /// exported span starts a trace of its own; its id is then recorded in the span's
    /// `trace_id` field, if the span declares one.)
    pub trace: TraceContext,
    /// The whole signature, for fields of your own.
    pub signature: &'a Signature,
}

/// Makes the span every execution of a task runs in, as tower-http's `MakeSpan` makes a
/// request's. Set it with [`WorkerBuilder::make_span`](crate::WorkerBuilder::make_span); a
/// closure `Fn(&TaskSpan) -> Span` is one.
///
/// [`TaskSpan::trace`] gives the execution's W3C trace id for a `trace_id` field.
///
/// ```
/// use machinery::worker::TaskSpan;
/// let make = |task: &TaskSpan<'_>| {
///     tracing::info_span!("job", name = task.name, id = task.id, tenant = tracing::field::Empty)
/// };
/// # fn takes(_: impl machinery::worker::MakeSpan) {}
/// takes(make);
/// ```
pub trait MakeSpan: Send + Sync + 'static {
    /// The span of one execution.
    fn make_span(&self, task: &TaskSpan<'_>) -> Span;
}

impl<F> MakeSpan for F
where
    F: Fn(&TaskSpan<'_>) -> Span + Send + Sync + 'static,
{
    fn make_span(&self, task: &TaskSpan<'_>) -> Span {
        self(task)
    }
}

/// The default [`MakeSpan`]: a span `task` at INFO (or the level set) with `task.name`,
/// `task.id`, `attempt`, `queue`, `worker`, and `group`, `chain` and `trace_id` where present.
///
/// ```
/// use machinery::worker::DefaultMakeSpan;
/// let make = DefaultMakeSpan::new().level(tracing::Level::DEBUG);
/// # let _ = make;
/// ```
#[derive(Debug, Clone)]
pub struct DefaultMakeSpan {
    level: Level,
}

impl DefaultMakeSpan {
    /// Spans at INFO.
    pub fn new() -> Self {
        DefaultMakeSpan { level: Level::INFO }
    }

    /// Spans at `level`.
    #[must_use]
    pub fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

impl Default for DefaultMakeSpan {
    fn default() -> Self {
        DefaultMakeSpan::new()
    }
}

macro_rules! task_span {
    ($level:expr, $t:expr) => {
        tracing::span!(
            $level,
            "task",
            task.name = %$t.name,
            task.id = %$t.id,
            attempt = $t.attempt,
            queue = %$t.queue,
            worker = %$t.worker,
            group = $t.group.map(tracing::field::display),
            chain = $t.chain.map(tracing::field::display),
            trace_id = %$t.trace.trace_id_display(),
        )
    };
}

impl MakeSpan for DefaultMakeSpan {
    fn make_span(&self, t: &TaskSpan<'_>) -> Span {
        match self.level {
            Level::ERROR => task_span!(Level::ERROR, t),
            Level::WARN => task_span!(Level::WARN, t),
            Level::INFO => task_span!(Level::INFO, t),
            Level::DEBUG => task_span!(Level::DEBUG, t),
            _ => task_span!(Level::TRACE, t),
        }
    }
}

/// How the worker traces its executions: its [`MakeSpan`], and the level of the event that
/// tells a success.
pub(crate) struct Tracing {
    pub(crate) make_span: Box<dyn MakeSpan>,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            make_span: Box::new(DefaultMakeSpan::new()),
        }
    }
}

/// The body's run, as the outcome event and the metrics see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ran {
    pub(crate) elapsed: Duration,
    /// Whether the body succeeded.
    pub(crate) ok: bool,
}

/// What the worker did after a failed run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing was decided (a success, or the task did not run).
    #[default]
    Nothing,
    /// RETRY is stored and the task is sent again to run in `wait`.
    Retry { wait: Duration, retries_left: i64 },
    /// FAILURE is stored and `on_error` error callbacks are sent.
    Failure { on_error: usize },
    /// The task was revoked while it ran.
    Revoked,
}

/// How the delivery left the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acknowledged.
    Acked,
    /// Sent again (after `delay`) and acknowledged; `attempted`: it counted as an attempt,
    /// `reason` why.
    Republished {
        delay: Duration,
        attempted: bool,
        reason: Option<String>,
    },
    /// Moved to the dead-letter queue.
    DeadLettered { reason: String },
    /// Handed back to the broker (the broker could not take it now).
    HandedBack { error: String },
}

/// Everything one execution did, filled in along the delivery path and read once, when it
/// is settled.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// The body's run, if it ran.
    pub(crate) ran: Option<Ran>,
    /// The task's error: the body's, or the one its FAILURE records.
    pub(crate) error: Option<String>,
    pub(crate) next: Next,
}

/// One execution: its trace context and its report. Set for the delivery's task while it is
/// handled, so that every message sent meanwhile carries the execution as its parent.
#[derive(Debug)]
pub(crate) struct Execution {
    /// This execution's context: the trace id, and the execution's own span id.
    pub(crate) context: TraceContext,
    pub(crate) tracestate: Option<String>,
    /// The task's UUID.
    pub(crate) uuid: String,
    /// The chain id: the incoming `x-machinery-root`, or the task's own UUID.
    pub(crate) root: String,
    pub(crate) report: RefCell<Report>,
}

tokio::task_local! {
    static EXECUTION: Execution;
}

/// Starts tracing one execution of `signature`: its span (parented, with the
/// `opentelemetry` feature, by the extracted context) and its [`Execution`].
pub(crate) fn start(
    tracing: &Tracing,
    signature: &Signature,
    attempt: u32,
    queue: &str,
    worker: &str,
) -> (Span, Execution) {
    let (parent, tracestate) = extract(&signature.headers);
    let root = signature
        .headers
        .get(ROOT_HEADER)
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty() && r.len() <= MAX_ROOT);
    let own = parent.map_or_else(TraceContext::new_root, TraceContext::child);
    let span = tracing.make_span.make_span(&TaskSpan {
        name: &signature.name,
        id: &signature.uuid,
        attempt,
        queue,
        worker,
        group: (!signature.group_uuid.is_empty()).then_some(signature.group_uuid.as_str()),
        chain: root,
        trace: own,
        signature,
    });
    let context = context_of(&span, own, parent, tracestate.as_deref());
    if context.trace != own.trace {
        span.record(
            "trace_id",
            tracing::field::display(context.trace_id_display()),
        );
    }
    let execution = Execution {
        context,
        tracestate,
        uuid: signature.uuid.clone(),
        root: root.map_or_else(|| signature.uuid.clone(), str::to_owned),
        report: RefCell::default(),
    };
    (span, execution)
}

/// The execution's own context: the OpenTelemetry span's ids when the span is exported,
/// else `own` (the parent's trace with a new span id, or a new trace).
#[cfg_attr(not(feature = "opentelemetry"), allow(unused_variables))]
fn context_of(
    span: &Span,
    own: TraceContext,
    parent: Option<TraceContext>,
    tracestate: Option<&str>,
) -> TraceContext {
    #[cfg(feature = "opentelemetry")]
    if let Some(cx) = super::otel::parent_span(span, parent, tracestate) {
        return cx;
    }
    own
}

/// Runs `future` as the execution `execution` (see [`Execution`]). A plain function: an
/// `async fn` would hold `future` and `execution` twice (as its arguments and inside the
/// task-local future it awaits), and every delivery's future holds this one.
pub(crate) fn scope<F: std::future::Future>(
    execution: Execution,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<Execution, F> {
    EXECUTION.scope(execution, future)
}

/// Runs `future` as a copy of the current execution, with a report of its own that nobody
/// reads, inside the current span and with the current subscriber: for a body that goes on
/// as a task of its own ([`offload`](super::layers::offload)), so that what it sends is still
/// the execution's child and what it logs goes where it went before. Outside an execution,
/// `future` runs in the current span alone.
pub(crate) fn carried<F: std::future::Future>(
    future: F,
) -> WithDispatch<Instrumented<Either<tokio::task::futures::TaskLocalFuture<Execution, F>, F>>> {
    let copy = EXECUTION.try_with(|e| Execution {
        context: e.context,
        tracestate: e.tracestate.clone(),
        uuid: e.uuid.clone(),
        root: e.root.clone(),
        report: RefCell::default(),
    });
    let future = match copy {
        Ok(copy) => Either::Left(EXECUTION.scope(copy, future)),
        Err(_) => Either::Right(future),
    };
    future.instrument(Span::current()).with_current_subscriber()
}

/// Updates the current execution's report (nothing outside an execution).
pub(crate) fn note(update: impl FnOnce(&mut Report)) {
    let _ = EXECUTION.try_with(|e| update(&mut e.report.borrow_mut()));
}

/// Reads the current execution's report.
pub(crate) fn with_report<T>(read: impl FnOnce(&Report) -> T) -> Option<T> {
    EXECUTION.try_with(|e| read(&e.report.borrow())).ok()
}

/// Puts the trace context in a signature about to be published (see the module docs).
pub(crate) fn inject(signature: &mut Signature) {
    let inside = EXECUTION.try_with(|e| {
        (
            e.context,
            e.tracestate.clone(),
            (e.uuid != signature.uuid).then(|| e.root.clone()),
        )
    });
    let headers = &mut signature.headers;
    match inside {
        Ok((context, tracestate, root)) => {
            headers.insert(TRACEPARENT_HEADER.to_owned(), context.to_string().into());
            match tracestate {
                Some(state) => headers.insert(TRACESTATE_HEADER.to_owned(), state.into()),
                None => headers.remove(TRACESTATE_HEADER),
            };
            if let Some(root) = root {
                headers.insert(ROOT_HEADER.to_owned(), root.into());
            }
        }
        Err(_) => {
            if extract(headers).0.is_none() {
                start_trace(headers, &producer_context().to_string());
            }
        }
    }
}

/// Makes a message outside any task a span of `traceparent` (a new trace's).
fn start_trace(headers: &mut Map<String, Value>, traceparent: &str) {
    headers.insert(TRACEPARENT_HEADER.to_owned(), traceparent.into());
    headers.remove(TRACESTATE_HEADER);
}

/// Gives the members of a group or chord one trace when they are sent outside any task: one
/// producer context for all of them (a member that carries its own `traceparent` keeps it).
/// Inside a task, [`inject`] makes each a child of the running execution, one trace already.
pub(crate) fn share(signatures: &mut [Signature]) {
    if EXECUTION.try_with(|_| ()).is_ok() {
        return;
    }
    let context = producer_context().to_string();
    for signature in signatures {
        if extract(&signature.headers).0.is_none() {
            start_trace(&mut signature.headers, &context);
        }
    }
}

/// The parent of a message a producer sends outside any task: the current OpenTelemetry span
/// with the `opentelemetry` feature, else a new trace.
fn producer_context() -> TraceContext {
    #[cfg(feature = "opentelemetry")]
    if let Some(cx) = super::otel::current() {
        return cx;
    }
    TraceContext::new_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_formatted_as_fixed_width_lower_hex() {
        for (trace, span, flags) in [
            (1u128, 2u64, 1u8),
            (u128::MAX, u64::MAX, 0xff),
            (
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                0x00f0_67aa_0ba9_02b7,
                0,
            ),
        ] {
            let cx = TraceContext::from_parts(trace, span, flags).unwrap();
            assert_eq!(
                cx.to_string(),
                format!("00-{trace:032x}-{span:016x}-{flags:02x}")
            );
            assert_eq!(cx.trace_id(), format!("{trace:032x}"));
            assert_eq!(cx.trace_id_display().to_string(), cx.trace_id());
            assert_eq!(cx.span_id(), format!("{span:016x}"));
            assert_eq!(TraceContext::parse(&cx.to_string()), Some(cx));
        }
    }

    #[test]
    fn traceparent_parsing_follows_the_w3c_spec() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContext::parse(ok).unwrap();
        assert_eq!(cx.to_string(), ok);
        // A later version may add fields after a dash.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736x00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47€6-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(root.trace_id(), child.trace_id());
        assert_ne!(root.span_id(), child.span_id());
    }

    #[test]
    fn a_long_tracestate_is_dropped() {
        let mut headers = Map::new();
        headers.insert(
            TRACEPARENT_HEADER.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        headers.insert(TRACESTATE_HEADER.into(), "a=1".into());
        assert_eq!(extract(&headers).1.as_deref(), Some("a=1"));
        headers.insert(TRACESTATE_HEADER.into(), "a".repeat(600).into());
        assert_eq!(extract(&headers).1, None);
    }

    #[tokio::test]
    async fn a_send_inside_an_execution_is_its_child() {
        let mut producer = Signature {
            name: "t".into(),
            uuid: "task_1".into(),
            ..Signature::default()
        };
        inject(&mut producer);
        let sent = extract(&producer.headers).0.unwrap();
        let (_, execution) = start(&Tracing::default(), &producer, 1, "q", "w");
        let context = execution.context;
        assert_eq!(
            context.trace_id(),
            sent.trace_id(),
            "the execution continues the trace"
        );
        assert_ne!(context.span_id(), sent.span_id());
        let follow_up = scope(execution, async {
            let mut follow_up = Signature {
                name: "next".into(),
                uuid: "task_2".into(),
                ..Signature::default()
            };
            inject(&mut follow_up);
            follow_up
        })
        .await;
        let parent = extract(&follow_up.headers).0.unwrap();
        assert_eq!(parent, context, "the follow-up's parent is the execution");
        assert_eq!(follow_up.headers[ROOT_HEADER], "task_1");
    }
}
