//! Tests of `center.rs`.
use super::*;
use crate::guard::{HISTORY, SETTLING};

fn hyper(alpha: f32) -> Hyper {
    Hyper {
        tau: 1,
        alpha,
        lr: 0.1,
    }
}

/// A center whose norm guard lets everything through (the guard has its own test).
fn center(algorithm: Algorithm, params: Vec<f32>) -> Center {
    Center::new(algorithm, params, Vec::new(), 0, hyper(0.25), 0.9, 8, 1e9)
}

fn update(session: u64, values: Vec<f32>) -> Update {
    Update {
        session,
        worker_id: session as u32,
        seen_version: 0,
        loss: 1.0,
        values,
        progress: 0.0,
        cohort: Cohort::Workers,
        settled: true,
        held: false,
    }
}

fn ready(o: Outcome) -> Ready {
    match o {
        Outcome::Ready(r) => r,
        Outcome::Queued { .. } => panic!("expected an immediate reply"),
    }
}

#[test]
fn async_easgd_moves_the_center_by_the_difference_it_returns() {
    let mut c = center(Algorithm::Easgd, vec![1.0, 1.0]);
    let r = ready(c.offer(update(1, vec![2.0, 0.0]), 1).unwrap());
    assert_eq!(r.apply, Apply::Subtract);
    assert_eq!(r.payload, [0.25, -0.25]);
    assert_eq!(c.params(), [1.25, 0.75]);
    assert_eq!((r.version, c.version()), (1, 1));
}

#[test]
fn rejections_leave_the_center_bit_identical() {
    let mut c = Center::new(
        Algorithm::Easgd,
        vec![1.0; 4],
        Vec::new(),
        0,
        hyper(0.25),
        0.9,
        8,
        10.0,
    );
    let before = c.params().to_vec();
    // Far out of line with ‖x̃‖ = 2 (no history yet: the bootstrap bound).
    let mut far = update(1, vec![1e6; 4]);
    far.progress = 2e6;
    assert_eq!(c.offer(far, 1).unwrap_err(), Rejection::OutOfLine);
    // Not finite.
    let mut nan = vec![1.0; 4];
    nan[2] = f32::NAN;
    let err = c.offer(update(1, nan), 1).unwrap_err();
    assert_eq!(err, Rejection::NonFinite { index: 2 });
    // Claims a version from the future.
    let mut u = update(1, vec![1.0; 4]);
    u.seen_version = 5;
    assert!(matches!(c.offer(u, 1), Err(Rejection::Unexpected(_))));
    assert_eq!(c.params(), before);
    assert_eq!(c.version(), 0);
    // Too stale: advance the center past the bound of 8.
    for _ in 0..9 {
        c.offer(update(2, vec![1.1; 4]), 1).unwrap();
    }
    let snapshot = c.params().to_vec();
    let err = c.offer(update(1, vec![1.0; 4]), 1).unwrap_err();
    assert!(
        matches!(err, Rejection::TooStale { staleness: 9, .. }),
        "{err:?}"
    );
    assert_eq!(c.params(), snapshot);
}

fn guarded(algorithm: Algorithm, params: Vec<f32>) -> Center {
    Center::new(
        algorithm,
        params,
        Vec::new(),
        0,
        hyper(0.25),
        0.9,
        1000,
        10.0,
    )
}

fn moved(session: u64, values: Vec<f32>, progress: f64) -> Update {
    Update {
        progress,
        ..update(session, values)
    }
}

#[test]
fn no_single_worker_sets_the_typical_progress() {
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    // An honest worker moves 0.01 each time; another raises its own figure step
    // by step, each push just under 10× what the guard allowed before.
    for _ in 0..HISTORY {
        c.offer(moved(1, vec![1.0; 4], 0.01), 2).unwrap();
    }
    let mut push = 0.099;
    let mut accepted = 0;
    for _ in 0..20 {
        if c.offer(moved(2, vec![1.0; 4], push), 2).is_ok() {
            accepted += 1;
            push *= 9.9;
        }
    }
    assert_eq!(accepted, 1, "the bound stays 10× the honest figure");
    assert!((c.guard.typical(Cohort::Workers).unwrap() - 0.01).abs() < 1e-12);
    // A third worker that barely moves cannot shut the honest one out alone:
    // the middle of three figures counts.
    for _ in 0..HISTORY {
        c.offer(moved(3, vec![1.0; 4], 1e-9), 3).unwrap();
    }
    assert!(c.offer(moved(1, vec![1.0; 4], 0.02), 3).is_ok());
    // Leaving takes a worker's figures with it: the honest one's largest counts.
    c.leave_round(2, 2);
    c.leave_round(3, 1);
    assert!((c.guard.typical(Cohort::Workers).unwrap() - 0.02).abs() < 1e-12);
}

