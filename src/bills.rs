//! Bills (交易账单): a merchant's day of money, line by line, whose lines add up to its totals
//! to the fen. A payment counts on the day it was paid, a refund and a returned commission on
//! the day the provider settled them, a commission on its order's payment day once it was split
//! (a commission not split yet is shown apart, as pending, and not deducted), service time the
//! merchant bought on the day it was paid, and the day's recognitions paid after use as one
//! line at the end of the day.

use serde::Serialize;
use utoipa::ToSchema;

use crate::store::DayRows;
use crate::views::rfc3339;

/// One line of a bill; `amount_fen` is signed from the merchant's side (a payment adds, a
/// refund or the platform's commission takes away).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BillLine {
    /// `payment`, `refund`, `commission`, `commission_return`, `service_time`, `recognition`
    /// (the day's recognitions paid after use, one line).
    pub kind: &'static str,
    /// When it happened, RFC 3339.
    pub at: Option<String>,
    /// The order (a service-time line: the service order).
    pub order_id: String,
    /// The cabinet it was sold from (payments).
    pub cabinet_id: Option<String>,
    /// `wechat` or `alipay` (payments).
    pub channel: Option<String>,
    /// The provider's trade number (payments, service time), the refund's or the return's id,
    /// an offline payment's voucher.
    pub reference: Option<String>,
    /// List price of what was taken (payments).
    pub gross_fen: Option<i64>,
    /// Promotions (payments).
    pub discount_fen: Option<i64>,
    /// Signed, from the merchant's side.
    pub amount_fen: i64,
}

/// A bill's totals; `net_fen` is the sum of its lines' amounts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct BillTotals {
    /// Orders paid.
    pub orders: i64,
    /// Their list price.
    pub gross_fen: i64,
    /// Their promotions.
    pub discount_fen: i64,
    /// What the shoppers paid.
    pub paid_fen: i64,
    /// Refunds settled.
    pub refunds: i64,
    /// What they gave back.
    pub refunded_fen: i64,
    /// The platform's commission on the day's orders, split.
    pub commission_fen: i64,
    /// Commission the platform returned for refunds.
    pub commission_returned_fen: i64,
    /// Commission on the day's orders not split yet (not deducted here).
    pub commission_pending_fen: i64,
    /// Service-time orders paid.
    pub service_orders: i64,
    /// What they cost.
    pub service_fen: i64,
    /// Recognitions of the day's sessions (算法识别次数), prepaid ones included.
    pub recognitions: i64,
    /// What the recognitions paid after use cost (those from a prepaid quota cost nothing here).
    pub recognition_fen: i64,
    /// paid − refunded − commission + returned − service time − recognitions.
    pub net_fen: i64,
}

/// A merchant's bill of one day.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Bill {
    /// The merchant.
    pub merchant_id: String,
    /// The day, `YYYY-MM-DD`, in the hub's local time (`pricing.utc_offset_min`).
    pub date: String,
    /// Where the day starts, RFC 3339.
    pub from: Option<String>,
    /// Where it ends (exclusive).
    pub to: Option<String>,
    /// The lines, payments first (as paid), then refunds, commissions and returns.
    pub lines: Vec<BillLine>,
    /// The totals.
    pub totals: BillTotals,
}

/// States in which a settlement's commission has been split to the platform.
fn split(state: &str, step: &str) -> bool {
    matches!(state, "split" | "finished" | "returned") || (state == "failed" && step == "finish")
}

