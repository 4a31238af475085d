//! Result backends: where task states and results are kept.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
mod redis_batch;
#[cfg(feature = "redis")]
pub(crate) mod redis_conn;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::task::REVOKED;
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
    /// The worker records STARTED with its lean form, [`start`](Self::start): the previous state
    /// tells a first delivery from a redelivery of a task that already finished (which must not
    /// run again) or a duplicate of a message another worker is running.
    ///
    /// Like `set_state`, it never moves a task backwards: a final state (SUCCESS, FAILURE) is
    /// only replaced by a final state, and PENDING only replaces nothing, PENDING or RETRY.
    /// A refused write is not an error; the returned previous state shows what is stored.
    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        let previous = self.get_state(&state.task_uuid).await?;
        if allowed(previous.as_ref(), &state) {
            self.set_state(state).await?;
        }
        Ok(previous)
    }

    /// Records that a task starts (STARTED, or RECEIVED) as [`transition`](Self::transition)
    /// does, and returns the state stored before: a final one (SUCCESS, FAILURE, a revoke)
    /// whole, any other with its state alone (and the task's UUID), which is all a worker reads
    /// from it. A backend may skip sending back the rest; the default calls `transition`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// use machinery::backend::{memory::MemoryBackend, ResultBackend};
    /// use machinery::wire::{State, TaskState};
    ///
    /// let backend = MemoryBackend::open("start-docs", std::time::Duration::from_secs(60));
    /// let pending = TaskState {
    ///     task_name: "add".into(),
    ///     ..TaskState::new("t", State::Pending)
    /// };
    /// backend.set_state(pending).await?;
    /// let before = backend.start(TaskState::new("t", State::Started)).await?;
    /// assert_eq!(before, Some(TaskState::new("t", State::Pending)));
    /// # Ok(())
    /// # }
    /// ```
    async fn start(&self, state: TaskState) -> Result<Option<TaskState>> {
        let uuid = state.task_uuid.clone();
        Ok(self.transition(state).await?.map(|previous| {
            if previous.state.is_final() {
                previous
            } else {
                TaskState::new(&uuid, previous.state)
            }
        }))
    }

    /// Records a task's outcome (RETRY, SUCCESS or FAILURE) as [`transition`](Self::transition)
    /// does, but returns the stored record only when it is a revoke, which the write then left
    /// in place ([`is_revoked`]): all a worker needs to know before acting on the outcome. A
    /// backend may skip sending back any other record; the default calls `transition`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// use machinery::backend::{memory::MemoryBackend, ResultBackend};
    /// use machinery::wire::{State, TaskState};
    ///
    /// let backend = MemoryBackend::open("record-docs", std::time::Duration::from_secs(60));
    /// backend.set_state(TaskState::new("t", State::Started)).await?;
    /// assert_eq!(backend.record(TaskState::new("t", State::Success)).await?, None);
    /// backend.revoke(&["r".to_owned()]).await?;
    /// let kept = backend.record(TaskState::new("r", State::Success)).await?;
    /// assert!(kept.is_some_and(|revoke| revoke.state == State::Failure));
    /// # Ok(())
    /// # }
    /// ```
    async fn record(&self, state: TaskState) -> Result<Option<TaskState>> {
        Ok(self.transition(state).await?.filter(is_revoked))
    }

    /// Revokes tasks (see [`Server::revoke`](crate::Server::revoke)): records FAILURE with the
    /// error [`REVOKED`] for each task that is not yet SUCCESS or FAILURE, or has no state at
    /// all, and returns, per task in the order asked, whether it is revoked now (`true` also
    /// for a task revoked before; `false` for one that had finished and keeps its outcome).
    ///
    /// The guarded writes make it safe against a worker finishing the task at the same time:
    /// a revoked state is never replaced, and a revoke never replaces a finished task. The
    /// default writes each task with [`transition`](Self::transition); network backends revoke
    /// the whole batch in one round trip.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// use machinery::backend::{memory::MemoryBackend, ResultBackend};
    /// use machinery::wire::{State, TaskState};
    ///
    /// let backend = MemoryBackend::open("revoke-docs", std::time::Duration::from_secs(60));
    /// backend.set_state(TaskState::new("done", State::Success)).await?;
    /// let revoked = backend.revoke(&["queued".to_owned(), "done".to_owned()]).await?;
    /// assert_eq!(revoked, [true, false]);
    /// # Ok(())
    /// # }
    /// ```
    async fn revoke(&self, task_uuids: &[String]) -> Result<Vec<bool>> {
        let mut revoked = Vec::with_capacity(task_uuids.len());
        for uuid in task_uuids {
            let previous = self.transition(revoked_state(uuid)).await?;
            revoked.push(revoked_over(previous.as_ref()));
        }
        Ok(revoked)
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

    /// Records that a member of a group (of `group_task_count` tasks, as its signature says)
    /// reached its final `state`, for backends that count a group's completion apart from the
    /// member states. Go's AMQP backend does (`markTaskCompleted`, whose queue Go's
    /// `GroupCompleted` counts); the default does nothing, since the other backends read the
    /// members' states. A worker calls it after recording the state, with `again` false, and
    /// on a redelivery of a finished member with `again` true: the member may have been
    /// recorded already, and must not be counted twice.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> machinery::Result<()> {
    /// use machinery::backend::{memory::MemoryBackend, ResultBackend};
    /// use machinery::wire::{State, TaskState};
    ///
    /// let backend = MemoryBackend::open("mark-docs", std::time::Duration::from_secs(60));
    /// let member = TaskState::new("task_1", State::Success);
    /// backend.mark_group_member("group_1", 2, &member, false).await?;
    /// # Ok(())
    /// # }
    /// ```
    async fn mark_group_member(
        &self,
        group_uuid: &str,
        group_task_count: usize,
        state: &TaskState,
        again: bool,
    ) -> Result<()> {
        let _ = (group_uuid, group_task_count, state, again);
        Ok(())
    }
}

