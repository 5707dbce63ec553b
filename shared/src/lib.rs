//! tether's core, shared by the server, the native worker and the browser worker.
//!
//! Everything here is pure computation over memory — no files, sockets or threads
//! of its own — so the crate builds for `wasm32-unknown-unknown` as well as natively.
//!
//! - [`algorithms`]: the update rules of the EASGD family on flat `f32` slices.
//! - [`model`]: the Burn networks and their flat parameter view.
//! - [`protocol`]: the worker ↔ server frames and their binary encoding.
//! - [`codec`]: payload encodings (f32, f16, bf16, 8-bit) and the error feedback that keeps them honest.
//! - [`data`]: IDX and CIFAR-10 parsing, sharding, batching, normalisation.
//! - [`train`]: one local training step and evaluation, identical on every worker.
//! - [`local`]: a worker's side of a session (shard, τ steps, applying replies), native or browser.
//! - [`stability`]: the paper's 1-D stability analysis (spectral radii).
//! - [`rng`]: a small deterministic generator, so shards and shuffles are reproducible everywhere.

pub mod algorithms;
pub mod codec;
pub mod data;
pub mod local;
pub mod model;
pub mod protocol;
pub mod rng;
pub mod stability;
pub mod train;
