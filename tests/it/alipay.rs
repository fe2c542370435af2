//! The Alipay 芝麻先享 client against the gateway simulator, over HTTP.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use tokio::sync::mpsc;

use cabinet_hub::payments::alipay::{AlipayClient, AlipayConfig, AlipayError};
use cabinet_hub::simulators::alipay::{self as sim_alipay, AlipaySim, AlipaySimConfig};
use cabinet_hub::simulators::wechat::{Confirm, Deduction, UserScript};

use crate::harness::PATIENCE;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev-keys");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{KEYS}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

struct Rig {
    client: AlipayClient,
    sim: AlipaySim,
    notes: mpsc::UnboundedReceiver<BTreeMap<String, String>>,
    base: String,
    /// The `notify_id`s of the notifications taken so far.
    seen: HashSet<String>,
}

async fn rig() -> Rig {
    let sim = AlipaySim::new(AlipaySimConfig {
        app_id: "2021000000000001".into(),
        app_public_key_pem: read("alipay-app.pub.pem"),
        alipay_key_pem: read("alipay-platform.key.pem"),
        retry_scale: 0.0005,
        confirm_delay: Duration::from_millis(20),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (tx, notes) = mpsc::unbounded_channel();
    let s2 = sim.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let base = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    let server = HttpServer::new(move || {
        let tx = tx.clone();
        App::new()
            .route(
                "/notify",
                web::post().to(move |form: web::Form<BTreeMap<String, String>>| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(form.into_inner());
                        HttpResponse::Ok().body("success")
                    }
                }),
            )
            .configure(|c| sim_alipay::configure(c, s2.clone()))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap_or_else(|e| panic!("{e}"))
    .run();
    actix_rt::spawn(server);
    let client = client_with(
        &base,
        &read("alipay-app.key.pem"),
        &read("alipay-platform.pub.pem"),
    );
    Rig {
        client,
        sim,
        notes,
        base,
        seen: HashSet::new(),
    }
}

fn client_with(base: &str, app_key: &str, alipay_pub: &str) -> AlipayClient {
    let cfg = AlipayConfig {
        gateway: format!("{base}{}/gateway.do", sim_alipay::PREFIX),
        app_id: "2021000000000001".into(),
        notify_url: format!("{base}/notify"),
        platform_pid: Some(sim_alipay::PLATFORM_PID.into()),
    };
    AlipayClient::new(cfg, app_key, alipay_pub).unwrap_or_else(|e| panic!("{e}"))
}

impl Rig {
    /// The next notification not seen before: a delivery answered too late for the
    /// simulator's 5 s client timeout (a starved machine) comes again, and is taken once.
    async fn note(&mut self) -> BTreeMap<String, String> {
        loop {
            let n = tokio::time::timeout(PATIENCE, self.notes.recv())
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("no notification within {PATIENCE:?}"));
            self.client
                .verify_notify(&n)
                .unwrap_or_else(|e| panic!("notification refused: {e}"));
            if self
                .seen
                .insert(n.get("notify_id").cloned().unwrap_or_default())
            {
                return n;
            }
        }
    }
}

fn api_sub_code(r: Result<serde_json::Value, AlipayError>) -> String {
    match r {
        Err(AlipayError::Api { sub_code, .. }) => sub_code,
        other => panic!("expected a business error, got {other:?}"),
    }
}

#[actix_rt::test]
async fn confirm_pay_refund() {
    let mut r = rig().await;
    // Paying before the shopper confirmed is refused. (A shopper who never confirms: one who
    // confirms 20 ms after the order could have confirmed before a slow test paid.)
    r.sim.set_user(
        "u0",
        UserScript {
            confirm: Confirm::No,
            ..UserScript::default()
        },
    );
    let unconfirmed = r
        .client
        .create("s_0", "u0", 20_000, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        api_sub_code(
            r.client
                .pay(
                    "t_0",
                    unconfirmed["credit_biz_order_id"]
                        .as_str()
                        .unwrap_or_default(),
                    100,
                    None,
                    false
                )
                .await
        ),
        "ACQ.TRADE_STATUS_ERROR"
    );
    let created = r
        .client
        .create("s_1", "u1", 20_000, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let id = created["credit_biz_order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let n = r.note().await;
    assert_eq!(
        (n["out_order_no"].as_str(), n["user_confirmed"].as_str()),
        ("s_1", "true")
    );
    assert_eq!(
        r.client
            .query("s_1", None)
            .await
            .map(|v| v["user_confirmed"].clone())
            .ok(),
        Some(serde_json::json!(true))
    );
    assert_eq!(
        api_sub_code(r.client.pay("t_1", &id, 20_001, None, false).await),
        "ACQ.TOTAL_FEE_EXCEED"
    );
    let paid = r
        .client
        .pay("t_1", &id, 1250, None, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(paid["total_amount"], "12.50");
    assert_eq!(
        r.client
            .query("s_1", None)
            .await
            .map(|v| v["order_status"].clone())
            .ok(),
        Some(serde_json::json!("TRADE_FINISHED"))
    );
    let refund = r
        .client
        .refund("t_1", 300, "rq_1", "少拿一瓶", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refund["refund_fee"], "3.00");
    let again = r
        .client
        .refund("t_1", 300, "rq_1", "少拿一瓶", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (again["refund_fee"].as_str(), again["fund_change"].as_str()),
        (Some("3.00"), Some("N")),
        "same request, same refund"
    );
    assert_eq!(
        api_sub_code(r.client.refund("t_1", 1000, "rq_2", "too much", None).await),
        "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
    );
}

#[actix_rt::test]
async fn nothing_taken_closes_without_charge() {
    let mut r = rig().await;
    let created = r
        .client
        .create("s_2", "u2", 20_000, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let id = created["credit_biz_order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    r.note().await;
    r.client
        .close(
            &id,
            &cabinet_hub::payments::alipay::request_no(),
            "未取商品",
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.client
            .query("s_2", None)
            .await
            .map(|v| v["order_status"].clone())
            .ok(),
        Some(serde_json::json!("TRADE_CLOSED"))
    );
    assert_eq!(
        api_sub_code(r.client.pay("t_2", &id, 100, None, false).await),
        "ACQ.TRADE_STATUS_ERROR"
    );
}

#[actix_rt::test]
async fn failed_deduction_paid_later_is_notified() {
    let mut r = rig().await;
    r.sim.set_user(
        "u3",
        UserScript {
            confirm: Confirm::Yes,
            deduction: Deduction::Fail,
            ..UserScript::default()
        },
    );
    let created = r
        .client
        .create("s_3", "u3", 20_000, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let id = created["credit_biz_order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    r.note().await;
    assert_eq!(
        api_sub_code(r.client.pay("t_3", &id, 650, None, false).await),
        "ACQ.PAYMENT_FAIL"
    );
    assert_eq!(r.sim.user_pays("u3"), 1);
    let n = r.note().await;
    assert_eq!(
        (n["trade_status"].as_str(), n["total_amount"].as_str()),
        ("TRADE_SUCCESS", "6.50")
    );
}

#[actix_rt::test]
async fn forgeries_are_refused() {
    let mut r = rig().await;
    // A request signed with a key the gateway does not know.
    let wrong = client_with(
        &r.base,
        &read("wechat-merchant.key.pem"),
        &read("alipay-platform.pub.pem"),
    );
    assert_eq!(
        api_sub_code(wrong.query("s_x", None).await),
        "isv.invalid-signature"
    );
    // Answers not signed by Alipay's key are not believed.
    let distrustful = client_with(
        &r.base,
        &read("alipay-app.key.pem"),
        &read("alipay-app.pub.pem"),
    );
    assert!(matches!(
        distrustful.query("s_x", None).await,
        Err(AlipayError::BadSignature(_))
    ));
    // A tampered notification fails verification.
    r.client
        .create("s_4", "u4", 20_000, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut n = r.note().await;
    n.insert("out_order_no".into(), "s_other".into());
    assert!(r.client.verify_notify(&n).is_err());
}
