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

use alipay::{AlipayClient, AlipaySettings};
use wechat::{WechatClient, WechatConfig};

/// The provider clients a hub talks to; a provider not configured is `None`.
#[derive(Clone, Default)]
pub struct Providers {
    /// WeChat Pay Score (微信支付分).
    pub wechat: Option<Arc<WechatClient>>,
    /// Alipay 芝麻先享.
    pub alipay: Option<Arc<AlipayClient>>,
}

impl Providers {
    /// The real providers of `[payments.wechat]` and `[payments.alipay]`.
    pub fn real(
        wechat: Option<&WechatConfig>,
        alipay: Option<&AlipaySettings>,
    ) -> anyhow::Result<Self> {
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
        Ok(Self { wechat, alipay })
    }
}
