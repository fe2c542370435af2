//! WeChat Pay Score (partner mode, 需确认模式) client: APIv3-signed requests, verified
//! responses, verified and decrypted notifications, typed errors. It talks to the real service
//! or, by base URL, to the simulator (`payments::sim_wechat`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::crypto::{
    apiv2_sign, decrypt_resource, CryptoError, RequestToSign, RsaSigner, Verifier, MERCHANT_SIGNING,
};
use crate::secrets::token;

/// How to reach and authenticate with WeChat Pay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatConfig {
    /// `https://api.mch.weixin.qq.com`, or the simulator's `http://…/sim/wechatpay`.
    pub base_url: String,
    /// The platform's (服务商) merchant id.
    pub mchid: String,
    /// Serial of the merchant API certificate.
    pub merchant_serial: String,
    /// Path of the merchant API private key (PEM).
    pub merchant_key_path: String,
    /// Serial (or `PUB_KEY_ID_…`) of the WeChat Pay public key.
    pub platform_serial: String,
    /// Path of the WeChat Pay public key (PEM).
    pub platform_public_key_path: String,
    /// The 32-byte APIv3 key.
    pub api_v3_key: String,
    /// The APIv2 key: it signs the `extraData` the shopper's mini-program hands to WeChat to
    /// confirm a Pay Score order (需确认模式).
    pub apiv2_key: String,
    /// The Pay Score service id.
    pub service_id: String,
    /// The mini-program app id.
    pub appid: String,
    /// Where notifications go.
    pub notify_url: String,
}

/// A client failure, by kind, so the caller can decide to retry.
#[derive(Debug, thiserror::Error)]
pub enum WechatError {
    /// The service answered with an error (`{"code","message"}`).
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// WeChat's error code (`INVALID_REQUEST`, `PARAM_ERROR`, `SIGN_ERROR`, …).
        code: String,
        /// WeChat's message.
        message: String,
    },
    /// The answer was not signed by the platform key: never trusted.
    #[error("response signature: {0}")]
    BadResponseSignature(CryptoError),
    /// Could not reach the service (retryable).
    #[error("transport: {0}")]
    Transport(String),
    /// The answer did not parse.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// Local keys or configuration.
    #[error("configuration: {0}")]
    Config(String),
}

impl WechatError {
    /// Whether retrying the same request later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            WechatError::Transport(_) => true,
            WechatError::Api { status, code, .. } => {
                *status >= 500 || code == "FREQUENCY_LIMITED" || code == "SYSTEM_ERROR"
            }
            WechatError::BadResponseSignature(_)
            | WechatError::Decode(_)
            | WechatError::Config(_) => false,
        }
    }
}

/// `risk_fund`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskFund {
    /// `ESTIMATE_ORDER_COST` for 先享.
    pub name: String,
    /// Ceiling (fen).
    pub amount: i64,
}

/// `time_range`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeRange {
    /// `yyyyMMddHHmmss`
    pub start_time: String,
    /// `yyyyMMddHHmmss`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
}

/// One `post_payments` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostPayment {
    /// `商品信息`
    pub name: String,
    /// Line total (fen).
    pub amount: i64,
    /// Product name.
    pub description: String,
    /// Quantity.
    pub count: u32,
}

/// One `post_discounts` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostDiscount {
    /// Promotion name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Saving (fen).
    pub amount: i64,
}

/// A deduction record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionDetail {
    /// Sequence.
    pub seq: u32,
    /// Amount (fen).
    pub amount: i64,
    /// `NEWTON` (WeChat deducted) or `MCH` (paid offline).
    pub paid_type: String,
    /// RFC 3339.
    pub paid_time: String,
    /// The trade number refunds need.
    pub transaction_id: String,
}

/// `collection`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collection {
    /// `USER_PAYING` or `USER_PAID`.
    pub state: String,
    /// Total (fen).
    pub total_amount: i64,
    /// Still owed (fen).
    pub paying_amount: i64,
    /// Paid (fen).
    pub paid_amount: i64,
    /// Deductions.
    #[serde(default)]
    pub details: Vec<CollectionDetail>,
}

