//! The purchase flow end to end: a real MQTT cabinet, the WeChat Pay simulator over HTTP (served
//! by the hub itself), SQLite and PostgreSQL.

use std::time::Duration;

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, Cabinet, TestHub, ADMIN_KEY, PATIENCE};

const SEC: Duration = Duration::from_secs(1);

pub(crate) async fn shop(b: Backend) -> (TestHub, String, Cabinet) {
    shop_with(b, |_| {}).await
}

/// `shop` with more settings changed.
pub(crate) async fn shop_with(
    b: Backend,
    mut tweak: impl FnMut(&mut cabinet_hub::config::Settings),
) -> (TestHub, String, Cabinet) {
    let hub = TestHub::start_with(b, |s| {
        // Longer than a test's patience: a shopper the simulator confirms is never refused
        // because the machine was slow. The tests of a refused confirmation set it short.
        s.payments.confirm_timeout_ms = 60_000;
        s.payments.deduction_check_ms = 300;
        s.payments.simulator_retry_scale = 0.01;
        s.payments.collect_interval_ms = 200;
        s.payments.blacklist_unpaid_orders = 1;
        tweak(s);
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    for sku in ["cola", "chips"] {
        hub.call(
            "PUT",
            &format!("/api/v1/products/{sku}"),
            &op,
            Some(json!({"name": sku})),
        )
        .await;
    }
    let (s, r) = hub
        .call("PUT", "/api/v1/cabinets/KM1/prices", &op, Some(json!({"items": [{"sku": "cola", "price_fen": 300}, {"sku": "chips", "price_fen": 650}]})))
        .await;
    assert_eq!(s, 200, "{r}");
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    (hub, op, c)
}

pub(crate) fn start(
    hub: &TestHub,
    key: &str,
    user: &str,
    idem: Option<&str>,
) -> actix_rt::task::JoinHandle<(u16, Value)> {
    start_on(hub, key, user, idem, "wechat")
}

fn start_on(
    hub: &TestHub,
    key: &str,
    user: &str,
    idem: Option<&str>,
    channel: &'static str,
) -> actix_rt::task::JoinHandle<(u16, Value)> {
    start_at(hub, key, "KM1", user, idem, channel)
}

fn start_at(
    hub: &TestHub,
    key: &str,
    cabinet: &str,
    user: &str,
    idem: Option<&str>,
    channel: &'static str,
) -> actix_rt::task::JoinHandle<(u16, Value)> {
    let client = hub.client.clone();
    let url = hub.url("/api/v1/sessions");
    let (key, user, idem) = (key.to_owned(), user.to_owned(), idem.map(str::to_owned));
    let cabinet = cabinet.to_owned();
    actix_rt::spawn(async move {
        let mut rb = client.post(&url).bearer_auth(&key).json(
            &json!({"cabinet_id": cabinet, "user_id": user, "channel": channel, "mode": "purchase"}),
        );
        if let Some(k) = idem {
            rb = rb.header("Idempotency-Key", k);
        }
        let r = rb.send().await.unwrap_or_else(|e| panic!("{e}"));
        let s = r.status().as_u16();
        let v = r.json().await.unwrap_or(Value::Null);
        if s != 202 {
            return (s, v);
        }
        (s, follow(&client, &url, &key, &v).await)
    })
}

/// A purchase's start as the shopper sees it: answered 202, then the door opened.
fn assert_open(s: u16, v: &Value) {
    assert_eq!(
        (s, v["session"]["state"].as_str()),
        (202, Some("open")),
        "{v}"
    );
}

/// A purchase's start that ended without an open door: answered 202, then failed for `why`.
fn assert_failed(s: u16, v: &Value, why: &str) {
    assert_eq!(
        (
            s,
            v["session"]["state"].as_str(),
            v["session"]["failure"].as_str()
        ),
        (202, Some("failed"), Some(why)),
        "{v}"
    );
}

/// Follows a session answered 202 the way a merchant's backend does: the confirmation is as
/// the API promises it, and `?wait_s=` long polls tell each change until the session is open
/// or failed. Answers the session's view then.
pub async fn follow(
    client: &reqwest::Client,
    sessions_url: &str,
    key: &str,
    answer: &Value,
) -> Value {
    assert_eq!(answer["session"]["state"], "confirming", "{answer}");
    let confirmation = &answer["confirmation"];
    match confirmation["channel"].as_str() {
        Some("wechat") => {
            assert_eq!(confirmation["business_type"], "wxpayScoreUse", "{answer}");
            let extra = &confirmation["extra_data"];
            for k in ["mch_id", "package", "timestamp", "nonce_str", "sign"] {
                assert!(
                    extra[k].as_str().is_some_and(|v| !v.is_empty()),
                    "{k}: {answer}"
                );
            }
            assert_eq!(extra["sign_type"], "HMAC-SHA256", "{answer}");
        }
        Some("alipay") => {
            assert!(
                confirmation["order_str"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty()),
                "{answer}"
            );
        }
        _ => panic!("no confirmation: {answer}"),
    }
    let id = answer["session"]["id"].as_str().unwrap_or_default();
    let mut state = "confirming".to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .get(format!("{sessions_url}/{id}?wait_s=10&from={state}"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200);
        let v: Value = r.json().await.unwrap_or(Value::Null);
        state = v["session"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !matches!(state.as_str(), "confirming" | "unlocking") {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "still {state}: {v}");
    }
}

/// Scripts how the simulated shopper `user` behaves (both simulators).
pub(crate) async fn script_shopper(hub: &TestHub, user: &str, script: Value) {
    let (s, v) = hub
        .call(
            "PUT",
            &format!("/sim/users/{user}"),
            ADMIN_KEY,
            Some(script),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

/// Door opens and closes, the lock latches, recognition reports `items`.
pub(crate) async fn shop_visit(c: &mut Cabinet, session: &str, items: Value) {
    door_then_recognition(
        c,
        json!({"session_id": session, "status": "ok", "items": items}),
    )
    .await;
}

/// The door opens and closes, the lock latches, the cameras report `recognition`.
pub(crate) async fn door_then_recognition(c: &mut Cabinet, recognition: Value) {
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    c.publish("recognition", recognition).await;
}

/// Waits for the order to reach `want` and its session to be over: a settled order moves
/// before its session does (so that a crash between the two leaves a session that recovery
/// still settles), and a test that starts the next session at once must not meet the first
/// one still open on a busy machine.
pub(crate) async fn order_status(hub: &TestHub, key: &str, session: &str, want: &str) -> Value {
    hub.eventually(PATIENCE, want, || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), key).await;
        let over = matches!(v["session"]["state"].as_str(), Some("closed" | "failed"));
        (v["order"]["status"] == want && over).then_some(v)
    })
    .await
}

both!(
    wechat_happy_path_charges_once,
    nothing_taken_closes_at_zero,
    declined_confirmation_is_refused_without_charge,
    unlock_timeout_charges_nothing,
    recognition_failed_is_abnormal,
    failed_deduction_is_pending_until_paid,
    settled_orders_are_not_asked_about,
    forged_notifications_are_refused_and_counted,
    abnormal_order_resolved_then_charged,
    an_abnormal_order_is_priced_as_when_the_shopper_shopped,
    a_basket_above_the_authorised_amount_is_charged_at_most_that,
    an_unpaid_order_is_lowered_through_the_providers_modify,
    a_deduction_refused_for_the_merchants_limits_is_not_held_against_the_shopper,
    refunds_partial_full_idempotent_and_bounded,
    unpaid_shopper_blacklisted_until_paid,
    operators_edit_the_blacklist,
    alipay_purchase_paid_refunded,
    alipay_nothing_taken_and_failed_deduction,
    nothing_taken_frees_the_cabinet_before_the_provider_answers,
    a_slow_provider_holds_up_only_its_own_cabinet,
    replayed_notifications_change_nothing,
    promotions_apply_to_the_next_session,
    unlock_rejected_charges_nothing,
    sessions_and_orders_on_the_feed,
    session_start_tells_where_the_time_went,
);

/// The operator feed carries every durable session and order step, in order, for its merchant.
async fn sessions_and_orders_on_the_feed(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let (_, op2) = hub.merchant("m2").await;
    let mut ws = crate::feed::connect(&hub, &op, None).await;
    let mut other = crate::feed::connect(&hub, &op2, None).await;
    for w in [&mut ws, &mut other] {
        let snap = crate::feed::next(w, PATIENCE).await;
        assert_eq!(snap.map(|v| v["type"].clone()), Some(json!("snapshot")));
    }
    let session = visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 2}])).await;
    order_status(&hub, &op, &session, "paid").await;
    let (mut states, mut statuses) = (Vec::new(), Vec::new());
    while statuses.last().map(String::as_str) != Some("paid") {
        let v = crate::feed::next(&mut ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("feed stopped; sessions {states:?} orders {statuses:?}"));
        let text = |k: &str| v["data"][k].as_str().unwrap_or_default().to_owned();
        match v["type"].as_str() {
            Some("session") => {
                assert_eq!(text("id"), session);
                states.push(text("state"));
            }
            Some("order") => {
                assert_eq!(text("session_id"), session);
                if text("status") == "paid" {
                    assert_eq!(v["data"]["paid_fen"], 600);
                }
                statuses.push(text("status"));
            }
            _ => {}
        }
    }
    assert_eq!(states, ["confirming", "unlocking", "open", "closed"]);
    assert_eq!(statuses, ["open", "completing", "paid"]);
    assert!(
        crate::feed::next(&mut other, Duration::from_millis(200))
            .await
            .is_none(),
        "another merchant sees none of it"
    );
}

