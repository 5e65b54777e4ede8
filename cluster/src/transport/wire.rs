//! What travels between nodes, and how it is cut into frames.
//!
//! A frame is `[length: u32 big-endian][payload]`, the payload one value in
//! `storage::codec` encoding (a format version byte, then bincode 2). Requests
//! travel client → server as [`RequestEnvelope`]s, answers server → client as
//! [`ResponseEnvelope`]s; the envelope's id pairs them, so many requests share
//! one connection and their answers may come back in any order.
//!
//! Frames are bounded ([`FRAME_MAX_BYTES`] by default): a length prefix above
//! the bound fails at once with [`FrameError::TooLarge`] instead of asking for
//! the memory.

use domain::{Command, Response};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::LogId;
use serde::{Deserialize, Serialize};
use storage::codec::{self, CodecError};
use storage::TypeConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::fence::Stamp;
use crate::status::NodeStatus;
use crate::ProposeError;

/// Default bound on one frame's payload. A snapshot chunk (openraft sends
/// 3 MiB by default) and a full append-entries batch fit with room to spare;
/// anything larger is a bug or a hostile peer.
pub const FRAME_MAX_BYTES: usize = 64 * 1024 * 1024;

/// One request to a peer, addressed to one of its Raft groups. Every group a
/// node runs shares the node's connections, so the group id travels with the
/// message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerRequest {
    /// Which Raft group on the peer handles it.
    pub group: u32,
    /// The sender's generation (see [`crate::fence`]); the sending client
    /// sets it.
    pub stamp: Stamp,
    /// What is asked.
    pub body: PeerBody,
}

impl PeerRequest {
    /// A request of `body` to group `group`, stamped when it is sent.
    pub fn new(group: u32, body: PeerBody) -> PeerRequest {
        PeerRequest { group, stamp: Stamp::default(), body }
    }
}

/// The requests a node sends its peers: the three Raft RPCs, and what a
/// follower asks of the group leader (see `crate::group::Forwarder`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerBody {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft leader election.
    Vote(VoteRequest<u64>),
    /// One chunk of a snapshot, for a follower too far behind for the log.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A batch for the group's leader to stamp and propose as one entry.
    Forward(Vec<Command>),
    /// The log index a linearizable read must see applied, after the leader
    /// confirmed its leadership with a quorum.
    ReadIndex,
    /// Cut the peer off from every other node for this many milliseconds (a
    /// zone-loss drill). About the node, not a group: the group id is ignored.
    Isolate {
        /// How long, from when the peer receives it.
        for_ms: u64,
    },
    /// The peer's view of itself and of every group it runs, for `surge ctl
    /// status`. About the node: the group id is ignored.
    Status,
    /// Leadership transfer, on the leader: fall silent for this long (see
    /// `crate::Group::abdicate`).
    Abdicate {
        /// How long; 0 ends it.
        for_ms: u64,
    },
    /// Leadership transfer, on the voters that are not the target: do not
    /// campaign for this long.
    HoldElections {
        /// How long; 0 ends it.
        for_ms: u64,
    },
    /// Leadership transfer, on the target: campaign now.
    Campaign,
    /// The peer's applied state, whole: failback reads the lost primary's
    /// copy with it.
    Copy,
    /// Pre-vote, before a voter campaigns: would the peer vote now for a
    /// candidate whose log ends at `last_log` (see `crate::Group::pre_vote`)?
    /// Changes nothing on the peer.
    PreVote {
        /// The would-be candidate's last log id.
        last_log: Option<LogId<u64>>,
    },
    /// Where the peer's log ends, once every Raft request its fence
    /// admitted before this one has been answered, read through Raft's own
    /// queue. A forced failover founds the new group past it (see
    /// [`LogEnd`]). Not fenced, and refused while the peer is isolated.
    LogEnd,
}

/// The end of a replica's log and the term of its vote, as its Raft sees
/// them once every request queued before the question has been taken in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEnd {
    /// The last entry of its log, committed or not.
    pub last_log: Option<LogId<u64>>,
    /// The term of the vote it holds: at least that of any leader it followed.
    pub term: u64,
}

