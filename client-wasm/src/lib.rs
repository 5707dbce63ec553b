//! tether's browser worker: trains in a Web Worker with the same model, algorithms
//! and protocol as the native worker, all from [`tether_shared`].
//!
//! Not built yet: issue #4 adds the wasm-bindgen entry points. CI already checks that
//! `tether-shared` compiles for `wasm32-unknown-unknown`.
