//! The operator's controls, behind the admin token (`Authorization: Bearer …`,
//! never in a URL): change τ, α, η at runtime, pause and resume training, write a
//! checkpoint now, download the center as safetensors.
//!
//! Every action is logged; hyper-parameter changes are also kept in the run's
//! history so the dashboard marks them on its charts. [`require_token`] guards the
//! whole `/api/admin` router, before any body is read: a request without the token
//! costs its headers and nothing more.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tether_shared::protocol::Hyper;

use crate::checkpoint;
use crate::state::AppState;
use crate::web::error;

/// Middleware of the admin routes: refuses the request unless it carries the admin
/// token.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match authorize(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused,
    }
}

/// Refuses the request unless it carries the admin token.
#[allow(clippy::result_large_err)] // the error is the response itself, sent once
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &state.config.admin_token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "operator controls are off: start the server with --admin-token",
        ));
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit, so timing does not leak how much matched.
    let same = sent.is_some_and(|s| {
        s.len() == token.len()
            && s.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if same {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token",
        ))
    }
}

/// `POST /api/admin/hyper` body: the values to change (others stay).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperPatch {
    tau: Option<u32>,
    alpha: Option<f32>,
    lr: Option<f64>,
}

/// `POST /api/admin/hyper`: changes τ, α, η; workers pick them up at their next sync.
pub async fn set_hyper(
    State(state): State<AppState>,
    body: Result<Json<HyperPatch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(patch) = match body {
        Ok(b) => b,
        // A body over the limit says so (413); any other bad body is a 400.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(e.status(), e.body_text());
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let now = state.center().hyper();
    let after = Hyper {
        tau: patch.tau.unwrap_or(now.tau),
        alpha: patch.alpha.unwrap_or(now.alpha),
        lr: patch.lr.unwrap_or(now.lr),
    };
    // The same rules as at start-up, so a runtime change cannot make a run invalid.
    let mut candidate = state.config.run.clone();
    candidate.tau = after.tau;
    candidate.alpha = after.alpha;
    candidate.lr = after.lr;
    if let Err(e) = candidate.validate() {
        return error(StatusCode::BAD_REQUEST, e.0.replace("--", ""));
    }
    Json(state.set_hyper(after)).into_response()
}

/// `POST /api/admin/pause`: workers wait at their next sync until resumed.
pub async fn pause(State(state): State<AppState>) -> Response {
    state.set_paused(true);
    Json(serde_json::json!({ "paused": true })).into_response()
}

/// `POST /api/admin/resume`.
pub async fn resume(State(state): State<AppState>) -> Response {
    state.set_paused(false);
    Json(serde_json::json!({ "paused": false })).into_response()
}

/// `POST /api/admin/checkpoint`: writes a checkpoint of the center now.
pub async fn checkpoint_now(State(state): State<AppState>) -> Response {
    match crate::write_checkpoint(&state, true).await {
        Ok(path) => {
            let version = state
                .last_checkpoint
                .lock()
                .expect("lock")
                .as_ref()
                .map(|c| c.0);
            Json(serde_json::json!({
                "version": version,
                "manifest": path.map(|p| p.display().to_string()),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/admin/center.safetensors`: the center as it is now.
pub async fn download_center(State(state): State<AppState>) -> Response {
    let snap = state.snapshot();
    let name = format!(
        "attachment; filename=\"{}-v{}.safetensors\"",
        snap.run_id, snap.version
    );
    match tokio::task::spawn_blocking(move || checkpoint::encode(&snap)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_DISPOSITION, name),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
