//! The server's settings: the run's hyper-parameters (saved with the run, so a resume
//! continues the same run) and the operational limits (timeouts, caps, checkpoints).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_shared::algorithms::Algorithm;
use tether_shared::algorithms::leader::LSGD_LAMBDA;
use tether_shared::codec::Encoding;
use tether_shared::data::Normalization;
use tether_shared::model::Model;
use tether_shared::protocol::{Hyper, RunSpec, Shard};
use thiserror::Error;

/// The paper's β = pα for elastic algorithms (SPEC.md).
pub const DEFAULT_BETA: f32 = 0.9;

/// What defines a run: saved in its directory as `run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Which algorithm.
    pub algorithm: Algorithm,
    /// Which network.
    pub model: Model,
    /// Local steps between synchronisations τ.
    pub tau: u32,
    /// Elastic moving rate α (EASGD, EAMSGD, synchronous EASGD). Averaging uses 1/p
    /// per round; DOWNPOUR, MDOWNPOUR, DiLoCo and LSGD have no elastic force.
    pub alpha: f32,
    /// How many workers the run expects: the number of data shards, and p in α = β/p.
    pub expected_workers: u32,
    /// Local learning rate η.
    pub lr: f64,
    /// Momentum δ: applied on the server for MDOWNPOUR, as local Nesterov momentum
    /// for every other algorithm (0 = plain SGD).
    pub momentum: f64,
    /// L2 weight decay of the local optimizer.
    pub weight_decay: f64,
    /// Images per local step.
    pub batch: u32,
    /// Seeds the initial center and the shards.
    pub seed: u64,
}

impl RunSettings {
    /// The built-in settings for `algorithm`: small model, τ = 16, 4 expected workers,
    /// β = 0.9 (α = 0.225) for elastic algorithms, Nesterov δ = 0.9 with η = 0.05 for
    /// EAMSGD, plain SGD with η = 0.1 for the others, but MDOWNPOUR: plain SGD with
    /// η = 0.0025 on the workers and δ = 0.9 on the server, whose momentum multiplies
    /// every push about tenfold (η 0.01 and up sat at chance from τ = 4 on; how the
    /// value was chosen is in REPRODUCTION.md).
    pub fn defaults(algorithm: Algorithm) -> Self {
        let expected_workers = 4;
        let momentum = match algorithm {
            Algorithm::Eamsgd | Algorithm::Mdownpour => 0.9,
            _ => 0.0,
        };
        Self {
            algorithm,
            model: Model::small(),
            tau: 16,
            alpha: if has_elastic_force(algorithm) {
                DEFAULT_BETA / expected_workers as f32
            } else {
                0.0
            },
            expected_workers,
            lr: match algorithm {
                Algorithm::Eamsgd => 0.05,
                Algorithm::Mdownpour => MDOWNPOUR_LR,
                _ => 0.1,
            },
            momentum,
            weight_decay: 1e-4,
            batch: 128,
            seed: 0,
        }
    }

    /// Whether workers run local momentum (every algorithm but MDOWNPOUR, whose
    /// momentum lives on the server).
    pub fn local_momentum(&self) -> f64 {
        if self.algorithm == Algorithm::Mdownpour {
            0.0
        } else {
            self.momentum
        }
    }

    /// τ, α and η as the center and the workers take them.
    pub fn hyper(&self) -> Hyper {
        Hyper {
            tau: self.tau,
            alpha: self.alpha,
            lr: self.lr,
        }
    }

    /// What a worker must agree with to join this run: `run_id`, and the training
    /// set's size and normalisation.
    pub fn spec(&self, run_id: String, normalization: Normalization, train_items: u64) -> RunSpec {
        RunSpec {
            run_id,
            algorithm: self.algorithm,
            model: self.model.clone(),
            hyper: self.hyper(),
            momentum: self.local_momentum(),
            nesterov: self.local_momentum() > 0.0,
            weight_decay: self.weight_decay,
            batch: self.batch,
            leader_pull: self.leader_pull(),
            normalization,
            train_items,
        }
    }

    /// LSGD's pull toward the leader λ (0 for other algorithms).
    pub fn leader_pull(&self) -> f32 {
        if self.algorithm == Algorithm::Lsgd {
            LSGD_LAMBDA
        } else {
            0.0
        }
    }

