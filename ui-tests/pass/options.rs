//! Every task option, on sync and async tasks, through the renamed-crate path too.
use std::time::Duration;

use machinery::task;

#[task(
    name = "optioned",
    retries = 3,
    retry_timeout = "10s",
    timeout = "1m30s",
    rate_limit = "100/s",
    queue = "slow",
    priority = 9,
    max_retry_later = 20
)]
fn optioned(a: i64) -> i64 {
    a
}

#[task(timeout = "250ms", rate_limit = "5/10s")]
async fn limited() {}

const _: () = assert!(matches!(optioned::OPTIONS.get_retries(), Some(3)));

fn main() {
    assert_eq!(optioned::OPTIONS.get_timeout(), Some(Duration::from_secs(90)));
    assert_eq!(limited::OPTIONS.get_timeout(), Some(Duration::from_millis(250)));
    let sig = optioned::signature(1);
    assert_eq!(sig.as_wire().routing_key, "slow");
    assert_eq!(sig.as_wire().retry_count, 3);
}
