//! The simulators' control API (admin only, simulator builds only): script a shopper, have
//! them pay, or have WeChat deliver every notification again.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::auth::{Caller, Role};
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult};
use crate::simulators::wechat::{Confirm, Deduction, MerchantScript, RefundScript, UserScript};
use crate::simulators::Simulators;

super::routes! {
    put "/sim/users/{user_id}" => sim_user,
    put "/sim/merchants/{sub_mchid}" => sim_merchant,
    post "/sim/users/{user_id}/pay" => sim_user_pays,
    post "/sim/wechatpay-redeliver" => sim_redeliver,
    post "/sim/wechatpay/confirm" => sim_wechat_confirm,
    post "/sim/alipay/confirm" => sim_alipay_confirm,
    post "/sim/wechatpay/native/pay" => sim_native_pay,
}

/// The control routes' part of the contract.
#[derive(OpenApi)]
#[openapi(paths(
    sim_user,
    sim_merchant,
    sim_user_pays,
    sim_redeliver,
    sim_wechat_confirm,
    sim_alipay_confirm,
    sim_native_pay
))]
pub struct SimDoc;

fn simulators(state: &AppState) -> ApiResult<&Simulators> {
    state
        .simulators
        .as_ref()
        .ok_or_else(|| ApiError::not_found("simulator"))
}

/// `PUT /sim/users/{user_id}`: how a simulated shopper behaves.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimUserBody {
    /// Confirms pay-after-use: `true` (at once, the default), `false` (never) or `"manual"`
    /// (only through `POST /sim/wechatpay/confirm` or `POST /sim/alipay/confirm`).
    #[serde(default = "yes")]
    #[schema(value_type = Object)]
    confirm: Confirm,
    /// `succeed`, `fail` (pending payment: the shopper's funds) or `merchant_limit` (the
    /// merchant's collection limit: Alipay says so; WeChat does not).
    #[serde(default = "succeed")]
    #[schema(value_type = String)]
    deduction: Deduction,
    /// The provider answers a cancel or close this late (at most 60 s).
    #[serde(default)]
    cancel_delay_ms: u64,
    /// How WeChat settles this shopper's refunds: `succeed` (the default), `abnormal`,
    /// `closed`, or `silent` (succeeds without a notice).
    #[serde(default)]
    #[schema(value_type = String)]
    refund: RefundScript,
}

impl SimUserBody {
    /// The script it asks for.
    pub fn script(&self) -> UserScript {
        UserScript {
            confirm: self.confirm,
            deduction: self.deduction,
            // Bounded: a script is a test's, and a minute covers any client timeout worth
            // testing.
            cancel_delay_ms: self.cancel_delay_ms.min(60_000),
            refund: self.refund,
        }
    }
}

fn yes() -> Confirm {
    Confirm::Yes
}

fn succeed() -> Deduction {
    Deduction::Succeed
}

/// A shopper's script as taken.
#[derive(Serialize, ToSchema)]
pub struct SimUser {
    /// Shopper.
    user_id: String,
    /// The script.
    #[schema(value_type = Object)]
    script: UserScript,
}

/// Scripts a simulated shopper (both providers).
#[utoipa::path(put, path = "/sim/users/{user_id}", tag = "simulators", params(("user_id" = String, Path)),
    request_body = SimUserBody, security(("bearer" = [])),
    responses((status = 200, body = SimUser), (status = 404, body = ErrorBody, description = "no simulator")))]
pub async fn sim_user(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<SimUserBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    let script = body.script();
    sims.wechat.set_user(&path, script);
    sims.alipay.set_user(&path, script);
    Ok(HttpResponse::Ok().json(SimUser {
        user_id: path.into_inner(),
        script,
    }))
}

/// A second-level merchant's profit sharing as scripted.
#[derive(Serialize, ToSchema)]
pub struct SimMerchant {
    /// The WeChat sub_mchid.
    sub_mchid: String,
    /// The script.
    #[schema(value_type = Object)]
    script: MerchantScript,
}

/// Scripts a second-level merchant's profit sharing in the WeChat Pay simulator:
/// `{"receiver_bound": false}` closes its splits' receivers (`NO_RELATION`),
/// `{"returns_succeed": false}` fails returns (`BALANCE_NOT_ENOUGH`).
#[utoipa::path(put, path = "/sim/merchants/{sub_mchid}", tag = "simulators", params(("sub_mchid" = String, Path)),
    request_body(content = Object, description = "`receiver_bound`, `returns_succeed` (both default true)"),
    security(("bearer" = [])),
    responses((status = 200, body = SimMerchant), (status = 404, body = ErrorBody, description = "no simulator")))]
pub async fn sim_merchant(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<MerchantScript>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    let script = body.into_inner();
    sims.wechat.set_merchant(&path, script);
    Ok(HttpResponse::Ok().json(SimMerchant {
        sub_mchid: path.into_inner(),
        script,
    }))
}

