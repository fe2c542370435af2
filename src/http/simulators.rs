//! The simulators' control API (admin only, simulator builds only): script a shopper, have
//! them pay, or have WeChat deliver every notification again.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::auth::{Caller, Role};
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult};
use crate::simulators::wechat::{Deduction, UserScript};
use crate::simulators::Simulators;

super::routes! {
    put "/sim/users/{user_id}" => sim_user,
    post "/sim/users/{user_id}/pay" => sim_user_pays,
    post "/sim/wechatpay-redeliver" => sim_redeliver,
}

/// The control routes' part of the contract.
#[derive(OpenApi)]
#[openapi(paths(sim_user, sim_user_pays, sim_redeliver))]
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
    /// Confirms pay-after-use (default true).
    #[serde(default = "yes")]
    confirm: bool,
    /// `succeed`, `fail` (pending payment) or `fail_then_pay`.
    #[serde(default = "succeed")]
    #[schema(value_type = String)]
    deduction: Deduction,
    /// The provider answers a cancel or close this late (at most 60 s).
    #[serde(default)]
    cancel_delay_ms: u64,
}

fn yes() -> bool {
    true
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
    let script = UserScript {
        confirm: body.confirm,
        deduction: body.deduction,
        // Bounded: a script is a test's, and a minute covers any client timeout worth testing.
        cancel_delay_ms: body.cancel_delay_ms.min(60_000),
    };
    sims.wechat.set_user(&path, script);
    sims.alipay.set_user(&path, script);
    Ok(HttpResponse::Ok().json(SimUser {
        user_id: path.into_inner(),
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
