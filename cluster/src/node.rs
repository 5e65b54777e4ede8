//! A Surge node as the API sees it: one group, its actors, and the ticker
//! that lets payment deadlines pass when no traffic does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use domain::{Command, GroupState, Outcome, SessionId};

use crate::actors::{ActorLimits, Router};
use crate::clock::Clock;
use crate::drill::{self, DrillError, DrillReport, Drills};
use crate::fence::Fence;
use crate::group::{Group, GroupConfig};
use crate::leadership::{self, LeaderMoved, TransferError};
use crate::network::NoPeers;
use crate::status::NodeStatus;
use crate::topology::Topology;
use crate::transport::{
    ClientLimits, GroupHandler, LogEnd, PeerBody, PeerClients, PeerForwarder, PeerNetwork, PeerServer, PeerTls,
    ServerLimits,
};
use crate::ProposeError;

/// Everything a node needs to start its groups and actors.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Raft tuning.
    pub group: GroupConfig,
    /// Where every node runs. A single-node topology runs without a peer
    /// transport.
    pub topology: Topology,
    /// PEM files for mutual TLS with peers; needed when the topology has
    /// more than one node.
    pub tls: Option<TlsFiles>,
    /// Actor bounds and timings.
    pub actors: ActorLimits,
    /// How often the leader checks for payment deadlines that passed. Expiry
    /// itself happens in `apply`, on the first entry stamped after a
    /// deadline; the ticker only makes sure such an entry comes.
    pub expiry_tick_ms: u64,
    /// Never initialise a new group, even as the topology's bootstrapper:
    /// a node whose data was wiped waits for a leader to add it.
    pub join: bool,
}

impl Default for NodeConfig {
    /// Node 1 alone, with default tuning.
    fn default() -> Self {
        NodeConfig {
            group: GroupConfig::default(),
            topology: Topology::single(1, "127.0.0.1:0", "127.0.0.1:0"),
            tls: None,
            actors: ActorLimits::default(),
            expiry_tick_ms: 200,
            join: false,
        }
    }
}

/// Where a node's peer certificates are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// A running node. Cheap to clone; every HTTP worker holds one.
#[derive(Clone)]
pub struct Node {
    group: Group,
    router: Router,
    topology: Arc<Topology>,
    clock: Arc<dyn Clock>,
    /// Drills this node coordinated.
    drills: Drills,
    /// A leadership transfer coordinated by this node is under way.
    transferring: Arc<std::sync::atomic::AtomicBool>,
    /// Reaching and serving peers; absent on a single node.
    peers: Option<Peers>,
}

/// A clustered node's side of the peer transport.
#[derive(Clone)]
struct Peers {
    /// Asks other nodes for their status, or to isolate themselves.
    forwarder: Arc<PeerForwarder>,
    /// Answers this node's status; shares the node's isolation switch.
    handler: GroupHandler,
    /// Serves peers while the node lives; dropping the last clone stops it.
    /// None when the network is not the node's own (the simulator's).
    _server: Option<Arc<PeerServer>>,
}

