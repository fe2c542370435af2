//! The providers' notifications: verified, de-duplicated by id, applied idempotently. A notice
//! that cannot be recorded is refused so that the provider delivers it again.

use std::collections::BTreeMap;

use cabinet_actors::session::Event;

use super::Sessions;
use crate::payments::alipay::crypto::fen;
use crate::payments::crypto::CryptoError;
use crate::payments::wechat::{NotificationError, SignedHeaders};
use crate::store::{Notice, NoticeEffect, NoticeOutcome, OrderRow, PaymentExceptionRow};

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

    /// Records a notice that changes nothing but is kept (a confirmation, an event the hub does
    /// not act on); a replay is counted.
    pub(super) async fn record(&self, notice: &Notice<'_>) -> Result<(), NotificationRefusal> {
        self.store_notice(notice, &NoticeEffect::Record)
            .await
            .map(|_| ())
    }

    async fn store_notice(
        &self,
        notice: &Notice<'_>,
        effect: &NoticeEffect<'_>,
    ) -> Result<NoticeOutcome, NotificationRefusal> {
        match self.store.apply_notification(notice, effect).await {
            Ok(NoticeOutcome::Replay) => {
                self.rejected(notice.provider, "replay");
                Ok(NoticeOutcome::Replay)
            }
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                tracing::error!(provider = notice.provider, notice = notice.id, error = %e,
                    "notification not applied; the provider will deliver it again");
                self.rejected(notice.provider, NotificationRefusal::Storage.as_str());
                Err(NotificationRefusal::Storage)
            }
        }
    }

    /// A payment the notice reports, reconciled with the order it names and applied with the
    /// notice's record in one transaction. A notice that does not match its order (amount,
    /// app id, merchant ids, an order of ours at all) is not applied: it is kept as a payment
    /// exception an operator sees, counted (`reason="mismatch"`), and answered as received
    /// (delivering it again would not make it match).
    async fn notified_paid(
        &self,
        notice: &Notice<'_>,
        claim: PaidClaim<'_>,
    ) -> Result<(), NotificationRefusal> {
        let o = match self.store.order_of_session(claim.out_order_no).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(session_id = claim.out_order_no, error = %e, "notified payment not applied");
                return Err(NotificationRefusal::Storage);
            }
        };
        if let Some((reason, detail)) = self.mismatch(notice.provider, &claim, o.as_ref()).await {
            return self
                .keep_exception(
                    notice,
                    o.as_ref().map(|o| (o.merchant_id.as_str(), o.id.as_str())),
                    reason,
                    detail,
                )
                .await;
        }
        let Some(o) = o else { return Ok(()) };
        // An order already settled (paid by a query first, say) only records the notice.
        let effect = match super::payment_lifecycle(&o).map(|l| l.transition(&Event::Paid)) {
            Ok(Ok(_)) => NoticeEffect::Paid {
                order_id: &o.id,
                paid_fen: claim.paid_fen,
                transaction_id: claim.transaction_id,
            },
            _ => NoticeEffect::Record,
        };
        if let NoticeOutcome::Applied { order_moved: true } =
            self.store_notice(notice, &effect).await?
        {
            tracing::info!(order_id = %o.id, paid = claim.paid_fen, "order paid");
            self.paid(&o).await;
        }
        Ok(())
    }

    /// A refund's final word, reconciled with the refund it names (ours, same amount) and
    /// settled with the notice's record in one transaction; one that does not match is kept as
    /// a payment exception, as a payment notice is.
    async fn notified_refund(
        &self,
        notice: &Notice<'_>,
        resource: &serde_json::Value,
    ) -> Result<(), NotificationRefusal> {
        let no = resource["out_refund_no"].as_str().unwrap_or_default();
        let refund = match self.store.refund(no).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(refund_id = no, error = %e, "refund notice not applied");
                return Err(NotificationRefusal::Storage);
            }
        };
        let amount = resource["amount"]["refund"].as_i64();
        let status = match resource["refund_status"].as_str() {
            Some("SUCCESS") => "succeeded",
            Some("ABNORMAL") => "failed",
            Some("CLOSED") => "closed",
            _ => "",
        };
        let wrong = match &refund {
            None => Some(("unknown_order", format!("no refund {no:?}"))),
            Some(r) if amount != Some(r.amount_fen) => Some((
                "amount_mismatch",
                format!("refund {no}: {amount:?} fen, expected {}", r.amount_fen),
            )),
            Some(_) if status.is_empty() => Some((
                "unknown_order",
                format!("refund {no}: status {:?}", resource["refund_status"]),
            )),
            Some(_) => None,
        };
        if let Some((reason, detail)) = wrong {
            let order = match &refund {
                Some(r) => self.store.order(&r.order_id).await.ok().flatten(),
                None => None,
            };
            return self
                .keep_exception(
                    notice,
                    order
                        .as_ref()
                        .map(|o| (o.merchant_id.as_str(), o.id.as_str())),
                    reason,
                    detail,
                )
                .await;
        }
        let effect = NoticeEffect::Refund {
            refund_id: no,
            status,
            provider_refund_id: resource["refund_id"].as_str(),
        };
        if let NoticeOutcome::Applied { order_moved: true } =
            self.store_notice(notice, &effect).await?
        {
            self.metrics.refunds.with_label_values(&[status]).inc();
        }
        Ok(())
    }

    /// Keeps a notice that does not match what it names as a payment exception, with the
    /// notice's record in one transaction, and counts it (a replay is neither kept nor counted
    /// again). Answered as received: a redelivery cannot make it match.
    /// Keeps a notice that does not match what it names (`order`: its merchant and id, when
    /// it names one of ours) as a payment exception.
    pub(super) async fn keep_exception(
        &self,
        notice: &Notice<'_>,
        order: Option<(&str, &str)>,
        reason: &'static str,
        detail: String,
    ) -> Result<(), NotificationRefusal> {
        let e = PaymentExceptionRow {
            id: format!(
                "pe{}",
                crate::secrets::token(20).map_err(|_| NotificationRefusal::Storage)?
            ),
            merchant_id: order.map(|(m, _)| m.to_owned()),
            order_id: order.map(|(_, o)| o.to_owned()),
            provider: notice.provider.to_owned(),
            notification_id: notice.id.to_owned(),
            reason: reason.to_owned(),
            detail,
            created_at: notice.now,
        };
        tracing::error!(provider = notice.provider, notice = notice.id, kind = notice.kind, reason,
            detail = %e.detail, order_id = ?e.order_id, "notice does not match what it names; not applied");
        if self
            .store_notice(notice, &NoticeEffect::Exception(e))
            .await?
            != NoticeOutcome::Replay
        {
            self.rejected(notice.provider, "mismatch");
        }
        Ok(())
    }

    /// Why a payment notice does not match the order it names, if it does not: `(reason,
    /// detail)`.
    async fn mismatch(
        &self,
        provider: &str,
        claim: &PaidClaim<'_>,
        o: Option<&OrderRow>,
    ) -> Option<(&'static str, String)> {
        let Some(o) = o else {
            return Some((
                "unknown_order",
                format!("no order of session {:?}", claim.out_order_no),
            ));
        };
        let differs = |what: &str, said: Option<&str>, ours: &str| {
            (said != Some(ours)).then(|| format!("{what} {said:?}, expected {ours:?}"))
        };
        if o.channel != provider {
            return Some((
                "unknown_order",
                format!("the order is paid through {}, not {provider}", o.channel),
            ));
        }
        let (app, merchant) = match provider {
            "alipay" => (
                self.providers
                    .alipay
                    .as_ref()
                    .map(|a| a.app_id().to_owned())
                    .unwrap_or_default(),
                None,
            ),
            _ => {
                let cfg = self.providers.wechat.as_ref().map(|w| w.config());
                let sub = self.sub_mchid(&o.merchant_id).await;
                (
                    cfg.map(|c| c.appid.clone()).unwrap_or_default(),
                    Some((cfg.map(|c| c.mchid.clone()).unwrap_or_default(), sub)),
                )
            }
        };
        if let Some(d) = differs("app id", claim.app_id, &app) {
            return Some(("app_mismatch", d));
        }
        if let Some((mchid, sub)) = merchant {
            if let Some(d) = differs("mchid", claim.mchid, &mchid)
                .or_else(|| differs("sub_mchid", claim.sub_mchid, &sub))
            {
                return Some(("merchant_mismatch", d));
            }
        }
        if o.total_fen != Some(claim.paid_fen) {
            return Some((
                "amount_mismatch",
                format!(
                    "paid {} fen, the order is {:?} fen",
                    claim.paid_fen, o.total_fen
                ),
            ));
        }
        None
    }

    /// A notification to the platform's ordinary merchant account: its Native payments
    /// (service time), verified and decrypted with that account's keys.
    pub async fn on_wechat_merchant_notification(
        &self,
        headers: &SignedHeaders,
        body: &str,
    ) -> Result<(), NotificationRefusal> {
        let n = self.parse_wechat(self.providers.wechat_merchant.as_deref(), headers, body)?;
        let notice = Notice {
            id: &n.id,
            provider: "wechat",
            kind: &n.event_type,
            now: self.now(),
        };
        match n.event_type.as_str() {
            "TRANSACTION.SUCCESS" => self.notified_transaction(&notice, &n.resource).await,
            other => {
                tracing::info!(event_type = other, "notification recorded, not acted on");
                self.record(&notice).await
            }
        }
    }

    /// A notification verified and decrypted by `client`'s account, or why it was refused
    /// (counted).
    fn parse_wechat(
        &self,
        client: Option<&crate::payments::wechat::WechatClient>,
        headers: &SignedHeaders,
        body: &str,
    ) -> Result<crate::payments::wechat::Notification, NotificationRefusal> {
        let Some(w) = client else {
            return Err(NotificationRefusal::NotConfigured);
        };
        match w.parse_notification(headers, body) {
            Ok(n) => Ok(n),
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
                Err(reason)
            }
        }
    }

    /// A WeChat notification.
    pub async fn on_wechat_notification(
        &self,
        headers: &SignedHeaders,
        body: &str,
    ) -> Result<(), NotificationRefusal> {
        let n = self.parse_wechat(self.providers.wechat.as_deref(), headers, body)?;
        let out_order_no = n.resource["out_order_no"].as_str().unwrap_or_default();
        // The signature is verified: the shopper did confirm, so a session waiting for that
        // goes on now rather than after the notification is recorded.
        if n.event_type == "PAYSCORE.USER_CONFIRM" {
            self.confirmed(out_order_no);
        }
        let notice = Notice {
            id: &n.id,
            provider: "wechat",
            kind: &n.event_type,
            now: self.now(),
        };
        match n.event_type.as_str() {
            "PAYSCORE.USER_PAID" => {
                let r = &n.resource;
                let claim = PaidClaim {
                    out_order_no,
                    paid_fen: r["collection"]["paid_amount"].as_i64().unwrap_or(-1),
                    transaction_id: r["collection"]["details"][0]["transaction_id"].as_str(),
                    app_id: r["appid"].as_str(),
                    mchid: r["mchid"].as_str(),
                    sub_mchid: r["sub_mchid"].as_str(),
                };
                self.notified_paid(&notice, claim).await
            }
            "REFUND.SUCCESS" | "REFUND.ABNORMAL" | "REFUND.CLOSED" => {
                self.notified_refund(&notice, &n.resource).await
            }
            other => {
                if other != "PAYSCORE.USER_CONFIRM" {
                    tracing::info!(event_type = other, "notification recorded, not acted on");
                }
                self.record(&notice).await
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
        if params.get("user_confirmed").map(String::as_str) == Some("true") {
            if let Some(no) = params.get("out_order_no") {
                self.confirmed(no);
            }
        }
        let notice = Notice {
            id,
            provider: "alipay",
            kind,
            now: self.now(),
        };
        if params.get("trade_status").map(String::as_str) == Some("TRADE_SUCCESS") {
            let claim = PaidClaim {
                out_order_no: params.get("out_trade_no").map(String::as_str).unwrap_or(""),
                paid_fen: params
                    .get("total_amount")
                    .and_then(|t| fen(t))
                    .unwrap_or(-1),
                transaction_id: params.get("trade_no").map(String::as_str),
                app_id: params.get("app_id").map(String::as_str),
                mchid: None,
                sub_mchid: None,
            };
            return self.notified_paid(&notice, claim).await;
        }
        self.record(&notice).await
    }
}

/// What a payment notice says was paid, and for whom.
struct PaidClaim<'a> {
    /// Our order number at the provider: the session id.
    out_order_no: &'a str,
    /// Fen (−1 when the notice has no amount: it matches no order).
    paid_fen: i64,
    /// The provider's trade number.
    transaction_id: Option<&'a str>,
    /// The application the notice is for.
    app_id: Option<&'a str>,
    /// WeChat: the platform's merchant id.
    mchid: Option<&'a str>,
    /// WeChat: the merchant's second-level merchant id.
    sub_mchid: Option<&'a str>,
}
