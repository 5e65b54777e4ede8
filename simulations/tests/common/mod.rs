//! What the scripted operator scenes share: waits bounded in simulated
//! time, and the group as a node sees it.

// Each test crate uses its share.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use cluster::{DrillReport, Node};
use domain::GroupState;
use simulations::faults::leader;
use simulations::workload;
use simulations::world::World;

/// Bound on each wait of a scenario, in simulated time.
pub const WAIT_MAX: Duration = Duration::from_secs(60);

/// Waits until `holds`, or panics saying `what` did not happen.
pub async fn until(what: &str, holds: impl Fn() -> bool) {
    until_every(Duration::from_millis(100), what, holds).await
}

/// [`until`], looking every `tick`: for a state that lasts only moments.
pub async fn until_every(tick: Duration, what: &str, holds: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while !holds() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {WAIT_MAX:?}");
        tokio::time::sleep(tick).await;
    }
}

pub async fn a_leader(world: &World) -> Node {
    until("a leader", || leader(world).is_some()).await;
    leader(world).unwrap()
}

pub fn voters(node: &Node) -> BTreeSet<u64> {
    node.group().raft().metrics().borrow().membership_config.membership().voter_ids().collect()
}

/// Drill `id` of `node` once it has ended.
pub async fn ended(node: &Node, id: u64) -> DrillReport {
    until("the drill ends", || node.drill_report(id).is_some_and(|report| report.state != "running")).await;
    node.drill_report(id).unwrap()
}

/// Opens the sales and waits until the DR copy confirms escrow, which
/// bounds what a failover may lose; the leader.
pub async fn on_sale(world: &World) -> Node {
    workload::create_sales(world).await.expect("the sales open");
    let leader = a_leader(world).await;
    until("the DR copy confirms escrow", || leader.read_local(GroupState::escrow_confirmed) > 0).await;
    leader
}

/// Cuts `node` off from every other node, both ways, or heals the cut.
pub fn cut(world: &World, node: u64, off: bool) {
    for other in world.ids().into_iter().filter(|id| *id != node) {
        for (from, to) in [(node, other), (other, node)] {
            if off {
                world.net.cut(from, to);
            } else {
                world.net.uncut(from, to);
            }
        }
    }
}
