//! Followers reaching the leader: the transport's implementation of
//! [`Forwarder`] (client side) and the handler that answers it on the leader
//! (server side), both in terms of [`Group`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::{Command, GroupState, Response};
use futures::future::BoxFuture;
use openraft::LogId;
use tokio::sync::watch;

use super::client::TransportError;
use super::isolation::Isolation;
use super::network::{PeerClients, RaftHandler};
use super::server::PeerHandler;
use super::wire::{LogEnd, PeerBody, PeerRequest, PeerResponse, Refusal};
use crate::fence::Fence;
use crate::group::{unmoored_entries, Forwarder, Group};
use crate::status::NodeStatus;
use crate::ProposeError;

/// How one node's requests reach another node and come back answered: the
/// mutual-TLS clients in production ([`TlsLink`]), the simulated network in
/// the simulator. Whatever carries them stamps each request with the
/// sender's fence and lets the fence hear the answer (see
/// [`crate::fence::Fence::heard`]).
pub trait PeerLink: Send + Sync + 'static {
    /// Sends `request` to node `node` and waits up to `timeout` for its
    /// answer; a refusal comes back as [`TransportError::Refused`].
    fn call(
        &self,
        node: u64,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportError>>;
}

/// The production [`PeerLink`]: the node's shared [`PeerClients`], each node
/// at its address in the topology.
pub struct TlsLink {
    clients: PeerClients,
    /// Peer address of every node, by id.
    peers: BTreeMap<u64, String>,
}

impl PeerLink for TlsLink {
    fn call(
        &self,
        node: u64,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportError>> {
        let Some(addr) = self.peers.get(&node) else {
            let error = TransportError::Unreachable { addr: format!("node {node}"), reason: "no peer address".into() };
            return Box::pin(async move { Err(error) });
        };
        let client = self.clients.get(node, addr);
        Box::pin(async move { client.call(request, timeout).await })
    }
}

/// Sends a follower's batches and read-index requests to the leader, and a
/// node's operator requests (status, copies, transfer steps, isolation) to
/// other nodes, over a [`PeerLink`].
pub struct PeerForwarder {
    link: Arc<dyn PeerLink>,
    /// Bound on one forwarded call, transport and the leader's commit included.
    timeout: Duration,
}

impl PeerForwarder {
    /// A forwarder that reaches node `id` at `peers[id]` over `clients`,
    /// waiting at most `timeout` for each answer.
    pub fn new(clients: PeerClients, peers: BTreeMap<u64, String>, timeout: Duration) -> PeerForwarder {
        PeerForwarder::over(Arc::new(TlsLink { clients, peers }), timeout)
    }

    /// A forwarder over `link`, waiting at most `timeout` for each answer.
    pub fn over(link: Arc<dyn PeerLink>, timeout: Duration) -> PeerForwarder {
        PeerForwarder { link, timeout }
    }

    /// Asks node `node` for its view of itself and its groups.
    pub async fn node_status(&self, node: u64) -> Result<NodeStatus, ProposeError> {
        match self.call(node, 0, PeerBody::Status).await? {
            PeerResponse::Status(status) => Ok(status),
            other => Err(mismatch("status", &other)),
        }
    }

    /// Cuts node `node` off from every other node for `duration` (a drill).
    pub async fn isolate(&self, node: u64, duration: Duration) -> Result<(), ProposeError> {
        let for_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        match self.call(node, 0, PeerBody::Isolate { for_ms }).await? {
            PeerResponse::Isolated => Ok(()),
            other => Err(mismatch("isolate", &other)),
        }
    }

    /// Node `node`'s applied state, whole.
    pub async fn copy_of(&self, node: u64) -> Result<GroupState, ProposeError> {
        match self.call(node, 0, PeerBody::Copy).await? {
            PeerResponse::Copy(encoded) => storage::codec::decode(&encoded?)
                .map_err(|e| ProposeError::Unavailable(format!("node {node}'s copy is unreadable: {e}"))),
            other => Err(mismatch("copy", &other)),
        }
    }

    /// Where node `node`'s log ends, behind every request it admitted before
    /// this one (see [`PeerBody::LogEnd`]), waiting at most `within`: a slow
    /// disk may hold it longer than an ordinary request.
    pub async fn log_end(&self, node: u64, within: Duration) -> Result<LogEnd, ProposeError> {
        let call = self.link.call(node, PeerRequest::new(0, PeerBody::LogEnd), within);
        match call.await.map_err(propose_error)? {
            PeerResponse::LogEnd(end) => end,
            other => Err(mismatch("log_end", &other)),
        }
    }

