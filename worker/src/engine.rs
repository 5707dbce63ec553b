//! What a session of the worker protocol drives: a worker's compute thread
//! ([`Compute`]), or a relay's own center (the relay crate). The session loop in
//! `client.rs` — connect, hello, welcome, shard, exchange every τ, reconnect — is
//! the same for both.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tether_shared::local::ShardData;
use tether_shared::protocol::{Hyper, RunSpec, Shard, WorkerKind};

use crate::compute::{Compute, Mailbox, Reply, Timed};

/// The parameters a session exchanges, and what produces them between exchanges.
pub trait Engine: Sync {
    /// Prepares a session from a welcome: the run, this participant's shard and
    /// data, the center, and whether to keep its own parameters (a rejoin).
    fn start(
        &self,
        spec: RunSpec,
        shard: Shard,
        data: ShardData,
        center: Vec<f32>,
        keep: bool,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Produces the next parameters to send: up to `steps` local steps at the
    /// current `hyper` (fewer if `stop` is raised), applying a reply put in
    /// `mailbox` meanwhile. At least one step unless stopped: none ends the session.
    fn train(
        &self,
        steps: u32,
        hyper: Hyper,
        stop: Arc<AtomicBool>,
        mailbox: Mailbox,
    ) -> impl Future<Output = Result<Timed, String>> + Send;

    /// Applies a reply; returns the parameters as they are now.
    fn apply(&self, reply: Reply) -> impl Future<Output = Result<Vec<f32>, String>> + Send;

    /// Training workers this participant stands for (a relay's tree below it);
    /// 0 for a worker.
    fn members(&self) -> u32 {
        0
    }
}

impl Engine for Compute {
    fn start(
        &self,
        spec: RunSpec,
        shard: Shard,
        data: ShardData,
        center: Vec<f32>,
        keep: bool,
    ) -> impl Future<Output = Result<(), String>> + Send {
        Compute::start(self, spec, shard, data, center, keep)
    }

    fn train(
        &self,
        steps: u32,
        hyper: Hyper,
        stop: Arc<AtomicBool>,
        mailbox: Mailbox,
    ) -> impl Future<Output = Result<Timed, String>> + Send {
        Compute::train(self, steps, hyper.lr, stop, mailbox)
    }

    fn apply(&self, reply: Reply) -> impl Future<Output = Result<Vec<f32>, String>> + Send {
        Compute::apply(self, reply)
    }
}

/// Who a participant says it is in its hello.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Native worker, or relay.
    pub kind: WorkerKind,
    /// Compute backend ("cpu", "wgpu"; "relay").
    pub backend: String,
    /// The device in words.
    pub device: String,
    /// CPU threads it trains with (0 on a GPU or for a relay).
    pub threads: u32,
    /// A relay's own page for browsers.
    pub url: Option<String>,
}
