//! The operator page in Simplified Chinese and English: a browser asking for Chinese gets
//! Chinese (every word of the page's own, data aside), the switch in the header turns it to
//! English without a reload and the choice outlives the page; a browser asking for English
//! gets English.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::browser::{sign_in, Browser};
use crate::harness::{Backend, Cabinet, TestHub, PATIENCE};

/// Defines `untranslated()` in the page: the visible text, and the placeholders, labels and
/// options, that still hold Latin letters once the values the test itself made (ids, the
/// point, the merchant) and the few names kept in every language (API, CSV, °C, the `chk_`
/// prefix of a key) are taken out. Elements marked `data-no-i18n` hold data or a language's
/// own name and are left out.
pub(crate) const UNTRANSLATED: &str = r#"
window.untranslated = () => {
  const kept = [/KM\d+/g, /\blobby\b/g, /\bm1\b/g, /°C/g, /\bAPI\b/g, /\bCSV\b/g, /\bchk_/g];
  const latin = (s) => /[A-Za-z]/.test(kept.reduce((a, re) => a.replace(re, ''), s));
  const bad = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    const p = n.parentElement;
    if (!p || p.closest('[data-no-i18n], script, style, option')) continue;
    if (!p.checkVisibility() || !p.getClientRects().length) continue;
    if (latin(n.textContent)) bad.push(n.textContent.trim());
  }
  for (const n of document.querySelectorAll('[placeholder], [aria-label], [alt], option')) {
    if (n.closest('[data-no-i18n]')) continue;
    for (const v of [n.getAttribute('placeholder'), n.getAttribute('aria-label'), n.getAttribute('alt'), n.tagName === 'OPTION' ? n.textContent : null]) {
      if (v && latin(v)) bad.push(v);
    }
  }
  return bad;
};
true
"#;

/// Keys one language has and the other lacks (a "kind:value" word is Chinese only: English
/// shows the API's word), and keys the page's elements name that no language has.
const MISSING_KEYS: &str = r#"
(() => {
  const en = Object.keys(I18N.en), zh = Object.keys(I18N.zh);
  const named = [...document.querySelectorAll('*')].flatMap((n) =>
    ['i18n', 'i18nPlaceholder', 'i18nAriaLabel', 'i18nTitle', 'i18nAlt'].map((a) => n.dataset && n.dataset[a]).filter(Boolean));
  return [
    ...en.filter((k) => !(k in I18N.zh)).map((k) => 'zh lacks ' + k),
    ...zh.filter((k) => !k.includes(':') && !(k in I18N.en)).map((k) => 'en lacks ' + k),
    ...named.filter((k) => !(k in I18N.en)).map((k) => 'no text for ' + k),
  ];
})()
"#;

const TABS: [&str; 9] = [
    "fleet",
    "alerts",
    "sessions",
    "abnormal",
    "exceptions",
    "settlements",
    "bills",
    "service",
    "stock",
];

/// The text of the first element `selector` finds (`undefined` when there is none).
fn text_of(selector: &str) -> String {
    format!("document.querySelector(\"{selector}\")?.textContent")
}

fn js(expr: &str) -> String {
    expr.to_owned()
}

async fn untranslated(b: &mut Browser, place: &str) -> Vec<String> {
    let v = b.eval("untranslated()").await;
    v.as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|s| format!("{place}: {}", s.as_str().unwrap_or_default()))
        .collect()
}

