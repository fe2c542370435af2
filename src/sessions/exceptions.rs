//! The exception supervisor's work: the blacklist (黑名单), abnormal orders resolved by a
//! person (异常订单), and refunds for appeals (客户申诉).

use cabinet_actors::pricing::BasketItem;
use cabinet_actors::session::{Channel, Event, Refusal};

use super::{lifecycle, Sessions};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::secrets::token;
use crate::store::{BlacklistRow, OrderRow, RefundRow};
use crate::views::OrderView;

/// A refund and the order it belongs to.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RefundAnswer {
    /// This refund.
    pub refund: Option<RefundRow>,
    /// The order after it.
    pub order: OrderView,
    /// Every refund of the order.
    pub refunds: Vec<RefundRow>,
}

fn blacklisted(reason: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UserBlacklisted,
        format!("the shopper is blacklisted: {reason}"),
    )
}

impl Sessions {
    /// Refuses a shopper on the blacklist, and adds one whose unpaid orders are too many or
    /// too old.
    pub(super) async fn check_blacklist(&self, merchant_id: &str, user_id: &str) -> ApiResult<()> {
        let (listed, n, oldest) = self.store.standing(merchant_id, user_id).await?;
        if let Some(reason) = listed {
            return Err(blacklisted(&reason));
        }
        let p = &self.settings.payments;
        let too_old = oldest.is_some_and(|t| self.now() - t >= p.blacklist_after_ms as i64);
        if n > 0 && (n >= i64::from(p.blacklist_unpaid_orders) || too_old) {
            let reason = format!("{n} unpaid order(s)");
            self.store
                .blacklist_add(&BlacklistRow {
                    merchant_id: merchant_id.to_owned(),
                    user_id: user_id.to_owned(),
                    reason: reason.clone(),
                    automatic: true,
                    created_at: self.now(),
                    created_by: "system".to_owned(),
                })
                .await?;
            tracing::warn!(
                merchant_id,
                user_id,
                n,
                "shopper blacklisted for unpaid orders"
            );
            return Err(blacklisted(&reason));
        }
        Ok(())
    }

    /// An order was paid: a shopper with nothing left unpaid comes off the automatic blacklist.
    pub(super) async fn paid(&self, o: &OrderRow) {
        self.metrics.orders.with_label_values(&["paid"]).inc();
        match self.store.release_paid_up(&o.merchant_id, &o.user_id).await {
            Ok(true) => {
                tracing::info!(user_id = %o.user_id, "shopper paid; removed from the blacklist")
            }
            Ok(false) => {}
            // The next start's check finds nothing unpaid either way; the entry is the
            // operator's to remove until then.
            Err(e) => {
                tracing::warn!(user_id = %o.user_id, error = %e, "paid shopper not released")
            }
        }
    }

    /// An operator resolves an abnormal order with the items taken; it is then priced and
    /// charged as usual (an empty list closes it at zero).
    pub async fn resolve(&self, o: &OrderRow, items: Vec<BasketItem>) -> ApiResult<OrderView> {
        let s = self
            .store
            .session(&o.session_id)
            .await?
            .ok_or_else(|| ApiError::not_found("session"))?;
        let priced = self.price(&s, &items).await?;
        let event = Event::Resolve(priced.basket);
        // The machine's refusals are the operator's answer.
        match lifecycle(&s, o)?.transition(&event) {
            Ok(_) => {}
            Err(Refusal::OrderNotAbnormal(status)) => {
                return Err(ApiError::new(
                    ErrorCode::OrderNotAbnormal,
                    format!("the order is {status}"),
                ))
            }
            Err(Refusal::UnknownProduct) => {
                return Err(ApiError::new(
                    ErrorCode::UnknownProduct,
                    "an item is not on the cabinet's sellable list",
                ))
            }
            Err(r @ Refusal::OutOfRange) => {
                return Err(match priced.error {
                    Some(e) => e.into(),
                    None => ApiError::internal(r),
                })
            }
            Err(r @ Refusal::NotApplicable { .. }) => return Err(ApiError::internal(r)),
        }
        self.settle(&s, o, event, &priced).await?;
        let o = self
            .store
            .order(&o.id)
            .await?
            .ok_or_else(|| ApiError::not_found("order"))?;
        Ok(OrderView::from(&o))
    }

    /// Refunds part or all of a paid order. Stored (and the amount reserved) before the provider
    /// hears of it; idempotent by key; never more than was paid.
    pub async fn refund(
        &self,
        o: &OrderRow,
        amount_fen: i64,
        reason: &str,
        idempotency: Option<super::Idempotency>,
    ) -> ApiResult<RefundAnswer> {
        if amount_fen <= 0 {
            return Err(ApiError::bad_request("amount_fen must be positive"));
        }
        if reason.trim().is_empty() || reason.chars().count() > 80 {
            return Err(ApiError::bad_request("reason must be 1 to 80 characters"));
        }
        let now = self.now();
        let row = RefundRow {
            id: format!("r{}", token(20)?),
            order_id: o.id.clone(),
            idempotency_key: idempotency.as_ref().map(|i| i.key.clone()),
            amount_fen,
            reason: reason.to_owned(),
            status: "requested".into(),
            provider_refund_id: None,
            created_at: now,
            updated_at: now,
        };
        let Some(r) = self
            .store
            .reserve_refund(&row, idempotency.as_ref().map(|i| i.request_hash.as_str()))
            .await?
        else {
            return Err(ApiError::new(
                ErrorCode::RefundExceedsPaid,
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
            .await?
            .ok_or_else(|| ApiError::not_found("order"))?;
        let refunds = self.store.refunds(&o.id).await?;
        let this = refunds.iter().find(|x| x.id == r.id).cloned();
        Ok(RefundAnswer {
            refund: this,
            order: OrderView::from(&o),
            refunds,
        })
    }

    async fn send_refund(&self, o: &OrderRow, r: &RefundRow) {
        if o.channel == Channel::Alipay.as_str() {
            return self.alipay_refund(o, r).await;
        }
        let (Some(w), Some(txn)) = (&self.providers.wechat, o.transaction_id.as_deref()) else {
            tracing::error!(order_id = %o.id, "refund cannot be sent: no provider or no transaction id");
            return;
        };
        let sub = self.sub_mchid(&o.merchant_id).await;
        let result = w
            .refund(&sub, txn, &r.id, r.amount_fen, o.paid_fen, &r.reason)
            .await;
        match self.counted("wechat", "refund", result) {
            Ok(done) => {
                if let Err(e) = self
                    .store
                    .finish_refund(&r.id, "succeeded", Some(&done.refund_id), self.now())
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
}
