//! Everything one server holds: the run, the center behind its lock, the worker
//! registry, metrics, the evaluation history, and the shutdown signal.

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_dataset::LoadError;
use tether_shared::data::{ImageSet, encode_images, shard_indices};
use tether_shared::model::load_flat;
use tether_shared::protocol::{Hyper, RunSpec, Shard, ShardDownload, StopReason, WorkerKind};
use tether_shared::train::{Evaluation, evaluate_by_class, ready_to_score};
use tokio::sync::watch;

use crate::calibrate::Calibration;
use crate::center::Center;
use crate::checkpoint::{History, Resumed, Snapshot};
use crate::classes::Classes;
use crate::config::{NetworkSummary, RunSettings, ServerConfig};
use crate::data::{RunData, TrainSet};
use crate::events::Timeline;
use crate::metrics::Metrics;
use crate::screen::Screen;
use crate::workers::{ShardPlan, WorkerStatus, Workers};

mod hyper;
pub use crate::untrusted::{MAX_NAME_CHARS, MAX_REASON_CHARS, clip, secret_bytes};
pub use hyper::HyperChange;

/// One evaluation of the center on the test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Run time (seconds served, counted across resumes).
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

/// A refused frame, for the dashboard's list of recent rejections.
#[derive(Clone, Debug, Serialize)]
pub struct RejectRecord {
    /// Run time.
    pub time_s: f64,
    /// The worker's id (`None` before the handshake finished).
    pub worker: Option<u32>,
    /// Stable code.
    pub code: &'static str,
    /// In words.
    pub reason: String,
}

/// Rejections kept for the dashboard.
const RECENT_REJECTS: usize = 50;

/// Outstanding join tickets at most.
pub const MAX_TICKETS: usize = 4096;
/// How long a browser's join ticket is good for.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(300);

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
    /// The training set (workers without data download their shards of it).
    pub train: TrainSet,
    /// Identifies the training data in shard URLs, so browsers cache per data set.
    pub data_id: String,
    /// The test set the evaluator scores the center on.
    pub test: ImageSet,
    /// The classes' names and the center's latest score on each.
    pub classes: Classes,
    /// The center: the single writer of x̃.
    pub center: Mutex<Center>,
    /// The loss screen, unless `--screen-batch 0`.
    pub screen: Option<Arc<Screen>>,
    /// Connected workers.
    pub workers: Mutex<Workers>,
    /// Counters and the latency histogram.
    pub metrics: Metrics,
    /// Evaluations so far, oldest first.
    pub evals: Mutex<Vec<EvalPoint>>,
    /// The last checkpoint written or resumed from.
    pub last_checkpoint: Mutex<Option<(u64, PathBuf)>>,
    /// Held by whoever writes a checkpoint (the periodic loop, the operator's
    /// "checkpoint now", shutdown): one writer at a time.
    pub checkpoint_writer: tokio::sync::Mutex<()>,
    /// When the server started.
    pub started: Instant,
    /// Run time served before this server started (by the runs it resumed).
    run_time_before_s: f64,
    /// Runtime changes of τ, α, η, oldest first.
    pub changes: Mutex<Vec<HyperChange>>,
    /// Where the run was resumed, oldest first.
    pub resumes: Mutex<Vec<Resumed>>,
    /// Once-a-second samples for the dashboard.
    pub timeline: Timeline,
    rejects: Mutex<VecDeque<RejectRecord>>,
    /// Why the run ended, once a `--max-*` / `--target-accuracy` condition held.
    finished: Mutex<Option<String>>,
    tickets: Mutex<HashMap<String, Instant>>,
    paused: watch::Sender<bool>,
    stop: watch::Sender<Option<StopReason>>,
    connections: watch::Sender<usize>,
    shards: Mutex<HashMap<(u32, u32), Arc<ShardFile>>>,
    /// Browsers sent to relays so far (round-robin among the least loaded).
    pub relay_turn: AtomicU64,
    /// The server's measurements of honest progress for the norm guard.
    pub calibration: Calibration,
}

