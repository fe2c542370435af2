//! Alipay 芝麻先享 (CREDIT_PAY_AFTER_USE) client over the standard open-platform gateway:
//! RSA2-signed form requests, responses verified over their raw `<method>_response` member,
//! notifications verified over their sorted form parameters.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

pub mod crypto;

use self::crypto::{sign_params, verify_notify, verify_response, yuan};
use super::crypto::{CryptoError, RsaSigner, Verifier};

/// Gateway methods used.
pub mod methods {
    /// Create a credit order the shopper confirms.
    pub const CREATE: &str = "zhima.credit.payafteruse.creditbizorder.create";
    /// Query a credit order.
    pub const QUERY: &str = "zhima.credit.payafteruse.creditbizorder.query";
    /// Close a credit order (without charge when `is_fulfilled` is false).
    pub const FINISH: &str = "zhima.credit.payafteruse.creditbizorder.finish";
    /// Deduct against the credit order.
    pub const PAY: &str = "alipay.trade.pay";
    /// Refund a deduction.
    pub const REFUND: &str = "alipay.trade.refund";
    /// Split part of a sub-merchant's trade to another account (分账, 直付通).
    pub const ORDER_SETTLE: &str = "alipay.trade.order.settle";
    /// Ask how a split went.
    pub const ORDER_SETTLE_QUERY: &str = "alipay.trade.order.settle.query";
    /// Settle the rest of a sub-merchant's trade to its own account (确认结算).
    pub const SETTLE_CONFIRM: &str = "alipay.trade.settle.confirm";
}

/// Real Alipay credentials (`[payments.alipay]`), used when the simulator is off.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlipaySettings {
    /// `https://openapi.alipay.com/gateway.do`
    pub gateway: String,
    /// The application id.
    pub app_id: String,
    /// Path of the application private key (PEM, RSA2).
    pub app_private_key_path: String,
    /// Path of Alipay's public key (PEM).
    pub alipay_public_key_path: String,
    /// Where notifications go (`https://…/api/v1/payments/alipay/notify`).
    pub notify_url: String,
    /// The platform's Alipay user id (2088…), which receives the commission of sub-merchants'
    /// trades; unset: Alipay trades are not split (their settlement is the platform's to do).
    #[serde(default)]
    pub platform_pid: Option<String>,
}

impl AlipaySettings {
    /// Builds the client from the key files.
    pub fn client(&self) -> Result<AlipayClient, AlipayError> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|e| AlipayError::Config(format!("{p}: {e}")))
        };
        let cfg = AlipayConfig {
            gateway: self.gateway.clone(),
            app_id: self.app_id.clone(),
            notify_url: self.notify_url.clone(),
            platform_pid: self.platform_pid.clone(),
        };
        AlipayClient::new(
            cfg,
            &read(&self.app_private_key_path)?,
            &read(&self.alipay_public_key_path)?,
        )
    }
}

/// The merchant an Alipay call is made for (service-provider mode): its sub-merchant id, put
/// in the order's `sub_merchant`, and the `app_auth_token` it granted the platform's app, sent
/// with every call made on its behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlipayMerchant {
    /// `sub_merchant.merchant_id` (smid).
    pub smid: String,
    /// The merchant's authorisation of the platform's app.
    pub app_auth_token: String,
}

/// How to reach Alipay.
#[derive(Debug, Clone)]
pub struct AlipayConfig {
    /// `https://openapi.alipay.com/gateway.do`, or the simulator's `http://…/sim/alipay/gateway.do`.
    pub gateway: String,
    /// The application id.
    pub app_id: String,
    /// Where notifications go.
    pub notify_url: String,
    /// The platform's Alipay user id, which receives commissions.
    pub platform_pid: Option<String>,
}

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum AlipayError {
    /// The gateway answered with a business error.
    #[error("{code} {sub_code}: {sub_msg}")]
    Api {
        /// `40004` and friends.
        code: String,
        /// `ACQ.TRADE_NOT_EXIST` and friends.
        sub_code: String,
        /// Human text.
        sub_msg: String,
    },
    /// The answer was not signed by Alipay's key.
    #[error("response signature: {0}")]
    BadSignature(CryptoError),
    /// Could not reach the gateway.
    #[error("transport: {0}")]
    Transport(String),
    /// Keys or configuration.
    #[error("configuration: {0}")]
    Config(String),
}

