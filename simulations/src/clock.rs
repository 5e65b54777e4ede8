//! A node's clock in the simulated world: simulated time (tokio's paused
//! clock) from a fixed epoch, plus a skew the fault schedule can jump
//! forwards or backwards, as a node whose NTP misbehaves.

use std::sync::atomic::{AtomicI64, Ordering};

use cluster::Clock;
use tokio::time::Instant;

/// Where simulated wall time starts: 2026-01-01T00:00:00Z.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

/// One node's clock.
#[derive(Debug)]
pub struct SimClock {
    start: Instant,
    skew_ms: AtomicI64,
}

impl Default for SimClock {
    /// A clock reading [`EPOCH_MS`] now.
    fn default() -> SimClock {
        SimClock { start: Instant::now(), skew_ms: AtomicI64::new(0) }
    }
}

impl SimClock {
    /// Moves this clock by `delta_ms`, which may be negative.
    pub fn jump(&self, delta_ms: i64) {
        self.skew_ms.fetch_add(delta_ms, Ordering::Relaxed);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed = self.start.elapsed().as_millis() as i64;
        (EPOCH_MS as i64 + elapsed + self.skew_ms.load(Ordering::Relaxed)).max(0) as u64
    }
}
