//! Reaching a server from a native worker: `ws://` or `wss://` (rustls with the
//! platform's and Mozilla's roots, plus `--ca-cert`), each failure named for what it
//! is (DNS, refused, TLS, HTTP), and the authenticated download of a worker's shard
//! over the same kind of connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A worker's WebSocket to the server.
pub type Socket = tokio_tungstenite::WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection could not be made, in words that say what to do.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The URL is not a server URL.
    #[error("invalid server URL {0:?}: expected ws://host[:port] or wss://host[:port]")]
    Url(String),
    /// The host name does not resolve.
    #[error("cannot resolve {host}: {why}")]
    Dns {
        /// The host.
        host: String,
        /// The resolver's words.
        why: String,
    },
    /// Nothing listens there, or the network is down.
    #[error("cannot connect to {addr}: {why}")]
    Connect {
        /// host:port.
        addr: String,
        /// The OS's words.
        why: String,
    },
    /// The TLS handshake failed (an untrusted or wrong certificate, most often).
    #[error("TLS with {host} failed: {why}. {hint}")]
    Tls {
        /// The host.
        host: String,
        /// rustls's words.
        why: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The `--ca-cert` file is unusable.
    #[error("--ca-cert {path}: {why}")]
    CaCert {
        /// The file.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// The server answered with an HTTP error (e.g. the WebSocket upgrade or a
    /// download was refused).
    #[error("the server answered {status}: {body}")]
    Http {
        /// The status.
        status: StatusCode,
        /// The start of its body.
        body: String,
    },
    /// The connection broke or timed out midway.
    #[error("{0}")]
    Io(String),
}

impl ConnectError {
    /// Whether trying again later may help: not for a bad URL, certificate or
    /// refusal by the server.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Dns { .. } | Self::Connect { .. } | Self::Io(_) => true,
            Self::Http { status, .. } => status.is_server_error(),
            Self::Url(_) | Self::Tls { .. } | Self::CaCert { .. } => false,
        }
    }
}

