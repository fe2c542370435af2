//! `POST /api/v1/service-orders`: a merchant buys service time (设备使用时长) for its cabinets.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::sessions::actor;
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult};
use crate::sessions::{NewServiceOrder, ServiceChannel};
use crate::views::{List, ServiceOrderView};

/// `POST /api/v1/service-orders`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceOrderRequest {
    /// The merchant's cabinets, each once.
    cabinet_ids: Vec<String>,
    /// Whole years for each, 1 to 10.
    years: u32,
    /// A platform key: whose cabinets.
    merchant_id: Option<String>,
    /// `wechat` (the default: WeChat Pay Native, the answer's `code_url` is scanned to pay)
    /// or `offline` (platform admins only: paid outside the hub, with its `voucher`).
    channel: Option<String>,
    /// The offline payment's voucher reference (1 to 64 characters).
    voucher: Option<String>,
}

/// Buys whole years of service time for some of the merchant's cabinets at the configured
/// yearly price. Through WeChat Pay: answered with the `code_url` to scan; the service is
/// extended when WeChat says it is paid, and an order unpaid after 5 minutes is closed and
/// cancelled. Offline (platform admins only, audited): paid, and extended, at once.
#[utoipa::path(post, path = "/api/v1/service-orders", tag = "cabinets", request_body = ServiceOrderRequest,
    security(("bearer" = [])), responses((status = 201, body = ServiceOrderView),
    (status = 400, body = ErrorBody), (status = 403, body = ErrorBody, description = "offline by a merchant's key"),
    (status = 404, body = ErrorBody, description = "a cabinet not the merchant's"),
    (status = 422, body = ErrorBody, description = "WeChat Pay refused the order"),
    (status = 503, body = ErrorBody, description = "WeChat Pay did not answer")))]
pub async fn create_service_order(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<ServiceOrderRequest>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::MerchantAdmin)?;
    let body = body.into_inner();
    let merchant_id = caller.acting_for(body.merchant_id.as_deref())?;
    if state.store.merchant(&merchant_id).await?.is_none() {
        return Err(ApiError::not_found("merchant"));
    }
    let channel = match (body.channel.as_deref(), body.voucher) {
        (None | Some("wechat"), None) => ServiceChannel::Wechat,
        (None | Some("wechat"), Some(_)) => {
            return Err(ApiError::bad_request(
                "a voucher is for an offline payment (channel \"offline\")",
            ))
        }
        (Some("offline"), voucher) => {
            // The platform receives offline payments; a merchant cannot say it paid.
            caller.require(Role::Admin)?;
            match voucher {
                Some(v)
                    if (1..=64).contains(&v.chars().count())
                        && !v.chars().any(char::is_control) =>
                {
                    ServiceChannel::Offline { voucher: v }
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "an offline payment needs its voucher reference (1 to 64 characters)",
                    ))
                }
            }
        }
        (Some(_), _) => {
            return Err(ApiError::bad_request(
                "channel must be \"wechat\" or \"offline\"",
            ))
        }
    };
    let o = state
        .sessions
        .create_service_order(
            actor(&caller),
            NewServiceOrder {
                merchant_id,
                cabinet_ids: body.cabinet_ids,
                years: body.years,
                channel,
            },
        )
        .await?;
    Ok(HttpResponse::Created().json(ServiceOrderView::from(o)))
}

/// `GET /api/v1/service-orders`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ServiceOrdersQuery {
    /// A platform key: one merchant's (default: all).
    merchant_id: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<i64>,
}

/// The caller's service-time orders, newest first.
#[utoipa::path(get, path = "/api/v1/service-orders", tag = "cabinets", params(ServiceOrdersQuery),
    security(("bearer" = [])), responses((status = 200, description = "`{items: [ServiceOrderView], count}`")))]
pub async fn list_service_orders(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<ServiceOrdersQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let merchant = caller.listing(q.merchant_id.as_deref())?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = state
        .store
        .service_orders(merchant.as_deref(), limit)
        .await?;
    let items: Vec<ServiceOrderView> = rows.into_iter().map(ServiceOrderView::from).collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// One service-time order.
#[utoipa::path(get, path = "/api/v1/service-orders/{id}", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = ServiceOrderView), (status = 404, body = ErrorBody)))]
pub async fn get_service_order(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    match state.store.service_order(&path).await? {
        Some(o) if caller.sees(&o.merchant_id) => {
            Ok(HttpResponse::Ok().json(ServiceOrderView::from(o)))
        }
        _ => Err(ApiError::not_found("service order")),
    }
}

/// What the payer scans, as an SVG image of the order's `code_url` (while it is unpaid): the
/// page shows it for the merchant to pay with WeChat.
#[utoipa::path(get, path = "/api/v1/service-orders/{id}/qr.svg", tag = "cabinets", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, content_type = "image/svg+xml", description = "the QR code"),
    (status = 404, body = ErrorBody, description = "no such order, or nothing to pay")))]
pub async fn service_order_qr(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let code_url = match state.store.service_order(&path).await? {
        Some(o) if caller.sees(&o.merchant_id) && o.status == "unpaid" => o.code_url,
        _ => None,
    }
    .ok_or_else(|| ApiError::not_found("service order to pay"))?;
    let qr = qrcode::QrCode::new(code_url.as_bytes()).map_err(ApiError::internal)?;
    let svg = qr
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(220, 220)
        .build();
    Ok(HttpResponse::Ok()
        .content_type("image/svg+xml")
        .insert_header(("Cache-Control", "no-store"))
        .body(svg))
}
