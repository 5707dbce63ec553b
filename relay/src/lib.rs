//! `tether relay`: hierarchical elastic averaging. A relay is a server for its own
//! workers (the same protocol, dashboard, rejections, guards and loss screen as a
//! root) and a worker of its upstream: it keeps an intermediate center x̃ᵣ, and
//! after every τ_up updates its own workers made to x̃ᵣ it exchanges an elastic
//! update with the upstream exactly as a worker exchanges xⁱ — x̃ᵣ is its
//! "parameters". Relays nest (an upstream may be a relay).
//!
//! The upstream side is the worker's session loop (`tether_worker::client`) around
//! a [`RelayEngine`] in place of a training device: `train` waits for τ_up worker
//! updates, `apply` moves x̃ᵣ through the relay's [`tether_server::center::Center`]
//! (its only writer). The relay serves from its first welcome on (it needs the
//! run's settings and center); when the upstream goes away it keeps serving and
//! rejoins with its own center (a rejoin keeps it, as any elastic worker's).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tether_server::config::{DEFAULT_BETA, has_elastic_force};
use tether_server::{AppState, RelayRole, RunData, Server, ServerConfig, ServerError};
use tether_shared::local::{ShardData, Trained};
use tether_shared::protocol::{Apply, Hyper, RunSpec, Shard, StopReason, WorkerKind};
use tether_worker::client::{self, WorkConfig, WorkError, WorkReport};
use tether_worker::compute::{Mailbox, Reply, Timed};
use tether_worker::engine::{Engine, Identity};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How a relay runs.
pub struct RelayConfig {
    /// Its own server's settings (ports, tokens, caps, timeouts, screen, TLS). The
    /// run's settings and its place in the tree are filled in from the upstream's
    /// welcome.
    pub server: ServerConfig,
    /// Its upstream session: the upstream's URL, CA, token; never gives up once
    /// connected.
    pub upstream: WorkConfig,
    /// Updates of its own workers between exchanges with the upstream (τ_up).
    pub tau_up: u32,
    /// Longest wait between exchanges, even with no update (a relay without
    /// workers still follows the upstream's center and shows in its status).
    pub max_wait: Duration,
    /// The elastic rate α of its own workers (default: β 0.9 over the workers it
    /// expects, as `tether serve` sets it; the upstream's α for algorithms without
    /// an elastic force).
    pub alpha: Option<f32>,
    /// Its own page, given to the upstream so volunteers can be sent here.
    pub public_url: Option<String>,
    /// The run's data on this machine.
    pub data: RelayData,
}

/// The run's data on a relay's machine.
pub enum RelayData {
    /// Read already (IDX, CIFAR-10, a packed set): the upstream session and the
    /// relay's server share its training set, one copy in memory.
    Loaded(RunData),
    /// An image folder, decoded (or found packed in the cache) for the network the
    /// upstream's welcome describes, by the upstream session and by the server.
    Folder {
        /// The folder.
        dir: PathBuf,
        /// Test images the relay's dashboard scores on.
        eval_limit: Option<usize>,
    },
}

