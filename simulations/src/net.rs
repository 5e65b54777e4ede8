//! The simulated network. Every message between nodes goes through
//! [`Net::deliver`], where the run's seed decides its delay (so also the
//! order messages arrive in), whether it is lost, and whether a partition
//! stops it: symmetric or one-way cuts, a whole zone, the tiebreaker.
//!
//! It carries what the production transport carries, as the production
//! transport's own [`PeerRequest`]s, stamped with the sender's generation
//! fence and answered by the target node's real [`GroupHandler`], fence
//! checks included: openraft's three RPCs ([`SimConn`]), and through
//! [`SimLink`] a follower's forwarded writes and read-index requests and a
//! node's operator requests (status, copies, transfer steps).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cluster::fence::Fence;
use cluster::transport::{GroupHandler, PeerBody, PeerLink, PeerRequest, PeerResponse, TransportError};
use futures::future::BoxFuture;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use rand::rngs::StdRng;
use rand::Rng;
use storage::TypeConfig;

use crate::trace::Trace;

/// How messages fare, drawn per message.
#[derive(Clone, Copy, Debug)]
pub struct Weather {
    /// Shortest and longest one-way delay.
    pub delay_ms: (u64, u64),
    /// Chance in a thousand that a message is lost.
    pub drop_per_mille: u32,
    /// Chance in a thousand that a Raft message is delivered twice.
    pub duplicate_per_mille: u32,
}

impl Weather {
    /// A healthy same-city network.
    pub const CALM: Weather = Weather { delay_ms: (1, 4), drop_per_mille: 0, duplicate_per_mille: 0 };
}

/// Why a message got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// It never reached the target (lost, cut off, or the target is down),
    /// or its sender is down.
    Request,
    /// The target handled it, but the answer was lost.
    Reply,
}

/// The network every simulated node shares.
pub struct Net {
    state: Mutex<State>,
    trace: Trace,
}

struct State {
    /// Each node's peer handler while it runs; absent while it is down.
    handlers: BTreeMap<u64, GroupHandler>,
    /// Each node's current life, bumped when it goes down: what a dead
    /// life's tasks still send as they wind down is lost, and so are the
    /// answers to what it sent before.
    lives: BTreeMap<u64, u64>,
    /// `(from, to)` pairs that cannot reach each other in that direction,
    /// with how many faults cut each (faults overlap and heal separately).
    cut: BTreeMap<(u64, u64), u32>,
    weather: Weather,
    rng: StdRng,
}

impl Net {
    /// A network with no nodes yet, drawing from `rng`.
    pub fn new(rng: StdRng, trace: Trace) -> Arc<Net> {
        let state = State {
            handlers: BTreeMap::new(),
            lives: BTreeMap::new(),
            cut: BTreeMap::new(),
            weather: Weather::CALM,
            rng,
        };
        Arc::new(Net { state: Mutex::new(state), trace })
    }

    /// Node `id` is up, answering with `handler`.
    pub fn attach(&self, id: u64, handler: GroupHandler) {
        self.lock().handlers.insert(id, handler);
    }

    /// Node `id` is down: messages to it are lost, and so is whatever its
    /// life that ended still sends.
    pub fn detach(&self, id: u64) {
        let mut state = self.lock();
        state.handlers.remove(&id);
        *state.lives.entry(id).or_default() += 1;
    }

    /// Node `id`'s current life: the one a node starting now lives.
    pub fn life(&self, id: u64) -> u64 {
        self.lock().lives.get(&id).copied().unwrap_or_default()
    }

    /// Whether `life` is still node `id`'s current one.
    fn lives(&self, id: u64, life: u64) -> bool {
        self.life(id) == life
    }

    /// Cuts `from` → `to` (one way).
    pub fn cut(&self, from: u64, to: u64) {
        *self.lock().cut.entry((from, to)).or_default() += 1;
    }

    /// Undoes one [`Net::cut`] of `from` → `to`.
    pub fn uncut(&self, from: u64, to: u64) {
        let mut state = self.lock();
        if let Some(count) = state.cut.get_mut(&(from, to)) {
            *count -= 1;
            if *count == 0 {
                state.cut.remove(&(from, to));
            }
        }
    }