async fn replayed_notifications_change_nothing(b: Backend) {
    // No deduction check within the test: "paid" then comes from the USER_PAID notification,
    // so both notifications were sent (and are kept for redelivery) before the replay.
    let (hub, op, mut c) = shop_with(b, |s| s.payments.deduction_check_ms = 600_000).await;
    let session = visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 1}])).await;
    let before = order_status(&hub, &op, &session, "paid").await;
    let (s, r) = hub
        .post("/sim/wechatpay-redeliver", ADMIN_KEY, json!({}))
        .await;
    assert_eq!(
        (s, r["redelivered"].clone()),
        (200, json!(2)),
        "USER_CONFIRM and USER_PAID"
    );
    // Each notification has now come twice; whichever copy came second is the replay, and a
    // first delivery may still have been on its way when the redelivery was answered. (More than
    // two: the simulator retried a delivery the busy hub answered late, as WeChat does.)
    let replays = r#"payment_notifications_rejected_total{provider="wechat",reason="replay"}"#;
    hub.eventually(PATIENCE, "both replays refused", || async {
        (hub.metric(replays).await >= 2.0).then_some(())
    })
    .await;
    let (_, after) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
    assert_eq!(after["order"], before["order"], "a replay changes nothing");
    assert!(hub
        .metrics()
        .await
        .contains(r#"orders_total{status="paid"} 1"#));
}

async fn promotions_apply_to_the_next_session(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let (s, _) = hub
        .post("/api/v1/promotions", &op, json!({"name": "可乐八折", "window": {"type": "between", "starts_at": now - 1000, "ends_at": now + 3_600_000},
              "offer": {"type": "product_price", "rules": {"cola": {"kind": "percent_bps", "value": 8000}}}}))
        .await;
    assert_eq!(s, 201);
    let (s, _) = hub
        .post(
            "/api/v1/promotions",
            &op,
            json!({"name": "满10减1", "window": {"type": "always"},
              "offer": {"type": "spend_save", "tiers": [{"threshold_fen": 1000, "off_fen": 100}]}}),
        )
        .await;
    assert_eq!(s, 201);
    let session = visit(
        &hub,
        &op,
        &mut c,
        "u1",
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(&hub, &op, &session, "paid").await;
    // 2×300 + 650 = 1250; cola 20% off: −120; 满10减1 on 1130: −100.
    assert_eq!(v["order"]["total_fen"], 1030);
    assert_eq!(
        v["order"]["paid_fen"], 1030,
        "the provider accepted the post_discounts lines"
    );
    let names: Vec<Value> = v["order"]["priced"]["discounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("可乐八折"), json!("满10减1")]);
}

async fn unlock_rejected_charges_nothing(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let pending = start(&hub, &op, "u1", None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, false, Some("lock_jammed")).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_failed(s, &v, "unlock_rejected");
    // A failing session is stored before its order (the cabinet is free first): the order's
    // move may land a moment after the answer.
    let session = v["session"]["id"].as_str().unwrap_or_default();
    let v = order_status(&hub, &op, session, "cancelled").await;
    assert_eq!(v["order"]["paid_fen"], 0);
}

pub(crate) async fn alipay_visit(
    hub: &TestHub,
    op: &str,
    c: &mut Cabinet,
    user: &str,
    items: Value,
) -> String {
    let pending = start_on(hub, op, user, None, "alipay");
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_open(s, &v);
    assert_eq!(v["session"]["channel"], "alipay");
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    shop_visit(c, &session, items).await;
    session
}

async fn alipay_purchase_paid_refunded(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let session = alipay_visit(
        &hub,
        &op,
        &mut c,
        "a1",
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(
        (
            v["order"]["total_fen"].clone(),
            v["order"]["paid_fen"].clone()
        ),
        (json!(1250), json!(1250))
    );
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/refund"),
            &op,
            json!({"amount_fen": 300, "reason": "少拿一瓶"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (
            r["refund"]["status"].clone(),
            r["order"]["refunded_fen"].clone()
        ),
        (json!("succeeded"), json!(300))
    );
    assert!(hub
        .metrics()
        .await
        .contains(r#"payments_total{operation="pay",outcome="ok",provider="alipay"} 1"#));
}

async fn alipay_nothing_taken_and_failed_deduction(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let session = alipay_visit(&hub, &op, &mut c, "a2", json!([])).await;
    order_status(&hub, &op, &session, "closed").await;
    script_shopper(&hub, "a3", json!({"deduction": "fail"})).await;
    let session = alipay_visit(&hub, &op, &mut c, "a3", json!([{"sku": "cola", "qty": 1}])).await;
    order_status(&hub, &op, &session, "pending_payment").await;
    let (s, r) = hub.post("/sim/users/a3/pay", ADMIN_KEY, json!({})).await;
    assert_eq!((s, r["orders_paid"].clone()), (200, json!(1)));
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 300);
}

/// A shopper who took nothing leaves the cabinet free at once, however long the provider takes
/// to answer the cancel: the next shopper must not meet `cabinet_busy` meanwhile.
async fn nothing_taken_frees_the_cabinet_before_the_provider_answers(b: Backend) {
    for (channel, first, next) in [("wechat", "w1", "w2"), ("alipay", "a1", "a2")] {
        let (hub, op, mut c) = shop(b).await;
        // The cancel takes far longer than the unlock may: on a busy machine the gap still tells
        // a cabinet freed at once from one freed after the provider's answer.
        script_shopper(&hub, first, json!({"cancel_delay_ms": CANCEL_DELAY_MS})).await;
        let session = if channel == "wechat" {
            visit(&hub, &op, &mut c, first, json!([])).await
        } else {
            alipay_visit(&hub, &op, &mut c, first, json!([])).await
        };
        order_status(&hub, &op, &session, "closed").await;
        let pending = start_on(&hub, &op, next, None, channel);
        let unlock = c.expect_command("unlock", PATIENCE).await;
        assert!(
            cancel_unanswered(&hub, channel).await,
            "{channel}: the next shopper's unlock waited for the provider's cancel"
        );
        c.ack(&unlock, true, None).await;
        let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
        assert_open(s, &v);
        let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
        // The cabinet's events are applied in order: this visit's order follows the cancel.
        shop_visit(&mut c, &session, json!([])).await;
        hub.eventually(
            Duration::from_millis(CANCEL_DELAY_MS) + PATIENCE,
            "the second visit closed",
            || async {
                let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
                (v["order"]["status"] == "closed").then_some(())
            },
        )
        .await;
    }
}

/// How long the scripted provider takes to answer a cancel in the two tests below: longer than
/// the clients' 10 s timeout, so the first shopper's cancel ends (counted, as an error) some ten
/// seconds after it starts. What must not wait for it is done long before on any machine.
const CANCEL_DELAY_MS: u64 = 12_000;

/// Whether no cancel (WeChat) or close (Alipay) of a provider order has ended yet, by the count
/// of provider calls, which counts each call when it ends. Checked when something that must not
/// wait for the slow cancel has happened: had it waited, the cancel would be counted by then.
async fn cancel_unanswered(hub: &TestHub, channel: &str) -> bool {
    let operation = if channel == "alipay" {
        "close"
    } else {
        "cancel"
    };
    let mut ended = 0.0;
    for outcome in ["ok", "error"] {
        ended += hub
            .metric(&format!(
                r#"payments_total{{operation="{operation}",outcome="{outcome}",provider="{channel}"}}"#
            ))
            .await;
    }
    ended == 0.0
}

/// Session events wait on the provider (a cancel, a completion); a slow answer for one cabinet
/// must not hold up another cabinet's order.
async fn a_slow_provider_holds_up_only_its_own_cabinet(b: Backend) {
    use cabinet_hub::sessions::event_lane;
    let (hub, op, mut c) = shop(b).await;
    // A second cabinet whose events go through another lane than KM1's.
    let id = (2..100)
        .map(|n| format!("KM{n}"))
        .find(|id| event_lane(id) != event_lane("KM1"))
        .unwrap_or_default();
    let secret = hub.cabinet(ADMIN_KEY, "m1", &id).await;
    let (s, r) = hub
        .call(
            "PUT",
            &format!("/api/v1/cabinets/{id}/prices"),
            &op,
            Some(json!({"items": [{"sku": "cola", "price_fen": 300}]})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let mut c2 = Cabinet::connect(&hub, &id, &secret).await;
    c2.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, &id).await;
    script_shopper(&hub, "slow", json!({"cancel_delay_ms": CANCEL_DELAY_MS})).await;
    // KM1: nothing taken; its provider order's cancel now takes twelve seconds.
    let first = visit(&hub, &op, &mut c, "slow", json!([])).await;
    order_status(&hub, &op, &first, "closed").await;
    // The other cabinet's shopper is charged meanwhile, while KM1's cancel is still unanswered.
    let pending = start_at(&hub, &op, &id, "u2", None, "wechat");
    let unlock = c2.expect_command("unlock", PATIENCE).await;
    c2.ack(&unlock, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_open(s, &v);
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    shop_visit(&mut c2, &session, json!([{"sku": "cola", "qty": 1}])).await;
    order_status(&hub, &op, &session, "paid").await;
    assert!(
        cancel_unanswered(&hub, "wechat").await,
        "{id}'s order waited for KM1's cancel"
    );
}

/// A purchase up to the recognition: returns the session id.
pub(crate) async fn visit(
    hub: &TestHub,
    op: &str,
    c: &mut Cabinet,
    user: &str,
    items: Value,
) -> String {
    let pending = start(hub, op, user, None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_open(s, &v);
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    shop_visit(c, &session, items).await;
    session
}

/// The seeds' FAQ: a discount published for an evening, an order the cameras could not settle,
/// resolved the next morning — the shopper gets the evening's discount and list price, not
/// the morning's. (Here: a 20 % promotion whose window closes, and a list price raised, between
/// the shopping and the resolve.)
async fn an_abnormal_order_is_priced_as_when_the_shopper_shopped(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    // The window stays open well past the door's opening, however slow the machine.
    let ends = now + 8_000;
    let (s, p) = hub
        .post("/api/v1/promotions", &op, json!({"name": "晚间八折", "window": {"type": "between", "starts_at": now - 1000, "ends_at": ends},
              "offer": {"type": "product_price", "rules": {"cola": {"kind": "percent_bps", "value": 8000}}}}))
        .await;
    assert_eq!(s, 201, "{p}");
    let pending = start(&hub, &op, "u1", None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_open(s, &v);
    assert!(
        v["session"]["unlocked_at"]
            .as_i64()
            .is_some_and(|t| t < ends),
        "the shopper shopped inside the window: {v}"
    );
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "failed", "reason": "camera_blocked"}),
    )
    .await;
    let v = order_status(&hub, &op, &session, "abnormal").await;
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    // The next morning: the window has closed, the promotion is ended, cola costs more.
    let left = ends
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(left.max(0) as u64 + 100)).await;
    let id = p["id"].as_str().unwrap_or_default();
    let (s, r) = hub
        .post(&format!("/api/v1/promotions/{id}/end"), &op, json!({}))
        .await;
    assert!((200..300).contains(&s), "{r}");
    let (s, r) = hub
        .call("PUT", "/api/v1/cabinets/KM1/prices", &op, Some(json!({"items": [{"sku": "cola", "price_fen": 500}, {"sku": "chips", "price_fen": 650}]})))
        .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/resolve"),
            &op,
            json!({"items": [{"sku": "cola", "qty": 2}]}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    // 2 × 300 (the evening's price) − 20 %: 480, not 2 × 500 = 1000.
    assert_eq!(r["total_fen"], 480, "{r}");
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 480);
    // The next shopper pays today's prices.
    let next = visit(&hub, &op, &mut c, "u2", json!([{"sku": "cola", "qty": 1}])).await;
    let v = order_status(&hub, &op, &next, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 500);
}

/// The provider charges at most what the shopper authorised (WeChat: `total_amount` ≤
/// `risk_fund.amount`; Alipay: the credit order's amount). A basket above it goes to a person
/// rather than to a completion the provider refuses; resolved, it is charged the authorised
/// amount with a line saying what was let go — never an order that fails on every resolve.
async fn a_basket_above_the_authorised_amount_is_charged_at_most_that(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let (s, r) = hub
        .call(
            "PUT",
            "/api/v1/merchants/m1/payment",
            ADMIN_KEY,
            Some(json!({"risk_ceiling_fen": 1000})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    for (user, channel) in [("w1", "wechat"), ("a1", "alipay")] {
        let session = if channel == "wechat" {
            visit(
                &hub,
                &op,
                &mut c,
                user,
                json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
            )
            .await
        } else {
            alipay_visit(
                &hub,
                &op,
                &mut c,
                user,
                json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
            )
            .await
        };
        let v = order_status(&hub, &op, &session, "abnormal").await;
        assert_eq!(
            v["order"]["abnormal_reason"], "over_authorised_amount",
            "{channel}: {v}"
        );
        let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
        let (s, r) = hub
            .post(
                &format!("/api/v1/orders/{order}/resolve"),
                &op,
                json!({"items": [{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]}),
            )
            .await;
        assert_eq!(s, 200, "{channel}: {r}");
        let v = order_status(&hub, &op, &session, "paid").await;
        assert_eq!(
            (
                v["order"]["total_fen"].clone(),
                v["order"]["paid_fen"].clone()
            ),
            (json!(1000), json!(1000)),
            "{channel}: {v}"
        );
        let lines = &v["order"]["priced"]["discounts"];
        assert_eq!(
            (lines[0]["name"].clone(), lines[0]["amount_fen"].clone()),
            (json!("超出授权金额"), json!(250)),
            "{channel}: {v}"
        );
    }
}

/// An operator lowers an order the shopper has not paid yet (an appeal before payment): WeChat
/// modifies it and deducts the lower amount; raising, or touching a paid order, is refused.
async fn an_unpaid_order_is_lowered_through_the_providers_modify(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "u5", json!({"deduction": "fail"})).await;
    let session = visit(
        &hub,
        &op,
        &mut c,
        "u5",
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(&hub, &op, &session, "pending_payment").await;
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    let modify = |fen: i64| {
        let (hub, op, order) = (&hub, &op, &order);
        async move {
            hub.post(
                &format!("/api/v1/orders/{order}/modify"),
                op,
                json!({"amount_fen": fen, "reason": "少收一瓶可乐"}),
            )
            .await
        }
    };
    for bad in [1250, 5000, -1] {
        let (s, r) = modify(bad).await;
        assert_eq!(s, 400, "{bad}: {r}");
    }
    let (s, r) = modify(950).await;
    assert_eq!((s, r["total_fen"].clone()), (200, json!(950)), "{r}");
    let last = r["priced"]["discounts"]
        .as_array()
        .and_then(|d| d.last())
        .cloned();
    assert_eq!(
        last.map(|l| (l["name"].clone(), l["amount_fen"].clone())),
        Some((json!("订单调减"), json!(300)))
    );
    let (s, r) = hub.post("/sim/users/u5/pay", ADMIN_KEY, json!({})).await;
    assert_eq!((s, r["orders_paid"].clone()), (200, json!(1)), "{r}");
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(
        v["order"]["paid_fen"], 950,
        "WeChat deducted the lowered amount: {v}"
    );
    let (s, r) = modify(900).await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (409, json!("order_not_unpaid")),
        "{r}"
    );
}

/// A deduction refused because the merchant reached its own collection limit (Alipay
/// `ACQ.BEYOND_PAY_RESTRICTION`, a 小微 merchant's daily cap) is the merchant's, not the
/// shopper's: the order waits for collection, says why, and the shopper is not blacklisted
/// (here one unpaid order blacklists); a shortfall of the shopper's own still is.
async fn a_deduction_refused_for_the_merchants_limits_is_not_held_against_the_shopper(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "a7", json!({"deduction": "merchant_limit"})).await;
    let session = alipay_visit(&hub, &op, &mut c, "a7", json!([{"sku": "chips", "qty": 1}])).await;
    let v = order_status(&hub, &op, &session, "pending_payment").await;
    assert_eq!(v["order"]["deduction_failure"], "merchant", "{v}");
    // The same shopper may shop again.
    let next = alipay_visit(&hub, &op, &mut c, "a7", json!([])).await;
    order_status(&hub, &op, &next, "closed").await;
    // The limit lifts: the collection goes through.
    script_shopper(&hub, "a7", json!({"deduction": "succeed"})).await;
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 650);

    // The shopper's own shortfall: blacklisted at the next start.
    script_shopper(&hub, "a8", json!({"deduction": "fail"})).await;
    let owed = alipay_visit(&hub, &op, &mut c, "a8", json!([{"sku": "chips", "qty": 1}])).await;
    let v = order_status(&hub, &op, &owed, "pending_payment").await;
    assert_eq!(v["order"]["deduction_failure"], "shopper", "{v}");
    let (s, r) = hub
        .post(
            "/api/v1/sessions",
            &op,
            json!({"cabinet_id": "KM1", "user_id": "a8", "channel": "alipay", "mode": "purchase"}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("user_blacklisted")),
        "{r}"
    );
}

async fn abnormal_order_resolved_then_charged(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let pending = start(&hub, &op, "u1", None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (_, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "failed", "reason": "camera_blocked"}),
    )
    .await;
    let v = order_status(&hub, &op, &session, "abnormal").await;
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    let (_, list) = hub.get("/api/v1/orders?status=abnormal", &op).await;
    assert_eq!(list["count"], 1, "listed for operators");
    // A basket that used to wrap to zero is refused, naming the line; the order stays abnormal.
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/resolve"),
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
        "{r}"
    );
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/resolve"),
            &op,
            json!({"items": [{"sku": "cola", "qty": 1}]}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 300);
    let (s, r) = hub
        .post(
            &format!("/api/v1/orders/{order}/resolve"),
            &op,
            json!({"items": []}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (409, json!("order_not_abnormal"))
    );
}

async fn refunds_partial_full_idempotent_and_bounded(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let session = visit(
        &hub,
        &op,
        &mut c,
        "u1",
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(&hub, &op, &session, "paid").await;
    let order = v["order"]["id"].as_str().unwrap_or_default().to_owned();
    let refund = |amount: i64, key: &'static str| {
        let (client, url, op) = (
            hub.client.clone(),
            hub.url(&format!("/api/v1/orders/{order}/refund")),
            op.clone(),
        );
        async move {
            let r = client
                .post(url)
                .bearer_auth(op)
                .header("Idempotency-Key", key)
                .json(&json!({"amount_fen": amount, "reason": "少拿一瓶"}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, first) = refund(300, "k1").await;
    assert_eq!(s, 200, "{first}");
    // Taken by WeChat (PROCESSING): reserved, not yet counted as refunded.
    assert_eq!(first["refund"]["status"], "processing", "{first}");
    assert_eq!(first["order"]["refunded_fen"], 0, "{first}");
    let settled = |want_refunded: i64, want_status: &'static str| {
        let (hub, op, order) = (&hub, &op, &order);
        async move {
            hub.eventually(PATIENCE, "refunds settled", || async {
                let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), op).await;
                let all_done = o["refunds"]
                    .as_array()
                    .is_some_and(|r| r.iter().all(|r| r["status"] == "succeeded"));
                (all_done && o["refunded_fen"] == want_refunded && o["status"] == want_status)
                    .then_some(o)
            })
            .await
        }
    };
    settled(300, "paid").await;
    let (_, again) = refund(300, "k1").await;
    assert_eq!(
        again["refund"]["id"], first["refund"]["id"],
        "same key, same refund"
    );
    assert_eq!(again["order"]["refunded_fen"], 300);
    let (s, over) = refund(1000, "k2").await;
    assert_eq!(
        (s, over["error"]["code"].clone()),
        (422, json!("refund_exceeds_paid"))
    );
    let (s, rest) = refund(950, "k3").await;
    assert_eq!(s, 200, "{rest}");
    // In flight, the rest is reserved: nothing more can be asked for meanwhile.
    let (s, more) = refund(1, "k4").await;
    assert_eq!(
        (s, more["error"]["code"].clone()),
        (422, json!("refund_exceeds_paid")),
        "{more}"
    );
    let o = settled(1250, "refunded").await;
    assert_eq!(o["refunds"].as_array().map(Vec::len), Some(2));
    assert_eq!(o["paid_fen"], 1250);
}

async fn unpaid_shopper_blacklisted_until_paid(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "u4", json!({"deduction": "fail"})).await;
    let session = visit(&hub, &op, &mut c, "u4", json!([{"sku": "chips", "qty": 1}])).await;
    order_status(&hub, &op, &session, "pending_payment").await;
    // Collection is retried while it is unpaid.
    hub.eventually(3 * SEC, "collection retried", || async {
        hub.metrics()
            .await
            .contains(r#"payments_total{operation="collect",outcome="ok",provider="wechat"}"#)
            .then_some(())
    })
    .await;
    let (s, r) = start(&hub, &op, "u4", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("user_blacklisted")),
        "{r}"
    );
    let (_, list) = hub.get("/api/v1/blacklist", &op).await;
    assert_eq!(
        (list["count"].clone(), list["items"][0]["user_id"].clone()),
        (json!(1), json!("u4"))
    );
    script_shopper(&hub, "u4", json!({"deduction": "succeed"})).await;
    hub.post("/sim/users/u4/pay", ADMIN_KEY, json!({})).await;
    order_status(&hub, &op, &session, "paid").await;
    hub.eventually(SEC, "off the blacklist", || async {
        (hub.get("/api/v1/blacklist", &op).await.1["count"] == 0).then_some(())
    })
    .await;
    visit(&hub, &op, &mut c, "u4", json!([])).await;
}

async fn operators_edit_the_blacklist(b: Backend) {
    let (hub, op, _c) = shop_with(b, short_confirmation).await;
    let (s, r) = hub
        .post(
            "/api/v1/blacklist",
            &op,
            json!({"user_id": "u9", "reason": "fraud"}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let (s, r) = start(&hub, &op, "u9", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (422, json!("user_blacklisted"))
    );
    let (s, _) = hub.call("DELETE", "/api/v1/blacklist/u9", &op, None).await;
    assert_eq!(s, 204);
    script_shopper(&hub, "u9", json!({"confirm": false})).await;
    let (s, r) = start(&hub, &op, "u9", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_failed(s, &r, "payment_declined");
    assert_eq!(
        hub.call("DELETE", "/api/v1/blacklist/u9", &op, None)
            .await
            .0,
        404
    );
}

async fn wechat_happy_path_charges_once(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let (signed, signing) = (
        hub.metric("payment_signatures_total").await,
        hub.metric("payment_signing_cpu_seconds_total").await,
    );
    let pending = start(&hub, &op, "u1", Some("idem-1"));
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    assert_eq!(unlock["mode"], "purchase");
    c.ack(&unlock, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_open(s, &v);
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(v["session"]["state"], "open");
    assert_eq!(unlock["session_id"], session.as_str());

    // The same request again: the same answer, no second session.
    let (s, again) = start(&hub, &op, "u1", Some("idem-1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The first answer was the 202 with the shopper's confirmation: that is the answer again.
    assert_eq!((s, again["session"]["id"].clone()), (202, json!(session)));

    shop_visit(
        &mut c,
        &session,
        json!([{"sku": "cola", "qty": 2}, {"sku": "chips", "qty": 1}]),
    )
    .await;
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["total_fen"], 1250);
    assert_eq!(v["order"]["paid_fen"], 1250);
    assert!(v["order"]["transaction_id"].is_string());
    assert_eq!(v["session"]["state"], "closed");
    let (_, orders) = hub.get("/api/v1/orders?status=paid", &op).await;
    assert_eq!(orders["count"], 1);
    // Filterable by time: [from, to) in RFC 3339.
    let (_, later) = hub
        .get("/api/v1/orders?from=2999-01-01T00:00:00Z", &op)
        .await;
    assert_eq!(later["count"], 0);
    let (_, window) = hub
        .get(
            "/api/v1/orders?from=2000-01-01T00:00:00Z&to=2999-01-01T00:00:00Z&status=paid",
            &op,
        )
        .await;
    assert_eq!(window["count"], 1);
    let (s, bad) = hub.get("/api/v1/orders?from=yesterday", &op).await;
    assert_eq!(
        (s, bad["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );
    assert!(hub
        .metrics()
        .await
        .contains(r#"sessions_total{mode="purchase",outcome="unlocked"} 1"#));
    assert!(hub
        .metrics()
        .await
        .contains(r#"orders_total{status="paid"} 1"#));
    // The hub signed two requests (the order's creation and its completion) and counted their
    // CPU; the simulator's signatures of its answers and notifications, which WeChat's
    // servers make in the field, are not the hub's.
    assert_eq!(hub.metric("payment_signatures_total").await - signed, 2.0);
    assert!(hub.metric("payment_signing_cpu_seconds_total").await > signing);
    // A second session may start now.
    assert_eq!(hub.cabinet_state(&op, "KM1").await["session"], Value::Null);
}

async fn nothing_taken_closes_at_zero(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let pending = start(&hub, &op, "u1", None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (_, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    shop_visit(&mut c, &session, json!([])).await;
    let v = order_status(&hub, &op, &session, "closed").await;
    assert_eq!(
        (
            v["order"]["total_fen"].clone(),
            v["order"]["paid_fen"].clone()
        ),
        (json!(0), json!(0))
    );
}

/// A shopper who never confirms is refused when the confirmation deadline passes: short for the
/// tests of that refusal, which have no shopper who does confirm.
fn short_confirmation(s: &mut cabinet_hub::config::Settings) {
    s.payments.confirm_timeout_ms = 1_500;
}

async fn declined_confirmation_is_refused_without_charge(b: Backend) {
    let (hub, op, mut c) = shop_with(b, short_confirmation).await;
    let (s, _) = hub
        .call(
            "PUT",
            "/sim/users/u2",
            ADMIN_KEY,
            Some(json!({"confirm": false})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = start(&hub, &op, "u2", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_failed(s, &v, "payment_declined");
    // The cabinet was never unlocked.
    assert!(tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Some(crate::harness::Got::Command(cmd)) = c.rx.recv().await {
                if cmd["type"] == "unlock" {
                    return;
                }
            }
        }
    })
    .await
    .is_err());
    let (_, orders) = hub.get("/api/v1/orders?status=cancelled", &op).await;
    assert_eq!(orders["count"], 1);
}

async fn unlock_timeout_charges_nothing(b: Backend) {
    // The unlock deadline is what is tested: short here, where nothing is acked at all.
    let (hub, op, mut c) = shop_with(b, |s| s.cabinet.unlock_ack_timeout_ms = 1_000).await;
    let pending = start(&hub, &op, "u1", None);
    c.expect_command("unlock", 3 * SEC).await; // and never ack it
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_failed(s, &v, "unlock_timeout");
    hub.eventually(SEC, "unlock_no_ack", || {
        hub.active_alert(&op, "KM1", "unlock_no_ack")
    })
    .await;
    let session = v["session"]["id"].as_str().unwrap_or_default();
    let v = order_status(&hub, &op, session, "cancelled").await;
    assert_eq!(v["order"]["paid_fen"], 0);
}

async fn recognition_failed_is_abnormal(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let pending = start(&hub, &op, "u1", None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (_, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "failed", "reason": "camera_blocked"}),
    )
    .await;
    let v = order_status(&hub, &op, &session, "abnormal").await;
    assert_eq!(v["order"]["abnormal_reason"], "recognition_failed");
    assert_eq!(v["order"]["paid_fen"], 0);
}

async fn failed_deduction_is_pending_until_paid(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    script_shopper(&hub, "u3", json!({"confirm": true, "deduction": "fail"})).await;
    let pending = start(&hub, &op, "u3", None);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (_, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    shop_visit(&mut c, &session, json!([{"sku": "chips", "qty": 1}])).await;
    order_status(&hub, &op, &session, "pending_payment").await;
    let (s, r) = hub.post("/sim/users/u3/pay", ADMIN_KEY, json!({})).await;
    assert_eq!((s, r["orders_paid"].clone()), (200, json!(1)));
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 650);
}

/// The deduction check asks the provider only about orders no notification settled.
async fn settled_orders_are_not_asked_about(b: Backend) {
    // The check waits long enough that the notification has surely arrived, even on a starved
    // machine.
    const CHECK: Duration = Duration::from_secs(10);
    let (hub, op, mut c) = shop_with(b, |s| {
        s.payments.deduction_check_ms = CHECK.as_millis() as u64;
    })
    .await;
    let query = r#"payments_total{operation="query",outcome="ok",provider="wechat"}"#;
    let session = visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 1}])).await;
    order_status(&hub, &op, &session, "paid").await;
    // Unpaid, the same check asks (and is counted under the same name). It runs after the first
    // order's check (scheduled a visit earlier), so by the time this order is pending payment
    // the first check has run too: one query in all means the paid order was not asked about.
    script_shopper(&hub, "u3", json!({"confirm": true, "deduction": "fail"})).await;
    let session = visit(&hub, &op, &mut c, "u3", json!([{"sku": "cola", "qty": 1}])).await;
    hub.eventually(CHECK + PATIENCE, "pending_payment", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
        (v["order"]["status"] == "pending_payment").then_some(())
    })
    .await;
    let m = hub.metrics().await;
    assert!(m.contains(&format!("{query} 1")), "{m}");
}

async fn forged_notifications_are_refused_and_counted(b: Backend) {
    let (hub, _op, _c) = shop(b).await;
    let url = hub.url("/api/v1/payments/wechat/notify");
    let body = json!({"id": "EV-forged", "event_type": "PAYSCORE.USER_PAID", "resource": {"algorithm": "AEAD_AES_256_GCM", "ciphertext": "AAAA", "nonce": "123456789012", "associated_data": "payscore"}}).to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    let r = hub
        .client
        .post(&url)
        .header("Wechatpay-Timestamp", ts)
        .header("Wechatpay-Nonce", "n")
        .header("Wechatpay-Signature", "Zm9yZ2Vk")
        .header("Wechatpay-Serial", "PUB_KEY_ID_SIMULATOR")
        .body(body.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 401);
    let r = hub
        .client
        .post(&url)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 401);
    let m = hub.metrics().await;
    assert!(
        m.contains(
            r#"payment_notifications_rejected_total{provider="wechat",reason="bad_signature"} 1"#
        ),
        "{m}"
    );
    assert!(m.contains(
        r#"payment_notifications_rejected_total{provider="wechat",reason="bad_header"} 1"#
    ));
}

#[actix_rt::test]
async fn real_credentials_load_and_unconfigured_channels_are_refused() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev-keys");
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.payments.simulator = false;
        s.payments.alipay = Some(cabinet_hub::payments::alipay::AlipaySettings {
            gateway: "http://127.0.0.1:9/gateway.do".into(),
            app_id: "2021000000000001".into(),
            app_private_key_path: format!("{keys}/alipay-app.key.pem"),
            alipay_public_key_path: format!("{keys}/alipay-platform.pub.pem"),
            notify_url: "http://127.0.0.1:9/notify".into(),
            platform_pid: None,
        });
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    // No WeChat provider configured: refused, never unlocked, nothing stored as charged.
    let (s, v) = start(&hub, &op, "u1", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (422, json!("payment_declined")),
        "{v}"
    );
    // The simulator is not mounted.
    assert_eq!(
        hub.call("PUT", "/sim/users/u1", ADMIN_KEY, Some(json!({})))
            .await
            .0,
        404
    );
}

/// The answer to a session start says where its time went (`Server-Timing`): the payment
/// provider's stages apart from the hub's own; the same stages feed
/// `session_start_stage_seconds`.
async fn session_start_tells_where_the_time_went(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let (client, url, key) = (hub.client.clone(), hub.url("/api/v1/sessions"), op.clone());
    let pending = actix_rt::spawn(async move {
        let r = client
            .post(url)
            .bearer_auth(key)
            .json(&json!({"cabinet_id": "KM1", "user_id": "u1", "channel": "wechat", "mode": "purchase"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let timing = r
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (r.status().as_u16(), timing)
    });
    // The answer comes before the unlock: the shopper has yet to confirm.
    let (s, timing) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s, 202);
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&unlock, true, None).await;
    let timing = timing.unwrap_or_else(|| panic!("no Server-Timing header"));
    let stages: Vec<(String, f64)> = timing
        .split(", ")
        .map(|m| {
            let (name, dur) = m
                .split_once(";dur=")
                .unwrap_or_else(|| panic!("malformed metric {m:?} in {timing:?}"));
            let dur: f64 = dur.parse().unwrap_or_else(|e| panic!("{dur}: {e}"));
            assert!(dur >= 0.0, "{timing}");
            (name.to_owned(), dur)
        })
        .collect();
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["checks", "provider", "record"], "{timing}");
    // The rest of the start (the shopper's confirmation, the unlock) is timed in the
    // background, into the same histogram.
    let all = [
        "checks",
        "provider",
        "record",
        "confirm",
        "confirmed",
        "unlock",
    ];
    hub.eventually(PATIENCE, "every stage observed", || async {
        let m = hub.metrics().await;
        all.iter()
            .all(|stage| {
                m.contains(&format!(
                    "session_start_stage_seconds_count{{stage=\"{stage}\"}} 1"
                ))
            })
            .then_some(())
    })
    .await;
}

/// A cabinet as fast as its firmware: the door opens, closes and the recognition comes the
/// moment the unlock is acknowledged, before the caller has the start's answer.
async fn a_visit_right_after_the_ack_is_charged(b: Backend) {
    let (hub, op, mut c) = shop(b).await;
    let pending = start(&hub, &op, "u1", Some("idem-fast"));
    let unlock = c.expect_command("unlock", 3 * SEC).await;
    let session = unlock["session_id"].as_str().unwrap_or_default().to_owned();
    c.ack(&unlock, true, None).await;
    shop_visit(&mut c, &session, json!([{"sku": "cola", "qty": 1}])).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_open(s, &v);
    let v = order_status(&hub, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 300, "{v}");
}

both!(a_visit_right_after_the_ack_is_charged);
