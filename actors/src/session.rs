//! The session/order lifecycle of a pay-after-use purchase as a pure state machine:
//! `Lifecycle::transition(event) -> Step`.
//!
//! No I/O, no clock, no runtime: the shell loads the session's and order's stored states into a
//! [`Lifecycle`], asks it what an [`Event`] means, stores the [`Step`]'s moves conditionally
//! (`UPDATE … WHERE state = from`, so a concurrent writer wins cleanly), then carries out its
//! [`Effect`]s in order. An event that does not apply — late, redelivered, or out of order — is a
//! [`Refusal`]: the shell logs it and changes nothing.
//!
//! A session opens the door; its order is what the shopper owes for it. A restock session has
//! an order too (channel [`Channel::None`]), closed without any payment provider.

use serde::{Deserialize, Serialize};
use strum::{Display, EnumIter, EnumString, IntoStaticStr};

use crate::protocol::SessionMode;

/// The abnormal reason the hub gives when the cabinet could not recognise the basket.
pub const RECOGNITION_FAILED: &str = "recognition_failed";
/// The abnormal reason the hub gives when an item is not on the cabinet's sellable list.
pub const UNKNOWN_PRODUCT: &str = "unknown_product";
/// The abnormal reason the hub gives when the basket or a price is outside the `[limits]`.
pub const OUT_OF_RANGE: &str = "out_of_range";
/// The abnormal reason the hub gives when the provider refused the completion for good.
pub const PAYMENT_COMPLETE_FAILED: &str = "payment_complete_failed";
/// The cancel reason the provider is given when the shopper took nothing ("nothing taken").
pub const NOTHING_TAKEN: &str = "未取商品";
/// The abnormal reason when the door stayed open (no recognition) past
/// `session.open_timeout_ms`, or the supervisor closed a session whose door may have opened.
pub const SESSION_TIMEOUT: &str = "session_timeout";
/// The abnormal reason when an operator closed a session whose door may have opened.
pub const CLOSED_BY_OPERATOR: &str = "closed_by_operator";

/// Where a session stands. Stored as text; strum gives the stable names.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    EnumString,
    IntoStaticStr,
    Display,
    EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SessionState {
    /// A purchase waits for the shopper to confirm pay-after-use.
    Confirming,
    /// `unlock` sent, no ack yet.
    Unlocking,
    /// The door may open; waiting for the recognition.
    Open,
    /// The door phase is over (recognised, or handed to a person).
    Closed,
    /// The door never opened for the shopper; see the session's failure.
    Failed,
}

/// Where an order stands. Stored as text; strum gives the stable names.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    EnumString,
    IntoStaticStr,
    Display,
    EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum OrderStatus {
    /// The session is under way; nothing is owed yet.
    Open,
    /// Priced and sent to the provider for completion; the deduction follows.
    Completing,
    /// The deduction failed: the shopper owes the amount (待支付).
    PendingPayment,
    /// Paid. Final.
    Paid,
    /// Nothing owed (nothing taken, or a restock). Final.
    Closed,
    /// A person must look; see the order's abnormal reason.
    Abnormal,
    /// The session failed before the door opened. Final.
    Cancelled,
}

/// How the shopper pays. Stored as text; strum gives the stable names.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    EnumString,
    IntoStaticStr,
    Display,
    EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Channel {
    /// WeChat Pay Score (微信支付分).
    Wechat,
    /// Alipay (芝麻先享).
    Alipay,
    /// No payment provider: the restock channel.
    None,
}

/// Why a session failed; its stable code (snake_case) is stored in `sessions.failure` and given
/// as the order's cancel reason.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    EnumString,
    IntoStaticStr,
    Display,
    EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum FailReason {
    /// The shopper did not confirm in time or declined, or the provider refused.
    PaymentDeclined,
    /// The cabinet was offline: the unlock was never sent.
    CabinetOffline,
    /// The cabinet did not ack the unlock in time.
    UnlockTimeout,
    /// The cabinet refused the unlock.
    UnlockRejected,
    /// The hub restarted while the shopper was confirming.
    HubRestarted,
    /// The cabinet acked the unlock but the door did not open within
    /// `session.door_open_timeout_ms`.
    DoorNeverOpened,
    /// An operator closed the session before its door opened.
    ClosedByOperator,
    /// The session supervisor closed a session left open past its time (one the cabinet's
    /// actor no longer holds, e.g. from before a restart) before its door opened.
    Expired,
}

