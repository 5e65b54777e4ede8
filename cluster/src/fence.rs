//! The generation fence: what keeps a lost primary region that comes back
//! from taking writes once the DR region was promoted without it.
//!
//! A forced failover (see [`crate::failover`]) founds a new group from the
//! DR copy, one *generation* above the old one (`GroupState::generation`).
//! The old primary's nodes still form a majority of the old group, so
//! nothing in Raft stops them from electing a leader when they return. The
//! fence does:
//!
//! - every peer request carries its sender's [`Stamp`]: the generation of
//!   its copy, and the highest generation it has heard of;
//! - a node refuses ([`Refusal::Fenced`](crate::transport::Refusal)) a
//!   request whose sender's copy is older than the newest generation it
//!   knows, and learns a newer one from any stamp;
//! - a node that learns of a generation newer than its own copy's is
//!   **fenced**: it takes no writes and serves no linearizable reads, and
//!   never campaigns. It remembers that on disk, so a restart does not
//!   lift it, and it passes it on in its own stamps, so the old region
//!   learns it from whichever of its nodes heard first;
//! - a node whose group has members in another region takes writes as
//!   leader only once a node there has accepted one of its requests since
//!   it started (a status request does not count: every node answers
//!   those, even from a fenced sender). A region that comes back after a failover restarts, so its
//!   new leader asks the DR region before its first write, and is refused.
//!
//! A node that joins the new group (another DR node, or an old primary node
//! at failback) is fenced from the moment the new leader first reaches it
//! until it has installed the new generation's snapshot: then its copy is
//! as new as anything it has heard of.
//!
//! What the fence cannot do: an old primary region that was partitioned,
//! not down, when the failover was forced, and whose leader never
//! restarts, takes writes until its first message reaches the DR region.
//! That is why a forced failover refuses to run while any node of the
//! writing region answers (see [`crate::failover`]).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::transport::{PeerResponse, Refusal, TransportError};

/// What every peer request says about its sender's generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// The generation of the sender's copy.
    pub generation: u64,
    /// The newest generation the sender has heard of; above `generation`
    /// when the sender is fenced.
    pub known: u64,
}

/// A node's fence. Cheap to clone; every clone is the same fence.
#[derive(Clone, Debug)]
pub struct Fence {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The generation of this node's copy, as its group last applied it.
    generation: AtomicU64,
    /// The newest generation heard of.
    known: AtomicU64,
    /// Where `known` is kept across restarts; none for an in-memory fence.
    path: Option<PathBuf>,
    /// Serialises writes of `path`.
    saving: Mutex<()>,
    /// This node's region, and every node's.
    region: Option<String>,
    regions: BTreeMap<u64, String>,
    /// A node of another region has accepted a request of this node's
    /// since it started.
    confirmed: AtomicBool,
}

impl Default for Fence {
    /// A fence that never refuses anything until it hears of a newer
    /// generation, and needs no confirmation: for a node with no peer
    /// transport, the simulator and tests.
    fn default() -> Self {
        Fence::new(None, None, BTreeMap::new(), 0, true)
    }
}

impl Fence {
    fn new(
        path: Option<PathBuf>,
        region: Option<String>,
        regions: BTreeMap<u64, String>,
        known: u64,
        confirmed: bool,
    ) -> Fence {
        Fence {
            inner: Arc::new(Inner {
                generation: AtomicU64::new(0),
                known: AtomicU64::new(known),
                path,
                saving: Mutex::new(()),
                region,
                regions,
                confirmed: AtomicBool::new(confirmed),
            }),
        }
    }

    /// The fence of a node in `region` (every node's region in `regions`),
    /// kept in `path`: what it heard before a restart still holds. It needs
    /// a node elsewhere to confirm it before it leads writes.
    pub fn open(path: &Path, region: Option<String>, regions: BTreeMap<u64, String>) -> std::io::Result<Fence> {
        let known = match std::fs::read_to_string(path) {
            Ok(text) => text.trim().parse().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Fence::new(Some(path.to_path_buf()), region, regions, known, false))
    }

    /// The fence of a node in `region` (every node's region in `regions`),
    /// kept in memory only: a simulated node's, whose machine keeps it
    /// across crashes (see [`Fence::restarted`]). It needs confirming, as
    /// [`Fence::open`]'s does.
    pub fn in_memory(region: Option<String>, regions: BTreeMap<u64, String>) -> Fence {
        Fence::new(None, region, regions, 0, false)
    }

    /// The fence this node has after a restart: what it heard of still
    /// holds, but no node elsewhere has confirmed it yet, and its copy's
    /// generation is its group's to set again. What [`Fence::open`] reads
    /// back from disk, for an in-memory fence.
    pub fn restarted(&self) -> Fence {
        let inner = &self.inner;
        Fence::new(inner.path.clone(), inner.region.clone(), inner.regions.clone(), self.known(), false)
    }

    /// What this node's requests carry.
    pub fn stamp(&self) -> Stamp {
        let generation = self.generation();
        Stamp { generation, known: self.known().max(generation) }
    }

