//! An emulated network link for the benchmarks: a TCP proxy that lets each
//! direction carry `bytes_per_s` at most and delivers every byte `delay` after the
//! link finished sending it, as a home uplink with a distant server would.
//!
//! What it leaves out: loss, jitter and TCP's own ramp-up over a long path (the
//! proxy's two legs are loopback), so it is a fair bandwidth-and-latency model,
//! not a congestion model.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One direction's capacity and delay (both directions get the same).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Bytes per second the link carries.
    pub bytes_per_s: f64,
    /// One-way propagation delay.
    pub delay: Duration,
}

impl Shape {
    /// A link of `mbit_per_s` megabits per second with `delay_ms` one-way delay.
    pub fn new(mbit_per_s: f64, delay_ms: f64) -> Self {
        Self {
            bytes_per_s: mbit_per_s * 1e6 / 8.0,
            delay: Duration::from_secs_f64(delay_ms / 1e3),
        }
    }
}

/// Bytes the proxy carried, per direction.
#[derive(Default, Debug)]
pub struct Carried {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
}

/// Listens on a free loopback port and forwards every connection to `upstream`
/// through a link of `shape`. Returns the address to connect to and the counters;
/// the proxy lives as long as the runtime.
pub async fn proxy(
    upstream: SocketAddr,
    shape: Shape,
) -> std::io::Result<(SocketAddr, Arc<Carried>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let carried = Arc::new(Carried::default());
    let counters = carried.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counters = counters.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                let up = carry(client_rx, server_tx, shape, &counters.up);
                let down = carry(server_rx, client_tx, shape, &counters.down);
                tokio::join!(up, down);
            });
        }
    });
    Ok((addr, carried))
}

/// Moves bytes from `from` to `to` at the link's pace until either side closes.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Shape,
    count: &AtomicU64,
) {
    // The queue is the link's buffer: 256 reads of at most 16 KiB.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reading = async move {
        // When the link will have finished serialising everything queued so far.
        let mut free_at = Instant::now();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            count.fetch_add(n as u64, Ordering::Relaxed);
            free_at =
                free_at.max(Instant::now()) + Duration::from_secs_f64(n as f64 / shape.bytes_per_s);
            if tx
                .send((free_at + shape.delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writing = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MB through a 40 Mbit/s, 50 ms link takes 0.2 s to send plus 50 ms to arrive.
    #[tokio::test]
    async fn the_link_paces_and_delays_bytes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).await.unwrap();
            s.write_all(&(sink.len() as u64).to_le_bytes())
                .await
                .unwrap();
        });
        let (addr, carried) = proxy(upstream, Shape::new(40.0, 50.0)).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        c.write_all(&vec![1u8; 1_000_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut len = [0u8; 8];
        c.read_exact(&mut len).await.unwrap();
        let took = t0.elapsed().as_secs_f64();
        assert_eq!(u64::from_le_bytes(len), 1_000_000);
        assert_eq!(carried.up.load(Ordering::Relaxed), 1_000_000);
        assert_eq!(carried.down.load(Ordering::Relaxed), 8);
        // 0.2 s of sending, 50 ms up and 50 ms back; a busy machine only adds.
        assert!((0.29..3.0).contains(&took), "took {took:.3} s");
    }
}
