//! Settlement (分账) through the WeChat Pay simulator's profit-sharing contract: a paid order is
//! split (the merchant's 5 % commission to the platform) and the rest released; a receiver the
//! merchant is not bound to fails the split, which is surfaced, retried and then succeeds; a
//! refund of a split order returns the platform's part first — and fails, surfaced, when that
//! return is refused, because the merchant's account cannot pay it.

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};
use crate::purchase::{alipay_visit, order_status, shop_with, visit};
use crate::refunds::refund_is;

both!(
    a_paid_order_is_split_and_the_rest_released,
    an_alipay_sub_merchants_order_is_split_settled_and_returned_with_its_refund,
    a_split_the_receiver_refuses_is_surfaced_and_retried_until_it_succeeds,
    a_refund_of_a_split_order_returns_the_platforms_part_first,
    without_settlement_no_order_is_frozen_for_one,
);

/// The simulator's stand-in sub_mchid of merchant `m1`.
const SUB: &str = "simm1";

/// A hub whose settlement runs at once and retries quickly.
pub(crate) async fn hub(b: Backend, enabled: bool) -> (TestHub, String, crate::harness::Cabinet) {
    hub_retrying_after(b, enabled, 200).await
}

/// A hub whose settlement runs at once and retries a failure after `retry_ms` (at most twice
/// that).
async fn hub_retrying_after(
    b: Backend,
    enabled: bool,
    retry_ms: u64,
) -> (TestHub, String, crate::harness::Cabinet) {
    shop_with(b, |s| {
        s.settlement.enabled = enabled;
        s.settlement.first_after_ms = 0;
        s.settlement.tick_ms = 100;
        s.settlement.retry_ms = retry_ms;
        s.settlement.retry_max_ms = retry_ms * 2;
        s.settlement.follow_ms = 100;
        s.settlement.surface_after = 3;
    })
    .await
}

/// A paid order of 1250 fen (2 cola, 1 chips); answers its id.
async fn paid_order(hub: &TestHub, op: &str, c: &mut crate::harness::Cabinet) -> String {
    let session = visit(
        hub,
        op,
        c,
        "u1",
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(hub, op, &session, "paid").await;
    v["order"]["id"].as_str().unwrap_or_default().to_owned()
}

/// Waits until `order`'s settlement is `state`; answers the order.
pub(crate) async fn settlement_is(hub: &TestHub, op: &str, order: &str, state: &str) -> Value {
    hub.eventually(PATIENCE, state, || async {
        let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), op).await;
        (o["settlement"]["state"] == state).then_some(o)
    })
    .await
}

