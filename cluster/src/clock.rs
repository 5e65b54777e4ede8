//! The clock seam. The leader stamps every log entry with `Clock::now_ms`;
//! nothing else in Surge reads wall time to make a decision, so the simulator
//! can swap in its own clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as this node believes them.
pub trait Clock: Send + Sync + 'static {
    /// The time a proposal is stamped with.
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock, for production.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970");
        u64::try_from(since_epoch.as_millis()).expect("milliseconds fit in u64")
    }
}
