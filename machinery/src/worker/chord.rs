//! Chord completion: after a member finishes, fire the chord's callback exactly once, when
//! every member has finished, without reading the whole group on every finish.
//!
//! Go's `GroupCompleted` reads every member's state on each finish
//! (v2/backends/redis/redis.go, `getStates`): quadratic in the group's size. Here a finishing
//! member first reads a small sample of members (the last ones in group order, which finish
//! last when the queue is drained in order, and a spread of others); while one of them is
//! unfinished, so is the group. Only when the whole sample is final does it read every member,
//! in one batch. The member lists themselves are cached per worker ([`GroupCache`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use super::delivery::{error_callbacks, fix_uuid, send};
use super::Ctx;
use crate::error::Result;
use crate::lock;
use crate::wire::{Arg, Signature, State};

/// The member UUIDs a worker keeps of the groups it saw last (FIFO), at most this many in all.
const MAX_CACHED_MEMBERS: usize = 200_000;

/// Member lists of recently seen groups, bounded by [`MAX_CACHED_MEMBERS`] UUIDs.
#[derive(Debug, Default)]
pub(crate) struct GroupCache {
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    groups: HashMap<String, Arc<Vec<String>>>,
    order: VecDeque<String>,
    members: usize,
}

impl GroupCache {
    fn get(&self, group: &str) -> Option<Arc<Vec<String>>> {
        lock(&self.inner).groups.get(group).cloned()
    }

    /// Keeps `members` of `group` (evicting the oldest groups to stay in bounds) and returns
    /// them.
    fn insert(&self, group: &str, members: Vec<String>) -> Arc<Vec<String>> {
        let members = Arc::new(members);
        if members.len() > MAX_CACHED_MEMBERS {
            return members;
        }
        let mut inner = lock(&self.inner);
        if let Some(old) = inner.groups.insert(group.to_owned(), members.clone()) {
            inner.members -= old.len();
        } else {
            inner.order.push_back(group.to_owned());
        }
        inner.members += members.len();
        while inner.members > MAX_CACHED_MEMBERS {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(evicted) = inner.groups.remove(&oldest) {
                inner.members -= evicted.len();
            }
        }
        members
    }
}

