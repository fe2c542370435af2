//! Service time (设备使用时长): merchants buy whole years for their cabinets, paid to the
//! platform through WeChat Pay Native (the merchant scans a code) on the platform's ordinary
//! merchant account (`payments.wechat_merchant`: its Pay Score partner account cannot take a
//! payment itself) or, recorded by a platform admin, offline. The cabinets' service is extended in the same transaction as the order
//! becomes paid; an order still unpaid after `service.unpaid_cancel_ms` is closed at the
//! provider (so it can no longer be paid) and only then cancelled. `sweep_service_orders` is
//! one stateless pass over stored rows, so it can run under a leader lease on one node.

use serde_json::Value;

use super::notifications::NotificationRefusal;
use super::{Actor, Audited, Sessions};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::payments::wechat::{Transaction, WechatError};
use crate::store::{Change, Notice, ServiceOrderRow, ServicePaid, ServicePayment};

/// How a service order is paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceChannel {
    /// WeChat Pay Native: the answer carries the `code_url` to scan.
    Wechat,
    /// Paid outside the hub (a bank transfer); the voucher's reference is recorded.
    Offline {
        /// The voucher's reference.
        voucher: String,
    },
}

/// A merchant's request for service time.
#[derive(Debug, Clone)]
pub struct NewServiceOrder {
    /// Whose cabinets (each must be theirs).
    pub merchant_id: String,
    /// The cabinets, each once.
    pub cabinet_ids: Vec<String>,
    /// Whole years, 1 to 10.
    pub years: u32,
    /// How it is paid.
    pub channel: ServiceChannel,
}

/// Unpaid orders looked at in one sweep pass.
const SWEEP_BATCH: i64 = 100;

