//! The reliability suite (issue #10): a real `tether serve` process fuzzed, cycled,
//! starved, killed with SIGKILL mid-checkpoint and poisoned, with a table of
//! figures against targets. CI runs it short; `scripts/reliability.sh` runs it at
//! full size (`TETHER_RELIABILITY=full`) and keeps the table in RELIABILITY.md.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tether_server::checkpoint;
use tether_shared::codec::Encoding;
use tether_shared::protocol::{self, Message, PREFIX_BYTES, StopReason, Sync};
use tether_shared::rng::SplitMix64;
use tether_tests::net::{RawClient, http, http_get, sync, tcp_from};
use tether_tests::scratch;
use tether_tests::serve::Serve;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ADMIN: &str = "reliability-admin";

/// How much of each check to run.
struct Size {
    full: bool,
    frames: u64,
    cycles: u64,
    half_open: usize,
    slow_readers: usize,
    kills: u64,
    trigger_rounds: usize,
}

impl Size {
    fn from_env() -> Self {
        if std::env::var("TETHER_RELIABILITY").as_deref() == Ok("full") {
            Self {
                full: true,
                frames: 1_000_000,
                cycles: 1_000,
                half_open: 100,
                slow_readers: 4,
                kills: 100,
                trigger_rounds: 20,
            }
        } else {
            Self {
                full: false,
                frames: 20_000,
                cycles: 100,
                half_open: 40,
                slow_readers: 2,
                kills: 5,
                trigger_rounds: 4,
            }
        }
    }
}

/// One line of the table.
struct Row {
    check: &'static str,
    figures: String,
    target: String,
    pass: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliability_suite() -> Result<()> {
    let size = Size::from_env();
    tether_tests::tether_bin()?; // built before the clocks start
    let mut rows = Vec::new();
    let t = Instant::now();
    rows.push((fuzz(&size).await.context("fuzzing")?, t.elapsed()));
    let t = Instant::now();
    rows.push((
        connect_cycles(&size).await.context("connect cycles")?,
        t.elapsed(),
    ));
    let t = Instant::now();
    rows.push((
        slow_clients(&size).await.context("slow clients")?,
        t.elapsed(),
    ));
    let t = Instant::now();
    let kills = kills_during_checkpoints(&size)
        .await
        .context("kill -9 cycles")?;
    rows.push((kills, t.elapsed()));
    let t = Instant::now();
    let triggers = concurrent_triggers(&size)
        .await
        .context("checkpoint triggers")?;
    rows.push((triggers, t.elapsed()));
    if size.full {
        let t = Instant::now();
        rows.push((poisoning().await.context("poisoning")?, t.elapsed()));
    }
    let mut table =
        String::from("| check | figures | target | met | took |\n|---|---|---|---|---|\n");
    for (r, took) in &rows {
        let mark = if r.pass { "yes" } else { "**no**" };
        table.push_str(&format!(
            "| {} | {} | {} | {mark} | {:.0} s |\n",
            r.check,
            r.figures,
            r.target,
            took.as_secs_f64()
        ));
    }
    let rows: Vec<Row> = rows.into_iter().map(|(r, _)| r).collect();
    println!(
        "\nreliability suite ({}):\n{table}",
        if size.full { "full" } else { "short" }
    );
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass).map(|r| r.check).collect();
    assert!(failed.is_empty(), "missed targets: {failed:?}\n{table}");
    Ok(())
}

// ---------- the server's resources, from /proc ----------

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// Panics the server logged (tokio prints them and keeps serving).
fn panics(log: &[String]) -> usize {
    log.iter().filter(|l| l.contains("panicked")).count()
}

async fn center_bytes(addr: SocketAddr) -> Result<Vec<u8>> {
    let auth = format!("Bearer {ADMIN}");
    let r = http(
        addr,
        "GET",
        "/api/admin/center.safetensors",
        &[("Authorization", &auth)],
        b"",
    )
    .await?;
    if r.status != 200 {
        bail!("center download: {} {}", r.status, r.text());
    }
    Ok(r.body)
}

