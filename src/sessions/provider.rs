//! What every provider call shares: the merchant's payment terms, read once, and one counter
//! of calls by provider, operation and outcome (`payments_total`).

use super::Sessions;
use crate::store::StoreError;

/// The default pay-after-use risk ceiling, fen, for a merchant with none set.
const DEFAULT_CEILING_FEN: i64 = 20_000;

/// What a merchant's settings say of its pay-after-use orders.
pub(super) struct PaymentTerms {
    /// The risk ceiling (`risk_fund.amount`), fen.
    pub ceiling_fen: i64,
    /// The merchant's WeChat second-level merchant number.
    pub sub_mchid: String,
}

impl Sessions {
    /// The merchant's payment terms, defaults where none are set.
    pub(super) async fn terms(&self, merchant_id: &str) -> Result<PaymentTerms, StoreError> {
        let (ceiling, sub) = self
            .store
            .merchant_payment(merchant_id)
            .await?
            .unwrap_or((DEFAULT_CEILING_FEN, None));
        Ok(PaymentTerms {
            ceiling_fen: ceiling,
            // The simulator accepts any sub-merchant; a real deployment stores each merchant's.
            sub_mchid: sub.unwrap_or_else(|| format!("sim{merchant_id}")),
        })
    }

    /// The merchant's WeChat sub-merchant number; a failed read falls back to the default,
    /// as a provider call that needs it is retried or reconciled later anyway.
    pub(super) async fn sub_mchid(&self, merchant_id: &str) -> String {
        match self.terms(merchant_id).await {
            Ok(t) => t.sub_mchid,
            Err(e) => {
                tracing::error!(merchant_id, error = %e, "payment terms not read; using the default");
                format!("sim{merchant_id}")
            }
        }
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
