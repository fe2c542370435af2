//! The operator page's Stock tab (库存) and recognition billing (算法识别次数) in a real
//! Chromium: a cabinet's stock, its open discrepancies resolved through the page, the restock
//! history, a product turning low and a new discrepancy arriving over the feed without reload;
//! a prepaid merchant's quota in the header, falling as a purchase uses it; and the tab in
//! Chinese.

use serde_json::{json, Value};

use crate::browser::{sign_in, Browser};
use crate::harness::{Backend, TestHub, ADMIN_KEY, PATIENCE};
use crate::purchase::{order_status, shop, shop_with, visit};
use crate::stock::restock;

/// The open discrepancy of `sku`: its id.
async fn open_discrepancy(hub: &TestHub, key: &str, sku: &str) -> String {
    let (s, v) = hub.get("/api/v1/stock-discrepancies?state=open", key).await;
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["sku"] == sku))
        .and_then(|d| d["id"].as_str())
        .unwrap_or_else(|| panic!("no open discrepancy of {sku}: {v}"))
        .to_owned()
}

/// The quantity cell and low mark of `sku`'s row in the stock table, as one string
/// (`"10 false"`), for a wait to compare.
fn stock_row(sku: &str) -> String {
    format!(
        "(() => {{ const r = document.querySelector('#stock-items tr[data-stock-sku=\"{sku}\"]');
           return r ? r.children[2].textContent + ' ' + r.dataset.low : ''; }})()"
    )
}

/// Money as the page shows it.
fn yuan(fen: &Value) -> String {
    let fen = fen.as_i64().unwrap_or_else(|| panic!("not fen: {fen}"));
    format!("¥{}.{:02}", fen / 100, fen % 100)
}

/// The merchant's recognition account, as the API says it.
async fn recognition(hub: &TestHub, key: &str) -> Value {
    let (s, v) = hub.get("/api/v1/merchants/m1/recognition", key).await;
    assert_eq!(s, 200, "{v}");
    v
}

fn is(expr: &str, want: &str) -> String {
    format!("{expr} === {}", json!(want))
}

