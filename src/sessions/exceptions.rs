//! The exception supervisor's work: the blacklist (黑名单), abnormal orders resolved by a
//! person (异常订单), and refunds for appeals (客户申诉).

use cabinet_actors::pricing::BasketItem;
use cabinet_actors::session::{Event, Refusal};

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
}
