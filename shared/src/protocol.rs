//! The wire protocol between workers and the parameter server: message types and the
//! binary frame that carries them. The only place frames are encoded or decoded.
//!
//! A frame is one binary WebSocket message:
//!
//! ```text
//! [u32 LE header length H][u32 LE payload length P (f32 values)][H bytes: postcard header][4·P bytes: f32 LE]
//! ```
//!
//! The header is a [`Message`] in postcard (serde); the payload is the tensor the
//! message carries (a center, a worker's parameters, an elastic difference) as raw
//! little-endian `f32`, never as serialised numbers. Decoding checks every length
//! before it reads, copies the payload once, and returns a typed [`DecodeError`] for
//! any input; it never panics (a property test feeds it random bytes).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::algorithms::Algorithm;
use crate::data::Normalization;
use crate::model::ModelKind;

/// Version of this protocol. A hello with another version is rejected.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes before the header: its length and the payload's length.
pub const PREFIX_BYTES: usize = 8;

/// The largest header a frame may carry. Headers are a few dozen bytes; the cap
/// keeps a hostile length field from costing anything.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The largest frame a run accepts: one full parameter vector plus a header. Servers
/// set their WebSocket limit from this rather than from the library default.
pub fn max_frame_bytes(param_count: usize) -> usize {
    PREFIX_BYTES + MAX_HEADER_BYTES + 4 * param_count
}

/// What kind of machine a worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerKind {
    /// The native `tether work` binary.
    Native,
    /// A browser tab running the wasm worker.
    Browser,
}

/// A worker's first frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Native or browser.
    pub kind: WorkerKind,
    /// Compute backend: "cpu", "wgpu", "webgpu".
    pub backend: String,
    /// The device in words (adapter name, or CPU and thread count).
    pub device: String,
    /// CPU threads the worker trains with (0 when on a GPU).
    pub threads: u32,
    /// The run's worker token, when the server requires one.
    pub token: Option<String>,
    /// The run this worker trained for before, when it rejoins after a disconnect:
    /// if it matches, an elastic worker keeps its own parameters.
    pub previous_run: Option<String>,
}

/// The hyper-parameters a worker needs, sent in the welcome and in every reply so a
/// runtime change reaches workers at their next sync.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// Local steps between synchronisations τ.
    pub tau: u32,
    /// Elastic moving rate α = ηρ (0 for algorithms without an elastic force).
    pub alpha: f32,
    /// Local learning rate η.
    pub lr: f64,
}

/// Everything about a run that a worker must agree with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The run's id (also its directory name).
    pub run_id: String,
    /// Which algorithm.
    pub algorithm: Algorithm,
    /// Which network; fixes the parameter count.
    pub model: ModelKind,
    /// τ, α, η.
    pub hyper: Hyper,
    /// Local momentum δ (0: plain SGD).
    pub momentum: f64,
    /// Nesterov local momentum (EAMSGD).
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Images per local step.
    pub batch: u32,
    /// LSGD's pull toward the leader λ (0 for other algorithms).
    pub leader_pull: f32,
    /// Pixel normalisation, computed by the server over the training set so every
    /// worker uses the same.
    pub normalization: Normalization,
    /// Training images in the run's data set; a worker whose copy differs refuses.
    pub train_items: u64,
}

/// Which part of the training set a worker trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This worker's shard, `0..count`.
    pub index: u32,
    /// How many shards the set is cut into.
    pub count: u32,
    /// Seed of the permutation the shards are cut from.
    pub seed: u64,
}

/// The server's answer to a hello. Payload: the current center.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The run.
    pub run: RunSpec,
    /// This connection's session; every sync names it.
    pub session: u64,
    /// A short id for logs and the dashboard.
    pub worker_id: u32,
    /// The data this worker trains on.
    pub shard: Shard,
    /// Version of the center in the payload.
    pub center_version: u64,
    /// Whether the worker should keep its own parameters (a rejoin to the same run
    /// with an elastic algorithm) instead of starting from the center.
    pub keep_params: bool,
}

