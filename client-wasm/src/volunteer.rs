//! The browser worker's protocol state, free of any browser API so it is tested
//! natively: builds the hello, sync, heartbeat and leave frames, reads the
//! server's frames, and drives a [`LocalWorker`] — the same code and frames a
//! native worker uses. The JavaScript side only moves bytes (socket, fetch).

use std::sync::Arc;

use burn::tensor::Device;
use serde::Serialize;
use tether_shared::codec::{Encoding, Link, LinkError};
use tether_shared::data::blocks::{BlockPlan, BlockedShard};
use tether_shared::data::{ImageSet, Images, ImagesHead, decode_images};
use tether_shared::local::{LocalWorker, Pending, ShardData, Trained};
use tether_shared::protocol::{
    self, Hello, Hyper, Message, PROTOCOL_VERSION, Remedy, RunSpec, StopReason, Sync, Welcome,
    WorkerKind,
};
use thiserror::Error;

/// Why the browser worker cannot go on.
#[derive(Debug, Error)]
pub enum VolunteerError {
    /// The server sent bytes that are not a frame.
    #[error("undecodable frame from the server: {0}")]
    Frame(#[from] protocol::DecodeError),
    /// The downloaded shard is damaged.
    #[error("bad shard download: {0}")]
    Shard(#[from] tether_shared::data::DataError),
    /// The session could not start or a reply could not be applied.
    #[error(transparent)]
    Local(#[from] tether_shared::local::LocalError),
    /// A reply that does not fit the session (encoding, length).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A call out of order (training before the welcome, ...).
    #[error("{0}")]
    State(&'static str),
}

/// What a server frame meant, for the page (serialised to JSON).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Joined: fetch the shard, then call [`Volunteer::start`].
    Welcome {
        /// The run's id.
        run_id: String,
        /// The id the dashboard shows.
        worker_id: u32,
        /// The session (decimal string): the shard download names it.
        session: String,
        /// The payload encoding of the session.
        encoding: String,
        /// The algorithm's name.
        algorithm: String,
        /// The model's name.
        model: String,
        /// Shard index.
        shard_index: u32,
        /// Shard count.
        shard_count: u32,
        /// Shard permutation seed (decimal string: JSON numbers lose u64 precision).
        shard_seed: String,
        /// τ now.
        tau: u32,
    },
    /// A sync was answered and applied.
    Synced {
        /// The center's version now.
        center_version: u64,
        /// τ, α, η now (they change at runtime).
        tau: u32,
        /// α now.
        alpha: f32,
        /// η now.
        lr: f64,
    },
    /// The server refused something.
    Rejected {
        /// Stable code.
        code: String,
        /// In words.
        reason: String,
        /// What to do.
        remedy: Remedy,
    },
    /// The server tells the worker to stop (`finished`) or that it is going down.
    Stop {
        /// Whether the run is over (else: reconnect later).
        finished: bool,
    },
    /// A frame that needs no action (e.g. a heartbeat).
    Ignored,
}

/// Figures of the last τ steps, for the sync header and the page.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Progress {
    /// Local steps in all.
    pub steps: u64,
    /// Images in all.
    pub samples: u64,
    /// Accepted syncs.
    pub syncs: u64,
    /// Mean loss of the last τ steps.
    pub loss: f32,
    /// Images per second of training time over the last τ steps.
    pub samples_per_s: f64,
    /// Blocks of the shard read so far (a shard larger than the tab's budget).
    pub blocks_read: u64,
}

/// A block of the shard to read: its bytes `start..end` of the download.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct BlockRead {
    /// Which block ([`Volunteer::supply`] takes it back).
    pub block: usize,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

struct Joined {
    welcome: Welcome,
    seq: u64,
    seen: u64,
    hyper: Hyper,
}

/// One browser worker: the device, the local model and the session state.
pub struct Volunteer {
    worker: LocalWorker,
    /// "webgpu" or "cpu".
    pub backend: String,
    /// The device in words.
    pub device: String,
    /// Sent in the hello: the tab's workers share it (see `Hello::group`).
    pub group: Option<String>,
    joined: Option<Joined>,
    center: Vec<f32>,
    link: Link,
    started: bool,
    /// The shard when it is read a block at a time.
    blocked: Option<Arc<BlockedShard>>,
    pending: Pending,
    last_wait_s: f32,
    /// Totals so far.
    pub progress: Progress,
}

impl Volunteer {
    /// A worker on `device`, described as `backend` and `description`.
    pub fn new(device: Device, backend: &str, description: &str) -> Self {
        Self {
            worker: LocalWorker::new(device),
            backend: backend.into(),
            device: description.into(),
            group: None,
            joined: None,
            center: Vec::new(),
            link: Link::new(Encoding::F32, &[]),
            started: false,
            blocked: None,
            pending: Pending::default(),
            last_wait_s: 0.0,
            progress: Progress::default(),
        }
    }

    /// The first frame: a browser hello carrying the join ticket.
    pub fn hello(&mut self, ticket: &str) -> Vec<u8> {
        self.joined = None;
        self.started = false;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            kind: WorkerKind::Browser,
            backend: self.backend.clone(),
            device: self.device.clone(),
            threads: 1,
            token: Some(ticket.into()),
            previous_run: None,
            encodings: Encoding::ALL.to_vec(),
            needs_shard: false,
            group: self.group.clone(),
            url: None,
        };
        protocol::encode(&Message::Hello(hello), &[])
    }

    /// Reads one frame from the server; applies replies to xⁱ.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Event, VolunteerError> {
        let frame = protocol::decode(bytes)?;
        Ok(match frame.message {
            Message::Welcome(welcome) => {
                let welcome_encoding = welcome.encoding;
                let event = Event::Welcome {
                    run_id: welcome.run.run_id.clone(),
                    worker_id: welcome.worker_id,
                    session: welcome.session.to_string(),
                    encoding: welcome.encoding.name().into(),
                    algorithm: welcome.run.algorithm.name().into(),
                    model: welcome.run.model.name().into(),
                    shard_index: welcome.shard.index,
                    shard_count: welcome.shard.count,
                    shard_seed: welcome.shard.seed.to_string(),
                    tau: welcome.run.hyper.tau,
                };
                self.joined = Some(Joined {
                    seq: 0,
                    seen: welcome.center_version,
                    hyper: welcome.run.hyper,
                    welcome,
                });
                self.link = Link::new(welcome_encoding, &frame.payload);
                self.center = frame.payload;
                self.started = false;
                event
            }
            Message::Reply(reply) => {
                let joined = self
                    .joined
                    .as_mut()
                    .ok_or(VolunteerError::State("a reply before the welcome"))?;
                if reply.seq != joined.seq {
                    return Err(VolunteerError::State("a reply to a sync never sent"));
                }
                let lambda = joined.welcome.run.leader_pull;
                let values = self
                    .link
                    .receive_reply(reply.apply, frame.encoding, frame.payload)?;
                self.worker.apply(reply.apply, values, lambda, None)?;
                joined.seen = reply.center_version;
                joined.hyper = reply.hyper;
                self.progress.syncs += 1;
                Event::Synced {
                    center_version: reply.center_version,
                    tau: reply.hyper.tau,
                    alpha: reply.hyper.alpha,
                    lr: reply.hyper.lr,
                }
            }
            Message::Reject { reason, .. } => Event::Rejected {
                code: reason.code().into(),
                reason: reason.to_string(),
                remedy: reason.remedy(),
            },
            Message::Stop(reason) => Event::Stop {
                finished: reason == StopReason::Finished,
            },
            _ => Event::Ignored,
        })
    }