/// A Pay Score service order as WeChat returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOrder {
    /// Ours.
    pub out_order_no: String,
    /// The service.
    pub service_id: String,
    /// CREATED, DOING, DONE, REVOKED, EXPIRED.
    pub state: String,
    /// While DOING: USER_CONFIRM or MCH_COMPLETE.
    #[serde(default)]
    pub state_description: Option<String>,
    /// WeChat's order id.
    #[serde(default)]
    pub order_id: Option<String>,
    /// Final amount once completed (fen).
    #[serde(default)]
    pub total_amount: Option<i64>,
    /// The shopper, once known.
    #[serde(default)]
    pub openid: Option<String>,
    /// Risk ceiling.
    #[serde(default)]
    pub risk_fund: Option<RiskFund>,
    /// Deduction state.
    #[serde(default)]
    pub collection: Option<Collection>,
    /// Mini-program `package` for openBusinessView.
    #[serde(default)]
    pub package: Option<String>,
    /// Our context.
    #[serde(default)]
    pub attach: Option<String>,
}

/// The `extraData` of `wx.openBusinessView` for a Pay Score order (需确认模式).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraData {
    /// The platform's (服务商) merchant id.
    pub mch_id: String,
    /// The create answer's `package`.
    pub package: String,
    /// Unix seconds, as text.
    pub timestamp: String,
    /// Random, at most 32 characters.
    pub nonce_str: String,
    /// `HMAC-SHA256`.
    pub sign_type: String,
    /// [`apiv2_sign`] of the other fields.
    pub sign: String,
}

impl ExtraData {
    /// The signed fields (all but `sign`), by name.
    pub fn fields(&self) -> [(&str, &str); 5] {
        [
            ("mch_id", self.mch_id.as_str()),
            ("package", self.package.as_str()),
            ("timestamp", self.timestamp.as_str()),
            ("nonce_str", self.nonce_str.as_str()),
            ("sign_type", self.sign_type.as_str()),
        ]
    }
}

/// What `create` takes.
#[derive(Debug, Clone, Serialize)]
pub struct CreateOrder {
    /// Unique per merchant, ≤ 32 of `[0-9A-Za-z_-|*]`.
    pub out_order_no: String,
    /// The second-level merchant.
    pub sub_mchid: String,
    /// ≤ 20 characters.
    pub service_introduction: String,
    /// Risk ceiling.
    pub risk_fund: RiskFund,
    /// Start now.
    pub time_range: TimeRange,
    /// The shopper (used by the simulator to script confirmation; accepted by WeChat).
    pub openid: String,
    /// ≤ 256: our session id.
    pub attach: String,
    /// The cabinet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Value>,
}

/// The answer to a cancel (WeChat returns the ids, not the state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    /// Ours.
    pub out_order_no: String,
    /// WeChat's.
    #[serde(default)]
    pub order_id: Option<String>,
}

/// A refund request result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// WeChat's id.
    pub refund_id: String,
    /// Ours.
    pub out_refund_no: String,
    /// PROCESSING, SUCCESS, ABNORMAL, CLOSED.
    #[serde(default)]
    pub status: Option<String>,
}

/// One receiver of a split (`receivers[]` of `/v3/ecommerce/profitsharing/orders`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReceiver {
    /// `MERCHANT_ID` (the platform) or `PERSONAL_OPENID`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The receiver's merchant id or openid.
    pub receiver_account: String,
    /// Fen.
    pub amount: i64,
    /// Shown to the receiver.
    pub description: String,
}

/// A receiver's outcome in a split's answer or query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReceiverResult {
    /// The receiver (`receiver_account`, or `receiver_mchid` in 收付通's query).
    #[serde(default, alias = "receiver_mchid")]
    pub receiver_account: Option<String>,
    /// Fen.
    #[serde(default)]
    pub amount: i64,
    /// PENDING, SUCCESS, ADJUST, RETURNED, CLOSED.
    #[serde(default)]
    pub result: Option<String>,
    /// ACCOUNT_ABNORMAL, NO_RELATION, RECEIVER_HIGH_RISK, … when CLOSED.
    #[serde(default)]
    pub fail_reason: Option<String>,
}

