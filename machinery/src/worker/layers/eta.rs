//! The ETA: a message that arrives before its time is sent again to arrive then.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tracing::debug;

use super::{Admit, Call, Layer, Slot};
use crate::wire::Signature;

/// Holds back a task that arrived more than `tolerance` before its ETA (Go's AMQP broker
/// delays it through a TTL queue; a message can still arrive early after a redelivery or from
/// a broker without delays).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Eta {
    pub(crate) tolerance: Duration,
}

#[async_trait]
impl Layer for Eta {
    fn admits(&self) -> bool {
        true
    }

    async fn admit(&self, call: &Call<'_>, _slot: &mut Slot) -> Admit {
        match too_early(call.signature, self.tolerance) {
            Some(wait) => {
                debug!(?wait, "message arrived before its ETA; delaying it again");
                Admit::Later(wait)
            }
            None => Admit::Run,
        }
    }
}

/// How long a message must still wait for its ETA, if it arrived too early.
fn too_early(signature: &Signature, tolerance: Duration) -> Option<Duration> {
    let eta = signature.eta?.datetime()?;
    let wait = (eta - Utc::now()).to_std().ok()?;
    (wait > tolerance).then_some(wait)
}
