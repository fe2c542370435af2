//! The cluster port against the real Redis: the leader lease (exactly one node runs the
//! singleton work, and another takes it over when that node dies), cabinet leases with fencing
//! tokens (a cabinet that moves is taken over; the former owner stops commanding it), beliefs
//! that run out when Redis cannot be reached, and two real hub processes sharing PostgreSQL and
//! Redis. Every test has its own key prefix, so runs beside each other do not meet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use cabinet_hub::cluster::{Cluster, ClusterSettings, Held};
use cabinet_hub::metrics::Metrics;

use crate::feed;
use crate::harness::{fresh_postgres, options, Cabinet, PATIENCE};
use crate::node::Spec;

/// A missing Redis fails these tests: they are never skipped.
pub(crate) fn redis_url() -> String {
    std::env::var("HUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub(crate) fn prefix() -> String {
    format!(
        "hubtest-{}",
        cabinet_hub::secrets::token(10).unwrap_or_else(|e| panic!("{e}"))
    )
}

fn settings(node: &str, prefix: &str, lease_ms: u64) -> ClusterSettings {
    ClusterSettings {
        node_id: node.to_owned(),
        lease: Duration::from_millis(lease_ms),
        renew: Duration::from_millis(lease_ms / 5),
        key_prefix: prefix.to_owned(),
    }
}

async fn node(url: &str, name: &str, prefix: &str, lease_ms: u64) -> Arc<Cluster> {
    let metrics = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
    Cluster::redis(url, settings(name, prefix, lease_ms), metrics)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {url} is required for these tests (HUB_TEST_REDIS_URL): {e}")
        })
}

