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
//! [`Recycled`] counts, per connection, the channels its callers saw the broker close
//! ([`Losses::check`]) and, after [`RECYCLE_AFTER`], gives the next caller a new connection;
//! also as soon as a channel could not be opened for the limit ([`Counted::channel`]: losses
//! no caller counted). Callers already working on the old one finish there; it is closed
//! [`RETIRE_AFTER`] later. Its users hold a channel only for short calls: an operation of the
//! result backend (30 s at most), or one passive declaration of the broker (bounded by the
//! connection's heartbeat, and failed by the old connection's close if it is still waiting
//! then).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use tracing::{debug, warn};

use crate::error::Result;

/// How many channels the broker may close on a connection before the next caller gets a new
/// one: with the channels open on it (a few hundred at most), far from 2,047.
pub(crate) const RECYCLE_AFTER: usize = 1_024;

/// How long a replaced connection stays open for the calls still running on it: longer than
/// one call may take (30 s), and a lock's close after it (30 s more).
pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(90);

/// A connection opened on demand, opened again when it was lost, has lost
/// [`RECYCLE_AFTER`] channels, or hit the channel limit.
#[derive(Default)]
pub(crate) struct Recycled {
    current: tokio::sync::Mutex<Option<Counted>>,
}

/// A connection, with the count of its channels the broker closed.
#[derive(Clone)]
pub(crate) struct Counted {
    pub(crate) connection: Arc<Connection>,
    pub(crate) losses: Losses,
}

impl Counted {
    /// Opens a channel; one refused for the channel limit has the next caller of
    /// [`Recycled::get`] get a new connection.
    pub(crate) async fn channel(&self) -> std::result::Result<lapin::Channel, lapin::Error> {
        self.connection
            .create_channel()
            .await
            .inspect_err(|e| self.losses.exhausted(e))
    }
}

/// The count of one connection's channels the broker closed, shared with what holds a channel
/// past a call (a lock's guard, which closes its channel in a task of its own).
#[derive(Clone, Default)]
pub(crate) struct Losses(Arc<AtomicUsize>);

impl Losses {
    /// Counts `channel` if it is no longer open: call only before its holder closes it (or
    /// instead), since a client's close looks the same afterwards.
    pub(crate) fn check(&self, channel: &lapin::Channel) {
        if !channel.status().connected() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A channel could not be opened for the channel limit (`error`; lapin's count of
    /// channels includes every one it kept): counts as the whole share. Other errors are
    /// left alone.
    fn exhausted(&self, error: &lapin::Error) {
        if matches!(error.kind(), lapin::ErrorKind::ChannelsLimitReached) {
            self.0.fetch_max(RECYCLE_AFTER, Ordering::Relaxed);
        }
    }

    fn spent(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= RECYCLE_AFTER
    }
}

impl Recycled {
    /// The connection to open a channel on: the current one, or a new one from `connect` when
    /// there is none, it was lost, or the broker has closed its share of its channels. `what`
    /// names it in logs.
    pub(crate) async fn get<F>(&self, what: &str, connect: impl FnOnce() -> F) -> Result<Counted>
    where
        F: Future<Output = Result<Arc<Connection>>>,
    {
        let mut current = self.current.lock().await;
        if let Some(counted) = current.as_ref() {
            let connected = counted.connection.status().connected();
            if connected && !counted.losses.spent() {
                return Ok(counted.clone());
            }
            if connected {
                debug!(
                    connection = what,
                    "replacing a connection whose channels the broker closed (lapin keeps their numbers)"
                );
                retire(counted.connection.clone());
            } else {
                warn!(connection = what, "connection lost; reconnecting");
            }
        }
        *current = None;
        let counted = Counted {
            connection: connect().await?,
            losses: Losses::default(),
        };
        *current = Some(counted.clone());
        Ok(counted)
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
