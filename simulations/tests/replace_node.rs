//! `replace-node` on a node outside the group that holds a log. A
//! replacement cut short right after a running node left (its leader lost
//! before it added the node back) leaves it so; asked again, the
//! replacement adds it back to catch up from that log, instead of
//! refusing it for good and leaving the group a voter short. The nodes of
//! a primary a forced failover lost are outside the group too, and may
//! hold orders only they know: until failback, none is replaced.

mod common;

use std::collections::BTreeSet;

use cluster::{DrillError, DrillReport, Node};
use common::{a_leader, ended, on_sale, until, voters};
use openraft::ChangeMembers;
use simulations::sim;
use simulations::world::World;

/// Waits until replacement `id`, run by `node`, has added its node back.
async fn added_back(node: &Node, id: u64) {
    until("the node is added back", || node.drill_report(id).is_some_and(|report| report.added_back)).await;
}

/// A voter of zone b that does not lead: it can leave, and a zone-a leader
/// can be lost, without costing the group its majority.
fn voter_to_replace(world: &World, leader: &Node) -> u64 {
    let zone_b = world.zone("b");
    voters(leader).into_iter().find(|id| zone_b.contains(id) && *id != leader.id()).unwrap()
}

#[test]
fn a_voter_a_replacement_left_outside_the_group_on_its_log_is_added_back_a_voter() {
    sim::scripted(7, |world| async move {
        let first = a_leader(&world).await;
        let target = voter_to_replace(&world, &first);

        // The first run: it takes the node for silent (here it is down),
        // records that it ends a voter, removes it and adds it back. The
        // node stays outside the group, as if the leader were lost before
        // it added it back; then the leader is lost.
        world.crash(target).await;
        let report = first.start_replace(target, None, "test").await.expect("a silent voter is replaced");
        added_back(&first, report.id).await;
        let leave = ChangeMembers::RemoveNodes(BTreeSet::from([target]));
        first.group().raft().change_membership(leave, false).await.expect("the node leaves");
        world.crash(first.id()).await;
        world.start(target).await.expect("the node starts on its disk");
        let held = world.node(target).unwrap().group().status().last_log_index;
        assert!(held > 0, "the node holds its log");

        // Asked again, of the new leader, without the role.
        let second = a_leader(&world).await;
        assert!(!second.group().members().contains(&target));
        let report = second.start_replace(target, None, "test").await.expect("the node is added back, log and all");
        let report = ended(&second, report.id).await;
        assert_eq!(report.state, "completed", "{report:?}");
        let notes: Vec<&str> = report.timeline.iter().map(|event| event.what.as_str()).collect();
        assert!(notes.iter().any(|note| note.contains("catches up from the log it holds")), "{notes:?}");
        assert!(voters(&second).contains(&target), "a voter again, as the first run recorded: {notes:?}");
        let own = world.node(target).unwrap().group().status();
        assert!(own.last_log_index > held, "it went on from its log: {own:?}");
    });
}

/// A replacement whose start could not be recorded changed nothing, and
/// says nothing of the node's role: asked again without the role, of the
/// same leader, the replacement finishes what the run cut short before it
/// recorded, and the voter ends a voter (seed 23500047, where it ended a
/// learner).
#[test]
fn a_replacement_never_recorded_leaves_the_role_to_the_one_before_it() {
    sim::scripted(7, |world| async move {
        let first = a_leader(&world).await;
        let target = voter_to_replace(&world, &first);
        world.crash(target).await;
        let report = first.start_replace(target, None, "test").await.expect("a silent voter is replaced");
        added_back(&first, report.id).await;

        // The primary's nodes restart cut off from the DR region: their
        // leader, not having heard from another region since it started,
        // takes no writes, and records no replacement.
        let (primary, dr) = (world.region("primary"), world.region("dr"));
        let between = || primary.iter().flat_map(|&p| dr.iter().flat_map(move |&d| [(p, d), (d, p)]));
        for &id in &primary {
            world.crash(id).await;
        }
        between().for_each(|(from, to)| world.net.cut(from, to));
        for &id in primary.iter().filter(|&&id| id != target) {
            world.start(id).await.expect("the node restarts on its disk");
        }
        let second = a_leader(&world).await;
        let unrecorded = second.start_replace(target, None, "test").await.expect("the replacement is planned");
        let unrecorded = ended(&second, unrecorded.id).await;
        assert_eq!((unrecorded.state.as_str(), unrecorded.voter_after), ("failed", None), "{unrecorded:?}");

        between().for_each(|(from, to)| world.net.uncut(from, to));
        world.start(target).await.expect("the node starts on its log, a learner");
        until("the leader takes writes again", || {
            second.group().status().role == "leader" && !second.group().is_cut_off()
        })
        .await;
        let report = second.start_replace(target, None, "test").await.expect("the replacement is asked again");
        let report = ended(&second, report.id).await;
        assert_eq!((report.state.as_str(), report.voter_after), ("completed", Some(true)), "{report:?}");
        assert!(voters(&second).contains(&target), "a voter again, as the first run recorded");
    });
}