    /// Asks node `node` to do its part of a leadership transfer of `group`.
    pub async fn transfer_step(&self, node: u64, group: u32, step: PeerBody) -> Result<(), ProposeError> {
        let asked = step.kind();
        match self.call(node, group, step).await? {
            PeerResponse::Done(result) => result,
            other => Err(mismatch(asked, &other)),
        }
    }

    fn call(&self, node: u64, group: u32, body: PeerBody) -> BoxFuture<'static, Result<PeerResponse, ProposeError>> {
        let call = self.link.call(node, PeerRequest::new(group, body), self.timeout);
        Box::pin(async move { call.await.map_err(propose_error) })
    }
}

/// What a caller of [`Group::propose`] should make of a transport failure.
/// Only overload keeps its meaning ("back off"); a timeout stays a timeout
/// (the batch may have applied); anything else is unavailability, which the
/// API answers with a 503 and the client retries with its key.
fn propose_error(error: TransportError) -> ProposeError {
    match error {
        TransportError::Overloaded { .. } | TransportError::Refused { refusal: Refusal::Overloaded, .. } => {
            ProposeError::Overloaded
        }
        TransportError::Timeout { .. } => ProposeError::Timeout,
        other => ProposeError::Unavailable(other.to_string()),
    }
}

fn mismatch(asked: &'static str, answer: &PeerResponse) -> ProposeError {
    ProposeError::Unavailable(format!("leader answered a {asked} request with a {} response", answer.kind()))
}

impl Forwarder for PeerForwarder {
    fn forward(
        &self,
        leader: u64,
        group: u32,
        commands: Vec<Command>,
    ) -> BoxFuture<'static, Result<Response, ProposeError>> {
        let call = self.call(leader, group, PeerBody::Forward(commands));
        Box::pin(async move {
            match call.await? {
                PeerResponse::Forward(result) => result,
                other => Err(mismatch("forward", &other)),
            }
        })
    }

    fn read_index(&self, leader: u64, group: u32) -> BoxFuture<'static, Result<u64, ProposeError>> {
        let call = self.call(leader, group, PeerBody::ReadIndex);
        Box::pin(async move {
            match call.await? {
                PeerResponse::ReadIndex(result) => result,
                other => Err(mismatch("read_index", &other)),
            }
        })
    }

    fn pre_vote(
        &self,
        voter: u64,
        group: u32,
        last_log: Option<LogId<u64>>,
    ) -> BoxFuture<'static, Result<bool, ProposeError>> {
        let call = self.call(voter, group, PeerBody::PreVote { last_log });
        Box::pin(async move {
            match call.await? {
                PeerResponse::PreVote(granted) => Ok(granted),
                other => Err(mismatch("pre_vote", &other)),
            }
        })
    }
}

/// The server half for a node's [`Group`]s: Raft RPCs go to the group's
/// Raft, forwarded batches to [`Group::propose_here`] (stamped by this node,
/// never forwarded again), read indexes to [`Group::read_index_here`].
///
/// It also answers what peers ask of the node as a whole (its status; a
/// drill's isolation), and while the node is isolated it refuses everything
/// but status requests, so no peer's message reaches its Raft groups. A
/// request from a fenced copy gets nothing but a status, or where the log
/// ends, either (see [`crate::fence`]).
#[derive(Clone)]
pub struct GroupHandler {
    node_id: u64,
    groups: Arc<BTreeMap<u32, Group>>,
    raft: RaftHandler,
    isolation: Isolation,
    fence: Fence,
    /// How many Raft requests (appends, snapshots, votes) the fence has
    /// admitted that Raft has not answered yet.
    raft_calls: Arc<watch::Sender<usize>>,
}

/// One admitted Raft request, counted in [`GroupHandler`]'s `raft_calls`
/// until it is answered or dropped.
struct RaftCall(Arc<watch::Sender<usize>>);

impl RaftCall {
    fn begin(calls: &Arc<watch::Sender<usize>>) -> RaftCall {
        calls.send_modify(|n| *n += 1);
        RaftCall(calls.clone())
    }
}

impl Drop for RaftCall {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl GroupHandler {
    /// A handler for node `node_id`'s groups, by group id, that refuses
    /// everything while `isolation` is set.
    pub fn new(node_id: u64, groups: BTreeMap<u32, Group>, isolation: Isolation) -> GroupHandler {
        let raft = RaftHandler::new(groups.iter().map(|(&id, group)| (id, group.raft().clone())).collect());
        let raft_calls = Arc::new(watch::Sender::new(0));
        GroupHandler { node_id, groups: Arc::new(groups), raft, isolation, fence: Fence::default(), raft_calls }
    }