impl PeerBody {
    /// Whether the receiver's fence checks this request (see
    /// [`crate::fence`]): everything but the two questions that change
    /// nothing, status and where the log ends, which even a fenced sender
    /// may ask (a forced failover asks the latter before it founds its
    /// group), and whose answers therefore confirm nothing.
    pub fn is_fenced(&self) -> bool {
        !matches!(self, PeerBody::Status | PeerBody::LogEnd)
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerBody::AppendEntries(_) => "append_entries",
            PeerBody::Vote(_) => "vote",
            PeerBody::InstallSnapshot(_) => "install_snapshot",
            PeerBody::Forward(_) => "forward",
            PeerBody::ReadIndex => "read_index",
            PeerBody::Isolate { .. } => "isolate",
            PeerBody::Status => "status",
            PeerBody::Abdicate { .. } => "abdicate",
            PeerBody::HoldElections { .. } => "hold_elections",
            PeerBody::Campaign => "campaign",
            PeerBody::Copy => "copy",
            PeerBody::LogEnd => "log_end",
            PeerBody::PreVote { .. } => "pre_vote",
        }
    }
}

/// A peer's answer, one variant per [`PeerBody`] variant.
///
/// Raft answers keep openraft's own error types, so the caller can tell a
/// remote Raft error (a higher vote, a stopped Raft) from a transport failure
/// and report it to openraft as `RPCError::RemoteError`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Answers [`PeerBody::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// Answers [`PeerBody::Vote`].
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// Answers [`PeerBody::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// Answers [`PeerBody::Forward`]: the state machine's answer to the batch.
    Forward(Result<Response, ProposeError>),
    /// Answers [`PeerBody::ReadIndex`].
    ReadIndex(Result<u64, ProposeError>),
    /// Answers [`PeerBody::Isolate`]: the peer is cut off as of now.
    Isolated,
    /// Answers [`PeerBody::Status`].
    Status(NodeStatus),
    /// Answers the leadership-transfer requests.
    Done(Result<(), ProposeError>),
    /// Answers [`PeerBody::Copy`]: the state in `storage::codec` encoding.
    Copy(Result<Vec<u8>, ProposeError>),
    /// Answers [`PeerBody::PreVote`]: whether the peer would vote.
    PreVote(bool),
    /// Answers [`PeerBody::LogEnd`].
    LogEnd(Result<LogEnd, ProposeError>),
}

impl PeerResponse {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerResponse::AppendEntries(_) => "append_entries",
            PeerResponse::Vote(_) => "vote",
            PeerResponse::InstallSnapshot(_) => "install_snapshot",
            PeerResponse::Forward(_) => "forward",
            PeerResponse::ReadIndex(_) => "read_index",
            PeerResponse::Isolated => "isolate",
            PeerResponse::Status(_) => "status",
            PeerResponse::Done(_) => "done",
            PeerResponse::Copy(_) => "copy",
            PeerResponse::PreVote(_) => "pre_vote",
            PeerResponse::LogEnd(_) => "log_end",
        }
    }
}

/// Why a peer's transport (not its Raft, not its state machine) did not
/// answer a request. Except after [`Refusal::Failed`], the request was not
/// handed to anyone, so it had no effect and may be retried elsewhere or later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The connection already has as many requests in flight as the peer
    /// allows; queueing more would only hide the overload.
    #[error("peer overloaded: too many requests in flight on this connection")]
    Overloaded,
    /// The peer runs no such group (yet: it may still be starting).
    #[error("peer runs no group {0}")]
    UnknownGroup(u32),
    /// The peer is cut off from the cluster by a drill and hands nothing to
    /// its Raft groups until the drill's isolation ends.
    #[error("peer is isolated by a drill")]
    Isolated,
    /// The sender's copy is of an older generation than one the peer knows
    /// (see [`crate::fence`]): the sender is fenced.
    #[error("fenced: the peer knows generation {0}, newer than the sender's copy")]
    Fenced(u64),
    /// The peer's handler does not serve this kind of request.
    #[error("peer does not serve {0} requests")]
    Unsupported(String),
    /// The peer's handler failed before answering (it panicked, did not
    /// finish in time, or its answer could not be encoded); the message
    /// says how. The request may have had its effect.
    #[error("peer failed to answer: {0}")]
    Failed(String),
    /// An append-entries call whose entries do not run on from its
    /// `prev_log_id` with no gap: the peer took none of it (see
    /// `crate::group::unmoored_entries`). Last, so that the variants before
    /// it keep their encoding.
    #[error("append-entries with an entry at index {found} where index {expected} belongs")]
    UnmooredEntries {
        /// The first entry out of place: its index.
        found: u64,
        /// The index that belongs there.
        expected: u64,
    },
}

