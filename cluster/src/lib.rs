//! Surge's Raft groups, the actors that propose to them, and routing.
//!
//! **Architecture invariant:** `cluster` makes no business decision. Whether a
//! checkout succeeds is decided by `domain::GroupState::apply` on every
//! replica; this crate decides only which log entry a command travels in and
//! when.
//!
//! A node runs one group: alone as its single voter (see [`network`]), or
//! as one of the topology's voters over the mutual-TLS [`transport`]. The
//! same [`Node`] runs in the simulator over a simulated network and disk.

pub mod actors;
pub mod clock;
pub mod drill;
pub mod escrow;
pub mod failback;
pub mod failover;
pub mod fence;
pub mod group;
pub mod leadership;
pub mod network;
mod node;
pub mod ports;
mod read_rounds;
pub mod replace;
pub mod status;
pub mod switchover;
pub mod topology;
pub mod transport;

pub use actors::{ActorLimits, Router};
pub use clock::{Clock, SystemClock};
pub use drill::{DrillError, DrillEvent, DrillReport};
pub use failover::FailoverPreview;
pub use group::{Group, GroupConfig};
pub use leadership::{LeaderMoved, TransferError};
pub use node::{Node, NodeConfig, TlsFiles};
pub use status::{GroupStatus, NodeStatus, ReplicaLag};
pub use topology::{NodeSpec, Role, Topology, TopologyError};

/// Why a command got no outcome from the state machine. None of these says
/// the command did not apply except `Overloaded` and `NotLeader`: after a
/// `Timeout` or `Unavailable` it may or may not have, so clients retry with
/// the same idempotency key.
///
/// It crosses the wire as it is when a follower forwards to the leader, so
/// the forwarding node answers its client exactly as the leader would have.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// A mailbox or queue is full: back off and retry.
    #[error("overloaded")]
    Overloaded,
    /// No outcome arrived in time.
    #[error("timed out waiting for the outcome")]
    Timeout,
    /// This node does not lead the group.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<u64>,
    },
    /// Raft or storage failed; the message says how.
    #[error("unavailable: {0}")]
    Unavailable(String),
}
