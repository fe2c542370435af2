//! What every provider call shares: the merchant's payment terms, read once, and one counter
//! of calls by provider, operation and outcome (`payments_total`).

use cabinet_actors::session::Channel;

use super::Sessions;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::payments::alipay::AlipayMerchant;
use crate::store::MerchantPayment;

/// The default pay-after-use risk ceiling, fen, for a merchant with none set.
const DEFAULT_CEILING_FEN: i64 = 20_000;

/// The settings of a merchant with none stored: the default ceiling, nothing else.
fn defaults() -> MerchantPayment {
    MerchantPayment {
        risk_ceiling_fen: DEFAULT_CEILING_FEN,
        ..MerchantPayment::default()
    }
}

/// What a merchant's settings say of its pay-after-use orders.
pub(super) struct PaymentTerms {
    /// The risk ceiling (`risk_fund.amount`), fen.
    pub ceiling_fen: i64,
    /// The merchant's WeChat second-level merchant number.
    pub sub_mchid: String,
    /// The merchant's Alipay sub-merchant and authorisation, when set.
    pub alipay: Option<AlipayMerchant>,
}

/// Whether a merchant can take payments through one channel.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ChannelReadiness {
    /// Purchases through this channel are accepted.
    pub ready: bool,
    /// What the merchant's settings still lack (`wechat_sub_mchid`, `service_phone`,
    /// `alipay_smid`, `alipay_app_auth_token`), or `provider` when this hub has no credentials
    /// for the channel.
    pub missing: Vec<&'static str>,
    /// The payment simulator stands in for the provider: it takes any merchant, so `ready`
    /// holds whatever is missing; `missing` tells what the real provider will need.
    pub simulated: bool,
}

/// A merchant's readiness per channel.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PaymentReadiness {
    /// WeChat Pay Score (平台收付通).
    pub wechat: ChannelReadiness,
    /// Alipay 芝麻先享.
    pub alipay: ChannelReadiness,
}

impl Sessions {
    /// Whether `merchant_id` can take payments, channel by channel.
    pub fn readiness(&self, p: &MerchantPayment) -> PaymentReadiness {
        let simulated = self.settings.payments.simulator;
        let has = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
        let channel = |configured: bool, needs: &[(&'static str, bool)]| {
            let mut missing: Vec<&'static str> = needs
                .iter()
                .filter(|(_, present)| !present)
                .map(|(name, _)| *name)
                .collect();
            if !configured {
                missing.insert(0, "provider");
            }
            ChannelReadiness {
                ready: configured && (simulated || missing.is_empty()),
                missing,
                simulated,
            }
        };
        PaymentReadiness {
            wechat: channel(
                self.providers.wechat.is_some(),
                &[
                    ("wechat_sub_mchid", has(&p.wechat_sub_mchid)),
                    ("service_phone", has(&p.service_phone)),
                ],
            ),
            alipay: channel(
                self.providers.alipay.is_some(),
                &[
                    ("alipay_smid", has(&p.alipay_smid)),
                    ("alipay_app_auth_token", has(&p.alipay_app_auth_token)),
                    ("service_phone", has(&p.service_phone)),
                ],
            ),
        }
    }

    /// The merchant's payment terms for a purchase through `channel`: refused with
    /// `merchant_payment_not_ready` when a real provider would need what the merchant's
    /// settings lack. Only the simulator, which takes any merchant, gets a stand-in
    /// sub-merchant number.
    pub(super) async fn terms(
        &self,
        merchant_id: &str,
        channel: Channel,
    ) -> ApiResult<PaymentTerms> {
        let p = self
            .store
            .merchant_payment(merchant_id)
            .await?
            .unwrap_or(MerchantPayment {
                risk_ceiling_fen: DEFAULT_CEILING_FEN,
                ..MerchantPayment::default()
            });
        let ready = self.readiness(&p);
        let r = match channel {
            Channel::Alipay => &ready.alipay,
            _ => &ready.wechat,
        };
        if !r.ready && !r.missing.contains(&"provider") {
            return Err(ApiError::new(
                ErrorCode::MerchantPaymentNotReady,
                format!(
                    "merchant {merchant_id} cannot take {} payments yet: missing {}",
                    channel.as_str(),
                    r.missing.join(", ")
                ),
            ));
        }
        self.check_recognition_quota(&p)?;
        Ok(self.terms_of(merchant_id, p))
    }

    fn terms_of(&self, merchant_id: &str, p: MerchantPayment) -> PaymentTerms {
        let stand_in = || {
            self.settings
                .payments
                .simulator
                .then(|| format!("sim{merchant_id}"))
        };
        PaymentTerms {
            ceiling_fen: p.risk_ceiling_fen,
            sub_mchid: p
                .wechat_sub_mchid
                .filter(|s| !s.is_empty())
                .or_else(stand_in)
                .unwrap_or_default(),
            alipay: match (p.alipay_smid, p.alipay_app_auth_token) {
                (Some(smid), Some(app_auth_token)) => Some(AlipayMerchant {
                    smid,
                    app_auth_token,
                }),
                _ => None,
            },
        }
    }

    /// The merchant's payment terms for a call on an order that exists (cancel, complete,
    /// collect, refund): what it was created with. A failed read is logged and answers the
    /// stand-in (simulator) or nothing: the provider refuses the call, and the call is retried
    /// or reconciled later.
    pub(super) async fn order_terms(&self, merchant_id: &str) -> PaymentTerms {
        match self.store.merchant_payment(merchant_id).await {
            Ok(p) => self.terms_of(merchant_id, p.unwrap_or_else(defaults)),
            Err(e) => {
                tracing::error!(merchant_id, error = %e, "payment terms not read");
                self.terms_of(merchant_id, defaults())
            }
        }
    }

    /// The merchant's WeChat sub-merchant number for a call on an existing order.
    pub(super) async fn sub_mchid(&self, merchant_id: &str) -> String {
        self.order_terms(merchant_id).await.sub_mchid
    }

    /// Counts one provider call and passes its result on.
    pub(super) fn counted<T, E>(
        &self,
        provider: &str,
        op: &str,
        result: Result<T, E>,
    ) -> Result<T, E> {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .payments
            .with_label_values(&[provider, op, outcome])
            .inc();
        result
    }
}
