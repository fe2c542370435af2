//! Stock (商品库存): a restock session's count replaces a cabinet's stock and each difference
//! from what was expected (the stock before plus the restock's plan; no plan: a stock-taking)
//! is kept as a discrepancy (库存不一致) an operator resolves; purchases take from it; a product
//! that falls to its low mark is told once; the sellable list hides what is out of stock; a
//! product template applies one sellable list to many cabinets.

use serde_json::{json, Value};

use crate::attacks::{ws_next, ws_with_key};
use crate::both;
use crate::harness::{Backend, Cabinet, TestHub, PATIENCE};
use crate::purchase::{door_then_recognition, order_status, shop, start, visit};

both!(stock_follows_restocks_and_purchases_and_discrepancies_are_resolved);

/// A restock session through `POST /api/v1/sessions`: unlocked, opened, closed, counted;
/// the session id once it is over (and its count is in the stock).
pub(crate) async fn restock(
    hub: &TestHub,
    op: &str,
    c: &mut Cabinet,
    planned: Option<Value>,
    counted: Value,
) -> String {
    let mut body = json!({"cabinet_id": "KM1", "user_id": "restocker-1", "mode": "restock"});
    if let Some(p) = planned {
        body["planned"] = p;
    }
    let (client, url, key) = (
        hub.client.clone(),
        hub.url("/api/v1/sessions"),
        op.to_owned(),
    );
    let pending = actix_rt::spawn(async move {
        let r = client
            .post(url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let s = r.status().as_u16();
        (s, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    let cmd = c.expect_command("unlock", PATIENCE).await;
    assert_eq!(cmd["mode"], "restock");
    c.ack(&cmd, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s, 201, "{v}");
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    door_then_recognition(
        c,
        json!({"session_id": session, "status": "ok", "stock": counted}),
    )
    .await;
    hub.eventually(PATIENCE, "the restock session over", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), op).await;
        (v["session"]["state"] == "closed").then_some(())
    })
    .await;
    session
}

/// The next `n` low-stock events on the feed: (sku, qty, state).
async fn low_events(ws: &mut crate::attacks::Ws, n: usize) -> Vec<(String, i64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        match ws_next(ws, PATIENCE).await {
            Some(v) if v["type"] == "stock_low" => got.push((
                v["data"]["sku"].as_str().unwrap_or_default().to_owned(),
                v["data"]["qty"].as_i64().unwrap_or(-1),
                v["data"]["state"].as_str().unwrap_or_default().to_owned(),
            )),
            Some(_) => continue,
            None => panic!("the feed ended after {got:?}"),
        }
    }
    got
}