    /// The run spec of the current session.
    pub fn spec(&self) -> Option<&RunSpec> {
        self.joined.as_ref().map(|j| &j.welcome.run)
    }

    /// Starts training on the downloaded shard (the bytes of `GET /api/shard`).
    pub fn start(&mut self, shard_bytes: &[u8]) -> Result<(), VolunteerError> {
        let set: ImageSet = decode_images("shard download", shard_bytes)?;
        self.begin(Arc::new(set), None)
    }

    /// Starts training on a shard too large for the tab's memory `budget`
    /// (bytes), read a block at a time: `head` is its first
    /// [`ImagesHead::size`] bytes, `total` its size. Before each step the page
    /// reads what [`Volunteer::wanted`] names and hands it to [`Volunteer::supply`].
    pub fn start_blocks(
        &mut self,
        head: &[u8],
        total: u64,
        budget: u64,
    ) -> Result<(), VolunteerError> {
        let batch = self.spec().map_or(1, |run| run.batch as usize);
        let head = ImagesHead::decode("shard download", head, total)?;
        let plan = BlockPlan::new(&head, batch, budget);
        let shard = Arc::new(BlockedShard::new(head, plan));
        self.begin(shard.clone(), Some(shard))
    }

    fn begin(
        &mut self,
        set: Arc<dyn Images>,
        blocked: Option<Arc<BlockedShard>>,
    ) -> Result<(), VolunteerError> {
        let joined = self
            .joined
            .as_ref()
            .ok_or(VolunteerError::State("the shard before the welcome"))?;
        let data = ShardData {
            indices: (0..set.count()).collect(),
            set,
        };
        let run = &joined.welcome.run;
        self.worker.start(
            run,
            joined.welcome.shard,
            data,
            run.train_items,
            std::mem::take(&mut self.center),
            false,
        )?;
        self.blocked = blocked;
        self.started = true;
        Ok(())
    }

