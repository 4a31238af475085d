//! Result backends: where task states and results are kept.

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::wire::{GroupMeta, State, TaskState};

/// Stores [`TaskState`]s by task UUID (Go's result backend interface).
#[async_trait]
pub trait ResultBackend: Send + Sync + fmt::Debug + 'static {
    /// Records a state transition, unless it would move the task backwards (see
    /// [`transition`](Self::transition)). When `state.task_name` is empty or `state.created_at` is
    /// zero, the stored values are carried forward, so every record names its task and the
    /// time it was sent.
    async fn set_state(&self, state: TaskState) -> Result<()>;

    /// Records several transitions, as [`set_state`](Self::set_state) does for each; network
    /// backends send them in one round trip.
    async fn set_states(&self, states: Vec<TaskState>) -> Result<()> {
        for state in states {
            self.set_state(state).await?;
        }
        Ok(())
    }

    /// The stored state of a task, if any.
    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>>;

    /// The stored states of several tasks, in the order asked; network backends read them in
    /// one round trip (Redis: `MGET`).
    async fn get_states(&self, task_uuids: &[String]) -> Result<Vec<Option<TaskState>>> {
        let mut states = Vec::with_capacity(task_uuids.len());
        for uuid in task_uuids {
            states.push(self.get_state(uuid).await?);
        }
        Ok(states)
    }

    /// Records a state transition as [`set_state`](Self::set_state) does, and returns the
    /// state stored before it, in one atomic step where the backend allows.
    ///
    /// The worker records RECEIVED with it: the previous state tells a first delivery from a
    /// redelivery of a task that already finished (which must not run again) or a duplicate of
    /// a message another worker is running.
    ///
    /// Like `set_state`, it never moves a task backwards: a final state (SUCCESS, FAILURE) is
    /// only replaced by a final state, and PENDING only replaces nothing, PENDING or RETRY.
    /// A refused write is not an error; the returned previous state shows what is stored.
    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        let previous = self.get_state(&state.task_uuid).await?;
        if allowed(previous.as_ref().map(|s| s.state), state.state) {
            self.set_state(state).await?;
        }
        Ok(previous)
    }

    /// Revokes tasks (see [`Server::revoke`](crate::Server::revoke)).
    async fn revoke(&self, task_uuids: &[String]) -> Result<Vec<bool>> {
        let _ = task_uuids;
        Err(Error::new(ErrorKind::Unsupported, "todo"))
    }

    /// Waits until the task reaches SUCCESS or FAILURE, or `deadline` passes.
    ///
    /// The default polls [`get_state`](Self::get_state) with a backoff from 1 ms to 100 ms;
    /// backends that can be notified of changes override it.
    async fn wait_final(&self, task_uuid: &str, deadline: Option<Instant>) -> Result<TaskState> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(state) = self.get_state(task_uuid).await? {
                if state.state.is_final() {
                    return Ok(state);
                }
            }
            let wake = Instant::now() + pause;
            match deadline {
                Some(deadline) if deadline <= Instant::now() => {
                    return Err(timeout(task_uuid));
                }
                Some(deadline) => tokio::time::sleep_until(wake.min(deadline)).await,
                None => tokio::time::sleep_until(wake).await,
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Deletes the stored state of a task.
    async fn purge_state(&self, task_uuid: &str) -> Result<()>;

    /// Records a group and its members, in creation order (Go's `InitGroup`).
    async fn init_group(&self, group_uuid: &str, task_uuids: &[String]) -> Result<()> {
        let _ = (group_uuid, task_uuids);
        Err(unsupported_groups(self))
    }

    /// The group record, if any.
    async fn group_meta(&self, group_uuid: &str) -> Result<Option<GroupMeta>> {
        let _ = group_uuid;
        Err(unsupported_groups(self))
    }

    /// Marks the group's chord as triggered; returns `true` to exactly one caller, however many
    /// workers call it concurrently (Go's `TriggerChord`, made atomic).
    async fn trigger_chord(&self, group_uuid: &str) -> Result<bool> {
        let _ = group_uuid;
        Err(unsupported_groups(self))
    }
}

/// Whether a task whose stored state is `stored` may move to `next`: never backwards from a
/// final state, and PENDING (a send) never over a task a worker has received.
pub(crate) fn allowed(stored: Option<State>, next: State) -> bool {
    match (stored, next) {
        (None, _) => true,
        (Some(stored), next) if stored.is_final() => next.is_final(),
        (Some(stored), State::Pending) => matches!(stored, State::Pending | State::Retry),
        _ => true,
    }
}

fn unsupported_groups(backend: &(impl fmt::Debug + ?Sized)) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the result backend {backend:?} does not support groups and chords"),
    )
}

pub(crate) fn timeout(task_uuid: &str) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("task {task_uuid} did not finish in time"),
    )
}
