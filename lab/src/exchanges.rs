//! How often a grid's workers meet the center: a cell whose workers exchange only
//! once or twice within the budget cannot show what τ does (its table reads as if
//! the elastic methods lost), so `tether repro` sizes its default budget so that
//! every cell gets [`MIN_EXCHANGES`], and warns about cells below it.

use crate::repro::Grid;

/// Exchanges per worker a cell needs for its error to say something about τ.
pub const MIN_EXCHANGES: f64 = 4.0;

/// A cell with too few exchanges.
#[derive(Clone, Debug, PartialEq)]
pub struct ThinCell {
    /// τ.
    pub tau: u32,
    /// p.
    pub workers: u32,
    /// Exchanges each of its workers makes within the budget.
    pub exchanges: f64,
}

/// Exchanges each worker makes in a cell: its images over τ · batch.
pub fn per_worker(
    budget_samples: u64,
    per_worker_budget: bool,
    batch: u32,
    tau: u32,
    workers: u32,
) -> f64 {
    let images = if per_worker_budget {
        budget_samples as f64
    } else {
        budget_samples as f64 / f64::from(workers.max(1))
    };
    images / (f64::from(batch.max(1)) * f64::from(tau.max(1)))
}

/// The smallest budget (in the grid's unit: per run, or per worker) that gives
/// every cell of `taus` × `workers` at least [`MIN_EXCHANGES`] per worker.
pub fn budget_for_enough(
    per_worker_budget: bool,
    batch: u32,
    taus: &[u32],
    workers: &[u32],
) -> u64 {
    let most_tau = taus.iter().copied().max().unwrap_or(1).max(1);
    let most_workers = if per_worker_budget {
        1
    } else {
        workers.iter().copied().max().unwrap_or(1).max(1)
    };
    (MIN_EXCHANGES * f64::from(batch.max(1)) * f64::from(most_tau) * f64::from(most_workers)).ceil()
        as u64
}

impl Grid {
    /// The cells whose workers exchange fewer than [`MIN_EXCHANGES`] times.
    pub fn thin_cells(&self) -> Vec<ThinCell> {
        let mut thin = Vec::new();
        for &workers in &self.workers {
            for &tau in &self.taus {
                let exchanges = per_worker(
                    self.budget_samples,
                    self.budget_per_worker,
                    self.batch,
                    tau,
                    workers,
                );
                if exchanges < MIN_EXCHANGES {
                    thin.push(ThinCell {
                        tau,
                        workers,
                        exchanges,
                    });
                }
            }
        }
        thin
    }
}

/// One line naming the thin cells, for a table's reader; `None` when there are none.
pub fn warning(thin: &[ThinCell]) -> Option<String> {
    if thin.is_empty() {
        return None;
    }
    let cells: Vec<String> = thin
        .iter()
        .map(|c| format!("τ = {}, p = {}: {:.1}", c.tau, c.workers, c.exchanges))
        .collect();
    Some(format!(
        "Too few exchanges per worker to judge τ (fewer than {MIN_EXCHANGES}) in: {}. \
         A larger --budget gives them more.",
        cells.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eight_thousand_image_folder_gets_a_budget_the_largest_tau_can_use() {
        // The case: half an epoch of 8 000 images, p = 4, batch 32, τ = 64
        // leaves each worker half an exchange.
        assert!((per_worker(4000, false, 32, 64, 4) - 0.488).abs() < 0.001);
        let budget = budget_for_enough(false, 32, &[1, 4, 16, 64], &[4]);
        assert_eq!(budget, 4 * 32 * 64 * 4);
        assert_eq!(per_worker(budget, false, 32, 64, 4), MIN_EXCHANGES);
        // Per worker budgets do not grow with p.
        assert_eq!(
            budget_for_enough(true, 32, &[16], &[1, 4, 8, 16]),
            4 * 32 * 16
        );
        let thin = [ThinCell {
            tau: 64,
            workers: 4,
            exchanges: 0.49,
        }];
        let line = warning(&thin).unwrap();
        assert!(line.contains("τ = 64, p = 4: 0.5"), "{line}");
        assert_eq!(warning(&[]), None);
    }
}
