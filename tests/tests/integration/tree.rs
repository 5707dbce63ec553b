//! A tree of real processes: a root `tether serve`, two `tether relay`s of it, two
//! `tether work`ers under each. The root's center improves through the relays; a
//! relay killed with SIGKILL and restarted gets its workers back; the root killed
//! and resumed from its checkpoint gets its relays back; the root's status lists
//! the tree all along. And a relay of a relay: training reaches the root through
//! two levels. And the defaults: relays of one worker each get through the root's
//! norm guard.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tether_tests::net::http_get;
use tether_tests::serve::Serve;
use tether_tests::{scratch, tether_bin};

/// `/api/status` of `addr`, or `None` while it does not answer (restarting).
async fn status(addr: SocketAddr) -> Option<Value> {
    let body = tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/api/status"))
        .await
        .ok()?
        .ok()?;
    serde_json::from_str(&body).ok()
}

async fn wait_for(
    what: &str,
    limit: Duration,
    addr: SocketAddr,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < limit {
        if let Some(s) = status(addr).await {
            if check(&s) {
                return Ok(s);
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("timed out after {limit:?} waiting until {what}; last status: {last:?}")
}

/// The relays a status lists, with their worker counts.
fn relays(s: &Value) -> Vec<(u64, u64)> {
    s["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["kind"] == "relay")
        .map(|w| {
            (
                w["id"].as_u64().unwrap_or(0),
                w["members"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// A `tether work` process, killed when dropped: a test that fails part-way leaves
/// none behind.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn work(cache: &Path, relay: SocketAddr) -> Result<Worker> {
    Ok(Worker(
        Command::new(tether_bin()?)
            .env("TETHER_CACHE", cache)
            .args(["work", "--backend", "cpu", "--threads", "1", "--server"])
            .arg(format!("ws://{relay}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn kill(child: &mut Child) -> Result<()> {
    child.kill()?;
    child.wait()?;
    Ok(())
}

const ROOT: [&str; 14] = [
    "--algorithm",
    "eamsgd",
    "--tau",
    "4",
    "--batch",
    "32",
    "--expected-workers",
    "2",
    "--checkpoint-every",
    "1",
    "--eval-every",
    "1",
    "--eval-limit",
    "500",
];
const RELAY: [&str; 6] = [
    "--expected-workers",
    "2",
    "--tau-up",
    "4",
    "--max-wait",
    "2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_relays_trains_and_survives_a_relay_and_a_root_restart() -> Result<()> {
    let base = scratch("tree")?;
    let (dir, cache) = (base.join("run"), base.join("cache"));
    let root_port = free_port()?;
    let mut root = Serve::start_on(root_port, &dir, &ROOT)?;
    let root_addr = root.addr;
    let first = wait_for(
        "the root evaluated its first center",
        Duration::from_secs(60),
        root_addr,
        |s| s["evaluation"]["accuracy"].is_f64(),
    )
    .await?;
    let untrained = first["evaluation"]["accuracy"]
        .as_f64()
        .context("accuracy")?;
    let ports = [free_port()?, free_port()?];
    let mut relay_a = Serve::relay(&base, ports[0], root_addr, &RELAY)?;
    let relay_b = Serve::relay(&base, ports[1], root_addr, &RELAY)?;
    let mut workers = Vec::new();
    for relay in [relay_a.addr, relay_b.addr] {
        for _ in 0..2 {
            workers.push(work(&cache, relay)?);
        }
    }

    // The tree trains: both relays listed with two workers each, the root's center
    // better than it started.
    let s = wait_for(
        "two relays of two workers each and a better root center",
        Duration::from_secs(240),
        root_addr,
        |s| {
            relays(s).iter().filter(|r| r.1 == 2).count() == 2
                && s["evaluation"]["accuracy"].as_f64() > Some(untrained + 0.2)
        },
    )
    .await?;
    assert_eq!(s["subtree_workers"], 4, "{s}");
    assert_eq!(
        relays(&s).len(),
        s["workers"].as_array().map_or(0, Vec::len),
        "only relays are the root's own workers: {s}"
    );
    let metrics = http_get(root_addr, "/metrics").await?;
    assert!(metrics.contains("tether_subtree_workers 4"), "{metrics}");
    let per_relay: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tether_relay_workers{relay="))
        .collect();
    assert_eq!(per_relay.len(), 2, "{metrics}");
    assert!(per_relay.iter().all(|l| l.ends_with(" 2")), "{metrics}");
    let a = status(relay_a.addr).await.context("relay A answers")?;
    assert_eq!(a["upstream"], format!("ws://{root_addr}"), "{a}");
    // The relay's workers train slices of the relay's shard of the root's cut.
    let within = s["workers"][0]["shard"]
        .as_str()
        .context("shard")?
        .to_string();
    assert!(within.ends_with("/2"), "{within}");

    // A relay killed and restarted on its port: its workers come back to it, and
    // the root sees it again with both.
    kill(&mut relay_a.child)?;
    let version = status(root_addr).await.context("root")?["center_version"]
        .as_u64()
        .context("version")?;
    relay_a = Serve::relay(&base, ports[0], root_addr, &RELAY)?;
    wait_for(
        "relay A has its two workers back",
        Duration::from_secs(120),
        relay_a.addr,
        |s| s["workers"].as_array().map_or(0, Vec::len) == 2 && s["syncs"].as_u64() >= Some(2),
    )
    .await?;
    wait_for(
        "the root lists both relays with their workers and moves on",
        Duration::from_secs(120),
        root_addr,
        |s| {
            relays(s).iter().filter(|r| r.1 == 2).count() == 2
                && s["center_version"].as_u64() > Some(version + 2)
        },
    )
    .await?;

    // The root killed and resumed from its newest checkpoint: the relays rejoin
    // without being touched, and the run goes on from where it was.
    kill(&mut root.child)?;
    let root = Serve::start_on(
        root_port,
        &dir,
        &["--resume", "--eval-every", "1", "--eval-limit", "500"],
    )?;
    let resumed = wait_for(
        "the resumed root answers",
        Duration::from_secs(60),
        root_addr,
        |_| true,
    )
    .await?;
    let from = resumed["center_version"].as_u64().context("version")?;
    assert!(from > 0, "resumed from a checkpoint: {resumed}");
    let s = wait_for(
        "both relays back at the resumed root, exchanging",
        Duration::from_secs(120),
        root_addr,
        |s| {
            relays(s).iter().filter(|r| r.1 == 2).count() == 2
                && s["center_version"].as_u64() > Some(from + 2)
        },
    )
    .await?;
    assert!(
        s["resumes"].as_array().is_some_and(|r| !r.is_empty()),
        "{s}"
    );
    assert!(
        s["evaluation"]["accuracy"].as_f64() > Some(untrained + 0.2),
        "still trained after the restarts: {s}"
    );

    drop(workers);
    for relay in [relay_a, relay_b] {
        relay.terminate()?;
    }
    root.terminate()?;
    Ok(())
}

/// Relays nest: a worker under a relay of a relay. Its training reaches the root
/// through two levels, each level counts it in its subtree, and the shard cut nests
/// (root 2 parts, 4 below the first relay, 8 below the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_nest_and_the_root_trains_through_two_levels() -> Result<()> {
    let base = scratch("tree-nested")?;
    let (dir, cache) = (base.join("run"), base.join("cache"));
    let root = Serve::start_on(free_port()?, &dir, &ROOT)?;
    let first = wait_for(
        "the root evaluated its first center",
        Duration::from_secs(60),
        root.addr,
        |s| s["evaluation"]["accuracy"].is_f64(),
    )
    .await?;
    let untrained = first["evaluation"]["accuracy"]
        .as_f64()
        .context("accuracy")?;
    let mid = Serve::relay(&base, free_port()?, root.addr, &RELAY)?;
    let leaf = Serve::relay(&base, free_port()?, mid.addr, &RELAY)?;
    let worker = work(&cache, leaf.addr)?;

    let s = wait_for(
        "the worker two levels down counted at the root, and a better root center",
        Duration::from_secs(240),
        root.addr,
        |s| {
            s["subtree_workers"] == 1
                && s["evaluation"]["accuracy"].as_f64() > Some(untrained + 0.2)
        },
    )
    .await?;
    assert_eq!(
        relays(&s).len(),
        1,
        "the root's one member is the mid relay: {s}"
    );
    let m = status(mid.addr).await.context("the mid relay answers")?;
    assert_eq!(m["upstream"], format!("ws://{}", root.addr), "{m}");
    assert_eq!(
        relays(&m),
        vec![(relays(&m)[0].0, 1)],
        "the leaf relay, one worker: {m}"
    );
    let l = status(leaf.addr).await.context("the leaf relay answers")?;
    assert_eq!(l["upstream"], format!("ws://{}", mid.addr), "{l}");
    for (node, parts) in [(&s, "/2"), (&m, "/4"), (&l, "/8")] {
        let shard = node["workers"][0]["shard"].as_str().context("shard")?;
        assert!(shard.ends_with(parts), "{shard} in {node}");
    }

    drop(worker);
    leaf.terminate()?;
    mid.terminate()?;
    root.terminate()?;
    Ok(())
}

/// The defaults a user starts with: two relays of one worker each under a root with
/// a relay token, τ 16, `--tau-up` and `--max-wait` at their defaults, the root's
/// norm guard and loss screen on. A relay that follows its one worker moves further
/// between exchanges than the guard's first guess; the bootstrap grows after a few
/// refusals instead of refusing the relays for ever (the root stayed at version 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_one_worker_each_train_the_root_at_the_defaults() -> Result<()> {
    let base = scratch("tree-defaults")?;
    let (dir, cache) = (base.join("run"), base.join("cache"));
    let root = Serve::start_on(
        free_port()?,
        &dir,
        &[
            "--relay-token",
            "rt",
            "--expected-workers",
            "2",
            "--eval-every",
            "1",
            "--eval-limit",
            "500",
        ],
    )?;
    let first = wait_for(
        "the root evaluated its first center",
        Duration::from_secs(60),
        root.addr,
        |s| s["evaluation"]["accuracy"].is_f64(),
    )
    .await?;
    let untrained = first["evaluation"]["accuracy"]
        .as_f64()
        .context("accuracy")?;
    let one = ["--expected-workers", "1", "--upstream-token", "rt"];
    let relay_a = Serve::relay(&base, 0, root.addr, &one)?;
    let relay_b = Serve::relay(&base, 0, root.addr, &one)?;
    let workers = vec![work(&cache, relay_a.addr)?, work(&cache, relay_b.addr)?];

    let s = wait_for(
        "both relays exchanging with the root, and a better root center",
        Duration::from_secs(300),
        root.addr,
        |s| {
            relays(s).iter().filter(|r| r.1 == 1).count() == 2
                && s["center_version"].as_u64() >= Some(6)
                && s["evaluation"]["accuracy"].as_f64() > Some(untrained + 0.2)
        },
    )
    .await?;
    // A few refusals while the bootstrap grows, not one per exchange.
    let refused = s["rejects"]["out_of_line"].as_u64().unwrap_or(0);
    eprintln!(
        "out-of-line refusals: {refused}, center version {}",
        s["center_version"]
    );
    assert!(refused <= 8, "{refused} out-of-line refusals: {s}");

    drop(workers);
    relay_a.terminate()?;
    relay_b.terminate()?;
    root.terminate()?;
    Ok(())
}

/// A relay on an image folder decodes it for the network the root describes (3×24×24
/// images here, not a folder's default 3×32×32), serves its own worker from it, and
/// the root's center moves through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_decodes_its_image_folder_for_the_roots_network() -> Result<()> {
    let base = scratch("tree-folder")?;
    let photos = base.join("photos");
    tether_tests::write_photo_folder(&photos, 60)?;
    let photos = photos.display().to_string();
    let net = base.join("net.toml");
    std::fs::write(
        &net,
        r#"
        input = [3, 24, 24]
        classes = 3
        layers = ["conv 8 kernel=3 pad=1", "relu", "maxpool 2", "globalavgpool", "linear 3"]
        "#,
    )?;
    let net = net.display().to_string();
    let root = Serve::start_on(
        free_port()?,
        &base.join("run"),
        &[
            "--data",
            &photos,
            "--model",
            &net,
            "--relay-token",
            "rt",
            "--expected-workers",
            "1",
            "--tau",
            "2",
            "--batch",
            "16",
        ],
    )?;
    let relay = Serve::relay(
        &base,
        0,
        root.addr,
        &[
            "--data",
            &photos,
            "--upstream-token",
            "rt",
            "--expected-workers",
            "1",
            "--tau-up",
            "2",
            "--max-wait",
            "2",
        ],
    )?;
    let worker = work(&base.join("cache"), relay.addr)?;
    wait_for(
        "the relay's worker syncing and the relay moving the root's center",
        Duration::from_secs(180),
        root.addr,
        |s| relays(s).iter().any(|r| r.1 == 1) && s["center_version"].as_u64() >= Some(3),
    )
    .await?;
    let at_relay = status(relay.addr).await.context("the relay's status")?;
    assert_eq!(
        at_relay["network"]["input"],
        serde_json::json!([3, 24, 24]),
        "{at_relay}"
    );
    drop(worker);
    relay.terminate()?;
    root.terminate()?;
    Ok(())
}
