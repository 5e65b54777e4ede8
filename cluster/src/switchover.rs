//! **Planned switchover**: the region that takes writes moves, with nothing
//! acknowledged lost.
//!
//! 0. Every voter-to-be, the DR replicas among them, must keep up with the
//!    log: store it up to this drill's own record within [`COPY_MAX`].
//!    One that cannot is gone or far behind, and the switchover is refused
//!    while writes still flow.
//! 1. Every write is refused from a `Freeze` entry on (503, retried with
//!    the same key): no order is acknowledged that the new region could
//!    miss.
//! 2. The leader waits until every voter-to-be has stored the log up to the
//!    freeze: the DR copy has everything. One that takes longer than
//!    [`COPY_MAX`] was lost since step 0, and the freeze is thawed.
//! 3. The membership changes (joint consensus): the target region's nodes
//!    and this leader vote, every other node follows as a learner. That is
//!    the fence: the old primary's nodes can commit nothing, and they now
//!    receive the log, which is replication reversed.
//! 4. `Promote` names the new region and epoch and lets writes flow. This
//!    leader is no longer in the region that leads, so it hands leadership
//!    to a voter there that has its whole log (`Group::tend_holds`).
//!
//! A probe shopper checks out on this node throughout; the report says how
//! long checkout was unavailable. Failback is a switchover back.
//!
//! A coordinator that dies between the freeze and the promotion would leave
//! writes refused for good; [`finish_stalled`] has whichever node leads
//! then finish the switchover (completing a membership change left joint,
//! once the voters are the target region's) or abandon it (while they are
//! not). A coordinator whose membership change fails once the joint entry
//! is in its log leaves the freeze to that leader rather than thaw.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::time::Duration;

use domain::{Command, GroupState, Outcome};
use tokio::time::Instant;

use crate::drill::{self, DrillError, DrillReport, Outages, Probe, Timeline, PROBE_EVERY, SETTLE_MAX};
use crate::node::Node;

/// Checks that this node may move writes to `region`, records the
/// switchover as running, and returns its first report and the voters the
/// group will have.
pub(crate) fn plan(node: &Node, region: &str, requested_by: &str) -> Result<(DrillReport, BTreeSet<u64>), DrillError> {
    let topology = node.topology();
    let in_region: Vec<_> = topology.nodes.iter().filter(|n| n.region == region).collect();
    if in_region.is_empty() {
        return Err(DrillError::UnknownRegion(region.to_string()));
    }
    if node.primary_region() == region {
        return Err(DrillError::AlreadyPrimary(region.to_string()));
    }
    let status = node.group().status();
    if status.role != "leader" {
        return Err(DrillError::NotLeader { leader: status.leader });
    }
    if !node.group().may_lead() {
        // A leader outside the region that takes writes is handing over.
        return Err(DrillError::NotLeader { leader: None });
    }
    // The region's nodes, and this leader as the tiebreaker outside it.
    let coordinator = node.id();
    let voters: BTreeSet<u64> = in_region.iter().map(|n| n.id).chain([coordinator]).collect();
    for zone in in_region.iter().map(|n| n.zone.as_str()).collect::<BTreeSet<_>>() {
        let left = in_region.iter().filter(|n| n.zone != zone).count() + 1;
        if left * 2 <= voters.len() {
            return Err(DrillError::RegionLosesQuorum {
                region: region.to_string(),
                zone: zone.to_string(),
                voters: voters.iter().copied().collect(),
            });
        }
    }
    let report = DrillReport {
        nodes: voters.iter().copied().collect(),
        region: Some(region.to_string()),
        ..DrillReport::started("switchover", coordinator, requested_by, node.clock_ms())
    };
    node.drills().begin(report.clone())?;
    Ok((report, voters))
}

/// Runs a planned switchover to the end and records its report.
pub(crate) async fn run(node: Node, id: u64, region: String, voters: BTreeSet<u64>) {
    drill::record(&node, id).await;
    let log = Timeline::new(&node, id);
    let outcome = switchover(&node, &log, id, &region, &voters).await;
    drill::finish(&node, id, outcome).await;
}

