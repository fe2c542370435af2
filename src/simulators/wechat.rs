//! A WeChat Pay Score simulator that behaves like the real service for the endpoints the hub
//! uses: same paths, fields, states and transitions, error codes, APIv3-signed responses
//! (its own test key pair), and AES-256-GCM-encrypted, signed notifications delivered with
//! WeChat's retry schedule until answered 200/204. Mounted at `/sim/wechatpay`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::journal::Tracked;
use crate::payments::crypto::{
    encrypt_resource, request_message, response_message, RsaSigner, Verifier,
};
use crate::payments::wechat::{Collection, CollectionDetail, ServiceOrder};
use crate::secrets::token;

/// The URL prefix the simulator is mounted at.
pub const PREFIX: &str = "/sim/wechatpay";

/// WeChat's notification retry schedule, seconds after the previous attempt.
pub const RETRY_SCHEDULE_S: [u64; 9] = [15, 15, 30, 180, 1800, 1800, 1800, 1800, 3600];

/// How the simulator is keyed and paced.
#[derive(Clone)]
pub struct SimConfig {
    /// The platform's partner (服务商) merchant id: Pay Score, profit sharing, refunds.
    pub mchid: String,
    /// The platform's ordinary merchant (普通商户) id: the only one that may take a Native
    /// payment, as at WeChat.
    pub direct_mchid: String,
    /// Serial of the merchant key it accepts.
    pub merchant_serial: String,
    /// The merchant's public key (PEM), to verify requests.
    pub merchant_public_key_pem: String,
    /// Serial it signs with.
    pub platform_serial: String,
    /// Its private key (PEM).
    pub platform_key_pem: String,
    /// The APIv3 key notifications are encrypted with.
    pub api_v3_key: String,
    /// The APIv2 key the mini-program's `extraData` is signed with.
    pub api_v2_key: String,
    /// Multiplies [`RETRY_SCHEDULE_S`] (1.0 = real time; tests use a small factor).
    pub retry_scale: f64,
    /// How long a scripted shopper takes to confirm.
    pub confirm_delay: Duration,
    /// Whether cancel is allowed after MCH_COMPLETE (sources disagree).
    pub cancel_after_complete: bool,
    /// Where its state is kept across restarts, as the real service keeps its own.
    pub persist: Option<std::path::PathBuf>,
    /// How long after its creation a finished order is forgotten (refunds need it kept).
    pub finished_kept: Duration,
}

/// How a simulated shopper behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct UserScript {
    /// Whether and how the shopper confirms the pay-after-use order.
    pub confirm: Confirm,
    /// Deductions succeed.
    pub deduction: Deduction,
    /// How long the provider takes to answer a cancel (WeChat) or close (Alipay) of this
    /// shopper's order: a slow provider, for what must not wait on one.
    #[serde(default)]
    pub cancel_delay_ms: u64,
    /// How WeChat settles a refund of this shopper's orders.
    #[serde(default)]
    pub refund: RefundScript,
}

/// How a refund the simulator took (answered PROCESSING, as WeChat does) ends, after the
/// simulator's confirm delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundScript {
    /// SUCCESS, notified (`REFUND.SUCCESS`).
    #[default]
    Succeed,
    /// ABNORMAL (the shopper's account cannot take it), notified; the amount is refundable
    /// again.
    Abnormal,
    /// CLOSED, notified; the amount is refundable again.
    Closed,
    /// SUCCESS, but the notice never comes: only a query finds out.
    Silent,
}

/// How the platform's profit sharing goes for one second-level merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantScript {
    /// The platform is bound as this merchant's receiver: off, a split's receiver ends CLOSED
    /// with `NO_RELATION`.
    #[serde(default = "yes")]
    pub receiver_bound: bool,
    /// Returns (回退) from the platform succeed: off, they end FAILED with
    /// `BALANCE_NOT_ENOUGH` (the platform's account is empty).
    #[serde(default = "yes")]
    pub returns_succeed: bool,
}

fn yes() -> bool {
    true
}

impl Default for MerchantScript {
    fn default() -> Self {
        Self {
            receiver_bound: true,
            returns_succeed: true,
        }
    }
}

/// How a simulated shopper answers the confirmation of a pay-after-use order; in JSON `true`,
/// `false` or `"manual"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// At once (after the simulator's confirm delay), as if their phone did it unprompted.
    Yes,
    /// Never: the order stays unconfirmed.
    No,
    /// Only through the mini-program's hand-off: `POST /sim/wechatpay/confirm` with the
    /// `extraData`, or `POST /sim/alipay/confirm` with the `order_str`, the hub handed out.
    Manual,
}

impl serde::Serialize for Confirm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Confirm::Yes => s.serialize_bool(true),
            Confirm::No => s.serialize_bool(false),
            Confirm::Manual => s.serialize_str("manual"),
        }
    }
}

impl<'de> Deserialize<'de> for Confirm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(true) => Ok(Confirm::Yes),
            Raw::Flag(false) => Ok(Confirm::No),
            Raw::Word(w) if w == "manual" => Ok(Confirm::Manual),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "confirm must be true, false or \"manual\", not {w:?}"
            ))),
        }
    }
}

/// Deduction outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deduction {
    /// Paid at once.
    Succeed,
    /// The balance is short: the order stays USER_PAYING.
    Fail,
    /// The merchant's collection limit is reached (a 小微 merchant's daily cap): Alipay refuses
    /// with `ACQ.BEYOND_PAY_RESTRICTION` until the script changes; WeChat, which does not say
    /// why, leaves the order USER_PAYING as for `fail`.
    MerchantLimit,
}

impl Default for UserScript {
    fn default() -> Self {
        Self {
            confirm: Confirm::Yes,
            deduction: Deduction::Succeed,
            cancel_delay_ms: 0,
            refund: RefundScript::Succeed,
        }
    }
}

#[derive(serde::Serialize, Deserialize)]
struct SimOrder {
    sub_mchid: String,
    notify_url: String,
    openid: String,
    order: ServiceOrder,
    /// The create request as compact JSON (a `Value` took ~4 KB an order); journals written
    /// with the object form still load.
    #[serde(deserialize_with = "json_text")]
    create_body: String,
    refunded: i64,
    /// When it was created (Unix seconds); 0 in journals written before this was kept.
    #[serde(default)]
    created_s: i64,
    /// Completed with `profit_sharing`: the payment stays frozen until split and finished.
    #[serde(default)]
    profit_sharing: bool,
    /// Split to receivers and not returned (fen): what the merchant cannot refund from.
    #[serde(default)]
    shared: i64,
    /// Split requests taken (at most 50).
    #[serde(default)]
    splits: u32,
    /// 完结分账: nothing more can be split.
    #[serde(default)]
    sharing_finished: bool,
}

impl SimOrder {
    /// Nothing more can happen to it but a refund: paid, revoked or expired.
    fn finished(&self) -> bool {
        matches!(self.order.state.as_str(), "DONE" | "REVOKED" | "EXPIRED")
    }

    /// Finished, and created more than `kept_s` ago.
    fn forgettable(&self, now_s: i64, kept_s: i64) -> bool {
        self.finished() && now_s - self.created_s > kept_s
    }
}

/// Orders the simulator remembers before it forgets the oldest finished ones. The real service
/// keeps them for years; a simulator that did would grow with every order of a long run.
const ORDERS_KEPT: usize = 20_000;

/// A JSON text, or any JSON value turned into its text.
fn json_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

#[derive(Default, serde::Serialize, Deserialize)]
struct State {
    orders: Tracked<SimOrder>,
    refunds: Tracked<Value>,
    users: Tracked<UserScript>,
    /// Splits by sub_mchid and out_order_no; each names its order (`order_key`).
    #[serde(default)]
    splits: Tracked<Value>,
    /// Returns by out_return_no.
    #[serde(default)]
    returns: Tracked<Value>,
    /// Profit-sharing scripts by sub_mchid.
    #[serde(default)]
    merchants: Tracked<MerchantScript>,
    /// Native payments (扫码支付) to the platform, by out_trade_no.
    #[serde(default)]
    transactions: Tracked<Value>,
    seq: u64,
}

