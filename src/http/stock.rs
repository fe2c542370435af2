//! Stock (商品库存): each cabinet's stock, its discrepancies (库存不一致), low marks, and product
//! templates that apply one sellable list to many cabinets.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::cabinets::visible_cabinet;
use super::catalog::{checked_prices, PriceItem};
use super::sessions::actor;
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult};
use crate::sessions::Audited;
use crate::store::{StockDiscrepancyRow, TemplateRow};
use crate::views::List;

/// One product's stock in a cabinet.
#[derive(Serialize, ToSchema)]
pub struct StockItem {
    /// Product.
    sku: String,
    /// Its name (the product library's).
    name: Option<String>,
    /// How many the hub believes are in the cabinet.
    qty: i64,
    /// At or below this it is low here.
    low_at: i64,
    /// It is low.
    low: bool,
    /// RFC 3339.
    updated_at: Option<String>,
}

/// A cabinet's stock.
#[derive(Serialize, ToSchema)]
pub struct CabinetStock {
    /// Cabinet.
    cabinet_id: String,
    /// Products it keeps stock of (counted in by a restock), by sku.
    items: Vec<StockItem>,
    /// How many are low.
    low: usize,
}

/// A cabinet's stock per product: what its last count found, less what purchases took since.
#[utoipa::path(get, path = "/api/v1/cabinets/{id}/stock", tag = "stock", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = CabinetStock), (status = 404, body = ErrorBody)))]
pub async fn get_stock(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let products = state.store.products(&row.merchant_id).await?;
    let items: Vec<StockItem> = state
        .store
        .stock(cid.as_str())
        .await?
        .into_iter()
        .map(|s| StockItem {
            name: products.get(&s.sku).cloned(),
            low: s.qty <= s.low_at,
            qty: s.qty,
            low_at: s.low_at,
            updated_at: crate::views::rfc3339(s.updated_at),
            sku: s.sku,
        })
        .collect();
    Ok(HttpResponse::Ok().json(CabinetStock {
        cabinet_id: cid.to_string(),
        low: items.iter().filter(|i| i.low).count(),
        items,
    }))
}

/// `PUT /api/v1/cabinets/{id}/stock/{sku}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LowMark {
    /// At or below this many the product is low in this cabinet (0 to 100,000).
    low_at: i64,
}

/// Sets a product's low mark in one cabinet.
#[utoipa::path(put, path = "/api/v1/cabinets/{id}/stock/{sku}", tag = "stock",
    params(("id" = String, Path), ("sku" = String, Path)), request_body = LowMark, security(("bearer" = [])),
    responses((status = 200, body = CabinetStock), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody, description = "no such cabinet, or it keeps no stock of the product")))]
pub async fn set_low_mark(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
    body: web::Json<LowMark>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let (id, sku) = path.into_inner();
    let (cid, _) = visible_cabinet(&state, &caller, &id).await?;
    if !(0..=100_000).contains(&body.low_at) {
        return Err(ApiError::bad_request("low_at must be 0 to 100000"));
    }
    if !state
        .store
        .set_low_at(cid.as_str(), &sku, body.low_at)
        .await?
    {
        return Err(ApiError::not_found("stock of that product in the cabinet"));
    }
    get_stock(state, caller, web::Path::from(id)).await
}

/// `GET /api/v1/stock-discrepancies`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DiscrepancyQuery {
    /// `open` or `resolved` (default: both).
    state: Option<String>,
    /// A platform key: one merchant's (default: all).
    merchant_id: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<i64>,
}

/// What restock counts found against what was expected (库存不一致), newest first.
#[utoipa::path(get, path = "/api/v1/stock-discrepancies", tag = "stock", params(DiscrepancyQuery),
    security(("bearer" = [])), responses((status = 200, description = "`{items: [StockDiscrepancyRow], count}`"),
    (status = 400, body = ErrorBody)))]