async fn switchover(node: &Node, log: &Timeline, id: u64, region: &str, voters: &BTreeSet<u64>) -> Result<(), String> {
    // Before anything changes, and before the probe sale (whose escrow a
    // lost DR copy would never confirm): the log as it stands now, this
    // drill's record included, reaches every voter-to-be.
    let recorded = node.group().raft().metrics().borrow().last_log_index.unwrap_or(0);
    wait_for_copy(node, voters, recorded).await.map_err(|why| format!("no switchover, nothing was changed: {why}"))?;
    log.note(format!("nodes {voters:?} keep up with the log (index {recorded})"));

    let mut probe = Probe::open(node, id).await?;
    let mut outages = Outages::default();
    let baseline = Instant::now();
    while outages.acknowledged.is_empty() {
        if baseline.elapsed() > SETTLE_MAX {
            return Err("checkout did not work before the switchover; nothing was changed".into());
        }
        outages.probe(&mut probe, log).await;
        tokio::time::sleep(PROBE_EVERY).await;
    }
    log.note("baseline probe checkout acknowledged");

    // The steps and the probe run side by side; the probe stops once the
    // steps are over and a checkout has worked since.
    let done: Cell<Option<Result<(), String>>> = Cell::new(None);
    let steps = async {
        let outcome = steps(node, log, region, voters).await;
        done.set(Some(outcome));
    };
    let probing = async {
        loop {
            outages.probe(&mut probe, log).await;
            let finished = done.take();
            let (over, failed) = (finished.is_some(), matches!(finished, Some(Err(_))));
            done.set(finished);
            // A switchover that failed has thawed (or left a freeze for the
            // next leader to finish): nothing more to measure.
            if failed || (over && !outages.failing()) {
                return Ok(());
            }
            if baseline.elapsed() > SETTLE_MAX * 3 {
                return Err(format!("checkout still failing {} s into the switchover", SETTLE_MAX.as_secs() * 3));
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    };
    let ((), probed) = futures::join!(steps, probing);
    done.take().unwrap_or_else(|| Err("the switchover steps did not finish".into()))?;
    probed?;
    drill::audit(node, log, &outages.acknowledged).await
}

/// Freeze, wait for the copy, change the voters, promote.
async fn steps(node: &Node, log: &Timeline, region: &str, voters: &BTreeSet<u64>) -> Result<(), String> {
    let epoch = node.read_local(domain::GroupState::epoch) + 1;
    match node.operator(Command::Freeze { epoch }).await {
        Ok(Outcome::Epoch { .. }) => {}
        Ok(other) => return Err(format!("the freeze was refused: {other:?}")),
        Err(error) => return Err(format!("the freeze did not commit: {error}")),
    }
    let frozen_at = Instant::now();
    let freeze_index = node.group().raft().metrics().borrow().last_log_index.unwrap_or(0);
    log.note(format!("writes refused from log index {freeze_index}, for epoch {epoch}"));

    if let Err(why) = wait_for_copy(node, voters, freeze_index).await {
        log.note(format!("no switchover: {why}"));
        thaw(node, log, epoch).await;
        return Err(why);
    }
    let copied_ms = frozen_at.elapsed().as_millis() as u64;
    log.note(format!("nodes {voters:?} hold every entry up to the freeze ({copied_ms} ms after it)"));
    log.update(|report| report.caught_up_ms = Some(copied_ms));

    if let Err(error) = node.group().raft().change_membership(voters.clone(), true).await {
        // Cut short once the joint configuration was in the log, the change
        // may still go through, and a thaw would let the old region write
        // with the new region's voters: the next leader finishes it instead.
        if moving_to(node) != Some(voters.clone()) {
            thaw(node, log, epoch).await;
            return Err(format!("the membership change failed: {error}"));
        }
        return Err(format!(
            "the membership change was cut short ({error}); writes stay frozen until the leader finishes it"
        ));
    }
    log.note(format!("voters now {voters:?}; every other node follows as a learner"));

    let promote = Command::Promote { region: region.to_string(), epoch };
    loop {
        match node.operator(promote.clone()).await {
            Ok(Outcome::Epoch { .. }) => break,
            // Another leader finished this switchover while this node could not.
            Ok(_) if node.read_local(|s| s.epoch() == epoch && s.primary_region() == Some(region)) => break,
            Ok(other) => return Err(format!("the promotion was refused: {other:?}")),
            Err(error) if frozen_at.elapsed() > SETTLE_MAX => {
                return Err(format!("the promotion did not commit; writes stay frozen: {error}"));
            }
            Err(_) => tokio::time::sleep(PROBE_EVERY).await,
        }
    }
    let frozen_ms = frozen_at.elapsed().as_millis() as u64;
    log.note(format!("region {region} takes writes in epoch {epoch}, {frozen_ms} ms after the freeze"));
    log.update(|report| report.frozen_ms = Some(frozen_ms));

    // This node may not lead any more: it hands leadership to a voter of the
    // region that has its whole log (`Group::tend_holds`). The switchover is
    // over once one leads.
    let promoted = Instant::now();
    loop {
        let leader = node.group().raft().metrics().borrow().current_leader;
        let region_of = |id: u64| node.topology().node(id).map(|spec| spec.region.as_str());
        if let Some(leader) = leader.filter(|id| region_of(*id) == Some(region)) {
            let ms = promoted.elapsed().as_millis();
            log.note(format!("node {leader} of region {region} leads, {ms} ms after the promotion"));
            return Ok(());
        }
        if promoted.elapsed() > SETTLE_MAX {
            return Err(format!("no node of region {region} leads {} s after the promotion", SETTLE_MAX.as_secs()));
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// How long every voter-to-be may take to store the log up to an entry:
/// the drill's record before the freeze, the freeze after it. Catching up
/// from further behind, after a partition say, takes longer: the operator
/// asks again once `surge ctl status` shows the region's lag gone. A node
/// lost for good (`surge ctl replace-node`) holds writes frozen this long
/// at most, and keeps the drill slot its replacement needs no longer.
const COPY_MAX: Duration = Duration::from_secs(5);

/// Waits, at most [`COPY_MAX`], until every node of `voters` has stored
/// the log up to `index`, as this leader's replication progress says.
async fn wait_for_copy(node: &Node, voters: &BTreeSet<u64>, index: u64) -> Result<(), String> {
    let deadline = Instant::now() + COPY_MAX;
    loop {
        let metrics = node.group().raft().metrics().borrow().clone();
        let Some(replication) = metrics.replication.filter(|_| metrics.state.is_leader()) else {
            return Err("this node lost the leadership before the copy was complete".into());
        };
        let behind: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|id| *id != metrics.id)
            .filter(|id| replication.get(id).copied().flatten().map_or(0, |log_id| log_id.index) < index)
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("nodes {behind:?} did not store the log up to index {index} within {COPY_MAX:?}"));
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Lets writes flow again in the old epoch after a switchover that could
/// not finish.
async fn thaw(node: &Node, log: &Timeline, epoch: u64) {
    let started = Instant::now();
    loop {
        match node.operator(Command::Thaw { epoch }).await {
            Ok(_) => return log.note("switchover abandoned; writes flow again in the old region"),
            Err(error) if started.elapsed() > SETTLE_MAX => {
                return log.note(format!("switchover abandoned, but the thaw did not commit: {error}"));
            }
            Err(_) => tokio::time::sleep(PROBE_EVERY).await,
        }
    }
}

/// How long a freeze may stand before a leader that is not running the
/// switchover finishes it. A coordinator runs every step as the leader, so
/// another node leads only once the coordinator died, was cut off or was
/// deposed; a deposed one finishes through the new leader by itself, and
/// whichever finishing entry comes second is refused as out of turn.
const STALLED_AFTER: Duration = Duration::from_secs(5);

/// Longest wait for the entry that finishes a stalled switchover.
const FINISH_MAX: Duration = Duration::from_secs(5);

/// While this node leads and the group stays frozen with no drill of its
/// own that changes the membership under way for [`STALLED_AFTER`],
/// finishes the switchover the freeze began: a membership change left
/// joint is completed first; then, if every voter but one (the old leader,
/// kept as the tiebreaker) is in another region, the membership change
/// happened and that region is promoted; otherwise the freeze is thawed.
/// Ends when Raft stops.
pub(crate) async fn finish_stalled(node: Node, tick: Duration) {
    let mut frozen_since: Option<(u64, Instant)> = None;
    loop {
        tokio::time::sleep(tick).await;
        if node.group().raft().metrics().borrow().running_state.is_err() {
            return;
        }
        let Some(epoch) = node.read_local(GroupState::frozen_epoch) else {
            frozen_since = None;
            continue;
        };
        // Counted from when this node first saw the freeze, leading or not:
        // while no node of the old region can lead, leadership passes
        // between stranded voters and no one leads for long.
        let since = match frozen_since {
            Some((seen, since)) if seen == epoch => since,
            _ => {
                frozen_since = Some((epoch, Instant::now()));
                continue;
            }
        };
        // A drill of this node's own may be changing the membership itself
        // (a replacement does too).
        if since.elapsed() < STALLED_AFTER || !node.group().is_leader() || node.drills().changing_membership() {
            continue;
        }
        // A coordinator lost between the halves of its membership change
        // left the group joint: it is completed, as the voters-to-be held
        // the log up to the freeze before it began, and the region it makes
        // the voters' is promoted on a later tick.
        if let Some(goal) = joint_goal(&node) {
            tracing::warn!(epoch, ?goal, "a switchover stalled mid-way through its membership change; completing it");
            match tokio::time::timeout(FINISH_MAX, node.group().raft().change_membership(goal, true)).await {
                Ok(Ok(_)) => tracing::warn!("the stalled membership change completed"),
                Ok(Err(error)) => tracing::warn!(%error, "completing a stalled membership change failed; retrying"),
                Err(_) => tracing::warn!("completing a stalled membership change got no outcome in time; retrying"),
            }
            continue;
        }
        let command = match promoted_region(&node) {
            Some(region) => Command::Promote { region, epoch },
            None => Command::Thaw { epoch },
        };
        tracing::warn!(epoch, ?command, "a switchover stalled with writes frozen; finishing it");
        match tokio::time::timeout(FINISH_MAX, node.operator(command)).await {
            Ok(Ok(outcome)) => tracing::warn!(?outcome, "stalled switchover finished"),
            Ok(Err(error)) => tracing::warn!(%error, "finishing a stalled switchover failed; retrying"),
            Err(_) => tracing::warn!("finishing a stalled switchover got no outcome in time; retrying"),
        }
        frozen_since = None;
    }
}

/// The voters the membership is moving to: its last configuration, joint
/// with the one before it or on its own.
fn moving_to(node: &Node) -> Option<BTreeSet<u64>> {
    node.group().raft().metrics().borrow().membership_config.membership().get_joint_config().last().cloned()
}

/// The voters a membership change cut short was moving to, while the group
/// is still joint (the old voters and these both).
fn joint_goal(node: &Node) -> Option<BTreeSet<u64>> {
    let metrics = node.group().raft().metrics();
    let metrics = metrics.borrow();
    let configs = metrics.membership_config.membership().get_joint_config();
    (configs.len() > 1).then(|| configs.last().cloned()).flatten()
}

/// The region other than the one taking writes that holds every voter but
/// at most one, if there is one: a switchover's membership change made it so.
fn promoted_region(node: &Node) -> Option<String> {
    let voters: Vec<u64> = node.group().raft().metrics().borrow().membership_config.membership().voter_ids().collect();
    let current = node.primary_region();
    let topology = node.topology();
    let regions: BTreeSet<&str> = topology.nodes.iter().map(|n| n.region.as_str()).collect();
    regions.into_iter().filter(|region| *region != current).find_map(|region| {
        let inside = voters.iter().filter(|id| topology.node(**id).is_some_and(|n| n.region == region)).count();
        (inside > 0 && inside + 1 >= voters.len()).then(|| region.to_string())
    })
}
