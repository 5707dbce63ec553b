//! A server open to strangers (issue #10), attacked as a stranger would: clients that
//! stop reading, updates crafted to sit just under the norm guard, checkpoint
//! triggers fired at once. Each test failed before its fix.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tether_server::{RunSettings, ServerConfig, checkpoint};
use tether_shared::algorithms::Algorithm;
use tether_shared::protocol::{Apply, Message, Sync};
use tether_tests::net::{RawClient, TestServer, hello, http, sync};
use tether_tests::scratch;
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig, WorkReport};
use tokio::sync::watch;

const ADMIN: &str = "hardening-admin";

fn config(name: &str, algorithm: Algorithm) -> Result<ServerConfig> {
    let mut run = RunSettings::defaults(algorithm);
    run.tau = 4;
    run.batch = 32;
    let mut c = ServerConfig::new(run);
    c.eval_every = None;
    c.eval_limit = Some(2000);
    c.checkpoint_every = None;
    c.run_dir = Some(scratch(name)?);
    Ok(c)
}

/// Polls `check` every 50 ms for up to `within`.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// A worker that syncs and then never reads again loses its seat within the send
/// timeout, and an honest worker gets in (the cap is one worker). Before the fix
/// the server waited forever on the goodbye frame it sent, holding the seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_seat() -> Result<()> {
    let mut cfg = config("hardening-slow-reader", Algorithm::Easgd)?;
    cfg.max_workers = 1;
    cfg.send_timeout = Duration::from_secs(1);
    cfg.idle_timeout = Duration::from_secs(600); // the send timeout must do it alone
    let server = TestServer::start(cfg).await?;
    let (mut greedy, welcome, center) = RawClient::join(&server.ws_url(), hello()).await?;
    // Sync on and on without reading a reply: the replies (1.7 MB each) fill the
    // socket buffers until the server's sends time out.
    let mut sent = 0u64;
    for seq in 1..=200 {
        let frame = sync(welcome.session, seq, welcome.center_version);
        match tokio::time::timeout(Duration::from_secs(3), greedy.send(&frame, &center)).await {
            Ok(Ok(())) => sent += 1,
            _ => break, // the server stopped reading us
        }
    }
    assert!(sent > 2, "sent {sent}");
    let state = server.state.clone();
    let freed = eventually(Duration::from_secs(10), || state.workers().is_empty()).await;
    assert!(freed, "the silent reader still holds its seat");
    let (mut honest, w, c) = RawClient::join(&server.ws_url(), hello()).await?;
    honest
        .send(&sync(w.session, 1, w.center_version), &c)
        .await?;
    assert!(matches!(honest.recv().await?.message, Message::Reply(_)));
    drop(greedy);
    server.stop().await?;
    Ok(())
}

/// Concurrent "checkpoint now" calls while the center moves: every call succeeds and
/// every manifest on disk verifies. Before the fix, writers of one version shared a
/// temp file: most manifests failed their own SHA-256 and calls failed with 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkpoint_triggers_leave_only_valid_checkpoints() -> Result<()> {
    let mut cfg = config("hardening-checkpoints", Algorithm::Easgd)?;
    cfg.admin_token = Some(ADMIN.into());
    cfg.keep_checkpoints = 100;
    let dir = cfg.run_dir.clone().context("run dir")?;
    let server = TestServer::start(cfg).await?;
    let (mut client, welcome, center) = RawClient::join(&server.ws_url(), hello()).await?;
    let auth = format!("Bearer {ADMIN}");
    let headers = [("Authorization", auth.as_str())];
    let mut version = welcome.center_version;
    for seq in 1..=5u64 {
        let calls =
            (0..8).map(|_| http(server.addr, "POST", "/api/admin/checkpoint", &headers, b""));
        for r in futures_util::future::join_all(calls).await {
            let r = r?;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        client
            .send(&sync(welcome.session, seq, version), &center)
            .await?;
        match client.recv().await?.message {
            Message::Reply(r) => version = r.center_version,
            other => bail!("expected a reply, got {other:?}"),
        }
    }
    server.stop().await?;
    let mut manifests = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(!name.ends_with(".tmp"), "temp file left: {name}");
        if name.starts_with("ckpt-") && name.ends_with(".json") {
            checkpoint::verify(&path).map_err(anyhow::Error::msg)?;
            manifests += 1;
        }
    }
    // Versions 0..=5 (the first round checkpoints the initial center), no duplicates.
    assert_eq!(manifests, 6);
    Ok(())
}

