//! openraft's network on top of the peer transport: both halves.
//!
//! The client half ([`PeerNetwork`], one per group) turns openraft's RPCs into
//! [`PeerRequest`]s on the node's shared [`PeerClients`], one connection per
//! peer whatever the number of groups. The server half ([`RaftHandler`])
//! dispatches incoming Raft RPCs to the right group's `openraft::Raft`.
//!
//! Transport failures become the `RPCError` variant that makes openraft do
//! the right thing: `Unreachable` (back off before retrying) when there is no
//! connection or the peer refused the request, `Network` (retry at once) when
//! a working connection dropped, `Timeout` when the answer did not come in
//! time, `PayloadTooLarge` when an append-entries batch does not fit in a
//! frame (openraft then sends fewer entries), and `RemoteError` when the
//! peer's Raft itself answered with an error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use storage::TypeConfig;

use super::client::{ClientLimits, PeerClient, TransportError};
use super::isolation::Isolation;
use super::server::PeerHandler;
use super::tls::server_name;
use super::wire::{PeerBody, PeerRequest, PeerResponse, Refusal};
use crate::fence::Fence;

/// The node's clients, one per peer (node id and address), shared by every
/// group, so that all of a node's groups multiplex over one connection per
/// peer. Cheap to clone.
#[derive(Clone)]
pub struct PeerClients {
    tls: Arc<rustls::ClientConfig>,
    limits: ClientLimits,
    /// Shared by every client: cuts this node off from all peers at once.
    isolation: Isolation,
    /// Shared by every client: stamps their requests (see [`crate::fence`]).
    fence: Fence,
    /// Keyed by node id and address: the id names the certificate the server
    /// must present, so a node that moved address, or an address reused by
    /// another node, gets a client of its own.
    clients: Arc<Mutex<BTreeMap<(u64, String), PeerClient>>>,
}

impl PeerClients {
    /// An empty pool; clients are made on first use.
    pub fn new(tls: Arc<rustls::ClientConfig>, limits: ClientLimits) -> PeerClients {
        PeerClients {
            tls,
            limits,
            isolation: Isolation::default(),
            fence: Fence::default(),
            clients: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// The same pool, its clients stamping requests with `fence`. Set before
    /// the first client is made.
    pub fn with_fence(mut self, fence: Fence) -> PeerClients {
        self.fence = fence;
        self
    }

    /// The switch that cuts every client of this pool off from its peer.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// The client for node `node_id` at `addr`, made if needed.
    pub fn get(&self, node_id: u64, addr: &str) -> PeerClient {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .entry((node_id, addr.to_owned()))
            .or_insert_with(|| {
                PeerClient::new(addr, server_name(node_id), self.tls.clone(), self.limits.clone())
                    .with_isolation(self.isolation.clone())
                    .with_fence(self.fence.clone(), self.fence.is_elsewhere(node_id))
            })
            .clone()
    }

    /// The peers this node has a client for (node id, address): one
    /// connection each, whatever the number of groups. For status pages.
    pub fn peers(&self) -> Vec<(u64, String)> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }

    /// Forgets the clients of `node_id` (e.g. after it left the cluster);
    /// their connections close once nobody uses them.
    pub fn remove(&self, node_id: u64) {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner).retain(|(id, _), _| *id != node_id);
    }
}

/// One group's openraft network factory: hands out a [`PeerConnection`] per
/// target, all sharing the node's [`PeerClients`].
#[derive(Clone)]
pub struct PeerNetwork {
    group: u32,
    node_id: u64,
    clients: PeerClients,
}

impl PeerNetwork {
    /// The network of group `group` on node `node_id` (this node: openraft's
    /// timeout errors name both ends).
    pub fn new(group: u32, node_id: u64, clients: PeerClients) -> PeerNetwork {
        PeerNetwork { group, node_id, clients }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            group: self.group,
            node_id: self.node_id,
            target,
            node: node.clone(),
            client: self.clients.get(target, &node.addr),
        }
    }
}

/// openraft's client for one target of one group.
pub struct PeerConnection {
    group: u32,
    node_id: u64,
    target: u64,
    node: BasicNode,
    client: PeerClient,
}

impl PeerConnection {
    async fn call(
        &self,
        action: RPCTypes,
        body: PeerBody,
        option: &RPCOption,
    ) -> Result<PeerResponse, (RPCTypes, Duration, TransportError)> {
        let timeout = option.hard_ttl();
        let request = PeerRequest::new(self.group, body);
        self.client.call(request, timeout).await.map_err(|error| (action, timeout, error))
    }

