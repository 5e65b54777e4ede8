//! `replace-node` on a node that left the group but holds its log: a
//! replacement cut short after its first step (the node removed, the
//! leader lost before it added the node back) leaves it so. Asked again,
//! the replacement adds the node back to catch up from that log; refusing
//! it because it answers with a log would leave the group a voter short
//! for good.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use simulations::faults::leader;
use simulations::sim;
use simulations::world::World;

/// Bound on each wait of the scenario, in simulated time.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Waits until `holds` of the world, or panics saying `what` did not happen.
async fn until(world: &World, what: &str, holds: impl Fn(&World) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while !holds(world) {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {WAIT_MAX:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn voters(world: &World) -> BTreeSet<u64> {
    let leader = leader(world).expect("a leader");
    let metrics = leader.group().raft().metrics().borrow().clone();
    metrics.membership_config.membership().voter_ids().collect()
}

#[test]
fn a_voter_that_left_the_group_holding_its_log_is_added_back_a_voter() {
    sim::scripted(7, |world| async move {
        until(&world, "a leader", |world| leader(world).is_some()).await;
        let leader_node = leader(&world).unwrap();
        let target = voters(&world).into_iter().find(|&id| id != leader_node.id()).unwrap();

        // What the first run of a replacement cut short did: the node left.
        let leave = ChangeMembers::RemoveVoters(BTreeSet::from([target]));
        leader_node.group().raft().change_membership(leave, false).await.expect("the voter leaves");
        assert!(!leader_node.group().members().contains(&target));
        let held = world.node(target).unwrap().group().status().last_log_index;
        assert!(held > 0, "the node that left holds its log");

        let report = leader_node
            .start_replace(target, Some(true), "test")
            .await
            .expect("a node that is no member is replaced, log or not");
        until(&world, "the replacement ends", |_| {
            leader_node.drill_report(report.id).is_some_and(|report| report.state != "running")
        })
        .await;
        let report = leader_node.drill_report(report.id).unwrap();
        assert_eq!(report.state, "completed", "{report:?}");
        assert!(voters(&world).contains(&target), "the node is a voter again: {report:?}");
        let own = world.node(target).unwrap().group().status();
        assert!(own.last_log_index > held, "the node went on from its log: {own:?}");
    });
}