impl Sessions {
    /// Makes a service order at the configured yearly price: a WeChat one is answered with
    /// what the payer scans, an offline one is paid (and the service extended) at once.
    pub async fn create_service_order(
        &self,
        actor: Actor<'_>,
        req: NewServiceOrder,
    ) -> ApiResult<ServiceOrderRow> {
        if !(1..=10).contains(&req.years) {
            return Err(ApiError::bad_request(
                "years must be a whole number from 1 to 10",
            ));
        }
        let max = self.settings.service.max_cabinets;
        let mut ids = req.cabinet_ids.clone();
        ids.sort();
        ids.dedup();
        if ids.is_empty() || ids.len() != req.cabinet_ids.len() || ids.len() > max {
            return Err(ApiError::bad_request(format!(
                "cabinet_ids must name 1 to {max} different cabinets"
            )));
        }
        for id in &ids {
            match self.store.cabinet(id).await? {
                Some(c) if c.merchant_id == req.merchant_id => {}
                // Another merchant's cabinet is as unknown as a missing one.
                _ => {
                    return Err(ApiError::new(
                        ErrorCode::CabinetNotFound,
                        format!("no cabinet {id:?} of this merchant"),
                    ))
                }
            }
        }
        let unit = self.settings.service.yearly_price_fen;
        let amount = unit
            .checked_mul(i64::from(req.years))
            .and_then(|a| a.checked_mul(ids.len() as i64))
            .ok_or_else(|| ApiError::bad_request("the order is too large"))?;
        let now = self.now();
        let id = format!(
            "so{}",
            crate::secrets::token(20).map_err(ApiError::internal)?
        );
        let offline = match &req.channel {
            ServiceChannel::Offline { voucher } => Some(voucher.clone()),
            ServiceChannel::Wechat => None,
        };
        if offline.is_none() && self.providers.wechat_merchant.is_none() {
            return Err(ApiError::new(
                ErrorCode::PaymentDeclined,
                "the platform's WeChat Pay merchant account (payments.wechat_merchant) is not configured on this hub",
            ));
        }
        let row = ServiceOrderRow {
            id: id.clone(),
            merchant_id: req.merchant_id.clone(),
            cabinet_ids: serde_json::to_string(&ids).map_err(ApiError::internal)?,
            cabinets: ids.len() as i64,
            years: i64::from(req.years),
            unit_fen: unit,
            amount_fen: amount,
            channel: if offline.is_some() {
                "offline"
            } else {
                "wechat"
            }
            .to_owned(),
            status: "unpaid".to_owned(),
            code_url: None,
            transaction_id: None,
            voucher: offline.clone(),
            created_by: actor.id.to_owned(),
            created_at: now,
            due_at: now + self.settings.service.unpaid_cancel_ms as i64,
            paid_at: None,
            cancelled_at: None,
            updated_at: now,
        };
        self.store.insert_service_order(&row).await?;
        self.metrics
            .service_orders
            .with_label_values(&["created"])
            .inc();
        if let Some(voucher) = offline {
            let paid = self
                .store
                .pay_service_order(
                    &id,
                    ServicePayment {
                        transaction_id: None,
                        at: now,
                    },
                    None,
                )
                .await?;
            let ServicePaid::Paid(paid) = paid else {
                return Err(ApiError::internal("an offline order was not unpaid"));
            };
            self.service_paid(&paid);
            self.audit(
                actor,
                Audited {
                    action: "service_order.offline",
                    merchant_id: Some(&paid.merchant_id),
                    subject: &paid.id,
                    order_id: None,
                    reason: Some(&voucher),
                    detail: serde_json::json!({"cabinets": ids, "years": req.years, "amount_fen": amount}),
                },
            )
            .await;
            return Ok(paid);
        }
        self.store.changed(Change::ServiceOrder(row.clone()));
        let Some(w) = self.providers.wechat_merchant.clone() else {
            return Err(ApiError::internal("WeChat Pay went away"));
        };
        let description = format!("设备使用时长 {}台×{}年", ids.len(), req.years);
        match w.native_pay(&id, &description, amount, row.due_at).await {
            Ok(code_url) => {
                self.store.set_service_code_url(&id, &code_url).await?;
                Ok(ServiceOrderRow {
                    code_url: Some(code_url),
                    ..row
                })
            }
            Err(e) => {
                tracing::warn!(service_order = %id, error = %e, "service order not taken by WeChat Pay");
                // Refused on the merits: WeChat has no order to close. Anything else (no
                // answer) is left to the sweep, which closes it there before cancelling it.
                if let WechatError::Api { status, code, .. } = &e {
                    if *status < 500 {
                        // If this fails, the sweep cancels it when its time is up.
                        self.cancel_service(&id).await;
                        return Err(ApiError::new(
                            ErrorCode::PaymentDeclined,
                            format!("WeChat Pay refused the order ({code})"),
                        ));
                    }
                }
                Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "WeChat Pay did not answer; the order will be closed unpaid, try again",
                ))
            }
        }
    }

    /// A paid order: told on the feed and counted.
    fn service_paid(&self, o: &ServiceOrderRow) {
        tracing::info!(service_order = %o.id, merchant_id = %o.merchant_id, cabinets = o.cabinets,
            years = o.years, amount_fen = o.amount_fen, "service time paid");
        self.metrics
            .service_orders
            .with_label_values(&["paid"])
            .inc();
        self.store.changed(Change::ServiceOrder(o.clone()));
    }

    /// Cancels an unpaid order; whether it is no longer unpaid.
    async fn cancel_service(&self, id: &str) -> bool {
        match self.store.cancel_service_order(id, self.now()).await {
            Ok(Some(o)) => {
                tracing::info!(service_order = %o.id, "service order cancelled unpaid");
                self.metrics
                    .service_orders
                    .with_label_values(&["cancelled"])
                    .inc();
                self.store.changed(Change::ServiceOrder(o));
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(service_order = id, error = %e, "service order not cancelled; the next sweep tries again");
                false
            }
        }
    }

    /// WeChat's word that a Native payment succeeded (`TRANSACTION.SUCCESS`): reconciled with
    /// the service order it names and applied with the notice's record in one transaction; one
    /// that does not match is kept as a payment exception.
    pub(super) async fn notified_transaction(
        &self,
        notice: &Notice<'_>,
        resource: &Value,
    ) -> Result<(), NotificationRefusal> {
        let t: Option<Transaction> = serde_json::from_value(resource.clone()).ok();
        let no = t
            .as_ref()
            .map(|t| t.out_trade_no.clone())
            .unwrap_or_default();
        let o = match self.store.service_order(&no).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(service_order = %no, error = %e, "notified payment not applied");
                return Err(NotificationRefusal::Storage);
            }
        };
        let named = o.as_ref().map(|o| (o.merchant_id.as_str(), o.id.as_str()));
        let (Some(t), Some(o)) = (t, o.as_ref()) else {
            return self
                .keep_exception(
                    notice,
                    named,
                    "unknown_order",
                    format!("no service order {no:?}"),
                )
                .await;
        };
        if let Some((reason, detail)) = self.transaction_mismatch(&t, o) {
            return self.keep_exception(notice, named, reason, detail).await;
        }
        if o.status == "cancelled" {
            // Closed at WeChat before it was cancelled here, so this cannot happen; if it does,
            // the money came and the service did not: a person must look.
            return self
                .keep_exception(
                    notice,
                    named,
                    "paid_after_cancel",
                    format!(
                        "transaction {:?} paid a cancelled service order",
                        t.transaction_id
                    ),
                )
                .await;
        }
        let paid = self
            .store
            .pay_service_order(
                &o.id,
                ServicePayment {
                    transaction_id: t.transaction_id.as_deref(),
                    at: notice.now,
                },
                Some(notice),
            )
            .await;
        match paid {
            Ok(ServicePaid::Paid(row)) => {
                self.service_paid(&row);
                Ok(())
            }
            Ok(ServicePaid::Replay) => {
                self.metrics
                    .notifications_rejected
                    .with_label_values(&[notice.provider, "replay"])
                    .inc();
                Ok(())
            }
            // Paid already (a query found it first): the notice is only recorded.
            Ok(ServicePaid::Unchanged(Some(now))) if now.status == "paid" => {
                self.record(notice).await
            }
            // Cancelled between the read above and the payment's move: the money came and the
            // service did not; a person must look.
            Ok(ServicePaid::Unchanged(now)) => {
                self.keep_exception(
                    notice,
                    named,
                    "paid_after_cancel",
                    format!(
                        "transaction {:?} paid a service order that is {:?}",
                        t.transaction_id,
                        now.map(|o| o.status)
                    ),
                )
                .await
            }
            Err(e) => {
                tracing::error!(service_order = %o.id, error = %e,
                    "notified payment not applied; WeChat will deliver it again");
                self.metrics
                    .notifications_rejected
                    .with_label_values(&[notice.provider, NotificationRefusal::Storage.as_str()])
                    .inc();
                Err(NotificationRefusal::Storage)
            }
        }
    }

    /// Why a payment does not match the service order it names: `(reason, detail)`.
    fn transaction_mismatch(
        &self,
        t: &Transaction,
        o: &ServiceOrderRow,
    ) -> Option<(&'static str, String)> {
        let cfg = self.providers.wechat_merchant.as_ref().map(|w| w.config());
        if t.trade_state != "SUCCESS" {
            return Some((
                "state_mismatch",
                format!("trade_state {:?} in a success notice", t.trade_state),
            ));
        }
        if o.channel != "wechat" {
            return Some((
                "unknown_order",
                format!("the order is paid {}, not through WeChat Pay", o.channel),
            ));
        }
        if t.appid.as_deref() != cfg.map(|c| c.appid.as_str()) {
            return Some(("app_mismatch", format!("app id {:?}", t.appid)));
        }
        if t.mchid.as_deref() != cfg.map(|c| c.mchid.as_str()) {
            return Some(("merchant_mismatch", format!("mchid {:?}", t.mchid)));
        }
        let total = t.amount.as_ref().map(|a| a.total);
        if total != Some(o.amount_fen) {
            return Some((
                "amount_mismatch",
                format!("paid {total:?} fen, the order is {} fen", o.amount_fen),
            ));
        }
        None
    }

    /// One pass over unpaid orders whose time is up: asked about at WeChat (a payment whose
    /// notice was lost is applied), closed there, and only then cancelled. An order WeChat
    /// does not answer for stays unpaid until a later pass.
    pub async fn sweep_service_orders(&self) {
        let due = match self.store.due_service_orders(self.now(), SWEEP_BATCH).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "service-order sweep could not read");
                return;
            }
        };
        for o in due {
            if !self.sweep_one(&o).await {
                // Left unpaid (WeChat did not answer, refused the close, or says something a
                // person must look at): again later, behind the others.
                let later = self.now() + (self.settings.service.sweep_ms as i64 * 6).max(60_000);
                if let Err(e) = self.store.defer_service_order(&o.id, later).await {
                    tracing::warn!(service_order = %o.id, error = %e, "service order not deferred");
                }
            }
        }
    }

    /// One unpaid order whose time is up; whether it was settled (paid or cancelled).
    async fn sweep_one(&self, o: &ServiceOrderRow) -> bool {
        if o.channel != "wechat" {
            return self.cancel_service(&o.id).await;
        }
        let Some(w) = self.providers.wechat_merchant.clone() else {
            return false;
        };
        match w.query_transaction(&o.id).await {
            Ok(t) if t.trade_state == "SUCCESS" => {
                if let Some((reason, detail)) = self.transaction_mismatch(&t, o) {
                    tracing::error!(service_order = %o.id, reason, %detail,
                        "WeChat says paid, and not as ordered; left unpaid for a person");
                    return false;
                }
                let paid = self
                    .store
                    .pay_service_order(
                        &o.id,
                        ServicePayment {
                            transaction_id: t.transaction_id.as_deref(),
                            at: self.now(),
                        },
                        None,
                    )
                    .await;
                match paid {
                    Ok(ServicePaid::Paid(row)) => {
                        self.service_paid(&row);
                        true
                    }
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(service_order = %o.id, error = %e, "paid service order not applied; the next sweep tries again");
                        false
                    }
                }
            }
            // Never reached WeChat: nothing there to close.
            Err(WechatError::Api { code, .. }) if code == "ORDER_NOT_EXIST" => {
                self.cancel_service(&o.id).await
            }
            Ok(_) => match w.close_transaction(&o.id).await {
                Ok(()) => self.cancel_service(&o.id).await,
                // Paid between the query and the close: the next pass applies it.
                Err(e) => {
                    tracing::info!(service_order = %o.id, error = %e, "service order not closed yet");
                    false
                }
            },
            Err(e) => {
                tracing::info!(service_order = %o.id, error = %e, "service order not asked about; the next sweep tries again");
                false
            }
        }
    }
}
