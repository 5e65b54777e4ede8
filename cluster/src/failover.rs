//! **Unplanned failover**: the region that takes writes is gone, and the
//! DR region takes over without it.
//!
//! [`preview`] says what that would cost right now: `GroupState::fail_over`
//! run on a clone of this node's applied state, which changes nothing.
//! Operators read it (`surge ctl failover --to dr`) to know their exposure
//! before a disaster.
//!
//! A **forced failover** (`surge ctl failover --to dr --force`) carries it
//! out, on the node of the DR region with the most advanced copy:
//!
//! 1. It refuses while any node of the writing region answers (that is a
//!    partition, not a lost region: a switchover is the tool), or while any
//!    node of its own region does not (the missing one may have the most
//!    advanced copy, which alone has every escrow grant the region
//!    confirmed), or while another node's copy is ahead of its own or
//!    equal to it with a lower id (so two failovers forced at once on two
//!    nodes cannot both go on), or
//!    while its copy holds no escrow grant: the writing region sold from
//!    all of its stock until its first one (at its start, and after a
//!    failback until the rejoined copy catches up past it), so nothing
//!    bounds what it sold that the copy lacks. A failover that stopped
//!    before step 4 may be forced again.
//! 2. It applies `fail_over` to a clone of its copy: escrowed units out of
//!    sale, the order ids the old primary may have used skipped, a new
//!    epoch, and a new **generation**.
//! 3. It learns the new generation in its fence (on disk) and tells every
//!    node of its region, so none of them accepts the old primary's
//!    messages from now on (see [`crate::fence`]). Each answers with where
//!    its log ends once its Raft has taken in every append the fence let
//!    through before ([`crate::transport::LogEnd`]).
//! 4. It founds a new group: openraft's `install_full_snapshot` installs
//!    the failed-over copy as a snapshot past the end of every log of the
//!    region and under a vote above every term its nodes have seen, with this node as the
//!    only voter and the region's other nodes as learners. It elects itself
//!    and replicates the snapshot to them.
//! 5. A probe shopper checks out until it works; the report holds what the
//!    failover cost (the [`FailoverPreview`] of the promoted copy) and how
//!    long after the command checkout worked again.
//!
//! The group a failover founds has no member in another region, so it sells
//! without escrow until failback gives it a DR copy again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, CommittedLeaderId, LogId, Membership, Snapshot, SnapshotMeta, StoredMembership, Vote};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::drill::{self, DrillReport, Outages, Probe, Timeline, PROBE_EVERY, SETTLE_MAX};
use crate::status::GroupStatus;
use crate::{DrillError, Node, ProposeError};

/// How long a node of either region gets to answer while a forced failover
/// checks who is reachable.
const ASK_FOR: Duration = Duration::from_secs(1);

/// How long a node of the region gets, once fenced, to take in the appends
/// already queued for its Raft and say where its log ends: a slow disk
/// takes a while. A failover that runs out of it may be forced again.
const LOG_END_MAX: Duration = Duration::from_secs(10);

/// A failover's cost, as computed from one node's copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailoverPreview {
    /// The node whose copy would be promoted.
    pub node: u64,
    /// Its region, which would take writes.
    pub region: String,
    /// The last log index its copy has applied: promote the node of the
    /// region with the highest.
    pub applied_index: u64,
    /// On a DR replica, how stale its copy may be: acknowledgements of the
    /// last this many milliseconds may be lost.
    pub stale_ms_max: Option<u64>,
    /// The generation it would found: the old primary's nodes, of a lower
    /// one, are fenced.
    pub generation: u64,
    /// The epoch it would take writes in.
    pub epoch: u64,
    /// Its copy's clock at its last entry.
    pub cut_at_ms: u64,
    /// Units each SKU would take out of sale until failback settles them.
    pub unsettled: BTreeMap<String, u64>,
    /// Their sum: the undersell bound.
    pub undersell_units: u64,
    /// Order ids the lost primary may have acknowledged that the copy
    /// lacks: from this one...
    pub orders_maybe_lost_from: u64,
    /// ...up to (not including) this one.
    pub orders_maybe_lost_to: u64,
    /// Orders pending payment in the copy, whose payment the lost primary
    /// may have taken.
    pub payments_in_doubt: Vec<u64>,
    /// Session ids the lost primary may have opened sessions with that the
    /// copy lacks (their tokens get 401 afterwards): from this one...
    pub sessions_maybe_lost_from: u64,
    /// ...up to (not including) this one.
    pub sessions_maybe_lost_to: u64,
    /// Whether the copy holds an escrow grant, which makes the figures
    /// above a bound. Without one a forced failover is refused
    /// (`409 copy-unbounded`).
    pub bounded: bool,
}