#[actix_rt::test]
async fn the_stock_tab_shows_stock_discrepancies_and_restocks_live() {
    let (hub, op, mut c) = shop(Backend::Sqlite).await;
    // Planned 10 cola and 5 chips; the cabinet counts 10 and 4: one chips is missing.
    let first = restock(
        &hub,
        &op,
        &mut c,
        Some(json!([{"sku": "cola", "qty": 10}, {"sku": "chips", "qty": 5}])),
        json!([{"sku": "cola", "qty": 10}, {"sku": "chips", "qty": 4}]),
    )
    .await;
    let chips = open_discrepancy(&hub, &op, "chips").await;

    let mut b = Browser::launch(1440, 900).await;
    sign_in(&mut b, &hub, &op).await;
    b.eval("window.sameDocument = true").await;
    // The open discrepancy counts on the tab before it is opened; the merchant's recognitions
    // are postpaid (the default): the restock's count was one.
    b.wait_for(
        &is(
            "document.getElementById('tab-stock-count').textContent",
            "1",
        ),
        PATIENCE,
    )
    .await;
    let a = recognition(&hub, &op).await;
    assert_eq!(
        (&a["billing"], &a["used_today"]),
        (&json!("postpaid"), &json!(1)),
        "{a}"
    );
    let said = format!(
        "Recognitions (postpaid): 1 today · {} ({} each)",
        yuan(&a["fee_today_fen"]),
        yuan(&a["fee_fen"])
    );
    b.wait_for(
        &format!(
            "(() => {{ const r = document.getElementById('recognition');
               return !r.hidden && r.dataset.billing === 'postpaid' && r.dataset.low === 'false'
                 && r.textContent === {}; }})()",
            json!(said)
        ),
        PATIENCE,
    )
    .await;

    // From the cabinet's detail to its stock.
    b.wait_for(
        "!!document.querySelector('#fleet-rows [data-cabinet=KM1]')",
        PATIENCE,
    )
    .await;
    b.eval("document.querySelector('#fleet-rows [data-cabinet=KM1]').click()")
        .await;
    b.wait_for("!document.getElementById('detail').hidden", PATIENCE)
        .await;
    b.eval("document.getElementById('d-stock').click()").await;
    b.wait_for(
        "!document.getElementById('tab-stock').hidden && document.getElementById('detail').hidden",
        PATIENCE,
    )
    .await;
    b.wait_for(&is(&stock_row("cola"), "10 false"), PATIENCE)
        .await;
    b.wait_for(&is(&stock_row("chips"), "4 false"), PATIENCE)
        .await;
    b.wait_for(
        &is(
            "document.getElementById('stock-summary').textContent",
            "KM1: 2 product(s), 0 low",
        ),
        PATIENCE,
    )
    .await;
    assert_eq!(
        b.eval("document.getElementById('stock-cabinet').value")
            .await,
        json!("KM1")
    );

    // The discrepancy: what was expected and what was counted.
    let row = format!("#discrepancies tr[data-discrepancy=\"{chips}\"]");
    b.wait_for(
        &is(
            &format!(
                "[...(document.querySelector('{row}')?.children || [])].slice(1, 6).map((td) => td.textContent).join('|')"
            ),
            "KM1|chips|5|4|-1",
        ),
        PATIENCE,
    )
    .await;
    // The restock that found it is in the history.
    b.wait_for(
        &format!(
            "(() => {{ const r = document.querySelector('#restocks tr[data-restock=\"{first}\"]');
               return !!r && r.dataset.state === 'closed' && r.textContent.includes('KM1')
                 && r.textContent.includes('restocker-1'); }})()"
        ),
        PATIENCE,
    )
    .await;

    // Resolved through its form: it leaves the open list and the tab's count, and the API has it
    // resolved with the note.
    b.eval(&format!(
        "{{ const r = document.querySelector('{row}');
           r.querySelector('[name=note]').value = 'one bag was crushed and thrown away';
           r.querySelector('button[type=submit]').click() }}"
    ))
    .await;
    b.wait_for(
        &format!(
            "!document.querySelector('{row}') && document.getElementById('tab-stock-count').textContent === ''
               && !document.getElementById('discrepancies-empty').hidden"
        ),
        PATIENCE,
    )
    .await;
    let (s, v) = hub
        .get("/api/v1/stock-discrepancies?state=resolved", &op)
        .await;
    assert_eq!(s, 200, "{v}");
    let done = v["items"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == chips.as_str()))
        .unwrap_or_else(|| panic!("{chips} not resolved: {v}"));
    assert_eq!(
        (&done["state"], &done["note"]),
        (
            &json!("resolved"),
            &json!("one bag was crushed and thrown away")
        ),
        "{done}"
    );

    // Shoppers take cola down to its low mark (2): the row turns low over the feed.
    let s1 = visit(&hub, &op, &mut c, "u1", json!([{"sku": "cola", "qty": 8}])).await;
    order_status(&hub, &op, &s1, "paid").await;
    b.wait_for(&is(&stock_row("cola"), "2 true"), PATIENCE)
        .await;
    b.wait_for(
        "!!document.querySelector('#stock-items tr[data-stock-sku=cola].low .badge')
           && !!document.querySelector('#stock-low-seen [data-low-stock=\"KM1/cola\"]')
           && document.getElementById('stock-summary').textContent === 'KM1: 2 product(s), 1 low'",
        PATIENCE,
    )
    .await;
    assert_eq!(b.eval(&stock_row("chips")).await, json!("4 false"));

    // A stock-taking while the page is open: the restock shows as it happens, and the cola it
    // finds missing arrives as an open discrepancy, all without reload.
    let second = restock(
        &hub,
        &op,
        &mut c,
        None,
        json!([{"sku": "cola", "qty": 1}, {"sku": "chips", "qty": 4}]),
    )
    .await;
    let cola = open_discrepancy(&hub, &op, "cola").await;
    b.wait_for(
        &format!(
            "document.querySelector('#restocks tr')?.dataset.restock === '{second}'
               && document.querySelector('#restocks tr').dataset.state === 'closed'"
        ),
        PATIENCE,
    )
    .await;
    b.wait_for(
        &format!(
            "!!document.querySelector('#discrepancies tr[data-discrepancy=\"{cola}\"]')
               && document.getElementById('tab-stock-count').textContent === '1'"
        ),
        PATIENCE,
    )
    .await;
    b.wait_for(&is(&stock_row("cola"), "1 true"), PATIENCE)
        .await;
    assert_eq!(b.eval("window.sameDocument").await, json!(true));
}

