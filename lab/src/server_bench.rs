//! The server benchmark behind `tether bench server`: a real `tether serve` process
//! fed back-to-back elastic syncs by raw protocol clients, against the baseline of
//! a bare WebSocket echo server moving frames of the same size, and the loss
//! screen's judgements alone, in this process (the served rate's ceiling).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tether_server::screen::Screen;
use tether_shared::codec::Encoding;
use tether_shared::data::{ImageSet, Normalization};
use tether_shared::model::Model;
use tether_shared::protocol::{self, Frame, Hello, Message, PROTOCOL_VERSION, Sync, WorkerKind};
use thiserror::Error;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Why a measurement failed.
#[derive(Debug, Error)]
pub enum ServerBenchError {
    /// A process or socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// A frame that did not decode.
    #[error("a frame from the server: {0}")]
    Decode(#[from] protocol::DecodeError),
    /// The server or the echo did not answer as they should.
    #[error("{0}")]
    Unexpected(String),
    /// A client task panicked.
    #[error("a client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn unexpected(what: impl Into<String>) -> ServerBenchError {
    ServerBenchError::Unexpected(what.into())
}

/// Judgements per second of the loss screen alone, no network: `model`'s centers
/// scored on `batch` images drawn from `train`, each candidate a small step from
/// the base as the bench's clients send, for `seconds` after a warm-up, by as many
/// threads as the screen judges at once (the batch rotates as in a served run, so
/// its base is scored anew every 32 judgements).
pub fn screen_rate(model: &Model, train: ImageSet, batch: usize, seconds: f64) -> f64 {
    let normalization = Normalization::of(&train);
    let screen = Screen::new(model.clone(), &normalization, Arc::new(train), batch);
    let base = model.seeded_params(0);
    let candidate: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(j, c)| c + 1e-4 * ((j % 5) as f32 - 2.0))
        .collect();
    for _ in 0..3 {
        screen.judge(0, &base, &candidate);
    }
    let start = Instant::now();
    let judged: u32 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..screen.at_once())
            .map(|_| {
                s.spawn(|| {
                    let mut judged = 0u32;
                    while judged < 3 || start.elapsed().as_secs_f64() < seconds {
                        screen.judge(0, &base, &candidate);
                        judged += 1;
                    }
                    judged
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
    });
    f64::from(judged) / start.elapsed().as_secs_f64()
}

/// Bytes of one sync frame carrying `model`'s parameters in f32.
pub fn sync_frame_len(model: &Model) -> usize {
    protocol::encode(
        &Message::Sync(sync_header(1, 0, 0)),
        &vec![0.0; model.param_count()],
    )
    .len()
}

fn sync_header(seq: u64, center_version: u64, steps: u64) -> Sync {
    Sync {
        session: 1,
        seq,
        center_version,
        steps,
        samples: 0,
        loss: 1.0,
        samples_per_s: 0.0,
        wait_s: 0.0,
        members: 0,
    }
}

/// Elastic syncs per second that `clients` raw clients get from the server at
/// `addr` in `seconds`, each sending its next sync as soon as its reply arrives.
pub async fn sync_rate(
    addr: SocketAddr,
    clients: u32,
    seconds: f64,
) -> Result<f64, ServerBenchError> {
    let url = format!("ws://{addr}/ws");
    // One exchange first, untimed: a server's first exchange waits for its measure
    // of honest progress (the norm guard's start), which is start-up, not throughput.
    sync_client(url.clone(), Instant::now(), 1).await?;
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(sync_client(url.clone(), until, 0)))
        .collect();
    total_rate(tasks).await
}

/// Frames per second that `clients` clients get echoed by `echo` in `seconds`.
pub async fn echo_rate(
    echo: SocketAddr,
    frame_len: usize,
    clients: u32,
    seconds: f64,
) -> Result<f64, ServerBenchError> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(echo_client(
                format!("ws://{echo}/"),
                vec![7u8; frame_len],
                until,
            ))
        })
        .collect();
    total_rate(tasks).await
}