    /// Sets how messages fare from now on.
    pub fn set_weather(&self, weather: Weather) {
        self.lock().weather = weather;
    }

    /// Whether `from` can reach `to` now.
    pub fn reaches(&self, from: u64, to: u64) -> bool {
        !self.lock().cut.contains_key(&(from, to))
    }

    /// Sends `request` over `link` to node `to` as the production transport
    /// would: stamped by the sender's fence, which hears how it ended, and
    /// bounded by `timeout`. A request that never arrived is unreachable; a
    /// lost answer or none in time is a timeout.
    pub async fn call(
        &self,
        link: &SimLink,
        to: u64,
        mut request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, TransportError> {
        let (kind, checked) = (request.body.kind(), request.body.is_fenced());
        let fence = &link.fence;
        request.stamp = fence.stamp();
        let addr = format!("sim-{to}");
        let delivery = async {
            let handle = |handler: GroupHandler| async move { handler.dispatch(request).await };
            match self.deliver((link.id, link.life), to, kind, handle).await {
                // The sender waits for an answer that never comes.
                Err(Lost::Reply) => std::future::pending().await,
                delivered => delivered,
            }
        };
        let result = match tokio::time::timeout(timeout, delivery).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(refusal))) => Err(TransportError::Refused { addr, refusal }),
            Ok(Err(_)) => Err(TransportError::Unreachable { addr, reason: "lost or cut off".into() }),
            Err(_) => Err(TransportError::Timeout { addr, timeout }),
        };
        fence.heard(fence.is_elsewhere(to), checked, &result);
        result
    }

    /// Sends one message from `from` (a node and its life) to `to`, has
    /// `handle` run it on the target's handler, and brings the answer back,
    /// each way after a drawn delay and subject to loss and partitions.
    async fn deliver<T, F, Fut>(&self, (from, life): (u64, u64), to: u64, kind: &str, handle: F) -> Result<T, Lost>
    where
        F: FnOnce(GroupHandler) -> Fut,
        Fut: Future<Output = T>,
    {
        if !self.lives(from, life) {
            self.trace.event(format!("net {kind} {from}->{to} from a node that is down"));
            return Err(Lost::Request);
        }
        let Some(there) = self.leg(from, to) else {
            self.trace.event(format!("net {kind} {from}->{to} lost"));
            // A lost message is noticed after a while, not at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Err(Lost::Request);
        };
        tokio::time::sleep(there).await;
        let target = {
            let state = self.lock();
            let life = state.lives.get(&to).copied().unwrap_or_default();
            state.handlers.get(&to).filter(|_| !state.cut.contains_key(&(from, to))).map(|h| (h.clone(), life))
        };
        let Some((handler, target_life)) = target else {
            self.trace.event(format!("net {kind} {from}->{to} undeliverable"));
            return Err(Lost::Request);
        };
        let answer = handle(handler).await;
        if !self.lives(to, target_life) {
            // The target went down while it handled the message: whatever
            // its dead life concluded (an append on a disk that kept
            // nothing) is not sent.
            self.trace.event(format!("net {kind} {from}->{to} answered by a node that went down"));
            return Err(Lost::Reply);
        }
        let Some(back) = self.leg(to, from) else {
            self.trace.event(format!("net {kind} {from}->{to} reply lost"));
            return Err(Lost::Reply);
        };
        tokio::time::sleep(back).await;
        if !self.reaches(to, from) {
            self.trace.event(format!("net {kind} {from}->{to} reply cut"));
            return Err(Lost::Reply);
        }
        if !self.lives(from, life) {
            self.trace.event(format!("net {kind} {from}->{to} reply to a node that went down"));
            return Err(Lost::Reply);
        }
        self.trace.event(format!("net {kind} {from}->{to} {}+{}ms", there.as_millis(), back.as_millis()));
        Ok(answer)
    }

    /// Whether to send a Raft message a second time.
    fn duplicate(&self) -> bool {
        let mut state = self.lock();
        let per_mille = state.weather.duplicate_per_mille;
        per_mille > 0 && state.rng.gen_range(0..1000) < per_mille
    }

    /// One direction of a message: its delay, or `None` if it is lost.
    fn leg(&self, from: u64, to: u64) -> Option<Duration> {
        let mut state = self.lock();
        if state.cut.contains_key(&(from, to)) {
            return None;
        }
        let weather = state.weather;
        if weather.drop_per_mille > 0 && state.rng.gen_range(0..1000) < weather.drop_per_mille {
            return None;
        }
        Some(Duration::from_millis(state.rng.gen_range(weather.delay_ms.0..=weather.delay_ms.1)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A node's way to its peers on the simulated network, stamped by its
/// fence: for its openraft network ([`SimNetwork`]) and its forwarder.
#[derive(Clone)]
pub struct SimLink {
    pub id: u64,
    /// The node's life this link sends for (see [`Net::life`]).
    pub life: u64,
    pub net: Arc<Net>,
    pub fence: Fence,
}

impl PeerLink for SimLink {
    fn call(
        &self,
        node: u64,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportError>> {
        let link = self.clone();
        Box::pin(async move { link.net.call(&link, node, request, timeout).await })
    }
}

/// A node's openraft network factory on the simulated network.
#[derive(Clone)]
pub struct SimNetwork {
    pub link: SimLink,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimConn;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimConn {
        SimConn { to: target, link: self.link.clone() }
    }
}

/// openraft's client for one target.
pub struct SimConn {
    to: u64,
    link: SimLink,
}

impl SimConn {
    /// Sends one Raft RPC. Failures map as in the production transport's
    /// `PeerConnection`: no delivery (lost, cut off, refused) is
    /// `Unreachable`, no answer in time a `Timeout`.
    async fn call<E: std::error::Error>(
        &self,
        action: RPCTypes,
        body: PeerBody,
        option: &RPCOption,
    ) -> Result<PeerResponse, RPCError<u64, BasicNode, E>> {
        let timeout = option.hard_ttl();
        let request = PeerRequest::new(0, body);
        match self.link.net.call(&self.link, self.to, request, timeout).await {
            Ok(response) => Ok(response),
            Err(TransportError::Timeout { .. }) => {
                Err(RPCError::Timeout(Timeout { action, id: self.link.id, target: self.to, timeout }))
            }
            Err(error) => Err(RPCError::Unreachable(Unreachable::new(&error))),
        }
    }

    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<u64, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new(self.to, error))
    }

    fn mismatch<E: std::error::Error>(&self, answer: &PeerResponse) -> RPCError<u64, BasicNode, E> {
        let why = std::io::Error::other(format!("node {} answered with a {} response", self.to, answer.kind()));
        RPCError::Network(NetworkError::new(&why))
    }
}

impl RaftNetwork<TypeConfig> for SimConn {
    /// The production transport's backoff (see cluster's `PeerConnection`).
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(50)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if self.link.net.lives(self.link.id, self.link.life) && self.link.net.duplicate() {
            let (link, to, copy) =
                (self.link.clone(), self.to, PeerRequest::new(0, PeerBody::AppendEntries(rpc.clone())));
            let timeout = option.hard_ttl();
            tokio::spawn(async move {
                let _ = link.net.call(&link, to, copy, timeout).await;
            });
        }
        match self.call(RPCTypes::AppendEntries, PeerBody::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(Ok(response)) => Ok(response),
            PeerResponse::AppendEntries(Err(error)) => Err(self.remote(error)),
            other => Err(self.mismatch(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        match self.call(RPCTypes::InstallSnapshot, PeerBody::InstallSnapshot(rpc), &option).await? {
            PeerResponse::InstallSnapshot(Ok(response)) => Ok(response),
            PeerResponse::InstallSnapshot(Err(error)) => Err(self.remote(error)),
            other => Err(self.mismatch(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(RPCTypes::Vote, PeerBody::Vote(rpc), &option).await? {
            PeerResponse::Vote(Ok(response)) => Ok(response),
            PeerResponse::Vote(Err(error)) => Err(self.remote(error)),
            other => Err(self.mismatch(&other)),
        }
    }
}
