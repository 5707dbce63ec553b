//! The wire protocol against a real server: every rejection class is answered with
//! its typed reason and leaves the center bit-identical; synchronous EASGD matches
//! the equations exactly.

use std::time::Duration;

use anyhow::Result;
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::algorithms::elastic::sync_round;
use tether_shared::protocol::{
    self, Apply, Frame, Message, PREFIX_BYTES, Rejection, max_frame_bytes,
};
use tether_tests::net::{RawClient, TestServer, hello, http_get, sync};
use tether_tests::scratch;

/// These tests hold the server to the update rules bit for bit, with crafted
/// updates: the loss screen (on by default, tested in `hardening.rs`) is off.
fn config(name: &str, run: RunSettings) -> Result<ServerConfig> {
    let mut c = ServerConfig::new(run);
    c.screen_batch = 0;
    c.eval_every = None;
    c.checkpoint_every = None;
    c.run_dir = Some(scratch(name)?);
    Ok(c)
}

/// The center's bits and version.
fn fingerprint(server: &TestServer) -> (Vec<u32>, u64) {
    let c = server.state.center();
    (
        c.params().iter().map(|v| v.to_bits()).collect(),
        c.version(),
    )
}

async fn expect_reject(client: &mut RawClient, code: &str) -> Result<Rejection> {
    match client.recv().await? {
        Frame {
            message: Message::Reject { reason, .. },
            ..
        } => {
            assert_eq!(reason.code(), code, "{reason}");
            Ok(reason)
        }
        other => panic!("expected a {code} rejection, got {:?}", other.message),
    }
}

