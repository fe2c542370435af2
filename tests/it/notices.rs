//! Provider notices are reconciled with the order they name before they are applied, and a
//! notice is applied and recorded in one transaction: one that could not be applied is applied
//! when the provider delivers it again, never taken for a replay.

use std::time::Duration;

use serde_json::{json, Value};

use cabinet_hub::payments::crypto::{encrypt_resource, response_message, RsaSigner};

use crate::both;
use crate::harness::{fresh_postgres, Backend, Cabinet, TestHub, ADMIN_KEY, PATIENCE};
use crate::purchase::{order_status, script_shopper, shop, shop_visit, shop_with};

const PLATFORM_KEY: &str = include_str!("../../config/dev-keys/wechat-platform.key.pem");

both!(payment_notices_must_match_their_order);

/// A purchase whose deduction fails: its order waits, `pending_payment`, for the shopper.
async fn owing(hub: &TestHub, op: &str, c: &mut Cabinet, user: &str) -> String {
    script_shopper(hub, user, json!({"confirm": true, "deduction": "fail"})).await;
    let (s, v) = hub
        .post(
            "/api/v1/sessions",
            op,
            json!({"cabinet_id": "KM1", "user_id": user, "channel": "wechat", "mode": "purchase"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    hub.eventually(PATIENCE, "open", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), op).await;
        (v["session"]["state"] == "open").then_some(())
    })
    .await;
    shop_visit(c, &session, json!([{"sku": "chips", "qty": 1}])).await;
    order_status(hub, op, &session, "pending_payment").await;
    session
}

/// A USER_PAID notice as WeChat sends it: the service order encrypted with the APIv3 key, the
/// body signed with the platform key (here the simulator's development key).
async fn notify(hub: &TestHub, id: &str, resource: &Value) -> u16 {
    notify_as(hub, NOTIFY, id, "PAYSCORE.USER_PAID", "payscore", resource).await
}

/// Where WeChat notifies the platform's partner account (Pay Score).
pub(crate) const NOTIFY: &str = "/api/v1/payments/wechat/notify";