/// Where the server is and how to speak to it.
#[derive(Clone)]
pub struct Endpoint {
    /// The WebSocket URL (`…/ws`).
    pub url: String,
    host: String,
    port: u16,
    tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Endpoint {
    /// The endpoint of a `ws://` or `wss://` URL (`/ws` is added when the path is
    /// empty). `ca_cert`: a PEM file of certificates to trust besides the
    /// platform's and Mozilla's roots (a private CA, or a self-signed server).
    pub fn new(server: &str, ca_cert: Option<&Path>) -> Result<Self, ConnectError> {
        let s = server.trim_end_matches('/');
        let bad = || ConnectError::Url(server.to_string());
        let (secure, rest) = if let Some(r) = s.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(bad());
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(bad());
        }
        let url = if rest.contains('/') {
            s.to_string()
        } else {
            format!("{s}/ws")
        };
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            Some(client_config(ca_cert)?)
        } else {
            None
        };
        Ok(Self {
            url,
            host,
            port,
            tls,
        })
    }

    /// `http(s)://host:port` of the same server.
    pub fn http_base(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}", self.port)
    }

    /// A TCP connection, TLS-wrapped for `wss://`.
    async fn stream(&self) -> Result<MaybeTlsStream<TcpStream>, ConnectError> {
        let addr = format!("{}:{}", self.host, self.port);
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| ConnectError::Dns {
                host: self.host.clone(),
                why: e.to_string(),
            })?
            .collect();
        let mut last = String::from("no address");
        let mut tcp = None;
        for a in addrs {
            match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out after 10 s".into(),
            }
        }
        let tcp = tcp.ok_or(ConnectError::Connect { addr, why: last })?;
        let _ = tcp.set_nodelay(true);
        let Some(config) = &self.tls else {
            return Ok(MaybeTlsStream::Plain(tcp));
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| ConnectError::Url(self.url.clone()))?;
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let tls = tokio::time::timeout(Duration::from_secs(15), connector.connect(name, tcp))
            .await
            .map_err(|_| ConnectError::Io("TLS handshake timed out after 15 s".into()))?
            .map_err(|e| tls_error(&self.host, e))?;
        Ok(MaybeTlsStream::Rustls(tls))
    }

    /// Opens the WebSocket (frames up to `max_frame` bytes).
    pub async fn websocket(&self, max_frame: usize) -> Result<Socket, ConnectError> {
        let stream = self.stream().await?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_frame))
            .max_frame_size(Some(max_frame));
        let upgrade =
            tokio_tungstenite::client_async_with_config(self.url.as_str(), stream, Some(config));
        match tokio::time::timeout(Duration::from_secs(15), upgrade).await {
            Err(_) => Err(ConnectError::Io(
                "WebSocket upgrade timed out after 15 s".into(),
            )),
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                    .unwrap_or_default();
                Err(ConnectError::Http {
                    status: response.status(),
                    body,
                })
            }
            Ok(Err(e)) => Err(ConnectError::Io(format!("WebSocket upgrade failed: {e}"))),
        }
    }

    /// `GET path_and_query` with `headers`; the body must be at most `limit` bytes
    /// and arrive within `timeout`.
    pub async fn get(
        &self,
        path_and_query: &str,
        headers: &[(&str, String)],
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, ConnectError> {
        let mut body = Vec::new();
        self.get_to(
            path_and_query,
            headers,
            limit as u64,
            timeout,
            &mut |chunk| {
                body.extend_from_slice(chunk);
                Ok(())
            },
        )
        .await?;
        Ok(body)
    }

    /// [`Endpoint::get`], the body handed to `sink` a frame at a time as it
    /// arrives (a large download is never held whole); returns its length.
    pub async fn get_to(
        &self,
        path_and_query: &str,
        headers: &[(&str, String)],
        limit: u64,
        timeout: Duration,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<u64, ConnectError> {
        let fetch = async {
            let stream = self.stream().await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ConnectError::Io(e.to_string()))?;
            let driver = tokio::spawn(conn);
            let mut request = Request::get(path_and_query)
                .header(hyper::header::HOST, format!("{}:{}", self.host, self.port));
            for (k, v) in headers {
                request = request.header(*k, v.as_str());
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| ConnectError::Io(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ConnectError::Io(e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                let body = Limited::new(response.into_body(), 64 << 10)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                driver.abort();
                return Err(ConnectError::Http {
                    status,
                    body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
                });
            }
            let mut body = response.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ConnectError::Io(format!("download failed: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    total += data.len() as u64;
                    if total > limit {
                        return Err(ConnectError::Io(format!(
                            "download failed: more than the {limit} bytes announced"
                        )));
                    }
                    sink(&data).map_err(|e| ConnectError::Io(format!("download failed: {e}")))?;
                }
            }
            driver.abort();
            Ok(total)
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| ConnectError::Io(format!("download did not finish within {timeout:?}")))?
    }
}

fn tls_error(host: &str, e: std::io::Error) -> ConnectError {
    let why = e.to_string();
    let hint = if why.contains("certificate") || why.contains("Certificate") {
        "If the server uses --tls-self-signed or a private CA, pass its certificate with --ca-cert PEM (the server prints where it is)"
    } else {
        "Check that the server serves TLS on this port (wss:// needs `tether serve --tls-…`; use ws:// otherwise)"
    };
    ConnectError::Tls {
        host: host.to_string(),
        why,
        hint,
    }
}

/// A rustls client configuration trusting the platform's roots, Mozilla's
/// (webpki-roots), and the certificates in `ca_cert`.
pub fn client_config(ca_cert: Option<&Path>) -> Result<Arc<ClientConfig>, ConnectError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Unreadable platform certificates are skipped: Mozilla's roots still apply.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_cert {
        let bad = |why: String| ConnectError::CaCert {
            path: path.display().to_string(),
            why,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no CERTIFICATE block in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Io(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_completed() {
        let e = Endpoint::new("ws://example.org:9000", None).unwrap();
        assert_eq!(e.url, "ws://example.org:9000/ws");
        assert_eq!(e.http_base(), "http://example.org:9000");
        let e = Endpoint::new("wss://example.org/", None).unwrap();
        assert_eq!(e.url, "wss://example.org/ws");
        assert_eq!(e.http_base(), "https://example.org:443");
        let e = Endpoint::new("ws://[::1]:8080/ws", None).unwrap();
        assert_eq!(e.http_base(), "http://[::1]:8080");
        for bad in ["http://x", "ws://", "example.org", "wss:///ws"] {
            assert!(
                matches!(Endpoint::new(bad, None), Err(ConnectError::Url(_))),
                "{bad}"
            );
        }
        let missing = Endpoint::new("wss://x", Some(Path::new("/nonexistent.pem")));
        assert!(matches!(missing, Err(ConnectError::CaCert { .. })));
    }

    #[tokio::test]
    async fn failures_are_named() {
        // A port nothing listens on.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let e = Endpoint::new(&format!("ws://127.0.0.1:{port}"), None).unwrap();
        let err = e.websocket(1024).await.unwrap_err();
        assert!(matches!(err, ConnectError::Connect { .. }), "{err}");
        assert!(err.is_transient());
        let e = Endpoint::new("ws://no-such-host.invalid:1", None).unwrap();
        let err = e.websocket(1024).await.unwrap_err();
        assert!(matches!(err, ConnectError::Dns { .. }), "{err}");
    }
}
