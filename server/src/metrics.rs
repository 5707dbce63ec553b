//! Run-wide counters, the sync latency histogram and the tree of relays below this
//! server, rendered in the Prometheus text format at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_shared::protocol::WorkerKind;

use crate::state::subtree_workers;
use crate::workers::WorkerStatus;

/// Upper bounds (seconds) of the sync latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters shared by every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Accepted syncs.
    pub syncs: AtomicU64,
    /// Accepted syncs the loss screen held (x̃ did not move).
    pub held: AtomicU64,
    /// Bytes received on worker sockets.
    pub bytes_in: AtomicU64,
    /// Bytes sent on worker sockets.
    pub bytes_out: AtomicU64,
    /// Training images workers reported.
    pub samples: AtomicU64,
    /// Workers that ever joined.
    pub joins: AtomicU64,
    /// TCP connections open now (every kind).
    pub open_connections: AtomicU64,
    /// TCP connections closed at once for passing a connection cap.
    pub refused_connections: AtomicU64,
    rejects: Mutex<BTreeMap<&'static str, u64>>,
    latency: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// Counts a rejection under its reason code.
    pub fn reject(&self, code: &'static str) {
        *self
            .rejects
            .lock()
            .expect("metrics lock")
            .entry(code)
            .or_default() += 1;
    }

    /// Rejections by reason code.
    pub fn rejects(&self) -> BTreeMap<&'static str, u64> {
        self.rejects.lock().expect("metrics lock").clone()
    }

    /// Records how long the server took from a sync's arrival to its reply.
    pub fn observe_latency(&self, seconds: f64) {
        let mut h = self.latency.lock().expect("metrics lock");
        for (i, &bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Mean sync latency so far, seconds.
    pub fn mean_latency(&self) -> f64 {
        let h = self.latency.lock().expect("metrics lock");
        if h.count == 0 {
            0.0
        } else {
            h.sum / h.count as f64
        }
    }

    /// The Prometheus exposition of these counters plus the gauges passed in.
    pub fn render(&self, workers: usize, center_version: u64, accuracy: Option<f64>) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        metric(
            "tether_workers_connected",
            "gauge",
            "Workers connected now.",
            workers.to_string(),
        );
        metric(
            "tether_worker_joins_total",
            "counter",
            "Workers that joined.",
            load(&self.joins),
        );
        metric(
            "tether_connections_open",
            "gauge",
            "TCP connections open now (pages, feeds, workers, requests).",
            load(&self.open_connections),
        );
        metric(
            "tether_connections_refused_total",
            "counter",
            "TCP connections closed at once for passing a connection cap.",
            load(&self.refused_connections),
        );
        metric(
            "tether_syncs_total",
            "counter",
            "Accepted synchronisations.",
            load(&self.syncs),
        );
        metric(
            "tether_held_total",
            "counter",
            "Synchronisations the loss screen held: answered, but the center did not move.",
            load(&self.held),
        );
        metric(
            "tether_bytes_in_total",
            "counter",
            "Bytes received from workers.",
            load(&self.bytes_in),
        );
        metric(
            "tether_bytes_out_total",
            "counter",
            "Bytes sent to workers.",
            load(&self.bytes_out),
        );
        metric(
            "tether_samples_total",
            "counter",
            "Training images workers reported.",
            load(&self.samples),
        );
        metric(
            "tether_center_version",
            "gauge",
            "Changes applied to the center.",
            center_version.to_string(),
        );
        if let Some(a) = accuracy {
            metric(
                "tether_center_accuracy",
                "gauge",
                "Test accuracy of the center at the last evaluation.",
                a.to_string(),
            );
        }
        let _ = writeln!(
            out,
            "# HELP tether_rejects_total Frames refused, by reason.\n# TYPE tether_rejects_total counter"
        );
        for (code, n) in self.rejects() {
            let _ = writeln!(out, "tether_rejects_total{{reason=\"{code}\"}} {n}");
        }
        let h = self.latency.lock().expect("metrics lock");
        let _ = writeln!(
            out,
            "# HELP tether_sync_seconds Time from a sync's arrival to its reply (rounds include the barrier wait).\n# TYPE tether_sync_seconds histogram"
        );
        for (bound, n) in LATENCY_BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "tether_sync_seconds_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "tether_sync_seconds_bucket{{le=\"+Inf\"}} {}\ntether_sync_seconds_sum {}\ntether_sync_seconds_count {}",
            h.count, h.sum, h.count
        );
        out
    }
}

/// The tree below this server: its training workers in all, and one series per
/// relay, labelled `relay="<worker id>"` (and `url` when the relay gave one; it was
/// validated to printable ASCII without quotes or backslashes when it joined).
pub fn render_tree(out: &mut String, workers: &[WorkerStatus]) {
    let _ = writeln!(
        out,
        "# HELP tether_subtree_workers Training workers below this server (its own, and each relay's).\n# TYPE tether_subtree_workers gauge\ntether_subtree_workers {}",
        subtree_workers(workers)
    );
    let relays: Vec<&WorkerStatus> = workers
        .iter()
        .filter(|w| w.kind == WorkerKind::Relay)
        .collect();
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&WorkerStatus) -> f64,
    );
    let series: [Series; 5] = [
        (
            "tether_relay_workers",
            "gauge",
            "Training workers below a relay.",
            |w| f64::from(w.members),
        ),
        (
            "tether_relay_samples_per_second",
            "gauge",
            "A relay's subtree's training speed at its last exchange.",
            |w| w.samples_per_s,
        ),
        (
            "tether_relay_distance",
            "gauge",
            "Distance between a relay's center and this server's at its last exchange.",
            |w| w.distance,
        ),
        (
            "tether_relay_syncs_total",
            "counter",
            "Exchanges a relay made with this server.",
            |w| w.syncs as f64,
        ),
        (
            "tether_relay_samples_total",
            "counter",
            "Training images a relay's subtree reported.",
            |w| w.samples as f64,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for w in &relays {
            let url = w
                .url
                .as_deref()
                .map_or(String::new(), |u| format!(",url=\"{u}\""));
            let _ = writeln!(out, "{name}{{relay=\"{}\"{url}}} {}", w.id, value(w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_rejects_are_labelled() {
        let m = Metrics::default();
        m.observe_latency(0.0007);
        m.observe_latency(0.3);
        m.reject("non_finite");
        m.reject("non_finite");
        let text = m.render(2, 7, Some(0.5));
        assert!(
            text.contains("tether_sync_seconds_bucket{le=\"0.0005\"} 0"),
            "{text}"
        );
        assert!(text.contains("tether_sync_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("tether_sync_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("tether_sync_seconds_count 2"));
        assert!(text.contains("tether_rejects_total{reason=\"non_finite\"} 2"));
        assert!(text.contains("tether_workers_connected 2"));
        assert!(text.contains("tether_center_accuracy 0.5"));
    }
}
