//! The client side of one peer: one TLS connection, reused by every group
//! and every caller, with request/answer pairing by id.
//!
//! **Lifecycle.** The first call opens the connection (a task that connects,
//! then reads and writes frames). Calls put their encoded frame on the
//! connection's bounded queue and wait for the answer with the same id. When
//! the connection dies, every call waiting on it fails at once with
//! [`TransportError::ConnectionLost`] (not at its timeout), and the next
//! call opens a new connection. A connection attempt that fails, or a
//! connection that ends before any answer arrived on it, starts a backoff
//! (`backoff_min_ms`, doubling up to `backoff_max_ms`) during which calls
//! fail at once with [`TransportError::Unreachable`]; callers (openraft,
//! the forwarder) have their own retry policies and should not queue behind a
//! dead peer.
//!
//! **Bounds.** At most `queue_max` frames wait to be written and at most
//! `in_flight_max` calls wait for answers; past either, calls fail at once
//! with [`TransportError::Overloaded`]. Every call has a timeout.
//!
//! **Silent peers.** A peer whose host vanished or was cut off (no FIN, no
//! RST) leaves a connection that looks open, and TCP may take many minutes to
//! notice. So when a call gives up (times out, or its caller drops it, as
//! openraft does on its own timeouts) while nothing at all has arrived on its
//! connection since the call was sent, and nothing for `stalled_after_ms`,
//! the connection is presumed dead and closed: the calls still waiting on it
//! fail at once, and later calls reconnect and learn fast that the peer is
//! unreachable. The silence bound keeps a slow but live peer (a long fsync)
//! from having its connection torn down on every late answer.
//!
//! **Runtime.** The connection task runs on the tokio runtime of the call
//! that opened it. If that runtime shuts down, the connection ends like any
//! other (waiting calls fail, the next call reconnects on its own runtime).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::isolation::Isolation;
use super::wire::{self, FrameError, PeerRequest, PeerResponse, Refusal, RequestEnvelope, ResponseEnvelope};
use crate::fence::Fence;

/// A client's bounds and timings.
#[derive(Clone, Debug)]
pub struct ClientLimits {
    /// Frames waiting to be written to the connection.
    pub queue_max: usize,
    /// Calls waiting for an answer.
    pub in_flight_max: usize,
    /// Bound on TCP connect plus TLS handshake.
    pub connect_timeout_ms: u64,
    /// First wait after a failed connection attempt.
    pub backoff_min_ms: u64,
    /// Longest wait between connection attempts. Kept below the shortest
    /// election timeout: while a client backs off, its heartbeats fail, and
    /// a follower that hears none for a lease asks for a pre-vote (see
    /// `crate::Group::pre_vote`); the link should be back before that.
    pub backoff_max_ms: u64,
    /// Largest frame sent or accepted.
    pub frame_max_bytes: usize,
    /// Silence (nothing received) after which a connection with an
    /// unanswered call is presumed dead; see the module docs.
    pub stalled_after_ms: u64,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            queue_max: 4_096,
            in_flight_max: 4_096,
            connect_timeout_ms: 2_000,
            backoff_min_ms: 50,
            backoff_max_ms: 200,
            frame_max_bytes: wire::FRAME_MAX_BYTES,
            stalled_after_ms: 3_000,
        }
    }
}

/// Why a call got no answer from the peer's handler.
///
/// Only [`TransportError::Unreachable`], [`TransportError::Overloaded`],
/// [`TransportError::TooLarge`], [`TransportError::Encode`] and
/// [`TransportError::Refused`] (unless its refusal is [`Refusal::Failed`])
/// guarantee the peer did not act on the request; after the others it may have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection to the peer: connecting or the TLS handshake failed
    /// just now or recently (the client is backing off).
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: String,
        /// The connection error.
        reason: String,
    },
    /// The connection died while the call was queued or waiting for its answer.
    #[error("connection to peer {addr} lost: {reason}")]
    ConnectionLost {
        /// The peer's address.
        addr: String,
        /// Why it ended.
        reason: String,
    },
    /// No answer within the call's timeout.
    #[error("no answer from peer {addr} within {timeout:?}")]
    Timeout {
        /// The peer's address.
        addr: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// Too many calls queued or waiting on this peer.
    #[error("too many requests queued for peer {addr}")]
    Overloaded {
        /// The peer's address.
        addr: String,
    },
    /// The encoded request exceeds the frame bound; it was not sent.
    #[error("request of {len} bytes exceeds the {max} byte frame limit")]
    TooLarge {
        /// The encoded request's size.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The request could not be encoded; it was not sent.
    #[error("encode request: {0}")]
    Encode(String),
    /// The peer's transport refused the request without handling it.
    #[error("peer {addr} refused the request: {refusal}")]
    Refused {
        /// The peer's address.
        addr: String,
        /// Why.
        refusal: Refusal,
    },
    /// The peer answered with the wrong kind of response.
    #[error("peer {addr} answered a {asked} request with a {answered} response")]
    Mismatch {
        /// The peer's address.
        addr: String,
        /// The kind of request sent.
        asked: &'static str,
        /// The kind of response received.
        answered: &'static str,
    },
}

/// A connection to one peer address, shared by every group and caller.
/// Cheap to clone; the connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct PeerClient {
    handle: Arc<Handle>,
    /// While set, calls fail at once as unreachable (a drill cut this node off).
    isolation: Isolation,
    /// Stamps every request, learns from the peer's refusals, and (when the
    /// peer is in another region) notes its acceptances.
    fence: Fence,
    elsewhere: bool,
}

