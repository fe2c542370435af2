//! Sessions, orders (resolve, refund) and the blacklist: the money path's endpoints. The work
//! is the session supervisor's (`crate::sessions`); these handlers check who may ask.

use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use cabinet_actors::pricing::BasketItem;
use cabinet_actors::protocol::SessionMode;
use cabinet_actors::session::SessionState;

use super::auth::{Caller, Role};
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult};
use crate::sessions::{
    request_hash, Actor, Audited, Closer, Idempotency, RefundAnswer, StartSession, StartTimings,
};
use crate::store::{
    AuditRow, BlacklistRow, OrderFilter, OrderRow, PaymentExceptionRow, SettlementRow,
};
use crate::views::{ConfirmingView, List, OrderView, SessionView};

/// The `Idempotency-Key` header, when given, bound to this request: its method, path and
/// `body` (the parsed body, so that spacing or field order do not make it another request).
pub(super) fn idempotency(
    req: &HttpRequest,
    body: &serde_json::Value,
) -> ApiResult<Option<Idempotency>> {
    match req.headers().get("Idempotency-Key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(k)) if !k.is_empty() && k.len() <= 64 => Ok(Some(Idempotency {
            key: k.to_owned(),
            request_hash: request_hash(req.method().as_str(), req.path(), body),
        })),
        Some(_) => Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 64 visible characters",
        )),
    }
}

/// Starts a session and answers as `POST /api/v1/sessions` does: 201 with the session once the
/// cabinet acked the unlock, 202 with the session and the shopper's confirmation while it
/// waits for them, or the refusal; `Server-Timing` tells where the time went.
pub(super) async fn start_answer(
    state: &AppState,
    caller: &Caller,
    body: StartSession,
    idempotency: Option<Idempotency>,
) -> HttpResponse {
    let mut timings = StartTimings::default();
    let answer = state
        .sessions
        .start(caller.merchant.as_deref(), body, idempotency, &mut timings)
        .await;
    let mut response = match answer {
        Ok((status, body)) => HttpResponse::build(
            actix_web::http::StatusCode::from_u16(status)
                .unwrap_or(actix_web::http::StatusCode::CREATED),
        )
        .content_type("application/json")
        .body(body.get().to_owned()),
        Err(e) => actix_web::ResponseError::error_response(&e),
    };
    // Refusals before anything was stored have no stages to tell.
    if let Some(v) = (!timings.stages().is_empty())
        .then(|| HeaderValue::from_str(&timings.server_timing()).ok())
        .flatten()
    {
        response
            .headers_mut()
            .insert(HeaderName::from_static("server-timing"), v);
    }
    response
}

/// Starts a session. A purchase answers 202 once the provider's pay-after-use order exists:
/// the session (`confirming`) and the `confirmation` the merchant's front end passes on
/// unchanged to the shopper (需确认模式); the session then goes on by itself (follow it with
/// `GET /api/v1/sessions/{id}?wait_s=` or the feed). A restock answers 201 once the cabinet
/// acked the unlock. `Server-Timing` tells where the time went (checks, provider, unlock,
/// record).
#[utoipa::path(post, path = "/api/v1/sessions", tag = "sessions", request_body = StartSession,
    params(("Idempotency-Key" = Option<String>, Header, description = "a repeat answers the first result")),
    security(("bearer" = [])), responses((status = 201, body = SessionView, description = "restock: the door is open"),
    (status = 202, body = ConfirmingView, description = "purchase: the shopper confirms with `confirmation`"),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "cabinet_not_found"),
    (status = 409, body = ErrorBody, description = "cabinet_not_active, cabinet_busy, cabinet_faulted, unlock_rejected, request_in_progress"),
    (status = 422, body = ErrorBody, description = "service_expired, user_blacklisted, payment_declined, idempotency_key_reused"),
    (status = 503, body = ErrorBody, description = "cabinet_offline, unlock_timeout")))]
pub async fn start_session(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<StartSession>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Restocker)?;
    let body = body.into_inner();
    if body.mode == SessionMode::Purchase {
        caller.require(Role::Operator)?;
    }
    let idem = idempotency(
        &req,
        &serde_json::to_value(&body).map_err(ApiError::internal)?,
    )?;
    // Several nodes: the cabinet's actor may live on another one, which does the start.
    if let Some(node) = super::route::owner_of_visible(&state, &caller, &body.cabinet_id).await? {
        let call = super::route::Call::Start {
            caller: caller.clone(),
            body,
            idem,
        };
        return super::route::carry(&state, &node, &call).await;
    }
    Ok(start_answer(&state, &caller, body, idem).await)
}

