//! The one encoding of everything Surge persists or sends between nodes.
//!
//! Every value is `[FORMAT_VERSION][bincode 2 (serde) body]`. The leading byte lets a
//! later release change the body format (or replace bincode altogether) and still read
//! what an older release wrote: `decode` dispatches on it. Nothing else in the workspace
//! should call bincode directly, so swapping the format is a change to this file only.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format byte written in front of every encoded value.
///
/// Bump it (and keep a decoder for the old value) whenever the body encoding changes:
/// bincode config, bincode major version, or a serde-incompatible type change.
pub const FORMAT_VERSION: u8 = 1;

/// Largest body `decode` accepts, in bytes.
///
/// Bytes may come from the network (the cluster transport reuses this codec), so a
/// corrupted or hostile length prefix must fail instead of asking for gigabytes. The
/// bound is generous: a whole group's snapshot must fit under it.
pub const DECODE_LIMIT_BYTES: usize = 256 * 1024 * 1024;

/// The bincode configuration of format version 1, kept in one place so that it cannot
/// differ between the writer and the reader.
fn config_v1() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT_BYTES>,
> {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input had no bytes at all, so not even a format version.
    #[error("encoded value is empty: no format version byte")]
    Empty,

    /// The format byte names a format this build cannot read, e.g. data written by a newer
    /// release, or bytes that are not a Surge value at all.
    #[error("unknown format version {found} (this build reads version {FORMAT_VERSION})")]
    UnknownVersion {
        /// The version byte that was found.
        found: u8,
    },

    /// serde/bincode refused to encode the value.
    #[error("encode value")]
    Encode(#[source] bincode::error::EncodeError),

    /// The body does not decode as the requested type: corruption, or a type mismatch.
    #[error("decode value")]
    Decode(#[source] bincode::error::DecodeError),

    /// The body decoded but left bytes over, which means writer and reader disagree on
    /// the type; accepting it would silently drop data.
    #[error("{trailing} trailing bytes after the encoded value")]
    TrailingBytes {
        /// How many bytes were left unread.
        trailing: usize,
    },
}

/// Encodes `value` as `[FORMAT_VERSION][body]`.
///
/// # Errors
///
/// [`CodecError::Encode`] when the value cannot be serialized: its `Serialize` impl
/// fails, or it needs something bincode lacks (e.g. a sequence of unknown length).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let body = bincode::serde::encode_to_vec(value, config_v1()).map_err(CodecError::Encode)?;
    let mut bytes = Vec::with_capacity(1 + body.len());
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Decodes a value written by [`encode`], rejecting unknown versions and trailing bytes.
///
/// # Errors
///
/// Empty input, an unknown version byte, a body that does not decode as `T` (or is
/// larger than [`DECODE_LIMIT_BYTES`]), or bytes left over after it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        FORMAT_VERSION => {
            let (value, read) = bincode::serde::decode_from_slice(body, config_v1()).map_err(CodecError::Decode)?;
            if read != body.len() {
                return Err(CodecError::TrailingBytes { trailing: body.len() - read });
            }
            Ok(value)
        }
        found => Err(CodecError::UnknownVersion { found }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        id: u64,
        name: String,
        lines: Vec<(u32, i64)>,
    }

    fn sample() -> Sample {
        Sample { id: 7, name: "flash".to_owned(), lines: vec![(1, -2), (3, 4)] }
    }

    #[test]
    fn round_trip_keeps_the_value_and_writes_the_version_first() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        let err = decode::<Sample>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::UnknownVersion { found } if found == FORMAT_VERSION + 1), "{err:?}");
    }

    #[test]
    fn empty_truncated_and_padded_input_is_rejected() {
        assert!(matches!(decode::<Sample>(&[]), Err(CodecError::Empty)));

        let bytes = encode(&sample()).unwrap();
        let truncated = &bytes[..bytes.len() - 1];
        assert!(matches!(decode::<Sample>(truncated), Err(CodecError::Decode(_))));

        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(decode::<Sample>(&padded), Err(CodecError::TrailingBytes { trailing: 1 })));
    }

    #[test]
    fn absurd_length_prefix_fails_instead_of_allocating() {
        // Version byte, then a varint u64 marker (253) announcing a string of u64::MAX bytes.
        let mut bytes = vec![FORMAT_VERSION, 253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<String>(&bytes), Err(CodecError::Decode(_))));
    }
}