/// After a chord member has finished: if every member has, trigger the chord exactly once and
/// send its callback with the results in the group's order, or, if a member failed, record the
/// callback as FAILURE and send its error callbacks.
///
/// `again` (a redelivery of a finished member): the chord may have been triggered by this
/// member's earlier delivery, whose callback publish then failed. The callback is sent again;
/// its UUID is fixed, and a worker receiving a second copy does not run it.
pub(super) async fn finish_group_member(
    ctx: &Ctx,
    signature: &Signature,
    error: Option<&str>,
    again: bool,
) -> Result<()> {
    let Some(callback) = &signature.chord_callback else {
        return Ok(());
    };
    if signature.group_uuid.is_empty() {
        return Ok(());
    }
    let Some(backend) = ctx.store.backend() else {
        warn!("a chord member finished, but no result backend is configured to track its group");
        return Ok(());
    };
    let group = &signature.group_uuid;
    // The member list never changes: read it once per worker (a 10,000-member record is
    // 450 KB). Whether the chord fired is asked afresh: `trigger_chord` answers it atomically,
    // and a redelivery reads the record itself.
    let cached = if again { None } else { ctx.groups.get(group) };
    let (members, triggered) = match cached {
        Some(members) => (members, false),
        None => {
            let meta = ctx
                .store
                .call("read the chord's group", |b| b.group_meta(group))
                .await?
                .flatten();
            let Some(meta) = meta else {
                warn!(group = %group, "no record of this chord's group; its callback cannot be sent");
                return Ok(());
            };
            let members = ctx.groups.insert(group, meta.task_uuids);
            (members, meta.chord_triggered)
        }
    };
    if triggered && !again {
        return Ok(());
    }
    if !members.contains(&signature.uuid) {
        warn!(group = %group, "this task is not a member of the group it names; ignoring its chord");
        return Ok(());
    }
    // A sample first (see the module docs), then every member.
    if members.len() > 2 * CHORD_PROBE {
        let probe = chord_probe(&members, &signature.uuid);
        let sampled = ctx
            .store
            .call("read chord members", |b| b.get_states(&probe))
            .await?
            .unwrap_or_default();
        if !sampled
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.state.is_final()))
        {
            return Ok(());
        }
    }
    // Then one batched read of every member.
    let mut states = Vec::with_capacity(members.len());
    let all = ctx
        .store
        .call("read chord members", |b| b.get_states(&members))
        .await?
        .unwrap_or_default();
    for state in all {
        match state {
            Some(state) if state.state.is_final() => states.push(state),
            _ => return Ok(()),
        }
    }
    // Not retried here: a retry after a lost reply would read "already triggered" and send
    // nothing. A failure gives the message back; its redelivery reads the record afresh.
    if !triggered && !backend.trigger_chord(group).await? {
        return Ok(());
    }
    let mut callback = (**callback).clone();
    fix_uuid(&mut callback, group, "chord_callback", 0);
    let failed = states.iter().find(|s| s.state == State::Failure);
    if let Some(failed) = failed {
        warn!(group = %group, member = %failed.task_uuid, "a chord member failed; the callback will not run");
        let message = if failed.task_uuid == signature.uuid {
            error.unwrap_or(&failed.error).to_owned()
        } else {
            failed.error.clone()
        };
        ctx.store
            .set(&callback, State::Failure, None, message.clone())
            .await?;
        for on_error in error_callbacks(&callback, &message) {
            send(ctx, on_error).await?;
        }
        return Ok(());
    }
    debug!(group = %group, "chord complete; sending its callback");
    if !callback.immutable {
        for state in states {
            callback
                .args
                .extend(state.results.unwrap_or_default().into_iter().map(Arg::from));
        }
    }
    send(ctx, callback).await
}

/// How many members a finishing chord member samples from each end of its group.
const CHORD_PROBE: usize = 16;

/// The members a finishing chord member checks first: the last [`CHORD_PROBE`] in group order
/// and [`CHORD_PROBE`] others spread from a point that depends on the finishing member.
fn chord_probe(members: &[String], finished: &str) -> Vec<String> {
    let n = members.len();
    let seed = finished.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let step = (n / CHORD_PROBE).max(1);
    let spread = (0..CHORD_PROBE).map(|i| (seed.wrapping_add(i * step)) % n);
    let tail = n.saturating_sub(CHORD_PROBE)..n;
    let mut picked: Vec<usize> = tail.chain(spread).collect();
    picked.sort_unstable();
    picked.dedup();
    picked.into_iter().map(|i| members[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_takes_the_tail_and_a_spread_within_bounds() {
        let members: Vec<String> = (0..1000).map(|i| format!("task_{i}")).collect();
        let probe = chord_probe(&members, "task_17");
        assert!(probe.len() <= 2 * CHORD_PROBE);
        assert!(probe.contains(&"task_999".to_owned()));
        assert!(probe.contains(&"task_984".to_owned()));
        assert!(probe.iter().filter(|m| !m.starts_with("task_9")).count() >= CHORD_PROBE / 2);
    }

    #[test]
    fn the_cache_stays_in_bounds() {
        let cache = GroupCache::default();
        let big: Vec<String> = (0..MAX_CACHED_MEMBERS / 2).map(|i| i.to_string()).collect();
        cache.insert("a", big.clone());
        cache.insert("b", big.clone());
        assert!(cache.get("a").is_some());
        cache.insert("c", big);
        assert!(cache.get("a").is_none(), "the oldest group is evicted");
        assert!(cache.get("b").is_some() && cache.get("c").is_some());
        assert!(lock(&cache.inner).members <= MAX_CACHED_MEMBERS);
    }
}
