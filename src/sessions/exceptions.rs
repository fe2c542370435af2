//! The exception supervisor's work: the blacklist (黑名单), abnormal orders resolved by a
//! person (异常订单), refunds for appeals (客户申诉), and collecting pending payments (待支付).

use serde_json::{json, Value};

use cabinet_actors::pricing::BasketItem;

use super::{order_view, refused, Refused, Sessions};
use crate::secrets::token;
use crate::store::{OrderRow, RefundRow, StoreError};

fn internal(e: StoreError) -> Refused {
    refused(500, "internal", e.to_string())
}

impl Sessions {
    /// Refuses a shopper on the blacklist, and adds one whose unpaid orders are too many or
    /// too old.
    pub(super) async fn check_blacklist(
        &self,
        merchant_id: &str,
        user_id: &str,
    ) -> Result<(), Refused> {
        let (listed, unpaid) = tokio::join!(
            self.store.blacklisted(merchant_id, user_id),
            self.store.unpaid(merchant_id, user_id)
        );
        if let Some(reason) = listed.map_err(internal)? {
            return Err(refused(
                422,
                "user_blacklisted",
                format!("the shopper is blacklisted: {reason}"),
            ));
        }
        let (n, oldest) = unpaid.map_err(internal)?;
        let p = &self.settings.payments;
        let too_old = oldest.is_some_and(|t| self.now() - t >= p.blacklist_after_ms as i64);
        if n > 0 && (n >= i64::from(p.blacklist_unpaid_orders) || too_old) {
            let reason = format!("{n} unpaid order(s)");
            self.store
                .blacklist_add(merchant_id, user_id, &reason, true, "system", self.now())
                .await
                .map_err(internal)?;
            tracing::warn!(
                merchant_id,
                user_id,
                n,
                "shopper blacklisted for unpaid orders"
            );
            return Err(refused(
                422,
                "user_blacklisted",
                format!("the shopper is blacklisted: {reason}"),
            ));
        }
        Ok(())
    }

    /// An order was paid: a shopper with nothing left unpaid comes off the automatic blacklist.
    pub(super) async fn paid(&self, o: &OrderRow) {
        self.metrics.orders.with_label_values(&["paid"]).inc();
        if let Ok((0, _)) = self.store.unpaid(&o.merchant_id, &o.user_id).await {
            if self
                .store
                .blacklist_remove(&o.merchant_id, &o.user_id, true)
                .await
                .unwrap_or(false)
            {
                tracing::info!(user_id = %o.user_id, "shopper paid; removed from the blacklist");
            }
        }
    }

    /// An operator resolves an abnormal order with the items taken; it is then priced and
    /// charged as usual (an empty list closes it at zero).
    pub async fn resolve(&self, o: &OrderRow, items: Vec<BasketItem>) -> Result<Value, Refused> {
        if o.status != "abnormal" {
            return Err(refused(
                409,
                "order_not_abnormal",
                format!("the order is {}", o.status),
            ));
        }
        let s = self
            .store
            .session(&o.session_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| refused(404, "not_found", "session not found"))?;
        self.price_and_complete(&s, o, items, &["abnormal"])
            .await
            .map_err(internal)?;
        let o = self
            .store
            .order(&o.id)
            .await
            .map_err(internal)?
            .ok_or_else(|| refused(404, "not_found", "order not found"))?;
        if o.status == "abnormal" {
            return Err(refused(
                422,
                "unknown_product",
                "an item is not on the cabinet's sellable list",
            ));
        }
        Ok(order_view(&o))
    }

