//! Refunds for appeals (客户申诉), followed to the end: stored `processing` with their amount
//! reserved before the provider hears of them; settled `succeeded` (the order's refunded
//! amount grows), `failed` or `closed` (the reservation is released) from the provider's
//! answer, its refund notices, or the follow-up that asks it about refunds still in flight.

use cabinet_actors::session::Channel;

use super::Sessions;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::payments::alipay::AlipayError;
use crate::payments::wechat::WechatError;
use crate::secrets::token;
use crate::store::{OrderRow, RefundRow};
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

/// What a provider allows of one order's refunds: how long after the payment, how many.
struct RefundLimits {
    days: i64,
    count: i64,
}

/// WeChat Pay: within a year of the payment, at most 50 partial refunds (research/payments.md).
const WECHAT_LIMITS: RefundLimits = RefundLimits {
    days: 365,
    count: 50,
};

/// Alipay: within the refundable period its contract sets, three months by default; no count
/// is documented, so the count is WeChat's.
const ALIPAY_LIMITS: RefundLimits = RefundLimits {
    days: 90,
    count: 50,
};

const DAY_MS: i64 = 86_400_000;

/// How many refunds in flight one follow-up pass asks about.
const FOLLOW_BATCH: i64 = 100;

/// A provider's answer about a refund, as a settled status (or still in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Succeeded,
    Failed,
    Closed,
    /// PROCESSING, or no answer that settles it: asked again later.
    InFlight,
}

impl Word {
    fn of_wechat(status: Option<&str>) -> Self {
        match status {
            Some("SUCCESS") => Word::Succeeded,
            // ABNORMAL: the shopper's account could not take it (closed card, frozen account);
            // the money stays with the merchant and the operator refunds another way.
            Some("ABNORMAL") => Word::Failed,
            Some("CLOSED") => Word::Closed,
            _ => Word::InFlight,
        }
    }

    fn status(self) -> Option<&'static str> {
        match self {
            Word::Succeeded => Some("succeeded"),
            Word::Failed => Some("failed"),
            Word::Closed => Some("closed"),
            Word::InFlight => None,
        }
    }
}

