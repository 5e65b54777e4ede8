//! Node-to-node transport: Raft RPCs and forwarded writes for every group a
//! node runs, multiplexed over one mutual-TLS connection per peer.
//!
//! ```text
//!  group g's openraft ──▶ PeerNetwork(g) ──▶ PeerClients ─ one PeerClient per peer ─┐
//!                                                                                 │ TLS 1.3, client cert
//!                                       frames: [u32 len][codec(RequestEnvelope)] ▼
//!  peer: serve() ─ task per request (bounded) ─▶ PeerHandler (RaftHandler: group g's Raft)
//! ```
//!
//! - [`wire`]: the messages and the frame format (`storage::codec` payloads).
//! - [`tls`]: who may connect (cluster CA only, both ways) and how names are checked.
//! - [`server`]: the listener and the [`PeerHandler`] seam.
//! - [`client`]: one reused connection per peer, with timeouts, bounded
//!   queues, reconnect with backoff, and fast failure when a connection dies.
//! - [`network`]: openraft's `RaftNetworkFactory` on top of the client, and
//!   the Raft side of the handler.
//! - [`forwarder`]: `crate::group::Forwarder` on top of the client (a
//!   follower's writes and read indexes go to the leader), and the handler
//!   that serves a node's [`crate::Group`]s.
//! - [`isolation`]: the switch a zone-loss drill uses to cut a node off from
//!   its peers (both ways) for a while.
//! - [`certs`]: a development CA and node certificates (`surge certs`).
//!
//! **Boundary:** this module moves bytes between nodes and never decides
//! anything about a command; a forwarded write is proposed by the leader's
//! own proposer, exactly as if it had arrived there.

pub mod certs;
pub mod client;
pub mod forwarder;
pub mod isolation;
pub mod network;
pub mod server;
pub mod tls;
pub mod wire;

pub use certs::{write_dev_certs, CertError, DevCa, NodeCertificate};
pub use client::{ClientLimits, PeerClient, TransportError};
pub use forwarder::{GroupHandler, PeerForwarder, PeerLink, TlsLink};
pub use isolation::Isolation;
pub use network::{PeerClients, PeerConnection, PeerNetwork, RaftHandler};
pub use server::{serve, PeerHandler, PeerServer, ServerLimits};
pub use tls::{node_dns_name, server_name, PeerTls, TlsError};
pub use wire::{LogEnd, PeerBody, PeerRequest, PeerResponse, Refusal};
