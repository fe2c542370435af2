//! Products, sellable lists, promotions and quotes (商品管理, 营销活动).

use std::collections::BTreeSet;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use cabinet_actors::ids::MerchantId;
use cabinet_actors::pricing::{price_basket, BasketItem, Offer, PriceRule, Window};

use super::auth::{Caller, Role};
use super::cabinets::visible_cabinet;
use super::state::AppState;
use super::ErrorBody;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::secrets::token;
use crate::store::{PromotionRow, PromotionRule, StoreError};
use crate::views::{List, PromotionView};

fn valid_sku(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductBody {
    /// 1 to 100 characters.
    name: String,
    /// Required for a platform key.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    merchant_id: Option<MerchantId>,
}

/// A product.
#[derive(Serialize, ToSchema)]
pub struct ProductView {
    /// Its merchant (in the answer to a change).
    #[serde(skip_serializing_if = "Option::is_none")]
    merchant_id: Option<String>,
    /// Product code.
    sku: String,
    /// Name.
    name: String,
}

/// A product on a cabinet's sellable list.
#[derive(Serialize, ToSchema)]
pub struct PriceView {
    /// Product code.
    sku: String,
    /// Name.
    name: String,
    /// Price, fen.
    price_fen: i64,
    /// How many are in the cabinet, when it keeps stock of the product (counted in by a
    /// restock).
    #[serde(skip_serializing_if = "Option::is_none")]
    stock: Option<i64>,
}

/// A cabinet's sellable list.
#[derive(Serialize, ToSchema)]
pub struct PriceList {
    /// Cabinet.
    cabinet_id: String,
    /// Its products and prices.
    items: Vec<PriceView>,
    /// How many.
    count: usize,
}

/// Creates or renames a product.
#[utoipa::path(put, path = "/api/v1/products/{sku}", tag = "catalog", params(("sku" = String, Path)), request_body = ProductBody,
    security(("bearer" = [])), responses((status = 200, body = ProductView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_product(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ProductBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let sku = path.into_inner();
    if !valid_sku(&sku) {
        return Err(ApiError::bad_request(
            "sku must be 1 to 64 of A-Z a-z 0-9 _ -",
        ));
    }
    let b = body.into_inner();
    if b.name.trim().is_empty() || b.name.chars().count() > 100 {
        return Err(ApiError::bad_request("name must be 1 to 100 characters"));
    }
    let merchant = caller
        .acting_for_existing(&state, b.merchant_id.as_ref())
        .await?;
    state
        .store
        .upsert_product(&merchant, &sku, b.name.trim(), state.now())
        .await?;
    Ok(HttpResponse::Ok().json(ProductView {
        merchant_id: Some(merchant),
        sku,
        name: b.name.trim().to_owned(),
    }))
}

#[derive(Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct MerchantQuery {
    /// Required for a platform key.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    #[param(value_type = Option<String>)]
    merchant_id: Option<MerchantId>,
}

/// The merchant's products.
#[utoipa::path(get, path = "/api/v1/products", tag = "catalog", params(MerchantQuery),
    security(("bearer" = [])), responses((status = 200, body = List<ProductView>), (status = 404, body = ErrorBody)))]
pub async fn list_products(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<MerchantQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let merchant = caller
        .acting_for_existing(&state, q.into_inner().merchant_id.as_ref())
        .await?;
    let items: Vec<_> = state
        .store
        .products(&merchant)
        .await?
        .into_iter()
        .map(|(sku, name)| ProductView {
            merchant_id: None,
            sku,
            name,
        })
        .collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

#[derive(Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceItem {
    /// One of the merchant's products.
    pub(super) sku: String,
    /// 0 to `limits.max_price_fen` (default 10,000,000); above it → 422 `price_out_of_range`.
    pub(super) price_fen: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PricesBody {
    /// The whole list: products not in it are no longer sold here.
    items: Vec<PriceItem>,
}

/// Replaces a cabinet's sellable list.
#[utoipa::path(put, path = "/api/v1/cabinets/{id}/prices", tag = "catalog", params(("id" = String, Path)), request_body = PricesBody,
    security(("bearer" = [])), responses((status = 200, body = PriceList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 422, body = ErrorBody, description = "price_out_of_range")))]
pub async fn put_prices(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<PricesBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let items = checked_prices(&state, &row.merchant_id, body.into_inner().items).await?;
    state
        .store
        .set_prices(cid.as_str(), &items, state.now())
        .await?;
    get_prices_of(&state, cid.as_str(), &row.merchant_id, false).await
}