impl Sessions {
    /// Refunds part or all of a paid order. Refused up front past the provider's limits (its
    /// refund window from the payment, its count of refunds per order). Stored `processing`,
    /// its amount reserved, before the provider hears of it; idempotent by key; never more
    /// than was paid, counting refunds in flight.
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
        let limits = if o.channel == Channel::Alipay.as_str() {
            ALIPAY_LIMITS
        } else {
            WECHAT_LIMITS
        };
        let now = self.now();
        let paid_at = o.paid_at.unwrap_or(o.created_at);
        if matches!(o.status.as_str(), "paid" | "refunded") && now - paid_at > limits.days * DAY_MS
        {
            return Err(ApiError::new(
                ErrorCode::RefundWindowClosed,
                format!(
                    "order {} was paid more than {} days ago: the provider no longer refunds it",
                    o.id, limits.days
                ),
            ));
        }
        let row = RefundRow {
            id: format!("r{}", token(20)?),
            order_id: o.id.clone(),
            idempotency_key: idempotency.as_ref().map(|i| i.key.clone()),
            amount_fen,
            reason: reason.to_owned(),
            status: "processing".into(),
            provider_refund_id: None,
            created_at: now,
            updated_at: now,
        };
        let reserved = self
            .store
            .reserve_refund(
                &row,
                idempotency.as_ref().map(|i| i.request_hash.as_str()),
                limits.count,
            )
            .await?;
        let Some(r) = reserved else {
            let n = self.store.refunds(&o.id).await?.len() as i64;
            if n >= limits.count {
                return Err(ApiError::new(
                    ErrorCode::RefundLimitReached,
                    format!("order {} has {n} refunds, the provider's most", o.id),
                ));
            }
            return Err(ApiError::new(
                ErrorCode::RefundExceedsPaid,
                format!(
                    "order {} is {}: paid {} fen, refunded {} fen, {} fen in flight",
                    o.id, o.status, o.paid_fen, o.refunded_fen, o.refund_reserved_fen
                ),
            ));
        };
        if r.status == "processing" {
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

    /// Asks the provider for the refund (again: the same `out_refund_no` / `out_request_no` is
    /// the same refund) and records its word.
    async fn send_refund(&self, o: &OrderRow, r: &RefundRow) {
        let word = if o.channel == Channel::Alipay.as_str() {
            self.alipay_refund(o, r).await
        } else {
            self.wechat_refund(o, r).await
        };
        self.settle_refund(r, word).await;
    }

    async fn wechat_refund(&self, o: &OrderRow, r: &RefundRow) -> (Word, Option<String>) {
        let (Some(w), Some(txn)) = (&self.providers.wechat, o.transaction_id.as_deref()) else {
            tracing::error!(order_id = %o.id, refund_id = %r.id, "refund cannot be sent: no provider or no transaction id");
            return (Word::InFlight, None);
        };
        let sub = self.sub_mchid(&o.merchant_id).await;
        // A split order's platform part goes back to the merchant first (回退), or the
        // merchant's account cannot pay the refund.
        match self.return_split_first(w, o, r, &sub).await {
            super::settle::ReturnFirst::Clear => {}
            super::settle::ReturnFirst::Wait => return (Word::InFlight, None),
            super::settle::ReturnFirst::Refused(reason) => {
                tracing::error!(order_id = %o.id, refund_id = %r.id, reason, "refund failed: the split's return was refused");
                return (Word::Failed, None);
            }
        }
        let result = w
            .refund(&sub, txn, &r.id, r.amount_fen, o.paid_fen, &r.reason)
            .await;
        match self.counted("wechat", "refund", result) {
            Ok(done) => (
                Word::of_wechat(done.status.as_deref()),
                Some(done.refund_id),
            ),
            // A refusal on the merits (not enough left, a bad parameter) is final; a transport
            // failure, a rate limit or the provider's own error leaves it in flight, asked
            // again with the same out_refund_no (never released: it may have been taken).
            Err(
                ref e @ WechatError::Api {
                    status,
                    ref code,
                    ref message,
                },
            ) if (400..500).contains(&status) && !e.retryable() => {
                tracing::error!(order_id = %o.id, refund_id = %r.id, code, message, "refund refused by the provider");
                (Word::Failed, None)
            }
            Err(e) => {
                tracing::warn!(order_id = %o.id, refund_id = %r.id, error = %e, "refund not answered; asked again later");
                (Word::InFlight, None)
            }
        }
    }

    /// Alipay answers a refund at once: done, or refused on the merits.
    async fn alipay_refund(&self, o: &OrderRow, r: &RefundRow) -> (Word, Option<String>) {
        let Some(a) = self.providers.alipay.clone() else {
            tracing::error!(order_id = %o.id, refund_id = %r.id, "refund cannot be sent: Alipay is not configured");
            return (Word::InFlight, None);
        };
        let m = self.order_terms(&o.merchant_id).await.alipay;
        // A split order's platform part comes back in the refund itself.
        let result = match self.alipay_refund_returning(&a, o, r, m.as_ref()).await {
            Ok(result) => result,
            Err(super::settle::ReturnFirst::Refused(reason)) => {
                tracing::error!(order_id = %o.id, refund_id = %r.id, reason, "refund failed: the split's return was refused");
                return (Word::Failed, None);
            }
            Err(_) => return (Word::InFlight, None),
        };
        match self.counted("alipay", "refund", result) {
            Ok(v) => (Word::Succeeded, v["trade_no"].as_str().map(str::to_owned)),
            // Only a named refusal releases the amount: on `ACQ.SYSTEM_ERROR`, code 20000 and
            // the like Alipay may have refunded, and says to ask again with the same
            // out_request_no, which the follow-up does.
            Err(AlipayError::Api {
                sub_code, sub_msg, ..
            }) if alipay_refused(&sub_code) => {
                tracing::error!(order_id = %o.id, refund_id = %r.id, sub_code, sub_msg, "refund refused by Alipay");
                (Word::Failed, None)
            }
            Err(e) => {
                tracing::warn!(order_id = %o.id, refund_id = %r.id, error = %e, "refund not answered; asked again later");
                (Word::InFlight, None)
            }
        }
    }

    /// Records a provider's word on a refund. A write that fails leaves the refund in flight:
    /// the follow-up asks again and records it then.
    async fn settle_refund(&self, r: &RefundRow, (word, provider_id): (Word, Option<String>)) {
        let now = self.now();
        let result = match word.status() {
            Some(status) => self
                .store
                .settle_refund(&r.id, status, provider_id.as_deref(), now)
                .await
                .map(|_| ()),
            None => match provider_id.as_deref() {
                Some(id) => self.store.note_refund(&r.id, id, now).await,
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => {
                if let Some(status) = word.status() {
                    self.metrics.refunds.with_label_values(&[status]).inc();
                }
            }
            Err(e) => {
                tracing::error!(refund_id = %r.id, error = %e, "refund outcome not recorded; asked again later")
            }
        }
    }

    /// One pass of the follow-up: every refund still `processing` since before
    /// `payments.refund_check_ms` is asked about again (WeChat: queried, and applied again if
    /// WeChat never got it; Alipay: applied again, which answers the first outcome). Answers
    /// how many it asked about.
    pub async fn follow_refunds(&self) -> usize {
        let before = self.now() - self.settings.payments.refund_check_ms as i64;
        let stale = match self.store.refunds_in_flight(before, FOLLOW_BATCH).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "refunds in flight not read");
                return 0;
            }
        };
        let n = stale.len();
        for r in stale {
            let Ok(Some(o)) = self.store.order(&r.order_id).await else {
                continue;
            };
            let word = match (&self.providers.wechat, o.channel.as_str()) {
                (Some(w), "wechat") => {
                    let sub = self.sub_mchid(&o.merchant_id).await;
                    match w.query_refund(&sub, &r.id).await {
                        Ok(q) => (Word::of_wechat(q.status.as_deref()), Some(q.refund_id)),
                        // WeChat never took it (the first request was lost): ask again.
                        Err(WechatError::Api { status: 404, .. }) => {
                            self.wechat_refund(&o, &r).await
                        }
                        Err(e) => {
                            tracing::warn!(refund_id = %r.id, error = %e, "refund not queried");
                            (Word::InFlight, None)
                        }
                    }
                }
                (_, "alipay") => self.alipay_refund(&o, &r).await,
                _ => (Word::InFlight, None),
            };
            // Touched even when still in flight, so the next pass takes the next batch.
            let in_flight = word.0 == Word::InFlight;
            self.settle_refund(&r, word).await;
            if in_flight {
                if let Err(e) = self.store.touch_refund(&r.id, self.now()).await {
                    tracing::error!(refund_id = %r.id, error = %e, "refund not touched");
                }
            }
        }
        n
    }
}

/// Alipay's refusals of a refund on the merits: the refund did not and will not happen.
fn alipay_refused(sub_code: &str) -> bool {
    matches!(
        sub_code,
        "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
            | "ACQ.TRADE_NOT_EXIST"
            | "ACQ.TRADE_STATUS_ERROR"
            | "ACQ.TRADE_NOT_ALLOW_REFUND"
            | "ACQ.SELLER_BALANCE_NOT_ENOUGH"
            | "ACQ.REASON_TRADE_BEEN_FREEZEN"
            | "ACQ.TRADE_HAS_FINISHED"
            | "ACQ.DISCORDANT_REPEAT_REQUEST"
    )
}
