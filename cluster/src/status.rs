//! What a node reports about itself and its groups: the raw material of
//! `surge ctl status` and of a drill's "has everyone caught up" check.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One node's view of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeStatus {
    /// The node's Raft id.
    pub node_id: u64,
    /// Milliseconds left of a drill's isolation, while the node is cut off.
    pub isolated_for_ms: Option<u64>,
    /// Every group the node runs, by group id.
    pub groups: Vec<GroupStatus>,
}

/// How far a DR replica's copy is behind the leader's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplicaLag {
    /// Entries in the leader's log the replica has not stored.
    pub entries: u64,
    /// Milliseconds since the replica last had every entry of the leader's
    /// log: the writes of that long may be missing from the DR copy.
    pub ms: u64,
}

/// One group as one of its replicas sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupStatus {
    /// The group's id.
    pub group: u32,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// The leader this replica knows of.
    pub leader: Option<u64>,
    /// The replica's current term.
    pub term: u64,
    /// The last index in the replica's log.
    pub last_log_index: u64,
    /// The term of that last entry. A log is more up to date than another
    /// if its last term is higher, or equal and it is longer: Raft's rule
    /// for a vote, under which the most up-to-date log holds every
    /// committed entry.
    #[serde(default)]
    pub last_log_term: u64,
    /// The last index the replica has applied to its state machine.
    pub applied_index: u64,
    /// The last index in the replica's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// On the leader: the highest index a quorum of voters has stored. It
    /// may run ahead of Raft's commit index by entries of an earlier term,
    /// which Raft commits only with the first entry of the current one.
    pub commit_index: Option<u64>,
    /// On the leader: how many entries each other voter is behind the
    /// leader's log (an unreachable voter's lag grows with every write).
    pub follower_lag: BTreeMap<u64, u64>,
    /// On the leader: how far each DR replica is behind (see [`ReplicaLag`]).
    #[serde(default)]
    pub replica_lag: BTreeMap<u64, ReplicaLag>,
    /// On a DR replica: its copy holds every write the primary committed
    /// up to at most this many milliseconds ago (`None` until it has heard
    /// from a leader). Reads served from the copy say so.
    #[serde(default)]
    pub stale_ms_max: Option<u64>,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
    /// On the leader: whether it has gone without a quorum's
    /// acknowledgement for longer than an election timeout. Such a leader
    /// refuses writes and reads at once instead of letting them hang.
    pub cut_off: bool,
    /// The generation of this replica's copy: raised by every forced
    /// failover (see `cluster::fence`).
    #[serde(default)]
    pub generation: u64,
    /// A newer generation this replica has heard of: it is fenced and takes
    /// no writes.
    #[serde(default)]
    pub fenced_by: Option<u64>,
}
