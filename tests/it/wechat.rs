//! The WeChat Pay Score client against the simulator, over HTTP.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use tokio::sync::mpsc;

use cabinet_hub::payments::wechat::{
    CreateOrder, NotificationError, PostDiscount, PostPayment, RiskFund, SignedHeaders,
    SplitReceiver, TimeRange, WechatClient, WechatConfig, WechatError,
};
use cabinet_hub::simulators::wechat::{
    self as sim_wechat, Confirm, Deduction, SimConfig, UserScript, WechatSim,
};

use crate::harness::PATIENCE;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev-keys");
const API_V3_KEY: &str = "0123456789abcdefghijklmnopqrstuv";
const API_V2_KEY: &str = "apiv2keyofthewechattestrig000001";

struct Rig {
    client: WechatClient,
    sim: WechatSim,
    notes: mpsc::UnboundedReceiver<(SignedHeaders, String)>,
    refuse_first: Arc<AtomicUsize>,
    base: String,
    /// The ids of the notifications taken so far.
    seen: HashSet<String>,
}

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{KEYS}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn client_config(base: &str) -> WechatConfig {
    WechatConfig {
        base_url: format!("{base}{}", sim_wechat::PREFIX),
        mchid: "1900000001".into(),
        merchant_serial: "MERCHANT_SERIAL_1".into(),
        merchant_key_path: format!("{KEYS}/wechat-merchant.key.pem"),
        platform_serial: "PUB_KEY_ID_SIM".into(),
        platform_public_key_path: format!("{KEYS}/wechat-platform.pub.pem"),
        api_v3_key: API_V3_KEY.into(),
        apiv2_key: API_V2_KEY.into(),
        service_id: "500001".into(),
        appid: "wx_sim_app".into(),
        notify_url: format!("{base}/notify"),
    }
}

async fn rig() -> Rig {
    rig_keeping(Duration::from_secs(86_400)).await
}

