//! The Alipay 芝麻先享 side of a session: the credit order the shopper confirms, the deduction
//! against it, closing it without charge, refunds and collection. The provider order numbers
//! are the session id (credit order and trade alike), so retries and recovery address the same
//! orders.

use cabinet_actors::session::Event;

use super::provider::PaymentTerms;
use super::Sessions;
use crate::error::ApiResult;
use crate::payments::alipay::crypto::fen;
use crate::payments::alipay::{request_no, AlipayError};
use crate::payments::Confirmation;
use crate::store::{OrderRow, SessionRow, StoreError};

impl Sessions {
    /// Creates the credit order; answers the `order_str` the shopper's mini-program confirms
    /// it with. The credit order's id is stored before the answer: every later step needs it.
    pub(super) async fn alipay_create(
        &self,
        s: &SessionRow,
        order: &OrderRow,
        terms: Option<&PaymentTerms>,
    ) -> ApiResult<Confirmation> {
        let (Some(a), Some(terms)) = (self.providers.alipay.clone(), terms) else {
            return Err(self
                .fail(s, Event::NotConfirmed, "Alipay is not configured")
                .await);
        };
        let v = match self.counted(
            "alipay",
            "create",
            a.create(&s.id, &s.user_id, terms.ceiling_fen, terms.alipay.as_ref())
                .await,
        ) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(session_id = %s.id, error = %e, "credit order not created");
                return Err(self
                    .fail(
                        s,
                        Event::NotConfirmed,
                        "the payment provider refused the order",
                    )
                    .await);
            }
        };
        let (Some(id), Some(order_str)) = (
            v["credit_biz_order_id"].as_str(),
            v["order_str"].as_str().filter(|o| !o.is_empty()),
        ) else {
            return Err(self
                .fail(
                    s,
                    Event::NotConfirmed,
                    "the payment provider's answer carried no order to confirm",
                )
                .await);
        };
        if let Err(e) = self.store.set_provider_order(&order.id, id).await {
            tracing::error!(session_id = %s.id, error = %e, "credit order not recorded");
            return Err(self
                .fail(
                    s,
                    Event::NotConfirmed,
                    "the credit order could not be recorded",
                )
                .await);
        }
        Ok(Confirmation::Alipay {
            order_str: order_str.to_owned(),
        })
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
        let (Some(a), Some(id)) = (
            self.providers.alipay.clone(),
            self.credit_order_id(&s.id).await,
        ) else {
            return;
        };
        let m = self.order_terms(&s.merchant_id).await.alipay;
        let closed = a.close(&id, &request_no(), reason, m.as_ref()).await;
        if let Err(e) = self.counted("alipay", "close", closed) {
            tracing::info!(session_id = %s.id, error = %e, "credit order not closed");
        }
    }

    /// Deducts the priced total. Paid at once, or pending payment when the deduction fails.
    pub(super) async fn alipay_pay(
        &self,
        s: &SessionRow,
        order_id: &str,
        total_fen: i64,
        hold: bool,
    ) -> Result<(), StoreError> {
        let (Some(a), Some(id)) = (
            self.providers.alipay.clone(),
            self.credit_order_id(&s.id).await,
        ) else {
            return Ok(());
        };
        let m = self.order_terms(&s.merchant_id).await.alipay;
        let paid = a.pay(&s.id, &id, total_fen, m.as_ref(), hold).await;
        match self.counted("alipay", "pay", paid) {
            Ok(v) => {
                let paid = v["total_amount"]
                    .as_str()
                    .and_then(fen)
                    .unwrap_or(total_fen);
                self.payment_outcome(order_id, Event::Paid, Some((paid, v["trade_no"].as_str())))
                    .await
            }
            Err(AlipayError::Api { sub_code, .. }) if deduction_side(&sub_code).is_some() => {
                let side = deduction_side(&sub_code).unwrap_or("shopper");
                if side != "shopper" {
                    tracing::warn!(order_id, sub_code, "deduction refused for the merchant's own limits; the shopper is not held to it");
                }
                // Whose side first, then the move: an order seen pending payment (in the API,
                // or in the feed's event of the move) already says whose side it is on.
                self.store.set_deduction_failure(order_id, side).await?;
                self.payment_outcome(order_id, Event::DeductionFailed, None)
                    .await
            }
            Err(e) => {
                tracing::error!(session_id = %s.id, error = %e, "Alipay deduction failed");
                self.payment_outcome(order_id, Event::CompleteFailed, None)
                    .await
            }
        }
    }

    /// Tries a failed deduction again (the same trade number: a success is never doubled);
    /// answers whether the order is still owed.
    pub(super) async fn alipay_collect(&self, o: &OrderRow) -> bool {
        let Some(s) = self.store.session(&o.session_id).await.ok().flatten() else {
            return false;
        };
        // Held for settlement as the first attempt was: exactly when a settlement follows it.
        let hold = matches!(self.store.settlement(&o.id).await, Ok(Some(_)));
        if let Err(e) = self
            .alipay_pay(&s, &o.id, o.total_fen.unwrap_or(0), hold)
            .await
        {
            tracing::error!(order_id = %o.id, error = %e, "collection not recorded");
        }
        self.store
            .order(&o.id)
            .await
            .ok()
            .flatten()
            .is_some_and(|x| x.status == "pending_payment")
    }
}

/// Whose side a refused Alipay deduction is on, by its `sub_code`: the shopper's (their funds,
/// their own payment limits: counted toward the blacklist) or the merchant's (its collection
/// limits: retried, never held against the shopper). `None`: not a deduction refusal (the
/// provider's error; the order goes to a person).
fn deduction_side(sub_code: &str) -> Option<&'static str> {
    match sub_code {
        "ACQ.PAYMENT_FAIL"
        | "ACQ.BUYER_BALANCE_NOT_ENOUGH"
        | "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH"
        | "ACQ.BUYER_PAYMENT_AMOUNT_DAY_LIMIT_ERROR"
        | "ACQ.BUYER_PAYMENT_AMOUNT_MONTH_LIMIT_ERROR" => Some("shopper"),
        "ACQ.BEYOND_PAY_RESTRICTION"
        | "ACQ.BEYOND_PER_RECEIPT_RESTRICTION"
        | "ACQ.PRODUCT_AMOUNT_LIMIT_ERROR"
        | "ACQ.SELLER_BEEN_BLOCKED" => Some("merchant"),
        _ => None,
    }
}
