//! One Raft group on this node: its openraft instance, a read handle on its
//! applied state, and the leader's stamping clock.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::{GroupState, Request, Response};
use openraft::error::{ClientWriteError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, Raft, SnapshotPolicy};
use storage::{StateReader, TypeConfig};

use crate::clock::Clock;
use crate::ProposeError;

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
        }
    }
}

/// A handle on one Raft group. Cheap to clone.
#[derive(Clone)]
pub struct Group {
    raft: Raft<TypeConfig>,
    state: StateReader,
    clock: Arc<dyn Clock>,
}

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
        let raft_config = openraft::Config {
            cluster_name: "surge".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: config.log_kept_behind_snapshot,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| ProposeError::Unavailable(e.to_string()))?);
        let (log, state_machine) = storage::open::<TypeConfig>(&data_dir.join("group-0.redb"))
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let state = state_machine.reader();
        let raft = Raft::new(config.node_id, raft_config, network, log, state_machine)
            .await
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let initialized = raft.is_initialized().await.map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        if !initialized && bootstrap {
            raft.initialize(members).await.map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        }
        Ok(Group { raft, state, clock })
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

    /// Proposes one batch, stamped with the leader's clock now, and returns
    /// the state machine's answer once the entry is committed (durable on a
    /// quorum) and applied.
    pub async fn propose(&self, commands: Vec<domain::Command>) -> Result<Response, ProposeError> {
        let request = Request { stamped_at_ms: self.clock.now_ms(), commands };
        let started = Instant::now();
        let written = self.raft.client_write(request).await;
        metrics::histogram!("surge_raft_commit_seconds").record(started.elapsed().as_secs_f64());
        match written {
            Ok(reply) => Ok(reply.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(ProposeError::NotLeader { leader: forward.leader_id })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Reads the applied state after confirming, with a quorum, that this
    /// node is still the leader and has applied everything committed before
    /// the read began: the read is linearizable.
    pub async fn read_linearizable<T>(&self, read: impl FnOnce(&GroupState) -> T) -> Result<T, ProposeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.state.read(read)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(forward))) => {
                Err(ProposeError::NotLeader { leader: forward.leader_id })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Reads this replica's applied state without asking anyone: fast, and
    /// current for everything this node has applied (its own writes
    /// included), but it may lag a newer leader.
    pub fn read_local<T>(&self, read: impl FnOnce(&GroupState) -> T) -> T {
        self.state.read(read)
    }

    /// Whether this node believes it leads the group. A hint, not a lease:
    /// what depends on leadership goes through a proposal or a linearizable read.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state.is_leader()
    }

    /// The group's Raft instance, for status and shutdown.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }
}