impl State {
    /// One journal line with what changed since the last one.
    fn changes(&mut self) -> Option<String> {
        let (orders, refunds, users) = (
            self.orders.take_changed(),
            self.refunds.take_changed(),
            self.users.take_changed(),
        );
        let (splits, returns, merchants) = (
            self.splits.take_changed(),
            self.returns.take_changed(),
            self.merchants.take_changed(),
        );
        let transactions = self.transactions.take_changed();
        if orders.is_empty()
            && refunds.is_empty()
            && users.is_empty()
            && splits.is_empty()
            && returns.is_empty()
            && merchants.is_empty()
            && transactions.is_empty()
        {
            return None;
        }
        serde_json::to_string(
            &json!({"orders": orders, "refunds": refunds, "users": users,
            "splits": splits, "returns": returns, "merchants": merchants,
            "transactions": transactions, "seq": self.seq}),
        )
        .ok()
    }

    /// Replays a journal: every line is a partial state, later lines win.
    fn replay(text: &str) -> Result<Self, serde_json::Error> {
        let mut st = State::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let part: State = serde_json::from_str(line)?;
            st.orders.merge(part.orders);
            st.refunds.merge(part.refunds);
            st.users.merge(part.users);
            st.splits.merge(part.splits);
            st.returns.merge(part.returns);
            st.merchants.merge(part.merchants);
            st.transactions.merge(part.transactions);
            st.seq = st.seq.max(part.seq);
        }
        Ok(st)
    }
}

/// The simulator.
#[derive(Clone)]
pub struct WechatSim {
    cfg: SimConfig,
    signer: Arc<RsaSigner>,
    verifier: Arc<Verifier>,
    state: Arc<Mutex<State>>,
    /// The most recent notifications, for `redeliver_all`; bounded so a long run does not
    /// grow with every order.
    sent: Arc<Mutex<VecDeque<(String, String)>>>,
    http: reqwest::Client,
}

/// How many sent notifications the simulator keeps for redelivery: enough for a replay drill,
/// few enough that the bodies (~1 KB each) do not add megabytes to a long run of the hub.
const SENT_KEPT: usize = 1_000;

