//! The peer listener: accepts mutual-TLS connections from other nodes and
//! hands each request to a [`PeerHandler`].
//!
//! Requests on one connection are handled concurrently (a task each), at most
//! [`ServerLimits::in_flight_max`] at a time; one more is answered
//! [`Refusal::Overloaded`] at once rather than queued, so an overloaded node
//! says so instead of letting its peers' requests age in a queue. Answers go
//! back as soon as they are ready, in any order.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::wire::{self, FrameError, PeerRequest, PeerResponse, Refusal, RequestEnvelope, ResponseEnvelope};

/// What a node does with the requests its peers send: dispatch Raft RPCs to
/// the group's `openraft::Raft`, and forwarded writes to the group's proposer.
///
/// The future is `Send + 'static` because each request runs in a task of its
/// own. A returned [`Refusal`] tells the peer the request was not handled at
/// all (unknown group, unsupported kind), so it may safely retry.
pub trait PeerHandler: Send + Sync + 'static {
    /// Handles one request; its answer goes back to the peer.
    fn handle(&self, request: PeerRequest) -> BoxFuture<'static, Result<PeerResponse, Refusal>>;
}

/// Any suitable closure is a handler, which is what tests and small adapters
/// need.
impl<F> PeerHandler for F
where
    F: Fn(PeerRequest) -> BoxFuture<'static, Result<PeerResponse, Refusal>> + Send + Sync + 'static,
{
    fn handle(&self, request: PeerRequest) -> BoxFuture<'static, Result<PeerResponse, Refusal>> {
        self(request)
    }
}

/// The listener's bounds.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Requests one connection may have in the handler at once. Openraft
    /// keeps at most a few RPCs in flight per group and peer, so this is
    /// roughly groups × a small factor, plus forwarded writes.
    pub in_flight_max: usize,
    /// Connections served at once; more are closed on accept. A cluster of
    /// N nodes needs N - 1 (one per peer) plus reconnects in progress.
    pub connections_max: usize,
    /// A TLS handshake that takes longer is dropped, so a silent or slow
    /// client cannot hold a connection slot.
    pub handshake_timeout_ms: u64,
    /// Largest frame accepted or sent.
    pub frame_max_bytes: usize,
    /// A connection on which no request arrives for this long is closed. A
    /// peer whose host lost power sends no FIN, and its connection would
    /// hold a slot for good; one that is only quiet reconnects on its next
    /// call. Longer than any caller waits for an answer, so no caller still
    /// waits on a connection closed for this.
    pub idle_timeout_ms: u64,
    /// A request whose handler has not finished in this long is answered
    /// [`Refusal::Failed`] and its handler dropped, freeing its permit (a
    /// deposed leader's proposal, or a hung disk, may never finish). Longer
    /// than any caller waits for an answer.
    pub handler_timeout_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            in_flight_max: 1_024,
            connections_max: 256,
            handshake_timeout_ms: 5_000,
            frame_max_bytes: wire::FRAME_MAX_BYTES,
            idle_timeout_ms: 60_000,
            handler_timeout_ms: 30_000,
        }
    }
}

/// Serves peers on `listener` until the future is dropped. Dropping it (or
/// aborting the task running it) closes the listener and every connection it
/// accepted; handlers already running finish, but their answers go nowhere.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<dyn PeerHandler>,
    limits: ServerLimits,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    // Connections live in this set, so they die with this future.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically out of file descriptors: wait for some to free up
                // rather than spin.
                tracing::warn!(%error, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.connections_max, "too many peer connections; closing a new one");
            metrics::counter!("surge_transport_connections_refused_total").increment(1);
            continue;
        };
        let (acceptor, handler, limits) = (acceptor.clone(), handler.clone(), limits.clone());
        connections.spawn(async move {
            serve_connection(tcp, peer, acceptor, handler, limits).await;
            drop(slot);
        });
    }
}