/// Owned by the clones of one [`PeerClient`]; closes the connection when the
/// last clone goes, since the connection task itself keeps `Shared` alive.
struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    limits: ClientLimits,
    next_id: AtomicU64,
    state: Mutex<State>,
}

struct State {
    link: Link,
    /// Calls waiting for an answer, by request id. Ordered so that failing
    /// them all happens in the same order every time.
    pending: BTreeMap<u64, Pending>,
    /// Tags each connection, so that a dying one fails only its own calls.
    next_generation: u64,
    /// Connection attempts failed in a row; sets the backoff.
    failures: u32,
}

struct Pending {
    generation: u64,
    reply: oneshot::Sender<Result<PeerResponse, TransportError>>,
}

enum Link {
    /// No connection; the next call opens one.
    Idle,
    /// A connection task is running (connecting, or connected).
    Open {
        generation: u64,
        frames: mpsc::Sender<Vec<u8>>,
        task: AbortHandle,
        /// Milliseconds after `opened` at which the last frame arrived.
        last_read_ms: Arc<AtomicU64>,
        opened: Instant,
    },
    /// The last attempt failed; calls fail at once until `until`.
    Backoff { until: Instant, reason: String },
}

impl PeerClient {
    /// A client for the peer at `addr` (`host:port`), verified as
    /// `server_name` (see [`super::tls::server_name`]). Connects lazily.
    pub fn new(
        addr: impl Into<String>,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
        limits: ClientLimits,
    ) -> PeerClient {
        let shared = Shared {
            addr: addr.into(),
            server_name,
            connector: TlsConnector::from(tls),
            limits,
            next_id: AtomicU64::new(1),
            state: Mutex::new(State { link: Link::Idle, pending: BTreeMap::new(), next_generation: 1, failures: 0 }),
        };
        PeerClient {
            handle: Arc::new(Handle { shared: Arc::new(shared) }),
            isolation: Isolation::default(),
            fence: Fence::default(),
            elsewhere: false,
        }
    }

    /// The same client, stamping requests with `fence`; `elsewhere` says
    /// the peer is in another region, so its acceptance confirms the fence.
    pub fn with_fence(mut self, fence: Fence, elsewhere: bool) -> PeerClient {
        self.fence = fence;
        self.elsewhere = elsewhere;
        self
    }

    /// The same client, sending nothing while `isolation` is set.
    pub fn with_isolation(mut self, isolation: Isolation) -> PeerClient {
        self.isolation = isolation;
        self
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.handle.shared.addr
    }

    /// Sends `request` and waits up to `timeout` for the peer's answer.
    /// A refusal from the peer's transport comes back as
    /// [`TransportError::Refused`], so `Ok` is always the handler's answer.
    pub async fn call(&self, mut request: PeerRequest, timeout: Duration) -> Result<PeerResponse, TransportError> {
        let kind = request.body.kind();
        let fenced = request.body.is_fenced();
        request.stamp = self.fence.stamp();
        let result = if self.isolation.is_isolated() {
            let addr = self.handle.shared.addr.clone();
            Err(TransportError::Unreachable { addr, reason: "this node is isolated by a drill".into() })
        } else {
            self.exchange(request, timeout).await
        };
        self.fence.heard(self.elsewhere, fenced, &result);
        metrics::counter!("surge_transport_calls_total", "kind" => kind, "result" => result_label(&result))
            .increment(1);
        result
    }

