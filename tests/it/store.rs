//! The storage layer on SQLite and on the machine's PostgreSQL.

use cabinet_actors::alert::{ActiveAlert, AlertType};
use cabinet_hub::store::{
    AlertFilter, CabinetRow, MerchantPayment, MerchantRow, Store, StoreError,
};

use crate::both;
use crate::harness::{fresh_postgres, test_settings, Backend};

pub(crate) async fn open(b: Backend) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = match b {
        Backend::Sqlite => test_settings(dir.path()).database_url(),
        Backend::Postgres => fresh_postgres().await,
    };
    std::fs::create_dir_all(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let store = Store::connect(&url, 4)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(store.is_postgres(), b == Backend::Postgres);
    (store, dir)
}

pub(crate) async fn seed(store: &Store) {
    store
        .create_merchant(&MerchantRow {
            id: "m1".into(),
            name: "M".into(),
            commission_bps: 100,
            created_at: 1,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cab = CabinetRow {
        id: "KM1".into(),
        merchant_id: "m1".into(),
        model: "KM-400".into(),
        point: "p".into(),
        secret_hash: "h".into(),
        active: false,
        service_expires_at: None,
        created_at: 2,
        activated_at: None,
        keeps_stock: false,
    };
    let cfg = test_settings(std::path::Path::new("/tmp")).initial_cabinet_config();
    store
        .register_cabinet(&cab, &cfg, "k")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        store.register_cabinet(&cab, &cfg, "k").await,
        Err(StoreError::Conflict)
    ));
}

both!(
    merchants_keys_and_cabinets,
    configs_version_up,
    alerts_one_active_per_type_with_history,
    notifications_are_recorded_once,
    cached_rows_follow_every_write_and_reads_outnumber_connections
);

fn ok<T>(e: StoreError) -> T {
    panic!("{e}")
}

/// The rows a purchase reads from memory (a cabinet, its sellable list, its merchant's payment
/// terms) are read afresh after each write that changes them; more reads at once than the
/// store has connections all complete; a closed store refuses instead of hanging.
async fn cached_rows_follow_every_write_and_reads_outnumber_connections(b: Backend) {
    let (store, _d) = open(b).await;
    seed(&store).await;
    let active = |c: Option<CabinetRow>| c.map(|c| (c.active, c.service_expires_at));
    assert_eq!(
        active(store.cabinet("KM1").await.unwrap_or_else(ok)),
        Some((false, None))
    );
    assert!(store
        .activate_cabinet("KM1", 10, 1000)
        .await
        .unwrap_or_else(ok));
    assert_eq!(
        active(store.cabinet("KM1").await.unwrap_or_else(ok)),
        Some((true, Some(1000)))
    );
    store
        .set_service_expiry("KM1", 5000)
        .await
        .unwrap_or_else(ok);
    assert_eq!(
        active(store.cabinet("KM1").await.unwrap_or_else(ok)),
        Some((true, Some(5000)))
    );

    assert_eq!(
        store.merchant_payment("m1").await.unwrap_or_else(ok),
        Some(MerchantPayment {
            risk_ceiling_fen: 20_000,
            ..MerchantPayment::default()
        })
    );
    let set = MerchantPayment {
        risk_ceiling_fen: 9_900,
        wechat_sub_mchid: Some("1900000109".into()),
        service_phone: Some("400-800-1234".into()),
        alipay_smid: Some("2088000000000001".into()),
        alipay_app_auth_token: Some("token".into()),
        ..MerchantPayment::default()
    };
    store
        .set_merchant_payment("m1", &set)
        .await
        .unwrap_or_else(ok);
    assert_eq!(
        store.merchant_payment("m1").await.unwrap_or_else(ok),
        Some(set)
    );

    let names = |p: std::collections::BTreeMap<String, cabinet_actors::pricing::ListPrice>| {
        p.into_iter()
            .map(|(sku, l)| (sku, l.name, l.price_fen))
            .collect::<Vec<_>>()
    };
    store
        .set_prices("KM1", &[("cola".into(), 350)], 20)
        .await
        .unwrap_or_else(ok);
    assert_eq!(
        names(store.prices("KM1", "m1").await.unwrap_or_else(ok)),
        vec![("cola".to_owned(), "cola".to_owned(), 350)]
    );
    store
        .upsert_product("m1", "cola", "可口可乐", 21)
        .await
        .unwrap_or_else(ok);
    assert_eq!(
        names(store.prices("KM1", "m1").await.unwrap_or_else(ok)),
        vec![("cola".to_owned(), "可口可乐".to_owned(), 350)],
        "a product's new name is on every list at once"
    );
    store
        .set_prices("KM1", &[("cola".into(), 300)], 22)
        .await
        .unwrap_or_else(ok);
    assert_eq!(
        names(store.prices("KM1", "m1").await.unwrap_or_else(ok)),
        vec![("cola".to_owned(), "可口可乐".to_owned(), 300)]
    );

    // Far more reads at once than the four connections: each waits its turn.
    let reads = (0..64).map(|i| {
        let store = store.clone();
        async move {
            if i % 2 == 0 {
                store.cabinets(Some("m1")).await.map(|v| v.len())
            } else {
                store.alerts(&AlertFilter::default()).await.map(|_| 1)
            }
        }
    });
    let done = tokio::time::timeout(
        crate::harness::PATIENCE,
        futures_util::future::join_all(reads),
    )
    .await
    .unwrap_or_else(|_| panic!("64 reads on 4 connections did not finish"));
    assert!(done.iter().all(|r| matches!(r, Ok(1))), "{done:?}");

    store
        .ping()
        .await
        .unwrap_or_else(|e| panic!("every connection answers: {e}"));
    store.close().await;
    assert!(store.ping().await.is_err(), "a closed store is not ready");
    let after = tokio::time::timeout(
        crate::harness::PATIENCE,
        store.set_service_expiry("KM1", 6000),
    )
    .await
    .unwrap_or_else(|_| panic!("a write after close hung"));
    assert!(after.is_err(), "a closed store refuses writes");
}