    /// The blocks of the shard to read now (the next step needs them) or soon,
    /// that are not in memory; none when the shard is held whole.
    pub fn wanted(&self) -> Vec<BlockRead> {
        let (Some(shard), Some(ahead)) = (&self.blocked, self.worker.blocks_ahead()) else {
            return Vec::new();
        };
        let read = |block| {
            let bytes = shard.plan().bytes(block);
            BlockRead {
                block,
                start: bytes.start,
                end: bytes.end,
            }
        };
        ahead.all().filter(|&b| !shard.holds(b)).map(read).collect()
    }

    /// Whether the next step's images are in memory.
    pub fn ready(&self) -> bool {
        match (&self.blocked, self.worker.blocks_ahead()) {
            (Some(shard), Some(ahead)) => ahead.now.iter().all(|&b| shard.holds(b)),
            _ => self.started,
        }
    }

    /// Takes a block named by [`Volunteer::wanted`] (the bytes it named); blocks
    /// no longer wanted are let go.
    pub fn supply(&mut self, block: usize, bytes: Vec<u8>) -> Result<(), VolunteerError> {
        let shard = self
            .blocked
            .as_ref()
            .ok_or(VolunteerError::State("a block of a shard held whole"))?;
        let keep: Vec<usize> = self
            .worker
            .blocks_ahead()
            .map(|ahead| ahead.all().collect())
            .unwrap_or_default();
        shard.supply(block, bytes, &keep)?;
        self.progress.blocks_read += 1;
        Ok(())
    }

    /// τ now.
    pub fn tau(&self) -> u32 {
        self.joined.as_ref().map_or(1, |j| j.hyper.tau)
    }

    /// Runs `steps` local steps (nothing is read back yet).
    pub fn step(&mut self, steps: u32) -> Result<(), VolunteerError> {
        if !self.started {
            return Err(VolunteerError::State("training before the shard arrived"));
        }
        let lr = self.joined.as_ref().map_or(0.0, |j| j.hyper.lr);
        for _ in 0..steps {
            if !self.ready() {
                return Err(VolunteerError::State(
                    "the next batch's block is not in memory",
                ));
            }
            self.worker.train_into(&mut self.pending, 1, lr, || false)?;
        }
        Ok(())
    }

    /// Reads xⁱ and the loss of the pending steps back (asynchronously: WebGPU).
    pub async fn read_back(&mut self) -> Trained {
        let pending = std::mem::take(&mut self.pending);
        self.worker.finish_async(pending).await
    }

    /// The sync frame for `trained`, which took `seconds` of training (the page's
    /// clock: this crate has none of its own).
    pub fn sync_frame(
        &mut self,
        trained: Trained,
        seconds: f64,
    ) -> Result<Vec<u8>, VolunteerError> {
        let joined = self
            .joined
            .as_mut()
            .ok_or(VolunteerError::State("a sync before the welcome"))?;
        self.progress.steps += u64::from(trained.steps);
        self.progress.samples += trained.samples;
        self.progress.loss = trained.loss;
        self.progress.samples_per_s = trained.samples as f64 / seconds.max(1e-6);
        joined.seq += 1;
        let sync = Sync {
            session: joined.welcome.session,
            seq: joined.seq,
            center_version: joined.seen,
            steps: self.progress.steps,
            samples: trained.samples,
            loss: if trained.loss.is_finite() {
                trained.loss
            } else {
                f32::MAX
            },
            samples_per_s: self.progress.samples_per_s as f32,
            wait_s: self.last_wait_s,
            members: 0,
        };
        let values = self.link.params_payload(&trained.params);
        let (bytes, decoded) =
            protocol::encode_decoded(&Message::Sync(sync), values, self.link.encoding());
        self.link.sent(&decoded);
        Ok(bytes)
    }

    /// Records how long the last sync waited (seconds), reported with the next.
    pub fn set_wait(&mut self, seconds: f64) {
        self.last_wait_s = seconds as f32;
    }

    /// A heartbeat for the current session (empty before the welcome).
    pub fn heartbeat(&self) -> Vec<u8> {
        self.session_frame(|session| Message::Heartbeat { session })
    }

    /// The goodbye for the current session (empty before the welcome).
    pub fn leave(&self) -> Vec<u8> {
        self.session_frame(|session| Message::Leave { session })
    }

    fn session_frame(&self, make: impl Fn(u64) -> Message) -> Vec<u8> {
        self.joined
            .as_ref()
            .map(|j| protocol::encode(&make(j.welcome.session), &[]))
            .unwrap_or_default()
    }
}