impl SessionState {
    /// The stable stored name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl OrderStatus {
    /// The stable stored name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Channel {
    /// The stable stored name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl FailReason {
    /// The stable code.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Where a session and its order stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// Purchase or restock.
    pub mode: SessionMode,
    /// Who is paid; [`Channel::None`] for a restock.
    pub channel: Channel,
    /// The session's state.
    pub session: SessionState,
    /// The order's status.
    pub order: OrderStatus,
}

/// What the recognition (or an operator resolving an abnormal order) made of the basket, after
/// the shell priced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basket {
    /// The shopper took nothing.
    NothingTaken,
    /// Items were taken; the total may be zero (free items are still a sale).
    Priced {
        /// What the shopper owes, in fen (never negative).
        total_fen: i64,
    },
    /// An item is not on the cabinet's sellable list: it cannot be priced.
    UnknownProduct,
    /// The basket (quantities, lines) or a list price is outside the limits: it cannot be
    /// priced.
    OutOfRange,
    /// A restock's recognition (the shell sends this for every restock).
    Restocked,
}

/// Something that happened to a session or its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The shopper confirmed pay-after-use.
    Confirmed,
    /// Not confirmed in time, declined, or the provider refused or is not configured.
    NotConfirmed,
    /// The cabinet acked the unlock.
    UnlockAcked,
    /// The unlock was not carried out: `UnlockTimeout`, `UnlockRejected` or `CabinetOffline`.
    UnlockFailed(FailReason),
    /// Found in this state at start-up.
    HubRestarted,
    /// The recognition arrived and the shell priced it.
    Recognized(Basket),
    /// The cabinet (or a recognition failure) says a person must look; the reason is a stable
    /// snake_case code such as `door_timeout` or [`RECOGNITION_FAILED`].
    Abnormal(String),
    /// An operator resolved an abnormal order.
    Resolve(Basket),
    /// The provider accepted the completion (WeChat); the deduction follows.
    Completed,
    /// Payment confirmed (notification, query, or Alipay's deduction answer).
    Paid,
    /// The deduction failed: the shopper owes the amount (待支付).
    DeductionFailed,
    /// The provider refused the completion for good.
    CompleteFailed,
    /// The cabinet acked the unlock and the door never opened in time.
    DoorNeverOpened,
    /// An operator (`by_operator`) or the session supervisor ends a session that is still
    /// under way. `door_may_have_opened` is what the cabinet's actor knows (or, when it does
    /// not hold the session, what cannot be ruled out): if it did, the shopper may have taken
    /// something, so the order waits for a person; if not, it is cancelled.
    Close {
        /// An operator, not the supervisor.
        by_operator: bool,
        /// Whether the door may have opened.
        door_may_have_opened: bool,
    },
}

impl Event {
    /// The stable name, for refusals and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Confirmed => "confirmed",
            Event::NotConfirmed => "not_confirmed",
            Event::UnlockAcked => "unlock_acked",
            Event::UnlockFailed(_) => "unlock_failed",
            Event::HubRestarted => "hub_restarted",
            Event::Recognized(_) => "recognized",
            Event::Abnormal(_) => "abnormal",
            Event::Resolve(_) => "resolve",
            Event::Completed => "completed",
            Event::Paid => "paid",
            Event::DeductionFailed => "deduction_failed",
            Event::CompleteFailed => "complete_failed",
            Event::DoorNeverOpened => "door_never_opened",
            Event::Close { .. } => "close",
        }
    }
}

/// A state change the shell must store, conditionally (`WHERE state = from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move<S> {
    /// The state the change applies to.
    pub from: S,
    /// The new state.
    pub to: S,
}

/// What the shell must do, in order, after the moves are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Send `unlock` to the cabinet.
    SendUnlock,
    /// Cancel the provider's order: nothing is owed.
    CancelProviderOrder {
        /// For the provider: the [`FailReason`] code, or [`NOTHING_TAKEN`].
        reason: &'static str,
    },
    /// Complete the provider's order with this amount.
    CompleteWithProvider {
        /// What the shopper owes, in fen.
        total_fen: i64,
    },
    /// Query the deduction later: on WeChat a failed deduction sends no notification.
    CheckDeductionLater,
    /// Paid: a shopper with nothing unpaid comes off the automatic blacklist.
    ReleaseShopper,
}