/// `GET /api/v1/sessions/{id}` as a long poll.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SessionWait {
    /// Wait up to this many seconds (at most 30) for the session's state to change.
    wait_s: Option<u64>,
    /// The state the caller last saw (default: the state when the request came in): the
    /// answer comes at once when the session is no longer in it.
    from: Option<String>,
    /// Instead of the next change, wait until the session has reached this state or ended:
    /// `until=open` answers once the door is open, or with the failure if it never will be.
    until: Option<String>,
}

/// The longest long poll: under common proxies' idle timeouts.
const MAX_WAIT_S: u64 = 30;

/// Whether a session in `state` has reached `until`: the states run confirming → unlocking →
/// open → closed, and a failed session goes nowhere any more.
fn reached(state: &str, until: SessionState) -> bool {
    let rank = |s: SessionState| match s {
        SessionState::Confirming => 0,
        SessionState::Unlocking => 1,
        SessionState::Open => 2,
        SessionState::Closed | SessionState::Failed => 3,
    };
    state
        .parse::<SessionState>()
        .is_ok_and(|s| rank(s) >= rank(until) || s == SessionState::Failed)
}

/// A session and its order. With `?wait_s=N` (N ≤ 30) the answer comes as soon as the
/// session's state changes (from `from`, or from its state when asked), or once it reached
/// `until` (or ended), or after N seconds as it is then.
#[utoipa::path(get, path = "/api/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path), SessionWait),
    security(("bearer" = [])), responses((status = 200, body = SessionView), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody)))]
pub async fn get_session(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    wait: web::Query<SessionWait>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let wait_s = match wait.wait_s {
        Some(n) if n > MAX_WAIT_S => {
            return Err(ApiError::bad_request(format!(
                "wait_s must be at most {MAX_WAIT_S}"
            )))
        }
        n => n.unwrap_or(0),
    };
    let until = match (&wait.until, &wait.from) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("give from or until, not both"));
        }
        (Some(u), None) => Some(u.parse::<SessionState>().map_err(|_| {
            ApiError::bad_request(
                "until must be a session state: confirming, unlocking, open, closed or failed",
            )
        })?),
        _ => None,
    };
    // Registered before the read: a change committed between the two still arrives.
    let mut watch = (wait_s > 0).then(|| state.feed.watch_session(&path));
    let mut s = match state.store.session(&path).await? {
        Some(s) if caller.sees(&s.merchant_id) => s,
        _ => return Err(ApiError::not_found("session")),
    };
    if let Some(watch) = watch.as_mut() {
        let from = wait.from.clone().unwrap_or_else(|| s.state.clone());
        let done = |s: &crate::store::SessionRow| match until {
            Some(u) => reached(&s.state, u),
            None => s.state != from,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_s);
        // The committed rows come in commit order; one committed before the read may come
        // again, which changes nothing.
        while !done(&s) {
            match tokio::time::timeout_at(deadline, watch.next()).await {
                Ok(Some(row)) => s = row,
                _ => break,
            }
        }
    }
    drop(watch);
    // The session as committed (the change that woke the poll carries it); its order read
    // after it, so never older than the session beside it.
    let order = state.store.order_of_session(&s.id).await?;
    Ok(HttpResponse::Ok().json(SessionView {
        order: order.as_ref().map(OrderView::from),
        session: Some(s),
    }))
}

/// `POST /api/v1/sessions/{id}/close`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseBody {
    /// Why, 1 to 200 characters; recorded on the session with the operator's key id.
    reason: String,
}

/// Ends a session that is still under way (a shopper gone, a cabinet stuck busy) and frees its
/// cabinet. If the door cannot have opened the session fails `closed_by_operator` and the
/// provider order is cancelled; if it may have opened the order becomes abnormal
/// `closed_by_operator`, for a person to price what was taken.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/close", tag = "sessions", params(("id" = String, Path)),
    request_body = CloseBody, security(("bearer" = [])), responses((status = 200, body = SessionView),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "session_not_open")))]
