//! `tether serve`: its flags and their resolution into the server's config, and the
//! Ctrl-C / SIGTERM handling and runtime that `relay`, `work` and the benches share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use clap::builder::TypedValueParser;
use tether_server::checkpoint;
use tether_server::config::{DEFAULT_BETA, has_elastic_force};
use tether_server::tls;
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::codec::Encoding;
use tether_shared::protocol::StopReason;

use crate::{ModelArg, write_report};

/// Parses `--algorithm`, listing the names on error.
pub fn algorithm_parser() -> impl clap::builder::TypedValueParser<Value = Algorithm> {
    clap::builder::PossibleValuesParser::new(Algorithm::ALL.map(Algorithm::name))
        .try_map(|s| s.parse::<Algorithm>())
}

/// The run's hyper-parameters. Each flag is optional: a new run fills what is not
/// given from the algorithm's defaults; `--resume` fills it from the saved run.
#[derive(Args, Debug, Clone, Default)]
pub struct RunFlags {
    /// Algorithm [default: eamsgd]: easgd (async, paper Algorithm 1), easgd-sync
    /// (rounds), eamsgd (async + local Nesterov), downpour, mdownpour (server
    /// momentum), average (sync, β = 1), diloco (outer Nesterov), lsgd (leader pull).
    #[arg(long, value_parser = algorithm_parser())]
    pub algorithm: Option<Algorithm>,
    /// Network: a shipped name (small, paper, cifar, lenet5, vgg, resnet8, resnet20) or a
    /// description file (.toml or .json) [default: cifar for CIFAR-10 data, else small].
    #[arg(long, value_parser = crate::parse_model)]
    pub model: Option<ModelArg>,
    /// Local steps between synchronisations τ [default: 16].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub tau: Option<u32>,
    /// Elastic moving rate α (elastic algorithms) [default: β / expected workers].
    #[arg(long, allow_negative_numbers = true, conflicts_with = "beta")]
    pub alpha: Option<f32>,
    /// β = pα: sets α = β / --expected-workers [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f32>,
    /// Workers the run expects: data shards, and p in α = β/p [default: 4].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub expected_workers: Option<u32>,
    /// Local learning rate η [default: 0.05 for eamsgd, 0.1 otherwise].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Momentum δ: local Nesterov, or on the server for mdownpour [default: 0.9 for eamsgd and mdownpour, else 0].
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f64>,
    /// L2 weight decay [default: 1e-4].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Images per local step [default: 128].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Option<u32>,
    /// Seed of the initial center and the shards [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl RunFlags {
    /// The run's settings: `base` (defaults, or a resumed run's) with the flags given;
    /// a new run's network defaults to the one for the images in `data`.
    pub fn resolve(&self, base: Option<RunSettings>, data: Option<&Path>) -> Result<RunSettings> {
        let resuming = base.is_some();
        let mut s = match base {
            Some(saved) => {
                if let Some(a) = self.algorithm
                    && a != saved.algorithm
                {
                    bail!(
                        "the run uses {}; a resumed run keeps its algorithm",
                        saved.algorithm.name()
                    );
                }
                if let Some(m) = &self.model
                    && *m != saved.model
                {
                    bail!(
                        "the run trains the {} model; a resumed run keeps its model",
                        saved.model.name()
                    );
                }
                saved
            }
            None => {
                let mut s = RunSettings::defaults(self.algorithm.unwrap_or(Algorithm::Eamsgd));
                s.model = crate::model_or_default(self.model.clone(), data);
                s
            }
        };
        if let Some(t) = self.tau {
            s.tau = t;
        }
        if let Some(p) = self.expected_workers {
            s.expected_workers = p;
        }
        if let Some(lr) = self.lr {
            s.lr = lr;
        }
        if let Some(m) = self.momentum {
            s.momentum = m;
        }
        if let Some(w) = self.weight_decay {
            s.weight_decay = w;
        }
        if let Some(b) = self.batch {
            s.batch = b;
        }
        if let Some(seed) = self.seed {
            // The same seed again is no change (a supervisor restarting a server
            // with its flags); another one would cut other shards mid-run.
            if resuming && seed != s.seed {
                bail!(
                    "--seed fixes a run's initial center and shards; it cannot change on --resume"
                );
            }
            s.seed = seed;
        }
        let elastic = has_elastic_force(s.algorithm);
        if let Some(a) = self.alpha {
            s.alpha = a;
        } else if let Some(b) = self.beta {
            if !elastic {
                bail!("--beta applies to elastic algorithms (easgd, eamsgd, easgd-sync) only");
            }
            s.alpha = b / s.expected_workers as f32;
        } else if elastic && self.expected_workers.is_some() {
            s.alpha = DEFAULT_BETA / s.expected_workers as f32;
        }
        s.validate()?;
        Ok(s)
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    pub serving: ServingFlags,
    /// Run directory for checkpoints [default: ./runs/<run-id>].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir (default: the newest run under ./runs) from its
    /// newest checkpoint that verifies.
    #[arg(long)]
    pub resume: bool,
    /// Continue the run in --run-dir if it holds a checkpoint that verifies, else
    /// start a new run there: for supervisors that restart a server with the same
    /// flags (Kubernetes, systemd).
    #[arg(long, requires = "run_dir", conflicts_with = "resume")]
    pub resume_or_start: bool,
    /// Seconds between checkpoints (0: only at shutdown).
    #[arg(long, default_value_t = 60)]
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_checkpoints: u64,
    /// A training set whose packed file (a packed set's `train.tsi`, or an image
    /// folder once decoded) is larger than this many MiB stays on disk: shards are
    /// streamed from it and the server holds only a sample of its images.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub data_memory: u64,
    /// End the run once workers have reported this many training images in all
    /// (then: final checkpoint, `report.json`, workers told the run finished).
    #[arg(long)]
    pub max_samples: Option<u64>,
    /// End the run after this many seconds of serving (counted across resumes).
    #[arg(long)]
    pub max_time: Option<u64>,
    /// End the run at the first evaluation whose test accuracy reaches this
    /// fraction (0.85 = 85 %; needs --eval-every above 0).
    #[arg(long)]
    pub target_accuracy: Option<f64>,
    /// Write the final summary here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// What a server needs to serve workers and pages, whether it is a root (`tether
/// serve`) or a relay (`tether relay`).
#[derive(Args, Debug)]
pub struct ServingFlags {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The data: a folder of IDX files, CIFAR-10 binary batches, or images in
    /// class folders (`train/<class>/*`, `test/<class>/*`) [default: the shipped
    /// Fashion-MNIST].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Token for operator actions (sent as a header by the dashboard).
    #[arg(long, env = "TETHER_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Token every worker must present (browsers: typed into the join form).
    #[arg(long, env = "TETHER_WORKER_TOKEN")]
    pub worker_token: Option<String>,
    /// The token a relay must present (as its --upstream-token) to be trusted with
    /// volunteers: its --public-url is then shown and handed to joining browsers.
    #[arg(long, env = "TETHER_RELAY_TOKEN")]
    pub relay_token: Option<String>,
    /// An origin besides this server's own whose pages may join browser workers
    /// (repeatable), e.g. `https://lab.example.org` behind a proxy.
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Cap on connected workers.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_workers: u32,
    /// Cap on open connections of every kind (pages, live feeds, workers).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Cap on open connections from one IPv4 address or IPv6 /64 (a lab behind one
    /// NAT needs about two per browser tab).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_address: u64,
    /// Seconds an HTTP request gets to arrive and be answered (and a kept-alive
    /// connection may sit idle).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
    /// Seconds one send to a client may take; a client that reads slower (a worker,
    /// a page, a download) is dropped.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub send_timeout: u64,
    /// Seconds of silence after which a worker is dropped.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
    /// Seconds a synchronous round waits for laggards.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub barrier_timeout: u64,
    /// Largest staleness accepted (center versions).
    #[arg(long, default_value_t = 1024)]
    pub max_staleness: u64,
    /// Reject updates whose progress exceeds this multiple of the run's typical progress.
    #[arg(long, default_value_t = 10.0)]
    pub max_update_ratio: f64,
    /// Training images in the loss screen's secret batch: an update that would raise
    /// the center's loss on it is answered but does not move the center (0: off).
    #[arg(long, default_value_t = 64)]
    pub screen_batch: usize,
    /// Seconds between evaluations of the center (0: never).
    #[arg(long, default_value_t = 15)]
    pub eval_every: u64,
    /// Evaluate on only the first N test images.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub eval_limit: Option<u32>,
    /// Payload encoding of every session: f32, f16, bf16 or q8 [default: q8; f16
    /// for easgd-sync and average]. Workers that cannot use it get f32.
    #[arg(long)]
    pub encoding: Option<Encoding>,
    /// Serve HTTPS/WSS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key", conflicts_with = "tls_self_signed")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS/WSS with a certificate generated for this host's names and
    /// addresses, kept in ./runs/tls/ (workers trust it with --ca-cert).
    #[arg(long)]
    pub tls_self_signed: bool,
    /// A name or address the self-signed certificate also covers (repeatable).
    #[arg(long = "tls-name", requires = "tls_self_signed")]
    pub tls_names: Vec<String>,
}

fn secs(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

/// The newest run directory under `./runs` (run ids start with the UTC time) that
/// holds a checkpoint that verifies; newer ones are skipped, saying why.
fn newest_run() -> Result<PathBuf> {
    let runs = Path::new("runs");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(runs)
        .with_context(|| format!("--resume without --run-dir looks in {}", runs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("run.json").is_file())
        .collect();
    dirs.sort();
    while let Some(dir) = dirs.pop() {
        match checkpoint::load_newest(&dir) {
            Ok(_) => return Ok(dir),
            Err(e) => tracing::warn!("not resuming {}: {e}", dir.display()),
        }
    }
    anyhow::bail!("no run under ./runs has a valid checkpoint to resume; pass --run-dir")
}

impl ServeArgs {
    /// The server's configuration.
    pub fn config(&self) -> Result<ServerConfig> {
        let run_dir = match (&self.run_dir, self.resume) {
            (Some(d), _) => Some(d.clone()),
            (None, true) => Some(newest_run()?),
            (None, false) => None,
        };
        let resume = self.resume
            || match (&run_dir, self.resume_or_start) {
                (Some(d), true) if d.exists() => match checkpoint::load_newest(d) {
                    Ok(_) => true,
                    Err(checkpoint::CheckpointError::NoneValid { skipped, .. })
                        if skipped.is_empty() =>
                    {
                        false
                    }
                    // Checkpoints that all fail to verify are not "nothing to resume":
                    // a new run would start beside them, so stop and let the operator look.
                    Err(e) => return Err(e).context("--resume-or-start"),
                },
                _ => false,
            };
        if self.resume_or_start {
            tracing::info!(
                "--resume-or-start: {}",
                if resume {
                    "a checkpoint verifies: resuming"
                } else {
                    "no checkpoint yet: starting a new run"
                }
            );
        }
        let base = match (&run_dir, resume) {
            (Some(d), true) => Some(checkpoint::load_settings(d)?),
            _ => None,
        };
        let mut config = ServerConfig::new(self.run.resolve(base, self.serving.data.as_deref())?);
        self.serving.apply(&mut config);
        config.run_dir = run_dir;
        config.resume = resume;
        config.checkpoint_every = secs(self.checkpoint_every);
        config.keep_checkpoints = self.keep_checkpoints as usize;
        config.data_memory = self.data_memory << 20;
        config.finish = tether_server::Finish {
            max_samples: self.max_samples,
            max_time: self.max_time.map(Duration::from_secs),
            target_accuracy: self.target_accuracy,
        };
        config.validate()?;
        Ok(config)
    }
}

impl ServingFlags {
    /// Sets what these flags say in `config`.
    pub(crate) fn apply(&self, config: &mut ServerConfig) {
        config.data = self.data.clone();
        config.admin_token = self.admin_token.clone();
        config.worker_token = self.worker_token.clone();
        config.relay_token = self.relay_token.clone();
        config.allowed_origins = self.allow_origins.clone();
        config.max_workers = self.max_workers;
        config.max_connections = self.max_connections as usize;
        config.max_connections_per_address = self.max_connections_per_address as usize;
        config.request_timeout = Duration::from_secs(self.request_timeout);
        config.send_timeout = Duration::from_secs(self.send_timeout);
        config.idle_timeout = Duration::from_secs(self.idle_timeout);
        config.barrier_timeout = Duration::from_secs(self.barrier_timeout);
        config.max_staleness = self.max_staleness;
        config.max_update_ratio = self.max_update_ratio;
        config.host_names.extend(self.tls_names.iter().cloned());
        config.screen_batch = self.screen_batch;
        config.eval_every = secs(self.eval_every);
        config.eval_limit = self.eval_limit.map(|n| n as usize);
        config.encoding = self.encoding;
    }

    /// The certificate to serve, if TLS was asked for.
    pub(crate) fn certificate(&self) -> Result<Option<tls::Certificate>> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return Ok(Some(tls::from_pem(cert, key)?));
        }
        if !self.tls_self_signed {
            return Ok(None);
        }
        let bound = self
            .host
            .parse()
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        let names = tls::host_names(bound, &self.tls_names);
        Ok(Some(tls::self_signed(
            &Path::new("runs").join("tls"),
            &names,
        )?))
    }

    /// Binds the port: first, so a server that cannot listen leaves nothing behind.
    pub(crate) async fn listen(&self) -> Result<tokio::net::TcpListener> {
        let addr = format!("{}:{}", self.host, self.port);
        tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))
    }
}

