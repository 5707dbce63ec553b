//! Batches prepared ahead of the steps on a thread of their own, so a device that
//! runs the steps (a GPU above all) never waits for the CPU to gather and normalise
//! the next batch. The sequence is exactly the stream's: prefetching changes when a
//! batch is made, never which.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use tether_shared::data::{Batch, BatchSource, BatchStream};
use tether_shared::local::Feeder;

/// Batches made ahead: two are enough to hide a batch's preparation behind a step.
pub const DEPTH: usize = 2;

/// The receiving end of a batch thread. Dropping it ends the thread (its next send
/// fails) and waits for it, so no thread outlives its session.
pub struct Prefetch {
    /// `Some` until dropped: the receiver must go before the thread is joined.
    batches: Option<Receiver<Batch>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetch {
    /// Starts a thread that runs `stream` up to [`DEPTH`] batches ahead.
    pub fn spawn(stream: BatchStream) -> Self {
        let (tx, rx) = sync_channel(DEPTH);
        let thread = std::thread::Builder::new()
            .name("tether-batches".into())
            .spawn(move || produce(stream, &tx))
            .expect("spawn the batch thread");
        Self {
            batches: Some(rx),
            thread: Some(thread),
        }
    }

    /// The feeder a native [`tether_shared::local::LocalWorker`] uses.
    pub fn feeder() -> Feeder {
        Box::new(|stream| Box::new(Self::spawn(stream)))
    }
}

fn produce(mut stream: BatchStream, tx: &SyncSender<Batch>) {
    while tx.send(stream.next_batch()).is_ok() {}
}

impl BatchSource for Prefetch {
    fn next_batch(&mut self) -> Batch {
        // The thread only stops when this receiver is dropped, or by panicking on a
        // bug in batch preparation, which this passes on.
        self.batches
            .as_ref()
            .and_then(|rx| rx.recv().ok())
            .expect("the batch thread ended while its batches were still wanted")
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        drop(self.batches.take());
        if let Some(thread) = self.thread.take() {
            // A panic there was already reported on stderr; nothing more to do.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tether_shared::data::{Batcher, ImageSet, Normalization};

    use super::*;

    fn stream() -> BatchStream {
        let set = ImageSet {
            source: "t".into(),
            channels: 1,
            rows: 2,
            cols: 2,
            pixels: (0..=255).cycle().take(7 * 4).collect(),
            labels: (0..7).collect(),
        };
        let norm = Normalization::of(&set);
        BatchStream::new(
            Batcher::new((0..7).collect(), 3, 11, &norm),
            Arc::new(set),
            0,
        )
    }

    #[test]
    fn prefetched_batches_are_the_streams_batches_in_order() {
        let mut inline = stream();
        let mut ahead = Prefetch::spawn(stream());
        // Seven items in batches of three: several epochs, each with a short tail.
        for _ in 0..20 {
            assert_eq!(ahead.next_batch(), inline.next_batch());
        }
    }

    #[test]
    fn dropping_it_ends_the_thread() {
        let mut ahead = Prefetch::spawn(stream());
        ahead.next_batch();
        // The thread is blocked on a full channel now; dropping must still end it.
        std::thread::sleep(Duration::from_millis(50));
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(ahead);
            let _ = done.send(());
        });
        assert!(
            ended.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the batch thread outlived its receiver"
        );
    }
}