/// A running [`serve`] loop. Dropping it stops the listener and closes every
/// connection it accepted.
pub struct PeerServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PeerServer {
    /// Spawns [`serve`] on the current tokio runtime.
    pub fn start(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        handler: Arc<dyn PeerHandler>,
        limits: ServerLimits,
    ) -> std::io::Result<PeerServer> {
        let local_addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, tls, handler, limits));
        Ok(PeerServer { local_addr, task })
    }

    /// Where peers reach this server (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every connection, now.
    pub fn stop(self) {
        // Drop does the work.
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<dyn PeerHandler>,
    limits: ServerLimits,
) {
    // Raft heartbeats are small and latency-bound.
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(Duration::from_millis(limits.handshake_timeout_ms), acceptor.accept(tcp));
    let stream = match handshake.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            // Expected for anyone without a cluster certificate: not worth more than a warning.
            tracing::warn!(%peer, %error, "peer TLS handshake failed");
            metrics::counter!("surge_transport_handshakes_failed_total").increment(1);
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "peer TLS handshake timed out");
            metrics::counter!("surge_transport_handshakes_failed_total").increment(1);
            return;
        }
    };
    tracing::debug!(%peer, "peer connected");
    let (reader, writer) = tokio::io::split(stream);
    // Answers waiting to be written: at most one per permit plus the
    // refusals the reader writes itself, which wait for room (backpressure on
    // a peer that does not read its answers).
    let (answers, queued) = mpsc::channel(limits.in_flight_max.max(1));
    let permits = Arc::new(Semaphore::new(limits.in_flight_max.max(1)));
    let ended = tokio::select! {
        ended = read_requests(reader, handler, permits, answers, &limits) => ended,
        ended = wire::write_queued(writer, queued) => ended,
    };
    match ended {
        FrameError::Closed => tracing::debug!(%peer, "peer disconnected"),
        FrameError::Idle { ms } => tracing::debug!(%peer, ms, "closed an idle peer connection"),
        error => tracing::warn!(%peer, error = %wire::error_chain(&error), "peer connection failed"),
    }
}

/// Reads requests until the connection fails, and starts a task per request.
async fn read_requests<R: AsyncRead + Unpin>(
    mut reader: R,
    handler: Arc<dyn PeerHandler>,
    permits: Arc<Semaphore>,
    answers: mpsc::Sender<Vec<u8>>,
    limits: &ServerLimits,
) -> FrameError {
    let (frame_max_bytes, idle) = (limits.frame_max_bytes, Duration::from_millis(limits.idle_timeout_ms));
    let handler_timeout = Duration::from_millis(limits.handler_timeout_ms);
    // The handlers of this connection's requests: they end with it, since
    // nobody is left to read their answers.
    let mut handlers = JoinSet::new();
    loop {
        while handlers.try_join_next().is_some() {}
        let envelope = match tokio::time::timeout(idle, wire::read_frame(&mut reader, frame_max_bytes)).await {
            Ok(Ok(payload)) => match wire::decode_payload::<RequestEnvelope>(&payload) {
                Ok(envelope) => envelope,
                // Without a decodable envelope there is no id to answer: the
                // peer speaks another format version or is broken. Hang up.
                Err(error) => return error,
            },
            Ok(Err(error)) => return error,
            Err(_idle) => return FrameError::Idle { ms: limits.idle_timeout_ms },
        };
        let id = envelope.id;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("surge_transport_requests_refused_total", "reason" => "overloaded").increment(1);
            let refusal = answer_frame(id, Err(Refusal::Overloaded), frame_max_bytes);
            if answers.send(refusal).await.is_err() {
                return FrameError::Closed;
            }
            continue;
        };
        let kind = envelope.request.body.kind();
        let handling = handler.handle(envelope.request);
        let answers = answers.clone();
        handlers.spawn(async move {
            let result = match tokio::time::timeout(handler_timeout, AssertUnwindSafe(handling).catch_unwind()).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => {
                    tracing::error!(kind, "peer request handler panicked");
                    Err(Refusal::Failed(format!("the {kind} handler panicked")))
                }
                Err(_) => {
                    tracing::warn!(kind, "peer request handler did not finish in time");
                    Err(Refusal::Failed(format!("the {kind} handler did not finish within {handler_timeout:?}")))
                }
            };
            // The connection may be gone; then nobody is waiting.
            let _ = answers.send(answer_frame(id, result, frame_max_bytes)).await;
            drop(permit);
        });
    }
}

/// Encodes an answer; one that cannot be encoded or is too large becomes a
/// [`Refusal::Failed`] so that the peer hears about it instead of timing out.
fn answer_frame(id: u64, result: Result<PeerResponse, Refusal>, frame_max_bytes: usize) -> Vec<u8> {
    wire::encode_payload(&ResponseEnvelope { id, result }, frame_max_bytes).unwrap_or_else(|error| {
        tracing::error!(%error, "encoding a peer answer failed");
        let failed = ResponseEnvelope { id, result: Err(Refusal::Failed(format!("encode answer: {error}"))) };
        wire::encode_payload(&failed, frame_max_bytes).expect("a short refusal always encodes")
    })
}
