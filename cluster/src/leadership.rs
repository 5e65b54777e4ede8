//! Moving a group's leadership to a chosen node, on openraft 0.9, which
//! cannot hand it over itself.
//!
//! 1. Every voter but the leader and the target stops campaigning.
//! 2. The leader falls silent: no heartbeats, writes refused (503, retried).
//! 3. Once the voters' leader lease (one election timeout) has run out, the
//!    target campaigns. It is the only candidate, and a caught-up follower's
//!    log is as complete as any majority's, so it wins.
//! 4. The holds are lifted. Each also lifts by itself at the end of its
//!    window, so a coordinator that dies mid-transfer leaves nothing stuck.
//!
//! Writes are refused for about one election timeout: a planned transfer
//! costs about what an unplanned failover does, without losing anything.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::node::Node;
use crate::transport::PeerBody;
use crate::ProposeError;

/// What a transfer did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaderMoved {
    /// The group.
    pub group: u32,
    /// Its leader before.
    pub from: u64,
    /// Its leader now.
    pub to: u64,
    /// From the start of the transfer until the target led.
    pub took_ms: u64,
}

/// Why leadership did not move.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// No such node in the topology.
    #[error("node {0} is not in the cluster")]
    UnknownNode(u64),
    /// The target never campaigns (a tiebreaker outside the primary region).
    #[error("node {0} is a tiebreaker outside the primary region and never leads")]
    MayNotLead(u64),
    /// No leader to move leadership from.
    #[error("the group has no leader now; try again")]
    NoLeader,
    /// A step failed or the target did not win in time; the old leader
    /// resumes (or another node is elected) when the holds lift.
    #[error("the transfer failed: {0}")]
    Failed(String),
}

/// Moves group 0's leadership to node `to`; see the module docs.
pub(crate) async fn transfer(node: &Node, to: u64, lease: Duration) -> Result<LeaderMoved, TransferError> {
    let topology = node.topology();
    if topology.node(to).is_none() {
        return Err(TransferError::UnknownNode(to));
    }
    if !topology.may_lead(to) {
        return Err(TransferError::MayNotLead(to));
    }
    let started = Instant::now();
    let from = node.status().groups.first().and_then(|g| g.leader).ok_or(TransferError::NoLeader)?;
    if from == to {
        return Ok(LeaderMoved { group: 0, from, to, took_ms: 0 });
    }
    // Long enough for the lease to lapse and an election or two to finish.
    let window = lease * 4 + Duration::from_millis(500);
    let for_ms = window.as_millis() as u64;
    let others: Vec<u64> = topology.nodes.iter().map(|n| n.id).filter(|id| *id != from && *id != to).collect();
    let failed = |what: &str, error: ProposeError| TransferError::Failed(format!("{what}: {error}"));

    for &other in &others {
        // A voter that cannot be reached cannot win an election either.
        let _ = node.transfer_step(other, PeerBody::HoldElections { for_ms }).await;
    }
    node.transfer_step(from, PeerBody::Abdicate { for_ms }).await.map_err(|e| failed("silencing the leader", e))?;
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    node.transfer_step(to, PeerBody::Campaign).await.map_err(|e| failed("starting the election", e))?;

    let deadline = started + window;
    let won = loop {
        let leads = node.node_status(to).await.ok().and_then(|s| s.groups.first().map(|g| g.role == "leader"));
        if leads == Some(true) {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Lift the holds now rather than at the end of the window.
    let _ = node.transfer_step(from, PeerBody::Abdicate { for_ms: 0 }).await;
    for &other in &others {
        let _ = node.transfer_step(other, PeerBody::HoldElections { for_ms: 0 }).await;
    }
    match won {
        true => Ok(LeaderMoved { group: 0, from, to, took_ms: started.elapsed().as_millis() as u64 }),
        false => Err(TransferError::Failed(format!("node {to} did not win the election within {window:?}"))),
    }
}
