//! Tasks: the error a task returns, and the descriptors `#[task]` registers.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::wire::{Arg, TaskResult};

/// The error a task returns to report failure.
///
/// A task may return `Result<T, E>` for any `E: Display`; the message is what the result
/// backend records and what the producer's [`get`](crate::AsyncResult::get) returns. Return a
/// `TaskError` directly to ask for a retry after a given delay:
///
/// ```
/// use std::time::Duration;
/// use machinery::{task, TaskError};
///
/// #[task]
/// async fn fetch(url: String) -> Result<String, TaskError> {
///     if url.is_empty() {
///         return Err(TaskError::new("empty url"));
///     }
///     Err(TaskError::retry_in("server busy", Duration::from_secs(5)))
/// }
/// ```
///
/// A retry requested this way is bounded like any other: it consumes the signature's
/// `RetryCount`, and the task fails when none is left.
#[derive(Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    kind: TaskErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskErrorKind {
    Failed,
    RetryIn(Duration),
    /// Can never succeed (the arguments did not fit the task, a follow-up cannot be sent):
    /// permanent, never retried.
    Permanent,
    Panicked,
    /// The task was revoked (`Server::revoke`): not retried, no follow-ups.
    Revoked,
}

/// The error of a revoked task, as the result backend records it (Go readers know no REVOKED
/// state: they see FAILURE with this error).
pub const REVOKED: &str = "revoked";

impl TaskError {
    /// A failure with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            kind: TaskErrorKind::Failed,
        }
    }

    /// A failure that asks to be retried after `delay` (if the signature has retries left).
    pub fn retry_in(message: impl Into<String>, delay: Duration) -> Self {
        TaskError {
            message: message.into(),
            kind: TaskErrorKind::RetryIn(delay),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The delay this error asks for before a retry, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        match self.kind {
            TaskErrorKind::RetryIn(d) => Some(d),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> TaskErrorKind {
        self.kind
    }

    pub(crate) fn bad_args(message: impl Into<String>) -> Self {
        TaskError::permanent(message)
    }

    /// A failure that retrying cannot cure: the signature's retries are not used.
    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            kind: TaskErrorKind::Permanent,
        }
    }

    /// The body ran past its time limit.
    pub(crate) fn time_limit(limit: Duration) -> Self {
        TaskError::new(format!("time limit exceeded ({limit:?})"))
    }

    /// The task was revoked while it ran.
    #[allow(dead_code)] // The revoke layer's.
    pub(crate) fn revoked() -> Self {
        TaskError {
            message: REVOKED.to_owned(),
            kind: TaskErrorKind::Revoked,
        }
    }

    pub(crate) fn panicked(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            kind: TaskErrorKind::Panicked,
        }
    }

    /// Converts any displayable error; a `TaskError` is kept as it is.
    #[doc(hidden)]
    pub fn from_display<E: fmt::Display + 'static>(err: E) -> Self {
        let boxed: Box<dyn std::any::Any> = Box::new(err);
        match boxed.downcast::<TaskError>() {
            Ok(task_error) => *task_error,
            Err(other) => match other.downcast::<E>() {
                Ok(e) => TaskError::new(e.to_string()),
                Err(_) => TaskError::new("task failed"),
            },
        }
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("message", &self.message)
            .field("kind", &self.kind)
            .finish()
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<String> for TaskError {
    fn from(message: String) -> Self {
        TaskError::new(message)
    }
}

impl From<&str> for TaskError {
    fn from(message: &str) -> Self {
        TaskError::new(message)
    }
}

impl From<Error> for TaskError {
    fn from(err: Error) -> Self {
        TaskError::new(err.to_string())
    }
}

/// What running a task produced: its results, or its error.
pub type TaskOutcome = std::result::Result<Vec<TaskResult>, TaskError>;

/// A boxed task future.
pub type TaskFuture = Pin<Box<dyn Future<Output = TaskOutcome> + Send + 'static>>;

/// How a task's body is run.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Runner {
    /// A blocking body: decoded, run and encoded on the blocking thread pool.
    Blocking(fn(Vec<Arg>) -> TaskOutcome),
    /// An async body: the function decodes the args and returns the task's future.
    Async(fn(Vec<Arg>) -> TaskFuture),
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runner::Blocking(_) => "Runner::Blocking",
            Runner::Async(_) => "Runner::Async",
        })
    }
}

/// A task as `#[task]` registers it: its wire name, where it is defined, and how to run it.
///
/// Built by the macro as a constant and submitted to [`inventory`]; a worker collects every
/// descriptor linked into its binary when it starts.
#[derive(Debug)]
pub struct TaskDescriptor {
    /// The wire name (`Name` in the signature).
    pub name: &'static str,
    /// The Rust path of the function (`module_path!()::fn`).
    pub path: &'static str,
    /// `file:line` of the definition.
    pub location: &'static str,
    /// How to run it.
    pub runner: Runner,
    /// Its default options (`#[task(retries = 3, timeout = "30s", ..)]`).
    pub options: crate::options::TaskOptions,
}

inventory::collect!(TaskDescriptor);

/// Every task compiled into this binary.
///
/// ```
/// #[machinery::task]
/// fn ping() -> String { "pong".to_owned() }
///
/// assert!(machinery::registered_tasks().any(|t| t.name == "ping"));
/// ```
pub fn registered_tasks() -> impl Iterator<Item = &'static TaskDescriptor> {
    inventory::iter::<TaskDescriptor>.into_iter()
}

/// The name -> task map a worker dispatches with.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    tasks: HashMap<&'static str, &'static TaskDescriptor>,
}

impl Registry {
    /// Builds the registry from every registered task, keeping only `only` when given.
    /// Two tasks with the same name are an error naming both.
    pub(crate) fn build(only: Option<&[String]>) -> Result<Registry> {
        let mut tasks: HashMap<&'static str, &'static TaskDescriptor> = HashMap::new();
        for task in registered_tasks() {
            if let Some(existing) = tasks.insert(task.name, task) {
                return Err(Error::new(
                    ErrorKind::Registry,
                    format!(
                        "two tasks are registered as `{}`: `{}` at {} and `{}` at {}; \
                         give one of them another name with #[task(name = \"...\")]",
                        task.name, existing.path, existing.location, task.path, task.location
                    ),
                ));
            }
        }
        if let Some(only) = only {
            let mut missing = Vec::new();
            let mut kept = HashMap::new();
            for name in only {
                match tasks.get(name.as_str()) {
                    Some(task) => {
                        kept.insert(task.name, *task);
                    }
                    None => missing.push(name.as_str()),
                }
            }
            if !missing.is_empty() {
                return Err(Error::new(
                    ErrorKind::Registry,
                    format!(
                        "the worker was asked to run tasks that are not compiled into this \
                         binary: {}",
                        missing.join(", ")
                    ),
                ));
            }
            tasks = kept;
        }
        Ok(Registry { tasks })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&'static TaskDescriptor> {
        self.tasks.get(name).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
    }

    pub(crate) fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.tasks.keys().copied().collect();
        names.sort_unstable();
        names
    }
}
