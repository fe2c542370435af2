//! Service time (设备使用时长) is bought: a merchant's order is priced at the yearly price per
//! cabinet, paid through WeChat Pay Native (the payer scans the `code_url` in the simulator, as
//! in WeChat's app) and only then extends the cabinets' service, once however often WeChat
//! says so; an unpaid order is closed at WeChat and cancelled when its time is up, after which
//! its code can no longer be paid; a platform admin records an offline payment with its
//! voucher. An expired cabinet refuses shoppers until its service is bought.

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};
use crate::notices::{notify_as, NOTIFY};

/// Where WeChat notifies the platform's ordinary merchant account (Native payments).
const MERCHANT_NOTIFY: &str = "/api/v1/payments/wechat/merchant-notify";
use crate::purchase::{shop_with, start, visit};

both!(
    an_expired_cabinet_sells_again_once_its_service_is_paid_and_only_once_extended,
    an_unpaid_service_order_is_closed_at_wechat_and_cancelled_when_its_time_is_up,
    a_platform_admin_records_an_offline_payment_with_its_voucher,
    service_orders_are_refused_what_they_may_not_do,
);

const DAY_MS: i64 = 86_400_000;

fn unix_ms(rfc3339: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(
        rfc3339.as_str().unwrap_or_default(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn expiry(hub: &TestHub, key: &str, cabinet: &str) -> i64 {
    let (s, v) = hub.get(&format!("/api/v1/cabinets/{cabinet}"), key).await;
    assert_eq!(s, 200, "{v}");
    unix_ms(&v["service_expires_at"])
}

async fn merchant_admin(hub: &TestHub, merchant: &str) -> String {
    hub.new_key(ADMIN_KEY, merchant, "merchant_admin").await["key"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn order_becomes(hub: &TestHub, key: &str, id: &str, status: &str) -> Value {
    hub.eventually(PATIENCE, &format!("service order {status}"), || async {
        let (_, v) = hub.get(&format!("/api/v1/service-orders/{id}"), key).await;
        (v["status"] == status).then_some(v)
    })
    .await
}

async fn pay_code(hub: &TestHub, code_url: &Value) -> (u16, Value) {
    hub.post(
        "/sim/wechatpay/native/pay",
        ADMIN_KEY,
        json!({"code_url": code_url}),
    )
    .await
}

async fn an_expired_cabinet_sells_again_once_its_service_is_paid_and_only_once_extended(
    b: Backend,
) {
    // No free period: the cabinet's service ends at its activation.
    let (hub, op, mut c) = shop_with(b, |s| {
        s.cabinet.initial_service_days = 0;
        s.payments.simulator_retry_scale = 0.01;
    })
    .await;
    let (s, v) = start(&hub, &op, "u1", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (422, json!("service_expired")),
        "{v}"
    );

    let ma = merchant_admin(&hub, "m1").await;
    let (s, o) = hub
        .post(
            "/api/v1/service-orders",
            &ma,
            json!({"cabinet_ids": ["KM1"], "years": 2}),
        )
        .await;
    assert_eq!(s, 201, "{o}");
    assert_eq!(
        (
            &o["status"],
            &o["channel"],
            &o["unit_fen"],
            &o["amount_fen"],
            &o["years"],
            &o["cabinet_ids"]
        ),
        (
            &json!("unpaid"),
            &json!("wechat"),
            &json!(15000),
            &json!(30000),
            &json!(2),
            &json!(["KM1"])
        ),
        "{o}"
    );
    let code = o["code_url"].clone();
    assert!(
        code.as_str()
            .is_some_and(|c| c.starts_with("weixin://wxpay/bizpayurl?pr=")),
        "{o}"
    );
    let pay_by = unix_ms(&o["pay_by"]) - unix_ms(&o["created_at"]);
    assert!((299_000..=301_000).contains(&pay_by), "{o}");
    let id = o["id"].as_str().unwrap_or_default().to_owned();
    // Unpaid, nothing changed: still refused.
    let (s, _) = start(&hub, &op, "u1", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s, 422);

    let before = now_ms();
    let (s, t) = pay_code(&hub, &code).await;
    assert_eq!((s, &t["trade_state"]), (200, &json!("SUCCESS")), "{t}");
    let paid = order_becomes(&hub, &ma, &id, "paid").await;
    assert_eq!(paid["transaction_id"], t["transaction_id"], "{paid}");
    assert!(
        paid["code_url"].is_null(),
        "a paid order shows no code: {paid}"
    );
    let after = now_ms();
    let end = expiry(&hub, &op, "KM1").await;
    assert!(
        (before + 730 * DAY_MS - 1000..=after + 730 * DAY_MS + 1000).contains(&end),
        "two years from the payment: {end} not within [{before}, {after}] + 730 days"
    );
    let m = hub.metrics().await;
    for line in [
        r#"service_orders_total{status="created"} 1"#,
        r#"service_orders_total{status="paid"} 1"#,
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }

    // The cabinet sells again.
    visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 1}])).await;

    // The code is spent; WeChat's notice again, and again, changes nothing.
    let (s, again) = pay_code(&hub, &code).await;
    assert_eq!(s, 400, "{again}");
    let (s, r) = hub
        .post("/sim/wechatpay-redeliver", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    // Every notice WeChat sent (the payment's and the shopper's) comes again: each a replay.
    let sent = r["redelivered"].as_i64().unwrap_or(0);
    assert!(sent >= 2, "{r}");
    hub.eventually(
        PATIENCE,
        "every redelivered notice counted as a replay",
        || async {
            let m = hub.metrics().await;
            let replays = m
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                    r#"payment_notifications_rejected_total{provider="wechat",reason="replay"} "#,
                )
                })
                .and_then(|n| n.parse::<i64>().ok())
                .unwrap_or(0);
            (replays == sent).then_some(())
        },
    )
    .await;
    assert_eq!(expiry(&hub, &op, "KM1").await, end, "extended only once");
    let m = hub.metrics().await;
    assert!(
        m.contains(r#"service_orders_total{status="paid"} 1"#),
        "{m}"
    );

    // A signed notice that does not match the order (the amount) is kept for a person, and
    // extends nothing.
    let (s, o2) = hub
        .post(
            "/api/v1/service-orders",
            &ma,
            json!({"cabinet_ids": ["KM1"], "years": 1}),
        )
        .await;
    assert_eq!(s, 201, "{o2}");
    let id2 = o2["id"].as_str().unwrap_or_default();
    let forged = json!({"appid": "wxsimulator", "mchid": "1900000002", "out_trade_no": id2,
        "transaction_id": "4200000000000099", "trade_type": "NATIVE", "trade_state": "SUCCESS",
        "amount": {"total": 1, "payer_total": 1, "currency": "CNY"}});
    let s = notify_as(
        &hub,
        MERCHANT_NOTIFY,
        "EV-forged-1",
        "TRANSACTION.SUCCESS",
        "transaction",
        &forged,
    )
    .await;
    assert_eq!(s, 204);
    let (_, ex) = hub.get("/api/v1/payment-exceptions", &op).await;
    let kept = ex["items"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["order_id"] == id2).cloned())
        .unwrap_or_else(|| panic!("no exception for {id2}: {ex}"));
    assert_eq!(kept["reason"], "amount_mismatch", "{kept}");
    let (_, still) = hub.get(&format!("/api/v1/service-orders/{id2}"), &ma).await;
    assert_eq!(still["status"], "unpaid", "{still}");
    // A Native payment notice at the Pay Score (partner) account's address is not one of its
    // payments: recorded, nothing applied.
    let right = json!({"appid": "wxsimulator", "mchid": "1900000002", "out_trade_no": id2,
        "transaction_id": "4200000000000098", "trade_type": "NATIVE", "trade_state": "SUCCESS",
        "amount": {"total": 15000, "payer_total": 15000, "currency": "CNY"}});
    let s = notify_as(
        &hub,
        NOTIFY,
        "EV-elsewhere-1",
        "TRANSACTION.SUCCESS",
        "transaction",
        &right,
    )
    .await;
    assert_eq!(s, 204);
    let (_, still) = hub.get(&format!("/api/v1/service-orders/{id2}"), &ma).await;
    assert_eq!(still["status"], "unpaid", "{still}");
    assert_eq!(expiry(&hub, &op, "KM1").await, end);
}

