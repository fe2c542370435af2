//! `GET /api/v1/bills/{merchant_id}/{date}`: a merchant's bill of one day, as JSON or CSV.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::IntoParams;

use super::auth::{Caller, Role};
use super::state::AppState;
use super::ErrorBody;
use crate::bills::{bill, csv, stats, Bill, DayStats};
use crate::error::{ApiError, ApiResult};

/// `?format=`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BillQuery {
    /// `json` (the default) or `csv` (a download).
    format: Option<String>,
}

const DAY_MS: i64 = 86_400_000;

/// Where `date` (`YYYY-MM-DD`) starts in the hub's local time, Unix ms.
fn day_start(date: &str, utc_offset_min: i32) -> ApiResult<i64> {
    let bad = || ApiError::bad_request("the date must be YYYY-MM-DD");
    if date.len() != 10 {
        return Err(bad());
    }
    let d = time::Date::parse(
        date,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map_err(|_| bad())?;
    let offset = time::UtcOffset::from_whole_seconds(utc_offset_min * 60).map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(d, time::Time::MIDNIGHT)
        .assume_offset(offset)
        .unix_timestamp()
        * 1000)
}

/// A merchant's bill (交易账单) of one day in the hub's local time (`pricing.utc_offset_min`):
/// every payment, refund, commission and returned commission, and totals the lines add up to
/// to the fen. `?format=csv` answers it as a CSV download.
#[utoipa::path(get, path = "/api/v1/bills/{merchant_id}/{date}", tag = "orders",
    params(("merchant_id" = String, Path), ("date" = String, Path, description = "YYYY-MM-DD"), BillQuery),
    security(("bearer" = [])), responses((status = 200, body = Bill, description = "JSON, or text/csv with ?format=csv"),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "no such merchant, or not the caller's")))]
pub async fn get_bill(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
    q: web::Query<BillQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (merchant_id, date) = path.into_inner();
    if !caller.sees(&merchant_id) || state.store.merchant(&merchant_id).await?.is_none() {
        return Err(ApiError::not_found("merchant"));
    }
    let as_csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::bad_request("format must be json or csv")),
    };
    let from = day_start(&date, state.settings.pricing.utc_offset_min)?;
    let rows = state
        .store
        .day_rows(&merchant_id, from, from + DAY_MS)
        .await?;
    let b = bill(&merchant_id, &date, from, from + DAY_MS, &rows);
    if as_csv {
        return Ok(HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .insert_header((
                "Content-Disposition",
                format!("attachment; filename=\"bill-{merchant_id}-{date}.csv\""),
            ))
            .body(csv(&b)));
    }
    Ok(HttpResponse::Ok().json(b))
}

/// A merchant's day in figures: sales, orders, average basket, refunds, sales by hour (the
/// page's chart) and each cabinet's best sellers; the same day and the same payments as the
/// bill's.
#[utoipa::path(get, path = "/api/v1/stats/{merchant_id}/{date}", tag = "orders",
    params(("merchant_id" = String, Path), ("date" = String, Path, description = "YYYY-MM-DD")),
    security(("bearer" = [])), responses((status = 200, body = DayStats),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "no such merchant, or not the caller's")))]
pub async fn get_stats(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    caller.require(Role::Viewer)?;
    let (merchant_id, date) = path.into_inner();
    if !caller.sees(&merchant_id) || state.store.merchant(&merchant_id).await?.is_none() {
        return Err(ApiError::not_found("merchant"));
    }
    let from = day_start(&date, state.settings.pricing.utc_offset_min)?;
    let rows = state
        .store
        .day_rows(&merchant_id, from, from + DAY_MS)
        .await?;
    Ok(HttpResponse::Ok().json(stats(&merchant_id, &date, from, &rows)))
}

#[cfg(test)]
mod tests {
    use super::day_start;

    #[test]
    fn a_day_starts_at_local_midnight() {
        // 2026-12-07 00:00 +08:00 is 2026-12-06 16:00 UTC.
        assert_eq!(day_start("2026-12-07", 480).ok(), Some(1_796_572_800_000));
        assert_eq!(day_start("2026-12-07", 0).ok(), Some(1_796_601_600_000));
        for bad in ["2026-13-01", "2026-12-7", "yesterday", "2026-02-30"] {
            assert!(day_start(bad, 480).is_err(), "{bad}");
        }
    }
}
