//! **Replacing a member whose disk is gone**: a node of the group lost its
//! data for good (a dead disk, a rebuilt machine) and comes back wiped, in
//! its old place.
//!
//! openraft 0.9 assumes a member never loses what it acknowledged. A
//! member that answers with less log than its leader last saw trips an
//! assertion in debug builds, and in release builds its replication can
//! stall for good (the simulator's `replace-in-place` bug: a DR replica
//! wiped in place never caught up). And a voter wiped in place still counts
//! toward the quorum while it holds less than it acknowledged. openraft's
//! `loosen-follower-log-revert` feature would silence the first and leave
//! the second. So `surge ctl replace-node --node N`, on the leader:
//!
//! 1. removes N from the group: a voter leaves the voters, and the others
//!    must still make a majority of what is left;
//! 2. adds N back as a learner, at its address in the topology: a new
//!    member, with nothing acknowledged;
//! 3. waits until N has the whole log, for up to [`JOIN_WAIT`]: the
//!    operator starts it wiped, with `join = true`, so it founds no group
//!    of its own and votes for no one until a leader has given it a log
//!    (a node that left running, below, catches up from its own log);
//! 4. makes N a voter again if it was one (or if asked to).
//!
//! A node outside the region that takes writes comes back a voter only if
//! another learner there is left to confirm escrow (`escrow.rs`): made a
//! voter, the last DR copy would leave every sale to stop once its
//! confirmed escrow ran out. `--voter` for it is refused; an intent taken
//! from the record (a run cut short before a switchover changed the roles)
//! gives way, and the node comes back a learner.
//!
//! Only a node that does not answer with a log may be replaced: one that
//! is down (as it should be until step 3), or already started wiped. A
//! node that still holds its copy would give it up for nothing, and the
//! group would be a copy short while it caught up again. The node is asked
//! again for up to [`ASK_FOR`] before it counts as silent: a question or
//! an answer lost on the way looks like a node that is down. One exception:
//! a replacement cut short right after a running node left (it was taken
//! for silent all the same) leaves it no member, on its log, of the
//! group's generation, with the replacement on record unfinished. Asked
//! again, the replacement adds it back to catch up from that log: it gives
//! up nothing. A node outside the group that holds a log in any other
//! case is refused. And while a forced failover awaits its failback, no
//! node of the region it lost is replaced at all, silent or not: its copy
//! may hold orders only it knows, and failback reads that copy (or goes
//! without it, its disk lost) before the node rejoins. A forced failover
//! also ends what earlier replacements on record meant: the group they
//! were for is gone.
//!
//! A replacement cut short (its leader lost, the wait run out) is asked
//! for again, of whichever node leads. Its report is in the replicated
//! state before step 1, with whether the node ends as a voter; asked
//! again without saying, a replacement takes that from the latest one of
//! the node on record that did not complete (passing over any that could
//! not record its start: it changed nothing). Without it, a voter removed
//! by a run cut short would come back a learner, and the group would be a
//! voter short for good: four voters, two of them in the zone that is
//! lost, keep no majority. A node that is no member at all any more
//! (removed, not yet added back) skips step 1. A learner that already
//! holds a log, when it is to be a voter, skips steps 1 and 2: it was
//! added back, and only its promotion is left.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use tokio::time::Instant;

use crate::drill::{self, DrillReport, Timeline};
use crate::status::GroupStatus;
use crate::{DrillError, Node};

/// How long a replacement waits for the wiped node to start and catch up.
pub const JOIN_WAIT: Duration = Duration::from_secs(300);

/// How long the node to replace gets to say whether it holds a log.
const ASK_FOR: Duration = Duration::from_secs(2);

/// How long one such question waits for its answer before it is asked
/// again.
const ASK_ONCE: Duration = Duration::from_millis(500);

/// The pause before asking again.
const ASK_PAUSE: Duration = Duration::from_millis(50);

/// Longest wait for one membership change to commit.
const CHANGE_MAX: Duration = Duration::from_secs(30);

/// What a replacement found to do when it was planned.
pub(crate) struct Plan {
    /// The node whose disk is gone.
    target: u64,
    /// Its peer address.
    peer: String,
    /// Whether it is a member now, and a voter: it leaves the group first.
    member_now: bool,
    voter_now: bool,
    /// Whether it leaves (if a member) and is added back: all but a
    /// learner holding a log that is only to be promoted.
    rebuild: bool,
    /// Whether it answered with a log: a node that is no member any more
    /// (a replacement cut short once it had left) catches up from it.
    holds_log: bool,
    /// Whether it ends as a voter.
    voter_after: bool,
}

