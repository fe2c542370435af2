//! API keys: listing, revocation and rotation with merchant scope; the last admin key kept;
//! revocation felt at once by requests, feed tickets and open feed sockets; keys only in the
//! `Authorization` header; no secret in logs or in `check-config`; private files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::both;
use crate::feed::{connect, next, request, Ws};
use crate::harness::{free_port, Backend, Cabinet, TestHub, ADMIN_KEY, PATIENCE};

both!(
    list_revoke_rotate_within_scope,
    the_last_admin_key_cannot_be_revoked,
    revocation_closes_the_keys_feed_sockets,
    feed_tickets_are_single_use_short_lived_and_die_with_their_key,
    keys_in_the_url_authenticate_nothing,
);

fn items(b: &Value) -> Vec<Value> {
    b["items"].as_array().cloned().unwrap_or_default()
}

fn ids(b: &Value) -> Vec<String> {
    items(b)
        .iter()
        .filter_map(|k| k["id"].as_str().map(str::to_owned))
        .collect()
}

/// The key's id: the visible prefix `chk_<idpart>_…` → `k_<idpart>`.
fn id_of(key: &str) -> String {
    let part = key
        .strip_prefix("chk_")
        .and_then(|r| r.split('_').next())
        .unwrap_or_else(|| panic!("not a chk_ key: {key}"));
    format!("k_{part}")
}

