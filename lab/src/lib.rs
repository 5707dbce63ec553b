//! tether's experiments, away from the network: a deterministic simulator that runs
//! p workers of any algorithm in virtual time ([`simulate`]), reusing the workers'
//! own training code (`tether_shared::local`) and the server's [`Center`]; the
//! paper's experiment grids over it ([`repro`]), with their figures ([`plot`]); the
//! stability maps of the paper's round-robin analysis ([`stability`]); and the
//! emulated network link the benchmarks and the demo run over ([`throttle`]).
//!
//! [`Center`]: tether_server::center::Center

pub mod plot;
pub mod repro;
pub mod simulate;
pub mod stability;
pub mod throttle;
