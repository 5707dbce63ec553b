//! tether's parameter server: keeps the center variable x̃, runs every algorithm's
//! server side, serves workers over WebSockets, scores the center in the background,
//! checkpoints it crash-safely, and reports status and metrics over HTTP.
//!
//! Entry points: [`app`] builds the router (tests serve it on port 0);
//! [`Server::new`] prepares a run (data, resume) and [`Server::serve`] runs it on a
//! listener until the shutdown future resolves; [`run`] does both.

pub mod admin;
pub mod calibrate;
pub mod center;
pub mod checkpoint;
pub mod classes;
pub mod config;
mod data;
pub mod events;
mod guard;
pub mod listen;
pub mod metrics;
mod run_id;
pub mod screen;
pub mod state;
mod stream;
pub mod tls;
mod untrusted;
mod watch;
pub mod web;
pub mod workers;
pub mod ws;

pub use data::{RunData, TrainSet, load_data};
use run_id::age;
pub use run_id::new_run_id;
use watch::{spawn_evaluator, watch_finish};

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tether_shared::protocol::{self, RunSpec, StopReason};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::center::Center;
use crate::checkpoint::{CheckpointError, History};
pub use crate::config::{ConfigError, Finish, RelayRole, RunSettings, ServerConfig};
pub use crate::state::{AppState, EvalPoint, Status};
use tether_dataset::LoadError;

/// Why a server could not start or stopped badly.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data could not be loaded.
    #[error(transparent)]
    Data(#[from] LoadError),
    /// Checkpoints could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The resumed checkpoint does not fit the run.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// The listener failed.
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The router: the dashboard at `/` and `/volunteer` (assets under `/web/`),
/// `/ws` for workers, `/api/events` (the dashboard's live feed), `/api/status`,
/// `/api/join` and `/api/shard` for browser workers, `/api/admin/*` for the
/// operator, and `/metrics`.
pub fn app(state: AppState) -> Router {
    let operator = Router::new()
        .route("/hyper", post(admin::set_hyper))
        .route("/pause", post(admin::pause))
        .route("/resume", post(admin::resume))
        .route("/checkpoint", post(admin::checkpoint_now))
        .route("/center.safetensors", get(admin::download_center))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_token,
        ));
    Router::new()
        .route("/", get(web::dashboard))
        .route("/volunteer", get(web::volunteer))
        .route("/web/{*path}", get(web::file))
        .route("/ws", get(ws_upgrade))
        .route("/api/events", get(events::feed))
        .route("/api/status", get(status))
        .route("/api/classes", get(web::classes))
        .route("/api/join", post(web::join))
        .route("/api/relay", get(web::relay))
        .route("/api/shard", get(web::shard))
        .nest("/api/admin", operator)
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        // The largest body any route takes is an admin patch of a few numbers: a
        // stranger's request costs at most this much before it is refused.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Largest request body read (the admin routes' JSON).
pub const MAX_BODY: usize = 16 * 1024;

/// Answers 408 when a request takes longer than the run's request timeout to read
/// and handle (a client trickling a body holds nothing past it). WebSocket upgrades
/// and downloads return at once: their streams have their own deadlines.
async fn deadline(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.config.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => web::error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request took over {} s", limit.as_secs_f64()),
        ),
    }
}

async fn ws_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // A browser may only connect from an allowed origin; it then also needs a ticket.
    let browser = match web::check_origin(&state, &headers) {
        Ok(browser) => browser,
        Err(refused) => return refused,
    };
    // Frames up to twice the protocol limit are read and refused with a typed
    // rejection (the connection survives); beyond that the socket layer drops the
    // connection without reading further. Either way memory stays bounded by the model.
    let hard_cap = 2 * protocol::max_frame_bytes(state.spec.model.param_count());
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| ws::connection(state, socket, browser))
}

async fn status(State(state): State<AppState>) -> Json<Status> {
    Json(state.status())
}

async fn metrics(State(state): State<AppState>) -> Response {
    let workers = state.workers().status();
    let version = state.center().version();
    let accuracy = state.latest_eval().map(|e| e.accuracy);
    let mut text = state.metrics.render(workers.len(), version, accuracy);
    metrics::render_tree(&mut text, &workers);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// What a server reports when it stops.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The run's id.
    pub run_id: String,
    /// The run's directory.
    pub run_dir: PathBuf,
    /// The center's final version.
    pub center_version: u64,
    /// Training images workers reported.
    pub samples: u64,
    /// Accepted syncs.
    pub syncs: u64,
    /// Of those, the ones the loss screen held (answered; x̃ did not move).
    pub held: u64,
    /// Bytes received from workers.
    pub bytes_in: u64,
    /// Bytes sent to workers.
    pub bytes_out: u64,
    /// The final checkpoint's manifest.
    pub checkpoint: Option<PathBuf>,
}

/// A prepared run, ready to serve.
pub struct Server {
    state: AppState,
}

