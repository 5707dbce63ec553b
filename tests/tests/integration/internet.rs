//! A run across the internet, here on one host: a server on TLS with a certificate
//! generated for the test, workers that have nothing but the URL and that
//! certificate (they download, verify and cache their shard), compressed and
//! overlapped syncs, and a worker that trusts the wrong certificate refused at once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::tensor::Device;
use tether_client_wasm::volunteer::{Event, Volunteer};
use tether_dataset::ShardCache;
use tether_server::tls;
use tether_shared::algorithms::Algorithm;
use tether_shared::codec::Encoding;
use tether_tests::net::{RawClient, TestServer, http, quick_config};
use tether_tests::scratch;
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig, WorkError, WorkReport};
use tether_worker::connect::ConnectError;
use tokio::sync::watch;

/// A worker that has only the URL, a certificate to trust and a cache folder.
fn url_only(url: &str, ca: &Path, cache: &Path, steps: u64) -> WorkConfig {
    let mut w = WorkConfig::new(url);
    w.ca_cert = Some(ca.to_path_buf());
    w.cache = Some(ShardCache::new(cache));
    w.backend = BackendChoice::Cpu;
    w.max_steps = Some(steps);
    w.progress = false;
    w.connect_timeout = Duration::from_secs(5);
    w
}

async fn work(w: WorkConfig) -> Result<WorkReport, WorkError> {
    let (_stop, stop) = watch::channel(false);
    client::run(w, stop).await
}