async fn merchants_keys_and_cabinets(b: Backend) {
    let (store, _d) = open(b).await;
    seed(&store).await;
    assert!(matches!(
        store
            .create_merchant(&MerchantRow {
                id: "m1".into(),
                name: "x".into(),
                commission_bps: 0,
                created_at: 1
            })
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .merchant("m1")
            .await
            .ok()
            .flatten()
            .map(|m| m.commission_bps),
        Some(100)
    );
    assert!(!store.has_admin_key().await.unwrap_or(true));
    store
        .create_api_key("k1", "hash1", None, "admin", 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .create_api_key("k2", "hash2", Some("m1"), "operator", 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(store.has_admin_key().await.unwrap_or(false));
    let k = store
        .api_key_by_hash("hash2")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("key"));
    assert_eq!(
        (k.id.as_str(), k.merchant_id.as_deref(), k.role.as_str()),
        ("k2", Some("m1"), "operator")
    );
    assert!(store.api_key_by_hash("nope").await.ok().flatten().is_none());

    assert!(store
        .activate_cabinet("KM1", 10, 1000)
        .await
        .unwrap_or(false));
    assert!(
        !store
            .activate_cabinet("KM1", 11, 2000)
            .await
            .unwrap_or(true),
        "only once"
    );
    let c = store
        .cabinet("KM1")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("cabinet"));
    assert!(c.active);
    assert_eq!(
        (c.activated_at, c.service_expires_at),
        (Some(10), Some(1000))
    );
    store
        .set_service_expiry("KM1", 5000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store
            .cabinets(Some("m1"))
            .await
            .map(|v| v.len())
            .unwrap_or(0),
        1
    );
    assert_eq!(
        store
            .cabinets(Some("m2"))
            .await
            .map(|v| v.len())
            .unwrap_or(9),
        0
    );
    store
        .record_certificate("ab01", "KM1", 1, 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.ping().await.unwrap_or_else(|e| panic!("{e}"));
}

async fn configs_version_up(b: Backend) {
    let (store, _d) = open(b).await;
    seed(&store).await;
    assert_eq!(
        store
            .latest_config("KM1")
            .await
            .ok()
            .flatten()
            .map(|c| c.version),
        Some(1)
    );
    let next = store
        .new_config_version("KM1", 5, "k", |c| {
            let mut n = c.clone();
            n.temp_target_c = 7.0;
            n
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next.version, 2);
    let latest = store
        .latest_config("KM1")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("config"));
    assert_eq!((latest.version, latest.temp_target_c), (2, 7.0));
    // Concurrent edits each get their own version.
    let (a, b2) = tokio::join!(
        store.new_config_version("KM1", 6, "a", |c| c.clone()),
        store.new_config_version("KM1", 6, "b", |c| c.clone())
    );
    let mut versions = vec![
        a.map(|c| c.version).unwrap_or(0),
        b2.map(|c| c.version).unwrap_or(0),
    ];
    versions.sort();
    assert_eq!(versions, vec![3, 4]);
}

async fn alerts_one_active_per_type_with_history(b: Backend) {
    let (store, _d) = open(b).await;
    seed(&store).await;
    let a = ActiveAlert {
        id: "KM1-door_forced-1".into(),
        kind: AlertType::DoorForced,
        raised_at: 100,
        acked: false,
        detail: None,
        flapping: false,
        flaps: 0,
    };
    assert!(store
        .insert_alert("KM1", "m1", &a)
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    let dup = ActiveAlert {
        id: "KM1-door_forced-2".into(),
        raised_at: 101,
        ..a.clone()
    };
    assert!(
        !store.insert_alert("KM1", "m1", &dup).await.unwrap_or(true),
        "one active per (cabinet, type)"
    );
    let other = ActiveAlert {
        id: "KM1-tamper-1".into(),
        kind: AlertType::Tamper,
        raised_at: 102,
        acked: false,
        detail: Some("lid".into()),
        flapping: false,
        flaps: 0,
    };
    assert!(store
        .insert_alert("KM1", "m1", &other)
        .await
        .unwrap_or(false));
    assert_eq!(
        store
            .active_alerts("KM1")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        2
    );

    // A flapping alert is stored once, its count updated in place, and read back as flapping.
    let flapping = ActiveAlert {
        id: "KM1-camera_fault-1".into(),
        kind: AlertType::CameraFault,
        raised_at: 103,
        acked: false,
        detail: None,
        flapping: true,
        flaps: 6,
    };
    assert!(store
        .insert_alert("KM1", "m1", &flapping)
        .await
        .unwrap_or(false));
    assert!(store
        .set_alert_flaps(&flapping.id, 9)
        .await
        .unwrap_or(false));
    let back = store
        .active_alerts("KM1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        back.iter()
            .find(|x| x.id == flapping.id)
            .map(|x| (x.flapping, x.flaps)),
        Some((true, 9))
    );
    let rows = store
        .alerts(&AlertFilter {
            cabinet_id: Some("KM1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert_eq!(
        rows.iter()
            .map(|r| (r.id.as_str(), r.flaps))
            .collect::<Vec<_>>(),
        vec![
            ("KM1-camera_fault-1", 9),
            ("KM1-tamper-1", 0),
            ("KM1-door_forced-1", 0)
        ]
    );
    assert!(store
        .clear_alert(&flapping.id, "condition", 104)
        .await
        .unwrap_or(false));

    assert!(store.ack_alert(&a.id, "k", 110).await.unwrap_or(false));
    assert!(!store.ack_alert(&a.id, "k", 111).await.unwrap_or(true));
    assert!(store.clear_alert(&a.id, "k", 120).await.unwrap_or(false));
    assert!(
        !store
            .clear_alert(&a.id, "condition", 121)
            .await
            .unwrap_or(true),
        "cleared once"
    );
    // Cleared, so a new one of the same type may be raised.
    assert!(store.insert_alert("KM1", "m1", &dup).await.unwrap_or(false));

    let all = store
        .alerts(&AlertFilter {
            merchant_id: Some("m1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![
            "KM1-camera_fault-1",
            "KM1-tamper-1",
            "KM1-door_forced-2",
            "KM1-door_forced-1"
        ]
    );
    let ended = store
        .alerts(&AlertFilter {
            active: Some(false),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert_eq!(ended.len(), 2, "the flapping alert, then the door alert");
    assert_eq!(
        (ended[1].acked_by.as_deref(), ended[1].cleared_at),
        (Some("k"), Some(120))
    );
    let other_merchant = store
        .alerts(&AlertFilter {
            merchant_id: Some("m2".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    assert!(other_merchant.is_empty());
}

async fn notifications_are_recorded_once(b: Backend) {
    let (store, _d) = open(b).await;
    assert!(store
        .record_notification("EV-1", "wechat", "PAYSCORE.USER_PAID", 1)
        .await
        .unwrap_or(false));
    assert!(
        !store
            .record_notification("EV-1", "wechat", "PAYSCORE.USER_PAID", 2)
            .await
            .unwrap_or(true),
        "a replay is recognised"
    );
    assert!(store
        .record_notification("EV-2", "wechat", "PAYSCORE.USER_PAID", 3)
        .await
        .unwrap_or(false));
}

/// The collector asks for pending orders every minute; it must not read the whole orders table
/// to find them (it did: a full scan and a sort, and a reader's page cache full of the table).
#[actix_rt::test]
async fn pending_collections_are_found_without_reading_every_order() {
    use sqlx::{Connection, Row};
    let (store, dir) = open(Backend::Sqlite).await;
    store.close().await;
    let url = test_settings(dir.path()).database_url();
    let mut c = sqlx::SqliteConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let plan: Vec<String> = sqlx::query(
        "EXPLAIN QUERY PLAN SELECT * FROM orders WHERE status = 'pending_payment' \
         AND (next_collect_at IS NULL OR next_collect_at <= 1) ORDER BY created_at LIMIT 100",
    )
    .fetch_all(&mut c)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .iter()
    .map(|r| r.get::<String, _>("detail"))
    .collect();
    assert!(
        plan.iter().any(|d| d.contains("orders_pending_collect"))
            && !plan.iter().any(|d| d.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

/// A statement whose `LIMIT` is a bare parameter is compiled again on every run by the SQLite
/// the hub bundles (it plans with the bound limit): the settlement, collection and refund scans
/// did that several times a second, a parse and a plan each time. Limits are bound through a
/// cast (`LIMIT CAST($n AS BIGINT)`); no statement in the store may go back to the bare form.
#[test]
fn no_statement_limits_by_a_bare_parameter() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains("LIMIT $"),
                "{}:{}: a bare LIMIT parameter: {line}",
                path.display(),
                n + 1
            );
        }
        checked += text.matches("LIMIT CAST($").count();
    }
    assert!(
        checked >= 10,
        "the store's limits were not found ({checked})"
    );
}
