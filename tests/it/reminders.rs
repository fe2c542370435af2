//! Service-time reminders (设备使用时长): a cabinet whose service ends in five days is reminded
//! once (the 7-day reminder, the nearest reached) on its merchant's feed, counted, and listed by
//! `?expiring_within_days=`; extending the service by a year takes it off the list, and its
//! next expiry will be reminded afresh.

use std::time::Duration;

use serde_json::json;

use crate::attacks::{ws_next, ws_with_key};
use crate::both;
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};

both!(
    a_cabinet_near_its_service_end_is_reminded_once_and_listed,
    reminders_come_at_30_7_and_1_days_and_at_the_end_on_a_controlled_clock,
);

const DAY: i64 = 86_400_000;

/// The reminder pass driven by a clock the test sets, against the real store: a cabinet whose
/// service ends at `end` is reminded at 30 days (checked 31 days before: nothing), 7, 1 and at
/// the end, each once however often the pass runs; an extension starts them afresh.
async fn reminders_come_at_30_7_and_1_days_and_at_the_end_on_a_controlled_clock(b: Backend) {
    // The store's own fixture: merchant m1, cabinet KM1 registered, not yet active.
    let (store, _dir) = crate::store::open(b).await;
    crate::store::seed(&store).await;
    let end = 400 * DAY;
    store
        .activate_cabinet("KM1", 3, end)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let feed = cabinet_hub::feed::Feed::new(1000, Duration::from_secs(3600), 100);
    let metrics = cabinet_hub::metrics::Metrics::new().unwrap_or_else(|e| panic!("{e}"));
    let (mut rx, _) = feed.subscribe();
    let reminders = |rx: &mut tokio::sync::broadcast::Receiver<_>| {
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            let e: std::sync::Arc<cabinet_hub::feed::FeedEvent> = e;
            let v: serde_json::Value =
                serde_json::from_str(&e.json).unwrap_or_else(|err| panic!("{err}"));
            got.push(v["data"]["reminder"].as_i64().unwrap_or(-1));
        }
        got
    };
    let mut seen = Vec::new();
    for (now, twice) in [
        (end - 31 * DAY, false),
        (end - 29 * DAY, true),
        (end - 8 * DAY, false),
        (end - 6 * DAY, true),
        (end - DAY / 2, true),
        (end + 1, true),
        (end + 5 * DAY, false),
    ] {
        cabinet_hub::reminders::remind(&store, &feed, &metrics, now).await;
        if twice {
            cabinet_hub::reminders::remind(&store, &feed, &metrics, now).await;
        }
        seen.push(reminders(&mut rx));
    }
    let want: Vec<Vec<i64>> = vec![vec![], vec![30], vec![], vec![7], vec![1], vec![0], vec![]];
    assert_eq!(seen, want);

    // Extended by a year: the next end is reminded afresh.
    let next = end + 365 * DAY;
    store
        .set_service_expiry("KM1", next)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cabinet_hub::reminders::remind(&store, &feed, &metrics, next - 20 * DAY).await;
    assert_eq!(reminders(&mut rx), vec![30]);
}

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
