//! `kill -9` of the real binary in the middle of a purchase, restart on the same data: the
//! shopper is charged exactly once.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{fresh_postgres, Cabinet, ADMIN_KEY, PATIENCE};
use crate::node::Spec;

/// The binary (tests/it/node.rs) with this file's calls, all made with the admin key.
struct Node(crate::node::Node);

impl Node {
    async fn start(db: Option<String>) -> Self {
        Self::start_with(db, Spec::new()).await
    }

    async fn start_with(db: Option<String>, spec: Spec) -> Self {
        let mut spec = spec
            .env("HUB__PAYMENTS__DEDUCTION_CHECK_MS", 300)
            .env("HUB__PAYMENTS__SIMULATOR_RETRY_SCALE", 0.01);
        if let Some(url) = db {
            spec = spec.env("HUB__DATABASE__URL", url);
        }
        Node(spec.start().await)
    }

    fn kill9(&mut self) {
        self.0.kill9();
    }

    async fn restart(&mut self) {
        self.0.restart().await;
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.0.call(method, path, ADMIN_KEY, body).await
    }

    async fn cabinet(&self, secret: &str) -> Cabinet {
        let mut c = Cabinet::try_connect(crate::harness::options(self.0.mqtt, "KM1", secret))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.subscribe_commands().await;
        c.publish(
            "status",
            json!({"online": true, "boot_id": "b1", "config_version": 1}),
        )
        .await;
        c.heartbeat("closed", "locked", true, 1).await;
        let start = Instant::now();
        while self.call("GET", "/api/v1/cabinets/KM1", None).await.1["online"] != true {
            assert!(start.elapsed() < PATIENCE, "cabinet not online");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        c
    }

    async fn order_of(&self, session: &str, want: &[&str]) -> Value {
        let start = Instant::now();
        loop {
            let (_, v) = self
                .call("GET", &format!("/api/v1/sessions/{session}"), None)
                .await;
            if want.iter().any(|w| v["order"]["status"] == *w) {
                return v["order"].clone();
            }
            assert!(
                start.elapsed() < PATIENCE,
                "order never reached {want:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The simulator's own record of the deductions: one entry per charge. Its journal holds
    /// one partial state per line; the last line naming an order has its latest state.
    fn charges(&self) -> usize {
        charges_in(self.0.data_dir())
    }
}

/// The deductions recorded in the WeChat Pay simulator's journal under `dir`.
pub(crate) fn charges_in(dir: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(dir.join("wechat-simulator.jsonl")).unwrap_or_default();
    let mut orders = serde_json::Map::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if let Some(o) = v["orders"].as_object() {
            orders.extend(o.clone());
        }
    }
    orders
        .values()
        .map(|x| {
            x["order"]["collection"]["details"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum()
}

async fn setup(n: &Node) -> String {
    n.call(
        "POST",
        "/api/v1/merchants",
        Some(json!({"id": "m1", "name": "M"})),
    )
    .await;
    let (_, c) = n
        .call(
            "POST",
            "/api/v1/cabinets",
            Some(json!({"id": "KM1", "merchant_id": "m1"})),
        )
        .await;
    n.call("POST", "/api/v1/cabinets/KM1/activate", None).await;
    n.call(
        "PUT",
        "/api/v1/products/cola",
        Some(json!({"name": "Cola", "merchant_id": "m1"})),
    )
    .await;
    n.call(
        "PUT",
        "/api/v1/cabinets/KM1/prices",
        Some(json!({"items": [{"sku": "cola", "price_fen": 300}]})),
    )
    .await;
    c["secret"].as_str().unwrap_or_default().to_owned()
}

async fn open_session(n: &Node, c: &mut Cabinet) -> String {
    let url = n.0.url("/api/v1/sessions");
    let pending = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"cabinet_id": "KM1", "user_id": "u1", "channel": "wechat", "mode": "purchase"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        )
    });
    // A purchase is answered 202 with the shopper's confirmation; the simulator's shopper
    // confirms, and the unlock follows.
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s, 202, "{v}");
    let unlock = c.expect_command("unlock", Duration::from_secs(5)).await;
    c.ack(&unlock, true, None).await;
    let id = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    let (start, mut state) = (Instant::now(), "confirming".to_owned());
    while state != "open" {
        assert!(
            start.elapsed() < PATIENCE,
            "session {id} never opened: {state}"
        );
        let path = format!("/api/v1/sessions/{id}?wait_s=5&from={state}");
        let (_, v) = n.call("GET", &path, None).await;
        state = v["session"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    v["session"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {v}"))
        .to_owned()
}

async fn killed_before_recognition(db: Option<String>) {
    let mut n = Node::start(db).await;
    let secret = setup(&n).await;
    let mut c = n.cabinet(&secret).await;
    let session = open_session(&n, &mut c).await;
    n.kill9();
    n.restart().await;
    let c = n.cabinet(&secret).await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 2}]}),
    )
    .await;
    let o = n.order_of(&session, &["paid"]).await;
    assert_eq!(
        (o["total_fen"].clone(), o["paid_fen"].clone()),
        (json!(600), json!(600))
    );
    assert_eq!(n.charges(), 1);
    n.kill9();
}

