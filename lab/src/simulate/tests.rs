//! Tests of `simulate.rs`.
use super::*;

/// The shipped Fashion-MNIST, cut small: 4096 training and 500 test images.
fn data() -> (Arc<ImageSet>, ImageSet) {
    let (_, data) = tether_dataset::load(None).expect("the shipped data");
    let train = data.train.subset(&(0..4096).collect::<Vec<_>>());
    let test = data.test.subset(&(0..500).collect::<Vec<_>>());
    (Arc::new(train), test)
}

fn experiment(algorithm: Algorithm, p: u32, tau: u32, speeds: Vec<f64>) -> Experiment {
    let mut settings = RunSettings::defaults(algorithm);
    settings.expected_workers = p;
    settings.tau = tau;
    settings.batch = 32;
    if has_elastic_force(algorithm) {
        settings.alpha = 0.9 / p as f32;
    }
    Experiment {
        settings,
        budget_samples: 3072,
        evaluations: 4,
        timing: Timing {
            step_s: 1.0,
            speeds,
            exchange_s: 0.5,
        },
        norm_guard: None,
        sequential: false,
    }
}

#[test]
fn a_sequential_baseline_trains_one_worker_alone_and_takes_only_its_steps() {
    let (train, test) = data();
    let mut e = experiment(Algorithm::Eamsgd, 1, 4, Vec::new());
    e.sequential = true;
    let r = run(&e, &train, &test, |_| {}).unwrap();
    assert_eq!((r.exchanges, r.rejected), (0, 0));
    // 3072 images = 96 steps of batch 32 at 1 s each, no exchange time.
    let last = r.points[r.points.len() - 1];
    assert_eq!((last.samples, last.time_s), (3072, 96.0));
    assert!(last.error < r.points[0].error - 0.3, "{:?}", r.points);
    // It is one worker.
    let mut two = experiment(Algorithm::Eamsgd, 2, 4, Vec::new());
    two.sequential = true;
    assert!(matches!(
        run(&two, &train, &test, |_| {}),
        Err(SimError::Settings(_))
    ));
}

#[test]
fn the_same_experiment_gives_the_same_points_and_the_center_learns() {
    let (train, test) = data();
    let e = experiment(Algorithm::Eamsgd, 2, 4, vec![1.0, 0.7]);
    let mut heard = 0;
    let a = run(&e, &train, &test, |s| heard = s).unwrap();
    let b = run(&e, &train, &test, |_| {}).unwrap();
    assert_eq!(a, b, "deterministic");
    assert_eq!(heard, 3072, "progress heard the last count");
    assert_eq!(a.points.len(), 5, "{:?}", a.points);
    let (first, last) = (a.points[0], a.points[a.points.len() - 1]);
    assert!(last.error < first.error - 0.3, "{first:?} → {last:?}");
    assert_eq!(a.rejected, 0);
    // Another seed is another run.
    let mut other = e.clone();
    other.settings.seed = 1;
    assert_ne!(run(&other, &train, &test, |_| {}).unwrap().points, a.points);
}

#[test]
fn an_asynchronous_straggler_exchanges_in_proportion_to_its_speed() {
    let (train, test) = data();
    // Worker 1 at a quarter speed, no exchange cost: 4 of worker 0's exchanges
    // per one of its own, and the center's clock never runs backwards.
    let mut e = experiment(Algorithm::Easgd, 2, 2, vec![1.0, 0.25]);
    e.timing.exchange_s = 0.0;
    e.evaluations = 48;
    let r = run(&e, &train, &test, |_| {}).unwrap();
    assert_eq!(r.per_worker.iter().sum::<u64>(), r.exchanges);
    assert_eq!(
        r.exchanges,
        3072 / 64,
        "τ 2 × batch 32 = 64 images an exchange"
    );
    let [fast, slow] = [r.per_worker[0], r.per_worker[1]];
    assert!((4 * slow).abs_diff(fast) <= 4, "{fast} vs {slow}");
    assert!(
        r.points.windows(2).all(|w| w[0].time_s <= w[1].time_s),
        "{:?}",
        r.points
    );
    // The last exchange comes at worker 0's clock: 2 steps of 1 s each time.
    assert_eq!(r.points.last().unwrap().time_s, 2.0 * fast as f64);
}

#[test]
fn a_synchronous_round_closes_when_its_slowest_member_arrives() {
    let (train, test) = data();
    // τ 2 at speeds 1 and 0.25: the slow member needs 8 s, then the exchange
    // 0.5 s; so rounds close at 8, 16.5, 25, …
    let mut e = experiment(Algorithm::Average, 2, 2, vec![1.0, 0.25]);
    e.evaluations = 24; // one per round
    let r = run(&e, &train, &test, |_| {}).unwrap();
    let times: Vec<f64> = r.points.iter().skip(1).map(|p| p.time_s).collect();
    assert_eq!(times[..3], [8.0, 16.5, 25.0], "{times:?}");
    assert_eq!(
        r.per_worker[0], r.per_worker[1],
        "every member in every round"
    );
}