/// A shard of the training set as workers download it (`GET /api/shard`).
pub struct ShardFile {
    /// Its length in bytes ([`encode_images`]' encoding).
    pub len: u64,
    /// Their SHA-256, announced in the welcome.
    pub sha256: [u8; 32],
    /// The bytes, shared by every download (a response holds a reference, never a
    /// copy); `None` for a set on disk, whose shards are streamed from the file.
    pub bytes: Option<axum::body::Bytes>,
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
    /// Builds the state around an initial center and the dashboard's `history` of
    /// the run so far (empty for a new run; a resumed run adds its resume marker).
    pub fn new(
        config: ServerConfig,
        spec: RunSpec,
        run_dir: PathBuf,
        data: RunData,
        center: Center,
        history: History,
    ) -> Self {
        let RunData {
            train,
            test,
            classes,
            data_id,
            ..
        } = data;
        let classes = Classes::new(&classes, spec.model.classes());
        let (stop, _) = watch::channel(None);
        let (connections, _) = watch::channel(0);
        let (paused, _) = watch::channel(false);
        let calibration = Calibration::new(spec.clone(), train.in_memory());
        let screen = (config.screen_batch > 0).then(|| {
            Arc::new(Screen::new(
                spec.model.clone(),
                &spec.normalization,
                train.in_memory(),
                config.screen_batch,
            ))
        });
        Self(Arc::new(Shared {
            screen,
            config,
            spec,
            run_dir,
            data_id,
            train,
            test,
            classes,
            run_time_before_s: history.run_time_s,
            changes: Mutex::new(history.changes),
            resumes: Mutex::new(history.resumes),
            finished: Mutex::new(None),
            timeline: Timeline::default(),
            rejects: Mutex::new(VecDeque::new()),
            tickets: Mutex::new(HashMap::new()),
            paused,
            center: Mutex::new(center),
            workers: Mutex::new(Workers::default()),
            metrics: Metrics::default(),
            evals: Mutex::new(history.evals),
            last_checkpoint: Mutex::new(None),
            checkpoint_writer: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            stop,
            connections,
            shards: Mutex::new(HashMap::new()),
            relay_turn: AtomicU64::new(0),
            calibration,
        }))
    }
}

impl Shared {
    /// How this server cuts the training set for its workers.
    pub fn shard_plan(&self) -> ShardPlan {
        ShardPlan {
            count: self.config.run.expected_workers,
            seed: self.config.run.seed,
            within: self.config.relay.as_ref().map(|r| r.within),
        }
    }

