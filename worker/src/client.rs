//! `tether work`: joins a run over a WebSocket, trains its shard τ steps at a time on
//! the compute thread, synchronises, and keeps going across server restarts —
//! reconnecting with backoff and rejoining with a fresh session.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tether_shared::data::ImageSet;
use tether_shared::protocol::{
    self, Frame, Hello, Message, PROTOCOL_VERSION, Remedy, StopReason, Sync, WorkerKind,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::backend::{self, BackendChoice, BackendError};
use crate::compute::Compute;
use crate::dataset::{self, LoadError};
use crate::progress;

/// Settings of `tether work`.
#[derive(Clone, Debug)]
pub struct WorkConfig {
    /// The server, `ws://host:port` (`/ws` is added when missing).
    pub server: String,
    /// Compute device.
    pub backend: BackendChoice,
    /// CPU threads (`None`: one per core).
    pub threads: Option<usize>,
    /// The run's worker token, if it has one.
    pub token: Option<String>,
    /// IDX data directory (`None`: the shipped Fashion-MNIST).
    pub data: Option<PathBuf>,
    /// A training set already in memory (in-process workers share one copy).
    pub preloaded: Option<Arc<ImageSet>>,
    /// Stop after this many local steps in total.
    pub max_steps: Option<u64>,
    /// Give up when the server has been unreachable this long.
    pub give_up_after: Duration,
    /// Draw a progress bar.
    pub progress: bool,
    /// Seconds between heartbeats while training.
    pub heartbeat: Duration,
}

impl WorkConfig {
    /// A worker for `server` with default settings.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            backend: BackendChoice::Auto,
            threads: None,
            token: None,
            data: None,
            preloaded: None,
            max_steps: None,
            give_up_after: Duration::from_secs(600),
            progress: true,
            heartbeat: Duration::from_secs(10),
        }
    }

    /// The WebSocket URL, with `/ws` added when the path is empty.
    pub fn url(&self) -> Result<String, WorkError> {
        let s = self.server.trim_end_matches('/');
        let rest = s
            .strip_prefix("ws://")
            .or_else(|| s.strip_prefix("wss://"))
            .ok_or_else(|| {
                WorkError::Config(format!(
                    "--server must start with ws:// or wss://, got {s:?}"
                ))
            })?;
        if rest.is_empty() {
            return Err(WorkError::Config(format!("--server {s:?} names no host")));
        }
        Ok(if rest.contains('/') {
            s.to_string()
        } else {
            format!("{s}/ws")
        })
    }
}

/// Why a worker stopped with an error.
#[derive(Debug, Error)]
pub enum WorkError {
    /// A setting is wrong.
    #[error("invalid setting: {0}")]
    Config(String),
    /// No usable device.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The data could not be loaded.
    #[error(transparent)]
    Data(#[from] LoadError),
    /// The server refused this worker for good (version, token, data).
    #[error("the server refused this worker: {0}")]
    Refused(String),
    /// The server stayed unreachable.
    #[error("gave up: server unreachable for {0:?} (last error: {1})")]
    Unreachable(Duration, String),
}

/// What a worker did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkReport {
    /// Worker ids the server gave this process (one per session).
    pub worker_ids: Vec<u32>,
    /// Compute device in words.
    pub device: String,
    /// Local steps.
    pub steps: u64,
    /// Training images processed.
    pub samples: u64,
    /// Accepted syncs.
    pub syncs: u64,
    /// Frames the server rejected.
    pub rejections: u64,
    /// Reconnections after losing the server.
    pub reconnects: u64,
    /// Seconds spent in local steps.
    pub train_s: f64,
    /// Seconds spent waiting for syncs (send, server, reply, apply).
    pub wait_s: f64,
    /// Whole run, seconds.
    pub wall_s: f64,
    /// Training images per second of wall time.
    pub samples_per_s: f64,
    /// `wait_s / wall_s`.
    pub wait_fraction: f64,
    /// Mean loss of the last τ steps.
    pub last_loss: f32,
    /// Bytes sent to the server.
    pub bytes_out: u64,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Why it stopped.
    pub stopped: String,
}