#[test]
fn the_bootstrap_grows_until_honest_long_first_steps_pass_but_no_further() {
    // ‖x̃‖ = 2: the bootstrap bound starts at 10 × 5 % × 2 = 1.
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    assert!((c.progress_bound(Cohort::Workers) - 1.0).abs() < 1e-12);
    // Honest first exchanges that move 3.5 (a relay's, EAMSGD's at τ = 64):
    // refused twice (bound 1, then 2), accepted at bound 4, never a deadlock.
    let mut refusals = 0;
    while c.offer(moved(1, vec![1.0; 4], 3.5), 1).is_err() {
        refusals += 1;
        assert!(refusals < 10, "the bootstrap never let the run start");
    }
    assert_eq!(refusals, 2);
    // From then on the run's own figure sets the bound, and refusals no longer
    // move it.
    assert!((c.progress_bound(Cohort::Workers) - 35.0).abs() < 1e-9);
    for _ in 0..5 {
        assert!(c.offer(moved(1, vec![1.0; 4], 400.0), 1).is_err());
    }
    assert!((c.progress_bound(Cohort::Workers) - 35.0).abs() < 1e-9);
    // A run that never had a figure: however many refusals, the bootstrap stops
    // at 10 ‖x̃‖ (× the ratio), so a spammer cannot open it wide.
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    for _ in 0..200 {
        let err = c.offer(moved(1, vec![1.0; 4], 1e6), 1).unwrap_err();
        assert_eq!(err, Rejection::OutOfLine);
    }
    assert!((c.progress_bound(Cohort::Workers) - 200.0).abs() < 1e-9);
    assert_eq!(c.version(), 0);
}

#[test]
fn the_servers_measure_of_honest_progress_starts_the_bound() {
    // ‖x̃‖ = 2: the guess alone allows 1. The server measured honest progress
    // 3.5 at τ 1, η 0.1: the bound is 10 × 3.5, and the first exchange passes.
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    c.set_honest_progress(hyper(0.25), 3.5);
    assert!((c.progress_bound(Cohort::Workers) - 35.0).abs() < 1e-9);
    assert!(c.offer(moved(1, vec![1.0; 4], 3.5), 1).is_ok());
    // Not for relays (their exchange spans many of their workers'), and a
    // measure smaller than the guess does not tighten it.
    assert!((c.progress_bound(Cohort::Relays) - 1.0).abs() < 1e-12);
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    c.set_honest_progress(hyper(0.25), 0.01);
    assert!((c.progress_bound(Cohort::Workers) - 1.0).abs() < 1e-12);
    // A measure taken at other settings, or not a distance, is ignored.
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    let other = Hyper {
        tau: 64,
        ..hyper(0.25)
    };
    c.set_honest_progress(other, 3.5);
    c.set_honest_progress(hyper(0.25), f64::NAN);
    c.set_honest_progress(hyper(0.25), f64::INFINITY);
    assert!((c.progress_bound(Cohort::Workers) - 1.0).abs() < 1e-12);
}

#[test]
fn a_new_tau_or_lr_starts_the_guard_again_from_its_measure_and_alpha_does_not() {
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    let at = |tau, lr| Hyper {
        tau,
        lr,
        ..hyper(0.5)
    };
    c.set_honest_progress(hyper(0.25), 0.5);
    for _ in 0..HISTORY {
        c.offer(moved(1, vec![1.0; 4], 0.01), 1).unwrap();
    }
    assert!((c.progress_bound(Cohort::Workers) - 0.1).abs() < 1e-12);
    // α alone: the workers' figures still describe their progress.
    c.set_hyper(hyper(0.5));
    assert!((c.progress_bound(Cohort::Workers) - 0.1).abs() < 1e-12);
    // τ × 16: the old figures judge until the new τ's measure arrives…
    c.set_hyper(at(16, 0.1));
    assert!((c.progress_bound(Cohort::Workers) - 0.1).abs() < 1e-12);
    // …which replaces them, alone: late in a run the start's guess (‖x̃‖/20,
    // a bound of 1 here) is far looser than honest progress.
    c.set_honest_progress(at(16, 0.1), 0.02);
    assert!(c.guard.typical(Cohort::Workers).is_none());
    assert!((c.progress_bound(Cohort::Workers) - 0.2).abs() < 1e-12);
    // η too; until its measure, the last one holds.
    c.set_hyper(at(16, 0.05));
    assert!((c.progress_bound(Cohort::Workers) - 0.2).abs() < 1e-12);
    c.set_honest_progress(at(16, 0.05), 0.05);
    assert!((c.progress_bound(Cohort::Workers) - 0.5).abs() < 1e-12);
}

