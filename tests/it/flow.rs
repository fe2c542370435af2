//! Nothing the broker acknowledges is lost (issue 18): a burst of QoS 1 uplinks from a client
//! nobody on this project wrote (`mosquitto_pub -l -q 1 -M 100`, as a firmware engineer tries
//! it), ungated, into the real binary's broker with its smallest uplink buffer. Every message
//! every publisher had acknowledged must reach the cabinets' actors. Before the broker's flow
//! control (vendor/rumqttd PATCHES.md 11) such a burst lost 12–36 % of them, silently.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::node::{Node, Spec};

/// Publishers and messages each: some 5 MB of heartbeats against a 1 MiB buffer, so that the
/// pump (a debug build, on a machine shared with the rest of the suite) falls behind.
const PUBLISHERS: usize = 10;
const MESSAGES: usize = 3_000;

fn heartbeats(n: usize) -> Vec<u8> {
    let mut lines = Vec::new();
    for seq in 1..=n {
        let hb = json!({"seq": seq, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked",
                        "temp_c": 4.6, "light": "on", "cameras": [{"id": 0, "ok": true}],
                        "config_version": 0, "note": "x".repeat(200)});
        lines.extend_from_slice(hb.to_string().as_bytes());
        lines.push(b'\n');
    }
    lines
}

async fn processed(node: &Node) -> f64 {
    node.metric("uplinks_processed_total").await
}

#[actix_rt::test]
async fn a_burst_from_mosquitto_pub_is_processed_to_the_last_acknowledged_message() {
    let node = Spec::new()
        .env("HUB__MQTT__UPLINK_BUFFER_MIB", 1)
        .start()
        .await;
    let (ma, _) = node.merchant("m1").await;
    let mut cabinets = Vec::new();
    for i in 0..PUBLISHERS {
        let id = format!("KMF{i}");
        let secret = node.cabinet(&ma, "m1", &id).await;
        cabinets.push((id, secret));
    }
    let before = processed(&node).await;
    let lines = heartbeats(MESSAGES);
    let port = node.mqtt.port().to_string();
    let mut children = Vec::new();
    for (id, secret) in &cabinets {
        let topic = format!("/tenants/{id}/heartbeat");
        let mut child = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-i",
                id,
                "-u",
                id,
                "-P",
                secret,
            ])
            .args(["-q", "1", "-M", "100", "-t", &topic, "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("mosquitto_pub (apt-get install mosquitto-clients): {e}"));
        let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
        let lines = lines.clone();
        // Fed from threads: each publisher's pipe fills while the broker holds it.
        let feeder = std::thread::spawn(move || stdin.write_all(&lines));
        children.push((id.clone(), child, feeder));
    }
    // A publisher exits 0 once the broker has acknowledged every line it read.
    let started = Instant::now();
    for (id, child, feeder) in children {
        let out = actix_rt::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "mosquitto_pub for {id}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        feeder
            .join()
            .unwrap_or_else(|_| panic!("feeder"))
            .unwrap_or_else(|e| panic!("feeding {id}: {e}"));
    }
    let acked = (PUBLISHERS * MESSAGES) as f64;
    eprintln!(
        "{acked} messages acknowledged in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Every one of them through the actors. Waited for while the count still moves (a loaded
    // machine may be slow); lost messages show as a count that stops short.
    let mut got = processed(&node).await - before;
    let mut moved = Instant::now();
    while got < acked && moved.elapsed() < Duration::from_secs(30) {
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        let now = processed(&node).await - before;
        if now > got {
            moved = Instant::now();
        }
        got = now;
    }
    let holds = node.metric("mqtt_backpressure_holds_total").await;
    eprintln!("processed {got} of {acked}; the broker held publishers {holds} times");
    assert_eq!(got, acked, "acknowledged uplinks were lost");
    // None lost inside the broker, none still held, none refused or rejected on the way.
    let metrics = node.metrics().await;
    for series in ["mqtt_uplinks_evicted_total 0", "mqtt_backpressure_held 0"] {
        assert!(metrics.lines().any(|l| l == series), "{series}");
    }
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("mqtt_rejected_total") || l.starts_with("mqtt_refused_total"))
    {
        assert!(line.ends_with(" 0"), "{line}");
    }
}
