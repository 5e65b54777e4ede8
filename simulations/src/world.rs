//! The simulated world: the default topology's six nodes (zones a and b of
//! the primary region, two each, the tiebreaker in the DR region, and the
//! DR replica), each a real `cluster::Node` (actors, openraft group, redb
//! storage) on a simulated disk, clock and network, all on this one thread.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cluster::fence::Fence;
use cluster::transport::{GroupHandler, Isolation, PeerForwarder};
use cluster::{ActorLimits, Group, GroupConfig, Node, NodeConfig, NodeSpec, Role, Topology};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::clock::SimClock;
use crate::disk::Disk;
use crate::net::{Net, SimLink, SimNetwork};
use crate::trace::Trace;

/// (id, region, zone, role) of every node.
const SHAPE: [(u64, &str, &str, Role); 6] = [
    (1, "primary", "a", Role::Voter),
    (2, "primary", "a", Role::Voter),
    (3, "primary", "b", Role::Voter),
    (4, "primary", "b", Role::Voter),
    (5, "dr", "t", Role::Voter),
    (6, "dr", "d", Role::Replica),
];

/// The nodes' configuration for this run: production defaults, except that
/// each rare path is switched on with a chance of one in four (in the
/// manner of FoundationDB's BUGGIFY), so that some runs snapshot every few
/// entries, never batch, pipeline proposals, time clients out early, shed
/// load from tiny queues, or elect leaders twice as fast.
fn rare_paths(rng: &mut StdRng, trace: &Trace, topology: Topology) -> NodeConfig {
    let mut group = GroupConfig {
        // Small, so snapshots, log purges and snapshot installs all happen
        // within a run.
        snapshot_every_entries: 300,
        log_kept_behind_snapshot: 50,
        ..GroupConfig::default()
    };
    let mut actors = ActorLimits::default();
    let mut on = Vec::new();
    let mut maybe = |name: &'static str| {
        rng.gen_range(0..4) == 0 && {
            on.push(name);
            true
        }
    };
    if maybe("snapshot every 20 entries") {
        (group.snapshot_every_entries, group.log_kept_behind_snapshot) = (20, 5);
    }
    if maybe("no batching") {
        actors.batch_max = 1;
    }
    if maybe("4 proposals in flight") {
        actors.proposals_in_flight_max = 4;
    }
    if maybe("300 ms request timeout") {
        actors.request_timeout_ms = 300;
    }
    if maybe("queues of 4") {
        (actors.queue_max, actors.mailbox_max) = (4, 4);
    }
    if maybe("escrow blocks of one unit") {
        (group.escrow_block_min, group.escrow_block_max) = (1, 1);
    }
    if maybe("fast elections") {
        (group.heartbeat_ms, group.election_timeout_min_ms, group.election_timeout_max_ms) = (50, 150, 300);
    }
    trace.event(format!("rare paths: {on:?}"));
    NodeConfig { group, topology, tls: None, actors, expiry_tick_ms: 200, join: false }
}

/// One node's machine: its disk, clock and fence outlive its crashes.
struct Machine {
    disk: Disk,
    clock: Arc<SimClock>,
    /// The generation fence, as its disk keeps it (see `cluster::fence`).
    fence: Fence,
    /// Its data was wiped: it waits to be added, never bootstrapping.
    join: bool,
    /// Its whole region is lost: it stays down until the region returns.
    lost: bool,
    /// Its disk was lost for good and replaced by an empty one: it stays
    /// down until the operator starts it wiped ([`World::start_wiped`]).
    disk_lost: bool,
    /// The running node; `None` while it is down or starting.
    node: Option<Node>,
    /// A start is under way (opening the database, starting Raft), for
    /// this life of the node on the network: a second start must not put
    /// two processes on one disk. A cut ends that life, and the start
    /// with it.
    starting: Option<u64>,
    /// A start was asked for while one was under way since the last cut:
    /// if that one was cut, it is made again.
    start_asked: bool,
    /// Starts so far.
    lives: u32,
}

