//! Products, sellable lists, promotions and quotes (商品管理, 营销活动).

use std::collections::BTreeSet;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use cabinet_actors::ids::MerchantId;
use cabinet_actors::pricing::{price_basket, BasketItem, Offer, PriceRule, PricingError, Window};

use crate::api::{rfc3339, visible_cabinet, ApiError, ApiResult, Caller, Role};
use crate::app::AppState;
use crate::secrets::token;
use crate::store::{PromotionRow, PromotionRule, StoreError};

fn valid_sku(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The merchant a request acts for: a scoped key's own, or the one an admin names.
async fn acting_merchant(
    state: &AppState,
    caller: &Caller,
    named: Option<MerchantId>,
) -> ApiResult<String> {
    let m = match (&caller.merchant, named) {
        (Some(own), None) => own.clone(),
        (Some(own), Some(n)) if n.as_str() == own => own.clone(),
        (Some(_), Some(_)) => return Err(ApiError::NotFound("merchant")),
        (None, Some(n)) => n.to_string(),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "merchant_id is required for a platform key".into(),
            ))
        }
    };
    if state.store.merchant(&m).await?.is_none() {
        return Err(ApiError::NotFound("merchant"));
    }
    Ok(m)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductBody {
    name: String,
    #[serde(default)]
    merchant_id: Option<MerchantId>,
}

async fn put_product(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<ProductBody>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let sku = path.into_inner();
    if !valid_sku(&sku) {
        return Err(ApiError::BadRequest(
            "sku must be 1 to 64 of A-Z a-z 0-9 _ -".into(),
        ));
    }
    let b = body.into_inner();
    if b.name.trim().is_empty() || b.name.chars().count() > 100 {
        return Err(ApiError::BadRequest(
            "name must be 1 to 100 characters".into(),
        ));
    }
    let merchant = acting_merchant(&state, &caller, b.merchant_id).await?;
    state
        .store
        .upsert_product(&merchant, &sku, b.name.trim(), state.now())
        .await?;
    Ok(
        HttpResponse::Ok()
            .json(json!({"merchant_id": merchant, "sku": sku, "name": b.name.trim()})),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MerchantQuery {
    #[serde(default)]
    merchant_id: Option<MerchantId>,
}

async fn list_products(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<MerchantQuery>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let merchant = acting_merchant(&state, &caller, q.into_inner().merchant_id).await?;
    let items: Vec<_> = state
        .store
        .products(&merchant)
        .await?
        .into_iter()
        .map(|(sku, name)| json!({"sku": sku, "name": name}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "count": items.len()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceItem {
    sku: String,
    price_fen: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PricesBody {
    items: Vec<PriceItem>,
}

async fn put_prices(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<PricesBody>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let products = state.store.products(&row.merchant_id).await?;
    let mut seen = BTreeSet::new();
    let mut items = Vec::new();
    for (i, it) in body.into_inner().items.into_iter().enumerate() {
        if !products.contains_key(&it.sku) {
            return Err(ApiError::BadRequest(format!(
                "items[{i}].sku: {} is not one of the merchant's products",
                it.sku
            )));
        }
        if !(0..=10_000_000).contains(&it.price_fen) {
            return Err(ApiError::BadRequest(format!(
                "items[{i}].price_fen must be 0 to 10000000"
            )));
        }
        if !seen.insert(it.sku.clone()) {
            return Err(ApiError::BadRequest(format!(
                "items[{i}].sku: {} listed twice",
                it.sku
            )));
        }
        items.push((it.sku, it.price_fen));
    }
    state
        .store
        .set_prices(cid.as_str(), &items, state.now())
        .await?;
    get_prices_of(&state, cid.as_str(), &row.merchant_id).await
}

async fn get_prices_of(state: &AppState, cabinet: &str, merchant: &str) -> ApiResult {
    let list = state.store.prices(cabinet, merchant).await?;
    let items: Vec<_> = list
        .iter()
        .map(|(sku, p)| json!({"sku": sku, "name": p.name, "price_fen": p.price_fen}))
        .collect();
    Ok(HttpResponse::Ok()
        .json(json!({"cabinet_id": cabinet, "items": items, "count": items.len()})))
}

async fn get_prices(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    get_prices_of(&state, cid.as_str(), &row.merchant_id).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromotionBody {
    name: String,
    window: Window,
    offer: Offer,
    #[serde(default)]
    cabinet_ids: Option<Vec<String>>,
    #[serde(default)]
    merchant_id: Option<MerchantId>,
}

fn validate_rule(window: &Window, offer: &Offer) -> ApiResult<()> {
    let bad = |m: &str| Err(ApiError::BadRequest(m.to_owned()));
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

fn promotion_view(p: &PromotionRow) -> serde_json::Value {
    json!({"id": p.id, "merchant_id": p.merchant_id, "name": p.name, "window": p.rule.window, "offer": p.rule.offer,
           "cabinet_ids": p.cabinet_ids, "created_at": rfc3339(p.created_at), "ended_at": p.ended_at.and_then(rfc3339),
           "active": p.ended_at.is_none()})
}

async fn create_promotion(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<PromotionBody>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let b = body.into_inner();
    if b.name.trim().is_empty() || b.name.chars().count() > 20 {
        // WeChat's post_discounts name is short; keep it printable there unchanged.
        return Err(ApiError::BadRequest(
            "name must be 1 to 20 characters".into(),
        ));
    }
    validate_rule(&b.window, &b.offer)?;
    let merchant = acting_merchant(&state, &caller, b.merchant_id).await?;
    if let Some(ids) = &b.cabinet_ids {
        for id in ids {
            match state.store.cabinet(id).await? {
                Some(c) if c.merchant_id == merchant => {}
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "cabinet_ids: {id} is not one of the merchant's cabinets"
                    )))
                }
            }
        }
    }
    let id = format!(
        "p_{}",
        token(16).map_err(|_| anyhow::anyhow!("no randomness"))?
    );
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
        Ok(()) => Ok(HttpResponse::Created().json(promotion_view(&row))),
        Err(StoreError::Conflict) => Err(ApiError::Conflict("promotion_exists", "retry".into())),
        Err(e) => Err(e.into()),
    }
}

async fn list_promotions(state: web::Data<AppState>, caller: Caller) -> ApiResult {
    caller.require(Role::Viewer)?;
    let rows = state.store.promotions(caller.merchant.as_deref()).await?;
    let items: Vec<_> = rows.iter().map(promotion_view).collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "count": items.len()})))
}

