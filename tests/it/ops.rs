//! Operations (issue 17): every door through the session checks, Idempotency-Keys bound to
//! their request, `/metrics` protection, feed and body bounds, simulators only where they
//! belong, and offline that stays true across a restart.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::both;
use crate::harness::{
    free_port, fresh_postgres, sqlite_url, stored_online, Backend, Cabinet, TestHub, ADMIN_KEY,
    PATIENCE,
};

const SEC: Duration = Duration::from_secs(1);

/// A key of `role` for merchant `m`.
async fn key(hub: &TestHub, merchant_admin: &str, m: &str, role: &str) -> String {
    let (s, b) = hub
        .post(
            "/api/v1/api-keys",
            merchant_admin,
            json!({"merchant_id": m, "role": role}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    b["key"].as_str().unwrap_or_default().to_owned()
}

/// A POST in the background (it may wait for the cabinet's ack).
fn post_later(
    hub: &TestHub,
    path: &str,
    key: &str,
    body: Value,
    idem: Option<&str>,
) -> actix_rt::task::JoinHandle<(u16, Value)> {
    let client = hub.client.clone();
    let url = hub.url(path);
    let (key, idem) = (key.to_owned(), idem.map(str::to_owned));
    actix_rt::spawn(async move {
        let mut rb = client.post(url).bearer_auth(key).json(&body);
        if let Some(k) = idem {
            rb = rb.header("Idempotency-Key", k);
        }
        let r = rb.send().await.unwrap_or_else(|e| panic!("{e}"));
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    })
}

async fn done(h: actix_rt::task::JoinHandle<(u16, Value)>) -> (u16, Value) {
    h.await.unwrap_or_else(|e| panic!("{e}"))
}

fn unlock_body() -> Value {
    json!({"type": "unlock", "mode": "restock"})
}

fn code(v: &Value) -> Value {
    v["error"]["code"].clone()
}

/// Sends a lock-down command and acks it.
async fn lockdown(hub: &TestHub, op: &str, c: &mut Cabinet, on: bool) {
    let pending = post_later(
        hub,
        "/api/v1/cabinets/KM1/commands",
        op,
        json!({"type": "lockdown", "on": on}),
        None,
    );
    let cmd = c.expect_command("lockdown", 3 * SEC).await;
    c.ack(&cmd, true, None).await;
    let (s, v) = done(pending).await;
    assert_eq!((s, v["outcome"].clone()), (200, json!("ok")), "{v}");
    hub.eventually(5 * SEC, "lock-down state", || async {
        (hub.cabinet_state(op, "KM1").await["locked_down"] == on).then_some(())
    })
    .await;
}

both!(
    manual_unlock_is_a_recorded_restock_session,
    idempotency_key_is_bound_to_the_request,
);

async fn manual_unlock_is_a_recorded_restock_session(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let restocker = key(&hub, &ma, "m1", "restocker").await;
    let (s, v) = hub
        .post(
            "/api/v1/cabinets",
            &ma,
            json!({"id": "KM2", "merchant_id": "m1"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = hub
        .post("/api/v1/cabinets/KM2/commands", &restocker, unlock_body())
        .await;
    assert_eq!((s, code(&v)), (409, json!("cabinet_not_active")), "{v}");
    // Never connected since the start: refused as a session start is, nothing sent.
    let (s, v) = hub
        .post("/api/v1/cabinets/KM1/commands", &restocker, unlock_body())
        .await;
    assert_eq!((s, code(&v)), (503, json!("cabinet_offline")), "{v}");

    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    // Locked down: the manual unlock used to go straight to the cabinet; now it is refused.
    lockdown(&hub, &op, &mut c, true).await;
    let (s, v) = hub
        .post("/api/v1/cabinets/KM1/commands", &restocker, unlock_body())
        .await;
    assert_eq!((s, code(&v)), (409, json!("cabinet_faulted")), "{v}");
    lockdown(&hub, &op, &mut c, false).await;

    // Allowed: a restock session, answered like a session start once the cabinet acked.
    let pending = post_later(
        &hub,
        "/api/v1/cabinets/KM1/commands",
        &restocker,
        unlock_body(),
        None,
    );
    let cmd = c.expect_command("unlock", 3 * SEC).await;
    assert_eq!(cmd["mode"], "restock");
    c.ack(&cmd, true, None).await;
    let (s, v) = done(pending).await;
    assert_eq!(s, 201, "{v}");
    let id = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        json!(id),
        cmd["session_id"],
        "the cabinet unlocked for this session"
    );
    assert_eq!(
        (v["session"]["mode"].clone(), v["session"]["state"].clone()),
        (json!("restock"), json!("open")),
        "{v}"
    );
    // Recorded: visible like any session, under the restocker's key.
    let (s, got) = hub.get(&format!("/api/v1/sessions/{id}"), &op).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["session"]["mode"], "restock");
    assert!(
        got["session"]["user_id"]
            .as_str()
            .is_some_and(|u| u.starts_with("k_")),
        "{got}"
    );
    // A second door while this one is open: busy, as a session start would be.
    let (s, v) = hub
        .post("/api/v1/cabinets/KM1/commands", &restocker, unlock_body())
        .await;
    assert_eq!((s, code(&v)), (409, json!("cabinet_busy")), "{v}");
    // The hub names the session.
    let (s, _) = hub
        .post(
            "/api/v1/cabinets/KM1/commands",
            &restocker,
            json!({"type": "unlock", "mode": "restock", "session_id": "mine"}),
        )
        .await;
    assert_eq!(s, 400);
}

async fn idempotency_key_is_bound_to_the_request(b: Backend) {
    let (hub, op, mut c) = crate::purchase::shop(b).await;
    let restock = |user: &str| json!({"cabinet_id": "KM1", "user_id": user, "mode": "restock"});
    let pending = post_later(&hub, "/api/v1/sessions", &op, restock("r1"), Some("k1"));
    let cmd = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&cmd, true, None).await;
    let (s, first) = done(pending).await;
    assert_eq!(s, 201, "{first}");
    // The same request again: the first answer (no second door).
    let (s, again) = done(post_later(
        &hub,
        "/api/v1/sessions",
        &op,
        restock("r1"),
        Some("k1"),
    ))
    .await;
    assert_eq!((s, &again), (201, &first));
    // The same key with another body, or on another path: refused, not the first answer.
    let (s, v) = done(post_later(
        &hub,
        "/api/v1/sessions",
        &op,
        restock("r2"),
        Some("k1"),
    ))
    .await;
    assert_eq!((s, code(&v)), (422, json!("idempotency_key_reused")), "{v}");
    let (s, v) = done(post_later(
        &hub,
        "/api/v1/cabinets/KM1/commands",
        &op,
        unlock_body(),
        Some("k1"),
    ))
    .await;
    assert_eq!((s, code(&v)), (422, json!("idempotency_key_reused")), "{v}");
    // Finish the restock so that a purchase can follow.
    let session = first["session"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "stock": [{"sku": "cola", "qty": 5}]}),
    )
    .await;
    hub.eventually(5 * SEC, "restock closed", || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
        (v["session"]["state"] == "closed").then_some(())
    })
    .await;

    // Refunds: the same key with another amount is refused too.
    let pending = crate::purchase::start(&hub, &op, "u1", None);
    let cmd = c.expect_command("unlock", 3 * SEC).await;
    c.ack(&cmd, true, None).await;
    let (s, v) = done(pending).await;
    assert_eq!(
        (s, v["session"]["state"].as_str()),
        (202, Some("open")),
        "{v}"
    );
    let session = v["session"]["id"].as_str().unwrap_or_default().to_owned();
    c.event("door_opened").await;
    c.event("door_closed").await;
    c.event("lock_locked").await;
    c.publish(
        "recognition",
        json!({"session_id": session, "status": "ok", "items": [{"sku": "chips", "qty": 1}]}),
    )
    .await;
    let order = hub
        .eventually(10 * SEC, "paid", || async {
            let (_, v) = hub.get(&format!("/api/v1/sessions/{session}"), &op).await;
            (v["order"]["status"] == "paid").then(|| v["order"]["id"].as_str().map(str::to_owned))
        })
        .await
        .unwrap_or_default();
    let refund = format!("/api/v1/orders/{order}/refund");
    let body = |fen: i64| json!({"amount_fen": fen, "reason": "少拿一瓶"});
    let (s, r1) = done(post_later(&hub, &refund, &op, body(100), Some("rk"))).await;
    assert_eq!(s, 200, "{r1}");
    let (s, r2) = done(post_later(&hub, &refund, &op, body(100), Some("rk"))).await;
    assert_eq!((s, &r2["refund"]["id"]), (200, &r1["refund"]["id"]));
    let (s, v) = done(post_later(&hub, &refund, &op, body(200), Some("rk"))).await;
    assert_eq!((s, code(&v)), (422, json!("idempotency_key_reused")), "{v}");
    // Counted as refunded once WeChat says the refund succeeded.
    hub.eventually(5 * SEC, "refund succeeded", || async {
        let (_, o) = hub.get(&format!("/api/v1/orders/{order}"), &op).await;
        (o["refunded_fen"] == 100).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn metrics_token_and_own_address() {
    let token = "metrics-token-0123456789";
    let port = free_port();
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.metrics.token = Some(token.into());
        s.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    })
    .await;
    let get = |url: String, bearer: Option<&'static str>| {
        let client = hub.client.clone();
        async move {
            let mut rb = client.get(url);
            if let Some(t) = bearer {
                rb = rb.bearer_auth(t);
            }
            let r = rb.send().await.unwrap_or_else(|e| panic!("{e}"));
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    // Not on the main listener, even with the token.
    let (s, _) = get(hub.url("/metrics"), Some(token)).await;
    assert_eq!(s, 404);
    let own = format!("http://127.0.0.1:{port}/metrics");
    let (s, _) = get(own.clone(), None).await;
    assert_eq!(s, 401);
    let (s, _) = get(own.clone(), Some("metrics-token-wrong-0000")).await;
    assert_eq!(s, 401);
    let (s, body) = get(own.clone(), Some(token)).await;
    assert_eq!(s, 200);
    assert!(body.contains("cabinets_online"), "{body}");
    // Only /metrics there: the API is not.
    let (s, _) = get(format!("http://127.0.0.1:{port}/api/v1/me"), Some(token)).await;
    assert_eq!(s, 404);

    // A token without an address of its own: the main listener asks for it.
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.metrics.token = Some(token.into());
    })
    .await;
    let (s, _) = get(hub.url("/metrics"), None).await;
    assert_eq!(s, 401);
    let (s, body) = get(hub.url("/metrics"), Some(token)).await;
    assert_eq!(s, 200);
    assert!(body.contains("cabinets_online"), "{body}");
}