pub async fn close_session(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<CloseBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let reason = body.into_inner().reason;
    if reason.trim().is_empty() || reason.chars().count() > 200 {
        return Err(ApiError::bad_request("reason must be 1 to 200 characters"));
    }
    match state.store.session(&path).await? {
        Some(s) if caller.sees(&s.merchant_id) => {
            let view = state
                .sessions
                .close(&s.id, Closer::Operator(&caller.key_id), reason.trim())
                .await?;
            let order_id = view.order.as_ref().map(|o| o.id.clone());
            state
                .sessions
                .audit(
                    actor(&caller),
                    Audited {
                        action: "session.close",
                        merchant_id: Some(&s.merchant_id),
                        subject: &s.id,
                        order_id: order_id.as_deref(),
                        reason: Some(reason.trim()),
                        detail: serde_json::json!({"state_before": s.state}),
                    },
                )
                .await;
            Ok(HttpResponse::Ok().json(view))
        }
        _ => Err(ApiError::not_found("session")),
    }
}

/// `GET /api/v1/orders` filters.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OrderQuery {
    /// Only this cabinet's.
    cabinet_id: Option<String>,
    /// Only orders in this status.
    status: Option<String>,
    /// Created at or after (RFC 3339).
    from: Option<String>,
    /// Created before (RFC 3339).
    to: Option<String>,
    /// At most this many, newest first (1 to 2000, default 200).
    limit: Option<i64>,
}

/// RFC 3339 to Unix ms, naming the parameter when it does not parse.
fn rfc3339_ms(name: &str, v: Option<&str>) -> ApiResult<Option<i64>> {
    v.map(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map(|d| (d.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| ApiError::bad_request(format!("{name} must be an RFC 3339 time")))
    })
    .transpose()
}

/// Orders, newest first.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders", params(OrderQuery),
    security(("bearer" = [])), responses((status = 200, body = List<OrderView>), (status = 400, body = ErrorBody)))]
pub async fn list_orders(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<OrderQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let q = q.into_inner();
    let rows = state
        .store
        .orders(&OrderFilter {
            merchant_id: caller.merchant.as_deref(),
            cabinet_id: q.cabinet_id.as_deref(),
            status: q.status.as_deref(),
            from: rfc3339_ms("from", q.from.as_deref())?,
            to: rfc3339_ms("to", q.to.as_deref())?,
            limit: q.limit.unwrap_or(200).clamp(1, 2000),
        })
        .await?;
    let items: Vec<_> = rows.iter().map(OrderView::from).collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

async fn visible_order(state: &AppState, caller: &Caller, id: &str) -> ApiResult<OrderRow> {
    match state.store.order(id).await? {
        Some(o) if caller.sees(&o.merchant_id) => Ok(o),
        _ => Err(ApiError::not_found("order")),
    }
}

/// An order with its refunds.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = OrderView), (status = 404, body = ErrorBody)))]
pub async fn get_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let o = visible_order(&state, &caller, &path).await?;
    // The refunds first, then the order again: a refund settles with its order in one
    // transaction, so an order read after its refunds counts every refund they show as
    // succeeded (read the other way round, a refund could show succeeded beside an order that
    // does not count it yet).
    let refunds = state.store.refunds(&o.id).await?;
    let o = state.store.order(&o.id).await?.unwrap_or(o);
    let mut v = OrderView::from(&o);
    v.refunds = Some(refunds);
    v.audit = Some(state.store.audit(None, Some(&o.id), None, 200).await?);
    let (settlement, returns) = (
        state.store.settlement(&o.id).await?,
        state.store.settlement_returns(&o.id).await?,
    );
    v.settlement = Some(crate::views::SettlementView::of(
        settlement.as_ref(),
        returns,
    ));
    Ok(HttpResponse::Ok().json(v))
}

/// `POST /api/v1/orders/{id}/resolve`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// What the shopper took, as a person saw it; empty when nothing.
    #[schema(value_type = Vec<Object>)]
    items: Vec<BasketItem>,
}