async fn an_unpaid_service_order_is_closed_at_wechat_and_cancelled_when_its_time_is_up(b: Backend) {
    let hub = TestHub::start_with(b, |s| {
        s.service.unpaid_cancel_ms = 1_000;
        s.service.sweep_ms = 100;
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    hub.cabinet(&ma, "m1", "KM1").await;
    hub.cabinet(&ma, "m1", "KM2").await;
    let end = expiry(&hub, &op, "KM1").await;
    let (s, o) = hub
        .post(
            "/api/v1/service-orders",
            &ma,
            json!({"cabinet_ids": ["KM2", "KM1"], "years": 1}),
        )
        .await;
    assert_eq!(s, 201, "{o}");
    assert_eq!(o["amount_fen"], 30000, "{o}");
    let id = o["id"].as_str().unwrap_or_default().to_owned();
    let cancelled = order_becomes(&hub, &ma, &id, "cancelled").await;
    assert!(cancelled["cancelled_at"].is_string(), "{cancelled}");
    assert!(cancelled["code_url"].is_null(), "{cancelled}");
    // Closed at WeChat first: its code can no longer be paid.
    let (s, r) = pay_code(&hub, &o["code_url"]).await;
    assert_eq!(s, 400, "{r}");
    assert_eq!(expiry(&hub, &op, "KM1").await, end);
    let m = hub.metrics().await;
    assert!(
        m.contains(r#"service_orders_total{status="cancelled"} 1"#),
        "{m}"
    );
    let (s, list) = hub.get("/api/v1/service-orders", &ma).await;
    assert_eq!((s, &list["count"]), (200, &json!(1)), "{list}");
}

async fn a_platform_admin_records_an_offline_payment_with_its_voucher(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    hub.cabinet(&ma, "m1", "KM1").await;
    hub.cabinet(&ma, "m1", "KM2").await;
    let (e1, e2) = (
        expiry(&hub, &op, "KM1").await,
        expiry(&hub, &op, "KM2").await,
    );
    // A merchant cannot say it paid offline.
    let (s, r) = hub
        .post(
            "/api/v1/service-orders",
            &ma,
            json!({"cabinet_ids": ["KM1"], "years": 1, "channel": "offline", "voucher": "BANK-1"}),
        )
        .await;
    assert_eq!(s, 403, "{r}");
    let (s, r) = hub
        .post(
            "/api/v1/service-orders",
            ADMIN_KEY,
            json!({"merchant_id": "m1", "cabinet_ids": ["KM1", "KM2"], "years": 3, "channel": "offline"}),
        )
        .await;
    assert_eq!(s, 400, "no voucher: {r}");
    let (s, o) = hub
        .post(
            "/api/v1/service-orders",
            ADMIN_KEY,
            json!({"merchant_id": "m1", "cabinet_ids": ["KM1", "KM2"], "years": 3,
                   "channel": "offline", "voucher": "BANK-2026-12-07-001"}),
        )
        .await;
    assert_eq!(s, 201, "{o}");
    assert_eq!(
        (&o["status"], &o["channel"], &o["voucher"], &o["amount_fen"]),
        (
            &json!("paid"),
            &json!("offline"),
            &json!("BANK-2026-12-07-001"),
            &json!(90000)
        ),
        "{o}"
    );
    // Both still had service: three years are added to what was left.
    assert_eq!(expiry(&hub, &op, "KM1").await, e1 + 3 * 365 * DAY_MS);
    assert_eq!(expiry(&hub, &op, "KM2").await, e2 + 3 * 365 * DAY_MS);
    let (s, audit) = hub.get("/api/v1/audit", &ma).await;
    assert_eq!(s, 200, "{audit}");
    let entry = audit["items"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["action"] == "service_order.offline")
                .cloned()
        })
        .unwrap_or_else(|| panic!("not audited: {audit}"));
    assert_eq!(
        (&entry["subject"], &entry["reason"]),
        (&o["id"], &json!("BANK-2026-12-07-001")),
        "{entry}"
    );
}

async fn service_orders_are_refused_what_they_may_not_do(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let (ma2, _) = hub.merchant("m2").await;
    hub.cabinet(&ma, "m1", "KM1").await;
    hub.cabinet(&ma2, "m2", "KX1").await;
    let order = |key: String, body: Value| {
        let hub = &hub;
        async move {
            let (s, v) = hub.post("/api/v1/service-orders", &key, body).await;
            (s, v["error"]["code"].clone())
        }
    };
    // Not a merchant admin.
    assert_eq!(
        order(op.clone(), json!({"cabinet_ids": ["KM1"], "years": 1})).await,
        (403, json!("forbidden"))
    );
    // Another merchant's cabinet is as unknown as a missing one.
    assert_eq!(
        order(ma2.clone(), json!({"cabinet_ids": ["KM1"], "years": 1})).await,
        (404, json!("cabinet_not_found"))
    );
    assert_eq!(
        order(
            ma.clone(),
            json!({"cabinet_ids": ["KM1", "NOPE"], "years": 1})
        )
        .await,
        (404, json!("cabinet_not_found"))
    );
    for bad in [
        json!({"cabinet_ids": ["KM1"], "years": 0}),
        json!({"cabinet_ids": ["KM1"], "years": 11}),
        json!({"cabinet_ids": [], "years": 1}),
        json!({"cabinet_ids": ["KM1", "KM1"], "years": 1}),
        json!({"cabinet_ids": ["KM1"], "years": 1, "channel": "cash"}),
        json!({"cabinet_ids": ["KM1"], "years": 1, "voucher": "V1"}),
        json!({"cabinet_ids": ["KM1"], "years": 1, "price_fen": 1}),
    ] {
        let (s, _) = order(ma.clone(), bad.clone()).await;
        assert_eq!(s, 400, "{bad}");
    }
    // A merchant key cannot act for another merchant.
    assert_eq!(
        order(
            ma.clone(),
            json!({"merchant_id": "m2", "cabinet_ids": ["KX1"], "years": 1})
        )
        .await
        .0,
        404
    );
    // Another merchant's order is not seen.
    let (s, o) = hub
        .post(
            "/api/v1/service-orders",
            &ma,
            json!({"cabinet_ids": ["KM1"], "years": 1}),
        )
        .await;
    assert_eq!(s, 201, "{o}");
    let id = o["id"].as_str().unwrap_or_default();
    let (s, _) = hub.get(&format!("/api/v1/service-orders/{id}"), &ma2).await;
    assert_eq!(s, 404);
    let (_, list) = hub.get("/api/v1/service-orders", &ma2).await;
    assert_eq!(list["count"], 0, "{list}");
    let (s, _) = hub.get("/api/v1/service-orders?merchant_id=m1", &ma2).await;
    assert_eq!(s, 404);
}

/// A merchant renews from the page: the banner says the cabinet is out of service time and
/// offers to renew it; the order shows the code WeChat scans; once paid (scanned in the
/// simulator) the page says so over the feed and the cabinet leaves the banner.
#[actix_rt::test]
async fn the_page_renews_service_time_with_the_code_wechat_scans() {
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.cabinet.initial_service_days = 0;
    })
    .await;
    let (ma, _) = hub.merchant("m1").await;
    hub.cabinet(&ma, "m1", "KM1").await;
    let mut br = crate::browser::Browser::launch(1440, 900).await;
    crate::browser::sign_in(&mut br, &hub, &ma).await;
    br.wait_for(
        "document.querySelector('[data-expiring=KM1]')?.textContent === 'KM1 · expired'",
        PATIENCE,
    )
    .await;
    br.eval("document.getElementById('renew').click()").await;
    br.wait_for(
        "!document.getElementById('tab-service').hidden
         && document.getElementById('service-cabinets').value === 'KM1'",
        PATIENCE,
    )
    .await;
    br.eval(
        "document.getElementById('service-years').value = '2';
         document.getElementById('service-form').requestSubmit()",
    )
    .await;
    br.wait_for(
        "document.getElementById('service-qr-img')?.complete
         && document.getElementById('service-qr-img').naturalWidth >= 220
         && document.getElementById('service-pay-text').textContent.includes('¥300.00')",
        PATIENCE,
    )
    .await;
    let (_, list) = hub.get("/api/v1/service-orders", &ma).await;
    let o = list["items"][0].clone();
    assert_eq!(
        (&o["status"], &o["years"]),
        (&json!("unpaid"), &json!(2)),
        "{list}"
    );
    let (s, t) = pay_code(&hub, &o["code_url"]).await;
    assert_eq!(s, 200, "{t}");
    br.wait_for(
        "document.getElementById('service-pay').dataset.status === 'paid'
         && document.getElementById('service-pay-text').textContent.startsWith('Paid ¥300.00')",
        PATIENCE,
    )
    .await;
    br.wait_for(
        &format!(
            "document.querySelector('[data-service-order={}]')?.dataset.status === 'paid'",
            o["id"].as_str().unwrap_or_default()
        ),
        PATIENCE,
    )
    .await;
    // Two years of service: not within the banner's 30 days any more.
    br.wait_for("!document.querySelector('[data-expiring=KM1]')", PATIENCE)
        .await;
}