async fn stock_of(hub: &TestHub, op: &str) -> Vec<(String, i64, bool)> {
    let (s, v) = hub.get("/api/v1/cabinets/KM1/stock", op).await;
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["sku"].as_str().unwrap_or_default().to_owned(),
                        i["qty"].as_i64().unwrap_or(-999),
                        i["low"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn open_discrepancies(hub: &TestHub, op: &str) -> Vec<(String, i64, i64)> {
    let (s, v) = hub.get("/api/v1/stock-discrepancies?state=open", op).await;
    assert_eq!(s, 200, "{v}");
    let mut got: Vec<(String, i64, i64)> = v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        d["sku"].as_str().unwrap_or_default().to_owned(),
                        d["expected"].as_i64().unwrap_or(-1),
                        d["counted"].as_i64().unwrap_or(-1),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    got.sort();
    got
}

async fn stock_follows_restocks_and_purchases_and_discrepancies_are_resolved(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    assert!(stock_of(&hub, &op).await.is_empty());
    let mut ws = ws_with_key(&hub, &op)
        .await
        .unwrap_or_else(|s| panic!("feed refused: {s}"));

    // Planned 10 cola and 5 chips; the cabinet counts 10 and 4: one chips is missing.
    restock(
        &hub,
        &op,
        &mut c,
        Some(json!([{"sku": "cola", "qty": 10}, {"sku": "chips", "qty": 5}])),
        json!([{"sku": "cola", "qty": 10}, {"sku": "chips", "qty": 4}]),
    )
    .await;
    assert_eq!(
        stock_of(&hub, &op).await,
        vec![("chips".into(), 4, false), ("cola".into(), 10, false)]
    );
    assert_eq!(
        open_discrepancies(&hub, &op).await,
        vec![("chips".into(), 5, 4)]
    );

    // Purchases take from it; cola falls to its low mark (2) once.
    let s1 = visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 8}])).await;
    order_status(&hub, &op, &s1, "paid").await;
    let s2 = visit(
        &hub,
        &op,
        &mut c,
        "u2",
        json!([{"sku": "cola", "qty": 1}, {"sku": "chips", "qty": 4}]),
    )
    .await;
    order_status(&hub, &op, &s2, "paid").await;
    assert_eq!(
        stock_of(&hub, &op).await,
        vec![("chips".into(), 0, true), ("cola".into(), 1, true)]
    );
    let m = hub.metrics().await;
    assert!(m.contains("stock_low_total 2"), "{m}");
    assert_eq!(
        low_events(&mut ws, 2).await,
        vec![
            ("cola".to_owned(), 2, "raised".to_owned()),
            ("chips".to_owned(), 0, "raised".to_owned())
        ]
    );
    assert!(m.contains("stock_discrepancies_total 1"), "{m}");

    // Out of stock is hidden from what a shopper can buy, and shown to an operator.
    let (_, all) = hub.get("/api/v1/cabinets/KM1/prices", &op).await;
    let (_, sellable) = hub
        .get("/api/v1/cabinets/KM1/prices?sellable=true", &op)
        .await;
    let skus = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["sku"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(skus(&all), vec!["chips", "cola"], "{all}");
    assert_eq!(skus(&sellable), vec!["cola"], "{sellable}");
    assert_eq!(all["items"][0]["stock"], 0, "{all}");

    // A stock-taking (no plan) that finds what was there keeps nothing new; one that finds a
    // cola gone keeps it.
    restock(&hub, &op, &mut c, None, json!([{"sku": "cola", "qty": 1}])).await;
    assert_eq!(open_discrepancies(&hub, &op).await.len(), 1);
    restock(&hub, &op, &mut c, None, json!([])).await;
    assert_eq!(
        open_discrepancies(&hub, &op).await,
        vec![("chips".into(), 5, 4), ("cola".into(), 1, 0)]
    );
    assert_eq!(
        stock_of(&hub, &op).await,
        vec![("chips".into(), 0, true), ("cola".into(), 0, true)]
    );

    // Restocked above the mark: the low state clears (told once), and nothing was missing.
    restock(
        &hub,
        &op,
        &mut c,
        Some(json!([{"sku": "cola", "qty": 10}])),
        json!([{"sku": "cola", "qty": 10}]),
    )
    .await;
    assert_eq!(
        low_events(&mut ws, 1).await,
        vec![("cola".to_owned(), 10, "cleared".to_owned())]
    );
    assert_eq!(
        stock_of(&hub, &op).await,
        vec![("chips".into(), 0, true), ("cola".into(), 10, false)]
    );

    // An operator resolves one with what they found; once.
    let (_, list) = hub.get("/api/v1/stock-discrepancies?state=open", &op).await;
    let id = list["items"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["sku"] == "chips"))
        .and_then(|d| d["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let path = format!("/api/v1/stock-discrepancies/{id}/resolve");
    let (s, _) = hub.post(&path, &op, json!({"note": ""})).await;
    assert_eq!(s, 400);
    let (_, other) = hub.merchant("m2").await;
    let (s, _) = hub.post(&path, &other, json!({"note": "mine"})).await;
    assert_eq!(s, 404);
    let (s, d) = hub
        .post(
            &path,
            &op,
            json!({"note": "one bag was crushed and thrown away"}),
        )
        .await;
    assert_eq!((s, &d["state"]), (200, &json!("resolved")), "{d}");
    let (s, v) = hub.post(&path, &op, json!({"note": "again"})).await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (409, &json!("already_resolved")),
        "{v}"
    );
    assert_eq!(
        open_discrepancies(&hub, &op).await,
        vec![("cola".into(), 1, 0)]
    );
    let (s, v) = hub.get("/api/v1/stock-discrepancies?state=lost", &op).await;
    assert_eq!(s, 400, "{v}");

    // A low mark per cabinet and product.
    let (s, v) = hub
        .call(
            "PUT",
            "/api/v1/cabinets/KM1/stock/cola",
            &op,
            Some(json!({"low_at": 0})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = hub
        .call(
            "PUT",
            "/api/v1/cabinets/KM1/stock/tea",
            &op,
            Some(json!({"low_at": 1})),
        )
        .await;
    assert_eq!(s, 404);

    // A basket a person settles (the cameras failed) leaves the stock too, once.
    let pending = start(&hub, &op, "u9", None);
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    let (_, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    door_then_recognition(
        &mut c,
        json!({"session_id": session, "status": "failed", "reason": "camera_blocked"}),
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
    assert_eq!(
        stock_of(&hub, &op).await,
        vec![("chips".into(), 0, true), ("cola".into(), 8, false)]
    );

    // A template: one sellable list for many cabinets.
    let (s, t) = hub
        .post(
            "/api/v1/product-templates",
            &op,
            json!({"name": "饮料", "items": [{"sku": "cola", "price_fen": 350}]}),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    let (s, bad) = hub
        .post(
            "/api/v1/product-templates",
            &op,
            json!({"name": "x", "items": [{"sku": "nope", "price_fen": 1}]}),
        )
        .await;
    assert_eq!(s, 400, "{bad}");
    let apply = format!(
        "/api/v1/product-templates/{}/apply",
        t["id"].as_str().unwrap_or_default()
    );
    let (s, a) = hub.post(&apply, &op, json!({"cabinet_ids": ["KM1"]})).await;
    assert_eq!((s, &a["cabinet_ids"]), (200, &json!(["KM1"])), "{a}");
    let (_, prices) = hub.get("/api/v1/cabinets/KM1/prices", &op).await;
    assert_eq!(skus(&prices), vec!["cola"], "{prices}");
    assert_eq!(prices["items"][0]["price_fen"], 350, "{prices}");
    // Another merchant cannot use it, nor apply it to its cabinets.
    let (s, _) = hub
        .post(&apply, &other, json!({"cabinet_ids": ["KM1"]}))
        .await;
    assert_eq!(s, 404);
    let (_, mine) = hub.get("/api/v1/product-templates", &other).await;
    assert_eq!(mine["count"], 0, "{mine}");

    // The restock history: the four counts, newest first, closed and by their restocker; none
    // of them another merchant's.
    let (s, h) = hub.get("/api/v1/restocks?cabinet_id=KM1", &op).await;
    assert_eq!((s, &h["count"]), (200, &json!(4)), "{h}");
    assert!(
        h["items"].as_array().is_some_and(|a| a
            .iter()
            .all(|x| x["state"] == "closed" && x["user_id"] == "restocker-1")),
        "{h}"
    );
    let (_, theirs) = hub.get("/api/v1/restocks", &other).await;
    assert_eq!(theirs["count"], 0, "{theirs}");
}
