//! Recognition billing (算法识别次数): every recognition a cabinet reports for a session is
//! counted per merchant; after use it is charged on the day's bill at the configured fee; from a
//! prepaid quota it costs the bill nothing, the quota warns when it runs low and when it runs out,
//! and then new purchases are refused until the platform tops it up (or, by policy, go on and are
//! owed).

use serde_json::{json, Value};

use crate::attacks::{ws_next, ws_with_key};
use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};
use crate::purchase::{order_status, shop_with, start, visit};

both!(
    recognitions_are_counted_and_billed_after_use,
    a_prepaid_quota_warns_runs_out_refuses_and_is_topped_up,
    a_prepaid_quota_may_run_below_zero_when_the_policy_says_continue,
);

fn today() -> String {
    let t = time::OffsetDateTime::now_utc()
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap_or(time::UtcOffset::UTC));
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

async fn account(hub: &TestHub, key: &str) -> Value {
    let (s, v) = hub.get("/api/v1/merchants/m1/recognition", key).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn set(hub: &TestHub, key: &str, body: Value) -> (u16, Value) {
    hub.call("PUT", "/api/v1/merchants/m1/recognition", key, Some(body))
        .await
}

async fn recognitions_are_counted_and_billed_after_use(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |s| s.recognition.fee_fen = 12).await;
    for user in ["u1", "u2", "u3"] {
        let session = visit(&hub, &op, &mut c, user, json!([{"sku": "cola", "qty": 1}])).await;
        order_status(&hub, &op, &session, "paid").await;
    }
    let a = account(&hub, &op).await;
    assert_eq!(
        (
            &a["billing"],
            &a["used_today"],
            &a["fee_today_fen"],
            &a["fee_fen"]
        ),
        (&json!("postpaid"), &json!(3), &json!(36), &json!(12)),
        "{a}"
    );
    // The day's bill charges them in one line, and its lines still add up to the net (if the
    // test ran across local midnight, the two days' bills share them).
    let (s, bill) = hub.get(&format!("/api/v1/bills/m1/{}", today()), &op).await;
    assert_eq!(s, 200, "{bill}");
    let t = &bill["totals"];
    if t["recognitions"] == 3 {
        assert_eq!(t["recognition_fen"], 36, "{bill}");
        let line = bill["lines"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["kind"] == "recognition").cloned())
            .unwrap_or_else(|| panic!("no recognition line: {bill}"));
        assert_eq!(
            (&line["amount_fen"], &line["reference"]),
            (&json!(-36), &json!("3 recognitions")),
            "{line}"
        );
        let lines: i64 = bill["lines"]
            .as_array()
            .map(|l| l.iter().filter_map(|x| x["amount_fen"].as_i64()).sum())
            .unwrap_or(0);
        assert_eq!(Some(lines), t["net_fen"].as_i64(), "{bill}");
    }
    let m = hub.metrics().await;
    assert!(
        m.contains(r#"recognitions_total{billing="postpaid"} 3"#),
        "{m}"
    );
    // Another merchant's key sees nothing of m1's.
    let (_, other) = hub.merchant("m2").await;
    let (s, _) = hub.get("/api/v1/merchants/m1/recognition", &other).await;
    assert_eq!(s, 404);
}

