//! The zone-loss drill: cut every node of one zone off from the cluster for
//! a while, keep checking out through a node that survives, and report what
//! a shopper would have seen.
//!
//! ```text
//!  baseline ── isolate zone ── probe … probe ── isolation lifts ── probe 3 leases more ── every node caught up
//!   (one ok)     (t = 0)      first failure ▲   first success ▲   (in case the rejoining     ── acknowledged
//!                                            └─ unavailable ─┘    nodes cost a second           orders read back
//!                                                                 outage)
//! ```
//!
//! The probe is a synthetic shopper on a sale of its own (`drill-<id>`), so
//! the drill measures checkout through the real actors, forwarding and Raft
//! path without touching any real sale's stock. It checks out one unit at a
//! time, one attempt every [`PROBE_EVERY`]. An attempt that gets no outcome
//! is retried with the same idempotency key, so no probe order is placed
//! twice. **Unavailability** is the longest stretch from the start of a
//! failed attempt to the end of the next successful one.
//!
//! Isolation lifts by itself on every isolated node at its deadline: a
//! coordinator that dies mid-drill cannot leave a zone cut off.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use domain::{Command, Line, OrderId, Outcome, Rejection, Sale, SessionId};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::node::Node;

/// Time between two probe checkouts.
pub const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Shortest and longest isolation a drill accepts.
pub const ISOLATE_FOR_MIN: Duration = Duration::from_secs(1);
/// See [`ISOLATE_FOR_MIN`].
pub const ISOLATE_FOR_MAX: Duration = Duration::from_secs(600);
/// How long the drill waits, before and after the isolation, for checkout
/// to work and for every node to catch up, before it gives up.
pub(crate) const SETTLE_MAX: Duration = Duration::from_secs(30);
/// Drill reports a node keeps (the oldest go first).
const REPORTS_KEPT: usize = 64;
/// Units on the probe's sale: more than a drill can use at one checkout
/// per [`PROBE_EVERY`] for [`ISOLATE_FOR_MAX`] plus the settling.
const PROBE_STOCK: u64 = 1_000_000;
/// Probe checkouts per session; below the state machine's bound per session.
const PROBE_CHECKOUTS_PER_SESSION: u32 = 200;
/// Probe orders are never paid: they return their unit after this.
const PROBE_HOLD_MS: u64 = 2_000;

/// A drill's progress and findings. Updated while it runs; final once
/// `state` is no longer `running`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrillReport {
    /// Unique per coordinator: the coordinator's clock at the start, in ms.
    pub id: u64,
    /// `zone-loss`, `switchover`, `failover` or `failback`.
    pub kind: String,
    /// The zone cut off (zone-loss).
    pub zone: String,
    /// The nodes of that zone; for a switchover, the voters afterwards.
    pub nodes: Vec<u64>,
    /// A switchover's target region.
    #[serde(default)]
    pub region: Option<String>,
    /// How long a switchover refused writes, from the freeze to the
    /// promotion.
    #[serde(default)]
    pub frozen_ms: Option<u64>,
    /// The node that ran the drill and its probe.
    pub coordinator: u64,
    /// Who asked for it (the operator endpoint says `operator`).
    pub requested_by: String,
    /// `running`, `completed` or `failed`.
    pub state: String,
    /// Why the drill failed, when it did.
    pub failure: Option<String>,
    /// Coordinator clock at the start and the end, ms since the epoch.
    pub started_at_ms: u64,
    /// See `started_at_ms`.
    pub finished_at_ms: Option<u64>,
    /// How long the zone was cut off.
    pub isolated_for_ms: u64,
    /// What happened when, in ms since the drill started.
    pub timeline: Vec<DrillEvent>,
    /// Longest time checkout was unavailable: from the start of a failed
    /// probe checkout to the end of the next successful one. 0 if none failed.
    pub checkout_unavailable_ms: u64,
    /// All such stretches added up: the cut itself, and any after the heal.
    /// With pre-vote (see [`crate::Group::pre_vote`]) the returning nodes'
    /// terms have not moved, so they follow the leader and cost none.
    pub checkout_unavailable_total_ms: u64,
    /// Probe checkouts attempted (retries included) and acknowledged while
    /// the zone was cut off or recovering.
    pub probe_attempts: u64,
    /// See `probe_attempts`.
    pub orders_acknowledged: u64,
    /// Acknowledged probe orders that could not be read back afterwards.
    pub orders_lost: Vec<OrderId>,
    /// Units sold or held beyond a SKU's total, over every SKU, afterwards.
    pub oversold_units: u64,
    /// From the end of the isolation until every node had applied what the
    /// leader had committed then; absent if that did not happen in time.
    pub caught_up_ms: Option<u64>,
    /// A forced failover's cost: the promoted copy, its lag at the cut, the
    /// units out of sale and the order ids that may be lost.
    #[serde(default)]
    pub failover: Option<crate::FailoverPreview>,
    /// A failback's reconciliation: the orders the two regions disagree
    /// on, for an operator to settle, and the units it put back on sale.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub reconciliation: Option<domain::Reconciliation>,
    /// A node replacement: the node has left the group and is a learner
    /// again, with nothing acknowledged. It may start wiped from now on,
    /// not before (see [`crate::replace`]); one that left running catches
    /// up from its log.
    #[serde(default)]
    pub added_back: bool,
    /// A node replacement: whether the node ends as a voter. Recorded
    /// before anything changes, so that asking again after a run was cut
    /// short finishes what it meant to do. `None` once a run could not
    /// record its start: it changed nothing and says nothing of the role
    /// (and on a report recorded before Surge kept this).
    #[serde(default)]
    pub voter_after: Option<bool>,
}

