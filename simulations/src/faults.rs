//! The fault schedule: drawn from the seed at the start of a run, applied
//! while the crowd shops, and all healed by its end. Faults overlap: a zone
//! may be cut off while another node crashes and the network drops packets.

use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

use rand::Rng;

use crate::net::Weather;
use crate::world::World;

/// One thing that goes wrong.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Cut `nodes` off from every other node, both ways: one node, a
    /// whole zone, the tiebreaker, the DR region.
    Isolate { nodes: Vec<u64> },
    /// Cut one direction only: `from` cannot reach `to`.
    OneWay { from: u64, to: u64 },
    /// Power cut to these nodes (one, a whole zone, or every node); each
    /// restarts from its disk when the fault ends.
    Crash { nodes: Vec<u64> },
    /// The node's clock jumps by `delta_ms` (and stays jumped).
    ClockJump { node: u64, delta_ms: i64 },
    /// Messages are slower, some lost, some delivered twice.
    Storm { weather: Weather },
    /// The node's disk fails every write and sync; Raft stops the node,
    /// which restarts from its disk when the fault ends.
    DiskFails { node: u64 },
    /// The node's disk takes `ms` longer for every durable log write (a
    /// dying or overloaded device): a leader's commits, a follower's
    /// appends and a candidate's vote all wait for it.
    SlowDisk { node: u64, ms: u64 },
    /// Not a fault but an operator: a planned switchover of writes to the
    /// DR region, and the failback when it ends, each asked of whichever
    /// node leads then, amid whatever else goes wrong.
    Switchover,
    /// The node's disk is lost for good. It goes down as in a power cut;
    /// the fault lasts until a new, empty disk is in. Meanwhile, and after,
    /// an operator follows docs/operations.md ("Replacing a node whose disk
    /// is lost"): asks the leader to replace it, starts it wiped once the
    /// leader has added it back, and asks again whenever a replacement is
    /// cut short, until it is a member in its old role with the whole log.
    DiskLost { node: u64 },
}

/// By then a node whose disk was lost must be a member again with the
/// whole log: every fault has healed long before.
const REPLACED_BY_MS: u64 = 80_000;

/// A fault, when it starts and how long it lasts.
#[derive(Clone, Debug)]
pub struct Scheduled {
    pub at_ms: u64,
    pub for_ms: u64,
    pub fault: Fault,
}

/// Draws a schedule of faults between `from_ms` and `until_ms`, each ending
/// by `until_ms`.
pub fn schedule(world: &World, from_ms: u64, until_ms: u64) -> Vec<Scheduled> {
    let ids = world.ids();
    let mut faults = Vec::new();
    let mut at = from_ms;
    loop {
        at += world.draw(|rng| rng.gen_range(1_000..6_000));
        if at + 500 >= until_ms {
            break;
        }
        let mut for_ms = world.draw(|rng| rng.gen_range(500..8_000)).min(until_ms - at);
        let fault = world.draw(|rng| match rng.gen_range(0..15) {
            0 => Fault::Isolate { nodes: vec![ids[rng.gen_range(0..ids.len())]] },
            1 => Fault::Isolate { nodes: world.zone("a") },
            2 => Fault::Isolate { nodes: world.zone("b") },
            3 => Fault::Isolate { nodes: world.zone("t") },
            4 => {
                let from = ids[rng.gen_range(0..ids.len())];
                let to = ids[rng.gen_range(0..ids.len())];
                Fault::OneWay { from, to }
            }
            5 | 6 => Fault::Crash { nodes: vec![ids[rng.gen_range(0..ids.len())]] },
            9 => Fault::Crash { nodes: world.zone(["a", "b"][rng.gen_range(0..2)]) },
            10 => Fault::Crash { nodes: ids.clone() },
            11 => Fault::DiskFails { node: ids[rng.gen_range(0..ids.len())] },
            14 => Fault::SlowDisk { node: ids[rng.gen_range(0..ids.len())], ms: rng.gen_range(10..1_500) },
            7 => Fault::ClockJump { node: ids[rng.gen_range(0..ids.len())], delta_ms: rng.gen_range(-3_000..3_000) },
            // A run that loses its region does not also switch over (see
            // `crate::region`): the region that takes writes is the one lost.
            13 if !world.region_loss => Fault::Switchover,
            // A run that loses its region cuts the DR region off right
            // before the loss instead (`crate::region::Plan::catch_up`).
            12 if !world.region_loss => {
                // The DR region cut off for long: the primary must not notice.
                for_ms = rng.gen_range(5_000..30_000).min(until_ms - at);
                Fault::Isolate { nodes: world.zone("d") }
            }
            _ => Fault::Storm {
                weather: Weather {
                    delay_ms: (1, rng.gen_range(5..150)),
                    drop_per_mille: rng.gen_range(0..200),
                    duplicate_per_mille: rng.gen_range(0..50),
                },
            },
        });
        faults.push(Scheduled { at_ms: at, for_ms, fault });
    }
    // One disk lost for good in a third of the runs that keep their region:
    // Raft survives a minority of lost disks, not a majority.
    if !world.region_loss && world.draw(|rng| rng.gen_range(0..3)) == 0 && until_ms > from_ms + 10_000 {
        let (at_ms, for_ms, node) = world.draw(|rng| {
            (rng.gen_range(from_ms..until_ms - 10_000), rng.gen_range(500..8_000), ids[rng.gen_range(0..ids.len())])
        });
        faults.push(Scheduled { at_ms, for_ms, fault: Fault::DiskLost { node } });
    }
    faults
}

