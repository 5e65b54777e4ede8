//! The run's event trace: every message, fault and client operation, in the
//! order it happened, stamped with simulated time. Its hash is what the
//! determinism check compares; the events themselves are kept when asked
//! for (a replay, a determinism check), to print or diff.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Shared by everything that records events. Cheap to clone.
#[derive(Clone)]
pub struct Trace {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    start: Instant,
    hasher: Sha256,
    count: u64,
    kept: Option<Vec<String>>,
    /// Print events as they happen (`--trace`).
    echo: bool,
}

impl Trace {
    /// A trace starting now; `keep` keeps the events, `echo` prints them.
    pub fn new(keep: bool, echo: bool) -> Trace {
        let inner = Inner { start: Instant::now(), hasher: Sha256::new(), count: 0, kept: keep.then(Vec::new), echo };
        Trace { inner: Arc::new(Mutex::new(inner)) }
    }

    /// Records one event.
    pub fn event(&self, what: impl AsRef<str>) {
        let mut inner = self.lock();
        let line = format!("{:>8} {}", inner.start.elapsed().as_millis(), what.as_ref());
        inner.hasher.update(line.as_bytes());
        inner.hasher.update(b"\n");
        inner.count += 1;
        if inner.echo {
            println!("{line}");
        }
        if let Some(kept) = &mut inner.kept {
            kept.push(line);
        }
    }

    /// Simulated milliseconds since the run began.
    pub fn now_ms(&self) -> u64 {
        self.lock().start.elapsed().as_millis() as u64
    }

    /// The hash of every event so far, and how many there were.
    pub fn digest(&self) -> (String, u64) {
        let inner = self.lock();
        (hex::encode(inner.hasher.clone().finalize()), inner.count)
    }

    /// The events kept, if they were.
    pub fn events(&self) -> Vec<String> {
        self.lock().kept.clone().unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
