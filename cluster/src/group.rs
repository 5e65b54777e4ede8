//! One Raft group on this node: its openraft instance, a read handle on its
//! applied state, and the leader's stamping clock.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use domain::{Command, GroupState, Request, Response};
use futures::future::BoxFuture;
use openraft::error::{ClientWriteError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, LogId, Raft, SnapshotPolicy};
use storage::{StateReader, TypeConfig};

use crate::clock::Clock;
use crate::escrow::Tender;
use crate::fence::Fence;
use crate::read_rounds::ReadRounds;
use crate::status::{GroupStatus, ReplicaLag};
use crate::transport::LogEnd;
use crate::ProposeError;

type Metrics = openraft::RaftMetrics<u64, BasicNode>;

/// What a leader cut off from its quorum answers: the command may or may
/// not commit once the partition heals, so the client retries with its key.
fn cut_off_error() -> ProposeError {
    ProposeError::Unavailable("this node lost contact with a quorum of the group; retry with the same key".into())
}

/// The first of an append-entries call's entries out of place, if any, as
/// (its index, the index it should have): the entries must run on from
/// `prev_log_id` with no gap.
///
/// A leader's replication stream can read its log just after a purge
/// removed entries it asked for; openraft 0.9 then sends the entries after
/// the purge as if they followed `prev_log_id` (it checks only in debug
/// builds). A follower whose commit index covers `prev_log_id` would append
/// them and get a hole in its log (found by the simulator: the node stopped
/// on the next read of the missing entries). Such a call is refused whole
/// ([`crate::transport::Refusal::UnmooredEntries`]). Taking it as a
/// heartbeat instead, as Surge once did, is no answer: the leader reads a
/// success as the follower holding every entry it sent, and counts it
/// toward the commit of entries it never got (seed 4018284767593846214,
/// where a follower's log went back). A refusal makes the leader drop the
/// attempt and plan the next one from its log as it is now: the entries
/// after the purge, or a snapshot.
pub(crate) fn unmoored_entries(rpc: &openraft::raft::AppendEntriesRequest<TypeConfig>) -> Option<(u64, u64)> {
    let first = rpc.prev_log_id.map_or(0, |prev| prev.index + 1);
    (first..)
        .zip(&rpc.entries)
        .find(|(expected, entry)| entry.log_id.index != *expected)
        .map(|(expected, entry)| (entry.log_id.index, expected))
}

/// How a group's Raft instance is tuned.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// This node's Raft id.
    pub node_id: u64,
    /// Raft heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// A snapshot is built after this many entries since the last one, and the
    /// log before it is purged, so the log does not grow without bound.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the latest snapshot, for slow followers.
    pub log_kept_behind_snapshot: u64,
    /// Whether this node ever campaigns to lead. A tiebreaker in another
    /// region only votes: a leader there would put a cross-region round trip
    /// into every commit. It still stores the log and counts for the quorum.
    /// This holds until a switchover moves writes to another region.
    pub may_lead: bool,
    /// This node's region. Once a switchover has moved writes, a node may
    /// lead exactly when it is in the region that takes them.
    pub region: Option<String>,
    /// The DR replicas: the leader adds each as a learner, so it follows
    /// the log without being waited for. With any, the leader keeps stock
    /// in escrow for them to confirm (see [`crate::escrow`]).
    pub replicas: BTreeMap<u64, BasicNode>,
    /// The smallest escrow block a SKU is granted, in units.
    pub escrow_block_min: u64,
    /// The largest escrow block a hot SKU grows to, in units.
    pub escrow_block_max: u64,
    /// Extra time each durable log write takes: the simulator's slow disk.
    /// None on a real device.
    pub log_write_delay: Option<storage::WriteDelay>,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            node_id: 1,
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_every_entries: 20_000,
            log_kept_behind_snapshot: 2_000,
            may_lead: true,
            region: None,
            replicas: BTreeMap::new(),
            escrow_block_min: 16,
            escrow_block_max: 1_024,
            log_write_delay: None,
        }
    }
}

/// How a node that does not lead a group reaches the node that does. The
/// peer transport implements it; a single-voter group needs none.
pub trait Forwarder: Send + Sync + 'static {
    /// Has `leader` propose `commands` in `group` (stamped with the leader's
    /// clock) and returns the state machine's answer.
    fn forward(
        &self,
        leader: u64,
        group: u32,
        commands: Vec<Command>,
    ) -> BoxFuture<'static, Result<Response, ProposeError>>;

    /// Asks `leader` for the log index a linearizable read of `group` must
    /// see applied: the leader confirms its leadership with a quorum first.
    fn read_index(&self, leader: u64, group: u32) -> BoxFuture<'static, Result<u64, ProposeError>>;

    /// Asks `voter` whether it would vote now for this node, whose log ends
    /// at `last_log` (see [`Group::pre_vote`]).
    fn pre_vote(
        &self,
        voter: u64,
        group: u32,
        last_log: Option<LogId<u64>>,
    ) -> BoxFuture<'static, Result<bool, ProposeError>>;
}