/// Applies `scheduled` at its time and undoes it when it ends.
pub async fn run(world: Rc<World>, scheduled: Scheduled) {
    let Scheduled { at_ms, for_ms, fault } = scheduled;
    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(world.trace.now_ms()))).await;
    world.trace.event(format!("fault {fault:?} for {for_ms} ms"));
    let ids = world.ids();
    let cuts: Vec<(u64, u64)> = match &fault {
        Fault::Isolate { nodes } => nodes
            .iter()
            .flat_map(|&inside| {
                ids.iter().filter(|id| !nodes.contains(id)).flat_map(move |&out| [(inside, out), (out, inside)])
            })
            .collect(),
        Fault::OneWay { from, to } if from != to => vec![(*from, *to)],
        _ => Vec::new(),
    };
    for &(from, to) in &cuts {
        world.net.cut(from, to);
    }
    match &fault {
        Fault::Crash { nodes } => {
            for &node in nodes {
                world.crash(node).await;
            }
        }
        Fault::ClockJump { node, delta_ms } => world.jump_clock(*node, *delta_ms),
        Fault::Storm { weather } => world.net.set_weather(*weather),
        Fault::DiskFails { node } => world.set_disk_failing(*node, true),
        Fault::SlowDisk { node, ms } => world.set_disk_slow(*node, Duration::from_millis(*ms)),
        Fault::Switchover => switch(&world, "dr"),
        Fault::DiskLost { node } => {
            world.lose_disk(*node).await;
            replace_disk(&world, *node, at_ms + for_ms).await;
        }
        _ => {}
    }
    tokio::time::sleep(Duration::from_millis((at_ms + for_ms).saturating_sub(world.trace.now_ms()))).await;
    for &(from, to) in &cuts {
        world.net.uncut(from, to);
    }
    match &fault {
        Fault::Crash { nodes } => {
            for &node in nodes {
                if !world.is_up(node) {
                    if let Err(error) = world.start(node).await {
                        world.fail(format!("restart after a crash: {error}"));
                    }
                }
            }
        }
        Fault::Storm { .. } => world.net.set_weather(Weather::CALM),
        Fault::DiskFails { node } => {
            world.set_disk_failing(*node, false);
            world.reap().await;
            if !world.is_up(*node) {
                if let Err(error) = world.start(*node).await {
                    world.fail(format!("restart after a disk failure: {error}"));
                }
            }
        }
        Fault::SlowDisk { node, .. } => world.set_disk_slow(*node, Duration::ZERO),
        Fault::Switchover => switch(&world, "primary"),
        _ => {}
    }
    world.reap().await;
    world.trace.event(format!("healed {fault:?}"));
}

/// Whether node `id` votes, as the leader (or, with none, the topology)
/// sees it.
fn was_voter(world: &World, id: u64) -> bool {
    match leader(world) {
        Some(leader) => {
            leader.group().raft().metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id)
        }
        None => world.topology.node(id).is_some_and(|spec| spec.role == cluster::Role::Voter),
    }
}

/// The node that leads now, if any (not one cut off from its quorum).
pub fn leader(world: &World) -> Option<cluster::Node> {
    world
        .ids()
        .into_iter()
        .filter_map(|id| world.node(id))
        .find(|node| node.group().is_leader() && !node.group().is_cut_off())
}

