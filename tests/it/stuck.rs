//! No session outlives its purpose (issue 19): a door that never opens, an operator closing a
//! stuck session; each frees the cabinet with a defined outcome. (A session left over from
//! before a restart: `crash.rs`.)

use std::time::Duration;

use serde_json::{json, Value};

use crate::both;
use crate::harness::{Backend, Cabinet, TestHub, PATIENCE};
use crate::purchase::{shop_with, start};

const SEC: Duration = Duration::from_secs(1);

both!(
    a_door_never_opened_cancels_and_frees_the_cabinet,
    an_operator_closes_a_stuck_session,
    an_operator_closes_a_session_whose_door_never_opened,
    a_session_closed_while_confirming_never_unlocks,
);

/// A session up to the acked unlock; answers its id.
async fn unlocked(hub: &TestHub, op: &str, c: &mut Cabinet, user: &str) -> String {
    let pending = start(hub, op, user, None);
    let unlock = c.expect_command("unlock", 5 * SEC).await;
    c.ack(&unlock, true, None).await;
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, v["session"]["state"].as_str()),
        (202, Some("open")),
        "{v}"
    );
    v["session"]["id"].as_str().unwrap_or_default().to_owned()
}

/// Waits for the session to reach `want` and its order to be settled (a failing session moves
/// before its order).
async fn session(hub: &TestHub, key: &str, id: &str, want: &str) -> Value {
    hub.eventually(PATIENCE, want, || async {
        let (_, v) = hub.get(&format!("/api/v1/sessions/{id}"), key).await;
        (v["session"]["state"] == want && v["order"]["status"] != "open").then_some(v)
    })
    .await
}

/// Today a cabinet whose shopper walked away after the unlock answered `cabinet_busy` for
/// ever. Now the door's deadline (short here: the deadline is what is tested) ends it.
async fn a_door_never_opened_cancels_and_frees_the_cabinet(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |s| s.session.door_open_timeout_ms = 1_500).await;
    let id = unlocked(&hub, &op, &mut c, "u1").await;
    let v = session(&hub, &op, &id, "failed").await;
    assert_eq!(v["session"]["failure"], "door_never_opened", "{v}");
    assert_eq!(v["order"]["status"], "cancelled", "{v}");
    assert_eq!(v["order"]["paid_fen"], 0);
    // The cabinet takes the next shopper.
    let next = unlocked(&hub, &op, &mut c, "u2").await;
    assert_ne!(next, id);
}