/// A worker's synchronisation. Payload: its parameters xⁱ (elastic, averaging,
/// DiLoCo, LSGD), or its accumulated change since the last pull (DOWNPOUR).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sync {
    /// The session from the welcome.
    pub session: u64,
    /// Increases by at least one with every sync of the session.
    pub seq: u64,
    /// The center version the worker last saw.
    pub center_version: u64,
    /// Local steps so far in this session.
    pub steps: u64,
    /// Training images processed since the last sync.
    pub samples: u64,
    /// Mean training loss since the last sync.
    pub loss: f32,
    /// The worker's training speed since the last sync, images per second.
    pub samples_per_s: f32,
    /// Seconds the worker spent waiting for its previous sync's reply.
    pub wait_s: f32,
}

/// How a worker applies a reply's payload to its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Apply {
    /// xⁱ ← xⁱ − payload (the elastic difference d).
    Subtract,
    /// xⁱ ← payload (a pull of the center, or a synchronous round's result).
    Replace,
    /// xⁱ ← xⁱ − λ(xⁱ − payload), payload = the leader's parameters (LSGD).
    PullToward,
}

/// The server's answer to a sync.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The sync's sequence number.
    pub seq: u64,
    /// The center's version after this exchange.
    pub center_version: u64,
    /// How to apply the payload.
    pub apply: Apply,
    /// The current τ, α, η (they may change during a run).
    pub hyper: Hyper,
}

/// Why a frame was refused. A rejected frame never changes the center.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Error)]
pub enum Rejection {
    /// The hello's protocol version is not this server's.
    #[error("protocol version {got} is not supported (server speaks {expected})")]
    ProtocolVersion {
        /// The server's version.
        expected: u32,
        /// The worker's.
        got: u32,
    },
    /// The frame could not be decoded.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message that makes no sense at this point (a sync before the hello, ...).
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// The worker token is missing or wrong.
    #[error("unauthorized: missing or wrong worker token")]
    Unauthorized,
    /// The server already has as many workers as it takes.
    #[error("server full: {max} workers connected")]
    ServerFull {
        /// The cap.
        max: u32,
    },
    /// The sync names a session this connection does not hold.
    #[error("unknown or expired session {0}")]
    UnknownSession(u64),
    /// The tensor has the wrong number of values.
    #[error("tensor has {got} values, the model has {expected}")]
    WrongLength {
        /// The model's parameter count.
        expected: u64,
        /// Values received.
        got: u64,
    },
    /// The tensor holds NaN or ±∞.
    #[error("tensor value {index} is not finite")]
    NonFinite {
        /// Index of the first bad value.
        index: u64,
    },
    /// The frame is larger than the run's limit.
    #[error("frame of {got} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// The limit.
        limit: u64,
        /// The frame's size, where known (0 otherwise).
        got: u64,
    },
    /// The sequence number is not above the last accepted one.
    #[error("sequence number {seq} replayed (last accepted {last})")]
    Replayed {
        /// The sync's number.
        seq: u64,
        /// The last accepted one.
        last: u64,
    },
    /// The worker last saw a center that is too old (or newer than exists).
    #[error("center version {seen} is {staleness} versions behind {current} (bound {bound})")]
    TooStale {
        /// The version the worker saw.
        seen: u64,
        /// The center's version now.
        current: u64,
        /// current − seen.
        staleness: u64,
        /// The run's bound.
        bound: u64,
    },
    /// The update's norm is far outside what this run's workers send.
    #[error("update norm {norm:.3e} is out of line with the run (bound {bound:.3e})")]
    OutOfLine {
        /// ‖xⁱ − x̃‖ (or ‖push‖).
        norm: f64,
        /// The bound at the time.
        bound: f64,
    },
    /// The server is stopping and takes no more updates.
    #[error("server is shutting down")]
    ShuttingDown,
}

