//! External-broker mode against a real Mosquitto, configured as the README tells an operator
//! to: a listener for cabinets (each confined to `/tenants/{id}/` by its ACL, its client id
//! forced to its username) and one for the hub's own account. Hub nodes attach to it as
//! clients, split the fleet by partition leases in Redis, carry requests between them, and take
//! a dead node's partitions over with what the broker queued for them meanwhile.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpStream;

use cabinet_hub::cluster::partitions::partition_of;

use crate::cluster::{node_spec, prefix, reboot_through, two_nodes_with};
use crate::harness::{free_port, fresh_postgres, options, Cabinet, Got, TestHub, PATIENCE};
use crate::node::{Node, Spec};

const HUB_USER: &str = "hub";
const HUB_PASSWORD: &str = "hub-password";
const PARTITIONS: u32 = 8;

/// The cabinets' ACL of the README: each publishes its own uplinks and reads its own commands.
const CABINET_ACL: &str = "\
pattern write /tenants/%u/status
pattern write /tenants/%u/heartbeat
pattern write /tenants/%u/event
pattern write /tenants/%u/ack
pattern write /tenants/%u/recognition
pattern read /tenants/%u/cmd
";

const HUB_ACL: &str = "user hub\ntopic readwrite /tenants/#\n";

fn program(name: &str) -> String {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("{name} is required for these tests (scripts/test installs it)"))
}

/// A Mosquitto of the test's own on free ports.
struct Mosquitto {
    child: Child,
    dir: tempfile::TempDir,
    /// Where cabinets connect.
    cabinets: u16,
    /// Where the hub connects.
    hub: u16,
}

