//! Alerts: history, acknowledgement and clearing by an operator.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use cabinet_actors::alert::AlertType;
use cabinet_actors::ids::CabinetId;

use super::auth::{Caller, Role};
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult};
use crate::store::{AlertFilter, AlertRow};
use crate::views::{AlertView, List};

/// `GET /api/v1/alerts` filters.
#[derive(Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// Only active (true) or only ended (false).
    active: Option<bool>,
    /// Only this cabinet's.
    cabinet_id: Option<String>,
    /// At most this many, newest first (1 to 5000, default 500).
    limit: Option<i64>,
}

/// Alerts, newest first.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", params(AlertQuery), security(("bearer" = [])),
    responses((status = 200, body = List<AlertView>)))]
pub async fn list_alerts(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<AlertQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let q = q.into_inner();
    let rows = state
        .store
        .alerts(&AlertFilter {
            merchant_id: caller.merchant.clone(),
            cabinet_id: q.cabinet_id,
            active: q.active,
            limit: q.limit.unwrap_or(500).clamp(1, 5000),
        })
        .await?;
    let items: Vec<AlertView> = rows.iter().map(AlertView::from).collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

async fn visible_alert(state: &AppState, caller: &Caller, id: &str) -> ApiResult<AlertRow> {
    match state.store.alert(id).await? {
        Some(a) if caller.sees(&a.merchant_id) => Ok(a),
        _ => Err(ApiError::not_found("alert")),
    }
}

/// The stored alert's type and cabinet, when both still parse (rows outlive alert types).
fn alert_target(a: &AlertRow) -> Option<(AlertType, CabinetId)> {
    Some((
        AlertType::parse(&a.kind)?,
        CabinetId::parse(&a.cabinet_id).ok()?,
    ))
}

/// Acknowledges an alert: someone is on it.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/ack", tag = "alerts", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = AlertView), (status = 404, body = ErrorBody)))]
pub async fn ack_alert(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let a = visible_alert(&state, &caller, &path).await?;
    state
        .store
        .ack_alert(&a.id, &caller.key_id, state.now())
        .await?;
    if let Some((kind, cid)) = alert_target(&a) {
        if let Some(cabinet) = state
            .registry
            .get(&cid)
            .filter(|_| state.cluster.serves(cid.as_str()))
        {
            // The history above is what the answer shows; the actor's copy follows.
            let _ = cabinet.ack_alert(kind).await;
        } else if let Ok(Some(node)) = super::route::owner_elsewhere(&state, &cid).await {
            let call = super::route::Call::AlertAck {
                cabinet_id: cid.to_string(),
                alert: kind,
            };
            let _ = super::route::carry_reply(&state, &node, &call).await;
        }
    }
    let a = visible_alert(&state, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(AlertView::from(&a)))
}

/// Clears an alert by hand.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/clear", tag = "alerts", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = AlertView), (status = 404, body = ErrorBody)))]
pub async fn clear_alert(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let a = visible_alert(&state, &caller, &path).await?;
    if a.cleared_at.is_some() {
        return Ok(HttpResponse::Ok().json(AlertView::from(&a)));
    }
    // History first, so the answer below already shows the clear; the actor's own write of
    // the same clear is then a no-op.
    state
        .store
        .clear_alert(&a.id, &caller.key_id, state.now())
        .await?;
    if let Some((kind, cid)) = alert_target(&a) {
        if let Some(cabinet) = state
            .registry
            .get(&cid)
            .filter(|_| state.cluster.serves(cid.as_str()))
        {
            let _ = cabinet.clear_alert(kind, caller.key_id.clone()).await;
        } else if let Ok(Some(node)) = super::route::owner_elsewhere(&state, &cid).await {
            let call = super::route::Call::AlertClear {
                cabinet_id: cid.to_string(),
                alert: kind,
                by: caller.key_id.clone(),
            };
            let _ = super::route::carry_reply(&state, &node, &call).await;
        }
    }
    let a = visible_alert(&state, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(AlertView::from(&a)))
}
