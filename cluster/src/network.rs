//! The Raft network of a single-voter group: there is nobody to talk to.
//!
//! A group with one voter never sends an RPC, so every call answers
//! `Unreachable`. The mutual-TLS transport that multiplexes many groups over
//! one connection per peer replaces this when groups get more members; the
//! write path above it does not change.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use storage::SurgeTypeConfig;

/// Why a single-voter group cannot reach a peer.
#[derive(Debug, thiserror::Error)]
#[error("node {0} is not reachable: this node runs single-voter groups and has no peer transport")]
pub struct NoTransport(u64);

/// Hands out [`NoPeer`] clients.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

/// A client for a peer that does not exist.
#[derive(Debug)]
pub struct NoPeer(u64);

impl<C: SurgeTypeConfig> RaftNetworkFactory<C> for NoPeers {
    type Network = NoPeer;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> NoPeer {
        NoPeer(target)
    }
}

impl NoPeer {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&NoTransport(self.0)))
    }
}

impl<C: SurgeTypeConfig> RaftNetwork<C> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<C>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(self.unreachable())
    }
}
