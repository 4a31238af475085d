//! Examples live in this directory; see `cargo run --example quickstart`.