#[tokio::test]
async fn a_url_only_worker_trains_over_tls_with_compressed_overlapped_syncs() -> Result<()> {
    let dir = scratch("internet-tls")?;
    let cert = tls::self_signed(&dir.join("tls"), &["localhost".into(), "127.0.0.1".into()])?;
    let mut cfg = quick_config("internet-tls-run", Algorithm::Eamsgd)?;
    cfg.tls = Some(cert.config.clone());
    let server = TestServer::start(cfg).await?;
    let url = format!("wss://localhost:{}", server.addr.port());
    let cache = dir.join("cache");

    // First start: downloads its shard over HTTPS, checks it, caches it, trains.
    let first = work(url_only(&url, &cert.cert_path, &cache, 12)).await?;
    assert_eq!(
        (
            first.shard_source.as_str(),
            first.encoding.as_str(),
            first.overlap
        ),
        ("download", "q8", true),
        "{first:?}"
    );
    assert_eq!(
        (first.steps, first.syncs, first.rejections),
        (12, 3, 0),
        "{first:?}"
    );
    let version = server.state.center().version();
    assert_eq!(version, 3, "every sync moved the center");
    // q8 frames: a sync is about a quarter of the f32 parameters.
    let params = server.state.spec.model.param_count() as u64;
    assert!(
        first.bytes_out < 3 * params * 4 / 3,
        "q8 sends {} bytes for 3 syncs of {params} values",
        first.bytes_out
    );

    // A restart uses the cache.
    let second = work(url_only(&url, &cert.cert_path, &cache, 4)).await?;
    assert_eq!(second.shard_source, "cache", "{second:?}");

    // A damaged cache file is noticed and downloaded again.
    let file = std::fs::read_dir(cache.join("shards"))?
        .next()
        .context("a cached shard")??
        .path();
    let mut bytes = std::fs::read(&file)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&file, &bytes)?;
    let third = work(url_only(&url, &cert.cert_path, &cache, 4)).await?;
    assert_eq!(third.shard_source, "download", "{third:?}");
    assert_eq!(third.syncs, 1);

    // Trusting another certificate: refused at once, saying what to do.
    let other = tls::self_signed(&dir.join("other"), &["localhost".into()])?;
    let t0 = Instant::now();
    let err = work(url_only(&url, &other.cert_path, &cache, 4))
        .await
        .expect_err("a wrong certificate must be refused");
    assert!(
        matches!(err, WorkError::Connect(ConnectError::Tls { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("--ca-cert"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "no retrying on a bad certificate"
    );

    // Plain HTTP on a TLS port, and the shard over HTTPS without a session.
    let err = work(url_only(
        &format!("ws://localhost:{}", server.addr.port()),
        &cert.cert_path,
        &cache,
        4,
    ))
    .await
    .expect_err("plain ws:// to a TLS port fails");
    assert!(matches!(err, WorkError::Unreachable(..)), "{err}");
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_worker_that_never_reaches_the_server_gives_up_with_the_reason() -> Result<()> {
    let free = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = free.local_addr()?.port();
    drop(free);
    let mut w = WorkConfig::new(format!("ws://127.0.0.1:{port}"));
    w.progress = false;
    w.backend = BackendChoice::Cpu;
    w.connect_timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let err = work(w).await.expect_err("nothing listens there");
    let text = err.to_string();
    assert!(text.contains("never reached the server"), "{text}");
    assert!(text.contains("cannot connect"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    Ok(())
}

/// One f32 worker, one q8 worker and a browser worker (its own code, natively)
/// train one center together; it learns.
#[tokio::test]
async fn a_mixed_run_of_f32_q8_and_browser_workers_converges() -> Result<()> {
    let server = TestServer::start(quick_config("internet-mixed", Algorithm::Eamsgd)?).await?;
    let train = Arc::new(tether_dataset::load(None)?.1.train);
    let native = |encodings: Vec<Encoding>| {
        let mut w = WorkConfig::new(server.ws_url());
        w.backend = BackendChoice::Cpu;
        w.preloaded = Some(train.clone());
        w.encodings = encodings;
        w.max_steps = Some(60);
        w.progress = false;
        work(w)
    };
    let browser = async {
        let addr = server.addr;
        let origin = format!("http://{addr}");
        let joined = http(addr, "POST", "/api/join", &[("Origin", &origin)], b"").await?;
        let body = joined.json()?;
        let ticket = body["ticket"].as_str().context("ticket")?.to_string();
        let data = body["data"].as_str().context("data")?.to_string();
        let mut client = RawClient::connect_from(&server.ws_url(), &origin).await?;
        let mut v = Volunteer::new(Device::flex(), "cpu", "cpu (native test)");
        client.send_bytes(v.hello(&ticket)).await?;
        let Event::Welcome {
            shard_index,
            shard_count,
            shard_seed,
            session,
            encoding,
            ..
        } = v.receive(&client.recv_raw().await?)?
        else {
            anyhow::bail!("no welcome");
        };
        assert_eq!(encoding, "q8");
        let path = format!(
            "/api/shard?index={shard_index}&count={shard_count}&seed={shard_seed}&data={data}"
        );
        let shard = http(
            addr,
            "GET",
            &path,
            &[("Origin", &origin), ("x-tether-session", &session)],
            b"",
        )
        .await?;
        v.start(&shard.body)?;
        for _ in 0..8 {
            v.step(v.tau())?;
            let trained = v.read_back().await;
            client.send_bytes(v.sync_frame(trained, 0.1)?).await?;
            match v.receive(&client.recv_raw().await?)? {
                Event::Synced { .. } => {}
                other => anyhow::bail!("expected a reply, got {other:?}"),
            }
        }
        client.send_bytes(v.leave()).await?;
        Ok::<_, anyhow::Error>(())
    };
    let (a, b, c) = tokio::join!(
        native(vec![Encoding::F32]),
        native(Encoding::ALL.to_vec()),
        browser
    );
    let (a, b) = (a?, b?);
    c?;
    assert_eq!((a.encoding.as_str(), b.encoding.as_str()), ("f32", "q8"));
    assert_eq!((a.rejections, b.rejections), (0, 0));
    let state = server.state.clone();
    let eval = tokio::task::spawn_blocking(move || state.evaluate_now()).await?;
    eprintln!(
        "mixed f32 + q8 + browser, 60 + 60 + 32 steps: center accuracy {:.4}",
        eval.accuracy
    );
    assert!(eval.accuracy > 0.5, "the center learned: {}", eval.accuracy);
    server.stop().await?;
    Ok(())
}
