//! The networks tether trained before networks were descriptions, written by hand:
//! kept as the reference the shipped descriptions are checked against (the same
//! parameters give the same outputs and gradients) and the baseline `bench train
//! --reference` measures the description-built networks' speed against.

pub mod paper;
pub mod small;

pub use paper::{PaperCnn, PaperCnnConfig};
pub use small::{SmallCnn, SmallCnnConfig};
