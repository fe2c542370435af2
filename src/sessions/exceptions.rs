//! The exception supervisor's work: the blacklist (黑名单), abnormal orders resolved by a
//! person (异常订单), and refunds for appeals (客户申诉).

use cabinet_actors::pricing::BasketItem;
use cabinet_actors::pricing::{DiscountLine, PricedOrder};
use cabinet_actors::session::{Channel, Event, Refusal};

use super::{lifecycle, Sessions};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::store::{BlacklistRow, OrderRow};
use crate::views::OrderView;

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
            self.audit(
                super::Actor::SYSTEM,
                super::Audited {
                    action: "blacklist.add",
                    merchant_id: Some(merchant_id),
                    subject: user_id,
                    order_id: None,
                    reason: Some(&reason),
                    detail: serde_json::json!({"automatic": true, "unpaid_orders": n}),
                },
            )
            .await;
            return Err(blacklisted(&reason));
        }
        Ok(())
    }

    /// An order was paid: a shopper with nothing left unpaid comes off the automatic blacklist.
    pub(super) async fn paid(&self, o: &OrderRow) {
        self.metrics.orders.with_label_values(&["paid"]).inc();
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&o.id);
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
        // Priced as the shopper would have been: with the prices and promotions captured when
        // the order went abnormal (older orders have none: today's).
        let terms = o.price_terms.as_deref().and_then(|t| {
            serde_json::from_str(t)
                .map_err(|e| tracing::error!(order_id = %o.id, error = %e, "captured prices unreadable; pricing with today's"))
                .ok()
        });
        let mut priced = self.price_with(&s, &items, terms).await?;
        // The provider charges at most what the shopper authorised: the rest is let go, on
        // the order as a line, rather than an order whose completion fails on every resolve.
        let authorised = self.authorised(o).await;
        if Self::cap_to(&mut priced, authorised) {
            tracing::warn!(order_id = %o.id, authorised, "resolved basket above the authorised amount: charged at most that");
        }
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

    /// Lowers an order still waiting for its payment (待支付) to `to_fen` through the provider's
    /// modify (WeChat Pay Score: a completed order whose deduction has not succeeded can only be
    /// lowered), with a line saying by how much and why; the provider then deducts the lower
    /// amount. Alipay's deduction has no such call: an Alipay order is refunded after it is
    /// paid instead.
    pub async fn reduce(&self, o: &OrderRow, to_fen: i64, reason: &str) -> ApiResult<OrderView> {
        if reason.trim().is_empty() || reason.chars().count() > 50 {
            return Err(ApiError::bad_request("reason must be 1 to 50 characters"));
        }
        if o.status != "pending_payment" {
            return Err(ApiError::new(
                ErrorCode::OrderNotUnpaid,
                format!("the order is {}: only an unpaid order is reduced", o.status),
            ));
        }
        if o.channel != Channel::Wechat.as_str() {
            return Err(ApiError::bad_request(
                "an Alipay deduction cannot be modified: refund the order once it is paid",
            ));
        }
        let (Some(total), Some(priced)) = (o.total_fen, o.priced.as_deref()) else {
            return Err(ApiError::internal(
                "an unpaid order without its priced basket",
            ));
        };
        if !(0..total).contains(&to_fen) {
            return Err(ApiError::bad_request(format!(
                "amount_fen must be lower than the order's {total} fen (and not negative): the provider only lowers an order"
            )));
        }
        let mut p: PricedOrder = serde_json::from_str(priced).map_err(ApiError::internal)?;
        p.discounts.push(DiscountLine {
            promotion_id: "modify".into(),
            name: "订单调减".into(),
            amount_fen: total - to_fen,
        });
        p.total_fen = to_fen;
        let Some(w) = self.providers.wechat.clone() else {
            return Err(ApiError::internal("WeChat Pay is not configured"));
        };
        let sub = self.sub_mchid(&o.merchant_id).await;
        let (pay, disc) = super::charge::provider_lines(&p);
        let modified = w
            .modify_order(&sub, &o.session_id, &pay, &disc, to_fen, reason.trim())
            .await;
        if let Err(e) = self.counted("wechat", "modify", modified) {
            // The provider's refusal (a deduction running, the order paid meanwhile) is the
            // operator's answer; nothing changed here.
            return Err(ApiError::new(
                ErrorCode::PaymentDeclined,
                format!("the provider refused the modification: {e}"),
            ));
        }
        let json = serde_json::to_string(&p).map_err(ApiError::internal)?;
        match self
            .store
            .reduce_unpaid_order(&o.id, total, to_fen, &json, self.now())
            .await?
        {
            Some(o) => Ok(OrderView::from(&o)),
            // Paid meanwhile at the old amount: the provider refused the modify then, so this
            // is a race the provider decided; the order as it stands is the answer.
            None => {
                let o = self
                    .store
                    .order(&o.id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("order"))?;
                Ok(OrderView::from(&o))
            }
        }
    }
}
