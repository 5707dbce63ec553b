//! A folder of images as a data set: a generated folder (PNG and JPEG, mixed sizes,
//! grey and colour, 3 classes, and a file that is not an image) trains a network
//! described in a file, with a residual block and batch norm, through `tether
//! serve` and a native worker that has nothing but the URL (it downloads its shard
//! of packed pixels); the center learns the classes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tether_tests::scratch;
use tether_tests::serve::Serve;

/// Three classes told apart by colour and by a stripe's direction.
fn write_photos(root: &Path, per_class: usize) -> Result<()> {
    for (split, n) in [("train", per_class), ("test", per_class / 4)] {
        for (c, name) in ["red-rows", "green-cols", "grey-dots"].iter().enumerate() {
            let dir = root.join(split).join(name);
            std::fs::create_dir_all(&dir)?;
            for i in 0..n {
                let (w, h) = (24 + (i % 5) as u32 * 9, 20 + (i % 3) as u32 * 11);
                let jitter = (i * 37 % 40) as u8;
                let path = dir.join(format!("{i:04}.{}", if i % 2 == 0 { "png" } else { "jpg" }));
                match c {
                    0 => image::RgbImage::from_fn(w, h, |_, y| {
                        let on = (y / 3) % 2 == 0;
                        image::Rgb([if on { 230 } else { 120 }, jitter, 30])
                    })
                    .save(path)?,
                    1 => image::RgbImage::from_fn(w, h, |x, _| {
                        let on = (x / 3) % 2 == 0;
                        image::Rgb([30, if on { 230 } else { 110 }, jitter])
                    })
                    .save(path)?,
                    _ => image::GrayImage::from_fn(w, h, |x, y| {
                        image::Luma([if (x + y) % 4 == 0 { 240 } else { 60 + jitter }])
                    })
                    .save(path)?,
                }
            }
        }
    }
    std::fs::write(root.join("train/red-rows/readme.png"), "not an image")?;
    Ok(())
}

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
    write_photos(&photos, 160)?;
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
            "1",
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
    let worker = serve.worker(&root.join("cache"), &[])?;
    let report = serve.finished_report(&run, Duration::from_secs(240))?;
    let out = worker.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acc = report["evaluation"]["accuracy"]
        .as_f64()
        .context("an evaluation")?;
    assert!(
        acc > 0.6,
        "three classes after 2 400 samples: {acc} (chance is 1/3)"
    );
    Ok(())
}
