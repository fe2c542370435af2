//! A merchant takes real payments only when the providers would accept its orders: its WeChat
//! sub-merchant number, its Alipay sub-merchant and authorisation, its customer-service phone.
//! The hub runs with real credentials (`payments.simulator = false`) against the providers'
//! simulators in a process of their own, as it would against WeChat and Alipay.

use serde_json::{json, Value};

use cabinet_hub::payments::alipay::AlipaySettings;
use cabinet_hub::payments::wechat::WechatConfig;

use crate::both;
use crate::crash::Simulators;
use crate::harness::{free_port, Backend, Cabinet, TestHub, ADMIN_KEY, PATIENCE};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev-keys");

/// A hub with real provider credentials (the development keys the simulators hold) talking to
/// `sims`, with one cabinet of merchant m1 online.
async fn real_hub(b: Backend, sims: &Simulators) -> (TestHub, String, String, Cabinet) {
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sim = format!("http://{}", sims.addr);
    let hub = TestHub::start_with(b, |s| {
        s.http.listen = http;
        s.payments.simulator = false;
        s.payments.confirm_timeout_ms = 60_000;
        s.payments.deduction_check_ms = 300;
        s.payments.wechat = Some(WechatConfig {
            base_url: format!("{sim}/sim/wechatpay"),
            mchid: "1900000001".into(),
            merchant_serial: "DEV_MERCHANT_SERIAL".into(),
            merchant_key_path: format!("{KEYS}/wechat-merchant.key.pem"),
            platform_serial: "PUB_KEY_ID_SIMULATOR".into(),
            platform_public_key_path: format!("{KEYS}/wechat-platform.pub.pem"),
            api_v3_key: cabinet_hub::simulators::DEV_API_V3_KEY.into(),
            apiv2_key: cabinet_hub::simulators::DEV_API_V2_KEY.into(),
            service_id: "500001".into(),
            appid: "wxsimulator".into(),
            notify_url: format!("http://{http}/api/v1/payments/wechat/notify"),
        });
        s.payments.alipay = Some(AlipaySettings {
            gateway: format!("{sim}/sim/alipay/gateway.do"),
            app_id: "2021000000000001".into(),
            app_private_key_path: format!("{KEYS}/alipay-app.key.pem"),
            alipay_public_key_path: format!("{KEYS}/alipay-platform.pub.pem"),
            notify_url: format!("http://{http}/api/v1/payments/alipay/notify"),
            platform_pid: None,
        });
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let (s, _) = hub
        .call(
            "PUT",
            "/api/v1/products/cola",
            &op,
            Some(json!({"name": "Cola"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, r) = hub
        .call(
            "PUT",
            "/api/v1/cabinets/KM1/prices",
            &op,
            Some(json!({"items": [{"sku": "cola", "price_fen": 300}]})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    (hub, ma, op, c)
}

async fn start(hub: &TestHub, op: &str, user: &str, channel: &str) -> (u16, Value) {
    hub.post(
        "/api/v1/sessions",
        op,
        json!({"cabinet_id": "KM1", "user_id": user, "channel": channel, "mode": "purchase"}),
    )
    .await
}

both!(real_providers_take_only_a_ready_merchants_orders);

async fn real_providers_take_only_a_ready_merchants_orders(b: Backend) {
    let sims = Simulators::start().await;
    let (hub, ma, op, mut c) = real_hub(b, &sims).await;

    // Nothing set: neither channel is ready, and the page's key sees why.
    let (s, v) = hub.get("/api/v1/merchants/m1/payment", &op).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["readiness"]["wechat"].clone(),
            v["readiness"]["alipay"]["ready"].clone()
        ),
        (
            json!({"ready": false, "missing": ["wechat_sub_mchid", "service_phone"], "simulated": false}),
            json!(false)
        ),
        "{v}"
    );
    assert_eq!(
        v["readiness"]["alipay"]["missing"],
        json!(["alipay_smid", "alipay_app_auth_token", "service_phone"])
    );
    for channel in ["wechat", "alipay"] {
        let (s, r) = start(&hub, &op, "u1", channel).await;
        assert_eq!(
            (s, r["error"]["code"].as_str()),
            (422, Some("merchant_payment_not_ready")),
            "{channel}: {r}"
        );
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("service_phone"),
            "{r}"
        );
    }
    // Refused before anything was stored or sent: no session, no order, no unlock.
    let (_, orders) = hub.get("/api/v1/orders", &op).await;
    assert_eq!(orders["count"], 0, "{orders}");
    assert!(c
        .try_command("unlock", std::time::Duration::from_millis(300))
        .await
        .is_none());

    // Only the platform onboards a merchant; bad values are refused.
    let ready = json!({"risk_ceiling_fen": 20000, "wechat_sub_mchid": "1900000109",
                       "service_phone": "400-800-1234", "alipay_smid": "2088000000000001",
                       "alipay_app_auth_token": "202612BBsecretAuthToken00001"});
    for key in [&ma, &op] {
        let (s, _) = hub
            .call(
                "PUT",
                "/api/v1/merchants/m1/payment",
                key,
                Some(ready.clone()),
            )
            .await;
        assert_eq!(s, 403);
    }
    for bad in [
        json!({"risk_ceiling_fen": 20000, "wechat_sub_mchid": "sim-m1"}),
        json!({"risk_ceiling_fen": 20000, "service_phone": "call me"}),
    ] {
        let (s, r) = hub
            .call("PUT", "/api/v1/merchants/m1/payment", ADMIN_KEY, Some(bad))
            .await;
        assert_eq!(s, 400, "{r}");
    }
    let (s, v) = hub
        .call(
            "PUT",
            "/api/v1/merchants/m1/payment",
            ADMIN_KEY,
            Some(ready.clone()),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        !v.to_string().contains("secretAuthToken"),
        "the token is never shown: {v}"
    );
    assert_eq!(v["alipay_authorized"], true);
    // The token is never shown back, so a change that leaves it out keeps it.
    let mut again = ready.clone();
    again
        .as_object_mut()
        .map(|o| o.remove("alipay_app_auth_token"));
    let (s, v) = hub
        .call(
            "PUT",
            "/api/v1/merchants/m1/payment",
            ADMIN_KEY,
            Some(again),
        )
        .await;
    assert_eq!(
        (s, v["alipay_authorized"].clone()),
        (200, json!(true)),
        "{v}"
    );
    let (_, v) = hub.get("/api/v1/merchants/m1/payment", &op).await;
    assert_eq!(
        (
            v["readiness"]["wechat"]["ready"].clone(),
            v["readiness"]["alipay"]["ready"].clone()
        ),
        (json!(true), json!(true)),
        "{v}"
    );
    // Another merchant's key learns nothing.
    let (_, other) = hub.merchant("m2").await;
    assert_eq!(hub.get("/api/v1/merchants/m1/payment", &other).await.0, 404);

    // Ready: the purchase goes through the real client, the confirmation, the simulator's
    // shopper confirming, and is paid.
    let (s, v) = start(&hub, &op, "u1", "wechat").await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["confirmation"]["extra_data"]["mch_id"], "1900000001");
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    hub.eventually(PATIENCE, "open", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
        (v["session"]["state"] == "open").then_some(())
    })
    .await;
    crate::purchase::shop_visit(&mut c, &session, json!([{"sku": "cola", "qty": 1}])).await;
    let v = crate::purchase::order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 300);
}

/// On the simulators every merchant can buy (they take any merchant), and readiness says so
/// while still naming what a real provider will need.
#[actix_rt::test]
async fn the_simulator_takes_any_merchant_and_says_what_real_providers_need() {
    let hub = TestHub::start(Backend::Sqlite).await;
    let (_, op) = hub.merchant("m1").await;
    let (s, v) = hub.get("/api/v1/merchants/m1/payment", &op).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["readiness"]["wechat"],
        json!({"ready": true, "missing": ["wechat_sub_mchid", "service_phone"], "simulated": true})
    );
}

/// The operator page tells a merchant's people why their shoppers cannot pay yet.
#[actix_rt::test]
async fn the_page_says_what_a_merchant_lacks() {
    let sims = Simulators::start().await;
    let (hub, _, op, _c) = real_hub(Backend::Sqlite, &sims).await;
    let mut b = crate::browser::Browser::launch(1280, 800).await;
    crate::browser::sign_in(&mut b, &hub, &op).await;
    b.wait_for(
        "document.querySelector('#payready [data-channel=wechat]')?.textContent === \
         'WeChat Pay: not ready — missing: WeChat sub-merchant number, customer-service phone'",
        std::time::Duration::from_secs(5),
    )
    .await;
    b.wait_for(
        "document.querySelector('#payready [data-channel=alipay]')?.className === 'notready'",
        std::time::Duration::from_secs(5),
    )
    .await;
}