    /// Refunds part or all of a paid order. Stored (and the amount reserved) before the provider
    /// hears of it; idempotent by key; never more than was paid.
    pub async fn refund(
        &self,
        o: &OrderRow,
        amount_fen: i64,
        reason: &str,
        key: Option<String>,
    ) -> Result<Value, Refused> {
        if amount_fen <= 0 {
            return Err(refused(
                400,
                "invalid_request",
                "amount_fen must be positive",
            ));
        }
        if reason.trim().is_empty() || reason.chars().count() > 80 {
            return Err(refused(
                400,
                "invalid_request",
                "reason must be 1 to 80 characters",
            ));
        }
        let now = self.now();
        let row = RefundRow {
            id: format!(
                "r{}",
                token(20).map_err(|_| refused(500, "internal", "no randomness"))?
            ),
            order_id: o.id.clone(),
            idempotency_key: key,
            amount_fen,
            reason: reason.to_owned(),
            status: "requested".into(),
            provider_refund_id: None,
            created_at: now,
            updated_at: now,
        };
        let Some(r) = self.store.reserve_refund(&row).await.map_err(internal)? else {
            return Err(refused(
                422,
                "refund_exceeds_paid",
                format!(
                    "order {} is {}: paid {} fen, refunded {} fen",
                    o.id, o.status, o.paid_fen, o.refunded_fen
                ),
            ));
        };
        if r.status != "succeeded" {
            self.send_refund(o, &r).await;
        }
        let o = self
            .store
            .order(&o.id)
            .await
            .map_err(internal)?
            .ok_or_else(|| refused(404, "not_found", "order not found"))?;
        let refunds = self.store.refunds(&o.id).await.map_err(internal)?;
        let this = refunds.iter().find(|x| x.id == r.id).cloned();
        Ok(json!({"refund": this, "order": order_view(&o), "refunds": refunds}))
    }

    async fn send_refund(&self, o: &OrderRow, r: &RefundRow) {
        let now = self.now();
        if o.channel == "alipay" {
            return self.alipay_refund(o, r).await;
        }
        let (Some(w), Some(txn)) = (&self.wechat, o.transaction_id.as_deref()) else {
            tracing::error!(order_id = %o.id, "refund cannot be sent: no provider or no transaction id");
            return;
        };
        let sub = self.sub_mchid(
            &o.merchant_id,
            self.store
                .merchant_payment(&o.merchant_id)
                .await
                .ok()
                .flatten()
                .and_then(|m| m.1),
        );
        let result = w
            .refund(&sub, txn, &r.id, r.amount_fen, o.paid_fen, &r.reason)
            .await;
        self.metrics
            .payments
            .with_label_values(&[
                "wechat",
                "refund",
                if result.is_ok() { "ok" } else { "error" },
            ])
            .inc();
        match result {
            Ok(done) => {
                if let Err(e) = self
                    .store
                    .finish_refund(&r.id, "succeeded", Some(&done.refund_id), now)
                    .await
                {
                    tracing::error!(refund_id = %r.id, error = %e, "refund result not stored");
                }
            }
            // Kept `requested`: repeating the request (same Idempotency-Key) retries it with the
            // same out_refund_no, as WeChat requires.
            Err(e) => {
                tracing::error!(order_id = %o.id, refund_id = %r.id, error = %e, "refund not accepted by the provider")
            }
        }
    }

    /// Prompts the provider to collect pending payments (催收), with exponential backoff per
    /// order. Run periodically.
    pub async fn collect_due(&self) {
        let now = self.now();
        let due = match self.store.due_collections(now, 100).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "could not list pending payments");
                return;
            }
        };
        for o in due {
            if o.channel == "alipay" {
                self.alipay_collect(&o).await;
                continue;
            }
            let Some(w) = self.wechat.clone() else {
                continue;
            };
            let sub = self.sub_mchid(
                &o.merchant_id,
                self.store
                    .merchant_payment(&o.merchant_id)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|m| m.1),
            );
            let r = w.collect(&sub, &o.session_id).await;
            self.metrics
                .payments
                .with_label_values(&["wechat", "collect", if r.is_ok() { "ok" } else { "error" }])
                .inc();
            if let Ok(q) = w.query_order(&sub, &o.session_id).await {
                if let Some(c) = q.collection.filter(|c| c.state == "USER_PAID") {
                    let txn = c.details.first().map(|d| d.transaction_id.clone());
                    if self
                        .store
                        .mark_order_paid(&o.id, c.paid_amount, txn.as_deref(), now)
                        .await
                        .unwrap_or(false)
                    {
                        self.paid(&o).await;
                    }
                    continue;
                }
            }
            let attempts = o.collect_attempts + 1;
            let base = self.settings.payments.collect_interval_ms as i64;
            let next = now + base.saturating_mul(1i64 << attempts.clamp(0, 6));
            if let Err(e) = self.store.schedule_collection(&o.id, attempts, next).await {
                tracing::error!(order_id = %o.id, error = %e, "collection not rescheduled");
            }
        }
    }
}

