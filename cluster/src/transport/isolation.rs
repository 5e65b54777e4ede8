//! A node cut off from its peers on purpose: what a zone-loss drill does to
//! every node of the zone.
//!
//! While isolated, the node's transport sends nothing to any peer (calls fail
//! at once as unreachable) and hands nothing a peer sends to Raft (requests
//! are refused). To the rest of the cluster the node is as gone as one whose
//! zone lost power, while its process, disk and public API stay up: its
//! shoppers get 503s with `Retry-After`, exactly what a client sees when its
//! zone is cut off. Isolation lifts by itself at its deadline, so a drill
//! whose coordinator dies cannot leave a zone cut off for good.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Whether, and until when, this node is cut off from its peers. Cheap to
/// clone; every clone is the same switch.
#[derive(Clone, Debug, Default)]
pub struct Isolation {
    until: Arc<Mutex<Option<Instant>>>,
}

impl Isolation {
    /// Cuts the node off for `duration` from now (replacing any earlier
    /// deadline).
    pub fn isolate_for(&self, duration: Duration) {
        *self.lock() = Some(Instant::now() + duration);
    }

    /// Reconnects the node now.
    pub fn lift(&self) {
        *self.lock() = None;
    }

    /// How much longer the node stays cut off; `None` when it is not.
    pub fn remaining(&self) -> Option<Duration> {
        let mut until = self.lock();
        match *until {
            Some(deadline) if deadline > Instant::now() => Some(deadline - Instant::now()),
            Some(_) => {
                *until = None;
                None
            }
            None => None,
        }
    }

    /// Whether the node is cut off now.
    pub fn is_isolated(&self) -> bool {
        self.remaining().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn isolation_lifts_at_its_deadline_or_when_lifted() {
        let isolation = Isolation::default();
        assert!(!isolation.is_isolated());
        isolation.isolate_for(Duration::from_secs(2));
        let shared = isolation.clone();
        assert!(shared.is_isolated());
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(shared.remaining(), Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!shared.is_isolated());
        isolation.isolate_for(Duration::from_secs(60));
        isolation.lift();
        assert!(!shared.is_isolated());
    }
}
