//! Everything one server holds: the run, the center behind its lock, the worker
//! registry, metrics, the evaluation history, and the shutdown signal.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;
use tether_shared::data::ImageSet;
use tether_shared::model::load_flat;
use tether_shared::protocol::{Hyper, RunSpec, StopReason};
use tether_shared::rng::SplitMix64;
use tether_shared::train::{Evaluation, evaluate};
use tokio::sync::watch;

use crate::center::Center;
use crate::checkpoint::Snapshot;
use crate::config::{RunSettings, ServerConfig};
use crate::metrics::Metrics;
use crate::workers::{WorkerStatus, Workers, unix_now};

/// One evaluation of the center on the test set.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EvalPoint {
    /// Seconds since the server started.
    pub time_s: f64,
    /// Training images workers had reported by then.
    pub samples: u64,
    /// The center version evaluated.
    pub version: u64,
    /// Test accuracy, 0..1.
    pub accuracy: f64,
    /// Mean test cross-entropy.
    pub loss: f64,
}

/// The shared state of one server; cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
pub struct Shared {
    /// The server's settings.
    pub config: ServerConfig,
    /// What workers are told about the run (the hyper-parameters in it are the
    /// initial ones; the current ones live in the center).
    pub spec: RunSpec,
    /// Where checkpoints go.
    pub run_dir: PathBuf,
    /// The test set the evaluator scores the center on.
    pub test: ImageSet,
    /// The center: the single writer of x̃.
    pub center: Mutex<Center>,
    /// Connected workers.
    pub workers: Mutex<Workers>,
    /// Counters and the latency histogram.
    pub metrics: Metrics,
    /// Evaluations so far, oldest first.
    pub evals: Mutex<Vec<EvalPoint>>,
    /// The last checkpoint written or resumed from.
    pub last_checkpoint: Mutex<Option<(u64, PathBuf)>>,
    /// When the server started.
    pub started: Instant,
    stop: watch::Sender<Option<StopReason>>,
    connections: watch::Sender<usize>,
    sessions: Mutex<SplitMix64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; the data (plain vectors
    // and counters) stays usable, so the server keeps serving rather than cascading.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the live connection count; dropped when the connection ends.
pub struct ConnectionGuard(watch::Sender<usize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl AppState {
    /// Builds the state around an initial center.
    pub fn new(
        config: ServerConfig,
        spec: RunSpec,
        run_dir: PathBuf,
        test: ImageSet,
        center: Center,
    ) -> Self {
        let seed = (unix_now() * 1e9) as u64 ^ u64::from(std::process::id()).rotate_left(32);
        let (stop, _) = watch::channel(None);
        let (connections, _) = watch::channel(0);
        Self(Arc::new(Shared {
            config,
            spec,
            run_dir,
            test,
            center: Mutex::new(center),
            workers: Mutex::new(Workers::default()),
            metrics: Metrics::default(),
            evals: Mutex::new(Vec::new()),
            last_checkpoint: Mutex::new(None),
            started: Instant::now(),
            stop,
            connections,
            sessions: Mutex::new(SplitMix64::new(seed)),
        }))
    }
}

impl Shared {
    /// The center, locked. Hold it briefly: every sync waits for it.
    pub fn center(&self) -> MutexGuard<'_, Center> {
        lock(&self.center)
    }

    /// The worker registry, locked.
    pub fn workers(&self) -> MutexGuard<'_, Workers> {
        lock(&self.workers)
    }

    /// A fresh, hard-to-guess session id (never 0).
    pub fn new_session(&self) -> u64 {
        lock(&self.sessions).next_u64().max(1)
    }

    /// Counts a connection until the guard drops.
    pub fn connection_guard(&self) -> ConnectionGuard {
        self.connections.send_modify(|n| *n += 1);
        ConnectionGuard(self.connections.clone())
    }

    /// Open worker connections.
    pub fn connections(&self) -> usize {
        *self.connections.borrow()
    }

    /// Waits until no connection is open.
    pub async fn connections_closed(&self) {
        let mut rx = self.connections.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Tells every connection to stop its worker.
    pub fn stop(&self, reason: StopReason) {
        self.stop.send_replace(Some(reason));
    }

    /// Subscribes to the stop signal.
    pub fn stop_signal(&self) -> watch::Receiver<Option<StopReason>> {
        self.stop.subscribe()
    }

    /// Whether the server is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }

    /// The center and its server momentum, as a checkpoint would hold them.
    pub fn snapshot(&self) -> Snapshot {
        let center = self.center();
        Snapshot {
            run_id: self.spec.run_id.clone(),
            algorithm: self.spec.algorithm,
            model: self.spec.model,
            version: center.version(),
            samples: self.metrics.samples.load(Ordering::Relaxed),
            params: center.params().to_vec(),
            velocity: center.velocity().to_vec(),
        }
    }

    /// Scores the current center on the test set (blocking: call from a blocking
    /// thread) and records the result in the history.
    pub fn evaluate_now(&self) -> EvalPoint {
        self.evaluate_on(&self.test)
    }

    /// Scores the current center on `set` and records the result in the history.
    pub fn evaluate_on(&self, set: &ImageSet) -> EvalPoint {
        let (params, version) = {
            let c = self.center();
            (c.params().to_vec(), c.version())
        };
        let samples = self.metrics.samples.load(Ordering::Relaxed);
        let device = burn::tensor::Device::flex();
        let net = load_flat(self.spec.model.init(&device), &params)
            .expect("the center has the model's length");
        let Evaluation { accuracy, loss } = evaluate(&net, set, self.spec.normalization, &device);
        let point = EvalPoint {
            time_s: self.started.elapsed().as_secs_f64(),
            samples,
            version,
            accuracy,
            loss,
        };
        lock(&self.evals).push(point);
        point
    }

    /// The latest evaluation, if any.
    pub fn latest_eval(&self) -> Option<EvalPoint> {
        lock(&self.evals).last().copied()
    }

    /// The body of `GET /api/status`.
    pub fn status(&self) -> Status {
        let (version, hyper, waiting, leader) = {
            let c = self.center();
            (
                c.version(),
                c.hyper(),
                c.round_waiting(),
                c.leader().map(|l| l.0),
            )
        };
        let workers = self.workers().status();
        let m = &self.metrics;
        Status {
            run_id: self.spec.run_id.clone(),
            settings: self.config.run.clone(),
            hyper,
            effective_beta: f64::from(hyper.alpha) * workers.len() as f64,
            center_version: version,
            uptime_s: self.started.elapsed().as_secs_f64(),
            samples: m.samples.load(Ordering::Relaxed),
            syncs: m.syncs.load(Ordering::Relaxed),
            bytes_in: m.bytes_in.load(Ordering::Relaxed),
            bytes_out: m.bytes_out.load(Ordering::Relaxed),
            rejects: m
                .rejects()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            mean_sync_latency_s: m.mean_latency(),
            round_waiting: waiting,
            leader_session: leader,
            evaluation: self.latest_eval(),
            history: lock(&self.evals).clone(),
            last_checkpoint: lock(&self.last_checkpoint)
                .clone()
                .map(|(v, p)| (v, p.display().to_string())),
            run_dir: self.run_dir.display().to_string(),
            stopping: self.stopping(),
            workers,
        }
    }
}

/// `GET /api/status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The run's id.
    pub run_id: String,
    /// Its settings.
    pub settings: RunSettings,
    /// τ, α, η now.
    pub hyper: Hyper,
    /// α × connected workers (SPEC: the dashboard shows the effective β).
    pub effective_beta: f64,
    /// Changes applied to the center.
    pub center_version: u64,
    /// Seconds since the server started.
    pub uptime_s: f64,
    /// Training images workers reported.
    pub samples: u64,
    /// Accepted syncs.
    pub syncs: u64,
    /// Bytes received from workers.
    pub bytes_in: u64,
    /// Bytes sent to workers.
    pub bytes_out: u64,
    /// Rejections by reason.
    pub rejects: std::collections::BTreeMap<String, u64>,
    /// Mean time from a sync's arrival to its reply.
    pub mean_sync_latency_s: f64,
    /// Workers waiting in the open synchronous round.
    pub round_waiting: usize,
    /// LSGD: the leader's session.
    pub leader_session: Option<u64>,
    /// The latest evaluation of the center.
    pub evaluation: Option<EvalPoint>,
    /// Every evaluation so far.
    pub history: Vec<EvalPoint>,
    /// (version, manifest path) of the last checkpoint.
    pub last_checkpoint: Option<(u64, String)>,
    /// The run's directory.
    pub run_dir: String,
    /// Whether the server is shutting down.
    pub stopping: bool,
    /// Connected workers.
    pub workers: Vec<WorkerStatus>,
}