/// A sellable list as given (the merchant's products, each once, at prices within the limits),
/// ready to store.
pub(super) async fn checked_prices(
    state: &AppState,
    merchant_id: &str,
    given: Vec<PriceItem>,
) -> ApiResult<Vec<(String, i64)>> {
    let products = state.store.products(merchant_id).await?;
    let mut seen = BTreeSet::new();
    let mut items = Vec::new();
    for (i, it) in given.into_iter().enumerate() {
        if !products.contains_key(&it.sku) {
            return Err(ApiError::bad_request(format!(
                "items[{i}].sku: {} is not one of the merchant's products",
                it.sku
            )));
        }
        if it.price_fen < 0 {
            return Err(ApiError::bad_request(format!(
                "items[{i}].price_fen must not be negative"
            )));
        }
        let max = state.settings.limits.max_price_fen;
        if it.price_fen > max {
            return Err(ApiError::new(
                ErrorCode::PriceOutOfRange,
                format!(
                    "items[{i}].price_fen: {} ({}) is above the maximum {max}",
                    it.price_fen, it.sku
                ),
            ));
        }
        if !seen.insert(it.sku.clone()) {
            return Err(ApiError::bad_request(format!(
                "items[{i}].sku: {} listed twice",
                it.sku
            )));
        }
        items.push((it.sku, it.price_fen));
    }
    Ok(items)
}

/// A cabinet's sellable list, each product with its stock when the cabinet keeps stock of it;
/// `sellable`: without what is out of stock.
pub(super) async fn get_prices_of(
    state: &AppState,
    cabinet: &str,
    merchant: &str,
    sellable: bool,
) -> ApiResult<HttpResponse> {
    let list = state.store.prices(cabinet, merchant).await?;
    let stock: std::collections::BTreeMap<String, i64> = state
        .store
        .stock(cabinet)
        .await?
        .into_iter()
        .map(|s| (s.sku, s.qty))
        .collect();
    let items: Vec<_> = list
        .iter()
        .map(|(sku, p)| PriceView {
            sku: sku.clone(),
            name: p.name.clone(),
            price_fen: p.price_fen,
            stock: stock.get(sku).copied(),
        })
        .filter(|v| !sellable || v.stock.is_none_or(|q| q > 0))
        .collect();
    Ok(HttpResponse::Ok().json(PriceList {
        cabinet_id: cabinet.to_owned(),
        count: items.len(),
        items,
    }))
}

/// `GET /api/v1/cabinets/{id}/prices`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PricesQuery {
    /// `true`: what a shopper can buy now — without the products the cabinet keeps stock of
    /// and has none left.
    sellable: Option<bool>,
}

/// A cabinet's sellable list.
#[utoipa::path(get, path = "/api/v1/cabinets/{id}/prices", tag = "catalog", params(("id" = String, Path), PricesQuery),
    security(("bearer" = [])), responses((status = 200, body = PriceList), (status = 404, body = ErrorBody)))]
