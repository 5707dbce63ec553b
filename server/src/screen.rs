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
//! the only change in between).

use std::sync::{Arc, Mutex};

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

/// Scores candidate centers on secret training batches (one at a time: the model,
/// the batch and the cache are shared).
pub struct Screen {
    model: Model,
    tables: Vec<[f32; 256]>,
    train: Arc<ImageSet>,
    size: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    rng: SplitMix64,
    device: Device,
    /// Kept between judgements so the model is not initialised each time.
    net: Option<Net>,
    uses: u32,
    images: Vec<f32>,
    labels: Vec<i64>,
    /// The per-image losses of center version `.0` on the current batch.
    cached: Option<(u64, Vec<f32>)>,
    /// Judgements so far.
    judged: u64,
    /// The last candidate's per-image losses (for [`Screen::settled`]).
    last: Vec<f32>,
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
        Self {
            model,
            tables: normalization.tables(),
            train,
            size,
            inner: Mutex::new(Inner {
                rng: SplitMix64::new(u64::from_le_bytes(secret_bytes())),
                device: Device::flex(),
                net: None,
                uses: ROTATE_EVERY,
                images: Vec::new(),
                labels: Vec::new(),
                cached: None,
                judged: 0,
                last: Vec::new(),
            }),
        }
    }

    /// Scores `candidate` against `base` (the center at `base_version`). Blocking:
    /// call from a blocking thread.
    pub fn judge(&self, base_version: u64, base: &[f32], candidate: &[f32]) -> Verdict {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.uses >= ROTATE_EVERY {
            self.draw(&mut inner);
        }
        inner.uses += 1;
        if !matches!(&inner.cached, Some((v, _)) if *v == base_version) {
            let losses = self.losses(&mut inner, base);
            inner.cached = Some((base_version, losses));
        }
        let after = self.losses(&mut inner, candidate);
        let before = inner
            .cached
            .as_ref()
            .map(|(_, l)| l.as_slice())
            .unwrap_or(&[]);
        let verdict = Verdict::paired(before, &after, inner.judged + 1);
        inner.judged += 1;
        inner.last = after;
        verdict
    }

    /// The judged candidate became center version `version`, unchanged (nothing
    /// else moved x̃ in between): its loss is the next judgement's `before`.
    pub fn settled(&self, verdict: &Verdict, version: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Only if no judgement (and so no new batch) came in between.
        if inner.judged == verdict.id {
            let last = std::mem::take(&mut inner.last);
            inner.cached = Some((version, last));
        }
    }

    fn draw(&self, inner: &mut Inner) {
        let n = self.train.len();
        let items: Vec<usize> = (0..self.size).map(|_| inner.rng.below(n)).collect();
        let Inner { images, labels, .. } = inner;
        // The centre window, as evaluation sees the images.
        let window = Window::centre(self.model.input_shape());
        fill_normalized(&*self.train, &items, &self.tables, window, images, labels);
        inner.uses = 0;
        inner.cached = None;
    }

    /// The cross-entropy of each image of the current batch under `params`.
    fn losses(&self, inner: &mut Inner, params: &[f32]) -> Vec<f32> {
        let net = inner
            .net
            .take()
            .unwrap_or_else(|| self.model.init(&inner.device));
        let net = load_flat(net, params).expect("candidates have the model's length");
        let [c, h, w] = self.model.input_shape();
        let n = inner.labels.len();
        let device = &inner.device;
        let x = Tensor::<4>::from_data(TensorData::new(inner.images.clone(), [n, c, h, w]), device);
        let y = Tensor::<2, Int>::from_data(TensorData::new(inner.labels.clone(), [n, 1]), device);
        // Batch statistics for batch norms: the center's own were never estimated.
        let nll = log_softmax(net.forward_batch_stats(x), 1)
            .gather(1, y)
            .neg();
        inner.net = Some(net);
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
}