    /// The generation of this node's copy.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn known(&self) -> u64 {
        self.inner.known.load(Ordering::Acquire)
    }

    /// Notes the generation of this node's copy (its group applied a new
    /// one, or a failover just founded it). The group keeps it current.
    pub fn set_generation(&self, generation: u64) {
        self.inner.generation.store(generation, Ordering::Release);
    }

    /// The newer generation this node has heard of, while its copy is older:
    /// then it is fenced.
    pub fn fenced_by(&self) -> Option<u64> {
        if domain::mutation::active(domain::mutation::Mutation::IgnoreFence) {
            return None;
        }
        let known = self.known();
        (known > self.generation()).then_some(known)
    }

    /// Whether node `node` is in a region other than this node's (a node
    /// the topology does not name counts as elsewhere).
    pub fn is_elsewhere(&self, node: u64) -> bool {
        self.inner.regions.get(&node).is_none_or(|region| Some(region) != self.inner.region.as_ref())
    }

    /// Whether a node of another region has accepted a request of this
    /// node's since it started.
    pub fn confirmed(&self) -> bool {
        if domain::mutation::active(domain::mutation::Mutation::IgnoreFence) {
            return true;
        }
        self.inner.confirmed.load(Ordering::Acquire)
    }

    /// A node elsewhere accepted one of this node's requests.
    pub fn confirm(&self) {
        self.inner.confirmed.store(true, Ordering::Release);
    }

    /// Hears how a request of this node's ended: a refusal for being
    /// fenced teaches the newer generation, and a node elsewhere
    /// (`elsewhere`) that accepted a request its fence checks (`checked`;
    /// see [`PeerBody::is_fenced`](crate::transport::PeerBody::is_fenced))
    /// confirms this node.
    pub fn heard(&self, elsewhere: bool, checked: bool, result: &Result<PeerResponse, TransportError>) {
        match result {
            Err(TransportError::Refused { refusal: Refusal::Fenced(generation), .. }) => self.learn(*generation),
            Ok(_) if elsewhere && checked => self.confirm(),
            _ => {}
        }
    }

    /// Checks a peer's request: learns the newest generation its stamp
    /// names, then refuses it (with the newest generation known here) if
    /// the sender's copy is older than that.
    pub fn admit(&self, stamp: Stamp) -> Result<(), u64> {
        self.learn(stamp.known.max(stamp.generation));
        let newest = self.known().max(self.generation());
        if stamp.generation < newest {
            return Err(newest);
        }
        Ok(())
    }

    /// Remembers that generation `generation` exists, on disk before it
    /// counts, so that a fenced node stays fenced through a restart. A
    /// fence that cannot be saved still holds in memory.
    pub fn learn(&self, generation: u64) {
        if generation <= self.known() {
            return;
        }
        let _saving = self.inner.saving.lock().unwrap_or_else(PoisonError::into_inner);
        if generation <= self.known() {
            return;
        }
        if let Some(path) = &self.inner.path {
            if let Err(error) = save(path, generation) {
                tracing::error!(%error, generation, "could not save the fence; it holds until this node stops");
            }
        }
        self.inner.known.store(generation, Ordering::Release);
        if generation > self.generation() {
            tracing::warn!(generation, own = self.generation(), "a newer generation exists: this node is fenced");
        }
    }
}

/// Writes `generation` to `path` durably: a temporary file, synced, renamed
/// over the old one, and the directory synced.
fn save(path: &Path, generation: u64) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    writeln!(file, "{generation}")?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_copies_are_refused_and_newer_generations_fence_this_node_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        let regions = BTreeMap::from([(1, "primary".to_string()), (6, "dr".to_string())]);
        let fence = Fence::open(&path, Some("primary".into()), regions.clone()).unwrap();
        assert!(fence.is_elsewhere(6) && !fence.is_elsewhere(1) && fence.is_elsewhere(9));
        assert!(!fence.confirmed());
        assert_eq!(fence.admit(Stamp { generation: 0, known: 0 }), Ok(()));
        assert_eq!(fence.fenced_by(), None);

        // The DR region failed over: its stamp fences this node...
        assert_eq!(fence.admit(Stamp { generation: 1, known: 1 }), Ok(()));
        assert_eq!(fence.fenced_by(), Some(1));
        assert_eq!(fence.stamp(), Stamp { generation: 0, known: 1 });
        // ...which now refuses its old peers, and they learn from its stamp.
        assert_eq!(fence.admit(Stamp { generation: 0, known: 0 }), Err(1));
        let peer = Fence::default();
        assert_eq!(peer.admit(fence.stamp()), Err(1));
        assert_eq!(peer.fenced_by(), Some(1));

        // A restart does not lift it; a copy of the new generation does.
        let reopened = Fence::open(&path, Some("primary".into()), regions).unwrap();
        assert_eq!(reopened.fenced_by(), Some(1));
        reopened.set_generation(1);
        assert_eq!(reopened.fenced_by(), None);
        assert_eq!(reopened.admit(Stamp { generation: 1, known: 1 }), Ok(()));
    }
}