/// A handle on one Raft group. Cheap to clone.
#[derive(Clone)]
pub struct Group {
    /// Which group of the node this is, as peers name it.
    id: u32,
    raft: Raft<TypeConfig>,
    state: StateReader,
    /// Reads this node's log, for [`Group::copy_with_log`].
    log: storage::LogStore<TypeConfig>,
    clock: Arc<dyn Clock>,
    /// Reaches the leader when this node is a follower, and the other
    /// voters for a pre-vote. Shared by every clone, so that
    /// [`Group::with_forwarder`] reaches the background tenders too.
    forwarder: Arc<OnceLock<Arc<dyn Forwarder>>>,
    /// A leader that has heard from no quorum for this long is cut off: by
    /// now the others have elected a new leader, so it fails what it is
    /// asked at once instead of letting it wait for a commit that may never
    /// come. openraft 0.9 has no way to make a leader step down; it does
    /// when the partition heals and it hears the new term.
    lease: Duration,
    /// Whether this node may campaign when nothing is being transferred,
    /// until a switchover moves writes (see [`Group::may_lead`]).
    may_lead: bool,
    /// The node started with `join = true`: its data was wiped, and what it
    /// voted for and logged before is lost. Until a leader has given it a
    /// log it grants no vote (see [`Group::vote`]).
    joining: bool,
    /// This node's region.
    region: Option<String>,
    /// What keeps this node from campaigning or heartbeating now; see
    /// [`Group::apply_holds`].
    holds: Arc<Mutex<Holds>>,
    /// The last log index this replica had when it opened. openraft 0.9
    /// lets a leader that restarts before anyone else campaigns lead on in
    /// its old term, with no new blank entry and knowing only what it had
    /// applied as committed (openraft issue 1511); entries the previous
    /// incarnation had committed and acknowledged may sit above that. No
    /// read index is lower than this, so a read waits until they are
    /// applied rather than missing them.
    recovered_log: u64,
    /// One quorum round at a time for the leader's read indexes, shared by
    /// the reads that arrive while the previous one runs.
    read_rounds: Arc<ReadRounds>,
    /// The DR replicas the leader keeps attached as learners.
    replicas: Arc<BTreeMap<u64, BasicNode>>,
    /// How current the DR copy is, from either side.
    sync: Arc<Mutex<ReplicaSync>>,
    /// Keeps escrow ahead of need (leader) and confirms it (DR copy).
    escrow: Tender,
    /// How often the background tenders look at least.
    tick: Duration,
    /// Whether a newer generation has fenced this copy (see [`crate::fence`]).
    /// Shared by every clone, the background tenders' included, so that
    /// [`Group::with_fence`] reaches them too.
    fence: Arc<Mutex<Fence>>,
}

/// How current a DR copy is. The leader knows when each replica last had
/// its whole log; a replica knows when it last had everything a leader
/// told it was committed.
#[derive(Debug, Default)]
struct ReplicaSync {
    /// On the leader: when each replica last had every entry of its log.
    caught_up_at: BTreeMap<u64, Instant>,
    /// On a replica: the commit index the last append-entries call carried,
    /// and when it came.
    leader_commit: Option<(u64, Instant)>,
    /// On a replica: when it last had applied everything a leader had
    /// committed when it wrote to it.
    synced_at: Option<Instant>,
    /// An `add_learner` is under way.
    attaching: bool,
}

/// Deadlines that override openraft's elect and heartbeat switches. Kept
/// under one lock with the switches' last setting, so a newer hold can
/// never be undone by an older one's expiry.
#[derive(Debug, Default)]
struct Holds {
    /// While leadership is handed away from this node: it refuses writes
    /// and sends no heartbeats (see [`Group::abdicate`]).
    abdicating_until: Option<Instant>,
    /// A transfer favours another node: this one does not campaign.
    elections_held_until: Option<Instant>,
    /// When this node last heard from a leader (an append-entries call its
    /// Raft took, not one of an older term) or led itself. A follower that
    /// never campaigns keeps naming its old leader for ever, so this, not
    /// `current_leader`, says it is stranded.
    heard_from_leader: Option<Instant>,
    /// When a majority of the voters last said they would vote for this
    /// node (see [`Group::pre_vote`]); openraft's elect switch stays off
    /// unless that was lately.
    pre_vote_won_at: Option<Instant>,
    /// When this node last handed leadership away because its disk was
    /// slow (see [`SLOW_APPENDS`]).
    stepped_down_for_disk_at: Option<Instant>,
}

/// A leader whose own appends take this long on average hands leadership
/// to another voter: every commit waits for its append before it even
/// replicates (`storage::LogStore`'s `append`), so a sick disk holds up
/// every checkout, yet a leader that still heartbeats is never deposed.
/// A healthy disk appends in a few milliseconds.
const SLOW_APPENDS: Duration = Duration::from_millis(50);

/// After handing leadership away for a slow disk, this many leases pass
/// before the node does it again: it may win again when no other voter
/// can lead, and then it leads slowly rather than not at all.
const SLOW_STEP_DOWN_EVERY_LEASES: u32 = 10;

impl Group {
    /// Opens the group's database in `data_dir` and starts its Raft instance
    /// over `network`. On a restart it recovers from its snapshot and log. A
    /// new group is initialised with `members` as voters when `bootstrap` is
    /// set; exactly one node of a new cluster does that, and the others learn
    /// the membership from its first message.
    pub async fn open<N: RaftNetworkFactory<TypeConfig>>(
        config: &GroupConfig,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        network: N,
        members: BTreeMap<u64, BasicNode>,
        bootstrap: bool,
    ) -> Result<Group, ProposeError> {
        let database = redb::Database::create(data_dir.join("group-0.redb"))
            .map_err(|e| ProposeError::Unavailable(format!("open the group's database: {e}")))?;
        Group::open_on(config, Arc::new(database), clock, network, members, bootstrap).await
    }