/// A rig whose simulator forgets finished orders `finished_kept` after creating them.
async fn rig_keeping(finished_kept: Duration) -> Rig {
    let sim = WechatSim::new(SimConfig {
        mchid: "1900000001".into(),
        direct_mchid: "1900000002".into(),
        merchant_serial: "MERCHANT_SERIAL_1".into(),
        merchant_public_key_pem: read("wechat-merchant.pub.pem"),
        platform_serial: "PUB_KEY_ID_SIM".into(),
        platform_key_pem: read("wechat-platform.key.pem"),
        api_v3_key: API_V3_KEY.into(),
        api_v2_key: API_V2_KEY.into(),
        retry_scale: 0.002,
        confirm_delay: Duration::from_millis(20),
        cancel_after_complete: false,
        persist: None,
        finished_kept,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (tx, notes) = mpsc::unbounded_channel();
    let refuse_first = Arc::new(AtomicUsize::new(0));
    let (s2, r2) = (sim.clone(), refuse_first.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let base = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    let server = HttpServer::new(move || {
        let (tx, refuse) = (tx.clone(), r2.clone());
        App::new()
            .route(
                "/notify",
                web::post().to(move |req: HttpRequest, body: String| {
                    let (tx, refuse) = (tx.clone(), refuse.clone());
                    async move {
                        if refuse.load(Ordering::SeqCst) > 0 {
                            refuse.fetch_sub(1, Ordering::SeqCst);
                            return HttpResponse::InternalServerError()
                                .json(serde_json::json!({"code": "FAIL", "message": "失败"}));
                        }
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let headers = SignedHeaders {
                            timestamp: h("Wechatpay-Timestamp"),
                            nonce: h("Wechatpay-Nonce"),
                            signature: h("Wechatpay-Signature"),
                            serial: h("Wechatpay-Serial"),
                        };
                        let _ = tx.send((headers, body));
                        HttpResponse::NoContent().finish()
                    }
                }),
            )
            .configure(|c| sim_wechat::configure(c, s2.clone()))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap_or_else(|e| panic!("{e}"))
    .run();
    actix_rt::spawn(server);
    let client = WechatClient::new(client_config(&base)).unwrap_or_else(|e| panic!("{e}"));
    Rig {
        client,
        sim,
        notes,
        refuse_first,
        base,
        seen: HashSet::new(),
    }
}

fn order(no: &str, user: &str) -> CreateOrder {
    CreateOrder {
        out_order_no: no.into(),
        sub_mchid: "1900000109".into(),
        service_introduction: "智能柜购物".into(),
        risk_fund: RiskFund {
            name: "ESTIMATE_ORDER_COST".into(),
            amount: 20_000,
        },
        time_range: TimeRange {
            start_time: "20251121120000".into(),
            end_time: None,
        },
        openid: user.into(),
        attach: "s_1".into(),
        device: None,
    }
}

impl Rig {
    /// The next notification not seen before. The simulator delivers each as WeChat does: in a
    /// task of its own, retried (with its id unchanged) when the answer does not come within its
    /// client's 5 s. On a starved machine a delivery can take longer than that, or be answered
    /// too late and come again; the test takes it as a receiver must, once.
    async fn next_note(&mut self) -> cabinet_hub::payments::wechat::Notification {
        loop {
            let (h, body) = tokio::time::timeout(PATIENCE, self.notes.recv())
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("no notification within {PATIENCE:?}"));
            let n = self
                .client
                .parse_notification(&h, &body)
                .unwrap_or_else(|e| panic!("notification refused: {e}"));
            if self.seen.insert(n.id.clone()) {
                return n;
            }
        }
    }
}

fn lines() -> (Vec<PostPayment>, Vec<PostDiscount>) {
    (
        vec![
            PostPayment {
                name: "商品信息".into(),
                amount: 600,
                description: "Cola".into(),
                count: 2,
            },
            PostPayment {
                name: "商品信息".into(),
                amount: 650,
                description: "Chips".into(),
                count: 1,
            },
        ],
        vec![PostDiscount {
            name: "满10减1".into(),
            description: "满减".into(),
            amount: 100,
        }],
    )
}

#[actix_rt::test]
async fn happy_path_confirm_complete_paid_refund() {
    let mut r = rig().await;
    let created = r
        .client
        .create_order(&order("o_1", "u1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created.state, "CREATED");
    // Identical retry is idempotent.
    assert_eq!(
        r.client
            .create_order(&order("o_1", "u1"))
            .await
            .map(|o| o.order_id)
            .ok(),
        Some(created.order_id.clone())
    );
    let n = r.next_note().await;
    assert_eq!(n.event_type, "PAYSCORE.USER_CONFIRM");
    assert_eq!(n.resource["state_description"], "USER_CONFIRM");
    let q = r
        .client
        .query_order("1900000109", "o_1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (q.state.as_str(), q.state_description.as_deref()),
        ("DOING", Some("USER_CONFIRM"))
    );

    let (pay, disc) = lines();
    r.client
        .complete_order("1900000109", "o_1", &pay, &disc, 1150, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = r.next_note().await;
    assert_eq!(n.event_type, "PAYSCORE.USER_PAID");
    let q = r
        .client
        .query_order("1900000109", "o_1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(q.state, "DONE");
    let c = q.collection.unwrap_or_else(|| panic!("collection"));
    assert_eq!(
        (c.state.as_str(), c.paid_amount, c.details.len()),
        ("USER_PAID", 1150, 1)
    );
    let txn = c.details[0].transaction_id.clone();

    let refund = r
        .client
        .refund("1900000109", &txn, "rf_1", 300, 1150, "少拿一瓶")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Taken, not done: WeChat answers PROCESSING and settles the refund afterwards.
    assert_eq!(refund.status.as_deref(), Some("PROCESSING"));
    let start = std::time::Instant::now();
    loop {
        let q = r
            .client
            .query_refund("1900000109", "rf_1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if q.status.as_deref() == Some("SUCCESS") {
            assert_eq!(q.refund_id, refund.refund_id);
            break;
        }
        assert!(start.elapsed() < crate::harness::PATIENCE, "{q:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match r.client.query_refund("1900000109", "rf_none").await {
        Err(WechatError::Api { status: 404, .. }) => {}
        other => panic!("an unknown refund is 404: {other:?}"),
    }
    let again = r
        .client
        .refund("1900000109", &txn, "rf_1", 300, 1150, "少拿一瓶")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        again.refund_id, refund.refund_id,
        "same out_refund_no: same refund"
    );
    match r
        .client
        .refund("1900000109", &txn, "rf_2", 900, 1150, "too much")
        .await
    {
        Err(WechatError::Api {
            status: 403, code, ..
        }) => assert_eq!(code, "NOT_ENOUGH"),
        other => panic!("over-refund must fail: {other:?}"),
    }
}

/// A paid order of 1150 fen, completed with or without profit sharing; its transaction id.
async fn paid_order(r: &mut Rig, no: &str, user: &str, profit_sharing: bool) -> String {
    r.client
        .create_order(&order(no, user))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.next_note().await.event_type, "PAYSCORE.USER_CONFIRM");
    let (pay, disc) = lines();
    r.client
        .complete_order("1900000109", no, &pay, &disc, 1150, profit_sharing)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = r.next_note().await;
    assert_eq!(n.event_type, "PAYSCORE.USER_PAID");
    n.resource["collection"]["details"][0]["transaction_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn to_platform(amount: i64) -> Vec<SplitReceiver> {
    vec![SplitReceiver {
        kind: "MERCHANT_ID".into(),
        receiver_account: "1900000001".into(),
        amount,
        description: "平台佣金".into(),
    }]
}

fn refused(r: Result<impl std::fmt::Debug, WechatError>) -> (u16, String) {
    match r {
        Err(WechatError::Api { status, code, .. }) => (status, code),
        other => panic!("must be refused: {other:?}"),
    }
}

/// 平台收付通 profit sharing as the client sends it and the simulator enforces it: an order
/// completed without `profit_sharing` cannot be split; at most 30 % goes to others; a split is
/// asynchronous (PROCESSING, then the query says SUCCESS) and idempotent by out_order_no; the
/// merchant cannot refund what was split until it is returned, and no more than was split is
/// returned; once finished nothing more is split.
#[actix_rt::test]
async fn profit_sharing_splits_returns_and_finishes_by_the_providers_rules() {
    let mut r = rig().await;
    let plain = paid_order(&mut r, "o_plain", "u1", false).await;
    assert_eq!(
        refused(
            r.client
                .split("1900000109", &plain, "S1", &to_platform(10), false)
                .await
        ),
        (400, "INVALID_REQUEST".into())
    );
    let txn = paid_order(&mut r, "o_shared", "u2", true).await;
    // 30 % of 1150 is 345.
    assert_eq!(
        refused(
            r.client
                .split("1900000109", &txn, "S2", &to_platform(346), false)
                .await
        ),
        (400, "PARAM_ERROR".into())
    );
    let asked = r
        .client
        .split("1900000109", &txn, "S3", &to_platform(100), false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(asked.status.as_deref(), Some("PROCESSING"));
    let again = r
        .client
        .split("1900000109", &txn, "S3", &to_platform(100), false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        again.order_id, asked.order_id,
        "the same out_order_no is the same split"
    );
    let done = tokio::time::timeout(PATIENCE, async {
        loop {
            let q = r
                .client
                .query_split("1900000109", &txn, "S3")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if q.receivers
                .iter()
                .all(|x| x.result.as_deref() == Some("SUCCESS"))
            {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the split never succeeded"));
    assert_eq!(
        (
            done.receivers[0].receiver_account.as_deref(),
            done.receivers[0].amount
        ),
        (Some("1900000001"), 100)
    );
    // 1150 paid, 100 split: the merchant's account holds 1050.
    assert_eq!(
        refused(
            r.client
                .refund("1900000109", &txn, "R1", 1150, 1150, "退货")
                .await
        ),
        (403, "NOT_ENOUGH".into())
    );
    assert_eq!(
        refused(
            r.client
                .return_split("1900000109", "S3", "RT1", 101, "退款前回退")
                .await
        ),
        (403, "NOT_ENOUGH".into())
    );
    let back = r
        .client
        .return_split("1900000109", "S3", "RT2", 100, "退款前回退")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((back.result.as_str(), back.amount), ("SUCCESS", 100));
    r.client
        .refund("1900000109", &txn, "R2", 1150, 1150, "退货")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.next_note().await.event_type, "REFUND.SUCCESS");
    let txn2 = paid_order(&mut r, "o_finished", "u3", true).await;
    r.client
        .finish_split("1900000109", &txn2, "F1", "分账完成")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        refused(
            r.client
                .split("1900000109", &txn2, "S4", &to_platform(10), false)
                .await
        ),
        (400, "INVALID_REQUEST".into())
    );
}

#[actix_rt::test]
async fn finished_orders_are_forgotten_after_the_kept_time_unfinished_ones_never() {
    let mut r = rig_keeping(Duration::ZERO).await;
    r.client
        .create_order(&order("o_done", "u1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.next_note().await.event_type, "PAYSCORE.USER_CONFIRM");
    let (pay, disc) = lines();
    r.client
        .complete_order("1900000109", "o_done", &pay, &disc, 1150, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.next_note().await.event_type, "PAYSCORE.USER_PAID");
    r.client
        .create_order(&order("o_open", "u2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.next_note().await.event_type, "PAYSCORE.USER_CONFIRM");
    // Ages are whole seconds; the next change after that lets the simulator forget.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    r.client
        .create_order(&order("o_later", "u3"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match r.client.query_order("1900000109", "o_done").await {
        Err(WechatError::Api {
            status: 404, code, ..
        }) => assert_eq!(code, "ORDER_NOT_EXIST"),
        other => panic!("a finished order past its time must be forgotten: {other:?}"),
    }
    let open = r
        .client
        .query_order("1900000109", "o_open")
        .await
        .unwrap_or_else(|e| panic!("an unfinished order is never forgotten: {e}"));
    assert_eq!(open.state, "DOING");
}

#[actix_rt::test]
async fn declined_confirmation_and_cancel() {
    let mut r = rig().await;
    r.sim.set_user(
        "u2",
        UserScript {
            confirm: Confirm::No,
            deduction: Deduction::Succeed,
            ..UserScript::default()
        },
    );
    r.client
        .create_order(&order("o_2", "u2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), r.notes.recv())
            .await
            .is_err(),
        "no confirmation"
    );
    let (pay, disc) = lines();
    match r
        .client
        .complete_order("1900000109", "o_2", &pay, &disc, 1150, false)
        .await
    {
        Err(WechatError::Api { code, message, .. }) => assert_eq!(
            (code.as_str(), message.as_str()),
            ("INVALID_REQUEST", "当前订单状态不合法")
        ),
        other => panic!("complete before confirmation must fail: {other:?}"),
    }
    let c = r
        .client
        .cancel_order("1900000109", "o_2", "用户未确认")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.out_order_no, "o_2");
    assert_eq!(
        r.client
            .query_order("1900000109", "o_2")
            .await
            .map(|o| o.state)
            .ok()
            .as_deref(),
        Some("REVOKED")
    );
    assert!(
        r.client
            .cancel_order("1900000109", "o_2", "again")
            .await
            .is_err(),
        "REVOKED is terminal"
    );
}

#[actix_rt::test]
async fn failed_deduction_stays_paying_until_the_shopper_pays() {
    let mut r = rig().await;
    r.sim.set_user(
        "u3",
        UserScript {
            confirm: Confirm::Yes,
            deduction: Deduction::Fail,
            ..UserScript::default()
        },
    );
    r.client
        .create_order(&order("o_3", "u3"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    r.next_note().await;
    let (pay, disc) = lines();
    // A total that does not add up is refused as WeChat does.
    match r
        .client
        .complete_order("1900000109", "o_3", &pay, &disc, 1250, false)
        .await
    {
        Err(WechatError::Api { code, message, .. }) => assert_eq!(
            (code.as_str(), message.as_str()),
            ("PARAM_ERROR", "最终总金额计算非法")
        ),
        other => panic!("{other:?}"),
    }
    r.client
        .complete_order("1900000109", "o_3", &pay, &disc, 1150, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    r.client
        .collect("1900000109", "o_3")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // While unpaid, the amount may be lowered (an appeal before payment), never raised.
    let (mut pay2, disc2) = lines();
    pay2[0].amount = 300;
    pay2[0].count = 1;
    r.client
        .modify_order("1900000109", "o_3", &pay2, &disc2, 850, "少拿一瓶")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match r
        .client
        .modify_order("1900000109", "o_3", &pay, &disc, 1150, "raise")
        .await
    {
        Err(WechatError::Api { code, .. }) => assert_eq!(code, "PARAM_ERROR"),
        other => panic!("raising must fail: {other:?}"),
    }
    let q = r
        .client
        .query_order("1900000109", "o_3")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            q.state_description.as_deref(),
            q.collection.map(|c| c.state)
        ),
        (Some("MCH_COMPLETE"), Some("USER_PAYING".to_owned()))
    );
    assert_eq!(r.sim.user_pays("u3"), 1);
    let paid = r.next_note().await;
    assert_eq!(paid.event_type, "PAYSCORE.USER_PAID");
    assert_eq!(
        paid.resource["collection"]["paid_amount"], 850,
        "the lowered amount was collected"
    );
}

#[actix_rt::test]
async fn notifications_are_retried_until_answered() {
    let mut r = rig().await;
    r.refuse_first.store(2, Ordering::SeqCst);
    r.client
        .create_order(&order("o_4", "u4"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = r.next_note().await;
    assert_eq!(n.event_type, "PAYSCORE.USER_CONFIRM");
    assert_eq!(
        r.refuse_first.load(Ordering::SeqCst),
        0,
        "two refusals, then delivered"
    );
}

#[actix_rt::test]
async fn forged_requests_responses_and_notifications_are_refused() {
    let mut r = rig().await;
    // A request signed with a key the service does not know: 401 SIGN_ERROR.
    let mut cfg = client_config(&r.base);
    cfg.merchant_key_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/payments/testdata/merchant_key.pem"
    )
    .into();
    let wrong = WechatClient::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    match wrong.create_order(&order("o_5", "u5")).await {
        Err(WechatError::Api {
            status: 401, code, ..
        }) => assert_eq!(code, "SIGN_ERROR"),
        other => panic!("{other:?}"),
    }
    // Answers not signed by the platform key we trust are not believed.
    let mut cfg = client_config(&r.base);
    cfg.platform_public_key_path = format!("{KEYS}/wechat-merchant.pub.pem");
    let distrustful = WechatClient::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        distrustful.query_order("1900000109", "nope").await,
        Err(WechatError::BadResponseSignature(_))
    ));

    // A genuine notification, then forgeries of it.
    r.client
        .create_order(&order("o_6", "u6"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (h, body) = tokio::time::timeout(PATIENCE, r.notes.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no note"));
    assert!(r.client.parse_notification(&h, &body).is_ok());
    let tampered = body.replace("PAYSCORE.USER_CONFIRM", "PAYSCORE.USER_PAID");
    assert!(matches!(
        r.client.parse_notification(&h, &tampered),
        Err(NotificationError::Verify(_))
    ));
    let mut probe = h.clone();
    probe.signature = Some("WECHATPAY/SIGNTEST/xyz".into());
    assert!(matches!(
        r.client.parse_notification(&probe, &body),
        Err(NotificationError::Verify(_))
    ));
    let mut stale = h.clone();
    stale.timestamp = Some("1600000000".into());
    assert!(matches!(
        r.client.parse_notification(&stale, &body),
        Err(NotificationError::Verify(_))
    ));
    let mut missing = h.clone();
    missing.serial = None;
    assert_eq!(
        r.client.parse_notification(&missing, &body),
        Err(NotificationError::Header("Wechatpay-Serial"))
    );
    let mut cfg = client_config(&r.base);
    cfg.api_v3_key = "ffffffffffffffffffffffffffffffff".into();
    let wrong_key = WechatClient::new(cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        wrong_key.parse_notification(&h, &body),
        Err(NotificationError::Decrypt)
    );
}
