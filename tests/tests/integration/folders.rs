//! A folder of images as a data set: a generated folder (PNG and JPEG, mixed sizes,
//! grey and colour, 3 classes, and a file that is not an image) trains a network
//! described in a file, with a residual block and batch norm, through `tether
//! serve`, a native worker that has nothing but the URL (it downloads its shard of
//! packed pixels) and one that decodes the folder on its own disk; the center
//! learns the classes, and the report names them.

use std::time::Duration;

use anyhow::{Context, Result};
use tether_tests::serve::Serve;
use tether_tests::{PHOTO_CLASSES, scratch, write_photo_folder};

const NET: &str = r#"
name = "photonet"
input = [3, 24, 24]
classes = 3
layers = [
  "conv 8 kernel=3 pad=1 bias=false", "batchnorm", "relu", "maxpool 2",
  { residual = ["conv 8 kernel=3 pad=1 bias=false", "batchnorm", "relu",
                "conv 8 kernel=3 pad=1 bias=false", "batchnorm"] },
  "relu", "globalavgpool", "linear 3",
]
[augment]
crop = 20
flip = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_folder_trains_a_described_network_through_serve() -> Result<()> {
    let root = scratch("folders-serve")?;
    let photos = root.join("photos");
    write_photo_folder(&photos, 160)?;
    let net = root.join("photonet.toml");
    std::fs::write(&net, NET)?;
    let run = root.join("run");
    let mut serve = Serve::start(
        &run,
        &[
            "--data",
            &photos.display().to_string(),
            "--model",
            &net.display().to_string(),
            "--expected-workers",
            "2",
            "--tau",
            "4",
            "--batch",
            "16",
            "--lr",
            "0.02",
            "--eval-every",
            "2",
            "--max-samples",
            "2400",
        ],
    )?;
    let status = serve.status().await?;
    assert_eq!(status["network"]["name"], "photonet", "{status}");
    let classes = serve.get_json("/api/classes").await?;
    let names: Vec<&str> = classes["classes"]
        .as_array()
        .context("a list of classes")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names, PHOTO_CLASSES,
        "the folders name the classes: {classes}"
    );
    // One worker with nothing but the URL, one with the folder on its own disk
    // (decoded for the network the welcome describes, not the default 3×32×32).
    let worker = serve.worker(&root.join("cache"), &[])?;
    let local_cache = root.join("local-cache");
    let photos_arg = photos.display().to_string();
    let local = serve.worker(&local_cache, &["--data", &photos_arg])?;
    let report = serve.finished_report(&run, Duration::from_secs(240))?;
    for w in [worker, local] {
        let out = w.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        local_cache.join("folders").is_dir() && !local_cache.join("shards").exists(),
        "the local worker decoded its folder and downloaded nothing"
    );
    let acc = report["evaluation"]["accuracy"]
        .as_f64()
        .context("an evaluation")?;
    assert!(
        acc > 0.6,
        "three classes after 2 400 samples: {acc} (chance is 1/3)"
    );
    // The report names every class with the center's accuracy on its test images
    // (40 each; the odd file in train/ was skipped).
    let classes = report["classes"]
        .as_array()
        .context("classes in the report")?;
    let scored: Vec<(&str, u64)> = classes
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or(""),
                c["test_images"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        scored,
        PHOTO_CLASSES.map(|n| (n, 40)),
        "{}",
        report["classes"]
    );
    assert!(
        classes.iter().all(|c| c["accuracy"].as_f64().is_some()),
        "{}",
        report["classes"]
    );
    Ok(())
}

/// More class folders than the network has outputs: refused before anything
/// starts, saying what to change.
#[test]
fn a_folder_with_more_classes_than_the_network_is_refused() -> Result<()> {
    let root = scratch("folders-classes")?;
    let photos = root.join("photos");
    write_photo_folder(&photos, 8)?;
    let net = root.join("two.toml");
    std::fs::write(
        &net,
        NET.replace("classes = 3", "classes = 2")
            .replace("linear 3", "linear 2"),
    )?;
    let out = tether_tests::tether(&[
        "serve",
        "--data",
        &photos.display().to_string(),
        "--model",
        &net.display().to_string(),
        "--port",
        "0",
        "--run-dir",
        &root.join("run").display().to_string(),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("3 class folders") && err.contains("classes = 3"),
        "{err}"
    );
    Ok(())
}
