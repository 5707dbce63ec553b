//! A shard read a block at a time. A tab whose shard is larger than its memory
//! budget keeps every label but the pixels of only the blocks it trains on now and
//! next, reading them from the Cache API as it goes. Its epochs visit the blocks
//! in a shuffled order and shuffle the images within each (a shuffle buffer the
//! size of a block), so the next batch always lies in at most two of them.

use std::ops::Range;
use std::sync::Mutex;

use super::{DataError, Images, ImagesHead};
use crate::rng::SplitMix64;

/// How a shard's items fall into blocks, and where each block's pixels lie in the
/// encoded shard ([`super::encode_images`]'s layout: head, then all pixels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    per_block: usize,
    items: usize,
    image: u64,
    pixels_at: u64,
}

impl BlockPlan {
    /// Blocks of a set whose head is `head`, each at most a sixth of `budget`
    /// bytes, but never fewer images than a `batch`. A batch then lies in at most
    /// three blocks (only the last block is shorter than a batch), the batch after
    /// it adds at most two, and one more may be on its way in.
    pub fn new(head: &ImagesHead, batch: usize, budget: u64) -> Self {
        let image = head.image_bytes() as u64;
        let fit = usize::try_from(budget / 6 / image).unwrap_or(usize::MAX);
        Self {
            per_block: fit.max(batch).max(1),
            items: head.labels.len(),
            image,
            pixels_at: head.pixels_at as u64,
        }
    }

    /// Images per block (the last block may hold fewer).
    pub fn per_block(&self) -> usize {
        self.per_block
    }

    /// How many blocks.
    pub fn blocks(&self) -> usize {
        self.items.div_ceil(self.per_block)
    }

    /// The block image `item` lies in.
    pub fn block_of(&self, item: usize) -> usize {
        item / self.per_block
    }

    /// The items of `block`.
    pub fn items(&self, block: usize) -> Range<usize> {
        let start = (block * self.per_block).min(self.items);
        start..(start + self.per_block).min(self.items)
    }

    /// Where `block`'s pixels lie in the encoded shard, in bytes.
    pub fn bytes(&self, block: usize) -> Range<u64> {
        let items = self.items(block);
        let at = |item: usize| self.pixels_at + item as u64 * self.image;
        at(items.start)..at(items.end)
    }
}

/// The blocks a block-read set must hold: those the next batch reads, and those
/// the batch after it reads (to load while the step runs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlocksAhead {
    /// The next batch's blocks (two where it straddles a boundary, three where
    /// the short last block lies in between).
    pub now: Vec<usize>,
    /// The batch after it's blocks that are not in `now`.
    pub next: Vec<usize>,
}

impl BlocksAhead {
    /// Every block named.
    pub fn all(&self) -> impl Iterator<Item = usize> + '_ {
        self.now.iter().chain(&self.next).copied()
    }
}

/// Which block each of a worker's items lies in, and the block-wise epoch order
/// of a [`super::Batcher`] over a block-read set.
#[derive(Clone, Debug)]
pub struct Blocking {
    per_block: usize,
    /// Each block's id and its items' positions in the worker's (ascending) indices.
    spans: Vec<(usize, Range<usize>)>,
}

impl Blocking {
    /// The blocks of `per_block` consecutive items that `indices` fall into (in
    /// ascending order, as shards are: else one block may be split in parts).
    pub fn new(indices: &[usize], per_block: usize) -> Self {
        let mut spans: Vec<(usize, Range<usize>)> = Vec::new();
        for (at, &item) in indices.iter().enumerate() {
            let block = item / per_block;
            match spans.last_mut() {
                Some((last, span)) if *last == block => span.end = at + 1,
                _ => spans.push((block, at..at + 1)),
            }
        }
        Self { per_block, spans }
    }

    /// The order the blocks are visited in an epoch whose shuffle seed is `seed`,
    /// as positions in `spans`.
    fn sequence(&self, seed: u64) -> Vec<usize> {
        let mut spans: Vec<usize> = (0..self.spans.len()).collect();
        SplitMix64::new(seed ^ 0xB10C_5EED_B10C_5EED).shuffle(&mut spans);
        spans
    }

