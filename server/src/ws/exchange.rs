//! One sync's way to the center: session, sequence and length checks, xⁱ through
//! the session's link, the worker's progress, DOWNPOUR's push, the operator's pause,
//! the wait for a measure of honest progress, the loss screen, and the offer.

use tether_shared::algorithms::{Algorithm, norms};
use tether_shared::codec::{Encoding, LinkError};
use tether_shared::protocol::{Rejection, StopReason, Sync};

use super::Conn;
use crate::calibrate;
use crate::center::{Cohort, Outcome, Ready, Update};
use crate::screen::Verdict;
use crate::state::AppState;

/// Validates a sync and hands it to the center; waits for the round if the
/// algorithm is synchronous. Returns the reply, and whether the loss screen held
/// the update.
pub(super) async fn exchange(
    state: &AppState,
    conn: &mut Conn,
    sync: Sync,
    encoding: Encoding,
    values: Vec<f32>,
    stop: &mut tokio::sync::watch::Receiver<Option<StopReason>>,
) -> Result<(Ready, bool), Rejection> {
    if sync.session != conn.session {
        return Err(Rejection::UnknownSession(sync.session));
    }
    if sync.seq <= conn.last_seq {
        return Err(Rejection::Replayed {
            seq: sync.seq,
            last: conn.last_seq,
        });
    }
    let expected = state.spec.model.param_count();
    if values.len() != expected {
        return Err(Rejection::WrongLength {
            expected: expected as u64,
            got: values.len() as u64,
        });
    }
    // xⁱ as the worker meant it. The link moves its reference here, before the
    // center has judged the update: after any rejection an honest worker leaves the
    // session (restart or reconnect), and a dishonest one only confuses its own link.
    // Every check below runs on these decoded values.
    let values = conn
        .link
        .receive_params(encoding, values)
        .map_err(|e| match e {
            LinkError::WrongLength { expected, got } => Rejection::WrongLength {
                expected: expected as u64,
                got: got as u64,
            },
            e @ LinkError::WrongEncoding { .. } => Rejection::Malformed(e.to_string()),
        })?;
    if !sync.loss.is_finite() || !sync.samples_per_s.is_finite() || !sync.wait_s.is_finite() {
        return Err(Rejection::Malformed(
            "non-finite figures in the sync header".into(),
        ));
    }
    // f64 throughout; NaN when the values are not finite, which the center refuses
    // (as NonFinite, checked before the progress).
    let progress = norms(&values, &conn.anchor).distance;
    conn.sent.clear();
    conn.sent.extend_from_slice(&values);
    let values = match state.spec.algorithm {
        // The push is the worker's change since its last pull, computed here.
        Algorithm::Downpour | Algorithm::Mdownpour => values
            .iter()
            .zip(&conn.anchor)
            .map(|(x, p)| x - p)
            .collect(),
        _ => values,
    };
    // Paused by the operator: hold this sync (the worker waits for its reply) and
    // apply it once training resumes.
    if state.paused() {
        tokio::select! {
            _ = state.unpaused() => {}
            _ = stop.wait_for(Option::is_some) => return Err(Rejection::ShuttingDown),
        }
    }
    // While the server measures honest progress (at start, after a change of τ or
    // η), an exchange the norm guard would refuse without the measure waits for it
    // (a GPU worker's first τ steps can outrun the server's CPU measuring them).
    // A worker's first exchange that a measure from an older x̃ would refuse has
    // one taken from x̃ as it is now (at most every `REMEASURE_EVERY`).
    let (bound, new) = {
        let center = state.center();
        (
            center.session_bound(conn.session, conn.cohort),
            center.is_new(conn.session),
        )
    };
    if progress > bound {
        if new
            && conn.cohort == Cohort::Workers
            && !state.calibration.running()
            && let Some(running) = state.calibration.begin_if_due(calibrate::REMEASURE_EVERY)
        {
            state.measure_honest_progress(running);
        }
        if state.calibration.running() {
            state.calibration.settled(calibrate::WAIT).await;
        }
    }
    let now = state.center().hyper();
    let mut update = Update {
        session: conn.session,
        worker_id: conn.worker_id,
        seen_version: sync.center_version,
        loss: sync.loss,
        values,
        progress,
        cohort: conn.cohort,
        settled: conn.told.iter().all(|t| *t == (now.tau, now.lr)),
        held: false,
    };
    let members = state.workers().len();
    let verdict = screen(state, &update, members).await?;
    let held = verdict.is_some_and(|(v, _)| !v.passes());
    update.held = held;
    let outcome = state.center().offer(update, members)?;
    if let (Some((verdict, base)), Outcome::Ready(r)) = (verdict, &outcome) {
        // The candidate is the center now iff this update was the only change since
        // (MDOWNPOUR's center also carries server momentum: not the candidate).
        if verdict.passes()
            && r.version == base + 1
            && state.spec.algorithm != Algorithm::Mdownpour
            && let Some(s) = &state.screen
        {
            s.settled(&verdict, r.version);
        }
    }
    conn.last_seq = sync.seq;
    let ready = match outcome {
        Outcome::Ready(r) => r,
        Outcome::Queued { reply, arm_timer } => {
            if let Some(id) = arm_timer {
                let timer_state = state.clone();
                let wait = state.config.barrier_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let closed = timer_state.center().round_timed_out(id);
                    if closed > 0 {
                        tracing::warn!(
                            round = id,
                            workers = closed,
                            "round timed out; went on without the laggards"
                        );
                    }
                });
            }
            tokio::select! {
                r = reply => r.map_err(|_| Rejection::ShuttingDown)??,
                _ = stop.wait_for(Option::is_some) => return Err(Rejection::ShuttingDown),
            }
        }
    };
    Ok((ready, held))
}

/// Runs the loss screen on what `update` would make of x̃ (off the center's lock, on
/// a blocking thread); `None` when the screen is off or the update would not move
/// x̃. Returns the verdict and the center version it was judged against.
async fn screen(
    state: &AppState,
    update: &Update,
    members: usize,
) -> Result<Option<(Verdict, u64)>, Rejection> {
    let Some(screen) = state.screen.clone() else {
        return Ok(None);
    };
    let Some(p) = state.center().propose(update, members)? else {
        return Ok(None);
    };
    let base = p.base_version;
    let verdict =
        tokio::task::spawn_blocking(move || screen.judge(p.base_version, &p.base, &p.candidate))
            .await
            .map_err(|_| Rejection::ShuttingDown)?;
    Ok(Some((verdict, base)))
}
