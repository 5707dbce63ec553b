//! End-to-end tests of the `tether` binary: real training on the shipped data, real
//! report files, real error messages.

use anyhow::Result;
use tether_tests::{scratch, tether, tether_report};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn shipped_data_matches_the_checksums_in_its_readme() -> Result<()> {
    use sha2::{Digest, Sha256};
    let dir = tether_dataset::default_data_dir()?;
    let readme = std::fs::read_to_string(dir.join("README.md"))?;
    let sums: Vec<(&str, &str)> = readme
        .lines()
        .filter_map(|l| l.split_once("  "))
        .filter(|(hash, _)| hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    assert_eq!(sums.len(), 4, "the README lists one sum per file");
    for (expected, file) in sums {
        let actual = format!("{:x}", Sha256::digest(std::fs::read(dir.join(file))?));
        assert_eq!(actual, expected, "{file} is not the shipped file");
    }
    Ok(())
}

#[test]
fn help_lists_the_subcommands() -> Result<()> {
    let out = tether(&["--help"])?;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    for sub in ["train", "sim", "bench"] {
        assert!(text.contains(sub), "--help lacks {sub}: {text}");
    }
    Ok(())
}

#[test]
fn a_short_training_run_learns_and_writes_its_report() -> Result<()> {
    let r = tether_report(
        "train-short",
        &[
            "train",
            "--epochs",
            "2",
            "--train-limit",
            "4000",
            "--test-limit",
            "2000",
            "--backend",
            "cpu",
        ],
    )?;
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.70,
        "4000 images, 2 epochs should reach 70 %, got {acc}"
    );
    let epochs = r["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    assert!(
        epochs[1]["train_loss"].as_f64() < epochs[0]["train_loss"].as_f64(),
        "loss should fall: {epochs:?}"
    );
    assert_eq!(r["settings"]["batch"], 128);
    assert_eq!(r["train_samples"], 4000);
    assert!(
        r["samples_per_s"].as_f64().unwrap() > 0.0 && r["wall_seconds"].as_f64().unwrap() > 0.0
    );
    Ok(())
}

#[test]
fn one_full_epoch_reaches_the_accuracy_floor() -> Result<()> {
    // The floor: at least 80 % after one epoch on the full Fashion-MNIST
    // (the PyTorch peer gets 89.0 %).
    let r = tether_report(
        "train-full",
        &["train", "--epochs", "1", "--backend", "cpu"],
    )?;
    assert_eq!(r["train_samples"], 60_000);
    assert_eq!(r["test_samples"], 10_000);
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.80, "one epoch gave {acc}");
    Ok(())
}

#[test]
fn bad_flags_fail_with_clear_errors() -> Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--lr", "-1"], "--lr must be a positive number"),
        (&["train", "--lr", "NaN"], "--lr must be a positive number"),
        (
            &["train", "--momentum", "1.5"],
            "--momentum must be in [0, 1)",
        ),
        (&["train", "--epochs", "0"], "--epochs"),
        (&["train", "--model", "huge"], "invalid value 'huge'"),
        (
            &["train", "--data", "/nonexistent/tether-data"],
            "/nonexistent/tether-data",
        ),
        (&["sim", "stability", "--workers", "0"], "at least 1"),
        (&["sim", "stability", "--admm-eta", "0"], "--admm-eta"),
    ];
    for (args, expected) in cases {
        let out = tether(args)?;
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in: {err}"
        );
    }
    Ok(())
}

#[test]
fn a_corrupt_data_file_is_named_in_the_error() -> Result<()> {
    let dir = scratch("corrupt-data")?;
    let shipped = tether_dataset::default_data_dir()?;
    for f in [
        "train-images-idx3-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(shipped.join(f), dir.join(f))?;
    }
    // Labels that claim 10 items: the counts disagree with the 60 000 images.
    let labels = tether_shared::data::idx::encode(&[10], &[1; 10]);
    std::fs::write(dir.join("train-labels-idx1-ubyte"), labels)?;
    let out = tether(&["train", "--data", dir.to_str().unwrap()])?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("60000 images") && err.contains("10 labels"),
        "{err}"
    );
    Ok(())
}

#[test]
fn stability_simulation_reproduces_the_paper_and_draws_the_maps() -> Result<()> {
    // `repro stability` is claim 4's command (the same as `sim stability`).
    let png = scratch("stability-png")?.join("s.png");
    let r = tether_report(
        "stability",
        &[
            "repro",
            "stability",
            "--workers",
            "1,3",
            "--points",
            "30",
            "--png",
            png.to_str().unwrap(),
        ],
    )?;
    assert!(r["admm_spectral_radius"].as_f64().unwrap() > 1.0);
    for check in r["easgd"].as_array().unwrap() {
        assert!(
            check["max_alpha_disagreement"].as_f64().unwrap() < 1e-6,
            "{check}"
        );
    }
    let bytes = std::fs::read(&png)?;
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    Ok(())
}

#[test]
fn wgpu_backend_agrees_with_the_cpu_backend() -> Result<()> {
    use burn::tensor::Device;
    use tether_shared::data::{Batcher, Normalization};
    use tether_shared::model::Model;
    use tether_shared::train::{LocalOptimizer, Trainer};
    use tether_worker::backend::{BackendChoice, select};

    let wgpu = match select(BackendChoice::Wgpu, None) {
        Ok(s) => s,
        // CI installs lavapipe and sets this, so there the test cannot be skipped.
        Err(e) if std::env::var_os("TETHER_REQUIRE_WGPU").is_none() => {
            eprintln!("skipping: {e} (set TETHER_REQUIRE_WGPU=1 to make this a failure)");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!("wgpu device: {}", wgpu.description);
    let (_, data) = tether_dataset::load(None)?;
    let norm = Normalization::of(&data.train);
    let batcher = Batcher::new((0..data.train.len()).collect(), 64, 0, &norm);
    let cpu_device = Device::flex();
    let mut cpu = Trainer::new(&Model::small(), LocalOptimizer::default(), &cpu_device);
    let mut gpu = Trainer::new(&Model::small(), LocalOptimizer::default(), &wgpu.device);
    let start = cpu.params();
    gpu.set_params(&start)?;
    let order = batcher.epoch_order(0);
    for items in order.chunks(64).take(5) {
        let batch = batcher.batch(&data.train, items, 0);
        let (lc, lg): (f32, f32) = (
            cpu.step(batch.clone()).into_scalar(),
            gpu.step(batch).into_scalar(),
        );
        // Different summation orders in f32: losses agree to ~1e-5 relative; 1e-3 leaves margin.
        assert!(
            (lc - lg).abs() <= 1e-3 * lc.abs().max(1.0),
            "loss cpu {lc} vs wgpu {lg}"
        );
    }
    let (pc, pg) = (cpu.params(), gpu.params());
    let max_diff = pc
        .iter()
        .zip(&pg)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let max_move = pc
        .iter()
        .zip(&start)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Five steps at lr 0.05 move some weights by ~1e-2, while f32 rounding in a
    // different summation order stays near 1e-6: a tolerance of 1e-4 is far above
    // the noise and far below what a wrong kernel would give.
    assert!(
        max_move > 1e-3,
        "training should move the weights, moved {max_move}"
    );
    assert!(
        max_diff < 1e-4,
        "parameters differ by {max_diff} after 5 steps (moved {max_move})"
    );
    Ok(())
}
