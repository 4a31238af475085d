//! Go's worker handlers: pre-task, post-task and error (v2/worker.go `SetPreTaskHandler`,
//! `SetPostTaskHandler`, `SetErrorHandler`).

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tracing::error;

use super::{panic_message, Call, Layer};
use crate::task::{TaskError, TaskOutcome};
use crate::wire::Signature;

/// A pre-task handler: sees the signature before the body runs.
pub(crate) type PreTask = Arc<dyn Fn(&Signature) + Send + Sync>;
/// A post-task handler: sees the signature and the body's outcome.
pub(crate) type PostTask = Arc<dyn Fn(&Signature, &TaskOutcome) + Send + Sync>;
/// An error handler: sees the signature and the error of a body that failed.
pub(crate) type OnError = Arc<dyn Fn(&Signature, &TaskError) + Send + Sync>;

/// The handlers set on the worker builder. A handler that panics is logged and does not lose
/// the task: its outcome is recorded as if no handler were set.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) pre: Option<PreTask>,
    pub(crate) post: Option<PostTask>,
    pub(crate) error: Option<OnError>,
}

impl Hooks {
    pub(crate) fn is_empty(&self) -> bool {
        self.pre.is_none() && self.post.is_none() && self.error.is_none()
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("pre", &self.pre.is_some())
            .field("post", &self.post.is_some())
            .field("error", &self.error.is_some())
            .finish()
    }
}

/// Runs a handler, catching its panic.
fn guarded(which: &str, f: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
        error!(
            handler = which,
            panic = %panic_message(payload),
            "a worker handler panicked; the task's outcome is recorded as usual"
        );
    }
}

impl Layer for Hooks {
    fn before(&self, call: &Call<'_>) {
        if let Some(pre) = &self.pre {
            guarded("pre-task", || pre(call.signature));
        }
    }

    fn after(&self, call: &Call<'_>, outcome: &TaskOutcome) {
        // Go calls the error handler from taskFailed, then the post-task handler (deferred).
        if let (Some(on_error), Err(err)) = (&self.error, outcome) {
            guarded("error", || on_error(call.signature, err));
        }
        if let Some(post) = &self.post {
            guarded("post-task", || post(call.signature, outcome));
        }
    }
}
