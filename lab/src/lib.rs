//! tether's experiments and benchmarks, everything behind `tether repro`, `demo` and
//! `bench` but the command line: a deterministic simulator that runs
//! p workers of any algorithm in virtual time ([`simulate`]), reusing the workers'
//! own training code (`tether_shared::local`) and the server's [`Center`]; the
//! paper's experiment grids over it ([`repro`]), with their figures ([`plot`]) and
//! the check that every cell exchanges often enough ([`exchanges`]); the
//! stability maps of the paper's round-robin analysis ([`stability`]); a whole run
//! in one process, a server and its workers on loopback ([`local`], the demo's and
//! the benchmarks'); the emulated network link they can run over ([`throttle`]); and
//! the benchmarks that run real processes: a server against a bare WebSocket echo
//! ([`server_bench`]), a relay tree against a flat run ([`tree_bench`]), and a data
//! set larger than the server's memory budget served from disk ([`data_bench`]).
//!
//! [`Center`]: tether_server::center::Center

pub mod data_bench;
pub mod exchanges;
pub mod local;
pub mod plot;
pub mod repro;
pub mod server_bench;
pub mod simulate;
pub mod stability;
pub mod throttle;
pub mod tree_bench;
