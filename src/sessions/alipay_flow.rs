//! The Alipay 芝麻先享 side of a session: the credit order the shopper confirms, the deduction
//! against it, closing it without charge, refunds, collection, and notifications. The provider
//! order numbers are the session id (credit order and trade alike), so retries and recovery
//! address the same orders.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Refused, Sessions};
use crate::payments::alipay::request_no;
use crate::payments::alipay::AlipayError;
use crate::payments::alipay_crypto::fen;
use crate::store::{OrderRow, RefundRow, SessionRow, StoreError};

impl Sessions {
    /// Creates the credit order and waits for the shopper's confirmation (notice or query).
    pub(super) async fn alipay_confirm(&self, s: &SessionRow) -> Result<(), Refused> {
        let Some(a) = self.alipay.clone() else {
            return Err(self
                .fail(
                    s,
                    "confirming",
                    "payment_declined",
                    422,
                    "Alipay is not configured",
                )
                .await);
        };
        let ceiling = self
            .store
            .merchant_payment(&s.merchant_id)
            .await
            .ok()
            .flatten()
            .map_or(20_000, |m| m.0);
        let (tx, mut rx) = oneshot::channel();
        self.confirmations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.id.clone(), tx);
        let created = a.create(&s.id, &s.user_id, ceiling).await;
        self.metrics
            .payments
            .with_label_values(&[
                "alipay",
                "create",
                if created.is_ok() { "ok" } else { "error" },
            ])
            .inc();
        let confirmed = match created {
            Err(e) => {
                tracing::warn!(session_id = %s.id, error = %e, "credit order not created");
                false
            }
            Ok(v) => {
                if let Some(id) = v["credit_biz_order_id"].as_str() {
                    if let Ok(Some(o)) = self.store.order_of_session(&s.id).await {
                        let _ = self.store.set_provider_order(&o.id, id).await;
                    }
                }
                let deadline = tokio::time::Instant::now()
                    + Duration::from_millis(self.settings.payments.confirm_timeout_ms);
                loop {
                    tokio::select! {
                        r = &mut rx => if r.is_ok() { break true },
                        _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
                        _ = tokio::time::sleep_until(deadline) => break false,
                    }
                    if a.query(&s.id)
                        .await
                        .is_ok_and(|q| q["user_confirmed"] == true)
                    {
                        break true;
                    }
                }
            }
        };
        self.after_confirmation(s, confirmed).await
    }

    async fn credit_order_id(&self, session_id: &str) -> Option<String> {
        self.store
            .order_of_session(session_id)
            .await
            .ok()
            .flatten()
            .and_then(|o| o.provider_order_no)
            .filter(|p| p != session_id)
    }

    /// Closes the credit order without charge.
    pub(super) async fn alipay_close(&self, s: &SessionRow, reason: &str) {
        let (Some(a), Some(id)) = (self.alipay.clone(), self.credit_order_id(&s.id).await) else {
            return;
        };
        let r = a.close(&id, &request_no(), reason).await;
        self.metrics
            .payments
            .with_label_values(&["alipay", "close", if r.is_ok() { "ok" } else { "error" }])
            .inc();
        if let Err(e) = r {
            tracing::info!(session_id = %s.id, error = %e, "credit order not closed");
        }
    }

    /// Deducts the priced total. Paid at once, or pending payment when the deduction fails.
    pub(super) async fn alipay_pay(
        &self,
        s: &SessionRow,
        order_id: &str,
        total_fen: i64,
    ) -> Result<(), StoreError> {
        let (Some(a), Some(id)) = (self.alipay.clone(), self.credit_order_id(&s.id).await) else {
            return Ok(());
        };
        let now = self.now();
        let r = a.pay(&s.id, &id, total_fen).await;
        self.metrics
            .payments
            .with_label_values(&["alipay", "pay", if r.is_ok() { "ok" } else { "error" }])
            .inc();
        match r {
            Ok(v) => {
                let paid = v["total_amount"]
                    .as_str()
                    .and_then(fen)
                    .unwrap_or(total_fen);
                if self
                    .store
                    .mark_order_paid(order_id, paid, v["trade_no"].as_str(), now)
                    .await?
                {
                    if let Some(o) = self.store.order(order_id).await? {
                        self.paid(&o).await;
                    }
                }
            }
            Err(AlipayError::Api { sub_code, .. }) if sub_code == "ACQ.PAYMENT_FAIL" => {
                if self
                    .store
                    .transition_order(
                        order_id,
                        &["completing"],
                        "pending_payment",
                        None,
                        None,
                        None,
                        None,
                        now,
                    )
                    .await?
                {
                    self.metrics
                        .orders
                        .with_label_values(&["pending_payment"])
                        .inc();
                }
            }
            Err(e) => {
                tracing::error!(session_id = %s.id, error = %e, "Alipay deduction failed");
                if self
                    .store
                    .transition_order(
                        order_id,
                        &["completing"],
                        "abnormal",
                        Some("payment_complete_failed"),
                        None,
                        None,
                        None,
                        now,
                    )
                    .await?
                {
                    self.metrics.orders.with_label_values(&["abnormal"]).inc();
                }
            }
        }
        Ok(())
    }

    /// Tries a failed deduction again (the same trade number: a success is never doubled).
    pub(super) async fn alipay_collect(&self, o: &OrderRow) {
        let Some(s) = self.store.session(&o.session_id).await.ok().flatten() else {
            return;
        };
        if let Err(e) = self.alipay_pay(&s, &o.id, o.total_fen.unwrap_or(0)).await {
            tracing::error!(order_id = %o.id, error = %e, "collection not recorded");
        }
        if self
            .store
            .order(&o.id)
            .await
            .ok()
            .flatten()
            .is_some_and(|x| x.status == "pending_payment")
        {
            let attempts = o.collect_attempts + 1;
            let next = self.now()
                + (self.settings.payments.collect_interval_ms as i64)
                    .saturating_mul(1i64 << attempts.clamp(0, 6));
            let _ = self.store.schedule_collection(&o.id, attempts, next).await;
        }
    }

    /// Refunds with the refund id as `out_request_no`.
    pub(super) async fn alipay_refund(&self, o: &OrderRow, r: &RefundRow) {
        let Some(a) = self.alipay.clone() else { return };
        let result = a
            .refund(&o.session_id, r.amount_fen, &r.id, &r.reason)
            .await;
        self.metrics
            .payments
            .with_label_values(&[
                "alipay",
                "refund",
                if result.is_ok() { "ok" } else { "error" },
            ])
            .inc();
        match result {
            Ok(v) => {
                let _ = self
                    .store
                    .finish_refund(&r.id, "succeeded", v["trade_no"].as_str(), self.now())
                    .await;
            }
            Err(e) => {
                tracing::error!(order_id = %o.id, refund_id = %r.id, error = %e, "Alipay refund not accepted")
            }
        }
    }

    /// An Alipay notification (form parameters): verified, de-duplicated by `notify_id`, applied.
    pub async fn on_alipay_notification(
        &self,
        params: &BTreeMap<String, String>,
    ) -> Result<(), &'static str> {
        let Some(a) = self.alipay.clone() else {
            return Err("not_configured");
        };
        if let Err(e) = a.verify_notify(params) {
            self.metrics
                .notifications_rejected
                .with_label_values(&["alipay", "bad_signature"])
                .inc();
            tracing::warn!(error = %e, "Alipay notification refused");
            return Err("bad_signature");
        }
        let Some(id) = params.get("notify_id") else {
            self.metrics
                .notifications_rejected
                .with_label_values(&["alipay", "bad_envelope"])
                .inc();
            return Err("bad_envelope");
        };
        let kind = params.get("notify_type").map(String::as_str).unwrap_or("");
        match self
            .store
            .record_notification(id, "alipay", kind, self.now())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.metrics
                    .notifications_rejected
                    .with_label_values(&["alipay", "replay"])
                    .inc();
                return Ok(());
            }
            Err(_) => return Err("store_error"),
        }
        if params.get("user_confirmed").map(String::as_str) == Some("true") {
            if let Some(no) = params.get("out_order_no") {
                if let Some(tx) = self
                    .confirmations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(no)
                {
                    let _ = tx.send(());
                }
            }
        }
        if params.get("trade_status").map(String::as_str) == Some("TRADE_SUCCESS") {
            let session = params.get("out_trade_no").cloned().unwrap_or_default();
            if let Ok(Some(o)) = self.store.order_of_session(&session).await {
                let paid = params.get("total_amount").and_then(|t| fen(t)).unwrap_or(0);
                if self
                    .store
                    .mark_order_paid(
                        &o.id,
                        paid,
                        params.get("trade_no").map(String::as_str),
                        self.now(),
                    )
                    .await
                    .unwrap_or(false)
                {
                    self.paid(&o).await;
                }
            }
        }
        Ok(())
    }
}
