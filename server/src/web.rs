//! The browser side of the server: the dashboard and volunteer pages (compiled into
//! the binary from `web/`, so a fresh `cargo run` serves them with nothing fetched
//! from the internet), join tickets for browser workers, and shard downloads.
//!
//! Browsers are held to their origin: `/api/join`, `/api/shard` and a browser's
//! `/ws` upgrade must come from a page this server served (Origin matches Host) or
//! from an origin the operator allowed.

use std::io::Read;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::classes::{ClassPage, ClassQuery, MAX_PAGE};
use crate::state::{AppState, TICKET_LIFETIME};

/// One embedded file: its path under `web/`, content type, bytes, and whether
/// the bytes are gzipped (the wasm is committed and embedded that way).
struct Asset {
    path: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
    gzipped: bool,
}

macro_rules! assets {
    ($($path:literal => $mime:literal $(, from $gz:literal)?);* $(;)?) => {
        &[$(assets!(@one $path, $mime $(, $gz)?)),*]
    };
    (@one $path:literal, $mime:literal) => {
        Asset { path: $path, mime: $mime, gzipped: false,
                bytes: include_bytes!(concat!("../../web/", $path)) }
    };
    (@one $path:literal, $mime:literal, $gz:literal) => {
        Asset { path: $path, mime: $mime, gzipped: true,
                bytes: include_bytes!(concat!("../../web/", $gz)) }
    };
}

/// Everything under `web/` that the pages load. A `static`, not a `const`: a const's
/// value is copied into each function that uses it, embedded files included (the
/// 4.6 MB wasm was in the binary twice).
static ASSETS: &[Asset] = assets![
    "index.html" => "text/html; charset=utf-8";
    "volunteer.html" => "text/html; charset=utf-8";
    "style.css" => "text/css; charset=utf-8";
    "app.js" => "text/javascript; charset=utf-8";
    "volunteer.js" => "text/javascript; charset=utf-8";
    "worker.js" => "text/javascript; charset=utf-8";
    "backend.js" => "text/javascript; charset=utf-8";
    "vendor/uPlot.iife.min.js" => "text/javascript; charset=utf-8";
    "vendor/uPlot.min.css" => "text/css; charset=utf-8";
    "vendor/uPlot.LICENSE" => "text/plain; charset=utf-8";
    "pkg/tether_client_wasm.js" => "text/javascript; charset=utf-8";
    "pkg/tether_client_wasm_bg.wasm" => "application/wasm", from "pkg/tether_client_wasm_bg.wasm.gz";
    "pkg/tether_client_wasm_relaxed.js" => "text/javascript; charset=utf-8";
    "pkg/tether_client_wasm_relaxed_bg.wasm" => "application/wasm", from "pkg/tether_client_wasm_relaxed_bg.wasm.gz";
];

/// Each asset's ETag (a hash of its bytes), computed on first use, so a browser
/// revalidates the 4 MB wasm with a 304 instead of downloading it again.
fn etag(index: usize) -> &'static str {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    &ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let digest = Sha256::digest(a.bytes);
                let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })[index]
}

/// A gzipped asset inflated, for a client that does not accept gzip (made once).
fn inflated(index: usize) -> &'static [u8] {
    static INFLATED: [OnceLock<Vec<u8>>; ASSETS.len()] = [const { OnceLock::new() }; ASSETS.len()];
    INFLATED[index].get_or_init(|| {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(ASSETS[index].bytes)
            .read_to_end(&mut out)
            .expect("embedded gzip assets are valid (cargo xtask web wrote them)");
        out
    })
}

/// Whether `Accept-Encoding` admits gzip (a `gzip` or `*` entry without `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|entry| {
            let mut parts = entry.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

