//! The providers' notifications: verified, de-duplicated by id, applied idempotently. A notice
//! that cannot be recorded is refused so that the provider delivers it again.

use std::collections::BTreeMap;

use cabinet_actors::session::Event;

use super::Sessions;
use crate::payments::alipay::crypto::fen;
use crate::payments::crypto::CryptoError;
use crate::payments::wechat::{NotificationError, SignedHeaders};

/// Why a notification was not applied. Stable labels of `notifications_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum NotificationRefusal {
    /// This provider is not configured on the hub.
    NotConfigured,
    /// A signature header is missing or malformed.
    BadHeader,
    /// The timestamp is outside the allowed window (a replay).
    Stale,
    /// The signature does not verify.
    BadSignature,
    /// The body is not the provider's envelope.
    BadEnvelope,
    /// The resource does not decrypt with the APIv3 key.
    DecryptFailed,
    /// Storage failed: not applied, the provider should deliver it again.
    Storage,
}

impl NotificationRefusal {
    /// The stable label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Sessions {
    fn rejected(&self, provider: &str, reason: &str) {
        self.metrics
            .notifications_rejected
            .with_label_values(&[provider, reason])
            .inc();
    }

    /// Records a notification id; `Ok(false)` for one already applied (a replay: answered
    /// success so the provider stops, nothing changes).
    async fn first_delivery(
        &self,
        provider: &str,
        id: &str,
        kind: &str,
    ) -> Result<bool, NotificationRefusal> {
        match self
            .store
            .record_notification(id, provider, kind, self.now())
            .await
        {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.rejected(provider, "replay");
                Ok(false)
            }
            Err(e) => {
                tracing::error!(provider, error = %e, "notification not recorded; the provider will retry");
                Err(NotificationRefusal::Storage)
            }
        }
    }

    /// A payment the notice reports, applied to the session's order.
    async fn notified_paid(
        &self,
        session_id: &str,
        paid: i64,
        txn: Option<&str>,
    ) -> Result<(), NotificationRefusal> {
        let o = match self.store.order_of_session(session_id).await {
            Ok(Some(o)) => o,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!(session_id, error = %e, "notified payment not applied");
                return Err(NotificationRefusal::Storage);
            }
        };
        self.apply_payment(&o, Event::Paid, Some((paid, txn)))
            .await
            .map_err(|e| {
                tracing::error!(order_id = %o.id, error = %e, "notified payment not applied");
                NotificationRefusal::Storage
            })
    }

    /// A WeChat notification.
    pub async fn on_wechat_notification(
        &self,
        headers: &SignedHeaders,
        body: &str,
    ) -> Result<(), NotificationRefusal> {
        let Some(w) = &self.providers.wechat else {
            return Err(NotificationRefusal::NotConfigured);
        };
        let n = match w.parse_notification(headers, body) {
            Ok(n) => n,
            Err(e) => {
                let reason = match e {
                    NotificationError::Header(_) => NotificationRefusal::BadHeader,
                    NotificationError::Verify(CryptoError::Stale(_)) => NotificationRefusal::Stale,
                    NotificationError::Verify(_) => NotificationRefusal::BadSignature,
                    NotificationError::Envelope(_) => NotificationRefusal::BadEnvelope,
                    NotificationError::Decrypt => NotificationRefusal::DecryptFailed,
                };
                self.rejected("wechat", reason.as_str());
                tracing::warn!(reason = reason.as_str(), error = %e, "WeChat notification refused");
                return Err(reason);
            }
        };
        let out_order_no = n.resource["out_order_no"].as_str().unwrap_or_default();
        // The signature is verified: the shopper did confirm, so a session waiting for that
        // goes on now rather than after the notification is recorded.
        if n.event_type == "PAYSCORE.USER_CONFIRM" {
            self.confirmed(out_order_no);
        }
        if !self.first_delivery("wechat", &n.id, &n.event_type).await? {
            return Ok(());
        }
        match n.event_type.as_str() {
            // Handled above, before recording.
            "PAYSCORE.USER_CONFIRM" => Ok(()),
            "PAYSCORE.USER_PAID" => {
                let paid = n.resource["collection"]["paid_amount"]
                    .as_i64()
                    .unwrap_or(0);
                let txn = n.resource["collection"]["details"][0]["transaction_id"].as_str();
                self.notified_paid(out_order_no, paid, txn).await
            }
            other => {
                tracing::info!(event_type = other, "notification ignored");
                Ok(())
            }
        }
    }

    /// An Alipay notification (form parameters).
    pub async fn on_alipay_notification(
        &self,
        params: &BTreeMap<String, String>,
    ) -> Result<(), NotificationRefusal> {
        let Some(a) = self.providers.alipay.clone() else {
            return Err(NotificationRefusal::NotConfigured);
        };
        if let Err(e) = a.verify_notify(params) {
            self.rejected("alipay", "bad_signature");
            tracing::warn!(error = %e, "Alipay notification refused");
            return Err(NotificationRefusal::BadSignature);
        }
        let Some(id) = params.get("notify_id") else {
            self.rejected("alipay", "bad_envelope");
            return Err(NotificationRefusal::BadEnvelope);
        };
        let kind = params.get("notify_type").map(String::as_str).unwrap_or("");
        if !self.first_delivery("alipay", id, kind).await? {
            return Ok(());
        }
        if params.get("user_confirmed").map(String::as_str) == Some("true") {
            if let Some(no) = params.get("out_order_no") {
                self.confirmed(no);
            }
        }
        if params.get("trade_status").map(String::as_str) == Some("TRADE_SUCCESS") {
            let session = params.get("out_trade_no").map(String::as_str).unwrap_or("");
            let paid = params.get("total_amount").and_then(|t| fen(t)).unwrap_or(0);
            self.notified_paid(session, paid, params.get("trade_no").map(String::as_str))
                .await?;
        }
        Ok(())
    }
}
