//! An Alipay 芝麻先享 gateway simulator: the methods the hub uses, RSA2-verified requests,
//! responses signed over their raw `<method>_response` member with its own key pair, business
//! errors as the gateway reports them (`code` 40004 with a `sub_code`), and notifications signed
//! over their sorted form parameters, re-sent on Alipay's schedule until answered `success`.
//! Where the research marks the 芝麻先享 contract unverified (how confirmation is announced),
//! the simulator's convention is: a `zhima_credit_payafteruse_creditbizorder_changed` notice
//! with `user_confirmed=true`, and `user_confirmed` in query answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::wechat::{Confirm, Deduction, UserScript};
use crate::payments::alipay::crypto::{fen, notify_sign_content, request_sign_content, yuan};
use crate::payments::crypto::{RsaSigner, Verifier};

/// Where the simulator is mounted; the gateway is `{PREFIX}/gateway.do`.
pub const PREFIX: &str = "/sim/alipay";

/// The platform's Alipay user id in the simulator: commissions are split to it.
pub const PLATFORM_PID: &str = "2088000000000001";

/// Alipay's notification retry schedule, seconds after the previous attempt.
pub const RETRY_SCHEDULE_S: [u64; 7] = [240, 600, 600, 3600, 7200, 21600, 54000];

/// Keys and pacing.
#[derive(Clone)]
pub struct AlipaySimConfig {
    /// The app id it serves.
    pub app_id: String,
    /// The app's public key (PEM), to verify requests.
    pub app_public_key_pem: String,
    /// Its own private key (PEM), to sign answers and notifications.
    pub alipay_key_pem: String,
    /// Multiplies [`RETRY_SCHEDULE_S`].
    pub retry_scale: f64,
    /// How long a scripted shopper takes to confirm.
    pub confirm_delay: Duration,
}

#[derive(Default)]
struct Trade {
    trade_no: String,
    amount: i64,
    paid: bool,
    refunded: i64,
    refunds: HashMap<String, i64>,
    /// Paid for a sub-merchant (直付通): held until split and settled.
    sub_merchant: bool,
    /// Split to the platform and not returned (fen).
    royalty: i64,
    /// Splits by out_request_no: (amount, state).
    splits: HashMap<String, i64>,
    /// Settled to the sub-merchant (确认结算): nothing more is split.
    settled: Option<String>,
}

struct CreditOrder {
    credit_biz_order_id: String,
    buyer: String,
    ceiling: i64,
    status: &'static str,
    confirmed: bool,
    notify_url: String,
    trades: HashMap<String, Trade>,
}

#[derive(Default)]
struct State {
    orders: HashMap<String, CreditOrder>,
    users: HashMap<String, UserScript>,
    seq: u64,
}

/// The simulator.
#[derive(Clone)]
pub struct AlipaySim {
    cfg: AlipaySimConfig,
    signer: Arc<RsaSigner>,
    verifier: Arc<Verifier>,
    state: Arc<Mutex<State>>,
    http: reqwest::Client,
}

type Answer = Result<Value, (&'static str, &'static str, String)>;

fn biz_error(
    sub_code: &'static str,
    msg: impl Into<String>,
) -> (&'static str, &'static str, String) {
    ("40004", sub_code, msg.into())
}

