//! `tether bench data`: flags and the printed table of `tether_lab::data_bench` (a
//! generated packed set several times the server's `--data-memory`, served from
//! disk to clients that download every shard, against the same set in memory).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tether_lab::data_bench::{self, DataBench};

use crate::net::runtime;
use crate::write_report;

#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// Training images to generate, in MiB of packed pixels.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub size_mib: u64,
    /// The server's --data-memory for the on-disk run, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_mib: u64,
    /// Clients downloading one shard each.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Write the rows here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn run_bench_data(args: BenchDataArgs) -> Result<()> {
    let bench = DataBench {
        exe: std::env::current_exe()?,
        size_mib: args.size_mib,
        memory_mib: args.memory_mib,
        workers: args.workers,
    };
    let base = std::env::temp_dir().join(format!("tether-bench-data-{}", std::process::id()));
    eprintln!(
        "generating {} MiB of 3×32×32 images in {} (removed afterwards)",
        args.size_mib,
        base.display()
    );
    let rows = runtime()?.block_on(data_bench::run(&bench, &base));
    let _ = std::fs::remove_dir_all(&base);
    let rows = rows.context("bench data")?;
    print!("{}", data_bench::table(&rows));
    if let [disk, memory] = &rows[..] {
        println!(
            "on disk the server peaked at {:.0} MiB for {:.0} MiB of images (budget {} MiB), {:.2}× the in-memory run's peak",
            disk.peak_mib,
            disk.data_mib,
            args.memory_mib,
            disk.peak_mib / memory.peak_mib
        );
    }
    write_report(args.report.as_deref(), &rows)
}