/// Trains one honest EAMSGD worker for `steps`, with `attack` pushes from a
/// malicious client sitting just under the norm guard (along −x̃, the push that
/// flipped the center before), and returns the center's test accuracy.
async fn poisoned_run(name: &str, steps: u64, attack: u32) -> Result<(f64, u32, u32)> {
    let mut cfg = config(name, Algorithm::Eamsgd)?;
    cfg.run.tau = 4;
    cfg.run.batch = 64;
    cfg.run.expected_workers = 4;
    let server = TestServer::start(cfg).await?;
    let mut w = WorkConfig::new(server.ws_url());
    w.backend = BackendChoice::Cpu;
    w.max_steps = Some(steps);
    w.overlap = false;
    w.progress = false;
    let (_stop, stop) = watch::channel(false);
    let honest = tokio::spawn(client::run(w, stop));
    let state = server.state.clone();
    let url = server.ws_url();
    let attacker = async move {
        let (mut evil, welcome, center) = RawClient::join(&url, hello()).await?;
        let (mut anchor, mut seen) = (center, welcome.center_version);
        let (mut accepted, mut refused) = (0u32, 0u32);
        // Wait until the honest worker has synced, so there is a typical figure.
        eventually(Duration::from_secs(60), || state.center().version() > 1).await;
        for seq in 1..=u64::from(attack) {
            let (c, bound) = {
                let c = state.center();
                (c.params().to_vec(), c.progress_bound())
            };
            let norm = c.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let step = (0.99 * bound / norm) as f32;
            let x: Vec<f32> = anchor.iter().zip(&c).map(|(a, cv)| a - step * cv).collect();
            let frame = Message::Sync(Sync {
                seq,
                center_version: seen,
                ..sync_fields(welcome.session)
            });
            evil.send(&frame, &x).await?;
            let reply = evil.recv().await?;
            match reply.message {
                Message::Reply(r) => {
                    assert_eq!(r.apply, Apply::Subtract);
                    anchor = x.iter().zip(&reply.payload).map(|(x, d)| x - d).collect();
                    seen = r.center_version;
                    accepted += 1;
                }
                Message::Reject { .. } => refused += 1,
                other => bail!("unexpected {other:?}"),
            }
            // In the run's rhythm: one push per honest exchange (a flood is the
            // rate question, see ARCHITECTURE.md).
            let mine = seen;
            eventually(Duration::from_secs(10), || state.center().version() > mine).await;
            seen = state.center().version();
        }
        Ok::<_, anyhow::Error>((accepted, refused))
    };
    let (accepted, refused) = if attack > 0 { attacker.await? } else { (0, 0) };
    let report: WorkReport = honest.await??;
    assert_eq!((report.steps, report.rejections), (steps, 0), "{report:?}");
    let state = server.state.clone();
    let eval = tokio::task::spawn_blocking(move || state.evaluate_now()).await?;
    server.stop().await?;
    Ok((eval.accuracy, accepted, refused))
}

fn sync_fields(session: u64) -> Sync {
    match sync(session, 1, 0) {
        Message::Sync(s) => s,
        _ => unreachable!("sync() builds a sync"),
    }
}

/// The push that flipped the center before (just under the old bound of 5‖x̃‖,
/// along −x̃: 88 % → 9 %) is refused now, and leaves the center bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_that_flipped_the_center_is_refused() -> Result<()> {
    let server = TestServer::start(config("hardening-flip", Algorithm::Eamsgd)?).await?;
    let mut w = WorkConfig::new(server.ws_url());
    w.backend = BackendChoice::Cpu;
    w.max_steps = Some(40);
    w.progress = false;
    let (_stop, stop) = watch::channel(false);
    let report = client::run(w, stop).await?;
    assert_eq!(report.rejections, 0);
    let (mut evil, welcome, center) = RawClient::join(&server.ws_url(), hello()).await?;
    // x̃ − 4.95 ‖x̃‖ x̂: distance 4.95 ‖x̃‖, under the old bound of 10 × ‖x̃‖ / 2.
    let x: Vec<f32> = center.iter().map(|c| c - 4.95 * c).collect();
    let before = server.state.center().params().to_vec();
    evil.send(&sync(welcome.session, 1, welcome.center_version), &x)
        .await?;
    match evil.recv().await?.message {
        Message::Reject { reason, .. } => {
            assert_eq!(reason, tether_shared::protocol::Rejection::OutOfLine);
            let text = reason.to_string();
            assert!(
                !text.chars().any(|c| c.is_ascii_digit()),
                "a threshold in: {text}"
            );
        }
        other => bail!("expected a rejection, got {other:?}"),
    }
    assert!(server.state.center().params() == before.as_slice());
    server.stop().await?;
    Ok(())
}

/// The measurement: a malicious worker sends 100 updates just under the
/// guard (along −x̃, one per honest exchange, through the whole run) while one
/// honest worker trains. Before the fix one such push took the center to 9 %.
/// With the progress guard no push flips it, but a worker with half the exchanges
/// still drags it: measured 62–67 % against 87 % clean (the issue's < 1 point is
/// not met; see the closing note of issue #10 and ARCHITECTURE.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_just_under_the_guard_cannot_flip_the_center() -> Result<()> {
    let steps = 440;
    let (clean, _, _) = poisoned_run("hardening-clean", steps, 0).await?;
    let (attacked, accepted, refused) = poisoned_run("hardening-poisoned", steps, 100).await?;
    eprintln!(
        "poisoning: clean {:.2} %, attacked {:.2} % ({accepted} pushes accepted, {refused} refused)",
        clean * 100.0,
        attacked * 100.0
    );
    assert!(
        accepted >= 90,
        "the attack must really reach the center: {accepted}"
    );
    assert!(clean > 0.8, "the clean run learns: {clean:.4}");
    assert!(attacked > 0.4, "clean {clean:.4} vs attacked {attacked:.4}");
    Ok(())
}