impl DrillReport {
    /// A drill of `kind` starting now, nothing measured yet.
    pub(crate) fn started(kind: &str, coordinator: u64, requested_by: &str, now_ms: u64) -> DrillReport {
        DrillReport {
            id: now_ms,
            kind: kind.into(),
            zone: String::new(),
            nodes: Vec::new(),
            region: None,
            frozen_ms: None,
            coordinator,
            requested_by: requested_by.to_string(),
            state: "running".into(),
            failure: None,
            started_at_ms: now_ms,
            finished_at_ms: None,
            isolated_for_ms: 0,
            timeline: Vec::new(),
            checkout_unavailable_ms: 0,
            checkout_unavailable_total_ms: 0,
            probe_attempts: 0,
            orders_acknowledged: 0,
            orders_lost: Vec::new(),
            oversold_units: 0,
            caught_up_ms: None,
            failover: None,
            reconciliation: None,
            added_back: false,
            voter_after: None,
        }
    }
}

/// One line of a drill's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrillEvent {
    /// Ms since the drill started.
    pub at_ms: u64,
    /// What happened.
    pub what: String,
}

/// Why a drill was not started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DrillError {
    /// The topology has no node in that zone.
    #[error("no node is in zone {0:?}")]
    UnknownZone(String),
    /// The node asked to coordinate is in the zone to be cut off.
    #[error("node {coordinator} is in zone {zone:?}: ask a node outside it (nodes {outside:?})")]
    CoordinatorInZone {
        /// This node.
        coordinator: u64,
        /// The zone.
        zone: String,
        /// Nodes that could coordinate.
        outside: Vec<u64>,
    },
    /// Cutting the zone off would leave no Raft majority.
    #[error("losing zone {zone:?} leaves {left} of {voters} voters: checkout would stop, not a drill")]
    LosesQuorum {
        /// The zone.
        zone: String,
        /// Voters left.
        left: usize,
        /// All voters.
        voters: usize,
    },
    /// `isolate_for` is outside [`ISOLATE_FOR_MIN`]..=[`ISOLATE_FOR_MAX`].
    #[error("isolate_for must be between {min:?} and {max:?}")]
    BadDuration {
        /// Shortest.
        min: Duration,
        /// Longest.
        max: Duration,
    },
    /// This node already runs a drill.
    #[error("drill {0} is still running on this node")]
    AlreadyRunning(u64),
    /// No node is in the region a switchover should move writes to.
    #[error("no node is in region {0:?}")]
    UnknownRegion(String),
    /// The region takes writes already.
    #[error("region {0:?} takes writes already")]
    AlreadyPrimary(String),
    /// A switchover changes the group's membership, which only its leader
    /// can do.
    #[error("only the leader can run a switchover: ask node {leader:?}")]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<u64>,
    },
    /// The region's voters could not survive losing one of its zones.
    #[error("with voters {voters:?}, losing zone {zone:?} of region {region:?} leaves no majority")]
    RegionLosesQuorum {
        /// The target region.
        region: String,
        /// Its fatal zone.
        zone: String,
        /// The voters it would have.
        voters: Vec<u64>,
    },
    /// A node is cut off already (another coordinator's drill): cutting
    /// more could lose the majority.
    #[error("node {0} is isolated by a drill already")]
    AlreadyIsolated(u64),
    /// Nodes of the region that takes writes answer: it is not lost, and a
    /// forced failover would split the sale in two. Move writes with a
    /// switchover instead, or stop those nodes first.
    #[error("nodes {nodes:?} of region {region:?} answer: it is not lost (use a switchover, or stop them first)")]
    PrimaryReachable {
        /// The region that takes writes.
        region: String,
        /// Its nodes that answered.
        nodes: Vec<u64>,
    },
    /// A node does not answer with its copy (down, or its data wiped): for
    /// a failover, it may be the most advanced copy of the region, and only
    /// that one may be promoted; for a failback's reconciliation, it may
    /// hold orders no other copy has.
    #[error("node {0} does not answer with its copy; it may be the most advanced")]
    CopyUnreachable(u64),
    /// Another node of the region has a more advanced copy, or an equal
    /// one and a lower id.
    #[error(
        "node {node} has applied up to log index {applied_index} (this node {own}), and a failover promotes the \
         most advanced copy, the lowest id of equal ones: ask node {node}"
    )]
    CopyBehind {
        /// The node to ask.
        node: u64,
        /// Its applied index.
        applied_index: u64,
        /// This node's.
        own: u64,
    },
    /// A failover to a region runs on one of its nodes.
    #[error("node {node} is not in region {region:?}: ask the region's node with the most advanced copy")]
    OutsideRegion {
        /// The region asked for.
        region: String,
        /// This node.
        node: u64,
    },
    /// A failback named a node of another region as one whose copy is lost.
    #[error("node {node} is not of region {region:?}: only its nodes' copies can be lost to a failback")]
    NotOfRegion {
        /// The node named.
        node: u64,
        /// The region failing back.
        region: String,
    },
    /// A failback needs a forced failover to fail back from.
    #[error("no forced failover happened: move writes back with a switchover")]
    NoFailover,
    /// A failback found nothing due.
    #[error("nothing to fail back: {0}")]
    NothingToFailBack(String),
    /// This node's copy is fenced by a newer generation.
    #[error("this node is fenced by generation {0}: a failover promoted another copy already")]
    Fenced(u64),
    /// The copy holds no escrow grant of its generation yet: the writing
    /// region sold straight from stock until its first one, so what it
    /// may have sold that the copy lacks has no bound.
    #[error(
        "this copy has applied no escrow grant of generation {generation}: region {region:?} sold from all of \
         its stock until its first grant, so what a failover would lose cannot be bounded; wait until the \
         copy has caught up past it"
    )]
    CopyUnbounded {
        /// The copy's generation.
        generation: u64,
        /// The region that takes writes.
        region: String,
    },
    /// The topology has no such node.
    #[error("no node {0} is in the topology")]
    UnknownNode(u64),
    /// The leader cannot remove itself from the group it leads.
    #[error("node {0} leads the group: move leadership to another node first (`surge ctl transfer-leader`)")]
    ReplacesLeader(u64),
    /// The node answers with a log: its disk is not lost.
    #[error(
        "node {node} answers with its log (up to index {last_log_index}): replace only a node whose data is gone, \
         stopped or started wiped"
    )]
    HoldsItsCopy {
        /// The node.
        node: u64,
        /// Its last log index.
        last_log_index: u64,
    },
    /// The node is a node of the region a forced failover lost, outside
    /// the group, and failback has not run: its copy, which failback reads
    /// (or, if its disk is gone, goes without), may hold orders only it
    /// knows.
    #[error(
        "node {node} is a node of region {region}, which a forced failover lost, and failback has not run: its \
         copy may hold orders only it knows. Fail back first (`surge ctl failback --from {region}`); the node \
         then rejoins as docs/operations.md says"
    )]
    AwaitsFailback {
        /// The node.
        node: u64,
        /// Its region.
        region: String,
    },
    /// Made a voter, the node would leave no learner outside the region
    /// that takes writes to confirm escrow: sales would stop.
    #[error(
        "node {node} is to be a voter, but then no learner outside region {region} would be left to confirm \
         escrow, and sales would stop: replace it without --voter"
    )]
    LeavesNoDrCopy {
        /// The node.
        node: u64,
        /// The region that takes writes.
        region: String,
    },
}