/// Resolves an abnormal order (异常订单) with the items a person saw: priced and charged as
/// usual (an empty list closes it at zero).
#[utoipa::path(post, path = "/api/v1/orders/{id}/resolve", tag = "orders", params(("id" = String, Path)),
    request_body = ResolveBody, security(("bearer" = [])), responses((status = 200, body = OrderView),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "order_not_abnormal"),
    (status = 422, body = ErrorBody, description = "unknown_product, basket_out_of_range (naming the line) or price_out_of_range")))]
pub async fn resolve_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ResolveBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let o = visible_order(&state, &caller, &path).await?;
    let items = body.into_inner().items;
    let detail = serde_json::json!({"items": items});
    let order = state.sessions.resolve(&o, items).await?;
    let mut detail = detail;
    detail["total_fen"] = serde_json::json!(order.total_fen);
    state
        .sessions
        .audit(
            actor(&caller),
            Audited {
                action: "order.resolve",
                merchant_id: Some(&o.merchant_id),
                subject: &o.id,
                order_id: Some(&o.id),
                reason: None,
                detail,
            },
        )
        .await;
    Ok(HttpResponse::Ok().json(order))
}

/// `POST /api/v1/orders/{id}/refund`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    /// Positive, at most what is left to refund.
    amount_fen: i64,
    /// 1 to 80 characters (the appeal, 客户申诉).
    reason: String,
}

/// Refunds part or all of a paid order.
#[utoipa::path(post, path = "/api/v1/orders/{id}/refund", tag = "orders", params(("id" = String, Path),
    ("Idempotency-Key" = Option<String>, Header, description = "a repeat retries the same refund")),
    request_body = RefundBody, security(("bearer" = [])), responses((status = 200, body = RefundAnswer),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 422, body = ErrorBody, description = "refund_exceeds_paid, idempotency_key_reused")))]
pub async fn refund_order(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<RefundBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let o = visible_order(&state, &caller, &path).await?;
    let idem = idempotency(
        &req,
        &serde_json::json!({"amount_fen": body.amount_fen, "reason": body.reason}),
    )?;
    let answer = state
        .sessions
        .refund(&o, body.amount_fen, &body.reason, idem)
        .await?;
    let refund_id = answer
        .refund
        .as_ref()
        .map(|r| r.id.as_str())
        .unwrap_or_default();
    state
        .sessions
        .audit(
            actor(&caller),
            Audited {
                action: "order.refund",
                merchant_id: Some(&o.merchant_id),
                subject: refund_id,
                order_id: Some(&o.id),
                reason: Some(&body.reason),
                detail: serde_json::json!({"amount_fen": body.amount_fen,
                    "status": answer.refund.as_ref().map(|r| r.status.as_str())}),
            },
        )
        .await;
    Ok(HttpResponse::Ok().json(answer))
}

/// Whose blacklist.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BlacklistQuery {
    /// Required for a platform key's changes; a platform key lists every merchant's without it.
    merchant_id: Option<String>,
}

/// `POST /api/v1/blacklist`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlacklistBody {
    /// Shopper (openid), 1 to 64 characters.
    user_id: String,
    /// 1 to 200 characters.
    reason: String,
    /// Required for a platform key.
    #[serde(default)]
    merchant_id: Option<String>,
}

/// The blacklist (黑名单): shoppers refused a session.
#[utoipa::path(get, path = "/api/v1/blacklist", tag = "blacklist", params(BlacklistQuery),
    security(("bearer" = [])), responses((status = 200, body = List<BlacklistRow>)))]
pub async fn list_blacklist(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<BlacklistQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let named = q.into_inner().merchant_id;
    let m = match (&caller.merchant, named) {
        (None, None) => None,
        (_, n) => Some(caller.acting_for(n.as_deref())?),
    };
    let items = state.store.blacklist(m.as_deref()).await?;
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// Adds a shopper to the blacklist by hand.
#[utoipa::path(post, path = "/api/v1/blacklist", tag = "blacklist", request_body = BlacklistBody,
    security(("bearer" = [])), responses((status = 201, body = BlacklistRow), (status = 400, body = ErrorBody)))]
