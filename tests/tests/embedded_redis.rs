//! The embedded suite (`embedded.rs`), run unchanged against the Redis broker: the same file
//! as a module, whose `on_redis()` sees this crate's name in its module path and configures
//! `redis://` (`REDIS_URL`, default 127.0.0.1:6379) with a queue of its own per test.

#[path = "embedded.rs"]
mod embedded;