    /// An epoch's item order: the blocks in [`Blocking::sequence`]'s order, the
    /// items of each shuffled.
    pub fn order(&self, indices: &[usize], seed: u64) -> Vec<usize> {
        let mut rng = SplitMix64::new(seed);
        let mut order = Vec::with_capacity(indices.len());
        for at in self.sequence(seed) {
            let start = order.len();
            order.extend_from_slice(&indices[self.spans[at].1.clone()]);
            rng.shuffle(&mut order[start..]);
        }
        order
    }

    /// The blocks of the batch at `cursor` of an epoch's `order` (batches of
    /// `batch`), and those of the batch after it (from the next epoch, shuffled
    /// by `next_seed`, at the end of this one).
    pub fn ahead(
        &self,
        order: &[usize],
        cursor: usize,
        batch: usize,
        next_seed: u64,
    ) -> BlocksAhead {
        let blocks_of = |items: &[usize]| {
            let mut blocks: Vec<usize> = items.iter().map(|&i| i / self.per_block).collect();
            blocks.dedup(); // a block's items come together
            blocks
        };
        let end = (cursor + batch).min(order.len());
        let now = blocks_of(&order[cursor..end]);
        let mut next = if end < order.len() {
            blocks_of(&order[end..(end + batch).min(order.len())])
        } else {
            let mut covered = 0;
            let first = self.sequence(next_seed).into_iter().take_while(|&at| {
                let before = covered;
                covered += self.spans[at].1.len();
                before < batch
            });
            first.map(|at| self.spans[at].0).collect()
        };
        next.retain(|b| !now.contains(b));
        BlocksAhead { now, next }
    }
}

/// A shard whose labels are all in memory and whose pixels are, a block at a
/// time, as the reader supplies them ([`BlockedShard::supply`]).
pub struct BlockedShard {
    dims: [usize; 3],
    labels: Vec<u16>,
    plan: BlockPlan,
    held: Mutex<Vec<(usize, Vec<u8>)>>,
}

impl BlockedShard {
    /// A shard with `head`'s images in `plan`'s blocks, none of them held yet.
    pub fn new(head: ImagesHead, plan: BlockPlan) -> Self {
        Self {
            dims: head.dims,
            labels: head.labels,
            plan,
            held: Mutex::new(Vec::new()),
        }
    }

    /// The blocks.
    pub fn plan(&self) -> &BlockPlan {
        &self.plan
    }

    /// Whether `block`'s pixels are in memory.
    pub fn holds(&self, block: usize) -> bool {
        self.lock().iter().any(|(b, _)| *b == block)
    }

    /// Takes `block`'s pixels (the bytes of [`BlockPlan::bytes`]) and lets go of
    /// every held block not in `keep`. A block that is not wanted is dropped.
    pub fn supply(&self, block: usize, pixels: Vec<u8>, keep: &[usize]) -> Result<(), DataError> {
        let range = self.plan.bytes(block);
        let expected = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
        if block >= self.plan.blocks() || pixels.len() != expected {
            return Err(DataError::Truncated {
                file: format!("block {block} of the shard"),
                expected,
                actual: pixels.len(),
            });
        }
        let mut held = self.lock();
        held.retain(|(b, _)| keep.contains(b) && *b != block);
        if keep.contains(&block) {
            held.push((block, pixels));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, Vec<u8>)>> {
        // A panic while holding the lock left the list whole (push and retain only).
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Images for BlockedShard {
    fn count(&self) -> usize {
        self.labels.len()
    }

    fn dims(&self) -> [usize; 3] {
        self.dims
    }

    fn label(&self, index: usize) -> u16 {
        self.labels[index]
    }

    fn block(&self) -> Option<usize> {
        Some(self.plan.per_block)
    }

    /// # Panics
    /// If the image's block is not held: the reader supplies the blocks of
    /// [`BlocksAhead::now`] before each step.
    fn pixels<'a>(&'a self, index: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        let block = self.plan.block_of(index);
        let held = self.lock();
        let (_, pixels) = held
            .iter()
            .find(|(b, _)| *b == block)
            .unwrap_or_else(|| panic!("image {index}'s block {block} is not in memory"));
        let image = self.dims.iter().product::<usize>();
        let at = (index - self.plan.items(block).start) * image;
        scratch.clear();
        scratch.extend_from_slice(&pixels[at..at + image]);
        scratch
    }
}

#[cfg(test)]
mod tests;