pub async fn get_prices(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<PricesQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    get_prices_of(
        &state,
        cid.as_str(),
        &row.merchant_id,
        q.sellable.unwrap_or(false),
    )
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromotionBody {
    /// 1 to 20 characters (shown on the provider's bill).
    name: String,
    /// `always`, `between` or `daily`.
    #[schema(value_type = Object)]
    window: Window,
    /// `product_price` or `spend_save`.
    #[schema(value_type = Object)]
    offer: Offer,
    /// Only these cabinets.
    #[serde(default)]
    cabinet_ids: Option<Vec<String>>,
    /// Required for a platform key.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    merchant_id: Option<MerchantId>,
}

fn validate_rule(window: &Window, offer: &Offer) -> ApiResult<()> {
    let bad = |m: &str| Err(ApiError::bad_request(m));
    match *window {
        Window::Between { starts_at, ends_at } if starts_at >= ends_at => {
            return bad("window: starts_at must be before ends_at")
        }
        Window::Daily {
            from_min, to_min, ..
        } if from_min >= 1440 || to_min > 1440 || from_min == to_min => {
            return bad(
                "window: from_min and to_min are minutes after midnight (0-1440) and differ",
            )
        }
        Window::Daily {
            starts_at: Some(s),
            ends_at: Some(e),
            ..
        } if s >= e => return bad("window: starts_at must be before ends_at"),
        _ => {}
    }
    match offer {
        Offer::ProductPrice { rules } => {
            if rules.is_empty() || rules.len() > 500 {
                return bad("offer.rules: 1 to 500 products");
            }
            for (sku, r) in rules {
                match *r {
                    PriceRule::PercentBps(b) if b == 0 || b >= 10_000 => {
                        return bad(&format!("offer.rules.{sku}: percent_bps must be 1 to 9999"))
                    }
                    PriceRule::FixedFen(f) if f < 0 => {
                        return bad(&format!(
                            "offer.rules.{sku}: fixed_fen must not be negative"
                        ))
                    }
                    _ => {}
                }
            }
        }
        Offer::SpendSave { tiers } => {
            if tiers.is_empty() || tiers.len() > 10 {
                return bad("offer.tiers: 1 to 10 tiers");
            }
            if tiers
                .iter()
                .any(|t| t.threshold_fen <= 0 || t.off_fen <= 0 || t.off_fen > t.threshold_fen)
            {
                return bad("offer.tiers: 0 < off_fen ≤ threshold_fen");
            }
        }
    }
    if matches!(window, Window::Always) && matches!(offer, Offer::ProductPrice { .. }) {
        return bad("window: a product discount needs a time window (between or daily)");
    }
    Ok(())
}

/// Creates a promotion (营销活动).
#[utoipa::path(post, path = "/api/v1/promotions", tag = "catalog", request_body = PromotionBody,
    security(("bearer" = [])), responses((status = 201, body = PromotionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_promotion(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<PromotionBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let b = body.into_inner();
    if b.name.trim().is_empty() || b.name.chars().count() > 20 {
        // WeChat's post_discounts name is short; keep it printable there unchanged.
        return Err(ApiError::bad_request("name must be 1 to 20 characters"));
    }
    validate_rule(&b.window, &b.offer)?;
    let merchant = caller
        .acting_for_existing(&state, b.merchant_id.as_ref())
        .await?;
    if let Some(ids) = &b.cabinet_ids {
        for id in ids {
            match state.store.cabinet(id).await? {
                Some(c) if c.merchant_id == merchant => {}
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "cabinet_ids: {id} is not one of the merchant's cabinets"
                    )))
                }
            }
        }
    }
    let id = format!("p_{}", token(16)?);
    let row = PromotionRow {
        id,
        merchant_id: merchant,
        name: b.name.trim().to_owned(),
        rule: PromotionRule {
            window: b.window,
            offer: b.offer,
        },
        cabinet_ids: b.cabinet_ids,
        created_at: state.now(),
        ended_at: None,
    };
    match state.store.create_promotion(&row).await {
        Ok(()) => Ok(HttpResponse::Created().json(PromotionView::from(&row))),
        Err(StoreError::Conflict) => Err(ApiError::new(ErrorCode::PromotionExists, "retry")),
        Err(e) => Err(e.into()),
    }
}

/// Promotions, active and ended.
#[utoipa::path(get, path = "/api/v1/promotions", tag = "catalog",
    security(("bearer" = [])), responses((status = 200, body = List<PromotionView>)))]
pub async fn list_promotions(
    state: web::Data<AppState>,
    caller: Caller,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let rows = state.store.promotions(caller.merchant.as_deref()).await?;
    let items: Vec<_> = rows.iter().map(PromotionView::from).collect();
    Ok(HttpResponse::Ok().json(List::from(items)))
}

/// Ends a promotion.
#[utoipa::path(post, path = "/api/v1/promotions/{id}/end", tag = "catalog", params(("id" = String, Path)),
    security(("bearer" = [])), responses((status = 200, body = PromotionView), (status = 404, body = ErrorBody)))]
pub async fn end_promotion(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Operator)?;
    let rows = state.store.promotions(caller.merchant.as_deref()).await?;
    let Some(p) = rows.into_iter().find(|p| p.id == *path) else {
        return Err(ApiError::not_found("promotion"));
    };
    state.store.end_promotion(&p.id, state.now()).await?;
    let rows = state.store.promotions(Some(&p.merchant_id)).await?;
    let p = rows
        .iter()
        .find(|r| r.id == p.id)
        .ok_or_else(|| ApiError::not_found("promotion"))?;
    Ok(HttpResponse::Ok().json(PromotionView::from(p)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuoteBody {
    /// The basket.
    #[schema(value_type = Vec<Object>)]
    items: Vec<BasketItem>,
}

/// Prices a basket exactly as a session's order would be priced now.
#[utoipa::path(post, path = "/api/v1/cabinets/{id}/quote", tag = "catalog", params(("id" = String, Path)), request_body = QuoteBody,
    security(("bearer" = [])), responses((status = 200, description = "the priced order", body = Object),
    (status = 404, body = ErrorBody), (status = 422, body = ErrorBody, description = "unknown_product, basket_out_of_range (naming the line) or price_out_of_range")))]
pub async fn quote(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<QuoteBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let list = state.store.prices(cid.as_str(), &row.merchant_id).await?;
    let promos = state
        .store
        .promotions_for(&row.merchant_id, cid.as_str())
        .await?;
    let order = price_basket(
        &body.items,
        &list,
        &promos,
        state.now(),
        state.settings.pricing.utc_offset_min,
        &state.settings.limits.limits(),
    )?;
    Ok(HttpResponse::Ok().json(order))
}
