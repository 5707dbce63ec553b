//! tether's browser worker: trains in a Web Worker with the same model, algorithms
//! and protocol as the native worker, all from [`tether_shared`].
//!
//! - [`volunteer`]: the protocol state and local training, browser-free (tested natively).
//! - `bindings` (wasm32 only): the wasm-bindgen surface `web/worker.js` drives;
//!   it chooses WebGPU or the CPU and reads results back asynchronously.
//!
//! Built by `cargo xtask web` into `web/pkg/` (see ARCHITECTURE.md).

pub mod volunteer;

#[cfg(target_arch = "wasm32")]
mod bindings;