#[actix_rt::test]
async fn a_merchant_sees_its_prepaid_recognition_quota_fall() {
    let (hub, op, mut c) = shop_with(Backend::Sqlite, |s| s.recognition.low_quota = 1).await;
    let (s, a) = hub
        .call(
            "PUT",
            "/api/v1/merchants/m1/recognition",
            ADMIN_KEY,
            Some(json!({"billing": "prepaid", "add_quota": 2})),
        )
        .await;
    assert_eq!((s, &a["quota_left"]), (200, &json!(2)), "{a}");
    let key = hub.new_key(ADMIN_KEY, "m1", "merchant_admin").await;
    let key = key["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key: {key}"))
        .to_owned();

    let mut b = Browser::launch(1280, 800).await;
    sign_in(&mut b, &hub, &key).await;
    b.eval("window.sameDocument = true").await;
    b.wait_for(
        "(() => { const r = document.getElementById('recognition');
           return !r.hidden && r.dataset.billing === 'prepaid' && r.dataset.quotaLeft === '2'
             && r.dataset.low === 'false' && r.textContent === 'Recognitions (prepaid): 2 left'; })()",
        PATIENCE,
    )
    .await;

    // A purchase uses one: down to the warning level, the feed says so and the header follows.
    let session = visit(&hub, &op, &mut c, "u1", json!([{"sku": "chips", "qty": 1}])).await;
    order_status(&hub, &op, &session, "paid").await;
    b.wait_for(
        "(() => { const r = document.getElementById('recognition');
           return r.dataset.quotaLeft === '1' && r.dataset.low === 'true'
             && r.textContent.startsWith('Recognitions (prepaid): 1 left — running low')
             && r.querySelector('.notready') !== null; })()",
        PATIENCE,
    )
    .await;
    assert_eq!(b.eval("window.sameDocument").await, json!(true));
}

#[actix_rt::test]
async fn the_stock_tab_speaks_chinese() {
    let (hub, op, mut c) = shop(Backend::Sqlite).await;
    restock(
        &hub,
        &op,
        &mut c,
        Some(json!([{"sku": "cola", "qty": 10}, {"sku": "chips", "qty": 5}])),
        json!([{"sku": "cola", "qty": 10}, {"sku": "chips", "qty": 4}]),
    )
    .await;
    // Cola at its low mark: the low badge shows too.
    let (s, v) = hub
        .call(
            "PUT",
            "/api/v1/cabinets/KM1/stock/cola",
            &op,
            Some(json!({"low_at": 10})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let a = recognition(&hub, &op).await;

    let mut b = Browser::launch_with_lang(1440, 900, "zh-CN").await;
    sign_in(&mut b, &hub, &op).await;
    b.eval("document.querySelector('[data-tab=stock]').click()")
        .await;
    b.wait_for("!document.getElementById('tab-stock').hidden", PATIENCE)
        .await;
    b.eval("{ document.getElementById('stock-cabinet').value = 'KM1'; document.getElementById('stock-form').requestSubmit() }")
        .await;
    b.wait_for(&is(&stock_row("cola"), "10 true"), PATIENCE)
        .await;
    b.wait_for(
        "!!document.querySelector('#discrepancies tr[data-sku=chips]') && document.querySelectorAll('#restocks tr').length === 1",
        PATIENCE,
    )
    .await;
    let got = b
        .eval(
            "[
               document.querySelector('[data-tab=stock] [data-i18n]').textContent,
               ...[...document.querySelectorAll('#tab-stock h2')].map((h) => h.textContent),
               document.querySelector('#stock-form label span').textContent,
               document.querySelector('#stock-form button').textContent,
               document.getElementById('stock-cabinet').placeholder,
               document.getElementById('stock-summary').textContent,
               ...[...document.querySelectorAll('#tab-stock table:first-of-type th')].map((h) => h.textContent),
               document.querySelector('#stock-items tr[data-stock-sku=cola] .badge').textContent,
               document.querySelector('#discrepancies [name=note]').placeholder,
               document.querySelector('#discrepancies button[type=submit]').textContent,
               document.querySelector('#restocks tr td:nth-child(4)').textContent,
               document.getElementById('recognition').textContent,
             ]",
        )
        .await;
    assert_eq!(
        got,
        json!([
            "库存",
            "库存",
            "未处理的库存不一致",
            "补货记录",
            "开门柜",
            "查看",
            "开门柜编号",
            "KM1：2 种商品，1 种低库存",
            "商品编码",
            "商品名称",
            "库存",
            "低库存阈值",
            "状态",
            "更新时间",
            "低库存",
            "核实情况",
            "处理",
            "已结束",
            format!(
                "算法识别次数（后付）：今日 1 次 · {}（每次 {}）",
                yuan(&a["fee_today_fen"]),
                yuan(&a["fee_fen"])
            ),
        ])
    );
    b.eval(crate::i18n::UNTRANSLATED).await;
    let bad = b.eval("untranslated()").await;
    assert_eq!(bad, json!([]), "left in English on the Stock tab");
}
