//! tether's native worker library: picks the compute device, reaches servers (TLS,
//! shard downloads),
//! runs the single-node trainer that every distributed run is compared with, and
//! measures training and exchange speed.
//!
//! The `tether` binary is a thin CLI over this crate.

pub mod backend;
pub mod bench;
pub mod client;
pub mod compute;
pub mod connect;
mod download;
pub mod engine;
pub mod prefetch;
pub mod progress;
pub mod train;