impl Sessions {
    /// Hands a priced, stored order to the provider: complete (retried while retryable), then
    /// check the deduction. Safe to repeat: the provider holds one order per session and
    /// completing it again is refused, not charged twice.
    pub(super) async fn finish_completion(
        &self,
        s: &crate::store::SessionRow,
        order_id: &str,
        priced: &cabinet_actors::pricing::PricedOrder,
    ) -> Result<(), StoreError> {
        use crate::payments::wechat::{PostDiscount, PostPayment, WechatError};
        if s.channel == "alipay" {
            return self.alipay_pay(s, order_id, priced.total_fen).await;
        }
        let Some(w) = &self.wechat else { return Ok(()) };
        let sub = self.sub_mchid(
            &s.merchant_id,
            self.store
                .merchant_payment(&s.merchant_id)
                .await?
                .and_then(|m| m.1),
        );
        let pay: Vec<PostPayment> = priced
            .lines
            .iter()
            .map(|l| PostPayment {
                name: "商品信息".into(),
                amount: l.amount_fen,
                description: l.name.clone(),
                count: l.qty,
            })
            .collect();
        let disc: Vec<PostDiscount> = priced
            .discounts
            .iter()
            .map(|d| PostDiscount {
                name: d.name.clone(),
                description: d.name.clone(),
                amount: d.amount_fen,
            })
            .collect();
        let mut delay = std::time::Duration::from_millis(200);
        for attempt in 1..=5 {
            let r = w
                .complete_order(&sub, &s.id, &pay, &disc, priced.total_fen)
                .await;
            self.metrics
                .payments
                .with_label_values(&["wechat", "complete", if r.is_ok() { "ok" } else { "error" }])
                .inc();
            match r {
                Ok(()) => break,
                Err(e) if e.retryable() && attempt < 5 => {
                    tracing::warn!(session_id = %s.id, error = %e, attempt, "complete failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(WechatError::Api { code, .. })
                    if code == "INVALID_REQUEST"
                        && self.already_completed(w, &sub, &s.id).await =>
                {
                    // Completed before a crash: carry on with the deduction check.
                    break;
                }
                Err(e) => {
                    tracing::error!(session_id = %s.id, error = %e, "complete failed");
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
                            self.now(),
                        )
                        .await?
                    {
                        self.metrics.orders.with_label_values(&["abnormal"]).inc();
                    }
                    return Ok(());
                }
            }
        }
        self.schedule_deduction_check(s.clone(), order_id.to_owned(), sub);
        Ok(())
    }

    async fn already_completed(
        &self,
        w: &crate::payments::wechat::WechatClient,
        sub: &str,
        id: &str,
    ) -> bool {
        match w.query_order(sub, id).await {
            Ok(o) => o.state == "DONE" || o.state_description.as_deref() == Some("MCH_COMPLETE"),
            Err(_) => false,
        }
    }

    /// Picks up what a crash interrupted. Sessions still waiting for the shopper's confirmation
    /// fail (the cabinet never opened; the provider order is cancelled). Sessions that were
    /// unlocking may have opened the door: they are treated as open, so the cabinet's
    /// recognition still charges them. Orders that were being completed are completed again.
    pub async fn resume(&self) {
        let now = self.now();
        if let Ok(confirming) = self.store.sessions_in_state("confirming").await {
            for s in confirming {
                let _ = self
                    .fail(&s, "confirming", "hub_restarted", 503, "the hub restarted")
                    .await;
            }
        }
        if let Ok(unlocking) = self.store.sessions_in_state("unlocking").await {
            for s in unlocking {
                let _ = self
                    .store
                    .transition_session(&s.id, "unlocking", "open", None, now)
                    .await;
                tracing::warn!(session_id = %s.id, "session was unlocking at a crash; awaiting the cabinet's recognition");
            }
        }
        let completing = self
            .store
            .orders(None, None, Some("completing"), (None, None), 1000)
            .await
            .unwrap_or_default();
        for o in completing {
            let (Ok(Some(s)), Some(priced)) = (
                self.store.session(&o.session_id).await,
                o.priced.as_deref().and_then(|p| {
                    serde_json::from_str::<cabinet_actors::pricing::PricedOrder>(p).ok()
                }),
            ) else {
                continue;
            };
            tracing::info!(order_id = %o.id, "completing an order interrupted by a restart");
            if let Err(e) = self.finish_completion(&s, &o.id, &priced).await {
                tracing::error!(order_id = %o.id, error = %e, "could not resume the order");
            }
        }
    }
}
