//! A packed data set (`train.tsi`, `test.tsi`) larger than `--data-memory`: the
//! server keeps its training file on disk, streams each shard from it to a worker
//! that has nothing but the URL, and the center learns.

use std::time::Duration;

use anyhow::{Context, Result};
use tether_dataset::packed::{TEST_FILE, TRAIN_FILE, write_packed};
use tether_tests::serve::Serve;
use tether_tests::{scratch, write_cifar_like};

const NET: &str = r#"
input = [3, 32, 32]
classes = 10
layers = ["conv 8 kernel=3 pad=1", "relu", "maxpool 2", "globalavgpool", "linear 10"]
"#;

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
    let run = root.join("run");
    let mut serve = Serve::start(
        &run,
        &[
            "--data",
            &packed.display().to_string(),
            "--data-memory",
            "1", // MiB; the training file is 3.5 MiB
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
    let classes = serve.get_json("/api/classes?limit=3").await?;
    assert_eq!(classes["classes"][2]["name"], "two", "{classes}");
    assert_eq!(classes["classes"][1]["label"], 1, "{classes}");
    let worker = serve.worker(&root.join("cache"), &[])?;
    let report = serve.finished_report(&run, Duration::from_secs(240))?;
    let out = worker.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = serve.log();
    assert!(log.contains("served from disk"), "{log}");
    let acc = report["evaluation"]["accuracy"]
        .as_f64()
        .context("an evaluation")?;
    assert!(acc > 0.5, "ten colours after 3 000 samples: {acc}");
    Ok(())
}
