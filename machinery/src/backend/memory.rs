//! The embedded in-process result backend (`memory://`).
//!
//! Shared by name within a process like the [memory broker](crate::broker::memory). States
//! expire after `ResultsExpireIn` seconds, as they do in Redis; waiting for a result is woken
//! by the write that finishes the task, without polling.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{timeout, ResultBackend};
use crate::error::Result;
use crate::lock;
use crate::wire::{GoTime, GroupMeta, TaskState};

/// An in-process result backend; see the [module docs](self).
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    ttl: Duration,
    inner: Mutex<Inner>,
    groups: Mutex<HashMap<String, GroupMeta>>,
}

#[derive(Default)]
struct Inner {
    states: HashMap<String, Entry>,
    /// (expiry, uuid), one per entry, in creation order; the TTL is the same for all, so the
    /// queue is ordered (re-queued records go to the back with a later time).
    expiries: VecDeque<(Instant, String)>,
}

struct Entry {
    state: Option<TaskState>,
    expires: Instant,
    waiters: Option<Arc<Notify>>,
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Shared>>> {
    static BACKENDS: OnceLock<Mutex<HashMap<String, Arc<Shared>>>> = OnceLock::new();
    BACKENDS.get_or_init(Default::default)
}

impl MemoryBackend {
    /// Opens the process-wide backend called `name` (created on first use, keeping states for
    /// `ttl`).
    pub fn open(name: &str, ttl: Duration) -> MemoryBackend {
        let shared = lock(registry())
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Shared {
                    name: name.to_owned(),
                    ttl,
                    inner: Mutex::new(Inner::default()),
                    groups: Mutex::new(HashMap::new()),
                })
            })
            .clone();
        MemoryBackend { shared }
    }

    /// How many task states are stored.
    pub fn len(&self) -> usize {
        let mut inner = lock(&self.shared.inner);
        inner.expire(Instant::now());
        inner.states.values().filter(|e| e.state.is_some()).count()
    }

    /// Whether no task state is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.expiries.front() {
            if *at > now {
                break;
            }
            let Some((_, uuid)) = self.expiries.pop_front() else {
                break;
            };
            match self.states.get(&uuid) {
                Some(entry) if entry.expires <= now => {
                    // Waiters wake up and wait again on a fresh entry.
                    if let Some(entry) = self.states.remove(&uuid) {
                        if let Some(waiters) = entry.waiters {
                            waiters.notify_waiters();
                        }
                    }
                }
                // Written again since: check again when it may have expired.
                Some(entry) => {
                    let at = entry.expires.max(now + Duration::from_millis(1));
                    self.expiries.push_back((at, uuid));
                }
                None => {}
            }
        }
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    async fn set_state(&self, mut state: TaskState) -> Result<()> {
        let now = Instant::now();
        let expires = now + self.shared.ttl;
        let mut inner = lock(&self.shared.inner);
        inner.expire(now);
        let waiters = match inner.states.get_mut(&state.task_uuid) {
            Some(entry) => {
                if let Some(old) = entry.state.take() {
                    if state.task_name.is_empty() {
                        state.task_name = old.task_name;
                    }
                    if state.created_at.is_zero() {
                        state.created_at = old.created_at;
                    }
                }
                entry.state = Some(state);
                entry.expires = expires;
                entry.waiters.clone()
            }
            None => {
                // One expiry record per entry: a later write only moves `entry.expires`, and
                // `expire` re-queues the record when it finds the entry still fresh.
                let uuid = state.task_uuid.clone();
                inner.expiries.push_back((expires, uuid.clone()));
                inner.states.insert(
                    uuid,
                    Entry {
                        state: Some(state),
                        expires,
                        waiters: None,
                    },
                );
                None
            }
        };
        drop(inner);
        if let Some(waiters) = waiters {
            waiters.notify_waiters();
        }
        Ok(())
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        let inner = lock(&self.shared.inner);
        Ok(inner
            .states
            .get(task_uuid)
            .filter(|e| e.expires > Instant::now())
            .and_then(|e| e.state.clone()))
    }

    async fn wait_final(&self, task_uuid: &str, deadline: Option<Instant>) -> Result<TaskState> {
        loop {
            let notify = {
                let mut guard = lock(&self.shared.inner);
                let inner = &mut *guard;
                if !inner.states.contains_key(task_uuid) {
                    // Waiting before the first write: an empty entry to hang the waiters on.
                    let expires = Instant::now() + self.shared.ttl;
                    inner.expiries.push_back((expires, task_uuid.to_owned()));
                    inner.states.insert(
                        task_uuid.to_owned(),
                        Entry {
                            state: None,
                            expires,
                            waiters: None,
                        },
                    );
                }
                let Some(entry) = inner.states.get_mut(task_uuid) else {
                    continue;
                };
                if let Some(state) = &entry.state {
                    if state.state.is_final() {
                        let state = state.clone();
                        entry.waiters = None;
                        return Ok(state);
                    }
                }
                entry
                    .waiters
                    .get_or_insert_with(|| Arc::new(Notify::new()))
                    .clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            // Register before re-checking, so a write between the check and the wait is seen.
            notified.as_mut().enable();
            {
                let inner = lock(&self.shared.inner);
                if let Some(Some(state)) = inner.states.get(task_uuid).map(|e| &e.state) {
                    if state.state.is_final() {
                        return Ok(state.clone());
                    }
                }
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(timeout(task_uuid));
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<()> {
        lock(&self.shared.inner).states.remove(task_uuid);
        Ok(())
    }

    async fn init_group(&self, group_uuid: &str, task_uuids: &[String]) -> Result<()> {
        lock(&self.shared.groups).insert(
            group_uuid.to_owned(),
            GroupMeta {
                group_uuid: group_uuid.to_owned(),
                task_uuids: task_uuids.to_vec(),
                created_at: GoTime::now(),
                ..GroupMeta::default()
            },
        );
        Ok(())
    }

    async fn group_meta(&self, group_uuid: &str) -> Result<Option<GroupMeta>> {
        Ok(lock(&self.shared.groups).get(group_uuid).cloned())
    }

    async fn trigger_chord(&self, group_uuid: &str) -> Result<bool> {
        let mut groups = lock(&self.shared.groups);
        match groups.get_mut(group_uuid) {
            Some(meta) if !meta.chord_triggered => {
                meta.chord_triggered = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::State;

    #[tokio::test(start_paused = true)]
    async fn states_expire_after_the_ttl_unless_written_again() {
        let backend = MemoryBackend::open("expiry-test", Duration::from_secs(10));
        backend
            .set_state(TaskState::new("a", State::Pending))
            .await
            .unwrap();
        backend
            .set_state(TaskState::new("b", State::Pending))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        backend
            .set_state(TaskState::new("b", State::Started))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        // Any write runs the expiry.
        backend
            .set_state(TaskState::new("c", State::Pending))
            .await
            .unwrap();
        assert!(backend.get_state("a").await.unwrap().is_none());
        assert_eq!(
            backend.get_state("b").await.unwrap().unwrap().state,
            State::Started
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        backend
            .set_state(TaskState::new("d", State::Pending))
            .await
            .unwrap();
        assert!(backend.get_state("b").await.unwrap().is_none());
        assert_eq!(backend.len(), 2);
    }

    #[tokio::test]
    async fn carries_name_and_creation_time_forward() {
        let backend = MemoryBackend::open("carry-test", Duration::from_secs(60));
        let mut pending = TaskState::new("t", State::Pending);
        pending.task_name = "add".into();
        pending.created_at = GoTime::now();
        backend.set_state(pending.clone()).await.unwrap();
        backend
            .set_state(TaskState::new("t", State::Success))
            .await
            .unwrap();
        let state = backend.get_state("t").await.unwrap().unwrap();
        assert_eq!(state.task_name, "add");
        assert_eq!(state.created_at, pending.created_at);
        assert_eq!(state.state, State::Success);
    }
}
