//! Watching a run: the evaluator scores the center as it changes and logs where the
//! run stands; the finish watch ends the run when `--max-samples`, `--max-time` or
//! `--target-accuracy` holds.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::state::{AppState, EvalPoint};

/// Scores the center every `eval_every` when it has changed, on a blocking thread so
/// syncs never wait for it.
pub(crate) fn spawn_evaluator(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(every) = state.config.eval_every else {
            return;
        };
        let mut stop = state.stop_signal();
        let mut last = None;
        let mut syncs_then = (0.0, 0u64);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(Option::is_some) => return,
            }
            let version = state.center().version();
            if last == Some(version) {
                continue;
            }
            let s = state.clone();
            if let Ok(point) = tokio::task::spawn_blocking(move || s.evaluate_now()).await {
                log_progress(&state, &point, &mut syncs_then);
                last = Some(point.version);
                if let Some(why) = finish_reason(&state) {
                    state.finish(why);
                }
            }
        }
    })
}

/// One line per evaluation: where the run stands, and a warning when shards go
/// untrained.
pub(crate) fn log_progress(state: &AppState, point: &EvalPoint, then: &mut (f64, u64)) {
    let syncs = state.metrics.syncs.load(Ordering::Relaxed);
    let rate = (syncs - then.1) as f64 / (point.time_s - then.0).max(1e-9);
    *then = (point.time_s, syncs);
    let workers = state.workers().len();
    tracing::info!(
        samples = point.samples,
        version = point.version,
        accuracy = format!("{:.2}%", point.accuracy * 100.0),
        workers,
        syncs_per_s = format!("{rate:.1}"),
        "center evaluated"
    );
    let shards = state.config.run.expected_workers as usize;
    if workers < shards {
        tracing::warn!(
            workers,
            shards,
            "fewer workers than shards: {} shard(s) are not being trained",
            shards - workers
        );
    }
}

/// Why the run is over now, if a finish condition holds.
pub(crate) fn finish_reason(state: &AppState) -> Option<String> {
    let f = state.config.finish;
    let samples = state.metrics.samples.load(Ordering::Relaxed);
    if let Some(max) = f.max_samples
        && samples >= max
    {
        return Some(format!(
            "{samples} training images reached --max-samples {max}"
        ));
    }
    if let Some(max) = f.max_time
        && state.now_s() >= max.as_secs_f64()
    {
        return Some(format!("--max-time {} s reached", max.as_secs()));
    }
    if let (Some(target), Some(e)) = (f.target_accuracy, state.latest_eval())
        && e.accuracy >= target
    {
        return Some(format!(
            "test accuracy {:.2} % reached --target-accuracy {:.2} %",
            e.accuracy * 100.0,
            target * 100.0
        ));
    }
    None
}

/// Checks the sample and time limits four times a second (accuracy is checked after
/// each evaluation); once one holds, `serve` drains, checkpoints and reports.
pub(crate) async fn watch_finish(state: AppState) {
    let f = state.config.finish;
    if f.max_samples.is_none() && f.max_time.is_none() {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_millis(250));
    while !state.stopping() {
        every.tick().await;
        if let Some(why) = finish_reason(&state) {
            state.finish(why);
        }
    }
}
