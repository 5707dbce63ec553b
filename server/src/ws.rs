//! One worker connection at `GET /ws`: the handshake, then a loop of syncs, each
//! validated before it reaches the center, each answered or rejected with a reason.
//!
//! A connection processes one frame at a time and answers before it reads the next,
//! so its queue is the socket itself (bounded by TCP flow control), and the frame
//! size limit is the model's size plus a header, not the library default.

use std::time::Instant;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use tether_shared::algorithms::leader::leader_pull;
use tether_shared::codec::{Encoding, Link};
use tether_shared::protocol::{
    self, Apply, DecodeError, Frame, Hello, Message, PROTOCOL_VERSION, Rejection, Reply,
    StopReason, Sync, Welcome, WorkerKind,
};

use crate::center::{Cohort, Ready};
use crate::config::has_elastic_force;
use crate::state::AppState;

mod exchange;
use exchange::exchange;

/// Serves one worker until it leaves, goes silent, breaks the protocol beyond
/// repair, or the server stops.
/// `browser`: the upgrade came from a web page (its Origin was checked).
pub async fn connection(state: AppState, mut socket: WebSocket, browser: bool) {
    let _guard = state.connection_guard();
    let mut stop = state.stop_signal();
    let Some(mut conn) = handshake(&state, &mut socket, browser).await else {
        close(&state, socket).await;
        return;
    };
    tracing::info!(worker = conn.worker_id, "worker joined");
    let idle = state.config.idle_timeout;
    let reason = loop {
        let received = tokio::select! {
            _ = stop.wait_for(Option::is_some) => None,
            r = tokio::time::timeout(idle, socket.recv()) => Some(r),
        };
        let Some(received) = received else {
            let reason = stop.borrow().unwrap_or(StopReason::ShuttingDown);
            let stop = protocol::encode(&Message::Stop(reason), &[]);
            let _ = send(&state, &mut conn, &mut socket, stop).await;
            break "server stopping";
        };
        let bytes = match received {
            Err(_) => break "idle timeout",
            Ok(None) | Ok(Some(Ok(WsMessage::Close(_)))) => break "closed",
            Ok(Some(Err(e))) => {
                // Includes frames over the hard cap, which the socket layer refuses
                // without reading them: the connection cannot continue after that.
                tracing::debug!(worker = conn.worker_id, "receive error: {e}");
                break "connection lost";
            }
            Ok(Some(Ok(WsMessage::Binary(bytes)))) => bytes,
            Ok(Some(Ok(WsMessage::Text(_)))) => {
                let why = Rejection::Malformed("text frames are not part of the protocol".into());
                if let Step::Broken = reject(&state, &mut conn, &mut socket, None, why).await {
                    break "socket error";
                }
                continue;
            }
            Ok(Some(Ok(_))) => {
                touch(&state, &conn, 0);
                continue;
            }
        };
        touch(&state, &conn, bytes.len() as u64);
        match handle(&state, &mut conn, &mut socket, &bytes, &mut stop).await {
            Step::Continue => {}
            Step::Leave => break "left",
            Step::Broken => break "socket error",
        }
    };
    tracing::info!(
        worker = conn.worker_id,
        reason,
        rejected = conn.rejects,
        "worker disconnected"
    );
    // Leave the registry (and any round) first: that must never wait on the network.
    let members = {
        let mut workers = state.workers();
        workers.leave(conn.session);
        workers.len()
    };
    state.center().leave_round(conn.session, members);
    close(&state, socket).await;
}

/// Says goodbye, within the send timeout: a client that stopped reading does not
/// keep this task (or its socket) alive.
async fn close(state: &AppState, mut socket: WebSocket) {
    let _ = tokio::time::timeout(
        state.config.send_timeout,
        socket.send(WsMessage::Close(None)),
    )
    .await;
}