/// Everything in the run. Shared by the workload and fault tasks (one
/// thread, so `RefCell`; no borrow is held across an await).
pub struct World {
    pub trace: Trace,
    pub net: Arc<Net>,
    pub topology: Topology,
    /// The workload's and the fault schedule's randomness.
    rng: RefCell<StdRng>,
    machines: RefCell<BTreeMap<u64, Machine>>,
    config: NodeConfig,
    /// Things that went wrong outside the checkers (a node that could not
    /// restart from its disk).
    failures: RefCell<Vec<String>>,
    /// Every clock jump's size, added up: how far the leader's clock may be
    /// behind the replicated clock, which delays expiry by as much.
    jumped_ms: std::cell::Cell<u64>,
    /// This run loses the primary region (see `crate::region`).
    pub region_loss: bool,
    /// Nodes whose disks were lost for good and that were replaced.
    pub disks_replaced: std::cell::Cell<usize>,
    /// Nodes whose disks were lost for good and that do not hold the whole
    /// log again yet: for a failover, their copies are gone.
    copies_lost: RefCell<BTreeSet<u64>>,
}

impl World {
    /// A world for `seed`, with no node started yet.
    pub fn new(seed: u64, trace: Trace) -> World {
        let mut seeds = StdRng::seed_from_u64(seed);
        let net = Net::new(StdRng::seed_from_u64(seeds.gen()), trace.clone());
        let topology = Topology {
            primary_region: "primary".into(),
            nodes: SHAPE
                .iter()
                .map(|&(id, region, zone, role)| NodeSpec {
                    id,
                    region: region.into(),
                    zone: zone.into(),
                    api: format!("sim-{id}:80"),
                    peer: format!("sim-{id}:90"),
                    role,
                })
                .collect(),
        };
        let machines = SHAPE
            .iter()
            .map(|&(id, ..)| {
                let machine = Machine {
                    disk: Disk::default(),
                    clock: Arc::new(SimClock::default()),
                    fence: fresh_fence(&topology, id),
                    join: false,
                    lost: false,
                    disk_lost: false,
                    node: None,
                    starting: None,
                    start_asked: false,
                    lives: 0,
                };
                (id, machine)
            })
            .collect();
        let config = rare_paths(&mut seeds, &trace, topology.clone());
        let region_loss = seeds.gen_range(0..4) == 0;
        if region_loss {
            trace.event("this run loses the primary region");
        }
        World {
            trace,
            net,
            topology,
            rng: RefCell::new(StdRng::seed_from_u64(seeds.gen())),
            machines: RefCell::new(machines),
            config,
            failures: RefCell::new(Vec::new()),
            jumped_ms: std::cell::Cell::new(0),
            region_loss,
            disks_replaced: std::cell::Cell::new(0),
            copies_lost: RefCell::default(),
        }
    }

    /// Records a failure of the run.
    pub fn fail(&self, what: String) {
        self.trace.event(format!("FAILURE {what}"));
        self.failures.borrow_mut().push(what);
    }

    /// The failures recorded so far.
    pub fn failures(&self) -> Vec<String> {
        self.failures.borrow().clone()
    }

    /// Draws from the world's generator.
    pub fn draw<T>(&self, draw: impl FnOnce(&mut StdRng) -> T) -> T {
        draw(&mut self.rng.borrow_mut())
    }

    /// Every node id.
    pub fn ids(&self) -> Vec<u64> {
        SHAPE.iter().map(|&(id, ..)| id).collect()
    }

    /// The nodes of zone `zone`.
    pub fn zone(&self, zone: &str) -> Vec<u64> {
        self.topology.nodes.iter().filter(|n| n.zone == zone).map(|n| n.id).collect()
    }

    /// The nodes of region `region`.
    pub fn region(&self, region: &str) -> Vec<u64> {
        self.topology.nodes.iter().filter(|n| n.region == region).map(|n| n.id).collect()
    }

    /// The shopper-facing nodes: zones a and b, and in a run that loses
    /// the primary region the DR region's too, where shoppers go then.
    pub fn endpoints(&self) -> Vec<u64> {
        if self.region_loss {
            return self.ids();
        }
        self.region("primary")
    }

