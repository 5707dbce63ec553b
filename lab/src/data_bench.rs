//! `tether bench data`: a generated packed data set several times a server's
//! memory budget, served by a real `tether serve` process to clients that speak
//! the protocol and download every shard (checked against the welcome's SHA-256);
//! the server's peak resident memory with the set on disk, against the same set
//! held in memory, side by side.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use sha2::{Digest, Sha256};
use tether_shared::data::{ImageSet, encode_head, encode_images};
use tether_shared::protocol::{Frame, Message};
use tether_shared::rng::SplitMix64;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server_bench::{self, ServerBenchError, peak_rss_mb, rss_mb, ws_config};
use crate::tree_bench::{TreeBenchError, free_port, spawn, status};

/// What to measure.
#[derive(Clone, Debug)]
pub struct DataBench {
    /// The `tether` binary.
    pub exe: PathBuf,
    /// Training images to generate, in MiB of packed pixels.
    pub size_mib: u64,
    /// The server's `--data-memory` for the on-disk run, in MiB.
    pub memory_mib: u64,
    /// Clients, one shard each.
    pub workers: u32,
}

/// One run's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// "disk" or "memory".
    pub mode: &'static str,
    /// The packed training file, MiB.
    pub data_mib: f64,
    /// Server resident memory once ready, MiB.
    pub ready_mib: f64,
    /// Its peak resident memory over the run, MiB.
    pub peak_mib: f64,
    /// Shard bytes downloaded per second, MiB/s.
    pub download_mib_s: f64,
    /// Seconds from start to ready (loading, normalising).
    pub start_s: f64,
}