pub async fn add_blacklist(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<BlacklistBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let b = body.into_inner();
    if b.user_id.is_empty()
        || b.user_id.len() > 64
        || b.reason.trim().is_empty()
        || b.reason.chars().count() > 200
    {
        return Err(ApiError::bad_request(
            "user_id (1-64) and reason (1-200) are required",
        ));
    }
    let m = caller.acting_for(b.merchant_id.as_deref())?;
    let row = BlacklistRow {
        merchant_id: m,
        user_id: b.user_id,
        reason: b.reason.trim().to_owned(),
        automatic: false,
        created_at: state.now(),
        created_by: caller.key_id.clone(),
    };
    state.store.blacklist_add(&row).await?;
    state
        .sessions
        .audit(
            actor(&caller),
            Audited {
                action: "blacklist.add",
                merchant_id: Some(&row.merchant_id),
                subject: &row.user_id,
                order_id: None,
                reason: Some(&row.reason),
                detail: serde_json::json!({"automatic": false}),
            },
        )
        .await;
    Ok(HttpResponse::Created().json(row))
}

/// Takes a shopper off the blacklist.
#[utoipa::path(delete, path = "/api/v1/blacklist/{user_id}", tag = "blacklist",
    params(("user_id" = String, Path), BlacklistQuery), security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove_blacklist(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<BlacklistQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let m = caller.acting_for(q.into_inner().merchant_id.as_deref())?;
    if state.store.blacklist_remove(&m, &path, false).await? {
        state
            .sessions
            .audit(
                actor(&caller),
                Audited {
                    action: "blacklist.remove",
                    merchant_id: Some(&m),
                    subject: &path,
                    order_id: None,
                    reason: None,
                    detail: serde_json::json!({}),
                },
            )
            .await;
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found("blacklist entry"))
    }
}

/// `GET /api/v1/payment-exceptions`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PaymentExceptionQuery {
    /// A platform key: one merchant's (default: all, including notices that name no order).
    merchant_id: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<i64>,
}

/// Provider notices that did not match the order they name (amount, app id, merchant ids, an
/// order of ours at all): not applied, kept here for a person to look at.
#[utoipa::path(get, path = "/api/v1/payment-exceptions", tag = "orders", params(PaymentExceptionQuery),
    security(("bearer" = [])), responses((status = 200, body = List<PaymentExceptionRow>)))]
pub async fn list_payment_exceptions(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<PaymentExceptionQuery>,
) -> ApiResult<HttpResponse> {
    let q = q.into_inner();
    let m = listing_scope(&caller, q.merchant_id)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = state.store.payment_exceptions(m.as_deref(), limit).await?;
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// `GET /api/v1/settlements`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SettlementQuery {
    /// A platform key: one merchant's (default: all).
    merchant_id: Option<String>,
    /// Only in this state: `pending`, `splitting`, `split`, `finished`, `failed`, `returned`.
    state: Option<String>,
    /// At most this many, most recently changed first (default 100, at most 1000).
    limit: Option<i64>,
}

const SETTLEMENT_STATES: [&str; 6] = [
    "pending",
    "splitting",
    "split",
    "finished",
    "failed",
    "returned",
];

/// Settlements (分账) of paid orders: how each payment is split between the platform and the
/// merchant, and how far it got; `?state=failed` lists those an operator has been told about.
#[utoipa::path(get, path = "/api/v1/settlements", tag = "orders", params(SettlementQuery),
    security(("bearer" = [])), responses((status = 200, body = List<SettlementRow>), (status = 400, body = ErrorBody)))]
pub async fn list_settlements(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<SettlementQuery>,
) -> ApiResult<HttpResponse> {
    let q = q.into_inner();
    let m = listing_scope(&caller, q.merchant_id)?;
    if let Some(s) = q.state.as_deref() {
        if !SETTLEMENT_STATES.contains(&s) {
            return Err(ApiError::bad_request(format!(
                "state must be one of {}",
                SETTLEMENT_STATES.join(", ")
            )));
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = state
        .store
        .settlements(m.as_deref(), q.state.as_deref(), limit)
        .await?;
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// Takes an order's settlement again now instead of at its next attempt (after fixing what
/// made it fail: a receiver bound, the platform's account funded). Audited.
#[utoipa::path(post, path = "/api/v1/orders/{id}/settlement/retry", tag = "orders", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = SettlementRow),
    (status = 404, body = ErrorBody, description = "no such order, or no settlement under way")))]