async fn rejections(addr: SocketAddr) -> Result<u64> {
    let s: serde_json::Value = serde_json::from_str(&http_get(addr, "/api/status").await?)?;
    let rejects = s["rejects"].as_object().context("rejects")?;
    Ok(rejects.values().filter_map(|v| v.as_u64()).sum())
}

fn serve(name: &str, extra: &[&str]) -> Result<Serve> {
    let dir = scratch(name)?.join("run");
    let mut args = vec!["--admin-token", ADMIN, "--checkpoint-every", "0"];
    args.extend_from_slice(extra);
    Serve::start(&dir, &args)
}

fn stop(serve: Serve) -> Result<Vec<String>> {
    Ok(serve.terminate()?.lines().map(String::from).collect())
}

// ---------- 1. fuzzed frames ----------

/// Well-formed frames of every shape for session `session`, to be mutated.
fn templates(session: u64, center: &[f32]) -> Vec<Vec<u8>> {
    let full = center.len();
    let mut nan = center.to_vec();
    nan[full / 2] = f32::NAN;
    let sync_of = |session, seq| match sync(session, seq, 0) {
        Message::Sync(s) => Message::Sync(Sync { seq, ..s }),
        _ => unreachable!("sync() builds a sync"),
    };
    let mut out = vec![
        protocol::encode(&Message::Hello(tether_tests::net::hello()), &[]),
        protocol::encode(&Message::Heartbeat { session }, &[]),
        protocol::encode(&Message::Leave { session }, &[]),
        protocol::encode(&Message::Stop(StopReason::Finished), &[]),
        protocol::encode(
            &Message::Reject {
                seq: Some(1),
                reason: protocol::Rejection::OutOfLine,
            },
            &[],
        ),
        protocol::encode(&Message::Heartbeat { session: !session }, &[]),
    ];
    // Syncs the server must refuse whatever the mutation leaves: a payload of the
    // wrong length, seq 0, a NaN, another session.
    for count in [0usize, 1, 7, 1000] {
        for encoding in [Encoding::F32, Encoding::F16, Encoding::Bf16, Encoding::Q8] {
            out.push(protocol::encode_as(
                &sync_of(session, 1),
                &center[..count],
                encoding,
            ));
        }
    }
    out.push(protocol::encode(&sync_of(session, 0), &center[..2000]));
    out.push(protocol::encode(&sync_of(!session, 3), &center[..64]));
    // Full-size ones are costly to send: a few of them, picked rarely (see `pick`).
    out.push(protocol::encode(&sync_of(session, 0), center));
    out.push(protocol::encode(&sync_of(session, 2), &nan));
    out.push(protocol::encode_as(
        &sync_of(!session, 2),
        center,
        Encoding::Q8,
    ));
    out
}

/// Full-size templates sit at the end of the list; one frame in 1 000 uses one.
const FULL_SIZE_TEMPLATES: usize = 3;

fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    if rng.below(1000) == 0 {
        n - 1 - rng.below(FULL_SIZE_TEMPLATES)
    } else {
        rng.below(n - FULL_SIZE_TEMPLATES)
    }
}