impl Server {
    /// Loads the data, creates or resumes the run, and saves its settings.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        config.validate()?;
        let (data_dir, data) = load_data(&config)?;
        let normalization = data.normalization.clone();
        let run = &config.run;
        let (run_id, run_dir, params, velocity, version, samples, history) = if config.resume {
            let dir = config
                .run_dir
                .clone()
                .ok_or_else(|| ServerError::Resume("--resume needs a run directory".into()))?;
            for path in checkpoint::clean(&dir)? {
                tracing::info!("removed {} (left by an interrupted write)", path.display());
            }
            let newest = checkpoint::load_newest(&dir)?;
            let snap = newest.snapshot;
            for (path, why) in &newest.skipped {
                tracing::warn!("skipped checkpoint {}: {why}", path.display());
            }
            if snap.model != run.model {
                return Err(ServerError::Resume(format!(
                    "the checkpoint holds a {} model, the run asks for {}",
                    snap.model.name(),
                    run.model.name()
                )));
            }
            tracing::info!(
                "resumed run {}, checkpoint v{} ({}), {} old",
                snap.run_id,
                snap.version,
                newest.manifest.display(),
                age(newest.written_unix)
            );
            let mut history = snap.history;
            history.resumes.push(checkpoint::Resumed {
                time_s: history.run_time_s,
                version: snap.version,
            });
            (
                snap.run_id,
                dir,
                snap.params,
                snap.velocity,
                snap.version,
                snap.samples,
                history,
            )
        } else {
            let run_id = new_run_id();
            let dir = config
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&run_id));
            let params = run.model.seeded_params(run.seed);
            (run_id, dir, params, Vec::new(), 0, 0, Default::default())
        };
        checkpoint::save_settings(&run_dir, run)?;
        let hyper = run.hyper();
        let spec = run.spec(run_id, normalization, data.train.len() as u64);
        let center = Center::new(
            run.algorithm,
            params,
            velocity,
            version,
            hyper,
            run.momentum as f32,
            config.max_staleness,
            config.max_update_ratio,
        );
        tracing::info!(run = %spec.run_id, data = %data_dir.display(), dir = %run_dir.display(), "run ready");
        let state = AppState::new(config, spec, run_dir, data, center, history);
        state.metrics.samples.store(samples, Ordering::Relaxed);
        if version > 0 {
            *state.last_checkpoint.lock().expect("fresh lock") =
                Some((version, state.run_dir.clone()));
        }
        Ok(Self { state })
    }

    /// A relay's server: serves `spec` (its upstream's run) from `center`, on this
    /// machine's copy of the run's data (as [`load_data`] gives it), keeping no
    /// checkpoints (`config.relay` must be set; the root keeps the run).
    pub fn relay(
        config: ServerConfig,
        spec: RunSpec,
        center: Vec<f32>,
        data: RunData,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let Some(role) = &config.relay else {
            return Err(ConfigError("a relay's server needs its place in the tree".into()).into());
        };
        if data.train.len() as u64 != spec.train_items {
            return Err(ConfigError(format!(
                "the upstream's run trains on {} images, this relay's data has {}: give the relay the run's data with --data",
                spec.train_items,
                data.train.len()
            ))
            .into());
        }
        for set in [&*data.train.in_memory(), &data.test] {
            set.expect_network(&spec.model).map_err(LoadError::from)?;
        }
        if center.len() != spec.model.param_count() {
            return Err(ConfigError(format!(
                "the upstream's center has {} values, the {} model {}",
                center.len(),
                spec.model.name(),
                spec.model.param_count()
            ))
            .into());
        }
        let center = Center::new(
            spec.algorithm,
            center,
            Vec::new(),
            0,
            spec.hyper,
            config.run.momentum as f32,
            config.max_staleness,
            config.max_update_ratio,
        );
        let run_dir = PathBuf::from("runs").join(format!("relay-{}", spec.run_id));
        tracing::info!(run = %spec.run_id, upstream = %role.upstream, "relay ready");
        let state = AppState::new(config, spec, run_dir, data, center, History::default());
        Ok(Self { state })
    }

    /// The run's shared state (status, center), for callers that watch the run.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves workers on `listener` until `shutdown` resolves; then tells every worker
    /// to stop (with the reason given), drains, and writes a final checkpoint.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = StopReason> + Send + 'static,
    ) -> Result<Summary, ServerError> {
        let state = self.state;
        state.measure_honest_progress(state.calibration.begin());
        let evaluator = spawn_evaluator(state.clone());
        let checkpointer = tokio::spawn(checkpoint_loop(state.clone()));
        let sampler = tokio::spawn(events::sampler(state.clone()));
        let finisher = tokio::spawn(watch_finish(state.clone()));
        let signal_state = state.clone();
        let graceful = async move {
            let mut ended = signal_state.stop_signal();
            tokio::select! {
                reason = shutdown => {
                    tracing::info!(?reason, "stopping: telling workers");
                    signal_state.stop(reason);
                }
                // The run finished on its own (watch_finish).
                _ = ended.wait_for(Option::is_some) => {}
            }
        };
        listen::serve(listener, state.clone(), app(state.clone()), graceful).await;
        // Upgraded WebSocket connections outlive axum's graceful shutdown: wait for
        // them to say goodbye, but not forever.
        let drained =
            tokio::time::timeout(state.config.drain_timeout, state.connections_closed()).await;
        if drained.is_err() {
            tracing::warn!(open = state.connections(), "drain timed out");
        }
        checkpointer.abort();
        sampler.abort();
        finisher.abort();
        let _ = evaluator.await;
        // A relay's center is a part of its upstream's run, which the root keeps.
        let checkpoint = if state.config.relay.is_none() {
            let checkpoint = write_checkpoint(&state, true).await?;
            write_report(&state, checkpoint.as_deref()).await?;
            checkpoint
        } else {
            None
        };
        let m = &state.metrics;
        Ok(Summary {
            run_id: state.spec.run_id.clone(),
            run_dir: state.run_dir.clone(),
            center_version: state.center().version(),
            samples: m.samples.load(Ordering::Relaxed),
            syncs: m.syncs.load(Ordering::Relaxed),
            held: m.held.load(Ordering::Relaxed),
            bytes_in: m.bytes_in.load(Ordering::Relaxed),
            bytes_out: m.bytes_out.load(Ordering::Relaxed),
            checkpoint,
        })
    }
}

