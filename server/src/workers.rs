//! The registry of connected workers: who they are, which shard they train, and the
//! figures the status page and the metrics show for each.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tether_shared::protocol::{Hello, Shard, WorkerKind};

use crate::state::{MAX_NAME_CHARS, clip};

/// One connected worker.
#[derive(Clone, Debug)]
pub struct Worker {
    /// Short id, unique for the server's lifetime.
    pub id: u32,
    /// The connection's session.
    pub session: u64,
    /// Native or browser.
    pub kind: WorkerKind,
    /// "cpu", "wgpu", "webgpu".
    pub backend: String,
    /// The device in words.
    pub device: String,
    /// The group it joined with (a browser tab's workers share one), if any.
    pub group: Option<String>,
    /// Its data shard.
    pub shard: Shard,
    /// A relay's own page for browsers (validated), if it gave one.
    pub url: Option<String>,
    /// Workers it serves (a relay's, from its last sync; 0 for a worker).
    pub members: u32,
    /// When it joined (Unix seconds).
    pub joined_unix: f64,
    /// When it last sent anything.
    pub last_seen: Instant,
    /// Accepted syncs.
    pub syncs: u64,
    /// Rejected frames.
    pub rejects: u64,
    /// Syncs the loss screen held (answered, but x̃ did not move).
    pub held: u64,
    /// Training images it reported.
    pub samples: u64,
    /// Training images in its last sync (τ × batch: shows a runtime τ change arrived).
    pub last_samples: u64,
    /// Its last reported training speed.
    pub samples_per_s: f64,
    /// Its last reported mean loss.
    pub loss: f64,
    /// Center versions between its last two looks.
    pub staleness: u64,
    /// ‖xⁱ − x̃‖ at its last sync (‖push‖ for DOWNPOUR).
    pub distance: f64,
    /// Seconds it waited for its previous sync's reply.
    pub wait_s: f64,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
}

/// A worker as `/api/status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    /// Short id.
    pub id: u32,
    /// "native" or "browser".
    pub kind: WorkerKind,
    /// Compute backend.
    pub backend: String,
    /// Device in words.
    pub device: String,
    /// The group it joined with (a browser tab's workers share one).
    pub group: Option<String>,
    /// Shard index / count.
    pub shard: String,
    /// A relay's own page for browsers.
    pub url: Option<String>,
    /// Workers it serves (a relay's; 0 for a worker).
    pub members: u32,
    /// Accepted syncs.
    pub syncs: u64,
    /// Rejected frames.
    pub rejects: u64,
    /// Syncs the loss screen held.
    pub held: u64,
    /// Training images reported.
    pub samples: u64,
    /// Training images in its last sync.
    pub last_samples: u64,
    /// Last reported images per second.
    pub samples_per_s: f64,
    /// Last reported mean training loss.
    pub loss: f64,
    /// Seconds since it last sent anything.
    pub last_seen_s: f64,
    /// Center versions it was behind at its last sync.
    pub staleness: u64,
    /// ‖xⁱ − x̃‖ at its last sync.
    pub distance: f64,
    /// Seconds it waited for its previous sync.
    pub wait_s: f64,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Seconds since it joined.
    pub connected_s: f64,
}

/// All connected workers, by session.
#[derive(Debug, Default)]
pub struct Workers {
    next_id: u32,
    by_session: BTreeMap<u64, Worker>,
}

impl Workers {
    /// Connected workers.
    pub fn len(&self) -> usize {
        self.by_session.len()
    }