pub async fn retry_settlement(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let o = visible_order(&state, &caller, &path).await?;
    let Some(row) = state
        .store
        .retry_settlement(&o.id, state.sessions.now_ms())
        .await?
    else {
        return Err(ApiError::not_found("settlement under way"));
    };
    state
        .sessions
        .audit(
            actor(&caller),
            Audited {
                action: "settlement.retry",
                merchant_id: Some(&o.merchant_id),
                subject: &o.id,
                order_id: Some(&o.id),
                reason: None,
                detail: serde_json::json!({"state": row.state, "failures": row.failures}),
            },
        )
        .await;
    Ok(HttpResponse::Ok().json(row))
}

/// `GET /api/v1/sessions`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UnderWayQuery {
    /// A platform key: one merchant's (default: all).
    merchant_id: Option<String>,
    /// At most this many, oldest first (default 500, at most 5000).
    limit: Option<i64>,
}

/// The sessions still under way (confirming, unlocking, open): what the operator page lists
/// when it opens, so that a session stuck since before is there to be closed.
#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions", params(UnderWayQuery),
    security(("bearer" = [])), responses((status = 200, body = List<crate::store::SessionRow>)))]
pub async fn list_sessions(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<UnderWayQuery>,
) -> ApiResult<HttpResponse> {
    let q = q.into_inner();
    let m = listing_scope(&caller, q.merchant_id)?;
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let items = state.store.sessions_under_way(m.as_deref(), limit).await?;
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// Whose rows a viewer's list shows: a merchant key its own merchant's; a platform key all
/// (`None`), or the one it names.
fn listing_scope(caller: &Caller, merchant_id: Option<String>) -> ApiResult<Option<String>> {
    caller.require(Role::Viewer)?;
    caller.listing(merchant_id.as_deref())
}

/// The caller as the audit trail names it.
pub(super) fn actor(caller: &Caller) -> Actor<'_> {
    Actor {
        id: &caller.key_id,
        role: caller.role.as_str(),
    }
}

/// `GET /api/v1/audit`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// A platform key: one merchant's (default: all).
    merchant_id: Option<String>,
    /// One order's.
    order_id: Option<String>,
    /// One action (`order.refund`, …).
    action: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<i64>,
}

/// The audit trail: who resolved, refunded, closed, blacklisted or unblacklisted what, who
/// changed payment settings or API keys — when and why.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    security(("bearer" = [])), responses((status = 200, body = List<AuditRow>), (status = 403, body = ErrorBody)))]
pub async fn list_audit(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<AuditQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let q = q.into_inner();
    let m = match (&caller.merchant, q.merchant_id) {
        (None, None) => None,
        (_, n) => Some(caller.acting_for(n.as_deref())?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = state
        .store
        .audit(
            m.as_deref(),
            q.order_id.as_deref(),
            q.action.as_deref(),
            limit,
        )
        .await?;
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// `POST /api/v1/orders/{id}/modify`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModifyBody {
    /// The new, lower total, fen.
    amount_fen: i64,
    /// 1 to 50 characters: shown on the shopper's bill with the reduction.
    reason: String,
}

/// Lowers an order still waiting for its payment (待支付) through the provider's modify
/// (WeChat Pay Score); the provider deducts the lower amount. 409 `order_not_unpaid` for any
/// other order; Alipay orders are refunded once paid instead.
#[utoipa::path(post, path = "/api/v1/orders/{id}/modify", tag = "orders", params(("id" = String, Path)),
    request_body = ModifyBody, security(("bearer" = [])), responses((status = 200, body = OrderView),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "order_not_unpaid"),
    (status = 422, body = ErrorBody, description = "payment_declined: the provider refused")))]
pub async fn modify_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ModifyBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let o = visible_order(&state, &caller, &path).await?;
    let b = body.into_inner();
    let before = o.total_fen;
    let order = state.sessions.reduce(&o, b.amount_fen, &b.reason).await?;
    state
        .sessions
        .audit(
            actor(&caller),
            Audited {
                action: "order.modify",
                merchant_id: Some(&o.merchant_id),
                subject: &o.id,
                order_id: Some(&o.id),
                reason: Some(b.reason.trim()),
                detail: serde_json::json!({"from_fen": before, "to_fen": b.amount_fen}),
            },
        )
        .await;
    Ok(HttpResponse::Ok().json(order))
}
