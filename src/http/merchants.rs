//! Merchants, API keys, the caller's own identity and merchants' payment settings.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use cabinet_actors::ids::MerchantId;

use super::auth::{issue_key, Caller, Role};
use super::state::AppState;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::sessions::{Audited, PaymentReadiness};
use crate::store::{MerchantPayment, MerchantRow, StoreError};
use crate::views::rfc3339;

/// `POST /api/v1/merchants`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMerchant {
    /// Id.
    #[schema(value_type = String)]
    id: MerchantId,
    /// Name.
    name: String,
    /// Platform commission in basis points, at most 3000 (30%).
    #[serde(default)]
    commission_bps: i64,
}

/// A merchant.
#[derive(Serialize, ToSchema)]
pub struct MerchantView {
    /// Id.
    id: String,
    /// Name.
    name: String,
    /// Platform commission in basis points.
    commission_bps: i64,
    /// RFC 3339.
    created_at: Option<String>,
}

/// Creates a merchant.
#[utoipa::path(post, path = "/api/v1/merchants", tag = "merchants", request_body = NewMerchant,
    security(("bearer" = [])), responses((status = 201, body = MerchantView),
    (status = 400, body = super::ErrorBody), (status = 409, body = super::ErrorBody, description = "merchant_exists")))]
pub async fn create_merchant(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewMerchant>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let b = body.into_inner();
    if !(0..=3000).contains(&b.commission_bps) {
        return Err(ApiError::bad_request(
            "commission_bps must be between 0 and 3000 (30%)",
        ));
    }
    if b.name.trim().is_empty() || b.name.len() > 200 {
        return Err(ApiError::bad_request("name must be 1 to 200 characters"));
    }
    let row = MerchantRow {
        id: b.id.to_string(),
        name: b.name,
        commission_bps: b.commission_bps,
        created_at: state.now(),
    };
    match state.store.create_merchant(&row).await {
        Ok(()) => Ok(HttpResponse::Created().json(MerchantView {
            created_at: rfc3339(row.created_at),
            id: row.id,
            name: row.name,
            commission_bps: row.commission_bps,
        })),
        Err(StoreError::Conflict) => Err(ApiError::new(
            ErrorCode::MerchantExists,
            format!("merchant {} exists", row.id),
        )),
        Err(e) => Err(e.into()),
    }
}

/// `POST /api/v1/api-keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Required for every role but `admin`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    merchant_id: Option<MerchantId>,
    /// `admin`, `merchant_admin`, `operator`, `restocker` or `viewer`.
    role: String,
}

/// A key just created: the only time the key itself is shown.
#[derive(Serialize, ToSchema)]
pub struct IssuedKey {
    /// Public id.
    id: String,
    /// The key (`chk_…`); store it, it is not shown again.
    key: String,
    /// Role.
    role: Role,
    /// Scope.
    merchant_id: Option<String>,
}

impl IssuedKey {
    /// A key as handed out, once.
    pub(crate) fn new(id: String, key: String, role: Role, merchant_id: Option<String>) -> Self {
        Self {
            id,
            key,
            role,
            merchant_id,
        }
    }
}