#[test]
fn exchanges_run_at_the_old_tau_are_judged_by_the_old_bound_and_teach_nothing() {
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    for _ in 0..HISTORY {
        c.offer(moved(1, vec![1.0; 4], 0.3), 1).unwrap();
    }
    // Figures of 0.3: the bound is 3. τ → 16 (measured 0.3, bound 3), then back
    // to τ 1 (measured 0.02, bound 0.2), while the worker's sync in flight ran
    // its 16 steps and moves 2.5.
    let tau = |tau| Hyper { tau, ..hyper(0.25) };
    c.set_hyper(tau(16));
    c.set_honest_progress(tau(16), 0.3);
    c.set_hyper(tau(1));
    c.set_honest_progress(tau(1), 0.02);
    let unsettled = |progress| Update {
        settled: false,
        ..moved(1, vec![1.0; 4], progress)
    };
    assert!(c.offer(unsettled(2.5), 1).is_ok());
    assert!(
        c.guard.typical(Cohort::Workers).is_none(),
        "it taught the guard"
    );
    // Past the old bound it is refused all the same; and once settled, the
    // same long step is out of line at τ 1.
    assert_eq!(
        c.offer(unsettled(3.5), 1).unwrap_err(),
        Rejection::OutOfLine
    );
    assert_eq!(
        c.offer(moved(1, vec![1.0; 4], 2.5), 1).unwrap_err(),
        Rejection::OutOfLine
    );
}

/// Honest progress near convergence: most exchanges barely move, a hard batch
/// now and then moves 15× as far. The guard must not take those for attacks
/// (judged against the median, every such worker was refused in turn), yet a
/// 10× jump over the largest honest figure still is.
#[test]
fn honest_heavy_tailed_progress_passes_and_a_jump_beyond_it_does_not() {
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    // Fresh from the center a worker moves farther, then settles.
    for round in 0..4 * HISTORY {
        let progress = match round {
            0..4 => 0.01,
            _ if round % 6 == 5 => 0.015,
            _ => 0.001,
        };
        c.offer(moved(1, vec![1.0; 4], progress), 1).unwrap();
    }
    assert_eq!(
        c.offer(moved(1, vec![1.0; 4], 0.2), 1).unwrap_err(),
        Rejection::OutOfLine
    );
}

/// Late in a run settled workers barely move, but a worker new to the run starts
/// from x̃, whose τ steps move as far as the server's measure from x̃ says: its
/// first exchanges are judged by that measure too, its later ones by the run's.
#[test]
fn a_new_workers_first_exchange_is_judged_by_the_measure_from_the_center() {
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    for _ in 0..HISTORY {
        c.offer(moved(1, vec![1.0; 4], 0.001), 1).unwrap();
    }
    c.set_honest_progress(hyper(0.25), 0.05);
    assert!(c.is_new(2));
    assert!((c.session_bound(2, Cohort::Workers) - 0.5).abs() < 1e-12);
    assert!((c.session_bound(1, Cohort::Workers) - 0.01).abs() < 1e-12);
    for _ in 0..SETTLING {
        assert!(c.is_new(2));
        c.offer(moved(2, vec![1.0; 4], 0.3), 2).unwrap();
    }
    assert!(!c.is_new(2));
    // Its own figure now counts: a 100× jump is out of line again.
    for _ in 0..HISTORY {
        c.offer(moved(2, vec![1.0; 4], 0.001), 2).unwrap();
    }
    assert_eq!(
        c.offer(moved(2, vec![1.0; 4], 0.1), 2).unwrap_err(),
        Rejection::OutOfLine
    );
}