impl AlipaySim {
    /// Builds the simulator.
    pub fn new(cfg: AlipaySimConfig) -> anyhow::Result<Self> {
        let signer = RsaSigner::from_pem(&cfg.alipay_key_pem)
            .map_err(|e| anyhow::anyhow!("simulator key: {e}"))?;
        let mut verifier = Verifier::new(300);
        verifier
            .add_pem("app", &cfg.app_public_key_pem)
            .map_err(|e| anyhow::anyhow!("app public key: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            cfg,
            signer: Arc::new(signer),
            verifier: Arc::new(verifier),
            state: Arc::new(Mutex::new(State::default())),
            http,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Scripts a shopper.
    pub fn set_user(&self, user: &str, script: UserScript) {
        self.lock().users.insert(user.to_owned(), script);
    }

    fn next(&self, prefix: &str) -> String {
        let mut st = self.lock();
        st.seq += 1;
        format!("{prefix}{:012}", st.seq)
    }

    /// The shopper pays every deduction that failed. Returns how many.
    pub fn user_pays(&self, user: &str) -> usize {
        let mut paid = Vec::new();
        {
            let mut st = self.lock();
            for (no, o) in st.orders.iter_mut().filter(|(_, o)| o.buyer == user) {
                for (out_trade_no, t) in o.trades.iter_mut().filter(|(_, t)| !t.paid) {
                    t.paid = true;
                    o.status = "TRADE_FINISHED";
                    paid.push((
                        o.notify_url.clone(),
                        no.clone(),
                        out_trade_no.clone(),
                        t.trade_no.clone(),
                        t.amount,
                    ));
                }
            }
        }
        for (url, no, out_trade_no, trade_no, amount) in &paid {
            self.notify(
                url,
                &[
                    ("notify_type", "trade_status_sync"),
                    ("out_trade_no", out_trade_no),
                    ("trade_no", trade_no),
                    ("trade_status", "TRADE_SUCCESS"),
                    ("total_amount", &yuan(*amount)),
                    ("out_order_no", no),
                ],
            );
        }
        paid.len()
    }

    /// Sends a signed notification, retrying until the answer is `success`.
    fn notify(&self, url: &str, fields: &[(&str, &str)]) {
        let mut params: BTreeMap<String, String> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        params.insert("notify_id".into(), self.next("N"));
        params.insert("app_id".into(), self.cfg.app_id.clone());
        params.insert("charset".into(), "utf-8".into());
        params.insert("version".into(), "1.0".into());
        let Ok(sign) = self.signer.sign(notify_sign_content(&params).as_bytes()) else {
            return;
        };
        params.insert("sign".into(), sign);
        params.insert("sign_type".into(), "RSA2".into());
        let (sim, url) = (self.clone(), url.to_owned());
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                let r = sim.http.post(&url).form(&params).send().await;
                let ok = match r {
                    Ok(resp) => resp.text().await.is_ok_and(|t| t.trim() == "success"),
                    Err(_) => false,
                };
                if ok {
                    return;
                }
                let Some(wait) = RETRY_SCHEDULE_S.get(attempt) else {
                    return;
                };
                attempt += 1;
                tokio::time::sleep(Duration::from_secs_f64(*wait as f64 * sim.cfg.retry_scale))
                    .await;
            }
        });
    }