    /// Node `id` if it is up.
    pub fn node(&self, id: u64) -> Option<Node> {
        self.machines.borrow().get(&id).and_then(|m| m.node.clone())
    }

    /// Node `id`'s current life: a handle to the node taken in another
    /// life speaks for a node that is gone (see [`World::crash`]).
    pub fn life(&self, id: u64) -> u64 {
        self.net.life(id)
    }

    /// Runs a client's request `op` on node `id` as over a connection to
    /// it: `None` if the node is down, or goes down before it answers. What
    /// its dead life still answers dies with the connection; a shopper
    /// never hears it.
    pub async fn ask<T, Fut: Future<Output = T>>(&self, id: u64, op: impl FnOnce(Node) -> Fut) -> Option<T> {
        let node = self.node(id)?;
        let life = self.life(id);
        let answer = op(node).await;
        (self.life(id) == life).then_some(answer)
    }

    /// Whether node `id` is up or starting (and not cut since).
    pub fn is_up(&self, id: u64) -> bool {
        let life = self.net.life(id);
        self.machines.borrow().get(&id).is_some_and(|m| m.node.is_some() || m.starting == Some(life))
    }

    /// Moves node `id`'s clock by `delta_ms`.
    pub fn jump_clock(&self, id: u64, delta_ms: i64) {
        self.machines.borrow()[&id].clock.jump(delta_ms);
        self.jumped_ms.set(self.jumped_ms.get() + delta_ms.unsigned_abs());
    }

    /// Every clock jump's size so far, added up.
    pub fn jumped_ms(&self) -> u64 {
        self.jumped_ms.get()
    }

    /// Starts node `id` from what its disk holds (nothing, the first time;
    /// the lowest id then bootstraps the cluster).
    pub async fn start(&self, id: u64) -> Result<(), String> {
        loop {
            let (disk, clock, fence, bootstrap, join, life) = {
                let mut machines = self.machines.borrow_mut();
                let machine = machines.get_mut(&id).expect("a node of the topology");
                if machine.node.is_some() {
                    return Ok(());
                }
                if machine.starting.is_some() {
                    machine.start_asked = true;
                    return Ok(());
                }
                if machine.disk.is_failing() {
                    // It comes up when its disk heals (see the DiskFails fault).
                    self.trace.event(format!("node {id} stays down: its disk fails"));
                    return Ok(());
                }
                if machine.lost {
                    self.trace.event(format!("node {id} stays down: its region is lost"));
                    return Ok(());
                }
                if machine.disk_lost {
                    self.trace.event(format!("node {id} stays down: its disk is being replaced"));
                    return Ok(());
                }
                let life = self.net.life(id);
                machine.starting = Some(life);
                machine.start_asked = false;
                machine.lives += 1;
                // What it heard of before still holds; nothing confirms it yet.
                machine.fence = machine.fence.restarted();
                let bootstrap = machine.lives == 1 && !machine.join && self.topology.bootstrapper() == Some(id);
                (machine.disk.clone(), machine.clock.clone(), machine.fence.clone(), bootstrap, machine.join, life)
            };
            let started = self.open(id, disk, clock, fence, bootstrap, join).await;
            let mut machines = self.machines.borrow_mut();
            let machine = machines.get_mut(&id).expect("checked");
            machine.starting = None;
            if self.net.life(id) != life {
                // Cut while it opened (its disk, retired, may have failed
                // it first): that life is over before it began. A start
                // asked for since the cut is made now.
                if let Ok((node, _)) = started {
                    tokio::spawn(async move {
                        let _ = node.group().raft().shutdown().await;
                    });
                }
                if std::mem::take(&mut machine.start_asked) {
                    continue;
                }
                return Ok(());
            }
            let (node, handler) = started?;
            self.net.attach(id, handler);
            machine.node = Some(node);
            self.trace.event(format!("node {id} up"));
            return Ok(());
        }
    }