/// The drills a node ran, newest last. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Drills {
    reports: Arc<Mutex<VecDeque<DrillReport>>>,
}

impl Drills {
    /// Every report kept, oldest first.
    pub fn list(&self) -> Vec<DrillReport> {
        self.lock().iter().cloned().collect()
    }

    /// One report by id.
    pub fn get(&self, id: u64) -> Option<DrillReport> {
        self.lock().iter().find(|report| report.id == id).cloned()
    }

    /// Whether a drill that changes the group's membership runs on this
    /// node: a switchover, a replacement, a failover or a failback (a
    /// zone-loss drill only cuts nodes off).
    pub(crate) fn changing_membership(&self) -> bool {
        let changes = |kind: &str| matches!(kind, "switchover" | "replace-node" | "failover" | "failback");
        self.lock().iter().any(|report| report.state == "running" && changes(&report.kind))
    }

    /// Adds `report` unless a drill is still running.
    pub(crate) fn begin(&self, report: DrillReport) -> Result<(), DrillError> {
        let mut reports = self.lock();
        if let Some(running) = reports.iter().find(|r| r.state == "running") {
            return Err(DrillError::AlreadyRunning(running.id));
        }
        if reports.len() >= REPORTS_KEPT {
            reports.pop_front();
        }
        reports.push_back(report);
        Ok(())
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut DrillReport)) {
        if let Some(report) = self.lock().iter_mut().find(|report| report.id == id) {
            change(report);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<DrillReport>> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Checks that `coordinator` may cut `zone` off for `isolate_for`, records
/// the drill as running, and returns its first report and the nodes to cut off.
pub(crate) fn plan_zone_loss(
    node: &Node,
    zone: &str,
    isolate_for: Duration,
    requested_by: &str,
    now_ms: u64,
) -> Result<(DrillReport, Vec<u64>), DrillError> {
    if !(ISOLATE_FOR_MIN..=ISOLATE_FOR_MAX).contains(&isolate_for) {
        return Err(DrillError::BadDuration { min: ISOLATE_FOR_MIN, max: ISOLATE_FOR_MAX });
    }
    let topology = node.topology();
    let (inside, outside): (Vec<_>, Vec<_>) = topology.nodes.iter().partition(|n| n.zone == zone);
    let inside: Vec<u64> = inside.iter().map(|n| n.id).collect();
    let outside: Vec<u64> = outside.iter().map(|n| n.id).collect();
    if inside.is_empty() {
        return Err(DrillError::UnknownZone(zone.to_string()));
    }
    // Only voters count towards the quorum; a DR replica does not.
    let voters = topology.voters().count();
    let left = topology.voters().filter(|n| n.zone != zone).count();
    if left * 2 <= voters {
        return Err(DrillError::LosesQuorum { zone: zone.to_string(), left, voters });
    }
    let coordinator = node.id();
    if inside.contains(&coordinator) {
        return Err(DrillError::CoordinatorInZone { coordinator, zone: zone.to_string(), outside });
    }
    let report = DrillReport {
        zone: zone.to_string(),
        nodes: inside.clone(),
        isolated_for_ms: u64::try_from(isolate_for.as_millis()).unwrap_or(u64::MAX),
        ..DrillReport::started("zone-loss", coordinator, requested_by, now_ms)
    };
    node.drills().begin(report.clone())?;
    Ok((report, inside))
}

/// Runs a planned zone-loss drill to the end and records its findings.
pub(crate) async fn run_zone_loss(node: Node, id: u64, zone_nodes: Vec<u64>, isolate_for: Duration) {
    record(&node, id).await;
    let log = Timeline::new(&node, id);
    let outcome = zone_loss(&node, &log, id, &zone_nodes, isolate_for).await;
    finish(&node, id, outcome).await;
}

/// Closes drill `id`'s report as completed or failed, and records it.
pub(crate) async fn finish(node: &Node, id: u64, outcome: Result<(), String>) {
    let now_ms = node.clock_ms();
    node.drills().update(id, |report| {
        report.finished_at_ms = Some(now_ms);
        match outcome {
            Ok(()) => report.state = "completed".into(),
            Err(reason) => {
                report.state = "failed".into();
                report.failure = Some(reason);
            }
        }
    });
    record(node, id).await;
    tracing::info!(drill = id, "drill finished");
}

/// Writes drill `id`'s report as it stands into the replicated state, so
/// every node lists it and it outlives this node; says whether it did.
/// Retried for a while: a drill's own cut can leave the group briefly
/// without a leader.
pub(crate) async fn record(node: &Node, id: u64) -> bool {
    let Some(report) = node.drills().get(id) else { return false };
    let record = match serde_json::to_string(&report) {
        Ok(record) => record,
        Err(error) => {
            tracing::error!(drill = id, %error, "cannot encode the drill report");
            return false;
        }
    };
    let command = Command::RecordDrill { id, coordinator: report.coordinator, record };
    let started = Instant::now();
    loop {
        match node.operator(command.clone()).await {
            Ok(Outcome::DrillRecorded) => return true,
            Ok(other) => {
                tracing::error!(drill = id, ?other, "the drill record was refused");
                return false;
            }
            Err(error) if started.elapsed() > RECORD_MAX => {
                tracing::warn!(drill = id, %error, "could not record the drill; it stays on this node only");
                return false;
            }
            Err(_) => tokio::time::sleep(PROBE_EVERY).await,
        }
    }
}

/// How long recording a drill report is retried.
const RECORD_MAX: Duration = Duration::from_secs(10);

/// Every drill report: those in the replicated state, each replaced by this
/// node's own copy where it has one (a running drill's is fresher), oldest
/// first.
pub(crate) fn reports(node: &Node) -> Vec<DrillReport> {
    let recorded: Vec<DrillReport> =
        node.read_local(|state| state.drill_records().filter_map(|record| serde_json::from_str(record).ok()).collect());
    let mut reports: BTreeMap<(u64, u64), DrillReport> =
        recorded.into_iter().map(|report| ((report.id, report.coordinator), report)).collect();
    for report in node.drills().list() {
        reports.insert((report.id, report.coordinator), report);
    }
    reports.into_values().collect()
}

/// Writes timeline events into a drill's report.
pub(crate) struct Timeline {
    drills: Drills,
    id: u64,
    started: Instant,
}

impl Timeline {
    /// Drill `id`'s timeline, starting now.
    pub(crate) fn new(node: &Node, id: u64) -> Timeline {
        Timeline { drills: node.drills().clone(), id, started: Instant::now() }
    }

    pub(crate) fn note(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(drill = self.id, "{what}");
        let at_ms = self.since(self.started);
        self.drills.update(self.id, |report| report.timeline.push(DrillEvent { at_ms, what }));
    }

    fn since(&self, earlier: Instant) -> u64 {
        u64::try_from(earlier.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut DrillReport)) {
        self.drills.update(self.id, change);
    }
}

async fn zone_loss(
    node: &Node,
    log: &Timeline,
    id: u64,
    zone_nodes: &[u64],
    isolate_for: Duration,
) -> Result<(), String> {
    let mut probe = Probe::open(node, id).await?;
    log.note(format!("probe sale {} created", probe.sku));
    let baseline = Instant::now();
    loop {
        if probe.checkout().await.is_ok() {
            break;
        }
        if baseline.elapsed() > SETTLE_MAX {
            return Err("checkout did not work before the drill; nothing was cut off".into());
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    log.note("baseline probe checkout acknowledged");

    // All at once; each node's isolation runs from when it heard, so the
    // zone is whole again once the last one's has run out.
    let isolations = zone_nodes.iter().map(|&member| async move { (member, node.isolate(member, isolate_for).await) });
    for (member, isolated) in futures::future::join_all(isolations).await {
        match isolated {
            Ok(()) => log.note(format!("node {member} isolated for {} ms", isolate_for.as_millis())),
            Err(error) => log.note(format!("node {member} could not be told to isolate (already gone?): {error}")),
        }
    }
    let heals_at = Instant::now() + isolate_for;
    // After the heal the zone's nodes rejoin. Pre-vote keeps their terms
    // from rising while they are cut off, so they should follow the leader
    // rather than depose it: keep probing long enough to see it if not.
    let watch_until = heals_at + node.group().lease() * 3;

    // Probe through the isolation and until checkout works again after it;
    // from the heal on, time the zone's catching up at the same time.
    let mut outages = Outages::default();
    let probing = async {
        let mut healed_noted = false;
        loop {
            outages.probe(&mut probe, log).await;
            let now = Instant::now();
            if now >= heals_at && !healed_noted {
                healed_noted = true;
                log.note("isolation lifted");
            }
            if now >= watch_until && !outages.failing() {
                return Ok(());
            }
            if now >= heals_at + SETTLE_MAX {
                return Err(format!("checkout still failing {} s after the isolation ended", SETTLE_MAX.as_secs()));
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    };
    // Every node, the isolated ones included, catches up with what the
    // leader had committed when the isolation ended.
    let catching_up = async {
        tokio::time::sleep_until(heals_at).await;
        wait_caught_up(node, heals_at).await
    };
    let (probed, caught_up) = futures::join!(probing, catching_up);
    probed?;
    match caught_up {
        Some(ms) => log.note(format!("every node caught up {ms} ms after the isolation ended")),
        None => log.note(format!("not every node caught up within {} s", SETTLE_MAX.as_secs())),
    }

    audit(node, log, &outages.acknowledged).await?;
    log.update(|report| report.caught_up_ms = caught_up);
    Ok(())
}

/// A drill's probe checkouts and the outages they saw: each from the start
/// of a failed probe checkout to the end of the next successful one.
#[derive(Default)]
pub(crate) struct Outages {
    /// Orders the probe got acknowledged.
    pub(crate) acknowledged: Vec<OrderId>,
    attempts: u64,
    failing_since: Option<Instant>,
    worst: Duration,
    total: Duration,
}

impl Outages {
    /// One probe checkout, noted in the timeline when checkout fails or
    /// comes back, and in the report's counts.
    pub(crate) async fn probe(&mut self, probe: &mut Probe<'_>, log: &Timeline) {
        let started = Instant::now();
        let result = probe.checkout().await;
        self.attempts += 1;
        match result {
            Ok(order) => {
                self.acknowledged.push(order);
                if let Some(since) = self.failing_since.take() {
                    let window = since.elapsed();
                    self.worst = self.worst.max(window);
                    self.total += window;
                    log.note(format!("checkout available again after {} ms", window.as_millis()));
                }
            }
            Err(error) => {
                if self.failing_since.is_none() {
                    self.failing_since = Some(started);
                    log.note(format!("probe checkout failed: {error}"));
                }
            }
        }
        let (attempts, acknowledged) = (self.attempts, self.acknowledged.len() as u64);
        let (worst, total) = (self.worst.as_millis() as u64, self.total.as_millis() as u64);
        log.update(|report| {
            report.probe_attempts = attempts;
            report.orders_acknowledged = acknowledged;
            report.checkout_unavailable_ms = worst;
            report.checkout_unavailable_total_ms = total;
        });
    }

    /// Whether the last probe checkout failed.
    pub(crate) fn failing(&self) -> bool {
        self.failing_since.is_some()
    }
}

/// Reads every acknowledged probe order back and adds up oversold units,
/// into the report.
pub(crate) async fn audit(node: &Node, log: &Timeline, acknowledged: &[OrderId]) -> Result<(), String> {
    let mut lost = Vec::new();
    for &order in acknowledged {
        let found = read_retrying(node, move |state| state.order_by_id(order).is_some()).await?;
        if !found {
            lost.push(order);
        }
    }
    let oversold = read_retrying(node, |state| {
        state.sku_views().map(|view| (view.stock.held + view.stock.sold).saturating_sub(view.stock.total)).sum::<u64>()
    })
    .await?;
    log.note(format!(
        "{} probe orders acknowledged, {} lost; {oversold} units oversold",
        acknowledged.len(),
        lost.len()
    ));
    log.update(|report| {
        report.orders_lost = lost;
        report.oversold_units = oversold;
    });
    Ok(())
}

/// Waits until every node has applied what the leader had committed when
/// this was called; returns how long after `since` that was.
async fn wait_caught_up(node: &Node, since: Instant) -> Option<u64> {
    let deadline = Instant::now() + SETTLE_MAX;
    let mut target = None;
    while Instant::now() < deadline {
        if target.is_none() {
            target = leader_commit(node).await;
        }
        if let Some(target) = target {
            let mut all = true;
            for spec in &node.topology().nodes {
                let applied =
                    node.node_status(spec.id).await.ok().and_then(|s| s.groups.first().map(|g| g.applied_index));
                all &= applied.is_some_and(|applied| applied >= target);
            }
            if all {
                return Some(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The commit index of the group's leader, asked of the leader itself.
async fn leader_commit(node: &Node) -> Option<u64> {
    let leader = node.status().groups.first()?.leader?;
    let status = node.node_status(leader).await.ok()?;
    status.groups.first()?.commit_index
}

/// A linearizable read, retried for a while: after a drill a read may land
/// in an election.
async fn read_retrying<T>(node: &Node, read: impl Fn(&domain::GroupState) -> T + Clone) -> Result<T, String> {
    let deadline = Instant::now() + SETTLE_MAX;
    loop {
        match node.read(read.clone()).await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => return Err(format!("reading back after the drill: {error}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The drill's synthetic shopper.
pub(crate) struct Probe<'a> {
    node: &'a Node,
    id: u64,
    sku: String,
    session: Option<(SessionId, u32)>,
    /// Token hashes handed out so far; each session gets a new one.
    sessions_opened: u64,
    /// Checkout keys handed out so far.
    keys: u64,
    /// A key whose checkout got no outcome: the next attempt retries it.
    pending_key: Option<String>,
}

impl<'a> Probe<'a> {
    /// Creates the probe's sale (retrying while the cluster elects).
    pub(crate) async fn open(node: &'a Node, id: u64) -> Result<Probe<'a>, String> {
        let sku = format!("drill-{id}");
        let now_ms = node.clock_ms();
        let sale = Sale {
            sku: sku.clone(),
            name: format!("drill {id} probe"),
            price_minor: 0,
            stock: PROBE_STOCK,
            starts_at_ms: now_ms.saturating_sub(60_000),
            ends_at_ms: now_ms + 24 * 3_600_000,
            limit_per_shopper: 0,
        };
        let deadline = Instant::now() + SETTLE_MAX;
        loop {
            match node.operator(Command::CreateSale(sale.clone())).await {
                // A retry after a lost answer finds its own sale.
                Ok(Outcome::Sku(_)) | Ok(Outcome::Rejected(Rejection::SaleExists { .. })) => break,
                Ok(other) => return Err(format!("creating the probe sale: {other:?}")),
                Err(error) if Instant::now() >= deadline => return Err(format!("creating the probe sale: {error}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        // With a DR copy, the new sale sells once the copy has confirmed its
        // first escrow: wait for that, so the drill does not measure it as
        // an outage. (Bounded: without the copy the probe sees the truth.)
        while !node.read_local(|state| state.holdable(&sku) > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Probe { node, id, sku, session: None, sessions_opened: 0, keys: 0, pending_key: None })
    }

    /// One checkout of one unit; `Err` says why no order was acknowledged.
    pub(crate) async fn checkout(&mut self) -> Result<OrderId, String> {
        let (session, used) = match self.session {
            Some(open) => open,
            None => {
                self.sessions_opened += 1;
                // A hash no token has: nobody can sign in as the probe.
                let token_hash = format!("{:032x}{:032x}", self.id, self.sessions_opened);
                let shopper = format!("drill-{}-probe", self.id);
                match self.node.open_session(shopper, token_hash).await {
                    Ok(Outcome::SessionOpened { session }) => (session, 0),
                    Ok(other) => return Err(format!("opening a probe session: {other:?}")),
                    Err(error) => return Err(format!("opening a probe session: {error}")),
                }
            }
        };
        self.session = Some((session, used));
        let key = self.pending_key.take().unwrap_or_else(|| {
            self.keys += 1;
            format!("drill-probe-{}", self.keys)
        });
        let command = Command::Checkout {
            session,
            idempotency_key: key.clone(),
            items: Some(vec![Line { sku: self.sku.clone(), qty: 1 }]),
            hold_ms: PROBE_HOLD_MS,
        };
        match self.node.shopper(session, command).await {
            Ok(Outcome::Order { order, .. }) => {
                let used = used + 1;
                self.session = (used < PROBE_CHECKOUTS_PER_SESSION).then_some((session, used));
                Ok(order.id)
            }
            Ok(Outcome::Rejected(rejection)) => {
                self.session = None;
                Err(format!("probe checkout refused: {rejection:?}"))
            }
            Ok(other) => Err(format!("probe checkout answered {other:?}")),
            Err(error) => {
                // No outcome: it may have applied, so the next try reuses the key.
                self.pending_key = Some(key);
                Err(error.to_string())
            }
        }
    }
}
