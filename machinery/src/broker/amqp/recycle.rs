//! Connections for channels the broker may close, replaced before lapin runs out of channel
//! numbers.
//!
//! A passive declaration or a `basic.get` of a queue that does not exist, or a refused
//! exclusive consumer, makes RabbitMQ close the channel that asked. lapin 4.12 never gives the
//! number of such a channel back, and a connection has 2,047 (RabbitMQ's default
//! `channel_max`): after that many, it can open no channel at all, while it stays connected, so
//! nothing reconnects it. The result backend reads states that do not exist yet and checks
//! chords that way, and the broker reads the depth of dead-letter queues that nothing was
//! dead-lettered to: each leaves one number behind.
//!
//! [`Recycled`] counts the channels opened on its connection and, after [`RECYCLE_AFTER`],
//! gives the next caller a new connection. Callers already working on the old one finish
//! there; it is closed [`RETIRE_AFTER`] later.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use tracing::{debug, warn};

use crate::error::Result;

/// How many channels a connection gives before the next caller gets a new one: even if every
/// one of them leaked, the channels still open on it (a few hundred at most) keep it far
/// from 2,047.
pub(crate) const RECYCLE_AFTER: usize = 1_024;

/// How long a replaced connection stays open for the calls still running on it (longer than
/// one call may take, 30 s).
pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(45);

/// A connection opened on demand, opened again when it was lost or has given
/// [`RECYCLE_AFTER`] channels.
#[derive(Default)]
pub(crate) struct Recycled {
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Channels given on the current connection.
    given: AtomicUsize,
}

impl Recycled {
    /// The connection to open one channel on (every caller opens one): the current one, or a
    /// new one from `connect` when there is none, it was lost, or it has given
    /// [`RECYCLE_AFTER`] channels. `what` names it in logs.
    pub(crate) async fn get<F>(
        &self,
        what: &str,
        connect: impl FnOnce() -> F,
    ) -> Result<Arc<Connection>>
    where
        F: Future<Output = Result<Arc<Connection>>>,
    {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref() {
            let connected = connection.status().connected();
            if connected && self.given.fetch_add(1, Ordering::Relaxed) < RECYCLE_AFTER {
                return Ok(connection.clone());
            }
            if connected {
                debug!(
                    connection = what,
                    channels = RECYCLE_AFTER,
                    "replacing a connection that has given its share of channels"
                );
                retire(connection.clone());
            } else {
                warn!(connection = what, "connection lost; reconnecting");
            }
        }
        *current = None;
        let connection = connect().await?;
        self.given.store(1, Ordering::Relaxed);
        *current = Some(connection.clone());
        Ok(connection)
    }
}

/// Closes a replaced connection once the calls still running on it have had their time
/// ([`RETIRE_AFTER`]).
fn retire(connection: Arc<Connection>) {
    let close = async move {
        tokio::time::sleep(RETIRE_AFTER).await;
        let _ = connection.close(200, "replaced".into()).await;
    };
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        drop(runtime.spawn(close));
    }
}
