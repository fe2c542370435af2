//! Products, sellable lists, promotions and quotes through the API, on both backends.

use serde_json::json;

use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY};

both!(
    catalog_prices_and_promotions,
    catalog_scoping_and_validation
);

async fn catalog_prices_and_promotions(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    hub.cabinet(&ma, "m1", "KM1").await;
    for (sku, name) in [("cola", "可口可乐 330ml"), ("chips", "Chips")] {
        let (s, r) = hub
            .call(
                "PUT",
                &format!("/api/v1/products/{sku}"),
                &op,
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(s, 200, "{r}");
    }
    let (_, products) = hub.get("/api/v1/products", &op).await;
    assert_eq!(products["count"], 2);
    let (s, r) = hub
        .call("PUT", "/api/v1/cabinets/KM1/prices", &op, Some(json!({"items": [{"sku": "cola", "price_fen": 300}, {"sku": "chips", "price_fen": 650}]})))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["items"][1]["name"], "可口可乐 330ml");

    let basket = json!({"items": [{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]});
    let (s, q) = hub
        .post("/api/v1/cabinets/KM1/quote", &op, basket.clone())
        .await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(
        (q["gross_fen"].clone(), q["total_fen"].clone()),
        (json!(1250), json!(1250))
    );

    // Published now: the very next basket gets it (the support case "discount published but
    // not applied" cannot happen — promotions are read for every pricing).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let (s, p) = hub
        .post(
            "/api/v1/promotions",
            &op,
            json!({"name": "限时八折", "window": {"type": "between", "starts_at": now - 1000, "ends_at": now + 3_600_000},
                   "offer": {"type": "product_price", "rules": {"cola": {"kind": "percent_bps", "value": 8000}}}}),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    let (s, spend) = hub
        .post(
            "/api/v1/promotions",
            &op,
            json!({"name": "满10减1", "window": {"type": "always"},
              "offer": {"type": "spend_save", "tiers": [{"threshold_fen": 1000, "off_fen": 100}]}}),
        )
        .await;
    assert_eq!(s, 201, "{spend}");
    let (_, q) = hub
        .post("/api/v1/cabinets/KM1/quote", &op, basket.clone())
        .await;
    assert_eq!(q["discounts"].as_array().map(Vec::len), Some(2), "{q}");
    assert_eq!(q["discounts"][0]["amount_fen"], 120);
    assert_eq!(q["discounts"][1]["amount_fen"], 100);
    assert_eq!(q["total_fen"], 1250 - 120 - 100);

    // Ended: gone from the next basket.
    let (s, ended) = hub
        .post(
            &format!(
                "/api/v1/promotions/{}/end",
                p["id"].as_str().unwrap_or_default()
            ),
            &op,
            json!({}),
        )
        .await;
    assert_eq!((s, ended["active"].clone()), (200, json!(false)));
    let (_, q) = hub.post("/api/v1/cabinets/KM1/quote", &op, basket).await;
    assert_eq!(q["total_fen"], 1250 - 100);
    let (_, list) = hub.get("/api/v1/promotions", &op).await;
    assert_eq!(list["count"], 2);

    // Quantities are bounded and checked: this basket used to wrap to qty 0, total 0, 200.
    let (s, r) = hub
        .post(
            "/api/v1/cabinets/KM1/quote",
            &op,
            json!({"items": [{"sku": "cola", "qty": 4294967295u32}, {"sku": "cola", "qty": 1}]}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("basket_out_of_range")),
        "{r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("items[0]")),
        "names the line: {r}"
    );
    let (s, r) = hub
        .post(
            "/api/v1/cabinets/KM1/quote",
            &op,
            json!({"items": [{"sku": "cola", "qty": 99}, {"sku": "chips", "qty": 99}, {"sku": "cola", "qty": 3}]}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("basket_out_of_range")),
        "over 200 items in all: {r}"
    );
    let (s, r) = hub
        .call(
            "PUT",
            "/api/v1/cabinets/KM1/prices",
            &op,
            Some(json!({"items": [{"sku": "cola", "price_fen": 10_000_001}]})),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("price_out_of_range")),
        "{r}"
    );

    // A product not on the list cannot be priced automatically.
    let (s, r) = hub
        .post(
            "/api/v1/cabinets/KM1/quote",
            &op,
            json!({"items": [{"sku": "caviar", "qty": 1}]}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("unknown_product"))
    );
}

async fn catalog_scoping_and_validation(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma1, op1) = hub.merchant("m1").await;
    let (_, op2) = hub.merchant("m2").await;
    hub.cabinet(&ma1, "m1", "KM1").await;
    hub.call(
        "PUT",
        "/api/v1/products/cola",
        &op1,
        Some(json!({"name": "Cola"})),
    )
    .await;
    let (_, p) = hub
        .post(
            "/api/v1/promotions",
            &op1,
            json!({"name": "x", "window": {"type": "always"},
              "offer": {"type": "spend_save", "tiers": [{"threshold_fen": 1000, "off_fen": 100}]}}),
        )
        .await;
    let pid = p["id"].as_str().unwrap_or_default().to_owned();

    let cases: Vec<(&str, String, &str, Option<serde_json::Value>, u16)> = vec![
        ("GET", "/api/v1/cabinets/KM1/prices".into(), &op2, None, 404),
        (
            "PUT",
            "/api/v1/cabinets/KM1/prices".into(),
            &op2,
            Some(json!({"items": []})),
            404,
        ),
        (
            "POST",
            "/api/v1/cabinets/KM1/quote".into(),
            &op2,
            Some(json!({"items": []})),
            404,
        ),
        (
            "POST",
            format!("/api/v1/promotions/{pid}/end"),
            &op2,
            Some(json!({})),
            404,
        ),
        (
            "PUT",
            "/api/v1/products/cola".into(),
            &op2,
            Some(json!({"name": "x", "merchant_id": "m1"})),
            404,
        ),
        (
            "POST",
            "/api/v1/promotions".into(),
            &op2,
            Some(json!({"name": "x", "window": {"type": "always"},
            "offer": {"type": "spend_save", "tiers": [{"threshold_fen": 10, "off_fen": 1}]}, "cabinet_ids": ["KM1"]})),
            400,
        ),
        // Validation.
        (
            "PUT",
            "/api/v1/cabinets/KM1/prices".into(),
            &op1,
            Some(json!({"items": [{"sku": "nope", "price_fen": 1}]})),
            400,
        ),
        (
            "PUT",
            "/api/v1/cabinets/KM1/prices".into(),
            &op1,
            Some(json!({"items": [{"sku": "cola", "price_fen": -1}]})),
            400,
        ),
        (
            "PUT",
            "/api/v1/cabinets/KM1/prices".into(),
            &op1,
            Some(
                json!({"items": [{"sku": "cola", "price_fen": 1}, {"sku": "cola", "price_fen": 2}]}),
            ),
            400,
        ),
        (
            "PUT",
            "/api/v1/products/bad%20sku".into(),
            &op1,
            Some(json!({"name": "x"})),
            400,
        ),
        (
            "PUT",
            "/api/v1/products/cola".into(),
            ADMIN_KEY,
            Some(json!({"name": "x"})),
            400,
        ),
        (
            "POST",
            "/api/v1/promotions".into(),
            &op1,
            Some(
                json!({"name": "x", "window": {"type": "between", "starts_at": 5, "ends_at": 5},
            "offer": {"type": "product_price", "rules": {"cola": {"kind": "percent_bps", "value": 8000}}}}),
            ),
            400,
        ),
        (
            "POST",
            "/api/v1/promotions".into(),
            &op1,
            Some(json!({"name": "x", "window": {"type": "always"},
            "offer": {"type": "product_price", "rules": {"cola": {"kind": "percent_bps", "value": 8000}}}})),
            400,
        ),
        (
            "POST",
            "/api/v1/promotions".into(),
            &op1,
            Some(json!({"name": "x", "window": {"type": "always"},
            "offer": {"type": "spend_save", "tiers": [{"threshold_fen": 100, "off_fen": 200}]}})),
            400,
        ),
        (
            "POST",
            "/api/v1/promotions".into(),
            &op1,
            Some(
                json!({"name": "x", "window": {"type": "daily", "from_min": 1500, "to_min": 10},
            "offer": {"type": "product_price", "rules": {"cola": {"kind": "fixed_fen", "value": 100}}}}),
            ),
            400,
        ),
    ];
    for (method, path, key, body, want) in cases {
        let (got, answer) = hub.call(method, &path, key, body).await;
        assert_eq!(got, want, "{method} {path}: {answer}");
    }
    let (_, list) = hub.get("/api/v1/promotions", &op2).await;
    assert_eq!(list["count"], 0);
    let (_, products) = hub.get("/api/v1/products", &op2).await;
    assert_eq!(products["count"], 0);
}