/// Why the benchmark failed.
#[derive(Debug, Error)]
pub enum DataBenchError {
    /// A file or socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Starting the server failed.
    #[error(transparent)]
    Process(#[from] TreeBenchError),
    /// The protocol failed.
    #[error(transparent)]
    Protocol(#[from] ServerBenchError),
    /// A download was not what the welcome announced, or the server misbehaved.
    #[error("{0}")]
    Run(String),
}

/// Image shape of the generated set (CIFAR-sized).
const SHAPE: [usize; 3] = [3, 32, 32];

/// Generates the set in `dir` (once), then runs the server with it on disk and in
/// memory.
pub async fn run(bench: &DataBench, dir: &Path) -> Result<Vec<Row>, DataBenchError> {
    let data = dir.join("data");
    let image = SHAPE.iter().product::<usize>() as u64;
    let count = (bench.size_mib << 20) / image;
    generate(&data, count as usize)?;
    let data_mib = (std::fs::metadata(data.join("train.tsi"))?.len()) as f64 / 1048576.0;
    let mut rows = Vec::new();
    for (mode, memory) in [("disk", bench.memory_mib), ("memory", bench.size_mib * 4)] {
        let mut row = serve_and_download(bench, &data, &dir.join(mode), memory).await?;
        row.mode = mode;
        row.data_mib = data_mib;
        rows.push(row);
    }
    Ok(rows)
}

/// Writes `count` training images (and 1 000 test images) as a packed set,
/// streamed: never more than one image batch in memory. Class k is a colour.
fn generate(dir: &Path, count: usize) -> Result<(), DataBenchError> {
    std::fs::create_dir_all(dir)?;
    let image: usize = SHAPE.iter().product();
    let label = |i: usize| (i % 10) as u16;
    let mut rng = SplitMix64::new(7);
    let mut pixels = |l: u16, out: &mut Vec<u8>| {
        for c in 0..3 {
            let level = [40u8, 128, 215][(usize::from(l) + c) % 3];
            out.extend((0..image / 3).map(|_| level.saturating_add(rng.below(30) as u8)));
        }
    };
    let path = dir.join("train.tsi");
    let mut out = BufWriter::new(std::fs::File::create(&path)?);
    let labels: Vec<u16> = (0..count).map(label).collect();
    out.write_all(&encode_head(SHAPE, &labels))?;
    let mut batch = Vec::with_capacity(1024 * image);
    for start in (0..count).step_by(1024) {
        batch.clear();
        for i in start..(start + 1024).min(count) {
            pixels(label(i), &mut batch);
        }
        out.write_all(&batch)?;
    }
    out.flush()?;
    let mut test = ImageSet {
        source: "generated".into(),
        channels: SHAPE[0],
        rows: SHAPE[1],
        cols: SHAPE[2],
        pixels: Vec::new(),
        labels: (0..1000).map(label).collect(),
    };
    for &l in &test.labels.clone() {
        pixels(l, &mut test.pixels);
    }
    std::fs::write(dir.join("test.tsi"), encode_images(&test))?;
    Ok(())
}

async fn serve_and_download(
    bench: &DataBench,
    data: &Path,
    dir: &Path,
    memory_mib: u64,
) -> Result<Row, DataBenchError> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let args: Vec<String> = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--run-dir",
        "run",
        "--model",
        "cifar",
        "--data",
        &data.display().to_string(),
        "--data-memory",
        &memory_mib.to_string(),
        "--expected-workers",
        &bench.workers.to_string(),
        "--checkpoint-every",
        "0",
        "--eval-every",
        "100000",
        "--eval-limit",
        "100",
        "--screen-batch",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t0 = Instant::now();
    let mut server = spawn(&bench.exe, &args, dir, "serve.log")?;
    let pid = server.id();
    while status(addr).await.is_none() {
        if t0.elapsed() > Duration::from_secs(600) || server.try_wait()?.is_some() {
            return Err(DataBenchError::Run(format!(
                "the server did not start (see {})",
                dir.join("serve.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_s = t0.elapsed().as_secs_f64();
    let ready_mib = rss_mb(pid).unwrap_or(f64::NAN);
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..bench.workers {
        tasks.push(tokio::spawn(download(addr)));
    }
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await.map_err(|e| DataBenchError::Run(e.to_string()))??;
    }
    let download_s = t1.elapsed().as_secs_f64();
    let peak_mib = peak_rss_mb(pid).unwrap_or(f64::NAN);
    let _ = server.kill();
    let _ = server.wait();
    Ok(Row {
        mode: "",
        data_mib: 0.0,
        ready_mib,
        peak_mib,
        download_mib_s: bytes as f64 / 1048576.0 / download_s,
        start_s,
    })
}

/// Joins as a worker without data, downloads its shard over plain HTTP/1.1 into a
/// hasher, and checks length and SHA-256 against the welcome; returns the bytes.
async fn download(addr: SocketAddr) -> Result<u64, DataBenchError> {
    let url = format!("ws://{addr}/ws");
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true)
            .await
            .map_err(ServerBenchError::from)?;
    ws.send(server_bench::bench_hello(true))
        .await
        .map_err(ServerBenchError::from)?;
    let Frame {
        message: Message::Welcome(welcome),
        ..
    } = server_bench::next(&mut ws).await?
    else {
        return Err(DataBenchError::Run("expected a welcome".into()));
    };
    let d = welcome
        .download
        .ok_or_else(|| DataBenchError::Run("no shard download announced".into()))?;
    let s = welcome.shard;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET /api/shard?index={}&count={}&seed={}&data={} HTTP/1.1\r\nHost: {addr}\r\n\
         x-tether-session: {}\r\nConnection: close\r\n\r\n",
        s.index, s.count, s.seed, d.data, welcome.session
    );
    stream.write_all(request.as_bytes()).await?;
    let (mut hasher, mut body) = (Sha256::new(), 0u64);
    let (mut head, mut in_body) = (Vec::new(), false);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if in_body {
            hasher.update(&buf[..n]);
            body += n as u64;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(DataBenchError::Run(
                    String::from_utf8_lossy(&head[..end]).into_owned(),
                ));
            }
            hasher.update(&head[end + 4..]);
            body += (head.len() - end - 4) as u64;
            in_body = true;
        }
    }
    let _ = ws.close(None).await;
    if body != d.bytes || <[u8; 32]>::from(hasher.finalize()) != d.sha256 {
        return Err(DataBenchError::Run(format!(
            "shard {}/{}: {body} bytes not matching the welcome's {} and SHA-256",
            s.index, s.count, d.bytes
        )));
    }
    Ok(body)
}

/// The table: each mode's memory against its data.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "  mode   data MiB   ready MiB   peak RSS MiB   peak / data   download MiB/s   start s\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{:>6} {:>10.0} {:>11.0} {:>14.0} {:>12.2}× {:>16.0} {:>9.1}\n",
            r.mode,
            r.data_mib,
            r.ready_mib,
            r.peak_mib,
            r.peak_mib / r.data_mib,
            r.download_mib_s,
            r.start_s
        ));
    }
    out
}
