//! Charging: completing the provider's order with the priced amount, checking the deduction,
//! collecting pending payments (催收), and picking up what a crash interrupted.

use std::time::Duration;

use cabinet_actors::pricing::PricedOrder;
use cabinet_actors::session::{Channel, Effect, Event, OrderStatus, SessionState};

use super::Sessions;
use crate::backoff::{self, Backoff};
use crate::payments::wechat::{PostDiscount, PostPayment, WechatClient, WechatError};
use crate::store::{OrderFilter, OrderRow, OrderUpdate, SessionRow, StoreError};

/// How often a retryable completion is tried before the order goes to a person.
const COMPLETE_ATTEMPTS: u32 = 5;

impl Sessions {
    /// Applies a payment outcome to an order and carries out what follows (a paid shopper
    /// comes off the automatic blacklist; a completed WeChat order is checked later).
    pub(super) async fn payment_outcome(
        &self,
        order_id: &str,
        event: Event,
        paid: Option<(i64, Option<&str>)>,
    ) -> Result<(), StoreError> {
        match self.store.order(order_id).await? {
            Some(o) => self.apply_payment(&o, event, paid).await,
            None => Ok(()),
        }
    }

    /// [`Sessions::payment_outcome`] for an order just read.
    pub(super) async fn apply_payment(
        &self,
        o: &OrderRow,
        event: Event,
        paid: Option<(i64, Option<&str>)>,
    ) -> Result<(), StoreError> {
        let order_id = o.id.as_str();
        let life = super::payment_lifecycle(o)?;
        let step = match life.transition(&event) {
            Ok(step) => step,
            Err(refusal) => {
                tracing::info!(order_id, %refusal, "payment outcome changes nothing");
                return Ok(());
            }
        };
        match (&event, paid) {
            // Paid sets the amount and the trade number with the status, in one conditional
            // write (the same states the machine allows).
            (Event::Paid, Some((amount, txn))) => {
                if !self
                    .store
                    .mark_order_paid(order_id, amount, txn, self.now())
                    .await?
                {
                    return Ok(());
                }
                tracing::info!(order_id, paid = amount, "order paid");
            }
            _ => {
                if self
                    .apply_to(&o.session_id, life, o, &event, OrderUpdate::default())
                    .await?
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
        for effect in &step.effects {
            match effect {
                Effect::ReleaseShopper => self.paid(o).await,
                Effect::CheckDeductionLater => {
                    let sub = self.sub_mchid(&o.merchant_id).await;
                    self.schedule_deduction_check(o.clone(), sub);
                }
                Effect::SendUnlock
                | Effect::CancelProviderOrder { .. }
                | Effect::CompleteWithProvider { .. } => {}
            }
        }
        Ok(())
    }

    /// Hands a priced, stored order to the provider: complete (retried while retryable), then
    /// check the deduction. Safe to repeat: the provider holds one order per session and
    /// completing it again is refused, not charged twice.
    pub(super) async fn finish_completion(
        &self,
        s: &SessionRow,
        o: &OrderRow,
        priced: &PricedOrder,
    ) -> Result<(), StoreError> {
        let order_id = o.id.as_str();
        if s.channel == Channel::Alipay.as_str() {
            let hold = self.open_settlement(o, priced.total_fen).await;
            return self.alipay_pay(s, order_id, priced.total_fen, hold).await;
        }
        let Some(w) = self.providers.wechat.clone() else {
            return Ok(());
        };
        let sub = self.sub_mchid(&s.merchant_id).await;
        let (pay, disc) = provider_lines(priced);
        let sharing = self.open_settlement(o, priced.total_fen).await;
        let mut wait = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        for attempt in 1..=COMPLETE_ATTEMPTS {
            let r = w
                .complete_order(&sub, &s.id, &pay, &disc, priced.total_fen, sharing)
                .await;
            match self.counted("wechat", "complete", r) {
                Ok(()) => break,
                Err(e) if e.retryable() && attempt < COMPLETE_ATTEMPTS => {
                    tracing::warn!(session_id = %s.id, error = %e, attempt, "complete failed; retrying");
                    tokio::time::sleep(wait.next_delay()).await;
                }
                Err(WechatError::Api { code, .. })
                    if code == "INVALID_REQUEST" && already_completed(&w, &sub, &s.id).await =>
                {
                    // Completed before a crash: carry on with the deduction check.
                    break;
                }
                Err(e) => {
                    tracing::error!(session_id = %s.id, error = %e, "complete failed");
                    return self
                        .payment_outcome(order_id, Event::CompleteFailed, None)
                        .await;
                }
            }
        }
        // The order as its move to completing left it: the provider's word moves nothing here,
        // and what follows (the deduction check) reads it again if it is still owed then.
        let completing = OrderRow {
            status: OrderStatus::Completing.as_str().to_owned(),
            ..o.clone()
        };
        self.apply_payment(&completing, Event::Completed, None)
            .await
    }

    /// A deduction that fails sends no notification: check later, and mark the order pending
    /// payment (待支付) when it is still owed. An order the notification already settled is not
    /// asked about: at 100 sessions a second that is 100 provider calls a second saved.
    fn schedule_deduction_check(&self, o: OrderRow, sub: String) {
        let Some(w) = self.providers.wechat.clone() else {
            return;
        };
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let wait = Duration::from_millis(self.settings.payments.deduction_check_ms);
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(o.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let unsettled = me
                .unsettled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&o.id);
            if !unsettled {
                return;
            }
            // A store error is no proof of payment: ask the provider then.
            if let Ok(Some(now)) = me.store.order(&o.id).await {
                if now.status != OrderStatus::Completing.as_str() {
                    return;
                }
            }
            let Ok(q) = me.counted("wechat", "query", w.query_order(&sub, &o.session_id).await)
            else {
                return;
            };
            let Some(c) = q.collection else { return };
            let r = match c.state.as_str() {
                "USER_PAID" => {
                    let txn = c.details.first().map(|d| d.transaction_id.clone());
                    me.payment_outcome(&o.id, Event::Paid, Some((c.paid_amount, txn.as_deref())))
                        .await
                }
                "USER_PAYING" => {
                    me.payment_outcome(&o.id, Event::DeductionFailed, None)
                        .await
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::error!(order_id = %o.id, error = %e, "deduction check not recorded");
            }
        });
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
            let still_owed = if o.channel == Channel::Alipay.as_str() {
                self.alipay_collect(&o).await
            } else {
                self.wechat_collect(&o).await
            };
            if still_owed {
                let attempts = o.collect_attempts + 1;
                let next = self.now()
                    + backoff::scheduled(
                        self.settings.payments.collect_interval_ms as i64,
                        attempts,
                    );
                if let Err(e) = self.store.schedule_collection(&o.id, attempts, next).await {
                    tracing::error!(order_id = %o.id, error = %e, "collection not rescheduled");
                }
            }
        }
    }