async fn script_merchant(hub: &TestHub, script: Value) {
    let (s, b) = hub
        .call(
            "PUT",
            &format!("/sim/merchants/{SUB}"),
            ADMIN_KEY,
            Some(script),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

/// The reasons of the merchant's payment exceptions about `order`.
async fn exceptions_of(hub: &TestHub, op: &str, order: &str) -> Vec<String> {
    let (s, b) = hub.get("/api/v1/payment-exceptions", op).await;
    assert_eq!(s, 200, "{b}");
    b["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["order_id"] == order)
                .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// 5 % of 1250 fen is 62 (rounded down): the platform's; 1188 the merchant's, released.
async fn a_paid_order_is_split_and_the_rest_released(b: Backend) {
    let (hub, op, mut c) = hub(b, true).await;
    let order = paid_order(&hub, &op, &mut c).await;
    let o = settlement_is(&hub, &op, &order, "finished").await;
    let s = &o["settlement"];
    assert_eq!(
        (
            &s["commission_bps"],
            &s["platform_fen"],
            &s["merchant_fen"],
            &s["returned_fen"],
            &s["failures"]
        ),
        (&json!(500), &json!(62), &json!(1188), &json!(0), &json!(0)),
        "{o}"
    );
    let m = hub.metrics().await;
    assert!(
        m.contains(r#"settlements_total{state="finished"} 1"#),
        "{m}"
    );
}

/// The platform is not bound as the merchant's receiver: WeChat closes the split's receiver
/// (NO_RELATION). The settlement is `failed` at once (retrying alone cannot help), with the
/// provider's reason, and one payment exception is kept; once the binding is fixed the next
/// attempt (a new split number) succeeds and the order is released.
async fn a_split_the_receiver_refuses_is_surfaced_and_retried_until_it_succeeds(b: Backend) {
    let (hub, op, mut c) = hub(b, true).await;
    script_merchant(&hub, json!({"receiver_bound": false})).await;
    let order = paid_order(&hub, &op, &mut c).await;
    let o = settlement_is(&hub, &op, &order, "failed").await;
    assert!(
        o["settlement"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("NO_RELATION")),
        "{o}"
    );
    // Retried meanwhile, and still surfaced once.
    hub.eventually(PATIENCE, "a second failure", || async {
        let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), &op).await;
        (o["settlement"]["failures"].as_i64() >= Some(2)).then_some(())
    })
    .await;
    assert_eq!(
        exceptions_of(&hub, &op, &order).await,
        ["settlement_failed"]
    );
    // Operators find it in the settlements that failed; another merchant does not.
    let (s, failed) = hub.get("/api/v1/settlements?state=failed", &op).await;
    assert_eq!(
        (s, &failed["count"], &failed["items"][0]["order_id"]),
        (200, &json!(1), &json!(order)),
        "{failed}"
    );
    let (_, other) = hub.merchant("m2").await;
    let (_, theirs) = hub.get("/api/v1/settlements", &other).await;
    assert_eq!(theirs["count"], 0, "{theirs}");
    let (s, bad) = hub.get("/api/v1/settlements?state=stuck", &op).await;
    assert_eq!(s, 400, "{bad}");
    let (s, b) = hub
        .post(
            &format!("/api/v1/orders/{order}/settlement/retry"),
            &other,
            json!({}),
        )
        .await;
    assert_eq!(s, 404, "{b}");

    // Fixed, and retried now by an operator rather than at the next attempt.
    script_merchant(&hub, json!({"receiver_bound": true})).await;
    let (s, b) = hub
        .post(
            &format!("/api/v1/orders/{order}/settlement/retry"),
            &op,
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["due_at"].as_i64() <= b["updated_at"].as_i64(), "{b}");
    let o = settlement_is(&hub, &op, &order, "finished").await;
    assert!(
        o["audit"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["action"] == "settlement.retry")),
        "{o}"
    );
    assert_eq!(
        (
            &o["settlement"]["platform_fen"],
            &o["settlement"]["merchant_fen"],
            &o["settlement"]["failures"]
        ),
        (&json!(62), &json!(1188), &json!(0)),
        "{o}"
    );
}

pub(crate) async fn refund(hub: &TestHub, op: &str, order: &str, fen: i64) -> Value {
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/refund"),
            op,
            json!({"amount_fen": fen, "reason": "少拿一瓶"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    r
}

/// The order is split (62 fen to the platform). The platform's account is empty: the return
/// ahead of a refund fails, so the refund fails (the merchant's account, 1188 fen, cannot pay
/// 1250), nothing is refunded and operators see why. With the account funded: 300 fen refunded
/// after 14 fen (300 × 62 / 1250, rounded down) came back, then the other 950 after the last
/// 48; the platform returned all 62 and the settlement is `returned`.
async fn a_refund_of_a_split_order_returns_the_platforms_part_first(b: Backend) {
    let (hub, op, mut c) = hub(b, true).await;
    let order = paid_order(&hub, &op, &mut c).await;
    settlement_is(&hub, &op, &order, "finished").await;

    script_merchant(&hub, json!({"returns_succeed": false})).await;
    let r = refund(&hub, &op, &order, 1250).await;
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "failed").await;
    assert_eq!(
        (&o["refunded_fen"], &o["settlement"]["returned_fen"]),
        (&json!(0), &json!(0)),
        "{o}"
    );
    assert_eq!(
        exceptions_of(&hub, &op, &order).await,
        ["settlement_return_failed"]
    );

    script_merchant(&hub, json!({"returns_succeed": true})).await;
    let r = refund(&hub, &op, &order, 300).await;
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "succeeded").await;
    assert_eq!(
        (
            &o["refunded_fen"],
            &o["settlement"]["returned_fen"],
            &o["settlement"]["state"]
        ),
        (&json!(300), &json!(14), &json!("finished")),
        "{o}"
    );
    let r = refund(&hub, &op, &order, 950).await;
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "succeeded").await;
    assert_eq!(
        (
            &o["refunded_fen"],
            &o["status"],
            &o["settlement"]["returned_fen"],
            &o["settlement"]["state"]
        ),
        (
            &json!(1250),
            &json!("refunded"),
            &json!(62),
            &json!("returned")
        ),
        "{o}"
    );
    let returns: Vec<(i64, String)> = o["settlement"]["returns"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["amount_fen"].as_i64().unwrap_or(-1),
                        x["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        returns,
        [
            (62, "failed".to_owned()),
            (14, "succeeded".to_owned()),
            (48, "succeeded".to_owned())
        ],
        "{o}"
    );
}

/// Settlement off: the order is completed without profit sharing (nothing stays frozen for a
/// split that would never come), shows no settlement, and is refunded in full from the
/// merchant's account.
async fn without_settlement_no_order_is_frozen_for_one(b: Backend) {
    let (hub, op, mut c) = hub(b, false).await;
    let order = paid_order(&hub, &op, &mut c).await;
    let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), &op).await;
    assert_eq!(o["settlement"]["state"], "none", "{o}");
    let r = refund(&hub, &op, &order, 1250).await;
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "succeeded").await;
    assert_eq!(o["refunded_fen"], 1250, "{o}");
}