    /// Checks every setting, so a bad flag fails before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if !(1..=MAX_TAU).contains(&self.tau) {
            return bad(format!("--tau must be in 1..={MAX_TAU}, got {}", self.tau));
        }
        if !(1..=MAX_EXPECTED_WORKERS).contains(&self.expected_workers) {
            return bad(format!(
                "--expected-workers must be in 1..={MAX_EXPECTED_WORKERS}, got {}",
                self.expected_workers
            ));
        }
        if has_elastic_force(self.algorithm) {
            if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= MAX_ALPHA) {
                return bad(format!(
                    "--alpha must be in (0, {MAX_ALPHA}], got {}",
                    self.alpha
                ));
            }
        } else if self.alpha != 0.0 {
            return bad(format!(
                "{} has no elastic force; --alpha / --beta do not apply",
                self.algorithm.name()
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= MAX_LR) {
            return bad(format!("--lr must be in (0, {MAX_LR}], got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!(
                "--momentum must be in [0, 1), got {}",
                self.momentum
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be ≥ 0, got {}",
                self.weight_decay
            ));
        }
        if self.weight_decay > MAX_WEIGHT_DECAY {
            return bad(format!(
                "--weight-decay must be at most {MAX_WEIGHT_DECAY}, got {}",
                self.weight_decay
            ));
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return bad(format!(
                "--batch must be in 1..={MAX_BATCH}, got {}",
                self.batch
            ));
        }
        let per_image = self.model.spec().tally.activations;
        let limit = tether_shared::local::MAX_STEP_VALUES;
        if per_image.saturating_mul(self.batch as usize) > limit {
            return bad(format!(
                "--batch {} of the {} model keeps {per_image} values per image, more than \
                 the {limit} a worker gives one step: use --batch {} or less",
                self.batch,
                self.model.name(),
                limit / per_image.max(1)
            ));
        }
        Ok(())
    }
}

/// The sane ranges of a run's settings, at start-up and for the operator's runtime
/// changes alike. α above 0.99 leaves a worker no room to explore (every exchange
/// moves it nearly onto the center); a learning rate above 10 diverges for every
/// model here; a period longer than 10 000 steps is no longer a parallel run.
pub const MAX_ALPHA: f32 = 0.99;
/// See [`MAX_ALPHA`].
pub const MAX_LR: f64 = 10.0;
/// See [`MAX_ALPHA`].
pub const MAX_TAU: u32 = 10_000;
/// MDOWNPOUR's default local η: the best of {0.001, 0.0025, 0.005} at τ 1 and 4
/// (REPRODUCTION.md); 0.005 lost one seed of two at τ 4.
pub const MDOWNPOUR_LR: f64 = 0.0025;
/// See [`MAX_ALPHA`].
pub const MAX_BATCH: u32 = 65_536;
/// See [`MAX_ALPHA`].
pub const MAX_WEIGHT_DECAY: f64 = 1.0;
/// See [`MAX_ALPHA`].
pub const MAX_EXPECTED_WORKERS: u32 = 1_000_000;
/// When a run is over: the first of these that holds ends it (none set: it runs
/// until stopped).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Finish {
    /// Training images workers reported, in total.
    pub max_samples: Option<u64>,
    /// Run time: time served, counted across resumes.
    pub max_time: Option<Duration>,
    /// Test accuracy of the center (0..1) at an evaluation.
    pub target_accuracy: Option<f64>,
}

/// The largest loss-screen batch (one forward pass over it per update).
pub const MAX_SCREEN_BATCH: usize = 8192;
/// Largest `--max-connections`.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Whether `algorithm` exchanges through the elastic force α(xⁱ − x̃).
pub fn has_elastic_force(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::Easgd | Algorithm::Eamsgd | Algorithm::EasgdSync
    )
}

/// Whether `algorithm` synchronises in rounds behind a barrier.
pub fn is_synchronous(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::EasgdSync | Algorithm::Average | Algorithm::Diloco
    )
}

/// The network a run trains, at a glance.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkSummary {
    /// Its name.
    pub name: String,
    /// SHA-256 of its canonical description.
    pub sha256: String,
    /// Trainable parameters.
    pub params: usize,
    /// The images it takes: channels, height, width.
    pub input: [usize; 3],
    /// Classes it scores.
    pub classes: usize,
}

impl NetworkSummary {
    /// The summary of `model`.
    pub fn of(model: &Model) -> Self {
        Self {
            name: model.name().to_owned(),
            sha256: model.sha256().to_owned(),
            params: model.param_count(),
            input: model.data_shape(),
            classes: model.classes(),
        }
    }
}

/// A setting out of range.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid setting: {0}")]
pub struct ConfigError(pub String);

/// Bytes of packed training images a server holds in memory by default (4 GiB).
pub const DEFAULT_DATA_MEMORY: u64 = 4 << 30;

