//! trybuild tests for `#[task]` live in `tests/ui.rs`.