    /// The same handler, checking every request's stamp against `fence`.
    pub fn with_fence(mut self, fence: Fence) -> GroupHandler {
        self.fence = fence;
        self
    }

    /// This node's view of itself and its groups.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node_id: self.node_id,
            isolated_for_ms: self.isolation.remaining().map(|left| left.as_millis() as u64),
            groups: self.groups.values().map(Group::status).collect(),
        }
    }

    /// Where `group`'s log ends on this node, once every Raft request the
    /// fence admitted so far has been answered (a snapshot takes several
    /// steps to reach Raft): asked after this node learned a generation,
    /// no older one is admitted any more, and the answer is past all of
    /// them (see [`PeerBody::LogEnd`]).
    pub async fn log_end(&self, group: &Group) -> Result<LogEnd, ProposeError> {
        let _ = self.raft_calls.subscribe().wait_for(|calls| *calls == 0).await;
        group.log_end().await
    }

    /// Handles one request addressed to this node or one of its groups.
    pub async fn dispatch(&self, request: PeerRequest) -> Result<PeerResponse, Refusal> {
        // A Raft request is counted before the fence admits it, so that a
        // question of where the log ends that learns a newer generation in
        // between (on another thread) still waits for it; dropped if it is
        // refused.
        let _counted =
            matches!(request.body, PeerBody::AppendEntries(_) | PeerBody::InstallSnapshot(_) | PeerBody::Vote(_))
                .then(|| RaftCall::begin(&self.raft_calls));
        // Status still answers, so operators (and a second drill) can see
        // that the node is cut off and for how long; nothing else does.
        let isolated = self.isolation.is_isolated();
        let admitted = if isolated { Ok(()) } else { self.fence.admit(request.stamp) };
        if let PeerBody::Status = request.body {
            return Ok(PeerResponse::Status(self.status()));
        }
        if isolated {
            return Err(Refusal::Isolated);
        }
        if request.body.is_fenced() {
            admitted.map_err(Refusal::Fenced)?;
        }
        if let PeerBody::Isolate { for_ms } = request.body {
            tracing::warn!(for_ms, "a drill isolates this node from its peers");
            self.isolation.isolate_for(Duration::from_millis(for_ms));
            return Ok(PeerResponse::Isolated);
        }
        let group = self.groups.get(&request.group).ok_or(Refusal::UnknownGroup(request.group))?;
        match request.body {
            PeerBody::Forward(commands) => Ok(PeerResponse::Forward(group.propose_here(commands).await)),
            PeerBody::ReadIndex => Ok(PeerResponse::ReadIndex(group.read_index_here().await)),
            PeerBody::Abdicate { for_ms } => {
                group.abdicate(Duration::from_millis(for_ms));
                Ok(PeerResponse::Done(Ok(())))
            }
            PeerBody::HoldElections { for_ms } => {
                group.hold_elections(Duration::from_millis(for_ms));
                Ok(PeerResponse::Done(Ok(())))
            }
            PeerBody::Campaign => Ok(PeerResponse::Done(group.campaign().await)),
            PeerBody::Copy => {
                let copy = group.copy_with_log().and_then(|copy| {
                    storage::codec::encode(&copy)
                        .map_err(|e| ProposeError::Unavailable(format!("encoding the copy: {e}")))
                });
                Ok(PeerResponse::Copy(copy))
            }
            PeerBody::AppendEntries(rpc) => match unmoored_entries(&rpc) {
                Some((found, expected)) => {
                    tracing::warn!(found, expected, "refused an append-entries call whose entries have a gap");
                    Err(Refusal::UnmooredEntries { found, expected })
                }
                None => Ok(PeerResponse::AppendEntries(group.append_entries(rpc).await)),
            },
            PeerBody::Vote(rpc) => Ok(PeerResponse::Vote(group.vote(rpc).await)),
            PeerBody::PreVote { last_log } => Ok(PeerResponse::PreVote(group.pre_vote(last_log))),
            // The stamp was learned above.
            PeerBody::LogEnd => Ok(PeerResponse::LogEnd(self.log_end(group).await)),
            _ => self.raft.dispatch(request).await,
        }
    }
}

impl PeerHandler for GroupHandler {
    fn handle(&self, request: PeerRequest) -> BoxFuture<'static, Result<PeerResponse, Refusal>> {
        let this = self.clone();
        Box::pin(async move { this.dispatch(request).await })
    }
}
