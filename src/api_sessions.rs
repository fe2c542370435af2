//! Sessions, orders, payment notifications, merchant payment settings and the simulator's
//! control API.

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, ApiResult, Caller, Role};
use crate::app::AppState;
use crate::payments::sim_wechat::{Deduction, UserScript};
use crate::payments::wechat::SignedHeaders;
use crate::sessions::{order_view, StartSession, StartTimings};

async fn start_session(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<StartSession>,
) -> ApiResult {
    caller.require(Role::Restocker)?;
    let body = body.into_inner();
    if body.mode == cabinet_actors::protocol::SessionMode::Purchase {
        caller.require(Role::Operator)?;
    }
    let key = idempotency_key(&req)?;
    let mut timings = StartTimings::default();
    let mut response = match state
        .sessions
        .start(caller.merchant.as_deref(), body, key, &mut timings)
        .await
    {
        Ok(v) => HttpResponse::Created().json(v),
        Err(r) => refused_response(r),
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
    Ok(response)
}

async fn get_session(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    match state.store.session(&path).await? {
        Some(s) if caller.sees(&s.merchant_id) => {
            Ok(HttpResponse::Ok().json(state.sessions.view(&s.id).await?))
        }
        _ => Err(ApiError::NotFound("session")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderQuery {
    cabinet_id: Option<String>,
    status: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
    limit: Option<i64>,
}

/// RFC 3339 to Unix ms, naming the parameter when it does not parse.
fn rfc3339_ms(name: &str, v: Option<&str>) -> ApiResult<Option<i64>> {
    v.map(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map(|d| (d.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an RFC 3339 time")))
    })
    .transpose()
}

async fn list_orders(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<OrderQuery>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let q = q.into_inner();
    let rows = state
        .store
        .orders(
            caller.merchant.as_deref(),
            q.cabinet_id.as_deref(),
            q.status.as_deref(),
            (
                rfc3339_ms("from", q.from.as_deref())?,
                rfc3339_ms("to", q.to.as_deref())?,
            ),
            q.limit.unwrap_or(200).clamp(1, 2000),
        )
        .await?;
    let items: Vec<_> = rows.iter().map(order_view).collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "count": items.len()})))
}

/// WeChat's notifications: no API key; the platform signature is the credential.
async fn wechat_notify(state: web::Data<AppState>, req: HttpRequest, body: String) -> HttpResponse {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let headers = SignedHeaders {
        timestamp: h("Wechatpay-Timestamp"),
        nonce: h("Wechatpay-Nonce"),
        signature: h("Wechatpay-Signature"),
        serial: h("Wechatpay-Serial"),
    };
    match state.sessions.on_wechat_notification(&headers, &body).await {
        Ok(()) => HttpResponse::NoContent().finish(),
        Err("store_error") => {
            HttpResponse::InternalServerError().json(json!({"code": "FAIL", "message": "失败"}))
        }
        Err(reason) => {
            HttpResponse::Unauthorized().json(json!({"code": "FAIL", "message": reason}))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PaymentSettingsBody {
    risk_ceiling_fen: i64,
    #[serde(default)]
    wechat_sub_mchid: Option<String>,
}

async fn merchant_payment(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<PaymentSettingsBody>,
) -> ApiResult {
    caller.require(Role::Admin)?;
    if state.store.merchant(&path).await?.is_none() {
        return Err(ApiError::NotFound("merchant"));
    }
    if !(100..=1_000_000).contains(&body.risk_ceiling_fen) {
        return Err(ApiError::BadRequest(
            "risk_ceiling_fen must be 100 to 1000000".into(),
        ));
    }
    state
        .store
        .set_merchant_payment(
            &path,
            body.risk_ceiling_fen,
            body.wechat_sub_mchid.as_deref(),
        )
        .await?;
    Ok(HttpResponse::Ok().json(json!({"merchant_id": *path, "risk_ceiling_fen": body.risk_ceiling_fen, "wechat_sub_mchid": body.wechat_sub_mchid})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimUserBody {
    #[serde(default = "yes")]
    confirm: bool,
    #[serde(default = "succeed")]
    deduction: Deduction,
    #[serde(default)]
    cancel_delay_ms: u64,
}

fn yes() -> bool {
    true
}

fn succeed() -> Deduction {
    Deduction::Succeed
}

async fn sim_user(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<SimUserBody>,
) -> ApiResult {
    caller.require(Role::Admin)?;
    let sim = state
        .wechat_sim
        .as_ref()
        .ok_or(ApiError::NotFound("simulator"))?;
    let script = UserScript {
        confirm: body.confirm,
        deduction: body.deduction,
        // Bounded: a script is a test's, and a minute covers any client timeout worth testing.
        cancel_delay_ms: body.cancel_delay_ms.min(60_000),
    };
    sim.set_user(&path, script);
    if let Some(a) = &state.alipay_sim {
        a.set_user(&path, script);
    }
    Ok(HttpResponse::Ok().json(json!({"user_id": *path, "script": script})))
}

async fn sim_user_pays(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Admin)?;
    let sim = state
        .wechat_sim
        .as_ref()
        .ok_or(ApiError::NotFound("simulator"))?;
    let alipay = state.alipay_sim.as_ref().map_or(0, |a| a.user_pays(&path));
    Ok(HttpResponse::Ok()
        .json(json!({"user_id": *path, "orders_paid": sim.user_pays(&path) + alipay})))
}

/// Mounts the routes: the `/api/v1` ones on `scope`, the simulator control on `cfg`.
pub fn configure(scope: actix_web::Scope) -> actix_web::Scope {
    scope
        .route("/sessions", web::post().to(start_session))
        .route("/sessions/{id}", web::get().to(get_session))
        .route("/orders", web::get().to(list_orders))
        .route("/orders/{id}", web::get().to(get_order))
        .route("/orders/{id}/resolve", web::post().to(resolve_order))
        .route("/orders/{id}/refund", web::post().to(refund_order))
        .route("/blacklist", web::get().to(list_blacklist))
        .route("/blacklist", web::post().to(add_blacklist))
        .route("/blacklist/{user_id}", web::delete().to(remove_blacklist))
        .route("/payments/wechat/notify", web::post().to(wechat_notify))
        .route("/payments/alipay/notify", web::post().to(alipay_notify))
        .route("/merchants/{id}/payment", web::put().to(merchant_payment))
}

/// The simulator's control API (admin only): script a shopper, or have them pay.
pub fn configure_sim_control(cfg: &mut web::ServiceConfig) {
    cfg.route("/sim/users/{user_id}", web::put().to(sim_user))
        .route("/sim/users/{user_id}/pay", web::post().to(sim_user_pays))
        .route("/sim/wechatpay-redeliver", web::post().to(sim_redeliver));
}

/// WeChat delivers every notification again (it does when unsure an answer arrived).
async fn sim_redeliver(state: web::Data<AppState>, caller: Caller) -> ApiResult {
    caller.require(Role::Admin)?;
    let sim = state
        .wechat_sim
        .as_ref()
        .ok_or(ApiError::NotFound("simulator"))?;
    Ok(HttpResponse::Ok().json(json!({"redelivered": sim.redeliver_all().await})))
}

async fn visible_order(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> ApiResult<crate::store::OrderRow> {
    match state.store.order(id).await? {
        Some(o) if caller.sees(&o.merchant_id) => Ok(o),
        _ => Err(ApiError::NotFound("order")),
    }
}

fn refused_response(r: crate::sessions::Refused) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(r.status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut b = HttpResponse::build(status);
    if r.status == 503 {
        b.insert_header(("Retry-After", "5"));
    }
    b.json(json!({"error": {"code": r.code, "message": r.message}}))
}

async fn get_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let o = visible_order(&state, &caller, &path).await?;
    let mut v = order_view(&o);
    v["refunds"] =
        serde_json::to_value(state.store.refunds(&o.id).await?).map_err(anyhow::Error::from)?;
    Ok(HttpResponse::Ok().json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    items: Vec<cabinet_actors::pricing::BasketItem>,
}

async fn resolve_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ResolveBody>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let o = visible_order(&state, &caller, &path).await?;
    Ok(
        match state.sessions.resolve(&o, body.into_inner().items).await {
            Ok(v) => HttpResponse::Ok().json(v),
            Err(r) => refused_response(r),
        },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    amount_fen: i64,
    reason: String,
}

fn idempotency_key(req: &HttpRequest) -> ApiResult<Option<String>> {
    match req.headers().get("Idempotency-Key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(k)) if !k.is_empty() && k.len() <= 64 => Ok(Some(k.to_owned())),
        Some(_) => Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 64 visible characters".into(),
        )),
    }
}

async fn refund_order(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<RefundBody>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let o = visible_order(&state, &caller, &path).await?;
    let key = idempotency_key(&req)?;
    Ok(
        match state
            .sessions
            .refund(&o, body.amount_fen, &body.reason, key)
            .await
        {
            Ok(v) => HttpResponse::Ok().json(v),
            Err(r) => refused_response(r),
        },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlacklistQuery {
    merchant_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlacklistBody {
    user_id: String,
    reason: String,
    #[serde(default)]
    merchant_id: Option<String>,
}

/// The merchant a blacklist request is about: a scoped key's own, or the one an admin names.
fn scoped_merchant(caller: &Caller, named: Option<String>) -> ApiResult<String> {
    match (&caller.merchant, named) {
        (Some(own), None) => Ok(own.clone()),
        (Some(own), Some(n)) if &n == own => Ok(n),
        (Some(_), Some(_)) => Err(ApiError::NotFound("merchant")),
        (None, Some(n)) => Ok(n),
        (None, None) => Err(ApiError::BadRequest(
            "merchant_id is required for a platform key".into(),
        )),
    }
}

async fn list_blacklist(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<BlacklistQuery>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let named = q.into_inner().merchant_id;
    let m = match (&caller.merchant, named) {
        (None, None) => None,
        (_, n) => Some(scoped_merchant(&caller, n)?),
    };
    let items = state.store.blacklist(m.as_deref()).await?;
    Ok(HttpResponse::Ok().json(json!({"count": items.len(), "items": items})))
}

async fn add_blacklist(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<BlacklistBody>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let b = body.into_inner();
    if b.user_id.is_empty()
        || b.user_id.len() > 64
        || b.reason.trim().is_empty()
        || b.reason.chars().count() > 200
    {
        return Err(ApiError::BadRequest(
            "user_id (1-64) and reason (1-200) are required".into(),
        ));
    }
    let m = scoped_merchant(&caller, b.merchant_id)?;
    state
        .store
        .blacklist_add(
            &m,
            &b.user_id,
            b.reason.trim(),
            false,
            &caller.key_id,
            state.now(),
        )
        .await?;
    Ok(HttpResponse::Created()
        .json(json!({"merchant_id": m, "user_id": b.user_id, "reason": b.reason.trim()})))
}

async fn remove_blacklist(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<BlacklistQuery>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let m = scoped_merchant(&caller, q.into_inner().merchant_id)?;
    if state.store.blacklist_remove(&m, &path, false).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound("blacklist entry"))
    }
}

/// Alipay's notifications: form parameters signed by Alipay; answered `success` once applied.
async fn alipay_notify(
    state: web::Data<AppState>,
    form: web::Form<std::collections::BTreeMap<String, String>>,
) -> HttpResponse {
    match state
        .sessions
        .on_alipay_notification(&form.into_inner())
        .await
    {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("success"),
        Err("store_error") => HttpResponse::InternalServerError().body("fail"),
        Err(reason) => HttpResponse::BadRequest().body(format!("fail: {reason}")),
    }
}
