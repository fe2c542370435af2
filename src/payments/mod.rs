//! Payment providers. Real endpoints cannot be reached from the development machines: the
//! clients here implement the providers' real security (signing, verification, decryption) and
//! are tested against vectors made independently with OpenSSL, and against the simulators
//! (`crate::simulators`) over HTTP.

pub mod alipay;
pub mod crypto;
pub mod wechat;

#[cfg(test)]
mod fuzz;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use alipay::{AlipayClient, AlipaySettings};
use wechat::{WechatClient, WechatConfig};

/// What a shopper's front end needs to confirm a pay-after-use order, passed on unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "channel", rename_all = "snake_case")]
pub enum Confirmation {
    /// WeChat Pay Score: `wx.openBusinessView({businessType, extraData})`.
    Wechat {
        /// `wxpayScoreUse`.
        business_type: String,
        /// Signed with the APIv2 key.
        extra_data: wechat::ExtraData,
    },
    /// Alipay 芝麻先享: the create answer's `order_str`, for the mini-program's payment call.
    Alipay {
        /// As Alipay answered it.
        order_str: String,
    },
}

/// The provider clients a hub talks to; a provider not configured is `None`.
#[derive(Clone, Default)]
pub struct Providers {
    /// WeChat Pay Score (微信支付分), through the platform's partner (服务商) account.
    pub wechat: Option<Arc<WechatClient>>,
    /// WeChat Pay Native (扫码支付) to the platform itself, through its ordinary merchant
    /// account: what merchants pay the platform (service time).
    pub wechat_merchant: Option<Arc<WechatClient>>,
    /// Alipay 芝麻先享.
    pub alipay: Option<Arc<AlipayClient>>,
}

impl Providers {
    /// The real providers of `[payments.wechat]`, `[payments.wechat_merchant]` and
    /// `[payments.alipay]`.
    pub fn real(
        wechat: Option<&WechatConfig>,
        wechat_merchant: Option<&WechatConfig>,
        alipay: Option<&AlipaySettings>,
    ) -> anyhow::Result<Self> {
        let wechat_merchant = match wechat_merchant.cloned() {
            Some(cfg) => {
                Some(Arc::new(WechatClient::new(cfg).map_err(|e| {
                    anyhow::anyhow!("payments.wechat_merchant: {e}")
                })?))
            }
            None => None,
        };
        let wechat = match wechat.cloned() {
            Some(cfg) => Some(Arc::new(
                WechatClient::new(cfg).map_err(|e| anyhow::anyhow!("payments.wechat: {e}"))?,
            )),
            None => None,
        };
        let alipay = match alipay {
            Some(a) => Some(Arc::new(
                a.client()
                    .map_err(|e| anyhow::anyhow!("payments.alipay: {e}"))?,
            )),
            None => None,
        };
        Ok(Self {
            wechat,
            wechat_merchant,
            alipay,
        })
    }
}