/// Creates an API key, no stronger than the caller's own.
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "merchants", request_body = NewKey,
    security(("bearer" = [])), responses((status = 201, body = IssuedKey), (status = 400, body = super::ErrorBody),
    (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub async fn create_key(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewKey>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let b = body.into_inner();
    let role: Role = b.role.parse().map_err(|_| {
        ApiError::bad_request(
            "role must be one of admin, merchant_admin, operator, restocker, viewer",
        )
    })?;
    if role > caller.role {
        return Err(ApiError::forbidden());
    }
    let merchant = match (role, b.merchant_id) {
        (Role::Admin, None) => None,
        (Role::Admin, Some(_)) => {
            return Err(ApiError::bad_request(
                "merchant_id: an admin key is platform-wide",
            ))
        }
        (_, None) => {
            return Err(ApiError::bad_request(
                "merchant_id is required for this role",
            ))
        }
        (_, Some(m)) => Some(caller.acting_for_existing(&state, Some(&m)).await?),
    };
    let (id, key) = issue_key(&state, merchant.as_deref(), role).await?;
    state
        .sessions
        .audit(
            super::sessions::actor(&caller),
            Audited {
                action: "api_key.create",
                merchant_id: merchant.as_deref(),
                subject: &id,
                order_id: None,
                reason: None,
                detail: serde_json::json!({"role": role.as_str()}),
            },
        )
        .await;
    Ok(HttpResponse::Created().json(IssuedKey {
        id,
        key,
        role,
        merchant_id: merchant,
    }))
}

/// The caller's key.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// Key id.
    key_id: String,
    /// Role.
    role: Role,
    /// Scope; absent for a platform key.
    merchant_id: Option<String>,
}

/// Who the key belongs to.
#[utoipa::path(get, path = "/api/v1/me", tag = "merchants", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = super::ErrorBody)))]
pub async fn whoami(caller: Caller) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(Me {
        key_id: caller.key_id,
        role: caller.role,
        merchant_id: caller.merchant,
    }))
}

/// `PUT /api/v1/merchants/{id}/payment`: every setting (a field left out is cleared, but for
/// the Alipay token, which is never shown back: left out it is kept, `""` clears it).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    /// The pay-after-use risk ceiling (`risk_fund.amount`), fen: 100 to 1,000,000.
    risk_ceiling_fen: i64,
    /// The merchant's WeChat second-level merchant number (digits, at most 32).
    #[serde(default)]
    wechat_sub_mchid: Option<String>,
    /// The customer-service phone shoppers see with the order (digits, `+`, `-`, space; at
    /// most 20).
    #[serde(default)]
    service_phone: Option<String>,
    /// The merchant's Alipay sub-merchant id (smid; letters and digits, at most 32).
    #[serde(default)]
    alipay_smid: Option<String>,
    /// The `app_auth_token` the merchant granted the platform's Alipay app (secret: never shown
    /// again, only whether it is set).
    #[serde(default)]
    alipay_app_auth_token: Option<String>,
}

/// A merchant's payment settings as shown (no secret) and whether each channel is ready.
#[derive(Serialize, ToSchema)]
pub struct PaymentView {
    /// The merchant.
    merchant_id: String,
    /// Fen.
    risk_ceiling_fen: i64,
    /// WeChat second-level merchant number.
    wechat_sub_mchid: Option<String>,
    /// Customer-service phone.
    service_phone: Option<String>,
    /// Alipay sub-merchant id.
    alipay_smid: Option<String>,
    /// Whether the merchant's Alipay authorisation (`app_auth_token`) is set.
    alipay_authorized: bool,
    /// Per channel: ready, what is missing, whether the simulator stands in.
    readiness: PaymentReadiness,
}

fn payment_view(state: &AppState, merchant_id: String, p: &MerchantPayment) -> PaymentView {
    PaymentView {
        merchant_id,
        risk_ceiling_fen: p.risk_ceiling_fen,
        wechat_sub_mchid: p.wechat_sub_mchid.clone(),
        service_phone: p.service_phone.clone(),
        alipay_smid: p.alipay_smid.clone(),
        alipay_authorized: p.alipay_app_auth_token.is_some(),
        readiness: state.sessions.readiness(p),
    }
}

/// An optional setting: trimmed, empty is unset, else within `max` characters of `allowed`.
fn setting(
    field: &str,
    v: Option<&str>,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> ApiResult<Option<String>> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if v.chars().count() > max || !v.chars().all(allowed) {
        return Err(ApiError::bad_request(format!(
            "{field} must be at most {max} allowed characters"
        )));
    }
    Ok(Some(v.to_owned()))
}