pub async fn list_discrepancies(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<DiscrepancyQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    if q.state
        .as_deref()
        .is_some_and(|s| s != "open" && s != "resolved")
    {
        return Err(ApiError::bad_request("state must be open or resolved"));
    }
    let merchant = caller.listing(q.merchant_id.as_deref())?;
    let rows = state
        .store
        .stock_discrepancies(
            merchant.as_deref(),
            q.state.as_deref(),
            q.limit.unwrap_or(100).clamp(1, 1000),
        )
        .await?;
    Ok(HttpResponse::Ok().json(List::from(rows)))
}

/// `POST /api/v1/stock-discrepancies/{id}/resolve`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveDiscrepancy {
    /// What was found (1 to 200 characters): miscounted, taken, spoiled…
    note: String,
}

/// An operator resolves a discrepancy with what they found. Audited.
#[utoipa::path(post, path = "/api/v1/stock-discrepancies/{id}/resolve", tag = "stock", params(("id" = String, Path)),
    request_body = ResolveDiscrepancy, security(("bearer" = [])),
    responses((status = 200, body = StockDiscrepancyRow), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "already resolved")))]
pub async fn resolve_discrepancy(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ResolveDiscrepancy>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let note = body.note.trim();
    if note.is_empty() || note.chars().count() > 200 {
        return Err(ApiError::bad_request("note: 1 to 200 characters"));
    }
    let d = match state.store.stock_discrepancy(&path).await? {
        Some(d) if caller.sees(&d.merchant_id) => d,
        _ => return Err(ApiError::not_found("stock discrepancy")),
    };
    let Some(done) = state
        .store
        .resolve_discrepancy(&d.id, &caller.key_id, note, state.now())
        .await?
    else {
        return Err(ApiError::new(
            crate::error::ErrorCode::AlreadyResolved,
            "the discrepancy is already resolved",
        ));
    };
    state
        .sessions
        .audit(
            actor(&caller),
            Audited {
                action: "stock_discrepancy.resolve",
                merchant_id: Some(&d.merchant_id),
                subject: &d.id,
                order_id: None,
                reason: Some(note),
                detail: serde_json::json!({"cabinet_id": d.cabinet_id, "sku": d.sku,
                    "expected": d.expected, "counted": d.counted}),
            },
        )
        .await;
    // Other screens drop it as it goes.
    state
        .store
        .changed(crate::store::Change::StockDiscrepancy(done.clone()));
    Ok(HttpResponse::Ok().json(done))
}

/// `POST /api/v1/product-templates`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    /// 1 to 40 characters.
    name: String,
    /// The sellable list: the merchant's products and their prices.
    items: Vec<PriceItem>,
    /// A platform key: whose.
    merchant_id: Option<String>,
}

/// A product template.
#[derive(Serialize, ToSchema)]
pub struct TemplateView {
    /// Id.
    id: String,
    /// Whose.
    merchant_id: String,
    /// Its name.
    name: String,
    /// The sellable list.
    items: Vec<PriceItem>,
    /// RFC 3339.
    created_at: Option<String>,
}

impl From<TemplateRow> for TemplateView {
    fn from(t: TemplateRow) -> Self {
        Self {
            items: serde_json::from_str(&t.items).unwrap_or_default(),
            id: t.id,
            merchant_id: t.merchant_id,
            name: t.name,
            created_at: crate::views::rfc3339(t.created_at),
        }
    }
}

/// Stores a product template (商品模板): one sellable list to apply to many cabinets.
#[utoipa::path(post, path = "/api/v1/product-templates", tag = "stock", request_body = TemplateBody,
    security(("bearer" = [])), responses((status = 201, body = TemplateView), (status = 400, body = ErrorBody),
    (status = 422, body = ErrorBody, description = "price_out_of_range")))]