async fn a_prepaid_quota_warns_runs_out_refuses_and_is_topped_up(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |s| s.recognition.low_quota = 1).await;
    // Only the platform sets it, with sane values.
    let (s, _) = set(&hub, &op, json!({"billing": "prepaid", "add_quota": 2})).await;
    assert_eq!(s, 403);
    for bad in [
        json!({"billing": "free"}),
        json!({"add_quota": -5}),
        json!({"add_quota": 10_000_001}),
        json!({"quota": 5}),
    ] {
        let (s, v) = set(&hub, ADMIN_KEY, bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
    let (s, a) = set(
        &hub,
        ADMIN_KEY,
        json!({"billing": "prepaid", "add_quota": 2, "reason": "bank transfer 42"}),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(
        (&a["billing"], &a["quota_left"], &a["low"]),
        (&json!("prepaid"), &json!(2), &json!(false)),
        "{a}"
    );
    let mut ws = ws_with_key(&hub, &op)
        .await
        .unwrap_or_else(|s| panic!("feed refused: {s}"));
    let mut quota_events = Vec::new();
    for user in ["u1", "u2"] {
        let session = visit(&hub, &op, &mut c, user, json!([{"sku": "chips", "qty": 1}])).await;
        order_status(&hub, &op, &session, "paid").await;
        let e = tokio::time::timeout(PATIENCE, async {
            loop {
                match ws_next(&mut ws, PATIENCE).await {
                    Some(v) if v["type"] == "recognition_quota" => return v,
                    Some(_) => continue,
                    None => panic!("the feed ended"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no quota event after {user}'s visit"));
        quota_events.push((e["data"]["state"].clone(), e["data"]["quota_left"].clone()));
    }
    assert_eq!(
        quota_events,
        vec![(json!("low"), json!(1)), (json!("exhausted"), json!(0))]
    );
    let a = account(&hub, &op).await;
    assert_eq!(
        (
            &a["quota_left"],
            &a["low"],
            &a["used_today"],
            &a["fee_today_fen"]
        ),
        (&json!(0), &json!(true), &json!(2), &json!(0)),
        "{a}"
    );
    // None left: a purchase is refused before anything is opened or charged.
    let (s, v) = start(&hub, &op, "u3", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, &v["error"]["code"]),
        (422, &json!("recognition_quota_exhausted")),
        "{v}"
    );
    // Topped up: purchases go on.
    let (s, a) = set(&hub, ADMIN_KEY, json!({"add_quota": 10})).await;
    assert_eq!((s, &a["quota_left"]), (200, &json!(10)), "{a}");
    visit(&hub, &op, &mut c, "u3", json!([{"sku": "chips", "qty": 1}])).await;
    hub.eventually(PATIENCE, "the quota used once more", || async {
        let a = account(&hub, &op).await;
        (a["quota_left"] == 9).then_some(())
    })
    .await;
    // Prepaid recognitions cost the bill nothing.
    let (_, bill) = hub.get(&format!("/api/v1/bills/m1/{}", today()), &op).await;
    assert_eq!(bill["totals"]["recognition_fen"], 0, "{bill}");
    assert!(
        !bill["lines"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["kind"] == "recognition")),
        "{bill}"
    );
    let m = hub.metrics().await;
    for line in [
        r#"recognitions_total{billing="prepaid"} 3"#,
        r#"recognition_quota_warnings_total{state="low"} 1"#,
        r#"recognition_quota_warnings_total{state="exhausted"} 1"#,
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
    let (_, audit) = hub.get("/api/v1/audit", ADMIN_KEY).await;
    assert!(
        audit["items"].as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["action"] == "recognition.set" && e["reason"] == "bank transfer 42")),
        "{audit}"
    );
}

async fn a_prepaid_quota_may_run_below_zero_when_the_policy_says_continue(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |s| s.recognition.when_exhausted = "continue".into()).await;
    let (s, _) = set(&hub, ADMIN_KEY, json!({"billing": "prepaid"})).await;
    assert_eq!(s, 200);
    visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 1}])).await;
    hub.eventually(PATIENCE, "one recognition owed", || async {
        let a = account(&hub, &op).await;
        (a["quota_left"] == -1).then_some(())
    })
    .await;
    // Owed recognitions are not forgiven by a switch to after-use billing; they come out of the
    // next top-up.
    let (s, v) = set(&hub, ADMIN_KEY, json!({"billing": "postpaid"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, a) = set(&hub, ADMIN_KEY, json!({"add_quota": 100})).await;
    assert_eq!((s, &a["quota_left"]), (200, &json!(99)), "{a}");
    let (s, a) = set(&hub, ADMIN_KEY, json!({"billing": "postpaid"})).await;
    assert_eq!((s, &a["billing"]), (200, &json!("postpaid")), "{a}");
}
