//! The crate's error type.

use std::error::Error as StdError;
use std::fmt;

/// A specialised [`Result`](std::result::Result) for machinery operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in broad strokes; see [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is invalid (bad URL, bad number in an environment variable, ...).
    Config,
    /// The broker could not be reached or refused an operation.
    Broker,
    /// The result backend could not be reached or refused an operation.
    Backend,
    /// A value could not be encoded for the wire.
    Encode,
    /// Bytes or values from the wire could not be decoded.
    Decode,
    /// The task ran and failed; [`Error::task_error`] holds its message.
    Task,
    /// A wait ran past its deadline.
    Timeout,
    /// The task registry is inconsistent (two tasks with the same name, ...).
    Registry,
    /// The operation needs something that is not configured (such as a result backend).
    Unsupported,
    /// The worker or server was shut down while the operation was in progress.
    Shutdown,
    /// The broker refused the message and will refuse it again (no queue is bound to its
    /// routing key, a queue argument it cannot hold): sending it again does not help.
    Rejected,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "configuration error",
            ErrorKind::Broker => "broker error",
            ErrorKind::Backend => "result backend error",
            ErrorKind::Encode => "encode error",
            ErrorKind::Decode => "decode error",
            ErrorKind::Task => "task failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Registry => "task registry error",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Shutdown => "shut down",
            ErrorKind::Rejected => "refused by the broker",
        })
    }
}

/// The error type of machinery.
///
/// Every error has an [`ErrorKind`] and a message; I/O errors keep their cause as
/// [`source`](StdError::source). A task's own failure, as recorded in the result backend, is an
/// error of kind [`ErrorKind::Task`] whose [`task_error`](Error::task_error) is the message the
/// task (or its panic) produced.
///
/// ```
/// use machinery::{Error, ErrorKind};
///
/// let err = Error::task("division by zero");
/// assert_eq!(err.kind(), ErrorKind::Task);
/// assert_eq!(err.task_error(), Some("division by zero"));
/// assert_eq!(err.to_string(), "task failed: division by zero");
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error of the given kind caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The error a task reported (kind [`ErrorKind::Task`]).
    pub fn task(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Task, message)
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind prefix that [`Display`](fmt::Display) adds.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For an error of kind [`ErrorKind::Task`], the task's own error message exactly as it was
    /// recorded (`"oops"` for a task that panicked with `"oops"`).
    pub fn task_error(&self) -> Option<&str> {
        (self.kind == ErrorKind::Task).then_some(self.message.as_str())
    }

    /// Whether retrying the same operation later may succeed (a broker or backend that is
    /// unreachable now, a wait that timed out).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Broker | ErrorKind::Backend | ErrorKind::Timeout
        )
    }

    /// Whether the operation can never succeed as it is (a message too large or with a name
    /// the broker cannot carry, an unroutable routing key, a time out of range): the opposite
    /// of [`is_retryable`](Self::is_retryable). A worker fails the task at once for these
    /// instead of trying again.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Encode | ErrorKind::Decode | ErrorKind::Rejected
        )
    }

    /// For an error from [`Server::send_all`](crate::Server::send_all),
    /// [`send_group`](crate::Server::send_group) or [`send_chord`](crate::Server::send_chord)
    /// when the broker took only part of the batch: which tasks were sent and which were not.
    pub fn partial_send(&self) -> Option<&PartialSend> {
        self.source.as_deref()?.downcast_ref::<PartialSend>()
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    pub(crate) fn decode(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Decode, message)
    }

    pub(crate) fn encode(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Encode, message)
    }
}

/// The tasks of a batch the broker took, and those it did not, with why; see
/// [`Error::partial_send`].
///
/// The tasks in `sent` are in the queue and will run; those in `failed` are not (their PENDING
/// state may be recorded). Sending the failed ones again is safe.
#[derive(Debug)]
#[non_exhaustive]
pub struct PartialSend {
    /// The UUIDs of the tasks the broker confirmed.
    pub sent: Vec<String>,
    /// The UUIDs of the tasks it did not take, each with its error.
    pub failed: Vec<(String, Error)>,
}

impl fmt::Display for PartialSend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} tasks were not sent",
            self.failed.len(),
            self.sent.len() + self.failed.len()
        )?;
        if let Some((uuid, first)) = self.failed.first() {
            write!(f, " (first: {uuid}: {first})")?;
        }
        Ok(())
    }
}

impl StdError for PartialSend {}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}