/// A WebSocket handshake on the feed with `key` in the header: the socket, or the refusal's
/// status and body.
async fn feed(hub: &TestHub, key: &str) -> Result<crate::feed::Ws, (u16, Value)> {
    let mut req = format!("ws://{}/ws", hub.http)
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {key}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((r.status().as_u16(), body))
        }
        Err(e) => panic!("ws: {e}"),
    }
}

#[actix_rt::test]
async fn feed_sockets_are_capped_per_key_and_per_node() {
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.feed.max_sockets = 3;
        s.feed.max_sockets_per_key = 2;
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let viewer = key(&hub, &ma, "m1", "viewer").await;
    let a1 = feed(&hub, &op).await;
    let a2 = feed(&hub, &op).await;
    assert!(a1.is_ok() && a2.is_ok());
    let refused = feed(&hub, &op).await.err();
    assert_eq!(
        refused.map(|(s, v)| (s, code(&v))),
        Some((429, json!("too_many_feeds"))),
        "a third socket of one key"
    );
    let v1 = feed(&hub, &viewer).await;
    assert!(v1.is_ok(), "another key still gets one");
    let refused = feed(&hub, &ma).await.err();
    assert_eq!(
        refused.map(|(s, v)| (s, code(&v))),
        Some((429, json!("too_many_feeds"))),
        "the node's cap"
    );
    // A closed socket frees its slot.
    drop(a1);
    hub.eventually(10 * SEC, "a slot freed", || async {
        match feed(&hub, &op).await {
            Ok(ws) => Some(ws),
            Err((429, _)) => None,
            Err(other) => panic!("{other:?}"),
        }
    })
    .await;
}

