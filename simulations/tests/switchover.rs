//! A switchover whose coordinator is lost part-way. Past the freeze, writes
//! stay refused until some leader finishes it: forward once the voters
//! have moved, back only while they have not.

mod common;

use std::time::Duration;

use cluster::{DrillReport, Node};
use common::{a_leader, cut, ended, until, until_every, voters};
use domain::GroupState;
use simulations::sim;
use simulations::world::World;

/// A power cut between the halves of the membership change (joint
/// consensus) leaves the group joint, with old and new voters both, and
/// writes frozen. The next leader completes the change and promotes the
/// region it moved the voters to. A thaw would let the old region take
/// writes with the new region's voters, and nothing would ever finish it.
#[test]
fn a_switchover_cut_short_mid_membership_change_is_finished_forward() {
    sim::scripted(3, |world| async move {
        let (_, report) = gone_joint(&world).await;
        for id in world.ids() {
            world.crash(id).await;
        }
        for id in world.ids() {
            world.start(id).await.expect("the node starts on its disk");
        }
        let nodes = || world.ids().into_iter().filter_map(|id| world.node(id));
        assert!(nodes().any(|node| is_joint(&node)), "the group comes back joint");
        assert!(nodes().any(|node| node.read_local(GroupState::frozen_epoch).is_some()), "and frozen");
        finished_forward(&world, &report).await;
    });
}

/// The coordinator cut off, for a moment, once the joint configuration is
/// on enough nodes to commit: its membership change fails, yet the change
/// goes through on the other side. It leaves the freeze to the leader
/// there, which finishes the switchover forward, instead of thawing writes
/// back to the old region once it is heard again.
#[test]
fn a_coordinator_cut_off_mid_membership_change_leaves_the_freeze_to_the_next_leader() {
    sim::scripted(3, |world| async move {
        let (coordinator, report) = gone_joint(&world).await;
        let membership = coordinator.group().raft().metrics().borrow().membership_config.clone();
        let joint_at = membership.log_id().map(|id| id.index);
        let holds_joint = |id: &u64| {
            world.node(*id).is_some_and(|node| {
                node.group().raft().metrics().borrow().membership_config.log_id().map(|id| id.index) >= joint_at
            })
        };
        let commits = || {
            let configs = membership.membership().get_joint_config();
            configs.iter().all(|config| config.iter().filter(|id| holds_joint(id)).count() * 2 > config.len())
        };
        until_every(Duration::from_millis(1), "the joint configuration can commit", commits).await;

        cut(&world, coordinator.id(), true);
        tokio::time::sleep(Duration::from_secs(2)).await;
        cut(&world, coordinator.id(), false);
        let ended = ended(&coordinator, report.id).await;
        let failure = ended.failure.unwrap_or_default();
        assert!(failure.contains("writes stay frozen until the leader finishes it"), "{failure}");
        finished_forward(&world, &report).await;
    });
}

fn is_joint(node: &Node) -> bool {
    node.group().raft().metrics().borrow().membership_config.membership().get_joint_config().len() > 1
}

/// Starts a switchover to `dr` on the leader and waits, looking every
/// millisecond, until its membership change has gone joint; the
/// coordinator and the switchover's first report.
async fn gone_joint(world: &World) -> (Node, DrillReport) {
    let coordinator = a_leader(world).await;
    let report = coordinator.start_switchover("dr", "test").await.expect("the switchover starts");
    until_every(Duration::from_millis(1), "the membership goes joint", || is_joint(&coordinator)).await;
    (coordinator, report)
}

/// Waits until region `dr` takes writes on every node, then checks that
/// the group is led with the switchover's voters.
async fn finished_forward(world: &World, report: &DrillReport) {
    let nodes = || world.ids().into_iter().filter_map(|id| world.node(id));
    until("region dr takes writes", || {
        nodes().all(|node| node.read_local(|s| s.primary_region() == Some("dr") && s.frozen_epoch().is_none()))
    })
    .await;
    let leader = a_leader(world).await;
    assert!(!is_joint(&leader));
    assert_eq!(voters(&leader).into_iter().collect::<Vec<_>>(), report.nodes, "the switchover's voters");
}
