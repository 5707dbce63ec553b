//! `tether bench tree`: flags and the printed table of `tether_lab::tree_bench` (the
//! same workers straight to a root, then behind relays, as real processes of this
//! binary; the direct layout is the baseline).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tether_lab::tree_bench::{self, TreeBench};

use crate::net::runtime;
use crate::{ModelArg, write_report};

#[derive(Args, Debug)]
pub struct BenchTreeArgs {
    /// Training workers (processes, one thread each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=256))]
    pub workers: u32,
    /// Relays in the tree layout; the workers are split evenly among them.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub relays: u32,
    /// Training images per layout (the root's --max-samples).
    #[arg(long, default_value_t = 120_000)]
    pub samples: u64,
    /// Local steps between a worker's syncs.
    #[arg(long, default_value_t = 4)]
    pub tau: u32,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: u32,
    /// A relay's workers' updates between its exchanges with the root.
    #[arg(long, default_value_t = 4)]
    pub tau_up: u32,
    /// The network.
    #[arg(long, value_parser = crate::parse_model, default_value = "small")]
    pub model: ModelArg,
    /// Write the rows here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn run_bench_tree(args: BenchTreeArgs) -> Result<()> {
    let bench = TreeBench {
        exe: std::env::current_exe()?,
        workers: args.workers,
        relays: args.relays,
        samples: args.samples,
        tau: args.tau,
        batch: args.batch,
        tau_up: args.tau_up,
        model: args.model,
    };
    let base = std::env::temp_dir().join(format!("tether-bench-tree-{}", std::process::id()));
    let rows = runtime()?.block_on(tree_bench::run(&bench, &base))?;
    println!(
        "{:<44} {:>10} {:>10} {:>9} {:>9} {:>12} {:>9} {:>8}",
        "layout",
        "root upd/s",
        "wkr sync/s",
        "MB/s in",
        "MB/s out",
        "CPU ms/sync",
        "accuracy",
        "wall s"
    );
    for r in &rows {
        println!(
            "{:<44} {:>10.1} {:>10.1} {:>9.2} {:>9.2} {:>12.2} {:>8.2}% {:>8.0}",
            r.layout,
            r.root_updates_per_s,
            r.worker_syncs_per_s,
            r.root_mb_in_per_s,
            r.root_mb_out_per_s,
            r.root_cpu_ms_per_worker_sync,
            r.accuracy * 100.0,
            r.wall_s
        );
    }
    let (d, t) = (&rows[0], &rows[1]);
    println!(
        "tree / direct: root updates {:.2}×, root bytes in {:.2}×, root CPU per worker sync {:.2}×, accuracy {:+.2} points at {} vs {} samples",
        t.root_updates_per_s / d.root_updates_per_s,
        t.root_mb_in_per_s / d.root_mb_in_per_s,
        t.root_cpu_ms_per_worker_sync / d.root_cpu_ms_per_worker_sync,
        (t.accuracy - d.accuracy) * 100.0,
        t.samples,
        d.samples
    );
    let _ = std::fs::remove_dir_all(&base);
    write_report(args.report.as_deref(), &rows)
}