/// The shopper opened the door and the cabinet never reported it closed: an operator ends the
/// session; the order waits for a person to price what was taken; the cabinet is free.
async fn an_operator_closes_a_stuck_session(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |_| {}).await;
    let id = unlocked(&hub, &op, &mut c, "u1").await;
    for key in [op.as_str(), crate::harness::ADMIN_KEY] {
        let (s, v) = hub.get("/api/v1/sessions", key).await;
        assert_eq!((s, v["items"][0]["id"].clone()), (200, json!(id)), "{v}");
    }
    c.event("door_opened").await;
    hub.eventually(PATIENCE, "door open in the actor", || async {
        let v = hub.cabinet_state(&op, "KM1").await;
        (v["session"]["phase"] == "door_open").then_some(())
    })
    .await;
    // The cabinet is busy meanwhile.
    let (s, v) = start(&hub, &op, "u2", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (409, json!("cabinet_busy"))
    );

    let path = format!("/api/v1/sessions/{id}/close");
    // A viewer may not; another merchant's operator does not see it; a reason is required.
    let viewer = hub.new_key(crate::harness::ADMIN_KEY, "m1", "viewer").await;
    let viewer = viewer["key"].as_str().unwrap_or_default().to_owned();
    let (s, _) = hub.post(&path, &viewer, json!({"reason": "stuck"})).await;
    assert_eq!(s, 403);
    let (_, other) = hub.merchant("m2").await;
    let (s, _) = hub.post(&path, &other, json!({"reason": "stuck"})).await;
    assert_eq!(s, 404);
    let (s, v) = hub.post(&path, &op, json!({"reason": "  "})).await;
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );

    let mut ws = crate::feed::connect(&hub, &op, None).await;
    let snap = crate::feed::next(&mut ws, PATIENCE).await;
    assert_eq!(snap.map(|v| v["type"].clone()), Some(json!("snapshot")));
    let (s, v) = hub
        .post(
            &path,
            &op,
            json!({"reason": "door sensor broken, shopper left"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Operators watching see who closed it and why.
    loop {
        let e = crate::feed::next(&mut ws, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("the feed never told of the close"));
        if e["type"] == "session" && e["data"]["close_note"] == "door sensor broken, shopper left" {
            assert_eq!(e["data"]["state"], "closed", "{e}");
            break;
        }
    }
    assert_eq!(v["session"]["state"], "closed", "{v}");
    assert_eq!(
        v["session"]["close_note"],
        "door sensor broken, shopper left"
    );
    assert!(
        v["session"]["closed_by"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{v}"
    );
    assert_eq!(v["order"]["status"], "abnormal", "{v}");
    assert_eq!(v["order"]["abnormal_reason"], "closed_by_operator");
    // Once over, it stays over.
    let (s, v) = hub.post(&path, &op, json!({"reason": "again"})).await;
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (409, json!("session_not_open"))
    );
    // The cabinet takes the next shopper.
    c.event("door_closed").await;
    c.event("lock_locked").await;
    unlocked(&hub, &op, &mut c, "u2").await;
    assert_eq!(
        hub.metric("sessions_closed_total{by=\"operator\"}").await,
        1.0
    );
}

/// Closed before the door opened: nothing can have been taken, so the provider order is
/// cancelled rather than left for a person.
async fn an_operator_closes_a_session_whose_door_never_opened(b: Backend) {
    let (hub, op, mut c) = shop_with(b, |_| {}).await;
    let id = unlocked(&hub, &op, &mut c, "u1").await;
    let (s, v) = hub
        .post(
            &format!("/api/v1/sessions/{id}/close"),
            &op,
            json!({"reason": "shopper walked away"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["session"]["state"], "failed", "{v}");
    assert_eq!(v["session"]["failure"], "closed_by_operator");
    assert_eq!(v["order"]["status"], "cancelled");
    unlocked(&hub, &op, &mut c, "u2").await;
}

/// Closed while the shopper is still confirming: the confirmation that arrives afterwards must
/// not open the door (the session is over and its provider order cancelled).
async fn a_session_closed_while_confirming_never_unlocks(b: Backend) {
    // The simulated shopper would confirm 8 s after the create: long enough, on any machine,
    // for the close below to land first.
    let (hub, op, mut c) = shop_with(b, |s| s.payments.simulator_confirm_ms = 8_000).await;
    let pending = start(&hub, &op, "u1", None);
    let id = hub
        .eventually(PATIENCE, "the session confirming", || async {
            let (_, v) = hub.get("/api/v1/orders", &op).await;
            v["items"][0]["session_id"].as_str().map(str::to_owned)
        })
        .await;
    let (s, v) = hub
        .post(
            &format!("/api/v1/sessions/{id}/close"),
            &op,
            json!({"reason": "shopper left before confirming"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["session"]["failure"], "closed_by_operator", "{v}");
    // The start was answered 202; followed, it ends failed by the close.
    let (s, v) = pending.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            s,
            v["session"]["state"].as_str(),
            v["session"]["failure"].as_str()
        ),
        (202, Some("failed"), Some("closed_by_operator")),
        "{v}"
    );
    // The confirmation that the close woke was handled: an unlock would be queued by now.
    assert!(tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Some(crate::harness::Got::Command(cmd)) = c.rx.recv().await {
                if cmd["type"] == "unlock" {
                    return;
                }
            }
        }
    })
    .await
    .is_err());
}

/// The operator page closes a stuck session: the row's Close… button, a reason, and the
/// session ends (its door never opened here, so it fails `closed_by_operator`), recorded with
/// the operator's key and the reason; the row then offers no close.
#[actix_rt::test]
async fn an_operator_closes_a_stuck_session_in_the_page() {
    let (hub, op, mut c) = shop_with(Backend::Sqlite, |_| {}).await;
    let id = unlocked(&hub, &op, &mut c, "u1").await;
    // Listed for its merchant (and the platform), not for another merchant.
    let (s, mine) = hub.get("/api/v1/sessions", &op).await;
    assert_eq!(
        (s, mine["count"].clone(), mine["items"][0]["id"].clone()),
        (200, json!(1), json!(id)),
        "{mine}"
    );
    let (_, other) = hub.merchant("m2").await;
    let (_, theirs) = hub.get("/api/v1/sessions", &other).await;
    assert_eq!(theirs["count"], 0, "{theirs}");
    // Opened before the page: the page lists it from the API, as it would a stuck one.
    let mut b = crate::browser::Browser::launch(1440, 900).await;
    crate::browser::sign_in(&mut b, &hub, &op).await;
    b.eval("document.querySelector('[data-tab=sessions]').click()")
        .await;
    let button = format!("#sessions button[data-close=\"{id}\"]");
    b.wait_for(&format!("!!document.querySelector('{button}')"), PATIENCE)
        .await;
    b.eval(&format!("document.querySelector('{button}').click()"))
        .await;
    b.eval("document.getElementById('close-reason').value = 'shopper walked away'; document.querySelector('#close-form button[type=submit]').click()")
        .await;
    session(&hub, &op, &id, "failed").await;
    // The close is two writes (the move, then who and why): wait for the second.
    let v = hub
        .eventually(PATIENCE, "the close's note", || async {
            let (_, v) = hub.get(&format!("/api/v1/sessions/{id}"), &op).await;
            (!v["session"]["close_note"].is_null()).then_some(v)
        })
        .await;
    assert_eq!(v["session"]["failure"], "closed_by_operator", "{v}");
    assert_eq!(v["session"]["close_note"], "shopper walked away", "{v}");
    b.wait_for(
        &format!("document.querySelector('#sessions tr[data-session=\"{id}\"]')?.textContent.includes('failed') && !document.querySelector('{button}')"),
        PATIENCE,
    )
    .await;
}
