//! The browser-facing server against real sockets: the pages and the wasm are
//! served, browsers are held to their origin and need a join ticket, a browser
//! worker's protocol code (run natively here) trains and moves the center, the
//! operator's controls work only with the admin token, and the live feed pushes.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use futures_util::StreamExt;
use tether_client_wasm::volunteer::{Event, Volunteer};
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::data::ImagesHead;
use tether_shared::protocol::{Message, Rejection, WorkerKind};
use tether_tests::net::{RawClient, TestServer, hello, http, sync};
use tether_tests::scratch;

const ADMIN: &str = "s3cret-admin";

fn config(name: &str) -> Result<ServerConfig> {
    let mut run = RunSettings::defaults(Algorithm::Easgd);
    run.tau = 2;
    run.batch = 16;
    let mut c = ServerConfig::new(run);
    c.eval_every = None;
    c.checkpoint_every = None;
    c.run_dir = Some(scratch(name)?);
    Ok(c)
}

fn origin(server: &TestServer) -> String {
    format!("http://{}", server.addr)
}

async fn ticket(server: &TestServer) -> Result<(String, String)> {
    let r = http(
        server.addr,
        "POST",
        "/api/join",
        &[("Origin", &origin(server))],
        b"",
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json()?;
    Ok((
        j["ticket"].as_str().context("ticket")?.to_string(),
        j["data"].as_str().context("data")?.to_string(),
    ))
}

#[tokio::test]
async fn pages_scripts_and_the_wasm_are_served() -> Result<()> {
    let server = TestServer::start(config("web-assets")?).await?;
    let page = http(server.addr, "GET", "/", &[], b"").await?;
    assert_eq!(page.status, 200);
    assert!(page.head.contains("text/html"));
    assert!(page.text().contains("/web/app.js"), "{}", page.text());
    let volunteer = http(server.addr, "GET", "/volunteer", &[], b"").await?;
    assert!(volunteer.text().contains("mountVolunteer"));
    for path in [
        "/web/app.js",
        "/web/worker.js",
        "/web/vendor/uPlot.iife.min.js",
    ] {
        let r = http(server.addr, "GET", path, &[], b"").await?;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.head.contains("text/javascript"), "{path}: {}", r.head);
    }
    // The wasm goes out gzipped to browsers (they all accept it), inflated to a
    // client that refuses gzip, and as a 304 to one that already has it.
    let path = "/web/pkg/tether_client_wasm_bg.wasm";
    let gz = http(
        server.addr,
        "GET",
        path,
        &[("Accept-Encoding", "gzip, deflate, br")],
        b"",
    )
    .await?;
    assert_eq!(gz.status, 200);
    assert!(gz.head.contains("application/wasm"), "{}", gz.head);
    assert!(gz.head.contains("content-encoding: gzip"), "{}", gz.head);
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&gz.body[..]).read_to_end(&mut inflated)?;
    assert_eq!(&inflated[..4], b"\0asm");
    assert!(
        gz.body.len() * 3 < inflated.len(),
        "the wasm compresses well"
    );
    for refusing in [&[][..], &[("Accept-Encoding", "gzip;q=0, identity")][..]] {
        let plain = http(server.addr, "GET", path, refusing, b"").await?;
        assert_eq!(plain.status, 200);
        assert!(!plain.head.contains("content-encoding"), "{}", plain.head);
        assert!(plain.body == inflated, "the same wasm, uncompressed");
    }
    let etag = gz
        .head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .context("the wasm has an ETag")?
        .to_string();
    let again = http(server.addr, "GET", path, &[("If-None-Match", &etag)], b"").await?;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    let other = http(
        server.addr,
        "GET",
        "/web/app.js",
        &[("If-None-Match", &etag)],
        b"",
    )
    .await?;
    assert_eq!(other.status, 200, "another file's ETag does not match");
    let missing = http(server.addr, "GET", "/web/../Cargo.toml", &[], b"").await?;
    assert_eq!(missing.status, 404);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn browsers_need_their_own_origin_and_a_ticket() -> Result<()> {
    let mut c = config("web-origin")?;
    c.allowed_origins = vec!["https://lab.example.org".into()];
    let server = TestServer::start(c).await?;
    // No Origin: not a browser, no ticket.
    let r = http(server.addr, "POST", "/api/join", &[], b"").await?;
    assert_eq!(r.status, 403, "{}", r.text());
    // A foreign page.
    let r = http(
        server.addr,
        "POST",
        "/api/join",
        &[("Origin", "http://evil.example")],
        b"",
    )
    .await?;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("not allowed"), "{}", r.text());
    // An origin the operator allowed.
    let r = http(
        server.addr,
        "POST",
        "/api/join",
        &[("Origin", "https://lab.example.org")],
        b"",
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    // A foreign page cannot open the worker socket at all.
    assert!(
        RawClient::connect_from(&server.ws_url(), "http://evil.example")
            .await
            .is_err()
    );
    // A page of this server without a ticket, or with a made-up one, is refused.
    for token in [None, Some("0123456789abcdef".to_string())] {
        let mut client = RawClient::connect_from(&server.ws_url(), &origin(&server)).await?;
        let mut h = hello();
        h.kind = WorkerKind::Browser;
        h.token = token;
        client.send(&Message::Hello(h), &[]).await?;
        match client.recv().await?.message {
            Message::Reject { reason, .. } => assert_eq!(reason, Rejection::Unauthorized),
            other => panic!("expected unauthorized, got {other:?}"),
        }
    }
    assert_eq!(server.state.workers().len(), 0);
    // A ticket opens one session: a second hello with it is refused.
    let (used, _) = ticket(&server).await?;
    for expected in [None, Some(Rejection::Unauthorized)] {
        let mut client = RawClient::connect_from(&server.ws_url(), &origin(&server)).await?;
        let mut h = hello();
        h.kind = WorkerKind::Browser;
        h.token = Some(used.clone());
        client.send(&Message::Hello(h), &[]).await?;
        match (client.recv().await?.message, &expected) {
            (Message::Welcome(_), None) => {}
            (Message::Reject { reason, .. }, Some(why)) => assert_eq!(&reason, why),
            (other, _) => panic!("expected {expected:?}, got {other:?}"),
        }
    }
    // Shards are no open download: without a live session, or with a made-up
    // one, the training set is refused.
    let (_, data) = ticket(&server).await?;
    let path = format!("/api/shard?index=0&count=2&seed=1&data={data}");
    for headers in [vec![], vec![("x-tether-session", "12345")]] {
        let r = http(server.addr, "GET", &path, &headers, b"").await?;
        assert_eq!(r.status, 401, "{}", r.text());
    }
    server.stop().await?;
    Ok(())
}

