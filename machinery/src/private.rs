#![allow(missing_docs, missing_debug_implementations)]
//! Support for the code `#[task]` generates. Not public API: anything here may change in any
//! release.

use std::fmt::Display;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Result;
use crate::signature::{Decoder, Signature};
use crate::value;
use crate::wire;

pub use crate::error::Error;
pub use crate::task::{TaskError, TaskFuture, TaskOutcome};
pub use crate::wire::{Arg, TaskResult};

pub use crate::options::{RateLimit, TaskOptions};
pub use crate::signature::{ErrorHandler, Full, Needs, Variadic};
pub use crate::task::{Runner, TaskDescriptor};
pub use inventory;

/// Builds a task's signature from its arguments.
pub struct SignatureBuilder {
    raw: wire::Signature,
    error: Option<Error>,
}

impl SignatureBuilder {
    pub fn new(name: &'static str, capacity: usize, options: &TaskOptions) -> Self {
        let mut raw = wire::Signature::new(name);
        raw.args.reserve_exact(capacity);
        options.apply(&mut raw);
        SignatureBuilder { raw, error: None }
    }

    pub fn arg<T: Serialize + 'static>(&mut self, param: &str, value: &T) {
        match value::encode_arg(value) {
            Ok(arg) => self.raw.args.push(arg),
            Err(e) => {
                self.error.get_or_insert(Error::encode(format!(
                    "task `{}`, argument `{param}`: {}",
                    self.raw.name,
                    e.message()
                )));
            }
        }
    }

    pub fn args<T: Serialize + 'static>(&mut self, param: &str, values: &[T]) {
        for value in values {
            self.arg(param, value);
        }
    }

    pub fn finish<O, K>(self, decode: Decoder<O>) -> Signature<O, K> {
        Signature::from_parts(self.raw, decode, self.error)
    }
}

/// Reads a task's positional arguments, checking their count and types.
pub struct ArgReader {
    task: &'static str,
    args: std::vec::IntoIter<Arg>,
    position: usize,
}

impl ArgReader {
    /// Checks the count: exactly `fixed`, or at least `fixed` for a variadic task.
    pub fn new(
        task: &'static str,
        args: Vec<Arg>,
        fixed: usize,
        variadic: bool,
    ) -> std::result::Result<Self, TaskError> {
        let n = args.len();
        if n < fixed || (!variadic && n > fixed) {
            let expected = if variadic {
                format!("at least {fixed}")
            } else {
                fixed.to_string()
            };
            return Err(TaskError::bad_args(format!(
                "task `{task}` takes {expected} argument{}, got {n}",
                if fixed == 1 && !variadic { "" } else { "s" }
            )));
        }
        Ok(ArgReader {
            task,
            args: args.into_iter(),
            position: 0,
        })
    }

    pub fn next<T: DeserializeOwned + 'static>(
        &mut self,
        param: &str,
    ) -> std::result::Result<T, TaskError> {
        let position = self.position;
        self.position += 1;
        let Some(arg) = self.args.next() else {
            return Err(TaskError::bad_args(format!(
                "task `{}`: argument {position} (`{param}`) is missing",
                self.task
            )));
        };
        value::decode_arg(&arg).map_err(|e| {
            TaskError::bad_args(format!(
                "task `{}`: argument {position} (`{param}`): {}",
                self.task,
                e.message()
            ))
        })
    }

    pub fn rest<T: DeserializeOwned + 'static>(
        &mut self,
        param: &str,
    ) -> std::result::Result<Vec<T>, TaskError> {
        let mut out = Vec::with_capacity(self.args.len());
        while self.args.len() > 0 {
            out.push(self.next(param)?);
        }
        Ok(out)
    }
}

pub fn encode_result<T: Serialize + 'static>(
    value: &T,
) -> std::result::Result<TaskResult, TaskError> {
    value::encode_result(value).map_err(|e| TaskError::new(e.to_string()))
}

/// Decoder for a task without results.
pub fn decode_unit(_results: &[TaskResult]) -> Result<()> {
    Ok(())
}

/// Decoder for a task with one result.
pub fn decode_one<T: DeserializeOwned + 'static>(results: &[TaskResult]) -> Result<T> {
    decode_nth(results, 0, 1)
}

/// Result `index` of a task with `count` results.
pub fn decode_nth<T: DeserializeOwned + 'static>(
    results: &[TaskResult],
    index: usize,
    count: usize,
) -> Result<T> {
    if results.len() != count {
        return Err(Error::decode(format!(
            "expected {count} result{}, got {}",
            if count == 1 { "" } else { "s" },
            results.len()
        )));
    }
    let result = results
        .get(index)
        .ok_or_else(|| Error::decode(format!("result {index} is missing")))?;
    value::decode(&result.type_name, &result.value)
        .map_err(|e| Error::decode(format!("result {index}: {}", e.message())))
}

pub fn task_error<E: Display + 'static>(err: E) -> TaskError {
    TaskError::from_display(err)
}

pub fn boxed<F>(future: F) -> TaskFuture
where
    F: Future<Output = TaskOutcome> + Send + 'static,
{
    Box::pin(future)
}

pub fn ready(outcome: TaskOutcome) -> TaskFuture {
    Box::pin(std::future::ready(outcome))
}