fn key(sub_mchid: &str, out_order_no: &str) -> String {
    format!("{sub_mchid}\u{1f}{out_order_no}")
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    let t = time::OffsetDateTime::now_utc()
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap_or(time::UtcOffset::UTC));
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Why a simulator request was refused, as WeChat answers: HTTP status, code, message.
#[derive(Debug)]
pub struct SimError(pub u16, pub &'static str, pub String);

impl WechatSim {
    /// Builds the simulator.
    pub fn new(cfg: SimConfig) -> anyhow::Result<Self> {
        let signer = RsaSigner::from_pem(&cfg.platform_key_pem)
            .map_err(|e| anyhow::anyhow!("simulator key: {e}"))?;
        let mut verifier = Verifier::new(300);
        verifier
            .add_pem(&cfg.merchant_serial, &cfg.merchant_public_key_pem)
            .map_err(|e| anyhow::anyhow!("merchant public key: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let state = match cfg.persist.as_ref().filter(|p| p.exists()) {
            Some(p) => {
                let text = std::fs::read_to_string(p)?;
                let st = State::replay(&text)
                    .map_err(|e| anyhow::anyhow!("simulator state {}: {e}", p.display()))?;
                // Compacted to one line, so the journal does not grow across restarts.
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_string(&st)? + "\n")?;
                std::fs::rename(&tmp, p)?;
                st
            }
            None => State::default(),
        };
        Ok(Self {
            cfg,
            signer: Arc::new(signer),
            verifier: Arc::new(verifier),
            state: Arc::new(Mutex::new(state)),
            sent: Arc::new(Mutex::new(VecDeque::new())),
            http,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends what changed to the journal when persistence is on. Appends happen under the
    /// state lock, so lines are in the order of the changes.
    fn save(&self) {
        use std::io::Write as _;
        let mut st = self.lock();
        match &self.cfg.persist {
            Some(path) => {
                if let Some(line) = st.changes() {
                    let written = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
                    if let Err(e) = written {
                        tracing::error!(error = %e, "simulator state not saved");
                    }
                }
            }
            None => {
                st.orders.take_changed();
                st.refunds.take_changed();
                st.users.take_changed();
            }
        }
        // After the journal line, so a forgotten order's last state is on disk.
        st.orders.evict(ORDERS_KEPT, 8, SimOrder::finished);
        // And, whatever the count, those finished longer ago than `finished_kept`, so that a
        // long run's memory levels off (at 5 orders a second the count cap alone takes an hour).
        let (now, kept) = (now_s(), self.cfg.finished_kept.as_secs() as i64);
        st.orders.evict(0, 8, |o| o.forgettable(now, kept));
    }

    /// Scripts a shopper.
    pub fn set_user(&self, user: &str, script: UserScript) {
        self.lock().users.insert(user.to_owned(), script);
        self.save();
    }

    /// Scripts a second-level merchant's profit sharing.
    pub fn set_merchant(&self, sub_mchid: &str, script: MerchantScript) {
        self.lock().merchants.insert(sub_mchid.to_owned(), script);
        self.save();
    }

    /// The shopper's script (default: confirm, deductions succeed).
    pub fn user(&self, user: &str) -> UserScript {
        self.lock().users.get(user).copied().unwrap_or_default()
    }

    /// The shopper pays every outstanding deduction (as if they paid later). Returns how many.
    pub fn user_pays(&self, user: &str) -> usize {
        let keys: Vec<String> = {
            let st = self.lock();
            st.orders
                .iter()
                .filter(|(_, o)| {
                    o.openid == user
                        && o.order
                            .collection
                            .as_ref()
                            .is_some_and(|c| c.state == "USER_PAYING")
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in &keys {
            self.deduct(k, true);
        }
        keys.len()
    }

    fn signed(&self, status: u16, body: Option<&Value>) -> HttpResponse {
        let text = body.map(Value::to_string).unwrap_or_default();
        let ts = now_s();
        let nonce = token(32).unwrap_or_default();
        let sig = self
            .signer
            .sign(response_message(ts, &nonce, &text).as_bytes())
            .unwrap_or_default();
        let mut b = HttpResponse::build(
            actix_web::http::StatusCode::from_u16(status)
                .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
        );
        b.insert_header(("Wechatpay-Timestamp", ts.to_string()))
            .insert_header(("Wechatpay-Nonce", nonce))
            .insert_header(("Wechatpay-Signature", sig))
            .insert_header(("Wechatpay-Serial", self.cfg.platform_serial.clone()));
        if body.is_some() {
            b.content_type("application/json").body(text)
        } else {
            b.finish()
        }
    }

    fn error(&self, e: SimError) -> HttpResponse {
        self.signed(e.0, Some(&json!({"code": e.1, "message": e.2})))
    }

    /// Checks the merchant's `Authorization` over exactly what was received.
    fn authenticate(&self, req: &HttpRequest, body: &str) -> Result<(), SimError> {
        let sign_error = |m: &str| SimError(401, "SIGN_ERROR", m.to_owned());
        let auth = req
            .headers()
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| sign_error("缺少Authorization"))?;
        let params = auth
            .strip_prefix("WECHATPAY2-SHA256-RSA2048 ")
            .ok_or_else(|| sign_error("认证类型错误"))?;
        let mut fields = HashMap::new();
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                fields.insert(k, v.trim_matches('"'));
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| sign_error(&format!("缺少{k}")))
        };
        let signer = get("mchid")?;
        if signer != self.cfg.mchid && signer != self.cfg.direct_mchid {
            return Err(SimError(401, "NO_AUTH", "商户号不匹配".into()));
        }
        let ts: i64 = get("timestamp")?
            .parse()
            .map_err(|_| sign_error("timestamp"))?;
        if (now_s() - ts).abs() > 300 {
            return Err(sign_error("请求已过期"));
        }
        let path_q = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
        let url = path_q.strip_prefix(PREFIX).unwrap_or(path_q);
        let message = request_message(req.method().as_str(), url, ts, get("nonce_str")?, body);
        self.verifier
            .verify_message(get("serial_no")?, message.as_bytes(), get("signature")?)
            .map_err(|_| sign_error("签名错误"))
    }

    fn next_id(&self, prefix: &str) -> String {
        let mut st = self.lock();
        st.seq += 1;
        format!("{prefix}{}{:08}", now_s(), st.seq)
    }

    /// Sends a notification about an order, retrying on WeChat's schedule until answered.
    fn notify(&self, order_key: &str, event_type: &'static str) {
        if let Some(notice) = self.notice_of(order_key) {
            self.send_notice(notice, event_type);
        }
    }

    /// Where a notification about the order goes, and its resource as the order stands now.
    fn notice_of(&self, order_key: &str) -> Option<(String, Value)> {
        let st = self.lock();
        let o = st.orders.get(order_key)?;
        let mut resource = serde_json::to_value(&o.order).unwrap_or(Value::Null);
        // As WeChat's notices name them: the application and both merchants of the order.
        let appid = serde_json::from_str::<Value>(&o.create_body)
            .ok()
            .and_then(|b| b["appid"].as_str().map(str::to_owned));
        resource["appid"] = json!(appid);
        resource["mchid"] = json!(self.cfg.mchid);
        resource["sub_mchid"] = json!(o.sub_mchid);
        Some((o.notify_url.clone(), resource))
    }

    fn send_notice(&self, notice: (String, Value), event_type: &'static str) {
        self.send_notice_of(notice, event_type, "payscore", "支付分服务单通知");
    }

    /// Sends a notification whose resource is of `kind` (its associated data and original
    /// type: `payscore`, `transaction`).
    fn send_notice_of(
        &self,
        (url, resource): (String, Value),
        event_type: &'static str,
        kind: &'static str,
        summary: &'static str,
    ) {
        let sim = self.clone();
        let id = self.next_id("EV-");
        tokio::spawn(async move {
            let nonce = token(12).unwrap_or_default();
            let plain = resource.to_string();
            let Ok(ciphertext) = encrypt_resource(
                sim.cfg.api_v3_key.as_bytes(),
                &nonce,
                kind,
                plain.as_bytes(),
            ) else {
                return;
            };
            let body = json!({"id": id, "create_time": rfc3339_now(), "event_type": event_type, "resource_type": "encrypt-resource",
                "summary": summary,
                "resource": {"algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext, "nonce": nonce, "associated_data": kind, "original_type": kind}})
            .to_string();
            {
                let mut sent = sim.sent.lock().unwrap_or_else(|p| p.into_inner());
                if sent.len() == SENT_KEPT {
                    sent.pop_front();
                }
                sent.push_back((url.clone(), body.clone()));
            }
            sim.deliver(url, body).await;
        });
    }

    /// Delivers one notification, retrying on WeChat's schedule until answered 200/204.
    async fn deliver(&self, url: String, body: String) {
        let mut attempt = 0;
        loop {
            let ts = now_s();
            let n = token(32).unwrap_or_default();
            let sig = self
                .signer
                .sign(response_message(ts, &n, &body).as_bytes())
                .unwrap_or_default();
            let sent = self
                .http
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Wechatpay-Timestamp", ts.to_string())
                .header("Wechatpay-Nonce", n)
                .header("Wechatpay-Signature", sig)
                .header("Wechatpay-Serial", self.cfg.platform_serial.clone())
                .body(body.clone())
                .send()
                .await;
            if sent
                .as_ref()
                .is_ok_and(|r| r.status().as_u16() == 200 || r.status().as_u16() == 204)
            {
                return;
            }
            let Some(wait) = RETRY_SCHEDULE_S.get(attempt) else {
                tracing::warn!(url = %url, "simulator gave up delivering a notification");
                return;
            };
            attempt += 1;
            tokio::time::sleep(Duration::from_secs_f64(*wait as f64 * self.cfg.retry_scale)).await;
        }
    }

    /// WeChat keeps retrying a failed or interrupted deduction by itself after `complete`,
    /// and never expires the order meanwhile. This loop does that every `every`.
    pub fn start_deduction_retries(&self, every: Duration) {
        let sim = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let owed: Vec<String> = {
                    let st = sim.lock();
                    st.orders
                        .iter()
                        .filter(|(_, o)| {
                            o.order
                                .collection
                                .as_ref()
                                .is_some_and(|c| c.state == "USER_PAYING")
                        })
                        .map(|(k, _)| k.clone())
                        .collect()
                };
                for k in owed {
                    sim.deduct(&k, false);
                }
            }
        });
    }

    /// Delivers every notification sent so far (the latest `SENT_KEPT`) once more, as WeChat
    /// does when it is unsure an answer arrived: the receiver must change nothing. Returns how
    /// many.
    pub async fn redeliver_all(&self) -> usize {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (url, body) in &sent {
            self.deliver(url.clone(), body.clone()).await;
        }
        sent.len()
    }

    /// Tries the deduction of a completed order; `force` = the shopper paid.
    fn deduct(&self, order_key: &str, force: bool) {
        let paid = {
            let mut st = self.lock();
            let script = st
                .orders
                .get(order_key)
                .map(|o| st.users.get(&o.openid).copied().unwrap_or_default());
            let txn = format!("42000{}{:06}", now_s(), st.seq + 1);
            st.seq += 1;
            let Some(o) = st.orders.get_mut(order_key) else {
                return;
            };
            let Some(c) = o.order.collection.as_mut() else {
                return;
            };
            if c.state != "USER_PAYING" {
                return;
            }
            let ok = force
                || c.paying_amount == 0
                || script.is_some_and(|s| s.deduction == Deduction::Succeed);
            if !ok {
                return;
            }
            let amount = c.paying_amount;
            c.details.push(CollectionDetail {
                seq: c.details.len() as u32 + 1,
                amount,
                paid_type: "NEWTON".into(),
                paid_time: rfc3339_now(),
                transaction_id: txn,
            });
            c.paid_amount += amount;
            c.paying_amount = 0;
            c.state = "USER_PAID".into();
            o.order.state = "DONE".into();
            o.order.state_description = None;
            true
        };
        if paid {
            // Taken before the save: saving may forget a finished order (`finished_kept`), and
            // the shopper's payment must still be notified. The journal line still comes first.
            let notice = self.notice_of(order_key);
            self.save();
            if let Some(notice) = notice {
                self.send_notice(notice, "PAYSCORE.USER_PAID");
            }
        }
    }

    /// `POST /v3/pay/transactions/native`: a payment to the platform, answered with the
    /// `code_url` the payer scans; an identical repeat answers the same, a different one
    /// under the same out_trade_no is refused.
    fn native(&self, body: &Value) -> Result<Value, SimError> {
        let param = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
        let s = |k: &str| {
            body[k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| param(&format!("缺少参数{k}")))
        };
        let no = s("out_trade_no")?;
        if no.len() < 6
            || no.len() > 32
            || !no
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-|*".contains(&b))
        {
            return Err(param("out_trade_no格式错误"));
        }
        // A partner (服务商) account cannot take a payment itself.
        if s("mchid")? != self.cfg.direct_mchid {
            return Err(SimError(
                403,
                "NO_AUTH",
                "当前商户号没有使用该接口的权限".into(),
            ));
        }
        let (appid, notify_url, description) = (s("appid")?, s("notify_url")?, s("description")?);
        if appid.is_empty() || description.is_empty() || description.chars().count() > 127 {
            return Err(param("description"));
        }
        if !(notify_url.starts_with("http://") || notify_url.starts_with("https://")) {
            return Err(param("notify_url格式错误"));
        }
        let total = body["amount"]["total"].as_i64().unwrap_or(0);
        if total <= 0
            || body["amount"]["currency"]
                .as_str()
                .is_some_and(|c| c != "CNY")
        {
            return Err(param("amount.total"));
        }
        let expire_s = match body["time_expire"].as_str() {
            Some(t) => {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| param("time_expire格式错误"))?
                    .unix_timestamp()
            }
            // WeChat's own limit for a Native payment without one: two hours.
            None => now_s() + 7_200,
        };
        let mut st = self.lock();
        if let Some(t) = st.transactions.get(&no) {
            if t["request"] == *body {
                return Ok(json!({"code_url": t["code_url"]}));
            }
            return Err(SimError(
                400,
                "INVALID_REQUEST",
                "201 商户订单号重复".into(),
            ));
        }
        st.seq += 1;
        let code_url = format!(
            "weixin://wxpay/bizpayurl?pr={}{:06}",
            token(7).unwrap_or_default(),
            st.seq
        );
        st.transactions.insert(
            no.clone(),
            json!({"request": body, "appid": appid, "mchid": self.cfg.direct_mchid, "out_trade_no": no,
                "trade_type": "NATIVE", "trade_state": "NOTPAY", "trade_state_desc": "订单未支付",
                "notify_url": notify_url, "code_url": code_url, "expire_s": expire_s,
                "amount": {"total": total, "currency": "CNY"}}),
        );
        Ok(json!({"code_url": code_url}))
    }

    /// A Native payment as WeChat shows it (`GET /v3/pay/transactions/out-trade-no/{no}`).
    fn transaction(&self, no: &str) -> Result<Value, SimError> {
        let st = self.lock();
        let t = st
            .transactions
            .get(no)
            .ok_or_else(|| SimError(404, "ORDER_NOT_EXIST", "订单不存在".into()))?;
        Ok(Self::transaction_view(t))
    }

    fn transaction_view(t: &Value) -> Value {
        let mut v = t.clone();
        if let Some(m) = v.as_object_mut() {
            for internal in ["request", "notify_url", "code_url", "expire_s"] {
                m.remove(internal);
            }
        }
        v
    }

    /// `POST …/out-trade-no/{no}/close`: an unpaid payment can no longer be paid; a paid one
    /// cannot be closed.
    fn close_transaction(&self, no: &str, body: &Value) -> Result<(), SimError> {
        if body["mchid"].as_str() != Some(self.cfg.direct_mchid.as_str()) {
            return Err(SimError(
                403,
                "NO_AUTH",
                "当前商户号没有使用该接口的权限".into(),
            ));
        }
        let mut st = self.lock();
        let t = st
            .transactions
            .get_mut(no)
            .ok_or_else(|| SimError(404, "ORDER_NOT_EXIST", "订单不存在".into()))?;
        match t["trade_state"].as_str() {
            Some("SUCCESS") | Some("REFUND") => {
                Err(SimError(400, "ORDERPAID", "订单已支付".into()))
            }
            _ => {
                t["trade_state"] = json!("CLOSED");
                t["trade_state_desc"] = json!("订单已关闭");
                Ok(())
            }
        }
    }

    /// The payer scans `code_url` and pays (what WeChat's app does): refused once the payment
    /// is closed, expired or paid; then WeChat notifies the payee (`TRANSACTION.SUCCESS`).
    pub fn pay_native(&self, code_url: &str, openid: &str) -> Result<Value, SimError> {
        let notice = {
            let mut st = self.lock();
            st.seq += 1;
            let txn = format!("42000{}{:06}", now_s(), st.seq);
            let Some((_, t)) = st
                .transactions
                .iter()
                .find(|(_, t)| t["code_url"].as_str() == Some(code_url))
                .map(|(k, t)| (k.clone(), t.clone()))
            else {
                return Err(SimError(400, "INVALID_REQUEST", "二维码无效".into()));
            };
            let no = t["out_trade_no"].as_str().unwrap_or_default().to_owned();
            match t["trade_state"].as_str() {
                Some("NOTPAY") if now_s() < t["expire_s"].as_i64().unwrap_or(0) => {}
                Some("NOTPAY") | Some("CLOSED") => {
                    return Err(SimError(400, "ORDER_CLOSED", "订单已关闭或已过期".into()))
                }
                _ => return Err(SimError(400, "ORDERPAID", "订单已支付".into())),
            }
            let Some(t) = st.transactions.get_mut(&no) else {
                return Err(SimError(400, "INVALID_REQUEST", "二维码无效".into()));
            };
            let total = t["amount"]["total"].as_i64().unwrap_or(0);
            t["trade_state"] = json!("SUCCESS");
            t["trade_state_desc"] = json!("支付成功");
            t["transaction_id"] = json!(txn);
            t["success_time"] = json!(rfc3339_now());
            t["bank_type"] = json!("OTHERS");
            t["payer"] = json!({"openid": openid});
            t["amount"] = json!({"total": total, "payer_total": total, "currency": "CNY", "payer_currency": "CNY"});
            (
                t["notify_url"].as_str().unwrap_or_default().to_owned(),
                Self::transaction_view(t),
            )
        };
        self.save();
        let view = notice.1.clone();
        self.send_notice_of(notice, "TRANSACTION.SUCCESS", "transaction", "支付成功");
        Ok(view)
    }

    fn create(&self, body: &Value) -> Result<Value, SimError> {
        let param = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
        let s = |k: &str| {
            body[k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| param(&format!("缺少参数{k}")))
        };
        let out_order_no = s("out_order_no")?;
        if out_order_no.is_empty()
            || out_order_no.len() > 32
            || !out_order_no
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-|*".contains(&b))
        {
            return Err(param("out_order_no格式错误"));
        }
        let sub_mchid = s("sub_mchid")?;
        let (service_id, notify_url, openid) = (s("service_id")?, s("notify_url")?, s("openid")?);
        if body["need_user_confirm"] != true {
            return Err(param("need_user_confirm"));
        }
        if s("service_introduction")?.chars().count() > 20 {
            return Err(param("service_introduction超长"));
        }
        let risk = body["risk_fund"]["amount"]
            .as_i64()
            .filter(|a| *a > 0)
            .ok_or_else(|| param("risk_fund.amount"))?;
        if body.get("post_payments").is_some() {
            return Err(param("创建订单不允许传post_payments"));
        }
        let k = key(&sub_mchid, &out_order_no);
        {
            let st = self.lock();
            if let Some(existing) = st.orders.get(&k) {
                // Identical retries are idempotent; a different body with the same number is not.
                let same = serde_json::from_str::<Value>(&existing.create_body)
                    .is_ok_and(|first| first == *body);
                return if same {
                    Ok(serde_json::to_value(&existing.order).unwrap_or(Value::Null))
                } else {
                    Err(SimError(400, "INVALID_REQUEST", "商户订单号重复".into()))
                };
            }
        }
        let order = ServiceOrder {
            out_order_no: out_order_no.clone(),
            service_id,
            state: "CREATED".into(),
            state_description: None,
            order_id: Some(self.next_id("1000")),
            total_amount: None,
            openid: None,
            risk_fund: Some(crate::payments::wechat::RiskFund {
                name: body["risk_fund"]["name"]
                    .as_str()
                    .unwrap_or("ESTIMATE_ORDER_COST")
                    .into(),
                amount: risk,
            }),
            collection: None,
            package: Some(format!("sim_{out_order_no}")),
            attach: body["attach"].as_str().map(str::to_owned),
        };
        let v = serde_json::to_value(&order).unwrap_or(Value::Null);
        self.lock().orders.insert(
            k.clone(),
            SimOrder {
                sub_mchid,
                notify_url,
                openid: openid.clone(),
                order,
                create_body: body.to_string(),
                refunded: 0,
                created_s: now_s(),
                profit_sharing: false,
                shared: 0,
                splits: 0,
                sharing_finished: false,
            },
        );
        if self.user(&openid).confirm == Confirm::Yes {
            let sim = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(sim.cfg.confirm_delay).await;
                let confirmed = {
                    let mut st = sim.lock();
                    match st.orders.get_mut(&k) {
                        Some(o) if o.order.state == "CREATED" => {
                            o.order.state = "DOING".into();
                            o.order.state_description = Some("USER_CONFIRM".into());
                            o.order.openid = Some(o.openid.clone());
                            true
                        }
                        _ => false,
                    }
                };
                if confirmed {
                    sim.save();
                    sim.notify(&k, "PAYSCORE.USER_CONFIRM");
                }
            });
        }
        Ok(v)
    }

    /// The shopper confirms through the mini-program: `extra_data` exactly as the merchant's
    /// front end passed it to `wx.openBusinessView`. Verified as WeChat would (sign type, the
    /// APIv2 signature, the merchant, a known `package`); the order moves to DOING
    /// (USER_CONFIRM) and the merchant is notified. A repeat of a confirmed order changes
    /// nothing. Answers the order.
    pub fn confirm_by_hand(&self, extra_data: &Value) -> Result<Value, SimError> {
        let bad = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
        let extra: crate::payments::wechat::ExtraData = serde_json::from_value(extra_data.clone())
            .map_err(|e| bad(&format!("extraData: {e}")))?;
        if extra.sign_type != "HMAC-SHA256" {
            return Err(bad("sign_type必须为HMAC-SHA256"));
        }
        let want = crate::payments::crypto::apiv2_sign(extra.fields(), &self.cfg.api_v2_key);
        if !crate::secrets::constant_time_eq(&want, &extra.sign) {
            return Err(SimError(400, "SIGN_ERROR", "签名错误".into()));
        }
        if extra.mch_id != self.cfg.mchid {
            return Err(bad("mch_id与package不匹配"));
        }
        let (k, confirmed) = {
            let mut st = self.lock();
            let k = st
                .orders
                .iter()
                .find(|(_, o)| o.order.package.as_deref() == Some(extra.package.as_str()))
                .map(|(k, _)| k.clone())
                .ok_or_else(|| bad("package无效"))?;
            let o = st.orders.get_mut(&k).ok_or_else(|| bad("package无效"))?;
            let confirmed = match o.order.state.as_str() {
                "CREATED" => {
                    o.order.state = "DOING".into();
                    o.order.state_description = Some("USER_CONFIRM".into());
                    o.order.openid = Some(o.openid.clone());
                    true
                }
                "DOING" => false,
                _ => {
                    return Err(SimError(
                        400,
                        "INVALID_REQUEST",
                        "当前订单状态不合法".into(),
                    ))
                }
            };
            (k, confirmed)
        };
        if confirmed {
            self.save();
            self.notify(&k, "PAYSCORE.USER_CONFIRM");
        }
        let st = self.lock();
        Ok(st
            .orders
            .get(&k)
            .map(|o| serde_json::to_value(&o.order).unwrap_or(Value::Null))
            .unwrap_or(Value::Null))
    }

    fn find(&self, sub_mchid: &str, out_order_no: &str) -> Result<Value, SimError> {
        self.lock()
            .orders
            .get(&key(sub_mchid, out_order_no))
            .map(|o| serde_json::to_value(&o.order).unwrap_or(Value::Null))
            .ok_or_else(|| SimError(404, "ORDER_NOT_EXIST", "订单不存在".into()))
    }

    /// The scripted wait before answering a cancel of an order (none for an unknown one).
    fn cancel_delay(&self, sub_mchid: &str, out_order_no: &str) -> Duration {
        let st = self.lock();
        let ms = st
            .orders
            .get(&key(sub_mchid, out_order_no))
            .and_then(|o| st.users.get(&o.openid))
            .map_or(0, |u| u.cancel_delay_ms);
        Duration::from_millis(ms)
    }

    fn cancel(&self, out_order_no: &str, body: &Value) -> Result<Value, SimError> {
        let sub = body["sub_mchid"].as_str().unwrap_or_default();
        if body["reason"]
            .as_str()
            .is_none_or(|r| r.is_empty() || r.chars().count() > 50)
        {
            return Err(SimError(400, "PARAM_ERROR", "reason".into()));
        }
        let k = key(sub, out_order_no);
        let mut st = self.lock();
        let o = st
            .orders
            .get_mut(&k)
            .ok_or_else(|| SimError(404, "ORDER_NOT_EXIST", "订单不存在".into()))?;
        let allowed = match (o.order.state.as_str(), o.order.state_description.as_deref()) {
            ("CREATED", _) | ("DOING", Some("USER_CONFIRM")) => true,
            ("DOING", Some("MCH_COMPLETE")) => self.cfg.cancel_after_complete,
            _ => false,
        };
        if !allowed {
            return Err(SimError(
                400,
                "INVALID_REQUEST",
                "当前订单状态不合法".into(),
            ));
        }
        o.order.state = "REVOKED".into();
        o.order.state_description = None;
        Ok(
            json!({"out_order_no": out_order_no, "service_id": o.order.service_id, "order_id": o.order.order_id}),
        )
    }

    fn complete(&self, out_order_no: &str, body: &Value) -> Result<String, SimError> {
        let sub = body["sub_mchid"].as_str().unwrap_or_default();
        let k = key(sub, out_order_no);
        let sum = |field: &str| -> Result<i64, SimError> {
            body[field].as_array().map_or(Ok(0), |a| {
                a.iter().try_fold(0i64, |acc, x| {
                    x["amount"]
                        .as_i64()
                        .filter(|v| *v >= 0)
                        .map(|v| acc + v)
                        .ok_or(SimError(400, "PARAM_ERROR", format!("{field}.amount")))
                })
            })
        };
        if body["post_payments"].as_array().is_none_or(Vec::is_empty) {
            return Err(SimError(400, "PARAM_ERROR", "post_payments必填".into()));
        }
        if body["post_discounts"]
            .as_array()
            .is_some_and(|d| d.len() > 30)
        {
            return Err(SimError(
                400,
                "PARAM_ERROR",
                "post_discounts最多30条".into(),
            ));
        }
        let total = body["total_amount"].as_i64().ok_or(SimError(
            400,
            "PARAM_ERROR",
            "total_amount".into(),
        ))?;
        if total != sum("post_payments")? - sum("post_discounts")? || total < 0 {
            return Err(SimError(400, "PARAM_ERROR", "最终总金额计算非法".into()));
        }
        let mut st = self.lock();
        let o = st
            .orders
            .get_mut(&k)
            .ok_or_else(|| SimError(404, "ORDER_NOT_EXIST", "订单不存在".into()))?;
        if o.order.state != "DOING" || o.order.state_description.as_deref() != Some("USER_CONFIRM")
        {
            return Err(SimError(
                400,
                "INVALID_REQUEST",
                "当前订单状态不合法".into(),
            ));
        }
        if o.order.risk_fund.as_ref().is_some_and(|r| total > r.amount) {
            return Err(SimError(
                400,
                "PARAM_ERROR",
                "total_amount超过风险金额".into(),
            ));
        }
        o.order.state_description = Some("MCH_COMPLETE".into());
        o.order.total_amount = Some(total);
        o.profit_sharing = body["profit_sharing"].as_bool().unwrap_or(false);
        o.order.collection = Some(Collection {
            state: "USER_PAYING".into(),
            total_amount: total,
            paying_amount: total,
            paid_amount: 0,
            details: vec![],
        });
        Ok(k)
    }

    /// `modify`: only while the deduction is pending (MCH_COMPLETE, USER_PAYING), only lower.
    fn modify(&self, out_order_no: &str, body: &Value) -> Result<(), SimError> {
        let sub = body["sub_mchid"].as_str().unwrap_or_default();
        let sum = |field: &str| -> i64 {
            body[field]
                .as_array()
                .map_or(0, |a| a.iter().filter_map(|x| x["amount"].as_i64()).sum())
        };
        let total = body["total_amount"].as_i64().ok_or(SimError(
            400,
            "PARAM_ERROR",
            "total_amount".into(),
        ))?;
        if body["reason"].as_str().is_none_or(|r| r.is_empty()) {
            return Err(SimError(400, "PARAM_ERROR", "reason".into()));
        }
        if total != sum("post_payments") - sum("post_discounts") || total < 0 {
            return Err(SimError(400, "PARAM_ERROR", "最终总金额计算非法".into()));
        }
        let mut st = self.lock();
        let o = st
            .orders
            .get_mut(&key(sub, out_order_no))
            .ok_or_else(|| SimError(404, "ORDER_NOT_EXIST", "订单不存在".into()))?;
        let c = o
            .order
            .collection
            .as_mut()
            .filter(|c| c.state == "USER_PAYING")
            .ok_or_else(|| SimError(400, "INVALID_REQUEST", "当前订单状态不合法".into()))?;
        if total >= c.total_amount {
            return Err(SimError(400, "PARAM_ERROR", "修改金额只能调低".into()));
        }
        c.total_amount = total;
        c.paying_amount = total - c.paid_amount;
        o.order.total_amount = Some(total);
        Ok(())
    }

    /// `POST /v3/ecommerce/refunds/apply`: taken as PROCESSING (the amount held against the
    /// order), settled after the confirm delay as the shopper's script says, then notified.
    /// The same `out_refund_no` answers the same refund.
    fn refund(&self, body: &Value) -> Result<Value, SimError> {
        let param = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
        let out_refund_no = body["out_refund_no"]
            .as_str()
            .ok_or_else(|| param("out_refund_no"))?
            .to_owned();
        let txn = body["transaction_id"]
            .as_str()
            .ok_or_else(|| param("transaction_id"))?;
        let amount = body["amount"]["refund"]
            .as_i64()
            .filter(|a| *a > 0)
            .ok_or_else(|| param("amount.refund"))?;
        let notify_url = body["notify_url"].as_str().unwrap_or_default().to_owned();
        let (r, key, script) = {
            let mut st = self.lock();
            if let Some(existing) = st.refunds.get(&out_refund_no) {
                return Ok(existing.clone());
            }
            let (key, o) = st
                .orders
                .iter()
                .find(|(_, o)| {
                    o.order
                        .collection
                        .as_ref()
                        .is_some_and(|c| c.details.iter().any(|d| d.transaction_id == txn))
                })
                .map(|(k, o)| (k.clone(), o.openid.clone()))
                .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "订单不存在".into()))?;
            let script = st.users.get(&o).map(|u| u.refund).unwrap_or_default();
            let order = st
                .orders
                .get_mut(&key)
                .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "订单不存在".into()))?;
            let paid = order
                .order
                .collection
                .as_ref()
                .map(|c| c.paid_amount)
                .unwrap_or(0);
            if order.refunded + amount > paid {
                return Err(SimError(403, "NOT_ENOUGH", "退款金额超过可退金额".into()));
            }
            // What was split to the platform is not the merchant's to refund until it is
            // returned (research/payments.md: return the split first, then refund).
            if order.refunded + amount > paid - order.shared {
                return Err(SimError(
                    403,
                    "NOT_ENOUGH",
                    "二级商户可用余额不足，请先回退分账".into(),
                ));
            }
            order.refunded += amount;
            let sub_mchid = order.sub_mchid.clone();
            st.seq += 1;
            let r = json!({"refund_id": format!("50300{}{:06}", now_s(), st.seq), "out_refund_no": out_refund_no,
                           "transaction_id": txn, "sub_mchid": sub_mchid, "status": "PROCESSING",
                           "amount": {"refund": amount, "total": paid, "currency": "CNY"}});
            st.refunds.insert(out_refund_no.clone(), r.clone());
            (r, key, script)
        };
        self.save();
        let sim = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(sim.cfg.confirm_delay).await;
            sim.settle_refund(&out_refund_no, &key, amount, script, notify_url);
        });
        Ok(r)
    }

    fn settle_refund(
        &self,
        out_refund_no: &str,
        order_key: &str,
        amount: i64,
        script: RefundScript,
        notify_url: String,
    ) {
        let (status, event) = match script {
            RefundScript::Succeed | RefundScript::Silent => ("SUCCESS", "REFUND.SUCCESS"),
            RefundScript::Abnormal => ("ABNORMAL", "REFUND.ABNORMAL"),
            RefundScript::Closed => ("CLOSED", "REFUND.CLOSED"),
        };
        let resource = {
            let mut st = self.lock();
            if status != "SUCCESS" {
                if let Some(o) = st.orders.get_mut(order_key) {
                    o.refunded -= amount;
                }
            }
            let Some(r) = st.refunds.get_mut(out_refund_no) else {
                return;
            };
            r["status"] = json!(status);
            let mut resource = r.clone();
            resource["refund_status"] = json!(status);
            resource["sp_mchid"] = json!(self.cfg.mchid);
            resource
        };
        self.save();
        if script != RefundScript::Silent && !notify_url.is_empty() {
            self.send_notice((notify_url, resource), event);
        }
    }

    /// The order a paid `transaction_id` belongs to, of this second-level merchant.
    fn paid_order_key(st: &State, sub_mchid: &str, txn: &str) -> Result<String, SimError> {
        st.orders
            .iter()
            .find(|(_, o)| {
                o.sub_mchid == sub_mchid
                    && o.order
                        .collection
                        .as_ref()
                        .is_some_and(|c| c.details.iter().any(|d| d.transaction_id == txn))
            })
            .map(|(k, _)| k.clone())
            .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "订单不存在".into()))
    }

    /// `POST /v3/ecommerce/profitsharing/orders`: taken (PROCESSING, receivers PENDING) and
    /// carried out after the confirm delay: a receiver the merchant is not bound to ends CLOSED
    /// (`NO_RELATION`), the others SUCCESS. Refused: an order completed without profit sharing,
    /// a finished one, more than 30 % of the payment to others, more than is left, the 51st
    /// request. The same out_order_no answers the same split.
    fn split(&self, body: &Value) -> Result<Value, SimError> {
        let param = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
        let (sub, txn, out_order_no) = sharing_request(body)?;
        let receivers = body["receivers"]
            .as_array()
            .filter(|r| !r.is_empty() && r.len() <= 50)
            .ok_or_else(|| param("receivers"))?;
        let mut amount = 0i64;
        for r in receivers {
            let a = r["amount"]
                .as_i64()
                .filter(|a| *a > 0)
                .ok_or_else(|| param("receivers.amount"))?;
            if r["type"] != "MERCHANT_ID" && r["type"] != "PERSONAL_OPENID" {
                return Err(param("receivers.type"));
            }
            if r["receiver_account"].as_str().is_none_or(str::is_empty)
                || r["description"].as_str().is_none_or(str::is_empty)
            {
                return Err(param("receivers.receiver_account/description"));
            }
            amount += a;
        }
        let split_key = key(sub, out_order_no);
        let (answer, order_key) = {
            let mut st = self.lock();
            if let Some(existing) = st.splits.get(&split_key) {
                return Ok(existing["answer"].clone());
            }
            let order_key = Self::paid_order_key(&st, sub, txn)?;
            let bound = st
                .merchants
                .get(sub)
                .copied()
                .unwrap_or_default()
                .receiver_bound;
            st.seq += 1;
            let order_id = format!("30000{}{:06}", now_s(), st.seq);
            let o = st
                .orders
                .get_mut(&order_key)
                .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "订单不存在".into()))?;
            let paid = o.order.collection.as_ref().map_or(0, |c| c.paid_amount);
            if !o.profit_sharing {
                return Err(SimError(
                    400,
                    "INVALID_REQUEST",
                    "订单不支持分账（完结时未设置profit_sharing）".into(),
                ));
            }
            if o.sharing_finished {
                return Err(SimError(400, "INVALID_REQUEST", "订单已完结分账".into()));
            }
            if o.splits >= 50 {
                return Err(SimError(400, "INVALID_REQUEST", "分账次数超过50次".into()));
            }
            if (o.shared + amount) * 100 > paid * 30 {
                return Err(SimError(
                    400,
                    "PARAM_ERROR",
                    "分账金额超过最大分账比例30%".into(),
                ));
            }
            if o.shared + amount > paid - o.refunded {
                return Err(SimError(403, "NOT_ENOUGH", "可分账金额不足".into()));
            }
            o.splits += 1;
            // Held against the order now, released if the receiver's part closes.
            o.shared += amount;
            let pending: Vec<Value> = receivers
                .iter()
                .map(|r| {
                    // 收付通 names a merchant receiver `receiver_mchid` in its answers.
                    let field = if r["type"] == "MERCHANT_ID" {
                        "receiver_mchid"
                    } else {
                        "receiver_account"
                    };
                    json!({field: r["receiver_account"], "type": r["type"], "amount": r["amount"],
                           "description": r["description"], "result": "PENDING"})
                })
                .collect();
            let answer = json!({"sub_mchid": sub, "transaction_id": txn, "out_order_no": out_order_no,
                                "order_id": order_id, "status": "PROCESSING", "receivers": pending});
            st.splits.insert(
                split_key.clone(),
                json!({"answer": answer, "order_key": order_key, "bound": bound,
                       "finish": body["finish"].as_bool().unwrap_or(false)}),
            );
            (answer, order_key)
        };
        self.save();
        let sim = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(sim.cfg.confirm_delay).await;
            sim.carry_out_split(&split_key, &order_key);
        });
        Ok(answer)
    }

    fn carry_out_split(&self, split_key: &str, order_key: &str) {
        {
            let mut st = self.lock();
            let Some(split) = st.splits.get_mut(split_key) else {
                return;
            };
            let bound = split["bound"].as_bool().unwrap_or(true);
            let finish = split["finish"].as_bool().unwrap_or(false);
            let mut closed = 0i64;
            if let Some(rs) = split["answer"]["receivers"].as_array_mut() {
                for r in rs {
                    if bound {
                        r["result"] = json!("SUCCESS");
                    } else {
                        r["result"] = json!("CLOSED");
                        r["fail_reason"] = json!("NO_RELATION");
                        closed += r["amount"].as_i64().unwrap_or(0);
                    }
                    r["finish_time"] = json!(rfc3339_now());
                }
            }
            split["answer"]["status"] = json!("FINISHED");
            if let Some(o) = st.orders.get_mut(order_key) {
                o.shared -= closed;
                o.sharing_finished |= finish;
            }
        }
        self.save();
    }

    /// `GET /v3/ecommerce/profitsharing/orders?sub_mchid&transaction_id&out_order_no`.
    fn find_split(&self, sub: &str, out_order_no: &str) -> Result<Value, SimError> {
        self.lock()
            .splits
            .get(&key(sub, out_order_no))
            .map(|s| s["answer"].clone())
            .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "分账单不存在".into()))
    }

    /// `POST /v3/ecommerce/profitsharing/returnorders`: answered at once, SUCCESS or (the
    /// platform's account empty) FAILED; never more than the split's successful part not
    /// returned yet. The same out_return_no answers the same return.
    fn return_split(&self, body: &Value) -> Result<Value, SimError> {
        let param = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
        let sub = body["sub_mchid"]
            .as_str()
            .ok_or_else(|| param("sub_mchid"))?;
        let out_order_no = body["out_order_no"]
            .as_str()
            .ok_or_else(|| param("out_order_no"))?;
        let out_return_no = body["out_return_no"]
            .as_str()
            .filter(|n| !n.is_empty() && n.len() <= 64)
            .ok_or_else(|| param("out_return_no"))?;
        let amount = body["amount"]
            .as_i64()
            .filter(|a| *a > 0)
            .ok_or_else(|| param("amount"))?;
        if body["return_mchid"] != self.cfg.mchid.as_str() {
            return Err(param("return_mchid"));
        }
        let answer = {
            let mut st = self.lock();
            if let Some(existing) = st.returns.get(out_return_no) {
                return Ok(existing.clone());
            }
            let script = st.merchants.get(sub).copied().unwrap_or_default();
            let split_key = key(sub, out_order_no);
            let split = st
                .splits
                .get(&split_key)
                .cloned()
                .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "分账单不存在".into()))?;
            let succeeded: i64 = split["answer"]["receivers"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter(|r| r["result"] == "SUCCESS")
                        .filter_map(|r| r["amount"].as_i64())
                        .sum()
                })
                .unwrap_or(0);
            let returned = split["returned"].as_i64().unwrap_or(0);
            if amount > succeeded - returned {
                return Err(SimError(403, "NOT_ENOUGH", "回退金额超过可回退金额".into()));
            }
            st.seq += 1;
            let mut answer = json!({"sub_mchid": sub, "out_order_no": out_order_no, "out_return_no": out_return_no,
                "return_no": format!("31000{}{:06}", now_s(), st.seq), "return_mchid": self.cfg.mchid,
                "amount": amount, "finish_time": rfc3339_now()});
            if script.returns_succeed {
                answer["result"] = json!("SUCCESS");
                if let Some(s) = st.splits.get_mut(&split_key) {
                    s["returned"] = json!(returned + amount);
                }
                let order_key = split["order_key"].as_str().unwrap_or_default().to_owned();
                if let Some(o) = st.orders.get_mut(&order_key) {
                    o.shared -= amount;
                }
            } else {
                answer["result"] = json!("FAILED");
                answer["fail_reason"] = json!("BALANCE_NOT_ENOUGH");
            }
            st.returns.insert(out_return_no.to_owned(), answer.clone());
            answer
        };
        self.save();
        Ok(answer)
    }

    /// `POST /v3/ecommerce/profitsharing/finish-order`: the rest of the payment is the
    /// merchant's; no split after it. The same out_order_no answers again.
    fn finish_split(&self, body: &Value) -> Result<Value, SimError> {
        let (sub, txn, out_order_no) = sharing_request(body)?;
        if body["description"].as_str().is_none_or(str::is_empty) {
            return Err(SimError(400, "PARAM_ERROR", "description".into()));
        }
        let finish_key = key(sub, out_order_no);
        let answer = {
            let mut st = self.lock();
            if let Some(existing) = st.splits.get(&finish_key) {
                return Ok(existing["answer"].clone());
            }
            let order_key = Self::paid_order_key(&st, sub, txn)?;
            st.seq += 1;
            let order_id = format!("30000{}{:06}", now_s(), st.seq);
            let o = st
                .orders
                .get_mut(&order_key)
                .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "订单不存在".into()))?;
            if !o.profit_sharing {
                return Err(SimError(
                    400,
                    "INVALID_REQUEST",
                    "订单不支持分账（完结时未设置profit_sharing）".into(),
                ));
            }
            if o.sharing_finished {
                return Err(SimError(400, "INVALID_REQUEST", "订单已完结分账".into()));
            }
            o.sharing_finished = true;
            let answer =
                json!({"sub_mchid": sub, "out_order_no": out_order_no, "order_id": order_id});
            st.splits.insert(
                finish_key,
                json!({"answer": answer, "order_key": order_key, "finished": true}),
            );
            answer
        };
        self.save();
        Ok(answer)
    }

    /// `GET /v3/ecommerce/refunds/out-refund-no/{no}`.
    fn find_refund(&self, out_refund_no: &str) -> Result<Value, SimError> {
        self.lock()
            .refunds
            .get(out_refund_no)
            .cloned()
            .ok_or_else(|| SimError(404, "RESOURCE_NOT_EXISTS", "退款单不存在".into()))
    }
}

