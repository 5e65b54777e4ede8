//! A forced failover founds its group past the end of every log of the
//! DR region, appends the fence let through just before it included.

mod common;

use std::time::Duration;

use common::{cut, ended, on_sale, until};
use domain::Command;
use simulations::world::World;
use simulations::{sim, workload};

/// How long each append takes on the DR replica's slow disk.
const SLOW: Duration = Duration::from_millis(1_400);

/// The primary region writes while the DR replica's slow disk queues its
/// appends in its Raft, past what its status shows; at the end the
/// tiebreaker is cut off, so the queue also reaches past its log. The
/// region is lost with appends still queued: the fence turns away new
/// ones, not those, and they land once the failover has read every copy's
/// status. A group founded below them would look to the replica like the
/// tail of its own log: openraft would take the new leader's entries as
/// matching its old ones (and panic applying them). Founded past them, the
/// replica takes the new group's snapshot and follows it.
#[test]
fn a_failover_founds_its_group_past_appends_queued_behind_a_slow_disk() {
    sim::scripted(17, |world| async move {
        let primary_leader = on_sale(&world).await;
        let dr = world.region("dr");
        let replica = *dr.iter().find(|id| world.node(**id).is_some_and(|node| node.group().is_learner())).unwrap();
        let tiebreaker = *dr.iter().find(|id| **id != replica).unwrap();

        world.set_disk_slow(replica, SLOW);
        restock(&world, primary_leader.id(), 0..50).await;
        cut(&world, tiebreaker, true);
        restock(&world, primary_leader.id(), 50..75).await;
        world.lose_region("primary").await;
        cut(&world, tiebreaker, false);

        // The tiebreaker holds the most advanced copy. The replica's queue
        // drains once the failover has read the copies' status.
        let promoted = world.node(tiebreaker).unwrap();
        let shown = dr.iter().map(|id| world.node(*id).unwrap().group().status().last_log_index).max().unwrap();
        let report = promoted.start_failover("dr", "test").await.expect("the failover starts on the tiebreaker");
        world.set_disk_slow(replica, Duration::ZERO);
        let report = ended(&promoted, report.id).await;
        assert_eq!(report.state, "completed", "{report:?}");
        let founded_at = report
            .timeline
            .iter()
            .find_map(|event| event.what.strip_prefix("new group founded at log index "))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .expect("the report says where the group was founded");
        assert!(founded_at > shown + 1, "founded at {founded_at}, though no log the region showed went past {shown}");

        let follows = || {
            let (Some(leader), Some(node)) = (world.node(tiebreaker), world.node(replica)) else { return false };
            let (lead, own) = (leader.group().status(), node.group().status());
            own.generation == lead.generation && own.applied_index == lead.applied_index
        };
        until("the replica follows the new group", follows).await;
    });
}

/// One restock of the hot SKU for each of `keys`, 20 ms apart, on `leader`.
async fn restock(world: &World, leader: u64, keys: std::ops::Range<u32>) {
    for n in keys {
        let restock = Command::Restock { sku: workload::HOT.into(), units: 1, idempotency_key: format!("restock-{n}") };
        world.node(leader).unwrap().operator(restock).await.expect("the primary writes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
