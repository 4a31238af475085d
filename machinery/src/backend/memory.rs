//! The embedded in-process result backend (`memory://`).
//!
//! Shared by name within a process like the [memory broker](crate::broker::memory). States and
//! group records expire after `ResultsExpireIn` seconds, as they do in Redis; waiting for a
//! result is woken by the write that finishes the task, without polling. Writes never move a
//! task backwards (see [`ResultBackend::transition`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{allowed, revoked_over, revoked_state, timeout, ResultBackend};
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
    groups: Mutex<Groups>,
}

/// Group records, expiring like states (Redis keeps them with `SET ... EX` too).
#[derive(Default)]
struct Groups {
    records: HashMap<String, (GroupMeta, Instant)>,
    /// (expiry, group UUID), one per record, in order (see [`Inner::expiries`]).
    expiries: VecDeque<(Instant, String)>,
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
                    groups: Mutex::new(Groups::default()),
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
    /// Writes `state` unless [`allowed`] refuses it, carrying the name and creation time
    /// forward; returns the state stored before (when `previous` is asked for) and the waiters
    /// to wake.
    fn apply(
        &mut self,
        mut state: TaskState,
        expires: Instant,
        previous: bool,
    ) -> (Option<TaskState>, Option<Arc<Notify>>) {
        match self.states.get_mut(&state.task_uuid) {
            Some(entry) => {
                let before = previous.then(|| entry.state.clone()).flatten();
                if !allowed(entry.state.as_ref(), &state) {
                    return (before, None);
                }
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
                (before, entry.waiters.clone())
            }
            None => {
                // One expiry record per entry: a later write only moves `entry.expires`, and
                // `expire` re-queues the record when it finds the entry still fresh.
                let uuid = state.task_uuid.clone();
                self.expiries.push_back((expires, uuid.clone()));
                self.states.insert(
                    uuid,
                    Entry {
                        state: Some(state),
                        expires,
                        waiters: None,
                    },
                );
                (None, None)
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let states = &mut self.states;
        sweep(&mut self.expiries, now, |uuid| match states.get(uuid) {
            Some(entry) if entry.expires <= now => {
                // Waiters wake up and wait again on a fresh entry.
                if let Some(waiters) = states.remove(uuid).and_then(|entry| entry.waiters) {
                    waiters.notify_waiters();
                }
                None
            }
            entry => entry.map(|entry| entry.expires),
        });
    }
}

/// Pops the due `(time, key)` entries of an expiry queue. `live(key)` drops the record if its
/// time has passed and returns `None`, or returns its (later) expiry: it was written again
/// since, and is checked again then.
fn sweep(
    expiries: &mut VecDeque<(Instant, String)>,
    now: Instant,
    mut live: impl FnMut(&str) -> Option<Instant>,
) {
    while expiries.front().is_some_and(|(at, _)| *at <= now) {
        let Some((_, key)) = expiries.pop_front() else {
            break;
        };
        if let Some(expires) = live(&key) {
            expiries.push_back((expires.max(now + Duration::from_millis(1)), key));
        }
    }
}

impl Groups {
    fn insert(&mut self, meta: GroupMeta, expires: Instant) {
        let uuid = meta.group_uuid.clone();
        if let Some(record) = self.records.get_mut(&uuid) {
            *record = (meta, expires);
        } else {
            self.expiries.push_back((expires, uuid.clone()));
            self.records.insert(uuid, (meta, expires));
        }
    }

    fn get_mut(&mut self, group_uuid: &str, now: Instant) -> Option<&mut (GroupMeta, Instant)> {
        self.records
            .get_mut(group_uuid)
            .filter(|(_, expires)| *expires > now)
    }

    /// Drops the records whose time has passed (as [`Inner::expire`] does for states).
    fn expire(&mut self, now: Instant) {
        let records = &mut self.records;
        sweep(&mut self.expiries, now, |uuid| match records.get(uuid) {
            Some((_, expires)) if *expires <= now => {
                records.remove(uuid);
                None
            }
            record => record.map(|(_, expires)| *expires),
        });
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
    async fn set_state(&self, state: TaskState) -> Result<()> {
        self.set_states(vec![state]).await
    }

    /// Applies the batch under one lock.
    async fn set_states(&self, states: Vec<TaskState>) -> Result<()> {
        let now = Instant::now();
        let expires = now + self.shared.ttl;
        let mut wake = Vec::new();
        {
            let mut inner = lock(&self.shared.inner);
            inner.expire(now);
            for state in states {
                if let (_, Some(waiters)) = inner.apply(state, expires, false) {
                    wake.push(waiters);
                }
            }
        }
        for waiters in wake {
            waiters.notify_waiters();
        }
        Ok(())
    }

    async fn transition(&self, state: TaskState) -> Result<Option<TaskState>> {
        let now = Instant::now();
        let (previous, waiters) = {
            let mut inner = lock(&self.shared.inner);
            inner.expire(now);
            inner.apply(state, now + self.shared.ttl, true)
        };
        if let Some(waiters) = waiters {
            waiters.notify_waiters();
        }
        Ok(previous)
    }

    /// Revokes the batch under one lock.
    async fn revoke(&self, task_uuids: &[String]) -> Result<Vec<bool>> {
        let now = Instant::now();
        let expires = now + self.shared.ttl;
        let mut wake = Vec::new();
        let mut revoked = Vec::with_capacity(task_uuids.len());
        {
            let mut inner = lock(&self.shared.inner);
            inner.expire(now);
            for uuid in task_uuids {
                let (previous, waiters) = inner.apply(revoked_state(uuid), expires, true);
                revoked.push(revoked_over(previous.as_ref()));
                wake.extend(waiters);
            }
        }
        for waiters in wake {
            waiters.notify_waiters();
        }
        Ok(revoked)
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>> {
        let inner = lock(&self.shared.inner);
        Ok(inner
            .states
            .get(task_uuid)
            .filter(|e| e.expires > Instant::now())
            .and_then(|e| e.state.clone()))
    }

    /// Reads every state under one lock.
    async fn get_states(&self, task_uuids: &[String]) -> Result<Vec<Option<TaskState>>> {
        let inner = lock(&self.shared.inner);
        let now = Instant::now();
        Ok(task_uuids
            .iter()
            .map(|uuid| {
                inner
                    .states
                    .get(uuid)
                    .filter(|e| e.expires > now)
                    .and_then(|e| e.state.clone())
            })
            .collect())
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
        let now = Instant::now();
        let mut groups = lock(&self.shared.groups);
        groups.expire(now);
        groups.insert(
            GroupMeta {
                group_uuid: group_uuid.to_owned(),
                task_uuids: task_uuids.to_vec(),
                created_at: GoTime::now(),
                ..GroupMeta::default()
            },
            now + self.shared.ttl,
        );
        Ok(())
    }

    async fn group_meta(&self, group_uuid: &str) -> Result<Option<GroupMeta>> {
        let now = Instant::now();
        let mut groups = lock(&self.shared.groups);
        groups.expire(now);
        Ok(groups
            .get_mut(group_uuid, now)
            .map(|(meta, _)| meta.clone()))
    }

    /// Like Redis's, it rewrites the record, which starts its time to live again.
    async fn trigger_chord(&self, group_uuid: &str) -> Result<bool> {
        let now = Instant::now();
        let mut groups = lock(&self.shared.groups);
        groups.expire(now);
        match groups.get_mut(group_uuid, now) {
            Some((meta, expires)) if !meta.chord_triggered => {
                meta.chord_triggered = true;
                *expires = now + self.shared.ttl;
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

    fn full(uuid: &str, state: State) -> TaskState {
        TaskState {
            task_name: "add".into(),
            created_at: GoTime::now(),
            ..TaskState::new(uuid, state)
        }
    }

    async fn stored(backend: &MemoryBackend, uuid: &str) -> State {
        backend.get_state(uuid).await.unwrap().unwrap().state
    }

    #[tokio::test]
    async fn writes_never_move_a_task_backwards() {
        let backend = MemoryBackend::open("guard-test", Duration::from_secs(60));
        let cases = [
            (State::Success, State::Received, State::Success),
            (State::Success, State::Pending, State::Success),
            (State::Failure, State::Retry, State::Failure),
            (State::Failure, State::Started, State::Failure),
            (State::Received, State::Pending, State::Received),
            (State::Started, State::Pending, State::Started),
            (State::Retry, State::Pending, State::Pending),
            (State::Pending, State::Pending, State::Pending),
            (State::Success, State::Failure, State::Failure),
            (State::Failure, State::Success, State::Success),
            (State::Started, State::Received, State::Received),
        ];
        for (i, (first, next, expected)) in cases.into_iter().enumerate() {
            for way in 0..3 {
                let uuid = format!("guard-{i}-{way}");
                backend.set_state(full(&uuid, first)).await.unwrap();
                let next = TaskState::new(&uuid, next);
                match way {
                    0 => backend.set_state(next).await.unwrap(),
                    1 => backend.set_states(vec![next]).await.unwrap(),
                    _ => {
                        let previous = backend.transition(next).await.unwrap().unwrap();
                        assert_eq!(previous.state, first);
                    }
                }
                assert_eq!(
                    stored(&backend, &uuid).await,
                    expected,
                    "{first} -> {expected}"
                );
                let record = backend.get_state(&uuid).await.unwrap().unwrap();
                assert_eq!(record.task_name, "add");
            }
        }
    }

    #[tokio::test]
    async fn a_revoke_keeps_finished_tasks_and_nothing_replaces_it() {
        let backend = MemoryBackend::open("revoke-test", Duration::from_secs(60));
        for (uuid, state) in [
            ("pending", State::Pending),
            ("retry", State::Retry),
            ("started", State::Started),
            ("success", State::Success),
            ("failure", State::Failure),
        ] {
            backend.set_state(full(uuid, state)).await.unwrap();
        }
        let uuids = ["pending", "retry", "started", "success", "failure", "none"].map(String::from);
        let revoked = backend.revoke(&uuids).await.unwrap();
        assert_eq!(revoked, [true, true, true, false, false, true]);
        let stored = backend.get_states(&uuids).await.unwrap();
        for (uuid, (state, revoked)) in uuids.iter().zip(stored.iter().zip(&revoked)) {
            let state = state.as_ref().unwrap();
            assert_eq!(
                super::super::is_revoked(state),
                *revoked,
                "{uuid}: {state:?}"
            );
        }
        assert_eq!(
            stored[0].as_ref().unwrap().task_name,
            "add",
            "carried forward"
        );
        // A body that finishes late, a redelivery, a resend: none replaces the revoke.
        for next in [
            State::Success,
            State::Failure,
            State::Received,
            State::Pending,
        ] {
            backend.set_state(full("started", next)).await.unwrap();
            let previous = backend
                .transition(TaskState::new("none", next))
                .await
                .unwrap();
            assert!(super::super::is_revoked(&previous.unwrap()));
        }
        assert!(super::super::is_revoked(
            &backend.get_state("started").await.unwrap().unwrap()
        ));
        // Revoking again: still revoked.
        assert_eq!(backend.revoke(&uuids[..1]).await.unwrap(), [true]);
    }

    #[tokio::test]
    async fn transition_returns_the_previous_state() {
        let backend = MemoryBackend::open("transition-test", Duration::from_secs(60));
        let pending = full("t", State::Pending);
        assert_eq!(backend.transition(pending.clone()).await.unwrap(), None);
        assert_eq!(
            backend
                .transition(TaskState::new("t", State::Received))
                .await
                .unwrap(),
            Some(pending.clone())
        );
        let received = backend.get_state("t").await.unwrap().unwrap();
        assert_eq!(received.created_at, pending.created_at);
        assert_eq!(received.state, State::Received);
    }

    #[tokio::test]
    async fn get_states_reads_in_order() {
        let backend = MemoryBackend::open("get-states-test", Duration::from_secs(60));
        backend
            .set_states(vec![
                TaskState::new("a", State::Started),
                TaskState::new("c", State::Success),
            ])
            .await
            .unwrap();
        let ids = ["c", "b", "a"].map(String::from);
        let states: Vec<Option<State>> = backend
            .get_states(&ids)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.map(|s| s.state))
            .collect();
        assert_eq!(states, [Some(State::Success), None, Some(State::Started)]);
    }

    #[tokio::test(start_paused = true)]
    async fn groups_expire_after_the_ttl() {
        let backend = MemoryBackend::open("group-expiry-test", Duration::from_secs(10));
        backend.init_group("g1", &["a".into()]).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        backend.init_group("g2", &["b".into()]).await.unwrap();
        // Triggering rewrites the record, as Redis's SET EX does: a fresh TTL.
        assert!(backend.trigger_chord("g2").await.unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(backend.group_meta("g1").await.unwrap(), None);
        assert!(!backend.trigger_chord("g1").await.unwrap());
        tokio::time::advance(Duration::from_secs(4)).await;
        let g2 = backend.group_meta("g2").await.unwrap().unwrap();
        assert!(g2.chord_triggered);
        // Expired records are dropped, not only hidden: the map stays bounded.
        for i in 0..100 {
            backend.init_group(&format!("n{i}"), &[]).await.unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(lock(&backend.shared.groups).records.len() <= 11);
    }
}
