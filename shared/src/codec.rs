//! Tensor encodings for what moves each sync (`f32`, `f16`, `bf16`, 8-bit blocks),
//! and [`Link`]: the per-session state, kept alike at both ends, that stops a lossy
//! encoding's error from accumulating over many syncs.
//!
//! Lossy encodings never carry parameters as such: a worker's parameters travel as
//! the difference from a *reference* both ends hold, and after each frame both ends
//! move the reference to the value the receiver reconstructed. The sender's error is
//! therefore carried into its next difference (error feedback): the server's view of
//! a worker's xⁱ is always within one quantisation step of the truth, never drifting.
//! Elastic differences the server sends back are quantised with a residual the
//! server keeps per session, so what a worker subtracts over many syncs sums to what
//! the center added, up to one step. `f32` frames are exact and need neither.

use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::protocol::Apply;

/// Values per scale in the 8-bit encoding: one `f32` scale per 64 values costs
/// 1/16 byte per value, so a `q8` payload is 1.0625 bytes per value (3.76× below f32).
pub const Q8_BLOCK: usize = 64;

/// How a tensor payload is written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Raw little-endian `f32`: exact.
    F32,
    /// IEEE half precision (11-bit significand; saturates at ±65504).
    F16,
    /// bfloat16 (8-bit significand, the range of f32).
    Bf16,
    /// Blocks of [`Q8_BLOCK`] values: an `f32` scale (max |v| / 127), then one
    /// signed byte per value, `v ≈ q · scale`.
    Q8,
}