async fn asset(path: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let asset = &ASSETS[index];
    let etag = etag(index);
    let common = [
        (header::CONTENT_TYPE, asset.mime),
        // Assets change with the binary: revalidate (cheap, by ETag), never go stale.
        (header::CACHE_CONTROL, "no-cache"),
        (header::ETAG, etag),
        (header::VARY, "accept-encoding"),
    ];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    if !asset.gzipped {
        return (common, asset.bytes).into_response();
    }
    if accepts_gzip(headers) {
        return (common, [(header::CONTENT_ENCODING, "gzip")], asset.bytes).into_response();
    }
    match tokio::task::spawn_blocking(move || inflated(index)).await {
        Ok(bytes) => (common, bytes).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /`: the dashboard.
pub async fn dashboard(headers: HeaderMap) -> Response {
    asset("index.html", &headers).await
}

/// `GET /volunteer`: the page for lending a tab.
pub async fn volunteer(headers: HeaderMap) -> Response {
    asset("volunteer.html", &headers).await
}

/// `GET /web/{*path}`: scripts, styles, the wasm.
pub async fn file(
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    asset(&path, &headers).await
}

/// A JSON error body with a status code.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct Body {
        error: String,
    }
    (
        status,
        Json(Body {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Checks a browser request's Origin against the Host it was sent to (which must be
/// one of the server's own names or an address, see [`own_host`]) and the
/// operator's allowed origins. `Ok(true)`: a browser from an allowed origin;
/// `Ok(false)`: no Origin header (not a browser: native workers, curl).
#[allow(clippy::result_large_err)] // the error is the response itself, sent once
pub fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<bool, Response> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(false);
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    let allowed = (!host.is_empty()
        && authority.eq_ignore_ascii_case(host)
        && own_host(&state.config.host_names, host))
        || state.config.allowed_origins.iter().any(|o| o == origin);
    if allowed {
        Ok(true)
    } else {
        tracing::warn!(origin, host, "refused a browser from a foreign origin");
        Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "origin {origin:?} is not allowed (serve the page from this server, or add it with --allow-origin)"
            ),
        ))
    }
}

/// Whether `authority` (host[:port]) names this server: an IP literal, or one of
/// its own names. A page whose Origin equals its Host is not enough: a DNS-rebinding
/// page (its name re-pointed at this server) has exactly that, but under a name
/// this server does not know.
fn own_host(names: &[String], authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.parse::<std::net::IpAddr>().is_ok() || names.iter().any(|n| n.eq_ignore_ascii_case(host))
}

/// The answer to `POST /api/join`.
#[derive(Serialize)]
pub struct Ticket {
    /// Goes in the browser worker's hello.
    pub ticket: String,
    /// Seconds it stays valid.
    pub expires_in_s: u64,
    /// Identifies the training data (part of shard URLs, for caching).
    pub data: String,
}

/// Header a volunteer sends the worker token in, when the run has one.
pub const TOKEN_HEADER: &str = "x-tether-token";

/// `POST /api/join`: a short-lived ticket for a browser worker of this origin.
pub async fn join(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match check_origin(&state, &headers) {
        Ok(true) => {}
        Ok(false) => {
            return error(
                StatusCode::FORBIDDEN,
                "join tickets are for browsers (no Origin header); native workers use `tether work`",
            );
        }
        Err(refused) => return refused,
    }
    if let Some(token) = &state.config.worker_token {
        let sent = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
        if sent != Some(token.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "this run needs its worker token to join",
            );
        }
    }
    if state.stopping() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let Some(ticket) = state.issue_ticket() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many join tickets outstanding; try again in a minute",
        );
    };
    Json(Ticket {
        ticket,
        expires_in_s: TICKET_LIFETIME.as_secs(),
        data: state.data_id.clone(),
    })
    .into_response()
}

/// `GET /api/relay`: where a volunteer of this page should train. `relay` is a
/// trusted relay's page (the least loaded, round-robin among equals) or `null`:
/// train here. Held to the same origins as `/api/join`.
pub async fn relay(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = check_origin(&state, &headers) {
        return refused;
    }
    let turn = state.relay_turn.fetch_add(1, Ordering::Relaxed);
    let relay = state.workers().relay_for_volunteer(turn);
    Json(serde_json::json!({ "relay": relay })).into_response()
}

/// `GET /api/shard` parameters: the shard from a welcome, and the data id.
#[derive(Deserialize)]
pub struct ShardQuery {
    index: u32,
    count: u32,
    seed: u64,
    data: String,
}

/// Header a worker names its session in to download its shard.
pub const SESSION_HEADER: &str = "x-tether-session";

/// `GET /api/shard`: a worker's shard of the training set, binary
/// ([`encode_images`](tether_shared::data::encode_images)), cacheable for good
/// (the URL names the data and the cut). Only for a connected worker, and only its
/// own shard: the session from its welcome goes in the `x-tether-session` header,
/// so the training set is never an open download.
pub async fn shard(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ShardQuery>,
) -> Response {
    if let Err(refused) = check_origin(&state, &headers) {
        return refused;
    }
    let session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(shard) = session.and_then(|s| state.workers().get_mut(s).map(|w| w.shard)) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "a shard is for the connected worker it was assigned to: send its session in x-tether-session",
        );
    };
    if q.data != state.data_id {
        return error(
            StatusCode::NOT_FOUND,
            format!("data {:?} is not this run's ({})", q.data, state.data_id),
        );
    }
    if (q.index, q.count, q.seed) != (shard.index, shard.count, shard.seed) {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "this session's shard is {}/{}, not {}/{}",
                shard.index, shard.count, q.index, q.count
            ),
        );
    }
    let file = state.shard_file(shard).await;
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (
            header::CACHE_CONTROL,
            "private, max-age=31536000, immutable".to_string(),
        ),
        (header::CONTENT_LENGTH, file.len.to_string()),
    ];
    let body = match (&file.bytes, state.train.packed()) {
        (Some(bytes), _) => axum::body::Body::from(bytes.clone()),
        (None, Some(packed)) => crate::stream::packed_body(packed, shard),
        (None, None) => return error(StatusCode::INTERNAL_SERVER_ERROR, "no shard bytes"),
    };
    (headers, body).into_response()
}

/// `GET /api/classes?offset=&limit=&order=label|worst`: the classes' names and the
/// center's latest accuracy on each (a page of at most 1 000).
pub async fn classes(
    State(state): State<AppState>,
    Query(q): Query<ClassQuery>,
) -> Json<ClassPage> {
    let limit = q.limit.unwrap_or(MAX_PAGE);
    Json(state.classes.page(q.offset, limit, q.order))
}
