//! Helpers for tether's end-to-end tests: build and run the real `tether` binary.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The `tether` binary of this workspace, built (once per test run) in the same
/// profile and target directory as the running tests, so it is never stale.
pub fn tether_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> Result<PathBuf> {
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no profile dir")?;
    let target_dir = profile_dir.parent().context("no target dir")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile name")?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "tether",
        "--bin",
        "tether",
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the tether binary failed");
    }
    Ok(profile_dir.join(format!("tether{}", std::env::consts::EXE_SUFFIX)))
}

/// Runs `tether ARGS` and returns its output (whatever the exit status).
pub fn tether(args: &[&str]) -> Result<Output> {
    let bin = tether_bin()?;
    Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// A fresh empty directory under the system temp dir for one test's files.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tether-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs `tether ARGS --report <scratch>/report.json`, fails with tether's stderr if
/// it exits non-zero, and returns the report.
pub fn tether_report(name: &str, args: &[&str]) -> Result<serde_json::Value> {
    let report = scratch(name)?.join("report.json");
    let mut all = args.to_vec();
    all.extend([
        "--report",
        report.to_str().context("temp path is not UTF-8")?,
    ]);
    let out = tether(&all)?;
    if !out.status.success() {
        bail!(
            "tether {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    read_json(&report)
}

/// Reads a JSON report.
pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub mod data;
pub use data::{PHOTO_CLASSES, write_cifar_like, write_photo_folder};

pub mod net {
    //! Real servers on port 0 and raw protocol clients over real sockets.

    use std::net::SocketAddr;
    use std::time::Duration;

    use anyhow::{Context, Result, bail};
    use futures_util::{SinkExt, StreamExt};
    use tether_server::{AppState, RunSettings, Server, ServerConfig, Summary};
    use tether_shared::algorithms::Algorithm;
    use tether_shared::protocol::{
        self, Frame, Hello, Message, PROTOCOL_VERSION, Sync, WorkerKind,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    /// A quick in-process run of `algorithm`: τ 4, batch 32, no background
    /// evaluation or checkpoints, evaluations on 2 000 test images, its own run
    /// directory `name` under the scratch folder.
    pub fn quick_config(name: &str, algorithm: Algorithm) -> Result<ServerConfig> {
        let mut run = RunSettings::defaults(algorithm);
        run.tau = 4;
        run.batch = 32;
        let mut c = ServerConfig::new(run);
        c.eval_every = None;
        c.eval_limit = Some(2000);
        c.checkpoint_every = None;
        c.run_dir = Some(super::scratch(name)?);
        Ok(c)
    }

    /// A server running in this process on 127.0.0.1:0.
    pub struct TestServer {
        /// Its state (center, workers, metrics).
        pub state: AppState,
        /// Where it listens.
        pub addr: SocketAddr,
        finish: Option<oneshot::Sender<()>>,
        task: JoinHandle<Result<Summary, tether_server::ServerError>>,
    }

    impl TestServer {
        /// Prepares `config` and serves it on a free port.
        pub async fn start(config: ServerConfig) -> Result<Self> {
            let server = Server::new(config).context("preparing the test run")?;
            let state = server.state().clone();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (finish, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(server.serve(listener, async move {
                let _ = rx.await;
                tether_shared::protocol::StopReason::Finished
            }));
            Ok(Self {
                state,
                addr,
                finish: Some(finish),
                task,
            })
        }

        /// The worker URL.
        pub fn ws_url(&self) -> String {
            format!("ws://{}/ws", self.addr)
        }

        /// Stops the server and returns its summary.
        pub async fn stop(mut self) -> Result<Summary> {
            if let Some(f) = self.finish.take() {
                let _ = f.send(());
            }
            Ok(self.task.await??)
        }
    }

    /// A client's WebSocket.
    pub type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// A hand-driven protocol client: sends exactly the frames a test builds.
    pub struct RawClient {
        socket: Socket,
    }

    /// A hello as a native worker would send it.
    pub fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            kind: WorkerKind::Native,
            backend: "cpu".into(),
            device: "test client".into(),
            threads: 1,
            token: None,
            previous_run: None,
            // Raw clients speak exact f32, so tests can compare bit for bit.
            encodings: vec![tether_shared::codec::Encoding::F32],
            needs_shard: false,
            group: None,
            url: None,
        }
    }

    /// A sync of session `session`, number `seq`, that saw center version `seen`
    /// (128 samples a step, plausible statistics).
    pub fn sync(session: u64, seq: u64, seen: u64) -> Message {
        Message::Sync(Sync {
            session,
            seq,
            center_version: seen,
            steps: seq,
            samples: 128,
            loss: 1.0,
            samples_per_s: 100.0,
            wait_s: 0.0,
            members: 0,
        })
    }

    impl RawClient {
        /// Opens a WebSocket to `url`.
        pub async fn connect(url: &str) -> Result<Self> {
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(None)
                .max_frame_size(None);
            let (socket, _) =
                tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
            Ok(Self { socket })
        }

        /// Opens a WebSocket to `url` as a web page of `origin` would.
        pub async fn connect_from(url: &str, origin: &str) -> Result<Self> {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = url.into_client_request()?;
            request.headers_mut().insert("origin", origin.parse()?);
            let (socket, _) = tokio_tungstenite::connect_async(request).await?;
            Ok(Self { socket })
        }

        /// The WebSocket itself (to split it into a sender and a receiver).
        pub fn into_socket(self) -> Socket {
            self.socket
        }

        /// Sends raw bytes as one binary frame.
        pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
            self.socket.send(WsMessage::Binary(bytes.into())).await?;
            Ok(())
        }

        /// Sends a text frame.
        pub async fn send_text(&mut self, text: &str) -> Result<()> {
            self.socket.send(WsMessage::Text(text.into())).await?;
            Ok(())
        }

        /// Sends a protocol frame.
        pub async fn send(&mut self, message: &Message, payload: &[f32]) -> Result<()> {
            self.send_bytes(protocol::encode(message, payload)).await
        }

        /// The next protocol frame (10 s at most); an error when the socket closes.
        pub async fn recv(&mut self) -> Result<Frame> {
            Ok(protocol::decode(&self.recv_raw().await?)?)
        }

        /// The next binary frame's bytes, undecoded (10 s at most).
        pub async fn recv_raw(&mut self) -> Result<Vec<u8>> {
            loop {
                let next = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                    .await
                    .context("no frame within 10 s")?;
                match next {
                    Some(Ok(WsMessage::Binary(b))) => return Ok(b.to_vec()),
                    Some(Ok(WsMessage::Close(c))) => bail!("closed: {c:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("socket error: {e}"),
                    None => bail!("socket ended"),
                }
            }
        }

        /// Sends sync `seq` of `session` (having seen `seen`) with `payload` and
        /// returns the center version of the reply; an error for anything else.
        pub async fn exchange(
            &mut self,
            session: u64,
            seq: u64,
            seen: u64,
            payload: &[f32],
        ) -> Result<u64> {
            self.send(&sync(session, seq, seen), payload).await?;
            match self.recv().await?.message {
                Message::Reply(r) => Ok(r.center_version),
                other => bail!("expected a reply, got {other:?}"),
            }
        }

        /// Sends `hello` and returns the welcome and the center it carries.
        pub async fn join(url: &str, hello: Hello) -> Result<(Self, protocol::Welcome, Vec<f32>)> {
            let mut c = Self::connect(url).await?;
            c.send(&Message::Hello(hello), &[]).await?;
            match c.recv().await? {
                Frame {
                    message: Message::Welcome(w),
                    payload,
                    ..
                } => Ok((c, w, payload)),
                other => bail!("expected a welcome, got {:?}", other.message),
            }
        }
    }

    /// An HTTP response: status, head (lower-cased), body.
    pub struct Response {
        /// Status code.
        pub status: u16,
        /// Status line and headers, lower-cased.
        pub head: String,
        /// The body.
        pub body: Vec<u8>,
    }

    impl Response {
        /// The body as text.
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        /// The body as JSON.
        pub fn json(&self) -> Result<serde_json::Value> {
            serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", self.text()))
        }
    }

    /// Any HTTP/1.1 request with extra `headers` and a body.
    pub async fn http(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no HTTP header end")?;
        let head = String::from_utf8_lossy(&response[..end]).to_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status code")?;
        let mut body = response[end + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            body = dechunk(&body)?;
        }
        Ok(Response { status, head, body })
    }

    fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let line = data
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("bad chunk")?;
            let size = usize::from_str_radix(std::str::from_utf8(&data[..line])?.trim(), 16)?;
            if size == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&data[line + 2..line + 2 + size]);
            data = &data[line + 4 + size..];
        }
    }

    /// Polls `check` every 50 ms for up to `within`; whether it came true.
    pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < within {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        check()
    }

    /// A TCP connection to `server` from the loopback address `from` (127.0.0.0/8 is
    /// all local on Linux, so one test can be clients at several addresses).
    pub async fn tcp_from(from: [u8; 4], server: SocketAddr) -> Result<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((std::net::Ipv4Addr::from(from), 0).into())?;
        Ok(socket.connect(server).await?)
    }

    /// `GET path` over plain HTTP/1.1; returns the body.
    pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8(response)?;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {head}");
        }
        Ok(body.to_string())
    }
}

