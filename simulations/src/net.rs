//! The simulated network. Every message between nodes goes through
//! [`Net::deliver`], where the run's seed decides its delay (so also the
//! order messages arrive in), whether it is lost, and whether a partition
//! stops it: symmetric or one-way cuts, a whole zone, the tiebreaker.
//!
//! It carries what the production transport carries: openraft's three RPCs
//! ([`SimConn`]) and a follower's forwarded writes and read-index requests
//! ([`SimForwarder`]), handed to the target node's real `Group`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cluster::group::Forwarder;
use cluster::{Group, ProposeError};
use domain::{Command, Response};
use futures::future::BoxFuture;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
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
    /// It never reached the target (lost, cut off, or the target is down).
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
    /// Each node's group while it runs; absent while it is down.
    groups: BTreeMap<u64, Group>,
    /// `(from, to)` pairs that cannot reach each other in that direction,
    /// with how many faults cut each (faults overlap and heal separately).
    cut: BTreeMap<(u64, u64), u32>,
    weather: Weather,
    rng: StdRng,
}

impl Net {
    /// A network with no nodes yet, drawing from `rng`.
    pub fn new(rng: StdRng, trace: Trace) -> Arc<Net> {
        let state = State { groups: BTreeMap::new(), cut: BTreeMap::new(), weather: Weather::CALM, rng };
        Arc::new(Net { state: Mutex::new(state), trace })
    }

    /// Node `id` is up, answering with `group`.
    pub fn attach(&self, id: u64, group: Group) {
        self.lock().groups.insert(id, group);
    }

    /// Node `id` is down: messages to it are lost.
    pub fn detach(&self, id: u64) {
        self.lock().groups.remove(&id);
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

    /// Sends one message from `from` to `to`, has `handle` run it on the
    /// target's group, and brings the answer back, each way after a drawn
    /// delay and subject to loss and partitions.
    pub async fn deliver<T, F, Fut>(&self, from: u64, to: u64, kind: &str, handle: F) -> Result<T, Lost>
    where
        F: FnOnce(Group) -> Fut,
        Fut: Future<Output = T>,
    {
        let Some(there) = self.leg(from, to) else {
            self.trace.event(format!("net {kind} {from}->{to} lost"));
            // A lost message is noticed after a while, not at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Err(Lost::Request);
        };
        tokio::time::sleep(there).await;
        let target = {
            let state = self.lock();
            state.groups.get(&to).filter(|_| !state.cut.contains_key(&(from, to))).cloned()
        };
        let Some(group) = target else {
            self.trace.event(format!("net {kind} {from}->{to} undeliverable"));
            return Err(Lost::Request);
        };
        let answer = handle(group).await;
        let Some(back) = self.leg(to, from) else {
            self.trace.event(format!("net {kind} {from}->{to} reply lost"));
            return Err(Lost::Reply);
        };
        tokio::time::sleep(back).await;
        if !self.reaches(to, from) {
            self.trace.event(format!("net {kind} {from}->{to} reply cut"));
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

/// A node's openraft network factory on the simulated network.
#[derive(Clone)]
pub struct SimNetwork {
    pub id: u64,
    pub net: Arc<Net>,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimConn;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimConn {
        SimConn { from: self.id, to: target, net: self.net.clone() }
    }
}

/// openraft's client for one target.
pub struct SimConn {
    from: u64,
    to: u64,
    net: Arc<Net>,
}

fn unreachable<E: std::error::Error>(lost: Lost) -> RPCError<u64, BasicNode, E> {
    let why = std::io::Error::other(format!("{lost:?} lost in the simulated network"));
    RPCError::Unreachable(Unreachable::new(&why))
}

impl SimConn {
    fn remote<E: std::error::Error>(&self, error: E) -> RPCError<u64, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new(self.to, error))
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
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if self.net.duplicate() {
            let (net, from, to, copy) = (self.net.clone(), self.from, self.to, rpc.clone());
            tokio::spawn(async move {
                let _ = net.deliver(from, to, "append(dup)", |g| async move { g.append_entries(copy).await }).await;
            });
        }
        match self.net.deliver(self.from, self.to, "append", |g| async move { g.append_entries(rpc).await }).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(self.remote(error)),
            Err(lost) => Err(unreachable(lost)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        let answer =
            self.net.deliver(self.from, self.to, "snapshot", |g| async move { g.raft().install_snapshot(rpc).await });
        match answer.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(self.remote(error)),
            Err(lost) => Err(unreachable(lost)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.net.deliver(self.from, self.to, "vote", |g| async move { g.raft().vote(rpc).await }).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(self.remote(error)),
            Err(lost) => Err(unreachable(lost)),
        }
    }
}

/// A follower's way to the leader on the simulated network.
pub struct SimForwarder {
    pub id: u64,
    pub net: Arc<Net>,
}

/// Bound on a forwarded call, transport and the leader's commit included:
/// the production forwarder's (the actors' request timeout).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// What a lost forward means to the caller, as with the real transport: a
/// request that never arrived is unavailability; a lost answer may hide an
/// applied command, so it is a timeout.
fn forward_error(lost: Lost) -> ProposeError {
    match lost {
        Lost::Request => ProposeError::Unavailable("the leader could not be reached".into()),
        Lost::Reply => ProposeError::Timeout,
    }
}

impl Forwarder for SimForwarder {
    fn forward(
        &self,
        leader: u64,
        _group: u32,
        commands: Vec<Command>,
    ) -> BoxFuture<'static, Result<Response, ProposeError>> {
        let (net, from) = (self.net.clone(), self.id);
        Box::pin(async move {
            let call = net.deliver(from, leader, "forward", |g| async move { g.propose_here(commands).await });
            match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
                Ok(answer) => answer.unwrap_or_else(|lost| Err(forward_error(lost))),
                Err(_) => Err(ProposeError::Timeout),
            }
        })
    }

    fn read_index(&self, leader: u64, _group: u32) -> BoxFuture<'static, Result<u64, ProposeError>> {
        let (net, from) = (self.net.clone(), self.id);
        Box::pin(async move {
            let call = net.deliver(from, leader, "read_index", |g| async move { g.read_index_here().await });
            match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
                Ok(answer) => answer.unwrap_or_else(|lost| Err(forward_error(lost))),
                Err(_) => Err(ProposeError::Timeout),
            }
        })
    }
}