/// A browser worker (the wasm crate's code, run natively) that joined with a
/// ticket: its socket, its state, and what its shard download names.
struct Browser {
    client: RawClient,
    volunteer: Volunteer,
    shard_index: u32,
    shard_count: u32,
    shard_seed: String,
    session: String,
    data: String,
}

async fn join_as_browser(server: &TestServer) -> Result<Browser> {
    let (ticket, data) = ticket(server).await?;
    let mut client = RawClient::connect_from(&server.ws_url(), &origin(server)).await?;
    let mut volunteer = Volunteer::new(Device::flex(), "cpu", "cpu (native test)");
    client.send_bytes(volunteer.hello(&ticket)).await?;
    let welcome = volunteer.receive(&client.recv_raw().await?)?;
    let Event::Welcome {
        shard_index,
        shard_count,
        shard_seed,
        session,
        ..
    } = welcome
    else {
        bail!("expected a welcome, got {welcome:?}");
    };
    Ok(Browser {
        client,
        volunteer,
        shard_index,
        shard_count,
        shard_seed,
        session,
        data,
    })
}

/// The browser worker's own code (the wasm crate, built natively on the CPU
/// backend) joins with a ticket, downloads its shard over HTTP, trains, and its
/// syncs move the center.
#[tokio::test]
async fn a_browser_worker_joins_downloads_its_shard_and_moves_the_center() -> Result<()> {
    let server = TestServer::start(config("web-volunteer")?).await?;
    let Browser {
        mut client,
        mut volunteer,
        shard_index,
        shard_count,
        shard_seed,
        session,
        data,
    } = join_as_browser(&server).await?;
    let path =
        format!("/api/shard?index={shard_index}&count={shard_count}&seed={shard_seed}&data={data}");
    let from_page = [
        ("Origin", origin(&server)),
        ("x-tether-session", session.clone()),
    ];
    let from_page: Vec<(&str, &str)> = from_page.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Only this session's own shard, of this run's data.
    let other = format!(
        "/api/shard?index={}&count={shard_count}&seed={shard_seed}&data={data}",
        (shard_index + 1) % shard_count
    );
    let r = http(server.addr, "GET", &other, &from_page, b"").await?;
    assert_eq!(r.status, 403, "{}", r.text());
    let wrong =
        format!("/api/shard?index={shard_index}&count={shard_count}&seed={shard_seed}&data=nope");
    assert_eq!(
        http(server.addr, "GET", &wrong, &from_page, b"")
            .await?
            .status,
        404
    );
    let shard = http(server.addr, "GET", &path, &from_page, b"").await?;
    assert_eq!(shard.status, 200, "{}", shard.text());
    assert!(
        shard.head.contains("immutable"),
        "cacheable: {}",
        shard.head
    );
    volunteer.start(&shard.body)?;
    let before = server.state.center().version();
    for round in 1..=3u64 {
        volunteer.step(volunteer.tau())?;
        let trained = volunteer.read_back().await;
        assert_eq!(trained.steps, 2);
        assert!(trained.loss.is_finite());
        client
            .send_bytes(volunteer.sync_frame(trained, 0.5)?)
            .await?;
        match volunteer.receive(&client.recv_raw().await?)? {
            Event::Synced { center_version, .. } => assert_eq!(center_version, before + round),
            other => panic!("expected a reply, got {other:?}"),
        }
    }
    let status = server.state.status();
    let w = &status.workers[0];
    assert_eq!(
        (w.kind, w.backend.as_str(), w.syncs),
        (WorkerKind::Browser, "cpu", 3)
    );
    assert_eq!(w.last_samples, 32);
    client.send_bytes(volunteer.leave()).await?;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !server.state.workers().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("the browser worker's leave was not honoured")?;
    server.stop().await?;
    Ok(())
}