/// The preview from `node`'s copy. Refused on a node of the region that
/// takes writes: it has nothing to fail over from.
pub fn preview(node: &Node) -> Result<FailoverPreview, DrillError> {
    let region = node.topology().node(node.id()).map(|spec| spec.region.clone()).unwrap_or_default();
    if region == node.primary_region() {
        return Err(DrillError::AlreadyPrimary(region));
    }
    let (mut copy, applied_index) = node.group().read_local_at(Clone::clone);
    let bounded = copy.escrow_is_on();
    let cost = copy.fail_over(&region);
    Ok(FailoverPreview::of(node, applied_index, bounded, cost))
}

impl FailoverPreview {
    /// Whether the report names `order`: as an id the lost primary may
    /// have acknowledged, or as an order whose payment is in doubt.
    pub fn names(&self, order: u64) -> bool {
        (self.orders_maybe_lost_from..self.orders_maybe_lost_to).contains(&order)
            || self.payments_in_doubt.contains(&order)
    }

    /// Whether the report names `session` as one the lost primary may have
    /// opened after the cut.
    pub fn names_session(&self, session: u64) -> bool {
        (self.sessions_maybe_lost_from..self.sessions_maybe_lost_to).contains(&session)
    }

    fn of(node: &Node, applied_index: u64, bounded: bool, cost: domain::Failover) -> FailoverPreview {
        FailoverPreview {
            node: node.id(),
            region: cost.region,
            applied_index,
            stale_ms_max: node.group().stale_ms_max(),
            generation: cost.generation,
            epoch: cost.epoch,
            cut_at_ms: cost.cut_at_ms,
            undersell_units: cost.unsettled.values().sum(),
            unsettled: cost.unsettled,
            orders_maybe_lost_from: cost.orders_maybe_lost.start,
            orders_maybe_lost_to: cost.orders_maybe_lost.end,
            payments_in_doubt: cost.payments_in_doubt,
            sessions_maybe_lost_from: cost.sessions_maybe_lost.start,
            sessions_maybe_lost_to: cost.sessions_maybe_lost.end,
            bounded,
        }
    }
}

/// What a forced failover found when it was planned.
pub(crate) struct Plan {
    /// The region that takes writes now, lost.
    lost: String,
    /// Every node of this node's region, with its status.
    region_nodes: BTreeMap<u64, GroupStatus>,
}

