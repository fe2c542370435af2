//! The cabinets' session events: recognitions and abnormal endings, applied in order for each
//! cabinet, cabinets in lanes side by side.

use std::sync::Arc;

use tokio::sync::mpsc;

use cabinet_actors::actor::CabinetMeta;
use cabinet_actors::machine::SessionEvent;
use cabinet_actors::pricing::{price_basket, BasketItem, PricingError};
use cabinet_actors::protocol::RecognitionStatus;
use cabinet_actors::session::{Basket, Effect, Event, SessionState, RECOGNITION_FAILED};

use super::Sessions;
use crate::store::{OrderRow, OrderUpdate, SessionRow, StoreError};

/// How many lanes apply session events side by side (see [`Sessions::apply_events`]).
pub const EVENT_LANES: usize = 64;

/// The lane of a cabinet's session events: the same cabinet, always the same lane.
pub fn event_lane(cabinet_id: &str) -> usize {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same lane for the process's life, which is all it needs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cabinet_id.hash(&mut h);
    (h.finish() % EVENT_LANES as u64) as usize
}

/// A basket with its JSON forms, as the order stores them.
/// Why an order whose basket is worth more than the shopper authorised is abnormal.
pub(super) const OVER_AUTHORISED: &str = "over_authorised_amount";

/// The line that brings a resolved basket down to what the shopper authorised: the provider
/// charges at most that (WeChat: `total_amount` ≤ `risk_fund.amount`), so the rest is not
/// charged, and says so on the order and on the provider's bill.
pub(super) const OVER_AUTHORISED_LINE: &str = "超出授权金额";

/// What a basket is priced with: the sellable list and the promotions, and the moment that
/// decides which promotion windows are open (when the shopper shopped).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct PriceTerms {
    /// Unix ms.
    pub at: i64,
    /// By sku.
    pub list: std::collections::BTreeMap<String, cabinet_actors::pricing::ListPrice>,
    /// Published, not ended, applying to the cabinet.
    pub promotions: Vec<cabinet_actors::pricing::Promotion>,
}

pub(super) struct PricedBasket {
    pub basket: Basket,
    pub items: String,
    pub priced: Option<(cabinet_actors::pricing::PricedOrder, String)>,
    /// Why the basket could not be priced, when it was out of range (the operator is told).
    pub error: Option<PricingError>,
}

impl Sessions {
    /// Applies the cabinets' session events: in order for each cabinet, cabinets in
    /// [`EVENT_LANES`] lanes side by side. Applying an event may wait on a payment provider
    /// (complete, cancel, close); in one queue a provider answering in 200 ms would cap the node
    /// at five events a second and hold every other cabinet's orders behind it.
    pub async fn apply_events(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<(CabinetMeta, SessionEvent)>,
    ) {
        let mut lanes = Vec::with_capacity(EVENT_LANES);
        for _ in 0..EVENT_LANES {
            let (tx, mut lane) = mpsc::unbounded_channel::<(CabinetMeta, SessionEvent)>();
            let me = self.clone();
            tokio::spawn(async move {
                while let Some((meta, ev)) = lane.recv().await {
                    me.on_event(&meta, ev).await;
                }
            });
            lanes.push(tx);
        }
        while let Some((meta, ev)) = rx.recv().await {
            if let Some(tx) = lanes.get(event_lane(meta.id.as_str())) {
                // A lane's task ends only with the runtime.
                let _ = tx.send((meta, ev));
            }
        }
    }

    /// One cabinet's session event; a storage failure is counted and logged.
    pub async fn on_event(&self, meta: &CabinetMeta, ev: SessionEvent) {
        if let Err(e) = self.handle_event(meta, ev).await {
            tracing::error!(cabinet_id = %meta.id, error = %e, "session event not applied");
            self.metrics
                .store_errors
                .with_label_values(&["session_event"])
                .inc();
        }
    }