impl Rejection {
    /// A stable short name, used as the `reason` label of the rejects metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ProtocolVersion { .. } => "protocol_version",
            Self::Malformed(_) => "malformed",
            Self::Unexpected(_) => "unexpected",
            Self::Unauthorized => "unauthorized",
            Self::ServerFull { .. } => "server_full",
            Self::UnknownSession(_) => "unknown_session",
            Self::WrongLength { .. } => "wrong_length",
            Self::NonFinite { .. } => "non_finite",
            Self::FrameTooLarge { .. } => "frame_too_large",
            Self::Replayed { .. } => "replayed",
            Self::TooStale { .. } => "too_stale",
            Self::OutOfLine { .. } => "out_of_line",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// What a worker should do about this rejection (the same for every kind of worker).
    pub fn remedy(&self) -> Remedy {
        match self {
            Self::ShuttingDown | Self::ServerFull { .. } => Remedy::Reconnect,
            Self::OutOfLine { .. }
            | Self::TooStale { .. }
            | Self::NonFinite { .. }
            | Self::UnknownSession(_)
            | Self::Replayed { .. } => Remedy::Restart,
            Self::ProtocolVersion { .. }
            | Self::Malformed(_)
            | Self::Unexpected(_)
            | Self::Unauthorized
            | Self::WrongLength { .. }
            | Self::FrameTooLarge { .. } => Remedy::GiveUp,
        }
    }
}

/// A worker's answer to a [`Rejection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    /// The server is busy or going away: reconnect later, keeping xⁱ.
    Reconnect,
    /// The update was refused: start over from the center with a fresh session.
    Restart,
    /// Something no retry fixes (version, token, a bug): stop and say why.
    GiveUp,
}

/// Why the server tells a worker to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The run is over: exit.
    Finished,
    /// The server is going down (it may come back): reconnect with backoff.
    ShuttingDown,
}

/// Every frame's header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Worker → server, first frame.
    Hello(Hello),
    /// Server → worker, answer to the hello. Payload: the center.
    Welcome(Welcome),
    /// Worker → server. Payload: parameters or accumulated change.
    Sync(Sync),
    /// Server → worker, answer to a sync. Payload: see [`Apply`].
    Reply(Reply),
    /// Server → worker: the last frame was refused. `seq` names the sync, if it was one.
    Reject {
        /// The refused sync's sequence number.
        seq: Option<u64>,
        /// Why.
        reason: Rejection,
    },
    /// Worker → server: still alive (browsers cannot send WebSocket pings).
    Heartbeat {
        /// The session.
        session: u64,
    },
    /// Worker → server: leaving for good.
    Leave {
        /// The session.
        session: u64,
    },
    /// Server → worker: stop training.
    Stop(StopReason),
}

impl Message {
    /// Whether this message carries a tensor payload.
    pub fn has_payload(&self) -> bool {
        matches!(self, Self::Welcome(_) | Self::Sync(_) | Self::Reply(_))
    }
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The header.
    pub message: Message,
    /// The tensor (empty for messages without one).
    pub payload: Vec<f32>,
}

/// A frame that cannot be decoded. Every variant says what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the fixed prefix.
    #[error("frame of {0} bytes is shorter than its {PREFIX_BYTES}-byte prefix")]
    TooShort(usize),
    /// The header length field is above [`MAX_HEADER_BYTES`].
    #[error("header length {0} exceeds {MAX_HEADER_BYTES}")]
    HeaderTooLong(u32),
    /// The lengths in the prefix do not add up to the frame's size.
    #[error("frame is {actual} bytes but its prefix describes {expected}")]
    LengthMismatch {
        /// Bytes the prefix implies.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The header is not a valid message.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// The header decoded but did not use all of its bytes.
    #[error("header has {0} unused bytes")]
    TrailingHeader(usize),
    /// A message without a tensor came with one.
    #[error("{0} carries no tensor, but the frame has {1} values")]
    UnexpectedPayload(&'static str, u32),
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Welcome(_) => "welcome",
            Self::Sync(_) => "sync",
            Self::Reply(_) => "reply",
            Self::Reject { .. } => "reject",
            Self::Heartbeat { .. } => "heartbeat",
            Self::Leave { .. } => "leave",
            Self::Stop(_) => "stop",
        }
    }
}

