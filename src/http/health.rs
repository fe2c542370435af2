//! Liveness, readiness and Prometheus metrics: no API key needed, as probes and scrapers have
//! none; `/metrics` may need its own token (`metrics.token`) or live on its own address.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::state::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::secrets::sha256_hex;

/// Liveness.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// Readiness: what the node depends on.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// All of them answer.
    pub ready: bool,
    /// The database answers.
    pub database: bool,
    /// The broker listens and the uplink pump runs.
    pub broker: bool,
    /// `not_configured` on a single node, else `ok` or `unreachable` (then not ready: a node
    /// that cannot coordinate must not take cabinets or requests).
    pub redis: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// The node can serve: database, broker and uplink pump.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = Readiness), (status = 503, body = Readiness, description = "not ready; Retry-After")))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let database = state.store.ping().await.is_ok();
    let pump = state.pump_alive.load(Ordering::SeqCst);
    let broker = match (state.mqtt_probe, &state.external) {
        (Some(addr), _) => {
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await
                .is_ok_and(|r| r.is_ok())
        }
        (None, Some(external)) => external.ready().await,
        (None, None) => false,
    };
    // An external broker has no pump of the embedded kind: its readers are `broker`.
    let pump = pump || state.external.is_some();
    let redis_ok = state.cluster.ping().await;
    let body = Readiness {
        ready: database && pump && broker && redis_ok,
        database,
        broker: broker && pump,
        redis: state.cluster.redis_status(),
    };
    if body.ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
    }
}

/// Marks the server of `metrics.listen`, the only one that serves `/metrics` when it is set.
#[derive(Debug, Clone, Copy)]
pub struct MetricsListener;

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn bearer_is(req: &HttpRequest, token: &str) -> bool {
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Hashed first so that the comparison takes as long whatever the lengths.
    sha256_hex(given)
        .as_bytes()
        .ct_eq(sha256_hex(token).as_bytes())
        .into()
}

/// Prometheus text exposition. With `metrics.token` set it needs that bearer token; with
/// `metrics.listen` set it is served only there.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, content_type = "text/plain; version=0.0.4", body = String),
    (status = 401, body = super::ErrorBody, description = "metrics.token is set and was not given"),
    (status = 404, body = super::ErrorBody, description = "metrics.listen is set: served there only")))]
pub async fn metrics(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let m = &state.settings.metrics;
    if m.listen.is_some() && req.app_data::<MetricsListener>().is_none() {
        return ApiError::not_found("route").error_response();
    }
    if let Some(token) = &m.token {
        if !bearer_is(&req, token) {
            return ApiError::new(ErrorCode::Unauthorized, "/metrics needs the metrics token")
                .error_response();
        }
    }
    // Counted by the feed; copied into their series at each scrape.
    let (dropped, gaps) = state.feed.bus_losses();
    for (c, now) in [
        (&state.metrics.feed_shared_dropped, dropped),
        (&state.metrics.feed_gaps, gaps),
    ] {
        c.inc_by(now.saturating_sub(c.get()));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
