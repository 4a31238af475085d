//! The Redis keys of the worker registry, the recent-task index, the throughput counters and
//! the task links: one home for their names, read by [`Admin`](super::Admin) and written by
//! the worker's registry writer.
//!
//! Every key starts with [`PREFIX`], which no key of Go Machinery's layout can collide with:
//! Go's keys are task and group UUIDs (`task_…`, `group_…` or bare UUIDs), queue names and
//! their `.dead_letter`/`.processing.*` lists, `delayed_tasks` and its lock keys. Go's readers
//! never look at these keys.

/// The prefix of every key written for operators.
pub(crate) const PREFIX: &str = "machinery-rs:";

/// ZSET of live worker ids, scored by their last heartbeat (Unix ms): lets a reader list the
/// workers without `SCAN`. Ids whose record expired are removed by readers and writers.
pub(crate) fn workers() -> String {
    format!("{PREFIX}workers")
}

/// STRING, the JSON record of one worker ([`WorkerInfo`](super::WorkerInfo)), expiring after
/// three heartbeats.
pub(crate) fn worker(id: &str) -> String {
    format!("{PREFIX}worker:{id}")
}

/// ZSET of the task UUIDs that reached `state` (lower case: `started`, `success`, `failure`,
/// `retry`), scored by the time (Unix µs); capped by count and by age.
pub(crate) fn recent(state: &str) -> String {
    format!("{PREFIX}recent:{state}")
}

/// HASH `processed`/`failed` → count, for the [`BUCKET_SECS`]-second bucket starting at Unix
/// second `start`; expires after [`THROUGHPUT_TTL_SECS`].
pub(crate) fn throughput(start: i64) -> String {
    format!("{PREFIX}throughput:{start}")
}

/// STRING, the JSON of the links of a task that has some (its `OnSuccess`, `OnError`, chord
/// callback and group), written when it runs; expires with the results.
pub(crate) fn links(task_uuid: &str) -> String {
    format!("{PREFIX}links:{task_uuid}")
}

/// STRING, the UUID of the task whose `OnSuccess`/`OnError`/chord callback this task is;
/// expires with the results.
pub(crate) fn parent(task_uuid: &str) -> String {
    format!("{PREFIX}parent:{task_uuid}")
}

/// The width of a throughput bucket, in seconds.
pub(crate) const BUCKET_SECS: i64 = 10;
/// How long a throughput bucket is kept.
pub(crate) const THROUGHPUT_TTL_SECS: i64 = 3600;

/// The start (Unix seconds) of the bucket holding Unix second `secs`.
pub(crate) fn bucket_of(secs: i64) -> i64 {
    secs - secs.rem_euclid(BUCKET_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced() {
        assert_eq!(workers(), "machinery-rs:workers");
        assert_eq!(recent("success"), "machinery-rs:recent:success");
        assert_eq!(bucket_of(1_000_007), 1_000_000);
        assert_eq!(throughput(10), "machinery-rs:throughput:10");
    }
}