/// A node outside the group that no replacement on record took out did
/// not leave through one: its copy is not given up for it.
#[test]
fn a_node_outside_the_group_with_no_replacement_on_record_is_refused() {
    sim::scripted(5, |world| async move {
        let leader_node = a_leader(&world).await;
        let target = voter_to_replace(&world, &leader_node);
        let leave = ChangeMembers::RemoveVoters(BTreeSet::from([target]));
        leader_node.group().raft().change_membership(leave, false).await.expect("the voter leaves");
        assert!(!leader_node.group().members().contains(&target));
        match leader_node.start_replace(target, None, "test").await {
            Err(DrillError::HoldsItsCopy { node, .. }) => assert_eq!(node, target),
            other => panic!("a node holding its copy was taken back without a replacement on record: {other:?}"),
        }
    });
}

/// Until failback has read (or gone without) the copies of the primary a
/// forced failover lost, none of its nodes is replaced: not one that is
/// silent, as all of them are while the region is down, and not one that
/// holds its copy, even with a replacement of it on record unfinished.
#[test]
fn no_node_of_a_lost_primary_is_replaced_before_failback() {
    sim::scripted(11, |world| async move {
        let primary_leader = on_sale(&world).await;
        let target = voter_to_replace(&world, &primary_leader);
        world.crash(target).await;
        let report = primary_leader.start_replace(target, None, "test").await.expect("a silent voter is replaced");
        added_back(&primary_leader, report.id).await;
        world.lose_region("primary").await;

        let promoted = forced_failover(&world).await;
        assert!(
            promoted
                .drill_reports()
                .iter()
                .any(|report| report.kind == "replace-node" && report.nodes == [target] && report.state != "completed"),
            "the DR copy holds the replacement cut short by the region's loss"
        );
        let refused = |node: u64, answer: Result<DrillReport, DrillError>| match answer {
            Err(DrillError::AwaitsFailback { node: refused, region }) => {
                assert_eq!((refused, region.as_str()), (node, "primary"))
            }
            other => panic!("node {node} of the lost primary was replaced before failback: {other:?}"),
        };
        // Silent, as a node whose disk is gone would be.
        refused(target, promoted.start_replace(target, None, "test").await);
        world.return_region("primary").await;
        assert!(world.node(target).unwrap().group().status().last_log_index > 0, "it holds its copy");
        refused(target, promoted.start_replace(target, None, "test").await);
    });
}

/// Forces a failover to the DR region, on its most advanced copy; the
/// node that leads the new group.
async fn forced_failover(world: &World) -> Node {
    let mut copies: Vec<Node> = world.region("dr").into_iter().filter_map(|id| world.node(id)).collect();
    copies.sort_by_key(|node| std::cmp::Reverse(node.group().status().applied_index));
    let node = copies.into_iter().next().expect("a DR node");
    let report = node.start_failover("dr", "test").await.expect("the failover starts");
    let report = ended(&node, report.id).await;
    assert_eq!(report.state, "completed", "{report:?}");
    node
}
