//! **Failback after a forced failover**: the lost primary region is back;
//! settle what the two regions disagree on, then make it the DR copy again.
//!
//! `surge ctl failback --from primary` asks the group's leader (in the
//! promoted region). It does what is due of two steps:
//!
//! 1. **Reconcile**, once per failover. Every node of the returning region
//!    must answer with its copy, none wiped yet: every order the lost
//!    primary acknowledged is in the logs of a majority of its voters, and
//!    the most up-to-date log holds them all: the one with the highest
//!    last term, then the longest, as Raft compares logs for a vote (a
//!    longer log can be a deposed leader's tail, lacking entries a later
//!    leader committed). That node's copy is
//!    read whole, with every entry of its log applied, committed or not
//!    (after a crash a node may know less as committed than its leader
//!    acknowledged, and fenced, it has no leader to tell it), and compared
//!    with this one (`GroupState::reconcile`): the orders the two disagree on go into
//!    the report for an operator to settle, and the units the failover took
//!    out of sale that nobody bought go back on sale (`SettleFailover`).
//!
//!    A node whose disk is gone for good never answers with its copy. The
//!    operator may name it (`copies_lost`): the reconciliation then reads
//!    the most up-to-date of the other copies, if any, and lists what that
//!    one has, but returns no unit to sale and keeps every payment in doubt
//!    in doubt (`GroupState::reconcile_without`): what only the lost copies
//!    knew is unknown, so the failover's undersell stays. Without this, a
//!    region destroyed for ever could never be a DR copy again.
//! 2. **Rejoin**: returning nodes whose data the operator has wiped (and
//!    that started with `join = true`, so none founds a cluster of its own)
//!    join the group as learners and receive its snapshot. The group has a
//!    copy in another region again, so escrow resumes; a planned switchover
//!    then moves the sale back.
//!
//! A returning node that still holds the lost primary's copy cannot join:
//! its log runs past the new group's, and Raft would not overwrite
//! committed entries. Reconcile first, then wipe it.

use std::collections::BTreeMap;
use std::time::Duration;

use domain::{GroupState, Outcome};
use openraft::BasicNode;
use tokio::time::Instant;

use crate::drill::{self, DrillReport, Timeline, SETTLE_MAX};
use crate::status::GroupStatus;
use crate::{DrillError, Node};

/// How long each node of the returning region gets to answer.
const ASK_FOR: Duration = Duration::from_secs(1);

/// What a failback found to do when it was planned.
pub(crate) struct Plan {
    /// Whether reconciling is due, and with which copies.
    reconcile: Option<Reconcile>,
    /// Returning nodes with wiped data, to add as learners.
    rejoin: Vec<u64>,
}

/// The copies a reconciliation reads, and those it goes without.
#[derive(Debug, PartialEq, Eq)]
struct Reconcile {
    /// The returning node with the most up-to-date copy, if any copy is
    /// left to read.
    from: Option<u64>,
    /// Returning nodes whose copies the operator declared lost for good
    /// and that did not answer with one: empty for a complete
    /// reconciliation.
    lost: Vec<u64>,
}

/// Checks that this node may fail back from `from` now, records the
/// failback as running, and returns its first report. `copies_lost` are
/// returning nodes whose disks the operator says are gone for good: the
/// reconciliation goes without them (see [`GroupState::reconcile_without`]).
pub(crate) async fn plan(
    node: &Node,
    from: &str,
    copies_lost: &[u64],
    requested_by: &str,
) -> Result<(DrillReport, Plan), DrillError> {
    let topology = node.topology();
    let returning: Vec<u64> = topology.nodes.iter().filter(|spec| spec.region == from).map(|spec| spec.id).collect();
    if returning.is_empty() {
        return Err(DrillError::UnknownRegion(from.to_string()));
    }
    if let Some(&stranger) = copies_lost.iter().find(|id| !returning.contains(id)) {
        return Err(DrillError::NotOfRegion { node: stranger, region: from.to_string() });
    }
    if node.primary_region() == from {
        return Err(DrillError::AlreadyPrimary(from.to_string()));
    }
    let status = node.group().status();
    if status.role != "leader" {
        return Err(DrillError::NotLeader { leader: status.leader });
    }
    let (generation, settled) = node.read_local(|state| (state.generation(), state.failover_settled()));
    if generation == 0 {
        return Err(DrillError::NoFailover);
    }
    let ask = |id: u64| async move {
        let status = tokio::time::timeout(ASK_FOR, node.node_status(id)).await;
        (id, status.ok().and_then(Result::ok).and_then(|status| status.groups.into_iter().next()))
    };
    let answers: BTreeMap<u64, Option<GroupStatus>> =
        futures::future::join_all(returning.iter().map(|&id| ask(id))).await.into_iter().collect();
    let members = node.group().members();
    let wiped = |status: &GroupStatus| status.generation == 0 && status.last_log_index == 0;

    let reconcile = if settled { None } else { Some(copies_to_read(&answers, generation, copies_lost)?) };
    let rejoin: Vec<u64> = answers
        .iter()
        .filter(|(id, status)| !members.contains(id) && status.as_ref().is_some_and(wiped))
        .map(|(id, _)| *id)
        .collect();
    if reconcile.is_none() && rejoin.is_empty() {
        let why = format!("the failover is settled, and no node of {from:?} has wiped data to rejoin with");
        return Err(DrillError::NothingToFailBack(why));
    }
    let report = DrillReport {
        nodes: returning,
        region: Some(from.to_string()),
        ..DrillReport::started("failback", node.id(), requested_by, node.clock_ms())
    };
    node.drills().begin(report.clone())?;
    Ok((report, Plan { reconcile, rejoin }))
}

