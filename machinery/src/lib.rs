//! # machinery
//!
//! A distributed task queue for Rust that speaks [Go Machinery]'s wire format: Go and Rust
//! producers and workers can share one RabbitMQ exchange and one result store.
//!
//! Ordinary functions become tasks with [`#[task]`](macro@task); producers send typed
//! signatures and chains with a [`Server`]; workers run every task compiled into their binary
//! ([`worker::launch`]).
//!
//! ```
//! use machinery::{task, Config, Server, TaskError};
//!
//! #[task]
//! fn add(a: f64, b: f64) -> f64 {
//!     a + b
//! }
//!
//! #[task]
//! async fn multiply(factor: f64, #[chained] x: f64) -> Result<f64, TaskError> {
//!     Ok(factor * x)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> machinery::Result<()> {
//! let server = Server::new(Config::builder().broker("memory://").build()?).await?;
//! let worker = server.worker().spawn().await?;
//!
//! let chain = add::signature(1.0, 1.0).then(multiply::signature(4.0));
//! let result: f64 = server.send(chain).await?.get().await?;
//! assert_eq!(result, 8.0);
//!
//! worker.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The embedded broker (`memory://`) runs everything in one process with nothing to install;
//! it takes the same encode -> publish -> decode -> acknowledge path as a network broker.
//!
//! [Go Machinery]: https://github.com/RichardKnop/machinery

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![forbid(unsafe_code)]

mod by_name;
mod error;
mod group;
mod private;
mod result;
mod server;
mod signature;
mod task;

pub mod admin;
pub mod backend;
pub mod broker;
pub mod config;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod options;
pub mod periodic;
#[cfg(feature = "testing")]
pub mod testing;
pub mod value;
pub mod wire;
pub mod worker;

pub use crate::by_name::IntoArgs;
pub use crate::config::Config;
pub use crate::error::{Error, ErrorKind, PartialSend, Result};
pub use crate::group::{Chord, ChordCallback, Group};
pub use crate::result::{AsyncResult, GroupResult};
pub use crate::server::{SendFuture, Server};
pub use crate::signature::{Accepts, ErrorHandler, Full, Needs, Sendable, Signature, Variadic};
pub use crate::task::{
    registered_tasks, Runner, TaskDescriptor, TaskError, TaskFuture, TaskOutcome, REVOKED,
};
pub use crate::worker::{Worker, WorkerBuilder, WorkerHandle};

/// Turns a function into a task.
///
/// The function stays an ordinary function you can call. Beside it, `#[task]` generates a type
/// of the same name with a typed signature builder, `name::signature(args..)`, and registers
/// the task so that every worker built into the binary can run it.
///
/// ```
/// use machinery::{task, TaskError};
///
/// #[task]
/// fn add(a: i64, b: i64) -> i64 {
///     a + b
/// }
///
/// assert_eq!(add(1, 2), 3);                 // still a function
/// let sig = add::signature(1, 2);           // Signature<i64>
/// assert_eq!(sig.name(), "add");
/// assert_eq!(add::NAME, "add");
/// ```
///
/// # Functions
///
/// Sync or async free functions, without generics or `self`. A sync body runs on Tokio's
/// blocking thread pool; an async one on the runtime.
///
/// Arguments and results are the types of Go's type table ([`value`]), so Go workers and
/// producers understand them, or any other `Serialize + DeserializeOwned` type (Rust-to-Rust
/// only).
///
/// The return type may be:
/// - `T`: one result;
/// - `()` or nothing: no result;
/// - a tuple `(A, B, ..)`: several results (Go's multiple return values);
/// - `Result<T, E>` with `E: Display` (spelled `Result`, any path), where `T` is one of the
///   above: `Err` makes the task a FAILURE with `E`'s message. Return a [`TaskError`] to ask
///   for a retry after a delay.
///
/// # Parameter attributes
///
/// - `#[chained]` on the last parameter: it receives the previous task's result in a chain
///   (Go appends it to the arguments). `name::signature(..)` then takes the other parameters
///   and returns a [`Signature<O, Needs<T>>`](Signature), which can only follow a task
///   returning `T`.
/// - `#[variadic]` on a last parameter of type `Vec<T>`: it collects all remaining arguments,
///   like Go's `args ...int64`; in a chain the previous result is appended to it.
/// - `#[error_message]` on a first parameter of type `String`: the task is an error callback,
///   used with [`Signature::on_error`]; the failed task's error message arrives there.
///
/// ```
/// use machinery::task;
///
/// #[task]
/// fn sum(#[variadic] numbers: Vec<i64>) -> i64 {
///     numbers.iter().sum()
/// }
///
/// #[task]
/// fn scale(factor: i64, #[chained] x: i64) -> i64 {
///     factor * x
/// }
///
/// #[task]
/// fn report(#[error_message] error: String, job: String) {
///     eprintln!("job {job} failed: {error}");
/// }
///
/// let chain = sum::signature(vec![1, 2, 3])
///     .then(scale::signature(10))
///     .on_error(report::signature("nightly".to_owned()));
/// # let _ = chain;
/// ```
///
/// # Options
///
/// - `name = "..."`: the wire name (default: the function's name).
/// - `crate = "..."`: the path of the `machinery` crate, when it is renamed.
///
/// ```
/// # extern crate machinery as tasks;
/// #[tasks::task(name = "images.resize", crate = "tasks")]
/// fn resize(path: String, width: u32) -> String {
///     format!("{path}@{width}")
/// }
/// assert_eq!(resize::NAME, "images.resize");
/// ```
#[cfg(feature = "macros")]
pub use machinery_macros::task;

/// The bytes of what `f` returns, without calling it: the size of an `async fn`'s future, for
/// the tests that keep the futures every delivery boxes small.
#[cfg(test)]
pub(crate) fn returned_size<A, R>(_: impl FnOnce(A) -> R) -> usize {
    std::mem::size_of::<R>()
}

/// Locks a mutex whose critical sections are single collection operations: a panic elsewhere
/// cannot leave the data half-updated, so a poisoned lock is still consistent and usable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[doc(hidden)]
pub mod __private {
    pub use crate::private::*;
}
