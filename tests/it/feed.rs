//! The operator feed over a real WebSocket.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::both;
use crate::harness::{Backend, Cabinet, TestHub};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(hub: &TestHub, key: &str, since: Option<u64>) -> Ws {
    let mut url = format!("ws://{}/ws?token={key}", hub.http);
    if let Some(s) = since {
        url.push_str(&format!("&since={s}"));
    }
    tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("ws: {e}"))
        .0
}

async fn next(ws: &mut Ws, within: Duration) -> Option<Value> {
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
        let v = next(ws, Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("no {what} within a second; saw {seen:?}"));
        let done = f(&v);
        seen.push(v);
        if done {
            return seen;
        }
    }
}

both!(snapshot_then_deltas_scoped, resume_without_gap_or_duplicate);

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
    let snap = next(&mut ws, Duration::from_secs(1))
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["data"]["cabinets"][0]["id"], "KM1");
    assert_eq!(snap["data"]["cabinets"][0]["online"], true);
    let other_snap = next(&mut other, Duration::from_secs(1))
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(
        other_snap["data"]["cabinets"],
        json!([]),
        "another merchant's cabinets are not in the snapshot"
    );

    // The cabinet forces its door: the alert reaches the screen within a second.
    c.event("door_opened").await;
    let mut seen = Vec::new();
    let (mut alert, mut door) = (false, false);
    while !(alert && door) {
        let v = next(&mut ws, Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("missing events within a second; saw {seen:?}"));
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

    // A bad token is refused at the handshake.
    let bad = tokio_tungstenite::connect_async(format!("ws://{}/ws?token=nope", hub.http)).await;
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
    let snap = next(&mut ws, Duration::from_secs(1))
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
        next(&mut ws, Duration::from_secs(1))
            .await
            .map(|v| v["type"].clone()),
        Some(json!("snapshot"))
    );
}