async fn create_key(hub: &TestHub, by: &str, merchant: Option<&str>, role: &str) -> String {
    let (s, b) = hub
        .post(
            "/api/v1/api-keys",
            by,
            json!({"merchant_id": merchant, "role": role}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    b["key"].as_str().unwrap_or_default().to_owned()
}

async fn me(hub: &TestHub, key: &str) -> u16 {
    hub.get("/api/v1/me", key).await.0
}

async fn list_revoke_rotate_within_scope(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma1, op1) = hub.merchant("m1").await;
    let (ma2, op2) = hub.merchant("m2").await;
    let admin_id = cabinet_hub::app::configured_admin_key_id(ADMIN_KEY);

    // The platform sees every key, the configured admin key under its stable id; never a secret.
    let (s, all) = hub.get("/api/v1/api-keys", ADMIN_KEY).await;
    assert_eq!(s, 200, "{all}");
    let mut want = vec![
        admin_id.clone(),
        id_of(&ma1),
        id_of(&op1),
        id_of(&ma2),
        id_of(&op2),
    ];
    let mut got = ids(&all);
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(all["count"], 5);
    let text = all.to_string();
    for secret in [ADMIN_KEY, &ma1, &op1, &ma2, &op2] {
        assert!(!text.contains(secret), "a key's secret is listed: {text}");
    }
    let op1_view = items(&all)
        .into_iter()
        .find(|k| k["id"] == id_of(&op1))
        .unwrap_or_default();
    assert_eq!(op1_view["role"], "operator");
    assert_eq!(op1_view["merchant_id"], "m1");
    assert!(op1_view["created_at"].is_string());
    assert_eq!(op1_view["revoked_at"], Value::Null);
    assert!(op1_view.get("key").is_none() && op1_view.get("key_hash").is_none());
    let (_, only_m2) = hub.get("/api/v1/api-keys?merchant_id=m2", ADMIN_KEY).await;
    let mut m2 = ids(&only_m2);
    m2.sort();
    let mut want_m2 = vec![id_of(&ma2), id_of(&op2)];
    want_m2.sort();
    assert_eq!(m2, want_m2);

    // A merchant_admin sees its own merchant's keys; another merchant is a 404.
    let (s, mine) = hub.get("/api/v1/api-keys", &ma1).await;
    assert_eq!(s, 200, "{mine}");
    let mut m1 = ids(&mine);
    m1.sort();
    let mut want_m1 = vec![id_of(&ma1), id_of(&op1)];
    want_m1.sort();
    assert_eq!(m1, want_m1);
    assert_eq!(
        hub.get("/api/v1/api-keys?merchant_id=m2", &ma1).await.0,
        404
    );
    assert_eq!(hub.get("/api/v1/api-keys", &op1).await.0, 403);

    // Another merchant's key, or the platform's, is not there for a merchant_admin.
    for id in [id_of(&op2), admin_id.clone()] {
        let (s, b) = hub
            .call("DELETE", &format!("/api/v1/api-keys/{id}"), &ma1, None)
            .await;
        assert_eq!(s, 404, "{id}: {b}");
        let (s, b) = hub
            .post(&format!("/api/v1/api-keys/{id}/rotate"), &ma1, json!({}))
            .await;
        assert_eq!(s, 404, "{id}: {b}");
    }
    assert_eq!(me(&hub, &op2).await, 200, "untouched");
    assert_eq!(me(&hub, ADMIN_KEY).await, 200, "untouched");
    let (s, _) = hub
        .post("/api/v1/api-keys", &ma1, json!({"role": "admin"}))
        .await;
    assert_eq!(s, 403, "a merchant_admin cannot mint an admin key");
    assert_eq!(
        hub.call("DELETE", "/api/v1/api-keys/k_nosuch", ADMIN_KEY, None)
            .await
            .0,
        404
    );

    // Rotation: a new key of the same role and scope; the old one refused at once.
    let (s, rotated) = hub
        .post(
            &format!("/api/v1/api-keys/{}/rotate", id_of(&op1)),
            &ma1,
            json!({}),
        )
        .await;
    assert_eq!(s, 201, "{rotated}");
    assert_eq!(rotated["role"], "operator");
    assert_eq!(rotated["merchant_id"], "m1");
    let new_op1 = rotated["key"].as_str().unwrap_or_default().to_owned();
    assert_eq!(rotated["id"], id_of(&new_op1));
    assert_eq!(me(&hub, &op1).await, 401, "the old key is revoked at once");
    let (s, who) = hub.get("/api/v1/me", &new_op1).await;
    assert_eq!(s, 200);
    assert_eq!(who["role"], "operator");
    assert_eq!(who["merchant_id"], "m1");
    let (s, b) = hub
        .post(
            &format!("/api/v1/api-keys/{}/rotate", id_of(&op1)),
            &ma1,
            json!({}),
        )
        .await;
    assert_eq!((s, b["error"]["code"].clone()), (409, json!("key_revoked")));
    let (_, mine) = hub.get("/api/v1/api-keys", &ma1).await;
    let old = items(&mine)
        .into_iter()
        .find(|k| k["id"] == id_of(&op1))
        .unwrap_or_default();
    assert!(old["revoked_at"].is_string(), "{old}");
    assert_eq!(old["replaced_by"], id_of(&new_op1));

    // Revocation: 204, refused on the very next request, and again 204.
    let (s, b) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", id_of(&new_op1)),
            &ma1,
            None,
        )
        .await;
    assert_eq!(s, 204, "{b}");
    assert_eq!(me(&hub, &new_op1).await, 401);
    assert_eq!(
        hub.call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", id_of(&new_op1)),
            &ma1,
            None
        )
        .await
        .0,
        204
    );

    // Last use: none for a key never used, then the time of its first request.
    let viewer = create_key(&hub, &ma1, Some("m1"), "viewer").await;
    let viewer_view = |b: &Value| {
        items(b)
            .into_iter()
            .find(|k| k["id"] == id_of(&viewer))
            .unwrap_or_default()
    };
    let (_, before) = hub.get("/api/v1/api-keys", &ma1).await;
    assert_eq!(viewer_view(&before)["last_used_at"], Value::Null);
    assert_eq!(me(&hub, &viewer).await, 200);
    let (_, after) = hub.get("/api/v1/api-keys", &ma1).await;
    assert!(viewer_view(&after)["last_used_at"].is_string(), "{after}");
}

