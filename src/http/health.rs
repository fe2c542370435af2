//! Liveness, readiness and Prometheus metrics: no key needed, as probes and scrapers have none.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::state::AppState;

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
    /// `not_configured` on a single node.
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
    let broker = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(state.mqtt_probe),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let body = Readiness {
        ready: database && pump && broker,
        database,
        broker: broker && pump,
        redis: "not_configured",
    };
    if body.ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