async fn total_rate(
    tasks: Vec<tokio::task::JoinHandle<Result<u64, ServerBenchError>>>,
) -> Result<f64, ServerBenchError> {
    let t0 = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

/// Starts `exe serve` (the `tether` binary) for `model` (its description written
/// to `dir`) with a loss screen of
/// `screen_batch` images, its run in `dir`; returns the process and its address,
/// which its stdout names.
pub fn spawn_server(
    exe: &Path,
    model: &Model,
    screen_batch: usize,
    dir: &Path,
) -> Result<(Child, SocketAddr), ServerBenchError> {
    // The description goes by file, so a network of the user's own is served too.
    std::fs::create_dir_all(dir)?;
    let description = dir.join("model.json");
    std::fs::write(&description, model.description())?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--algorithm",
            "easgd",
        ])
        .args(["--eval-every", "0", "--checkpoint-every", "0"])
        .arg("--model")
        .arg(&description)
        .args([
            "--max-staleness",
            "1000000000",
            "--max-workers",
            "1024",
            "--screen-batch",
            &screen_batch.to_string(),
            "--run-dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| unexpected("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if let Some(rest) = line?.trim().strip_prefix("dashboard: http://") {
            let addr = rest
                .split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| unexpected(format!("no address in {rest:?}")))?;
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((child, addr));
        }
    }
    let _ = child.kill();
    Err(unexpected("tether serve did not start"))
}

/// Resident memory of process `pid` in MB (Linux), if it can be read.
pub fn rss_mb(pid: u32) -> Option<f64> {
    memory_mb(pid, "VmRSS:")
}

/// The most resident memory process `pid` has had, in MB (Linux).
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    memory_mb(pid, "VmHWM:")
}

fn memory_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// One raw client doing back-to-back elastic syncs until `until`, and at least
/// `at_least`; returns its count.
async fn sync_client(url: String, until: Instant, at_least: u64) -> Result<u64, ServerBenchError> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true).await?;
    ws.send(bench_hello(false)).await?;
    let (welcome, center) = match next(&mut ws).await? {
        Frame {
            message: Message::Welcome(w),
            payload,
            ..
        } => (w, payload),
        other => {
            return Err(unexpected(format!(
                "expected a welcome, got {:?}",
                other.message
            )));
        }
    };
    // A worker a little way from the center, as after τ honest steps.
    let x: Vec<f32> = center
        .iter()
        .enumerate()
        .map(|(j, c)| c + 1e-4 * ((j % 5) as f32 - 2.0))
        .collect();
    let (mut seen, mut n) = (welcome.center_version, 0u64);
    while n < at_least || Instant::now() < until {
        let sync = Sync {
            session: welcome.session,
            ..sync_header(n + 1, seen, n)
        };
        ws.send(WsMessage::Binary(
            protocol::encode(&Message::Sync(sync), &x).into(),
        ))
        .await?;
        match next(&mut ws).await?.message {
            Message::Reply(r) => seen = r.center_version,
            other => return Err(unexpected(format!("expected a reply, got {other:?}"))),
        }
        n += 1;
    }
    let _ = ws.close(None).await;
    Ok(n)
}

/// A benchmark client's hello as a frame: f32 syncs, a shard download when asked.
pub(crate) fn bench_hello(needs_shard: bool) -> WsMessage {
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        kind: WorkerKind::Native,
        backend: "bench".into(),
        device: "bench client".into(),
        threads: 0,
        token: None,
        previous_run: None,
        encodings: vec![Encoding::F32],
        needs_shard,
        group: None,
        url: None,
    };
    WsMessage::Binary(protocol::encode(&Message::Hello(hello), &[]).into())
}

pub(crate) async fn next(ws: &mut Socket) -> Result<Frame, ServerBenchError> {
    loop {
        match ws
            .next()
            .await
            .ok_or_else(|| unexpected("the socket ended"))??
        {
            WsMessage::Binary(b) => return Ok(protocol::decode(&b)?),
            WsMessage::Close(_) => return Err(unexpected("the server closed the socket")),
            _ => continue,
        }
    }
}

/// The baseline: a WebSocket server that sends every binary frame straight back.
pub async fn echo_server() -> Result<SocketAddr, ServerBenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
                else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_binary() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn echo_client(url: String, bytes: Vec<u8>, until: Instant) -> Result<u64, ServerBenchError> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true).await?;
    let payload: tokio_tungstenite::tungstenite::Bytes = bytes.into();
    let mut n = 0;
    while Instant::now() < until {
        ws.send(WsMessage::Binary(payload.clone())).await?;
        loop {
            match ws
                .next()
                .await
                .ok_or_else(|| unexpected("the echo ended"))??
            {
                WsMessage::Binary(b) if b.len() == payload.len() => break,
                WsMessage::Binary(_) => return Err(unexpected("the echo changed the frame")),
                _ => continue,
            }
        }
        n += 1;
    }
    Ok(n)
}
