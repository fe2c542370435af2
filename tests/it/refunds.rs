//! Refunds followed to the end: `processing` until the provider's word, from its answer, its
//! notice, or the follow-up that asks it; only succeeded refunds count as refunded; a failed
//! or closed one releases its amount; the provider's window and count are checked up front.

use std::time::Duration;

use serde_json::{json, Value};

use crate::both;
use crate::harness::{fresh_postgres, Backend, TestHub, PATIENCE};
use crate::purchase::{order_status, script_shopper, shop_with, visit};

both!(
    a_refund_the_shopper_cannot_take_releases_its_amount,
    a_refund_whose_notice_never_comes_is_found_by_asking,
    an_order_takes_at_most_the_providers_count_of_refunds,
);

/// A paid order of 1250 fen for `user`; answers its id.
async fn paid_order(
    hub: &TestHub,
    op: &str,
    c: &mut crate::harness::Cabinet,
    user: &str,
) -> String {
    let session = visit(
        hub,
        op,
        c,
        user,
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(hub, op, &session, "paid").await;
    v["order"]["id"].as_str().unwrap_or_default().to_owned()
}

async fn refund(hub: &TestHub, op: &str, order: &str, fen: i64) -> (u16, Value) {
    hub.post(
        &format!("/api/v1/orders/{order}/refund"),
        op,
        json!({"amount_fen": fen, "reason": "少拿一瓶"}),
    )
    .await
}

/// Waits until refund `id` of `order` is `want`; answers the order.
pub(crate) async fn refund_is(
    hub: &TestHub,
    op: &str,
    order: &str,
    id: &Value,
    want: &str,
) -> Value {
    hub.eventually(PATIENCE, want, || async {
        let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), op).await;
        let r = o["refunds"]
            .as_array()
            .and_then(|r| r.iter().find(|r| &r["id"] == id).cloned());
        (r.is_some_and(|r| r["status"] == want)).then_some(o)
    })
    .await
}

/// WeChat takes the refund, then cannot pay it into the shopper's account (ABNORMAL), or
/// closes it: the refund ends `failed` / `closed`, nothing counts as refunded, and the amount
/// can be refunded again.
async fn a_refund_the_shopper_cannot_take_releases_its_amount(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |_| {}).await;
    let order = paid_order(&hub, &op, &mut c, "u1").await;
    for (script, end) in [("abnormal", "failed"), ("closed", "closed")] {
        script_shopper(&hub, "u1", json!({"refund": script})).await;
        let (s, r) = refund(&hub, &op, &order, 1250).await;
        assert_eq!(
            (s, r["refund"]["status"].as_str()),
            (200, Some("processing")),
            "{r}"
        );
        let o = refund_is(&hub, &op, &order, &r["refund"]["id"], end).await;
        assert_eq!(
            (o["refunded_fen"].clone(), o["status"].clone()),
            (json!(0), json!("paid")),
            "{o}"
        );
    }
    script_shopper(&hub, "u1", json!({"refund": "succeed"})).await;
    let (s, r) = refund(&hub, &op, &order, 1250).await;
    assert_eq!(s, 200, "{r}");
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "succeeded").await;
    assert_eq!(
        (o["refunded_fen"].clone(), o["status"].clone()),
        (json!(1250), json!("refunded")),
        "{o}"
    );
    let m = hub.metrics().await;
    for line in [
        r#"refunds_total{status="failed"} 1"#,
        r#"refunds_total{status="closed"} 1"#,
        r#"refunds_total{status="succeeded"} 1"#,
    ] {
        assert!(m.contains(line), "{line} missing");
    }
}

/// WeChat settles the refund but its notice never arrives: the follow-up asks and finds it.
async fn a_refund_whose_notice_never_comes_is_found_by_asking(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |s| s.payments.refund_check_ms = 300).await;
    let order = paid_order(&hub, &op, &mut c, "u2").await;
    script_shopper(&hub, "u2", json!({"refund": "silent"})).await;
    let (s, r) = refund(&hub, &op, &order, 300).await;
    assert_eq!(s, 200, "{r}");
    let o = refund_is(&hub, &op, &order, &r["refund"]["id"], "succeeded").await;
    assert_eq!(o["refunded_fen"], 300, "{o}");
}

/// WeChat takes at most 50 refunds of an order: the 51st is refused before it is stored.
async fn an_order_takes_at_most_the_providers_count_of_refunds(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |_| {}).await;
    let order = paid_order(&hub, &op, &mut c, "u3").await;
    for i in 0..50 {
        let (s, r) = refund(&hub, &op, &order, 1).await;
        assert_eq!(s, 200, "refund {i}: {r}");
    }
    let (s, r) = refund(&hub, &op, &order, 1).await;
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (422, Some("refund_limit_reached")),
        "{r}"
    );
    let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), &op).await;
    assert_eq!(o["refunds"].as_array().map(Vec::len), Some(50));
}

/// A year after the payment WeChat refunds nothing: refused up front, nothing reserved.
#[actix_rt::test]
async fn a_refund_past_the_providers_window_is_refused() {
    let db = fresh_postgres().await;
    let url = db.clone();
    let (hub, op, mut c) = shop_with(Backend::Sqlite, move |s| {
        s.database.url = Some(url.clone());
    })
    .await;
    let order = paid_order(&hub, &op, &mut c, "u4").await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let year_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - 366 * 86_400_000;
    sqlx::query("UPDATE orders SET paid_at = $1 WHERE id = $2")
        .bind(year_ago)
        .bind(&order)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The order row is cached for reads; wait for a read that sees the change.
    hub.eventually(Duration::from_secs(10), "window closed", || async {
        let (s, r) = refund(&hub, &op, &order, 100).await;
        (s == 422 && r["error"]["code"] == "refund_window_closed").then_some(())
    })
    .await;
    let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), &op).await;
    assert_eq!(o["refunds"].as_array().map(Vec::len), Some(0), "{o}");
}
