//! Tests of block-wise reading: plans, block-wise epochs, and a stream fed a block
//! at a time giving the very batches of the same stream over the whole set.

use std::collections::HashSet;
use std::sync::Arc;

use super::*;
use crate::data::{
    BatchSource, BatchStream, Batcher, ChannelStats, ImageSet, Normalization, encode_images,
};

/// `n` 1×2×2 images whose pixels name them, labels cycling through 3 classes.
fn numbered(n: usize) -> ImageSet {
    ImageSet {
        source: "numbered".into(),
        channels: 1,
        rows: 2,
        cols: 2,
        pixels: (0..n * 4).map(|v| (v / 4 % 251) as u8).collect(),
        labels: (0..n).map(|i| (i % 3) as u16).collect(),
    }
}

fn plain() -> Normalization {
    Normalization {
        channels: vec![ChannelStats {
            mean: 0.0,
            std: 1.0,
        }],
    }
}

fn head_of(set: &ImageSet) -> (Vec<u8>, ImagesHead) {
    let bytes = encode_images(set);
    let head = ImagesHead::decode("test", &bytes, bytes.len() as u64).unwrap();
    (bytes, head)
}

#[test]
fn a_plan_cuts_the_pixels_into_contiguous_blocks_within_the_budget() {
    let (bytes, head) = head_of(&numbered(103));
    // 4-byte images, a 240-byte budget: 10 images a block.
    let plan = BlockPlan::new(&head, 4, 240);
    assert_eq!((plan.per_block(), plan.blocks()), (10, 11));
    assert_eq!(plan.items(10), 100..103);
    assert_eq!(plan.bytes(0).start, head.pixels_at as u64);
    assert_eq!(plan.bytes(10).end, bytes.len() as u64);
    for b in 1..plan.blocks() {
        assert_eq!(plan.bytes(b - 1).end, plan.bytes(b).start);
    }
    // Never fewer images than a batch, whatever the budget.
    assert_eq!(BlockPlan::new(&head, 16, 1).per_block(), 16);
}

#[test]
fn block_wise_epochs_cover_every_item_once_block_after_block() {
    let indices: Vec<usize> = (0..103).collect();
    let batcher = Batcher::new(indices.clone(), 8, 7, &plain()).with_blocks(Some(10));
    let mut orders = Vec::new();
    for epoch in 0..3 {
        let order = batcher.epoch_order(epoch);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, indices, "epoch {epoch} covers the shard once");
        // Each block's items come together.
        let mut runs: Vec<usize> = order.iter().map(|i| i / 10).collect();
        runs.dedup();
        assert_eq!(runs.len(), 11, "epoch {epoch}: {runs:?}");
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "epochs shuffle differently");
    assert_ne!(
        orders[0][..10],
        orders[0][..10]
            .iter()
            .map(|i| i / 10 * 10)
            .collect::<Vec<_>>()[..]
    );
}

/// A reader that supplies what `blocks_ahead` asks for before every step trains
/// on exactly the batches of the whole set, holding at most five blocks, and
/// never needs a block it was not told about one step before.
#[test]
fn a_stream_fed_block_by_block_gives_the_batches_of_the_whole_set() {
    let set = numbered(103);
    let (bytes, head) = head_of(&set);
    let shard = Arc::new(BlockedShard::new(
        head.clone(),
        BlockPlan::new(&head, 8, 240),
    ));
    let batcher = Batcher::new((0..103).collect(), 8, 11, &plain()).with_blocks(shard.block());
    let mut fed = BatchStream::new(batcher.clone(), shard.clone(), 0);
    let mut whole = BatchStream::new(batcher, Arc::new(set), 0);
    let mut told: HashSet<usize> = HashSet::new();
    let mut reads = 0;
    // Five epochs of 13 batches.
    for step in 0..65 {
        let ahead = fed.blocks_ahead().expect("a block-read set");
        for &block in &ahead.now {
            assert!(
                told.contains(&block) || step == 0,
                "step {step}: block {block} was not announced"
            );
        }
        let keep: Vec<usize> = ahead.all().collect();
        for block in keep.iter().copied().filter(|&b| !shard.holds(b)) {
            let range = shard.plan().bytes(block);
            let pixels = bytes[range.start as usize..range.end as usize].to_vec();
            shard.supply(block, pixels, &keep).unwrap();
            reads += 1;
        }
        assert!(shard.lock().len() <= 5, "step {step}");
        told = keep.into_iter().collect();
        assert_eq!(fed.next_batch(), whole.next_batch(), "step {step}");
    }
    // Each block read about once an epoch, not once a batch.
    assert!((55..=70).contains(&reads), "{reads} block reads");
}

#[test]
fn a_damaged_or_unwanted_block_is_refused_or_dropped() {
    let (bytes, head) = head_of(&numbered(30));
    let shard = BlockedShard::new(head.clone(), BlockPlan::new(&head, 4, 240));
    let range = shard.plan().bytes(1);
    let good = bytes[range.start as usize..range.end as usize].to_vec();
    let short = good[1..].to_vec();
    assert!(matches!(
        shard.supply(1, short, &[1]),
        Err(DataError::Truncated { .. })
    ));
    assert!(shard.supply(9, good.clone(), &[9]).is_err(), "no block 9");
    shard.supply(1, good.clone(), &[0]).unwrap();
    assert!(!shard.holds(1), "not wanted any more");
    shard.supply(1, good, &[1]).unwrap();
    assert!(shard.holds(1));
    let mut scratch = Vec::new();
    assert_eq!(shard.pixels(12, &mut scratch), &[12; 4]);
}

#[test]
#[should_panic(expected = "block 0 is not in memory")]
fn reading_an_image_whose_block_is_not_held_is_a_bug() {
    let (_, head) = head_of(&numbered(30));
    let shard = BlockedShard::new(head.clone(), BlockPlan::new(&head, 4, 240));
    shard.pixels(3, &mut Vec::new());
}