/// A split (分账单) as WeChat answers a request or a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitOrder {
    /// Ours.
    pub out_order_no: String,
    /// WeChat's.
    #[serde(default)]
    pub order_id: Option<String>,
    /// ACCEPTED, PROCESSING, FINISHED, CLOSED.
    #[serde(default)]
    pub status: Option<String>,
    /// Each receiver's outcome.
    #[serde(default)]
    pub receivers: Vec<SplitReceiverResult>,
}

/// A return (回退) of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReturn {
    /// Ours.
    pub out_return_no: String,
    /// WeChat's.
    #[serde(default)]
    pub return_no: Option<String>,
    /// Fen.
    #[serde(default)]
    pub amount: i64,
    /// PROCESSING, SUCCESS, FAILED.
    pub result: String,
    /// Why it failed.
    #[serde(default)]
    pub fail_reason: Option<String>,
}

/// A payment (`/v3/pay/transactions`), as queried or notified (`TRANSACTION.SUCCESS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// The application.
    #[serde(default)]
    pub appid: Option<String>,
    /// The payee.
    #[serde(default)]
    pub mchid: Option<String>,
    /// Ours.
    pub out_trade_no: String,
    /// WeChat's, once paid.
    #[serde(default)]
    pub transaction_id: Option<String>,
    /// `SUCCESS`, `NOTPAY`, `CLOSED`, `USERPAYING`, `PAYERROR`, `REFUND`, `REVOKED`.
    pub trade_state: String,
    /// The amount.
    #[serde(default)]
    pub amount: Option<TransactionAmount>,
}

/// A payment's amount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionAmount {
    /// What was asked (fen).
    pub total: i64,
    /// What the payer paid (fen).
    #[serde(default)]
    pub payer_total: Option<i64>,
}

/// A verified, decrypted notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Unique id: a repeat is a replay (or a redelivery), handled idempotently by the caller.
    pub id: String,
    /// `PAYSCORE.USER_CONFIRM`, `PAYSCORE.USER_PAID`, …
    pub event_type: String,
    /// The decrypted resource.
    pub resource: Value,
}

/// Why a notification was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotificationError {
    /// A `Wechatpay-*` header is missing or malformed.
    #[error("missing or malformed header {0}")]
    Header(&'static str),
    /// Signature, key serial or timestamp.
    #[error("verification: {0}")]
    Verify(CryptoError),
    /// The envelope is not the expected JSON.
    #[error("envelope: {0}")]
    Envelope(String),
    /// The resource did not decrypt (forged or wrong key).
    #[error("decryption failed")]
    Decrypt,
}

/// The `Wechatpay-*` headers of a response or notification.
#[derive(Debug, Clone, Default)]
pub struct SignedHeaders {
    /// `Wechatpay-Timestamp`
    pub timestamp: Option<String>,
    /// `Wechatpay-Nonce`
    pub nonce: Option<String>,
    /// `Wechatpay-Signature`
    pub signature: Option<String>,
    /// `Wechatpay-Serial`
    pub serial: Option<String>,
}

/// The client.
pub struct WechatClient {
    http: reqwest::Client,
    cfg: WechatConfig,
    /// Shared with the blocking pool, where requests are signed.
    signer: std::sync::Arc<RsaSigner>,
    verifier: Verifier,
}

fn read(path: &str) -> Result<String, WechatError> {
    std::fs::read_to_string(path).map_err(|e| WechatError::Config(format!("{path}: {e}")))
}

impl WechatClient {
    /// Loads keys from the configured files and builds the client.
    pub fn new(cfg: WechatConfig) -> Result<Self, WechatError> {
        let (key, public) = (
            read(&cfg.merchant_key_path)?,
            read(&cfg.platform_public_key_path)?,
        );
        Self::with_keys(cfg, &key, &public)
    }

