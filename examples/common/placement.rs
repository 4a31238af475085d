//! Where a benchmark's worker runs its deliveries.

use machinery::worker::Placement;

/// `BENCH_IN_PLACE=1`: every delivery in place; `BENCH_IN_PLACE=0`: each a task of its own;
/// unset: the default ([`Placement::Adaptive`]).
pub fn from_env() -> Placement {
    match std::env::var("BENCH_IN_PLACE").as_deref() {
        Ok("1") => Placement::InPlace,
        Ok("0") => Placement::Spawned,
        _ => Placement::default(),
    }
}
