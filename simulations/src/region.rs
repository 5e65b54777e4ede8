//! Losing the primary region, in a quarter of the runs: the whole region
//! goes dark at a random moment, sometimes just after the DR region was cut
//! off for a while and is still catching up. An operator then does what
//! `docs/operations.md` says, against whatever else goes wrong meanwhile:
//!
//! 1. forces a failover on the DR node with the most advanced copy
//!    (`Node::start_failover`), retrying while it is refused;
//! 2. lets the lost region return from its disks: its nodes must learn
//!    they are fenced and take no write, which a probe checks by trying
//!    one on each of them in turn until the failback. In a third of the
//!    runs some of those disks are gone for good, those with the most
//!    up-to-date logs: those nodes come back empty;
//! 3. fails back: reconciles with the lost primary's copy (naming the
//!    lost disks' nodes as `copies_lost`, if any), wipes the returning
//!    nodes and rejoins them (`Node::start_failback`, twice);
//! 4. sometimes switches writes home.
//!
//! What the crowd was told meanwhile is checked as in every run, except
//! that an acknowledgement the failover's report names may be lost (see
//! [`crate::checkers`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use cluster::{DrillReport, Node};
use domain::{Failover, GroupState, Reconciliation, SessionId};
use rand::Rng;

use crate::faults::{Fault, Scheduled};
use crate::workload::Oracle;
use crate::world::World;

/// The region that takes writes, and the one that takes over.
const LOST: &str = "primary";
const DR: &str = "dr";
/// How long the operator keeps trying each step before the run fails.
const STEP_MAX: Duration = Duration::from_secs(60);
/// Between two tries of a refused step.
const RETRY_EVERY: Duration = Duration::from_millis(300);

/// When the region is lost and how the operator goes about it, drawn from
/// the seed.
#[derive(Clone, Debug)]
pub struct Plan {
    pub at_ms: u64,
    /// From the loss until the operator forces the failover.
    pub failover_after_ms: u64,
    /// From the failover until the lost region returns...
    pub return_after_ms: u64,
    /// ...and from then until the operator fails back.
    pub failback_after_ms: u64,
    /// Writes go home once the region has rejoined.
    pub home: bool,
    /// A second operator forces the failover on the other DR nodes at the
    /// same moment: at most one of them may go on.
    pub racing: bool,
    /// The DR region cut off before the loss, healing this soon before
    /// it: the loss then hits while the DR copy catches up.
    pub catch_up: Option<Scheduled>,
    /// How many nodes of the lost region lose their disks for good, those
    /// with the most up-to-date logs (the worst case: the zone that held
    /// the leader burned): they return empty, and failback goes without
    /// their copies.
    pub disks_lost: usize,
}

/// Draws the plan of a run that loses its region between `from_ms` and
/// `until_ms`.
pub fn plan(world: &World, from_ms: u64, until_ms: u64) -> Plan {
    world.draw(|rng| {
        let at_ms = rng.gen_range(from_ms + 6_000..until_ms);
        let catch_up = rng.gen_bool(0.5).then(|| {
            let for_ms = rng.gen_range(2_000..12_000).min(at_ms - from_ms);
            let healed_before = rng.gen_range(0..600).min(for_ms / 2);
            Scheduled {
                at_ms: at_ms - for_ms,
                for_ms: for_ms - healed_before,
                fault: Fault::Isolate { nodes: world.region(DR) },
            }
        });
        Plan {
            at_ms,
            failover_after_ms: rng.gen_range(100..3_000),
            return_after_ms: rng.gen_range(500..5_000),
            failback_after_ms: rng.gen_range(1_000..8_000),
            home: rng.gen_bool(0.5),
            catch_up,
            racing: rng.gen_bool(0.5),
            disks_lost: if rng.gen_bool(1.0 / 3.0) { rng.gen_range(1..=world.region(LOST).len()) } else { 0 },
        }
    })
}

