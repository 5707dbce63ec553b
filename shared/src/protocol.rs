//! The wire protocol between workers and the parameter server: message types and the
//! binary frame that carries them. The only place frames are encoded or decoded.
//!
//! A frame is one binary WebSocket message:
//!
//! ```text
//! [u32 LE header length H][u32 LE value count P][H bytes: postcard header][payload]
//! payload, when P > 0: [u8 encoding][P values in that encoding]
//! ```
//!
//! The header is a [`Message`] in postcard (serde); the payload is the tensor the
//! message carries (a center, a worker's parameters, an elastic difference) as raw
//! little-endian `f32`, `f16`, `bf16` or 8-bit blocks ([`crate::codec`]), never as
//! serialised numbers. Decoding checks every length before it reads, copies the
//! payload once, and returns a typed [`DecodeError`] for any input; it never panics
//! (a property test feeds it random bytes).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::algorithms::Algorithm;
use crate::codec::{self, Encoding};
use crate::data::Normalization;
use crate::model::Model;

/// Version of this protocol. A hello with another version is rejected. 7: the
/// `cifar` network takes 28×28 crops (its parameters changed). 8: the welcome
/// describes the network (a description and its hash, not a compiled-in name), and
/// shards are `TSI2` (two-byte labels).
pub const PROTOCOL_VERSION: u32 = 8;

/// Bytes before the header: its length and the payload's length.
pub const PREFIX_BYTES: usize = 8;

/// The largest header a frame may carry. Headers are a few dozen bytes; the cap
/// keeps a hostile length field from costing anything.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The largest frame a run accepts: one full parameter vector in f32 plus a header.
/// Servers set their WebSocket limit from this rather than from the library default.
pub fn max_frame_bytes(param_count: usize) -> usize {
    PREFIX_BYTES + MAX_HEADER_BYTES + 1 + 4 * param_count
}

/// What kind of machine a worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerKind {
    /// The native `tether work` binary.
    Native,
    /// A browser tab running the wasm worker.
    Browser,
    /// A `tether relay`: a server for its own workers that syncs its center with
    /// this one as one worker would.
    Relay,
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
    /// The payload encodings this worker can send and read (f32 always works).
    pub encodings: Vec<Encoding>,
    /// Whether the worker has the training set itself; if not, it downloads its
    /// shard, whose length and digest the welcome announces.
    pub needs_shard: bool,
    /// Workers started together (a browser tab's Web Workers) share a group name, so
    /// the dashboard shows them as one volunteer. The server keeps 80 characters.
    pub group: Option<String>,
    /// A relay's own page (`http(s)://host:port`), where this server may send
    /// volunteers; only a relay's URL is kept, and only an http(s) one.
    pub url: Option<String>,
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
    pub model: Model,
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
    /// The encoding of every payload after this one (the welcome's center is f32).
    pub encoding: Encoding,
    /// The shard's download (`GET /api/shard`), when the hello asked for it.
    pub download: Option<ShardDownload>,
}

