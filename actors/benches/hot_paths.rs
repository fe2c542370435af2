//! The hot paths of every uplink and every purchase, each beside a baseline measured in the same
//! run: parsing an uplink beside parsing the same bytes as untyped JSON; a state machine step
//! beside parsing its input; pricing a basket with promotions beside one without.
//!
//! `cargo bench -p cabinet-actors` (criterion prints medians; compare the pairs, not the
//! absolute times, on a shared machine).

use std::collections::BTreeMap;
use std::hint::black_box;

use cabinet_actors::ids::CabinetId;
use cabinet_actors::machine::{CabinetMachine, Input, Timing};
use cabinet_actors::pricing::{
    price_basket, BasketItem, Limits, ListPrice, Offer, PriceRule, Promotion, Tier, Window,
};
use cabinet_actors::protocol::{parse_uplink, CabinetConfig, LightSchedule, UplinkKind};
use criterion::{criterion_group, criterion_main, Criterion};

const HEARTBEAT: &str = r#"{"seq":42,"ts":1763700000000,"door":"closed","lock":"locked","temp_c":4.6,"light":"on","cameras":[{"id":0,"ok":true},{"id":1,"ok":true}],"config_version":3}"#;
const EVENT: &str =
    r#"{"seq":43,"ts":1763700001000,"type":"door_opened","session_id":"s_01JABCDEF"}"#;

#[allow(clippy::unwrap_used)]
fn id() -> CabinetId {
    CabinetId::parse("KM400A00017").unwrap()
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("uplink_parse");
    g.bench_function("heartbeat", |b| {
        b.iter(|| parse_uplink(id(), UplinkKind::Heartbeat, black_box(HEARTBEAT.as_bytes())))
    });
    g.bench_function("event", |b| {
        b.iter(|| parse_uplink(id(), UplinkKind::Event, black_box(EVENT.as_bytes())))
    });
    g.bench_function("baseline_untyped_json_heartbeat", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(HEARTBEAT.as_bytes())))
    });
    g.finish();
}

fn config() -> CabinetConfig {
    CabinetConfig {
        version: 3,
        temp_target_c: 5.0,
        temp_range_c: [2.0, 8.0],
        light: LightSchedule {
            on: "07:00".into(),
            off: "23:00".into(),
        },
        heartbeat_s: 30,
        foreign_object_lock: true,
    }
}

#[allow(clippy::unwrap_used)]
fn machine_step(c: &mut Criterion) {
    let mut m = CabinetMachine::new(id(), Timing::default(), "b".into(), Some(config()), vec![]);
    let status = parse_uplink(
        id(),
        UplinkKind::Status,
        br#"{"online":true,"boot_id":"b1","config_version":3}"#,
    )
    .unwrap();
    m.handle(Input::Uplink(status.body), 1_763_700_000_000);
    let mut seq = 0u64;
    let mut now = 1_763_700_000_000u64;
    let mut g = c.benchmark_group("state_machine");
    g.bench_function("heartbeat_step_including_parse", |b| {
        b.iter(|| {
            seq += 1;
            now += 1;
            let text = HEARTBEAT.replacen("\"seq\":42", &format!("\"seq\":{seq}"), 1);
            let u = parse_uplink(id(), UplinkKind::Heartbeat, text.as_bytes()).unwrap();
            black_box(m.handle(Input::Uplink(u.body), now))
        })
    });
    g.bench_function("baseline_parse_only", |b| {
        b.iter(|| {
            seq += 1;
            let text = HEARTBEAT.replacen("\"seq\":42", &format!("\"seq\":{seq}"), 1);
            black_box(parse_uplink(id(), UplinkKind::Heartbeat, text.as_bytes()).unwrap())
        })
    });
    g.finish();
}

fn pricing(c: &mut Criterion) {
    let mut list = BTreeMap::new();
    for i in 0..40 {
        list.insert(
            format!("69012345678{i:02}"),
            ListPrice {
                name: format!("product {i}"),
                price_fen: 300 + i * 25,
            },
        );
    }
    let basket: Vec<BasketItem> = (0..6)
        .map(|i| BasketItem {
            sku: format!("69012345678{:02}", i * 5),
            qty: 1 + (i % 3) as u32,
        })
        .collect();
    let promotions = vec![
        Promotion {
            id: "p1".into(),
            name: "限时折扣".into(),
            window: Window::Always,
            offer: Offer::ProductPrice {
                rules: [("6901234567800".to_owned(), PriceRule::PercentBps(8000))]
                    .into_iter()
                    .collect(),
            },
        },
        Promotion {
            id: "p2".into(),
            name: "分时段折扣".into(),
            window: Window::Daily {
                from_min: 0,
                to_min: 1439,
                starts_at: None,
                ends_at: None,
            },
            offer: Offer::ProductPrice {
                rules: [("6901234567810".to_owned(), PriceRule::FixedFen(199))]
                    .into_iter()
                    .collect(),
            },
        },
        Promotion {
            id: "p3".into(),
            name: "满减".into(),
            window: Window::Always,
            offer: Offer::SpendSave {
                tiers: vec![
                    Tier {
                        threshold_fen: 2000,
                        off_fen: 300,
                    },
                    Tier {
                        threshold_fen: 5000,
                        off_fen: 1000,
                    },
                ],
            },
        },
    ];
    let mut g = c.benchmark_group("pricing");
    g.bench_function("basket_6_lines_3_promotions", |b| {
        b.iter(|| {
            price_basket(
                black_box(&basket),
                &list,
                &promotions,
                1_763_700_000_000,
                480,
                &Limits::DEFAULT,
            )
        })
    });
    g.bench_function("baseline_basket_6_lines_no_promotions", |b| {
        b.iter(|| {
            price_basket(
                black_box(&basket),
                &list,
                &[],
                1_763_700_000_000,
                480,
                &Limits::DEFAULT,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, parse, machine_step, pricing);
criterion_main!(benches);