/// What the checkers need to know of a region loss.
#[derive(Debug, Default)]
pub struct Lost {
    pub at_ms: u64,
    /// The linearizability history's length at the loss...
    pub lin_cut: usize,
    /// ...and the checkout each of its processes had in flight then, if
    /// any: (qty, session, key).
    pub lin_in_flight: BTreeMap<usize, (u64, SessionId, String)>,
    /// What the forced failover reported it may have lost.
    pub failover: Option<Failover>,
    /// When the lost region came back: fenced, it acknowledges nothing
    /// from then on.
    pub returned_at_ms: Option<u64>,
    /// The lost primary's most advanced copy, read when it returned (with
    /// every disk, even one about to be lost: the checkers' truth).
    pub old_copy: Option<GroupState>,
    /// What the failback found to settle, when its report came back.
    pub reconciliation: Option<Reconciliation>,
}

impl Lost {
    /// Whether the failover named `order` as possibly lost (or its payment
    /// as in doubt).
    pub fn names(&self, order: u64) -> bool {
        self.failover.as_ref().is_some_and(|failover| failover.names(order))
    }
}

/// Runs the plan; each step that cannot be done in time fails the run.
pub async fn run(world: Rc<World>, oracle: Rc<RefCell<Oracle>>, plan: Plan) {
    tokio::time::sleep(Duration::from_millis(plan.at_ms.saturating_sub(world.trace.now_ms()))).await;
    {
        let mut oracle = oracle.borrow_mut();
        let lost = Lost {
            at_ms: world.trace.now_ms(),
            lin_cut: oracle.lin.events.len(),
            lin_in_flight: oracle.lin.in_flight.clone(),
            ..Lost::default()
        };
        oracle.region_lost = Some(lost);
    }
    world.lose_region(LOST).await;

    tokio::time::sleep(Duration::from_millis(plan.failover_after_ms)).await;
    match fail_over(&world, plan.racing).await {
        Ok(failover) => {
            world.trace.event(format!("failover reported: {failover:?}"));
            oracle.borrow_mut().region_lost.as_mut().expect("set above").failover = Some(failover);
        }
        Err(why) => world.fail(format!("forced failover: {why}")),
    }

    tokio::time::sleep(Duration::from_millis(plan.return_after_ms)).await;
    oracle.borrow_mut().region_lost.as_mut().expect("set above").returned_at_ms = Some(world.trace.now_ms());
    world.return_region(LOST).await;
    let mut disks_lost = Vec::new();
    if plan.disks_lost > 0 {
        let freshest = freshest_first(&world).await;
        // What the lost disks held is still the checkers' truth.
        let old_copy = freshest.first().and_then(|node| node.group().copy_with_log().ok());
        oracle.borrow_mut().region_lost.as_mut().expect("set above").old_copy = old_copy;
        disks_lost = freshest.iter().take(plan.disks_lost).map(Node::id).collect();
        for &id in &disks_lost {
            world.wipe(id).await;
        }
    }
    let probes = probe_fence(&world, Duration::from_millis(plan.failback_after_ms)).await;
    // What the surviving disks hold once the probes are done.
    let fenced_copy = if disks_lost.is_empty() { None } else { old_copy(&world).await };
    if let Err(why) = fail_back(&world, &oracle, &disks_lost).await {
        world.fail(format!("failback: {why}"));
        return;
    }
    let fenced_copy = fenced_copy.or_else(|| oracle.borrow().region_lost.as_ref().and_then(|l| l.old_copy.clone()));
    // A probe's session placed no order, but no run lasts the
    // `SESSION_IDLE_MS` it would take to close: had the fence let one
    // open, it is still there.
    if let Some(token) =
        probes.iter().find(|token| fenced_copy.as_ref().is_some_and(|c| c.session_by_token(token).is_some()))
    {
        world.fail(format!("the fenced old primary opened a session for probe token {token} though it answered no"));
    }
    if plan.home {
        crate::faults::switch(&world, LOST);
    }
}