/// A notice of `event_type` whose resource is of `kind` (`payscore`, `transaction`), signed
/// and encrypted as WeChat sends it.
pub(crate) async fn notify_as(
    hub: &TestHub,
    path: &str,
    id: &str,
    event_type: &str,
    kind: &str,
    resource: &Value,
) -> u16 {
    let nonce = "abcdefghijkl";
    let ciphertext = encrypt_resource(
        cabinet_hub::simulators::DEV_API_V3_KEY.as_bytes(),
        nonce,
        kind,
        resource.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let body =
        json!({"id": id, "create_time": "2026-12-06T12:00:00+08:00", "event_type": event_type,
        "resource_type": "encrypt-resource", "summary": "notice",
        "resource": {"algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext, "nonce": nonce,
                     "associated_data": kind, "original_type": kind}})
        .to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let signer = RsaSigner::from_pem(PLATFORM_KEY).unwrap_or_else(|e| panic!("{e}"));
    let sig = signer
        .sign(response_message(ts, "n1", &body).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let r = hub
        .client
        .post(hub.url(path))
        .header("Wechatpay-Timestamp", ts.to_string())
        .header("Wechatpay-Nonce", "n1")
        .header("Wechatpay-Signature", sig)
        .header("Wechatpay-Serial", "PUB_KEY_ID_SIMULATOR")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    r.status().as_u16()
}

/// The service order a notice for `session` carries, as the simulator would report it paid.
fn paid(session: &str, fen: i64) -> Value {
    json!({"out_order_no": session, "service_id": "500001", "state": "DONE", "appid": "wxsimulator",
           "mchid": "1900000001", "sub_mchid": "simm1", "total_amount": fen,
           "collection": {"state": "USER_PAID", "total_amount": fen, "paying_amount": 0, "paid_amount": fen,
                          "details": [{"seq": 1, "amount": fen, "paid_type": "NEWTON", "paid_time": "20261206120000",
                                       "transaction_id": "4200000000000001"}]}})
}

/// Signed and well formed, and still not applied: the amount, the application, either
/// merchant, or the order itself differ from what the hub holds. Each is kept as a payment
/// exception (the merchant sees its own; the platform all) and counted; the order waits for a
/// notice that matches.
async fn payment_notices_must_match_their_order(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let session = owing(&hub, &op, &mut c, "u3").await;
    let right = paid(&session, 650);
    let mut cases = Vec::new();
    let mut amount = right.clone();
    amount["collection"]["paid_amount"] = json!(1);
    cases.push((amount, "amount_mismatch"));
    let mut app = right.clone();
    app["appid"] = json!("wxsomeoneelse");
    cases.push((app, "app_mismatch"));
    let mut sp = right.clone();
    sp["mchid"] = json!("1900000999");
    cases.push((sp, "merchant_mismatch"));
    let mut sub = right.clone();
    sub["sub_mchid"] = json!("1900000888");
    cases.push((sub, "merchant_mismatch"));
    let mut none = right.clone();
    none.as_object_mut().map(|o| o.remove("appid"));
    cases.push((none, "app_mismatch"));
    let unknown = paid("sNoSuchSession0000000", 650);
    cases.push((unknown, "unknown_order"));
    for (i, (resource, _)) in cases.iter().enumerate() {
        let s = notify(&hub, &format!("EV-bad-{i}"), resource).await;
        assert!((200..300).contains(&s), "case {i}: answered {s}");
    }
    let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
    assert_eq!(
        v["order"]["status"], "pending_payment",
        "none was applied: {v}"
    );

    let reasons = |v: &Value| -> Vec<String> {
        let mut r: Vec<String> = v["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect();
        r.sort();
        r
    };
    let (s, mine) = hub.get("/api/v1/payment-exceptions", &op).await;
    assert_eq!(s, 200, "{mine}");
    assert_eq!(
        reasons(&mine),
        [
            "amount_mismatch",
            "app_mismatch",
            "app_mismatch",
            "merchant_mismatch",
            "merchant_mismatch"
        ],
        "{mine}"
    );
    assert!(mine["items"]
        .as_array()
        .is_some_and(|a| a.iter().all(|e| e["order_id"].as_str().is_some())));
    let (_, all) = hub.get("/api/v1/payment-exceptions", ADMIN_KEY).await;
    assert_eq!(all["count"], 6, "{all}");
    let (_, other) = hub.merchant("m2").await;
    let (_, theirs) = hub.get("/api/v1/payment-exceptions", &other).await;
    assert_eq!(theirs["count"], 0, "{theirs}");
    let m = hub.metrics().await;
    assert!(
        m.contains(
            r#"payment_notifications_rejected_total{provider="wechat",reason="mismatch"} 6"#
        ),
        "{m}"
    );
    // The same bad notice again is a replay, not a second exception.
    notify(&hub, "EV-bad-0", &cases[0].0).await;
    let (_, all) = hub.get("/api/v1/payment-exceptions", ADMIN_KEY).await;
    assert_eq!(all["count"], 6, "{all}");

    // The notice that matches is applied.
    let s = notify(&hub, "EV-good", &right).await;
    assert!((200..300).contains(&s), "{s}");
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 650);
}

/// A notice whose application fails (the database refuses the write) is answered non-2xx and
/// not recorded: WeChat delivers it again, and once the database takes writes it is applied —
/// not taken for a replay of a notice that was never applied.
#[actix_rt::test]
async fn a_notice_that_could_not_be_applied_is_applied_when_delivered_again() {
    let db = fresh_postgres().await;
    let url = db.clone();
    let (hub, op, mut c) = shop_with(Backend::Sqlite, move |s| {
        s.database.url = Some(url.clone());
        // Only the notice may settle the order here: no deduction check, no collection.
        s.payments.deduction_check_ms = 600_000;
        s.payments.collect_interval_ms = 600_000;
    })
    .await;
    script_shopper(&hub, "u3", json!({"confirm": true, "deduction": "fail"})).await;
    let (s, v) = hub
        .post(
            "/api/v1/sessions",
            &op,
            json!({"cabinet_id": "KM1", "user_id": "u3", "channel": "wechat", "mode": "purchase"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    hub.eventually(PATIENCE, "open", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
        (v["session"]["state"] == "open").then_some(())
    })
    .await;
    shop_visit(&mut c, &session, json!([{"sku": "chips", "qty": 1}])).await;
    // The deduction failed: no notice; the order waits only for the shopper. Without the
    // deduction check the order is still completing; the notice settles it either way.
    hub.eventually(PATIENCE, "completing", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
        matches!(
            v["order"]["status"].as_str(),
            Some("completing" | "pending_payment")
        )
        .then_some(())
    })
    .await;

    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(
        "ALTER TABLE orders ADD CONSTRAINT not_yet_paid CHECK (status <> 'paid') NOT VALID",
    )
    .execute(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let failures = r#"payment_notifications_rejected_total{provider="wechat",reason="storage"}"#;
    let (s, r) = hub.post("/sim/users/u3/pay", ADMIN_KEY, json!({})).await;
    assert_eq!((s, r["orders_paid"].clone()), (200, json!(1)), "{r}");
    hub.eventually(PATIENCE, "a refused application", || async {
        (hub.metric(failures).await >= 1.0).then_some(())
    })
    .await;
    let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
    assert_ne!(v["order"]["status"], "paid", "{v}");
    sqlx::query("ALTER TABLE orders DROP CONSTRAINT not_yet_paid")
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // WeChat's next delivery (its schedule scaled down for tests) is applied.
    let v = hub
        .eventually(
            Duration::from_secs(60),
            "paid by the redelivered notice",
            || async {
                let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
                (v["order"]["status"] == "paid").then_some(v)
            },
        )
        .await;
    assert_eq!(v["order"]["paid_fen"], 650);
}

/// An operator sees payment exceptions on the page: those kept before they signed in (from the
/// API) and a new one as it is kept (over the feed), with the reason and the notice's id.
#[actix_rt::test]
async fn the_page_shows_payment_exceptions_as_they_are_kept() {
    let (hub, _op, _c) = shop(Backend::Sqlite).await;
    let s = notify(&hub, "EV-before", &paid("sNoSuchSessionBefore0", 650)).await;
    assert!((200..300).contains(&s), "{s}");
    let mut b = crate::browser::Browser::launch(1440, 900).await;
    // The platform's key: a notice that names no order of ours belongs to no merchant.
    crate::browser::sign_in(&mut b, &hub, ADMIN_KEY).await;
    b.eval("document.querySelector('[data-tab=exceptions]').click()")
        .await;
    b.wait_for(
        "document.getElementById('exceptions').textContent.includes('EV-before')",
        PATIENCE,
    )
    .await;
    let s = notify(&hub, "EV-after", &paid("sNoSuchSessionAfter00", 650)).await;
    assert!((200..300).contains(&s), "{s}");
    b.wait_for(
        "document.getElementById('exceptions').textContent.includes('EV-after')
         && document.getElementById('tab-exceptions-count').textContent === '2'
         && document.getElementById('exceptions-empty').hidden",
        PATIENCE,
    )
    .await;
    let reasons = b
        .eval("[...document.querySelectorAll('#exceptions td.warn')].map((t) => t.textContent).join(',')")
        .await;
    assert_eq!(reasons, "unknown_order,unknown_order");
}
