//! Once the faults heal, checkout works again within a bounded time.

use super::Final;

/// How long after the heal a checkout must succeed.
pub const RECOVERY_MAX_MS: u64 = 20_000;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    match view.oracle.recovered_after_ms {
        Some(ms) if ms <= RECOVERY_MAX_MS => Ok(()),
        Some(ms) => Err(format!("the first checkout after the heal took {ms} ms (bound {RECOVERY_MAX_MS})")),
        None => Err("no checkout succeeded after the heal".into()),
    }
}
