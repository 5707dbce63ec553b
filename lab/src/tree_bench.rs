//! The tree benchmark behind `tether bench tree`: the same workers straight to a
//! root, then behind relays, as real processes of the `tether` binary on this
//! machine. Per layout: the root's updates/s, bytes in and out, CPU time per worker
//! sync, and the center's test accuracy once the same number of training images
//! went through it. The direct layout is the baseline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tether_shared::model::Model;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to measure.
#[derive(Clone, Debug)]
pub struct TreeBench {
    /// The `tether` binary the processes run.
    pub exe: PathBuf,
    /// Training workers (processes, one thread each).
    pub workers: u32,
    /// Relays in the tree layout; the workers are split evenly among them.
    pub relays: u32,
    /// Training images per layout (the root's `--max-samples`).
    pub samples: u64,
    /// Local steps between a worker's syncs.
    pub tau: u32,
    /// Images per step.
    pub batch: u32,
    /// A relay's workers' updates between its exchanges with the root.
    pub tau_up: u32,
    /// The network.
    pub model: Model,
}

/// Why a layout could not be measured.
#[derive(Debug, Error)]
pub enum TreeBenchError {
    /// The settings cannot be run.
    #[error("{0}")]
    Settings(String),
    /// A process, file or socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A process did not do what it should have, in time; the logs say why.
    #[error("{0}")]
    Run(String),
    /// The root's report could not be read.
    #[error("the root's report: {0}")]
    Report(#[from] serde_json::Error),
}

/// Measures the direct layout, then the tree, each in its own folder under `base`.
pub async fn run(bench: &TreeBench, base: &Path) -> Result<Vec<Row>, TreeBenchError> {
    if bench.relays == 0 || !bench.workers.is_multiple_of(bench.relays) {
        return Err(TreeBenchError::Settings(
            "--workers must split evenly among --relays".into(),
        ));
    }
    let direct = layout(bench, 0, &base.join("direct")).await?;
    let tree = layout(bench, bench.relays, &base.join("tree")).await?;
    Ok(vec![direct, tree])
}

/// One layout's figures. Rates are taken between 10 % and 90 % of the samples,
/// so start-up and the final evaluation are not in them.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The layout in words.
    pub layout: String,
    /// Updates the root applied per second.
    pub root_updates_per_s: f64,
    /// Syncs of the training workers per second (at the root or at the relays).
    pub worker_syncs_per_s: f64,
    /// MB the root received per second.
    pub root_mb_in_per_s: f64,
    /// MB the root sent per second.
    pub root_mb_out_per_s: f64,
    /// Root CPU time (user + system) per worker sync.
    pub root_cpu_ms_per_worker_sync: f64,
    /// The root's test accuracy once the samples were in (full test set).
    pub accuracy: f64,
    /// Training images the root counted in the end.
    pub samples: u64,
    /// Seconds from the workers' start to the root's exit.
    pub wall_s: f64,
}

/// A moment of a layout: the root's counters, its CPU time, and the workers' syncs.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: Instant,
    root_syncs: u64,
    worker_syncs: u64,
    bytes_in: u64,
    bytes_out: u64,
    cpu_s: f64,
}

pub(crate) fn free_port() -> Result<u16, TreeBenchError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// User + system CPU seconds of a process so far (Linux `/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

pub(crate) async fn status(addr: SocketAddr) -> Option<Value> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /api/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8(body).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()?
}