/// Parameters a little way from the center, in line with an honest worker.
fn nudged(center: &[f32], by: f32) -> Vec<f32> {
    center
        .iter()
        .enumerate()
        .map(|(j, c)| c + by * ((j % 7) as f32 - 3.0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_leaves_the_center_bit_identical() -> Result<()> {
    let mut run = RunSettings::defaults(Algorithm::Easgd);
    run.expected_workers = 2;
    let mut cfg = config("rejections", run)?;
    cfg.max_staleness = 2;
    let server = TestServer::start(cfg).await?;
    let url = server.ws_url();
    let n = server.state.spec.model.param_count();

    // Handshake rejections.
    let mut bad_version = hello();
    bad_version.protocol = 99;
    let mut c = RawClient::connect(&url).await?;
    c.send(&Message::Hello(bad_version), &[]).await?;
    expect_reject(&mut c, "protocol_version").await?;
    let mut c = RawClient::connect(&url).await?;
    c.send(&sync(1, 1, 0), &vec![0.0; n]).await?;
    expect_reject(&mut c, "unexpected").await?;
    let mut c = RawClient::connect(&url).await?;
    c.send_bytes(vec![1, 2, 3]).await?;
    expect_reject(&mut c, "malformed").await?;

    let (mut a, wa, center) = RawClient::join(&url, hello()).await?;
    let before = fingerprint(&server);
    assert_eq!(center.len(), n);
    let s = wa.session;
    let good = nudged(&center, 1e-3);

    // Session-level rejections, each followed by a check that nothing moved.
    let mut nan = good.clone();
    nan[n / 2] = f32::NAN;
    let mut inf = good.clone();
    inf[0] = f32::NEG_INFINITY;
    let huge = vec![1e6f32; n];
    let cases: Vec<(Message, Vec<f32>, &str)> = vec![
        (sync(s + 1, 1, 0), good.clone(), "unknown_session"),
        (sync(s, 1, 0), good[..n - 1].to_vec(), "wrong_length"),
        (sync(s, 1, 0), nan, "non_finite"),
        (sync(s, 1, 0), inf, "non_finite"),
        (sync(s, 1, 0), huge, "out_of_line"),
        (sync(s, 1, 5), good.clone(), "unexpected"), // a center version from the future
        (
            Message::Heartbeat { session: s + 7 },
            vec![],
            "unknown_session",
        ),
        (Message::Hello(hello()), vec![], "unexpected"),
    ];
    for (message, payload, code) in cases {
        a.send(&message, &payload).await?;
        expect_reject(&mut a, code).await?;
        assert_eq!(fingerprint(&server), before, "{code} changed the center");
    }
    // A frame whose prefix lies about its length; a text frame.
    let mut lying = protocol::encode(&sync(s, 1, 0), &good);
    lying[4..8].copy_from_slice(&7u32.to_le_bytes());
    a.send_bytes(lying).await?;
    expect_reject(&mut a, "malformed").await?;
    a.send_text("{\"sync\": [1, 2, 3]}").await?;
    expect_reject(&mut a, "malformed").await?;
    assert_eq!(fingerprint(&server), before);

    // A valid sync moves the center; replaying its sequence number does not.
    a.send(&sync(s, 1, 0), &good).await?;
    let reply = a.recv().await?;
    let Message::Reply(r) = reply.message else {
        panic!("expected a reply, got {:?}", reply.message)
    };
    assert_eq!((r.apply, r.center_version), (Apply::Subtract, 1));
    let after_one = fingerprint(&server);
    assert_ne!(after_one, before);
    a.send(&sync(s, 1, 1), &good).await?;
    expect_reject(&mut a, "replayed").await?;
    assert_eq!(fingerprint(&server), after_one);

    // Staleness: another worker advances the center 3 versions past what `a` saw.
    let (mut b, wb, center_b) = RawClient::join(&url, hello()).await?;
    let mut seen_b = wb.center_version;
    for seq in 1..=3 {
        b.send(&sync(wb.session, seq, seen_b), &nudged(&center_b, 1e-3))
            .await?;
        let f = b.recv().await?;
        let Message::Reply(r) = f.message else {
            panic!("expected a reply, got {:?}", f.message)
        };
        seen_b = r.center_version;
    }
    let advanced = fingerprint(&server);
    a.send(&sync(s, 2, 1), &good).await?;
    let why = expect_reject(&mut a, "too_stale").await?;
    assert!(
        matches!(
            why,
            Rejection::TooStale {
                staleness: 3,
                bound: 2,
                ..
            }
        ),
        "{why:?}"
    );
    assert_eq!(fingerprint(&server), advanced);

    // A frame over the model-sized limit is refused and the connection goes on; one
    // over twice the limit ends the connection. Neither touches the center.
    let limit = max_frame_bytes(n);
    assert!(
        limit < 4 * n + PREFIX_BYTES + 64 * 1024,
        "the limit follows the model"
    );
    a.send_bytes(vec![0u8; limit + 1]).await?;
    let why = expect_reject(&mut a, "frame_too_large").await?;
    assert_eq!(
        why,
        Rejection::FrameTooLarge {
            limit: limit as u64,
            got: limit as u64 + 1
        }
    );
    a.send(&Message::Heartbeat { session: s }, &[]).await?;
    let sent = a.send_bytes(vec![0u8; 2 * limit + 1]).await;
    assert!(
        sent.is_err() || a.recv().await.is_err(),
        "the connection ends"
    );
    assert_eq!(fingerprint(&server), advanced);
    let (_still_serving, _, _) = RawClient::join(&url, hello()).await?;

    // The metrics count every reason.
    let metrics = http_get(server.addr, "/metrics").await?;
    for code in [
        "protocol_version",
        "unexpected",
        "malformed",
        "unknown_session",
        "wrong_length",
        "non_finite",
        "out_of_line",
        "replayed",
        "too_stale",
        "frame_too_large",
    ] {
        assert!(
            metrics.contains(&format!("tether_rejects_total{{reason=\"{code}\"}}")),
            "{code} missing from /metrics"
        );
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_the_worker_cap_are_enforced_at_the_handshake() -> Result<()> {
    let mut cfg = config("admission", RunSettings::defaults(Algorithm::Eamsgd))?;
    cfg.worker_token = Some("s3cret".into());
    cfg.max_workers = 1;
    let server = TestServer::start(cfg).await?;
    let url = server.ws_url();
    let mut c = RawClient::connect(&url).await?;
    c.send(&Message::Hello(hello()), &[]).await?;
    expect_reject(&mut c, "unauthorized").await?;
    let mut with_token = hello();
    with_token.token = Some("s3cret".into());
    let (_first, _, _) = RawClient::join(&url, with_token.clone()).await?;
    let mut c = RawClient::connect(&url).await?;
    c.send(&Message::Hello(with_token), &[]).await?;
    expect_reject(&mut c, "server_full").await?;
    let status: serde_json::Value =
        serde_json::from_str(&http_get(server.addr, "/api/status").await?)?;
    assert_eq!(status["workers"].as_array().map(Vec::len), Some(1));
    assert_eq!(status["center_version"], 0);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_easgd_matches_the_equations_exactly() -> Result<()> {
    let mut run = RunSettings::defaults(Algorithm::EasgdSync);
    run.expected_workers = 3;
    run.alpha = 0.3;
    let server = TestServer::start(config("sync-exact", run)?).await?;
    let url = server.ws_url();
    let mut clients = Vec::new();
    let mut center = Vec::new();
    for _ in 0..3 {
        let (c, w, x) = RawClient::join(&url, hello()).await?;
        center = x;
        clients.push((c, w));
    }
    let mut seen = 0;
    for round in 1..=2u64 {
        // Worker k sends its own parameters; the reference applies the same round
        // with shared's sync_round, workers in id order.
        let mut xs: Vec<Vec<f32>> = (0..3)
            .map(|k| nudged(&center, 1e-3 * (k as f32 + 1.0) * round as f32))
            .collect();
        for ((c, w), x) in clients.iter_mut().zip(&xs) {
            c.send(&sync(w.session, round, seen), x).await?;
        }
        let mut replies = Vec::new();
        for (c, _) in clients.iter_mut() {
            let f = c.recv().await?;
            let Message::Reply(r) = f.message else {
                panic!("expected a reply, got {:?}", f.message)
            };
            assert_eq!((r.apply, r.center_version), (Apply::Replace, round));
            replies.push(f.payload);
        }
        let mut refs: Vec<&mut [f32]> = xs.iter_mut().map(|x| x.as_mut_slice()).collect();
        sync_round(&mut center, &mut refs, 0.3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(server.state.center().params()),
            bits(&center),
            "round {round}: center"
        );
        for (k, (reply, x)) in replies.iter().zip(&xs).enumerate() {
            assert_eq!(bits(reply), bits(x), "round {round}: worker {k}");
        }
        seen = round;
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_round_goes_on_without_a_silent_worker() -> Result<()> {
    let mut run = RunSettings::defaults(Algorithm::Average);
    run.expected_workers = 2;
    let mut cfg = config("barrier", run)?;
    cfg.barrier_timeout = Duration::from_millis(500);
    let server = TestServer::start(cfg).await?;
    let url = server.ws_url();
    let (mut a, wa, center) = RawClient::join(&url, hello()).await?;
    let (_silent, _, _) = RawClient::join(&url, hello()).await?;
    let x = nudged(&center, 1e-3);
    let t0 = std::time::Instant::now();
    a.send(&sync(wa.session, 1, 0), &x).await?;
    let f = a.recv().await?;
    assert!(matches!(f.message, Message::Reply(_)), "{:?}", f.message);
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "the round waited for the timeout"
    );
    // Averaging with the one worker that came: the center becomes its parameters.
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(server.state.center().params()), bits(&x));
    server.stop().await?;
    Ok(())
}

/// A welcome whose network this side cannot build (here: a layer kind it does not
/// know, as a newer server might send) is a typed error naming the layer, not a
/// malformed frame; the server's real welcome decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_with_an_unbuildable_network_names_the_layer() -> Result<()> {
    let server = TestServer::start(config(
        "unbuildable",
        RunSettings::defaults(Algorithm::Easgd),
    )?)
    .await?;
    let mut client = RawClient::connect(&server.ws_url()).await?;
    client.send(&Message::Hello(hello()), &[]).await?;
    let mut frame = client.recv_raw().await?;
    assert!(matches!(
        protocol::decode(&frame)?.message,
        Message::Welcome(_)
    ));
    // The same frame with the description's first "relu" spelt "gelx" (same length).
    let at = frame
        .windows(4)
        .position(|w| w == b"relu")
        .expect("the small network's description holds a relu");
    frame[at..at + 4].copy_from_slice(b"gelx");
    match protocol::decode(&frame) {
        Err(protocol::DecodeError::Network(why)) => {
            let text = why.to_string();
            assert!(
                text.contains("unknown layer `gelx`") && text.contains("layers["),
                "{text}"
            );
        }
        other => panic!("expected a network error, got {other:?}"),
    }
    Ok(())
}
