//! One run: a seed in, a verdict and the trace's hash out.
//!
//! Determinism comes from running everything on one thread, on a tokio
//! current-thread runtime with paused time and a fixed scheduler seed
//! (`rng_seed`, which needs `--cfg tokio_unstable`, set in
//! `.cargo/config.toml`), with openraft's randomness drawn from a generator
//! seeded by the run ([`storage::runtime::seed_raft_rng`]), and every other
//! choice drawn from the world's seeded generators.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::Duration;

use domain::mutation::Mutation;
use domain::{GroupState, OrderStatus};

use crate::checkers::{self, Final};
use crate::faults;
use crate::region;
use crate::trace::Trace;
use crate::workload::{self, Oracle, SecondFailovers, Told, HOLD_MS};
use crate::world::World;

/// Shoppers in a run.
const SHOPPERS: u64 = 40;
/// Shoppers arrive and start checkouts until then.
const WORKLOAD_UNTIL_MS: u64 = 45_000;
/// Faults start after the sales exist and all end by then.
const FAULTS_FROM_MS: u64 = 2_000;
const FAULTS_UNTIL_MS: u64 = 50_000;
/// A run that loses its primary region loses it by then, leaving time for
/// the failover, the region's return and the failback.
const REGION_LOST_BY_MS: u64 = 20_000;
/// A run lasts at least this long in simulated time.
const RUN_MIN_MS: u64 = 60_000;
/// How long the replicas get to catch up after the heal.
const CONVERGE_MAX: Duration = Duration::from_secs(30);

/// One run: its seed, its trace, and what it found.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Hash of the full event trace.
    pub hash: String,
    pub events: u64,
    /// The events, when they were kept.
    pub trace: Vec<String>,
    pub found: Found,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Found {
    /// Broken properties and other failures; empty when the run passed.
    pub failures: Vec<String>,
    pub simulated_ms: u64,
    /// Acknowledged orders and checkouts without a definite answer.
    pub acked: usize,
    pub unknown: u64,
    /// In a run that lost its primary region: the acknowledgements the
    /// failover lost, that its report named (an unnamed one fails the run).
    pub lost_reported: Option<usize>,
    /// In such a run: second failovers the sampler tried after failback.
    pub second_failovers: SecondFailovers,
    /// In such a run: the returning nodes whose disks were lost for good,
    /// whose copies failback went without.
    pub copies_lost: usize,
    /// Nodes whose disks were lost for good and that were replaced (in a
    /// run that keeps its region).
    pub disks_replaced: usize,
    /// Slow-disk faults in the schedule.
    pub slow_disks: usize,
}

impl Report {
    /// Whether every checker held.
    pub fn passed(&self) -> bool {
        self.found.failures.is_empty()
    }
}

thread_local! {
    /// Panics caught by the hook during the current run.
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Routes panics (an assertion in `apply`, a checker's own bug) into the
/// run's failures instead of the terminal.
pub fn capture_panics() {
    std::panic::set_hook(Box::new(|info| PANICS.with(|panics| panics.borrow_mut().push(info.to_string()))));
}

/// How to run a seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Keep the trace's events in the report.
    pub keep: bool,
    /// Print the trace's events as they happen.
    pub echo: bool,
    /// Run with this known bug switched on (the mutation test).
    pub mutation: Option<Mutation>,
}

/// Runs `seed`.
pub fn run(seed: u64, options: &Options) -> Report {
    domain::mutation::activate(options.mutation);
    let report = run_world(seed, options.keep, options.echo);
    domain::mutation::activate(None);
    report
}

fn run_world(seed: u64, keep: bool, echo: bool) -> Report {
    PANICS.with(|panics| panics.borrow_mut().clear());
    let trace = Trace::new(keep, echo);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| simulated(seed, simulate(seed, trace.clone()))));
    let mut found = outcome.unwrap_or_else(|_| Found { simulated_ms: trace.now_ms(), ..Found::default() });
    found
        .failures
        .extend(PANICS.with(|panics| panics.borrow_mut().drain(..).map(|p| format!("panic: {p}")).collect::<Vec<_>>()));
    let (hash, events) = trace.digest();
    Report { seed, hash, events, trace: trace.events(), found }
}