/// What an event means: the moves to store, then the effects to carry out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Step {
    /// The session's move, if it changes.
    pub session: Option<Move<SessionState>>,
    /// The order's move, if it changes.
    pub order: Option<Move<OrderStatus>>,
    /// Set when the session fails.
    pub failure: Option<FailReason>,
    /// Set when the order becomes abnormal.
    pub abnormal_reason: Option<String>,
    /// In order, after the moves are stored.
    pub effects: Vec<Effect>,
}

impl Step {
    /// The lifecycle after the moves.
    pub fn next(&self, from: Lifecycle) -> Lifecycle {
        Lifecycle {
            session: self.session.map_or(from.session, |m| m.to),
            order: self.order.map_or(from.order, |m| m.to),
            ..from
        }
    }
}

/// Why an event changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Late, redelivered or out of order: the shell logs it and changes nothing.
    #[error("{event} does not apply to a session {session} / order {order}")]
    NotApplicable {
        /// The event's name.
        event: &'static str,
        /// The session's state.
        session: SessionState,
        /// The order's status.
        order: OrderStatus,
    },
    /// Only an abnormal order can be resolved.
    #[error("the order is {0}")]
    OrderNotAbnormal(OrderStatus),
    /// An operator cannot resolve with an unpriceable basket.
    #[error("an item is not on the cabinet's sellable list")]
    UnknownProduct,
    /// An operator cannot resolve with a basket or price outside the limits.
    #[error("the basket or a price is out of range")]
    OutOfRange,
}

impl Lifecycle {
    /// A new session: a purchase waits for the shopper's confirmation; a restock unlocks at
    /// once (the shell sends the unlock). The order is open.
    pub fn start(mode: SessionMode, channel: Channel) -> Self {
        let session = match mode {
            SessionMode::Purchase => SessionState::Confirming,
            SessionMode::Restock => SessionState::Unlocking,
        };
        Self {
            mode,
            channel,
            session,
            order: OrderStatus::Open,
        }
    }

    /// What `event` means in this state, or why it does not apply.
    pub fn transition(&self, event: &Event) -> Result<Step, Refusal> {
        use OrderStatus as O;
        use SessionState as S;

        let refuse = || Refusal::NotApplicable {
            event: event.name(),
            session: self.session,
            order: self.order,
        };

        match (event, self.session, self.order) {
            (Event::Confirmed, S::Confirming, O::Open) => Ok(Step {
                session: Some(self.session_to(S::Unlocking)),
                effects: vec![Effect::SendUnlock],
                ..Step::default()
            }),
            (Event::NotConfirmed, S::Confirming, _) => Ok(self.fail(FailReason::PaymentDeclined)),
            (Event::HubRestarted, S::Confirming, _) => Ok(self.fail(FailReason::HubRestarted)),
            // The door may have opened: the recognition still charges.
            (Event::HubRestarted, S::Unlocking, _) | (Event::UnlockAcked, S::Unlocking, _) => {
                Ok(Step {
                    session: Some(self.session_to(S::Open)),
                    ..Step::default()
                })
            }
            (Event::UnlockFailed(reason), S::Unlocking, _) => Ok(self.fail(*reason)),
            (Event::DoorNeverOpened, S::Open, O::Open) => {
                Ok(self.fail(FailReason::DoorNeverOpened))
            }
            (
                Event::Close {
                    by_operator,
                    door_may_have_opened,
                },
                S::Confirming | S::Unlocking | S::Open,
                O::Open,
            ) => {
                let opened = *door_may_have_opened && self.session != S::Confirming;
                Ok(match (opened, by_operator) {
                    (false, true) => self.fail(FailReason::ClosedByOperator),
                    (false, false) => self.fail(FailReason::Expired),
                    (true, by_operator) => Step {
                        session: Some(self.session_to(S::Closed)),
                        order: Some(self.order_to(O::Abnormal)),
                        abnormal_reason: Some(
                            if *by_operator {
                                CLOSED_BY_OPERATOR
                            } else {
                                SESSION_TIMEOUT
                            }
                            .to_owned(),
                        ),
                        ..Step::default()
                    },
                })
            }
            (Event::Recognized(basket), S::Open, O::Open) => {
                let step = self.settle(*basket).ok_or_else(refuse)?;
                Ok(Step {
                    session: Some(self.session_to(S::Closed)),
                    ..step
                })
            }
            (Event::Abnormal(reason), _, O::Open) => Ok(Step {
                session: (self.session == S::Open).then(|| self.session_to(S::Closed)),
                order: Some(self.order_to(O::Abnormal)),
                abnormal_reason: Some(reason.clone()),
                ..Step::default()
            }),
            (Event::Resolve(basket), _, order) => {
                if order != O::Abnormal {
                    return Err(Refusal::OrderNotAbnormal(order));
                }
                if self.mode == SessionMode::Purchase {
                    match basket {
                        Basket::UnknownProduct => return Err(Refusal::UnknownProduct),
                        Basket::OutOfRange => return Err(Refusal::OutOfRange),
                        Basket::NothingTaken | Basket::Priced { .. } | Basket::Restocked => {}
                    }
                }
                self.settle(*basket).ok_or_else(refuse)
            }
            (Event::Completed, _, O::Completing) => Ok(Step {
                effects: match self.channel {
                    Channel::Wechat => vec![Effect::CheckDeductionLater],
                    Channel::Alipay | Channel::None => vec![],
                },
                ..Step::default()
            }),
            (Event::Paid, _, O::Completing | O::PendingPayment) => Ok(Step {
                order: Some(self.order_to(O::Paid)),
                effects: vec![Effect::ReleaseShopper],
                ..Step::default()
            }),
            (Event::DeductionFailed, _, O::Completing) => Ok(Step {
                order: Some(self.order_to(O::PendingPayment)),
                ..Step::default()
            }),
            (Event::CompleteFailed, _, O::Completing) => Ok(Step {
                order: Some(self.order_to(O::Abnormal)),
                abnormal_reason: Some(PAYMENT_COMPLETE_FAILED.to_owned()),
                ..Step::default()
            }),
            _ => Err(refuse()),
        }
    }