impl Mosquitto {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (cabinets, hub) = (free_port(), free_port());
        let d = dir.path();
        std::fs::write(d.join("cabinets.acl"), CABINET_ACL).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("hub.acl"), HUB_ACL).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("cabinets.passwd"), "").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("hub.passwd"), "").unwrap_or_else(|e| panic!("{e}"));
        passwd(&d.join("hub.passwd"), HUB_USER, HUB_PASSWORD);
        let conf = format!(
            "per_listener_settings true
persistence false
max_queued_messages 0
listener {cabinets} 127.0.0.1
use_username_as_clientid true
allow_anonymous false
password_file {dir}/cabinets.passwd
acl_file {dir}/cabinets.acl
listener {hub} 127.0.0.1
allow_anonymous false
password_file {dir}/hub.passwd
acl_file {dir}/hub.acl
",
            dir = d.display()
        );
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(program("mosquitto"))
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mosquitto: {e}"));
        let start = Instant::now();
        for port in [cabinets, hub] {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(start.elapsed() < PATIENCE, "mosquitto never listened");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self {
            child,
            dir,
            cabinets,
            hub,
        }
    }

    /// Lets cabinet `id` in with `secret` (as an operator provisions the broker from the
    /// registration's answer) and has Mosquitto read its password file again.
    fn allow(&self, id: &str, secret: &str) {
        passwd(&self.dir.path().join("cabinets.passwd"), id, secret);
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill -HUP: {e}"));
        assert!(status.success());
    }

    fn cabinet_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.cabinets))
    }

    /// The environment that attaches a node to this broker.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "HUB__EXTERNAL_BROKER__URL",
                format!("mqtt://127.0.0.1:{}", self.hub),
            ),
            ("HUB__EXTERNAL_BROKER__USERNAME", HUB_USER.to_owned()),
            ("HUB__EXTERNAL_BROKER__PASSWORD", HUB_PASSWORD.to_owned()),
            ("HUB__EXTERNAL_BROKER__PARTITIONS", PARTITIONS.to_string()),
        ]
    }

    /// Connects cabinet `id` (retrying while Mosquitto has not read its password file yet),
    /// subscribed to its commands and online.
    async fn connect(&self, id: &str, secret: &str) -> Cabinet {
        let start = Instant::now();
        loop {
            match Cabinet::try_connect(options(self.cabinet_addr(), id, secret)).await {
                Ok(mut c) => {
                    c.subscribe_commands().await;
                    c.publish("status", json!({"online": true, "boot_id": "b1", "fw": "2.4.1", "model": "KM-400", "config_version": 1, "boot": "power_on"})).await;
                    return c;
                }
                Err(e) => {
                    assert!(start.elapsed() < PATIENCE, "{id} never let in: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn passwd(file: &Path, user: &str, password: &str) {
    let status = Command::new(program("mosquitto_passwd"))
        .arg("-b")
        .arg(file)
        .arg(user)
        .arg(password)
        .status()
        .unwrap_or_else(|e| panic!("mosquitto_passwd: {e}"));
    assert!(status.success(), "mosquitto_passwd failed");
}

/// One cabinet id in each partition: the fleet is split whichever partitions a node holds.
fn one_per_partition(prefix: &str) -> Vec<String> {
    let mut ids: Vec<Option<String>> = vec![None; PARTITIONS as usize];
    let mut i = 0;
    while ids.iter().any(Option::is_none) {
        let id = format!("{prefix}{i}");
        let p = partition_of(&id, PARTITIONS) as usize;
        if ids[p].is_none() {
            ids[p] = Some(id);
        }
        i += 1;
    }
    ids.into_iter().flatten().collect()
}

/// Waits until `series` on `hub` reads `value`.
async fn metric_is(hub: &TestHub, series: &str, value: f64) {
    let start = Instant::now();
    loop {
        let v = hub.metric(series).await;
        if v == value {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{series} never {value} (last {v})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers the cabinets through `hub`, lets them into the broker and connects them.
async fn fleet(
    hub: &TestHub,
    mq: &Mosquitto,
    ids: &[String],
) -> (String, Vec<Cabinet>, Vec<String>) {
    let (ma, op) = hub.merchant("m1").await;
    let mut secrets = Vec::new();
    for id in ids {
        secrets.push(hub.cabinet(&ma, "m1", id).await);
    }
    for (id, secret) in ids.iter().zip(&secrets) {
        mq.allow(id, secret);
    }
    let mut cabinets = Vec::new();
    for (id, secret) in ids.iter().zip(&secrets) {
        cabinets.push(mq.connect(id, secret).await);
    }
    (op, cabinets, secrets)
}

/// A heartbeat carrying `temp` as a marker.
async fn beat(c: &mut Cabinet, temp: f64) {
    c.seq += 1;
    c.publish(
        "heartbeat",
        json!({"seq": c.seq, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked",
        "temp_c": temp, "light": "on", "cameras": [{"id": 0, "ok": true}], "config_version": 1}),
    )
    .await;
}

/// Waits until `hub` shows the cabinet's temperature as `temp`.
async fn shows_temp(hub: &TestHub, key: &str, id: &str, temp: f64) {
    hub.eventually(PATIENCE, &format!("{id} at {temp} °C"), || async {
        (hub.cabinet_state(key, id).await["temp_c"].as_f64() == Some(temp)).then_some(())
    })
    .await;
}

/// Commands every cabinet through `via` and has it acknowledge.
async fn command_all(via: &TestHub, op: &str, cabinets: &mut [Cabinet]) {
    for c in cabinets.iter_mut() {
        let pending = reboot_through(via, op, &c.id);
        let reboot = c.expect_command("reboot", PATIENCE).await;
        c.ack(&reboot, true, None).await;
        let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s, v["outcome"].as_str(), v["cabinet_id"].as_str()),
            (200, Some("ok"), Some(c.id.as_str())),
            "{}: {v}",
            c.id
        );
    }
}

async fn two_external_nodes(mq: &Mosquitto) -> (Node, Node) {
    let env = mq.env();
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    two_nodes_with(&env).await
}

#[actix_rt::test]
async fn two_nodes_split_the_fleet_at_an_external_broker_and_carry_requests_between_them() {
    let mq = Mosquitto::start().await;
    let (a, b) = two_external_nodes(&mq).await;
    // Half the partitions each, once both count each other.
    metric_is(&a, "external_broker_partitions", 4.0).await;
    metric_is(&b, "external_broker_partitions", 4.0).await;
    // Registered after the nodes started: subscribed by whichever node reads its partition.
    let ids = one_per_partition("KE");
    let (op, mut cabinets, _) = fleet(&a, &mq, &ids).await;
    for c in cabinets.iter_mut() {
        beat(c, 5.5).await;
    }
    for id in &ids {
        shows_temp(&a, &op, id, 5.5).await;
        shows_temp(&b, &op, id, 5.5).await;
    }
    // Each node serves the cabinets of its partitions, and only those.
    metric_is(&a, "cluster_cabinet_leases", 4.0).await;
    metric_is(&b, "cluster_cabinet_leases", 4.0).await;
    assert_eq!(
        a.metric("external_broker_subscriptions").await
            + b.metric("external_broker_subscriptions").await,
        f64::from(PARTITIONS)
    );
    // Commanded through either node, each cabinet hears its command once, from the broker.
    command_all(&a, &op, &mut cabinets).await;
    command_all(&b, &op, &mut cabinets).await;
    // Half of each round went to the other node.
    for n in [&a, &b] {
        assert_eq!(
            n.metric("routed_calls_total{outcome=\"ok\",side=\"sent\"}")
                .await,
            4.0
        );
    }
    let (s, ready) = a.get("/readyz", "").await;
    assert_eq!((s, &ready["broker"]), (200, &json!(true)), "{ready}");
}

#[actix_rt::test]
async fn a_killed_nodes_partitions_move_and_what_its_cabinets_sent_meanwhile_is_processed() {
    let mq = Mosquitto::start().await;
    let (a, mut b) = two_external_nodes(&mq).await;
    metric_is(&a, "external_broker_partitions", 4.0).await;
    metric_is(&b, "external_broker_partitions", 4.0).await;
    let ids = one_per_partition("KF");
    let (op, mut cabinets, _) = fleet(&a, &mq, &ids).await;
    for c in cabinets.iter_mut() {
        beat(c, 5.5).await;
    }
    metric_is(&b, "cluster_cabinet_leases", 4.0).await;
    b.kill9();
    let killed = Instant::now();
    // Said while b's partitions have no reader, by half the fleet: the broker acknowledges and
    // queues them. The other half says nothing at all.
    for c in cabinets.iter_mut().step_by(2) {
        beat(c, 6.5).await;
    }
    metric_is(&a, "external_broker_partitions", f64::from(PARTITIONS)).await;
    // The lease (2 s) and a renewal round, with room for a busy machine.
    assert!(
        killed.elapsed() < Duration::from_secs(2 + 5),
        "partitions taken over after {:?}",
        killed.elapsed()
    );
    // Every cabinet is served by a at once, the silent ones too: a started their actors from
    // b's last picture of them, not waiting for their next heartbeat.
    metric_is(&a, "cluster_cabinet_leases", f64::from(PARTITIONS)).await;
    command_all(&a, &op, &mut cabinets).await;
    for c in cabinets.iter().step_by(2) {
        shows_temp(&a, &op, &c.id, 6.5).await;
    }
    // The online gauge counts each cabinet once.
    metric_is(&a, "cabinets_online", f64::from(PARTITIONS)).await;
}

#[actix_rt::test]
async fn at_the_external_broker_a_cabinet_cannot_read_or_write_another_cabinets_topics() {
    let mq = Mosquitto::start().await;
    // One node, no Redis: it reads every partition.
    let mut spec = Spec::new();
    for (k, v) in mq.env() {
        spec = spec.env(k, v);
    }
    let hub = spec.start().await;
    metric_is(&hub, "external_broker_partitions", f64::from(PARTITIONS)).await;
    let ids = vec!["KGA".to_owned(), "KGB".to_owned()];
    let (op, mut cabinets, secrets) = fleet(&hub, &mq, &ids).await;
    let mut b = cabinets.pop().unwrap_or_else(|| panic!("two cabinets"));
    let mut a = cabinets.pop().unwrap_or_else(|| panic!("two cabinets"));
    beat(&mut a, 5.5).await;
    shows_temp(&hub, &op, "KGA", 5.5).await;

    // b forges a's door opening: the broker acknowledges and drops it. a's own marker, sent
    // after, is processed; the forgery, queued before it had it been let through, was not.
    b.publish_raw(
        "/tenants/KGA/event",
        json!({"seq": 100, "ts": 1_763_700_000_000u64, "type": "door_opened"})
            .to_string()
            .into_bytes(),
    )
    .await;
    // Answered (or the connection closed) before a's marker is sent.
    loop {
        match tokio::time::timeout(PATIENCE, b.rx.recv()).await {
            Ok(Some(Got::PubAck | Got::Closed(_)) | None) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("the broker never answered b's forged publish"),
        }
    }
    beat(&mut a, 6.5).await;
    shows_temp(&hub, &op, "KGA", 6.5).await;
    let state = hub.cabinet_state(&op, "KGA").await;
    assert_eq!(state["door"], "closed", "{state}");
    assert!(hub.active_alert(&op, "KGA", "door_forced").await.is_none());

    // b subscribing to a's commands: refused, or the broker closes the connection; a's
    // command reaches a and never b.
    for filter in ["/tenants/KGA/cmd", "/tenants/+/cmd", "#"] {
        let mut spy = Cabinet::try_connect(options(mq.cabinet_addr(), "KGB", &secrets[1]))
            .await
            .unwrap_or_else(|e| panic!("b's own account: {e}"));
        let open = spy.subscribe_or_closed(filter, PATIENCE).await.is_ok();
        command_all(&hub, &op, std::slice::from_mut(&mut a)).await;
        if open {
            assert!(
                spy.try_command("reboot", Duration::from_secs(1))
                    .await
                    .is_none(),
                "b read a's command through {filter}"
            );
        }
    }
    // Claiming a's client id with b's account does not push a off the broker: the listener
    // takes the username as the client id.
    let posing = Cabinet::try_connect({
        let mut o = options(mq.cabinet_addr(), "KGA", &secrets[1]);
        o.set_credentials("KGB", &secrets[1]);
        o
    })
    .await;
    assert!(posing.is_ok(), "b's own account is let in");
    // A wrong secret is not.
    assert!(
        Cabinet::try_connect(options(mq.cabinet_addr(), "KGA", "wrong-secret"))
            .await
            .is_err(),
        "a wrong secret was let in"
    );
    command_all(&hub, &op, std::slice::from_mut(&mut a)).await;
}

/// A second node joining: the first hands half its partitions over cleanly, and their cabinets
/// are served by the newcomer at once, without waiting for their next heartbeat.
#[actix_rt::test]
async fn a_node_joining_takes_half_the_fleet_over_without_a_gap() {
    let mq = Mosquitto::start().await;
    let (db, p) = (fresh_postgres().await, prefix());
    let spec = |name: &str| {
        // Offline after 3 s without a heartbeat: an actor left behind would say so.
        let mut s = node_spec(&db, &p, name).env("HUB__CABINET__HEARTBEAT_S", 1);
        for (k, v) in mq.env() {
            s = s.env(k, v);
        }
        s
    };
    let a = spec("node-a").start().await;
    metric_is(&a, "external_broker_partitions", f64::from(PARTITIONS)).await;
    let ids = one_per_partition("KH");
    let (op, mut cabinets, _) = fleet(&a, &mq, &ids).await;
    for c in cabinets.iter_mut() {
        beat(c, 5.5).await;
    }
    metric_is(&a, "cluster_cabinet_leases", f64::from(PARTITIONS)).await;
    // Beating all through the handover.
    let beating: Vec<_> = cabinets.iter().map(Cabinet::keep_beating).collect();
    let b = spec("node-b").start().await;
    metric_is(&a, "external_broker_partitions", 4.0).await;
    metric_is(&b, "external_broker_partitions", 4.0).await;
    metric_is(&b, "cluster_cabinet_leases", 4.0).await;
    metric_is(&a, "cluster_cabinet_leases", 4.0).await;
    command_all(&b, &op, &mut cabinets).await;
    command_all(&a, &op, &mut cabinets).await;
    // a's actors for the cabinets that moved hear nothing more; past their heartbeat window
    // they no longer speak for them: no cabinet is taken offline.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for id in &ids {
        let alert = a.active_alert(&op, id, "cabinet_offline").await;
        assert!(
            alert.is_none(),
            "{id} taken offline by an actor left behind: {alert:?}\nA: {}\nB: {}",
            a.stderr()
                .lines()
                .filter(|l| l.contains(id.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
            b.stderr()
                .lines()
                .filter(|l| l.contains(id.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(a.cabinet_state(&op, id).await["online"], true, "{id}");
    }
    for t in beating {
        t.abort();
    }
    for c in cabinets.iter_mut() {
        // Past the numbers the background beats used.
        c.seq += 1_000;
        beat(c, 7.5).await;
    }
    for id in &ids {
        shows_temp(&a, &op, id, 7.5).await;
        shows_temp(&b, &op, id, 7.5).await;
    }
}