async fn killed_while_charging(db: Option<String>) {
    let mut n = Node::start(db).await;
    let secret = setup(&n).await;
    let mut c = n.cabinet(&secret).await;
    let session = open_session(&n, &mut c).await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 1}]}),
    )
    .await;
    // The order is priced and stored; the charge is in flight or done.
    n.order_of(&session, &["completing", "paid"]).await;
    n.kill9();
    n.restart().await;
    let o = n.order_of(&session, &["paid"]).await;
    assert_eq!(o["paid_fen"], 300);
    // Let any duplicate attempt surface before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(n.charges(), 1, "exactly one charge");
    n.kill9();
}

#[actix_rt::test]
async fn kill9_before_recognition_sqlite() {
    killed_before_recognition(None).await;
}

#[actix_rt::test]
async fn kill9_before_recognition_postgres() {
    killed_before_recognition(Some(fresh_postgres().await)).await;
}

#[actix_rt::test]
async fn kill9_while_charging_sqlite() {
    killed_while_charging(None).await;
}

#[actix_rt::test]
async fn kill9_while_charging_postgres() {
    killed_while_charging(Some(fresh_postgres().await)).await;
}

/// The deduction fails, so the kill lands while the order is `completing`: recovery completes
/// it again (the provider refuses a second complete; no second charge), finds it unpaid, and the
/// shopper's later payment settles it once.
async fn killed_with_completion_unsettled(db: Option<String>) {
    let mut n = Node::start(db).await;
    let secret = setup(&n).await;
    n.call("PUT", "/sim/users/u1", Some(json!({"deduction": "fail"})))
        .await;
    let mut c = n.cabinet(&secret).await;
    let session = open_session(&n, &mut c).await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 1}]}),
    )
    .await;
    let o = n
        .order_of(&session, &["completing", "pending_payment"])
        .await;
    n.kill9();
    n.restart().await;
    if o["status"] == "completing" {
        // Recovery re-completed it and found the deduction still owed.
        n.order_of(&session, &["pending_payment"]).await;
    }
    assert_eq!(n.charges(), 0, "nothing charged yet");
    n.call(
        "PUT",
        "/sim/users/u1",
        Some(json!({"deduction": "succeed"})),
    )
    .await;
    n.call("POST", "/sim/users/u1/pay", None).await;
    let o = n.order_of(&session, &["paid"]).await;
    assert_eq!(o["paid_fen"], 300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(n.charges(), 1, "exactly one charge");
    n.kill9();
}

#[actix_rt::test]
async fn kill9_with_completion_unsettled_sqlite() {
    killed_with_completion_unsettled(None).await;
}

#[actix_rt::test]
async fn kill9_with_completion_unsettled_postgres() {
    killed_with_completion_unsettled(Some(fresh_postgres().await)).await;
}

/// Killed with a session open and its recognition never coming: after the restart no actor
/// holds the session, so no cabinet timer will end it. The supervisor's sweep does (timeouts
/// short here: they are what is tested), leaving the order for a person, since the door had
/// opened; the cabinet takes the next shopper.
async fn killed_with_a_session_nobody_will_end(db: Option<String>) {
    let spec = Spec::new()
        .env("HUB__SESSION__OPEN_TIMEOUT_MS", 500)
        .env("HUB__SESSION__RECOGNITION_TIMEOUT_MS", 3_000)
        .env("HUB__CABINET__UNLOCK_ACK_TIMEOUT_MS", 2_000)
        .env("HUB__SESSION__SWEEP_INTERVAL_MS", 200);
    let mut n = Node::start_with(db, spec).await;
    let secret = setup(&n).await;
    let mut c = n.cabinet(&secret).await;
    let session = open_session(&n, &mut c).await;
    n.kill9();
    n.restart().await;
    let mut c = n.cabinet(&secret).await;
    let o = n.order_of(&session, &["abnormal"]).await;
    assert_eq!(o["abnormal_reason"], "session_timeout", "{o}");
    // The order moves first, the session just after.
    let start = Instant::now();
    let v = loop {
        let (_, v) = n
            .call("GET", &format!("/api/v1/sessions/{session}"), None)
            .await;
        // The close is stored, then who closed it: wait for both.
        if v["session"]["state"] != "open"
            && (v["session"]["state"] != "closed" || !v["session"]["closed_by"].is_null())
        {
            break v;
        }
        assert!(start.elapsed() < PATIENCE, "session never closed: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        (
            v["session"]["state"].clone(),
            v["session"]["closed_by"].clone()
        ),
        (json!("closed"), json!("supervisor")),
        "{v}"
    );
    let next = open_session(&n, &mut c).await;
    assert_ne!(next, session);
    n.kill9();
}