/// A request on the wire: the id its answer will carry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Chosen by the client, unique per connection; the server only echoes it.
    pub id: u64,
    /// The request itself.
    pub request: PeerRequest,
}

/// An answer on the wire, paired with its request by id.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The id of the request this answers.
    pub id: u64,
    /// The handler's answer, or why the peer's transport refused the request.
    pub result: Result<PeerResponse, Refusal>,
}

/// Why a frame could not be read, written, encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame (announced by a peer, or about to be sent) is larger than the
    /// bound; nothing was allocated or sent for it.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The frame's payload length.
        len: usize,
        /// The bound it broke.
        max: usize,
    },
    /// A zero-length frame: not even a format version byte.
    #[error("empty frame")]
    Empty,
    /// The payload is not a value of the expected type in a known format.
    #[error("frame payload")]
    Codec(#[source] CodecError),
    /// The connection failed or closed mid-frame.
    #[error("connection")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed by peer")]
    Closed,
    /// Nothing arrived for this long: the peer is gone without a word, or
    /// has nothing to say; either way the connection is closed.
    #[error("nothing arrived for {ms} ms")]
    Idle {
        /// The idle bound.
        ms: u64,
    },
}

/// An error and its sources as one line (`a: b: c`), for where an error
/// becomes a string (a log field, an error sent on to a caller) and its
/// `Display`, which says only its own level, would hide the cause.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Encodes `value` as one frame's payload, refusing one larger than `max`
/// bytes so that the peer is never sent a frame it must reject.
pub fn encode_payload<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let payload = codec::encode(value).map_err(FrameError::Codec)?;
    if payload.len() > max {
        return Err(FrameError::TooLarge { len: payload.len(), max });
    }
    Ok(payload)
}

/// Decodes one frame's payload.
pub fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    codec::decode(payload).map_err(FrameError::Codec)
}

/// Writes one frame: length prefix, then payload. Does not flush, so a
/// writer with several frames ready sends them in one go.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| FrameError::TooLarge { len: payload.len(), max: u32::MAX as usize })?;
    writer.write_all(&len.to_be_bytes()).await.map_err(FrameError::Io)?;
    writer.write_all(payload).await.map_err(FrameError::Io)?;
    Ok(())
}

/// Reads one frame's payload, refusing (before allocating) one announced as
/// larger than `max` bytes.
///
/// Not cancel-safe: a frame half-read when the future is dropped is lost, so
/// each connection reads in one loop of its own.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    // A clean close between frames is the normal end of a connection; a close
    // inside a frame is an error.
    match reader.read(&mut prefix[..1]).await.map_err(FrameError::Io)? {
        0 => return Err(FrameError::Closed),
        _ => reader.read_exact(&mut prefix[1..]).await.map_err(FrameError::Io)?,
    };
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(FrameError::Io)?;
    Ok(payload)
}