/// Everything `tether serve` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The run's hyper-parameters.
    pub run: RunSettings,
    /// The data set's folder (IDX, CIFAR-10, an image folder or a packed set;
    /// `None`: the shipped Fashion-MNIST).
    pub data: Option<PathBuf>,
    /// A packed training set larger than this many bytes is served from disk.
    pub data_memory: u64,
    /// Where checkpoints go (`None`: `./runs/<run-id>`).
    pub run_dir: Option<PathBuf>,
    /// Load the newest valid checkpoint of `run_dir` and continue from it.
    pub resume: bool,
    /// Seconds between periodic checkpoints (`None`: only at shutdown).
    pub checkpoint_every: Option<Duration>,
    /// Checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Token for operator actions (the dashboard's controls send it as
    /// `Authorization: Bearer …`); none: the controls are off.
    pub admin_token: Option<String>,
    /// Origins besides the server's own whose pages may join browser workers
    /// (e.g. `https://lab.example.org` behind a proxy).
    pub allowed_origins: Vec<String>,
    /// Token every worker's hello must carry, if set.
    pub worker_token: Option<String>,
    /// Cap on concurrently connected workers.
    pub max_workers: u32,
    /// Cap on open TCP connections of every kind (pages, feeds, workers, requests
    /// in flight); one more is closed at once.
    pub max_connections: usize,
    /// Cap on open connections from one IPv4 address or IPv6 /64.
    pub max_connections_per_address: usize,
    /// Time an HTTP request gets to arrive (headers and body) and be answered; a
    /// kept-alive connection idle this long is closed.
    pub request_timeout: Duration,
    /// Time a new connection has to send its hello.
    pub handshake_timeout: Duration,
    /// A worker silent for this long is dropped.
    pub idle_timeout: Duration,
    /// A synchronous round waits this long for laggards, then goes on without them.
    pub barrier_timeout: Duration,
    /// Longest one send to a client may take; a client that reads slower is dropped
    /// (it never holds its seat, its task or its memory past this).
    pub send_timeout: Duration,
    /// Largest accepted staleness (center versions since the worker's last look).
    pub max_staleness: u64,
    /// An update whose norm exceeds this multiple of the run's typical norm is rejected.
    pub max_update_ratio: f64,
    /// Training images in the loss screen's secret batch ([`crate::screen`]); 0 turns
    /// the screen off (every update that passes the norm guard moves x̃).
    pub screen_batch: usize,
    /// Seconds between evaluations of the center (`None`: never in the background).
    pub eval_every: Option<Duration>,
    /// Evaluate on only the first N test images.
    pub eval_limit: Option<usize>,
    /// When the run is over (`serve` then tells workers, checkpoints and reports).
    pub finish: Finish,
    /// Time workers get to say goodbye at shutdown.
    pub drain_timeout: Duration,
    /// The payload encoding every session uses, when the operator forces one
    /// (`None`: the algorithm's default, [`default_encoding`]).
    pub encoding: Option<Encoding>,
    /// Serve HTTPS/WSS with this configuration (`None`: plain HTTP).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The names this server answers to (besides its addresses): a page it serves
    /// under another name is refused unless `allowed_origins` lists it (DNS
    /// rebinding). Default: `localhost` and the host name.
    pub host_names: Vec<String>,
    /// The token a relay presents to be trusted with volunteers: its page is shown
    /// on the dashboard and handed to joining browsers (`GET /api/relay`). Without
    /// it relays join like workers and their pages are ignored.
    pub relay_token: Option<String>,
    /// Set when this server is a relay: what it serves is a part of its upstream's
    /// run, so it keeps no checkpoints and writes no report (the root holds the run).
    pub relay: Option<RelayRole>,
}

/// A relay's place in the tree.
#[derive(Clone, Debug)]
pub struct RelayRole {
    /// The upstream it syncs with, as given (for the status page).
    pub upstream: String,
    /// Its own shard of the upstream's cut: its workers get slices of it.
    pub within: Shard,
}

/// The payload encoding a run uses unless the operator says otherwise. Every
/// algorithm's payloads are differences from a reference both ends hold (see
/// `tether_shared::codec`), which 8-bit blocks carry within 0.4 % of their largest
/// value and error feedback keeps from adding up. Synchronous rounds replace every
/// member's parameters with the round's result, so they get f16's finer steps.
pub fn default_encoding(algorithm: Algorithm) -> Encoding {
    match algorithm {
        Algorithm::EasgdSync | Algorithm::Average => Encoding::F16,
        _ => Encoding::Q8,
    }
}