/// While the old primary is back and not yet wiped, `for_` long: tries a
/// write (opening a session) on each of its nodes in turn, as a client
/// that still knows only them would. Every one must be refused: the
/// region is fenced. Returns the probes' tokens; the caller checks that
/// none of them took effect unseen (an answer lost on the way back).
async fn probe_fence(world: &World, for_: Duration) -> Vec<String> {
    let until = tokio::time::Instant::now() + for_;
    let mut tokens = Vec::new();
    let returning = world.region(LOST);
    let mut next = 0;
    while tokio::time::Instant::now() < until {
        let id = returning[next % returning.len()];
        next += 1;
        if let Some(node) = world.node(id) {
            let token = format!("{:064x}", u64::MAX - tokens.len() as u64);
            tokens.push(token.clone());
            let write = node.open_session("fence-probe".into(), token);
            match tokio::time::timeout(Duration::from_secs(2), write).await {
                Ok(Ok(outcome)) => {
                    world.fail(format!("node {id} of the fenced old primary took a write: {outcome:?}"));
                    tokens.pop();
                    return tokens;
                }
                Ok(Err(refused)) => world.trace.event(format!("fence probe on node {id}: {refused}")),
                Err(_) => world.trace.event(format!("fence probe on node {id}: no answer")),
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    tokens
}

/// The copy failback reconciles with, whole: the most up-to-date log of
/// the returning region's.
async fn old_copy(world: &World) -> Option<GroupState> {
    freshest_first(world).await.first().and_then(|node| node.group().copy_with_log().ok())
}

/// The returning region's nodes that are up, the most up-to-date log first
/// (as Raft compares logs for a vote, then the most applied). Waits
/// (bounded) until all are up, as failback did; a fault may take one down
/// just after.
async fn freshest_first(world: &World) -> Vec<Node> {
    let deadline = tokio::time::Instant::now() + STEP_MAX;
    let returning = world.region(LOST);
    while returning.iter().any(|&id| world.node(id).is_none()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut nodes: Vec<Node> = returning.into_iter().filter_map(|id| world.node(id)).collect();
    nodes.sort_by_cached_key(|node| {
        let status = node.group().status();
        std::cmp::Reverse((status.last_log_term, status.last_log_index, status.applied_index))
    });
    nodes
}

/// Forces the failover on the most advanced DR node that is up, again and
/// again until one has founded the new group; returns the cost it
/// reported, as the promoted copy keeps it (`GroupState::last_failover`):
/// the drill's own report dies with its node if that node crashes midway.
/// `racing`: the first time, a second operator forces it on every other DR
/// node at once.
async fn fail_over(world: &World, mut racing: bool) -> Result<Failover, String> {
    let deadline = tokio::time::Instant::now() + STEP_MAX;
    let mut last = String::from("never tried");
    while tokio::time::Instant::now() < deadline {
        if let Some(failover) = promoted(world) {
            return Ok(failover);
        }
        let mut candidates: Vec<(u64, Node, u64)> = world
            .region(DR)
            .into_iter()
            .filter_map(|id| world.node(id).map(|node| (node.group().status().applied_index, node, world.life(id))))
            .collect();
        candidates.sort_by_key(|(applied, node, _)| (std::cmp::Reverse(*applied), node.id()));
        if std::mem::take(&mut racing) {
            for (_, node, _) in candidates.iter().skip(1) {
                let (node, trace) = (node.clone(), world.trace.clone());
                actix_rt::spawn(async move {
                    match node.start_failover(DR, "a second operator").await {
                        Ok(report) => {
                            trace.event(format!("racing failover {} forced on node {}", report.id, node.id()))
                        }
                        Err(refused) => {
                            trace.event(format!("racing failover refused by node {}: {refused}", node.id()))
                        }
                    }
                });
            }
        }
        for (_, node, life) in candidates {
            match node.start_failover(DR, "simulator").await {
                Ok(report) => {
                    world.trace.event(format!("failover {} forced on node {}", report.id, node.id()));
                    // Until it ends, or founds the group and its node crashes.
                    while promoted(world).is_none() && tokio::time::Instant::now() < deadline {
                        match node.drill_report(report.id) {
                            _ if world.life(node.id()) != life => {
                                last = format!("failover on node {}: the node went down", node.id());
                                break;
                            }
                            Some(report) if report.state == "running" => {}
                            other => {
                                last = format!("failover on node {}: {:?}", node.id(), other.map(|r| r.failure));
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    break;
                }
                Err(refused) => last = format!("node {} refused: {refused}", node.id()),
            }
            world.trace.event(last.clone());
        }
        world.trace.event(last.clone());
        tokio::time::sleep(RETRY_EVERY).await;
    }
    Err(format!("none completed in {STEP_MAX:?}; last: {last}"))
}

/// The failover a DR node's copy was promoted with, once one was.
fn promoted(world: &World) -> Option<Failover> {
    world.region(DR).into_iter().filter_map(|id| world.node(id)).find_map(|node| {
        node.read_local(|state| (state.primary_region() == Some(DR)).then(|| state.last_failover().cloned()).flatten())
    })
}

/// Reconciles with the returned region (going without the copies of
/// `disks_lost`), wipes its nodes, and rejoins them until all are members
/// of the group again.
async fn fail_back(world: &World, oracle: &RefCell<Oracle>, disks_lost: &[u64]) -> Result<(), String> {
    // Reconcile: every returning node must answer with its copy, but those
    // whose disks are lost.
    let deadline = tokio::time::Instant::now() + STEP_MAX;
    // A settlement that committed though its drill failed counts.
    while !leader(world).is_some_and(|leader| leader.read_local(GroupState::failover_settled)) {
        match failback_once(world, disks_lost).await {
            Ok(report) => {
                world.trace.event(format!(
                    "failback {}: {:?}, reconciliation {:?}",
                    report.state, report.failure, report.reconciliation
                ));
                if report.reconciliation.is_some() {
                    // What the checkers decide in-flight checkouts by: the
                    // copy reconcile read, read again at once (unless the
                    // lost disks' truth was read before they were lost).
                    let old_copy = if disks_lost.is_empty() { old_copy(world).await } else { None };
                    let mut oracle = oracle.borrow_mut();
                    let lost = oracle.region_lost.as_mut().expect("lost");
                    lost.reconciliation = report.reconciliation;
                    lost.old_copy = old_copy.or(lost.old_copy.take());
                }
            }
            Err(why) => world.trace.event(format!("failback not started: {why}")),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no reconciliation in {STEP_MAX:?}"));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    // A settlement whose report was lost (its coordinator crashed) still
    // read a copy: read it now.
    if oracle.borrow().region_lost.as_ref().is_some_and(|lost| lost.old_copy.is_none()) {
        let old_copy = old_copy(world).await;
        oracle.borrow_mut().region_lost.as_mut().expect("lost").old_copy = old_copy;
    }

    // Wipe the nodes that still hold the old copy. One whose disk was lost
    // came back empty, and the reconciling failback may have let it join
    // already: a member's log must never go back.
    let deadline = tokio::time::Instant::now() + STEP_MAX;
    let members = loop {
        if let Some(leader) = leader(world) {
            break leader.group().members();
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no leader to wipe against in {STEP_MAX:?}"));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    };
    for id in world.region(LOST).into_iter().filter(|id| !members.contains(id)) {
        world.wipe(id).await;
    }
    let deadline = tokio::time::Instant::now() + STEP_MAX;
    loop {
        if let Some(leader) = leader(world) {
            if leader.group().members().len() == world.ids().len() {
                world.trace.event("the lost region rejoined");
                return Ok(());
            }
        }
        match failback_once(world, &[]).await {
            Ok(report) => world.trace.event(format!("rejoin {}: {:?}", report.state, report.failure)),
            Err(why) => world.trace.event(format!("rejoin not started: {why}")),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the region did not rejoin in {STEP_MAX:?}"));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// One failback, asked of the leader, until it finishes.
async fn failback_once(world: &World, copies_lost: &[u64]) -> Result<DrillReport, String> {
    let leader = leader(world).ok_or("no leader")?;
    let report = leader.start_failback(LOST, copies_lost, "simulator").await.map_err(|e| e.to_string())?;
    finished(&leader, report.id).await
}

/// The node of the DR region that leads, if any.
fn leader(world: &World) -> Option<Node> {
    world.region(DR).into_iter().filter_map(|id| world.node(id)).find(|node| node.group().is_leader())
}

/// Drill `id` of `node` once it has finished.
async fn finished(node: &Node, id: u64) -> Result<DrillReport, String> {
    let deadline = tokio::time::Instant::now() + STEP_MAX;
    loop {
        match node.drill_report(id) {
            Some(report) if report.state != "running" => return Ok(report),
            Some(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(_) => return Err(format!("drill {id} still running after {STEP_MAX:?}")),
            None => return Err(format!("drill {id} is not on record")),
        }
    }
}