/// Sets a merchant's payment settings (platform admin: the platform onboards its merchants
/// with the providers).
#[utoipa::path(put, path = "/api/v1/merchants/{id}/payment", tag = "merchants", request_body = PaymentSettings,
    params(("id" = String, Path, description = "merchant id")), security(("bearer" = [])),
    responses((status = 200, body = PaymentView), (status = 400, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub async fn merchant_payment(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<PaymentSettings>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    if state.store.merchant(&path).await?.is_none() {
        return Err(ApiError::not_found("merchant"));
    }
    if !(100..=1_000_000).contains(&body.risk_ceiling_fen) {
        return Err(ApiError::bad_request(
            "risk_ceiling_fen must be 100 to 1000000",
        ));
    }
    let p = MerchantPayment {
        risk_ceiling_fen: body.risk_ceiling_fen,
        wechat_sub_mchid: setting(
            "wechat_sub_mchid",
            body.wechat_sub_mchid.as_deref(),
            32,
            |c| c.is_ascii_digit(),
        )?,
        service_phone: setting("service_phone", body.service_phone.as_deref(), 20, |c| {
            c.is_ascii_digit() || "+- ".contains(c)
        })?,
        alipay_smid: setting("alipay_smid", body.alipay_smid.as_deref(), 32, |c| {
            c.is_ascii_alphanumeric()
        })?,
        alipay_app_auth_token: match body.alipay_app_auth_token.as_deref() {
            // Never shown back, so never required again: left out, it is kept ("" clears it).
            None => state
                .store
                .merchant_payment(&path)
                .await?
                .and_then(|p| p.alipay_app_auth_token),
            token => setting("alipay_app_auth_token", token, 128, |c| {
                c.is_ascii_graphic()
            })?,
        },
        // Not payment settings: kept as they are (`…/recognition` sets them).
        ..MerchantPayment::default()
    };
    state.store.set_merchant_payment(&path, &p).await?;
    let view = payment_view(&state, path.into_inner(), &p);
    state
        .sessions
        .audit(
            super::sessions::actor(&caller),
            Audited {
                action: "merchant.payment",
                merchant_id: Some(&view.merchant_id),
                subject: &view.merchant_id,
                order_id: None,
                reason: None,
                // The settings as shown: the token only as whether it is set.
                detail: serde_json::json!({"risk_ceiling_fen": view.risk_ceiling_fen,
                    "wechat_sub_mchid": view.wechat_sub_mchid, "service_phone": view.service_phone,
                    "alipay_smid": view.alipay_smid, "alipay_authorized": view.alipay_authorized}),
            },
        )
        .await;
    Ok(HttpResponse::Ok().json(view))
}

/// A merchant's payment settings, when the caller may see the merchant (404 otherwise).
async fn visible_payment(
    state: &AppState,
    caller: &Caller,
    merchant_id: &str,
) -> ApiResult<MerchantPayment> {
    if !caller.sees(merchant_id) {
        return Err(ApiError::not_found("merchant"));
    }
    state
        .store
        .merchant_payment(merchant_id)
        .await?
        .ok_or_else(|| ApiError::not_found("merchant"))
}

/// A merchant's payment settings (no secret) and readiness per channel: the platform's and
/// the merchant's own keys.
#[utoipa::path(get, path = "/api/v1/merchants/{id}/payment", tag = "merchants",
    params(("id" = String, Path, description = "merchant id")), security(("bearer" = [])),
    responses((status = 200, body = PaymentView), (status = 404, body = super::ErrorBody)))]
pub async fn merchant_payment_view(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let p = visible_payment(&state, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(payment_view(&state, path.into_inner(), &p)))
}

/// A merchant's recognition billing (算法识别次数).
#[derive(Serialize, ToSchema)]
pub struct RecognitionAccount {
    /// Merchant.
    merchant_id: String,
    /// `postpaid` (on the day's bill) or `prepaid` (from the quota).
    billing: String,
    /// What is left of the prepaid quota (below zero: owed, taken from the next top-up).
    quota_left: i64,
    /// The quota is at or below the warning level (`recognition.low_quota`).
    low: bool,
    /// A prepaid merchant with none left: `refuse` new purchases, or `continue`.
    when_exhausted: String,
    /// What a recognition paid after use costs (fen).
    fee_fen: i64,
    /// Recognitions so far today (the hub's local day).
    used_today: i64,
    /// What today's cost after use (fen).
    fee_today_fen: i64,
}