    /// Whether no worker is connected.
    pub fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }

    /// Registers a worker and gives it the lowest shard of `plan` no connected
    /// worker trains (or, when all are taken, shares one round-robin). A relay's
    /// page is kept only if it is a `trusted` relay (it presented the relay token).
    pub fn join(&mut self, session: u64, hello: &Hello, plan: ShardPlan, trusted: bool) -> &Worker {
        let id = self.next_id;
        self.next_id += 1;
        let taken: Vec<u32> = self.by_session.values().map(|w| w.shard.index).collect();
        let shards = plan.count.max(1);
        let j = (0..shards)
            .find(|&j| !taken.contains(&plan.shard(j).index))
            .unwrap_or(id % shards);
        let url = match hello.kind {
            WorkerKind::Relay if trusted => hello.url.as_deref().and_then(relay_url),
            _ => None,
        };
        let worker = Worker {
            id,
            session,
            kind: hello.kind,
            backend: clip(&hello.backend, MAX_NAME_CHARS),
            device: clip(&hello.device, MAX_NAME_CHARS),
            group: hello.group.as_deref().map(|g| clip(g, MAX_NAME_CHARS)),
            shard: plan.shard(j),
            url,
            members: 0,
            joined_unix: unix_now(),
            last_seen: Instant::now(),
            syncs: 0,
            rejects: 0,
            held: 0,
            samples: 0,
            last_samples: 0,
            samples_per_s: 0.0,
            loss: f64::NAN,
            staleness: 0,
            distance: 0.0,
            wait_s: 0.0,
            bytes_in: 0,
            bytes_out: 0,
        };
        self.by_session.entry(session).or_insert(worker)
    }

    /// Removes a worker; returns it if it was there.
    pub fn leave(&mut self, session: u64) -> Option<Worker> {
        self.by_session.remove(&session)
    }

    /// The worker with this session.
    pub fn get_mut(&mut self, session: u64) -> Option<&mut Worker> {
        self.by_session.get_mut(&session)
    }

    /// Every worker as the status page shows it, by id.
    pub fn status(&self) -> Vec<WorkerStatus> {
        let now = Instant::now();
        let unix = unix_now();
        let mut out: Vec<WorkerStatus> = self
            .by_session
            .values()
            .map(|w| WorkerStatus {
                id: w.id,
                kind: w.kind,
                backend: w.backend.clone(),
                device: w.device.clone(),
                group: w.group.clone(),
                shard: format!("{}/{}", w.shard.index, w.shard.count),
                url: w.url.clone(),
                members: w.members,
                syncs: w.syncs,
                rejects: w.rejects,
                held: w.held,
                samples: w.samples,
                last_samples: w.last_samples,
                samples_per_s: w.samples_per_s,
                loss: w.loss,
                last_seen_s: now.duration_since(w.last_seen).as_secs_f64(),
                staleness: w.staleness,
                distance: w.distance,
                wait_s: w.wait_s,
                bytes_in: w.bytes_in,
                bytes_out: w.bytes_out,
                connected_s: unix - w.joined_unix,
            })
            .collect();
        out.sort_by_key(|w| w.id);
        out
    }
}

impl Workers {
    /// The page of a trusted relay to send the `turn`-th joining browser to: among
    /// the relays with the fewest workers below them, round-robin by `turn`.
    pub fn relay_for_volunteer(&self, turn: u64) -> Option<String> {
        let pages: Vec<&Worker> = self
            .by_session
            .values()
            .filter(|w| w.url.is_some())
            .collect();
        let least = pages.iter().map(|w| w.members).min()?;
        let mut least: Vec<&&Worker> = pages.iter().filter(|w| w.members == least).collect();
        least.sort_by_key(|w| w.id);
        least[(turn % least.len() as u64) as usize].url.clone()
    }
}

/// How a server cuts the training set for its workers: `count` shards, each the
/// part of a seeded permutation ([`tether_shared::data::shard_indices`]). A relay
/// cuts only its own shard of its upstream's cut (`within`): its j-th worker gets
/// part `index·count + j` of `within.count·count`, which is exactly the j-th of
/// `count` equal slices of the relay's part, since parts are contiguous ranges of
/// the same permutation. So a tree of relays never trains one image on two shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    /// Shards this server hands out.
    pub count: u32,
    /// The permutation's seed.
    pub seed: u64,
    /// This server's own shard of its upstream's cut (relays only).
    pub within: Option<Shard>,
}

impl ShardPlan {
    /// The j-th shard of this server's workers.
    pub fn shard(&self, j: u32) -> Shard {
        match self.within {
            None => Shard {
                index: j,
                count: self.count,
                seed: self.seed,
            },
            Some(up) => Shard {
                index: up.index * self.count + j,
                count: up.count * self.count,
                seed: up.seed,
            },
        }
    }
}