/// The operator's side of a lost disk (see [`Fault::DiskLost`]): node
/// `id`'s new disk is in from `disk_in_at_ms`.
async fn replace_disk(world: &World, id: u64, disk_in_at_ms: u64) {
    let mut voter = was_voter(world, id);
    // The replacement asked for: its coordinator, in the life it was asked
    // in, and its id.
    let mut asked: Option<(cluster::Node, u64, u64)> = None;
    let mut started = false;
    // Once a replacement started, asking again says nothing of the role:
    // the one cut short recorded it (docs/operations.md).
    let mut first_started = false;
    // Whether a replacement completed: the node has only to catch up, and
    // an operator does not ask for another.
    let mut completed = false;
    let mut leader_had = None;
    // Switchovers completed when the first replacement started.
    let mut switchovers_then = BTreeSet::new();
    loop {
        if replaced(world, id, voter, &mut leader_had) {
            world.copy_restored(id);
            world.disks_replaced.set(world.disks_replaced.get() + 1);
            let role = if voter { "voter" } else { "learner" };
            world.trace.event(format!("node {id} replaced: a {role} with the whole log"));
            return;
        }
        if world.trace.now_ms() > REPLACED_BY_MS {
            world.fail(format!("node {id} lost its disk and was not replaced by {REPLACED_BY_MS} ms"));
            // Up all the same, so the rest of the run's checks can go on.
            let _ = world.start_wiped(id).await;
            return;
        }
        // A coordinator that went down since took its report with it, even
        // if its dead life still shows one (seed 43001350: it showed
        // "running" for good, and nobody asked again).
        let report = asked
            .as_ref()
            .filter(|(coordinator, life, _)| world.life(coordinator.id()) == *life)
            .and_then(|(coordinator, _, report)| coordinator.drill_report(*report));
        completed |= report.as_ref().is_some_and(|report| report.state == "completed");
        if first_started {
            // A switchover since the first replacement started moved every
            // role, and a replacement started later took the node's from the
            // group then (seed 990184): the node is to end a voter only if
            // the latest such switchover made it one.
            let switchovers: Vec<_> =
                leader(world).map(|leader| completed_switchovers(leader.drill_reports()).collect()).unwrap_or_default();
            if let Some(latest) = switchovers.iter().rev().find(|report| !switchovers_then.contains(&drill_key(report)))
            {
                voter = latest.nodes.contains(&id);
            }
        }
        let added_back = report.as_ref().is_some_and(|report| report.added_back);
        if added_back && !started && world.trace.now_ms() >= disk_in_at_ms {
            started = true;
            world.trace.event(format!("node {id} starts wiped on its new disk"));
            if let Err(error) = world.start_wiped(id).await {
                world.fail(format!("starting node {id} on its new disk: {error}"));
            }
        }
        if !completed && report.is_none_or(|report| report.state != "running") {
            if !first_started {
                // The role is the node's as the operator asks: a switchover
                // that ran while the replacement was refused may have made
                // a voter a learner since the disk was lost.
                voter = was_voter(world, id);
            }
            let role = (!first_started).then_some(voter);
            let coordinator = leader(world).map(|leader| (world.life(leader.id()), leader));
            asked = match coordinator {
                // What a coordinator that went down before it answered said
                // is lost with the connection.
                Some((life, leader)) => {
                    match world
                        .ask(leader.id(), |node| async move { node.start_replace(id, role, "simulator").await })
                        .await
                    {
                        None => {
                            world.trace.event(format!("replacement of node {id}: node {} went down", leader.id()));
                            None
                        }
                        Some(Ok(report)) => {
                            if !first_started {
                                // As the leader that took the request has them.
                                switchovers_then = completed_switchovers(leader.drill_reports())
                                    .map(|report| drill_key(&report))
                                    .collect();
                            }
                            first_started = true;
                            world.trace.event(format!(
                                "replacement {} of node {id} started by node {}",
                                report.id, report.coordinator
                            ));
                            Some((leader, life, report.id))
                        }
                        Some(Err(error)) => {
                            world.trace.event(format!("replacement of node {id} not started: {error}"));
                            None
                        }
                    }
                }
                None => None,
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The switchovers that completed among `reports`, oldest first.
fn completed_switchovers(reports: Vec<cluster::DrillReport>) -> impl Iterator<Item = cluster::DrillReport> {
    reports.into_iter().filter(|report| report.kind == "switchover" && report.state == "completed")
}

/// What tells drills apart: ids are unique per coordinator.
fn drill_key(report: &cluster::DrillReport) -> (u64, u64) {
    (report.id, report.coordinator)
}

/// Whether node `id` is up and, as the leader sees it, a member holding
/// all the log the leader had when last asked (`leader_had`, updated):
/// a voter again if it was one. Under a steady stream of appends, what a
/// follower acknowledged trails the leader's last entry by a round trip.
fn replaced(world: &World, id: u64, voter: bool, leader_had: &mut Option<u64>) -> bool {
    let Some(leader) = leader(world) else { return false };
    let metrics = leader.group().raft().metrics().borrow().clone();
    let had = std::mem::replace(leader_had, metrics.last_log_index);
    let membership = metrics.membership_config.membership();
    let role_back = membership.get_node(&id).is_some() && (!voter || membership.voter_ids().any(|v| v == id));
    let matched = metrics.replication.as_ref().and_then(|replication| replication.get(&id).copied().flatten());
    let whole_log = had.is_some() && matched.map(|log_id| log_id.index) >= had;
    let up_with_a_log =
        world.node(id).is_some_and(|node| node.group().raft().metrics().borrow().last_log_index.is_some());
    up_with_a_log && role_back && whole_log
}

/// Asks the node that leads now, if any, to move writes to `region`. A
/// refusal (no leader, the region takes writes already, a switchover still
/// running) is part of the run, not a failure.
pub(crate) fn switch(world: &World, region: &str) {
    let leader = world.ids().into_iter().filter_map(|id| world.node(id)).find(|node| node.group().is_leader());
    let Some(leader) = leader else {
        world.trace.event(format!("switchover to {region} not started: no leader"));
        return;
    };
    let trace = world.trace.clone();
    let region = region.to_string();
    actix_rt::spawn(async move {
        match leader.start_switchover(&region, "simulator").await {
            Ok(report) => {
                trace.event(format!("switchover {} to {region} started by node {}", report.id, report.coordinator))
            }
            Err(error) => trace.event(format!("switchover to {region} not started: {error}")),
        }
    });
}