/// How a session ended.
enum End {
    /// Stop for good (local stop, step budget, run finished).
    Done(String),
    /// Connection lost or server going down: reconnect, keeping xⁱ.
    Lost(String),
    /// The server refused an update in a way that a fresh start fixes.
    Restart(String),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Joins the run at `config.server` and trains until `stop` turns true, the step
/// budget is spent, the run finishes, or the server stays away too long.
pub async fn run(
    config: WorkConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<WorkReport, WorkError> {
    let url = config.url()?;
    if config.threads == Some(0) {
        return Err(WorkError::Config("--threads must be at least 1".into()));
    }
    if config.max_steps == Some(0) {
        return Err(WorkError::Config("--steps must be at least 1".into()));
    }
    let selected = backend::select(config.backend, config.threads)?;
    let train = match &config.preloaded {
        Some(set) => set.clone(),
        None => Arc::new(dataset::load(config.data.as_deref())?.1.train),
    };
    let threads = if selected.backend == "cpu" {
        rayon::current_num_threads() as u32
    } else {
        0
    };
    let compute = Compute::spawn(selected.device.clone(), train);
    let bar = if config.progress {
        match config.max_steps {
            Some(n) => progress::bar(n, "training"),
            None => progress::spinner("training"),
        }
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut report = WorkReport {
        device: selected.description.clone(),
        last_loss: f32::NAN,
        ..WorkReport::default()
    };
    let mut previous_run: Option<String> = None;
    let mut unreachable_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(250);
    let hello = |previous_run: Option<String>| Hello {
        protocol: PROTOCOL_VERSION,
        kind: WorkerKind::Native,
        backend: selected.backend.to_string(),
        device: selected.description.clone(),
        threads,
        token: config.token.clone(),
        previous_run,
    };
    let stopped = loop {
        if *stop.borrow() {
            break "stopped".to_string();
        }
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(protocol::max_frame_bytes(4 << 20)))
            .max_frame_size(Some(protocol::max_frame_bytes(4 << 20)));
        let connected = tokio::select! {
            c = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config), true) => c,
            _ = until_stopped(&mut stop) => break "stopped".to_string(),
        };
        let socket = match connected {
            Ok((socket, _)) => socket,
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= config.give_up_after {
                    return Err(WorkError::Unreachable(config.give_up_after, e.to_string()));
                }
                bar.set_message(format!(
                    "server unreachable ({e}); retrying in {backoff:.1?}"
                ));
                tracing::debug!("connect failed: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = until_stopped(&mut stop) => break "stopped".to_string(),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        unreachable_since = None;
        backoff = Duration::from_millis(250);
        let end = session(
            socket,
            hello(previous_run.clone()),
            &compute,
            &config,
            &mut stop,
            &bar,
            &mut report,
            started,
        )
        .await;
        match end {
            Ok((End::Done(why), _)) => break why,
            Ok((End::Lost(why), run_id)) => {
                tracing::warn!("lost the server ({why}); reconnecting");
                bar.set_message(format!("reconnecting: {why}"));
                report.reconnects += 1;
                previous_run = run_id;
                tokio::time::sleep(backoff).await;
            }
            Ok((End::Restart(why), _)) => {
                tracing::warn!("restarting from the center: {why}");
                report.reconnects += 1;
                previous_run = None;
            }
            Err(e) => return Err(e),
        }
    };
    bar.finish_and_clear();
    report.wall_s = started.elapsed().as_secs_f64();
    report.samples_per_s = report.samples as f64 / report.wall_s.max(1e-9);
    report.wait_fraction = report.wait_s / report.wall_s.max(1e-9);
    report.stopped = stopped;
    Ok(report)
}

/// One session: hello, welcome, then train-and-sync until it ends. Returns how it
/// ended and the run id it belonged to.
#[allow(clippy::too_many_arguments)]
async fn session(
    mut socket: Socket,
    hello: Hello,
    compute: &Compute,
    config: &WorkConfig,
    stop: &mut watch::Receiver<bool>,
    bar: &indicatif::ProgressBar,
    report: &mut WorkReport,
    started: Instant,
) -> Result<(End, Option<String>), WorkError> {
    let send_frame = protocol::encode(&Message::Hello(hello), &[]);
    report.bytes_out += send_frame.len() as u64;
    if let Err(e) = socket.send(WsMessage::Binary(send_frame.into())).await {
        return Ok((End::Lost(e.to_string()), None));
    }
    let welcome = match tokio::time::timeout(
        Duration::from_secs(30),
        next_frame(&mut socket, report),
    )
    .await
    {
        Err(_) => return Ok((End::Lost("no welcome within 30 s".into()), None)),
        Ok(Err(why)) => return Ok((End::Lost(why), None)),
        Ok(Ok(Frame {
            message: Message::Welcome(w),
            payload,
        })) => (w, payload),
        Ok(Ok(Frame {
            message: Message::Reject { reason, .. },
            ..
        })) => {
            return match reason.remedy() {
                Remedy::GiveUp => Err(WorkError::Refused(reason.to_string())),
                _ => Ok((End::Lost(reason.to_string()), None)),
            };
        }
        Ok(Ok(other)) => {
            return Err(WorkError::Refused(format!(
                "expected a welcome, got {:?}",
                other.message
            )));
        }
    };
    let (welcome, center) = welcome;
    let run_id = Some(welcome.run.run_id.clone());
    let spec = welcome.run.clone();
    compute
        .start(spec.clone(), welcome.shard, center, welcome.keep_params)
        .await
        .map_err(WorkError::Refused)?;
    report.worker_ids.push(welcome.worker_id);
    tracing::info!(
        worker = welcome.worker_id,
        run = %spec.run_id,
        algorithm = spec.algorithm.name(),
        shard = format!("{}/{}", welcome.shard.index, welcome.shard.count),
        kept_params = welcome.keep_params,
        "joined"
    );
    let session_id = welcome.session;
    let (mut sink, mut stream) = socket.split();
    // The reader forwards the server's frames, so a stop arrives while a step runs.
    let (frames_tx, mut frames) = mpsc::channel::<Result<(Frame, u64), String>>(4);
    let reader = tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            let item = match msg {
                Ok(WsMessage::Binary(b)) => protocol::decode(&b)
                    .map(|f| (f, b.len() as u64))
                    .map_err(|e| format!("undecodable frame from the server: {e}")),
                Ok(WsMessage::Close(_)) => Err("server closed the connection".into()),
                Ok(_) => continue,
                Err(e) => Err(e.to_string()),
            };
            let last = item.is_err();
            if frames_tx.send(item).await.is_err() || last {
                return;
            }
        }
        let _ = frames_tx.send(Err("connection ended".into())).await;
    });
    let mut hyper = spec.hyper;
    let mut seen = welcome.center_version;
    let mut seq = 0u64;
    let mut last_wait = 0.0f32;
    let halt = Arc::new(AtomicBool::new(false));
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.tick().await;
    let end = 'session: loop {
        let budget = config
            .max_steps
            .map_or(u64::MAX, |m| m.saturating_sub(report.steps));
        if budget == 0 {
            break End::Done("step budget spent".into());
        }
        let steps = u64::from(hyper.tau).min(budget) as u32;
        halt.store(false, Ordering::Relaxed);
        let mut training = Box::pin(compute.train(steps, hyper.lr, halt.clone()));
        let mut server_stop: Option<StopReason> = None;
        let mut lost: Option<String> = None;
        let (trained, seconds) = loop {
            tokio::select! {
                t = &mut training => break t.map_err(WorkError::Refused)?,
                _ = heartbeat.tick() => {
                    let hb = protocol::encode(&Message::Heartbeat { session: session_id }, &[]);
                    report.bytes_out += hb.len() as u64;
                    if let Err(e) = sink.send(WsMessage::Binary(hb.into())).await {
                        lost.get_or_insert(e.to_string());
                    }
                }
                f = frames.recv(), if lost.is_none() && server_stop.is_none() => match f {
                    Some(Ok((Frame { message: Message::Stop(reason), .. }, n))) => {
                        report.bytes_in += n;
                        server_stop = Some(reason);
                        halt.store(true, Ordering::Relaxed);
                    }
                    Some(Ok((other, _))) => tracing::warn!("unexpected frame while training: {:?}", other.message),
                    Some(Err(why)) => lost = Some(why),
                    None => lost = Some("connection ended".into()),
                },
                _ = until_stopped(stop), if !halt.load(Ordering::Relaxed) => halt.store(true, Ordering::Relaxed),
            }
        };
        report.steps += u64::from(trained.steps);
        report.samples += trained.samples;
        report.train_s += seconds;
        if trained.steps > 0 {
            report.last_loss = trained.loss;
        }
        bar.inc(u64::from(trained.steps));
        match server_stop {
            Some(StopReason::Finished) => break End::Done("the run finished".into()),
            Some(StopReason::ShuttingDown) => break End::Lost("server shutting down".into()),
            None => {}
        }
        if let Some(why) = lost {
            break End::Lost(why);
        }
        let stopping = *stop.borrow();
        if trained.steps == 0 {
            break End::Done("stopped".into());
        }
        // Synchronise: send xⁱ, wait for the reply, apply it.
        let t0 = Instant::now();
        seq += 1;
        let header = Message::Sync(Sync {
            session: session_id,
            seq,
            center_version: seen,
            steps: report.steps,
            samples: trained.samples,
            loss: if trained.loss.is_finite() {
                trained.loss
            } else {
                f32::MAX
            },
            samples_per_s: (trained.samples as f64 / seconds.max(1e-9)) as f32,
            wait_s: last_wait,
        });
        let bytes = protocol::encode(&header, &trained.params);
        report.bytes_out += bytes.len() as u64;
        if let Err(e) = sink.send(WsMessage::Binary(bytes.into())).await {
            break End::Lost(e.to_string());
        }
        let reply = loop {
            let next = tokio::time::timeout(Duration::from_secs(300), frames.recv()).await;
            match next {
                Err(_) => break 'session End::Lost("no reply within 300 s".into()),
                Ok(None) => break 'session End::Lost("connection ended".into()),
                Ok(Some(Err(why))) => break 'session End::Lost(why),
                Ok(Some(Ok((frame, n)))) => {
                    report.bytes_in += n;
                    match frame.message {
                        Message::Reply(r) if r.seq == seq => break (r, frame.payload),
                        Message::Reject { reason, .. } => {
                            report.rejections += 1;
                            break 'session match reason.remedy() {
                                Remedy::Reconnect => End::Lost(reason.to_string()),
                                Remedy::Restart => End::Restart(reason.to_string()),
                                Remedy::GiveUp => {
                                    return Err(WorkError::Refused(reason.to_string()));
                                }
                            };
                        }
                        Message::Stop(StopReason::Finished) => {
                            break 'session End::Done("the run finished".into());
                        }
                        Message::Stop(StopReason::ShuttingDown) => {
                            break 'session End::Lost("server shutting down".into());
                        }
                        other => tracing::warn!("unexpected frame while syncing: {other:?}"),
                    }
                }
            }
        };
        let (reply, payload) = reply;
        compute
            .apply(reply.apply, payload, spec.leader_pull)
            .await
            .map_err(WorkError::Refused)?;
        seen = reply.center_version;
        hyper = reply.hyper;
        let waited = t0.elapsed().as_secs_f64();
        last_wait = waited as f32;
        report.wait_s += waited;
        report.syncs += 1;
        let wall = started.elapsed().as_secs_f64();
        bar.set_message(format!(
            "worker {} · loss {:.4} · {} syncs · {:.0} samples/s · waiting {:.1} %",
            welcome.worker_id,
            report.last_loss,
            report.syncs,
            report.samples as f64 / wall,
            100.0 * report.wait_s / wall
        ));
        if stopping {
            break End::Done("stopped".into());
        }
    };
    if let End::Done(_) = &end {
        let bye = protocol::encode(
            &Message::Leave {
                session: session_id,
            },
            &[],
        );
        report.bytes_out += bye.len() as u64;
        let _ = sink.send(WsMessage::Binary(bye.into())).await;
        let _ = sink.send(WsMessage::Close(None)).await;
    }
    reader.abort();
    Ok((end, run_id))
}

/// Resolves once `stop` turns true (or its sender is gone for good).
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The next protocol frame on a socket not yet split (the handshake).
async fn next_frame(socket: &mut Socket, report: &mut WorkReport) -> Result<Frame, String> {
    loop {
        match socket.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                report.bytes_in += b.len() as u64;
                return protocol::decode(&b)
                    .map_err(|e| format!("undecodable frame from the server: {e}"));
            }
            Some(Ok(WsMessage::Close(_))) | None => {
                return Err("server closed the connection".into());
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}
