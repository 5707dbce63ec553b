//! Progress bars for long work. indicatif draws nothing when stderr is not a
//! terminal, so logs and CI output stay clean.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` steps with a title and a live message (loss, speed).
pub fn bar(len: u64, title: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30.cyan/blue}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(title.to_string());
    bar
}

/// A spinner with the time elapsed, for work whose length is not known.
pub fn working(title: &str) -> ProgressBar {
    ticking(title, "{prefix:>12} {spinner} {elapsed_precise} {msg}")
}

/// A spinner for open-ended work (a worker without a step budget).
pub fn spinner(title: &str) -> ProgressBar {
    ticking(
        title,
        "{prefix:>12} {spinner} {pos} steps {elapsed_precise} {msg}",
    )
}

fn ticking(title: &str, template: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar.set_prefix(title.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