/// Per-connection protocol state.
struct Conn {
    session: u64,
    worker_id: u32,
    last_seq: u64,
    /// What this worker holds after its last accepted exchange, as it reconstructed
    /// it (the welcome's center at first). Its next update's progress is measured
    /// from here, and DOWNPOUR's push is computed from it rather than trusted from
    /// the worker. Moves only when an update is accepted: a rejected jump never
    /// becomes the place the next one is measured from.
    anchor: Vec<f32>,
    /// The xⁱ of the sync being answered (the anchor is computed from it).
    sent: Vec<f32>,
    /// The session's payload encoding and its error-feedback state.
    link: Link,
    /// Frames rejected on this connection.
    rejects: u64,
    /// Whose progress the norm guard compares this worker's with.
    cohort: Cohort,
    /// τ and η as the worker's last two replies (or its welcome) told them, newest
    /// first: an overlapping worker runs the steps after a reply at the values of the
    /// reply before, so its sync is at the center's values only when both are.
    told: [(u32, f64); 2],
}

/// Rejections per connection that are logged one by one.
const LOGGED_REJECTS: u64 = 20;

enum Step {
    Continue,
    Leave,
    Broken,
}

async fn handshake(state: &AppState, socket: &mut WebSocket, browser: bool) -> Option<Conn> {
    let mut conn = Conn {
        session: 0,
        worker_id: u32::MAX,
        last_seq: 0,
        rejects: 0,
        anchor: Vec::new(),
        sent: Vec::new(),
        link: Link::new(Encoding::F32, &[]),
        told: [(0, 0.0); 2],
        cohort: Cohort::Workers,
    };
    let first = tokio::time::timeout(state.config.handshake_timeout, socket.recv()).await;
    let bytes = match first {
        Ok(Some(Ok(WsMessage::Binary(b)))) => b,
        Ok(Some(Ok(_))) => {
            let why = Rejection::Unexpected("the first frame must be a binary hello".into());
            reject(state, &mut conn, socket, None, why).await;
            return None;
        }
        _ => return None, // timed out or gone: nothing to answer
    };
    state
        .metrics
        .bytes_in
        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let hello = match protocol::decode(&bytes) {
        Ok(Frame {
            message: Message::Hello(h),
            ..
        }) => h,
        Ok(other) => {
            let why =
                Rejection::Unexpected(format!("expected hello, got {}", other.message.name()));
            reject(state, &mut conn, socket, None, why).await;
            return None;
        }
        Err(DecodeError::OtherVersion(got)) => {
            let why = Rejection::ProtocolVersion {
                expected: PROTOCOL_VERSION,
                got,
            };
            reject(state, &mut conn, socket, None, why).await;
            return None;
        }
        Err(e) => {
            reject(
                state,
                &mut conn,
                socket,
                None,
                Rejection::Malformed(e.to_string()),
            )
            .await;
            return None;
        }
    };
    if let Err(why) = admit(state, &hello, browser) {
        reject(state, &mut conn, socket, None, why).await;
        return None;
    }
    let session = state.new_session();
    let joined = {
        let mut workers = state.workers();
        (workers.len() < state.config.max_workers as usize).then(|| {
            let trusted = trusted_relay(state, &hello);
            let w = workers.join(session, &hello, state.shard_plan(), trusted);
            (w.id, w.shard)
        })
    };
    let Some((worker_id, shard)) = joined else {
        let why = Rejection::ServerFull {
            max: state.config.max_workers,
        };
        reject(state, &mut conn, socket, None, why).await;
        return None;
    };
    state
        .metrics
        .joins
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    conn.session = session;
    conn.worker_id = worker_id;
    if trusted_relay(state, &hello) {
        conn.cohort = Cohort::Relays;
    }
    let (center, version, hyper) = {
        let c = state.center();
        (c.params().to_vec(), c.version(), c.hyper())
    };
    let keep_params = hello.previous_run.as_deref() == Some(state.spec.run_id.as_str())
        && has_elastic_force(state.spec.algorithm);
    let mut spec = state.spec.clone();
    spec.hyper = hyper;
    let encoding = state.config.encoding_for(&hello.encodings);
    let download = if hello.needs_shard {
        Some(state.shard_download(shard).await)
    } else {
        None
    };
    let welcome = Message::Welcome(Welcome {
        run: spec,
        session,
        worker_id,
        shard,
        center_version: version,
        keep_params,
        encoding,
        download,
    });
    // The center travels exactly (f32); both ends start the link from it.
    if send(
        state,
        &mut conn,
        socket,
        protocol::encode(&welcome, &center),
    )
    .await
    .is_err()
    {
        state.workers().leave(session);
        return None;
    }
    conn.link = Link::new(encoding, &center);
    conn.anchor = center;
    conn.told = [(hyper.tau, hyper.lr); 2];
    Some(conn)
}