/// Which copies of the returning region a reconciliation reads, from
/// their nodes' `answers` (`None`: no answer). Every copy counts: the most
/// up-to-date log holds every order the lost primary acknowledged, and
/// another may lack some. So every node must answer with its copy intact,
/// but those in `copies_lost` that do not.
fn copies_to_read(
    answers: &BTreeMap<u64, Option<GroupStatus>>,
    generation: u64,
    copies_lost: &[u64],
) -> Result<Reconcile, DrillError> {
    let holds_old_copy = |status: &GroupStatus| status.generation < generation && status.last_log_index > 0;
    let mut lost = Vec::new();
    for (&id, status) in answers {
        if !status.as_ref().is_some_and(holds_old_copy) {
            if !copies_lost.contains(&id) {
                return Err(DrillError::CopyUnreachable(id));
            }
            lost.push(id);
        }
    }
    let from = most_up_to_date(
        answers.iter().filter_map(|(&id, status)| status.as_ref().filter(|s| holds_old_copy(s)).map(|s| (id, s))),
    );
    Ok(Reconcile { from, lost })
}

/// The node whose log is the most up to date, as Raft compares logs for a
/// vote (highest last term, then longest), and of those the most applied:
/// it holds every entry the group committed.
fn most_up_to_date<'a>(copies: impl Iterator<Item = (u64, &'a GroupStatus)>) -> Option<u64> {
    copies.max_by_key(|(id, s)| (s.last_log_term, s.last_log_index, s.applied_index, *id)).map(|(id, _)| id)
}

/// Carries a planned failback out and records its report.
pub(crate) async fn run(node: Node, id: u64, plan: Plan) {
    let log = Timeline::new(&node, id);
    let outcome = async {
        if let Some(copies) = plan.reconcile {
            reconcile(&node, &log, copies).await?;
        }
        if !plan.rejoin.is_empty() {
            rejoin(&node, &log, &plan.rejoin).await?;
        }
        Ok(())
    };
    let outcome = outcome.await;
    drill::finish(&node, id, outcome).await;
}

/// Step 1: compare the most up-to-date copy with this one, report the
/// orders to settle, and put the units nobody bought back on sale; with
/// copies lost, none.
async fn reconcile(node: &Node, log: &Timeline, copies: Reconcile) -> Result<(), String> {
    let old: Option<GroupState> = match copies.from {
        Some(source) => Some(node.copy_of(source).await.map_err(|e| format!("reading node {source}'s copy: {e}"))?),
        None => None,
    };
    let source = copies.from.map_or("no copy".to_string(), |id| format!("node {id}'s copy"));
    if !copies.lost.is_empty() {
        log.note(format!(
            "the copies of nodes {:?} are lost for good: orders only they knew are not listed, no unit goes back \
             on sale, every payment in doubt stays in doubt",
            copies.lost
        ));
    }
    let (generation, reconciliation) = node
        .read(|state| {
            let reconciliation = match &old {
                Some(old) if copies.lost.is_empty() => state.reconcile(old),
                old => state.reconcile_without(old.as_ref(), copies.lost),
            };
            (state.generation(), reconciliation)
        })
        .await
        .map_err(|e| format!("reading this region's copy: {e}"))?;
    log.note(format!(
        "{source} against generation {generation}: {} orders to settle, units sold there only {:?}, \
         units back on sale {:?}, payments kept in doubt {:?}",
        reconciliation.orders_to_settle.len(),
        reconciliation.units_sold_there,
        reconciliation.units_returned,
        reconciliation.kept_in_doubt
    ));
    let settle = reconciliation.settlement(generation);
    match node.operator(settle).await {
        Ok(Outcome::Settled { replayed: false, .. }) => {}
        Ok(Outcome::Settled { replayed: true, .. }) => log.note("settled already: nothing returned now"),
        Ok(other) => return Err(format!("the settlement was refused: {other:?}")),
        Err(error) => return Err(format!("the settlement did not commit: {error}")),
    }
    log.update(|report| report.reconciliation = Some(reconciliation));
    log.note(format!("generation {generation} settled"));
    Ok(())
}