    /// One WeChat collection; answers whether the order is still owed.
    async fn wechat_collect(&self, o: &OrderRow) -> bool {
        let Some(w) = self.providers.wechat.clone() else {
            return false;
        };
        let sub = self.sub_mchid(&o.merchant_id).await;
        // The outcome is read back below: a collect that failed may still have been taken.
        let _ = self.counted("wechat", "collect", w.collect(&sub, &o.session_id).await);
        if let Ok(q) = w.query_order(&sub, &o.session_id).await {
            if let Some(c) = q.collection.filter(|c| c.state == "USER_PAID") {
                let txn = c.details.first().map(|d| d.transaction_id.clone());
                if let Err(e) = self
                    .payment_outcome(&o.id, Event::Paid, Some((c.paid_amount, txn.as_deref())))
                    .await
                {
                    tracing::error!(order_id = %o.id, error = %e, "collected payment not recorded");
                }
                return false;
            }
        }
        true
    }

    /// Picks up what a crash interrupted. Sessions still waiting for the shopper's confirmation
    /// wait on for what is left of their confirmation time: the shopper holds a confirmation
    /// that is still good (the provider is asked at once, in case they confirmed meanwhile).
    /// Sessions that were unlocking may have opened the door: they are treated as open, so the
    /// cabinet's recognition still charges them. Orders that were being completed are
    /// completed again. With several nodes, only what no other live node is running.
    pub async fn resume(&self, cluster: &crate::cluster::Cluster) {
        for state in [SessionState::Confirming, SessionState::Unlocking] {
            let Ok(sessions) = self.store.sessions_in_state(state.as_str()).await else {
                continue;
            };
            for s in sessions {
                // Several nodes: another live node is running it.
                if cluster.serves_elsewhere(&s.cabinet_id).await {
                    continue;
                }
                if state == SessionState::Confirming {
                    self.wait_on(s).await;
                    continue;
                }
                let Ok(Some(o)) = self.store.order_of_session(&s.id).await else {
                    continue;
                };
                if let Err(e) = self
                    .apply(&s, &o, &Event::HubRestarted, Default::default())
                    .await
                {
                    tracing::error!(session_id = %s.id, error = %e, "could not resume the session");
                }
                tracing::warn!(session_id = %s.id, "session was unlocking at a crash; awaiting the cabinet's recognition");
            }
        }
        let completing = self.completing().await.unwrap_or_default();
        for o in completing {
            if cluster.serves_elsewhere(&o.cabinet_id).await {
                continue;
            }
            tracing::info!(order_id = %o.id, "completing an order interrupted by a restart");
            self.complete_again(&o).await;
        }
    }

