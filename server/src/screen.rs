//! The loss screen: before an update moves x̃, the center it would produce is scored
//! against the current one on a secret batch of training data. An update that makes
//! the center worse on that batch is held: the worker still gets its reply (it is
//! pulled toward x̃ as usual), but x̃ does not move toward it.
//!
//! Why: the norm guard bounds how *far* one update may move x̃, not *where*. A client
//! sending updates just under the guard in a harmful direction (toward zero, back up
//! the gradient) dragged the center from 87 % to 62 % in 100 pushes. No single
//! number sent by a client sets the judgement here: the batch is drawn from the
//! server's own training data with the OS's CSPRNG, and both centers are scored on
//! the same images, so the comparison is paired: an update is held when the mean
//! per-image loss change is positive by more than [`Z`] standard errors. That test
//! judges the *direction* of a move, not its size (for small moves the mean change
//! and its spread both scale with the step), so a harmful direction is caught however
//! finely it is sliced, while honest moves that are merely noisy pass.
//!
//! Cost: one forward pass over the batch per update (the base's losses are cached by
//! center version, and the candidate's become the next base's when the update is
//! the only change in between). Several updates are judged at once, each on a
//! slot of its own (half the cores, two to eight slots, the cores shared out).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use tether_shared::data::window::{Window, fill_normalized};
use tether_shared::data::{ImageSet, Normalization};
use tether_shared::model::{Model, Net, load_flat};
use tether_shared::rng::SplitMix64;

use crate::state::secret_bytes;

/// How many judgements one batch serves before a fresh one is drawn.
const ROTATE_EVERY: u32 = 32;
/// Standard errors of the mean loss change above zero at which an update is held
/// (one-sided; a neutral move passes ≈ 84 % of the time).
pub const Z: f64 = 1.0;

/// What the screen decided about one candidate center.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Mean per-image change of the cross-entropy, candidate − current center.
    pub change: f64,
    /// Its standard error over the batch.
    pub std_error: f64,
    /// Which judgement this was (for [`Screen::settled`]).
    id: u64,
}

impl Verdict {
    /// The update may move the center: the batch gives no confident evidence that
    /// it raises the loss.
    pub fn passes(&self) -> bool {
        self.change <= Z * self.std_error
    }

    fn paired(before: &[f32], after: &[f32], id: u64) -> Self {
        let n = before.len().max(1) as f64;
        let d = || {
            before
                .iter()
                .zip(after)
                .map(|(b, a)| f64::from(*a) - f64::from(*b))
        };
        let mean = d().sum::<f64>() / n;
        let var = d().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let (change, std_error) = (mean, (var / n).sqrt());
        // A candidate that is not even finite somewhere is worse than any center.
        if change.is_finite() && std_error.is_finite() {
            Self {
                change,
                std_error,
                id,
            }
        } else {
            Self {
                change: f64::INFINITY,
                std_error: 0.0,
                id,
            }
        }
    }
}

/// Scores candidate centers on secret training batches. Judgements run side by
/// side, each on a net and threads of its own ([`Slot`]); the batch, the cached
/// losses and the count are shared, and held only briefly.
pub struct Screen {
    model: Model,
    tables: Vec<[f32; 256]>,
    train: Arc<ImageSet>,
    size: usize,
    device: Device,
    book: Mutex<Book>,
    slots: Vec<Slot>,
    /// Judgements computing now: one alone fans out over every core.
    running: AtomicUsize,
}

/// Where one judgement runs: a net (`None` until first used) and a small thread
/// pool of its own, which the kernels' parallel loops stay on.
struct Slot {
    net: Mutex<Option<Net>>,
    /// `None` if the threads could not be started: the caller's pool is used.
    pool: Option<rayon::ThreadPool>,
}

/// The images judged on, drawn together.
struct Batch {
    id: u64,
    images: Vec<f32>,
    labels: Vec<i64>,
}

/// Per-image losses on one batch.
type Losses = Arc<Vec<f32>>;

struct Book {
    rng: SplitMix64,
    batch: Arc<Batch>,
    uses: u32,
    /// The per-image losses of center version `.0` on the current batch.
    cached: Option<(u64, Losses)>,
    /// Judgements begun so far.
    judged: u64,
    /// The last few candidates' losses by judgement (for [`Screen::settled`]).
    recent: VecDeque<(u64, u64, Losses)>,
}