/// A relay that presented the run's relay token ([`admit`] checked it when the run
/// has one): only then are its page and its place among relays trusted.
fn trusted_relay(state: &AppState, hello: &Hello) -> bool {
    hello.kind == WorkerKind::Relay && state.config.relay_token.is_some()
}

/// Checks a hello against the run before the worker is registered. A browser
/// (a web page's connection, or a hello that says so) needs a live join ticket;
/// other workers need the worker token when the run has one.
fn admit(state: &AppState, hello: &Hello, browser: bool) -> Result<(), Rejection> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Rejection::ProtocolVersion {
            expected: PROTOCOL_VERSION,
            got: hello.protocol,
        });
    }
    if hello.kind == WorkerKind::Relay
        && let Some(token) = &state.config.relay_token
    {
        if hello.token.as_deref() != Some(token.as_str()) {
            return Err(Rejection::Unauthorized);
        }
    } else if browser || hello.kind == WorkerKind::Browser {
        if !hello
            .token
            .as_deref()
            .is_some_and(|t| state.redeem_ticket(t))
        {
            return Err(Rejection::Unauthorized);
        }
    } else if let Some(token) = &state.config.worker_token
        && hello.token.as_deref() != Some(token.as_str())
    {
        return Err(Rejection::Unauthorized);
    }
    if state.stopping() {
        return Err(Rejection::ShuttingDown);
    }
    Ok(())
}

async fn handle(
    state: &AppState,
    conn: &mut Conn,
    socket: &mut WebSocket,
    bytes: &[u8],
    stop: &mut tokio::sync::watch::Receiver<Option<StopReason>>,
) -> Step {
    let arrived = Instant::now();
    let limit = protocol::max_frame_bytes(state.spec.model.param_count());
    if bytes.len() > limit {
        let why = Rejection::FrameTooLarge {
            limit: limit as u64,
            got: bytes.len() as u64,
        };
        return reject(state, conn, socket, None, why).await;
    }
    let frame = match protocol::decode(bytes) {
        Ok(f) => f,
        Err(e) => {
            return reject(
                state,
                conn,
                socket,
                None,
                Rejection::Malformed(e.to_string()),
            )
            .await;
        }
    };
    match frame.message {
        Message::Sync(sync) => {
            let seq = sync.seq;
            match exchange(state, conn, sync, frame.encoding, frame.payload, stop).await {
                Ok((
                    Ready {
                        apply,
                        payload,
                        version,
                        norm,
                    },
                    held,
                )) => {
                    let hyper = state.center().hyper();
                    let reply = Message::Reply(Reply {
                        seq,
                        center_version: version,
                        apply,
                        hyper,
                    });
                    conn.told = [(hyper.tau, hyper.lr), conn.told[0]];
                    let values = conn.link.reply_payload(apply, &payload);
                    let encoding = conn.link.encoding();
                    let (bytes, decoded) =
                        protocol::encode_decoded(&reply, values.clone(), encoding);
                    let seen = conn.link.replied(apply, &values, &decoded);
                    // Counted before the reply leaves: the center has taken the update
                    // either way, and a worker that exits on its last reply must find
                    // its sync in the status.
                    record_sync(state, conn, &sync, version, norm, held);
                    if send(state, conn, socket, bytes).await.is_err() {
                        return Step::Broken;
                    }
                    move_anchor(conn, apply, seen, state.spec.leader_pull);
                    state
                        .metrics
                        .observe_latency(arrived.elapsed().as_secs_f64());
                    Step::Continue
                }
                Err(why) => reject(state, conn, socket, Some(seq), why).await,
            }
        }
        Message::Heartbeat { session } if session == conn.session => Step::Continue,
        Message::Leave { session } if session == conn.session => Step::Leave,
        Message::Heartbeat { session } | Message::Leave { session } => {
            reject(
                state,
                conn,
                socket,
                None,
                Rejection::UnknownSession(session),
            )
            .await
        }
        other => {
            // Named, not echoed: a hello's strings are the client's to choose.
            let why =
                Rejection::Unexpected(format!("a {} is not a worker message here", other.name()));
            reject(state, conn, socket, None, why).await
        }
    }
}

