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
    /// The target never campaigns: it is not a voter in the region that
    /// takes writes (a tiebreaker, a DR replica).
    #[error("node {0} is not a voter in the region that takes writes: it never leads")]
    MayNotLead(u64),
    /// No leader to move leadership from.
    #[error("the group has no leader now; try again")]
    NoLeader,
    /// A step failed or the target did not win in time; the old leader
    /// resumes (or another node is elected) when the holds lift.
    #[error("the transfer failed: {0}")]
    Failed(String),
}

/// A target this many entries behind the leader cannot win an election
/// soon; the transfer is refused rather than stalling writes for a window.
const TARGET_LAG_MAX: u64 = 1_000;

/// Moves group 0's leadership to node `to`; see the module docs. One
/// transfer at a time per coordinating node (`busy`).
pub(crate) async fn transfer(
    node: &Node,
    to: u64,
    lease: Duration,
    busy: &std::sync::atomic::AtomicBool,
) -> Result<LeaderMoved, TransferError> {
    use std::sync::atomic::Ordering;
    let topology = node.topology();
    if topology.node(to).is_none() {
        return Err(TransferError::UnknownNode(to));
    }
    if !node.may_lead(to) {
        return Err(TransferError::MayNotLead(to));
    }
    if busy.swap(true, Ordering::SeqCst) {
        return Err(TransferError::Failed("another transfer is under way on this node".into()));
    }
    let moved = hand_over(node, to, lease).await;
    busy.store(false, Ordering::SeqCst);
    moved
}

async fn hand_over(node: &Node, to: u64, lease: Duration) -> Result<LeaderMoved, TransferError> {
    let started = Instant::now();
    let from = node.status().groups.first().and_then(|g| g.leader).ok_or(TransferError::NoLeader)?;
    if from == to {
        return Ok(LeaderMoved { group: 0, from, to, took_ms: 0 });
    }
    let failed = |what: &str, error: ProposeError| TransferError::Failed(format!("{what}: {error}"));
    let leader = node.node_status(from).await.map_err(|e| failed("asking the leader", e))?;
    let lag = leader.groups.first().and_then(|g| g.follower_lag.get(&to).copied());
    match lag {
        Some(lag) if lag <= TARGET_LAG_MAX => {}
        Some(lag) => return Err(TransferError::Failed(format!("node {to} is {lag} entries behind; try again later"))),
        None => return Err(TransferError::Failed(format!("node {from} no longer leads"))),
    }
    // Long enough for the lease to lapse and an election or two to finish.
    let window = lease * 4 + Duration::from_millis(500);
    let others: Vec<u64> = node.topology().nodes.iter().map(|n| n.id).filter(|id| *id != from && *id != to).collect();
    let won = campaign_alone(node, from, to, &others, lease, window, started).await;
    // Lift the holds now, whatever happened, rather than at the end of the
    // window: a failed transfer must not leave writes refused.
    let _ = node.transfer_step(from, PeerBody::Abdicate { for_ms: 0 }).await;
    for &other in &others {
        let _ = node.transfer_step(other, PeerBody::HoldElections { for_ms: 0 }).await;
    }
    won.map(|()| LeaderMoved { group: 0, from, to, took_ms: started.elapsed().as_millis() as u64 })
}

/// Steps 1 to 3 of the module docs; `Ok` once `to` leads.
async fn campaign_alone(
    node: &Node,
    from: u64,
    to: u64,
    others: &[u64],
    lease: Duration,
    window: Duration,
    started: Instant,
) -> Result<(), TransferError> {
    let for_ms = window.as_millis() as u64;
    let failed = |what: &str, error: ProposeError| TransferError::Failed(format!("{what}: {error}"));
    // A voter that cannot be reached cannot win an election either.
    let holds = others.iter().map(|&other| node.transfer_step(other, PeerBody::HoldElections { for_ms }));
    futures::future::join_all(holds).await;
    node.transfer_step(from, PeerBody::Abdicate { for_ms }).await.map_err(|e| failed("silencing the leader", e))?;
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    node.transfer_step(to, PeerBody::Campaign).await.map_err(|e| failed("starting the election", e))?;
    let deadline = started + window;
    loop {
        let leads = node.node_status(to).await.ok().and_then(|s| s.groups.first().map(|g| g.role == "leader"));
        if leads == Some(true) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TransferError::Failed(format!("node {to} did not win the election within {window:?}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