async fn the_last_admin_key_cannot_be_revoked(b: Backend) {
    let hub = TestHub::start(b).await;
    let admin_id = cabinet_hub::app::configured_admin_key_id(ADMIN_KEY);
    let (s, b) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{admin_id}"),
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (409, json!("last_admin_key")),
        "{b}"
    );
    assert_eq!(me(&hub, ADMIN_KEY).await, 200, "still works");

    // With a second admin key the configured one can go; then the second is the last.
    let second = create_key(&hub, ADMIN_KEY, None, "admin").await;
    let (s, _) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{admin_id}"),
            &second,
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(me(&hub, ADMIN_KEY).await, 401);
    let (s, b) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", id_of(&second)),
            &second,
            None,
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (409, json!("last_admin_key"))
    );
    // Rotating the last admin key is fine: a new one takes its place.
    let (s, rotated) = hub
        .post(
            &format!("/api/v1/api-keys/{}/rotate", id_of(&second)),
            &second,
            json!({}),
        )
        .await;
    assert_eq!(s, 201, "{rotated}");
    assert_eq!(rotated["role"], "admin");
    assert_eq!(rotated["merchant_id"], Value::Null);
    let third = rotated["key"].as_str().unwrap_or_default();
    assert_eq!(me(&hub, &second).await, 401);
    assert_eq!(me(&hub, third).await, 200);
}

/// Reads until the server closes: the close code and reason, `None` when the deadline passes
/// with the socket open.
async fn closed_with(ws: &mut Ws, within: Duration) -> Option<(u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return Some((u16::from(f.code), f.reason.to_string()))
            }
            Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => {
                return Some((0, String::new()))
            }
            Ok(Some(Ok(_))) => {}
            Err(_) => return None,
        }
    }
}

async fn ticket(hub: &TestHub, key: &str) -> String {
    let (s, b) = hub.post("/api/v1/feed-tickets", key, json!({})).await;
    assert_eq!(s, 201, "{b}");
    b["ticket"].as_str().unwrap_or_default().to_owned()
}

/// Opens `/ws?ticket=` without any header, as a browser does: the socket, or the handshake's
/// HTTP status.
async fn ws_with_ticket(hub: &TestHub, ticket: &str) -> Result<Ws, u16> {
    ws_raw(hub, &format!("/ws?ticket={ticket}")).await
}

async fn ws_raw(hub: &TestHub, path_and_query: &str) -> Result<Ws, u16> {
    match tokio_tungstenite::connect_async(format!("ws://{}{path_and_query}", hub.http)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("ws: {e}"),
    }
}