impl ServerConfig {
    /// Operational defaults around `run`.
    pub fn new(run: RunSettings) -> Self {
        Self {
            run,
            data: None,
            run_dir: None,
            resume: false,
            checkpoint_every: Some(Duration::from_secs(60)),
            keep_checkpoints: 5,
            admin_token: None,
            allowed_origins: Vec::new(),
            worker_token: None,
            max_workers: 64,
            max_connections: 512,
            max_connections_per_address: 128,
            request_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            barrier_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            max_staleness: 1024,
            max_update_ratio: 10.0,
            screen_batch: 64,
            eval_every: Some(Duration::from_secs(15)),
            eval_limit: None,
            data_memory: DEFAULT_DATA_MEMORY,
            drain_timeout: Duration::from_secs(5),
            encoding: None,
            tls: None,
            finish: Finish::default(),
            host_names: crate::tls::host_names([0, 0, 0, 0].into(), &[]),
            relay_token: None,
            relay: None,
        }
    }

    /// The encoding for a worker that accepts `accepted`: the forced or default
    /// one if it can, else f32 (which every worker reads).
    pub fn encoding_for(&self, accepted: &[Encoding]) -> Encoding {
        let wanted = self
            .encoding
            .unwrap_or_else(|| default_encoding(self.run.algorithm));
        if accepted.contains(&wanted) {
            wanted
        } else {
            Encoding::F32
        }
    }

    /// Checks the run and the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        let bad = |m: &str| Err(ConfigError(m.into()));
        if self.keep_checkpoints == 0 {
            return bad("--keep-checkpoints must be at least 1");
        }
        if self.max_workers == 0 {
            return bad("--max-workers must be at least 1");
        }
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS {
            return bad("--max-connections must be in 1..=1000000");
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_address) {
            return bad("--max-connections-per-address must be in 1..=--max-connections");
        }
        if self.request_timeout.is_zero() {
            return bad("--request-timeout must be positive");
        }
        if !(self.max_update_ratio.is_finite() && self.max_update_ratio > 1.0) {
            return bad("--max-update-ratio must be above 1");
        }
        if self.finish.target_accuracy.is_some() && self.eval_every.is_none() {
            return bad("--target-accuracy needs evaluations (--eval-every above 0)");
        }
        if self
            .finish
            .target_accuracy
            .is_some_and(|a| !(a > 0.0 && a <= 1.0))
        {
            return bad("--target-accuracy must be a fraction in (0, 1]");
        }
        if self.finish.max_samples == Some(0) || self.finish.max_time.is_some_and(|t| t.is_zero()) {
            return bad("--max-samples and --max-time must be above 0");
        }
        if self.screen_batch > MAX_SCREEN_BATCH {
            return bad("--screen-batch must be at most 8192");
        }
        if self.checkpoint_every.is_some_and(|d| d.is_zero())
            || self.eval_every.is_some_and(|d| d.is_zero())
        {
            return bad("intervals must be positive");
        }
        if self.eval_limit == Some(0) {
            return bad("--eval-limit must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_for_every_algorithm() {
        for a in [
            Algorithm::Easgd,
            Algorithm::EasgdSync,
            Algorithm::Eamsgd,
            Algorithm::Downpour,
            Algorithm::Mdownpour,
            Algorithm::Average,
            Algorithm::Diloco,
            Algorithm::Lsgd,
        ] {
            RunSettings::defaults(a).validate().unwrap();
        }
        assert_eq!(RunSettings::defaults(Algorithm::Eamsgd).alpha, 0.225);
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = RunSettings::defaults(Algorithm::Eamsgd);
        for bad in [
            RunSettings {
                tau: 0,
                ..ok.clone()
            },
            RunSettings {
                alpha: 1.5,
                ..ok.clone()
            },
            RunSettings {
                alpha: f32::NAN,
                ..ok.clone()
            },
            RunSettings {
                lr: -1.0,
                ..ok.clone()
            },
            // Found by a probe of the operator's controls: both were accepted.
            RunSettings {
                lr: 1e308,
                ..ok.clone()
            },
            RunSettings {
                alpha: 0.999_999_9,
                ..ok.clone()
            },
            RunSettings {
                tau: u32::MAX,
                ..ok.clone()
            },
            RunSettings {
                weight_decay: 1e30,
                ..ok.clone()
            },
            RunSettings {
                momentum: 1.0,
                ..ok.clone()
            },
            RunSettings {
                batch: 0,
                ..ok.clone()
            },
            RunSettings {
                alpha: 0.1,
                ..RunSettings::defaults(Algorithm::Downpour)
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