/// The client.
pub struct AlipayClient {
    http: reqwest::Client,
    cfg: AlipayConfig,
    signer: RsaSigner,
    verifier: Verifier,
}

const KEY_ID: &str = "alipay";

impl AlipayClient {
    /// From the application private key and Alipay's public key (PEM).
    pub fn new(
        cfg: AlipayConfig,
        app_key_pem: &str,
        alipay_public_key_pem: &str,
    ) -> Result<Self, AlipayError> {
        let signer =
            RsaSigner::from_pem(app_key_pem).map_err(|e| AlipayError::Config(e.to_string()))?;
        let mut verifier = Verifier::new(300);
        verifier
            .add_pem(KEY_ID, alipay_public_key_pem)
            .map_err(|e| AlipayError::Config(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AlipayError::Config(e.to_string()))?;
        Ok(Self {
            http,
            cfg,
            signer,
            verifier,
        })
    }

    /// One gateway call: signed form in, verified JSON out; `code != 10000` is an error.
    /// `merchant`: the merchant the call is made for (its `app_auth_token` goes with it).
    pub async fn call(
        &self,
        method: &str,
        biz: &Value,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let now = time::OffsetDateTime::now_utc()
            .to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap_or(time::UtcOffset::UTC));
        let ts = now
            .format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .map_err(|e| AlipayError::Config(e.to_string()))?;
        let mut params: BTreeMap<String, String> = [
            ("app_id", self.cfg.app_id.as_str()),
            ("method", method),
            ("format", "JSON"),
            ("charset", "utf-8"),
            ("sign_type", "RSA2"),
            ("timestamp", ts.as_str()),
            ("version", "1.0"),
            ("notify_url", self.cfg.notify_url.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        if let Some(m) = merchant {
            params.insert("app_auth_token".into(), m.app_auth_token.clone());
        }
        params.insert("biz_content".into(), biz.to_string());
        let sign =
            sign_params(&self.signer, &params).map_err(|e| AlipayError::Config(e.to_string()))?;
        params.insert("sign".into(), sign);
        let resp = self
            .http
            .post(&self.cfg.gateway)
            .form(&params)
            .send()
            .await
            .map_err(|e| AlipayError::Transport(e.to_string()))?;
        let body = resp
            .text()
            .await
            .map_err(|e| AlipayError::Transport(e.to_string()))?;
        let v = verify_response(&self.verifier, KEY_ID, &body, method)
            .map_err(AlipayError::BadSignature)?;
        if v["code"] != "10000" {
            return Err(AlipayError::Api {
                code: v["code"].as_str().unwrap_or("").to_owned(),
                sub_code: v["sub_code"].as_str().unwrap_or("").to_owned(),
                sub_msg: v["sub_msg"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(v)
    }

    /// Creates the credit order the shopper confirms; `ceiling_fen` is the most it may cost.
    pub async fn create(
        &self,
        out_order_no: &str,
        buyer: &str,
        ceiling_fen: i64,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let mut biz = json!({"out_order_no": out_order_no, "subject": "智能柜购物", "order_amount": yuan(ceiling_fen),
                         "product_code": "CREDIT_PAY_AFTER_USE", "buyer_id": buyer});
        if let Some(m) = merchant {
            biz["sub_merchant"] = json!({"merchant_id": m.smid});
        }
        self.call(methods::CREATE, &biz, merchant).await
    }

    /// Queries a credit order by our number.
    pub async fn query(
        &self,
        out_order_no: &str,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        self.call(
            methods::QUERY,
            &json!({"out_order_no": out_order_no}),
            merchant,
        )
        .await
    }

    /// Deducts the final amount against the credit order. A sub-merchant's trade is settled to
    /// it at once (`settle_info`) unless `hold`: then it waits for the platform's split and
    /// [`Self::settle_confirm`].
    pub async fn pay(
        &self,
        out_trade_no: &str,
        credit_biz_order_id: &str,
        total_fen: i64,
        merchant: Option<&AlipayMerchant>,
        hold: bool,
    ) -> Result<Value, AlipayError> {
        let mut biz = json!({"out_trade_no": out_trade_no, "total_amount": yuan(total_fen), "subject": "智能柜购物",
                         "product_code": "CREDIT_PAY_AFTER_USE", "credit_biz_order_id": credit_biz_order_id});
        if let Some(m) = merchant {
            biz["sub_merchant"] = json!({"merchant_id": m.smid});
            if !hold {
                biz["settle_info"] = json!({"settle_detail_infos": [{"trans_in_type": "defaultSettle", "amount": yuan(total_fen)}]});
            }
        }
        self.call(methods::PAY, &biz, merchant).await
    }

    /// Closes a credit order without charge (nothing taken, refused session).
    pub async fn close(
        &self,
        credit_biz_order_id: &str,
        out_request_no: &str,
        remark: &str,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let biz = json!({"out_request_no": out_request_no, "credit_biz_order_id": credit_biz_order_id, "is_fulfilled": false, "remark": remark});
        self.call(methods::FINISH, &biz, merchant).await
    }

    /// Refunds part or all of a deduction; the same `out_request_no` is the same refund.
    pub async fn refund(
        &self,
        out_trade_no: &str,
        refund_fen: i64,
        out_request_no: &str,
        reason: &str,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        self.refund_returning(
            out_trade_no,
            refund_fen,
            out_request_no,
            reason,
            0,
            merchant,
        )
        .await
    }

    /// A refund that first takes `royalty_back_fen` of the platform's split back to the
    /// merchant (`refund_royalty_parameters`), in the same request.
    pub async fn refund_returning(
        &self,
        out_trade_no: &str,
        refund_fen: i64,
        out_request_no: &str,
        reason: &str,
        royalty_back_fen: i64,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let mut biz = json!({"out_trade_no": out_trade_no, "refund_amount": yuan(refund_fen), "out_request_no": out_request_no, "refund_reason": reason});
        if royalty_back_fen > 0 {
            let pid = self.platform_pid()?;
            biz["refund_royalty_parameters"] = json!([{"royalty_type": "transfer", "trans_out_type": "userId",
                "trans_out": pid, "amount": yuan(royalty_back_fen)}]);
        }
        self.call(methods::REFUND, &biz, merchant).await
    }

    fn platform_pid(&self) -> Result<&str, AlipayError> {
        self.cfg
            .platform_pid
            .as_deref()
            .ok_or_else(|| AlipayError::Config("payments.alipay.platform_pid is not set".into()))
    }

    /// Whether commissions can be split to the platform (its user id is configured).
    pub fn splits(&self) -> bool {
        self.cfg.platform_pid.is_some()
    }

    /// Splits the platform's commission off a sub-merchant's trade (分账); the same
    /// `out_request_no` is the same split.
    pub async fn order_settle(
        &self,
        trade_no: &str,
        out_request_no: &str,
        commission_fen: i64,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let pid = self.platform_pid()?;
        let biz = json!({"out_request_no": out_request_no, "trade_no": trade_no,
            "royalty_parameters": [{"royalty_type": "transfer", "trans_in_type": "userId", "trans_in": pid,
                                    "amount": yuan(commission_fen), "desc": "平台佣金"}],
            "extend_params": {"royalty_finish": "false"}});
        self.call(methods::ORDER_SETTLE, &biz, merchant).await
    }

    /// How a split went (`royalty_detail_list[].state`: SUCCESS, FAIL, PROCESSING).
    pub async fn order_settle_query(
        &self,
        trade_no: &str,
        out_request_no: &str,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let biz = json!({"out_request_no": out_request_no, "trade_no": trade_no});
        self.call(methods::ORDER_SETTLE_QUERY, &biz, merchant).await
    }

    /// Settles the rest of the trade to the sub-merchant's own account (确认结算).
    pub async fn settle_confirm(
        &self,
        trade_no: &str,
        out_request_no: &str,
        amount_fen: i64,
        merchant: Option<&AlipayMerchant>,
    ) -> Result<Value, AlipayError> {
        let biz = json!({"out_request_no": out_request_no, "trade_no": trade_no,
            "settle_info": {"settle_detail_infos": [{"trans_in_type": "defaultSettle", "amount": yuan(amount_fen)}]}});
        self.call(methods::SETTLE_CONFIRM, &biz, merchant).await
    }

    /// The application id calls are made as (and notices must be for).
    pub fn app_id(&self) -> &str {
        &self.cfg.app_id
    }

    /// Verifies a notification's form parameters.
    pub fn verify_notify(&self, params: &BTreeMap<String, String>) -> Result<(), CryptoError> {
        verify_notify(&self.verifier, KEY_ID, params)
    }
}

/// A fresh `out_request_no` for a one-off request (closing a credit order).
pub fn request_no() -> String {
    format!("q{}", crate::secrets::token(20).unwrap_or_default())
}
