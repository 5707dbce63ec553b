//! `tether work`: joins a run over `ws://` or `wss://`, gets its shard (from a local
//! data set, or downloaded from the server, verified and cached), trains τ steps at a
//! time on the compute thread, and synchronises — by default without stopping: the
//! next τ steps start as soon as a sync is sent, and the reply is applied when it
//! arrives. Keeps going across server restarts, reconnecting with backoff.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tether_dataset::{self as dataset, LoadError, ShardCache, ShardKey};
use tether_shared::codec::{Encoding, Link};
use tether_shared::data::{ImageSet, Images, shard_indices};
use tether_shared::local::ShardData;
use tether_shared::protocol::{
    self, DecodeError, Frame, Hello, Message, PROTOCOL_VERSION, Remedy, StopReason, Sync, Welcome,
    WorkerKind,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::backend::{self, BackendChoice, BackendError};
use crate::compute::{self, Compute, Mailbox};
use crate::connect::{ConnectError, Endpoint, Socket};
use crate::download;
use crate::engine::{Engine, Identity};
use crate::progress;

/// Settings of `tether work`.
#[derive(Clone, Debug)]
pub struct WorkConfig {
    /// The server, `ws://host:port` or `wss://host:port` (`/ws` is added when missing).
    pub server: String,
    /// A PEM file of certificates to trust for `wss://` (a private CA, or the
    /// server's self-signed certificate).
    pub ca_cert: Option<PathBuf>,
    /// Compute device.
    pub backend: BackendChoice,
    /// CPU threads (`None`: one per core).
    pub threads: Option<usize>,
    /// The run's worker token, if it has one.
    pub token: Option<String>,
    /// The run's data here (IDX, CIFAR-10 or an image folder, decoded for the
    /// network the welcome describes); `None`: download this worker's shard.
    pub data: Option<PathBuf>,
    /// A training set already in memory (in-process workers share one copy).
    pub preloaded: Option<Arc<ImageSet>>,
    /// Where downloaded shards are cached (`None`: not cached).
    pub cache: Option<ShardCache>,
    /// A downloaded shard larger than this many bytes is kept in the cache on disk
    /// and its batches read from there (with a cache; else it is held in memory).
    pub shard_memory: u64,
    /// Payload encodings this worker offers (the server picks one).
    pub encodings: Vec<Encoding>,
    /// Keep training while a sync is in flight, where the algorithm allows it.
    pub overlap: bool,
    /// Stop after this many local steps in total.
    pub max_steps: Option<u64>,
    /// Give up when the server was never reached for this long.
    pub connect_timeout: Duration,
    /// Give up when a server that was reached has been unreachable this long.
    pub give_up_after: Duration,
    /// Draw a progress bar.
    pub progress: bool,
    /// Seconds between heartbeats while training.
    pub heartbeat: Duration,
}

/// Bytes of shard a worker holds in memory by default (2 GiB).
pub const DEFAULT_SHARD_MEMORY: u64 = 2 << 30;

impl WorkConfig {
    /// A worker for `server` with default settings.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            ca_cert: None,
            backend: BackendChoice::Auto,
            threads: None,
            token: None,
            data: None,
            preloaded: None,
            cache: dataset::cache_dir().map(ShardCache::new),
            shard_memory: DEFAULT_SHARD_MEMORY,
            encodings: Encoding::ALL.to_vec(),
            overlap: true,
            max_steps: None,
            connect_timeout: Duration::from_secs(30),
            give_up_after: Duration::from_secs(600),
            progress: true,
            heartbeat: Duration::from_secs(10),
        }
    }

    /// The server's endpoint (checks the URL and reads `--ca-cert`).
    pub fn endpoint(&self) -> Result<Endpoint, WorkError> {
        Ok(Endpoint::new(&self.server, self.ca_cert.as_deref())?)
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
    /// The server cannot be reached in a way no retry fixes (URL, TLS, HTTP).
    #[error(transparent)]
    Connect(#[from] ConnectError),
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
    /// The payload encoding of the last session.
    pub encoding: String,
    /// Whether syncs overlapped training (any of them).
    pub overlap: bool,
    /// Where the shard came from: "local", "download" or "cache".
    pub shard_source: String,
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
    /// `train_s / wall_s`: how much of the time the device was busy training.
    pub compute_utilisation: f64,
    /// `train_s` over the time from the first step's start to the last step's end:
    /// the utilisation once joined, without the join and the final sync.
    pub steady_utilisation: f64,
    /// Bytes of syncs and their replies, both ways: the traffic that recurs every τ
    /// steps (`bytes_out + bytes_in` also hold the join and heartbeats).
    pub sync_bytes: u64,
    /// Mean loss of the last τ steps.
    pub last_loss: f32,
    /// Bytes sent to the server.
    pub bytes_out: u64,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Why it stopped.
    pub stopped: String,
    /// Seconds since start at which the first step began and the last one ended.
    #[serde(skip)]
    training_span: Option<(f64, f64)>,
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

/// Where a worker's training data comes from.
enum Source {
    /// The whole training set is here; the shard is cut from it.
    Whole(Arc<ImageSet>),
    /// An image folder here, decoded for the run's network at the first welcome
    /// (its images take the network's shape), then `Whole`.
    Folder(PathBuf),
    /// Downloaded from the server; the last shard is kept for a rejoin.
    Download(Option<(ShardKey, Arc<dyn Images>)>),
}

/// What a session needs besides its socket.
struct Ctx<'a, E> {
    endpoint: &'a Endpoint,
    engine: &'a E,
    config: &'a WorkConfig,
    bar: &'a indicatif::ProgressBar,
    started: Instant,
}

/// Joins the run at `config.server` and trains until `stop` turns true, the step
/// budget is spent, the run finishes, or the server stays away too long.
pub async fn run(config: WorkConfig, stop: watch::Receiver<bool>) -> Result<WorkReport, WorkError> {
    config.endpoint()?;
    if config.threads == Some(0) {
        return Err(WorkError::Config("--threads must be at least 1".into()));
    }
    let selected = backend::select(config.backend, config.threads)?;
    let threads = if selected.backend == "cpu" {
        rayon::current_num_threads() as u32
    } else {
        0
    };
    let identity = Identity {
        kind: WorkerKind::Native,
        backend: selected.backend.to_string(),
        device: selected.description.clone(),
        threads,
        url: None,
    };
    let compute = Compute::spawn(selected.device.clone());
    run_with(config, &compute, identity, stop).await
}

/// The session loop of [`run`] around any [`Engine`]: a worker's compute thread,
/// or a relay's own center.
pub async fn run_with<E: Engine>(
    config: WorkConfig,
    engine: &E,
    identity: Identity,
    mut stop: watch::Receiver<bool>,
) -> Result<WorkReport, WorkError> {
    let endpoint = config.endpoint()?;
    if config.max_steps == Some(0) {
        return Err(WorkError::Config("--steps must be at least 1".into()));
    }
    if !config.encodings.contains(&Encoding::F32) {
        return Err(WorkError::Config(
            "the encodings offered must include f32".into(),
        ));
    }
    let mut source = match (&config.preloaded, &config.data) {
        (Some(set), _) => Source::Whole(set.clone()),
        (None, Some(dir)) if dataset::format(dir) == dataset::Format::Folder => {
            Source::Folder(dir.clone())
        }
        (None, Some(dir)) => Source::Whole(Arc::new(dataset::load(Some(dir))?.1.train)),
        (None, None) => Source::Download(None),
    };
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
        device: identity.device.clone(),
        last_loss: f32::NAN,
        ..WorkReport::default()
    };
    let ctx = Ctx {
        endpoint: &endpoint,
        engine,
        config: &config,
        bar: &bar,
        started,
    };
    let mut previous_run: Option<String> = None;
    let mut ever_connected = false;
    let mut unreachable_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(250);
    let mut attempt = 0u32;
    let hello = |previous_run: Option<String>, needs_shard: bool| Hello {
        protocol: PROTOCOL_VERSION,
        kind: identity.kind,
        backend: identity.backend.clone(),
        device: identity.device.clone(),
        threads: identity.threads,
        token: config.token.clone(),
        previous_run,
        encodings: config.encodings.clone(),
        needs_shard,
        group: None,
        url: identity.url.clone(),
    };
    let max_frame = protocol::max_frame_bytes(4 << 20);
    let stopped = loop {
        if *stop.borrow() {
            break "stopped".to_string();
        }
        attempt += 1;
        let since = *unreachable_since.get_or_insert_with(Instant::now);
        let limit = if ever_connected {
            config.give_up_after
        } else {
            config.connect_timeout
        };
        let left = limit.saturating_sub(since.elapsed());
        // A relay retries its upstream for ever (Duration::MAX): no countdown then.
        let giving_up = if left > Duration::from_secs(365 * 86_400) {
            "never giving up".to_string()
        } else {
            format!("giving up in {:.0} s", left.as_secs_f64())
        };
        tracing::info!(url = %endpoint.url, attempt, "connecting ({giving_up})");
        let connected = tokio::select! {
            c = endpoint.websocket(max_frame) => c,
            _ = until_stopped(&mut stop) => break "stopped".to_string(),
        };
        let socket = match connected {
            Ok(socket) => socket,
            Err(e) if !e.is_transient() => return Err(e.into()),
            Err(e) => {
                if since.elapsed() >= limit {
                    let what = if ever_connected {
                        "lost the server"
                    } else {
                        "never reached the server"
                    };
                    return Err(WorkError::Unreachable(limit, format!("{what}: {e}")));
                }
                tracing::warn!(url = %endpoint.url, "cannot connect: {e}; retrying in {backoff:.1?}");
                bar.set_message(format!(
                    "server unreachable ({e}); retrying in {backoff:.1?}"
                ));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = until_stopped(&mut stop) => break "stopped".to_string(),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        ever_connected = true;
        unreachable_since = None;
        backoff = Duration::from_millis(250);
        attempt = 0;
        let needs_shard = matches!(source, Source::Download(_));
        let end = session(
            socket,
            hello(previous_run.clone(), needs_shard),
            &ctx,
            &mut source,
            &mut stop,
            &mut report,
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
    report.compute_utilisation = report.train_s / report.wall_s.max(1e-9);
    report.steady_utilisation = report
        .training_span
        .map_or(0.0, |(from, to)| report.train_s / (to - from).max(1e-9));
    report.stopped = stopped;
    Ok(report)
}

/// This session's shard: cut from the local set, or downloaded (checked against
/// the welcome's length and SHA-256, and cached).
async fn shard_data<E>(
    ctx: &Ctx<'_, E>,
    source: &mut Source,
    welcome: &Welcome,
    report: &mut WorkReport,
) -> Result<ShardData, End> {
    let shard = welcome.shard;
    if shard.count == 0 || shard.index >= shard.count {
        return Err(End::Lost(format!(
            "invalid shard {}/{}",
            shard.index, shard.count
        )));
    }
    let memo = match source {
        Source::Whole(set) => {
            report.shard_source = "local".into();
            let indices = shard_indices(
                set.len(),
                shard.count as usize,
                shard.index as usize,
                shard.seed,
            );
            return Ok(ShardData {
                set: set.clone(),
                indices,
            });
        }
        Source::Download(memo) => memo,
        Source::Folder(_) => unreachable!("decoded at the welcome"),
    };
    let Some(announced) = &welcome.download else {
        return Err(End::Lost("the server announced no shard download".into()));
    };
    let key = ShardKey {
        data: announced.data.clone(),
        count: shard.count,
        index: shard.index,
        seed: shard.seed,
    };
    let whole = |set: Arc<dyn Images>| ShardData {
        indices: (0..set.count()).collect(),
        set,
    };
    if let Some((k, set)) = memo.as_ref()
        && *k == key
    {
        return Ok(whole(set.clone()));
    }
    let fetch = download::Fetch {
        endpoint: ctx.endpoint,
        cache: ctx.config.cache.as_ref(),
        shard_memory: ctx.config.shard_memory,
        bar: ctx.bar,
    };
    let (set, from) = download::shard(&fetch, welcome, &key)
        .await
        .map_err(End::Lost)?;
    report.shard_source = from.into();
    *memo = Some((key, set.clone()));
    Ok(whole(set))
}

/// A sync sent and not yet answered.
struct InFlight {
    seq: u64,
    /// xⁱ as sent (a replacement arriving later keeps the steps taken since).
    sent: Vec<f32>,
    /// The reply, once it arrived (its values went to the compute thread's mailbox).
    reply: Option<protocol::Reply>,
}

/// One session: hello, welcome, shard, then train-and-sync until it ends. Returns
/// how it ended and the run id it belonged to.
async fn session<E: Engine>(
    mut socket: Socket,
    hello: Hello,
    ctx: &Ctx<'_, E>,
    source: &mut Source,
    stop: &mut watch::Receiver<bool>,
    report: &mut WorkReport,
) -> Result<(End, Option<String>), WorkError> {
    let config = ctx.config;
    let send_frame = protocol::encode(&Message::Hello(hello), &[]);
    report.bytes_out += send_frame.len() as u64;
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        socket.send(WsMessage::Binary(send_frame.into())),
    )
    .await;
    match sent {
        Err(_) => return Ok((End::Lost("the hello was not sent within 30 s".into()), None)),
        Ok(Err(e)) => return Ok((End::Lost(e.to_string()), None)),
        Ok(Ok(())) => {}
    }
    let welcome = match tokio::time::timeout(
        Duration::from_secs(30),
        next_frame(&mut socket, report),
    )
    .await
    {
        Err(_) => return Ok((End::Lost("no welcome within 30 s".into()), None)),
        Ok(Err(Ok(why))) => return Ok((End::Lost(why), None)),
        Ok(Err(Err(fatal))) => return Err(fatal),
        Ok(Ok(Frame {
            message: Message::Welcome(w),
            payload,
            ..
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
    if let Source::Folder(dir) = source {
        let (dir, shape) = (dir.clone(), welcome.run.model.data_shape());
        let decoded =
            tokio::task::spawn_blocking(move || dataset::load_for(Some(&dir), Some(shape)))
                .await
                .map_err(|e| WorkError::Config(format!("decoding the image folder: {e}")))?;
        *source = Source::Whole(Arc::new(decoded?.1.train));
    }
    let run_id = Some(welcome.run.run_id.clone());
    let spec = welcome.run.clone();
    let data = match shard_data(ctx, source, &welcome, report).await {
        Ok(d) => d,
        Err(end) => return Ok((end, run_id)),
    };
    let mut link = Link::new(welcome.encoding, &center);
    ctx.engine
        .start(
            spec.clone(),
            welcome.shard,
            data,
            center,
            welcome.keep_params,
        )
        .await
        .map_err(WorkError::Refused)?;
    report.worker_ids.push(welcome.worker_id);
    report.encoding = welcome.encoding.name().into();
    // Decided again at every sync: the operator may change α during the run.
    let overlaps = |hyper: &protocol::Hyper| config.overlap && spec.algorithm.overlaps(hyper.alpha);
    let overlap = overlaps(&spec.hyper);
    tracing::info!(
        worker = welcome.worker_id,
        run = %spec.run_id,
        algorithm = spec.algorithm.name(),
        shard = format!("{}/{}", welcome.shard.index, welcome.shard.count),
        kept_params = welcome.keep_params,
        encoding = welcome.encoding.name(),
        overlap,
        "joined"
    );
    let session_id = welcome.session;
    let (sink, mut stream) = socket.split();
    // The reader forwards the server's frames, so a stop or a reply arrives while a
    // step runs.
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
    // The writer sends in the background: a large sync on a slow link never holds
    // up training. Every send has a time limit.
    let (out, writer_failed, writer) = spawn_writer(sink);
    let mut writer_failed = writer_failed;
    let mut hyper = spec.hyper;
    let mut seen = welcome.center_version;
    let mut seq = 0u64;
    let mut last_wait = 0.0f32;
    let halt = Arc::new(AtomicBool::new(false));
    let mailbox: Mailbox = Arc::new(Mutex::new(None));
    let mut in_flight: Option<InFlight> = None;
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.tick().await;
    let lambda = spec.leader_pull;
    let end = 'session: loop {
        let budget = config
            .max_steps
            .map_or(u64::MAX, |m| m.saturating_sub(report.steps));
        if budget == 0 && in_flight.is_none() {
            break End::Done("step budget spent".into());
        }
        let steps = u64::from(hyper.tau).min(budget) as u32;
        halt.store(false, Ordering::Relaxed);
        let chunk_start = ctx.started.elapsed().as_secs_f64();
        let mut training = Box::pin(
            ctx.engine
                .train(steps, hyper, halt.clone(), mailbox.clone()),
        );
        let mut server_stop: Option<StopReason> = None;
        let mut lost: Option<String> = None;
        let mut refused: Option<protocol::Rejection> = None;
        let (trained, seconds) = loop {
            tokio::select! {
                t = &mut training => break t.map_err(WorkError::Refused)?,
                _ = heartbeat.tick() => {
                    let hb = protocol::encode(&Message::Heartbeat { session: session_id }, &[]);
                    report.bytes_out += hb.len() as u64;
                    let _ = out.try_send(hb);
                }
                why = &mut writer_failed, if lost.is_none() => {
                    lost = Some(why.unwrap_or_else(|_| "writer ended".into()));
                    halt.store(true, Ordering::Relaxed);
                }
                f = frames.recv(), if lost.is_none() && server_stop.is_none() && refused.is_none() => match f {
                    Some(Ok((frame, n))) => {
                        report.bytes_in += n;
                        if matches!(frame.message, Message::Reply(_)) {
                            report.sync_bytes += n;
                        }
                        match frame.message {
                            Message::Stop(reason) => {
                                server_stop = Some(reason);
                                halt.store(true, Ordering::Relaxed);
                            }
                            Message::Reply(r) if in_flight.as_ref().is_some_and(|f| f.seq == r.seq && f.reply.is_none()) => {
                                let flight = in_flight.as_mut().expect("checked above");
                                match link.receive_reply(r.apply, frame.encoding, frame.payload) {
                                    Ok(values) => {
                                        *mailbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(compute::Reply {
                                            apply: r.apply,
                                            values,
                                            lambda,
                                            sent: std::mem::take(&mut flight.sent),
                                        });
                                        flight.reply = Some(r);
                                    }
                                    Err(e) => return Err(WorkError::Refused(format!("unusable reply: {e}"))),
                                }
                            }
                            Message::Reject { reason, .. } => {
                                report.rejections += 1;
                                refused = Some(reason);
                                halt.store(true, Ordering::Relaxed);
                            }
                            other => tracing::warn!("unexpected frame while training: {other:?}"),
                        }
                    }
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
            let from = report.training_span.map_or(chunk_start, |(from, _)| from);
            report.training_span = Some((from, ctx.started.elapsed().as_secs_f64()));
        }
        ctx.bar.inc(u64::from(trained.steps));
        if lost.is_some() && server_stop.is_none() {
            server_stop = stop_left_unread(&mut frames).await;
        }
        match server_stop {
            Some(StopReason::Finished) => break End::Done("the run finished".into()),
            Some(StopReason::ShuttingDown) => break End::Lost("server shutting down".into()),
            None => {}
        }
        if let Some(reason) = refused {
            break match reason.remedy() {
                Remedy::Reconnect => End::Lost(reason.to_string()),
                Remedy::Restart => End::Restart(reason.to_string()),
                Remedy::GiveUp => return Err(WorkError::Refused(reason.to_string())),
            };
        }
        if let Some(why) = lost {
            break End::Lost(why);
        }
        let stopping = *stop.borrow() || budget <= u64::from(trained.steps);
        // The previous sync: its reply was applied during the steps, or is applied now.
        let t0 = Instant::now();
        let mut params = trained.params;
        if let Some(flight) = in_flight.take() {
            let reply = match flight.reply {
                Some(r) => r,
                None => match wait_reply(&mut frames, flight.seq, report).await {
                    Ok((r, frame)) => {
                        let values = link
                            .receive_reply(r.apply, frame.encoding, frame.payload)
                            .map_err(|e| WorkError::Refused(format!("unusable reply: {e}")))?;
                        *mailbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(compute::Reply {
                            apply: r.apply,
                            values,
                            lambda,
                            sent: flight.sent,
                        });
                        r
                    }
                    Err(end) => break 'session end?,
                },
            };
            let unapplied = mailbox.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(late) = unapplied {
                params = ctx.engine.apply(late).await.map_err(WorkError::Refused)?;
            }
            seen = reply.center_version;
            hyper = reply.hyper;
            report.syncs += 1;
        }
        if trained.steps == 0 {
            break End::Done("stopped".into());
        }
        // Synchronise: send xⁱ (as the link encodes it).
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
            members: ctx.engine.members(),
        });
        let values = link.params_payload(&params);
        let (bytes, decoded) = protocol::encode_decoded(&header, values, link.encoding());
        link.sent(&decoded);
        report.bytes_out += bytes.len() as u64;
        report.sync_bytes += bytes.len() as u64;
        if out.send(bytes).await.is_err() {
            break match stop_left_unread(&mut frames).await {
                Some(StopReason::Finished) => End::Done("the run finished".into()),
                _ => End::Lost("the connection's writer ended".into()),
            };
        }
        let mut flight = InFlight {
            seq,
            sent: params,
            reply: None,
        };
        let overlap = overlaps(&hyper);
        report.overlap |= overlap && !stopping;
        if !overlap || stopping {
            // Wait for the answer before stepping on.
            let (r, frame) = match wait_reply(&mut frames, seq, report).await {
                Ok(x) => x,
                Err(end) => break 'session end?,
            };
            let values = link
                .receive_reply(r.apply, frame.encoding, frame.payload)
                .map_err(|e| WorkError::Refused(format!("unusable reply: {e}")))?;
            ctx.engine
                .apply(compute::Reply {
                    apply: r.apply,
                    values,
                    lambda,
                    sent: Vec::new(),
                })
                .await
                .map_err(WorkError::Refused)?;
            seen = r.center_version;
            hyper = r.hyper;
            report.syncs += 1;
        } else {
            flight.sent.shrink_to_fit();
            in_flight = Some(flight);
        }
        let waited = t0.elapsed().as_secs_f64();
        last_wait = waited as f32;
        report.wait_s += waited;
        let wall = ctx.started.elapsed().as_secs_f64();
        ctx.bar.set_message(format!(
            "worker {} · loss {:.4} · {} syncs · {:.0} samples/s · training {:.0} % of the time",
            welcome.worker_id,
            report.last_loss,
            report.syncs,
            report.samples as f64 / wall,
            100.0 * report.train_s / wall
        ));
        if stopping {
            break End::Done(if *stop.borrow() {
                "stopped".into()
            } else {
                "step budget spent".into()
            });
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
        let _ = out.send(bye).await;
    }
    drop(out);
    // The writer flushes what is queued (the leave) and closes, within its limits.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    reader.abort();
    Ok((end, run_id))
}

/// Starts the task that sends this session's frames, each within 60 s. Returns the
/// queue, a receiver that fires with the reason if a send fails, and the task.
fn spawn_writer(
    mut sink: futures_util::stream::SplitSink<Socket, WsMessage>,
) -> (
    mpsc::Sender<Vec<u8>>,
    oneshot::Receiver<String>,
    tokio::task::JoinHandle<()>,
) {
    let (out, mut queue) = mpsc::channel::<Vec<u8>>(8);
    let (failed_tx, failed) = oneshot::channel();
    let task = tokio::spawn(async move {
        while let Some(bytes) = queue.recv().await {
            let sent = tokio::time::timeout(
                Duration::from_secs(60),
                sink.send(WsMessage::Binary(bytes.into())),
            )
            .await;
            let why = match sent {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "a send did not finish within 60 s".into(),
            };
            let _ = failed_tx.send(why);
            return;
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(5), sink.send(WsMessage::Close(None))).await;
    });
    (out, failed, task)
}

/// A stop the server sent just before it closed, still unread: when a run finishes,
/// the worker's writer can fail on the server's close before the reader hands over
/// the stop that came first, and a worker that took that for a lost server would
/// retry a finished run until it gave up. Reads what is left (1 s at most).
async fn stop_left_unread(
    frames: &mut mpsc::Receiver<Result<(Frame, u64), String>>,
) -> Option<StopReason> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(deadline, frames.recv()).await {
            Ok(Some(Ok((frame, _)))) => {
                if let Message::Stop(reason) = frame.message {
                    return Some(reason);
                }
            }
            _ => return None,
        }
    }
}

/// Waits for the reply to sync `seq` (300 s at most). A rejection, a stop or a lost
/// connection ends the session: `Err(Ok(end))`, or `Err(Err(e))` when no retry helps.
async fn wait_reply(
    frames: &mut mpsc::Receiver<Result<(Frame, u64), String>>,
    seq: u64,
    report: &mut WorkReport,
) -> Result<(protocol::Reply, Frame), Result<End, WorkError>> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(300), frames.recv()).await;
        match next {
            Err(_) => return Err(Ok(End::Lost("no reply within 300 s".into()))),
            Ok(None) => return Err(Ok(End::Lost("connection ended".into()))),
            Ok(Some(Err(why))) => return Err(Ok(End::Lost(why))),
            Ok(Some(Ok((frame, n)))) => {
                report.bytes_in += n;
                match &frame.message {
                    Message::Reply(r) if r.seq == seq => {
                        report.sync_bytes += n;
                        return Ok((*r, frame));
                    }
                    Message::Reject { reason, .. } => {
                        report.rejections += 1;
                        return Err(match reason.remedy() {
                            Remedy::Reconnect => Ok(End::Lost(reason.to_string())),
                            Remedy::Restart => Ok(End::Restart(reason.to_string())),
                            Remedy::GiveUp => Err(WorkError::Refused(reason.to_string())),
                        });
                    }
                    Message::Stop(StopReason::Finished) => {
                        return Err(Ok(End::Done("the run finished".into())));
                    }
                    Message::Stop(StopReason::ShuttingDown) => {
                        return Err(Ok(End::Lost("server shutting down".into())));
                    }
                    other => tracing::warn!("unexpected frame while syncing: {other:?}"),
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone for good).
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The next protocol frame on a socket not yet split (the handshake). `Err(Ok)`:
/// the connection is lost; `Err(Err)`: no retry helps (a network this worker
/// cannot build).
async fn next_frame(
    socket: &mut Socket,
    report: &mut WorkReport,
) -> Result<Frame, Result<String, WorkError>> {
    loop {
        match socket.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                report.bytes_in += b.len() as u64;
                return protocol::decode(&b).map_err(|e| match e {
                    DecodeError::Network(_) => Err(WorkError::Refused(e.to_string())),
                    e => Ok(format!("undecodable frame from the server: {e}")),
                });
            }
            Some(Ok(WsMessage::Close(_))) | None => {
                return Err(Ok("server closed the connection".into()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Ok(e.to_string())),
        }
    }
}