/// The bill of `rows`, which are the merchant's day.
pub fn bill(merchant_id: &str, date: &str, from: i64, to: i64, rows: &DayRows) -> Bill {
    let mut lines = Vec::new();
    let mut t = BillTotals::default();
    for o in &rows.paid {
        let priced: Option<serde_json::Value> = o
            .priced
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok());
        let gross = priced
            .as_ref()
            .and_then(|p| p["gross_fen"].as_i64())
            .unwrap_or(o.paid_fen);
        let total = o.total_fen.unwrap_or(o.paid_fen);
        let discount = (gross - total).max(0);
        t.orders += 1;
        t.gross_fen += gross;
        t.discount_fen += discount;
        t.paid_fen += o.paid_fen;
        lines.push(BillLine {
            kind: "payment",
            at: o.paid_at.and_then(rfc3339),
            order_id: o.id.clone(),
            cabinet_id: Some(o.cabinet_id.clone()),
            channel: Some(o.channel.clone()),
            reference: o.transaction_id.clone(),
            gross_fen: Some(gross),
            discount_fen: Some(discount),
            amount_fen: o.paid_fen,
        });
    }
    for r in &rows.refunds {
        t.refunds += 1;
        t.refunded_fen += r.amount_fen;
        lines.push(BillLine {
            kind: "refund",
            at: rfc3339(r.updated_at),
            order_id: r.order_id.clone(),
            cabinet_id: None,
            channel: None,
            reference: Some(r.id.clone()),
            gross_fen: None,
            discount_fen: None,
            amount_fen: -r.amount_fen,
        });
    }
    for s in &rows.settlements {
        if split(&s.state, &s.step) {
            t.commission_fen += s.platform_fen;
            if s.platform_fen > 0 {
                lines.push(BillLine {
                    kind: "commission",
                    at: rfc3339(s.updated_at),
                    order_id: s.order_id.clone(),
                    cabinet_id: None,
                    channel: Some(s.channel.clone()),
                    reference: Some(s.split_no()),
                    gross_fen: None,
                    discount_fen: None,
                    amount_fen: -s.platform_fen,
                });
            }
        } else if let Some(o) = rows.paid.iter().find(|o| o.id == s.order_id) {
            let net = (o.paid_fen - o.refunded_fen - o.refund_reserved_fen).max(0);
            t.commission_pending_fen += net * s.commission_bps / 10_000;
        }
    }
    for x in &rows.returns {
        t.commission_returned_fen += x.amount_fen;
        lines.push(BillLine {
            kind: "commission_return",
            at: rfc3339(x.updated_at),
            order_id: x.order_id.clone(),
            cabinet_id: None,
            channel: None,
            reference: Some(x.id.clone()),
            gross_fen: None,
            discount_fen: None,
            amount_fen: x.amount_fen,
        });
    }
    for o in &rows.service {
        t.service_orders += 1;
        t.service_fen += o.amount_fen;
        lines.push(BillLine {
            kind: "service_time",
            at: o.paid_at.and_then(rfc3339),
            order_id: o.id.clone(),
            cabinet_id: None,
            channel: Some(o.channel.clone()),
            reference: o.transaction_id.clone().or_else(|| o.voucher.clone()),
            gross_fen: None,
            discount_fen: None,
            amount_fen: -o.amount_fen,
        });
    }
    let (recognitions, recognition_fen) = rows.recognitions;
    t.recognitions = recognitions;
    t.recognition_fen = recognition_fen;
    if recognition_fen > 0 {
        lines.push(BillLine {
            kind: "recognition",
            at: rfc3339(to - 1),
            order_id: String::new(),
            cabinet_id: None,
            channel: None,
            reference: Some(format!("{recognitions} recognitions")),
            gross_fen: None,
            discount_fen: None,
            amount_fen: -recognition_fen,
        });
    }
    t.net_fen = t.paid_fen - t.refunded_fen - t.commission_fen + t.commission_returned_fen
        - t.service_fen
        - t.recognition_fen;
    Bill {
        merchant_id: merchant_id.to_owned(),
        date: date.to_owned(),
        from: rfc3339(from),
        to: rfc3339(to),
        lines,
        totals: t,
    }
}

/// One hour of a day's sales.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct HourStats {
    /// 0–23, local time.
    pub hour: u32,
    /// Orders paid in it.
    pub orders: i64,
    /// What they paid.
    pub sales_fen: i64,
}

/// A product's sales.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ProductStats {
    /// Sku.
    pub sku: String,
    /// Its name on the order.
    pub name: String,
    /// Items sold.
    pub qty: i64,
    /// Their amount after line prices (fen).
    pub amount_fen: i64,
}

/// A cabinet's day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CabinetStats {
    /// The cabinet.
    pub cabinet_id: String,
    /// Orders paid.
    pub orders: i64,
    /// What they paid.
    pub sales_fen: i64,
    /// Its five best sellers by items sold.
    pub top_products: Vec<ProductStats>,
}

/// A merchant's day in figures (the page's statistics and chart).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DayStats {
    /// The merchant.
    pub merchant_id: String,
    /// `YYYY-MM-DD`, local time.
    pub date: String,
    /// Orders paid.
    pub orders: i64,
    /// What they paid (fen).
    pub sales_fen: i64,
    /// sales ÷ orders, rounded down (fen).
    pub average_basket_fen: i64,
    /// Refunds settled in the day (fen).
    pub refunded_fen: i64,
    /// Every hour, 0 to 23.
    pub by_hour: Vec<HourStats>,
    /// Cabinets with sales, best first.
    pub cabinets: Vec<CabinetStats>,
}

