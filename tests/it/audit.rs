//! The audit trail of money and access actions: who resolved, refunded, closed, blacklisted or
//! unblacklisted what, who changed payment settings or keys — when and why; per merchant, and
//! on the order.

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};
use crate::purchase::{order_status, shop};

both!(money_and_access_actions_are_on_the_trail);

async fn key_id(hub: &TestHub, key: &str) -> String {
    let (_, me) = hub.get("/api/v1/me", key).await;
    me["key_id"].as_str().unwrap_or_default().to_owned()
}

fn actions(v: &Value) -> Vec<String> {
    let mut a: Vec<String> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    a.sort();
    a
}

async fn money_and_access_actions_are_on_the_trail(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let ma = hub.new_key(ADMIN_KEY, "m1", "merchant_admin").await["key"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let op_id = key_id(&hub, &op).await;

    // An order the cameras could not settle, resolved and then partly refunded by the operator.
    let (s, v) = hub
        .post(
            "/api/v1/sessions",
            &op,
            json!({"cabinet_id": "KM1", "user_id": "u1", "channel": "wechat", "mode": "purchase"}),
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
    for e in ["door_opened", "door_closed", "lock_locked"] {
        c.event(e).await;
    }
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "failed"}),
    )
    .await;
    let v = order_status(&hub, &op, &session, "abnormal").await;
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/resolve"),
            &op,
            json!({"items": [{"sku": "cola", "qty": 2}]}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    order_status(&hub, &op, &session, "paid").await;
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/refund"),
            &op,
            json!({"amount_fen": 300, "reason": "少拿一瓶"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");

    // A stuck session closed by hand.
    let (s, v) = hub
        .post(
            "/api/v1/sessions",
            &op,
            json!({"cabinet_id": "KM1", "user_id": "u2", "channel": "wechat", "mode": "purchase"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let stuck = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    hub.eventually(PATIENCE, "open", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{stuck}"), &op).await;
        (v["session"]["state"] == "open").then_some(())
    })
    .await;
    let (s, r) = hub
        .post(
            &format!("/api/v1/sessions/{stuck}/close"),
            &op,
            json!({"reason": "shopper gone"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");

    // The blacklist by hand, payment settings, a key.
    let (s, _) = hub
        .post(
            "/api/v1/blacklist",
            &op,
            json!({"user_id": "u9", "reason": "fraud"}),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = hub.call("DELETE", "/api/v1/blacklist/u9", &op, None).await;
    assert_eq!(s, 204);
    let (s, r) = hub
        .call(
            "PUT",
            "/api/v1/merchants/m1/payment",
            ADMIN_KEY,
            Some(json!({"risk_ceiling_fen": 30000, "alipay_app_auth_token": "secretAuthToken1"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    hub.new_key(&ma, "m1", "viewer").await;

    let (s, trail) = hub.get("/api/v1/audit", &ma).await;
    assert_eq!(s, 200, "{trail}");
    // Four keys: the set-up's merchant admin and operator, this test's merchant admin and viewer.
    assert_eq!(
        actions(&trail),
        [
            "api_key.create",
            "api_key.create",
            "api_key.create",
            "api_key.create",
            "blacklist.add",
            "blacklist.remove",
            "merchant.payment",
            "order.refund",
            "order.resolve",
            "session.close"
        ],
        "{trail}"
    );
    assert!(
        !trail.to_string().contains("secretAuthToken1"),
        "no secret on the trail"
    );
    let entries = trail["items"].as_array().cloned().unwrap_or_default();
    let by = |action: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let refund = by("order.refund");
    assert_eq!(
        (
            refund["actor"].as_str(),
            refund["role"].as_str(),
            refund["reason"].as_str(),
            refund["order_id"].as_str()
        ),
        (
            Some(op_id.as_str()),
            Some("operator"),
            Some("少拿一瓶"),
            Some(order.as_str())
        ),
        "{refund}"
    );
    assert_eq!(by("session.close")["reason"], "shopper gone");
    assert_eq!(
        by("merchant.payment")["actor"],
        key_id(&hub, ADMIN_KEY).await
    );

    // On the order: its own actions.
    let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), &op).await;
    let on_order: Vec<&str> = o["audit"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(on_order, ["order.refund", "order.resolve"], "{o}");
    let (_, one) = hub.get("/api/v1/audit?action=order.refund", &ma).await;
    assert_eq!(one["count"], 1, "{one}");

    // Only a merchant admin (or the platform) reads the trail; another merchant sees none of it.
    assert_eq!(hub.get("/api/v1/audit", &op).await.0, 403);
    let (ma2, _) = hub.merchant("m2").await;
    let (_, theirs) = hub.get("/api/v1/audit", &ma2).await;
    assert!(
        theirs["items"]
            .as_array()
            .is_some_and(|a| a.iter().all(|e| e["merchant_id"] == "m2")),
        "{theirs}"
    );
    // Naming another merchant finds nothing, as for every scoped list.
    assert_eq!(hub.get("/api/v1/audit?merchant_id=m1", &ma2).await.0, 404);
}