/// The summed value of the series whose line starts with `prefix`.
async fn metric_sum(hub: &TestHub, prefix: &str) -> f64 {
    hub.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_rt::test]
async fn a_feed_reader_that_never_reads_is_dropped_during_replay() {
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.feed.send_timeout_ms = 1_000;
        // Only the send deadline can drop it: the lag check would need this many events.
        s.feed.client_queue = 1_000_000;
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let c = Cabinet::connect(&hub, "KM1", &secret).await;
    // ~4,000 state changes (≈ 2 MB of events) in the replay buffer: far more than the socket
    // buffers of a reader that never reads.
    let n = 4_000u32;
    for i in 1..=n {
        let temp = 2.0 + f64::from(i % 600) / 100.0;
        c.publish("heartbeat", json!({"seq": i, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked",
            "temp_c": temp, "light": "on", "cameras": [{"id": 0, "ok": true}], "config_version": 1}))
            .await;
    }
    let last = 2.0 + f64::from(n % 600) / 100.0;
    hub.eventually(60 * SEC, "every heartbeat processed", || async {
        (hub.cabinet_state(&op, "KM1").await["temp_c"].as_f64() == Some(last)).then_some(())
    })
    .await;
    // The reader: a receive buffer of a few kilobytes that nobody reads, resuming from 0.
    let sock = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    sock.set_recv_buffer_size(2048)
        .unwrap_or_else(|e| panic!("{e}"));
    let stream = sock
        .connect(hub.http)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut req = format!("ws://{}/ws?since=0", hub.http)
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {op}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let (mut stuck, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .unwrap_or_else(|e| panic!("handshake: {e}"));
    // Dropped by the send deadline, counted, its task gone: it does not wait forever.
    hub.eventually(30 * SEC, "the stuck reader dropped", || async {
        (metric_sum(&hub, r#"ws_dropped_total{reason="slow"}"#).await == 1.0).then_some(())
    })
    .await;
    hub.eventually(10 * SEC, "no feed client left", || async {
        (hub.metric("ws_clients").await == 0.0).then_some(())
    })
    .await;
    // And the connection is let go: what the hub had buffered ends, the socket closes.
    let ended = tokio::time::timeout(30 * SEC, async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = stuck.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the hub kept the stuck reader's connection open"
    );
}

/// Sends a request head announcing 4,000 bytes of body, then one byte every 200 ms (200 times):
/// never idle long, never done. Answers what came back before the connection closed.
async fn trickle(hub: &TestHub, extra_headers: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(hub.http)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = format!(
        "POST /api/v1/merchants HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
         {extra_headers}Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n{{"
    );
    conn.write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut rd, mut wr) = conn.into_split();
    let trickle = actix_rt::spawn(async move {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    // The trickle goes on for 40 s at least: a close well before that is the body deadline's,
    // however slow the machine.
    let read = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut answer)).await;
    trickle.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(read.is_ok(), "the connection was not closed; got {text:?}");
    text
}

#[actix_rt::test]
async fn a_trickled_body_is_cut_with_408() {
    let hub = TestHub::start_with(Backend::Sqlite, |s| s.http.body_timeout_ms = 1_000).await;
    // Plainly, and dressed as an upgrade (only the feed's WebSocket route is exempt).
    for extra in ["", "Connection: Upgrade\r\nUpgrade: websocket\r\n"] {
        let text = trickle(&hub, extra).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{extra:?}: {text}");
        assert!(text.contains("request_timeout"), "{text}");
    }
    // A body that arrives in time is served as before.
    let (s, v) = hub
        .post(
            "/api/v1/merchants",
            ADMIN_KEY,
            json!({"id": "m9", "name": "M9", "commission_bps": 100}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
}

fn dev_keys(file: &str) -> String {
    format!("{}/config/dev-keys/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// An Alipay notification signed with `key_pem`.
fn alipay_notice(key_pem: &str, id: &str) -> BTreeMap<String, String> {
    let mut p: BTreeMap<String, String> = [
        ("notify_id", id),
        ("notify_type", "trade_status_sync"),
        ("notify_time", "2026-12-06 12:00:00"),
        ("app_id", "2021000000000001"),
        ("charset", "utf-8"),
        ("version", "1.0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let signer = cabinet_hub::payments::crypto::RsaSigner::from_pem(key_pem)
        .unwrap_or_else(|e| panic!("{e}"));
    let content = cabinet_hub::payments::alipay::crypto::notify_sign_content(&p);
    let sign = signer
        .sign(content.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    p.insert("sign".into(), sign);
    p.insert("sign_type".into(), "RSA2".into());
    p
}

#[actix_rt::test]
async fn simulators_only_where_they_belong() {
    // Real credentials whose Alipay key is not the simulator's.
    let testdata = concat!(env!("CARGO_MANIFEST_DIR"), "/src/payments/testdata");
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.payments.simulator = false;
        s.payments.alipay = Some(cabinet_hub::payments::alipay::AlipaySettings {
            gateway: "http://127.0.0.1:9/gateway.do".into(),
            app_id: "2021000000000001".into(),
            app_private_key_path: dev_keys("alipay-app.key.pem"),
            alipay_public_key_path: format!("{testdata}/merchant_pub.pem"),
            notify_url: "http://127.0.0.1:9/notify".into(),
            platform_pid: None,
        });
    })
    .await;
    // No /sim route, and none in the document.
    for (m, p) in [
        ("PUT", "/sim/users/u1"),
        ("POST", "/sim/users/u1/pay"),
        ("POST", "/sim/wechatpay-redeliver"),
    ] {
        assert_eq!(
            hub.call(m, p, ADMIN_KEY, Some(json!({}))).await.0,
            404,
            "{m} {p}"
        );
    }
    let (s, doc) = hub.get("/api/openapi.json", ADMIN_KEY).await;
    assert_eq!(s, 200);
    let paths: Vec<String> = doc["paths"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    assert!(paths.iter().any(|p| p == "/api/v1/sessions"), "{paths:?}");
    assert!(!paths.iter().any(|p| p.starts_with("/sim")), "{paths:?}");
    // A notification signed with the simulator's development key is refused; one signed with
    // the configured key is taken.
    let notify = |params: BTreeMap<String, String>| {
        let (client, url) = (
            hub.client.clone(),
            hub.url("/api/v1/payments/alipay/notify"),
        );
        async move {
            let r = client
                .post(url)
                .form(&params)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let dev_key = std::fs::read_to_string(dev_keys("alipay-platform.key.pem"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, body) = notify(alipay_notice(&dev_key, "n-dev")).await;
    assert_eq!((s, body.as_str()), (400, "fail: bad_signature"));
    let real_key = std::fs::read_to_string(format!("{testdata}/merchant_key.pem"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (s, body) = notify(alipay_notice(&real_key, "n-real")).await;
    assert_eq!((s, body.as_str()), (200, "success"));

    // Simulators on a public address: refused by name, unless asked for by name.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut s = crate::harness::test_settings(dir.path());
    s.http.listen = "0.0.0.0:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let err = cabinet_hub::Application::build(s.clone())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_else(|| panic!("a public simulator started"));
    assert!(err.contains("HUB__PAYMENTS__SIMULATOR"), "{err}");
    s.payments.simulator_public = true;
    let app = cabinet_hub::Application::build(s.clone())
        .await
        .unwrap_or_else(|e| panic!("with simulator_public: {e:#}"));
    assert!(app.http_addr().ip().is_unspecified());
    drop(app);

    // Simulators left on beside real credentials: refused, not a silent stand-in.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut s = crate::harness::test_settings(dir.path());
    s.payments.alipay = Some(cabinet_hub::payments::alipay::AlipaySettings {
        gateway: "http://127.0.0.1:9/gateway.do".into(),
        app_id: "2021000000000001".into(),
        app_private_key_path: dev_keys("alipay-app.key.pem"),
        alipay_public_key_path: format!("{testdata}/merchant_pub.pem"),
        notify_url: "http://127.0.0.1:9/notify".into(),
        platform_pid: None,
    });
    let err = cabinet_hub::Application::build(s)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_else(|| panic!("simulators started beside real credentials"));
    assert!(err.contains("real provider credentials"), "{err}");
}

/// The real binary, for restarts on the same data.
struct Node {
    child: Child,
    http: u16,
    mqtt: u16,
    data: std::path::PathBuf,
    db: Option<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .env("HUB__CABINET__HEARTBEAT_S", "2")
        .env("HUB__CABINET__MISSED_HEARTBEATS", "2")
        // An unlock nobody acks stays in flight long enough to kill the hub under it, however
        // slowly the test gets there.
        .env("HUB__CABINET__UNLOCK_ACK_TIMEOUT_MS", "120000")
        .env("HUB__CABINET__INITIAL_SERVICE_DAYS", "365")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(url) = db {
        c.env("HUB__DATABASE__URL", url);
    }
    c.spawn().unwrap_or_else(|e| panic!("{e}"))
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
            assert!(start.elapsed() < Duration::from_secs(60), "hub not ready");
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

    /// Waits until the database holds cabinet `id` as online.
    async fn stored_online(&self, id: &str) {
        let url = self.db.clone().unwrap_or_else(|| sqlite_url(&self.data));
        let deadline = Instant::now() + PATIENCE;
        while !stored_online(&url, id).await {
            assert!(Instant::now() < deadline, "{id} not stored as online");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn hub_mqtt(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt))
    }

    fn post_later(
        &self,
        path: &str,
        body: Value,
        idem: &str,
    ) -> actix_rt::task::JoinHandle<(u16, Value)> {
        let url = format!("http://127.0.0.1:{}{path}", self.http);
        let idem = idem.to_owned();
        actix_rt::spawn(async move {
            match reqwest::Client::new()
                .post(url)
                .bearer_auth(ADMIN_KEY)
                .header("Idempotency-Key", idem)
                .json(&body)
                .send()
                .await
            {
                Ok(r) => {
                    let s = r.status().as_u16();
                    (s, r.json().await.unwrap_or(Value::Null))
                }
                // The hub was killed under it.
                Err(_) => (0, Value::Null),
            }
        })
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
}

/// Connects a cabinet as a real client of the node, online with a heartbeat.
async fn cabinet_on(node: &Node, id: &str, secret: &str) -> Cabinet {
    let mut c = Cabinet::try_connect(crate::harness::options(node.hub_mqtt(), id, secret))
        .await
        .unwrap_or_else(|e| panic!("connect {id}: {e}"));
    c.subscribe_commands().await;
    c.publish("status", json!({"online": true, "boot_id": "b1", "fw": "2.4.1", "model": "KM-400", "config_version": 1, "boot": "power_on"})).await;
    c.heartbeat("closed", "locked", true, 1).await;
    c
}

both!(offline_is_true_after_a_restart);

/// The hub is killed while two cabinets are online and a keyed unlock is in flight. After the
/// restart, the cabinet that does not come back is offline with its `cabinet_offline` alert
/// (after heartbeat × missed, 4 s here); the one that comes back is online with none; and the
/// key whose request died with the first process is reclaimed, not "in progress" for ever.
async fn offline_is_true_after_a_restart(b: Backend) {
    let db = match b {
        Backend::Sqlite => None,
        Backend::Postgres => Some(fresh_postgres().await),
    };
    let mut node = Node::start(db).await;
    let (s, v) = node
        .call(
            "POST",
            "/api/v1/merchants",
            Some(json!({"id": "m1", "name": "M1", "commission_bps": 500})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let mut secrets = BTreeMap::new();
    for id in ["KMA", "KMB"] {
        let (s, v) = node
            .call(
                "POST",
                "/api/v1/cabinets",
                Some(json!({"id": id, "merchant_id": "m1"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        secrets.insert(id, v["secret"].as_str().unwrap_or_default().to_owned());
        let (s, v) = node
            .call("POST", &format!("/api/v1/cabinets/{id}/activate"), None)
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let mut gone = cabinet_on(&node, "KMA", &secrets["KMA"]).await;
    let back = cabinet_on(&node, "KMB", &secrets["KMB"]).await;
    // Both stay online, however long the steps up to the kill take on a busy machine.
    let beating = [gone.keep_beating(), back.keep_beating()];
    for id in ["KMA", "KMB"] {
        let deadline = Instant::now() + PATIENCE;
        while node
            .call("GET", &format!("/api/v1/cabinets/{id}"), None)
            .await
            .1["online"]
            != true
        {
            assert!(Instant::now() < deadline, "{id} not online");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A keyed restock unlock that the cabinet never acks: the hub dies under it.
    let body = json!({"cabinet_id": "KMA", "user_id": "r1", "mode": "restock"});
    let pending = node.post_later("/api/v1/sessions", body.clone(), "k-crash");
    gone.expect_command("unlock", 5 * SEC).await;
    // The online state is written to storage behind the live state: the restart starts from it.
    for id in ["KMA", "KMB"] {
        node.stored_online(id).await;
    }
    node.kill9();
    let _ = pending.await;
    for b in beating {
        b.abort();
    }
    gone.cut();
    back.cut();

    node.restart().await;
    let restarted = Instant::now();
    // KMB comes back (and stays, beating); KMA does not.
    let back = cabinet_on(&node, "KMB", &secrets["KMB"]).await;
    let beating = back.keep_beating();
    // The 4 s window, and room for a busy machine: the deadline only tells "never".
    let deadline = restarted + 4 * SEC + PATIENCE;
    loop {
        let (_, v) = node
            .call("GET", "/api/v1/alerts?active=true&cabinet_id=KMA", None)
            .await;
        if v["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["type"] == "cabinet_offline"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no cabinet_offline for KMA: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, kma) = node.call("GET", "/api/v1/cabinets/KMA", None).await;
    assert_eq!(kma["online"], false, "{kma}");
    assert!(
        kma["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["type"] == "cabinet_offline")),
        "the cabinet's view shows its alert: {kma}"
    );
    let (_, kmb) = node.call("GET", "/api/v1/cabinets/KMB", None).await;
    assert_eq!(kmb["online"], true, "{kmb}");
    let (_, alerts) = node
        .call("GET", "/api/v1/alerts?active=true&cabinet_id=KMB", None)
        .await;
    assert_eq!(alerts["count"], 0, "{alerts}");

    // The key of the request that died with the first process is reclaimed: the first
    // session's door was open when the hub died, so that is the answer.
    let (s, v) = node
        .post_later("/api/v1/sessions", body, "k-crash")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(code(&v), json!("request_in_progress"), "{v}");
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["session"]["mode"], "restock");

    // When KMA comes back, its alert clears as any cabinet_offline does.
    let _kma = cabinet_on(&node, "KMA", &secrets["KMA"]).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, v) = node
            .call("GET", "/api/v1/alerts?active=true&cabinet_id=KMA", None)
            .await;
        if !v["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["type"] == "cabinet_offline"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cabinet_offline not cleared: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    beating.abort();
    drop(back);
}