/// Waits until each `(expression, want)` pair has its expression evaluate to `want`; on
/// timeout names the pairs that still differ and what they were.
async fn texts(b: &mut Browser, want: &[(String, &str)]) {
    let expr = format!(
        "[{}]",
        want.iter()
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let wanted: Vec<Value> = want.iter().map(|(_, w)| json!(w)).collect();
    let start = Instant::now();
    loop {
        let got = b.eval(&expr).await;
        if got.as_array() == Some(&wanted) {
            return;
        }
        if start.elapsed() > PATIENCE {
            let diff: Vec<String> = want
                .iter()
                .zip(got.as_array().cloned().unwrap_or_default())
                .filter(|((_, w), g)| g != &json!(w))
                .map(|((e, w), g)| format!("{e}: {g} (wanted {w:?})"))
                .collect();
            panic!("not within {PATIENCE:?}: {diff:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn switch_to(b: &mut Browser, select: &str, lang: &str) {
    b.eval(&format!(
        "{{ const s = document.getElementById('{select}'); s.value = '{lang}'; s.dispatchEvent(new Event('change')) }}"
    ))
    .await;
}

#[actix_rt::test]
async fn a_chinese_browser_gets_chinese_and_the_switch_keeps_english() {
    // Five days of service time left: the expiring banner shows too.
    let hub = TestHub::start_with(Backend::Sqlite, |s| {
        s.cabinet.initial_service_days = 5;
    })
    .await;
    let (ma, op) = hub.merchant("m1").await;
    let secret = hub.cabinet(&ma, "m1", "KM1").await;
    let mut c = Cabinet::connect(&hub, "KM1", &secret).await;
    c.heartbeat("closed", "locked", true, 1).await;
    hub.wait_online(&op, "KM1").await;

    let mut b = Browser::launch_with_lang(1440, 900, "zh-CN").await;
    sign_in(&mut b, &hub, &op).await;
    assert_eq!(b.eval("navigator.language").await, json!("zh-CN"));
    b.eval(UNTRANSLATED).await;
    // A forced door: an alert, its type and severity in words.
    c.event("door_opened").await;
    b.wait_for(
        "document.querySelector('#fleet-rows [data-cabinet=KM1] .badge.critical')?.textContent === '门被强开'",
        PATIENCE,
    )
    .await;
    texts(
        &mut b,
        &[
            (js("document.documentElement.lang"), "zh-CN"),
            (js("document.getElementById('lang').value"), "zh"),
            (js("document.title"), "cabinet-hub · 运营后台"),
            (text_of("[data-tab=fleet]"), "开门柜"),
            (text_of("[data-tab=alerts] [data-i18n]"), "告警"),
            (text_of("[data-tab=sessions]"), "会话与订单"),
            (text_of("[data-tab=settlements] [data-i18n]"), "分账"),
            (text_of("[data-tab=bills]"), "交易账单与统计"),
            (text_of("[data-tab=service]"), "设备使用时长"),
            (text_of("#signin-button"), "登录"),
            (text_of("#signout"), "退出登录"),
            (text_of("#conn"), "实时"),
            (text_of("#who"), "运营 · m1"),
            (text_of("#shown"), "显示 1 台"),
            (text_of("[data-expiring=KM1]"), "KM1 · 5 天"),
            (text_of("#renew"), "续费…"),
            (text_of(".grid-head [data-i18n='col.door']"), "门"),
            (
                js("document.getElementById('search').placeholder"),
                "搜索编号或点位…",
            ),
        ],
    )
    .await;

    let mut bad = Vec::new();
    for tab in TABS {
        b.eval(&format!(
            "document.querySelector('[data-tab={tab}]').click()"
        ))
        .await;
        b.wait_for(
            &format!("!document.getElementById('tab-{tab}').hidden"),
            PATIENCE,
        )
        .await;
        match tab {
            "alerts" => {
                let row = "#alerts tr[data-type=door_forced]";
                texts(
                    &mut b,
                    &[
                        (text_of(&format!("{row} .badge")), "严重"),
                        (text_of(&format!("{row} td:nth-child(2)")), "门被强开"),
                        (text_of(&format!("{row} td:nth-child(6)")), "未确认"),
                        (text_of(&format!("{row} [data-action=ack]")), "确认"),
                        (text_of(&format!("{row} [data-action=clear]")), "清除"),
                        (text_of("#tab-alerts thead th"), "级别"),
                    ],
                )
                .await;
            }
            // Money is ¥ with two decimals in either language.
            "bills" => {
                b.eval("document.getElementById('bill-form').requestSubmit()")
                    .await;
                let total =
                    |name: &str| format!("document.querySelector('[data-total=\"{name}\"]')");
                texts(
                    &mut b,
                    &[
                        (
                            format!("{}?.previousElementSibling.textContent", total("sales")),
                            "销售额",
                        ),
                        (
                            format!(
                                "String(/^¥\\d+\\.\\d{{2}}$/.test({}?.textContent))",
                                total("sales")
                            ),
                            "true",
                        ),
                        (
                            format!(
                                "{}?.previousElementSibling.textContent",
                                total("service time")
                            ),
                            "设备使用时长",
                        ),
                        (format!("{}?.textContent", total("service time")), "¥0.00"),
                        (
                            format!("{}?.textContent", total("refunded")),
                            "¥0.00（0 笔）",
                        ),
                    ],
                )
                .await;
            }
            _ => {}
        }
        bad.extend(untranslated(&mut b, tab).await);
    }
    // The cabinet's detail: its state, configuration and events.
    b.eval("document.querySelector('[data-tab=fleet]').click()")
        .await;
    b.eval("document.querySelector('#fleet-rows [data-cabinet=KM1]').click()")
        .await;
    texts(
        &mut b,
        &[
            (text_of("#detail h3"), "未清除的告警"),
            (text_of("#d-state span:first-child"), "连接"),
            (text_of("#d-state span:nth-child(2)"), "在线"),
            (text_of("#d-alerts [data-action=clear]"), "清除"),
            (
                js("String(document.getElementById('d-events').textContent.includes('告警 门被强开 发生'))"),
                "true",
            ),
            (
                js("String(document.getElementById('d-config-msg').textContent.startsWith('版本 '))"),
                "true",
            ),
        ],
    )
    .await;
    bad.extend(untranslated(&mut b, "detail").await);
    b.eval("document.getElementById('d-close').click()").await;
    assert!(bad.is_empty(), "left in English: {bad:#?}");
    assert_eq!(b.eval(MISSING_KEYS).await, json!([]));

    // Signed out: the sign-in screen is Chinese, and so is its error.
    b.eval("document.getElementById('signout').click()").await;
    b.eval("document.getElementById('key').value = 'nope'; document.getElementById('signin-button').click()")
        .await;
    texts(
        &mut b,
        &[
            (text_of("#signin-error"), "密钥无效。"),
            (text_of("#signin [data-i18n='signin.key']"), "API 密钥"),
            (js("document.getElementById('signin-lang').value"), "zh"),
        ],
    )
    .await;
    let bad = untranslated(&mut b, "sign-in").await;
    assert!(bad.is_empty(), "left in English: {bad:#?}");

    // The switch: English at once, on the same elements, without a reload.
    sign_in(&mut b, &hub, &op).await;
    b.eval("window.beforeSwitch = true").await;
    switch_to(&mut b, "lang", "en").await;
    let mut english = vec![
        (js("document.documentElement.lang"), "en"),
        (js("String(window.beforeSwitch)"), "true"),
        (js("document.title"), "cabinet-hub · operator"),
        (text_of("[data-tab=fleet]"), "Fleet"),
        (text_of("[data-tab=alerts] [data-i18n]"), "Alerts"),
        (text_of("[data-tab=sessions]"), "Sessions & orders"),
        (text_of("[data-tab=settlements] [data-i18n]"), "Settlements"),
        (text_of("[data-tab=bills]"), "Bills & statistics"),
        (text_of("[data-tab=service]"), "Service time"),
        (text_of("#signin-button"), "Sign in"),
        (text_of("#signout"), "Sign out"),
        (text_of("#conn"), "live"),
        (text_of("#who"), "operator · m1"),
        (text_of("#shown"), "1 shown"),
        (text_of("[data-expiring=KM1]"), "KM1 · 5 d"),
        (text_of("#renew"), "Renew…"),
        (text_of(".grid-head [data-i18n='col.door']"), "Door"),
        (
            text_of("#fleet-rows [data-cabinet=KM1] .badge.critical"),
            "door_forced",
        ),
        (
            js("document.getElementById('search').placeholder"),
            "Search id or point…",
        ),
    ];
    texts(&mut b, &english).await;
    assert_eq!(
        b.eval("localStorage.getItem('cabinet-hub.lang')").await,
        json!("en")
    );

    // A new page (signed out, then in again): still English, though the browser asks for
    // Chinese.
    b.eval("document.getElementById('signout').click()").await;
    sign_in(&mut b, &hub, &op).await;
    english[1] = (js("String(window.beforeSwitch)"), "undefined");
    english.push((js("document.getElementById('lang').value"), "en"));
    english.push((js("document.getElementById('signin-lang').value"), "en"));
    texts(&mut b, &english).await;
}

#[actix_rt::test]
async fn an_english_browser_gets_english() {
    let hub = TestHub::start(Backend::Sqlite).await;
    let (ma, op) = hub.merchant("m1").await;
    hub.cabinet(&ma, "m1", "KM1").await;
    let mut b = Browser::launch(1280, 800).await;
    sign_in(&mut b, &hub, &op).await;
    let lang = b.eval("navigator.language").await;
    assert!(lang.as_str().is_some_and(|l| l.starts_with("en")), "{lang}");
    texts(
        &mut b,
        &[
            (js("document.documentElement.lang"), "en"),
            (js("document.getElementById('lang').value"), "en"),
            (
                js("String(localStorage.getItem('cabinet-hub.lang'))"),
                "null",
            ),
            (text_of("[data-tab=fleet]"), "Fleet"),
            (
                text_of("[data-tab=abnormal] [data-i18n]"),
                "Abnormal orders",
            ),
            (text_of("#signin-button"), "Sign in"),
            (text_of("#who"), "operator · m1"),
            (text_of("#shown"), "1 shown"),
            (
                text_of("#fleet-rows [data-cabinet=KM1] span:nth-child(3)"),
                "offline",
            ),
        ],
    )
    .await;
}
