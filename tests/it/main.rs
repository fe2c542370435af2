//! Black-box integration tests: the hub on free ports with a fresh database, cabinets as real
//! MQTT clients, the real PostgreSQL. One binary (faster linking).

mod alipay;
mod attacks;
mod audit;
mod bills;
mod browser;
mod catalog;
mod cluster;
mod confirm;
mod crash;
mod external;
mod feed;
mod flow;
mod harness;
mod i18n;
mod keys;
mod node;
mod notices;
mod ops;
mod purchase;
mod readiness;
mod recognition;
mod refunds;
mod reminders;
mod service_orders;
mod settlement;
mod startup;
mod stock;
mod stock_page;
mod store;
mod stuck;
mod wechat;

use std::time::Duration;

use serde_json::{json, Value};

use harness::{Backend, Cabinet, TestHub, ADMIN_KEY};

const SEC: Duration = Duration::from_secs(1);

both!(
    credentials_good_and_bad,
    heartbeat_reaches_the_api,
    door_forced_alert_in_api_and_metrics_until_cleared,
    lock_not_latched_faults_and_locks_down,
    camera_fault_cleared_by_camera_ok,
    offline_by_last_will,
    offline_by_missed_heartbeats,
    config_change_while_offline_arrives_on_reconnect,
    command_outcomes,
    an_unacked_command_times_out,
    every_rejection_reason_is_counted,
    certificate_mode_confines_a_cabinet_to_its_namespace,
    password_mode_confines_a_cabinet_to_its_namespace,
    merchant_scoping_on_every_endpoint,
    health_readiness_and_alert_ack,
);

async fn credentials_good_and_bad(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, _) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    // Registered but not activated.
    let (s, reg) = hub
        .post(
            "/api/v1/cabinets",
            &ma,
            json!({"id": "KM2", "merchant_id": "m1"}),
        )
        .await;
    assert_eq!(s, 201);
    let km2_secret = reg["secret"].as_str().unwrap_or_default();

    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "KM1", &secret))
            .await
            .is_ok()
    );
    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "KM1", "wrong-secret"))
            .await
            .is_err()
    );
    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "GHOST1", &secret))
            .await
            .is_err()
    );
    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "KM2", km2_secret))
            .await
            .is_err()
    );
    let mut o = harness::options(hub.mqtt, "KM1", &secret);
    o.set_credentials("KM9", &secret);
    assert!(
        Cabinet::try_connect(o).await.is_err(),
        "username must be the client id"
    );

    assert_eq!(
        hub.metric(r#"mqtt_auth_failures_total{reason="bad_secret"}"#)
            .await,
        1.0
    );
    assert_eq!(
        hub.metric(r#"mqtt_auth_failures_total{reason="unknown_cabinet"}"#)
            .await,
        1.0
    );
    assert_eq!(
        hub.metric(r#"mqtt_auth_failures_total{reason="not_active"}"#)
            .await,
        1.0
    );
    assert_eq!(
        hub.metric(r#"mqtt_auth_failures_total{reason="username_mismatch"}"#)
            .await,
        1.0
    );
    // Activating KM2 lets it in.
    let (s, _) = hub
        .post("/api/v1/cabinets/KM2/activate", &ma, json!({}))
        .await;
    assert_eq!(s, 200);
    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "KM2", km2_secret))
            .await
            .is_ok()
    );
}

async fn heartbeat_reaches_the_api(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    let state = hub
        .eventually(SEC, "heartbeat state in the API", || async {
            let s = hub.cabinet_state(&op, "KM1").await;
            (s["online"] == true && s["door"] == "closed" && s["temp_c"] == 4.6).then_some(s)
        })
        .await;
    assert_eq!(state["lock"], "locked");
    assert_eq!(state["light"], "on");
    assert_eq!(state["cameras"], json!([{"id": 0, "ok": true}]));
    assert_eq!(state["fw"], "2.4.1");
    assert_eq!(
        state["config_version"],
        json!({"desired": 1, "reported": 1})
    );
    assert!(state["service_expires_at"].is_string());
    let (_, list) = hub.get("/api/v1/cabinets", &op).await;
    assert_eq!(list["count"], 1);
    assert_eq!(list["online"], 1);
    assert_eq!(hub.metric("cabinets_online").await, 1.0);
}

