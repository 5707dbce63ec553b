//! The accept loop: caps on connections (in all and per address), TLS handshakes
//! with a deadline, HTTP/1 with a header-read deadline, writes that stall cut off,
//! and a graceful stop. `axum::serve` has none of the limits, so a few hundred
//! half-open requests used to hold the server's descriptors forever.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

use crate::AppState;

/// Time a client gets to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once (each costs CPU); beyond this, new connections
/// wait their turn within their own deadline.
pub const MAX_HANDSHAKES: usize = 256;
/// Largest buffer hyper keeps per connection (headers and queued writes): with the
/// connection cap, this bounds the memory strangers can make the server hold.
const MAX_BUF: usize = 64 * 1024;

/// Serves `router` on `listener` (TLS-wrapped when the run has a certificate) until
/// `stop` resolves; then closes idle connections, lets requests in flight finish
/// and returns once every HTTP connection has ended. Upgraded WebSockets outlive
/// this: their tasks say goodbye themselves (see `Server::serve`).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    router: Router,
    stop: impl Future<Output = ()>,
) {
    let config = &state.config;
    let table = Arc::new(Table {
        open: Mutex::default(),
        max: config.max_connections,
        per_address: config.max_connections_per_address,
        state: state.clone(),
    });
    let tls = config.tls.clone().map(TlsAcceptor::from);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.request_timeout)
        .max_buf_size(MAX_BUF);
    let write_timeout = config.send_timeout;
    // Every connection task holds a sender; when all are gone, the drain is done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Over a cap: close at once, so the refused connection costs nothing.
        let Some(seat) = table.admit(peer.ip()) else {
            state.metrics.refused_connections.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "connection refused: over the connection cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let io = Guarded {
            inner: tcp,
            _seat: seat,
            write_timeout,
            stalled: None,
        };
        let service = TowerToHyperService::new(router.clone());
        let http = http.clone();
        let tls = tls.clone();
        let handshakes = handshakes.clone();
        let mut stopping = stopping.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let _done = done;
            let served = match tls {
                None => {
                    let conn = http.serve_connection(TokioIo::new(io), service);
                    drive(conn.with_upgrades(), &mut stopping).await
                }
                Some(tls) => {
                    let shaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        let _turn = handshakes.acquire().await;
                        tls.accept(io).await
                    })
                    .await;
                    let stream = match shaken {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    drive(conn.with_upgrades(), &mut stopping).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    drop(done_tx);
    let _ = done_rx.recv().await;
}

/// Runs one HTTP connection; when the server stops, asks it to finish the request
/// in flight and close.
async fn drive<I, S>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    stopping: &mut watch::Receiver<bool>,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => return served,
        _ = stopping.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Open connections by address group, against the caps.
struct Table {
    open: Mutex<Open>,
    max: usize,
    per_address: usize,
    state: AppState,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_group: HashMap<IpAddr, usize>,
}

impl Table {
    /// A seat for a connection from `ip`, or `None` when it would pass a cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Seat> {
        let group = address_group(ip);
        let mut open = self.open.lock().expect("connection table lock");
        let here = open.by_group.get(&group).copied().unwrap_or(0);
        if open.total >= self.max || here >= self.per_address {
            return None;
        }
        open.total += 1;
        open.by_group.insert(group, here + 1);
        self.state
            .metrics
            .open_connections
            .store(open.total as u64, Relaxed);
        Some(Seat {
            table: self.clone(),
            group,
        })
    }
}

/// Whom a per-address cap counts together: an IPv4 address, or an IPv6 /64 (one
/// home or host gets a whole /64, so counting single v6 addresses caps nothing).
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A connection's place in the table, given back when its socket drops (after a
/// WebSocket upgrade the socket, and so the seat, lives on in the upgraded stream).
struct Seat {
    table: Arc<Table>,
    group: IpAddr,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("connection table lock");
        open.total -= 1;
        if let Some(n) = open.by_group.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                open.by_group.remove(&self.group);
            }
        }
        let total = open.total as u64;
        self.table
            .state
            .metrics
            .open_connections
            .store(total, Relaxed);
    }
}

/// A client's socket: holds its seat, and fails a write that makes no progress for
/// `write_timeout` (a client that stopped reading a download or a WebSocket).
struct Guarded<S> {
    inner: S,
    _seat: Seat,
    write_timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Guarded<S> {
    /// Maps a write's poll result, arming the stall deadline while it is pending.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let after = self.write_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.deadline(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.deadline(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.deadline(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.deadline(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_of_one_slash_64_count_together() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_group(a), address_group(b));
        assert_ne!(address_group(a), address_group(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            address_group(mapped),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