async fn revocation_closes_the_keys_feed_sockets(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let viewer = create_key(&hub, &ma, Some("m1"), "viewer").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;

    // One socket by header (op), one by ticket (viewer).
    let mut by_header = connect(&hub, &op, None).await;
    let (s, t) = hub.post("/api/v1/feed-tickets", &viewer, json!({})).await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["expires_in_s"], 30, "the default lifetime");
    let mut by_ticket = ws_with_ticket(&hub, t["ticket"].as_str().unwrap_or_default())
        .await
        .unwrap_or_else(|s| panic!("ticket refused: {s}"));
    for ws in [&mut by_header, &mut by_ticket] {
        let snap = next(ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("no snapshot"));
        assert_eq!(snap["data"]["cabinets"][0]["id"], "KM1");
    }

    let (s, _) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", id_of(&op)),
            &ma,
            None,
        )
        .await;
    assert_eq!(s, 204);
    // Closed because of the revocation, which the hub pushes to the socket (no polling): how
    // soon is a latency for the benchmarks; the deadline only tells a socket left open.
    let closed = closed_with(&mut by_header, PATIENCE).await;
    assert_eq!(closed, Some((4401, "key revoked".to_owned())));

    // The viewer's socket is not touched: it still gets the next change.
    c.heartbeat("open", "unlocked", true, 1).await;
    let mut saw_door = false;
    while let Some(v) = next(&mut by_ticket, PATIENCE).await {
        if v["type"] == "cabinet" && v["data"]["door"] == "open" {
            saw_door = true;
            break;
        }
    }
    assert!(saw_door, "the other key's socket stays open and served");

    // A socket opened with a ticket closes with the ticket's key.
    let (s, _) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", id_of(&viewer)),
            &ma,
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(
        closed_with(&mut by_ticket, PATIENCE).await,
        Some((4401, "key revoked".to_owned()))
    );
    hub.eventually(Duration::from_secs(5), "both counted", || async {
        (hub.metric(r#"ws_dropped_total{reason="revoked"}"#).await == 2.0).then_some(())
    })
    .await;
    // And a revoked key opens no new socket.
    let refused = tokio_tungstenite::connect_async(request(&hub, &op, "")).await;
    assert!(
        matches!(&refused, Err(tungstenite::Error::Http(r)) if r.status() == 401),
        "{refused:?}"
    );
}

/// Opens the feed with a fresh ticket of `key`, whose lifetime is `ttl`: the ticket and the
/// socket. On a starved machine that lifetime can pass between asking for the ticket and using
/// it; a refusal then proves nothing and a fresh ticket is tried. A refusal of a ticket surely
/// used within its lifetime (timed from before it was asked for) fails the test.
async fn ws_with_fresh_ticket(hub: &TestHub, key: &str, ttl: Duration) -> (String, Ws) {
    for _ in 0..5 {
        let asked = Instant::now();
        let t = ticket(hub, key).await;
        match ws_with_ticket(hub, &t).await {
            Ok(ws) => return (t, ws),
            Err(401) if asked.elapsed() >= ttl => {}
            Err(s) => panic!("a ticket used within its lifetime was refused: {s}"),
        }
    }
    panic!("the machine was too slow to use a ticket within its {ttl:?}, five times")
}

async fn feed_tickets_are_single_use_short_lived_and_die_with_their_key(b: Backend) {
    const TTL: Duration = Duration::from_secs(1);
    let hub = TestHub::start_with(b, |s| s.auth.feed_ticket_ttl_ms = TTL.as_millis() as u64).await;
    let (ma, op) = hub.merchant("m1").await;
    let (_, op2) = hub.merchant("m2").await;
    hub.cabinet(&ma, "m1", "KM1").await;

    let (s, t) = hub.post("/api/v1/feed-tickets", &op, json!({})).await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["expires_in_s"], 1);
    assert!(
        t["ticket"].as_str().is_some_and(|t| t.starts_with("ft_")),
        "{t}"
    );
    let (first, mut ws) = ws_with_fresh_ticket(&hub, &op, TTL).await;
    let snap = next(&mut ws, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(snap["data"]["cabinets"][0]["id"], "KM1");
    assert_eq!(
        ws_with_ticket(&hub, &first).await.err(),
        Some(401),
        "single use"
    );

    // Bound to its key's scope: merchant 2's ticket shows none of merchant 1's cabinets.
    let (_, mut other) = ws_with_fresh_ticket(&hub, &op2, TTL).await;
    let snap = next(&mut other, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(snap["data"]["cabinets"], json!([]));

    // Expired: waited out well past its lifetime.
    let late = ticket(&hub, &op).await;
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert_eq!(
        ws_with_ticket(&hub, &late).await.err(),
        Some(401),
        "expired"
    );

    // Dies with its key.
    let orphan = ticket(&hub, &op).await;
    let (s, _) = hub
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{}", id_of(&op)),
            &ma,
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(ws_with_ticket(&hub, &orphan).await.err(), Some(401));
    assert_eq!(
        hub.post("/api/v1/feed-tickets", &op, json!({})).await.0,
        401
    );
    assert_eq!(ws_with_ticket(&hub, "ft_made_up").await.err(), Some(401));
}

async fn keys_in_the_url_authenticate_nothing(b: Backend) {
    let hub = TestHub::start(b).await;
    let (_, op) = hub.merchant("m1").await;
    for path in [
        format!("/api/v1/me?token={ADMIN_KEY}"),
        format!("/api/v1/alerts?token={op}"),
        format!("/api/v1/api-keys?token={ADMIN_KEY}"),
    ] {
        let s = hub
            .client
            .get(hub.url(&path))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or_default();
        assert_eq!(s, 401, "{path}");
    }
    assert_eq!(
        ws_raw(&hub, &format!("/ws?token={op}")).await.err(),
        Some(401)
    );
    // The header still works, of course.
    assert_eq!(me(&hub, &op).await, 200);
}

fn hub_command(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cabinet-hub"));
    c.env_remove("HUB_ENV")
        .env_remove("RUST_LOG")
        .env("HUB__DATA_DIR", data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// One raw HTTP/1.1 request: the status line's code, or 0.
fn raw_get(port: u16, path: &str, headers: &str) -> u16 {
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = conn.set_read_timeout(Some(PATIENCE));
    let _ = write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    );
    let mut buf = String::new();
    let _ = conn.read_to_string(&mut buf);
    buf.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The real binary's log (stderr, the access log at info) carries no key, ticket or signature
/// however the client puts them in the URL.
#[test]
fn the_log_carries_no_secret_from_a_url() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key = "chk_logtest_0123456789abcdefghijklmnopqrstuv";
    let (http, mqtt) = (free_port(), free_port());
    let mut c = hub_command(dir.path());
    c.arg("serve")
        .arg("--http-listen")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{mqtt}"))
        .env("HUB__AUTH__ADMIN_KEY", key)
        .env("HUB__LOG__LEVEL", "info");
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    while raw_get(http, "/healthz", "") != 200 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("hub exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hub did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(raw_get(http, &format!("/api/v1/me?token={key}"), ""), 401);
    let auth = format!("Authorization: Bearer {key}\r\n");
    assert_eq!(
        raw_get(
            http,
            "/api/v1/me?sign=SIGNVALUE&signature=SIGNATUREVALUE&secret=SECRETVALUE&key=KEYVALUE",
            &auth
        ),
        200
    );
    assert_eq!(raw_get(http, "/ws?ticket=ft_TICKETVALUE&since=3", ""), 401);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("/api/v1/me?token=REDACTED") && log.contains("ticket=REDACTED&since=3"),
        "the access log has the requests, redacted: {log}"
    );
    for secret in [
        key,
        "logtest_0123456789",
        "SIGNVALUE",
        "SIGNATUREVALUE",
        "SECRETVALUE",
        "KEYVALUE",
        "TICKETVALUE",
    ] {
        assert!(!log.contains(secret), "{secret} in the log: {log}");
    }
}

/// `check-config` shows the configuration with every secret as "<redacted>".
#[test]
fn check_config_prints_no_secret() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut c = hub_command(dir.path());
    c.arg("check-config")
        .env("HUB__AUTH__ADMIN_KEY", "ADMINKEYVALUE-0123456789")
        .env(
            "HUB__DATABASE__URL",
            "postgres://hub:DBPASSWORD@127.0.0.1:5432/hub?sslpassword=DBSSLPASSWORD&sslmode=prefer",
        )
        .env(
            "HUB__PAYMENTS__WECHAT__BASE_URL",
            "https://api.mch.weixin.qq.com",
        )
        .env("HUB__PAYMENTS__WECHAT__MCHID", "1900000001")
        .env("HUB__PAYMENTS__WECHAT__MERCHANT_SERIAL", "SERIAL")
        .env(
            "HUB__PAYMENTS__WECHAT__MERCHANT_KEY_PATH",
            "/etc/hub/merchant.pem",
        )
        .env("HUB__PAYMENTS__WECHAT__PLATFORM_SERIAL", "PUB_KEY_ID_1")
        .env(
            "HUB__PAYMENTS__WECHAT__PLATFORM_PUBLIC_KEY_PATH",
            "/etc/hub/platform.pem",
        )
        .env(
            "HUB__PAYMENTS__WECHAT__API_V3_KEY",
            "APIV3KEYVALUE0123456789abcdefghij",
        )
        .env("HUB__PAYMENTS__WECHAT__APIV2_KEY", "APIV2KEYVALUE0123")
        .env("HUB__PAYMENTS__WECHAT__SERVICE_ID", "SERVICE")
        .env("HUB__PAYMENTS__WECHAT__APPID", "wx123")
        .env(
            "HUB__PAYMENTS__WECHAT__NOTIFY_URL",
            "https://hub.example.com/n",
        );
    let out = c.output().unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["auth"]["admin_key"], "<redacted>");
    assert_eq!(v["payments"]["wechat"]["api_v3_key"], "<redacted>");
    assert_eq!(v["payments"]["wechat"]["apiv2_key"], "<redacted>");
    assert_eq!(
        v["payments"]["wechat"]["service_id"], "SERVICE",
        "the rest is shown"
    );
    assert_eq!(v["auth"]["feed_ticket_ttl_ms"], 30000);
    for secret in [
        "ADMINKEYVALUE",
        "APIV3KEYVALUE",
        "APIV2KEYVALUE",
        "DBPASSWORD",
        "DBSSLPASSWORD",
    ] {
        assert!(!text.contains(secret), "{secret} printed: {text}");
    }
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The data dir, the CA's and broker's keys and the SQLite files are private from creation,
/// with the permissive umask of a typical shell (022) in force.
#[cfg(unix)]
#[actix_rt::test]
async fn files_are_private_from_creation() {
    // SAFETY: umask swaps the process's mask; nextest runs this test in its own process.
    unsafe {
        libc::umask(0o022);
    }
    let mut data = PathBuf::new();
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.data_dir = s.data_dir.join("fresh/data");
        s.mqtt.tls_listen = Some(([127, 0, 0, 1], free_port()).into());
        data = s.data_dir.clone();
    })
    .await;
    // A write, so that the WAL has content and -shm is in use.
    hub.merchant("m1").await;
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&data.join("ca")), 0o700, "CA dir");
    for f in [
        "ca/device-ca.key.pem",
        "ca/broker.key.pem",
        "hub.db",
        "hub.db-wal",
        "hub.db-shm",
    ] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
}