/// Runs `run` to its end on a simulated runtime of its own, seeded by
/// `seed`.
fn simulated<T>(seed: u64, run: impl Future<Output = T>) -> T {
    storage::runtime::seed_raft_rng(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .build()
        .expect("a current-thread runtime");
    actix_rt::System::with_tokio_rt(|| runtime).block_on(run)
}

/// Runs `script` against the whole topology, every node started (the
/// script waits for a leader itself), on the simulated network and clock,
/// without the crowd or the fault schedule: for tests of one operator
/// scenario. Returns what the script returns;
/// the world's own failures (a node that would not start) panic.
pub fn scripted<T, F: Future<Output = T>>(seed: u64, script: impl FnOnce(Rc<World>) -> F) -> T {
    simulated(seed, async move {
        let world = Rc::new(World::new(seed, Trace::new(false, false)));
        for id in world.ids() {
            world.start(id).await.unwrap_or_else(|error| panic!("node {id} did not start: {error}"));
        }
        let outcome = script(world.clone()).await;
        world.stop().await;
        outcome
    })
}

/// The run itself, inside the simulated runtime.
async fn simulate(seed: u64, trace: Trace) -> Found {
    let world = Rc::new(World::new(seed, trace.clone()));
    let oracle = Rc::new(RefCell::new(Oracle::default()));
    for id in world.ids() {
        if let Err(error) = world.start(id).await {
            world.fail(error);
            return Found { failures: world.failures(), simulated_ms: trace.now_ms(), ..Found::default() };
        }
    }
    match workload::create_sales(&world).await {
        Ok(hot_stock) => oracle.borrow_mut().hot_created = hot_stock,
        Err(error) => {
            world.fail(error);
            world.stop().await;
            return Found { failures: world.failures(), simulated_ms: trace.now_ms(), ..Found::default() };
        }
    }

    let region_loss = world.region_loss.then(|| region::plan(&world, FAULTS_FROM_MS, REGION_LOST_BY_MS));
    let mut schedule = faults::schedule(&world, FAULTS_FROM_MS, FAULTS_UNTIL_MS);
    let slow_disks =
        schedule.iter().filter(|scheduled| matches!(scheduled.fault, faults::Fault::SlowDisk { .. })).count();
    if let Some(plan) = &region_loss {
        trace.event(format!("region loss planned: {plan:?}"));
        schedule.extend(plan.catch_up.clone());
    }
    let mut faults: Vec<_> =
        schedule.into_iter().map(|fault| actix_rt::spawn(faults::run(world.clone(), fault))).collect();
    faults.extend(region_loss.map(|plan| actix_rt::spawn(region::run(world.clone(), oracle.clone(), plan))));
    let sampler = actix_rt::spawn(workload::sampler(world.clone(), oracle.clone(), FAULTS_UNTIL_MS + 5_000));
    let operator = actix_rt::spawn(workload::operator(world.clone(), oracle.clone(), WORKLOAD_UNTIL_MS));
    let shoppers: Vec<_> = (0..SHOPPERS)
        .map(|n| actix_rt::spawn(workload::shopper(world.clone(), oracle.clone(), n, WORKLOAD_UNTIL_MS)))
        .collect();
    let lin = workload::lin_shoppers(&world, &oracle);
    for task in faults.into_iter().chain(shoppers).chain(lin).chain([operator]) {
        let _ = task.await;
    }
    trace.event("faults healed, crowd gone");

    // Every node up again, checkout must work again, holds must expire.
    world.reap().await;
    for id in world.ids() {
        if !world.is_up(id) {
            if let Err(error) = world.start(id).await {
                world.fail(error);
            }
        }
    }
    workload::probe_liveness(&world, &oracle).await;
    // The last holds expire once the leader's clock passes their deadline;
    // a clock that jumped back gets there that much later.
    tokio::time::sleep(Duration::from_millis(HOLD_MS + 1_500 + world.jumped_ms())).await;
    let now = trace.now_ms();
    if now < RUN_MIN_MS {
        tokio::time::sleep(Duration::from_millis(RUN_MIN_MS - now)).await;
    }
    let _ = sampler.await;

    for id in world.ids() {
        if let Some(node) = world.node(id) {
            let status = node.group().status();
            let deadline = node.read_local(GroupState::next_deadline_ms);
            trace.event(format!(
                "node {id}: {} of term {}, applied {}, next deadline {deadline:?}, clock {}",
                status.role,
                status.term,
                status.applied_index,
                node.clock_ms()
            ));
        }
    }
    let replicas = converged(&world).await;
    let mut failures = world.failures();
    let (acked, unknown, lost_reported, second_failovers, copies_lost) = {
        let oracle = oracle.borrow();
        let mut lost_reported = None;
        match replicas {
            Ok(replicas) => {
                // The checkers read every acknowledged order back, so no
                // session may have closed with its orders: runs of minutes
                // never reach `SESSION_IDLE_MS`, and this says if one did.
                let ran_ms = replicas[0].1.clock_ms().saturating_sub(crate::clock::EPOCH_MS);
                if ran_ms >= domain::SESSION_IDLE_MS {
                    failures.push(format!("the run lasted {ran_ms} ms of leader time: idle sessions may have closed"));
                }
                lost_reported = oracle.region_lost.as_ref().map(|_| lost_acknowledgements(&oracle, &replicas[0].1));
                trace.event(format!("final state {:016x}", state_digest(&replicas[0].1)));
                let now_ms = crate::clock::EPOCH_MS + trace.now_ms();
                let expiry_slack_ms = 1_500 + world.jumped_ms();
                failures.extend(checkers::run(&Final {
                    replicas: &replicas,
                    oracle: &oracle,
                    now_ms,
                    expiry_slack_ms,
                }));
            }
            Err(why) => failures.push(format!("replicas converge: {why}")),
        }
        let copies_lost = oracle.region_lost.as_ref().and_then(|lost| lost.reconciliation.as_ref());
        let copies_lost = copies_lost.map_or(0, |reconciliation| reconciliation.copies_lost.len());
        (oracle.acked.len(), oracle.unknown, lost_reported, oracle.second_failovers, copies_lost)
    };
    for failure in &failures {
        trace.event(format!("FAILED {failure}"));
    }
    world.stop().await;
    let disks_replaced = world.disks_replaced.get();
    Found {
        failures,
        simulated_ms: trace.now_ms(),
        acked,
        unknown,
        lost_reported,
        second_failovers,
        copies_lost,
        disks_replaced,
        slow_disks,
    }
}

/// Acknowledged orders that `state` lacks, or holds otherwise than the
/// shopper was told: what a failover lost.
fn lost_acknowledgements(oracle: &Oracle, state: &GroupState) -> usize {
    let told = |acked: &workload::Acked| match acked.told {
        Told::Reserved => None,
        Told::Paid => Some(OrderStatus::Paid),
        Told::Cancelled => Some(OrderStatus::Cancelled),
    };
    oracle
        .acked
        .iter()
        .filter(|(&id, acked)| match state.order_by_id(id) {
            None => true,
            Some(order) => told(acked).is_some_and(|status| status != order.status),
        })
        .count()
}

/// Waits until every replica has applied the same log, then returns each
/// replica's state.
async fn converged(world: &World) -> Result<Vec<(u64, GroupState)>, String> {
    let deadline = tokio::time::Instant::now() + CONVERGE_MAX;
    loop {
        let applied: Vec<(u64, Option<u64>, Option<u64>)> = world
            .ids()
            .into_iter()
            .map(|id| match world.node(id) {
                Some(node) => {
                    let metrics = node.group().raft().metrics().borrow().clone();
                    (id, metrics.last_applied.map(|log_id| log_id.index), metrics.last_log_index)
                }
                None => (id, None, None),
            })
            .collect();
        let highest = applied.iter().filter_map(|(_, _, last)| *last).max();
        let caught_up = highest.is_some() && applied.iter().all(|(_, done, _)| *done == highest);
        if caught_up {
            return Ok(world
                .ids()
                .into_iter()
                .filter_map(|id| world.node(id).map(|node| (id, node.read_local(GroupState::clone))))
                .collect());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "not caught up {CONVERGE_MAX:?} after the heal: (node, applied, last log) {applied:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A short fingerprint of a state, for the trace.
fn state_digest(state: &GroupState) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{state:?}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}
