//! The run's data as its server holds it: the training set workers download
//! shards of, the test set the center is scored on, and the classes' names.

use std::path::PathBuf;
use std::sync::Arc;

use tether_dataset::{self as dataset, LoadError};
use tether_shared::data::{Dataset, ImageSet};

use crate::config::ServerConfig;

/// A run's data as its server holds it.
pub struct RunData {
    /// The training set (workers download their shards of it).
    pub train: Arc<ImageSet>,
    /// The test set the center is scored on.
    pub test: ImageSet,
    /// Class names as the data gives them (folders, a names file; may be empty).
    pub classes: Vec<String>,
}

impl RunData {
    /// `data` with its test set cut to the first `eval_limit` images.
    pub fn new(data: Dataset, eval_limit: Option<usize>) -> Self {
        let mut test = data.test;
        if let Some(n) = eval_limit {
            test = test.subset(&(0..n.min(test.len())).collect::<Vec<_>>());
        }
        Self {
            train: Arc::new(data.train),
            test,
            classes: data.classes,
        }
    }
}

/// The run's data (`--data` or the shipped set), decoded for the run's network and
/// checked against its input shape and classes; the test set cut to `--eval-limit`.
pub fn load_data(config: &ServerConfig) -> Result<(PathBuf, RunData), LoadError> {
    let shape = Some(config.run.model.data_shape());
    let (data_dir, data) = dataset::load_for(config.data.as_deref(), shape)?;
    for set in [&data.train, &data.test] {
        set.expect_network(&config.run.model)?;
    }
    Ok((data_dir, RunData::new(data, config.eval_limit)))
}
