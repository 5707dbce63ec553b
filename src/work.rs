//! `tether work`: its flags and their resolution into the worker library's config.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tether_shared::codec::Encoding;
use tether_worker::client::{self, WorkConfig};
use tokio::sync::watch;

use crate::net::{interrupted, runtime};
use crate::{BackendArg, write_report};

#[derive(Args, Debug)]
pub struct WorkArgs {
    /// The server: ws://host:port, or wss://host:port for TLS.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub server: String,
    /// Trust the certificates in this PEM file for wss:// (the server's
    /// self-signed certificate, or a private CA), besides the system's roots.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// CPU threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// The run's worker token.
    #[arg(long, env = "TETHER_WORKER_TOKEN")]
    pub token: Option<String>,
    /// The run's data on this machine (IDX, CIFAR-10 or an image folder, which is
    /// decoded for the network the server describes) [default: download this
    /// worker's shard from the server, verified, and cached in the user's cache
    /// directory ($TETHER_CACHE to move it)].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A downloaded shard larger than this many MiB stays in the cache on disk
    /// and batches are read from it (only its labels are held in memory).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_memory: u64,
    /// Payload encodings to offer the server, comma-separated (it picks one).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16,q8")]
    pub encodings: Vec<Encoding>,
    /// Wait for each sync's reply before training on (default: keep training
    /// while a sync is in flight, where the algorithm allows it).
    #[arg(long)]
    pub no_overlap: bool,
    /// Give up after this many seconds if the server was never reached.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,
    /// Stop after this many local steps (default: until the run ends or Ctrl-C).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Option<u64>,
    /// Give up after a server that was reached has been unreachable this many seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub give_up_after: u64,
    /// Write what the worker did here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The CPU convolution kernel: avx512, avx2, portable or gemm (default: the
    /// fastest this CPU has that passes its check), to compare kernels or step
    /// around one.
    #[arg(long)]
    pub conv: Option<String>,
}

pub fn run_work(args: WorkArgs) -> Result<()> {
    if let Some(conv) = &args.conv {
        tether_shared::model::ops::choose_cpu_conv(conv)
            .map_err(anyhow::Error::msg)
            .context("--conv")?;
    }
    let mut config = WorkConfig::new(args.server.clone());
    config.ca_cert = args.ca_cert.clone();
    config.encodings = args.encodings.clone();
    if !config.encodings.contains(&Encoding::F32) {
        config.encodings.push(Encoding::F32);
    }
    config.overlap = !args.no_overlap;
    config.connect_timeout = Duration::from_secs(args.connect_timeout);
    config.backend = args.backend.into();
    config.threads = args.threads.map(|t| t as usize);
    config.token = args.token.clone();
    config.data = args.data.clone();
    config.shard_memory = args.shard_memory << 20;
    config.max_steps = args.steps;
    config.give_up_after = Duration::from_secs(args.give_up_after);
    config.endpoint()?;
    runtime()?.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let interrupt = interrupted();
        tokio::spawn(async move {
            interrupt.await;
            eprintln!("stopping: finishing the current steps, a last sync, then leaving");
            let _ = stop_tx.send(true);
        });
        let report = client::run(config, stop_rx).await.context("worker failed")?;
        println!(
            "worker done ({}): {} steps, {} syncs ({}{}), {:.0} samples/s, training {:.1} % of wall time, last loss {:.4}",
            report.stopped,
            report.steps,
            report.syncs,
            report.encoding,
            if report.overlap { ", overlapped" } else { "" },
            report.samples_per_s,
            report.compute_utilisation * 100.0,
            report.last_loss
        );
        write_report(args.report.as_deref(), &report)
    })
}