    /// The session fails before the door opened: an open order is cancelled, with the provider
    /// too when there is one.
    fn fail(&self, reason: FailReason) -> Step {
        let cancel = self.order == OrderStatus::Open;
        Step {
            session: Some(self.session_to(SessionState::Failed)),
            order: cancel.then(|| self.order_to(OrderStatus::Cancelled)),
            failure: Some(reason),
            effects: if cancel {
                self.cancel_with_provider(reason.as_str())
            } else {
                vec![]
            },
            ..Step::default()
        }
    }

    /// The order's move and effects for a basket (from the recognition or an operator), or
    /// `None` when the basket does not fit the mode. The session is not moved here.
    fn settle(&self, basket: Basket) -> Option<Step> {
        let (to, effects, abnormal_reason) = match (self.mode, basket) {
            // A restock owes nothing, whatever the cabinet saw.
            (SessionMode::Restock, _) => (OrderStatus::Closed, vec![], None),
            (SessionMode::Purchase, Basket::NothingTaken) => (
                OrderStatus::Closed,
                self.cancel_with_provider(NOTHING_TAKEN),
                None,
            ),
            (SessionMode::Purchase, Basket::Priced { total_fen }) => (
                OrderStatus::Completing,
                vec![Effect::CompleteWithProvider { total_fen }],
                None,
            ),
            (SessionMode::Purchase, Basket::UnknownProduct) => (
                OrderStatus::Abnormal,
                vec![],
                Some(UNKNOWN_PRODUCT.to_owned()),
            ),
            (SessionMode::Purchase, Basket::OutOfRange) => {
                (OrderStatus::Abnormal, vec![], Some(OUT_OF_RANGE.to_owned()))
            }
            (SessionMode::Purchase, Basket::Restocked) => return None,
        };
        Some(Step {
            order: Some(self.order_to(to)),
            abnormal_reason,
            effects,
            ..Step::default()
        })
    }

    fn cancel_with_provider(&self, reason: &'static str) -> Vec<Effect> {
        match self.channel {
            Channel::None => vec![],
            Channel::Wechat | Channel::Alipay => vec![Effect::CancelProviderOrder { reason }],
        }
    }

    fn session_to(&self, to: SessionState) -> Move<SessionState> {
        Move {
            from: self.session,
            to,
        }
    }

    fn order_to(&self, to: OrderStatus) -> Move<OrderStatus> {
        Move {
            from: self.order,
            to,
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