/// Writes queued frames until the queue closes or the connection fails.
/// Frames that are ready together go out in one flush.
pub(crate) async fn write_queued<W: AsyncWrite + Unpin>(
    writer: W,
    mut queued: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> FrameError {
    const FRAMES_PER_FLUSH_MAX: usize = 64;
    let mut writer = tokio::io::BufWriter::with_capacity(64 * 1024, writer);
    while let Some(frame) = queued.recv().await {
        if let Err(error) = write_frame(&mut writer, &frame).await {
            return error;
        }
        for _ in 1..FRAMES_PER_FLUSH_MAX {
            let Ok(frame) = queued.try_recv() else { break };
            if let Err(error) = write_frame(&mut writer, &frame).await {
                return error;
            }
        }
        if let Err(error) = writer.flush().await {
            return FrameError::Io(error);
        }
    }
    FrameError::Closed
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn vote_request() -> PeerRequest {
        PeerRequest::new(
            3,
            PeerBody::Vote(VoteRequest {
                vote: Vote::new(4, 2),
                last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 17)),
            }),
        )
    }

    #[tokio::test]
    async fn frames_round_trip_back_to_back() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let first = RequestEnvelope { id: 1, request: vote_request() };
        let second = RequestEnvelope {
            id: 2,
            request: PeerRequest::new(
                0,
                PeerBody::Forward(vec![Command::Restock { sku: "x".into(), units: 5, idempotency_key: "r".into() }]),
            ),
        };
        for envelope in [&first, &second] {
            write_frame(&mut a, &encode_payload(envelope, FRAME_MAX_BYTES).unwrap()).await.unwrap();
        }
        drop(a);
        for expected in [&first, &second] {
            let payload = read_frame(&mut b, FRAME_MAX_BYTES).await.unwrap();
            // openraft's requests have no PartialEq; their Debug shows every field.
            let decoded = decode_payload::<RequestEnvelope>(&payload).unwrap();
            assert_eq!(format!("{decoded:?}"), format!("{expected:?}"));
        }
        assert!(matches!(read_frame(&mut b, FRAME_MAX_BYTES).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn oversized_length_prefix_fails_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let error = read_frame(&mut b, 1024).await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { len, max: 1024 } if len == u32::MAX as usize), "{error:?}");
        assert_eq!(error.to_string(), format!("frame of {} bytes exceeds the 1024 byte limit", u32::MAX));
    }

    #[tokio::test]
    async fn frame_cut_short_is_an_io_error_not_a_clean_close() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        assert!(matches!(read_frame(&mut b, 1024).await, Err(FrameError::Io(_))));
    }

    #[test]
    fn encoder_refuses_a_payload_over_the_bound() {
        let big = PeerRequest::new(
            0,
            PeerBody::Forward(vec![Command::Restock { sku: "y".repeat(100), units: 1, idempotency_key: "r".into() }]),
        );
        assert!(matches!(encode_payload(&big, 50), Err(FrameError::TooLarge { max: 50, .. })));
    }

    /// Raft errors must survive bincode, or a remote "higher vote" would turn
    /// into a decode failure and the leader would never step down.
    #[test]
    fn raft_errors_and_refusals_round_trip() {
        let responses = vec![
            ResponseEnvelope {
                id: 9,
                result: Ok(PeerResponse::Vote(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)))),
            },
            ResponseEnvelope {
                id: 10,
                result: Ok(PeerResponse::AppendEntries(Ok(AppendEntriesResponse::HigherVote(Vote::new(7, 3))))),
            },
            ResponseEnvelope { id: 11, result: Err(Refusal::UnknownGroup(4)) },
            ResponseEnvelope {
                id: 12,
                result: Ok(PeerResponse::Forward(Err(ProposeError::NotLeader { leader: Some(2) }))),
            },
            ResponseEnvelope { id: 13, result: Ok(PeerResponse::ReadIndex(Ok(41))) },
        ];
        for response in responses {
            let bytes = encode_payload(&response, FRAME_MAX_BYTES).unwrap();
            assert_eq!(decode_payload::<ResponseEnvelope>(&bytes).unwrap(), response);
        }
    }

    #[test]
    fn a_leaders_refusal_crosses_the_wire_unchanged() {
        for error in [
            ProposeError::Overloaded,
            ProposeError::Timeout,
            ProposeError::NotLeader { leader: Some(3) },
            ProposeError::Unavailable("disk".into()),
        ] {
            let answer = PeerResponse::Forward(Err(error));
            let bytes = codec::encode(&answer).unwrap();
            assert_eq!(codec::decode::<PeerResponse>(&bytes).unwrap(), answer);
        }
    }
}
