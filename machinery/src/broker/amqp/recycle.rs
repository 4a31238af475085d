//! Connections for channels the broker may close, replaced before lapin runs out of channel
//! numbers.
//!
//! A passive declaration or a `basic.get` of a queue that does not exist, or a refused
//! exclusive consumer, makes RabbitMQ close the channel that asked. lapin 4.12 then poisons that
//! channel's number for good (`Frames::channels_poison`, cleared only by its recovery, which
//! machinery does not use): when its numbering comes round again (after `channel_max`
//! openings), the channel given that number fails to open, at once and without a word to the
//! broker, with the old channel's error (a `NOT_FOUND` of a queue, say), and stays in lapin's
//! map of channels for good. A connection has as many numbers as its negotiated `channel_max`
//! (RabbitMQ's default is 2,047; a broker or the URL's `?channel_max=` may set fewer): once
//! they are all kept so, it can open no channel at all, while it stays connected, so nothing
//! reconnects it. The result backend reads states that do not exist yet and checks chords that
//! way, and the broker reads the depth of dead-letter queues that nothing was dead-lettered
//! to: each leaves one number behind. [`open_channel`], which every opening goes through, the
//! broker's main connection's included, opens again a channel that failed with such a leftover
//! error ([`is_stale`]), on the same connection: each poisoned number fails one opening, once.
//!
//! [`Recycled`] counts, per connection, the channels its callers saw the broker close
//! ([`Losses::check`]) and, after half the connection's channels ([`Counted::channels`], at
//! most [`RECYCLE_AFTER`]), gives the next caller a new connection;
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

/// The most channels the broker may close on a connection before the next caller gets a new
/// one; on a connection with fewer than twice as many, half of them (rounded up): the rest is
/// for the channels open on it, which its users keep to a quarter and an eighth of them (the
/// result backend's lock channels and operations).
pub(crate) const RECYCLE_AFTER: usize = 1_024;

/// How long a replaced connection stays open for the calls still running on it: longer than
/// one call may take (30 s), and a lock's close after it (30 s more).
pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(90);

/// A connection opened on demand, opened again when it was lost, has lost half its channels
/// (at most [`RECYCLE_AFTER`]), or hit the channel limit.
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
    /// How many channels the connection may have open at once, kept or not: its negotiated
    /// `channel_max` (lapin numbers them from 1 to that, its own channel 0 apart).
    pub(crate) fn channels(&self) -> usize {
        channels_of(&self.connection)
    }

    /// Opens a channel ([`open_channel`]); one refused for the channel limit has the next
    /// caller of [`Recycled::get`] get a new connection, and so has one still meeting poisoned
    /// numbers after `channel_max` tries (which cannot happen).
    pub(crate) async fn channel(&self) -> std::result::Result<lapin::Channel, lapin::Error> {
        open_channel(&self.connection).await.inspect_err(|e| {
            if is_stale(e) {
                self.losses.spend();
            } else {
                self.losses.exhausted(e);
            }
        })
    }
}

/// Opens a channel on `connection`, past the numbers lapin left poisoned (see the
/// [module docs](self)): an opening that failed with the error a channel the broker closed
/// left on its number ([`is_stale`]) is made again. That number is now kept by lapin, so the
/// next opening takes another; each such failure is at once, in the process, and keeps a
/// number, so the channel limit ends the tries after `channel_max` at most. Every channel
/// machinery opens on RabbitMQ is opened here.
pub(crate) async fn open_channel(
    connection: &Connection,
) -> std::result::Result<lapin::Channel, lapin::Error> {
    let mut stale = 0;
    loop {
        match connection.create_channel().await {
            Err(e) if is_stale(&e) && stale < channels_of(connection) => {
                debug!(error = %e, "a channel's number was left poisoned by one the broker closed; opening another");
                stale += 1;
            }
            opened => return opened,
        }
    }
}

/// The count of one connection's channels the broker closed, shared with what holds a channel
/// past a call (a lock's guard, which closes its channel in a task of its own), and how many
/// it may lose.
#[derive(Clone)]
pub(crate) struct Losses {
    count: Arc<AtomicUsize>,
    limit: usize,
}

/// Whether `error`, from opening a channel, is what an earlier channel the broker closed left
/// on the number (see the [module docs](self)): a channel-level refusal (a soft error such as
/// `NOT_FOUND`), which the broker never gives a `channel.open` (it refuses one with a
/// connection error), or, for a close with no error code, lapin's "closing" state, which a
/// channel being opened is never in. Seen with a `channel_max` of 24, where numbers come round
/// again soon: three openings in a row failed with three different `NOT_FOUND`s of reads of
/// missing queues.
fn is_stale(error: &lapin::Error) -> bool {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => {
            matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
        }
        lapin::ErrorKind::InvalidChannelState(state, _) => {
            matches!(state, lapin::ChannelState::Closing)
        }
        _ => false,
    }
}

/// `connection`'s negotiated `channel_max`: how many channels lapin lets it have.
fn channels_of(connection: &Connection) -> usize {
    usize::from(connection.configuration().channel_max())
}

impl Losses {
    /// The losses of a connection with `channels` channels: it is replaced after half of them,
    /// rounded up (at least 1, at most [`RECYCLE_AFTER`]).
    pub(crate) fn of(channels: usize) -> Losses {
        Losses {
            count: Arc::default(),
            limit: channels.div_ceil(2).clamp(1, RECYCLE_AFTER),
        }
    }

    /// Counts `channel` if it is no longer open: call only before its holder closes it (or
    /// instead), since a client's close looks the same afterwards.
    pub(crate) fn check(&self, channel: &lapin::Channel) {
        if !channel.status().connected() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A channel could not be opened for the channel limit (`error`; lapin's count of
    /// channels includes every one it kept): counts as the whole share. Other errors are
    /// left alone.
    fn exhausted(&self, error: &lapin::Error) {
        if matches!(error.kind(), lapin::ErrorKind::ChannelsLimitReached) {
            self.spend();
        }
    }

    /// Has the connection replaced for the next caller.
    fn spend(&self) {
        self.count.fetch_max(self.limit, Ordering::Relaxed);
    }

    fn spent(&self) -> bool {
        self.count.load(Ordering::Relaxed) >= self.limit
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
        let connection = connect().await?;
        let counted = Counted {
            losses: Losses::of(channels_of(&connection)),
            connection,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_replaced_after_half_its_channels_are_lost() {
        // RabbitMQ's default `channel_max`.
        assert_eq!(Losses::of(2_047).limit, RECYCLE_AFTER);
        assert_eq!(Losses::of(65_535).limit, RECYCLE_AFTER);
        assert_eq!(Losses::of(24).limit, 12);
        assert_eq!(Losses::of(0).limit, 1);
        let losses = Losses::of(24);
        assert!(!losses.spent());
        losses.spend();
        assert!(losses.spent());
    }
}
