//! Service-time reminders (设备使用时长): a cabinet whose service ends in five days is reminded
//! once (the 7-day reminder, the nearest reached) on its merchant's feed, counted, and listed by
//! `?expiring_within_days=`; extending the service by a year takes it off the list, and its
//! next expiry will be reminded afresh.

use std::time::Duration;

use serde_json::json;

use crate::attacks::{ws_next, ws_with_key};
use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};

both!(a_cabinet_near_its_service_end_is_reminded_once_and_listed);

async fn a_cabinet_near_its_service_end_is_reminded_once_and_listed(b: Backend) {
    let hub = TestHub::start_with(b, |s| {
        s.cabinet.initial_service_days = 5;
        s.cabinet.service_reminder_interval_ms = 100;
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let mut ws = ws_with_key(&hub, &op)
        .await
        .unwrap_or_else(|s| panic!("feed refused: {s}"));
    hub.cabinet(&ma, "m1", "KM1").await;
    let reminder = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws_next(&mut ws, PATIENCE).await {
                Some(v) if v["type"] == "service_expiring" => return v,
                Some(_) => continue,
                None => panic!("the feed ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no service reminder"));
    assert_eq!(
        (
            &reminder["data"]["cabinet_id"],
            &reminder["data"]["reminder"],
            &reminder["data"]["days_left"]
        ),
        (&json!("KM1"), &json!(7), &json!(5)),
        "{reminder}"
    );
    // Further passes (every 100 ms) do not repeat it.
    let again = tokio::time::timeout(Duration::from_millis(800), async {
        loop {
            match ws_next(&mut ws, Duration::from_secs(5)).await {
                Some(v) if v["type"] == "service_expiring" => return Some(v),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    assert!(matches!(again, Err(_) | Ok(None)), "{again:?}");
    let m = hub.metrics().await;
    assert!(m.contains(r#"service_reminders_total{days="7"} 1"#), "{m}");

    // The page says who must renew.
    if matches!(b, Backend::Sqlite) {
        let mut br = crate::browser::Browser::launch(1440, 900).await;
        crate::browser::sign_in(&mut br, &hub, &op).await;
        br.wait_for(
            "!document.getElementById('expiring').hidden
             && document.querySelector('[data-expiring=KM1]')?.textContent === 'KM1 · 5 d'",
            PATIENCE,
        )
        .await;
    }

    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (s, within7) = hub
        .get("/api/v1/cabinets?expiring_within_days=7", &op)
        .await;
    assert_eq!(
        (s, ids(&within7)),
        (200, vec!["KM1".to_owned()]),
        "{within7}"
    );
    let (_, within3) = hub
        .get("/api/v1/cabinets?expiring_within_days=3", &op)
        .await;
    assert!(ids(&within3).is_empty(), "{within3}");
    let (s, _) = hub
        .get("/api/v1/cabinets?expiring_within_days=9999", &op)
        .await;
    assert_eq!(s, 400);

    let (s, b) = hub
        .post(
            "/api/v1/cabinets/KM1/service",
            ADMIN_KEY,
            json!({"years": 1}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, within30) = hub
        .get("/api/v1/cabinets?expiring_within_days=30", &op)
        .await;
    assert!(ids(&within30).is_empty(), "{within30}");
}
