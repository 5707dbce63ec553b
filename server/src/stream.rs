//! A shard of a training set on disk as a response body: read on a blocking thread
//! a chunk at a time into a two-chunk channel, so a download holds a few MiB
//! however large the shard, and a slow client slows the reads rather than filling
//! memory.

use std::io::Write;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use tether_dataset::PackedSet;
use tether_shared::data::shard_indices;
use tether_shared::protocol::Shard;
use tokio::sync::mpsc;

/// Chunks in flight between the disk and the socket.
const IN_FLIGHT: usize = 2;

/// `shard` of `packed`, encoded as a shard, streamed (the cut is computed on the
/// blocking thread too: it is as long as the set).
pub fn packed_body(packed: Arc<PackedSet>, shard: Shard) -> Body {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let (n, count, index) = (packed.len(), shard.count as usize, shard.index as usize);
        let items = shard_indices(n, count, index, shard.seed);
        let mut out = ChannelWriter(tx.clone());
        if let Err(e) = packed.write_subset(&items, &mut out) {
            // The client sees a cut body; its checksum fails and it retries.
            tracing::error!("streaming a shard from {}: {e}", packed.path().display());
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }))
}

/// Sends each write as one chunk; fails once the response is gone.
struct ChannelWriter(mpsc::Sender<std::io::Result<Bytes>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "download ended"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