/// Checks that this node may force a failover to its region `to` now (see the
/// module documentation), records it as running, and returns its first
/// report.
pub(crate) async fn plan(node: &Node, to: &str, requested_by: &str) -> Result<(DrillReport, Plan), DrillError> {
    let topology = node.topology();
    if !topology.nodes.iter().any(|spec| spec.region == to) {
        return Err(DrillError::UnknownRegion(to.to_string()));
    }
    let region = topology.node(node.id()).map(|spec| spec.region.clone()).unwrap_or_default();
    if region != to {
        return Err(DrillError::OutsideRegion { region: to.to_string(), node: node.id() });
    }
    let lost = node.primary_region();
    if region == lost {
        return Err(DrillError::AlreadyPrimary(region));
    }
    // A failover of this node's that stopped before it founded its group
    // (a node of the region stopped answering while it was told) leaves
    // this node fenced by the generation it meant to found; it may try
    // again as long as no copy of that generation exists.
    let own_generation = node.read_local(domain::GroupState::generation);
    let fenced = node.group().fence().fenced_by();
    if let Some(generation) = fenced.filter(|&generation| generation != own_generation + 1) {
        return Err(DrillError::Fenced(generation));
    }
    let ask = |id: u64| async move {
        let status = tokio::time::timeout(ASK_FOR, node.node_status(id)).await;
        (id, status.ok().and_then(Result::ok).and_then(|status| status.groups.into_iter().next()))
    };
    let writing = topology.nodes.iter().filter(|spec| spec.region == lost).map(|spec| ask(spec.id));
    let answering: Vec<u64> =
        futures::future::join_all(writing).await.into_iter().filter_map(|(id, status)| status.map(|_| id)).collect();
    if !answering.is_empty() {
        return Err(DrillError::PrimaryReachable { region: lost, nodes: answering });
    }
    let own = topology.nodes.iter().filter(|spec| spec.region == region).map(|spec| ask(spec.id));
    let mut region_nodes = BTreeMap::new();
    for (id, status) in futures::future::join_all(own).await {
        region_nodes.insert(id, status.ok_or(DrillError::CopyUnreachable(id))?);
    }
    if let Some(generation) = fenced.filter(|&g| region_nodes.values().any(|status| status.generation >= g)) {
        return Err(DrillError::Fenced(generation));
    }
    // The most advanced copy, and of equal ones (the same applied index is
    // the same copy) the lowest id: failovers forced on two nodes at once
    // cannot both pass, and found two groups of one generation.
    let mine = region_nodes.get(&node.id()).map_or(0, |status| status.applied_index);
    let first = |id: u64, applied: u64| (applied, std::cmp::Reverse(id)) > (mine, std::cmp::Reverse(node.id()));
    if let Some((&ahead, status)) = region_nodes.iter().find(|(&id, status)| first(id, status.applied_index)) {
        return Err(DrillError::CopyBehind { node: ahead, applied_index: status.applied_index, own: mine });
    }
    // Escrow bounds what the lost region sold that this copy lacks; until
    // the copy holds a grant, nothing does (`GroupState::fail_over`).
    if !node.read_local(domain::GroupState::escrow_is_on) {
        return Err(DrillError::CopyUnbounded { generation: own_generation, region: lost });
    }
    let report = DrillReport {
        nodes: region_nodes.keys().copied().collect(),
        region: Some(region),
        ..DrillReport::started("failover", node.id(), requested_by, node.clock_ms())
    };
    node.drills().begin(report.clone())?;
    Ok((report, Plan { lost, region_nodes }))
}

/// Carries a planned forced failover out and records its report.
pub(crate) async fn run(node: Node, id: u64, plan: Plan) {
    let log = Timeline::new(&node, id);
    let outcome = match promote(&node, &log, &plan).await {
        Ok(()) => resume(&node, &log, id).await,
        Err(why) => Err(why),
    };
    drill::finish(&node, id, outcome).await;
}