impl Node {
    /// Opens the node's storage in `data_dir`, starts its group (and, in a
    /// cluster, its peer transport), waits for a leader and for the log to
    /// be replayed, and starts the expiry ticker. Must run inside an actix
    /// system.
    ///
    /// A single node must become leader to start. A cluster node does not
    /// wait: its peers may still be starting (and wait for it), so it serves
    /// at once and answers 503 until its group has a leader; `/readyz` says
    /// when it has.
    pub async fn start(config: &NodeConfig, data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Node, ProposeError> {
        let members = config.topology.members();
        let bootstrap = !config.join && config.topology.bootstrapper() == Some(config.group.node_id);
        let (group, peers) = if config.topology.nodes.len() == 1 {
            let group = Group::open(&config.group, data_dir, clock.clone(), NoPeers, members, bootstrap).await?;
            group.wait_until_caught_up(Duration::from_secs(30)).await?;
            (group, None)
        } else {
            let (group, peers) = open_clustered(config, data_dir, clock.clone(), members, bootstrap).await?;
            (group, Some(peers))
        };
        Ok(Node::assemble(group, config, clock, peers))
    }

    /// A node around an open group whose peers it reaches through
    /// `forwarder` and answers through `handler`, on a network someone else
    /// runs: its actors and its expiry ticker. The simulator builds its
    /// nodes this way, over its own network and disk. Must run inside an
    /// actix system.
    pub fn with_peers(
        group: Group,
        config: &NodeConfig,
        clock: Arc<dyn Clock>,
        forwarder: Arc<PeerForwarder>,
        handler: GroupHandler,
    ) -> Node {
        Node::assemble(group, config, clock, Some(Peers { forwarder, handler, _server: None }))
    }

    fn assemble(group: Group, config: &NodeConfig, clock: Arc<dyn Clock>, peers: Option<Peers>) -> Node {
        let router = Router::new(group.clone(), config.actors.clone());
        let tick = Duration::from_millis(config.expiry_tick_ms.max(10));
        actix::spawn(expire_holds(group.clone(), clock.clone(), tick));
        let topology = Arc::new(config.topology.clone());
        let node =
            Node { group, router, topology, clock, drills: Drills::default(), transferring: Arc::default(), peers };
        actix::spawn(crate::switchover::finish_stalled(node.clone(), tick));
        node
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.group.raft().metrics().borrow().id
    }

    /// Where every node of the cluster runs.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// This node's view of itself and its groups.
    pub fn status(&self) -> NodeStatus {
        match &self.peers {
            Some(peers) => peers.handler.status(),
            None => NodeStatus { node_id: self.id(), isolated_for_ms: None, groups: vec![self.group.status()] },
        }
    }

    /// Asks node `node` for its status (this node answers for itself). A
    /// node that is down, partitioned or isolated answers an error.
    pub async fn node_status(&self, node: u64) -> Result<NodeStatus, ProposeError> {
        match &self.peers {
            _ if node == self.id() => Ok(self.status()),
            Some(peers) => peers.forwarder.node_status(node).await,
            None => Err(ProposeError::Unavailable(format!("node {node} is not in this single-node cluster"))),
        }
    }

    /// This node's clock, in ms since the epoch.
    pub fn clock_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The drills this node coordinated, newest last.
    pub(crate) fn drills(&self) -> &Drills {
        &self.drills
    }

    /// Every drill on record in the cluster, oldest first: a drill's report
    /// is written into the replicated state when it starts and when it
    /// ends, so any node lists it, and the node running one shows its
    /// progress as it goes.
    pub fn drill_reports(&self) -> Vec<DrillReport> {
        drill::reports(self)
    }

    /// One drill on record, by id.
    pub fn drill_report(&self, id: u64) -> Option<DrillReport> {
        self.drill_reports().into_iter().find(|report| report.id == id)
    }

    /// Starts a zone-loss drill coordinated by this node (see
    /// [`crate::drill`]) and returns its first report; the drill runs on in
    /// the background and its report fills in as it goes. Must run inside
    /// an actix system.
    pub async fn start_zone_loss_drill(
        &self,
        zone: &str,
        isolate_for: Duration,
        requested_by: &str,
    ) -> Result<DrillReport, DrillError> {
        let statuses = self.topology.nodes.iter().map(|spec| async move {
            let status = tokio::time::timeout(Duration::from_secs(1), self.node_status(spec.id)).await;
            (spec.id, status.ok().and_then(Result::ok))
        });
        for (id, status) in futures::future::join_all(statuses).await {
            if status.is_some_and(|status| status.isolated_for_ms.is_some()) {
                return Err(DrillError::AlreadyIsolated(id));
            }
        }
        let (report, zone_nodes) = drill::plan_zone_loss(self, zone, isolate_for, requested_by, self.clock_ms())?;
        actix::spawn(drill::run_zone_loss(self.clone(), report.id, zone_nodes, isolate_for));
        Ok(report)
    }

    /// Starts a planned switchover of writes to `region` (see
    /// [`crate::switchover`]) and returns its first report; it runs on in
    /// the background. Only the leader can run one.
    pub async fn start_switchover(&self, region: &str, requested_by: &str) -> Result<DrillReport, DrillError> {
        let (report, voters) = crate::switchover::plan(self, region, requested_by)?;
        actix::spawn(crate::switchover::run(self.clone(), report.id, region.to_string(), voters));
        Ok(report)
    }

    /// What an unplanned failover to this node's region would cost if the
    /// writing region were lost now; changes nothing.
    pub fn failover_preview(&self) -> Result<crate::FailoverPreview, DrillError> {
        crate::failover::preview(self)
    }

    /// Forces a failover of writes to this node's region, the region that
    /// takes them being lost (see [`crate::failover`]), and returns its
    /// first report; it runs on in the background.
    pub async fn start_failover(&self, region: &str, requested_by: &str) -> Result<DrillReport, DrillError> {
        let (report, plan) = crate::failover::plan(self, region, requested_by).await?;
        actix::spawn(crate::failover::run(self.clone(), report.id, plan));
        Ok(report)
    }

    /// Fails back from `from`, the region a forced failover lost (see
    /// [`crate::failback`]), and returns its first report; it runs on in the
    /// background. Only the leader can run one. `copies_lost`: nodes of
    /// `from` whose disks are gone for good, which the reconciliation
    /// goes without.
    pub async fn start_failback(
        &self,
        from: &str,
        copies_lost: &[u64],
        requested_by: &str,
    ) -> Result<DrillReport, DrillError> {
        let (report, plan) = crate::failback::plan(self, from, copies_lost, requested_by).await?;
        actix::spawn(crate::failback::run(self.clone(), report.id, plan));
        Ok(report)
    }

    /// Replaces node `target`, whose data is gone for good, with a wiped
    /// node in its place, or adds back one that a replacement cut short
    /// left outside the group (see [`crate::replace`]), and returns its first
    /// report; it runs on in the background. Only the leader can run one.
    /// `voter`: whether the node ends as a voter; by default, what an
    /// unfinished replacement of it on record meant, or else what it is now.
    pub async fn start_replace(
        &self,
        target: u64,
        voter: Option<bool>,
        requested_by: &str,
    ) -> Result<DrillReport, DrillError> {
        let (report, plan) = crate::replace::plan(self, target, voter, requested_by).await?;
        actix::spawn(crate::replace::run(self.clone(), report.id, plan));
        Ok(report)
    }

    /// Moves the group's leadership to node `to` (see [`crate::leadership`]).
    pub async fn transfer_leadership(&self, to: u64) -> Result<LeaderMoved, TransferError> {
        leadership::transfer(self, to, self.group.lease(), &self.transferring).await
    }

    /// Has node `node` (this one included) do one step of a leadership
    /// transfer of the group.
    pub(crate) async fn transfer_step(&self, node: u64, step: PeerBody) -> Result<(), ProposeError> {
        if node == self.id() {
            return match step {
                PeerBody::Abdicate { for_ms } => {
                    self.group.abdicate(Duration::from_millis(for_ms));
                    Ok(())
                }
                PeerBody::HoldElections { for_ms } => {
                    self.group.hold_elections(Duration::from_millis(for_ms));
                    Ok(())
                }
                PeerBody::Campaign => self.group.campaign().await,
                other => Err(ProposeError::Unavailable(format!("{} is not a transfer step", other.kind()))),
            };
        }
        match &self.peers {
            Some(peers) => peers.forwarder.transfer_step(node, 0, step).await,
            None => Err(ProposeError::Unavailable(format!("node {node} is not in this single-node cluster"))),
        }
    }

    /// Node `node`'s copy, whole, with its whole log applied (this node's
    /// own, if asked; see [`Group::copy_with_log`]).
    pub(crate) async fn copy_of(&self, node: u64) -> Result<GroupState, ProposeError> {
        match &self.peers {
            _ if node == self.id() => self.group.copy_with_log(),
            Some(peers) => peers.forwarder.copy_of(node).await,
            None => Err(ProposeError::Unavailable(format!("node {node} is not in this single-node cluster"))),
        }
    }

    /// Where node `node`'s log ends once every request it admitted before
    /// the question has reached its Raft (this node's own, if asked),
    /// waiting at most `within`.
    pub(crate) async fn log_end(&self, node: u64, within: Duration) -> Result<LogEnd, ProposeError> {
        match &self.peers {
            Some(peers) if node == self.id() => {
                let own = peers.handler.log_end(&self.group);
                tokio::time::timeout(within, own).await.unwrap_or(Err(ProposeError::Timeout))
            }
            _ if node == self.id() => self.group.log_end().await,
            Some(peers) => peers.forwarder.log_end(node, within).await,
            None => Err(ProposeError::Unavailable(format!("node {node} is not in this single-node cluster"))),
        }
    }

    /// Cuts node `node` off from every other node for `duration`: the zone-
    /// loss drill's fault. The isolation lifts by itself at the end.
    pub async fn isolate(&self, node: u64, duration: Duration) -> Result<(), ProposeError> {
        match &self.peers {
            Some(peers) => peers.forwarder.isolate(node, duration).await,
            None => Err(ProposeError::Unavailable("a single node has no peers to be isolated from".into())),
        }
    }

    /// Proposes an operator command (create a sale, restock).
    pub async fn operator(&self, command: Command) -> Result<Outcome, ProposeError> {
        self.router.propose(command).await
    }

    /// Opens a session for `shopper`, whose bearer token hashes to `token_hash`.
    pub async fn open_session(&self, shopper: String, token_hash: String) -> Result<Outcome, ProposeError> {
        self.router.propose(Command::OpenSession { shopper, token_hash }).await
    }

    /// Runs a shopper's command through their session actor.
    pub async fn shopper(&self, session: SessionId, command: Command) -> Result<Outcome, ProposeError> {
        self.router.session(session, command).await
    }

    /// A linearizable read of the group state.
    pub async fn read<T>(&self, read: impl FnOnce(&GroupState) -> T) -> Result<T, ProposeError> {
        self.group.read_linearizable(read).await
    }

    /// Whether this node follows the group without voting: a DR replica
    /// (see [`crate::Role::Replica`]), or an old primary node after a
    /// switchover.
    pub fn is_replica(&self) -> bool {
        self.group.is_learner()
    }

    /// The region that takes writes: the configured primary region until a
    /// switchover moves them.
    pub fn primary_region(&self) -> String {
        self.read_local(|state| state.primary_region().map(str::to_owned))
            .unwrap_or_else(|| self.topology.primary_region.clone())
    }

    /// Whether node `id` may lead: a voter of the group, in the region that
    /// takes writes.
    pub fn may_lead(&self, id: u64) -> bool {
        let voter = self.group.raft().metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id);
        let region = self.primary_region();
        voter && self.topology.node(id).is_some_and(|spec| spec.region == region)
    }

