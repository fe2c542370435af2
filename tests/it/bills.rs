//! Bills (交易账单): a generated day of trading — baskets at list price and under a
//! promotion, partial and full refunds, commissions split and returned — reconciles on the
//! merchant's bill to the fen, as JSON and as CSV, against the orders the API shows.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY};
use crate::purchase::{order_status, visit};
use crate::refunds::refund_is;
use crate::settlement::{hub, refund, settlement_is};

both!(a_day_of_trading_reconciles_on_the_bill_to_the_fen);

/// The local (+08:00, the hub's default) date of a Unix-ms time.
fn local_date(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap_or(time::UtcOffset::UTC));
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

fn ms_of(rfc3339: &Value) -> i64 {
    rfc3339
        .as_str()
        .and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

fn sum(v: &Value, key: &str) -> i64 {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x[key].as_i64()).sum())
        .unwrap_or(0)
}

async fn a_day_of_trading_reconciles_on_the_bill_to_the_fen(backend: Backend) {
    let (hub, op, mut c) = hub(backend, true).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let (s, p) = hub
        .post("/api/v1/promotions", &op, json!({"name": "可乐八折", "window": {"type": "between", "starts_at": now - 1000, "ends_at": now + 3_600_000},
              "offer": {"type": "product_price", "rules": {"cola": {"kind": "percent_bps", "value": 8000}}}}))
        .await;
    assert_eq!(s, 201, "{p}");
    let baskets = [
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
        json!([{"sku": "chips", "qty": 3}]),
        json!([{"sku": "cola", "qty": 1}]),
        json!([{"sku": "cola", "qty": 5}, {"sku": "chips", "qty": 2}]),
        json!([{"sku": "chips", "qty": 1}]),
    ];
    let mut orders = Vec::new();
    for (i, basket) in baskets.iter().enumerate() {
        let session = visit(&hub, &op, &mut c, &format!("u{i}"), basket.clone()).await;
        let v = order_status(&hub, &op, &session, "paid").await;
        orders.push(v["order"]["id"].as_str().unwrap_or_default().to_owned());
    }
    for o in &orders {
        settlement_is(&hub, &op, o, "finished").await;
    }
    // A partial refund, a full one, and a second partial of the first order.
    for (o, fen) in [(&orders[0], 300), (&orders[2], 240), (&orders[0], 100)] {
        let r = refund(&hub, &op, o, fen).await;
        refund_is(&hub, &op, o, &r["refund"]["id"], "succeeded").await;
    }

    // What the API says of the orders, and the days it happened on.
    let mut want = (0i64, 0i64, 0i64, 0i64, 0i64);
    let mut days = BTreeSet::new();
    for id in &orders {
        let (_, o) = hub.get(&format!("/api/v1/orders/{id}"), &op).await;
        want.0 += o["paid_fen"].as_i64().unwrap_or(0);
        want.1 += o["refunded_fen"].as_i64().unwrap_or(0);
        want.2 += o["settlement"]["platform_fen"].as_i64().unwrap_or(0);
        want.3 += o["settlement"]["returned_fen"].as_i64().unwrap_or(0);
        let gross = o["priced"]["gross_fen"].as_i64().unwrap_or(0);
        want.4 += gross - o["total_fen"].as_i64().unwrap_or(0);
        days.insert(local_date(ms_of(&o["paid_at"])));
        for r in o["refunds"].as_array().into_iter().flatten() {
            days.insert(local_date(r["updated_at"].as_i64().unwrap_or(0)));
        }
        for x in o["settlement"]["returns"].as_array().into_iter().flatten() {
            days.insert(local_date(x["updated_at"].as_i64().unwrap_or(0)));
        }
    }
    // The merchant buys a year of service time, paid offline and recorded by the platform.
    let (s, so) = hub
        .post(
            "/api/v1/service-orders",
            ADMIN_KEY,
            json!({"merchant_id": "m1", "cabinet_ids": ["KM1"], "years": 1,
                   "channel": "offline", "voucher": "BANK-7"}),
        )
        .await;
    assert_eq!(s, 201, "{so}");
    days.insert(local_date(ms_of(&so["paid_at"])));
    assert!(want.4 > 0, "the promotion discounted something");
    assert!(want.3 > 0, "a commission was returned");

    // The bills of those days (one, unless the test ran across local midnight).
    let mut got = (0i64, 0i64, 0i64, 0i64, 0i64, 0i64);
    let mut stats_days: Vec<Value> = Vec::new();
    let (mut service_fen, mut service_lines) = (0i64, Vec::new());
    for day in &days {
        let (s, bill) = hub.get(&format!("/api/v1/bills/m1/{day}"), &op).await;
        assert_eq!(s, 200, "{bill}");
        let t = &bill["totals"];
        let lines_net = sum(&bill["lines"], "amount_fen");
        assert_eq!(lines_net, t["net_fen"].as_i64().unwrap_or(-1), "{bill}");
        assert_eq!(
            t["net_fen"].as_i64(),
            Some(
                t["paid_fen"].as_i64().unwrap_or(0)
                    - t["refunded_fen"].as_i64().unwrap_or(0)
                    - t["commission_fen"].as_i64().unwrap_or(0)
                    + t["commission_returned_fen"].as_i64().unwrap_or(0)
                    - t["service_fen"].as_i64().unwrap_or(0)
                    - t["recognition_fen"].as_i64().unwrap_or(0)
            ),
            "{bill}"
        );
        assert_eq!(t["commission_pending_fen"], 0, "{bill}");
        got.0 += t["paid_fen"].as_i64().unwrap_or(0);
        got.1 += t["refunded_fen"].as_i64().unwrap_or(0);
        got.2 += t["commission_fen"].as_i64().unwrap_or(0);
        got.3 += t["commission_returned_fen"].as_i64().unwrap_or(0);
        got.4 += t["discount_fen"].as_i64().unwrap_or(0);
        got.5 += t["orders"].as_i64().unwrap_or(0);
        service_fen += t["service_fen"].as_i64().unwrap_or(0);
        service_lines.extend(
            bill["lines"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["kind"] == "service_time")
                .cloned(),
        );

        // The CSV says the same: its lines add up to its total row, which is the net.
        let (status, text) = csv(&hub, &op, day).await;
        assert_eq!(status, 200, "{text}");
        let text = text.trim_start_matches('\u{feff}');
        let mut rows = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>());
        let all: Vec<Vec<&str>> = rows.by_ref().collect();
        let (total, lines) = all.split_last().unwrap_or_else(|| panic!("{text}"));
        assert_eq!(total[0], "total", "{text}");
        let csv_net: i64 = lines.iter().map(|r| r[8].parse::<i64>().unwrap_or(0)).sum();
        assert_eq!(total[8].parse::<i64>().ok(), Some(csv_net), "{text}");
        assert_eq!(Some(csv_net), t["net_fen"].as_i64(), "{text}");
        assert_eq!(lines.len(), bill["lines"].as_array().map_or(0, Vec::len));

        // The day's figures count the same payments.
        let (s, st) = hub.get(&format!("/api/v1/stats/m1/{day}"), &op).await;
        assert_eq!(s, 200, "{st}");
        assert_eq!(
            (&st["orders"], &st["sales_fen"]),
            (&t["orders"], &t["paid_fen"]),
            "{st}"
        );
        assert_eq!(st["by_hour"].as_array().map(Vec::len), Some(24), "{st}");
        assert_eq!(
            sum(&st["by_hour"], "sales_fen"),
            t["paid_fen"].as_i64().unwrap_or(-1)
        );
        assert_eq!(
            sum(&st["cabinets"], "orders"),
            t["orders"].as_i64().unwrap_or(-1)
        );
        stats_days.push(st);
    }
    // Every basket came from KM1: 8 cola, 7 chips.
    let top: Vec<(String, i64)> = stats_days
        .iter()
        .flat_map(|st| st["cabinets"].as_array().cloned().unwrap_or_default())
        .flat_map(|c| c["top_products"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["sku"].as_str().unwrap_or_default().to_owned(),
                p["qty"].as_i64().unwrap_or(0),
            )
        })
        .fold(Vec::<(String, i64)>::new(), |mut acc, (sku, q)| {
            match acc.iter_mut().find(|(s, _)| *s == sku) {
                Some((_, n)) => *n += q,
                None => acc.push((sku, q)),
            }
            acc
        });
    let mut top = top;
    top.sort();
    assert_eq!(top, [("chips".to_owned(), 7), ("cola".to_owned(), 8)]);
    assert_eq!(
        got,
        (want.0, want.1, want.2, want.3, want.4, orders.len() as i64),
        "paid, refunded, commission, returned, discount, orders"
    );
    // The service time is on the bill, as a charge to the merchant with its voucher.
    assert_eq!(service_fen, 15_000);
    assert_eq!(service_lines.len(), 1, "{service_lines:?}");
    assert_eq!(
        (
            &service_lines[0]["order_id"],
            &service_lines[0]["amount_fen"],
            &service_lines[0]["reference"],
            &service_lines[0]["channel"]
        ),
        (
            &so["id"],
            &json!(-15_000),
            &json!("BANK-7"),
            &json!("offline")
        )
    );

    // Another merchant's key sees no bill of m1's; a bad date or format is refused.
    let (_, other) = hub.merchant("m2").await;
    let day = days.iter().next().cloned().unwrap_or_default();
    let (s, _) = hub.get(&format!("/api/v1/bills/m1/{day}"), &other).await;
    assert_eq!(s, 404);
    let (s, _) = hub.get("/api/v1/bills/m1/2026-02-30", &op).await;
    assert_eq!(s, 400);
    let (s, _) = hub
        .get(&format!("/api/v1/bills/m1/{day}?format=xls"), &op)
        .await;
    assert_eq!(s, 400);
    let (s, b) = hub.get(&format!("/api/v1/bills/m1/{day}"), ADMIN_KEY).await;
    if days.len() == 1 {
        assert_eq!((s, &b["totals"]["orders"]), (200, &json!(orders.len())));
    }
    let (s, _) = hub.get(&format!("/api/v1/stats/m1/{day}"), &other).await;
    assert_eq!(s, 404);

    // The page shows the same day: totals, a bar per hour, the cabinet's best sellers, and
    // hands over the CSV (once: the page does not depend on the database).
    if days.len() == 1 && matches!(backend, Backend::Sqlite) {
        let mut br = crate::browser::Browser::launch(1440, 900).await;
        crate::browser::sign_in(&mut br, &hub, &op).await;
        br.eval("document.querySelector('[data-tab=bills]').click()")
            .await;
        br.eval(&format!(
            "document.getElementById('bill-date').value = '{day}';
             document.getElementById('bill-form').requestSubmit()"
        ))
        .await;
        let paid = got.0;
        br.wait_for(
            &format!(
                "document.querySelector('[data-total=orders]')?.textContent === '{}'
                 && document.querySelector('[data-total=sales]')?.textContent === '¥{}.{:02}'
                 && document.querySelector('[data-total=\"service time\"]')?.textContent === '¥150.00'
                 && document.querySelectorAll('#bill-chart rect').length === 24
                 && document.querySelector('[data-cabinet-stats=KM1]')?.textContent.includes('cola ×8')",
                orders.len(),
                paid / 100,
                paid % 100
            ),
            crate::harness::PATIENCE,
        )
        .await;
        br.eval("document.getElementById('bill-download').click()")
            .await;
        br.wait_for(
            &format!(
                "document.getElementById('bill-file')?.download === 'bill-m1-{day}.csv'
                 && document.getElementById('bill-file').href.startsWith('blob:')"
            ),
            crate::harness::PATIENCE,
        )
        .await;
    }
}

/// The CSV download: status and body.
async fn csv(hub: &TestHub, key: &str, day: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(hub.url(&format!("/api/v1/bills/m1/{day}?format=csv")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = r.status().as_u16();
    assert!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/csv")),
        "{:?}",
        r.headers()
    );
    (status, r.text().await.unwrap_or_default())
}