    /// The center, locked. Hold it briefly: every sync waits for it.
    pub fn center(&self) -> MutexGuard<'_, Center> {
        lock(&self.center)
    }

    /// The worker registry, locked.
    pub fn workers(&self) -> MutexGuard<'_, Workers> {
        lock(&self.workers)
    }

    /// A fresh session id from the OS's CSPRNG (never 0).
    pub fn new_session(&self) -> u64 {
        u64::from_le_bytes(secret_bytes()).max(1)
    }

    /// Shard `shard` of the training set as a file, built once per shard (on a
    /// blocking thread: it copies a share of the images, or reads them from disk,
    /// and hashes them).
    pub async fn shard_file(&self, shard: Shard) -> Arc<ShardFile> {
        let key = (shard.count, shard.index);
        if let Some(file) = lock(&self.shards).get(&key) {
            return file.clone();
        }
        let (whole, packed) = (self.train.whole(), self.train.packed());
        let n = self.train.len();
        let file = tokio::task::spawn_blocking(move || {
            let items = shard_indices(n, shard.count as usize, shard.index as usize, shard.seed);
            if let Some(train) = whole {
                let bytes = axum::body::Bytes::from(encode_images(&train.subset(&items)));
                let sha256 = Sha256::digest(&bytes).into();
                return Ok(ShardFile {
                    len: bytes.len() as u64,
                    sha256,
                    bytes: Some(bytes),
                });
            }
            let packed = packed.expect("a training set is in memory or on disk");
            let mut hasher = Sha256::new();
            let len = packed.write_subset(&items, &mut hasher)?;
            Ok::<_, LoadError>(ShardFile {
                len,
                sha256: hasher.finalize().into(),
                bytes: None,
            })
        })
        .await
        .expect("building a shard does not panic");
        let file = match file {
            Ok(f) => Arc::new(f),
            // The file was readable at start; a disk failure now is the operator's
            // to see, and the worker's download fails its checksum and retries.
            Err(e) => {
                tracing::error!("shard {}/{}: {e}", shard.index, shard.count);
                return Arc::new(ShardFile {
                    len: 0,
                    sha256: [0; 32],
                    bytes: Some(axum::body::Bytes::new()),
                });
            }
        };
        lock(&self.shards).entry(key).or_insert(file).clone()
    }

    /// What a worker that has no data needs to download `shard` and check it.
    pub async fn shard_download(&self, shard: Shard) -> ShardDownload {
        let file = self.shard_file(shard).await;
        ShardDownload {
            data: self.data_id.clone(),
            bytes: file.len,
            sha256: file.sha256,
        }
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

    /// Run time: seconds served, counted across resumes (the dashboard's clock).
    pub fn now_s(&self) -> f64 {
        self.run_time_before_s + self.started.elapsed().as_secs_f64()
    }

    /// Ends the run because `why` (the first reason given is kept): workers are told
    /// it finished.
    pub fn finish(&self, why: String) {
        tracing::info!("run finished: {why}");
        lock(&self.finished).get_or_insert(why);
        self.stop(StopReason::Finished);
    }

    /// Why the run finished, if it did (rather than being stopped).
    pub fn finished(&self) -> Option<String> {
        lock(&self.finished).clone()
    }

    /// Keeps a rejection for the dashboard (the newest [`RECENT_REJECTS`]).
    pub fn record_reject(&self, worker: Option<u32>, code: &'static str, reason: String) {
        let mut r = lock(&self.rejects);
        if r.len() == RECENT_REJECTS {
            r.pop_front();
        }
        r.push_back(RejectRecord {
            time_s: self.now_s(),
            worker,
            code,
            reason: clip(&reason, MAX_REASON_CHARS),
        });
    }

    /// Recent rejections, oldest first.
    pub fn recent_rejects(&self) -> Vec<RejectRecord> {
        lock(&self.rejects).iter().cloned().collect()
    }

    /// Issues a browser join ticket, good for one session within
    /// [`TICKET_LIFETIME`]; `None` while [`MAX_TICKETS`] are outstanding (tickets
    /// are handed out without credentials, so their memory is bounded).
    pub fn issue_ticket(&self) -> Option<String> {
        let mut tickets = lock(&self.tickets);
        tickets.retain(|_, issued| issued.elapsed() < TICKET_LIFETIME);
        if tickets.len() >= MAX_TICKETS {
            return None;
        }
        let ticket: String = secret_bytes::<16>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        tickets.insert(ticket.clone(), Instant::now());
        Some(ticket)
    }

    /// Uses up `ticket`: true if it was issued here, unused and unexpired. A ticket
    /// opens one session; a page that reconnects asks for a new one.
    pub fn redeem_ticket(&self, ticket: &str) -> bool {
        lock(&self.tickets)
            .remove(ticket)
            .is_some_and(|issued| issued.elapsed() < TICKET_LIFETIME)
    }

    /// Pauses (true) or resumes (false) training: syncs wait while paused.
    pub fn set_paused(&self, paused: bool) {
        if self.paused.send_replace(paused) != paused {
            tracing::info!(
                paused,
                "training {}",
                if paused { "paused" } else { "resumed" }
            );
        }
    }

    /// Whether training is paused.
    pub fn paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits until training is not paused.
    pub async fn unpaused(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
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
            model: self.spec.model.clone(),
            version: center.version(),
            samples: self.metrics.samples.load(Ordering::Relaxed),
            params: center.params().to_vec(),
            velocity: center.velocity().to_vec(),
            history: History {
                run_time_s: self.now_s(),
                evals: lock(&self.evals).clone(),
                changes: lock(&self.changes).clone(),
                resumes: lock(&self.resumes).clone(),
            },
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
        let train = self.train.in_memory();
        let net = ready_to_score(net, &train, &self.spec.normalization, &device);
        let (Evaluation { accuracy, loss }, scores) =
            evaluate_by_class(&net, set, &self.spec.normalization, &device);
        self.classes.record(version, scores);
        let point = EvalPoint {
            time_s: self.now_s(),
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
        // Sessions are secrets: the status names the leader by its worker id.
        let leader = leader.and_then(|s| self.workers().get_mut(s).map(|w| w.id));
        let workers = self.workers().status();
        let m = &self.metrics;
        Status {
            run_id: self.spec.run_id.clone(),
            network: NetworkSummary::of(&self.spec.model),
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
            leader_worker: leader,
            evaluation: self.latest_eval(),
            history: lock(&self.evals).clone(),
            last_checkpoint: lock(&self.last_checkpoint)
                .clone()
                .map(|(v, p)| (v, p.display().to_string())),
            run_dir: self.run_dir.display().to_string(),
            stopping: self.stopping(),
            paused: self.paused(),
            admin: self.config.admin_token.is_some(),
            needs_token: self.config.worker_token.is_some(),
            changes: lock(&self.changes).clone(),
            resumes: lock(&self.resumes).clone(),
            run_time_s: self.now_s(),
            recent_rejects: self.recent_rejects(),
            upstream: self.config.relay.as_ref().map(|r| r.upstream.clone()),
            subtree_workers: subtree_workers(&workers),
            workers,
        }
    }
}

/// Training workers below a server whose connected workers are `workers`: one for
/// each worker, a relay's own count for each relay.
pub fn subtree_workers(workers: &[WorkerStatus]) -> u64 {
    workers
        .iter()
        .map(|w| match w.kind {
            WorkerKind::Relay => u64::from(w.members),
            _ => 1,
        })
        .sum()
}

/// `GET /api/status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The run's id.
    pub run_id: String,
    /// The network at a glance (its whole description is in `settings.model`).
    pub network: NetworkSummary,
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
    /// LSGD: the leader's worker id.
    pub leader_worker: Option<u32>,
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
    /// Whether the operator paused training.
    pub paused: bool,
    /// Whether operator controls are enabled (an admin token is set).
    pub admin: bool,
    /// Whether joining needs the worker token.
    pub needs_token: bool,
    /// Runtime changes of τ, α, η.
    pub changes: Vec<HyperChange>,
    /// Where the run was resumed from a checkpoint.
    pub resumes: Vec<Resumed>,
    /// Run time: seconds served, counted across resumes (the charts' clock).
    pub run_time_s: f64,
    /// The most recent rejections.
    pub recent_rejects: Vec<RejectRecord>,
    /// The server this one relays to, if it is a relay.
    pub upstream: Option<String>,
    /// Training workers in the tree below this server: its own, and each relay's.
    pub subtree_workers: u64,
    /// Connected workers.
    pub workers: Vec<WorkerStatus>,
}