fn unix_ms(rfc3339: &Value) -> i64 {
    let s = rfc3339
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {rfc3339}"));
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s}: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A key's last use is stored, but not on every request: within a minute the stored time stays
/// at the first use while the list shows the latest one (kept in memory).
#[actix_rt::test]
async fn last_use_is_stored_at_most_once_a_minute() {
    let mut data = PathBuf::new();
    let hub = TestHub::start_with(Backend::Sqlite, |s| data = s.data_dir.clone()).await;
    let (ma, op) = hub.merchant("m1").await;
    let id = id_of(&op);
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", data.join("hub.db").display());
    let stored = || {
        let (url, id) = (url.clone(), id.clone());
        async move {
            use sqlx::{Connection, Row};
            let mut conn = sqlx::AnyConnection::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let v: Option<i64> = sqlx::query("SELECT last_used_at FROM api_keys WHERE id = $1")
                .bind(&id)
                .fetch_one(&mut conn)
                .await
                .and_then(|r| r.try_get("last_used_at"))
                .unwrap_or_else(|e| panic!("{e}"));
            v
        }
    };
    assert_eq!(stored().await, None, "created, never used");
    assert_eq!(me(&hub, &op).await, 200);
    let first = hub
        .eventually(Duration::from_secs(5), "the first use stored", &stored)
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..5 {
        assert_eq!(me(&hub, &op).await, 200);
    }
    let (_, list) = hub.get("/api/v1/api-keys", &ma).await;
    let shown = items(&list)
        .into_iter()
        .find(|k| k["id"] == id)
        .map(|k| unix_ms(&k["last_used_at"]))
        .unwrap_or_default();
    assert!(
        shown > first,
        "the list shows the latest use: {shown} vs {first}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored().await, Some(first), "no write per request");
}