/// Why a relay stopped with an error.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The upstream session failed for good.
    #[error(transparent)]
    Upstream(#[from] WorkError),
    /// Its own server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// What a relay did.
#[derive(Debug)]
pub struct RelaySummary {
    /// The upstream session's report (exchanges, bytes, reconnects).
    pub upstream: WorkReport,
    /// Its own workers' accepted updates.
    pub syncs: u64,
}

/// Counters at the last exchange with the upstream.
#[derive(Clone, Copy, Default)]
struct Mark {
    syncs: u64,
    samples: u64,
}

/// What the relay's server starts from on the first welcome.
struct Unstarted {
    config: ServerConfig,
    listener: TcpListener,
    data: RelayData,
}

/// The relay as the session loop's engine: its own server's center in place of a
/// device.
pub struct RelayEngine {
    /// Taken on the first welcome.
    pending: Mutex<Option<Unstarted>>,
    state: Mutex<Option<AppState>>,
    serving: Mutex<Option<JoinHandle<Result<tether_server::Summary, ServerError>>>>,
    stop_server: watch::Sender<Option<StopReason>>,
    upstream: String,
    tau_up: u32,
    max_wait: Duration,
    alpha: Option<f32>,
    mark: Mutex<Mark>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RelayEngine {
    fn state(&self) -> Result<AppState, String> {
        lock(&self.state)
            .clone()
            .ok_or_else(|| "the relay has not joined its upstream yet".to_string())
    }

    /// Starts serving the upstream's run on the first welcome.
    fn serve(&self, spec: RunSpec, shard: Shard, center: Vec<f32>) -> Result<AppState, String> {
        let Unstarted {
            mut config,
            listener,
            data,
        } = lock(&self.pending)
            .take()
            .ok_or_else(|| "the relay's server could not start before".to_string())?;
        config.run.algorithm = spec.algorithm;
        config.run.model = spec.model.clone();
        config.run.tau = spec.hyper.tau;
        config.run.lr = spec.hyper.lr;
        // Its own workers' α: as `tether serve` sets it, β 0.9 over the workers it
        // expects (the upstream's α is tuned to the upstream's members, not these).
        config.run.alpha = self.alpha.unwrap_or(if has_elastic_force(spec.algorithm) {
            DEFAULT_BETA / config.run.expected_workers as f32
        } else {
            spec.hyper.alpha
        });
        config.run.batch = spec.batch;
        config.run.weight_decay = spec.weight_decay;
        config.run.seed = shard.seed;
        config.relay = Some(RelayRole {
            upstream: self.upstream.clone(),
            within: shard,
        });
        let mut spec = spec;
        spec.hyper.alpha = config.run.alpha;
        let data = match data {
            RelayData::Loaded(d) => d,
            RelayData::Folder { dir, eval_limit } => {
                let shape = Some(spec.model.data_shape());
                let (_, d) =
                    tether_dataset::load_for(Some(&dir), shape).map_err(|e| e.to_string())?;
                RunData::new(d, eval_limit)
            }
        };
        let server = Server::relay(config, spec, center, data).map_err(|e| e.to_string())?;
        let state = server.state().clone();
        let mut stop = self.stop_server.subscribe();
        let task = tokio::spawn(server.serve(listener, async move {
            match stop.wait_for(Option::is_some).await {
                Ok(reason) => reason.unwrap_or(StopReason::ShuttingDown),
                Err(_) => StopReason::ShuttingDown,
            }
        }));
        *lock(&self.serving) = Some(task);
        *lock(&self.state) = Some(state.clone());
        Ok(state)
    }

    fn counters(state: &AppState) -> Mark {
        Mark {
            syncs: state.metrics.syncs.load(Ordering::Relaxed),
            samples: state.metrics.samples.load(Ordering::Relaxed),
        }
    }

    /// Mean last reported loss of the relay's own workers (NaN if none has one).
    fn mean_loss(state: &AppState) -> f32 {
        let losses: Vec<f64> = state
            .workers()
            .status()
            .iter()
            .map(|w| w.loss)
            .filter(|l| l.is_finite())
            .collect();
        if losses.is_empty() {
            f32::NAN
        } else {
            (losses.iter().sum::<f64>() / losses.len() as f64) as f32
        }
    }

    fn apply_reply(state: &AppState, reply: &Reply) -> Result<Vec<f32>, String> {
        let sent = (!reply.sent.is_empty()).then_some(reply.sent.as_slice());
        let mut center = state.center();
        center
            .apply_upstream(reply.apply, &reply.values, reply.lambda, sent)
            .map_err(|e| format!("the upstream's reply cannot be applied: {e}"))?;
        Ok(center.params().to_vec())
    }
}

impl Engine for RelayEngine {
    async fn start(
        &self,
        spec: RunSpec,
        shard: Shard,
        _data: ShardData,
        center: Vec<f32>,
        keep: bool,
    ) -> Result<(), String> {
        let existing = lock(&self.state).clone();
        let state = match existing {
            None => self.serve(spec, shard, center)?,
            Some(state) => {
                if state.spec.run_id != spec.run_id {
                    return Err(format!(
                        "the upstream now serves another run ({}, was {}); restart the relay to serve it",
                        spec.run_id, state.spec.run_id
                    ));
                }
                if !keep {
                    // The upstream did not keep this relay's place: start again
                    // from its center.
                    state
                        .center()
                        .apply_upstream(Apply::Replace, &center, 0.0, None)
                        .map_err(|e| e.to_string())?;
                    tracing::info!("relay center reset to the upstream's");
                }
                if state.config.relay.as_ref().map(|r| r.within) != Some(shard) {
                    tracing::warn!(
                        shard = format!("{}/{}", shard.index, shard.count),
                        "the upstream gave this relay another shard; its workers keep their slices of the first one until they rejoin"
                    );
                }
                state
            }
        };
        *lock(&self.mark) = Self::counters(&state);
        Ok(())
    }

    async fn train(
        &self,
        _steps: u32,
        hyper: Hyper,
        stop: Arc<AtomicBool>,
        mailbox: Mailbox,
    ) -> Result<Timed, String> {
        let state = self.state()?;
        {
            // τ and η are the run's (the upstream's operator may change them); α
            // stays this relay's own. Changed as an operator's change is, so the
            // norm guard measures its workers' honest progress anew.
            let mut own = state.center().hyper();
            if (own.tau, own.lr) != (hyper.tau, hyper.lr) {
                own.tau = hyper.tau;
                own.lr = hyper.lr;
                state.set_hyper(own);
            }
        }
        let t0 = Instant::now();
        let before = *lock(&self.mark);
        let stopped = loop {
            if stop.load(Ordering::Relaxed) {
                break true;
            }
            let arrived = lock(&mailbox).take();
            if let Some(reply) = arrived {
                Self::apply_reply(&state, &reply)?;
            }
            let now = Self::counters(&state);
            if now.syncs - before.syncs >= u64::from(self.tau_up) || t0.elapsed() >= self.max_wait {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let now = Self::counters(&state);
        *lock(&self.mark) = now;
        let updates = (now.syncs - before.syncs).min(u64::from(u32::MAX)) as u32;
        let trained = Trained {
            params: state.center().params().to_vec(),
            // An exchange with no update of its own still counts one step: the
            // session loop ends on a chunk of none.
            steps: if stopped { updates } else { updates.max(1) },
            samples: now.samples - before.samples,
            loss: Self::mean_loss(&state),
        };
        Ok((trained, t0.elapsed().as_secs_f64()))
    }

    async fn apply(&self, reply: Reply) -> Result<Vec<f32>, String> {
        Self::apply_reply(&self.state()?, &reply)
    }

    fn members(&self) -> u32 {
        lock(&self.state).as_ref().map_or(0, |s| {
            tether_server::state::subtree_workers(&s.workers().status()).min(u64::from(u32::MAX))
                as u32
        })
    }
}

/// Joins the upstream, serves the run on `listener` from the first welcome, and
/// relays until `stop` turns true, the run finishes (its workers are told so), or
/// the upstream refuses it for good.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    stop: watch::Receiver<bool>,
) -> Result<RelaySummary, RelayError> {
    let (stop_server, _) = watch::channel(None);
    let mut upstream = config.upstream;
    // The upstream session is handed its share of the same images, never downloads.
    match &config.data {
        RelayData::Loaded(d) => {
            upstream.preloaded = Some(d.train.whole().ok_or_else(|| {
                ServerError::Config(tether_server::config::ConfigError(
                    "a relay holds its data in memory".into(),
                ))
            })?);
        }
        RelayData::Folder { dir, .. } => upstream.data = Some(dir.clone()),
    }
    let engine = RelayEngine {
        pending: Mutex::new(Some(Unstarted {
            config: config.server,
            listener,
            data: config.data,
        })),
        state: Mutex::new(None),
        serving: Mutex::new(None),
        stop_server,
        upstream: upstream.server.clone(),
        tau_up: config.tau_up.max(1),
        max_wait: config.max_wait,
        alpha: config.alpha,
        mark: Mutex::new(Mark::default()),
    };
    let identity = Identity {
        kind: WorkerKind::Relay,
        backend: "relay".into(),
        device: format!("tether relay (τ_up {})", config.tau_up.max(1)),
        threads: 0,
        url: config.public_url.clone(),
    };
    let outcome = client::run_with(upstream, &engine, identity, stop).await;
    // The relay's own workers follow the upstream: told the run finished when it
    // did, else that this relay is going away (they reconnect, here or elsewhere).
    let reason = match &outcome {
        Ok(report) if report.stopped == "the run finished" => StopReason::Finished,
        _ => StopReason::ShuttingDown,
    };
    let _ = engine.stop_server.send(Some(reason));
    let serving = lock(&engine.serving).take();
    let state = lock(&engine.state).clone();
    if let Some(task) = serving {
        match task.await {
            Ok(result) => {
                result?;
            }
            Err(e) => tracing::error!("the relay's server task failed: {e}"),
        }
    }
    let upstream = outcome?;
    Ok(RelaySummary {
        upstream,
        syncs: state.map_or(0, |s| s.metrics.syncs.load(Ordering::Relaxed)),
    })
}
