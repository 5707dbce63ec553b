//! The network benchmarks as a user runs them, cut tiny: each measures against its
//! baseline in the same run and writes its report (`tether_lab::server_bench`,
//! `tether_lab::tree_bench` and `tether_lab::local` behind them).

use anyhow::{Context, Result};
use tether_tests::{tether_bin, tether_report};

#[test]
fn bench_server_measures_updates_against_a_bare_echo() -> Result<()> {
    // The same binary as the one to compare with: its column must be filled too.
    let bin = tether_bin()?;
    let r = tether_report(
        "bench-server",
        &[
            "bench",
            "server",
            "--workers",
            "1,2",
            "--seconds",
            "0.5",
            "--model",
            "small",
            "--against",
            bin.to_str().context("a UTF-8 path")?,
        ],
    )?;
    assert_eq!(r["model"], "small");
    // The screen's judgements alone, the served rate's ceiling, are measured first.
    let alone = r["screen_alone_per_s"].as_f64().context("screen alone")?;
    assert!(alone > 1.0, "{alone}");
    let rows = r["results"].as_array().context("results")?;
    assert_eq!(rows.len(), 2);
    for row in rows {
        let updates = row["updates_per_s"].as_f64().context("updates")?;
        let echo = row["echo_per_s"].as_f64().context("echo")?;
        let against = row["against_per_s"].as_f64().context("against")?;
        assert!(updates > 1.0 && against > 1.0 && echo > 1.0, "{row}");
        assert!((row["ratio_to_echo"].as_f64().context("ratio")? - updates / echo).abs() < 1e-9);
    }
    Ok(())
}

#[test]
fn bench_tree_runs_both_layouts_to_the_same_samples() -> Result<()> {
    let r = tether_report(
        "bench-tree",
        &[
            "bench",
            "tree",
            "--workers",
            "2",
            "--relays",
            "1",
            "--samples",
            "4000",
            "--tau",
            "2",
            "--tau-up",
            "2",
        ],
    )?;
    let rows = r.as_array().context("rows")?;
    assert_eq!(rows.len(), 2, "direct, then the tree");
    assert!(
        rows[0]["layout"]
            .as_str()
            .is_some_and(|l| l.contains("→ root"))
    );
    assert!(
        rows[1]["layout"]
            .as_str()
            .is_some_and(|l| l.contains("1 relays"))
    );
    for row in rows {
        assert!(row["samples"].as_u64() >= Some(4000), "{row}");
        assert!(row["root_updates_per_s"].as_f64() > Some(0.0), "{row}");
        assert!(row["accuracy"].as_f64() > Some(0.3), "{row}");
    }
    Ok(())
}

#[test]
fn bench_sync_measures_the_wait_per_tau() -> Result<()> {
    let r = tether_report(
        "bench-sync",
        &["bench", "sync", "--tau", "1,4", "--steps", "16"],
    )?;
    let rows = r["results"].as_array().context("results")?;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert!(row["syncs"].as_u64() >= Some(3), "{row}");
        assert!(
            row["wait_fraction"]
                .as_f64()
                .is_some_and(|f| (0.0..1.0).contains(&f)),
            "{row}"
        );
    }
    Ok(())
}

/// A packed set of 16 MiB against a 2 MiB budget: served from disk, every shard
/// downloaded and checked by the benchmark itself, the server's peak below the
/// same set's in memory.
#[test]
fn bench_data_serves_a_set_larger_than_the_budget_from_disk() -> Result<()> {
    let r = tether_report(
        "bench-data",
        &[
            "bench",
            "data",
            "--size-mib",
            "16",
            "--memory-mib",
            "2",
            "--workers",
            "2",
        ],
    )?;
    let rows = r.as_array().context("rows")?;
    assert_eq!(rows.len(), 2, "{r}");
    assert_eq!(
        (rows[0]["mode"].as_str(), rows[1]["mode"].as_str()),
        (Some("disk"), Some("memory"))
    );
    let peak = |i: usize| rows[i]["peak_mib"].as_f64().unwrap_or(f64::NAN);
    assert!(
        peak(0) < peak(1),
        "disk {} MiB vs memory {} MiB",
        peak(0),
        peak(1)
    );
    assert!(rows[0]["download_mib_s"].as_f64() > Some(0.0), "{r}");
    Ok(())
}