    fn respond(&self, method: &str, member: Value) -> HttpResponse {
        let text = member.to_string();
        let sign = self.signer.sign(text.as_bytes()).unwrap_or_default();
        let name = format!("{}_response", method.replace('.', "_"));
        HttpResponse::Ok()
            .content_type("application/json;charset=utf-8")
            .body(format!(r#"{{"{name}":{text},"sign":"{sign}"}}"#))
    }

    fn create(&self, biz: &Value, notify_url: &str) -> Answer {
        let no = biz["out_order_no"]
            .as_str()
            .filter(|s| !s.is_empty() && s.len() <= 64)
            .ok_or(("40002", "isv.missing-parameter", "out_order_no".to_owned()))?
            .to_owned();
        let buyer = biz["buyer_id"].as_str().unwrap_or_default().to_owned();
        let ceiling = biz["order_amount"]
            .as_str()
            .and_then(fen)
            .filter(|f| *f > 0)
            .ok_or(("40002", "isv.invalid-parameter", "order_amount".to_owned()))?;
        let id = self.next("ZMCB");
        {
            let mut st = self.lock();
            if let Some(o) = st.orders.get(&no) {
                return if o.buyer == buyer && o.ceiling == ceiling {
                    Ok(
                        json!({"code": "10000", "msg": "Success", "credit_biz_order_id": o.credit_biz_order_id, "order_str": self.order_str(&no, &o.credit_biz_order_id)}),
                    )
                } else {
                    Err(biz_error("ORDER_ALREADY_EXIST", "订单已存在"))
                };
            }
            st.orders.insert(
                no.clone(),
                CreditOrder {
                    credit_biz_order_id: id.clone(),
                    buyer: buyer.clone(),
                    ceiling,
                    status: "INIT",
                    confirmed: false,
                    notify_url: notify_url.to_owned(),
                    trades: HashMap::new(),
                },
            );
        }
        let confirm = self
            .lock()
            .users
            .get(&buyer)
            .copied()
            .unwrap_or_default()
            .confirm;
        if confirm == Confirm::Yes {
            let sim = self.clone();
            let (no2, id2, url) = (no.clone(), id.clone(), notify_url.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(sim.cfg.confirm_delay).await;
                if let Some(o) = sim.lock().orders.get_mut(&no2) {
                    o.confirmed = true;
                }
                sim.notify(
                    &url,
                    &[
                        (
                            "notify_type",
                            "zhima_credit_payafteruse_creditbizorder_changed",
                        ),
                        ("out_order_no", &no2),
                        ("credit_biz_order_id", &id2),
                        ("order_status", "INIT"),
                        ("user_confirmed", "true"),
                    ],
                );
            });
        }
        Ok(
            json!({"code": "10000", "msg": "Success", "credit_biz_order_id": id, "order_str": self.order_str(&no, &id)}),
        )
    }

    /// The `order_str` the shopper's mini-program confirms with: form-encoded, signed with the
    /// simulator's key over its sorted fields (RSA PKCS#1 v1.5 is deterministic, so the same
    /// fields always give the same string, and a repeat of the create answers the same).
    fn order_str(&self, out_order_no: &str, credit_biz_order_id: &str) -> String {
        let params = self.order_str_fields(out_order_no, credit_biz_order_id);
        let sign = self
            .signer
            .sign(request_sign_content(&params).as_bytes())
            .unwrap_or_default();
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &params {
            form.append_pair(k, v);
        }
        form.append_pair("sign", &sign);
        form.finish()
    }

    fn order_str_fields(
        &self,
        out_order_no: &str,
        credit_biz_order_id: &str,
    ) -> BTreeMap<String, String> {
        [
            ("app_id", self.cfg.app_id.as_str()),
            ("credit_biz_order_id", credit_biz_order_id),
            ("out_order_no", out_order_no),
            ("product_code", "CREDIT_PAY_AFTER_USE"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// The shopper confirms through the mini-program with the `order_str` the hub handed out,
    /// verified as Alipay would (its own signature over the fields, a known order): the credit
    /// order is confirmed and the merchant notified. A repeat changes nothing; a closed order
    /// cannot be confirmed. Answers `(status, message)` on refusal.
    pub fn confirm_by_hand(&self, order_str: &str) -> Result<Value, (u16, String)> {
        let mut params: BTreeMap<String, String> =
            url::form_urlencoded::parse(order_str.as_bytes())
                .into_owned()
                .collect();
        let sign = params
            .remove("sign")
            .ok_or((400, "order_str is not signed".to_owned()))?;
        let (no, id) = match (
            params.get("out_order_no"),
            params.get("credit_biz_order_id"),
        ) {
            (Some(no), Some(id)) => (no.clone(), id.clone()),
            _ => return Err((400, "order_str names no credit order".to_owned())),
        };
        let want = self.order_str_fields(&no, &id);
        let expected = self
            .signer
            .sign(request_sign_content(&want).as_bytes())
            .unwrap_or_default();
        if params != want || !crate::secrets::constant_time_eq(&expected, &sign) {
            return Err((400, "order_str signature invalid".to_owned()));
        }
        let url = {
            let mut st = self.lock();
            let o = st
                .orders
                .get_mut(&no)
                .filter(|o| o.credit_biz_order_id == id)
                .ok_or((400, "no such credit order".to_owned()))?;
            if o.status == "TRADE_CLOSED" {
                return Err((400, "the credit order is closed".to_owned()));
            }
            let first = !o.confirmed;
            o.confirmed = true;
            first.then(|| o.notify_url.clone())
        };
        if let Some(url) = url {
            self.notify(
                &url,
                &[
                    (
                        "notify_type",
                        "zhima_credit_payafteruse_creditbizorder_changed",
                    ),
                    ("out_order_no", &no),
                    ("credit_biz_order_id", &id),
                    ("order_status", "INIT"),
                    ("user_confirmed", "true"),
                ],
            );
        }
        Ok(json!({"out_order_no": no, "credit_biz_order_id": id, "user_confirmed": true}))
    }

    fn query(&self, biz: &Value) -> Answer {
        let no = biz["out_order_no"].as_str().unwrap_or_default();
        let st = self.lock();
        let o = st
            .orders
            .get(no)
            .ok_or_else(|| biz_error("ORDER_NOT_EXIST", "订单不存在"))?;
        Ok(
            json!({"code": "10000", "msg": "Success", "out_order_no": no, "credit_biz_order_id": o.credit_biz_order_id,
                  "order_status": o.status, "user_confirmed": o.confirmed}),
        )
    }

    fn find_by_id<'a>(st: &'a mut State, id: &str) -> Option<(&'a String, &'a mut CreditOrder)> {
        st.orders
            .iter_mut()
            .find(|(_, o)| o.credit_biz_order_id == id)
    }

    fn pay(&self, biz: &Value) -> Answer {
        let out_trade_no = biz["out_trade_no"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or(("40002", "isv.missing-parameter", "out_trade_no".to_owned()))?
            .to_owned();
        let amount = biz["total_amount"]
            .as_str()
            .and_then(fen)
            .filter(|f| *f > 0)
            .ok_or(("40002", "isv.invalid-parameter", "total_amount".to_owned()))?;
        let id = biz["credit_biz_order_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let trade_no = self.next("2025");
        let mut st = self.lock();
        let script = |st: &State, buyer: &str| st.users.get(buyer).copied().unwrap_or_default();
        let buyer = Self::find_by_id(&mut st, &id)
            .map(|(_, o)| o.buyer.clone())
            .ok_or_else(|| biz_error("ORDER_NOT_EXIST", "芝麻订单不存在"))?;
        let deduction = script(&st, &buyer).deduction;
        let succeed = deduction == Deduction::Succeed;
        let refused = || match deduction {
            Deduction::MerchantLimit => biz_error("ACQ.BEYOND_PAY_RESTRICTION", "商户收款额度超限"),
            _ => biz_error("ACQ.PAYMENT_FAIL", "扣款失败，等待用户还款"),
        };
        let (_, o) = Self::find_by_id(&mut st, &id)
            .ok_or_else(|| biz_error("ORDER_NOT_EXIST", "芝麻订单不存在"))?;
        if let Some(t) = o.trades.get_mut(&out_trade_no) {
            // A merchant's limit lifts (the script changed): the same trade is paid now.
            if !t.paid && succeed {
                t.paid = true;
                o.status = "TRADE_FINISHED";
            }
            return if t.paid {
                Ok(
                    json!({"code": "10000", "msg": "Success", "out_trade_no": out_trade_no, "trade_no": t.trade_no, "total_amount": yuan(t.amount)}),
                )
            } else {
                Err(refused())
            };
        }
        if !o.confirmed || o.status != "INIT" {
            return Err(biz_error("ACQ.TRADE_STATUS_ERROR", "订单状态不合法"));
        }
        if amount > o.ceiling {
            return Err(biz_error("ACQ.TOTAL_FEE_EXCEED", "金额超过订单额度"));
        }
        o.trades.insert(
            out_trade_no.clone(),
            Trade {
                trade_no: trade_no.clone(),
                amount,
                paid: succeed,
                sub_merchant: biz["sub_merchant"]["merchant_id"].is_string(),
                // Settled to the sub-merchant with the payment: nothing to split later.
                settled: biz["settle_info"]
                    .is_object()
                    .then(|| "with the payment".to_owned()),
                ..Trade::default()
            },
        );
        if succeed {
            o.status = "TRADE_FINISHED";
            Ok(
                json!({"code": "10000", "msg": "Success", "out_trade_no": out_trade_no, "trade_no": trade_no, "total_amount": yuan(amount)}),
            )
        } else {
            Err(refused())
        }
    }

    /// The scripted wait before answering a close of a credit order (none for an unknown one).
    fn close_delay(&self, credit_biz_order_id: &str) -> Duration {
        let mut st = self.lock();
        let buyer = Self::find_by_id(&mut st, credit_biz_order_id).map(|(_, o)| o.buyer.clone());
        let ms = buyer
            .and_then(|b| st.users.get(&b).map(|u| u.cancel_delay_ms))
            .unwrap_or(0);
        Duration::from_millis(ms)
    }

    fn finish(&self, biz: &Value) -> Answer {
        let id = biz["credit_biz_order_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut st = self.lock();
        let (_, o) = Self::find_by_id(&mut st, &id)
            .ok_or_else(|| biz_error("ORDER_NOT_EXIST", "芝麻订单不存在"))?;
        if o.status == "TRADE_CLOSED" {
            return Ok(json!({"code": "10000", "msg": "Success", "credit_biz_order_id": id}));
        }
        if o.status != "INIT" || o.trades.values().any(|t| t.paid) {
            return Err(biz_error("ACQ.TRADE_STATUS_ERROR", "订单状态不合法"));
        }
        o.status = "TRADE_CLOSED";
        Ok(json!({"code": "10000", "msg": "Success", "credit_biz_order_id": id}))
    }

    fn refund(&self, biz: &Value) -> Answer {
        let out_trade_no = biz["out_trade_no"].as_str().unwrap_or_default();
        let req = biz["out_request_no"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or((
                "40002",
                "isv.missing-parameter",
                "out_request_no".to_owned(),
            ))?
            .to_owned();
        let amount = biz["refund_amount"]
            .as_str()
            .and_then(fen)
            .filter(|f| *f > 0)
            .ok_or(("40002", "isv.invalid-parameter", "refund_amount".to_owned()))?;
        let mut st = self.lock();
        let t = st
            .orders
            .values_mut()
            .find_map(|o| o.trades.get_mut(out_trade_no))
            .filter(|t| t.paid)
            .ok_or_else(|| biz_error("ACQ.TRADE_NOT_EXIST", "交易不存在"))?;
        if let Some(done) = t.refunds.get(&req) {
            return Ok(
                json!({"code": "10000", "msg": "Success", "out_trade_no": out_trade_no, "refund_fee": yuan(t.refunded), "fund_change": "N", "this_refund": yuan(*done)}),
            );
        }
        if t.refunded + amount > t.amount {
            return Err(biz_error("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限"));
        }
        let back: i64 = biz["refund_royalty_parameters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["trans_out"] == PLATFORM_PID)
                    .filter_map(|x| x["amount"].as_str().and_then(fen))
                    .sum()
            })
            .unwrap_or(0);
        if back > t.royalty {
            return Err(biz_error(
                "ACQ.ROYALTY_RETURN_AMOUNT_EXCEED",
                "退分账金额超限",
            ));
        }
        // What was split to the platform is not the merchant's to refund until it comes back.
        if t.refunded + amount > t.amount - (t.royalty - back) {
            return Err(biz_error(
                "ACQ.SELLER_BALANCE_NOT_ENOUGH",
                "卖家余额不足，请先退分账",
            ));
        }
        t.royalty -= back;
        t.refunded += amount;
        t.refunds.insert(req, amount);
        Ok(
            json!({"code": "10000", "msg": "Success", "out_trade_no": out_trade_no, "trade_no": t.trade_no, "refund_fee": yuan(t.refunded), "fund_change": "Y"}),
        )
    }
}

impl AlipaySim {
    /// The paid trade with this trade number.
    fn paid_trade<'a>(
        st: &'a mut State,
        trade_no: &str,
    ) -> Result<&'a mut Trade, (&'static str, &'static str, String)> {
        st.orders
            .values_mut()
            .flat_map(|o| o.trades.values_mut())
            .find(|t| t.trade_no == trade_no && t.paid)
            .ok_or_else(|| biz_error("ACQ.TRADE_NOT_EXIST", "交易不存在"))
    }

    /// `alipay.trade.order.settle` (直付通 分账): only a sub-merchant's trade, not settled yet,
    /// at most 30 % to others, not more than is left; the same out_request_no answers again.
    fn order_settle(&self, biz: &Value) -> Answer {
        let (req, trade_no) = settle_request(biz)?;
        let params = biz["royalty_parameters"]
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or((
                "40002",
                "isv.missing-parameter",
                "royalty_parameters".to_owned(),
            ))?;
        let mut amount = 0;
        for p in params {
            if p["trans_in"] != PLATFORM_PID {
                return Err(biz_error(
                    "ACQ.ROYALTY_RECEIVER_INVALID",
                    "分账收入方未绑定",
                ));
            }
            amount += p["amount"]
                .as_str()
                .and_then(fen)
                .filter(|a| *a > 0)
                .ok_or(("40002", "isv.invalid-parameter", "amount".to_owned()))?;
        }
        let mut st = self.lock();
        let t = Self::paid_trade(&mut st, &trade_no)?;
        if t.splits.contains_key(&req) {
            return Ok(
                json!({"code": "10000", "msg": "Success", "trade_no": trade_no, "settle_no": req}),
            );
        }
        if !t.sub_merchant {
            return Err(biz_error(
                "ACQ.TRADE_SETTLE_ERROR",
                "非直付通交易不支持分账",
            ));
        }
        if t.settled.is_some() {
            return Err(biz_error("ACQ.TRADE_HAS_SETTLED", "交易已结算"));
        }
        if (t.royalty + amount) * 100 > t.amount * 30 {
            return Err(biz_error(
                "ACQ.ROYALTY_AMOUNT_EXCEED",
                "分账金额超过最大比例",
            ));
        }
        if t.royalty + amount > t.amount - t.refunded {
            return Err(biz_error(
                "ACQ.ALLOC_AMOUNT_VALIDATE_ERROR",
                "可分账金额不足",
            ));
        }
        t.royalty += amount;
        t.splits.insert(req.clone(), amount);
        Ok(json!({"code": "10000", "msg": "Success", "trade_no": trade_no, "settle_no": req}))
    }

    /// `alipay.trade.order.settle.query`.
    fn order_settle_query(&self, biz: &Value) -> Answer {
        let req = biz["out_request_no"].as_str().unwrap_or_default();
        let trade_no = biz["trade_no"].as_str().unwrap_or_default();
        let mut st = self.lock();
        let t = Self::paid_trade(&mut st, trade_no)?;
        let amount = t
            .splits
            .get(req)
            .copied()
            .ok_or_else(|| biz_error("ACQ.TRADE_SETTLE_NOT_EXIST", "分账单不存在"))?;
        Ok(
            json!({"code": "10000", "msg": "Success", "out_request_no": req, "royalty_detail_list": [
            {"operation_type": "transfer", "trans_in": PLATFORM_PID, "trans_in_type": "userId",
             "amount": yuan(amount), "state": "SUCCESS"}]}),
        )
    }

    /// `alipay.trade.settle.confirm`: the rest of the trade to the sub-merchant; at most what is
    /// neither split nor refunded; the same out_request_no answers again.
    fn settle_confirm(&self, biz: &Value) -> Answer {
        let (req, trade_no) = settle_request(biz)?;
        let amount: i64 = biz["settle_info"]["settle_detail_infos"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["amount"].as_str().and_then(fen))
                    .sum()
            })
            .unwrap_or(0);
        let mut st = self.lock();
        let t = Self::paid_trade(&mut st, &trade_no)?;
        if t.settled.as_deref() == Some(req.as_str()) {
            return Ok(
                json!({"code": "10000", "msg": "Success", "trade_no": trade_no, "settle_amount": yuan(amount)}),
            );
        }
        if t.settled.is_some() {
            return Err(biz_error("ACQ.TRADE_HAS_SETTLED", "交易已结算"));
        }
        if amount > t.amount - t.refunded - t.royalty {
            return Err(biz_error("ACQ.SETTLE_AMOUNT_EXCEED", "结算金额超限"));
        }
        t.settled = Some(req);
        Ok(
            json!({"code": "10000", "msg": "Success", "trade_no": trade_no, "settle_amount": yuan(amount)}),
        )
    }
}

/// The `out_request_no` (required) and `trade_no` a settlement request names.
fn settle_request(biz: &Value) -> Result<(String, String), (&'static str, &'static str, String)> {
    let req = biz["out_request_no"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or((
            "40002",
            "isv.missing-parameter",
            "out_request_no".to_owned(),
        ))?
        .to_owned();
    Ok((req, biz["trade_no"].as_str().unwrap_or_default().to_owned()))
}

async fn gateway(
    sim: web::Data<AlipaySim>,
    form: web::Form<BTreeMap<String, String>>,
) -> HttpResponse {
    let params = form.into_inner();
    let method = params.get("method").cloned().unwrap_or_default();
    let fail = |code: &str, sub: &str, msg: &str| {
        sim.respond(
            &method,
            json!({"code": code, "msg": "Business Failed", "sub_code": sub, "sub_msg": msg}),
        )
    };
    if params.get("app_id") != Some(&sim.cfg.app_id) {
        return fail("40002", "isv.invalid-app-id", "无效的AppID参数");
    }
    let Some(sign) = params.get("sign") else {
        return fail("40001", "isv.missing-signature", "缺少签名参数");
    };
    if params.get("sign_type").map(String::as_str) != Some("RSA2")
        || sim
            .verifier
            .verify_message("app", request_sign_content(&params).as_bytes(), sign)
            .is_err()
    {
        return fail("40002", "isv.invalid-signature", "验签出错");
    }
    let Some(biz) = params
        .get("biz_content")
        .and_then(|b| serde_json::from_str::<Value>(b).ok())
    else {
        return fail("40002", "isv.invalid-parameter", "biz_content");
    };
    let notify_url = params.get("notify_url").cloned().unwrap_or_default();
    if method == crate::payments::alipay::methods::FINISH {
        tokio::time::sleep(
            sim.close_delay(biz["credit_biz_order_id"].as_str().unwrap_or_default()),
        )
        .await;
    }
    let answer = match method.as_str() {
        crate::payments::alipay::methods::CREATE => sim.create(&biz, &notify_url),
        crate::payments::alipay::methods::QUERY => sim.query(&biz),
        crate::payments::alipay::methods::PAY => sim.pay(&biz),
        crate::payments::alipay::methods::FINISH => sim.finish(&biz),
        crate::payments::alipay::methods::REFUND => sim.refund(&biz),
        crate::payments::alipay::methods::ORDER_SETTLE => sim.order_settle(&biz),
        crate::payments::alipay::methods::ORDER_SETTLE_QUERY => sim.order_settle_query(&biz),
        crate::payments::alipay::methods::SETTLE_CONFIRM => sim.settle_confirm(&biz),
        _ => Err(("40004", "isv.invalid-method", "不存在的方法名".to_owned())),
    };
    match answer {
        Ok(v) => sim.respond(&method, v),
        Err((code, sub, msg)) => fail(code, sub, &msg),
    }
}

/// Mounts the simulated gateway at `{PREFIX}/gateway.do`.
pub fn configure(cfg: &mut web::ServiceConfig, sim: AlipaySim) {
    cfg.service(
        web::scope(PREFIX)
            .app_data(web::Data::new(sim))
            .route("/gateway.do", web::post().to(gateway)),
    );
}