    /// Opens node `id`'s database and group and assembles the node, with
    /// the handler that answers its peers.
    async fn open(
        &self,
        id: u64,
        disk: Disk,
        clock: Arc<SimClock>,
        fence: Fence,
        bootstrap: bool,
        join: bool,
    ) -> Result<(Node, GroupHandler), String> {
        let database = redb::Builder::new()
            .set_cache_size(4 << 20)
            .create_with_backend(disk.incarnation())
            .map_err(|e| format!("node {id}: open its database: {e}"))?;
        let config = GroupConfig {
            node_id: id,
            may_lead: self.topology.may_lead(id),
            region: self.topology.node(id).map(|spec| spec.region.clone()),
            replicas: self.topology.replicas(),
            log_write_delay: Some(disk.write_delay()),
            ..self.config.group.clone()
        };
        let link = SimLink { id, life: self.net.life(id), net: self.net.clone(), fence: fence.clone() };
        let network = SimNetwork { link: link.clone() };
        let timeout = Duration::from_millis(self.config.actors.request_timeout_ms);
        let forwarder = Arc::new(PeerForwarder::over(Arc::new(link), timeout));
        let group =
            Group::open_on(&config, Arc::new(database), clock.clone(), network, self.topology.members(), bootstrap)
                .await
                .map_err(|e| format!("node {id}: open its group: {e}"))?
                .joining(join)
                .with_fence(fence.clone())
                .with_forwarder(forwarder.clone());
        let handler =
            GroupHandler::new(id, BTreeMap::from([(0, group.clone())]), Isolation::default()).with_fence(fence);
        Ok((Node::with_peers(group, &self.config, clock, forwarder, handler.clone()), handler))
    }

    /// Kills node `id` like a power cut, at once: what its disk had not
    /// synced is gone, messages to it are lost until it restarts, and so is
    /// whatever its dead life still sends. Its Raft winds down in the
    /// background, cut off from both.
    ///
    /// Nothing waits for that: on a slow disk, shutting down takes seconds.
    /// When the simulator waited, the machine could hold another disk by
    /// the time it cut this one, or a new life of the node could run on it
    /// (seed 4018284767593846214: a late cut retired the replacement disk's
    /// live incarnation, and the restarted node's log went nowhere), and a
    /// power cut of several nodes cut them seconds apart.
    ///
    /// A node still starting is cut too: [`World::start`] then drops what
    /// it opened.
    pub async fn crash(&self, id: u64) {
        let node = {
            let mut machines = self.machines.borrow_mut();
            let machine = machines.get_mut(&id).expect("a node of the topology");
            let node = machine.node.take();
            if node.is_none() && machine.starting != Some(self.net.life(id)) {
                return;
            }
            // A start asked for before the cut is not for the next life.
            machine.start_asked = false;
            machine.disk.crash();
            // What the dead life learns from here on is not on its disk.
            machine.fence = machine.fence.restarted();
            node
        };
        self.net.detach(id);
        self.trace.event(format!("node {id} crashed"));
        if let Some(node) = node {
            tokio::spawn(async move {
                let _ = node.group().raft().shutdown().await;
            });
        }
    }

    /// Loses the nodes of `region` at once, as a disaster would: each is
    /// cut like a power cut and stays down until [`World::return_region`].
    pub async fn lose_region(&self, region: &str) {
        for id in self.region(region) {
            self.machines.borrow_mut().get_mut(&id).expect("a node of the topology").lost = true;
            self.crash(id).await;
        }
        self.trace.event(format!("region {region:?} lost"));
    }

    /// The nodes of `region` come back, each from what its disk holds.
    pub async fn return_region(&self, region: &str) {
        self.trace.event(format!("region {region:?} returns"));
        for id in self.region(region) {
            self.machines.borrow_mut().get_mut(&id).expect("a node of the topology").lost = false;
            if let Err(error) = self.start(id).await {
                self.fail(format!("the returning region: {error}"));
            }
        }
    }

