//! Integration tests for machinery live in `tests/`.