/// Polls `f` every 20 ms until it holds; panics after `within`.
async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn one_node_leads_and_another_takes_over_when_it_dies() {
    let (url, p) = (redis_url(), prefix());
    // Long enough that a renewal late on a busy machine does not end a belief by itself.
    let lease = 3_000;
    let a = node(&url, "a", &p, lease).await;
    let b = node(&url, "b", &p, lease).await;
    let ta = a
        .start()
        .unwrap_or_else(|| panic!("a Redis cluster renews"));
    let tb = b
        .start()
        .unwrap_or_else(|| panic!("a Redis cluster renews"));
    until(Duration::from_secs(10), "a leader", || {
        a.is_leader() || b.is_leader()
    })
    .await;
    // Several renewals later, still exactly one.
    for _ in 0..50 {
        assert!(!(a.is_leader() && b.is_leader()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.is_leader() != b.is_leader(), "exactly one leads");
    let (leader, follower, dying) = if a.is_leader() {
        (a.clone(), b.clone(), ta)
    } else {
        (b.clone(), a.clone(), tb)
    };
    let first_fence = leader.leader_fence().unwrap_or(0);
    // The leader dies: its renewals stop. Its own belief runs out before anyone else's
    // starts; sampled all the way through, the two never lead at once.
    dying.abort();
    let died = Instant::now();
    while !follower.is_leader() {
        assert!(
            !(leader.is_leader() && follower.is_leader()),
            "two leaders during the handover"
        );
        assert!(
            died.elapsed() < Duration::from_millis(lease + 5_000),
            "no takeover within the lease plus 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!leader.is_leader(), "the dead node's belief ran out first");
    assert!(
        follower.leader_fence().unwrap_or(0) > first_fence,
        "the new leader holds a larger fencing token"
    );
}

#[actix_rt::test]
async fn a_clean_shutdown_hands_the_lead_over_at_once() {
    let (url, p) = (redis_url(), prefix());
    // A long lease: a takeover that waited for it would fail the deadline below.
    let a = node(&url, "a", &p, 30_000).await;
    let b = node(&url, "b", &p, 30_000).await;
    let _ta = a.start();
    until(Duration::from_secs(10), "a leads", || a.is_leader()).await;
    let _tb = b.start();
    a.step_down().await;
    assert!(!a.is_leader());
    until(
        Duration::from_secs(15),
        "b takes over at its next renewal",
        || b.is_leader(),
    )
    .await;
}

#[actix_rt::test]
async fn a_cabinet_that_moves_is_taken_over_and_its_old_node_stops_commanding_it() {
    let (url, p) = (redis_url(), prefix());
    let a = node(&url, "a", &p, 2_000).await;
    let b = node(&url, "b", &p, 2_000).await;
    let _ta = a.start();
    let _tb = b.start();
    a.cabinet_here("cab-1");
    until(Duration::from_secs(10), "a holds cab-1", || {
        matches!(a.cabinet_lease("cab-1"), Some(Held::Held(_)))
    })
    .await;
    let Some(Held::Held(fa)) = a.cabinet_lease("cab-1") else {
        panic!("held")
    };
    let owner = a.owner("cab-1").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(owner.map(|o| (o.node, o.fence)), Some(("a".to_owned(), fa)));
    assert!(a.may_command("cab-1"));
    // Renewed, not lost, over several lease periods (taken again with a newer fence if a
    // renewal came late on a busy machine, but a's all along).
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let Some(Held::Held(fa)) = a.cabinet_lease("cab-1") else {
        panic!("a lost cab-1 with nobody else about")
    };
    let owner = a.owner("cab-1").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(owner.map(|o| o.node), Some("a".to_owned()));

    // The cabinet reconnects to b: b takes the lease with a newer token.
    b.cabinet_here("cab-1");
    until(Duration::from_secs(10), "b holds cab-1", || {
        matches!(b.cabinet_lease("cab-1"), Some(Held::Held(_)))
    })
    .await;
    let Some(Held::Held(fb)) = b.cabinet_lease("cab-1") else {
        panic!("held")
    };
    assert!(
        fb > fa,
        "the taker's fence {fb} is above the former owner's {fa}"
    );
    // a finds out at its next renewal, and no longer commands the cabinet.
    until(Duration::from_secs(5), "a sees the lease lost", || {
        !a.may_command("cab-1")
    })
    .await;
    assert_eq!(a.cabinet_lease("cab-1"), Some(Held::Lost));
    assert!(b.may_command("cab-1"));
    // a's late goodbye (the old connection's last will) does not free b's lease.
    a.cabinet_gone("cab-1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let owner = b.owner("cab-1").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(owner.map(|o| (o.node, o.fence)), Some(("b".to_owned(), fb)));
    // b's goodbye does.
    b.cabinet_gone("cab-1");
    let start = Instant::now();
    loop {
        if b.owner("cab-1")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "lease not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn a_dead_nodes_cabinet_lease_runs_out_and_is_free() {
    let (url, p) = (redis_url(), prefix());
    let a = node(&url, "a", &p, 1_000).await;
    let ta = a.start().unwrap_or_else(|| panic!("renews"));
    a.cabinet_here("cab-2");
    until(Duration::from_secs(10), "a holds cab-2", || {
        matches!(a.cabinet_lease("cab-2"), Some(Held::Held(_)))
    })
    .await;
    ta.abort();
    // No renewal: a's own belief ends within the lease, and Redis forgets the owner.
    until(Duration::from_secs(3), "a's belief runs out", || {
        !a.may_command("cab-2")
    })
    .await;
    let start = Instant::now();
    while a
        .owner("cab-2")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_some()
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn a_single_node_leads_and_owns_without_redis() {
    let metrics = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
    let one = Cluster::single(settings("solo", "unused", 10_000), metrics.clone());
    assert!(one.start().is_none(), "nothing to renew");
    assert!(one.is_leader());
    assert!(one.may_command("anything"));
    assert_eq!(one.redis_status(), "not_configured");
    assert!(metrics.render().contains("cluster_leader 1"));
}

/// A TCP relay to Redis that a test can cut and bring back on the same port: Redis
/// unreachable, then back, without touching the shared server.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("relay bind: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = TcpStream::connect("127.0.0.1:6379").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Relay { port, task }
    }

    /// Drops the listener and every relayed connection.
    fn cut(self) -> u16 {
        self.task.abort();
        self.port
    }
}

#[actix_rt::test]
async fn leadership_runs_out_while_redis_is_unreachable_and_returns_with_it() {
    let p = prefix();
    let relay = Relay::start(0).await;
    let url = format!("redis://127.0.0.1:{}", relay.port);
    let a = node(&url, "a", &p, 1_500).await;
    let _ta = a.start();
    until(Duration::from_secs(10), "a leads", || a.is_leader()).await;
    assert_eq!(a.redis_status(), "ok");
    let port = relay.cut();
    until(Duration::from_secs(5), "leadership runs out", || {
        !a.is_leader()
    })
    .await;
    assert!(!a.ping().await);
    assert_eq!(a.redis_status(), "unreachable");
    // Redis back on the same address: the connection manager reconnects, and the lead is
    // taken again.
    let _relay = Relay::start(port).await;
    until(Duration::from_secs(30), "a leads again", || a.is_leader()).await;
    assert!(a.ping().await);
    assert_eq!(a.redis_status(), "ok");
}

/// Two hub processes on one PostgreSQL and one Redis: exactly one runs the singleton work;
/// `kill -9` it, and the other takes over within the lease plus 5 s.
#[actix_rt::test]
async fn two_hub_nodes_share_the_singleton_work_and_survive_the_leaders_death() {
    let (mut a, mut b) = two_nodes().await;
    for n in [&a, &b] {
        let (status, ready) = n.get("/readyz", "").await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(ready["redis"], "ok");
    }
    let leaders = |x: f64, y: f64| (x + y) as i64;
    let start = Instant::now();
    let (mut la, mut lb);
    loop {
        la = a.metric("cluster_leader").await;
        lb = b.metric("cluster_leader").await;
        if leaders(la, lb) == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "leaders: a {la}, b {lb}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dead, survivor) = if la == 1.0 {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    dead.kill9();
    let died = Instant::now();
    loop {
        if survivor.metric("cluster_leader").await == 1.0 {
            break;
        }
        assert!(
            died.elapsed() < Duration::from_millis(2_000 + 5_000),
            "the survivor did not take the lead within the lease plus 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        survivor
            .metrics()
            .await
            .contains("cluster_lease_changes_total{change=\"acquired\",lease=\"leader\"} 1"),
        "{}",
        survivor.metrics().await
    );
}

/// Two hub processes on one fresh PostgreSQL database and one Redis (short leases).
async fn two_nodes() -> (crate::node::Node, crate::node::Node) {
    two_nodes_with(&[]).await
}

/// [`two_nodes`] with more settings for both.
/// Node `name` of a cluster on `db` and the test Redis under `prefix`, with short leases.
pub(crate) fn node_spec(db: &str, prefix: &str, name: &str) -> Spec {
    Spec::new()
        .env("HUB__DATABASE__URL", db)
        .env("HUB__REDIS__URL", redis_url())
        .env("HUB__CLUSTER__KEY_PREFIX", prefix)
        .env("HUB__CLUSTER__LEASE_MS", 2_000)
        .env("HUB__CLUSTER__RENEW_MS", 400)
        .env("HUB__NODE__ID", name)
}

pub(crate) async fn two_nodes_with(
    env: &[(&str, String)],
) -> (crate::node::Node, crate::node::Node) {
    let db = fresh_postgres().await;
    let p = prefix();
    let spec = |name: &str| {
        let mut s = node_spec(&db, &p, name);
        for (k, v) in env {
            s = s.env(k, v);
        }
        s
    };
    let a = spec("node-a").start().await;
    let b = spec("node-b").start().await;
    (a, b)
}

/// The payment simulators in a process of their own (`cabinet-hub simulate`), shared by the
/// nodes as WeChat is in the field: an order one node created, another can complete.
struct Simulator {
    child: std::process::Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Simulator {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let addr = format!("127.0.0.1:{}", crate::harness::free_port());
        let child = crate::node::command(&[])
            .arg("simulate")
            .arg("--listen")
            .arg(&addr)
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("simulate: {e}"));
        let start = Instant::now();
        while TcpStream::connect(&addr).await.is_err() {
            assert!(start.elapsed() < PATIENCE, "the simulator never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Simulator {
            child,
            url: format!("http://{addr}"),
            dir,
        }
    }

    /// Deductions the simulated WeChat made, from its journal.
    fn charges(&self) -> usize {
        crate::crash::charges_in(self.dir.path())
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A merchant `m1` with cabinet `id` selling cola at 3.00 registered through `hub`: the
/// operator's key and the cabinet's secret.
async fn cola_cabinet(hub: &crate::harness::TestHub, id: &str) -> (String, String) {
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", id).await;
    let (s, r) = hub
        .call(
            "PUT",
            "/api/v1/products/cola",
            &op,
            Some(serde_json::json!({"name": "cola"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = hub
        .call(
            "PUT",
            &format!("/api/v1/cabinets/{id}/prices"),
            &op,
            Some(serde_json::json!({"items": [{"sku": "cola", "price_fen": 300}]})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    (op, secret)
}

/// Waits until `hub` holds `n` cabinet leases.
async fn leases(hub: &crate::harness::TestHub, n: u32) {
    let start = Instant::now();
    while hub.metric("cluster_cabinet_leases").await != f64::from(n) {
        assert!(start.elapsed() < PATIENCE, "never {n} cabinet leases");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects a cabinet to `hub`, retrying while that node has not yet read credentials
/// registered through another node.
async fn connect_to(hub: &crate::node::Node, id: &str, secret: &str) -> Cabinet {
    let start = Instant::now();
    loop {
        match Cabinet::try_connect(options(hub.mqtt, id, secret)).await {
            Ok(mut c) => {
                c.subscribe_commands().await;
                c.publish("status", serde_json::json!({"online": true, "boot_id": "b1", "fw": "2.4.1", "model": "KM-400", "config_version": 1, "boot": "power_on"})).await;
                return c;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < PATIENCE,
                    "{id} never accepted by the second node: {e}; its log: {}",
                    hub.stderr()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[actix_rt::test]
async fn a_feed_client_on_one_node_sees_another_nodes_cabinet_and_resumes_on_it() {
    let (mut a, b) = two_nodes().await;
    let (ma, op) = a.merchant("m1").await;
    // Registered through a; b's broker learns the credentials through the shared stream.
    let secret = a.cabinet(&ma, "m1", "KX1").await;
    let mut c = connect_to(&b, "KX1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    b.wait_online(&op, "KX1").await;
    // a has no actor for it and answers its live state from b's events.
    a.eventually(PATIENCE, "KX1 online as seen from a", || async {
        (a.cabinet_state(&op, "KX1").await["online"] == true).then_some(())
    })
    .await;
    let mut ws = feed::connect(&a, &op, None).await;
    let snap = feed::next(&mut ws, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["data"]["cabinets"][0]["id"], "KX1");
    assert_eq!(snap["data"]["cabinets"][0]["online"], true, "{snap}");
    // An alert on b's cabinet reaches a's screen.
    c.event("tamper").await;
    let mut last = snap["seq"].as_u64().unwrap_or(0);
    loop {
        let v = feed::next(&mut ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("the tamper alert never reached node a"));
        let seq = v["seq"].as_u64().unwrap_or(0);
        assert!(seq > last, "seq increases: {last} then {seq}");
        last = seq;
        if v["type"] == "alert" && v["data"]["alert"]["type"] == "tamper" {
            break;
        }
    }
    // a stops; what happened meanwhile is replayed by b from the same numbering.
    drop(ws);
    a.terminate();
    c.heartbeat("open", "unlocked", true, 1).await;
    let mut ws = feed::connect(&b, &op, Some(last)).await;
    let first = feed::next(&mut ws, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("nothing from b"));
    assert_ne!(
        first["type"], "snapshot",
        "replayed, not a snapshot: {first}"
    );
    assert_eq!(first["seq"].as_u64(), Some(last + 1), "no gap: {first}");
    let mut v = first;
    while !(v["type"] == "cabinet" && v["data"]["door"] == "open") {
        v = feed::next(&mut ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("the door change never came from b"));
    }
}

#[actix_rt::test]
async fn a_secret_rotated_on_one_node_stops_working_on_the_other() {
    let (a, b) = two_nodes().await;
    let (ma, _) = a.merchant("m1").await;
    let old = a.cabinet(&ma, "m1", "KX2").await;
    connect_to(&b, "KX2", &old).await.cut();
    let (status, rotated) = a
        .post("/api/v1/cabinets/KX2/secret", &ma, serde_json::json!({}))
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap_or_default().to_owned();
    // Without the shared stream, b would take the old secret until it restarted.
    let start = Instant::now();
    while let Ok(c) = Cabinet::try_connect(options(b.mqtt, "KX2", &old)).await {
        c.cut();
        assert!(start.elapsed() < PATIENCE, "b still takes the old secret");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connect_to(&b, "KX2", &new).await;
}

#[actix_rt::test]
async fn a_session_started_through_one_node_for_a_cabinet_on_the_other_completes_and_charges_once()
{
    let (a, b) = two_nodes().await;
    let (op, secret) = cola_cabinet(&a, "KX3").await;
    let mut c = connect_to(&b, "KX3", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    b.wait_online(&op, "KX3").await;
    // The lease is b's before a is asked.
    leases(&b, 1).await;

    let sessions = a.url("/api/v1/sessions");
    let body = serde_json::json!({"cabinet_id": "KX3", "user_id": "u1", "channel": "wechat", "mode": "purchase"});
    let send = || {
        a.client
            .post(&sessions)
            .bearer_auth(&op)
            .header("Idempotency-Key", "routed-1")
            .json(&body)
            .send()
    };
    let r = send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 202);
    let timing = r
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        timing.contains("route;dur="),
        "the hop is reported: {timing}"
    );
    let answer: serde_json::Value = r.json().await.unwrap_or_default();
    let session = answer["session"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // The shopper's backend follows it on a: a's long poll hears b's session changes.
    let following = {
        let (client, sessions, op, answer) = (
            a.client.clone(),
            sessions.clone(),
            op.clone(),
            answer.clone(),
        );
        actix_rt::spawn(
            async move { crate::purchase::follow(&client, &sessions, &op, &answer).await },
        )
    };
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    let v = following.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["session"]["state"], "open", "{v}");
    crate::purchase::shop_visit(
        &mut c,
        &session,
        serde_json::json!([{"sku": "cola", "qty": 1}]),
    )
    .await;
    let v = crate::purchase::order_status(&a, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 300, "{v}");
    // The same request again, through either node: the same session, no second charge.
    let again: serde_json::Value = send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(again["session"]["id"], session.as_str(), "{again}");
    let (s, orders) = a.get("/api/v1/orders?cabinet_id=KX3", &op).await;
    assert_eq!(s, 200, "{orders}");
    let items = orders["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "one order: {orders}");
    assert!(
        a.metric("routed_calls_total{outcome=\"ok\",side=\"sent\"}")
            .await
            >= 1.0
    );
    assert!(
        b.metric("routed_calls_total{outcome=\"ok\",side=\"served\"}")
            .await
            >= 1.0
    );
}

#[actix_rt::test]
async fn a_request_for_a_cabinet_no_node_serves_is_refused_offline() {
    let (a, _b) = two_nodes().await;
    let (ma, op) = a.merchant("m1").await;
    a.cabinet(&ma, "m1", "KX4").await;
    let (s, v) = ask(&a, &op, "KX4").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("cabinet_offline")),
        "{v}"
    );
    // Another merchant's cabinet is not found, whichever node is asked.
    let (_, op2) = a.merchant("m2").await;
    let (s, v) = ask(&a, &op2, "KX4").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("cabinet_not_found")),
        "{v}"
    );
}

/// `kill -9` of the node serving a cabinet in the middle of a purchase (door open): the cabinet
/// reconnects to the other node, which takes its lease at once, finishes the session from the
/// cabinet's recognition and charges the shopper exactly once.
#[actix_rt::test]
async fn a_node_killed_mid_session_loses_no_order_and_charges_once() {
    let sim = Simulator::start().await;
    let (a, mut b) = two_nodes_with(&[
        ("HUB__PAYMENTS__SIMULATOR_URL", sim.url.clone()),
        ("HUB__PAYMENTS__DEDUCTION_CHECK_MS", "300".into()),
        ("HUB__PAYMENTS__SIMULATOR_RETRY_SCALE", "0.01".into()),
    ])
    .await;
    let (op, secret) = cola_cabinet(&a, "KX5").await;
    let (mut c, session) = unlocked_through(&a, &b, &op, "KX5", &secret).await;
    a.eventually(PATIENCE, "the door open", || async {
        let (_, v) = a.get(&format!("/api/v1/sessions/{session}"), &op).await;
        (v["session"]["state"] == "open").then_some(())
    })
    .await;
    c.event("door_opened").await;

    b.kill9();
    let died = Instant::now();
    c.cut();
    // The cabinet's connection died with b: it reconnects to a and goes on.
    let mut c = connect_to(&a, "KX5", &secret).await;
    c.heartbeat("open", "unlocked", true, 1).await;
    leases(&a, 1).await;
    let moved = died.elapsed();
    assert!(
        moved < Duration::from_millis(2_000 + 5_000),
        "the cabinet was served again {moved:?} after its node died"
    );
    crate::purchase::door_then_recognition(
        &mut c,
        serde_json::json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 1}]}),
    )
    .await;
    let v = crate::purchase::order_status(&a, &op, &session, "paid").await;
    assert_eq!(v["order"]["paid_fen"], 300, "{v}");
    let start = Instant::now();
    while sim.charges() != 1 {
        assert!(start.elapsed() < PATIENCE, "charges: {}", sim.charges());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Settled for good: no second deduction turns up later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sim.charges(), 1);
}

/// `POST …/commands {"type": "reboot"}` for `cabinet` through `hub`, answered once the cabinet
/// acks (the caller acks it meanwhile).
pub(crate) fn reboot_through(
    hub: &crate::harness::TestHub,
    key: &str,
    cabinet: &str,
) -> actix_rt::task::JoinHandle<(u16, serde_json::Value)> {
    let (client, url, key) = (
        hub.client.clone(),
        hub.url(&format!("/api/v1/cabinets/{cabinet}/commands")),
        key.to_owned(),
    );
    actix_rt::spawn(async move {
        let r = client
            .post(url)
            .bearer_auth(key)
            .json(&serde_json::json!({"type": "reboot"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap_or_default(),
        )
    })
}

/// Waits until `/readyz` answers `status` with Redis `redis`.
async fn readiness(n: &crate::harness::TestHub, status: u16, redis: &str) {
    let start = Instant::now();
    loop {
        let (s, ready) = n.get("/readyz", "").await;
        if s == status && ready["redis"] == redis {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "readiness never {status} {redis}: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cabinet `id` connected to `b`, and a purchase session for it asked of `a` (carried to `b`),
/// its unlock acknowledged: the cabinet and the session's id.
async fn unlocked_through(
    a: &crate::node::Node,
    b: &crate::node::Node,
    op: &str,
    id: &str,
    secret: &str,
) -> (Cabinet, String) {
    let mut c = connect_to(b, id, secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(b, 1).await;
    let (s, answer) = ask(a, op, id).await;
    assert_eq!(s, 202, "{answer}");
    let session = answer["session"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let unlock = c.expect_command("unlock", PATIENCE).await;
    c.ack(&unlock, true, None).await;
    (c, session)
}

/// Cabinet `id` (merchant `m1`) connected to `b`, online and leased there, and a screen on `a`
/// past its snapshot: the operator's key, the cabinet and the screen.
async fn on_b_watched_from_a(
    a: &crate::node::Node,
    b: &crate::node::Node,
    id: &str,
) -> (String, Cabinet, feed::Ws) {
    let (op, secret) = cola_cabinet(a, id).await;
    let mut c = connect_to(b, id, &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(b, 1).await;
    let mut ws = feed::connect(a, &op, None).await;
    let snap = feed::next(&mut ws, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(snap["type"], "snapshot");
    (op, c, ws)
}

/// Reads the screen until a `tamper` alert comes (`what` names it in the failure).
async fn tamper_on_screen(ws: &mut feed::Ws, what: &str) {
    let start = Instant::now();
    loop {
        let v = feed::next(ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("{what} never came"));
        if v["type"] == "alert" && v["data"]["alert"]["type"] == "tamper" {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "{what} never came");
    }
}

/// Waits until exactly one of the two nodes leads.
async fn one_leader(a: &crate::harness::TestHub, b: &crate::harness::TestHub) {
    let start = Instant::now();
    loop {
        let leaders = a.metric("cluster_leader").await + b.metric("cluster_leader").await;
        if leaders == 1.0 {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "leaders: {leaders}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A purchase session asked of `hub` for `cabinet` (no idempotency key).
async fn ask(hub: &crate::harness::TestHub, key: &str, cabinet: &str) -> (u16, serde_json::Value) {
    hub.post(
        "/api/v1/sessions",
        key,
        serde_json::json!({"cabinet_id": cabinet, "user_id": "u1", "channel": "wechat", "mode": "purchase"}),
    )
    .await
}

/// Redis cut off from both nodes for a few seconds and back: the nodes say so, reconnect,
/// read the shared feed on from where they were, lead again (one of them), and carry requests
/// again; what the database holds was never at stake.
#[actix_rt::test]
async fn nodes_come_back_together_after_redis_was_unreachable() {
    let relay = Relay::start(0).await;
    let url = format!("redis://127.0.0.1:{}", relay.port);
    let (a, b) = two_nodes_with(&[("HUB__REDIS__URL", url)]).await;
    let (op, mut c, mut ws) = on_b_watched_from_a(&a, &b, "KX6").await;

    let port = relay.cut();
    for n in [&a, &b] {
        readiness(n, 503, "unreachable").await;
    }
    // Said while Redis is away: it reaches a's screen once Redis is back.
    c.event("tamper").await;
    // Away longer than a lease (2 s): every lease runs out meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _relay = Relay::start(port).await;
    for n in [&a, &b] {
        readiness(n, 200, "ok").await;
    }
    tamper_on_screen(&mut ws, "the alert raised while Redis was away").await;
    one_leader(&a, &b).await;
    // Requests are carried again: b took its cabinet's lease again when it could renew.
    let pending = reboot_through(&a, &op, "KX6");
    let reboot = c.expect_command("reboot", PATIENCE).await;
    c.ack(&reboot, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["outcome"], "ok", "{v}");
}

/// A cabinet that moved from one node to the other is commanded through its new node, even when
/// asked of the old one, whose actor for it stays behind.
#[actix_rt::test]
async fn a_cabinet_that_moved_is_served_by_its_new_node_not_the_actor_left_behind() {
    let (a, b) = two_nodes().await;
    let (op, secret) = cola_cabinet(&a, "KX7").await;
    let mut c = connect_to(&a, "KX7", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(&a, 1).await;
    c.cut();
    let mut c = connect_to(&b, "KX7", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(&b, 1).await;
    leases(&a, 0).await;
    let pending = reboot_through(&a, &op, "KX7");
    let reboot = c.expect_command("reboot", PATIENCE).await;
    c.ack(&reboot, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        // The same answer as a local command's.
        (s, v["outcome"].as_str(), v["cabinet_id"].as_str()),
        (200, Some("ok"), Some("KX7")),
        "{v}"
    );
    // a shows it as b publishes it, not as its own actor last saw it.
    a.eventually(PATIENCE, "KX7 online as seen from a", || async {
        (a.cabinet_state(&op, "KX7").await["online"] == true).then_some(())
    })
    .await;
}

/// A node joining a cluster leaves the cabinets the other nodes serve to them: its start-up
/// sweep (cabinets stored online that never came back to it) used to take every one of them
/// offline once their heartbeat window passed.
#[actix_rt::test]
async fn a_node_joining_leaves_the_other_nodes_cabinets_online() {
    let (db, p) = (fresh_postgres().await, prefix());
    let spec = |name: &str| node_spec(&db, &p, name).env("HUB__CABINET__HEARTBEAT_S", 1);
    let a = spec("node-a").start().await;
    let (op, secret) = cola_cabinet(&a, "KX8").await;
    let mut c = connect_to(&a, "KX8", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(&a, 1).await;
    let beating = c.keep_beating();
    let b = spec("node-b").start().await;
    // b's sweep waits three heartbeats (3 s) from its start.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for n in [&a, &b] {
        assert!(
            n.active_alert(&op, "KX8", "cabinet_offline")
                .await
                .is_none(),
            "taken offline by the node that joined"
        );
        assert_eq!(n.cabinet_state(&op, "KX8").await["online"], true);
    }
    beating.abort();
}

/// A Redis of the test's own, which the test stops (`kill -9`: nothing kept, as a restart
/// without persistence) and starts again on the same port.
struct OwnRedis {
    child: Option<std::process::Child>,
    port: u16,
}

impl OwnRedis {
    async fn start(port: u16) -> Self {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| panic!("redis-server is required (scripts/test installs it)"));
        let child = std::process::Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(start.elapsed() < PATIENCE, "redis-server never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child: Some(child),
            port,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `node` takes the cabinet's lease (an uplink reached it): the token it holds it under.
async fn takes(node: &Arc<Cluster>, id: &str) -> u64 {
    node.cabinet_here(id);
    until(Duration::from_secs(10), "the lease taken", || {
        matches!(node.cabinet_lease(id), Some(Held::Held(_)))
    })
    .await;
    match node.cabinet_lease(id) {
        Some(Held::Held(fence)) => fence,
        other => panic!("{other:?}"),
    }
}

/// Fencing tokens keep growing when Redis restarts empty: a lease taken after the restart
/// holds a larger token than any taken before it, as a write fenced by it must see.
#[actix_rt::test]
async fn fencing_tokens_keep_growing_across_a_redis_restart() {
    let mut redis = OwnRedis::start(crate::harness::free_port()).await;
    let (url, p) = (redis.url(), prefix());
    let a = node(&url, "a", &p, 1_000).await;
    let before = takes(&a, "cab-1").await;
    let port = redis.port;
    redis.kill();
    let _redis = OwnRedis::start(port).await;
    let b = node(&url, "b", &p, 1_000).await;
    let after = takes(&b, "cab-1").await;
    assert!(after > before, "{after} after the restart, {before} before");
    let owner = b.owner("cab-1").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(owner.map(|o| o.fence), Some(after), "stored exactly");
}

/// Redis restarted empty while cabinets beat on both nodes: the nodes reconnect, lead and hold
/// leases again, carry requests again, and read the feed on under its new numbering; what a
/// cabinet said meanwhile reaches the other node's screen.
#[actix_rt::test]
async fn nodes_carry_on_after_redis_restarts_empty_under_load() {
    let mut redis = OwnRedis::start(crate::harness::free_port()).await;
    let (a, b) = two_nodes_with(&[("HUB__REDIS__URL", redis.url())]).await;
    let (op, mut c, mut ws) = on_b_watched_from_a(&a, &b, "KY1").await;
    c.seq += 1_000;
    let beating = c.keep_beating();

    let port = redis.port;
    redis.kill();
    for n in [&a, &b] {
        readiness(n, 503, "unreachable").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _redis = OwnRedis::start(port).await;
    for n in [&a, &b] {
        readiness(n, 200, "ok").await;
    }
    one_leader(&a, &b).await;
    leases(&b, 1).await;
    beating.abort();
    c.seq += 1_000;
    // Said after the restart: on a's screen, under the stream's new numbers.
    c.event("tamper").await;
    tamper_on_screen(&mut ws, "the alert raised after the restart").await;
    let pending = reboot_through(&a, &op, "KY1");
    let reboot = c.expect_command("reboot", PATIENCE).await;
    c.ack(&reboot, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s, v["outcome"].as_str()), (200, Some("ok")), "{v}");
}

/// A node that lost a cabinet's lease and does not know it yet (its next renewal is far off)
/// has its writes for the cabinet refused by storage: the new owner recorded a newer token.
/// Here the cabinet's old connection dies after it moved, and the old node's actor would store
/// it offline and raise `cabinet_offline` while the new node serves it.
#[actix_rt::test]
async fn a_former_owners_late_writes_are_refused_by_the_fencing_token() {
    let (a, b) = two_nodes_with(&[
        ("HUB__CLUSTER__LEASE_MS", "60000".to_owned()),
        ("HUB__CLUSTER__RENEW_MS", "30000".to_owned()),
    ])
    .await;
    let (op, secret) = cola_cabinet(&a, "KY2").await;
    let mut old = connect_to(&a, "KY2", &secret).await;
    old.heartbeat("closed", "locked", true, 1).await;
    leases(&a, 1).await;
    // The cabinet comes up on b while its old connection to a lingers.
    let mut new = connect_to(&b, "KY2", &secret).await;
    new.heartbeat("closed", "locked", true, 1).await;
    leases(&b, 1).await;
    // b's token is recorded (in the background of its claim).
    let start = Instant::now();
    while b.metric("cluster_fences_recorded_total").await < 1.0 {
        assert!(start.elapsed() < PATIENCE, "b's token never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    old.cut();
    let start = Instant::now();
    while a.metric("cluster_writes_refused_total").await < 2.0 {
        assert!(
            start.elapsed() < PATIENCE,
            "a's late writes were not refused: {}",
            a.metric("cluster_writes_refused_total").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(b
        .active_alert(&op, "KY2", "cabinet_offline")
        .await
        .is_none());
    let (s, rows) = b.get("/api/v1/cabinets", &op).await;
    assert_eq!(s, 200, "{rows}");
    assert_eq!(b.cabinet_state(&op, "KY2").await["online"], true);
    // b's own writes still land: its actor goes offline when the cabinet does.
    new.cut();
    b.eventually(PATIENCE, "cabinet_offline raised by b", || async {
        b.active_alert(&op, "KY2", "cabinet_offline")
            .await
            .map(|_| ())
    })
    .await;
}

/// `kill -9` of the node completing an order whose deduction failed, before the check it had
/// scheduled: the order would stay `completing` until that node came back. The leader completes
/// it again once it stalled (the provider refuses a second complete: nothing is charged twice)
/// and finds the deduction owed: the order is pending payment, as on a single node.
#[actix_rt::test]
async fn an_order_a_dead_node_left_completing_is_completed_by_the_leader() {
    let sim = Simulator::start().await;
    let (a, mut b) = two_nodes_with(&[
        ("HUB__PAYMENTS__SIMULATOR_URL", sim.url.clone()),
        ("HUB__PAYMENTS__DEDUCTION_CHECK_MS", "4000".into()),
        ("HUB__PAYMENTS__COMPLETION_STALLED_MS", "2000".into()),
        ("HUB__PAYMENTS__COLLECT_INTERVAL_MS", "800".into()),
        ("HUB__PAYMENTS__SIMULATOR_RETRY_SCALE", "0.01".into()),
    ])
    .await;
    let (op, secret) = cola_cabinet(&a, "KY3").await;
    let r = a
        .client
        .put(format!("{}/sim/users/u1", sim.url))
        .json(&serde_json::json!({"deduction": "fail"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.status().is_success(), "{}", r.status());
    let (mut c, session) = unlocked_through(&a, &b, &op, "KY3", &secret).await;
    crate::purchase::door_then_recognition(
        &mut c,
        serde_json::json!({"session_id": session, "status": "ok", "items": [{"sku": "cola", "qty": 1}]}),
    )
    .await;
    // Completed, the deduction failed, its check not due yet.
    let start = Instant::now();
    loop {
        let (_, v) = a.get(&format!("/api/v1/sessions/{session}"), &op).await;
        if v["order"]["status"] == "completing" && v["session"]["state"] == "closed" {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "never completing: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    b.kill9();
    let start = Instant::now();
    let v = loop {
        let (_, v) = a.get(&format!("/api/v1/sessions/{session}"), &op).await;
        if v["order"]["status"] == "pending_payment" {
            break v;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the order stayed {}: {v}",
            v["order"]["status"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["order"]["paid_fen"], 0, "{v}");
    assert_eq!(sim.charges(), 0, "nothing charged");
}

/// A request carried to a node that then dies is answered as soon as the cabinet is served
/// elsewhere (503 `node_unavailable`: ask again), not after the whole call timeout; asked
/// again, it reaches the new owner.
#[actix_rt::test]
async fn a_request_carried_to_a_node_that_died_is_answered_once_the_cabinet_moved() {
    let (a, mut b) = two_nodes().await;
    let (op, secret) = cola_cabinet(&a, "KY4").await;
    let mut c = connect_to(&b, "KY4", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(&b, 1).await;
    b.kill9();
    let asked = Instant::now();
    let pending = reboot_through(&a, &op, "KY4");
    // It waits in the dead node's stream while the cabinet reconnects to a.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.cut();
    let mut c = connect_to(&a, "KY4", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    leases(&a, 1).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("node_unavailable")),
        "{v}"
    );
    // Well within the call's own timeout (the unlock's 5 s and 10 s more).
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        asked.elapsed()
    );
    let pending = reboot_through(&a, &op, "KY4");
    let reboot = c.expect_command("reboot", PATIENCE).await;
    c.ack(&reboot, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s, v["outcome"].as_str()), (200, Some("ok")), "{v}");
}