/// How to fetch and check a shard: what the download must be, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDownload {
    /// Names the training data (part of the shard URL).
    pub data: String,
    /// Length of the shard file in bytes.
    pub bytes: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
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
    /// Workers the sender serves (a relay's own workers; 0 for a worker).
    pub members: u32,
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
    /// The worker moved far more since its last exchange than this run's workers
    /// typically do. Says why, never the threshold: a client that learnt the bound
    /// could send updates just under it.
    #[error(
        "update out of line: the worker moved much farther since its last exchange than \
         this run's workers typically do"
    )]
    OutOfLine,
    /// The server is stopping and takes no more updates.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Applying the update would have left the center non-finite; nothing was written.
    #[error("the update would make the center non-finite; it was not applied")]
    CenterNonFinite,
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
            Self::OutOfLine => "out_of_line",
            Self::ShuttingDown => "shutting_down",
            Self::CenterNonFinite => "center_non_finite",
        }
    }

    /// What a worker should do about this rejection (the same for every kind of worker).
    pub fn remedy(&self) -> Remedy {
        match self {
            Self::ShuttingDown | Self::ServerFull { .. } => Remedy::Reconnect,
            Self::OutOfLine
            | Self::CenterNonFinite
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
    /// The tensor, decoded to f32 (empty for messages without one).
    pub payload: Vec<f32>,
    /// How the payload travelled (f32 when there was none).
    pub encoding: Encoding,
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
    /// The payload's encoding byte names no encoding.
    #[error("unknown payload encoding {0}")]
    UnknownEncoding(u8),
    /// A hello of another protocol version (its header does not decode as ours).
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    OtherVersion(u32),
    /// A welcome whose network description this side cannot build.
    #[error("the run's network cannot be built here: {0}")]
    Network(crate::model::SpecError),
}

impl Message {
    /// The message's kind in one word, for errors (never its contents, which a
    /// client chooses).
    pub fn name(&self) -> &'static str {
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

/// Encodes a frame with an f32 payload. `payload` must be empty for messages
/// without a tensor.
///
/// # Panics
/// If the header exceeds [`MAX_HEADER_BYTES`] (headers are fixed-size structs plus
/// short strings, so this is a programming error).
pub fn encode(message: &Message, payload: &[f32]) -> Vec<u8> {
    encode_as(message, payload, Encoding::F32)
}

/// Encodes a frame with its payload in `encoding`.
///
/// # Panics
/// As [`encode`].
pub fn encode_as(message: &Message, payload: &[f32], encoding: Encoding) -> Vec<u8> {
    let payload_bytes = encoding.encoded_len(payload.len()) as usize;
    let mut out = Vec::with_capacity(PREFIX_BYTES + 128 + 1 + payload_bytes);
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
    if count > 0 {
        out.push(encoding.code());
        codec::encode_into(encoding, payload, &mut out);
    }
    out
}

/// Encodes a frame with its payload in `encoding`, and returns the payload as the
/// receiver will decode it (the values themselves for f32): a lossy sender keeps
/// its error feedback from exactly what the other end sees.
pub fn encode_decoded(
    message: &Message,
    payload: Vec<f32>,
    encoding: Encoding,
) -> (Vec<u8>, Vec<f32>) {
    let bytes = encode_as(message, &payload, encoding);
    if !encoding.is_lossy() || payload.is_empty() {
        return (bytes, payload);
    }
    let start = bytes.len() - encoding.encoded_len(payload.len()) as usize;
    let decoded = codec::decode(encoding, &bytes[start..], payload.len());
    (bytes, decoded)
}

/// Decodes a frame, decoding the payload once into a `Vec<f32>`.
pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let (header, count, encoding, payload) = split(bytes)?;
    let message = decode_header(header)?;
    if count > 0 && !message.has_payload() {
        return Err(DecodeError::UnexpectedPayload(message.name(), count));
    }
    let payload = codec::decode(encoding, payload, count as usize);
    Ok(Frame {
        message,
        payload,
        encoding,
    })
}

fn decode_header(header: &[u8]) -> Result<Message, DecodeError> {
    let (message, rest) = match postcard::take_from_bytes::<Message>(header) {
        Ok(decoded) => decoded,
        Err(e) => {
            return Err(match (hello_version(header), welcome_network(header)) {
                (Some(v), _) if v != PROTOCOL_VERSION => DecodeError::OtherVersion(v),
                (_, Some(why)) => DecodeError::Network(why),
                _ => DecodeError::BadHeader(e.to_string()),
            });
        }
    };
    if !rest.is_empty() {
        return Err(DecodeError::TrailingHeader(rest.len()));
    }
    Ok(message)
}

/// The protocol version of a hello whose header does not decode: every version's
/// hello starts with the variant tag 0 and the version as a postcard varint, so a
/// worker of another version is told so rather than that its frame is malformed.
fn hello_version(header: &[u8]) -> Option<u32> {
    let (&tag, rest) = header.split_first()?;
    if tag != 0 {
        return None;
    }
    let (version, _) = postcard::take_from_bytes::<u32>(rest).ok()?;
    Some(version)
}

/// Why the network of a welcome whose header does not decode cannot be built, if
/// that is why: a welcome starts with the variant tag 1, the run's id and algorithm,
/// then the network (postcard drops the reason a field gave for not decoding).
fn welcome_network(header: &[u8]) -> Option<crate::model::SpecError> {
    let (&tag, rest) = header.split_first()?;
    if tag != 1 {
        return None;
    }
    let (_, rest) = postcard::take_from_bytes::<(String, Algorithm)>(rest).ok()?;
    crate::model::wire_error(rest)
}

/// A frame's header bytes, value count, payload encoding and payload bytes.
type Parts<'a> = (&'a [u8], u32, Encoding, &'a [u8]);

/// Splits a frame into its header bytes, value count, encoding and payload bytes
/// after checking the prefix (and the encoding byte) against the frame's size.
fn split(bytes: &[u8]) -> Result<Parts<'_>, DecodeError> {
    let Some((prefix, rest)) = bytes.split_first_chunk::<PREFIX_BYTES>() else {
        return Err(DecodeError::TooShort(bytes.len()));
    };
    let header_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let count = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if header_len as usize > MAX_HEADER_BYTES {
        return Err(DecodeError::HeaderTooLong(header_len));
    }
    let header_end = PREFIX_BYTES as u64 + u64::from(header_len);
    let mismatch = |expected| DecodeError::LengthMismatch {
        expected,
        actual: bytes.len() as u64,
    };
    if count == 0 {
        if header_end != bytes.len() as u64 {
            return Err(mismatch(header_end));
        }
        return Ok((rest, 0, Encoding::F32, &[]));
    }
    // The encoding byte follows the header; without it no length can be checked.
    let Some(&code) = bytes.get(header_end as usize) else {
        return Err(mismatch(header_end + 1));
    };
    let encoding = Encoding::from_code(code).ok_or(DecodeError::UnknownEncoding(code))?;
    let expected = header_end + 1 + encoding.encoded_len(count as usize);
    if expected != bytes.len() as u64 {
        return Err(mismatch(expected));
    }
    let (header, payload) = rest.split_at(header_len as usize);
    Ok((header, count, encoding, &payload[1..]))
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
            encodings: Encoding::ALL.to_vec(),
            needs_shard: false,
            group: None,
            url: None,
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
            members: 0,
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
        assert_eq!(tail[0], Encoding::F32.code());
        assert_eq!(
            &tail[1..],
            [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()
        );
    }

    #[test]
    fn every_encoding_travels_in_a_frame() {
        let payload: Vec<f32> = (0..200).map(|i| (i as f32 - 100.0) / 7.0).collect();
        for encoding in Encoding::ALL {
            let bytes = encode_as(&sync(), &payload, encoding);
            let frame = decode(&bytes).unwrap();
            assert_eq!(frame.encoding, encoding);
            assert_eq!(frame.payload.len(), payload.len());
            let err = payload
                .iter()
                .zip(&frame.payload)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 0.06, "{encoding}: {err}");
        }
        // An unknown encoding byte, and a q8 frame cut by one byte.
        let mut bad = encode_as(&sync(), &payload, Encoding::Q8);
        let header_len = u32::from_le_bytes(bad[0..4].try_into().unwrap()) as usize;
        bad[PREFIX_BYTES + header_len] = 77;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownEncoding(77)));
        let q8 = encode_as(&sync(), &payload, Encoding::Q8);
        assert!(matches!(
            decode(&q8[..q8.len() - 1]),
            Err(DecodeError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn a_hello_of_another_version_is_named_as_such() {
        // A version-1 hello: tag 0, version 1, then fields this version does not
        // end with (its header runs out early).
        let mut old = encode(&hello(), &[]);
        old[PREFIX_BYTES + 1] = 1;
        let header_len = u32::from_le_bytes(old[0..4].try_into().unwrap());
        old.truncate(old.len() - 2);
        old[0..4].copy_from_slice(&(header_len - 2).to_le_bytes());
        assert_eq!(decode(&old), Err(DecodeError::OtherVersion(1)));
    }

    #[test]
    fn every_malformed_shape_is_a_typed_error() {
        let good = encode(&sync(), &[1.0, 2.0, 3.0]);
        assert_eq!(decode(&[]), Err(DecodeError::TooShort(0)));
        assert_eq!(decode(&good[..7]), Err(DecodeError::TooShort(7)));
        // Truncated payload, extra byte, payload not a whole number of values.
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
        // A header with bytes too many.
        let mut trailing = encode(&hello(), &[]);
        let h = u32::from_le_bytes(trailing[0..4].try_into().unwrap());
        trailing[0..4].copy_from_slice(&(h + 4).to_le_bytes());
        trailing.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::TrailingHeader(4))
        ));
        // A header cut short inside a field.
        let mut cut = good.clone();
        cut[0..4].copy_from_slice(&2u32.to_le_bytes());
        cut[4..8].copy_from_slice(&0u32.to_le_bytes());
        cut.truncate(PREFIX_BYTES + 2);
        assert!(matches!(decode(&cut), Err(DecodeError::BadHeader(_))));
        // A payload without its encoding byte.
        let mut no_encoding = encode(&sync(), &[]);
        no_encoding[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            decode(&no_encoding),
            Err(DecodeError::LengthMismatch { .. })
        ));
        // A hello must not carry a tensor.
        let mut hello_with_payload = encode(&hello(), &[]);
        hello_with_payload.push(Encoding::F32.code());
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
        assert_eq!(max_frame_bytes(100), PREFIX_BYTES + MAX_HEADER_BYTES + 401);
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
            Rejection::OutOfLine,
            Rejection::ShuttingDown,
            Rejection::CenterNonFinite,
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
                    loss: 0.25, samples_per_s: 10.0, wait_s: 0.0, members: 0,
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
