//! The census layer: counts the calls in flight, run and failed, and reports each call's
//! start and end to the worker registry ([`Census`]), which writes them to Redis in the
//! background. It never waits: a call only appends to a bounded buffer.

use std::sync::Arc;

use super::{Call, Layer};
use crate::task::TaskOutcome;
use crate::wire::State;
use crate::worker::registry::Census;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct CensusLayer {
    pub(crate) census: Arc<Census>,
}

impl Layer for CensusLayer {
    fn before(&self, call: &Call<'_>) {
        self.census.started(call.signature);
    }

    fn after(&self, call: &Call<'_>, outcome: &TaskOutcome) {
        let state = match outcome {
            Ok(_) => State::Success,
            Err(err)
                if crate::worker::will_retry(call.signature, err, call.options.max_retry_later) =>
            {
                State::Retry
            }
            Err(_) => State::Failure,
        };
        self.census.finished(call.signature, state);
    }
}