pub async fn create_template(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<TemplateBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let body = body.into_inner();
    let merchant_id = caller.acting_for(body.merchant_id.as_deref())?;
    if state.store.merchant(&merchant_id).await?.is_none() {
        return Err(ApiError::not_found("merchant"));
    }
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 40 {
        return Err(ApiError::bad_request("name: 1 to 40 characters"));
    }
    let items = checked_prices(&state, &merchant_id, body.items).await?;
    let items: Vec<PriceItem> = items
        .into_iter()
        .map(|(sku, price_fen)| PriceItem { sku, price_fen })
        .collect();
    let row = TemplateRow {
        id: format!(
            "pt{}",
            crate::secrets::token(16).map_err(ApiError::internal)?
        ),
        merchant_id,
        name: name.to_owned(),
        items: serde_json::to_string(&items).map_err(ApiError::internal)?,
        created_at: state.now(),
    };
    state.store.insert_template(&row).await?;
    Ok(HttpResponse::Created().json(TemplateView::from(row)))
}

/// The caller's product templates, newest first.
#[utoipa::path(get, path = "/api/v1/product-templates", tag = "stock",
    security(("bearer" = [])), responses((status = 200, description = "`{items: [TemplateView], count}`")))]
pub async fn list_templates(state: web::Data<AppState>, caller: Caller) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let rows = state.store.templates(caller.merchant.as_deref()).await?;
    let items: Vec<TemplateView> = rows.into_iter().map(TemplateView::from).collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// `POST /api/v1/product-templates/{id}/apply`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyTemplate {
    /// The merchant's cabinets (1 to 1,000): each gets the template's list as its whole
    /// sellable list.
    cabinet_ids: Vec<String>,
}

/// What applying a template did.
#[derive(Serialize, ToSchema)]
pub struct Applied {
    /// The template.
    template_id: String,
    /// The cabinets whose sellable list it now is.
    cabinet_ids: Vec<String>,
}

/// Applies a template's sellable list to cabinets (their lists are replaced). The template's
/// products are checked again: a product deleted since refuses the whole apply.
#[utoipa::path(post, path = "/api/v1/product-templates/{id}/apply", tag = "stock", params(("id" = String, Path)),
    request_body = ApplyTemplate, security(("bearer" = [])),
    responses((status = 200, body = Applied), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn apply_template(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ApplyTemplate>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let t = match state.store.template(&path).await? {
        Some(t) if caller.sees(&t.merchant_id) => t,
        _ => return Err(ApiError::not_found("product template")),
    };
    let ids = &body.cabinet_ids;
    if ids.is_empty() || ids.len() > 1000 {
        return Err(ApiError::bad_request("cabinet_ids: 1 to 1000 cabinets"));
    }
    let mut cabinets = Vec::with_capacity(ids.len());
    for id in ids {
        let (cid, row) = visible_cabinet(&state, &caller, id).await?;
        if row.merchant_id != t.merchant_id {
            return Err(ApiError::not_found("cabinet"));
        }
        cabinets.push(cid);
    }
    let given: Vec<PriceItem> = serde_json::from_str(&t.items).map_err(ApiError::internal)?;
    let items = checked_prices(&state, &t.merchant_id, given).await?;
    let now = state.now();
    for cid in &cabinets {
        state.store.set_prices(cid.as_str(), &items, now).await?;
    }
    Ok(HttpResponse::Ok().json(Applied {
        template_id: t.id,
        cabinet_ids: cabinets.iter().map(ToString::to_string).collect(),
    }))
}

/// `GET /api/v1/restocks`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RestocksQuery {
    /// One cabinet's (default: every cabinet of the caller's).
    cabinet_id: Option<String>,
    /// A platform key: one merchant's (default: all).
    merchant_id: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<i64>,
}

/// The restock history (补货记录): restock and stock-taking sessions, newest first, whatever
/// their state (`GET /api/v1/sessions` lists only those under way).
#[utoipa::path(get, path = "/api/v1/restocks", tag = "stock", params(RestocksQuery),
    security(("bearer" = [])), responses((status = 200, description = "`{items: [SessionRow], count}`")))]
pub async fn list_restocks(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<RestocksQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let merchant = caller.listing(q.merchant_id.as_deref())?;
    let rows = state
        .store
        .restocks(
            merchant.as_deref(),
            q.cabinet_id.as_deref(),
            q.limit.unwrap_or(100).clamp(1, 1000),
        )
        .await?;
    Ok(HttpResponse::Ok().json(List::from(rows)))
}