async fn end_promotion(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> ApiResult {
    caller.require(Role::Operator)?;
    let rows = state.store.promotions(caller.merchant.as_deref()).await?;
    let Some(p) = rows.into_iter().find(|p| p.id == *path) else {
        return Err(ApiError::NotFound("promotion"));
    };
    state.store.end_promotion(&p.id, state.now()).await?;
    let rows = state.store.promotions(Some(&p.merchant_id)).await?;
    let p = rows
        .iter()
        .find(|r| r.id == p.id)
        .ok_or(ApiError::NotFound("promotion"))?;
    Ok(HttpResponse::Ok().json(promotion_view(p)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteBody {
    items: Vec<BasketItem>,
}

/// Prices a basket exactly as a session's order would be priced now.
async fn quote(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<QuoteBody>,
) -> ApiResult {
    caller.require(Role::Viewer)?;
    let (cid, row) = visible_cabinet(&state, &caller, &path).await?;
    let list = state.store.prices(cid.as_str(), &row.merchant_id).await?;
    let promos = state
        .store
        .promotions_for(&row.merchant_id, cid.as_str())
        .await?;
    match price_basket(
        &body.items,
        &list,
        &promos,
        state.now(),
        state.settings.pricing.utc_offset_min,
    ) {
        Ok(order) => Ok(HttpResponse::Ok().json(order)),
        Err(PricingError::UnknownSku(sku)) => Err(ApiError::Unprocessable(
            "unknown_product",
            format!("{sku} is not on this cabinet's sellable list"),
        )),
    }
}

/// Mounts the catalog routes under `/api/v1`.
pub fn configure(scope: actix_web::Scope) -> actix_web::Scope {
    scope
        .route("/products", web::get().to(list_products))
        .route("/products/{sku}", web::put().to(put_product))
        .route("/cabinets/{id}/prices", web::put().to(put_prices))
        .route("/cabinets/{id}/prices", web::get().to(get_prices))
        .route("/cabinets/{id}/quote", web::post().to(quote))
        .route("/promotions", web::post().to(create_promotion))
        .route("/promotions", web::get().to(list_promotions))
        .route("/promotions/{id}/end", web::post().to(end_promotion))
}