    /// Like [`Group::open`], on a database the caller built: the simulator's
    /// has a disk that loses what was not fsynced when its node crashes.
    pub async fn open_on<N: RaftNetworkFactory<TypeConfig>>(
        config: &GroupConfig,
        database: Arc<redb::Database>,
        clock: Arc<dyn Clock>,
        network: N,
        members: BTreeMap<u64, BasicNode>,
        bootstrap: bool,
    ) -> Result<Group, ProposeError> {
        let raft_config = openraft::Config {
            cluster_name: "surge".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            // Off until the hold ticker, which owns the switch, turns it on:
            // at once for a group of one voter, otherwise only after a
            // pre-vote. A restarted voter would campaign on its first tick.
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.log_kept_behind_snapshot,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| ProposeError::Unavailable(e.to_string()))?);
        let (log, state_machine) =
            storage::from_database::<TypeConfig>(database).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let mut log = log.with_write_delay(config.log_write_delay.clone());
        let state = state_machine.reader();
        let durable_commits = log.durable_commits();
        let log_reader = log.clone();
        let log_state = log.get_log_state().await.map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let recovered_log = log_state.last_log_id.map_or(0, |id| id.index);
        let raft = Raft::new(config.node_id, raft_config, network, log, state_machine)
            .await
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let initialized = raft.is_initialized().await.map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        if !initialized && bootstrap {
            raft.initialize(members).await.map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        }
        let lease = Duration::from_millis(config.election_timeout_max_ms);
        let group = Group {
            id: 0,
            raft,
            state,
            clock,
            forwarder: Arc::default(),
            lease,
            log: log_reader,
            may_lead: config.may_lead,
            joining: false,
            region: config.region.clone(),
            holds: Arc::default(),
            recovered_log,
            read_rounds: Arc::default(),
            replicas: Arc::new(config.replicas.clone()),
            sync: Arc::default(),
            escrow: Tender::new(
                !config.replicas.is_empty(),
                config.escrow_block_min,
                config.escrow_block_max,
                durable_commits,
            ),
            tick: Duration::from_millis(config.heartbeat_ms.max(10)),
            fence: Arc::default(),
        };
        tokio::spawn(group.clone().tend_holds(group.tick));
        Ok(group)
    }

    /// Lets this group's writes and reads reach the leader from a follower,
    /// and starts the escrow tender, which needs that: a DR copy confirms
    /// escrow through the leader. (A group alone has no DR copy.)
    pub fn with_forwarder(self, forwarder: Arc<dyn Forwarder>) -> Group {
        if self.forwarder.set(forwarder).is_err() {
            tracing::warn!("the group already has a forwarder; keeping the first");
            return self;
        }
        tokio::spawn(self.escrow.clone().run(self.clone(), self.tick));
        self
    }

    /// Marks the group as its node's after a wipe (`join = true`): see
    /// [`Group::vote`]. Before the group is handed to its peer handler.
    pub fn joining(mut self, joining: bool) -> Group {
        self.joining = joining;
        self
    }

    /// Fences this group with `fence`, the one its node's peer transport
    /// stamps and checks requests with.
    pub fn with_fence(self, fence: Fence) -> Group {
        fence.set_generation(self.state.read(GroupState::generation));
        *self.fence.lock().unwrap_or_else(PoisonError::into_inner) = fence;
        self
    }

    /// The group's fence.
    pub fn fence(&self) -> Fence {
        self.fence.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Why this node may not take a write or serve a linearizable read
    /// now, if it may not: its copy is fenced by a newer generation; or it
    /// leads a group with members in another region and none of them has
    /// answered it since it started, so it cannot know whether a failover
    /// there fenced it (a node in that case that does not lead says so at
    /// once, rather than letting openraft take the batch as it wins an
    /// election).
    fn fence_refusal(&self) -> Option<ProposeError> {
        let fence = self.fence();
        if let Some(generation) = fence.fenced_by() {
            return Some(ProposeError::Unavailable(format!(
                "this node is fenced: the sale failed over to generation {generation} elsewhere, so it takes no writes"
            )));
        }
        if fence.confirmed() {
            // The checkout path: nothing more to look at.
            return None;
        }
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if !self.spans_regions(&metrics) {
            return None;
        }
        if !metrics.state.is_leader() {
            // Not passed through to openraft: a batch that did so while this
            // node campaigned would reach the log once it leads, unchecked.
            return Some(ProposeError::NotLeader { leader: metrics.current_leader.filter(|&l| l != metrics.id) });
        }
        Some(ProposeError::Unavailable(
            "this leader has not heard from another region since it started; it takes writes once it has".into(),
        ))
    }

    /// Whether the group has a member (voter or learner) other than this
    /// node in another region: a copy that a failover could promote.
    fn spans_regions(&self, metrics: &Metrics) -> bool {
        let fence = self.fence();
        metrics.membership_config.membership().nodes().any(|(id, _)| *id != metrics.id && fence.is_elsewhere(*id))
    }

    /// Whether the group has a member in another region now: one that can
    /// confirm escrow grants. After a failover the promoted group has none
    /// until failback, and sells what is available.
    pub(crate) fn has_copy_elsewhere(&self) -> bool {
        self.spans_regions(&self.raft.metrics().borrow())
    }

    /// Whether the leader this node follows is in another region: only
    /// then is this node's copy one that a failover would promote in the
    /// leader's place, and only then may it confirm escrow.
    pub(crate) fn leader_is_elsewhere(&self) -> bool {
        let leader = self.raft.metrics().borrow().current_leader;
        leader.is_some_and(|leader| self.fence().is_elsewhere(leader))
    }

    /// Waits until this group has a leader and this replica has applied
    /// every entry in its log, or `timeout` passes. After a restart that
    /// means the log has been replayed, so local reads (session tokens) see
    /// everything acknowledged before the crash.
    pub async fn wait_until_caught_up(&self, timeout: Duration) -> Result<u64, ProposeError> {
        let caught_up = |m: &openraft::RaftMetrics<u64, BasicNode>| {
            m.current_leader.is_some() && m.last_applied.map(|id| id.index) >= m.last_log_index
        };
        match self.raft.wait(Some(timeout)).metrics(caught_up, "leader elected and log applied").await {
            Ok(m) => Ok(m.current_leader.expect("checked by the wait condition")),
            Err(e) => Err(ProposeError::Unavailable(format!("not caught up: {e}"))),
        }
    }

    /// Proposes one batch and returns the state machine's answer once the
    /// entry is committed (durable on a quorum) and applied. On a follower
    /// the batch goes to the leader, which stamps and proposes it; a leader
    /// change in between answers `NotLeader`, and the client retries with the
    /// same idempotency key.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Response, ProposeError> {
        let leader = match self.propose_here(commands.clone()).await {
            Err(ProposeError::NotLeader { leader: Some(leader) }) => leader,
            other => return other,
        };
        match self.forwarder.get() {
            Some(forwarder) => forwarder.forward(leader, self.id, commands).await,
            None => Err(ProposeError::NotLeader { leader: Some(leader) }),
        }
    }

    /// Proposes on this node only, stamped with this node's clock: what the
    /// leader does with a batch a follower forwarded. Never forwards again,
    /// so a stale leader hint cannot bounce a batch around.
    pub async fn propose_here(&self, commands: Vec<Command>) -> Result<Response, ProposeError> {
        // Once it has stepped down, openraft itself names the new leader.
        if self.is_abdicating() && self.is_leader() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        if let Some(refusal) = self.fence_refusal() {
            return Err(refusal);
        }
        let request = Request { stamped_at_ms: self.clock.now_ms(), commands };
        let started = Instant::now();
        // The switch first: outside the simulator it is a constant `false`,
        // so this costs the checkout path nothing.
        if domain::mutation::active(domain::mutation::Mutation::DeposedLeaderAcks) && self.is_cut_off() {
            // The bug: answer from this replica's own state, as if committed.
            return Ok(self.state.read(|state| state.clone().apply(&request)));
        }
        let written = match self.unless_cut_off(self.raft.client_write(request)).await {
            Some(written) => written,
            None => return Err(cut_off_error()),
        };
        metrics::histogram!("surge_raft_commit_seconds").record(started.elapsed().as_secs_f64());
        match written {
            Ok(reply) => {
                self.escrow.note(&reply.data);
                Ok(reply.data)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(ProposeError::NotLeader { leader: forward.leader_id })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Reads the applied state once it includes everything committed before
    /// the read began: the read is linearizable. The leader confirms its
    /// leadership with a quorum; a follower asks the leader for that point
    /// (the read index) and waits until it has applied it.
    pub async fn read_linearizable<T>(&self, read: impl FnOnce(&GroupState) -> T) -> Result<T, ProposeError> {
        let leader = match self.read_index_here().await {
            Ok(index) => return self.read_at(index, read).await,
            Err(ProposeError::NotLeader { leader: Some(leader) }) => leader,
            Err(other) => return Err(other),
        };
        let forwarder = self.forwarder.get().ok_or(ProposeError::NotLeader { leader: Some(leader) })?;
        let index = forwarder.read_index(leader, self.id).await?;
        self.read_at(index, read).await
    }

    /// The leader's side of a read index: confirms leadership with a quorum
    /// and returns the index a linearizable read must see applied.
    pub async fn read_index_here(&self) -> Result<u64, ProposeError> {
        if self.is_abdicating() && self.is_leader() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        if let Some(refusal) = self.fence_refusal() {
            return Err(refusal);
        }
        let round = || async {
            let Some(read) = self.unless_cut_off(self.raft.get_read_log_id()).await else {
                return Err(cut_off_error());
            };
            match read {
                Ok((read_log_id, _applied)) => Ok(read_log_id.map_or(0, |id| id.index).max(self.recovered_log)),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(forward))) => {
                    Err(ProposeError::NotLeader { leader: forward.leader_id })
                }
                Err(e) => Err(ProposeError::Unavailable(e.to_string())),
            }
        };
        self.read_rounds.read_index(round).await
    }

    /// Waits (bounded) until this replica has applied `index`, then reads.
    async fn read_at<T>(&self, index: u64, read: impl FnOnce(&GroupState) -> T) -> Result<T, ProposeError> {
        self.raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "read index applied")
            .await
            .map_err(|_| ProposeError::Timeout)?;
        Ok(self.state.read(read))
    }

    /// Reads this replica's applied state without asking anyone: fast, and
    /// current for everything this node has applied (its own writes
    /// included), but it may lag a newer leader.
    pub fn read_local<T>(&self, read: impl FnOnce(&GroupState) -> T) -> T {
        self.state.read(read)
    }

    /// Like [`Group::read_local`], with the log index the state is applied
    /// up to. That is the state machine's own count, not openraft's
    /// metrics: those show an apply only once Raft's core gets to it, and
    /// a core waiting on a slow disk shows it late. Whatever compares
    /// copies (which is the most advanced) must use this one.
    pub fn read_local_at<T>(&self, read: impl FnOnce(&GroupState) -> T) -> (T, u64) {
        self.state.read_at(read)
    }

    /// This replica's copy with every entry of its log applied, committed
    /// or not: what failback reconciles with. A node of a lost primary
    /// that restarted may know less as committed than its last leader
    /// applied and acknowledged, and, fenced, has no leader to tell it.
    pub fn copy_with_log(&self) -> Result<GroupState, ProposeError> {
        let (state, applied) = self.state.read_at(Clone::clone);
        self.log
            .with_whole_log(&state, applied)
            .map_err(|e| ProposeError::Unavailable(format!("reading this node's log: {e}")))
    }

    /// The group's members, voters and learners, as this node knows them.
    pub fn members(&self) -> Vec<u64> {
        self.raft.metrics().borrow().membership_config.membership().nodes().map(|(id, _)| *id).collect()
    }

    /// Whether this node believes it leads the group. A hint, not a lease:
    /// what depends on leadership goes through a proposal or a linearizable read.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state.is_leader()
    }

    /// Whether this node leads the group but has heard from no quorum for
    /// longer than an election timeout (it is partitioned, or its peers
    /// are gone). Such a leader refuses writes and reads at once.
    pub fn is_cut_off(&self) -> bool {
        self.cut_off(&self.raft.metrics().borrow())
    }

    fn cut_off(&self, metrics: &Metrics) -> bool {
        let voters = metrics.membership_config.membership().voter_ids().count();
        metrics.state.is_leader()
            && voters > 1
            && metrics.millis_since_quorum_ack.is_some_and(|ms| u128::from(ms) > self.lease.as_millis())
    }

    /// Runs `work` unless this node is, or becomes while it runs, a leader
    /// cut off from its quorum; then `None`, at once. openraft refreshes its
    /// metrics on every timer tick, so "at once" is within a tick.
    async fn unless_cut_off<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        let mut metrics = self.raft.metrics();
        let cut_off = async {
            loop {
                if self.cut_off(&metrics.borrow_and_update()) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    // Raft stopped: `work` fails on its own.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            biased;
            () = cut_off => None,
            done = work => Some(done),
        }
    }

    // ---- Leadership transfer. openraft 0.9 cannot hand leadership over, so
    // ---- a transfer makes the leader fall silent until the voters' leader
    // ---- lease (one election timeout) has run out, keeps every other voter
    // ---- from campaigning, and has the target campaign. All three lift by
    // ---- themselves, so a coordinator that dies leaves nothing stuck.

    /// On the leader: for `duration` (or until it steps down), refuse writes
    /// and reads (`NotLeader`, a 503 the client retries) and send no
    /// heartbeats, so the voters' leases run out and another node can win
    /// an election. A zero duration ends it.
    pub fn abdicate(&self, duration: Duration) {
        let mut holds = self.lock_holds();
        holds.abdicating_until = Some(Instant::now() + duration);
        self.apply_holds(&holds);
    }

    /// For `duration`, do not campaign: a transfer favours another node. A
    /// zero duration ends it.
    pub fn hold_elections(&self, duration: Duration) {
        let mut holds = self.lock_holds();
        holds.elections_held_until = Some(Instant::now() + duration);
        self.apply_holds(&holds);
    }

    /// Hands a candidate's vote request to Raft, unless this node's data
    /// was wiped (`join = true`) and no leader has given it a log yet: then
    /// it answers no. Raft counts on a vote and the log behind it
    /// surviving; a wiped node that voted with an empty log could elect a
    /// candidate lacking entries it had helped commit. Found by the
    /// simulator: the lost primary's region came back with one node's disk
    /// gone, and while the DR region was down (so none knew the fence yet)
    /// that node's vote elected a leader without the last committed
    /// entries, and a follower that had them failed applying.
    pub async fn vote(
        &self,
        rpc: openraft::raft::VoteRequest<u64>,
    ) -> Result<openraft::raft::VoteResponse<u64>, RaftError<u64>> {
        if self.joining {
            let (vote, last_log_index) = {
                let metrics = self.raft.metrics().borrow().clone();
                (metrics.vote, metrics.last_log_index)
            };
            if last_log_index.is_none() {
                return Ok(openraft::raft::VoteResponse::new(vote, None, false));
            }
        }
        self.raft.vote(rpc).await
    }

    /// Hands a leader's append-entries call (replication or heartbeat) to
    /// Raft, noting that a leader is alive. The node's handler
    /// (`GroupHandler`) delivers them through here, once it has refused a
    /// call whose entries do not run on from its `prev_log_id`
    /// ([`unmoored_entries`]).
    pub(crate) async fn append_entries(
        &self,
        rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
    ) -> Result<openraft::raft::AppendEntriesResponse<u64>, RaftError<u64>> {
        let now = Instant::now();
        if let Some(commit) = rpc.leader_commit {
            self.lock_sync().leader_commit = Some((commit.index, now));
        }
        let answer = self.raft.append_entries(rpc).await;
        // A deposed leader's call, refused for its older term, is not a
        // leader heard: it must not keep this node from a pre-vote.
        if matches!(&answer, Ok(reply) if !matches!(reply, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
            self.lock_holds().heard_from_leader = Some(now);
        }
        answer
    }

    /// Pre-vote, on a voter a would-be candidate asks: whether this node
    /// would vote now for a candidate whose log ends at `candidate_log`.
    /// Changes nothing here; the vote itself is still Raft's.
    ///
    /// openraft 0.9 has no pre-vote: a voter cut off from the others
    /// campaigns again and again, raising its term each time, and when the
    /// partition heals its term deposes a healthy leader, a second outage
    /// after the fault itself. So a voter campaigns only once a majority of
    /// the voters, itself included, would vote for it ([`Group::tend_holds`]):
    /// each says yes only if it has heard from no leader for a lease (and
    /// does not lead, unless it is handing leadership away or is cut off),
    /// the candidate's log is at least as up to date as its own, and it
    /// is not a wiped node without a log (see [`Group::vote`]).
    pub fn pre_vote(&self, candidate_log: Option<LogId<u64>>) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        if self.joining && metrics.last_log_index.is_none() {
            return false;
        }
        let leads = metrics.state.is_leader() && !self.is_abdicating() && !self.cut_off(&metrics);
        let hears_a_leader = !metrics.state.is_leader()
            && self.lock_holds().heard_from_leader.is_some_and(|heard| heard.elapsed() <= self.lease);
        let own_log = match self.log.last_log_id() {
            Ok(own_log) => own_log,
            Err(error) => {
                tracing::warn!(%error, "reading the last log id for a pre-vote failed; answering no");
                return false;
            }
        };
        !leads && !hears_a_leader && candidate_log >= own_log
    }

    /// Asks every other voter for a pre-vote (see [`Group::pre_vote`]):
    /// whether a majority, this node included, would vote for it now. A
    /// voter that does not answer within a tick says no.
    async fn wins_pre_vote(&self, voters: &[u64], me: u64) -> bool {
        let Some(forwarder) = self.forwarder.get() else {
            return false;
        };
        let last_log = match self.log.last_log_id() {
            Ok(last_log) => last_log,
            Err(error) => {
                tracing::warn!(%error, "reading the last log id for a pre-vote failed");
                return false;
            }
        };
        let asks = voters.iter().filter(|&&voter| voter != me).map(|&voter| {
            let ask = forwarder.pre_vote(voter, self.id, last_log);
            async move { matches!(tokio::time::timeout(self.tick, ask).await, Ok(Ok(true))) }
        });
        let yes = 1 + futures::future::join_all(asks).await.into_iter().filter(|&yes| yes).count();
        yes * 2 > voters.len()
    }

    /// Whether this node may lead now: the configured answer until a
    /// switchover has moved writes, then whether it is in the region that
    /// takes them. A node that may not lead and finds itself leading hands
    /// leadership to a voter that has its whole log ([`Group::tend_holds`]);
    /// after a switchover that is how leadership moves to the new region.
    pub fn may_lead(&self) -> bool {
        self.state.read(|state| match state.primary_region() {
            Some(primary) => self.region.as_deref() == Some(primary),
            None => self.may_lead,
        })
    }

    /// Whether this node follows the group as a learner (a DR replica, or
    /// an old primary node after a switchover).
    pub fn is_learner(&self) -> bool {
        self.raft.metrics().borrow().state == openraft::ServerState::Learner
    }

    /// Campaign now, whatever the election timer says.
    pub async fn campaign(&self) -> Result<(), ProposeError> {
        self.raft.trigger().elect().await.map_err(|e| ProposeError::Unavailable(e.to_string()))
    }

    /// How long a leader may go without a quorum's acknowledgement before
    /// it counts as cut off; also the voters' leader lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn is_abdicating(&self) -> bool {
        self.lock_holds().abdicating_until.is_some_and(|until| Instant::now() < until)
    }

    fn lock_holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_sync(&self) -> std::sync::MutexGuard<'_, ReplicaSync> {
        self.sync.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets openraft's heartbeat and elect switches from the holds, under
    /// their lock.
    ///
    /// A node that may not lead (the tiebreaker) still campaigns once it
    /// has heard from no leader for three leases. Its vote alone can block a
    /// leader: if it holds entries the surviving primary nodes lack, it
    /// refuses to vote for them, and the group would wait for the lost zone
    /// forever. Once it leads, [`Group::tend_holds`] hands leadership back.
    ///
    /// Even then it campaigns only while its latest pre-vote, at most a
    /// few ticks old, found a majority ([`Group::pre_vote`]).
    fn apply_holds(&self, holds: &Holds) {
        let now = Instant::now();
        let abdicating = holds.abdicating_until.is_some_and(|until| now < until);
        let won = holds.pre_vote_won_at.is_some_and(|at| now.duration_since(at) <= self.tick * 3);
        let runtime = self.raft.runtime_config();
        runtime.heartbeat(!abdicating);
        runtime.elect(won && self.may_campaign(holds));
    }

    /// Whether the holds let this node campaign (pre-vote aside).
    fn may_campaign(&self, holds: &Holds) -> bool {
        let now = Instant::now();
        let abdicating = holds.abdicating_until.is_some_and(|until| now < until);
        let held = holds.elections_held_until.is_some_and(|until| now < until);
        let stranded = holds.heard_from_leader.is_some_and(|heard| now.duration_since(heard) > self.lease * 3);
        // A fenced leader keeps heartbeating: its followers learn of the
        // fence from its stamp. A fenced node never campaigns.
        let fenced = self.fence().fenced_by().is_some();
        !abdicating && !held && !fenced && (self.may_lead() || stranded)
    }

    /// Keeps the holds applied as they expire, and has a tiebreaker that had to lead give leadership
    /// back to the primary region once a primary voter has its whole log.
    /// Ends when Raft stops.
    async fn tend_holds(self, tick: Duration) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let metrics = self.raft.metrics().borrow().clone();
            if metrics.running_state.is_err() {
                return;
            }
            self.fence().set_generation(self.state.read(GroupState::generation));
            let appends = self.log.append_times().recent();
            metrics::gauge!("surge_log_append_ms").set(appends.as_secs_f64() * 1_000.0);
            let leading = metrics.state.is_leader() && !self.is_abdicating();
            if leading && !self.may_lead() && another_voter_has_whole_log(&metrics) {
                tracing::warn!("the tiebreaker leads; handing leadership back to the primary region");
                self.abdicate(self.lease * 3);
            } else if leading && self.disk_too_slow_to_lead(appends) && another_voter_has_whole_log(&metrics) {
                let appends_ms = appends.as_millis();
                tracing::warn!(appends_ms, "this leader's disk is slow; handing leadership to another voter");
                metrics::counter!("surge_slow_disk_step_downs_total").increment(1);
                self.lock_holds().stepped_down_for_disk_at = Some(Instant::now());
                self.abdicate(self.lease * 3);
            }
            if metrics.state.is_leader() {
                self.tend_replicas(&metrics);
            }
            self.note_replica_sync(&metrics);
            let won = self.pre_vote_if_leaderless(&metrics).await;
            let mut holds = self.lock_holds();
            if metrics.state.is_leader() || holds.heard_from_leader.is_none() {
                holds.heard_from_leader = Some(Instant::now());
            }
            if won {
                holds.pre_vote_won_at = Some(Instant::now());
            }
            self.apply_holds(&holds);
        }
    }

    /// Whether appends taking `appends` on average are slow enough (and
    /// this node has not just stepped down for that) that it should stop
    /// leading.
    fn disk_too_slow_to_lead(&self, appends: Duration) -> bool {
        let stepped_down = self.lock_holds().stepped_down_for_disk_at;
        let again = stepped_down.is_none_or(|at| at.elapsed() > self.lease * SLOW_STEP_DOWN_EVERY_LEASES);
        again && appends >= SLOW_APPENDS
    }

    /// Whether this voter may campaign now as far as a pre-vote goes: at
    /// once when it is the group's only voter; otherwise once it has heard
    /// from no leader for a lease, the holds let it campaign, and a majority
    /// of the voters would vote for it.
    async fn pre_vote_if_leaderless(&self, metrics: &Metrics) -> bool {
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        if metrics.state.is_leader() || !voters.contains(&metrics.id) {
            return false;
        }
        if voters.len() == 1 {
            return true;
        }
        let leaderless = {
            let holds = self.lock_holds();
            let heard_lately = holds.heard_from_leader.is_some_and(|heard| heard.elapsed() <= self.lease);
            !heard_lately && self.may_campaign(&holds)
        };
        leaderless && self.wins_pre_vote(&voters, metrics.id).await
    }

    /// On the leader: adds any DR replica missing from the membership as a
    /// learner (one at a time, in the background), and notes which
    /// replicas have its whole log.
    fn tend_replicas(&self, metrics: &Metrics) {
        let now = Instant::now();
        let membership = metrics.membership_config.membership();
        let missing = self.replicas.iter().find(|(id, _)| membership.get_node(id).is_none());
        let mut sync = self.lock_sync();
        if let Some((&id, node)) = missing {
            if !sync.attaching {
                sync.attaching = true;
                let group = self.clone();
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = group.raft.add_learner(id, node, false).await {
                        tracing::warn!("could not add DR replica {id} as a learner: {e}");
                    }
                    group.lock_sync().attaching = false;
                });
            }
        }
        let last = metrics.last_log_index;
        for id in self.replicas.keys() {
            let matched = metrics.replication.as_ref().and_then(|r| r.get(id).copied().flatten());
            let caught_up = matched.map(|m| m.index) >= last;
            let at = sync.caught_up_at.entry(*id).or_insert(now);
            if caught_up {
                *at = now;
            }
        }
    }

    /// On a replica: notes when it last had applied everything a leader
    /// had committed, and exports how far behind its copy may be.
    fn note_replica_sync(&self, metrics: &Metrics) {
        if !self.is_replica(metrics) {
            return;
        }
        let applied = metrics.last_applied.map_or(0, |id| id.index);
        let mut sync = self.lock_sync();
        let Some((commit, at)) = sync.leader_commit else { return };
        if applied >= commit {
            sync.synced_at = Some(at);
        }
        let stale_ms = sync.synced_at.map(|synced| synced.elapsed().as_millis() as f64);
        drop(sync);
        metrics::gauge!("surge_dr_lag_entries").set(commit.saturating_sub(applied) as f64);
        if let Some(stale_ms) = stale_ms {
            metrics::gauge!("surge_dr_lag_ms").set(stale_ms);
        }
    }

    fn is_replica(&self, metrics: &Metrics) -> bool {
        metrics.state == openraft::ServerState::Learner
    }

    /// On a DR replica: its copy holds every write the primary committed up
    /// to at most this many milliseconds ago; `None` on a voter, or before
    /// the replica has heard from a leader.
    pub fn stale_ms_max(&self) -> Option<u64> {
        let metrics = self.raft.metrics().borrow().clone();
        if !self.is_replica(&metrics) {
            return None;
        }
        self.note_replica_sync(&metrics);
        self.lock_sync().synced_at.map(|synced| synced.elapsed().as_millis() as u64)
    }

    /// Where this replica's log ends once Raft has taken in every request
    /// already handed to it, an append the fence admitted a moment ago
    /// included, which its metrics may not show yet. The question queues
    /// behind them; Raft writes each append to the store before it takes
    /// the next request, so the store holds them all when it is answered.
    /// The end is the furthest of the store's last entry, the commit index
    /// and the last snapshot (the log below a snapshot may lag it). A
    /// stopped Raft appends nothing more: the store and the last metrics
    /// answer for it.
    pub async fn log_end(&self) -> Result<LogEnd, ProposeError> {
        let seen = self
            .raft
            .with_raft_state(|state| {
                let term = state.vote_ref().leader_id().term;
                (term, [state.committed, state.snapshot_meta.last_log_id].into_iter().flatten().max())
            })
            .await;
        let (term, known) = match seen {
            Ok(seen) => seen,
            Err(_stopped) => {
                let metrics = self.raft.metrics().borrow().clone();
                (metrics.current_term, [metrics.last_applied, metrics.snapshot].into_iter().flatten().max())
            }
        };
        let stored =
            self.log.last_log_id().map_err(|e| ProposeError::Unavailable(format!("reading this node's log: {e}")))?;
        Ok(LogEnd { last_log: stored.into_iter().chain(known).max(), term })
    }

    /// This replica's view of the group, for `surge ctl status`.
    pub fn status(&self) -> GroupStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let last_log_index = metrics.last_log_index.unwrap_or(0);
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        let (commit_index, follower_lag) = match &metrics.replication {
            Some(replication) if metrics.state.is_leader() => {
                // The leader's own entry is what it has flushed; openraft
                // tracks it like a follower's when it has one.
                let matched = |id: &u64| match replication.get(id).copied().flatten() {
                    Some(log_id) => log_id.index,
                    None if id == &metrics.id => last_log_index,
                    None => 0,
                };
                let mut stored: Vec<u64> = voters.iter().map(matched).collect();
                stored.sort_unstable_by(|a, b| b.cmp(a));
                let commit = stored.get(voters.len() / 2).copied();
                let lag = voters
                    .iter()
                    .filter(|id| **id != metrics.id)
                    .map(|id| (*id, last_log_index.saturating_sub(matched(id))))
                    .collect();
                (commit, lag)
            }
            _ => (None, BTreeMap::new()),
        };
        let replica_lag = match &metrics.replication {
            Some(replication) if metrics.state.is_leader() => {
                let sync = self.lock_sync();
                metrics
                    .membership_config
                    .membership()
                    .learner_ids()
                    .map(|id| {
                        let matched = replication.get(&id).copied().flatten().map_or(0, |log_id| log_id.index);
                        let entries = last_log_index.saturating_sub(matched);
                        let since = sync.caught_up_at.get(&id).map_or(0, |at| at.elapsed().as_millis() as u64);
                        (id, ReplicaLag { entries, ms: if entries == 0 { 0 } else { since } })
                    })
                    .collect()
            }
            _ => BTreeMap::new(),
        };
        GroupStatus {
            group: self.id,
            role: format!("{:?}", metrics.state).to_ascii_lowercase(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index,
            last_log_term: self.log.last_log_id().ok().flatten().map_or(0, |log_id| log_id.leader_id.term),
            applied_index: self.state.read_at(|_| ()).1,
            snapshot_index: metrics.snapshot.map(|log_id| log_id.index),
            commit_index,
            follower_lag,
            replica_lag,
            stale_ms_max: self.stale_ms_max(),
            millis_since_quorum_ack: metrics.millis_since_quorum_ack,
            cut_off: self.cut_off(&metrics),
            generation: self.state.read(GroupState::generation),
            fenced_by: self.fence().fenced_by(),
        }
    }

    /// The group's Raft instance, for status and shutdown.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }
}