/// Steps 2 to 4: fail the copy over, fence, found the new group.
async fn promote(node: &Node, log: &Timeline, plan: &Plan) -> Result<(), String> {
    let region = node.topology().node(node.id()).map(|spec| spec.region.clone()).unwrap_or_default();
    log.note(format!("region {:?} does not answer; failing over to {region:?}", plan.lost));
    let group = node.group();
    let (mut state, applied_index) = group.read_local_at(Clone::clone);
    let bounded = state.escrow_is_on();
    let cost = state.fail_over(&region);
    let generation = cost.generation;
    let preview = FailoverPreview::of(node, applied_index, bounded, cost);
    log.note(format!(
        "promoting node {}'s copy at log index {applied_index} ({}): {} units out of sale, \
         order ids {}..{} may be lost, {} payments in doubt",
        node.id(),
        preview.stale_ms_max.map_or("a voter: it had every entry it acknowledged".into(), |ms| format!(
            "a replica, stale by at most {ms} ms"
        )),
        preview.undersell_units,
        preview.orders_maybe_lost_from,
        preview.orders_maybe_lost_to,
        preview.payments_in_doubt.len()
    ));
    log.update(|report| report.failover = Some(preview));

    // Each node of the region learns the generation from the question's
    // stamp, and answers only once Raft has taken in every append its fence
    // let through before: the plan's status may predate some, still queued
    // behind a slow disk, and the new group must be founded past them all.
    // A node holding an old-generation entry at or beyond the founding index
    // would take the new group's log for its own.
    group.fence().learn(generation);
    let mut ends = Vec::new();
    for &peer in plan.region_nodes.keys() {
        match node.log_end(peer, LOG_END_MAX).await {
            Ok(end) => ends.push(end),
            Err(ProposeError::Timeout) => {
                return Err(format!("node {peer}'s log did not settle within {LOG_END_MAX:?} of the fence"))
            }
            Err(error) => return Err(format!("telling node {peer} of generation {generation}: {error}")),
        }
    }
    log.note(format!("generation {generation} fences the old primary on every node of {region:?}"));

    let term = ends.iter().map(|end| end.term).max().unwrap_or(0) + 1;
    let index = ends.iter().filter_map(|end| end.last_log.map(|id| id.index)).max().unwrap_or(0) + 1;
    // Node 0 names no node: the vote only has to outrank every earlier one.
    let log_id = LogId::new(CommittedLeaderId::new(term, 0), index);
    let nodes: BTreeMap<u64, BasicNode> = plan
        .region_nodes
        .keys()
        .filter_map(|id| node.topology().node(*id).map(|spec| (*id, BasicNode::new(spec.peer.clone()))))
        .collect();
    let membership = Membership::new(vec![BTreeSet::from([node.id()])], nodes);
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), membership),
        snapshot_id: format!("failover-{generation}"),
    };
    let data = storage::codec::encode(&state).map_err(|e| format!("encoding the failed-over copy: {e}"))?;
    let snapshot = Snapshot { meta, snapshot: Box::new(std::io::Cursor::new(data)) };
    group
        .raft()
        .install_full_snapshot(Vote::new_committed(term, 0), snapshot)
        .await
        .map_err(|e| format!("installing the failed-over copy: {e}"))?;
    group.fence().set_generation(generation);
    log.note(format!("new group founded at log index {index}, term {term}: node {} votes alone", node.id()));

    let deadline = Instant::now() + SETTLE_MAX;
    while !group.is_leader() {
        if Instant::now() > deadline {
            return Err("the promoted node did not elect itself".into());
        }
        // Ignored if it campaigns already.
        let _ = group.campaign().await;
        tokio::time::sleep(PROBE_EVERY * 5).await;
    }
    log.note(format!("node {} leads generation {generation}", node.id()));
    Ok(())
}

/// Step 5: probe checkout until it works, then read the probe orders back.
async fn resume(node: &Node, log: &Timeline, id: u64) -> Result<(), String> {
    let started = Instant::now();
    let mut probe = Probe::open(node, id).await?;
    let mut outages = Outages::default();
    while outages.acknowledged.is_empty() {
        if started.elapsed() > SETTLE_MAX {
            return Err("checkout did not work after the failover".into());
        }
        outages.probe(&mut probe, log).await;
        if outages.acknowledged.is_empty() {
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
    let resumed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    log.note(format!("checkout works in the new generation, {resumed_ms} ms after the new group was led"));
    drill::audit(node, log, &outages.acknowledged).await
}