    /// A read of this replica's applied state, without a quorum round.
    pub fn read_local<T>(&self, read: impl FnOnce(&GroupState) -> T) -> T {
        self.group.read_local(read)
    }

    /// The node's group, for status and readiness.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// How many SKU and session actors are live.
    pub fn live_actors(&self) -> (usize, usize) {
        self.router.live_actors()
    }
}

/// Opens a group whose voters are other nodes too: Raft over the mutual-TLS
/// peer transport, writes and reads forwarded to the leader, and the peer
/// server that answers the other nodes. The server starts before anyone
/// waits for a leader, or no node could ever vote.
async fn open_clustered(
    config: &NodeConfig,
    data_dir: &Path,
    clock: Arc<dyn Clock>,
    members: BTreeMap<u64, openraft::BasicNode>,
    bootstrap: bool,
) -> Result<(Group, Peers), ProposeError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| ProposeError::Unavailable(format!("{what}: {e}"));
    let node_id = config.group.node_id;
    let files = config.tls.as_ref().ok_or_else(|| unavailable("peer transport", &"no TLS files configured"))?;
    let tls = PeerTls::load(&files.ca, &files.cert, &files.key).map_err(|e| unavailable("load peer TLS", &e))?;
    let own = config.topology.node(node_id).ok_or_else(|| unavailable("topology", &"this node is not in it"))?;
    let listener = tokio::net::TcpListener::bind(&own.peer)
        .await
        .map_err(|e| unavailable(&format!("listen on {}", own.peer), &e))?;
    let regions = config.topology.nodes.iter().map(|n| (n.id, n.region.clone())).collect();
    let fence = Fence::open(&data_dir.join("fence"), Some(own.region.clone()), regions)
        .map_err(|e| unavailable("read the fence", &e))?;
    let clients = PeerClients::new(tls.client.clone(), ClientLimits::default()).with_fence(fence.clone());
    let network = PeerNetwork::new(0, node_id, clients.clone());
    let isolation = clients.isolation().clone();
    let group = Group::open(&config.group, data_dir, clock, network, members, bootstrap)
        .await?
        .joining(config.join)
        .with_fence(fence.clone());
    let peers = config.topology.nodes.iter().map(|n| (n.id, n.peer.clone())).collect();
    let timeout = Duration::from_millis(config.actors.request_timeout_ms);
    let forwarder = Arc::new(PeerForwarder::new(clients, peers, timeout));
    let group = group.with_forwarder(forwarder.clone());
    let handler = GroupHandler::new(node_id, BTreeMap::from([(0, group.clone())]), isolation).with_fence(fence);
    let server = PeerServer::start(listener, tls.server.clone(), Arc::new(handler.clone()), server_limits(timeout))
        .map_err(|e| unavailable("start the peer server", &e))?;
    Ok((group, Peers { forwarder, handler, _server: Some(Arc::new(server)) }))
}