/// On a leader: whether a voter other than itself has its whole log, and
/// could take over at once.
fn another_voter_has_whole_log(metrics: &Metrics) -> bool {
    metrics.replication.as_ref().is_some_and(|replication| {
        let last = metrics.last_log_index;
        let voters = metrics.membership_config.membership().voter_ids().collect::<Vec<_>>();
        replication
            .iter()
            .any(|(id, matched)| *id != metrics.id && voters.contains(id) && matched.map(|m| m.index) >= last)
    })
}

#[cfg(test)]
mod tests {
    use openraft::raft::AppendEntriesRequest;
    use openraft::testing::{blank_ent, log_id};
    use openraft::Vote;

    use super::*;

    fn request(prev: u64, entries: std::ops::RangeInclusive<u64>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(1, 1, prev)),
            entries: entries.map(|index| blank_ent::<TypeConfig>(1, 1, index)).collect(),
            leader_commit: Some(log_id(1, 1, prev)),
        }
    }

    #[test]
    fn entries_that_do_not_follow_prev_log_id_are_unmoored() {
        assert_eq!(unmoored_entries(&request(143, 256..=299)), Some((256, 144)));
        assert_eq!(unmoored_entries(&request(143, 144..=150)), None);
        let mut heartbeat = request(143, 144..=150);
        heartbeat.entries.clear();
        assert_eq!(unmoored_entries(&heartbeat), None, "a heartbeat has no entries to misplace");
        let mut from_the_start = request(0, 250..=260);
        from_the_start.prev_log_id = None;
        assert_eq!(unmoored_entries(&from_the_start), Some((250, 0)));
        from_the_start.entries = (0..=3).map(|index| blank_ent::<TypeConfig>(1, 1, index)).collect();
        assert_eq!(unmoored_entries(&from_the_start), None);
        let mut holed = request(143, 144..=150);
        holed.entries.remove(3);
        assert_eq!(unmoored_entries(&holed), Some((148, 147)), "a hole inside the batch");
    }

    #[tokio::test]
    async fn a_wiped_node_leaves_votes_to_raft_only_once_a_leader_gave_it_a_log() {
        // Nodes 1 and 2 of a five-voter group, neither yet told of the
        // other by a leader: node 2's vote is what node 1 asks for.
        let members: BTreeMap<u64, BasicNode> = (1..=5).map(|id| (id, BasicNode::new(format!("n{id}")))).collect();
        let ask = openraft::raft::VoteRequest::new(Vote::new(3, 1), Some(log_id(2, 1, 40)));
        for (joining, granted) in [(true, false), (false, true)] {
            let dir = tempfile::tempdir().unwrap();
            let config = GroupConfig { node_id: 2, ..GroupConfig::default() };
            let clock = Arc::new(crate::SystemClock);
            let group = Group::open(&config, dir.path(), clock, crate::network::NoPeers, members.clone(), false)
                .await
                .unwrap()
                .joining(joining);
            let answer = group.vote(ask.clone()).await.unwrap();
            assert_eq!(answer.vote_granted, granted, "joining: {joining}, {answer:?}");
            if joining {
                // A leader of term 2 gives it entries 0 to 2.
                let log = AppendEntriesRequest {
                    vote: Vote::new_committed(2, 1),
                    prev_log_id: None,
                    entries: (0..=2).map(|index| blank_ent::<TypeConfig>(2, 1, index)).collect(),
                    leader_commit: None,
                };
                assert!(group.append_entries(log).await.unwrap().is_success());
                let logged = |m: &openraft::RaftMetrics<u64, BasicNode>| m.last_log_index == Some(2);
                group.raft().wait(Some(Duration::from_secs(5))).metrics(logged, "entries 0 to 2").await.unwrap();
                // Raft answers now (no while that leader's lease lasts),
                // with the log the node has.
                let answer = group.vote(ask.clone()).await.unwrap();
                assert_eq!(answer.last_log_id.map(|id| id.index), Some(2), "with a log: {answer:?}");
            }
            group.raft().shutdown().await.unwrap();
        }
    }
}
