//! Networks described in files: `tether models` lists the shipped ones with the
//! counts models/README.md states and checks a file (errors name the layer and the
//! shapes, and nothing starts), the README's own example checks out, and a network
//! with a residual block and batch norm, described in a file, trains through
//! `tether serve` with a native worker that knows nothing but the URL.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use tether_tests::serve::Serve;
use tether_tests::{scratch, tether};

fn repo_file(path: &str) -> Result<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).with_context(|| path.to_owned())
}

#[test]
fn shipped_networks_are_listed_with_the_counts_models_readme_states() -> Result<()> {
    let out = tether(&["models"])?;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    let listed: BTreeMap<String, u64> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            Some((words.first()?.to_string(), words.get(3)?.parse().ok()?))
        })
        .collect();
    // The README's table: | `name` | … | parameters | …
    let readme = repo_file("models/README.md")?;
    let stated: BTreeMap<String, u64> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let params = cells.get(4)?.replace(' ', "").parse().ok()?;
            Some((name.to_string(), params))
        })
        .collect();
    assert_eq!(listed.len(), 7, "{text}");
    assert_eq!(listed, stated, "tether models vs models/README.md");
    assert_eq!(listed["small"], 421_642);
    assert_eq!(listed["paper"], 430_666);
    assert_eq!(listed["cifar"], 433_866);
    Ok(())
}

#[test]
fn a_bad_description_is_refused_by_layer_and_nothing_starts() -> Result<()> {
    let dir = scratch("models-bad")?;
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "input = [1, 8, 8]\nclasses = 10\nlayers = [\"maxpool 4\", \"conv 8 kernel=5\", \"flatten\", \"linear 10\"]\n",
    )?;
    let bad = bad.display().to_string();
    let out = tether(&["models", &bad])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("layers[1]") && err.contains("5×5 kernel does not fit a 2×2 map"),
        "{err}"
    );
    // The server refuses it before it binds or writes anything.
    let run = dir.join("run");
    let out = tether(&[
        "serve",
        "--port",
        "0",
        "--model",
        &bad,
        "--run-dir",
        &run.display().to_string(),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("layers[1]"), "{err}");
    assert!(!run.exists(), "a refused description started a run");
    // A typo in a key, and a file that is not there.
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "input = [1, 8, 8]\nclases = 10\nlayers = []\n")?;
    let out = tether(&["models", &typo.display().to_string()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("clases"), "{err}");
    let out = tether(&["train", "--model", "no-such-net.toml"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("neither a shipped network"),
        "{err}"
    );
    Ok(())
}

#[test]
fn the_readmes_own_network_checks_out() -> Result<()> {
    let readme = repo_file("README.md")?;
    let section = readme
        .split("## Your own network")
        .nth(1)
        .context("README has a section on networks")?;
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .context("a toml block")?;
    let file = scratch("models-readme")?.join("mynet.toml");
    std::fs::write(&file, block)?;
    let out = tether(&["models", &file.display().to_string()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.contains("mynet"));
    Ok(())
}

/// A residual block with batch norm, on the shipped 1×28×28 images.
const RESIDUAL_NET: &str = r#"
name = "resnorm"
input = [1, 28, 28]
classes = 10
layers = [
  "conv 8 kernel=3 pad=1 bias=false", "batchnorm", "relu", "maxpool 2",
  { residual = ["conv 8 kernel=3 pad=1 bias=false", "batchnorm", "relu",
                "conv 8 kernel=3 pad=1 bias=false", "batchnorm"] },
  "relu", "maxpool 2",
  { residual = ["conv 16 kernel=3 stride=2 pad=1 bias=false", "batchnorm"],
    shortcut = ["conv 16 kernel=1 stride=2 bias=false", "batchnorm"] },
  "relu", "flatten", "dropout 0.1", "linear 10",
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_described_residual_network_trains_through_serve() -> Result<()> {
    let root = scratch("models-serve")?;
    let file = root.join("resnorm.toml");
    std::fs::write(&file, RESIDUAL_NET)?;
    let run = root.join("run");
    let mut serve = Serve::start(
        &run,
        &[
            "--model",
            &file.display().to_string(),
            "--expected-workers",
            "1",
            "--tau",
            "4",
            "--batch",
            "32",
            "--eval-every",
            "2",
            "--max-samples",
            "8000",
        ],
    )?;
    let status = serve.status().await?;
    assert_eq!(status["network"]["name"], "resnorm", "{status}");
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
    // Scored with batch-norm statistics the evaluator estimated for the center.
    assert!(
        acc > 0.6,
        "8 000 Fashion-MNIST images: {acc} (chance is 0.1)"
    );
    Ok(())
}