/// One mutation of `frame`: bit flips, overwritten bytes, truncation, extension,
/// corrupted length fields or encoding byte, spliced headers, or pure noise.
fn mutate(frame: &[u8], other: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut f = frame.to_vec();
    let byte = |rng: &mut SplitMix64| rng.next_u64() as u8;
    let header_end = |f: &[u8]| {
        f.get(..4)
            .map(|b| PREFIX_BYTES + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(0)
    };
    let edges = [0u32, 1, 2, 255, 65_535, u32::MAX, u32::MAX / 4];
    match rng.below(10) {
        0 => {
            for _ in 0..=rng.below(8) {
                let i = rng.below(f.len().max(1));
                if let Some(b) = f.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            // Inside the header, where the structure is.
            let end = header_end(&f).clamp(1, f.len().max(1));
            for _ in 0..=rng.below(16) {
                let i = rng.below(end);
                if let Some(b) = f.get_mut(i) {
                    *b = byte(rng);
                }
            }
        }
        2 => f.truncate(rng.below(f.len() + 1)),
        3 => f.extend((0..=rng.below(64)).map(|_| byte(rng))),
        4 | 5 => {
            let at = if rng.below(2) == 0 { 0 } else { 4 };
            let v = if rng.below(2) == 0 {
                edges[rng.below(edges.len())]
            } else {
                rng.next_u64() as u32
            };
            if f.len() >= at + 4 {
                f[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        6 => {
            let at = header_end(&f);
            if let Some(b) = f.get_mut(at) {
                *b = byte(rng);
            }
        }
        7 => {
            // This frame's prefix and header, another frame's payload.
            let end = header_end(&f).min(f.len());
            let other_end = header_end(other).min(other.len());
            f.truncate(end);
            f.extend_from_slice(&other[other_end..]);
        }
        8 => {
            f = (0..rng.below(512)).map(|_| byte(rng)).collect();
        }
        _ => {
            // Postcard varints at their edges: a run of 0xff in the header.
            let end = header_end(&f).clamp(1, f.len().max(1));
            let start = rng.below(end);
            for b in f.iter_mut().skip(start).take(1 + rng.below(12)) {
                *b = 0xff;
            }
        }
    }
    f
}

/// Whether the server might accept `frame` from session `session`: a sync of the
/// right length, a later seq and finite values, or this session's heartbeat or
/// leave. The fuzzer sends everything else, so every frame it sends must be
/// refused with a typed rejection and the center must not move.
fn acceptable(frame: &[u8], session: u64, params: usize) -> bool {
    let Ok(f) = protocol::decode(frame) else {
        return false;
    };
    match f.message {
        Message::Sync(s) => {
            s.session == session
                && s.seq > 0
                && f.payload.len() == params
                && f.encoding == Encoding::F32
                && f.payload.iter().all(|v| v.is_finite())
        }
        Message::Heartbeat { session: s } | Message::Leave { session: s } => s == session,
        _ => false,
    }
}

async fn fuzz(size: &Size) -> Result<Row> {
    let server = serve("reliability-fuzz", &["--max-workers", "4"])?;
    let addr = server.addr;
    let url = format!("ws://{addr}/ws");
    let before = center_bytes(addr).await?;
    let rejected_before = rejections(addr).await?;
    let mut rng = SplitMix64::new(0x5eed_f422);
    let (mut sent, mut skipped, mut answered, mut sessions) = (0u64, 0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while sent < size.frames {
        let (client, welcome, center) = RawClient::join(&url, tether_tests::net::hello()).await?;
        sessions += 1;
        let params = center.len();
        let templates = templates(welcome.session, &center);
        let (mut tx, mut rx) = client.into_socket().split();
        // Every refused frame is answered with one rejection; count them.
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    WsMessage::Binary(b) => {
                        if matches!(
                            protocol::decode(&b).map(|f| f.message),
                            Ok(Message::Reject { .. })
                        ) {
                            n += 1;
                        }
                    }
                    WsMessage::Close(_) => break,
                    _ => {}
                }
            }
            n
        });
        let mut sent_here = 0u64;
        while sent < size.frames {
            let t = pick(&mut rng, templates.len());
            let other = &templates[rng.below(templates.len())];
            let frame = mutate(&templates[t], other, &mut rng);
            if acceptable(&frame, welcome.session, params) {
                skipped += 1;
                continue;
            }
            // A text frame now and then: not part of the protocol either.
            let message = if rng.below(200) == 0 {
                WsMessage::Text(String::from_utf8_lossy(&frame).into_owned().into())
            } else {
                WsMessage::Binary(frame.into())
            };
            if tx.feed(message).await.is_err() {
                break;
            }
            sent += 1;
            sent_here += 1;
            if sent_here.is_multiple_of(256) && tx.flush().await.is_err() {
                break;
            }
        }
        let _ = tx.flush().await;
        // Wait for the answers to every frame, then close.
        let want = sent_here;
        let t = Instant::now();
        while rejections(addr).await? - rejected_before < answered + want
            && t.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = tx.send(WsMessage::Close(None)).await;
        answered += tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .context("the rejections stopped coming")??;
    }
    let rate = sent as f64 / t0.elapsed().as_secs_f64();
    let after = center_bytes(addr).await?;
    let counted = rejections(addr).await? - rejected_before;
    let identical = before == after;
    let log = stop(server)?;
    let panicked = panics(&log);
    let pass = sent >= size.frames
        && answered == sent
        && counted == sent
        && identical
        && panicked == 0
        && sessions == 1;
    Ok(Row {
        check: "fuzzed frames (all shapes, one session)",
        figures: format!(
            "{sent} sent ({rate:.0}/s), {answered} typed rejections back, {skipped} acceptable mutants not sent, {panicked} panics, center {}",
            if identical {
                "bit-identical"
            } else {
                "CHANGED"
            }
        ),
        target: format!(
            "≥ {} sent, each rejected, 0 panics, center bit-identical",
            size.frames
        ),
        pass,
    })
}

// ---------- 2. connect / disconnect cycles ----------

async fn connect_cycles(size: &Size) -> Result<Row> {
    let server = serve("reliability-cycles", &["--max-workers", "4"])?;
    let (addr, pid) = (server.addr, server.child.id());
    let url = format!("ws://{addr}/ws");
    let warm = size.cycles / 10;
    let mut at_warm = (0, 0.0);
    for i in 0..size.cycles {
        if i == warm {
            tokio::time::sleep(Duration::from_millis(500)).await;
            at_warm = (open_fds(pid)?, rss_mib(pid)?);
        }
        let (mut c, w, _) = RawClient::join(&url, tether_tests::net::hello()).await?;
        c.send(&Message::Leave { session: w.session }, &[]).await?;
        drop(c);
        http_get(addr, "/api/status").await?;
    }
    let t = Instant::now();
    let mut settled = (open_fds(pid)?, rss_mib(pid)?);
    while settled.0 > at_warm.0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        settled = (open_fds(pid)?, rss_mib(pid)?);
    }
    let status: serde_json::Value = serde_json::from_str(&http_get(addr, "/api/status").await?)?;
    let left = status["workers"].as_array().map_or(0, Vec::len);
    let panicked = panics(&stop(server)?);
    let growth = settled.1 - at_warm.1;
    let pass = settled.0 <= at_warm.0 && growth <= 16.0 && left == 0 && panicked == 0;
    Ok(Row {
        check: "connect / disconnect cycles",
        figures: format!(
            "{} cycles (join, welcome of the whole center, leave, one HTTP request): fds {} → {}, RSS {:.1} → {:.1} MiB, {left} workers left, {panicked} panics",
            size.cycles, at_warm.0, settled.0, at_warm.1, settled.1
        ),
        target: "fds flat, RSS within 16 MiB of the warm figure, registry empty".into(),
        pass,
    })
}

// ---------- 3. slow readers and half-open requests ----------

async fn slow_clients(size: &Size) -> Result<Row> {
    use tokio::io::AsyncWriteExt;
    let server = serve(
        "reliability-slow",
        &[
            "--request-timeout",
            "2",
            "--send-timeout",
            "2",
            "--idle-timeout",
            "600",
            "--screen-batch",
            "0",
        ],
    )?;
    let (addr, pid) = (server.addr, server.child.id());
    http_get(addr, "/api/status").await?;
    let base = open_fds(pid)?;
    // Half-open requests from one address, never finished.
    let mut half_open = Vec::new();
    for _ in 0..size.half_open {
        let mut s = tcp_from([127, 0, 0, 2], addr).await?;
        s.write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never: ")
            .await?;
        half_open.push(s);
    }
    // Workers that sync on and on and never read a reply (1.7 MB each).
    let url = format!("ws://{addr}/ws");
    let mut readers = Vec::new();
    for _ in 0..size.slow_readers {
        let (mut c, w, center) = RawClient::join(&url, tether_tests::net::hello()).await?;
        readers.push(tokio::spawn(async move {
            for seq in 1..=100 {
                let frame = sync(w.session, seq, w.center_version);
                let sent =
                    tokio::time::timeout(Duration::from_secs(3), c.send(&frame, &center)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            c // held, unread, until the test drops it
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = open_fds(pid)?;
    // The server answers others all along.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        http_get(addr, "/api/status").await?;
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Resources come back without the clients doing anything.
    let t = Instant::now();
    let mut now = open_fds(pid)?;
    while now > base && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = open_fds(pid)?;
    }
    let recovered = t.elapsed();
    let status: serde_json::Value = serde_json::from_str(&http_get(addr, "/api/status").await?)?;
    let workers = status["workers"].as_array().map_or(0, Vec::len);
    drop(half_open);
    for r in readers {
        drop(r.await?);
    }
    let panicked = panics(&stop(server)?);
    let pass = now <= base && workers == 0 && slowest < Duration::from_secs(1) && panicked == 0;
    Ok(Row {
        check: "slow readers and half-open requests",
        figures: format!(
            "{} half-open + {} non-reading workers: fds {base} → {peak} → {now} ({:.1} s after the peak, timeouts 2 s), status answered in ≤ {:.0} ms meanwhile, {workers} workers left",
            size.half_open,
            size.slow_readers,
            recovered.as_secs_f64(),
            slowest.as_secs_f64() * 1e3
        ),
        target: "answers < 1 s throughout, fds back to the baseline, registry empty".into(),
        pass,
    })
}

// ---------- 4. kill -9 during checkpoint writes ----------

/// The newest checkpoint in `dir` that verifies (checked here, independently of
/// the server), and how many temp files an interrupted write left.
fn newest_verified(dir: &Path) -> Result<(Option<u64>, usize)> {
    let (mut newest, mut temps) = (None, 0);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".tmp") {
            temps += 1;
        }
        if name.starts_with("ckpt-")
            && name.ends_with(".json")
            && let Ok((snap, _)) = checkpoint::verify(&path)
        {
            newest = newest.max(Some(snap.version));
        }
    }
    Ok((newest, temps))
}

/// Syncs and "checkpoint now" calls as fast as they go, until aborted; the newest
/// version a checkpoint call acknowledged goes into `acked`.
async fn churn(addr: SocketAddr, acked: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::Ordering::Relaxed;
    let url = format!("ws://{addr}/ws");
    let syncing = async {
        let Ok((mut c, w, center)) = RawClient::join(&url, tether_tests::net::hello()).await else {
            return;
        };
        let mut version = w.center_version;
        for seq in 1.. {
            match c.exchange(w.session, seq, version, &center).await {
                Ok(v) => version = v,
                Err(_) => return,
            }
        }
    };
    let auth = format!("Bearer {ADMIN}");
    let checkpointing = async {
        loop {
            let headers = [("Authorization", auth.as_str())];
            match http(addr, "POST", "/api/admin/checkpoint", &headers, b"").await {
                Ok(r) if r.status == 200 => {
                    if let Some(v) = r.json().ok().and_then(|j| j["version"].as_u64()) {
                        acked.fetch_max(v, Relaxed);
                    }
                }
                _ => return,
            }
        }
    };
    tokio::join!(syncing, checkpointing);
}

async fn kills_during_checkpoints(size: &Size) -> Result<Row> {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = scratch("reliability-kills")?.join("run");
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut rng = SplitMix64::new(0x00c0_ffee);
    let (mut bad_resumes, mut lost, mut mid_write, mut versions) = (0u64, 0u64, 0usize, Vec::new());
    for cycle in 0..size.kills {
        let mut args = vec![
            "--admin-token",
            ADMIN,
            "--checkpoint-every",
            "0",
            "--screen-batch",
            "0",
            "--keep-checkpoints",
            "3",
        ];
        let expected = if cycle > 0 {
            args.push("--resume");
            let (newest, temps) = newest_verified(&dir)?;
            mid_write += usize::from(temps > 0);
            newest
        } else {
            None
        };
        let mut serve = match Serve::start(&dir, &args) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cycle {cycle}: the server did not come back: {e:#}");
                bad_resumes += 1;
                continue;
            }
        };
        if let Some(expected) = expected {
            let s = serve.status().await?;
            let resumed = s["center_version"].as_u64().context("version")?;
            versions.push(resumed);
            if resumed != expected {
                eprintln!("cycle {cycle}: resumed v{resumed}, newest verified is v{expected}");
                bad_resumes += 1;
            }
            if expected < acked.load(Relaxed) {
                lost += 1;
            }
        }
        let churning = tokio::spawn(churn(serve.addr, acked.clone()));
        tokio::time::sleep(Duration::from_millis(150 + rng.below(500) as u64)).await;
        serve.child.kill()?; // SIGKILL
        serve.child.wait()?;
        churning.abort();
    }
    let (newest, _) = newest_verified(&dir)?;
    let pass = bad_resumes == 0 && lost == 0 && newest.is_some();
    Ok(Row {
        check: "kill -9 during checkpoint writes",
        figures: format!(
            "{} kills while syncing and checkpointing nonstop, {mid_write} of them mid-write (temp file left), {bad_resumes} bad resumes, {lost} acknowledged checkpoints lost, resumed versions {}..{}",
            size.kills,
            versions.first().unwrap_or(&0),
            versions.last().unwrap_or(&0)
        ),
        target: "0 bad resumes (each resumes the newest checkpoint that verifies), 0 lost".into(),
        pass,
    })
}

// ---------- 5. concurrent checkpoint triggers ----------

async fn concurrent_triggers(size: &Size) -> Result<Row> {
    let dir = scratch("reliability-triggers")?.join("run");
    let flags = [
        "--admin-token",
        ADMIN,
        "--checkpoint-every",
        "0",
        "--keep-checkpoints",
        "1000",
        "--screen-batch",
        "0",
    ];
    let server = Serve::start(&dir, &flags)?;
    let addr = server.addr;
    let url = format!("ws://{addr}/ws");
    let (mut c, w, center) = RawClient::join(&url, tether_tests::net::hello()).await?;
    let auth = format!("Bearer {ADMIN}");
    let headers = [("Authorization", auth.as_str())];
    let (mut calls, mut failed, mut version) = (0usize, 0usize, w.center_version);
    for seq in 1..=size.trigger_rounds as u64 {
        let round = (0..16).map(|_| http(addr, "POST", "/api/admin/checkpoint", &headers, b""));
        for r in futures_util::future::join_all(round).await {
            calls += 1;
            failed += usize::from(!r.is_ok_and(|r| r.status == 200));
        }
        version = c.exchange(w.session, seq, version, &center).await?;
    }
    drop(c);
    let panicked = panics(&stop(server)?);
    let (mut manifests, mut bad) = (0, 0);
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if file.starts_with("ckpt-") && file.ends_with(".json") {
            manifests += 1;
            bad += usize::from(checkpoint::verify(&path).is_err());
        }
    }
    Ok(Row {
        check: "concurrent checkpoint triggers",
        figures: format!(
            "{calls} calls in rounds of 16 while the center moves: {failed} failed, {manifests} manifests, {bad} bad, {panicked} panics"
        ),
        target: "0 failed calls, 0 bad manifests".into(),
        pass: failed == 0 && bad == 0 && manifests > size.trigger_rounds && panicked == 0,
    })
}

// ---------- 6. poisoning ----------

async fn poisoning() -> Result<Row> {
    let steps = 440;
    let (clean, _, _, _) = crate::hardening::poisoned_run("reliability-clean", steps, 0).await?;
    let (attacked, answered, refused, held) =
        crate::hardening::poisoned_run("reliability-poisoned", steps, 100).await?;
    let change = (attacked - clean) * 100.0;
    Ok(Row {
        check: "poisoning (100 pushes just under the guard along −x̃, 1 honest EAMSGD worker)",
        figures: format!(
            "clean {:.2} %, attacked {:.2} % ({change:+.2} points); {answered} pushes answered, {refused} refused, {held} syncs held",
            clean * 100.0,
            attacked * 100.0
        ),
        target: "accuracy change > −1 point".into(),
        pass: change > -1.0,
    })
}