/// Whether a task whose stored state is `stored` may move to `next`: never backwards from a
/// final state, and PENDING (a send) never over a task a worker has received. A revoke (FAILURE
/// [`REVOKED`]) only replaces a state that is not final, and nothing replaces it: a body that
/// finishes after its task was revoked does not undo the revoke.
pub(crate) fn allowed(stored: Option<&TaskState>, next: &TaskState) -> bool {
    let Some(stored) = stored else {
        return true;
    };
    if is_revoked(stored) {
        return false;
    }
    match (stored.state, next.state) {
        (stored, _) if stored.is_final() => next.state.is_final() && !is_revoked(next),
        (stored, State::Pending) => matches!(stored, State::Pending | State::Retry),
        _ => true,
    }
}

/// Whether `state` is a revoke: FAILURE with the error [`REVOKED`].
///
/// ```
/// use machinery::backend::is_revoked;
/// use machinery::wire::{State, TaskState};
///
/// let mut state = TaskState::new("t", State::Failure);
/// assert!(!is_revoked(&state));
/// state.error = "revoked".into();
/// assert!(is_revoked(&state));
/// ```
pub fn is_revoked(state: &TaskState) -> bool {
    state.state == State::Failure && state.error == REVOKED
}

/// The state a revoke writes: Go's `NewFailureTaskState(signature, "revoked")`
/// (v2/tasks/state.go), which Go's `AsyncResult` reads as a failed task (`IsFailure`), since
/// Go has no revoked state.
pub(crate) fn revoked_state(task_uuid: &str) -> TaskState {
    TaskState {
        error: REVOKED.to_owned(),
        ..TaskState::new(task_uuid, State::Failure)
    }
}

/// Whether a task is revoked after a revoke's guarded write found `previous`.
pub(crate) fn revoked_over(previous: Option<&TaskState>) -> bool {
    previous.is_none_or(|p| !p.state.is_final() || is_revoked(p))
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
