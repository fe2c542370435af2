//! 需确认模式 end to end: a purchase answers 202 with the confirmation the merchant's front end
//! hands to the shopper's WeChat or Alipay, unchanged; the shopper confirms through that
//! hand-off (the simulator verifies it as the provider would); the session then goes on by
//! itself, and `?wait_s=` long polls follow it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};
use crate::purchase::{order_status, script_shopper, shop, shop_visit};

both!(
    a_shopper_confirms_through_wechats_mini_program,
    a_shopper_confirms_through_alipays_mini_program,
    long_polls_answer_when_the_session_moves,
    an_unconfirmed_session_ends_at_its_deadline_and_frees_the_cabinet,
);

/// Starts a purchase and answers the 202's body.
async fn confirming(hub: &TestHub, op: &str, user: &str, channel: &str) -> Value {
    let (s, v) = hub
        .post(
            "/api/v1/sessions",
            op,
            json!({"cabinet_id": "KM1", "user_id": user, "channel": channel, "mode": "purchase"}),
        )
        .await;
    assert_eq!(
        (s, v["session"]["state"].as_str()),
        (202, Some("confirming")),
        "{v}"
    );
    assert_eq!(v["confirmation"]["channel"], channel, "{v}");
    v
}

fn session_id(v: &Value) -> String {
    v["session"]["id"].as_str().unwrap_or_default().to_owned()
}

