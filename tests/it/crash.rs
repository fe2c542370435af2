//! `kill -9` of the real binary in the middle of a purchase, restart on the same data: the
//! shopper is charged exactly once.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{free_port, fresh_postgres, Cabinet, ADMIN_KEY};

struct Node {
    child: Child,
    http: u16,
    mqtt: u16,
    data: std::path::PathBuf,
    db: Option<String>,
}

fn spawn(data: &std::path::Path, http: u16, mqtt: u16, db: Option<&str>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cabinet-hub"));
    c.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--http-listen")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{mqtt}"))
        .env_remove("HUB_ENV")
        .env("HUB__AUTH__ADMIN_KEY", ADMIN_KEY)
        .env("HUB__LOG__LEVEL", "warn")
        .env("HUB__PAYMENTS__DEDUCTION_CHECK_MS", "300")
        .env("HUB__PAYMENTS__SIMULATOR_RETRY_SCALE", "0.01")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(url) = db {
        c.env("HUB__DATABASE__URL", url);
    }
    c.spawn().unwrap_or_else(|e| panic!("{e}"))
}

/// A failed assertion must not leave the hub running after the test.
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    async fn start(db: Option<String>) -> Self {
        let data = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")).keep();
        let (http, mqtt) = (free_port(), free_port());
        let child = spawn(&data, http, mqtt, db.as_deref());
        let mut n = Node {
            child,
            http,
            mqtt,
            data,
            db,
        };
        n.wait_ready().await;
        n
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        let url = format!("http://127.0.0.1:{}/readyz", self.http);
        loop {
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("hub exited ({status}): {err}");
            }
            assert!(start.elapsed() < Duration::from_secs(30), "hub not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    async fn restart(&mut self) {
        self.child = spawn(&self.data, self.http, self.mqtt, self.db.as_deref());
        self.wait_ready().await;
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut rb = reqwest::Client::new()
            .request(m, format!("http://127.0.0.1:{}{path}", self.http))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    fn hub_mqtt(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.mqtt))
    }

    async fn cabinet(&self, secret: &str) -> Cabinet {
        let mut c = Cabinet::try_connect(crate::harness::options(self.hub_mqtt(), "KM1", secret))
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
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "cabinet not online"
            );
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
                start.elapsed() < Duration::from_secs(10),
                "order never reached {want:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The simulator's own record of the deductions: one entry per charge. Its journal holds
    /// one partial state per line; the last line naming an order has its latest state.
    fn charges(&self) -> usize {
        let text =
            std::fs::read_to_string(self.data.join("wechat-simulator.jsonl")).unwrap_or_default();
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
    let url = format!("http://127.0.0.1:{}/api/v1/sessions", n.http);
    let pending = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"cabinet_id": "KM1", "user_id": "u1", "channel": "wechat", "mode": "purchase"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        r.json::<Value>().await.unwrap_or(Value::Null)
    });
    let unlock = c.expect_command("unlock", Duration::from_secs(5)).await;
    c.ack(&unlock, true, None).await;
    let v = pending.await.unwrap_or_else(|e| panic!("{e}"));
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
