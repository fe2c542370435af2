//! Recognition billing (算法识别次数): every recognition a cabinet reports for a session is
//! counted on its order (`recognized_at`, in the statement that applies it) with what it costs
//! the merchant: the configured fee after use, or nothing on the bill when a prepaid quota pays
//! for it. A prepaid quota goes down by one per recognition, warns at `recognition.low_quota`
//! and at zero, and below zero either refuses new purchases or is owed
//! (`recognition.when_exhausted`).

use super::Sessions;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::store::{Change, MerchantPayment, RecognitionQuota};

impl Sessions {
    /// What a recognition for `merchant_id` costs on its bill now (0 from a prepaid quota).
    pub(super) async fn recognition_fee(&self, merchant_id: &str) -> i64 {
        match self.store.merchant_payment(merchant_id).await {
            Ok(Some(p)) if p.recognition_prepaid => 0,
            Ok(_) => self.settings.recognition.fee_fen,
            // Billed after use when the setting cannot be read: the recognition is counted
            // either way, and the bill says what it cost.
            Err(e) => {
                tracing::warn!(merchant_id, error = %e, "recognition billing not read; billed after use");
                self.settings.recognition.fee_fen
            }
        }
    }

    /// A recognition was applied: counted, and taken from a prepaid quota, which is told on
    /// the feed when it reaches the warning level and when it runs out.
    pub(super) async fn recognized(&self, merchant_id: &str) {
        // After use (most merchants) there is nothing to take from: no statement, and the
        // cached merchant row stays cached (the shopping rush measured every statement).
        let prepaid = matches!(
            self.store.merchant_payment(merchant_id).await,
            Ok(Some(p)) if p.recognition_prepaid
        );
        if !prepaid {
            self.metrics
                .recognitions
                .with_label_values(&["postpaid"])
                .inc();
            return;
        }
        let left = match self.store.use_recognition(merchant_id).await {
            Ok(left) => left,
            Err(e) => {
                tracing::error!(merchant_id, error = %e, "recognition not taken from the quota");
                None
            }
        };
        let billing = if left.is_some() {
            "prepaid"
        } else {
            "postpaid"
        };
        self.metrics
            .recognitions
            .with_label_values(&[billing])
            .inc();
        let state = match left {
            Some(0) => "exhausted",
            Some(n) if n == self.settings.recognition.low_quota => "low",
            _ => return,
        };
        tracing::warn!(merchant_id, quota_left = left, state, "recognition quota");
        self.metrics
            .recognition_quota_warnings
            .with_label_values(&[state])
            .inc();
        self.store
            .changed(Change::RecognitionQuota(RecognitionQuota {
                merchant_id: merchant_id.to_owned(),
                quota_left: left.unwrap_or(0),
                state,
            }));
    }

    /// Refuses a purchase when the merchant's prepaid quota is used up and the policy says so.
    pub(super) fn check_recognition_quota(&self, p: &MerchantPayment) -> ApiResult<()> {
        if p.recognition_prepaid
            && p.recognition_quota <= 0
            && self.settings.recognition.refuse_when_exhausted()
        {
            return Err(ApiError::new(
                ErrorCode::RecognitionQuotaExhausted,
                "the merchant's prepaid recognition quota is used up",
            ));
        }
        Ok(())
    }
}