async fn state(hub: &TestHub, op: &str, session: &str) -> String {
    let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), op).await;
    v["session"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The WeChat hand-off: `extraData` exactly as the hub gave it, and what a tampered one gets.
async fn a_shopper_confirms_through_wechats_mini_program(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "m1", json!({"confirm": "manual"})).await;
    let v = confirming(&hub, &op, "m1", "wechat").await;
    let session = session_id(&v);
    let extra = v["confirmation"]["extra_data"].clone();
    assert_eq!(v["confirmation"]["business_type"], "wxpayScoreUse");
    assert_eq!(extra["mch_id"], "1900000001", "the platform's merchant id");
    assert_eq!(extra["sign_type"], "HMAC-SHA256");
    // Signed as WeChat's APIv2 rule says, with the configured key.
    let fields: Vec<(&str, &str)> = ["mch_id", "package", "timestamp", "nonce_str", "sign_type"]
        .iter()
        .map(|k| (*k, extra[*k].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        extra["sign"].as_str(),
        Some(
            cabinet_hub::payments::crypto::apiv2_sign(
                fields,
                cabinet_hub::simulators::DEV_API_V2_KEY
            )
            .as_str()
        )
    );
    // Nobody confirmed: the door stays shut.
    assert!(c
        .try_command("unlock", Duration::from_millis(500))
        .await
        .is_none());
    assert_eq!(state(&hub, &op, &session).await, "confirming");

    // Anything but the hub's own signature is refused, as WeChat refuses it.
    let mut forged = extra.clone();
    forged["package"] = json!(format!(
        "{}x",
        extra["package"].as_str().unwrap_or_default()
    ));
    let mut unsigned = extra.clone();
    unsigned["sign"] = json!("0".repeat(64));
    let mut md5 = extra.clone();
    md5["sign_type"] = json!("MD5");
    for bad in [forged, unsigned, md5, json!({"package": extra["package"]})] {
        let (s, r) = hub
            .post(
                "/sim/wechatpay/confirm",
                ADMIN_KEY,
                json!({"extra_data": bad}),
            )
            .await;
        assert_eq!(s, 400, "{bad}: {r}");
    }
    // The control API is the platform admin's, like the rest of the simulators'.
    let (s, _) = hub
        .post("/sim/wechatpay/confirm", &op, json!({"extra_data": extra}))
        .await;
    assert_eq!(s, 403);
    assert_eq!(state(&hub, &op, &session).await, "confirming");

    let (s, r) = hub
        .post(
            "/sim/wechatpay/confirm",
            ADMIN_KEY,
            json!({"extra_data": extra}),
        )
        .await;
    assert_eq!((s, r["state"].as_str()), (200, Some("DOING")), "{r}");
    // The session goes on by itself: the provider's notification, then the unlock.
    let unlock = c.expect_command("unlock", PATIENCE).await;
    assert_eq!(unlock["session_id"], session.as_str());
    c.ack(&unlock, true, None).await;
    hub.eventually(PATIENCE, "open", || async {
        (state(&hub, &op, &session).await == "open").then_some(())
    })
    .await;
    // A second hand-off of the same confirmation changes nothing.
    let (s, _) = hub
        .post(
            "/sim/wechatpay/confirm",
            ADMIN_KEY,
            json!({"extra_data": extra}),
        )
        .await;
    assert_eq!(s, 200);
    shop_visit(&mut c, &session, json!([{"sku": "cola", "qty": 1}])).await;
    let paid = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(paid["order"]["paid_fen"], 300);
}

/// The Alipay hand-off: the `order_str` as the hub gave it, and a tampered one.
async fn a_shopper_confirms_through_alipays_mini_program(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "a1", json!({"confirm": "manual"})).await;
    let v = confirming(&hub, &op, "a1", "alipay").await;
    let session = session_id(&v);
    let order_str = v["confirmation"]["order_str"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(order_str.contains("sign="), "{order_str}");
    assert!(c
        .try_command("unlock", Duration::from_millis(500))
        .await
        .is_none());
    let tampered = order_str.replacen("out_order_no=", "out_order_no=x", 1);
    for bad in [tampered, "out_order_no=1".to_owned(), String::new()] {
        let (s, r) = hub
            .post("/sim/alipay/confirm", ADMIN_KEY, json!({"order_str": bad}))
            .await;
        assert_eq!(s, 400, "{bad}: {r}");
    }
    let (s, _) = hub
        .post("/sim/alipay/confirm", &op, json!({"order_str": order_str}))
        .await;
    assert_eq!(s, 403);
    let (s, r) = hub
        .post(
            "/sim/alipay/confirm",
            ADMIN_KEY,
            json!({"order_str": order_str}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    hub.eventually(PATIENCE, "open", || async {
        (state(&hub, &op, &session).await == "open").then_some(())
    })
    .await;
    shop_visit(&mut c, &session, json!([{"sku": "chips", "qty": 1}])).await;
    let paid = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(paid["order"]["paid_fen"], 650);
}

/// `?wait_s=` answers as soon as the state changes, not at the end of the wait; at the end of
/// the wait when nothing changes; at once when the state already differs from `from`; and
/// refuses waits above 30 s.
async fn long_polls_answer_when_the_session_moves(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "w1", json!({"confirm": "manual"})).await;
    let v = confirming(&hub, &op, "w1", "wechat").await;
    let session = session_id(&v);
    let path = format!("/api/v1/sessions/{session}");

    let t = Instant::now();
    let (s, still) = hub.get(&format!("{path}?wait_s=1"), &op).await;
    assert_eq!(
        (s, still["session"]["state"].as_str()),
        (200, Some("confirming"))
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "waited {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let (_, at_once) = hub.get(&format!("{path}?wait_s=30&from=open"), &op).await;
    assert_eq!(at_once["session"]["state"], "confirming");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    for bad in [
        "wait_s=31",
        "wait_s=-1",
        "wait_s=x",
        "colour=red",
        "wait_s=5&until=ajar",
        "wait_s=5&until=open&from=confirming",
    ] {
        let (s, r) = hub.get(&format!("{path}?{bad}"), &op).await;
        assert_eq!(s, 400, "{bad}: {r}");
    }
    // Another merchant's key learns nothing, waiting or not.
    let (_, other) = hub.merchant("m2").await;
    let (s, _) = hub.get(&format!("{path}?wait_s=1"), &other).await;
    assert_eq!(s, 404);

    let poll = |query: &str| {
        let (client, url, key) = (
            hub.client.clone(),
            hub.url(&format!("{path}?{query}")),
            op.clone(),
        );
        actix_rt::spawn(async move {
            let t = Instant::now();
            let r = client
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (t.elapsed(), v)
        })
    };
    let next = poll("wait_s=30&from=confirming");
    // The mini-program's wait: one poll, answered at the open door, not at the unlock on the way.
    let door = poll("wait_s=30&until=open");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _) = hub
        .post(
            "/sim/wechatpay/confirm",
            ADMIN_KEY,
            json!({"extra_data": v["confirmation"]["extra_data"]}),
        )
        .await;
    assert_eq!(s, 200);
    let (took, moved) = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(moved["session"]["state"], "confirming", "{moved}");
    assert!(
        took < Duration::from_secs(25),
        "answered only at the end: {took:?}"
    );
    let unlock = c.expect_command("unlock", PATIENCE).await;
    assert!(!door.is_finished(), "until=open answered before the ack");
    c.ack(&unlock, true, None).await;
    let (took, opened) = door.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(opened["session"]["state"], "open", "{opened}");
    assert_eq!(opened["order"]["session_id"], session.as_str(), "{opened}");
    assert!(
        took < Duration::from_secs(25),
        "answered only at the end: {took:?}"
    );
}

/// A shopper who never confirms: the session fails when the confirmation time is over, the
/// provider's order is cancelled, the cabinet is free for the next shopper.
async fn an_unconfirmed_session_ends_at_its_deadline_and_frees_the_cabinet(b: Backend) {
    let (hub, op, mut c) = crate::purchase::shop_with(b, |s| {
        s.payments.confirm_timeout_ms = 1_500;
    })
    .await;
    script_shopper(&hub, "g1", json!({"confirm": "manual"})).await;
    let v = confirming(&hub, &op, "g1", "wechat").await;
    let session = session_id(&v);
    let (_, ended) = hub
        .get(&format!("/api/v1/sessions/{session}?wait_s=10"), &op)
        .await;
    assert_eq!(
        (
            ended["session"]["state"].as_str(),
            ended["session"]["failure"].as_str()
        ),
        (Some("failed"), Some("payment_declined")),
        "{ended}"
    );
    assert!(c
        .try_command("unlock", Duration::from_millis(200))
        .await
        .is_none());
    // Too late now: WeChat refuses to confirm a cancelled order.
    let (s, r) = hub
        .post(
            "/sim/wechatpay/confirm",
            ADMIN_KEY,
            json!({"extra_data": v["confirmation"]["extra_data"]}),
        )
        .await;
    assert_eq!(s, 400, "{r}");
    let next = confirming(&hub, &op, "g2", "wechat").await;
    let unlock = c.expect_command("unlock", PATIENCE).await;
    assert_eq!(unlock["session_id"], session_id(&next).as_str());
}