/// A shard larger than the tab's memory budget: the browser worker keeps its
/// labels and reads the pixels a block at a time from the download (here: the
/// HTTP body; in a tab: the Cache API), never training on a block it lacks.
#[tokio::test]
async fn a_browser_worker_reads_a_large_shard_a_block_at_a_time() -> Result<()> {
    let server = TestServer::start(config("web-blocks")?).await?;
    let Browser {
        mut client,
        mut volunteer,
        shard_index,
        shard_count,
        shard_seed,
        session,
        data,
    } = join_as_browser(&server).await?;
    let path =
        format!("/api/shard?index={shard_index}&count={shard_count}&seed={shard_seed}&data={data}");
    let headers = [("Origin", origin(&server)), ("x-tether-session", session)];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let shard = http(server.addr, "GET", &path, &headers, b"").await?.body;
    // A budget of six batches of 28×28 images: one batch a block.
    let budget = 6 * 16 * 784;
    assert!(shard.len() > 10 * budget, "the shard must not fit");
    let head = ImagesHead::size("shard", &shard)?;
    volunteer.start_blocks(&shard[..head], shard.len() as u64, budget as u64)?;
    assert!(!volunteer.ready());
    let err = volunteer.step(1).unwrap_err().to_string();
    assert!(err.contains("not in memory"), "{err}");
    let before = server.state.center().version();
    for round in 1..=3u64 {
        for _ in 0..volunteer.tau() {
            for read in volunteer.wanted() {
                let bytes = shard[read.start as usize..read.end as usize].to_vec();
                volunteer.supply(read.block, bytes)?;
            }
            volunteer.step(1)?;
        }
        let trained = volunteer.read_back().await;
        assert!(trained.loss.is_finite());
        client
            .send_bytes(volunteer.sync_frame(trained, 0.5)?)
            .await?;
        match volunteer.receive(&client.recv_raw().await?)? {
            Event::Synced { center_version, .. } => assert_eq!(center_version, before + round),
            other => bail!("expected a reply, got {other:?}"),
        }
    }
    // A block a step, and the next one read ahead: not the shard.
    let read = volunteer.progress.blocks_read;
    assert!((6..=8).contains(&read), "{read} blocks read for 6 steps");
    // A damaged block is refused with the block named.
    if let Some(next) = volunteer.wanted().first() {
        let err = volunteer.supply(next.block, vec![0; 3]).unwrap_err();
        assert!(err.to_string().contains("block"), "{err}");
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn operator_controls_need_the_admin_token_and_take_effect() -> Result<()> {
    // Off without a token.
    let off = TestServer::start(config("web-admin-off")?).await?;
    let r = http(off.addr, "POST", "/api/admin/pause", &[], b"").await?;
    assert_eq!(r.status, 403);
    off.stop().await?;

    let mut c = config("web-admin")?;
    c.admin_token = Some(ADMIN.into());
    let server = TestServer::start(c).await?;
    let auth = format!("Bearer {ADMIN}");
    let admin = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let wrong = [
        ("Authorization", "Bearer nope"),
        ("Content-Type", "application/json"),
    ];
    let r = http(
        server.addr,
        "POST",
        "/api/admin/hyper",
        &wrong,
        br#"{"tau":5}"#,
    )
    .await?;
    assert_eq!(r.status, 401);
    // Invalid values change nothing.
    let before = server.state.center().hyper();
    for body in [
        &br#"{"tau":0}"#[..],
        br#"{"alpha":1.5}"#,
        br#"{"lr":-1}"#,
        br#"{"lr":1e308}"#,
        br#"{"alpha":0.9999999}"#,
        br#"{"tau":4000000000}"#,
        br#"{"tau":"x"}"#,
        br#"{"beta":1}"#,
    ] {
        let r = http(server.addr, "POST", "/api/admin/hyper", &admin, body).await?;
        assert_eq!(
            r.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
    }
    assert_eq!(server.state.center().hyper(), before);
    // A valid change reaches the next reply.
    let (mut client, welcome, center) = RawClient::join(&server.ws_url(), hello()).await?;
    let r = http(
        server.addr,
        "POST",
        "/api/admin/hyper",
        &admin,
        br#"{"tau":7,"lr":0.02}"#,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()?["after"]["tau"], 7);
    client
        .send(&sync(welcome.session, 1, welcome.center_version), &center)
        .await?;
    match client.recv().await?.message {
        Message::Reply(reply) => {
            assert_eq!((reply.hyper.tau, reply.hyper.lr), (7, 0.02));
            assert_eq!(reply.hyper.alpha, before.alpha);
        }
        other => panic!("expected a reply, got {other:?}"),
    }
    assert_eq!(server.state.status().changes.len(), 1);
    // Paused: a sync waits; resumed: it is answered.
    let r = http(server.addr, "POST", "/api/admin/pause", &admin, b"").await?;
    assert_eq!(r.status, 200);
    assert!(server.state.status().paused);
    let version = server.state.center().version();
    client
        .send(&sync(welcome.session, 2, version), &center)
        .await?;
    assert!(
        tokio::time::timeout(Duration::from_millis(800), client.recv())
            .await
            .is_err(),
        "a paused server answered a sync"
    );
    assert_eq!(server.state.center().version(), version);
    http(server.addr, "POST", "/api/admin/resume", &admin, b"").await?;
    assert!(matches!(client.recv().await?.message, Message::Reply(_)));
    // Checkpoint now, and the center as safetensors.
    let r = http(server.addr, "POST", "/api/admin/checkpoint", &admin, b"").await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let manifest = r.json()?["manifest"]
        .as_str()
        .context("manifest")?
        .to_string();
    assert!(std::path::Path::new(&manifest).exists());
    let r = http(
        server.addr,
        "GET",
        "/api/admin/center.safetensors",
        &admin,
        b"",
    )
    .await?;
    assert_eq!(r.status, 200);
    assert!(r.head.contains("attachment"));
    let tensors = safetensors::SafeTensors::deserialize(&r.body)?;
    let bytes = tensors.tensor("center")?.data().to_vec();
    let expected: Vec<u8> = server
        .state
        .center()
        .params()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(bytes, expected);
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_live_feed_pushes_the_timeline_then_ticks() -> Result<()> {
    let server = TestServer::start(config("web-feed")?).await?;
    let url = format!("ws://{}/api/events", server.addr);
    let (mut feed, _) = tokio_tungstenite::connect_async(url).await?;
    let mut next = async || -> Result<serde_json::Value> {
        let msg = tokio::time::timeout(Duration::from_secs(5), feed.next())
            .await
            .context("no event within 5 s")?
            .context("feed ended")??;
        Ok(serde_json::from_str(msg.to_text()?)?)
    };
    let hello = next().await?;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["status"]["run_id"], server.state.spec.run_id.as_str());
    let tick = next().await?;
    assert_eq!(tick["type"], "tick");
    assert!(tick["tick"]["time_s"].as_f64().is_some());
    assert!(
        tick["status"]["history"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    server.stop().await?;
    Ok(())
}