/// The page lists settlements and counts the failed ones; an operator retries one from it
/// after fixing its cause (the hub would wait a minute for its next attempt), and the row
/// follows the feed to `finished`.
#[actix_rt::test]
async fn the_page_shows_settlements_and_retries_a_failed_one() {
    let (hub, op, mut c) = hub_retrying_after(Backend::Sqlite, true, 60_000).await;
    script_merchant(&hub, json!({"receiver_bound": false})).await;
    let order = paid_order(&hub, &op, &mut c).await;
    settlement_is(&hub, &op, &order, "failed").await;
    let mut b = crate::browser::Browser::launch(1440, 900).await;
    crate::browser::sign_in(&mut b, &hub, &op).await;
    b.eval("document.querySelector('[data-tab=settlements]').click()")
        .await;
    let row = format!("document.querySelector('[data-settlement=\"{order}\"]')");
    b.wait_for(
        &format!(
            "{row} && {row}.textContent.includes('failed') && {row}.textContent.includes('NO_RELATION')
             && document.getElementById('tab-settlements-count').textContent === '1'"
        ),
        PATIENCE,
    )
    .await;
    script_merchant(&hub, json!({"receiver_bound": true})).await;
    b.eval(&format!(
        "document.querySelector('[data-retry=\"{order}\"]').click()"
    ))
    .await;
    b.wait_for(
        &format!(
            "{row} && {row}.textContent.includes('finished') && {row}.textContent.includes('¥0.62')
             && {row}.textContent.includes('¥11.88')
             && document.getElementById('tab-settlements-count').textContent === ''"
        ),
        PATIENCE,
    )
    .await;
}

/// Alipay, for a sub-merchant (直付通): the trade is held, 62 fen split to the platform
/// (`alipay.trade.order.settle`), the other 1188 settled to the merchant
/// (`alipay.trade.settle.confirm`); a full refund takes the 62 back from the platform in the
/// refund itself (`refund_royalty_parameters`), which the simulator requires (the merchant's
/// own 1188 cannot pay 1250).
async fn an_alipay_sub_merchants_order_is_split_settled_and_returned_with_its_refund(b: Backend) {
    let (hub, op, mut c) = hub(b, true).await;
    let (s, p) = hub
        .call(
            "PUT",
            "/api/v1/merchants/m1/payment",
            ADMIN_KEY,
            Some(
                json!({"risk_ceiling_fen": 20000, "wechat_sub_mchid": "1900000109",
                        "service_phone": "400-800-1234", "alipay_smid": "2088000000000099",
                        "alipay_app_auth_token": "202612BBsecretAuthToken00001"}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let session = alipay_visit(
        &hub,
        &op,
        &mut c,
        "a1",
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(&hub, &op, &session, "paid").await;
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    let o = settlement_is(&hub, &op, &order, "finished").await;
    assert_eq!(
        (
            &o["settlement"]["platform_fen"],
            &o["settlement"]["merchant_fen"]
        ),
        (&json!(62), &json!(1188)),
        "{o}"
    );
    let r = refund(&hub, &op, &order, 1250).await;
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "succeeded").await;
    assert_eq!(
        (
            &o["refunded_fen"],
            &o["settlement"]["returned_fen"],
            &o["settlement"]["state"]
        ),
        (&json!(1250), &json!(62), &json!("returned")),
        "{o}"
    );
    let m = hub.metrics().await;
    for op in ["split", "split_query", "settle_confirm"] {
        assert!(
            m.contains(&format!(
                r#"payments_total{{operation="{op}",outcome="ok",provider="alipay"}} 1"#
            )),
            "{op}: {m}"
        );
    }
}