impl Screen {
    /// A screen drawing batches of `size` images from `train` (`size` ≥ 1).
    pub fn new(
        model: Model,
        normalization: &Normalization,
        train: Arc<ImageSet>,
        size: usize,
    ) -> Self {
        let size = size.clamp(1, train.len().max(1));
        // Judgements side by side, each on few threads, rather than one at a time
        // across every core: a judgement's parallel loops join at every layer, and
        // on a server whose cores also carry the exchanges, a joined thread that is
        // descheduled stalls the rest (2 cores, small model, 4 workers: 26 → 43
        // screened updates/s).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (slots, threads) = {
            let slots = (cores / 2).clamp(2, 8);
            (slots, (cores / slots).max(1))
        };
        let slots = (0..slots)
            .map(|_| Slot {
                net: Mutex::new(None),
                pool: rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("screen-{i}"))
                    .build()
                    .ok(),
            })
            .collect();
        let empty = Arc::new(Batch {
            id: 0,
            images: Vec::new(),
            labels: Vec::new(),
        });
        Self {
            model,
            tables: normalization.tables(),
            train,
            size,
            device: Device::flex(),
            book: Mutex::new(Book {
                rng: SplitMix64::new(u64::from_le_bytes(secret_bytes())),
                batch: empty,
                uses: ROTATE_EVERY,
                cached: None,
                judged: 0,
                recent: VecDeque::new(),
            }),
            slots,
            running: AtomicUsize::new(0),
        }
    }

    /// How many judgements may run at once.
    pub fn at_once(&self) -> usize {
        self.slots.len()
    }

    /// Scores `candidate` against `base` (the center at `base_version`). Blocking:
    /// call from a blocking thread.
    pub fn judge(&self, base_version: u64, base: &[f32], candidate: &[f32]) -> Verdict {
        let (id, batch, before) = {
            let mut book = self.book();
            if book.uses >= ROTATE_EVERY {
                self.draw(&mut book);
            }
            book.uses += 1;
            book.judged += 1;
            let before = match &book.cached {
                Some((v, l)) if *v == base_version => Some(l.clone()),
                _ => None,
            };
            (book.judged, book.batch.clone(), before)
        };
        let (slot, mut guard) = self.slot(id);
        // Out of the guard for the slot's thread (a guard stays on its own thread).
        let mut net = guard.take();
        // Alone (one worker waiting on its reply), a judgement has the cores to
        // itself and takes them all; beside others, it keeps to its slot's threads.
        let alone = self.running.fetch_add(1, Ordering::SeqCst) == 0;
        let run = |f: &mut (dyn FnMut() -> Vec<f32> + Send)| match (&slot.pool, alone) {
            (Some(pool), false) => pool.install(f),
            _ => f(),
        };
        let before = before.unwrap_or_else(|| {
            let losses = Arc::new(run(&mut || self.losses(&mut net, &batch, base)));
            let mut book = self.book();
            if book.batch.id == batch.id {
                book.cached = Some((base_version, losses.clone()));
            }
            losses
        });
        let after = Arc::new(run(&mut || self.losses(&mut net, &batch, candidate)));
        self.running.fetch_sub(1, Ordering::SeqCst);
        *guard = net;
        drop(guard);
        let verdict = Verdict::paired(&before, &after, id);
        let mut book = self.book();
        if book.recent.len() >= 2 * self.slots.len() {
            book.recent.pop_front();
        }
        book.recent.push_back((id, batch.id, after));
        verdict
    }

    /// The judged candidate became center version `version`, unchanged (nothing
    /// else moved x̃ in between): its loss is the next judgement's `before`.
    pub fn settled(&self, verdict: &Verdict, version: u64) {
        let mut book = self.book();
        let current = book.batch.id;
        let found = book
            .recent
            .iter()
            .find(|(id, batch, _)| *id == verdict.id && *batch == current)
            .map(|(_, _, losses)| losses.clone());
        if let Some(losses) = found {
            book.cached = Some((version, losses));
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, or (all busy) judgement `id`'s turn on one.
    fn slot(&self, id: u64) -> (&Slot, MutexGuard<'_, Option<Net>>) {
        self.slots
            .iter()
            .find_map(|s| s.net.try_lock().ok().map(|g| (s, g)))
            .unwrap_or_else(|| {
                let s = &self.slots[(id % self.slots.len() as u64) as usize];
                (s, s.net.lock().unwrap_or_else(|e| e.into_inner()))
            })
    }

    fn draw(&self, book: &mut Book) {
        let n = self.train.len();
        let items: Vec<usize> = (0..self.size).map(|_| book.rng.below(n)).collect();
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        // The centre window, as evaluation sees the images.
        let window = Window::centre(self.model.input_shape());
        fill_normalized(
            &*self.train,
            &items,
            &self.tables,
            window,
            &mut images,
            &mut labels,
        );
        book.batch = Arc::new(Batch {
            id: book.batch.id + 1,
            images,
            labels,
        });
        book.uses = 0;
        book.cached = None;
    }

    /// The cross-entropy of each image of `batch` under `params`, on `slot`'s net.
    fn losses(&self, slot: &mut Option<Net>, batch: &Batch, params: &[f32]) -> Vec<f32> {
        let net = slot.take().unwrap_or_else(|| self.model.init(&self.device));
        let net = load_flat(net, params).expect("candidates have the model's length");
        let [c, h, w] = self.model.input_shape();
        let n = batch.labels.len();
        let device = &self.device;
        let x = Tensor::<4>::from_data(TensorData::new(batch.images.clone(), [n, c, h, w]), device);
        let y = Tensor::<2, Int>::from_data(TensorData::new(batch.labels.clone(), [n, 1]), device);
        // Batch statistics for batch norms: the center's own were never estimated.
        let nll = log_softmax(net.forward_batch_stats(x), 1)
            .gather(1, y)
            .neg();
        *slot = Some(net);
        nll.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_else(|_| vec![f32::INFINITY; n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consistent_rise_is_held_and_noise_passes() {
        let before = vec![1.0f32; 64];
        // Every image a little worse: confident, held however small the step.
        let worse: Vec<f32> = before.iter().map(|b| b + 1e-4).collect();
        assert!(!Verdict::paired(&before, &worse, 1).passes());
        // Half better, half worse, mean zero: passes.
        let noisy: Vec<f32> = (0..64)
            .map(|i| if i % 2 == 0 { 1.1 } else { 0.9 })
            .collect();
        assert!(Verdict::paired(&before, &noisy, 1).passes());
        // A slightly positive mean inside one standard error passes too.
        let mut mostly = noisy.clone();
        mostly[0] += 0.05;
        assert!(Verdict::paired(&before, &mostly, 1).passes());
        // A non-finite loss anywhere is held.
        let mut broken = before.clone();
        broken[3] = f32::INFINITY;
        assert!(!Verdict::paired(&before, &broken, 1).passes());
    }

    /// 200 grey 28×28 images whose class sets the brightness of a band.
    fn images() -> ImageSet {
        let (count, side) = (200, 28);
        let mut pixels = vec![0u8; count * side * side];
        let labels: Vec<u16> = (0..count).map(|i| (i % 10) as u16).collect();
        for (i, image) in pixels.chunks_mut(side * side).enumerate() {
            let band = usize::from(labels[i]) * 2;
            for (j, p) in image.iter_mut().enumerate() {
                *p = if j / side == band || j / side == band + 1 {
                    250
                } else {
                    (j % 7) as u8
                };
            }
        }
        ImageSet {
            source: "bands".into(),
            channels: 1,
            rows: side,
            cols: side,
            pixels,
            labels,
        }
    }

    #[test]
    fn judgements_side_by_side_agree_with_one_at_a_time() {
        let train = images();
        let model = Model::small();
        let screen = Screen::new(
            model.clone(),
            &Normalization::of(&train),
            Arc::new(train),
            32,
        );
        assert!(screen.at_once() >= 2);
        let base = model.seeded_params(0);
        let nudged = |k: f32| -> Vec<f32> {
            base.iter()
                .enumerate()
                .map(|(j, c)| c + k * ((j % 7) as f32 - 3.0))
                .collect()
        };
        let candidates: Vec<Vec<f32>> = [1e-3, -1e-3, 2e-3, 0.0, 0.5]
            .into_iter()
            .map(nudged)
            .collect();
        // One at a time (the batch lasts 32 judgements: all of these see one batch).
        let alone: Vec<Verdict> = candidates
            .iter()
            .map(|c| screen.judge(0, &base, c))
            .collect();
        // The same candidates from several threads at once.
        let together: Vec<Verdict> = std::thread::scope(|s| {
            let threads: Vec<_> = candidates
                .iter()
                .map(|c| s.spawn(|| screen.judge(0, &base, c)))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("judged"))
                .collect()
        });
        for (a, t) in alone.iter().zip(&together) {
            assert!(
                (a.change - t.change).abs() <= 1e-6 * a.change.abs().max(1e-3),
                "{a:?} {t:?}"
            );
            assert_eq!(a.passes(), t.passes());
        }
        // The unchanged center changes nothing; a wild one is held.
        assert_eq!(alone[3].change, 0.0);
        assert!(alone[3].passes());
        assert!(!alone[4].passes(), "{:?}", alone[4]);
    }
}