    async fn exchange(&self, request: PeerRequest, timeout: Duration) -> Result<PeerResponse, TransportError> {
        let shared = &self.handle.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let envelope = RequestEnvelope { id, request };
        let frame = wire::encode_payload(&envelope, shared.limits.frame_max_bytes).map_err(|error| match error {
            FrameError::TooLarge { len, max } => TransportError::TooLarge { len, max },
            other => TransportError::Encode(wire::error_chain(&other)),
        })?;
        let (reply, answer) = oneshot::channel();
        let sent = shared.enqueue(id, frame, reply)?;
        // Removes the pending entry however this call ends (answer, timeout,
        // or the caller dropping the future), so abandoned calls never pile
        // up, and checks whether an unanswered call's connection is stalled.
        let mut pending = PendingGuard { shared, id, sent, answered: false };
        let result = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(shared.lost("connection task ended")),
            Err(_) => return Err(TransportError::Timeout { addr: shared.addr.clone(), timeout }),
        };
        pending.answered = true;
        result
    }
}

fn result_label(result: &Result<PeerResponse, TransportError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(TransportError::Unreachable { .. }) => "unreachable",
        Err(TransportError::ConnectionLost { .. }) => "connection_lost",
        Err(TransportError::Timeout { .. }) => "timeout",
        Err(TransportError::Overloaded { .. }) => "overloaded",
        Err(TransportError::Refused { .. }) => "refused",
        Err(_) => "error",
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let task = match &self.shared.lock().link {
            Link::Open { task, .. } => Some(task.clone()),
            _ => None,
        };
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// Where a call was sent, for deciding after a timeout whether its
/// connection is stalled.
struct Sent {
    generation: u64,
    at_ms: u64,
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    sent: Sent,
    /// False if the call gave up before an answer (or a connection failure) came.
    answered: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
        if !self.answered {
            self.shared.gave_up(&self.sent);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under this lock can leave the state half-changed, so a
        // panic elsewhere while holding it does not make it unusable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lost(&self, reason: &str) -> TransportError {
        TransportError::ConnectionLost { addr: self.addr.clone(), reason: reason.to_owned() }
    }

    /// Queues `frame` on the open connection (opening one if there is none),
    /// and registers the call's reply channel.
    fn enqueue(
        self: &Arc<Self>,
        id: u64,
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<PeerResponse, TransportError>>,
    ) -> Result<Sent, TransportError> {
        let mut state = self.lock();
        if state.pending.len() >= self.limits.in_flight_max {
            return Err(TransportError::Overloaded { addr: self.addr.clone() });
        }
        let (generation, frames, opened) = match &state.link {
            Link::Open { generation, frames, opened, .. } => (*generation, frames.clone(), *opened),
            Link::Backoff { until, reason } if Instant::now() < *until => {
                return Err(TransportError::Unreachable { addr: self.addr.clone(), reason: reason.clone() });
            }
            Link::Idle | Link::Backoff { .. } => self.open(&mut state),
        };
        let sent = Sent { generation, at_ms: millis_since(opened) };
        match frames.try_send(frame) {
            Ok(()) => {
                state.pending.insert(id, Pending { generation: sent.generation, reply });
                Ok(sent)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(TransportError::Overloaded { addr: self.addr.clone() }),
            // Defensive: the connection task is gone and its teardown has not
            // reset the link yet.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                state.link = Link::Idle;
                Err(self.lost("connection task ended"))
            }
        }
    }

    /// Starts a connection task; the caller holds the lock. Returns what a
    /// call needs to queue on it.
    fn open(self: &Arc<Self>, state: &mut State) -> (u64, mpsc::Sender<Vec<u8>>, Instant) {
        let generation = state.next_generation;
        state.next_generation += 1;
        let (frames, queued) = mpsc::channel(self.limits.queue_max.max(1));
        let last_read_ms = Arc::new(AtomicU64::new(0));
        let opened = Instant::now();
        let task = tokio::spawn(run_connection(self.clone(), generation, queued, last_read_ms.clone(), opened));
        state.link = Link::Open { generation, frames: frames.clone(), task: task.abort_handle(), last_read_ms, opened };
        metrics::counter!("surge_transport_connects_total").increment(1);
        (generation, frames, opened)
    }

    /// After a call gave up without an answer: if nothing arrived on its
    /// connection since the call was sent, nor for `stalled_after_ms`, the
    /// connection is presumed dead and closed.
    fn gave_up(&self, sent: &Sent) {
        let stalled = match &self.lock().link {
            Link::Open { generation, task, last_read_ms, opened, .. } if *generation == sent.generation => {
                let last_read_ms = last_read_ms.load(Ordering::Relaxed);
                let silent_ms = millis_since(*opened).saturating_sub(last_read_ms);
                (last_read_ms <= sent.at_ms && silent_ms >= self.limits.stalled_after_ms).then(|| task.clone())
            }
            _ => None,
        };
        if let Some(task) = stalled {
            tracing::warn!(addr = %self.addr, "no answer from peer and nothing received since; closing the connection");
            // The task's teardown fails every call still waiting on it.
            task.abort();
        }
    }

    /// Ends connection `generation`: the link goes idle (after a connection
    /// that answered) or into backoff (after one that failed or answered
    /// nothing), and every call waiting on it fails now with `error`.
    fn tear_down(&self, generation: u64, answered: bool, error: TransportError) {
        let mut state = self.lock();
        if matches!(&state.link, Link::Open { generation: open, .. } if *open == generation) {
            state.link = if answered {
                Link::Idle
            } else {
                let exponent = state.failures.min(16);
                state.failures = state.failures.saturating_add(1);
                let backoff_ms =
                    self.limits.backoff_min_ms.saturating_mul(1 << exponent).min(self.limits.backoff_max_ms);
                let reason = match &error {
                    TransportError::Unreachable { reason, .. } | TransportError::ConnectionLost { reason, .. } => {
                        reason.clone()
                    }
                    other => other.to_string(),
                };
                Link::Backoff { until: Instant::now() + Duration::from_millis(backoff_ms), reason }
            };
        }
        let dead: Vec<u64> =
            state.pending.iter().filter(|(_, pending)| pending.generation == generation).map(|(&id, _)| id).collect();
        for id in dead {
            if let Some(pending) = state.pending.remove(&id) {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Tears the connection down however its task ends, including by abort or
/// by its runtime shutting down, so no call is left waiting on it.
struct Teardown {
    shared: Arc<Shared>,
    generation: u64,
    /// Set by the first answer that arrives.
    answered: Arc<AtomicBool>,
    error: Option<TransportError>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let error = self.error.take().unwrap_or_else(|| self.shared.lost("connection closed"));
        self.shared.tear_down(self.generation, self.answered.load(Ordering::Relaxed), error);
    }
}

async fn run_connection(
    shared: Arc<Shared>,
    generation: u64,
    queued: mpsc::Receiver<Vec<u8>>,
    last_read_ms: Arc<AtomicU64>,
    opened: Instant,
) {
    let answered = Arc::new(AtomicBool::new(false));
    let mut teardown = Teardown { shared: shared.clone(), generation, answered: answered.clone(), error: None };
    let stream = match connect(&shared).await {
        Ok(stream) => stream,
        Err(reason) => {
            tracing::debug!(addr = %shared.addr, %reason, "connecting to peer failed");
            teardown.error = Some(TransportError::Unreachable { addr: shared.addr.clone(), reason });
            return;
        }
    };
    tracing::debug!(addr = %shared.addr, "connected to peer");
    let (reader, writer) = tokio::io::split(stream);
    let ended = tokio::select! {
        ended = read_answers(reader, &shared, &last_read_ms, opened, &answered) => ended,
        ended = wire::write_queued(writer, queued) => ended,
    };
    let reason = wire::error_chain(&ended);
    tracing::debug!(addr = %shared.addr, %reason, "peer connection ended");
    teardown.error = Some(shared.lost(&reason));
}

async fn connect(shared: &Shared) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let attempt = async {
        let tcp = TcpStream::connect(&shared.addr).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        shared.connector.connect(shared.server_name.clone(), tcp).await.map_err(|e| format!("TLS handshake: {e}"))
    };
    let timeout = Duration::from_millis(shared.limits.connect_timeout_ms);
    tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| Err(format!("no connection within {timeout:?}")))
}

/// Reads answers and hands each to its waiting call until the connection
/// fails. The first answer ends the backoff: a handshake alone does not,
/// since a peer that refuses the certificate (TLS 1.3 checks the client's
/// after the client is done) or the format hangs up right after it, and
/// reconnecting at every call would storm it.
async fn read_answers<R: AsyncRead + Unpin>(
    mut reader: R,
    shared: &Shared,
    last_read_ms: &AtomicU64,
    opened: Instant,
    answered: &AtomicBool,
) -> FrameError {
    loop {
        let payload = match wire::read_frame(&mut reader, shared.limits.frame_max_bytes).await {
            Ok(payload) => payload,
            Err(error) => return error,
        };
        last_read_ms.store(millis_since(opened), Ordering::Relaxed);
        if !answered.swap(true, Ordering::Relaxed) {
            shared.lock().failures = 0;
        }
        let ResponseEnvelope { id, result } = match wire::decode_payload(&payload) {
            Ok(envelope) => envelope,
            Err(error) => return error,
        };
        let result = result.map_err(|refusal| TransportError::Refused { addr: shared.addr.clone(), refusal });
        // A call that timed out has removed itself; its late answer is dropped.
        if let Some(pending) = shared.lock().pending.remove(&id) {
            let _ = pending.reply.send(result);
        }
    }
}