/// Encodes a frame. `payload` must be empty for messages without a tensor.
///
/// # Panics
/// If the header exceeds [`MAX_HEADER_BYTES`] (headers are fixed-size structs plus
/// short strings, so this is a programming error).
pub fn encode(message: &Message, payload: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_BYTES + 128 + 4 * payload.len());
    out.extend_from_slice(&[0; PREFIX_BYTES]);
    let mut out = postcard::to_extend(message, out).expect("a Vec grows as needed");
    let header_len = out.len() - PREFIX_BYTES;
    assert!(
        header_len <= MAX_HEADER_BYTES,
        "header of {header_len} bytes"
    );
    out[0..4].copy_from_slice(&(header_len as u32).to_le_bytes());
    let count = u32::try_from(payload.len()).expect("payload under 4 Gi values");
    out[4..8].copy_from_slice(&count.to_le_bytes());
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(payload));
    } else {
        out.extend(payload.iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}

/// Decodes a frame, copying the payload once into a `Vec<f32>`.
pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let (header, payload) = split(bytes)?;
    let message = decode_header(header)?;
    let count = payload.len() / 4;
    if count > 0 && !message.has_payload() {
        return Err(DecodeError::UnexpectedPayload(message.name(), count as u32));
    }
    // One copy: the bytes need not be aligned for f32, so they are copied, not cast.
    let payload = if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec::<u8, f32>(payload)
    } else {
        payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    Ok(Frame { message, payload })
}

fn decode_header(header: &[u8]) -> Result<Message, DecodeError> {
    let (message, rest) = postcard::take_from_bytes::<Message>(header)
        .map_err(|e| DecodeError::BadHeader(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingHeader(rest.len()));
    }
    Ok(message)
}

/// Splits a frame into its header bytes and payload bytes after checking the
/// prefix against the frame's size.
fn split(bytes: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    let Some((prefix, rest)) = bytes.split_first_chunk::<PREFIX_BYTES>() else {
        return Err(DecodeError::TooShort(bytes.len()));
    };
    let header_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let count = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if header_len as usize > MAX_HEADER_BYTES {
        return Err(DecodeError::HeaderTooLong(header_len));
    }
    let expected = PREFIX_BYTES as u64 + u64::from(header_len) + 4 * u64::from(count);
    if expected != bytes.len() as u64 {
        return Err(DecodeError::LengthMismatch {
            expected,
            actual: bytes.len() as u64,
        });
    }
    Ok(rest.split_at(header_len as usize))
}