async fn recognition_account(
    state: &AppState,
    merchant_id: String,
    p: &MerchantPayment,
) -> ApiResult<RecognitionAccount> {
    const DAY: i64 = 86_400_000;
    let off = i64::from(state.settings.pricing.utc_offset_min) * 60_000;
    let now = state.now();
    let from = (now + off).div_euclid(DAY) * DAY - off;
    let (used_today, fee_today_fen) = state
        .store
        .recognitions_between(&merchant_id, from, from + DAY)
        .await?;
    let r = &state.settings.recognition;
    Ok(RecognitionAccount {
        merchant_id,
        billing: if p.recognition_prepaid {
            "prepaid"
        } else {
            "postpaid"
        }
        .to_owned(),
        quota_left: p.recognition_quota,
        low: p.recognition_prepaid && p.recognition_quota <= r.low_quota,
        when_exhausted: r.when_exhausted.clone(),
        fee_fen: r.fee_fen,
        used_today,
        fee_today_fen,
    })
}

/// A merchant's recognition billing: how it pays, its quota, today's use.
#[utoipa::path(get, path = "/api/v1/merchants/{id}/recognition", tag = "merchants",
    params(("id" = String, Path, description = "merchant id")), security(("bearer" = [])),
    responses((status = 200, body = RecognitionAccount), (status = 404, body = super::ErrorBody)))]
pub async fn recognition_view(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let p = visible_payment(&state, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(recognition_account(&state, path.into_inner(), &p).await?))
}

/// `PUT /api/v1/merchants/{id}/recognition`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecognitionChange {
    /// `prepaid` or `postpaid` (unchanged when left out).
    billing: Option<String>,
    /// Recognitions bought for the prepaid quota (0 to 10,000,000; added to what is left).
    add_quota: Option<i64>,
    /// Why (the payment's reference), kept in the audit.
    reason: Option<String>,
}

/// The platform sets how a merchant pays for recognitions and tops its quota up. Audited.
#[utoipa::path(put, path = "/api/v1/merchants/{id}/recognition", tag = "merchants",
    params(("id" = String, Path, description = "merchant id")), request_body = RecognitionChange,
    security(("bearer" = [])),
    responses((status = 200, body = RecognitionAccount), (status = 400, body = super::ErrorBody),
    (status = 404, body = super::ErrorBody)))]
pub async fn set_recognition(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<RecognitionChange>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let billing = match body.billing.as_deref() {
        None => None,
        Some(b @ ("prepaid" | "postpaid")) => Some(b),
        Some(_) => {
            return Err(ApiError::bad_request(
                "billing must be \"prepaid\" or \"postpaid\"",
            ))
        }
    };
    let add = body.add_quota.unwrap_or(0);
    if !(0..=10_000_000).contains(&add) {
        return Err(ApiError::bad_request("add_quota must be 0 to 10000000"));
    }
    if body
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 200)
    {
        return Err(ApiError::bad_request("reason: at most 200 characters"));
    }
    // Owed recognitions (a prepaid quota below zero) are settled by a top-up first: switching
    // to after-use billing would forgive them.
    if billing == Some("postpaid") {
        if let Some(p) = state.store.merchant_payment(&path).await? {
            if p.recognition_prepaid && p.recognition_quota + add < 0 {
                return Err(ApiError::bad_request(format!(
                    "{} recognitions are owed: top the quota up to at least 0 before switching to postpaid",
                    -(p.recognition_quota + add)
                )));
            }
        }
    }
    let Some((billing_now, left)) = state.store.set_recognition(&path, billing, add).await? else {
        return Err(ApiError::not_found("merchant"));
    };
    state
        .sessions
        .audit(
            super::sessions::actor(&caller),
            Audited {
                action: "recognition.set",
                merchant_id: Some(&path),
                subject: &path,
                order_id: None,
                reason: body.reason.as_deref(),
                detail: serde_json::json!({"billing": billing_now, "added": add, "quota_left": left}),
            },
        )
        .await;
    let p = state
        .store
        .merchant_payment(&path)
        .await?
        .ok_or_else(|| ApiError::not_found("merchant"))?;
    Ok(HttpResponse::Ok().json(recognition_account(&state, path.into_inner(), &p).await?))
}