#[test]
fn trusted_relays_are_judged_against_relays() {
    let mut c = guarded(Algorithm::Easgd, vec![1.0; 4]);
    for _ in 0..HISTORY {
        c.offer(moved(1, vec![1.0; 4], 0.01), 2).unwrap();
    }
    // A relay's exchange spans many worker exchanges: 50× a worker's progress.
    let relay = |progress| Update {
        cohort: Cohort::Relays,
        ..moved(2, vec![1.0; 4], progress)
    };
    assert!(c.offer(relay(0.5), 2).is_ok());
    assert!(c.offer(relay(0.6), 2).is_ok());
    // The same step from a worker is out of line.
    assert_eq!(
        c.offer(moved(3, vec![1.0; 4], 0.5), 3).unwrap_err(),
        Rejection::OutOfLine
    );
    // And relays do not move the workers' figure, nor workers the relays'.
    assert!((c.guard.typical(Cohort::Workers).unwrap() - 0.01).abs() < 1e-12);
    assert!((c.guard.typical(Cohort::Relays).unwrap() - 0.6).abs() < 1e-12);
}

#[test]
fn a_non_finite_progress_or_center_is_refused_and_nothing_changes() {
    let mut c = guarded(Algorithm::Downpour, vec![3e38, 1.0]);
    let before = c.params().to_vec();
    let err = c.offer(moved(1, vec![0.0, 1.0], f64::NAN), 1).unwrap_err();
    assert_eq!(err, Rejection::OutOfLine);
    // A finite push whose sum overflows f32: refused, never stored.
    let mut c = Center::new(
        Algorithm::Downpour,
        vec![3e38, 1.0],
        Vec::new(),
        0,
        hyper(0.0),
        0.9,
        8,
        1e30,
    );
    let err = c.offer(moved(1, vec![3e38, 0.0], 1.0), 1).unwrap_err();
    assert_eq!(err, Rejection::CenterNonFinite);
    assert_eq!((c.params(), c.version()), (&before[..], 0));
    // A push of 3e38 everywhere from a center of ordinary size: out of line,
    // however large the ratio (the norm is finite in f64, so is the bound).
    let mut c = guarded(Algorithm::Downpour, vec![0.5; 4]);
    let err = c.offer(moved(1, vec![3e38; 4], 6e38), 1).unwrap_err();
    assert_eq!(err, Rejection::OutOfLine);
}

#[test]
fn downpour_adds_the_push_and_replies_with_the_center() {
    let mut c = center(Algorithm::Downpour, vec![1.0, 2.0]);
    let r = ready(c.offer(update(1, vec![0.5, -0.5]), 1).unwrap());
    assert_eq!(
        (r.apply, r.payload.as_slice()),
        (Apply::Replace, &[1.5, 1.5][..])
    );
}

#[test]
fn lsgd_keeps_the_lowest_loss_parameters() {
    let mut c = center(Algorithm::Lsgd, vec![0.0, 0.0]);
    let mut a = update(1, vec![1.0, 1.0]);
    a.loss = 2.0;
    let r = ready(c.offer(a, 2).unwrap());
    assert_eq!(
        (r.apply, r.payload.as_slice()),
        (Apply::PullToward, &[1.0, 1.0][..])
    );
    let mut b = update(2, vec![-1.0, 0.5]);
    b.loss = 3.0; // worse: not the leader
    let r = ready(c.offer(b, 2).unwrap());
    assert_eq!(r.payload, [1.0, 1.0]);
    assert_eq!(c.leader(), Some((1, 2.0)));
}

#[test]
fn a_sync_round_waits_for_every_member_then_matches_sync_round() {
    let mut c = center(Algorithm::EasgdSync, vec![0.0, 10.0]);
    let Outcome::Queued {
        reply: mut r2,
        arm_timer,
    } = c.offer(update(2, vec![4.0, 6.0]), 2).unwrap()
    else {
        panic!()
    };
    assert_eq!(arm_timer, Some(0));
    assert!(r2.try_recv().is_err(), "round still open");
    let Outcome::Queued {
        reply: r1,
        arm_timer,
    } = c.offer(update(1, vec![2.0, 10.0]), 2).unwrap()
    else {
        panic!()
    };
    assert_eq!(arm_timer, None);
    // Same numbers as shared's hand-computed sync_round test.
    assert_eq!(c.params(), [1.5, 9.0]);
    assert_eq!(r1.blocking_recv().unwrap().unwrap().payload, [1.5, 10.0]);
    assert_eq!(r2.blocking_recv().unwrap().unwrap().payload, [3.0, 7.0]);
    assert_eq!(c.version(), 1);
}

