//! Disjoint shards of a training set: a seeded permutation cut into p near-equal parts.

use crate::rng::SplitMix64;

/// The item indices of `worker`'s shard when `n` items are split among `workers`.
/// Shards are disjoint, cover all items, differ in size by at most one, and depend
/// only on (n, workers, worker, seed).
///
/// # Panics
/// If `workers == 0` or `worker >= workers`: callers validate these first.
pub fn shard_indices(n: usize, workers: usize, worker: usize, seed: u64) -> Vec<usize> {
    assert!(worker < workers, "worker {worker} out of 0..{workers}");
    let mut all: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut all);
    let start = worker * n / workers;
    let end = (worker + 1) * n / workers;
    let mut shard = all[start..end].to_vec();
    shard.sort_unstable(); // a stable order; batches shuffle it per epoch anyway
    shard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_cover_everything_and_are_balanced() {
        let (n, p) = (1003, 4);
        let shards: Vec<Vec<usize>> = (0..p).map(|w| shard_indices(n, p, w, 42)).collect();
        let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
        assert_eq!(shard_indices(n, p, 2, 42), shards[2], "deterministic");
        assert_ne!(shard_indices(n, p, 2, 43), shards[2], "seed matters");
    }
}