/// Checks that this node may replace node `target` now, notes the
/// replacement as running, and returns its first report. `voter`: whether
/// the node ends as a voter; by default, what an earlier replacement of it
/// cut short meant it to be, or else what it is now.
pub(crate) async fn plan(
    node: &Node,
    target: u64,
    voter: Option<bool>,
    requested_by: &str,
) -> Result<(DrillReport, Plan), DrillError> {
    let spec = node.topology().node(target).ok_or(DrillError::UnknownNode(target))?;
    let status = node.group().status();
    if status.role != "leader" || status.cut_off {
        // A leader cut off from its quorum could change nothing.
        return Err(DrillError::NotLeader { leader: status.leader.filter(|_| !status.cut_off) });
    }
    if target == node.id() {
        return Err(DrillError::ReplacesLeader(target));
    }
    let (voters, members) = {
        let metrics = node.group().raft().metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        (membership.voter_ids().collect::<BTreeSet<u64>>(), node.group().members())
    };
    let member_now = members.contains(&target);
    let voter_now = voters.contains(&target);
    let (generation, settled) = node.read_local(|state| (state.generation(), state.failover_settled()));
    if !member_now && !settled && spec.region != node.primary_region() {
        // A node of the lost primary: silent or not, it may hold orders
        // only it knows.
        return Err(DrillError::AwaitsFailback { node: target, region: spec.region.clone() });
    }
    let unfinished = unfinished_replacement(node, target);
    let recorded_intent = unfinished.as_ref().and_then(|report| report.voter_after);
    let mut voter_after = voter.or(recorded_intent).unwrap_or(voter_now);
    if voter_after && !voter_now && is_last_dr_copy(node, target, &members, &voters) {
        if voter == Some(true) {
            return Err(DrillError::LeavesNoDrCopy { node: target, region: node.primary_region() });
        }
        // The record's intent predates a switchover that made the node the
        // DR copy: it stays one.
        voter_after = false;
    }
    let held = asked_status(node, target).await;
    let held_log = held.as_ref().map_or(0, |group| group.last_log_index);
    let promote_only = member_now && !voter_now && voter_after;
    // A replacement cut short once the node had left leaves it no member,
    // running on its log. Any other node outside the group that holds a
    // log keeps it: a node of a primary lost before the last failover,
    // above all, holds a copy of an older generation.
    let left_half_way =
        !member_now && unfinished.is_some() && held.as_ref().is_some_and(|group| group.generation == generation);
    if held_log > 0 && !promote_only && !left_half_way {
        return Err(DrillError::HoldsItsCopy { node: target, last_log_index: held_log });
    }
    let report = DrillReport {
        nodes: vec![target],
        voter_after: Some(voter_after),
        ..DrillReport::started("replace-node", node.id(), requested_by, node.clock_ms())
    };
    node.drills().begin(report.clone())?;
    let plan = Plan {
        target,
        peer: spec.peer.clone(),
        member_now,
        voter_now,
        rebuild: held_log == 0 || !member_now,
        holds_log: held_log > 0,
        voter_after,
    };
    Ok((report, plan))
}

/// Node `target`'s view of its group, `None` if it does not answer. A
/// question or an answer lost on the way, or a connection torn down, looks
/// like a node that is down; so it is asked again until [`ASK_FOR`] runs
/// out. Taken for silence, it would have a node that holds its copy
/// removed from the group.
async fn asked_status(node: &Node, target: u64) -> Option<GroupStatus> {
    let deadline = Instant::now() + ASK_FOR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(status)) = tokio::time::timeout(left.min(ASK_ONCE), node.node_status(target)).await {
            return status.groups.into_iter().next();
        }
        if left < ASK_ONCE {
            return None;
        }
        tokio::time::sleep(ASK_PAUSE).await;
    }
}

/// Whether `target`, in a topology with a DR replica, lies outside the
/// region that takes writes and no other learner there is left to confirm
/// escrow.
fn is_last_dr_copy(node: &Node, target: u64, members: &[u64], voters: &BTreeSet<u64>) -> bool {
    if node.topology().replicas().is_empty() {
        return false;
    }
    let writing = node.primary_region();
    let outside = |id: u64| node.topology().node(id).is_some_and(|spec| spec.region != writing);
    outside(target) && !members.iter().any(|&id| id != target && !voters.contains(&id) && outside(id))
}