#[actix_rt::test]
async fn kill9_with_a_session_nobody_will_end_sqlite() {
    killed_with_a_session_nobody_will_end(None).await;
}

#[actix_rt::test]
async fn kill9_with_a_session_nobody_will_end_postgres() {
    killed_with_a_session_nobody_will_end(Some(fresh_postgres().await)).await;
}

/// `kill -9` while the shopper is still confirming (their mini-program holds the 202's
/// confirmation): after the restart the hub waits on for them, and their confirmation through
/// the mini-program still opens the door; the purchase is charged once.
async fn killed_while_the_shopper_confirms(db: Option<String>) {
    let mut n = Node::start(db).await;
    let secret = setup(&n).await;
    let c = n.cabinet(&secret).await;
    let (s, _) = n
        .call("PUT", "/sim/users/u1", Some(json!({"confirm": "manual"})))
        .await;
    assert_eq!(s, 200);
    let (s, v) = n
        .call(
            "POST",
            "/api/v1/sessions",
            Some(json!({"cabinet_id": "KM1", "user_id": "u1", "channel": "wechat", "mode": "purchase"})),
        )
        .await;
    assert_eq!(
        (s, v["session"]["state"].as_str()),
        (202, Some("confirming")),
        "{v}"
    );
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    n.kill9();
    n.restart().await;
    let mut c2 = n.cabinet(&secret).await;
    drop(c);
    let (_, still) = n
        .call("GET", &format!("/api/v1/sessions/{session}"), None)
        .await;
    assert_eq!(still["session"]["state"], "confirming", "{still}");
    let (s, r) = n
        .call(
            "POST",
            "/sim/wechatpay/confirm",
            Some(json!({"extra_data": v["confirmation"]["extra_data"]})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let unlock = c2.expect_command("unlock", PATIENCE).await;
    assert_eq!(unlock["session_id"], session.as_str());
    c2.ack(&unlock, true, None).await;
    let (start, mut state) = (Instant::now(), "confirming".to_owned());
    while state != "open" {
        assert!(
            start.elapsed() < PATIENCE,
            "session {session} never opened: {state}"
        );
        let path = format!("/api/v1/sessions/{session}?wait_s=5&from={state}");
        state = n.call("GET", &path, None).await.1["session"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    for e in ["door_opened", "door_closed", "lock_locked"] {
        c2.event(e).await;
    }
    c2.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 1}]}),
    )
    .await;
    let o = n.order_of(&session, &["paid"]).await;
    assert_eq!(o["paid_fen"], 300);
    assert_eq!(n.charges(), 1);
    n.kill9();
}

#[actix_rt::test]
async fn kill9_while_the_shopper_confirms_sqlite() {
    killed_while_the_shopper_confirms(None).await;
}

#[actix_rt::test]
async fn kill9_while_the_shopper_confirms_postgres() {
    killed_while_the_shopper_confirms(Some(fresh_postgres().await)).await;
}

/// `cabinet-hub simulate` on a free port, killed with the test.
pub(crate) struct Simulators {
    child: std::process::Child,
    data: tempfile::TempDir,
    pub(crate) addr: std::net::SocketAddr,
}

impl Drop for Simulators {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Simulators {
    pub(crate) async fn start() -> Self {
        let data = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], crate::harness::free_port()));
        let child = crate::node::command(&[
            ("HUB__PAYMENTS__SIMULATOR_RETRY_SCALE".into(), "0.01".into()),
            ("HUB__PAYMENTS__SIMULATOR_CONFIRM_MS".into(), "0".into()),
        ])
        .arg("simulate")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
        let sims = Simulators { child, data, addr };
        let start = Instant::now();
        while !reqwest::get(format!("http://{addr}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(start.elapsed() < PATIENCE, "simulate never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sims
    }
}

/// The providers' side in a process of its own (`cabinet-hub simulate`, what the load tests use
/// so that the simulators' signing is not counted as the hub's): a purchase is charged there,
/// once, and the hub serves no simulator of its own.
#[actix_rt::test]
async fn a_purchase_is_paid_through_simulators_in_their_own_process() {
    let sims = Simulators::start().await;
    let n = Node::start_with(
        None,
        Spec::new().env(
            "HUB__PAYMENTS__SIMULATOR_URL",
            format!("http://{}", sims.addr),
        ),
    )
    .await;
    let secret = setup(&n).await;
    let mut c = n.cabinet(&secret).await;
    let session = open_session(&n, &mut c).await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 2}]}),
    )
    .await;
    let o = n.order_of(&session, &["paid"]).await;
    assert_eq!(o["paid_fen"], 600);
    // Charged once, by the simulators' process, in its own journal; none kept by the hub.
    assert_eq!(charges_in(sims.data.path()), 1);
    assert_eq!(charges_in(n.0.data_dir()), 0);
    let (s, _) = n
        .call("GET", "/sim/wechatpay/v3/payscore/serviceorder", None)
        .await;
    assert_eq!(s, 404, "the hub served a simulator of its own");
}