pub mod serve {
    //! `tether serve` as a child process, the way an operator runs it.

    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use anyhow::{Context, Result, bail};

    use super::net::http_get;
    use super::tether_bin;

    /// A `tether serve` (or `tether relay`) child, the address it printed and its
    /// line for workers.
    pub struct Serve {
        /// The process.
        pub child: Child,
        /// Where it listens.
        pub addr: SocketAddr,
        /// What it tells workers to run (`tether work --server …`).
        pub join: String,
        /// Its log, line by line (read on a thread so the pipe never fills).
        pub stderr: std::sync::mpsc::Receiver<String>,
    }

    impl Serve {
        /// `tether work` on one CPU thread against this server, its shards cached in
        /// `cache`; `extra` flags after the URL (`--data DIR` to read the set itself).
        pub fn worker(&self, cache: &Path, extra: &[&str]) -> Result<Child> {
            Ok(Command::new(tether_bin()?)
                .env("TETHER_CACHE", cache)
                .args(["work", "--backend", "cpu", "--threads", "1", "--server"])
                .arg(format!("ws://{}", self.addr))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?)
        }

        /// Waits (at most `within`) for a run with an end (`--max-samples`) to exit
        /// by itself, and returns the `report.json` it wrote in `run_dir`.
        pub fn finished_report(
            &mut self,
            run_dir: &Path,
            within: Duration,
        ) -> Result<serde_json::Value> {
            let t0 = std::time::Instant::now();
            while self.child.try_wait()?.is_none() {
                if t0.elapsed() > within {
                    bail!("the server did not exit after the run finished");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let report = std::fs::read_dir(run_dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("report.json"))
                .find(|p| p.exists())
                .unwrap_or_else(|| run_dir.join("report.json"));
            crate::read_json(&report)
        }

        /// Serves `run_dir` on a free port with `extra` flags.
        pub fn start(run_dir: &Path, extra: &[&str]) -> Result<Self> {
            Self::start_on(0, run_dir, extra)
        }

        /// Serves on `port` (0: any free one).
        pub fn start_on(port: u16, run_dir: &Path, extra: &[&str]) -> Result<Self> {
            Self::launch(None, port, run_dir, extra, &[])
        }

        /// Serves with `env` set (e.g. its own `TETHER_CACHE`).
        pub fn start_with_env(
            run_dir: &Path,
            env: &[(&str, &std::ffi::OsStr)],
            extra: &[&str],
        ) -> Result<Self> {
            Self::launch(None, 0, run_dir, extra, env)
        }

        /// Serves from the working directory `cwd` (where `--tls-self-signed` keeps its files).
        pub fn start_in(cwd: &Path, run_dir: &Path, extra: &[&str]) -> Result<Self> {
            Self::launch(Some(cwd), 0, run_dir, extra, &[])
        }

        fn launch(
            cwd: Option<&Path>,
            port: u16,
            run_dir: &Path,
            extra: &[&str],
            env: &[(&str, &std::ffi::OsStr)],
        ) -> Result<Self> {
            let mut cmd = Command::new(tether_bin()?);
            cmd.envs(env.iter().copied());
            if let Some(dir) = cwd {
                cmd.current_dir(dir);
            }
            cmd.args(["serve", "--host", "127.0.0.1"]);
            if !extra.contains(&"--eval-every") {
                cmd.args(["--eval-every", "0"]);
            }
            cmd.arg("--run-dir")
                .arg(run_dir)
                .args(["--port", &port.to_string()])
                .args(extra);
            Self::spawn(cmd, "tether serve")
        }

        /// `tether relay` of `upstream` on `port` (0: any free one), from the
        /// working directory `cwd`, with `extra` flags.
        pub fn relay(cwd: &Path, port: u16, upstream: SocketAddr, extra: &[&str]) -> Result<Self> {
            let mut cmd = Command::new(tether_bin()?);
            cmd.current_dir(cwd)
                .args(["relay", "--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--upstream")
                .arg(format!("ws://{upstream}"));
            if !extra.contains(&"--eval-every") {
                cmd.args(["--eval-every", "0"]);
            }
            cmd.args(extra);
            Self::spawn(cmd, "tether relay")
        }

        /// Starts `cmd` and reads the address and the workers' line it prints.
        fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
            let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
            let stdout = BufReader::new(child.stdout.take().context("stdout")?);
            let (tx, stderr) = std::sync::mpsc::channel();
            let err = BufReader::new(child.stderr.take().context("stderr")?);
            std::thread::spawn(move || {
                for line in err.lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            let mut lines = stdout.lines();
            let mut addr = None;
            for line in lines.by_ref() {
                let line = line?;
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("dashboard: ") {
                    let rest = rest.split_once("://").context("a URL")?.1;
                    addr = Some(rest.split('/').next().context("address")?.parse()?);
                } else if let (Some(addr), Some(join)) = (addr, line.strip_prefix("workers:")) {
                    // Keep draining stdout: the server prints a summary when it stops.
                    std::thread::spawn(move || lines.for_each(drop));
                    return Ok(Self {
                        child,
                        addr,
                        join: join.trim().to_string(),
                        stderr,
                    });
                }
            }
            let log: Vec<String> = stderr.try_iter().collect();
            bail!("{what} printed no address; stderr:\n{}", log.join("\n"))
        }

        /// `GET /api/status` as JSON.
        pub async fn status(&self) -> Result<serde_json::Value> {
            self.get_json("/api/status").await
        }

        /// `GET path` as JSON.
        pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
            let body = http_get(self.addr, path).await?;
            serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))
        }

        /// What the server has logged so far (stderr).
        pub fn log(&self) -> String {
            let log: Vec<String> = self.stderr.try_iter().collect();
            log.join("\n")
        }

        /// SIGTERM, then wait for a clean exit.
        pub fn terminate(mut self) -> Result<String> {
            let ok = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()?;
            assert!(ok.success());
            let status = self.child.wait()?;
            let log: Vec<String> = self.stderr.try_iter().collect();
            let log = log.join("\n");
            assert!(status.success(), "serve exited with {status}:\n{log}");
            Ok(log)
        }
    }

    /// A test that fails part-way leaves no server behind.
    impl Drop for Serve {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
