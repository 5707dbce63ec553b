//! The dashboard's live feed: a sampler records the run once a second (totals and
//! each worker's speed and distance to the center), and `GET /api/events` pushes
//! those ticks over a WebSocket — the whole timeline when a page connects, then
//! each new tick with the current status. Pages never poll.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::state::{AppState, EvalPoint, Status};
use crate::web::{check_origin, error};

/// Seconds of history kept for pages that connect late (one tick a second).
const KEPT_TICKS: usize = 3600;

/// The run at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Tick {
    /// Run time (seconds served, counted across resumes).
    pub time_s: f64,
    /// Center version.
    pub version: u64,
    /// Training images workers reported.
    pub samples: u64,
    /// Accepted syncs so far.
    pub syncs: u64,
    /// Rejections so far.
    pub rejects: u64,
    /// Bytes received so far.
    pub bytes_in: u64,
    /// Bytes sent so far.
    pub bytes_out: u64,
    /// Per worker: (id, samples/s, ‖xⁱ − x̃‖ at its last sync).
    pub workers: Vec<(u32, f64, f64)>,
}

/// Recorded ticks and the channel new ones go out on.
pub struct Timeline {
    ticks: Mutex<VecDeque<Arc<Tick>>>,
    tx: broadcast::Sender<Arc<Tick>>,
    /// Pages connected to the feed now.
    subscribers: Arc<AtomicUsize>,
}

/// The most pages the feed serves at once (each costs a status a second).
pub const MAX_SUBSCRIBERS: usize = 64;

impl Default for Timeline {
    fn default() -> Self {
        Self {
            ticks: Mutex::new(VecDeque::new()),
            tx: broadcast::channel(16).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Timeline {
    fn push(&self, tick: Tick) {
        let tick = Arc::new(tick);
        {
            let mut ticks = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
            if ticks.len() == KEPT_TICKS {
                ticks.pop_front();
            }
            ticks.push_back(tick.clone());
        }
        let _ = self.tx.send(tick); // no page listening is fine
    }

    fn recorded(&self) -> Vec<Arc<Tick>> {
        let ticks = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
        ticks.iter().cloned().collect()
    }
}

/// Takes one tick now.
pub fn sample(state: &AppState) {
    let m = &state.metrics;
    let workers = state
        .workers()
        .status()
        .into_iter()
        .map(|w| (w.id, w.samples_per_s, w.distance))
        .collect();
    let tick = Tick {
        time_s: state.now_s(),
        version: state.center().version(),
        samples: m.samples.load(Relaxed),
        syncs: m.syncs.load(Relaxed),
        rejects: m.rejects().values().sum(),
        bytes_in: m.bytes_in.load(Relaxed),
        bytes_out: m.bytes_out.load(Relaxed),
        workers,
    };
    state.timeline.push(tick);
}

/// Samples the run every second until the server stops.
pub async fn sampler(state: AppState) {
    let mut stop = state.stop_signal();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => sample(&state),
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves when the server starts stopping (the guard is not held across awaits,
/// which keeps the callers' futures `Send`).
async fn stopped(
    stop: &mut tokio::sync::watch::Receiver<Option<tether_shared::protocol::StopReason>>,
) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// What the feed sends.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    /// First message: the status (with the whole evaluation history) and the timeline.
    Hello {
        status: &'a Status,
        ticks: &'a [Arc<Tick>],
    },
    /// Every second: the new tick, evaluations since the last message, the status
    /// (its history left out: the page has it).
    Tick {
        tick: &'a Tick,
        evals: &'a [EvalPoint],
        status: &'a Status,
    },
}

/// `GET /api/events`: the live feed (JSON text messages), for pages of an allowed
/// origin (or clients that are not browsers), at most [`MAX_SUBSCRIBERS`] at once.
pub async fn feed(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(refused) = check_origin(&state, &headers) {
        return refused;
    }
    let count = state.timeline.subscribers.clone();
    if count.fetch_add(1, SeqCst) >= MAX_SUBSCRIBERS {
        count.fetch_sub(1, SeqCst);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the live feed has as many pages as it serves; try again later",
        );
    }
    let seat = Seat(count);
    ws.on_upgrade(move |socket| async move {
        serve_feed(state, socket).await;
        drop(seat);
    })
}

/// One page's place on the feed, given back however its task ends.
struct Seat(Arc<AtomicUsize>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

async fn serve_feed(state: AppState, mut socket: WebSocket) {
    let mut rx = state.timeline.tx.subscribe();
    let mut stop = state.stop_signal();
    let status = state.status();
    let mut evals_sent = status.history.len();
    let hello = Event::Hello {
        status: &status,
        ticks: &state.timeline.recorded(),
    };
    let limit = state.config.send_timeout;
    if send(&mut socket, &hello, limit).await.is_err() {
        return;
    }
    loop {
        let tick = tokio::select! {
            t = rx.recv() => match t {
                Ok(t) => t,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = stopped(&mut stop) => {
                let _ = tokio::time::timeout(limit, socket.send(Message::Close(None))).await;
                return;
            }
            incoming = socket.recv() => match incoming {
                // The page sends nothing; a close or error ends the feed.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
        };
        let mut status = state.status();
        let history = std::mem::take(&mut status.history);
        let evals = &history[evals_sent.min(history.len())..];
        evals_sent = history.len();
        let event = Event::Tick {
            tick: &tick,
            evals,
            status: &status,
        };
        if send(&mut socket, &event, limit).await.is_err() {
            return;
        }
    }
}

/// One event, within `limit`: a page that stops reading is dropped, not waited on.
async fn send(
    socket: &mut WebSocket,
    event: &Event<'_>,
    limit: std::time::Duration,
) -> Result<(), axum::Error> {
    let text = serde_json::to_string(event).expect("events serialise");
    tokio::time::timeout(limit, socket.send(Message::Text(text.into())))
        .await
        .unwrap_or_else(|_| Err(axum::Error::new("send timed out")))
}