/// The index of the first NaN or infinity, if any.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| !v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            kind: WorkerKind::Native,
            backend: "cpu".into(),
            device: "cpu ×2".into(),
            threads: 2,
            token: Some("secret".into()),
            previous_run: None,
        })
    }

    fn sync() -> Message {
        Message::Sync(Sync {
            session: 7,
            seq: 3,
            center_version: 12,
            steps: 48,
            samples: 2048,
            loss: 0.5,
            samples_per_s: 900.0,
            wait_s: 0.001,
        })
    }

    #[test]
    fn frames_round_trip_bit_exactly() {
        let payload = vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38, f32::NAN];
        let bytes = encode(&sync(), &payload);
        assert_eq!(&bytes[4..8], &5u32.to_le_bytes());
        let frame = decode(&bytes).unwrap();
        assert_eq!(frame.message, sync());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&frame.payload), bits(&payload));
        let frame = decode(&encode(&hello(), &[])).unwrap();
        assert_eq!((frame.message, frame.payload), (hello(), vec![]));
    }

    #[test]
    fn the_payload_is_raw_little_endian_f32_after_the_header() {
        let bytes = encode(&sync(), &[1.0, 2.0]);
        let header_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        let tail = &bytes[PREFIX_BYTES + header_len..];
        assert_eq!(tail, [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat());
    }

    #[test]
    fn every_malformed_shape_is_a_typed_error() {
        let good = encode(&sync(), &[1.0, 2.0, 3.0]);
        assert_eq!(decode(&[]), Err(DecodeError::TooShort(0)));
        assert_eq!(decode(&good[..7]), Err(DecodeError::TooShort(7)));
        // Truncated payload, extra byte, payload not a multiple of four.
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(DecodeError::LengthMismatch { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode(&long),
            Err(DecodeError::LengthMismatch { .. })
        ));
        // A count that overflows 32 bits once multiplied by 4.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge),
            Err(DecodeError::LengthMismatch { .. })
        ));
        let mut big_header = good.clone();
        big_header[0..4].copy_from_slice(&(MAX_HEADER_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode(&big_header),
            Err(DecodeError::HeaderTooLong(_))
        ));
        // An unknown message tag.
        let mut bad_tag = good.clone();
        bad_tag[PREFIX_BYTES] = 200;
        assert!(matches!(decode(&bad_tag), Err(DecodeError::BadHeader(_))));
        // A header with a byte too many: move one payload byte into the header.
        let mut trailing = good.clone();
        let h = u32::from_le_bytes(trailing[0..4].try_into().unwrap());
        trailing[0..4].copy_from_slice(&(h + 4).to_le_bytes());
        trailing[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::TrailingHeader(4))
        ));
        // A header cut short inside a field.
        let mut cut = good.clone();
        cut[0..4].copy_from_slice(&2u32.to_le_bytes());
        let count = (cut.len() - PREFIX_BYTES - 2) / 4;
        cut.truncate(PREFIX_BYTES + 2 + 4 * count);
        cut[4..8].copy_from_slice(&(count as u32).to_le_bytes());
        assert!(decode(&cut).is_err());
        // A hello must not carry a tensor.
        let mut hello_with_payload = encode(&hello(), &[]);
        hello_with_payload.extend_from_slice(&1.0f32.to_le_bytes());
        hello_with_payload[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            decode(&hello_with_payload),
            Err(DecodeError::UnexpectedPayload("hello", 1))
        );
    }

    #[test]
    fn non_finite_values_are_found() {
        assert_eq!(first_non_finite(&[1.0, 2.0]), None);
        assert_eq!(first_non_finite(&[1.0, f32::INFINITY, f32::NAN]), Some(1));
        assert_eq!(first_non_finite(&[f32::NAN]), Some(0));
    }

    #[test]
    fn frame_limit_follows_the_model() {
        assert_eq!(max_frame_bytes(100), PREFIX_BYTES + MAX_HEADER_BYTES + 400);
        let bytes = encode(&sync(), &vec![0.0; 100]);
        assert!(bytes.len() <= max_frame_bytes(100));
    }

    #[test]
    fn rejection_codes_are_distinct() {
        let all = [
            Rejection::ProtocolVersion {
                expected: 1,
                got: 2,
            },
            Rejection::Malformed(String::new()),
            Rejection::Unexpected(String::new()),
            Rejection::Unauthorized,
            Rejection::ServerFull { max: 1 },
            Rejection::UnknownSession(1),
            Rejection::WrongLength {
                expected: 1,
                got: 2,
            },
            Rejection::NonFinite { index: 0 },
            Rejection::FrameTooLarge { limit: 1, got: 2 },
            Rejection::Replayed { seq: 1, last: 1 },
            Rejection::TooStale {
                seen: 0,
                current: 9,
                staleness: 9,
                bound: 1,
            },
            Rejection::OutOfLine {
                norm: 1.0,
                bound: 0.1,
            },
            Rejection::ShuttingDown,
        ];
        let mut codes: Vec<&str> = all.iter().map(Rejection::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    mod random_bytes {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = decode(&bytes);
            }

            #[test]
            fn decode_never_panics_on_a_valid_prefix_with_random_rest(
                header_len in 0u32..64, count in 0u32..16, body in proptest::collection::vec(any::<u8>(), 0..200)
            ) {
                let mut bytes = header_len.to_le_bytes().to_vec();
                bytes.extend_from_slice(&count.to_le_bytes());
                bytes.extend_from_slice(&body);
                if let Ok(frame) = decode(&bytes) {
                    // Whatever decodes re-encodes to the same length.
                    prop_assert_eq!(frame.payload.len(), count as usize);
                }
            }

            #[test]
            fn mutated_valid_frames_decode_or_fail_cleanly(
                payload in proptest::collection::vec(any::<f32>(), 0..8),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            ) {
                let mut bytes = encode(&Message::Sync(Sync {
                    session: 1, seq: 2, center_version: 3, steps: 4, samples: 5,
                    loss: 0.25, samples_per_s: 10.0, wait_s: 0.0,
                }), &payload);
                for (at, v) in flips {
                    let i = at % bytes.len();
                    bytes[i] ^= v;
                }
                let _ = decode(&bytes);
            }
        }
    }
}