/// The `sub_mchid`, `transaction_id` and `out_order_no` (1 to 64 characters) every
/// profit-sharing request names.
fn sharing_request(body: &Value) -> Result<(&str, &str, &str), SimError> {
    let param = |m: &str| SimError(400, "PARAM_ERROR", m.to_owned());
    let sub = body["sub_mchid"]
        .as_str()
        .ok_or_else(|| param("sub_mchid"))?;
    let txn = body["transaction_id"]
        .as_str()
        .ok_or_else(|| param("transaction_id"))?;
    let out_order_no = body["out_order_no"]
        .as_str()
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .ok_or_else(|| param("out_order_no"))?;
    Ok((sub, txn, out_order_no))
}

#[derive(Deserialize)]
struct OrderQuery {
    out_order_no: Option<String>,
    sub_mchid: Option<String>,
}

async fn handle(sim: web::Data<WechatSim>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let text = String::from_utf8_lossy(&body).into_owned();
    if let Err(e) = sim.authenticate(&req, &text) {
        return sim.error(e);
    }
    let parsed: Value = if text.is_empty() {
        Value::Null
    } else {
        match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => return sim.error(SimError(400, "PARAM_ERROR", "请求体不是JSON".into())),
        }
    };
    let path = req
        .path()
        .strip_prefix(PREFIX)
        .unwrap_or(req.path())
        .to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ("POST", ["v3", "payscore", "partner", "serviceorder", no, "cancel"]) =
        (req.method().as_str(), segments.as_slice())
    {
        let delay = sim.cancel_delay(parsed["sub_mchid"].as_str().unwrap_or_default(), no);
        tokio::time::sleep(delay).await;
    }
    let result: Result<(u16, Option<Value>), SimError> =
        match (req.method().as_str(), segments.as_slice()) {
            ("POST", ["v3", "payscore", "partner", "serviceorder"]) => {
                sim.create(&parsed).map(|v| (200, Some(v)))
            }
            ("GET", ["v3", "payscore", "partner", "serviceorder"]) => {
                let q = web::Query::<OrderQuery>::from_query(req.query_string())
                    .map(|q| q.into_inner());
                match q {
                    Ok(OrderQuery {
                        out_order_no: Some(o),
                        sub_mchid: Some(s),
                    }) => sim.find(&s, &o).map(|v| (200, Some(v))),
                    _ => Err(SimError(
                        400,
                        "PARAM_ERROR",
                        "out_order_no和sub_mchid必填".into(),
                    )),
                }
            }
            ("POST", ["v3", "payscore", "partner", "serviceorder", no, "cancel"]) => {
                sim.cancel(no, &parsed).map(|v| (200, Some(v)))
            }
            ("POST", ["v3", "payscore", "partner", "serviceorder", no, "complete"]) => {
                match sim.complete(no, &parsed) {
                    Ok(k) => {
                        let s2 = sim.get_ref().clone();
                        tokio::spawn(async move { s2.deduct(&k, false) });
                        Ok((204, None))
                    }
                    Err(e) => Err(e),
                }
            }
            ("POST", ["v3", "payscore", "partner", "serviceorder", no, "pay"]) => {
                let k = key(parsed["sub_mchid"].as_str().unwrap_or_default(), no);
                match sim.find(parsed["sub_mchid"].as_str().unwrap_or_default(), no) {
                    Ok(o) if o["collection"]["state"] == "USER_PAYING" => {
                        sim.deduct(&k, false);
                        Ok((204, None))
                    }
                    Ok(_) => Err(SimError(
                        400,
                        "INVALID_REQUEST",
                        "当前订单状态不合法".into(),
                    )),
                    Err(e) => Err(e),
                }
            }
            ("GET", ["v3", "ecommerce", "refunds", "out-refund-no", no]) => {
                sim.find_refund(no).map(|v| (200, Some(v)))
            }
            ("POST", ["v3", "ecommerce", "refunds", "apply"]) => {
                sim.refund(&parsed).map(|v| (200, Some(v)))
            }
            ("POST", ["v3", "ecommerce", "profitsharing", "orders"]) => {
                sim.split(&parsed).map(|v| (200, Some(v)))
            }
            ("GET", ["v3", "ecommerce", "profitsharing", "orders"]) => {
                let q = web::Query::<OrderQuery>::from_query(req.query_string())
                    .map(|q| q.into_inner());
                match q {
                    Ok(OrderQuery {
                        out_order_no: Some(o),
                        sub_mchid: Some(s),
                    }) => sim.find_split(&s, &o).map(|v| (200, Some(v))),
                    _ => Err(SimError(
                        400,
                        "PARAM_ERROR",
                        "out_order_no和sub_mchid必填".into(),
                    )),
                }
            }
            ("POST", ["v3", "ecommerce", "profitsharing", "returnorders"]) => {
                sim.return_split(&parsed).map(|v| (200, Some(v)))
            }
            ("POST", ["v3", "ecommerce", "profitsharing", "finish-order"]) => {
                sim.finish_split(&parsed).map(|v| (200, Some(v)))
            }
            ("POST", ["v3", "pay", "transactions", "native"]) => {
                sim.native(&parsed).map(|v| (200, Some(v)))
            }
            ("GET", ["v3", "pay", "transactions", "out-trade-no", no]) => {
                match web::Query::<HashMap<String, String>>::from_query(req.query_string()) {
                    Ok(q) if q.get("mchid") == Some(&sim.cfg.direct_mchid) => {
                        sim.transaction(no).map(|v| (200, Some(v)))
                    }
                    _ => Err(SimError(400, "PARAM_ERROR", "mchid必填".into())),
                }
            }
            ("POST", ["v3", "pay", "transactions", "out-trade-no", no, "close"]) => {
                sim.close_transaction(no, &parsed).map(|()| (204, None))
            }
            ("POST", ["v3", "payscore", "partner", "serviceorder", no, "modify"]) => {
                sim.modify(no, &parsed).map(|()| (204, None))
            }
            _ => Err(SimError(404, "NOT_FOUND", "接口不存在".into())),
        };
    if req.method() != actix_web::http::Method::GET {
        sim.save();
    }
    match result {
        Ok((status, body)) => sim.signed(status, body.as_ref()),
        Err(e) => sim.error(e),
    }
}

/// Mounts the simulator's provider endpoints at [`PREFIX`].
pub fn configure(cfg: &mut web::ServiceConfig, sim: WechatSim) {
    cfg.service(
        web::scope(PREFIX)
            .app_data(web::Data::new(sim))
            .app_data(web::PayloadConfig::new(64 * 1024))
            .default_service(web::to(handle)),
    );
}

#[cfg(test)]
mod tests {
    use super::json_text;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Body {
        #[serde(deserialize_with = "json_text")]
        create_body: String,
    }

    #[test]
    fn create_body_loads_from_text_and_from_older_object_journals() {
        let text: Body = serde_json::from_str(r#"{"create_body": "{\"a\":1}"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let object: Body =
            serde_json::from_str(r#"{"create_body": {"a": 1}}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text.create_body, r#"{"a":1}"#);
        assert_eq!(object.create_body, text.create_body);
    }
}