    /// Orders left `completing` for `payments.completion_stalled_ms` since their last change:
    /// the node completing them died, and the deduction check it had scheduled with it (a
    /// restart of that node would resume them, but it may not come back). The leader completes
    /// them again, as a restart does: the provider refuses a second complete, and the deduction
    /// is then checked. Orders whose check this node has scheduled are its own, in hand.
    pub async fn complete_stalled(&self) {
        let before = self.now() - self.settings.payments.completion_stalled_ms as i64;
        let completing = match self.completing().await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "stalled completions not read");
                return;
            }
        };
        for o in completing {
            let in_hand = self
                .unsettled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&o.id);
            if o.updated_at > before || in_hand {
                continue;
            }
            tracing::warn!(order_id = %o.id, cabinet_id = %o.cabinet_id, "order left completing by a node that stopped; completing it again");
            self.complete_again(&o).await;
        }
    }

    /// Orders being completed (at most 1,000 a pass).
    async fn completing(&self) -> Result<Vec<OrderRow>, StoreError> {
        self.store
            .orders(&OrderFilter {
                status: Some(OrderStatus::Completing.as_str()),
                limit: 1000,
                ..OrderFilter::default()
            })
            .await
    }

    async fn complete_again(&self, o: &OrderRow) {
        let (Ok(Some(s)), Some(priced)) = (
            self.store.session(&o.session_id).await,
            o.priced
                .as_deref()
                .and_then(|p| serde_json::from_str::<PricedOrder>(p).ok()),
        ) else {
            return;
        };
        if let Err(e) = self.finish_completion(&s, o, &priced).await {
            tracing::error!(order_id = %o.id, error = %e, "could not complete the order again");
        }
    }
}

impl Sessions {
    /// Waits again for the shopper of a session a restart left confirming, until its
    /// confirmation time (from its creation) is over; a session whose time is already over is
    /// asked about once and then ends.
    async fn wait_on(&self, s: SessionRow) {
        let (Some(me), Ok(Some(o))) = (self.me.upgrade(), self.store.order_of_session(&s.id).await)
        else {
            tracing::error!(session_id = %s.id, "a confirming session without its order");
            return;
        };
        let left = (s.created_at + self.settings.payments.confirm_timeout_ms as i64 - self.now())
            .max(0) as u64;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(left);
        let rx = self.await_confirmation_of(&s.id);
        tracing::warn!(session_id = %s.id, left_ms = left, "session was confirming at a restart; waiting on for the shopper");
        tokio::spawn(async move { me.proceed(s, o, rx, deadline).await });
    }
}

async fn already_completed(w: &WechatClient, sub: &str, id: &str) -> bool {
    match w.query_order(sub, id).await {
        Ok(o) => o.state == "DONE" || o.state_description.as_deref() == Some("MCH_COMPLETE"),
        Err(_) => false,
    }
}

/// A priced order as WeChat's `post_payments` (one line per product, smart-retail style) and
/// `post_discounts` (one per promotion or adjustment): what complete and modify both send.
pub(super) fn provider_lines(p: &PricedOrder) -> (Vec<PostPayment>, Vec<PostDiscount>) {
    let pay = p
        .lines
        .iter()
        .map(|l| PostPayment {
            name: "商品信息".into(),
            amount: l.amount_fen,
            description: l.name.clone(),
            count: l.qty,
        })
        .collect();
    let disc = p
        .discounts
        .iter()
        .map(|d| PostDiscount {
            name: d.name.clone(),
            description: d.name.clone(),
            amount: d.amount_fen,
        })
        .collect();
    (pay, disc)
}