/// Prepares the run in `config` and serves it on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = StopReason> + Send + 'static,
) -> Result<Summary, ServerError> {
    Server::new(config)?.serve(listener, shutdown).await
}

/// `report.json` in the run directory: how the run ended and what it reached.
async fn write_report(
    state: &AppState,
    checkpoint: Option<&std::path::Path>,
) -> Result<(), ServerError> {
    let m = &state.metrics;
    let finished = state.finished();
    // A finished run is scored on the center it ends with (unless that one was
    // the last evaluated).
    let version = state.center().version();
    let current = state.latest_eval().filter(|e| e.version == version);
    let eval = if current.is_none() && finished.is_some() && state.config.eval_every.is_some() {
        let s = state.clone();
        tokio::task::spawn_blocking(move || s.evaluate_now())
            .await
            .ok()
    } else {
        state.latest_eval()
    };
    let report = serde_json::json!({
        "run_id": state.spec.run_id,
        "algorithm": state.spec.algorithm.name(),
        "model": state.spec.model.name(),
        "finished": finished.is_some(),
        "reason": finished.unwrap_or_else(|| "stopped by the operator".into()),
        "time_s": state.now_s(),
        "center_version": version,
        "samples": m.samples.load(Ordering::Relaxed),
        "syncs": m.syncs.load(Ordering::Relaxed),
        "held": m.held.load(Ordering::Relaxed),
        "rejects": m.rejects(),
        "evaluation": eval,
        "classes": state.classes.all().1,
        "checkpoint": checkpoint,
    });
    let path = state.run_dir.join("report.json");
    let text = serde_json::to_vec_pretty(&report).expect("the report serialises");
    std::fs::write(&path, text)?; // small, once, at the very end
    tracing::info!(path = %path.display(), "report written");
    Ok(())
}

async fn checkpoint_loop(state: AppState) {
    let Some(every) = state.config.checkpoint_every else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = write_checkpoint(&state, false).await {
            tracing::error!("checkpoint failed: {e}");
        }
    }
}

/// Writes a checkpoint if the center changed since the last one, or always when
/// `force` (shutdown, the operator's button): the center may be the last one
/// written, but the history (evaluations, the run's clock) has moved on since, and
/// a resumed run must keep it. Rewriting a version is safe: its tensor file is the
/// same bytes, and the manifest is replaced atomically. Returns the manifest
/// written or already current.
pub async fn write_checkpoint(
    state: &AppState,
    force: bool,
) -> Result<Option<PathBuf>, ServerError> {
    // Concurrent writers of one version would both write it; the second now finds
    // it current below and writes nothing.
    let _writer = state.checkpoint_writer.lock().await;
    let snap = state.snapshot();
    let last = state.last_checkpoint.lock().expect("lock").clone();
    if let Some((v, path)) = &last
        && *v == snap.version
        && !force
    {
        return Ok(Some(path.clone()));
    }
    if snap.version == 0 && !force {
        return Ok(None);
    }
    let dir = state.run_dir.clone();
    let keep = state.config.keep_checkpoints;
    let version = snap.version;
    let path = tokio::task::spawn_blocking(move || checkpoint::write(&dir, &snap, keep))
        .await
        .map_err(|e| ServerError::Io(std::io::Error::other(e)))??;
    tracing::info!(version, path = %path.display(), "checkpoint written");
    *state.last_checkpoint.lock().expect("lock") = Some((version, path.clone()));
    Ok(Some(path))
}
