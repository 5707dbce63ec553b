//! The run's classes: their names (from the data's folders or names file) and how
//! the center scored on each at the latest evaluation, for `GET /api/classes`, the
//! dashboard and `report.json`.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tether_shared::data::class_names;
use tether_shared::train::ClassScores;

/// Most classes one `/api/classes` answer lists.
pub const MAX_PAGE: usize = 1000;

/// Names and the latest per-class scores.
pub struct Classes {
    names: Vec<String>,
    latest: Mutex<Option<(u64, ClassScores)>>,
}

/// One class as the API and the report show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// Its label (the network's output index).
    pub label: usize,
    /// Its name.
    pub name: String,
    /// Test images of this class scored at the latest evaluation.
    pub test_images: u32,
    /// The center's accuracy on them, 0..1 (`None`: not scored yet, or no image).
    pub accuracy: Option<f64>,
}

/// The body of `GET /api/classes`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClassPage {
    /// Classes in the run.
    pub count: usize,
    /// The center version the scores are for (`None`: no evaluation yet).
    pub version: Option<u64>,
    /// The classes asked for.
    pub classes: Vec<ClassReport>,
}

/// Which classes `GET /api/classes` lists.
#[derive(Debug, Deserialize)]
pub struct ClassQuery {
    /// Skip this many (after ordering).
    #[serde(default)]
    pub offset: usize,
    /// At most this many (≤ 1 000, the default).
    pub limit: Option<usize>,
    /// `label` (the default) or `worst` (lowest accuracy first, unscored last).
    #[serde(default)]
    pub order: Order,
}

/// How `/api/classes` orders the classes.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// By label.
    #[default]
    Label,
    /// Lowest accuracy first.
    Worst,
}

impl Classes {
    /// The classes of a network with `count` outputs, named by `names` where the
    /// data names them (cleaned and bounded; the rest are numbers).
    pub fn new(names: &[String], count: usize) -> Self {
        Self {
            names: class_names(names, count),
            latest: Mutex::new(None),
        }
    }

    /// Keeps `scores` as the latest, for center `version`.
    pub fn record(&self, version: u64, scores: ClassScores) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, scores));
    }

    /// Every class with its latest score, in label order, and the version scored.
    pub fn all(&self) -> (Option<u64>, Vec<ClassReport>) {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let (version, scores) = match &*latest {
            Some((v, s)) => (Some(*v), Some(s)),
            None => (None, None),
        };
        let reports = self
            .names
            .iter()
            .enumerate()
            .map(|(label, name)| {
                let total = scores.and_then(|s| s.total.get(label).copied());
                let correct = scores.and_then(|s| s.correct.get(label).copied());
                ClassReport {
                    label,
                    name: name.clone(),
                    test_images: total.unwrap_or(0),
                    accuracy: match (correct, total) {
                        (Some(c), Some(t)) if t > 0 => Some(f64::from(c) / f64::from(t)),
                        _ => None,
                    },
                }
            })
            .collect();
        (version, reports)
    }

    /// A page of classes in the order asked for.
    pub fn page(&self, offset: usize, limit: usize, order: Order) -> ClassPage {
        let (version, mut all) = self.all();
        if let Order::Worst = order {
            // Unscored classes (None) sort last; ties keep label order.
            all.sort_by(|a, b| {
                let key = |c: &ClassReport| c.accuracy.unwrap_or(f64::INFINITY);
                key(a).total_cmp(&key(b))
            });
        }
        ClassPage {
            count: all.len(),
            version,
            classes: all
                .into_iter()
                .skip(offset)
                .take(limit.min(MAX_PAGE))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_name_score_and_order_the_classes() {
        let classes = Classes::new(&["cat".into(), "dog".into()], 4);
        let page = classes.page(0, 10, Order::Label);
        assert_eq!((page.count, page.version), (4, None));
        assert_eq!(page.classes[1].name, "dog");
        assert_eq!(page.classes[3].name, "3");
        assert!(page.classes.iter().all(|c| c.accuracy.is_none()));
        classes.record(
            7,
            ClassScores {
                correct: vec![9, 2, 5, 0],
                total: vec![10, 10, 10, 0],
            },
        );
        let worst = classes.page(0, 10, Order::Worst);
        assert_eq!(worst.version, Some(7));
        let order: Vec<usize> = worst.classes.iter().map(|c| c.label).collect();
        assert_eq!(order, [1, 2, 0, 3], "lowest first, the unscored class last");
        assert_eq!(worst.classes[0].accuracy, Some(0.2));
        let second = classes.page(1, 2, Order::Label);
        let labels: Vec<usize> = second.classes.iter().map(|c| c.label).collect();
        assert_eq!(labels, [1, 2]);
        assert_eq!(classes.page(0, usize::MAX, Order::Label).classes.len(), 4);
    }
}