/// How many orders a shopper paid.
#[derive(Serialize, ToSchema)]
pub struct SimPaid {
    /// Shopper.
    user_id: String,
    /// Orders paid now.
    orders_paid: usize,
}

/// The shopper pays what they owe (待支付).
#[utoipa::path(post, path = "/sim/users/{user_id}/pay", tag = "simulators", params(("user_id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = SimPaid), (status = 404, body = ErrorBody)))]
pub async fn sim_user_pays(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    let orders_paid = sims.wechat.user_pays(&path) + sims.alipay.user_pays(&path);
    Ok(HttpResponse::Ok().json(SimPaid {
        user_id: path.into_inner(),
        orders_paid,
    }))
}

/// How many notifications went out again.
#[derive(Serialize, ToSchema)]
pub struct Redelivered {
    /// Notifications sent again.
    redelivered: usize,
}

/// WeChat delivers every notification again (it does when unsure an answer arrived).
#[utoipa::path(post, path = "/sim/wechatpay-redeliver", tag = "simulators", security(("bearer" = [])),
    responses((status = 200, body = Redelivered), (status = 404, body = ErrorBody)))]
pub async fn sim_redeliver(state: web::Data<AppState>, caller: Caller) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    Ok(HttpResponse::Ok().json(Redelivered {
        redelivered: sims.wechat.redeliver_all().await,
    }))
}

/// `POST /sim/wechatpay/confirm`: what the shopper's `wx.openBusinessView` hands to WeChat.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WechatHandOff {
    /// The `extra_data` of the session's `confirmation`, unchanged.
    #[schema(value_type = Object)]
    extra_data: serde_json::Value,
}

/// `POST /sim/alipay/confirm`: what the shopper's mini-program hands to Alipay.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlipayHandOff {
    /// The `order_str` of the session's `confirmation`, unchanged.
    order_str: String,
}

/// A hand-off the provider refuses: every such refusal is the caller's (400), as the
/// provider's own pages refuse it.
fn refused(code: &str, message: String) -> ApiError {
    ApiError::bad_request(format!("{code}: {message}"))
}

/// The shopper confirms a Pay Score order in WeChat with the `extraData` the hub handed out:
/// verified as WeChat verifies it (a bad signature is 400), then WeChat notifies the hub.
#[utoipa::path(post, path = "/sim/wechatpay/confirm", tag = "simulators", request_body = WechatHandOff,
    security(("bearer" = [])), responses((status = 200, description = "the service order, confirmed"),
    (status = 400, body = ErrorBody, description = "not WeChat's extraData, a bad signature, an unknown or finished order")))]
pub async fn sim_wechat_confirm(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<WechatHandOff>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    match sims.wechat.confirm_by_hand(&body.extra_data) {
        Ok(order) => Ok(HttpResponse::Ok().json(order)),
        Err(e) => Err(refused(e.1, e.2)),
    }
}

/// The shopper confirms an Alipay credit order with the `order_str` the hub handed out:
/// verified as Alipay verifies it (a bad signature is 400), then Alipay notifies the hub.
#[utoipa::path(post, path = "/sim/alipay/confirm", tag = "simulators", request_body = AlipayHandOff,
    security(("bearer" = [])), responses((status = 200, description = "the credit order, confirmed"),
    (status = 400, body = ErrorBody, description = "a bad signature, an unknown or closed order")))]
pub async fn sim_alipay_confirm(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<AlipayHandOff>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    match sims.alipay.confirm_by_hand(&body.order_str) {
        Ok(order) => Ok(HttpResponse::Ok().json(order)),
        Err((_, message)) => Err(refused("INVALID_REQUEST", message)),
    }
}

/// `POST /sim/wechatpay/native/pay`: what the payer's WeChat does with a scanned code.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NativePay {
    /// The `code_url` of a service order, unchanged.
    code_url: String,
    /// Who pays (default `o_payer`).
    openid: Option<String>,
}

/// The payer scans a Native payment's `code_url` and pays, as WeChat's app would: refused
/// once it is closed, expired or paid; then WeChat notifies the hub (`TRANSACTION.SUCCESS`).
#[utoipa::path(post, path = "/sim/wechatpay/native/pay", tag = "simulators", request_body = NativePay,
    security(("bearer" = [])), responses((status = 200, description = "the payment, as WeChat shows it"),
    (status = 400, body = ErrorBody, description = "an unknown code, or a payment closed, expired or paid")))]
pub async fn sim_native_pay(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NativePay>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Admin)?;
    let sims = simulators(&state)?;
    let openid = body.openid.as_deref().unwrap_or("o_payer");
    match sims.wechat.pay_native(&body.code_url, openid) {
        Ok(t) => Ok(HttpResponse::Ok().json(t)),
        Err(e) => Err(refused(e.1, e.2)),
    }
}