#[test]
fn a_timed_out_round_goes_on_without_the_laggard() {
    let mut c = center(Algorithm::Average, vec![0.0]);
    let Outcome::Queued { reply, arm_timer } = c.offer(update(1, vec![1.0]), 3).unwrap() else {
        panic!()
    };
    assert_eq!(
        c.round_timed_out(arm_timer.unwrap() + 1),
        0,
        "another round's timer"
    );
    assert_eq!(c.round_timed_out(arm_timer.unwrap()), 1);
    // One member: α = 1/1, the center becomes the worker's parameters.
    assert_eq!(c.params(), [1.0]);
    assert_eq!(reply.blocking_recv().unwrap().unwrap().version, 1);
}

#[test]
fn diloco_applies_the_outer_step_to_the_mean_delta() {
    let mut c = Center::new(
        Algorithm::Diloco,
        vec![0.0],
        Vec::new(),
        0,
        hyper(0.0),
        0.9,
        8,
        1e9,
    );
    let _a = c.offer(update(1, vec![0.5]), 2).unwrap();
    let _b = c.offer(update(2, vec![1.5]), 2).unwrap();
    // Mean delta 1 → the hand-computed first DiLoCo step, 1.33.
    assert!((c.params()[0] - 1.33).abs() < 1e-6, "{:?}", c.params());
}

fn held(session: u64, values: Vec<f32>) -> Update {
    Update {
        held: true,
        ..update(session, values)
    }
}

#[test]
fn a_held_update_is_answered_but_leaves_the_center_alone() {
    for algorithm in [
        Algorithm::Easgd,
        Algorithm::Downpour,
        Algorithm::Mdownpour,
        Algorithm::Lsgd,
    ] {
        let mut c = center(algorithm, vec![1.0, 2.0]);
        let mut twin = center(algorithm, vec![1.0, 2.0]);
        let r = ready(c.offer(held(1, vec![3.0, -2.0]), 1).unwrap());
        assert_eq!(c.params(), [1.0, 2.0], "{algorithm:?}");
        assert_eq!(c.version(), 0, "{algorithm:?}");
        let plain = ready(twin.offer(update(1, vec![3.0, -2.0]), 1).unwrap());
        if algorithm == Algorithm::Easgd {
            // The same elastic difference as if it had been applied.
            assert_eq!(r.payload, plain.payload);
        } else {
            // The worker is sent back to the unchanged center.
            assert_eq!(r.payload, [1.0, 2.0], "{algorithm:?}");
        }
    }
    // A held LSGD update does not make its sender the leader.
    let mut c = center(Algorithm::Lsgd, vec![1.0, 2.0]);
    c.offer(held(1, vec![3.0, -2.0]), 1).unwrap();
    assert_eq!(c.leader(), None);
}

#[test]
fn a_held_round_member_is_answered_but_not_averaged_in() {
    let mut c = center(Algorithm::Average, vec![0.0]);
    let Outcome::Queued { reply: a, .. } = c.offer(update(1, vec![2.0]), 2).unwrap() else {
        panic!("queued");
    };
    let Outcome::Queued { reply: b, .. } = c.offer(held(2, vec![100.0]), 2).unwrap() else {
        panic!("queued");
    };
    // Only the counted member: α = 1/1, the center becomes its parameters.
    assert_eq!(c.params(), [2.0]);
    assert_eq!(a.blocking_recv().unwrap().unwrap().payload, [0.0]);
    // The held member is pulled toward the old center by the same α.
    assert_eq!(b.blocking_recv().unwrap().unwrap().payload, [0.0]);
    // A round of held members only leaves the center and its version alone.
    let mut c = center(Algorithm::EasgdSync, vec![1.0]);
    let Outcome::Queued { reply, .. } = c.offer(held(1, vec![3.0]), 1).unwrap() else {
        panic!("queued");
    };
    assert_eq!((c.params(), c.version()), (&[1.0][..], 0));
    assert_eq!(reply.blocking_recv().unwrap().unwrap().payload, [2.5]);
}