/// The latest replacement of `target` on record, if it did not complete
/// and no forced failover came after it: a failover founds a group of
/// other members, and what the replacement meant for the old one holds
/// no more. A replacement whose start could not be recorded is passed
/// over: it changed nothing, and the one before it still says what the
/// node is to be (seed 23500047: found first, it left the voter a
/// learner).
fn unfinished_replacement(node: &Node, target: u64) -> Option<DrillReport> {
    let reports = drill::reports(node);
    let latest = reports.into_iter().rev().find(|report| {
        (report.kind == "failover" && report.state == "completed")
            || (report.kind == "replace-node"
                && report.nodes == [target]
                && (report.voter_after.is_some() || report.state == "completed"))
    })?;
    (latest.kind == "replace-node" && latest.state != "completed").then_some(latest)
}

/// Carries a planned replacement out and records its report.
pub(crate) async fn run(node: Node, id: u64, plan: Plan) {
    let log = Timeline::new(&node, id);
    // On record before anything changes: whoever asks again finds the intent.
    let outcome = if drill::record(&node, id).await {
        replace(&node, &log, &plan).await
    } else {
        // Its plan never held: nothing was changed, and a later replacement
        // inherits no role from it. It may have been a leader's with a
        // stale view of the group (seed 15900075).
        log.update(|report| report.voter_after = None);
        Err("the replacement could not be recorded; nothing was changed".into())
    };
    drill::finish(&node, id, outcome).await;
}

async fn replace(node: &Node, log: &Timeline, plan: &Plan) -> Result<(), String> {
    let raft = node.group().raft();
    let target = plan.target;
    // The switch first: outside the simulator it is a constant `false`.
    let in_place = domain::mutation::active(domain::mutation::Mutation::ReplaceInPlace);
    if !plan.rebuild {
        log.note(format!("node {target} is a learner holding a log: only its promotion is left"));
    } else if plan.member_now && !in_place {
        let leave = if plan.voter_now {
            ChangeMembers::RemoveVoters(BTreeSet::from([target]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([target]))
        };
        match tokio::time::timeout(CHANGE_MAX, raft.change_membership(leave, false)).await {
            Ok(Ok(_)) => log.note(format!("node {target} left the group")),
            Ok(Err(error)) => return Err(format!("removing node {target}: {error}")),
            Err(_) => return Err(format!("removing node {target} did not commit within {CHANGE_MAX:?}")),
        }
    } else {
        log.note(format!("node {target} is no member of the group: adding it back"));
    }

    if plan.rebuild {
        // The leader re-adds a missing DR replica by itself; either way, once.
        if !node.group().members().contains(&target) {
            let added = raft.add_learner(target, BasicNode::new(plan.peer.clone()), false).await;
            if let Err(error) = added {
                if !node.group().members().contains(&target) {
                    return Err(format!("adding node {target} back as a learner: {error}"));
                }
            }
        }
        log.update(|report| report.added_back = true);
        log.note(if plan.holds_log {
            format!("node {target} is a learner again: it catches up from the log it holds")
        } else {
            format!("node {target} is a learner again, with nothing acknowledged: start it wiped, with join = true")
        });
    }

    let started = Instant::now();
    loop {
        if !node.group().is_leader() {
            return Err(format!("this node no longer leads: ask the new leader to replace node {target} again"));
        }
        let behind = node.group().status().replica_lag.get(&target).map(|lag| lag.entries);
        if behind == Some(0) {
            let ms = started.elapsed().as_millis() as u64;
            log.update(|report| report.caught_up_ms = Some(ms));
            log.note(format!("node {target} has the whole log, {ms} ms after it was added"));
            break;
        }
        if started.elapsed() > JOIN_WAIT {
            return Err(format!(
                "node {target} did not catch up within {JOIN_WAIT:?}; it is a learner now. Start it wiped, with \
                 join = true, then run `surge ctl replace-node --node {target}` again"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    if plan.voter_after {
        let join = ChangeMembers::AddVoterIds(BTreeSet::from([target]));
        match tokio::time::timeout(CHANGE_MAX, raft.change_membership(join, false)).await {
            Ok(Ok(_)) => log.note(format!("node {target} is a voter again")),
            Ok(Err(error)) => return Err(format!("making node {target} a voter again: {error}")),
            Err(_) => return Err(format!("making node {target} a voter did not commit within {CHANGE_MAX:?}")),
        }
    }
    Ok(())
}