    /// What an operator does to a returning node before it rejoins: stops
    /// it, wipes its data (its fence with it), and starts it with
    /// `join = true`, to wait until the group adds it.
    pub async fn wipe(&self, id: u64) {
        self.crash(id).await;
        self.empty_disk(id, false);
        self.trace.event(format!("node {id} wiped"));
        if let Err(error) = self.start(id).await {
            self.fail(format!("starting node {id} wiped: {error}"));
        }
    }

    /// Loses node `id`'s disk for good, like a power cut that also destroys
    /// the disk: the node stays down, on a new, empty disk (its fence gone
    /// with the old one), until the operator starts it wiped.
    pub async fn lose_disk(&self, id: u64) {
        self.crash(id).await;
        self.empty_disk(id, true);
        self.copies_lost.borrow_mut().insert(id);
        self.trace.event(format!("node {id} lost its disk for good"));
    }

    /// Node `id`, whose disk was lost, holds the whole log again.
    pub fn copy_restored(&self, id: u64) {
        self.copies_lost.borrow_mut().remove(&id);
    }

    /// Whether node `id` lost its disk and does not hold the whole log
    /// again yet.
    pub fn copy_lost(&self, id: u64) -> bool {
        self.copies_lost.borrow().contains(&id)
    }

    /// Gives stopped node `id` a new, empty disk and a fresh fence (the old
    /// one lived on the old disk); it starts with `join = true` from now on.
    /// `hold`: it stays down until [`World::start_wiped`].
    fn empty_disk(&self, id: u64, hold: bool) {
        let mut machines = self.machines.borrow_mut();
        let machine = machines.get_mut(&id).expect("a node of the topology");
        machine.disk = Disk::default();
        machine.fence = fresh_fence(&self.topology, id);
        machine.join = true;
        machine.disk_lost = hold;
    }

    /// Starts node `id` on the empty disk [`World::lose_disk`] left it, with
    /// `join = true`: what the operator does once the leader has added it
    /// back (see `cluster::replace`).
    pub async fn start_wiped(&self, id: u64) -> Result<(), String> {
        self.machines.borrow_mut().get_mut(&id).expect("a node of the topology").disk_lost = false;
        self.start(id).await
    }

    /// Makes node `id`'s disk fail (or recover).
    pub fn set_disk_failing(&self, id: u64, failing: bool) {
        self.machines.borrow()[&id].disk.set_failing(failing);
    }

    /// Makes node `id`'s durable log writes take `slow` longer (zero: heal).
    pub fn set_disk_slow(&self, id: u64, slow: Duration) {
        self.machines.borrow()[&id].disk.set_slow(slow);
    }

    /// Restarts, from its disk, every node whose Raft stopped on its own (a
    /// storage error is fatal to openraft): what a supervisor does with a
    /// process that exited.
    pub async fn reap(&self) {
        for id in self.ids() {
            let stopped =
                self.node(id).is_some_and(|node| node.group().raft().metrics().borrow().running_state.is_err());
            // A node whose disk still fails is left down until it heals.
            let failing = self.machines.borrow()[&id].disk.is_failing();
            if stopped && !failing {
                self.trace.event(format!("node {id} stopped on its own; restarting it"));
                self.crash(id).await;
                if let Err(error) = self.start(id).await {
                    self.fail(format!("restart after a stop: {error}"));
                }
            }
        }
    }

    /// Stops every node (end of run), so their tasks end with the runtime.
    pub async fn stop(&self) {
        for id in self.ids() {
            let node = self.machines.borrow_mut().get_mut(&id).and_then(|m| m.node.take());
            if let Some(node) = node {
                self.net.detach(id);
                let _ = node.group().raft().shutdown().await;
            }
        }
    }
}

/// Node `id`'s fence before it ever ran: no generation heard of, and every
/// node's region known, so that it needs a node of another region to
/// confirm it before it leads writes, as a production node does.
fn fresh_fence(topology: &Topology, id: u64) -> Fence {
    let regions = topology.nodes.iter().map(|spec| (spec.id, spec.region.clone())).collect();
    Fence::in_memory(topology.node(id).map(|spec| spec.region.clone()), regions)
}
