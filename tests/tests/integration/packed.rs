//! Data larger than `--data-memory`: a packed set (`train.tsi`, `test.tsi`), and an
//! image folder the server packs chunk by chunk; the server keeps the training file
//! on disk, streams each shard from it to a worker that has nothing but the URL
//! and keeps the shard on its own disk, reading batches from it; the center learns.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tether_dataset::packed::{TEST_FILE, TRAIN_FILE, write_packed};
use tether_tests::serve::Serve;
use tether_tests::{PHOTO_CLASSES, scratch, write_cifar_like, write_photo_folder};

const NET: &str = r#"
input = [3, 32, 32]
classes = 10
layers = ["conv 8 kernel=3 pad=1", "relu", "maxpool 2", "globalavgpool", "linear 10"]
"#;

/// [`NET`] for the three classes of the generated photo folder.
fn three_class_net() -> String {
    NET.replace("classes = 10", "classes = 3")
        .replace("linear 10", "linear 3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_set_larger_than_the_budget_is_served_from_disk() -> Result<()> {
    let root = scratch("packed-serve")?;
    let cifar = root.join("cifar");
    write_cifar_like(&cifar, 1200, 200)?;
    let (_, data) = tether_dataset::load(Some(&cifar))?;
    let packed = root.join("packed");
    std::fs::create_dir_all(&packed)?;
    write_packed(&packed.join(TRAIN_FILE), &data.train)?;
    write_packed(&packed.join(TEST_FILE), &data.test)?;
    std::fs::write(packed.join("classes.txt"), "zero\none\ntwo\n")?;
    let net = root.join("net.toml");
    std::fs::write(&net, NET)?;
    // The training file is 3.5 MiB.
    let acc = serve_from_disk(&root, &packed, &net, &["zero", "one", "two"]).await?;
    assert!(acc > 0.5, "ten colours after 3 000 samples: {acc}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_folder_larger_than_the_budget_is_packed_and_served_from_disk() -> Result<()> {
    let root = scratch("packed-folder")?;
    let photos = root.join("photos");
    write_photo_folder(&photos, 240)?;
    let net = root.join("net.toml");
    std::fs::write(&net, three_class_net())?;
    // 720 training images of 3×32×32: 2.1 MiB packed.
    let acc = serve_from_disk(&root, &photos, &net, &PHOTO_CLASSES).await?;
    assert!(acc > 0.6, "three classes after 3 000 samples: {acc}");
    Ok(())
}

/// Serves `data` with `--data-memory 1` (MiB) to one URL-only worker with
/// `--shard-memory 1` until 3 000 samples; checks the log says the set stays on disk and the first classes' names;
/// returns the final accuracy.
async fn serve_from_disk(root: &Path, data: &Path, net: &Path, names: &[&str]) -> Result<f64> {
    let run = root.join("run");
    let cache = root.join("cache");
    let mut serve = Serve::start_with_env(
        &run,
        &[("TETHER_CACHE", cache.as_os_str())],
        &[
            "--data",
            &data.display().to_string(),
            "--data-memory",
            "1",
            "--model",
            &net.display().to_string(),
            "--expected-workers",
            "1",
            "--tau",
            "4",
            "--batch",
            "16",
            "--lr",
            "0.05",
            "--eval-every",
            "2",
            "--max-samples",
            "3000",
        ],
    )?;
    let classes = serve.get_json("/api/classes").await?;
    for (label, name) in names.iter().enumerate() {
        assert_eq!(classes["classes"][label]["name"], *name, "{classes}");
    }
    // The worker keeps its shard (> 1 MiB) on disk too and reads batches from it.
    let worker_report = root.join("worker.json");
    let worker_report_arg = worker_report.display().to_string();
    let worker = serve.worker(
        &root.join("worker-cache"),
        &["--shard-memory", "1", "--report", &worker_report_arg],
    )?;
    let report = serve.finished_report(&run, Duration::from_secs(240))?;
    let out = worker.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let worked = tether_tests::read_json(&worker_report)?;
    assert_eq!(worked["shard_source"], "download (on disk)", "{worked}");
    let log = serve.log();
    assert!(log.contains("served from disk"), "{log}");
    report["evaluation"]["accuracy"]
        .as_f64()
        .context("an evaluation")
}

/// `tether pack` writes an image folder as a packed set for a network (and its class
/// names), which serves like any data set; bad input creates nothing.
#[test]
fn tether_pack_writes_a_folder_as_a_packed_set() -> Result<()> {
    let root = scratch("pack-cli")?;
    let photos = root.join("photos");
    write_photo_folder(&photos, 20)?;
    let net = root.join("net.toml");
    std::fs::write(&net, three_class_net())?;
    let out = root.join("packed");
    let run = tether_tests::tether(&[
        "pack",
        "--data",
        &photos.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--model",
        &net.display().to_string(),
    ])?;
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        said.contains("60 training and 15 test images of 3×32×32, 3 class names"),
        "{said}"
    );
    let (_, data) = tether_dataset::load(Some(&out))?;
    assert_eq!((data.train.len(), data.train.shape()), (60, [3, 32, 32]));
    assert_eq!(data.classes, PHOTO_CLASSES);
    let missing = root.join("nothing-here");
    let bad = tether_tests::tether(&[
        "pack",
        "--data",
        &root.join("absent").display().to_string(),
        "--out",
        &missing.display().to_string(),
    ])?;
    assert!(!bad.status.success());
    assert!(!missing.exists(), "a failed pack creates nothing");
    Ok(())
}