    /// Builds the client from PEM texts (the embedded simulator's development keys).
    pub fn with_keys(
        cfg: WechatConfig,
        merchant_key_pem: &str,
        platform_public_key_pem: &str,
    ) -> Result<Self, WechatError> {
        if cfg.api_v3_key.len() != 32 {
            return Err(WechatError::Config("api_v3_key must be 32 bytes".into()));
        }
        let signer = RsaSigner::from_pem(merchant_key_pem)
            .map_err(|e| WechatError::Config(e.to_string()))?;
        let mut verifier = Verifier::new(300);
        verifier
            .add_pem(&cfg.platform_serial, platform_public_key_pem)
            .map_err(|e| WechatError::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| WechatError::Config(e.to_string()))?;
        Ok(Self {
            http,
            cfg,
            signer: std::sync::Arc::new(signer),
            verifier,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WechatConfig {
        &self.cfg
    }

    /// What the merchant's mini-program passes to `wx.openBusinessView({businessType:
    /// 'wxpayScoreUse', extraData})` so that the shopper can confirm the order whose `package`
    /// the create answered: signed with the APIv2 key (HMAC-SHA256), as WeChat verifies it.
    pub fn confirmation(&self, package: &str) -> Result<super::Confirmation, WechatError> {
        let nonce_str = token(32).map_err(|e| WechatError::Config(e.to_string()))?;
        let timestamp = Self::now_s().to_string();
        let mut extra = ExtraData {
            mch_id: self.cfg.mchid.clone(),
            package: package.to_owned(),
            timestamp,
            nonce_str,
            sign_type: "HMAC-SHA256".into(),
            sign: String::new(),
        };
        extra.sign = apiv2_sign(extra.fields(), &self.cfg.apiv2_key);
        Ok(super::Confirmation::Wechat {
            business_type: "wxpayScoreUse".into(),
            extra_data: extra,
        })
    }

    fn now_s() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    /// Sends one signed request and verifies the signed answer.
    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), WechatError> {
        let body_text = match body {
            Some(b) => serde_json::to_string(b).map_err(|e| WechatError::Decode(e.to_string()))?,
            None => String::new(),
        };
        let nonce = token(32).map_err(|_| WechatError::Config("no randomness".into()))?;
        // An RSA-2048 signature is about a millisecond of CPU: signed on the blocking pool so
        // the thread that runs the cabinet actors and session events is not held by it.
        let (signer, mchid, serial) = (
            self.signer.clone(),
            self.cfg.mchid.clone(),
            self.cfg.merchant_serial.clone(),
        );
        let (m, url, timestamp, text) = (
            method.as_str().to_owned(),
            path_and_query.to_owned(),
            Self::now_s(),
            body_text.clone(),
        );
        let auth = tokio::task::spawn_blocking(move || {
            MERCHANT_SIGNING.timed(|| {
                signer.authorization(
                    &mchid,
                    &serial,
                    &RequestToSign {
                        method: &m,
                        url: &url,
                        timestamp,
                        nonce: &nonce,
                        body: &text,
                    },
                )
            })
        })
        .await
        .map_err(|e| WechatError::Config(format!("signing task: {e}")))?
        .map_err(|e| WechatError::Config(e.to_string()))?;
        let url = format!(
            "{}{}",
            self.cfg.base_url.trim_end_matches('/'),
            path_and_query
        );
        let mut rb = self
            .http
            .request(method, url)
            .header("Authorization", auth)
            .header("Accept", "application/json")
            .header("User-Agent", "cabinet-hub");
        if body.is_some() {
            rb = rb
                .header("Content-Type", "application/json")
                .body(body_text);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| WechatError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let h = resp.headers();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let headers = SignedHeaders {
            timestamp: get("Wechatpay-Timestamp"),
            nonce: get("Wechatpay-Nonce"),
            signature: get("Wechatpay-Signature"),
            serial: get("Wechatpay-Serial"),
        };
        let text = resp
            .text()
            .await
            .map_err(|e| WechatError::Transport(e.to_string()))?;
        // Error answers are signed too; an unsigned or forged answer is never believed.
        self.verify_headers(&headers, &text).map_err(|e| match e {
            NotificationError::Verify(c) => WechatError::BadResponseSignature(c),
            other => WechatError::BadResponseSignature(CryptoError::Key(other.to_string())),
        })?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| WechatError::Decode(e.to_string()))?
        };
        if status >= 300 {
            return Err(WechatError::Api {
                status,
                code: value["code"].as_str().unwrap_or("UNKNOWN").to_owned(),
                message: value["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok((status, value))
    }

    fn verify_headers(&self, h: &SignedHeaders, body: &str) -> Result<(), NotificationError> {
        let ts = h
            .timestamp
            .as_deref()
            .ok_or(NotificationError::Header("Wechatpay-Timestamp"))?;
        let ts: i64 = ts
            .parse()
            .map_err(|_| NotificationError::Header("Wechatpay-Timestamp"))?;
        let nonce = h
            .nonce
            .as_deref()
            .ok_or(NotificationError::Header("Wechatpay-Nonce"))?;
        let sig = h
            .signature
            .as_deref()
            .ok_or(NotificationError::Header("Wechatpay-Signature"))?;
        let serial = h
            .serial
            .as_deref()
            .ok_or(NotificationError::Header("Wechatpay-Serial"))?;
        self.verifier
            .verify(serial, ts, nonce, body, sig, Self::now_s())
            .map_err(NotificationError::Verify)
    }

    fn order(v: Value) -> Result<ServiceOrder, WechatError> {
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Creates a service order (no amount yet; a risk ceiling). Idempotent for identical retries.
    pub async fn create_order(&self, o: &CreateOrder) -> Result<ServiceOrder, WechatError> {
        let mut body = serde_json::to_value(o).map_err(|e| WechatError::Decode(e.to_string()))?;
        body["service_id"] = Value::String(self.cfg.service_id.clone());
        body["appid"] = Value::String(self.cfg.appid.clone());
        body["notify_url"] = Value::String(self.cfg.notify_url.clone());
        body["need_user_confirm"] = Value::Bool(true);
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                "/v3/payscore/partner/serviceorder",
                Some(&body),
            )
            .await?;
        Self::order(v)
    }

    /// Queries by our order number.
    pub async fn query_order(
        &self,
        sub_mchid: &str,
        out_order_no: &str,
    ) -> Result<ServiceOrder, WechatError> {
        let q = format!(
            "/v3/payscore/partner/serviceorder?service_id={}&out_order_no={}&appid={}&sub_mchid={}",
            self.cfg.service_id, out_order_no, self.cfg.appid, sub_mchid
        );
        let (_, v) = self.call(reqwest::Method::GET, &q, None).await?;
        Self::order(v)
    }

    /// Cancels an order that will not be charged.
    pub async fn cancel_order(
        &self,
        sub_mchid: &str,
        out_order_no: &str,
        reason: &str,
    ) -> Result<Cancelled, WechatError> {
        let body = serde_json::json!({"service_id": self.cfg.service_id, "sub_mchid": sub_mchid, "reason": reason});
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/v3/payscore/partner/serviceorder/{out_order_no}/cancel"),
                Some(&body),
            )
            .await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Completes with the final amount; WeChat then deducts. Answers 204. `profit_sharing`
    /// keeps the payment frozen for a split: only for orders whose settlement will follow.
    pub async fn complete_order(
        &self,
        sub_mchid: &str,
        out_order_no: &str,
        post_payments: &[PostPayment],
        post_discounts: &[PostDiscount],
        total_amount: i64,
        profit_sharing: bool,
    ) -> Result<(), WechatError> {
        let body = serde_json::json!({"service_id": self.cfg.service_id, "sub_mchid": sub_mchid, "post_payments": post_payments,
                                      "post_discounts": post_discounts, "total_amount": total_amount, "profit_sharing": profit_sharing});
        self.call(
            reqwest::Method::POST,
            &format!("/v3/payscore/partner/serviceorder/{out_order_no}/complete"),
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Lowers the amount of a completed order whose deduction has not succeeded yet.
    pub async fn modify_order(
        &self,
        sub_mchid: &str,
        out_order_no: &str,
        post_payments: &[PostPayment],
        post_discounts: &[PostDiscount],
        total_amount: i64,
        reason: &str,
    ) -> Result<(), WechatError> {
        let body = serde_json::json!({"service_id": self.cfg.service_id, "sub_mchid": sub_mchid, "post_payments": post_payments,
                                      "post_discounts": post_discounts, "total_amount": total_amount, "reason": reason});
        self.call(
            reqwest::Method::POST,
            &format!("/v3/payscore/partner/serviceorder/{out_order_no}/modify"),
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Creates a Native payment (扫码支付) to the platform itself (a merchant buying service
    /// time): answers the `code_url` the payer scans. It can no longer be paid after
    /// `time_expire_ms` (Unix ms). Idempotent for an identical repeat.
    pub async fn native_pay(
        &self,
        out_trade_no: &str,
        description: &str,
        total_fen: i64,
        time_expire_ms: i64,
    ) -> Result<String, WechatError> {
        let expire = time::OffsetDateTime::from_unix_timestamp(time_expire_ms.div_euclid(1000))
            .map_err(|e| WechatError::Config(e.to_string()))?
            .to_offset(time::macros::offset!(+8))
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| WechatError::Config(e.to_string()))?;
        let body = serde_json::json!({"appid": self.cfg.appid, "mchid": self.cfg.mchid, "description": description,
            "out_trade_no": out_trade_no, "time_expire": expire, "notify_url": self.cfg.notify_url,
            "amount": {"total": total_fen, "currency": "CNY"}});
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                "/v3/pay/transactions/native",
                Some(&body),
            )
            .await?;
        v["code_url"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| WechatError::Decode("code_url missing".into()))
    }

    /// A Native payment as WeChat has it.
    pub async fn query_transaction(&self, out_trade_no: &str) -> Result<Transaction, WechatError> {
        let (_, v) = self
            .call(
                reqwest::Method::GET,
                &format!(
                    "/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={}",
                    self.cfg.mchid
                ),
                None,
            )
            .await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Closes an unpaid Native payment: it can no longer be paid. Answers 204; WeChat refuses
    /// one already paid.
    pub async fn close_transaction(&self, out_trade_no: &str) -> Result<(), WechatError> {
        let body = serde_json::json!({"mchid": self.cfg.mchid});
        self.call(
            reqwest::Method::POST,
            &format!("/v3/pay/transactions/out-trade-no/{out_trade_no}/close"),
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Prompts WeChat to deduct again (催收).
    pub async fn collect(&self, sub_mchid: &str, out_order_no: &str) -> Result<(), WechatError> {
        let body = serde_json::json!({"service_id": self.cfg.service_id, "sub_mchid": sub_mchid});
        self.call(
            reqwest::Method::POST,
            &format!("/v3/payscore/partner/serviceorder/{out_order_no}/pay"),
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Refunds part or all of a paid deduction; retry a failed one with the same `out_refund_no`.
    pub async fn refund(
        &self,
        sub_mchid: &str,
        transaction_id: &str,
        out_refund_no: &str,
        refund: i64,
        total: i64,
        reason: &str,
    ) -> Result<Refund, WechatError> {
        let body = serde_json::json!({"sub_mchid": sub_mchid, "sp_appid": self.cfg.appid, "transaction_id": transaction_id,
            "out_refund_no": out_refund_no, "reason": reason, "amount": {"refund": refund, "total": total, "currency": "CNY"},
            "notify_url": self.cfg.notify_url});
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                "/v3/ecommerce/refunds/apply",
                Some(&body),
            )
            .await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Queries a refund by our `out_refund_no` (收付通 refunds).
    pub async fn query_refund(
        &self,
        sub_mchid: &str,
        out_refund_no: &str,
    ) -> Result<Refund, WechatError> {
        let (_, v) = self
            .call(
                reqwest::Method::GET,
                &format!(
                    "/v3/ecommerce/refunds/out-refund-no/{out_refund_no}?sub_mchid={sub_mchid}"
                ),
                None,
            )
            .await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Asks for a split of a paid order (平台收付通 profit sharing): asynchronous, idempotent
    /// by `out_order_no`. `finish` false keeps the rest frozen until [`Self::finish_split`].
    pub async fn split(
        &self,
        sub_mchid: &str,
        transaction_id: &str,
        out_order_no: &str,
        receivers: &[SplitReceiver],
        finish: bool,
    ) -> Result<SplitOrder, WechatError> {
        let body = serde_json::json!({"appid": self.cfg.appid, "sub_mchid": sub_mchid, "transaction_id": transaction_id,
            "out_order_no": out_order_no, "receivers": receivers, "finish": finish});
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                "/v3/ecommerce/profitsharing/orders",
                Some(&body),
            )
            .await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Queries a split by our `out_order_no`.
    pub async fn query_split(
        &self,
        sub_mchid: &str,
        transaction_id: &str,
        out_order_no: &str,
    ) -> Result<SplitOrder, WechatError> {
        let q = format!(
            "/v3/ecommerce/profitsharing/orders?sub_mchid={sub_mchid}&transaction_id={transaction_id}&out_order_no={out_order_no}"
        );
        let (_, v) = self.call(reqwest::Method::GET, &q, None).await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Returns part of a split from the receiver (the platform) to the merchant, ahead of a
    /// refund; idempotent by `out_return_no`.
    pub async fn return_split(
        &self,
        sub_mchid: &str,
        out_order_no: &str,
        out_return_no: &str,
        amount: i64,
        description: &str,
    ) -> Result<SplitReturn, WechatError> {
        let body = serde_json::json!({"sub_mchid": sub_mchid, "out_order_no": out_order_no, "out_return_no": out_return_no,
            "return_mchid": self.cfg.mchid, "amount": amount, "description": description});
        let (_, v) = self
            .call(
                reqwest::Method::POST,
                "/v3/ecommerce/profitsharing/returnorders",
                Some(&body),
            )
            .await?;
        serde_json::from_value(v).map_err(|e| WechatError::Decode(e.to_string()))
    }

    /// Releases what is still frozen of a paid order to the merchant (完结分账).
    pub async fn finish_split(
        &self,
        sub_mchid: &str,
        transaction_id: &str,
        out_order_no: &str,
        description: &str,
    ) -> Result<(), WechatError> {
        let body = serde_json::json!({"sub_mchid": sub_mchid, "transaction_id": transaction_id,
            "out_order_no": out_order_no, "description": description});
        self.call(
            reqwest::Method::POST,
            "/v3/ecommerce/profitsharing/finish-order",
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Verifies and decrypts a notification. Replays must be caught by the caller by `id`
    /// (and by the idempotent state change the resource describes).
    pub fn parse_notification(
        &self,
        headers: &SignedHeaders,
        body: &str,
    ) -> Result<Notification, NotificationError> {
        self.verify_headers(headers, body)?;
        let env: Value =
            serde_json::from_str(body).map_err(|e| NotificationError::Envelope(e.to_string()))?;
        let field = |k: &str| {
            env["resource"][k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| NotificationError::Envelope(format!("resource.{k}")))
        };
        if env["resource"]["algorithm"] != "AEAD_AES_256_GCM" {
            return Err(NotificationError::Envelope("resource.algorithm".into()));
        }
        let plain = decrypt_resource(
            self.cfg.api_v3_key.as_bytes(),
            &field("nonce")?,
            &field("associated_data")?,
            &field("ciphertext")?,
        )
        .map_err(|_| NotificationError::Decrypt)?;
        let resource = serde_json::from_slice(&plain)
            .map_err(|e| NotificationError::Envelope(e.to_string()))?;
        Ok(Notification {
            id: env["id"]
                .as_str()
                .ok_or_else(|| NotificationError::Envelope("id".into()))?
                .to_owned(),
            event_type: env["event_type"]
                .as_str()
                .ok_or_else(|| NotificationError::Envelope("event_type".into()))?
                .to_owned(),
            resource,
        })
    }
}