pub(crate) fn spawn(
    exe: &Path,
    args: &[String],
    cwd: &Path,
    log: &str,
) -> Result<Child, TreeBenchError> {
    let out = std::fs::File::create(cwd.join(log))?;
    Ok(Command::new(exe)
        .current_dir(cwd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()?)
}

fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

/// Runs one layout: `relays` = 0 puts every worker on the root.
async fn layout(args: &TreeBench, relays: u32, dir: &Path) -> Result<Row, TreeBenchError> {
    std::fs::create_dir_all(dir)?;
    let exe = args.exe.as_path();
    let model = args.model.name().to_string();
    let root_port = free_port()?;
    let root_addr = SocketAddr::from(([127, 0, 0, 1], root_port));
    let members = if relays == 0 { args.workers } else { relays };
    let mut children = Vec::new();
    let mut root = spawn(
        exe,
        &[
            s("serve"),
            s("--host"),
            s("127.0.0.1"),
            s("--port"),
            s(root_port),
            s("--run-dir"),
            s("run"),
            s("--model"),
            model.clone(),
            s("--tau"),
            s(args.tau),
            s("--batch"),
            s(args.batch),
            s("--expected-workers"),
            s(members),
            s("--seed"),
            s(1),
            s("--max-samples"),
            s(args.samples),
            s("--checkpoint-every"),
            s(0),
            // Scored once, on the full test set, when the samples are in.
            s("--eval-every"),
            s(100_000),
        ],
        dir,
        "root.log",
    )?;
    let root_pid = root.id();
    let t0 = Instant::now();
    while status(root_addr).await.is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(TreeBenchError::Run(format!(
                "the root did not start (see {})",
                dir.join("root.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut servers = vec![root_addr];
    if let Some(per) = args.workers.checked_div(relays) {
        for r in 0..relays {
            let port = free_port()?;
            children.push(spawn(
                exe,
                &[
                    s("relay"),
                    s("--host"),
                    s("127.0.0.1"),
                    s("--port"),
                    s(port),
                    s("--upstream"),
                    format!("ws://{root_addr}"),
                    s("--expected-workers"),
                    s(per),
                    s("--tau-up"),
                    s(args.tau_up),
                    s("--eval-every"),
                    s(0),
                ],
                dir,
                &format!("relay-{r}.log"),
            )?);
            servers.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        while status(root_addr)
            .await
            .is_none_or(|s| s["workers"].as_array().map_or(0, Vec::len) < relays as usize)
        {
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(TreeBenchError::Run(format!(
                    "the relays did not join (see {})",
                    dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let data =
        tether_dataset::default_data_dir().map_err(|e| TreeBenchError::Settings(e.to_string()))?;
    let targets: Vec<SocketAddr> = if relays == 0 {
        vec![root_addr]
    } else {
        servers[1..].to_vec()
    };
    for w in 0..args.workers {
        let target = targets[w as usize % targets.len()];
        children.push(spawn(
            exe,
            &[
                s("work"),
                s("--server"),
                format!("ws://{target}"),
                s("--backend"),
                s("cpu"),
                s("--threads"),
                s(1),
                s("--data"),
                data.display().to_string(),
            ],
            dir,
            &format!("worker-{w}.log"),
        )?);
    }
    // Poll the counters; keep the marks at 10 % and 90 % of the samples.
    let (mut first, mut last): (Option<Mark>, Option<Mark>) = (None, None);
    let started = Instant::now();
    loop {
        let Some(root_status) = status(root_addr).await else {
            break; // finished: the root is writing its report, or gone
        };
        let samples = root_status["samples"].as_u64().unwrap_or(0);
        let mut worker_syncs = 0;
        if relays == 0 {
            worker_syncs = root_status["syncs"].as_u64().unwrap_or(0);
        } else {
            for addr in &servers[1..] {
                worker_syncs += status(*addr)
                    .await
                    .and_then(|s| s["syncs"].as_u64())
                    .unwrap_or(0);
            }
        }
        let mark = Mark {
            at: Instant::now(),
            root_syncs: root_status["syncs"].as_u64().unwrap_or(0),
            worker_syncs,
            bytes_in: root_status["bytes_in"].as_u64().unwrap_or(0),
            bytes_out: root_status["bytes_out"].as_u64().unwrap_or(0),
            cpu_s: cpu_seconds(root_pid).unwrap_or(f64::NAN),
        };
        if first.is_none() && samples * 10 >= args.samples {
            first = Some(mark);
        }
        if samples * 10 <= args.samples * 9 {
            last = Some(mark);
        }
        if root_status["stopping"].as_bool() == Some(true) {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(TreeBenchError::Run(
                "the layout did not finish within an hour".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ended = root.wait()?;
    let wall_s = started.elapsed().as_secs_f64();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if !ended.success() {
        return Err(TreeBenchError::Run(format!(
            "the root exited with {ended} (see {})",
            dir.join("root.log").display()
        )));
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("run").join("report.json"),
    )?)?;
    let (Some(a), Some(b)) = (first, last) else {
        return Err(TreeBenchError::Run(
            "too few status samples between 10 % and 90 % of the run".into(),
        ));
    };
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let worker_syncs = (b.worker_syncs - a.worker_syncs).max(1) as f64;
    Ok(Row {
        layout: if relays == 0 {
            format!("{} workers → root", args.workers)
        } else {
            format!(
                "{} workers → {relays} relays (τ_up {}) → root",
                args.workers, args.tau_up
            )
        },
        root_updates_per_s: (b.root_syncs - a.root_syncs) as f64 / secs,
        worker_syncs_per_s: worker_syncs / secs,
        root_mb_in_per_s: (b.bytes_in - a.bytes_in) as f64 / secs / 1e6,
        root_mb_out_per_s: (b.bytes_out - a.bytes_out) as f64 / secs / 1e6,
        root_cpu_ms_per_worker_sync: (b.cpu_s - a.cpu_s) * 1e3 / worker_syncs,
        accuracy: report["evaluation"]["accuracy"]
            .as_f64()
            .unwrap_or(f64::NAN),
        samples: report["samples"].as_u64().unwrap_or(0),
        wall_s,
    })
}
