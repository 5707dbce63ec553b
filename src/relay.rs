//! `tether relay`: its flags and their resolution into the relay library's config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tether_relay::{RelayConfig, RelayData};
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_worker::client::WorkConfig;
use tokio::sync::watch;

use crate::net::{ServingFlags, interrupted, runtime, shown_addr};

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// The upstream server (the root, or another relay): ws://host:port or
    /// wss://host:port.
    #[arg(long)]
    pub upstream: String,
    /// Trust the certificates in this PEM file for a wss:// upstream, besides the
    /// system's roots.
    #[arg(long)]
    pub upstream_ca_cert: Option<PathBuf>,
    /// The upstream's worker token.
    #[arg(long, env = "TETHER_UPSTREAM_TOKEN")]
    pub upstream_token: Option<String>,
    /// Updates of this relay's own workers between exchanges with the upstream.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tau_up: u32,
    /// Longest time between exchanges with the upstream, in seconds, even without
    /// updates.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_wait: u64,
    /// Elastic rate α of this relay's own workers [default: β 0.9 over
    /// --expected-workers, as `tether serve` sets it].
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Workers this relay expects: its shard of the upstream's data is cut into
    /// this many slices.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub expected_workers: u32,
    /// This relay's address as browsers reach it (http(s)://host:port), given to
    /// the upstream so it can send volunteers here.
    #[arg(long)]
    pub public_url: Option<String>,
    /// Seconds to keep trying the upstream before the first welcome (a relay can
    /// serve nothing before it); once joined, a relay waits for its upstream forever.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,
    #[command(flatten)]
    pub serving: ServingFlags,
}

pub fn run_relay(args: RelayArgs) -> Result<()> {
    if let Some(a) = args.alpha
        && !(a > 0.0 && a < 1.0)
    {
        bail!("--alpha must lie in (0, 1), got {a}");
    }
    let mut upstream = WorkConfig::new(args.upstream.clone());
    upstream.ca_cert = args.upstream_ca_cert.clone();
    upstream.token = args.upstream_token.clone();
    upstream.connect_timeout = Duration::from_secs(args.connect_timeout);
    upstream.give_up_after = Duration::MAX;
    upstream.progress = false;
    upstream.endpoint()?;
    // The run's settings come from the upstream's welcome; these are placeholders
    // the relay overwrites, and its own cut of the data.
    let mut run = RunSettings::defaults(Algorithm::Eamsgd);
    run.expected_workers = args.expected_workers;
    let mut config = ServerConfig::new(run);
    args.serving.apply(&mut config);
    config.checkpoint_every = None;
    let certificate = args.serving.certificate().context("setting up TLS")?;
    config.tls = certificate.as_ref().map(|c| c.config.clone());
    // An image folder is decoded once the upstream describes the network.
    let (data_dir, data) = match args.serving.data.as_deref() {
        Some(dir) if tether_dataset::format(dir) == tether_dataset::Format::Folder => (
            dir.to_path_buf(),
            RelayData::Folder {
                dir: dir.to_path_buf(),
                eval_limit: config.eval_limit,
            },
        ),
        dir => {
            let (data_dir, data) = tether_dataset::load(dir)?;
            let data = tether_server::RunData::new(data, config.eval_limit);
            (data_dir, RelayData::Loaded(data))
        }
    };
    runtime()?.block_on(async move {
        let listener = args.serving.listen().await?;
        let local: SocketAddr = listener.local_addr()?;
        let shown = shown_addr(local);
        let (http, ws) = if certificate.is_some() {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        println!("tether relay for {} (data: {})", args.upstream, data_dir.display());
        println!("  dashboard: {http}://{shown}/   status: {http}://{shown}/api/status");
        println!("  workers:   tether work --server {ws}://{shown}");
        println!("  (serving starts once the upstream has welcomed this relay)");
        let (stop_tx, stop_rx) = watch::channel(false);
        let interrupt = interrupted();
        tokio::spawn(async move {
            interrupt.await;
            eprintln!("stopping: a last exchange with the upstream, then telling the workers");
            let _ = stop_tx.send(true);
        });
        let summary = tether_relay::run(
            listener,
            RelayConfig {
                server: config,
                upstream,
                tau_up: args.tau_up,
                max_wait: Duration::from_secs(args.max_wait),
                alpha: args.alpha,
                public_url: args.public_url.clone(),
                data,
            },
            stop_rx,
        )
        .await
        .context("relay failed")?;
        println!(
            "relay done ({}): {} exchanges with the upstream, {} updates from its own workers, {} reconnects",
            summary.upstream.stopped,
            summary.upstream.syncs,
            summary.syncs,
            summary.upstream.reconnects
        );
        Ok(())
    })
}
