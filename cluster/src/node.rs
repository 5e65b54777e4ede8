//! A Surge node as the API sees it: one group, its actors, and the ticker
//! that lets payment deadlines pass when no traffic does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use domain::{Command, GroupState, Outcome, SessionId};

use crate::actors::{ActorLimits, Router};
use crate::clock::Clock;
use crate::group::{Group, GroupConfig};
use crate::network::NoPeers;
use crate::topology::Topology;
use crate::ProposeError;

/// Everything a node needs to start its groups and actors.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Raft tuning.
    pub group: GroupConfig,
    /// Where every node runs. A single-node topology runs without a peer
    /// transport.
    pub topology: Topology,
    /// Actor bounds and timings.
    pub actors: ActorLimits,
    /// How often the leader checks for payment deadlines that passed. Expiry
    /// itself happens in `apply`, on the first entry stamped after a
    /// deadline; the ticker only makes sure such an entry comes.
    pub expiry_tick_ms: u64,
}

impl Default for NodeConfig {
    /// Node 1 alone, with default tuning.
    fn default() -> Self {
        NodeConfig {
            group: GroupConfig::default(),
            topology: Topology::single(1, "127.0.0.1:0", "127.0.0.1:0"),
            actors: ActorLimits::default(),
            expiry_tick_ms: 200,
        }
    }
}

/// A running node. Cheap to clone; every HTTP worker holds one.
#[derive(Clone)]
pub struct Node {
    group: Group,
    router: Router,
}

impl Node {
    /// Opens the node's storage in `data_dir`, starts its group, waits for a
    /// leader and for the log to be replayed, and starts the expiry ticker. Must run inside an actix system.
    pub async fn start(config: &NodeConfig, data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Node, ProposeError> {
        if config.topology.nodes.len() > 1 {
            return Err(ProposeError::Unavailable(
                "multi-node topologies need the peer transport, which this build does not have yet".into(),
            ));
        }
        let members = config.topology.members();
        let bootstrap = config.topology.bootstrapper() == Some(config.group.node_id);
        let group = Group::open(&config.group, data_dir, clock.clone(), NoPeers, members, bootstrap).await?;
        group.wait_until_caught_up(Duration::from_secs(30)).await?;
        let router = Router::new(group.clone(), config.actors.clone());
        let tick = Duration::from_millis(config.expiry_tick_ms.max(10));
        actix::spawn(expire_holds(group.clone(), clock, tick));
        Ok(Node { group, router })
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

/// While this node leads, proposes an empty entry whenever a payment
/// deadline has passed, so expired holds return to stock without waiting for
/// the next shopper.
async fn expire_holds(group: Group, clock: Arc<dyn Clock>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let due = group.read_local(GroupState::next_deadline_ms).is_some_and(|deadline| deadline <= clock.now_ms());
        if due && group.is_leader() {
            if let Err(error) = group.propose(Vec::new()).await {
                tracing::warn!(%error, "proposing an expiry tick failed; retrying next tick");
            }
        }
    }
}