/// Longest wait for an expiry tick's entry to commit.
const EXPIRY_PROPOSAL_MAX: Duration = Duration::from_secs(5);

/// While this node leads, proposes an empty entry whenever a payment
/// deadline has passed, so expired holds return to stock without waiting for
/// the next shopper.
async fn expire_holds(group: Group, clock: Arc<dyn Clock>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if group.raft().metrics().borrow().running_state.is_err() {
            // Raft stopped (shutdown, or a crash in the simulator): so does this.
            return;
        }
        let due = group.read_local(GroupState::next_deadline_ms).is_some_and(|deadline| deadline <= clock.now_ms());
        if due && group.is_leader() {
            // Bounded: a proposal that never completes must not stop expiry
            // for good (the next tick proposes again).
            match tokio::time::timeout(EXPIRY_PROPOSAL_MAX, group.propose(Vec::new())).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "proposing an expiry tick failed; retrying next tick"),
                Err(_) => tracing::warn!("an expiry tick got no outcome in time; retrying next tick"),
            }
        }
    }
}

/// The peer server's bounds, its deadlines outlasting `request_timeout`, so
/// that no caller still waits on a handler or a connection the server gave
/// up on.
fn server_limits(request_timeout: Duration) -> ServerLimits {
    let defaults = ServerLimits::default();
    let outlast = |ms: u64| ms.max(u64::try_from(4 * request_timeout.as_millis()).unwrap_or(u64::MAX));
    ServerLimits {
        idle_timeout_ms: outlast(defaults.idle_timeout_ms),
        handler_timeout_ms: outlast(defaults.handler_timeout_ms),
        ..defaults
    }
}