/// The figures of `rows`, the merchant's day starting at `from` (Unix ms, local midnight).
pub fn stats(merchant_id: &str, date: &str, from: i64, rows: &DayRows) -> DayStats {
    use std::collections::BTreeMap;
    let mut by_hour: Vec<HourStats> = (0..24)
        .map(|hour| HourStats {
            hour,
            ..HourStats::default()
        })
        .collect();
    let mut cabinets: BTreeMap<&str, (i64, i64, BTreeMap<String, ProductStats>)> = BTreeMap::new();
    let (mut orders, mut sales) = (0i64, 0i64);
    for o in &rows.paid {
        orders += 1;
        sales += o.paid_fen;
        let hour = ((o.paid_at.unwrap_or(from) - from).max(0) / 3_600_000).min(23) as usize;
        by_hour[hour].orders += 1;
        by_hour[hour].sales_fen += o.paid_fen;
        let c = cabinets.entry(o.cabinet_id.as_str()).or_default();
        c.0 += 1;
        c.1 += o.paid_fen;
        let priced: Option<serde_json::Value> = o
            .priced
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok());
        for line in priced
            .as_ref()
            .and_then(|p| p["lines"].as_array())
            .into_iter()
            .flatten()
        {
            let Some(sku) = line["sku"].as_str() else {
                continue;
            };
            let p = c.2.entry(sku.to_owned()).or_insert_with(|| ProductStats {
                sku: sku.to_owned(),
                name: line["name"].as_str().unwrap_or(sku).to_owned(),
                qty: 0,
                amount_fen: 0,
            });
            p.qty += line["qty"].as_i64().unwrap_or(0);
            p.amount_fen += line["amount_fen"].as_i64().unwrap_or(0);
        }
    }
    let mut cabinets: Vec<CabinetStats> = cabinets
        .into_iter()
        .map(|(id, (n, fen, products))| {
            let mut top: Vec<ProductStats> = products.into_values().collect();
            top.sort_by(|a, b| b.qty.cmp(&a.qty).then(b.amount_fen.cmp(&a.amount_fen)));
            top.truncate(5);
            CabinetStats {
                cabinet_id: id.to_owned(),
                orders: n,
                sales_fen: fen,
                top_products: top,
            }
        })
        .collect();
    cabinets.sort_by(|a, b| {
        b.sales_fen
            .cmp(&a.sales_fen)
            .then(a.cabinet_id.cmp(&b.cabinet_id))
    });
    DayStats {
        merchant_id: merchant_id.to_owned(),
        date: date.to_owned(),
        orders,
        sales_fen: sales,
        average_basket_fen: if orders > 0 { sales / orders } else { 0 },
        refunded_fen: rows.refunds.iter().map(|r| r.amount_fen).sum(),
        by_hour,
        cabinets,
    }
}

/// Yuan with two decimals, for people; the fen columns are for machines.
fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", fen.abs() / 100, fen.abs() % 100)
}

/// A CSV field: quoted when it holds a comma, a quote or a line break; a leading `=`, `+`, `-`
/// or `@` is prefixed with `'` so that a spreadsheet does not take it for a formula (ids come
/// from cabinets and providers). Amounts are written by this module and never need either.
fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The bill as CSV (UTF-8, with a byte-order mark so that spreadsheets read the Chinese):
/// one row per line, then a `total` row whose amount is the net.
pub fn csv(b: &Bill) -> String {
    let mut out = String::from(
        "\u{feff}kind,at,order_id,cabinet_id,channel,reference,gross_fen,discount_fen,amount_fen,amount_yuan\r\n",
    );
    let opt = |v: &Option<String>| v.as_deref().map(field).unwrap_or_default();
    let num = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    for l in &b.lines {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\r\n",
            l.kind,
            opt(&l.at),
            field(&l.order_id),
            opt(&l.cabinet_id),
            opt(&l.channel),
            opt(&l.reference),
            num(l.gross_fen),
            num(l.discount_fen),
            l.amount_fen,
            yuan(l.amount_fen)
        ));
    }
    out.push_str(&format!(
        "total,{},,,,,{},{},{},{}\r\n",
        field(&b.date),
        b.totals.gross_fen,
        b.totals.discount_fen,
        b.totals.net_fen,
        yuan(b.totals.net_fen)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_has_two_decimals_and_a_sign() {
        assert_eq!(yuan(1250), "12.50");
        assert_eq!(yuan(-62), "-0.62");
        assert_eq!(yuan(0), "0.00");
    }

    #[test]
    fn csv_fields_cannot_break_rows_or_become_formulas() {
        assert_eq!(field("o1"), "o1");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(field("-2+3,x"), "\"'-2+3,x\"");
    }
}
