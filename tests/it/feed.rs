//! The operator feed over a real WebSocket.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

use crate::both;
use crate::harness::{Backend, Cabinet, TestHub, PATIENCE};

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The feed handshake with the key in `Authorization: Bearer`, as a program opens it.
pub(crate) fn request(hub: &TestHub, key: &str, query: &str) -> Request {
    let mut req = format!("ws://{}/ws{query}", hub.http)
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {key}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    req
}

pub(crate) async fn connect(hub: &TestHub, key: &str, since: Option<u64>) -> Ws {
    let query = since.map(|s| format!("?since={s}")).unwrap_or_default();
    tokio_tungstenite::connect_async(request(hub, key, &query))
        .await
        .unwrap_or_else(|e| panic!("ws: {e}"))
        .0
}

/// The next JSON message, None when none comes within `within` or the socket ends. A test that
/// expects one waits [`PATIENCE`]; a short `within` is for asserting that none comes.
pub(crate) async fn next(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(t.as_str()).ok(),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// Reads until an event matches, returning everything read.
async fn until(ws: &mut Ws, what: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = next(ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("no {what} within {PATIENCE:?}; saw {seen:?}"));
        let done = f(&v);
        seen.push(v);
        if done {
            return seen;
        }
    }
}

both!(
    snapshot_then_deltas_scoped,
    resume_without_gap_or_duplicate,
    slow_client_dropped_fast_client_served
);

async fn snapshot_then_deltas_scoped(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let (_, op2) = hub.merchant("m2").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;

    let mut ws = connect(&hub, &op, None).await;
    let mut other = connect(&hub, &op2, None).await;
    let snap = next(&mut ws, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["data"]["cabinets"][0]["id"], "KM1");
    assert_eq!(snap["data"]["cabinets"][0]["online"], true);
    let other_snap = next(&mut other, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(
        other_snap["data"]["cabinets"],
        json!([]),
        "another merchant's cabinets are not in the snapshot"
    );

    // The cabinet forces its door: the alert reaches the screen, no reload needed.
    c.event("door_opened").await;
    let mut seen = Vec::new();
    let (mut alert, mut door) = (false, false);
    while !(alert && door) {
        let v = next(&mut ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("missing events within {PATIENCE:?}; saw {seen:?}"));
        alert |= v["type"] == "alert" && v["data"]["alert"]["type"] == "door_forced";
        door |= v["type"] == "cabinet" && v["data"]["door"] == "open";
        seen.push(v);
    }
    let seqs: Vec<u64> = std::iter::once(&snap)
        .chain(seen.iter())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq increases: {seqs:?}"
    );
    assert!(
        next(&mut other, Duration::from_millis(300)).await.is_none(),
        "merchant 2 receives nothing of merchant 1"
    );

    // A bad key is refused at the handshake.
    let bad = tokio_tungstenite::connect_async(request(&hub, "nope", "")).await;
    assert!(bad.is_err());
    assert!(hub.metrics().await.contains("ws_clients 2"));
}

async fn resume_without_gap_or_duplicate(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    let mut ws = connect(&hub, &op, None).await;
    let snap = next(&mut ws, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    let last = snap["seq"].as_u64().unwrap_or(0);
    drop(ws);
    // Missed while disconnected.
    c.event("tamper").await;
    c.heartbeat("open", "unlocked", true, 1).await;
    hub.eventually(Duration::from_secs(1), "door open", || async {
        (hub.cabinet_state(&op, "KM1").await["door"] == "open").then_some(())
    })
    .await;
    let mut ws = connect(&hub, &op, Some(last)).await;
    let seen = until(&mut ws, "the missed door change", |v| {
        v["type"] == "cabinet" && v["data"]["door"] == "open"
    })
    .await;
    assert_ne!(
        seen[0]["type"], "snapshot",
        "replayed, not a fresh snapshot"
    );
    let seqs: Vec<u64> = seen.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs[0], last + 1, "no gap");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous, no duplicate: {seqs:?}"
    );
    assert!(seen
        .iter()
        .any(|v| v["type"] == "alert" && v["data"]["alert"]["type"] == "tamper"));
    // Too old: a fresh snapshot instead.
    let mut ws = connect(&hub, &op, Some(10_000_000)).await;
    assert_eq!(
        next(&mut ws, PATIENCE).await.map(|v| v["type"].clone()),
        Some(json!("snapshot"))
    );
}

/// A screen that stops reading is dropped with a counted reason once it is a queue behind; a
/// screen that keeps reading sees every event, contiguous, throughout.
async fn slow_client_dropped_fast_client_served(b: Backend) {
    let hub = TestHub::start_with(b, |s| s.feed.client_queue = 256).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let c = Cabinet::connect(&hub, "KM1", &secret).await;
    let mut seq = 0u64;
    let mut beat = |temp: f64| {
        seq += 1;
        json!({"seq": seq, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked", "temp_c": temp,
               "light": "on", "cameras": [{"id": 0, "ok": true}], "config_version": 1})
    };
    c.publish("heartbeat", beat(4.0)).await;
    hub.wait_online(&op, "KM1").await;

    let mut fast = connect(&hub, &op, None).await;
    let snap = next(&mut fast, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    let mut last = snap["seq"].as_u64().unwrap_or_default();
    // The slow screen: a receive buffer of a few kilobytes that nobody reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    sock.set_recv_buffer_size(2048)
        .unwrap_or_else(|e| panic!("{e}"));
    let stream = sock
        .connect(hub.http)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_slow, _) = tokio_tungstenite::client_async(request(&hub, &op, ""), stream)
        .await
        .unwrap_or_else(|e| panic!("slow handshake: {e}"));
    hub.eventually(Duration::from_secs(2), "two clients", || async {
        (hub.metric("ws_clients").await == 2.0).then_some(())
    })
    .await;

    // Bursts of state changes that a reading client keeps up with; the slow client is dropped
    // once its socket is blocked and 256 events are queued behind it (≈ 2,000 events here).
    let mut dropped = 0.0;
    let mut received = 0u64;
    for burst in 0..100u32 {
        for i in 0..100u32 {
            let temp = 2.0 + f64::from((burst * 100 + i) % 600) / 100.0;
            c.publish("heartbeat", beat(temp)).await;
        }
        let want = 2.0 + f64::from((burst * 100 + 99) % 600) / 100.0;
        loop {
            let v = next(&mut fast, PATIENCE)
                .await
                .unwrap_or_else(|| panic!("the fast client stopped receiving at burst {burst}"));
            let s = v["seq"].as_u64().unwrap_or_default();
            assert_eq!(s, last + 1, "the fast client misses nothing");
            last = s;
            received += 1;
            if v["type"] == "cabinet" && v["data"]["temp_c"].as_f64() == Some(want) {
                break;
            }
        }
        dropped = hub
            .metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("ws_dropped_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if dropped >= 1.0 && burst >= 20 {
            break;
        }
    }
    assert_eq!(dropped, 1.0, "the slow client was dropped, once");
    let m = hub.metrics().await;
    assert!(m.contains("ws_dropped_total{reason=\"lagged\"} 1"), "{m}");
    assert_eq!(hub.metric("ws_clients").await, 1.0);
    assert!(
        received >= 2_000,
        "{received} events reached the fast client"
    );
}