/// A relay's URL as kept: `http://` or `https://` and a host, at most 200
/// printable ASCII characters without spaces, quotes or angle brackets; else none.
fn relay_url(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let clean = url.len() <= 200
        && !rest.is_empty()
        && !rest.starts_with('/')
        && url
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"'<>`\\".contains(&b));
    clean.then(|| url.trim_end_matches('/').to_string())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_shared::data::shard_indices;
    use tether_shared::protocol::PROTOCOL_VERSION;

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            kind: WorkerKind::Native,
            backend: "cpu".into(),
            device: "test".into(),
            threads: 1,
            token: None,
            previous_run: None,
            encodings: vec![],
            needs_shard: false,
            group: None,
            url: None,
        }
    }

    fn plan(count: u32) -> ShardPlan {
        ShardPlan {
            count,
            seed: 0,
            within: None,
        }
    }

    #[test]
    fn shards_go_to_the_lowest_free_index_and_are_reused() {
        let mut w = Workers::default();
        let a = w.join(10, &hello(), plan(2), false).shard.index;
        let b = w.join(11, &hello(), plan(2), false).shard.index;
        assert_eq!((a, b), (0, 1));
        w.leave(10);
        assert_eq!(w.join(12, &hello(), plan(2), false).shard.index, 0);
        let d = w.join(13, &hello(), plan(2), false);
        assert!(d.shard.index < 2);
        assert_eq!(w.len(), 3);
        assert_eq!(
            w.status().iter().map(|s| s.id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn a_group_name_is_kept_and_clipped() {
        let mut w = Workers::default();
        let tab = Hello {
            group: Some("tab 1a2b3c4d".into()),
            ..hello()
        };
        let huge = Hello {
            group: Some("x".repeat(10_000)),
            ..hello()
        };
        w.join(1, &tab, plan(4), false);
        w.join(2, &huge, plan(4), false);
        w.join(3, &hello(), plan(4), false);
        let groups: Vec<Option<String>> = w.status().into_iter().map(|s| s.group).collect();
        assert_eq!(groups[0].as_deref(), Some("tab 1a2b3c4d"));
        assert_eq!(
            groups[1].as_ref().map(|g| g.chars().count()),
            Some(MAX_NAME_CHARS + 1)
        );
        assert_eq!(groups[2], None);
    }

    #[test]
    fn a_relays_shards_split_its_own_shard_exactly() {
        let within = Shard {
            index: 1,
            count: 3,
            seed: 9,
        };
        let plan = ShardPlan {
            count: 4,
            seed: 0,
            within: Some(within),
        };
        let n = 1003;
        let mut parts: Vec<usize> = (0..4)
            .flat_map(|j| {
                let s = plan.shard(j);
                shard_indices(n, s.count as usize, s.index as usize, s.seed)
            })
            .collect();
        parts.sort_unstable();
        assert_eq!(parts, shard_indices(n, 3, 1, 9));
        let mut w = Workers::default();
        let shards: Vec<u32> = (0..5)
            .map(|i| w.join(i, &hello(), plan, false).shard.index)
            .collect();
        assert_eq!(&shards[..4], [4, 5, 6, 7]);
        assert!((4..8).contains(&shards[4]));
    }

    #[test]
    fn only_a_trusted_relay_keeps_a_url_and_only_a_clean_one() {
        let mut w = Workers::default();
        let relay = |url: &str| Hello {
            kind: WorkerKind::Relay,
            url: Some(url.into()),
            ..hello()
        };
        w.join(1, &relay("https://relay-1.example:8443/"), plan(4), true);
        w.join(2, &relay("javascript:alert(1)"), plan(4), true);
        w.join(3, &relay("https://x.example/\"<script>"), plan(4), true);
        let worker = Hello {
            url: Some("https://w.example".into()),
            ..hello()
        };
        w.join(4, &worker, plan(4), true);
        w.join(
            5,
            &relay(&format!("https://{}", "a".repeat(300))),
            plan(4),
            true,
        );
        // A relay that did not present the relay token: its page is not trusted.
        w.join(6, &relay("https://untrusted.example"), plan(4), false);
        let urls: Vec<Option<String>> = w.status().into_iter().map(|s| s.url).collect();
        let mut want = vec![None; 6];
        want[0] = Some("https://relay-1.example:8443".to_string());
        assert_eq!(urls, want);
    }

    #[test]
    fn volunteers_go_to_the_least_loaded_relays_in_turn() {
        let mut w = Workers::default();
        let relay = |url: &str| Hello {
            kind: WorkerKind::Relay,
            url: Some(url.into()),
            ..hello()
        };
        assert_eq!(w.relay_for_volunteer(0), None);
        w.join(1, &relay("https://a.example"), plan(3), true);
        w.join(2, &relay("https://b.example"), plan(3), true);
        w.join(3, &relay("https://c.example"), plan(3), true);
        w.get_mut(1).unwrap().members = 5;
        let sent: Vec<String> = (0..4).filter_map(|t| w.relay_for_volunteer(t)).collect();
        assert_eq!(
            sent,
            [
                "https://b.example",
                "https://c.example",
                "https://b.example",
                "https://c.example"
            ]
        );
    }
}