async fn door_forced_alert_in_api_and_metrics_until_cleared(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.event("door_opened").await;
    let alert = hub
        .eventually(SEC, "door_forced alert", || {
            hub.active_alert(&op, "KM1", "door_forced")
        })
        .await;
    assert_eq!(alert["severity"], "critical");
    let series = r#"cabinet_alert_active{cabinet="KM1",merchant="m1",severity="critical",type="door_forced"}"#;
    assert_eq!(hub.metric(series).await, 1.0);
    assert_eq!(
        hub.metric(r#"cabinet_alerts_raised_total{type="door_forced"}"#)
            .await,
        1.0
    );
    // A burst of the same condition raises nothing more.
    for _ in 0..5 {
        c.event("door_closed").await;
        c.event("lock_locked").await;
        c.event("door_opened").await;
    }
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hub.metric(r#"cabinet_alerts_raised_total{type="door_forced"}"#)
            .await,
        1.0
    );
    let state = hub.cabinet_state(&op, "KM1").await;
    assert_eq!(state["alerts"].as_array().map(Vec::len), Some(1));

    let id = alert["id"].as_str().unwrap_or_default();
    let (s, cleared) = hub
        .post(&format!("/api/v1/alerts/{id}/clear"), &op, json!({}))
        .await;
    assert_eq!(s, 200, "{cleared}");
    assert_eq!(cleared["active"], false);
    assert!(hub.active_alert(&op, "KM1", "door_forced").await.is_none());
    hub.eventually(SEC, "series removed", || async {
        (!hub.metrics().await.contains(series)).then_some(())
    })
    .await;
    let state = hub.cabinet_state(&op, "KM1").await;
    assert_eq!(state["alerts"], json!([]));
    // History keeps it.
    let (_, all) = hub.get("/api/v1/alerts?cabinet_id=KM1", &op).await;
    assert_eq!(all["count"], 1);
    assert!(all["items"][0]["cleared_by"].is_string());
}

async fn lock_not_latched_faults_and_locks_down(b: Backend) {
    // The latch deadline is what is tested: short here, where no step of the test's own cabinet
    // has to beat it.
    let hub = TestHub::start_with(b, |s| s.cabinet.latch_timeout_ms = 1_000).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    // A restock session opens the door legitimately.
    let hub_ref = &hub;
    let op_ref = op.clone();
    let unlock = actix_rt::spawn({
        let client = hub_ref.client.clone();
        let url = hub_ref.url("/api/v1/cabinets/KM1/commands");
        async move {
            client
                .post(url)
                .bearer_auth(op_ref)
                .json(&json!({"type": "unlock", "mode": "restock"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let cmd = c.expect_command("unlock", 2 * SEC).await;
    assert_eq!(cmd["mode"], "restock");
    c.ack(&cmd, true, None).await;
    // A manual unlock is a restock session: answered like a session start.
    assert_eq!(unlock.await.ok().and_then(Result::ok), Some(201));
    c.event("door_opened").await;
    c.event("door_closed").await;
    // No lock_locked: after the latch timeout (1 s here) the cabinet is faulted and locked down.
    let lockdown = c.expect_command("lockdown", 3 * SEC).await;
    assert_eq!(lockdown["on"], true);
    assert_eq!(lockdown["reason"], "lock_not_latched");
    c.ack(&lockdown, true, None).await;
    let alert = hub
        .eventually(SEC, "lock_not_latched", || {
            hub.active_alert(&op, "KM1", "lock_not_latched")
        })
        .await;
    assert_eq!(alert["severity"], "critical");
    let state = hub
        .eventually(SEC, "faulted", || async {
            let s = hub.cabinet_state(&op, "KM1").await;
            (s["faulted"] == true && s["locked_down"] == true).then_some(s)
        })
        .await;
    assert!(
        hub.active_alert(&op, "KM1", "door_forced").await.is_none(),
        "{state}"
    );
    // Latching clears it and lifts the lock-down.
    c.event("lock_locked").await;
    let release = c.expect_command("lockdown", 2 * SEC).await;
    assert_eq!(release["on"], false);
    hub.eventually(SEC, "alert cleared", || async {
        hub.active_alert(&op, "KM1", "lock_not_latched")
            .await
            .is_none()
            .then_some(())
    })
    .await;
}

async fn camera_fault_cleared_by_camera_ok(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.event("camera_fault").await;
    hub.eventually(SEC, "camera_fault", || {
        hub.active_alert(&op, "KM1", "camera_fault")
    })
    .await;
    assert_eq!(hub.metric(r#"cabinet_alert_active{cabinet="KM1",merchant="m1",severity="major",type="camera_fault"}"#).await, 1.0);
    c.event("camera_ok").await;
    hub.eventually(SEC, "camera_fault cleared", || async {
        hub.active_alert(&op, "KM1", "camera_fault")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    // And by heartbeat.
    c.heartbeat("closed", "locked", false, 1).await;
    hub.eventually(SEC, "camera_fault by heartbeat", || {
        hub.active_alert(&op, "KM1", "camera_fault")
    })
    .await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.eventually(SEC, "cleared by heartbeat", || async {
        hub.active_alert(&op, "KM1", "camera_fault")
            .await
            .is_none()
            .then_some(())
    })
    .await;

    // A camera toggling fault/ok: raised twice above; the 6th raise within 10 minutes is
    // flapping, after which it stays one active alert whose count goes up, with no new rows.
    for _ in 0..8 {
        c.event("camera_fault").await;
        c.event("camera_ok").await;
    }
    let (alerts, active) = hub
        .eventually(5 * SEC, "one flapping alert with its count", || async {
            let (_, all) = hub.get("/api/v1/alerts?cabinet_id=KM1", &op).await;
            let active = all["items"]
                .as_array()?
                .iter()
                .find(|a| a["active"] == true)?
                .clone();
            (active["flapping"] == true).then_some((all, active))
        })
        .await;
    assert_eq!(alerts["count"], 6, "five ordinary rows, then one: {alerts}");
    // The stored count follows at most every 10 s; the live state has it at once.
    assert!(
        active["flaps"]
            .as_u64()
            .is_some_and(|n| (6..=10).contains(&n)),
        "{active}"
    );
    let state = hub
        .eventually(5 * SEC, "the live count", || async {
            let state = hub.cabinet_state(&op, "KM1").await;
            (state["alerts"][0]["flaps"] == 10).then_some(state)
        })
        .await;
    assert_eq!(
        (
            state["alerts"][0]["type"].clone(),
            state["alerts"][0]["flapping"].clone(),
            state["alerts"][0]["flaps"].clone()
        ),
        (json!("camera_fault"), json!(true), json!(10)),
        "{state}"
    );
    assert_eq!(
        hub.metric(r#"cabinet_alerts_raised_total{type="camera_fault"}"#)
            .await,
        6.0
    );
}

async fn offline_by_last_will(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    c.cut();
    // Well before the 90 s heartbeat window: this is the Will, not the timer.
    hub.eventually(2 * SEC, "offline by the Will", || async {
        (hub.cabinet_state(&op, "KM1").await["online"] == false).then_some(())
    })
    .await;
    hub.eventually(SEC, "cabinet_offline", || {
        hub.active_alert(&op, "KM1", "cabinet_offline")
    })
    .await;
    assert_eq!(hub.metric("cabinets_online").await, 0.0);
    // Coming back clears it.
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.eventually(SEC, "back online", || async {
        hub.active_alert(&op, "KM1", "cabinet_offline")
            .await
            .is_none()
            .then_some(())
    })
    .await;
}

async fn offline_by_missed_heartbeats(b: Backend) {
    // The heartbeat window is what is tested: 2 × 2 s here. Cabinets registered on this hub get
    // its 2 s heartbeat in their configuration.
    let hub = TestHub::start_with(b, |s| {
        s.cabinet.heartbeat_s = 2;
        s.cabinet.missed_heartbeats = 2;
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    // Taken before the last message the cabinet sends: the hub saw it later than this, so the
    // window cannot end sooner than 4 s from here, however slowly the test itself runs. (No
    // wait for "online" in between: on a starved machine the window could pass before it looks;
    // the alert below is only raised for a cabinet that was online.)
    let started = std::time::Instant::now();
    c.heartbeat("closed", "locked", true, 1).await;
    // Connected but silent: 2 × 2 s later it is offline.
    hub.eventually(6 * SEC, "offline by missed heartbeats", || {
        hub.active_alert(&op, "KM1", "cabinet_offline")
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(3500),
        "not before the window: {:?}",
        started.elapsed()
    );
    drop(c);
}

async fn config_change_while_offline_arrives_on_reconnect(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    c.cut();
    hub.eventually(2 * SEC, "offline", || async {
        (hub.cabinet_state(&op, "KM1").await["online"] == false).then_some(())
    })
    .await;

    let (s, b) = hub
        .call(
            "PATCH",
            "/api/v1/cabinets/KM1/config",
            &op,
            Some(json!({"temp_target_c": 6.5, "light": {"on": "06:30", "off": "22:00"}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["config"]["version"], 2);
    assert_eq!(b["pushed"], false);
    let (s, bad) = hub
        .call(
            "PATCH",
            "/api/v1/cabinets/KM1/config",
            &op,
            Some(json!({"light": {"on": "25:00", "off": "22:00"}})),
        )
        .await;
    assert_eq!(
        (s, bad["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );

    // Same boot, reconnecting with the old version: the hub reconciles.
    let mut c = Cabinet::connect_as(&hub, "KM1", &secret, "b1", 1).await;
    let cfg = c.expect_command("configure", 2 * SEC).await;
    assert_eq!(cfg["config"]["version"], 2);
    assert_eq!(cfg["config"]["temp_target_c"], 6.5);
    assert_eq!(
        cfg["config"]["light"],
        json!({"on": "06:30", "off": "22:00"})
    );
    c.ack(&cfg, true, None).await;
    c.heartbeat("closed", "locked", true, 2).await;
    hub.eventually(SEC, "reported 2", || async {
        (hub.cabinet_state(&op, "KM1").await["config_version"]
            == json!({"desired": 2, "reported": 2}))
        .then_some(())
    })
    .await;
    // A heartbeat that reports an older version gets configure again.
    c.heartbeat("closed", "locked", true, 1).await;
    let again = c.expect_command("configure", 2 * SEC).await;
    assert_eq!(again["config"]["version"], 2);
}

async fn command(
    hub: &TestHub,
    key: &str,
    cabinet: &str,
    body: Value,
) -> actix_rt::task::JoinHandle<(u16, Value)> {
    let client = hub.client.clone();
    let url = hub.url(&format!("/api/v1/cabinets/{cabinet}/commands"));
    let key = key.to_owned();
    actix_rt::spawn(async move {
        let r = client
            .post(url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    })
}

async fn command_outcomes(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;

    // Never connected since start: never sent.
    let (s, r) = hub
        .post(
            "/api/v1/cabinets/KM1/commands",
            &op,
            json!({"type": "reboot"}),
        )
        .await;
    assert_eq!((s, r["outcome"].clone()), (200, json!("not_connected")));

    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;

    let pending = command(&hub, &op, "KM1", json!({"type": "reboot"})).await;
    let cmd = c.expect_command("reboot", 2 * SEC).await;
    c.ack(&cmd, true, None).await;
    let (s, r) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, r["outcome"].clone(), r["cmd_id"].clone()),
        (200, json!("ok"), cmd["cmd_id"].clone())
    );

    let pending = command(
        &hub,
        &op,
        "KM1",
        json!({"type": "lockdown", "on": true, "reason": "maintenance"}),
    )
    .await;
    let cmd = c.expect_command("lockdown", 2 * SEC).await;
    c.ack(&cmd, false, Some("busy")).await;
    let (_, r) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r["outcome"].clone(), r["error"].clone()),
        (json!("rejected"), json!("busy"))
    );

    // Offline (Will): not sent.
    c.cut();
    hub.eventually(2 * SEC, "offline", || async {
        (hub.cabinet_state(&op, "KM1").await["online"] == false).then_some(())
    })
    .await;
    let (_, r) = hub
        .post(
            "/api/v1/cabinets/KM1/commands",
            &op,
            json!({"type": "reboot"}),
        )
        .await;
    assert_eq!(r["outcome"], "not_connected");

    let m = hub.metrics().await;
    for outcome in ["ok", "rejected", "not_connected"] {
        assert!(
            m.contains(&format!("outcome=\"{outcome}\"")),
            "cabinet_command_duration_seconds has {outcome}"
        );
    }
    // Bad input is a clear 400.
    let (s, r) = hub
        .post(
            "/api/v1/cabinets/KM1/commands",
            &op,
            json!({"type": "explode"}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );
}

/// A command the cabinet never acks ends as `timeout` after the ack deadline. On a hub of its
/// own: the deadline is short here, and no acked command of `command_outcomes` must race it.
async fn an_unacked_command_times_out(b: Backend) {
    let hub = TestHub::start_with(b, |s| s.cabinet.command_ack_timeout_ms = 1_000).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;
    let pending = command(&hub, &op, "KM1", json!({"type": "reboot"})).await;
    c.expect_command("reboot", 2 * SEC).await;
    let (_, r) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r["outcome"], "timeout", "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap_or(0) >= 1000, "{r}");
    assert!(
        hub.metrics().await.contains("outcome=\"timeout\""),
        "cabinet_command_duration_seconds has timeout"
    );
}

async fn every_rejection_reason_is_counted(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    let big = format!(
        r#"{{"cmd_id":"c1","ok":true,"error":"{}"}}"#,
        "x".repeat(17 * 1024)
    );
    // Topics outside the cabinet's own uplinks (`bad_topic`, `unknown_topic`, `bad_cabinet_id`,
    // `unknown_cabinet` at the edge) never get past the broker any more: the confinement tests
    // count them as `mqtt_refused_total`. What reaches the edge is judged on its payload.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/tenants/KM1/ack", big.into_bytes(), "oversize"),
        (
            "/tenants/KM1/heartbeat",
            b"{not json".to_vec(),
            "malformed_json",
        ),
        (
            "/tenants/KM1/heartbeat",
            br#"{"seq":"two","ts":1,"door":"closed","lock":"locked"}"#.to_vec(),
            "invalid_payload",
        ),
        (
            "/tenants/KM1/recognition",
            br#"{"session_id":"s1","status":"ok","items":[{"sku":"cola","qty":4294967295},{"sku":"cola","qty":1}]}"#.to_vec(),
            "out_of_range",
        ),
    ];
    for (topic, payload, _) in &cases {
        c.publish_raw(topic, payload.clone()).await;
    }
    for (_, _, reason) in &cases {
        let series = format!(r#"mqtt_rejected_total{{reason="{reason}"}}"#);
        hub.eventually(5 * SEC, reason, || async {
            (hub.metric(&series).await == 1.0).then_some(())
        })
        .await;
    }
    // A redelivered heartbeat (same seq in the same boot) is dropped and counted.
    c.seq -= 1;
    c.heartbeat("open", "locked", true, 1).await;
    hub.eventually(SEC, "duplicate counted", || async {
        (hub.metric("mqtt_duplicates_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        hub.cabinet_state(&op, "KM1").await["door"],
        "closed",
        "the duplicate changed nothing"
    );
    // Nothing malformed crashed anything: the cabinet still works.
    c.heartbeat("open", "unlocked", true, 1).await;
    hub.eventually(SEC, "still processing", || async {
        (hub.cabinet_state(&op, "KM1").await["door"] == "open").then_some(())
    })
    .await;
}

async fn certificate_mode_confines_a_cabinet_to_its_namespace(b: Backend) {
    let tls_port = harness::free_port();
    let hub = TestHub::start_with(b, |s| {
        s.mqtt.tls_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], tls_port)))
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret_b = hub.cabinet(&ma, "m1", "KMB").await;
    hub.cabinet(&ma, "m1", "KMA").await;
    let (s, cert) = hub
        .post("/api/v1/cabinets/KMA/certificate", &ma, json!({}))
        .await;
    assert_eq!(s, 201, "{cert}");
    let (ca, crt, key) = (
        cert["ca_pem"].as_str().unwrap_or_default(),
        cert["cert_pem"].as_str().unwrap_or_default(),
        cert["key_pem"].as_str().unwrap_or_default(),
    );
    let tls = hub.mqtt_tls.unwrap_or_else(|| panic!("no TLS listener"));
    // A connection that never starts its handshake, open for the whole test: every other cabinet
    // must still get in. (rumqttd ran the handshake in its accept loop, so this one connection
    // locked every certificate-mode cabinet out.)
    let _silent = tokio::net::TcpStream::connect(tls)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Without a client certificate: refused.
    let mut anon = harness::tls_options(tls, "KMA", ca, crt, key);
    anon.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: ca.as_bytes().to_vec(),
            alpn: None,
            client_auth: None,
        },
    ));
    assert!(Cabinet::try_connect(anon).await.is_err());

    let opts = harness::tls_options(tls, "KMA", ca, crt, key);
    assert_confined(&hub, &op, &secret_b, opts.clone()).await;

    // Re-issuing revokes the certificate it replaces; revoking leaves none.
    let (s, again) = hub
        .post("/api/v1/cabinets/KMA/certificate", &ma, json!({}))
        .await;
    assert_eq!(s, 201, "{again}");
    assert!(
        Cabinet::try_connect(opts).await.is_err(),
        "a replaced certificate still connects"
    );
    let fresh = harness::tls_options(
        tls,
        "KMA",
        ca,
        again["cert_pem"].as_str().unwrap_or_default(),
        again["key_pem"].as_str().unwrap_or_default(),
    );
    drop(
        Cabinet::try_connect(fresh.clone())
            .await
            .unwrap_or_else(|e| panic!("the new certificate: {e}")),
    );
    let (s, _) = hub
        .call("DELETE", "/api/v1/cabinets/KMA/certificate", &ma, None)
        .await;
    assert_eq!(s, 204);
    assert!(Cabinet::try_connect(fresh).await.is_err());
    assert!(
        hub.metric("mqtt_auth_failures_total{reason=\"revoked_certificate\"}")
            .await
            >= 2.0
    );
}

/// A certificate-only deployment: no password listener at all, certificate mode as usual; and
/// neither listener is refused at start-up.
#[actix_rt::test]
async fn the_password_listener_can_be_switched_off() {
    let tls_port = harness::free_port();
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.mqtt.password_enabled = false;
        s.mqtt.tls_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], tls_port)));
    })
    .await;
    let (ma, _) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KMA").await;
    assert!(
        tokio::net::TcpStream::connect(hub.mqtt).await.is_err(),
        "something listens on the password port"
    );
    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "KMA", &secret))
            .await
            .is_err()
    );
    let (s, cert) = hub
        .post("/api/v1/cabinets/KMA/certificate", &ma, json!({}))
        .await;
    assert_eq!(s, 201, "{cert}");
    let tls = hub.mqtt_tls.unwrap_or_else(|| panic!("no TLS listener"));
    drop(
        Cabinet::try_connect(harness::tls_options(
            tls,
            "KMA",
            cert["ca_pem"].as_str().unwrap_or_default(),
            cert["cert_pem"].as_str().unwrap_or_default(),
            cert["key_pem"].as_str().unwrap_or_default(),
        ))
        .await
        .unwrap_or_else(|e| panic!("certificate mode: {e}")),
    );
    let (s, ready) = hub.get("/readyz", ADMIN_KEY).await;
    assert_eq!(s, 200, "ready on the certificate listener alone: {ready}");

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut none = harness::test_settings(dir.path());
    none.mqtt.password_enabled = false;
    let err = cabinet_hub::Application::build(none)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_else(|| panic!("a hub with no MQTT listener started"));
    assert!(err.contains("HUB__MQTT__PASSWORD_ENABLED"), "{err}");
}

async fn password_mode_confines_a_cabinet_to_its_namespace(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma, _) = hub.merchant("m1").await;
    let (mb, op_b) = hub.merchant("m2").await;
    let secret_a = hub.cabinet(&ma, "m1", "KMA").await;
    let secret_b = hub.cabinet(&mb, "m2", "KMB").await;
    assert_confined(
        &hub,
        &op_b,
        &secret_b,
        harness::options(hub.mqtt, "KMA", &secret_a),
    )
    .await;

    // A leaked secret is replaced: the old one no longer connects, the new one does.
    let (s, v) = hub
        .post("/api/v1/cabinets/KMA/secret", &ma, json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    let fresh = v["secret"].as_str().unwrap_or_default().to_owned();
    assert!(!fresh.is_empty() && fresh != secret_a);
    assert!(
        Cabinet::try_connect(harness::options(hub.mqtt, "KMA", &secret_a))
            .await
            .is_err()
    );
    drop(
        Cabinet::try_connect(harness::options(hub.mqtt, "KMA", &fresh))
            .await
            .unwrap_or_else(|e| panic!("the new secret: {e}")),
    );
    let (s, _) = hub
        .post("/api/v1/cabinets/KMA/secret", &mb, json!({}))
        .await;
    assert_eq!(s, 404, "another merchant's admin rotated KMA's secret");
}

/// Cabinet A (connecting with `a`) tries every way into password-mode cabinet KMB's traffic:
/// each forged publish closes its connection unacknowledged, each foreign subscription is
/// refused while its own is granted, and B — honest, listening — sees nothing of it.
async fn assert_confined(hub: &TestHub, op: &str, secret_b: &str, a: rumqttc::MqttOptions) {
    let mut cab_b = Cabinet::connect(hub, "KMB", secret_b).await;
    cab_b.heartbeat("closed", "locked", true, 1).await;
    hub.eventually(5 * SEC, "B online", || async {
        (hub.cabinet_state(op, "KMB").await["door"] == "closed").then_some(())
    })
    .await;
    let evil_unlock = json!({"cmd_id": "evil", "type": "unlock", "session_id": "x", "mode": "purchase", "expires_at": 9_999_999_999_999u64});
    let long = format!("/tenants/KMA/{}", "x".repeat(200));
    let forgeries: Vec<(&str, Value, bool)> = vec![
        (
            "/tenants/KMB/event",
            json!({"seq": 99, "ts": 1, "type": "door_opened"}),
            false,
        ),
        ("/tenants/KMB/cmd", evil_unlock, false),
        ("/tenants/KMB/status", json!({"online": false}), false),
        (
            "/tenants/KMB/ack",
            json!({"cmd_id": "c_1", "ok": true}),
            false,
        ),
        (
            "/tenants/KMB/recognition",
            json!({"session_id": "s", "status": "ok", "items": []}),
            false,
        ),
        (
            "/tenants/KMA/cmd",
            json!({"cmd_id": "self", "type": "reboot"}),
            false,
        ),
        (
            "/tenants/KMA/heartbeat",
            json!({"seq": 1, "ts": 1, "door": "closed", "lock": "locked"}),
            true,
        ),
        (long.as_str(), json!({}), false),
    ];
    for (topic, payload, retain) in forgeries {
        // A connection that closes before the forgery is even sent (the broker still tearing
        // down the previous one of the same client id) is tried again: what is asserted is
        // what the broker does with the forgery.
        let mut closed = false;
        for _ in 0..3 {
            let mut forger = Cabinet::try_connect(a.clone())
                .await
                .unwrap_or_else(|e| panic!("A connects: {e}"));
            let sent = forger
                .client
                .publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    retain,
                    payload.to_string(),
                )
                .await;
            if sent.is_ok() {
                forger.expect_closed(5 * SEC).await;
                closed = true;
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(closed, "the forgery on {topic} was never sent");
    }
    actix_rt::time::sleep(Duration::from_millis(200)).await;

    // The spy: as for the forgeries, a connection the broker closes while it still tears down
    // the last forger's (same client id) is tried again; its first subscription tells.
    let mut spy = None;
    for _ in 0..3 {
        let mut c = Cabinet::try_connect(a.clone())
            .await
            .unwrap_or_else(|e| panic!("A connects: {e}"));
        if let Ok(granted) = c.subscribe_or_closed("#", 5 * SEC).await {
            assert!(!granted, "# was granted");
            spy = Some(c);
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    let mut spy = spy.unwrap_or_else(|| panic!("A's spy connection kept being closed"));
    for filter in [
        "/tenants/KMB/heartbeat",
        "/tenants/+/heartbeat",
        "/tenants/KMA/#",
    ] {
        assert!(
            !spy.try_subscribe(filter, 5 * SEC).await,
            "{filter} was granted"
        );
    }
    assert!(spy.try_subscribe("/tenants/KMA/cmd", 5 * SEC).await);

    // B goes on: its next heartbeat is processed, and nothing A forged took effect.
    cab_b.seq += 1;
    cab_b
        .publish(
            "heartbeat",
            json!({"seq": cab_b.seq, "ts": 2, "door": "closed", "lock": "locked", "temp_c": 2.5}),
        )
        .await;
    hub.eventually(5 * SEC, "B's genuine heartbeat", || async {
        (hub.cabinet_state(op, "KMB").await["temp_c"] == 2.5).then_some(())
    })
    .await;
    assert!(hub.active_alert(op, "KMB", "door_forced").await.is_none());
    assert_eq!(hub.cabinet_state(op, "KMB").await["online"], true);
    while let Ok(got) = cab_b.rx.try_recv() {
        if let harness::Got::Command(c) = got {
            assert_ne!(c["cmd_id"], "evil", "B received a command forged by A");
        }
    }
    // A heard none of B's traffic on its one granted subscription.
    while let Ok(got) = spy.rx.try_recv() {
        assert!(!matches!(got, harness::Got::Command(_)), "A read {got:?}");
    }
    for (reason, at_least) in [
        ("foreign_topic", 5.0),
        ("not_uplink", 1.0),
        ("retain", 1.0),
        ("topic_too_long", 1.0),
        ("forbidden_filter", 4.0),
    ] {
        let n = hub
            .metric(&format!("mqtt_refused_total{{reason=\"{reason}\"}}"))
            .await;
        assert!(n >= at_least, "{reason}: {n}");
    }
}

async fn merchant_scoping_on_every_endpoint(b: Backend) {
    let hub = TestHub::start(b).await;
    let (ma1, op1) = hub.merchant("m1").await;
    let (ma2, op2) = hub.merchant("m2").await;
    let secret = hub.cabinet(&ma1, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.event("door_opened").await;
    let alert = hub
        .eventually(SEC, "alert", || {
            hub.active_alert(&op1, "KM1", "door_forced")
        })
        .await;
    let alert_id = alert["id"].as_str().unwrap_or_default().to_owned();

    let (_, v) = hub
        .post(
            "/api/v1/api-keys",
            &ma1,
            json!({"merchant_id": "m1", "role": "viewer"}),
        )
        .await;
    let viewer = v["key"].as_str().unwrap_or_default().to_owned();
    let ack = format!("/api/v1/alerts/{alert_id}/ack");
    let clear = format!("/api/v1/alerts/{alert_id}/clear");
    let none = Value::Null;
    // (method, path, key, body, expected status)
    let mut cases: Vec<(&str, &str, &str, Value, u16)> = Vec::new();
    for key in [ma2.as_str(), op2.as_str()] {
        cases.extend([
            ("GET", "/api/v1/cabinets/KM1", key, none.clone(), 404),
            (
                "PATCH",
                "/api/v1/cabinets/KM1/config",
                key,
                json!({"temp_target_c": 3.0}),
                404,
            ),
            (
                "POST",
                "/api/v1/cabinets/KM1/commands",
                key,
                json!({"type": "reboot"}),
                404,
            ),
            ("POST", ack.as_str(), key, json!({}), 404),
            ("POST", clear.as_str(), key, json!({}), 404),
        ]);
    }
    cases.extend([
        (
            "POST",
            "/api/v1/cabinets/KM1/certificate",
            ma2.as_str(),
            json!({}),
            404,
        ),
        // Registering into another merchant, or keys for it.
        (
            "POST",
            "/api/v1/cabinets",
            ma2.as_str(),
            json!({"id": "X1", "merchant_id": "m1"}),
            404,
        ),
        (
            "POST",
            "/api/v1/api-keys",
            ma2.as_str(),
            json!({"merchant_id": "m1", "role": "operator"}),
            404,
        ),
        // Roles: an operator cannot register or make keys; a merchant admin cannot create
        // merchants, extend service or make admin keys; a viewer reads but cannot act.
        (
            "POST",
            "/api/v1/cabinets",
            op1.as_str(),
            json!({"id": "X2", "merchant_id": "m1"}),
            403,
        ),
        (
            "POST",
            "/api/v1/api-keys",
            op1.as_str(),
            json!({"merchant_id": "m1", "role": "viewer"}),
            403,
        ),
        (
            "POST",
            "/api/v1/merchants",
            ma1.as_str(),
            json!({"id": "m3", "name": "x"}),
            403,
        ),
        (
            "POST",
            "/api/v1/cabinets/KM1/service",
            ma1.as_str(),
            json!({"years": 1}),
            403,
        ),
        (
            "POST",
            "/api/v1/api-keys",
            ma1.as_str(),
            json!({"role": "admin"}),
            403,
        ),
        ("POST", clear.as_str(), viewer.as_str(), json!({}), 403),
        (
            "GET",
            "/api/v1/cabinets/KM1",
            viewer.as_str(),
            none.clone(),
            200,
        ),
        // No key, or a wrong one.
        ("GET", "/api/v1/cabinets", "nope", none.clone(), 401),
        // The owner and the platform see it.
        (
            "GET",
            "/api/v1/cabinets/KM1",
            op1.as_str(),
            none.clone(),
            200,
        ),
        ("GET", "/api/v1/cabinets/KM1", ADMIN_KEY, none.clone(), 200),
        (
            "POST",
            "/api/v1/cabinets/KM1/service",
            ADMIN_KEY,
            json!({"years": 2}),
            200,
        ),
    ]);
    for (method, path, key, body, want) in cases {
        let body = (!body.is_null()).then_some(body);
        let (got, answer) = hub.call(method, path, key, body).await;
        assert_eq!(got, want, "{method} {path}: {answer}");
    }
    for key in [&ma2, &op2] {
        let (_, list) = hub.get("/api/v1/cabinets", key).await;
        assert_eq!(list["count"], 0);
        let (_, alerts) = hub.get("/api/v1/alerts", key).await;
        assert_eq!(alerts["count"], 0);
    }
    // Activating another merchant's cabinet looks exactly like activating an unknown one.
    for (key, id) in [(&ma2, "KM1"), (&ma1, "NOPE")] {
        let (s, r) = hub
            .post(&format!("/api/v1/cabinets/{id}/activate"), key, json!({}))
            .await;
        assert_eq!(
            (s, r["error"]["code"].clone()),
            (409, json!("not_registered"))
        );
    }
    assert_eq!(
        hub.client
            .get(hub.url("/api/v1/cabinets"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0),
        401
    );
    // Duplicate registration is a conflict with a code.
    let (s, r) = hub
        .post(
            "/api/v1/cabinets",
            &ma1,
            json!({"id": "KM1", "merchant_id": "m1"}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (409, json!("cabinet_exists"))
    );
    let (s, r) = hub
        .post(
            "/api/v1/merchants",
            ADMIN_KEY,
            json!({"id": "m1", "name": "again"}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (409, json!("merchant_exists"))
    );
    let (s, r) = hub
        .post(
            "/api/v1/merchants",
            ADMIN_KEY,
            json!({"id": "m9", "name": "greedy", "commission_bps": 3001}),
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );
}

async fn health_readiness_and_alert_ack(b: Backend) {
    let hub = TestHub::start(b).await;
    let ok = |p: &'static str| {
        let c = hub.client.clone();
        let u = hub.url(p);
        async move {
            c.get(u)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(ok("/healthz").await, 200);
    assert_eq!(ok("/readyz").await, 200);
    assert_eq!(ok("/metrics").await, 200);
    // The process's memory, read at the scrape: an engineer tells a leak (heap in use grows)
    // from fragmentation (only resident and free grow).
    for series in [
        "process_resident_memory_bytes",
        "process_heap_in_use_bytes",
        "process_heap_free_bytes",
    ] {
        assert!(hub.metric(series).await > 0.0, "{series}");
    }
    assert!(hub.metric("process_resident_memory_bytes").await > 1e6);
    assert_eq!(ok("/api/openapi.json").await, 200);
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.event("tamper").await;
    let alert = hub
        .eventually(SEC, "tamper", || hub.active_alert(&op, "KM1", "tamper"))
        .await;
    let id = alert["id"].as_str().unwrap_or_default();
    let (s, acked) = hub
        .post(&format!("/api/v1/alerts/{id}/ack"), &op, json!({}))
        .await;
    assert_eq!(s, 200, "{acked}");
    assert!(acked["acked_at"].is_string());
    assert_eq!(acked["active"], true, "acknowledged is not cleared");
    let state = hub
        .eventually(SEC, "acked in live state", || async {
            let s = hub.cabinet_state(&op, "KM1").await;
            (s["alerts"][0]["acked"] == true).then_some(s)
        })
        .await;
    assert_eq!(state["alerts"][0]["type"], "tamper");
    assert_eq!(
        hub.post("/api/v1/alerts/nope/ack", &op, json!({})).await.0,
        404
    );
}