/// Step 2: add the wiped nodes as learners and wait until they have the
/// whole log.
async fn rejoin(node: &Node, log: &Timeline, nodes: &[u64]) -> Result<(), String> {
    let raft = node.group().raft();
    for &id in nodes {
        let peer = node.topology().node(id).map(|spec| spec.peer.clone()).ok_or(format!("node {id} has no address"))?;
        raft.add_learner(id, BasicNode::new(peer), false).await.map_err(|e| format!("adding node {id}: {e}"))?;
    }
    log.note(format!("nodes {nodes:?} join as learners"));
    let started = Instant::now();
    loop {
        let lag = node.group().status().replica_lag;
        let behind: Vec<u64> =
            nodes.iter().copied().filter(|id| lag.get(id).is_none_or(|lag| lag.entries > 0)).collect();
        if behind.is_empty() {
            log.update(|report| report.caught_up_ms = Some(started.elapsed().as_millis() as u64));
            log.note(format!("nodes {nodes:?} have the whole log: the region is a DR copy again"));
            return Ok(());
        }
        if started.elapsed() > SETTLE_MAX {
            return Err(format!("nodes {behind:?} did not catch up within {SETTLE_MAX:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(last_log_term: u64, last_log_index: u64, applied_index: u64) -> GroupStatus {
        GroupStatus { last_log_term, last_log_index, applied_index, ..GroupStatus::default() }
    }

    #[test]
    fn failback_reconciles_with_the_log_a_later_leader_wrote_not_the_longest() {
        // Node 1 led term 2 and logged 100 entries before it was deposed;
        // node 2 then led term 3, committed up to 90 on nodes 2 and 3, and
        // acknowledged it. Node 1's longer log lacks entries 81 to 90 of
        // term 3.
        let (deposed, later, follower) = (copy(2, 100, 80), copy(3, 90, 90), copy(3, 88, 88));
        let copies = [(1, &deposed), (2, &later), (3, &follower)];
        assert_eq!(most_up_to_date(copies.into_iter()), Some(2));
        // Of logs that end alike, the one applied furthest.
        let (behind, ahead) = (copy(3, 90, 85), copy(3, 90, 90));
        assert_eq!(most_up_to_date([(5, &ahead), (6, &behind)].into_iter()), Some(5));
        assert_eq!(most_up_to_date(std::iter::empty()), None);
    }

    #[test]
    fn a_reconciliation_goes_without_a_copy_only_when_the_operator_names_it_lost() {
        // After the failover to generation 1: nodes 1 and 2 came back with
        // the lost primary's copy, node 3 came back empty, node 4 is down.
        let old = |applied| GroupStatus { generation: 0, ..copy(2, applied, applied) };
        let answers = BTreeMap::from([(1, Some(old(90))), (2, Some(old(95))), (3, Some(copy(0, 0, 0))), (4, None)]);
        let copies = |lost: &[u64]| copies_to_read(&answers, 1, lost);

        // Every copy counts: an empty or silent node blocks reconciling...
        assert!(matches!(copies(&[]), Err(DrillError::CopyUnreachable(3))));
        assert!(matches!(copies(&[3]), Err(DrillError::CopyUnreachable(4))));
        // ...until the operator says its disk is gone for good.
        assert_eq!(copies(&[3, 4]).unwrap(), Reconcile { from: Some(2), lost: vec![3, 4] });
        // A node named lost whose copy answers is read all the same.
        assert_eq!(copies(&[2, 3, 4]).unwrap(), Reconcile { from: Some(2), lost: vec![3, 4] });
        let whole = BTreeMap::from([(1, Some(old(90))), (2, Some(old(95)))]);
        assert_eq!(copies_to_read(&whole, 1, &[1]).unwrap(), Reconcile { from: Some(2), lost: vec![] });
        // With every disk lost, no copy is read.
        let empty = BTreeMap::from([(1, Some(copy(0, 0, 0))), (2, None)]);
        assert_eq!(copies_to_read(&empty, 1, &[1, 2]).unwrap(), Reconcile { from: None, lost: vec![1, 2] });
    }
}