    async fn rows(
        &self,
        meta: &CabinetMeta,
        session_id: &str,
    ) -> Result<Option<(SessionRow, OrderRow)>, StoreError> {
        let (s, o) = tokio::join!(
            self.store.session(session_id),
            self.store.order_of_session(session_id)
        );
        let (Some(mut s), Some(mut o)) = (s?, o?) else {
            tracing::warn!(cabinet_id = %meta.id, session_id, "event for an unknown session");
            return Ok(None);
        };
        if s.cabinet_id != meta.id.as_str() {
            tracing::warn!(cabinet_id = %meta.id, session_id, "event from another cabinet ignored");
            return Ok(None);
        }
        // A cabinet as fast as its firmware reports the door and the recognition the moment
        // it acknowledged the unlock, and the actor tells them here before the start that sent
        // the unlock has recorded the door open: applied to a session still `unlocking`, the
        // recognition was refused and the shopper never charged. Wait for the start to record
        // the ack's outcome (within the unlock's own timeout, which ends the start anyway).
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(self.settings.cabinet.unlock_ack_timeout_ms + 5_000);
        while s.state == SessionState::Unlocking.as_str() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let (again_s, again_o) = tokio::join!(
                self.store.session(session_id),
                self.store.order_of_session(session_id)
            );
            if let (Some(again_s), Some(again_o)) = (again_s?, again_o?) {
                (s, o) = (again_s, again_o);
            }
        }
        Ok(Some((s, o)))
    }

    async fn handle_event(&self, meta: &CabinetMeta, ev: SessionEvent) -> Result<(), StoreError> {
        match ev {
            SessionEvent::Recognized {
                session_id,
                recognition,
                ..
            } => {
                let Some((s, o)) = self.rows(meta, &session_id).await? else {
                    return Ok(());
                };
                if recognition.status == RecognitionStatus::Failed {
                    return self.abnormal(&s, &o, RECOGNITION_FAILED).await;
                }
                if s.mode == "restock" {
                    let stock = serde_json::to_string(&recognition.stock).unwrap_or_default();
                    let event = Event::Recognized(Basket::Restocked);
                    let set = OrderUpdate {
                        items: Some(&stock),
                        recognition_fee: Some(self.recognition_fee(&s.merchant_id).await),
                        ..OrderUpdate::default()
                    };
                    // The count is in the stock before the session is seen closed (once: the
                    // recount marks the session), and only for a session that takes it.
                    if super::lifecycle(&s, &o)?.transition(&event).is_ok() {
                        let counted: Vec<(String, i64)> = recognition
                            .stock
                            .unwrap_or_default()
                            .into_iter()
                            .map(|i| (i.sku, i64::from(i.qty)))
                            .collect();
                        self.restocked(&s, &counted).await;
                    }
                    self.apply(&s, &o, &event, set).await?;
                    return Ok(());
                }
                let basket: Vec<BasketItem> = recognition
                    .items
                    .unwrap_or_default()
                    .into_iter()
                    .map(|i| BasketItem {
                        sku: i.sku,
                        qty: i.qty,
                    })
                    .collect();
                let priced = self.price(&s, &basket).await?;
                // Above what the shopper authorised the provider refuses the completion, every
                // time: a person looks first (and the resolve charges at most that).
                if let Basket::Priced { total_fen } = priced.basket {
                    let authorised = self.authorised(&o).await;
                    if total_fen > authorised {
                        tracing::warn!(order_id = %o.id, total_fen, authorised,
                            "basket above the authorised amount: a person decides");
                        let set = OrderUpdate {
                            items: Some(&priced.items),
                            recognition_fee: Some(self.recognition_fee(&s.merchant_id).await),
                            ..OrderUpdate::default()
                        };
                        let event = Event::Abnormal(OVER_AUTHORISED.to_owned());
                        self.apply(&s, &o, &event, set).await?;
                        return Ok(());
                    }
                }
                self.settle(&s, &o, Event::Recognized(priced.basket), &priced)
                    .await
            }
            SessionEvent::DoorNeverOpened { session_id, .. } => {
                let Some((s, o)) = self.rows(meta, &session_id).await? else {
                    return Ok(());
                };
                if let Some(step) = self
                    .apply(&s, &o, &Event::DoorNeverOpened, OrderUpdate::default())
                    .await?
                {
                    tracing::info!(session_id = %s.id, "the door never opened: session over, provider order cancelled");
                    self.run_effects(&s, &step.effects).await;
                }
                Ok(())
            }
            SessionEvent::Abnormal {
                session_id, reason, ..
            } => {
                let Some((s, o)) = self.rows(meta, &session_id).await? else {
                    return Ok(());
                };
                let reason = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "abnormal".into());
                self.abnormal(&s, &o, &reason).await
            }
        }
    }

    async fn abnormal(&self, s: &SessionRow, o: &OrderRow, reason: &str) -> Result<(), StoreError> {
        if self
            .apply(
                s,
                o,
                &Event::Abnormal(reason.to_owned()),
                OrderUpdate::default(),
            )
            .await?
            .is_some()
        {
            tracing::warn!(order_id = %o.id, session_id = %s.id, reason, "order is abnormal: an operator resolves it");
        }
        Ok(())
    }

    /// The prices and promotions in force for session `s` now, dated when its shopper shopped
    /// (the door could open; its creation before that).
    pub(super) async fn price_terms_now(&self, s: &SessionRow) -> Result<PriceTerms, StoreError> {
        let (list, promotions) = tokio::join!(
            self.store.prices(&s.cabinet_id, &s.merchant_id),
            self.store.promotions_for(&s.merchant_id, &s.cabinet_id)
        );
        Ok(PriceTerms {
            at: s.unlocked_at.unwrap_or(s.created_at),
            list: list?,
            promotions: promotions?,
        })
    }

    /// Prices a basket with the prices and promotions in force when the shopper shopped.
    pub(super) async fn price(
        &self,
        s: &SessionRow,
        basket: &[BasketItem],
    ) -> Result<PricedBasket, StoreError> {
        self.price_with(s, basket, None).await
    }

    /// [`Sessions::price`] with `terms` captured earlier (an order that went abnormal), or the
    /// ones in force now when `None`.
    pub(super) async fn price_with(
        &self,
        s: &SessionRow,
        basket: &[BasketItem],
        terms: Option<PriceTerms>,
    ) -> Result<PricedBasket, StoreError> {
        let items = serde_json::to_string(basket).unwrap_or_default();
        let limits = self.settings.limits.limits();
        // The shape first: a basket of a million empty lines is not "nothing taken".
        if let Err(e) = limits.check_basket(basket) {
            return Ok(self.out_of_range(s, items, e));
        }
        if basket.iter().all(|i| i.qty == 0) {
            return Ok(PricedBasket {
                basket: Basket::NothingTaken,
                items,
                priced: None,
                error: None,
            });
        }
        let terms = match terms {
            Some(t) => t,
            None => self.price_terms_now(s).await?,
        };
        match price_basket(
            basket,
            &terms.list,
            &terms.promotions,
            terms.at,
            self.settings.pricing.utc_offset_min,
            &limits,
        ) {
            Ok(p) => {
                let json = serde_json::to_string(&p).unwrap_or_default();
                Ok(PricedBasket {
                    basket: Basket::Priced {
                        total_fen: p.total_fen,
                    },
                    items,
                    priced: Some((p, json)),
                    error: None,
                })
            }
            Err(PricingError::UnknownSku(sku)) => {
                tracing::warn!(session_id = %s.id, sku, "recognised product not on the sellable list");
                Ok(PricedBasket {
                    basket: Basket::UnknownProduct,
                    items,
                    priced: None,
                    error: None,
                })
            }
            Err(
                e @ (PricingError::BasketOutOfRange { .. } | PricingError::PriceOutOfRange { .. }),
            ) => Ok(self.out_of_range(s, items, e)),
        }
    }

    /// The most the shopper authorised for order `o`: the provider order's ceiling as created
    /// (orders from before it was kept: the merchant's ceiling now).
    pub(super) async fn authorised(&self, o: &OrderRow) -> i64 {
        match o.authorised_fen {
            Some(a) => a,
            None => self.order_terms(&o.merchant_id).await.ceiling_fen,
        }
    }

    /// Brings a priced basket down to `authorised` with a line saying so; answers whether it
    /// had to.
    pub(super) fn cap_to(priced: &mut PricedBasket, authorised: i64) -> bool {
        let Some((p, json)) = &mut priced.priced else {
            return false;
        };
        if p.total_fen <= authorised {
            return false;
        }
        p.discounts.push(cabinet_actors::pricing::DiscountLine {
            promotion_id: OVER_AUTHORISED.to_owned(),
            name: OVER_AUTHORISED_LINE.to_owned(),
            amount_fen: p.total_fen - authorised,
        });
        p.total_fen = authorised;
        *json = serde_json::to_string(p).unwrap_or_default();
        priced.basket = Basket::Priced {
            total_fen: authorised,
        };
        true
    }

    fn out_of_range(&self, s: &SessionRow, items: String, e: PricingError) -> PricedBasket {
        tracing::warn!(session_id = %s.id, cabinet_id = %s.cabinet_id, error = %e, "basket cannot be priced: out of range");
        PricedBasket {
            basket: Basket::OutOfRange,
            items,
            priced: None,
            error: Some(e),
        }
    }

    /// A priced basket closes the order at zero (nothing taken: the provider order is
    /// cancelled), hands it to the provider (stored as `completing` first: after a crash it is
    /// completed again, and the provider's state, not a second charge, decides what that
    /// means), or leaves it abnormal.
    pub(super) async fn settle(
        &self,
        s: &SessionRow,
        o: &OrderRow,
        event: Event,
        priced: &PricedBasket,
    ) -> Result<(), StoreError> {
        // The cabinet's own recognition is counted (算法识别次数); an operator's resolution is not.
        let recognition_fee = match event {
            Event::Recognized(_) => Some(self.recognition_fee(&s.merchant_id).await),
            _ => None,
        };
        let set = match (&priced.basket, &priced.priced) {
            (Basket::Priced { total_fen }, Some((_, json))) => OrderUpdate {
                items: Some(&priced.items),
                priced: Some(json),
                total_fen: Some(*total_fen),
                recognition_fee,
                ..OrderUpdate::default()
            },
            (Basket::NothingTaken, _) => OrderUpdate {
                items: Some(&priced.items),
                recognition_fee,
                ..OrderUpdate::default()
            },
            _ => OrderUpdate {
                recognition_fee,
                ..OrderUpdate::default()
            },
        };
        let Some(step) = self.apply(s, o, &event, set).await? else {
            return Ok(());
        };
        // What was taken left the cabinet whoever said what it was (the cameras, or a person
        // resolving the order).
        if matches!(priced.basket, Basket::Priced { .. }) {
            self.took(s, &o.id, &priced.items).await;
        }
        for effect in &step.effects {
            match effect {
                // The session ended above, before the provider is told: the next shopper at
                // this cabinet must not meet `cabinet_busy` while a cancel call is in flight.
                Effect::CancelProviderOrder { reason } => {
                    self.cancel_provider_order(s, reason).await
                }
                Effect::CompleteWithProvider { .. } => {
                    if let Some((p, _)) = &priced.priced {
                        self.finish_completion(s, o, p).await?;
                    }
                }
                Effect::SendUnlock | Effect::CheckDeductionLater | Effect::ReleaseShopper => {}
            }
        }
        Ok(())
    }
}