    /// Maps a transport failure to the `RPCError` that gives openraft the
    /// right retry behaviour (see the module docs).
    fn rpc_error<E: std::error::Error>(
        &self,
        (action, timeout, error): (RPCTypes, Duration, TransportError),
    ) -> RPCError<u64, BasicNode, E> {
        match error {
            TransportError::Timeout { .. } => {
                RPCError::Timeout(Timeout { action, id: self.node_id, target: self.target, timeout })
            }
            TransportError::Unreachable { .. } | TransportError::Overloaded { .. } | TransportError::Refused { .. } => {
                RPCError::Unreachable(Unreachable::new(&error))
            }
            TransportError::ConnectionLost { .. }
            | TransportError::TooLarge { .. }
            | TransportError::Encode(_)
            | TransportError::Mismatch { .. } => RPCError::Network(NetworkError::new(&error)),
        }
    }

    fn mismatch<E: std::error::Error>(
        &self,
        asked: &'static str,
        answer: &PeerResponse,
    ) -> RPCError<u64, BasicNode, E> {
        let error = TransportError::Mismatch { addr: self.node.addr.clone(), asked, answered: answer.kind() };
        RPCError::Network(NetworkError::new(&error))
    }

    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<u64, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), error))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    /// How long openraft pauses replication to a peer after `Unreachable`.
    /// Its default, 500 ms, outlasts the election timeout, so a follower that
    /// restarts would time out before the leader tried again and depose it;
    /// retrying every 50 ms keeps heartbeats flowing once the peer is back.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(std::time::Duration::from_millis(50)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let entries = rpc.entries.len() as u64;
        match self.call(RPCTypes::AppendEntries, PeerBody::AppendEntries(rpc), &option).await {
            Ok(PeerResponse::AppendEntries(Ok(response))) => Ok(response),
            Ok(PeerResponse::AppendEntries(Err(error))) => Err(self.remote(error)),
            Ok(other) => Err(self.mismatch("append_entries", &other)),
            // Halving the batch only helps if there is more than one entry.
            Err((_, _, TransportError::TooLarge { .. })) if entries > 1 => {
                Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)))
            }
            Err(failure) => Err(self.rpc_error(failure)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        match self.call(RPCTypes::InstallSnapshot, PeerBody::InstallSnapshot(rpc), &option).await {
            Ok(PeerResponse::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(PeerResponse::InstallSnapshot(Err(error))) => Err(self.remote(error)),
            Ok(other) => Err(self.mismatch("install_snapshot", &other)),
            Err(failure) => Err(self.rpc_error(failure)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(RPCTypes::Vote, PeerBody::Vote(rpc), &option).await {
            Ok(PeerResponse::Vote(Ok(response))) => Ok(response),
            Ok(PeerResponse::Vote(Err(error))) => Err(self.remote(error)),
            Ok(other) => Err(self.mismatch("vote", &other)),
            Err(failure) => Err(self.rpc_error(failure)),
        }
    }
}

/// The server half for bare `Raft` instances: dispatches Raft RPCs to the
/// group's `Raft`, answers [`Refusal::UnknownGroup`] for groups this node
/// does not run, and refuses what only a [`crate::Group`] can answer
/// (forwarded writes, read indexes; see `super::forwarder::GroupHandler`).
#[derive(Clone)]
pub struct RaftHandler {
    groups: Arc<BTreeMap<u32, Raft<TypeConfig>>>,
}

impl RaftHandler {
    /// A handler for these groups, by group id.
    pub fn new(groups: BTreeMap<u32, Raft<TypeConfig>>) -> RaftHandler {
        RaftHandler { groups: Arc::new(groups) }
    }

    /// Handles one request addressed to one of this node's groups.
    pub async fn dispatch(&self, request: PeerRequest) -> Result<PeerResponse, Refusal> {
        let raft = self.groups.get(&request.group).ok_or(Refusal::UnknownGroup(request.group))?;
        Ok(match request.body {
            PeerBody::AppendEntries(rpc) => PeerResponse::AppendEntries(raft.append_entries(rpc).await),
            PeerBody::Vote(rpc) => PeerResponse::Vote(raft.vote(rpc).await),
            PeerBody::InstallSnapshot(rpc) => PeerResponse::InstallSnapshot(raft.install_snapshot(rpc).await),
            other @ (PeerBody::Forward(_)
            | PeerBody::ReadIndex
            | PeerBody::Isolate { .. }
            | PeerBody::Status
            | PeerBody::Abdicate { .. }
            | PeerBody::HoldElections { .. }
            | PeerBody::Campaign
            | PeerBody::Copy
            | PeerBody::LogEnd
            | PeerBody::PreVote { .. }) => return Err(Refusal::Unsupported(other.kind().into())),
        })
    }
}

impl PeerHandler for RaftHandler {
    fn handle(&self, request: PeerRequest) -> BoxFuture<'static, Result<PeerResponse, Refusal>> {
        let this = self.clone();
        Box::pin(async move { this.dispatch(request).await })
    }
}