impl Encoding {
    /// Every encoding, cheapest on bytes last.
    pub const ALL: [Self; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Q8];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        }
    }

    /// The byte that names this encoding in a frame.
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
            Self::Q8 => 3,
        }
    }

    /// The encoding a frame's byte names, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }

    /// Whether decoding gives back other values than were encoded.
    pub fn is_lossy(self) -> bool {
        self != Self::F32
    }

    /// Bytes that `count` values take.
    pub fn encoded_len(self, count: usize) -> u64 {
        let n = count as u64;
        match self {
            Self::F32 => 4 * n,
            Self::F16 | Self::Bf16 => 2 * n,
            Self::Q8 => n + 4 * n.div_ceil(Q8_BLOCK as u64),
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|e| e.name()).collect();
                format!("unknown encoding {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Appends `values` in `encoding` to `out`.
///
/// Non-finite values stay non-finite (a q8 block with one becomes all NaN), so the
/// receiver's finiteness check refuses them as it would in f32. Finite values beyond
/// f16's range saturate at ±65504 rather than becoming infinite.
pub fn encode_into(encoding: Encoding, values: &[f32], out: &mut Vec<u8>) {
    out.reserve(encoding.encoded_len(values.len()) as usize);
    match encoding {
        Encoding::F32 => {
            if cfg!(target_endian = "little") {
                out.extend_from_slice(bytemuck::cast_slice(values));
            } else {
                out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            }
        }
        Encoding::F16 => out.extend(values.iter().flat_map(|&v| {
            let v = if v.is_finite() {
                v.clamp(-f16::MAX.to_f32(), f16::MAX.to_f32())
            } else {
                v
            };
            f16::from_f32(v).to_le_bytes()
        })),
        Encoding::Bf16 => out.extend(values.iter().flat_map(|&v| {
            let v = if v.is_finite() {
                v.clamp(-bf16::MAX.to_f32(), bf16::MAX.to_f32())
            } else {
                v
            };
            bf16::from_f32(v).to_le_bytes()
        })),
        Encoding::Q8 => {
            for block in values.chunks(Q8_BLOCK) {
                let scale = q8_scale(block);
                out.extend_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                out.extend(
                    block
                        .iter()
                        .map(|&v| ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8),
                );
            }
        }
    }
}

/// A block's scale: max |v| / 127, NaN when the block holds a non-finite value.
fn q8_scale(block: &[f32]) -> f32 {
    let mut max = 0.0f32;
    for &v in block {
        if !v.is_finite() {
            return f32::NAN;
        }
        max = max.max(v.abs());
    }
    max / 127.0
}

/// Decodes `count` values from `bytes`, which must be exactly
/// `encoding.encoded_len(count)` long (the frame decoder checks this first).
///
/// # Panics
/// On a length mismatch: a caller's bug, since lengths are checked where bytes enter.
pub fn decode(encoding: Encoding, bytes: &[u8], count: usize) -> Vec<f32> {
    assert_eq!(
        bytes.len() as u64,
        encoding.encoded_len(count),
        "length checked by the frame decoder"
    );
    match encoding {
        Encoding::F32 => {
            if cfg!(target_endian = "little") {
                // The bytes need not be aligned for f32, so they are copied, not cast.
                bytemuck::pod_collect_to_vec::<u8, f32>(bytes)
            } else {
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
        }
        Encoding::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Encoding::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Encoding::Q8 => {
            let mut out = Vec::with_capacity(count);
            for block in bytes.chunks(4 + Q8_BLOCK) {
                let (scale, q) = block.split_at(4);
                let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
                out.extend(q.iter().map(|&b| f32::from(b as i8) * scale));
            }
            out
        }
    }
}

/// A payload that does not fit the session.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LinkError {
    /// The frame's encoding is not the one the welcome fixed.
    #[error("payload encoded as {got}, but this session uses {expected}")]
    WrongEncoding {
        /// The session's encoding.
        expected: Encoding,
        /// The frame's.
        got: Encoding,
    },
    /// The payload's length is not the model's.
    #[error("tensor has {got} values, the model has {expected}")]
    WrongLength {
        /// Values the session's tensors have.
        expected: usize,
        /// Values received.
        got: usize,
    },
}

/// One session's link state, kept the same way by the worker and by the server.
///
/// - the worker sends its parameters with [`Link::params_payload`], the server
///   reads them with [`Link::receive_params`];
/// - the server answers with [`Link::reply_payload`], the worker reads the answer
///   with [`Link::receive_reply`].
///
/// For `f32` every method passes values through unchanged and nothing is stored.
#[derive(Clone, Debug)]
pub struct Link {
    encoding: Encoding,
    /// The vector both ends agree on; lossy payloads are differences from it.
    reference: Vec<f32>,
    /// What the server's lossy elastic differences still owe the worker.
    residual: Vec<f32>,
}

impl Link {
    /// A link for a session that starts from `start` (the welcome's center, which
    /// travels exactly in f32).
    pub fn new(encoding: Encoding, start: &[f32]) -> Self {
        Self {
            encoding,
            reference: if encoding.is_lossy() {
                start.to_vec()
            } else {
                Vec::new()
            },
            residual: Vec::new(),
        }
    }

    /// The session's encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Worker: what to send for parameters `x` — `x` itself in f32, else `x` minus
    /// the reference. Call [`Link::sent`] with the encoded payload afterwards.
    pub fn params_payload(&self, x: &[f32]) -> Vec<f32> {
        if self.encoding.is_lossy() {
            x.iter().zip(&self.reference).map(|(x, r)| x - r).collect()
        } else {
            x.to_vec()
        }
    }

    /// Worker: after sending `decoded` (the payload as the server will decode it):
    /// the reference moves to what the server reconstructs.
    pub fn sent(&mut self, decoded: &[f32]) {
        if self.encoding.is_lossy() {
            add_assign(&mut self.reference, decoded);
        }
    }

    /// Server: the worker's parameters from a sync's decoded payload.
    pub fn receive_params(
        &mut self,
        encoding: Encoding,
        payload: Vec<f32>,
    ) -> Result<Vec<f32>, LinkError> {
        self.check(encoding, payload.len())?;
        if !self.encoding.is_lossy() {
            return Ok(payload);
        }
        add_assign(&mut self.reference, &payload);
        Ok(self.reference.clone())
    }

    /// Server: the values to encode for a reply `apply` with `payload` (the
    /// difference d, the new parameters, or the leader's). Call
    /// [`Link::replied`] with the decoded payload afterwards.
    pub fn reply_payload(&mut self, apply: Apply, payload: &[f32]) -> Vec<f32> {
        if !self.encoding.is_lossy() {
            return payload.to_vec();
        }
        match apply {
            Apply::Subtract => {
                if self.residual.len() != payload.len() {
                    self.residual = vec![0.0; payload.len()];
                }
                payload
                    .iter()
                    .zip(&self.residual)
                    .map(|(d, r)| d + r)
                    .collect()
            }
            Apply::Replace | Apply::PullToward => payload
                .iter()
                .zip(&self.reference)
                .map(|(v, r)| v - r)
                .collect(),
        }
    }

    /// Server: after sending reply values `sent` (before encoding) that decode as
    /// `decoded`: keeps the residual and moves the reference as the worker will.
    /// Returns what the worker reconstructs (DOWNPOUR measures its next push from it).
    pub fn replied(&mut self, apply: Apply, sent: &[f32], decoded: &[f32]) -> Vec<f32> {
        if !self.encoding.is_lossy() {
            return decoded.to_vec();
        }
        if apply == Apply::Subtract {
            for ((r, s), q) in self.residual.iter_mut().zip(sent).zip(decoded) {
                *r = s - q;
            }
        }
        self.reconstruct(apply, decoded.to_vec())
    }

    /// Worker: the reply's payload as it is to be applied — d for
    /// [`Apply::Subtract`], the new parameters for [`Apply::Replace`], the leader's
    /// for [`Apply::PullToward`].
    pub fn receive_reply(
        &mut self,
        apply: Apply,
        encoding: Encoding,
        payload: Vec<f32>,
    ) -> Result<Vec<f32>, LinkError> {
        self.check(encoding, payload.len())?;
        if !self.encoding.is_lossy() {
            return Ok(payload);
        }
        Ok(self.reconstruct(apply, payload))
    }

    /// Both ends: a reply's values from its decoded payload, moving the reference
    /// the same way on each side.
    fn reconstruct(&mut self, apply: Apply, mut decoded: Vec<f32>) -> Vec<f32> {
        match apply {
            Apply::Subtract => {
                for (r, d) in self.reference.iter_mut().zip(&decoded) {
                    *r -= d;
                }
                decoded
            }
            Apply::Replace => {
                add_assign(&mut self.reference, &decoded);
                decoded.copy_from_slice(&self.reference);
                decoded
            }
            Apply::PullToward => {
                add_assign(&mut decoded, &self.reference);
                decoded
            }
        }
    }

    fn check(&self, encoding: Encoding, len: usize) -> Result<(), LinkError> {
        if encoding != self.encoding {
            return Err(LinkError::WrongEncoding {
                expected: self.encoding,
                got: encoding,
            });
        }
        if self.encoding.is_lossy() && len != self.reference.len() {
            return Err(LinkError::WrongLength {
                expected: self.reference.len(),
                got: len,
            });
        }
        Ok(())
    }
}

fn add_assign(a: &mut [f32], b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use proptest::prelude::*;

    fn round_trip(encoding: Encoding, values: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        encode_into(encoding, values, &mut bytes);
        assert_eq!(bytes.len() as u64, encoding.encoded_len(values.len()));
        decode(encoding, &bytes, values.len())
    }

    /// The largest error `encoding` may make on `v`, whose q8 block has max |.| `max`.
    fn bound(encoding: Encoding, v: f32, block_max: f32) -> f32 {
        match encoding {
            Encoding::F32 => 0.0,
            // Half an ulp of the significand, and half the spacing of subnormals.
            Encoding::F16 => v.abs() * 2f32.powi(-11) + 2f32.powi(-25),
            Encoding::Bf16 => v.abs() * 2f32.powi(-8),
            // Half a step, plus f32 rounding of the scale and the product.
            Encoding::Q8 => block_max / 127.0 * 0.5 * (1.0 + 1e-5) + v.abs() * 1e-6,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn every_encoding_round_trips_within_its_bound(
            values in proptest::collection::vec(-1000.0f32..1000.0, 0..300),
            tiny in proptest::collection::vec(-1e-6f32..1e-6, 0..70),
        ) {
            for values in [&values, &tiny] {
                for encoding in Encoding::ALL {
                    let back = round_trip(encoding, values);
                    prop_assert_eq!(back.len(), values.len());
                    for (block, back) in values.chunks(Q8_BLOCK).zip(back.chunks(Q8_BLOCK)) {
                        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        for (v, b) in block.iter().zip(back) {
                            let err = (v - b).abs();
                            prop_assert!(err <= bound(encoding, *v, max),
                                "{encoding}: {v} came back as {b} (error {err})");
                        }
                    }
                }
            }
        }

        #[test]
        fn decoding_any_bytes_of_the_right_length_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            for encoding in Encoding::ALL {
                // The largest count whose encoding fits, then exactly that many bytes.
                let count = (0..=bytes.len()).rev()
                    .find(|&n| encoding.encoded_len(n) <= bytes.len() as u64).unwrap();
                let len = encoding.encoded_len(count) as usize;
                let _ = decode(encoding, &bytes[..len], count);
            }
        }
    }

    #[test]
    fn non_finite_values_stay_non_finite_and_f16_saturates() {
        for encoding in Encoding::ALL {
            let back = round_trip(encoding, &[1.0, f32::NAN, 2.0, f32::INFINITY]);
            assert!(back[1].is_nan() || back[1].is_infinite(), "{encoding}");
            assert!(!back[3].is_finite(), "{encoding}");
        }
        assert_eq!(round_trip(Encoding::F16, &[1e6, -1e6]), [65504.0, -65504.0]);
        assert_eq!(round_trip(Encoding::Q8, &[0.0; 5]), [0.0; 5]);
    }

    #[test]
    fn q8_is_at_least_three_and_a_half_times_smaller_than_f32() {
        for n in [1usize, 63, 64, 65, 351_146] {
            let ratio = Encoding::F32.encoded_len(n) as f64 / Encoding::Q8.encoded_len(n) as f64;
            assert!(n < 64 || ratio >= 3.5, "{n}: {ratio}");
        }
        assert_eq!("bf16".parse::<Encoding>(), Ok(Encoding::Bf16));
        assert!("int4".parse::<Encoding>().unwrap_err().contains("q8"));
        for e in Encoding::ALL {
            assert_eq!(Encoding::from_code(e.code()), Some(e));
        }
        assert_eq!(Encoding::from_code(9), None);
    }

    fn noise(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Runs `syncs` elastic exchanges through a worker link and a server link, as
    /// the two ends do; returns (worker params, the server's view of them, the sum of
    /// differences the center added, the sum the worker subtracted).
    fn exchanges(encoding: Encoding, syncs: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = 1000;
        let mut rng = SplitMix64::new(7);
        let start = noise(&mut rng, n, 0.1);
        let mut worker = Link::new(encoding, &start);
        let mut server = Link::new(encoding, &start);
        let mut x = start.clone();
        let mut seen = Vec::new();
        let (mut added, mut subtracted) = (vec![0.0f64; n], vec![0.0f64; n]);
        for _ in 0..syncs {
            // τ local steps move xⁱ a little.
            for (x, d) in x.iter_mut().zip(noise(&mut rng, n, 0.01)) {
                *x += d;
            }
            let sent = worker.params_payload(&x);
            let decoded = round_trip(encoding, &sent);
            worker.sent(&decoded);
            seen = server.receive_params(encoding, decoded).unwrap();
            // The server's elastic difference, d = α(xⁱ − x̃), with x̃ = 0 here.
            let d: Vec<f32> = seen.iter().map(|v| 0.05 * v).collect();
            for (a, d) in added.iter_mut().zip(&d) {
                *a += f64::from(*d);
            }
            let values = server.reply_payload(Apply::Subtract, &d);
            let decoded = round_trip(encoding, &values);
            server.replied(Apply::Subtract, &values, &decoded);
            let got = worker
                .receive_reply(Apply::Subtract, encoding, decoded)
                .unwrap();
            for ((x, s), g) in x.iter_mut().zip(subtracted.iter_mut()).zip(&got) {
                *x -= g;
                *s += f64::from(*g);
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        (x, seen, f(added), f(subtracted))
    }

    #[test]
    fn lossy_links_do_not_accumulate_error_over_many_syncs() {
        for encoding in Encoding::ALL {
            let (x, seen, added, subtracted) = exchanges(encoding, 500);
            // The server's view of xⁱ is one quantisation step from the truth (taken
            // before the reply was applied, so compare with the reply added back).
            let max = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max)
            };
            let x_before: Vec<f32> = x.iter().map(|v| v / 0.95).collect();
            let view = max(&x_before, &seen);
            // What the worker subtracted equals what the center added, up to one step.
            let owed = max(&added, &subtracted);
            let limit = if encoding.is_lossy() { 2e-3 } else { 1e-5 };
            assert!(view < limit, "{encoding}: server's view off by {view}");
            assert!(owed < limit, "{encoding}: elastic sums differ by {owed}");
        }
        // Without the residual and the reference, q8's error would grow with the
        // syncs; with them, 5000 syncs are no worse than 500.
        let (_, _, a500, s500) = exchanges(Encoding::Q8, 500);
        let (_, _, a5000, s5000) = exchanges(Encoding::Q8, 5000);
        let gap = |a: &[f32], s: &[f32]| a.iter().zip(s).map(|(a, s)| (a - s).abs()).sum::<f32>();
        assert!(gap(&a5000, &s5000) < 3.0 * gap(&a500, &s500).max(1e-3));
    }

    #[test]
    fn replace_and_pull_toward_reconstruct_the_same_values_at_both_ends() {
        let mut rng = SplitMix64::new(3);
        let start = noise(&mut rng, 200, 1.0);
        for encoding in Encoding::ALL {
            let mut worker = Link::new(encoding, &start);
            let mut server = Link::new(encoding, &start);
            for apply in [Apply::Replace, Apply::PullToward, Apply::Replace] {
                let target = noise(&mut rng, 200, 1.0);
                let values = server.reply_payload(apply, &target);
                let decoded = round_trip(encoding, &values);
                let at_server = server.replied(apply, &values, &decoded);
                let at_worker = worker.receive_reply(apply, encoding, decoded).unwrap();
                assert_eq!(at_server, at_worker, "{encoding} {apply:?}");
                let err = target
                    .iter()
                    .zip(&at_worker)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 0.02, "{encoding} {apply:?}: {err}");
            }
            assert_eq!(worker.reference, server.reference);
        }
    }

    #[test]
    fn a_frame_in_another_encoding_or_length_is_refused() {
        let mut link = Link::new(Encoding::Q8, &[0.0; 4]);
        assert_eq!(
            link.receive_params(Encoding::F32, vec![0.0; 4]),
            Err(LinkError::WrongEncoding {
                expected: Encoding::Q8,
                got: Encoding::F32
            })
        );
        assert!(matches!(
            link.receive_params(Encoding::Q8, vec![0.0; 3]),
            Err(LinkError::WrongLength { .. })
        ));
    }
}