/// How to reach a listener bound to `local` from this machine.
pub(crate) fn shown_addr(local: SocketAddr) -> String {
    if local.ip().is_unspecified() {
        format!("127.0.0.1:{}", local.port())
    } else {
        local.to_string()
    }
}

/// Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// it is first awaited: a signal that arrives while a server is still starting
/// (its start-up measure, a resume) would otherwise kill the process outright,
/// without its final checkpoint. Call it inside the runtime.
pub fn interrupted() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install a SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A stop signal that turns true on Ctrl-C or SIGTERM, saying what happens next
/// (call inside a runtime: it spawns the waiting task).
pub fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let interrupt = interrupted();
    tokio::spawn(async move {
        interrupt.await;
        eprintln!("stopping: workers finish their steps, sync once more and leave");
        let _ = tx.send(true);
    });
    rx
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    let mut config = args.config()?;
    let certificate = args.serving.certificate().context("setting up TLS")?;
    config.tls = certificate.as_ref().map(|c| c.config.clone());
    runtime()?.block_on(async move {
        let interrupt = interrupted();
        // The port first: a serve that cannot listen must not leave a run behind.
        let listener = args.serving.listen().await?;
        let server = tether_server::Server::new(config).context("preparing the run")?;
        let local: SocketAddr = listener.local_addr()?;
        let shown = shown_addr(local);
        let s = server.state();
        println!(
            "tether serving run {} ({}, {} model)",
            s.spec.run_id,
            s.spec.algorithm.name(),
            s.spec.model.name()
        );
        let (http, ws) = if certificate.is_some() {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        println!("  dashboard: {http}://{shown}/   status: {http}://{shown}/api/status");
        match &certificate {
            Some(c) => {
                let ca = if c.names.is_empty() {
                    String::new()
                } else {
                    format!(" --ca-cert {}", c.cert_path.display())
                };
                println!("  workers:   tether work --server {ws}://{shown}{ca}");
                println!("  TLS:       {} (SHA-256 {})", c.cert_path.display(), c.fingerprint);
                if !c.names.is_empty() {
                    println!("             self-signed for {}", c.names.join(", "));
                    println!(
                        "             browsers: open the dashboard and accept the certificate after checking its fingerprint,"
                    );
                    println!(
                        "             or import {} as a trusted authority; Chromium: --ignore-certificate-errors-spki-list={}",
                        c.cert_path.display(),
                        c.spki_sha256
                    );
                }
            }
            None => {
                println!("  workers:   tether work --server {ws}://{shown}");
                if !local.ip().is_loopback() {
                    println!(
                        "  note:      plain HTTP: browsers on other machines get no WebGPU (not a secure context); see --tls-self-signed"
                    );
                }
            }
        }
        println!("  run dir:   {}", s.run_dir.display());
        let summary = server
            .serve(listener, async {
                interrupt.await;
                StopReason::ShuttingDown
            })
            .await
            .context("serving")?;
        println!(
            "stopped at center version {} after {} syncs; checkpoint: {}",
            summary.center_version,
            summary.syncs,
            summary
                .checkpoint
                .as_ref()
                .map_or("none".into(), |p| p.display().to_string())
        );
        write_report(args.report.as_deref(), &summary)
    })
}
