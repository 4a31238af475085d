//! What the benchmarks read about processes and leave behind in Redis.
#![allow(dead_code)]

/// The CPU time the live threads of process `pid` ("self" for this one) have run so far, in
/// seconds: the sum of each thread's run time in `/proc/<pid>/task/*/schedstat` (nanoseconds;
/// `/proc/<pid>/stat` counts in ticks of 10 ms, too coarse for a drain of a second). 0 when
/// the process cannot be read.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let nanos: u64 = threads
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    nanos as f64 / 1e9
}

/// Deletes the keys `keys` (a run's task states) from the Redis at `url`: runs left behind
/// would grow Redis's keyspace, and a later run would pay for Redis rehashing it.
pub async fn forget_keys(url: &str, keys: &[String]) {
    if keys.is_empty() {
        return;
    }
    let client = redis::Client::open(url).expect("Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    for chunk in keys.chunks(1000) {
        let _: Result<i64, _> = redis::cmd("UNLINK").arg(chunk).query_async(&mut conn).await;
    }
}