/// After an accepted exchange: where the worker now stands, as it will compute it
/// from the reply it reconstructed (`seen`) and the xⁱ it sent.
fn move_anchor(conn: &mut Conn, apply: Apply, seen: Vec<f32>, lambda: f32) {
    match apply {
        Apply::Replace => conn.anchor = seen,
        Apply::Subtract => {
            for ((a, x), d) in conn.anchor.iter_mut().zip(&conn.sent).zip(&seen) {
                *a = x - d;
            }
        }
        Apply::PullToward => {
            conn.anchor.copy_from_slice(&conn.sent);
            leader_pull(&mut conn.anchor, &seen, lambda);
        }
    }
}

fn record_sync(state: &AppState, conn: &Conn, sync: &Sync, version: u64, norm: f64, held: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    state.metrics.syncs.fetch_add(1, Relaxed);
    state.metrics.held.fetch_add(u64::from(held), Relaxed);
    state.metrics.samples.fetch_add(sync.samples, Relaxed);
    if let Some(w) = state.workers().get_mut(conn.session) {
        w.syncs += 1;
        w.held += u64::from(held);
        w.samples += sync.samples;
        w.last_samples = sync.samples;
        w.samples_per_s = f64::from(sync.samples_per_s);
        w.loss = f64::from(sync.loss);
        w.wait_s = f64::from(sync.wait_s);
        w.staleness = version
            .saturating_sub(1)
            .saturating_sub(sync.center_version);
        w.distance = norm;
        w.members = if w.kind == WorkerKind::Relay {
            sync.members
        } else {
            0
        };
    }
}

fn touch(state: &AppState, conn: &Conn, bytes: u64) {
    state
        .metrics
        .bytes_in
        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    if let Some(w) = state.workers().get_mut(conn.session) {
        w.last_seen = Instant::now();
        w.bytes_in += bytes;
    }
}

async fn send(
    state: &AppState,
    conn: &mut Conn,
    socket: &mut WebSocket,
    bytes: Vec<u8>,
) -> Result<(), axum::Error> {
    let n = bytes.len() as u64;
    // A worker that stops reading must not hold a connection task forever.
    let sent = tokio::time::timeout(
        state.config.send_timeout,
        socket.send(WsMessage::Binary(bytes.into())),
    )
    .await
    .unwrap_or_else(|_| Err(axum::Error::new("send timed out")));
    if sent.is_ok() {
        state
            .metrics
            .bytes_out
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = state.workers().get_mut(conn.session) {
            w.bytes_out += n;
        }
    }
    sent
}

async fn reject(
    state: &AppState,
    conn: &mut Conn,
    socket: &mut WebSocket,
    seq: Option<u64>,
    reason: Rejection,
) -> Step {
    // A client sending garbage on and on must not flood the log (or fill its disk):
    // the first few rejections of a connection are logged, the rest counted.
    conn.rejects += 1;
    if conn.rejects <= LOGGED_REJECTS {
        tracing::warn!(
            worker = conn.worker_id,
            code = reason.code(),
            "rejected: {reason}"
        );
    } else if conn.rejects == LOGGED_REJECTS + 1 {
        tracing::warn!(
            worker = conn.worker_id,
            "more rejections on this connection are counted, not logged"
        );
    }
    state.metrics.reject(reason.code());
    let worker = (conn.worker_id != u32::MAX).then_some(conn.worker_id);
    state.record_reject(worker, reason.code(), reason.to_string());
    if let Some(w) = state.workers().get_mut(conn.session) {
        w.rejects += 1;
    }
    let message = Message::Reject { seq, reason };
    match send(state, conn, socket, protocol::encode(&message, &[])).await {
        Ok(()) => Step::Continue,
        Err(_) => Step::Broken,
    }
}
