//! One test per row of the session/order transition table and per refusal, an exhaustive walk
//! over every state, mode, channel and event checking the invariants, and the stored names.

use strum::IntoEnumIterator;

use super::*;
use OrderStatus as O;
use SessionState as S;

const MODES: [SessionMode; 2] = [SessionMode::Purchase, SessionMode::Restock];

fn purchase(channel: Channel, session: SessionState, order: OrderStatus) -> Lifecycle {
    Lifecycle {
        mode: SessionMode::Purchase,
        channel,
        session,
        order,
    }
}

fn restock(session: SessionState, order: OrderStatus) -> Lifecycle {
    Lifecycle {
        mode: SessionMode::Restock,
        channel: Channel::None,
        session,
        order,
    }
}

fn step(l: Lifecycle, event: Event) -> Step {
    l.transition(&event)
        .unwrap_or_else(|e| panic!("{event:?} on {l:?}: {e}"))
}

fn refusal(l: Lifecycle, event: Event) -> Refusal {
    match l.transition(&event) {
        Ok(s) => panic!("{event:?} on {l:?} applied: {s:?}"),
        Err(e) => e,
    }
}

fn not_applicable(l: Lifecycle, event: Event) {
    let name = event.name();
    assert_eq!(
        refusal(l, event),
        Refusal::NotApplicable {
            event: name,
            session: l.session,
            order: l.order,
        }
    );
}

fn smove(from: SessionState, to: SessionState) -> Option<Move<SessionState>> {
    Some(Move { from, to })
}

fn omove(from: OrderStatus, to: OrderStatus) -> Option<Move<OrderStatus>> {
    Some(Move { from, to })
}

fn cancel(reason: &'static str) -> Effect {
    Effect::CancelProviderOrder { reason }
}

// ---- start ----

#[test]
fn a_purchase_starts_confirming_with_an_open_order() {
    assert_eq!(
        Lifecycle::start(SessionMode::Purchase, Channel::Wechat),
        purchase(Channel::Wechat, S::Confirming, O::Open)
    );
}

#[test]
fn a_restock_starts_unlocking_at_once() {
    assert_eq!(
        Lifecycle::start(SessionMode::Restock, Channel::None),
        restock(S::Unlocking, O::Open)
    );
}

// ---- 1. Confirmed ----

#[test]
fn confirmed_sends_the_unlock() {
    let l = purchase(Channel::Wechat, S::Confirming, O::Open);
    let s = step(l, Event::Confirmed);
    assert_eq!(
        s,
        Step {
            session: smove(S::Confirming, S::Unlocking),
            effects: vec![Effect::SendUnlock],
            ..Step::default()
        }
    );
    assert_eq!(s.next(l), purchase(Channel::Wechat, S::Unlocking, O::Open));
}

// ---- 2. NotConfirmed ----

#[test]
fn not_confirmed_fails_the_session_and_cancels_the_order() {
    let l = purchase(Channel::Alipay, S::Confirming, O::Open);
    assert_eq!(
        step(l, Event::NotConfirmed),
        Step {
            session: smove(S::Confirming, S::Failed),
            order: omove(O::Open, O::Cancelled),
            failure: Some(FailReason::PaymentDeclined),
            effects: vec![cancel("payment_declined")],
            ..Step::default()
        }
    );
}

// ---- 3. UnlockAcked ----

#[test]
fn unlock_acked_opens_the_session() {
    let l = purchase(Channel::Wechat, S::Unlocking, O::Open);
    assert_eq!(
        step(l, Event::UnlockAcked),
        Step {
            session: smove(S::Unlocking, S::Open),
            ..Step::default()
        }
    );
}

// ---- 4. UnlockFailed ----

#[test]
fn unlock_failed_fails_the_session_and_cancels_with_the_provider() {
    let l = purchase(Channel::Wechat, S::Unlocking, O::Open);
    assert_eq!(
        step(l, Event::UnlockFailed(FailReason::UnlockTimeout)),
        Step {
            session: smove(S::Unlocking, S::Failed),
            order: omove(O::Open, O::Cancelled),
            failure: Some(FailReason::UnlockTimeout),
            effects: vec![cancel("unlock_timeout")],
            ..Step::default()
        }
    );
}

#[test]
fn unlock_failed_on_a_restock_cancels_nothing_with_a_provider() {
    let l = restock(S::Unlocking, O::Open);
    assert_eq!(
        step(l, Event::UnlockFailed(FailReason::CabinetOffline)),
        Step {
            session: smove(S::Unlocking, S::Failed),
            order: omove(O::Open, O::Cancelled),
            failure: Some(FailReason::CabinetOffline),
            ..Step::default()
        }
    );
}

#[test]
fn unlock_failed_leaves_an_order_that_is_no_longer_open() {
    // The cabinet said abnormal first: a person looks at the order, the provider keeps it.
    let l = purchase(Channel::Wechat, S::Unlocking, O::Abnormal);
    assert_eq!(
        step(l, Event::UnlockFailed(FailReason::UnlockRejected)),
        Step {
            session: smove(S::Unlocking, S::Failed),
            failure: Some(FailReason::UnlockRejected),
            ..Step::default()
        }
    );
}

// ---- 5. HubRestarted ----

#[test]
fn hub_restarted_while_confirming_fails_and_cancels() {
    let l = purchase(Channel::Wechat, S::Confirming, O::Open);
    assert_eq!(
        step(l, Event::HubRestarted),
        Step {
            session: smove(S::Confirming, S::Failed),
            order: omove(O::Open, O::Cancelled),
            failure: Some(FailReason::HubRestarted),
            effects: vec![cancel("hub_restarted")],
            ..Step::default()
        }
    );
}

#[test]
fn hub_restarted_while_confirming_without_a_provider_cancels_only_the_order() {
    let l = purchase(Channel::None, S::Confirming, O::Open);
    assert_eq!(
        step(l, Event::HubRestarted),
        Step {
            session: smove(S::Confirming, S::Failed),
            order: omove(O::Open, O::Cancelled),
            failure: Some(FailReason::HubRestarted),
            ..Step::default()
        }
    );
}

#[test]
fn hub_restarted_while_unlocking_opens_the_session_so_the_recognition_still_charges() {
    let l = purchase(Channel::Alipay, S::Unlocking, O::Open);
    assert_eq!(
        step(l, Event::HubRestarted),
        Step {
            session: smove(S::Unlocking, S::Open),
            ..Step::default()
        }
    );
}

// ---- 6. Recognized ----

#[test]
fn recognized_restock_closes_the_session_and_the_order() {
    let l = restock(S::Open, O::Open);
    let s = step(l, Event::Recognized(Basket::Restocked));
    assert_eq!(
        s,
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Closed),
            ..Step::default()
        }
    );
    assert_eq!(s.next(l), restock(S::Closed, O::Closed));
}

#[test]
fn recognized_nothing_taken_closes_and_cancels_with_the_provider() {
    let l = purchase(Channel::Wechat, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Recognized(Basket::NothingTaken)),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Closed),
            effects: vec![cancel(NOTHING_TAKEN)],
            ..Step::default()
        }
    );
}

#[test]
fn recognized_nothing_taken_without_a_provider_closes_only() {
    let l = purchase(Channel::None, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Recognized(Basket::NothingTaken)),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Closed),
            ..Step::default()
        }
    );
}

#[test]
fn recognized_priced_completes_with_the_provider() {
    let l = purchase(Channel::Alipay, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Recognized(Basket::Priced { total_fen: 1250 })),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Completing),
            effects: vec![Effect::CompleteWithProvider { total_fen: 1250 }],
            ..Step::default()
        }
    );
}

#[test]
fn recognized_priced_at_zero_still_completes() {
    let l = purchase(Channel::Wechat, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Recognized(Basket::Priced { total_fen: 0 })),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Completing),
            effects: vec![Effect::CompleteWithProvider { total_fen: 0 }],
            ..Step::default()
        }
    );
}

#[test]
fn recognized_unknown_product_makes_the_order_abnormal() {
    let l = purchase(Channel::Wechat, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Recognized(Basket::UnknownProduct)),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Abnormal),
            abnormal_reason: Some(UNKNOWN_PRODUCT.to_owned()),
            ..Step::default()
        }
    );
}

// ---- 7. Abnormal ----

#[test]
fn abnormal_closes_the_session_and_hands_the_order_to_a_person() {
    let l = purchase(Channel::Wechat, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Abnormal("door_timeout".into())),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Abnormal),
            abnormal_reason: Some("door_timeout".into()),
            ..Step::default()
        }
    );
}

#[test]
fn abnormal_while_unlocking_moves_only_the_order() {
    let l = purchase(Channel::Wechat, S::Unlocking, O::Open);
    assert_eq!(
        step(l, Event::Abnormal(RECOGNITION_FAILED.into())),
        Step {
            order: omove(O::Open, O::Abnormal),
            abnormal_reason: Some(RECOGNITION_FAILED.into()),
            ..Step::default()
        }
    );
}

// ---- 8. Resolve ----

#[test]
fn resolve_nothing_taken_closes_and_cancels_with_the_provider() {
    let l = purchase(Channel::Alipay, S::Closed, O::Abnormal);
    assert_eq!(
        step(l, Event::Resolve(Basket::NothingTaken)),
        Step {
            order: omove(O::Abnormal, O::Closed),
            effects: vec![cancel(NOTHING_TAKEN)],
            ..Step::default()
        }
    );
}

#[test]
fn resolve_nothing_taken_without_a_provider_closes_only() {
    let l = purchase(Channel::None, S::Closed, O::Abnormal);
    assert_eq!(
        step(l, Event::Resolve(Basket::NothingTaken)),
        Step {
            order: omove(O::Abnormal, O::Closed),
            ..Step::default()
        }
    );
}

#[test]
fn resolve_priced_completes_with_the_provider() {
    let l = purchase(Channel::Wechat, S::Closed, O::Abnormal);
    assert_eq!(
        step(l, Event::Resolve(Basket::Priced { total_fen: 800 })),
        Step {
            order: omove(O::Abnormal, O::Completing),
            effects: vec![Effect::CompleteWithProvider { total_fen: 800 }],
            ..Step::default()
        }
    );
}

#[test]
fn resolve_a_restock_closes_the_order_whatever_the_basket() {
    for basket in [
        Basket::Restocked,
        Basket::NothingTaken,
        Basket::Priced { total_fen: 300 },
        Basket::UnknownProduct,
    ] {
        let l = restock(S::Closed, O::Abnormal);
        assert_eq!(
            step(l, Event::Resolve(basket)),
            Step {
                order: omove(O::Abnormal, O::Closed),
                ..Step::default()
            },
            "{basket:?}"
        );
    }
}

// ---- 9. Completed ----

#[test]
fn completed_on_wechat_checks_the_deduction_later() {
    let l = purchase(Channel::Wechat, S::Closed, O::Completing);
    assert_eq!(
        step(l, Event::Completed),
        Step {
            effects: vec![Effect::CheckDeductionLater],
            ..Step::default()
        }
    );
}

#[test]
fn completed_on_alipay_changes_nothing() {
    let l = purchase(Channel::Alipay, S::Closed, O::Completing);
    assert_eq!(step(l, Event::Completed), Step::default());
}

// ---- 10. Paid ----

#[test]
fn paid_while_completing_releases_the_shopper() {
    let l = purchase(Channel::Wechat, S::Closed, O::Completing);
    assert_eq!(
        step(l, Event::Paid),
        Step {
            order: omove(O::Completing, O::Paid),
            effects: vec![Effect::ReleaseShopper],
            ..Step::default()
        }
    );
}

#[test]
fn paid_while_pending_payment_releases_the_shopper() {
    let l = purchase(Channel::Alipay, S::Closed, O::PendingPayment);
    assert_eq!(
        step(l, Event::Paid),
        Step {
            order: omove(O::PendingPayment, O::Paid),
            effects: vec![Effect::ReleaseShopper],
            ..Step::default()
        }
    );
}

// ---- 11. DeductionFailed ----

#[test]
fn deduction_failed_leaves_the_order_pending_payment() {
    let l = purchase(Channel::Wechat, S::Closed, O::Completing);
    assert_eq!(
        step(l, Event::DeductionFailed),
        Step {
            order: omove(O::Completing, O::PendingPayment),
            ..Step::default()
        }
    );
}

// ---- 12. CompleteFailed ----

#[test]
fn complete_failed_hands_the_order_to_a_person() {
    let l = purchase(Channel::Alipay, S::Closed, O::Completing);
    assert_eq!(
        step(l, Event::CompleteFailed),
        Step {
            order: omove(O::Completing, O::Abnormal),
            abnormal_reason: Some(PAYMENT_COMPLETE_FAILED.to_owned()),
            ..Step::default()
        }
    );
}

// ---- refusals ----

#[test]
fn confirmed_when_open_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Open, O::Open),
        Event::Confirmed,
    );
}

#[test]
fn not_confirmed_after_the_unlock_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Unlocking, O::Open),
        Event::NotConfirmed,
    );
}

#[test]
fn unlock_acked_twice_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Open, O::Open),
        Event::UnlockAcked,
    );
}

#[test]
fn unlock_failed_after_the_ack_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Open, O::Open),
        Event::UnlockFailed(FailReason::UnlockTimeout),
    );
}

#[test]
fn hub_restarted_when_open_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Open, O::Open),
        Event::HubRestarted,
    );
}

#[test]
fn recognized_before_the_door_opened_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Unlocking, O::Open),
        Event::Recognized(Basket::NothingTaken),
    );
}

#[test]
fn recognized_twice_is_refused_as_a_redelivery() {
    let l = purchase(Channel::Wechat, S::Open, O::Open);
    let event = Event::Recognized(Basket::Priced { total_fen: 500 });
    let after = step(l, event.clone()).next(l);
    not_applicable(after, event);
}

#[test]
fn recognized_restocked_on_a_purchase_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Open, O::Open),
        Event::Recognized(Basket::Restocked),
    );
}

#[test]
fn abnormal_on_a_completing_order_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Closed, O::Completing),
        Event::Abnormal("door_timeout".into()),
    );
}

#[test]
fn resolve_on_a_paid_order_is_refused_as_not_abnormal() {
    assert_eq!(
        refusal(
            purchase(Channel::Wechat, S::Closed, O::Paid),
            Event::Resolve(Basket::NothingTaken)
        ),
        Refusal::OrderNotAbnormal(O::Paid)
    );
}

#[test]
fn resolve_with_an_unknown_product_is_refused() {
    assert_eq!(
        refusal(
            purchase(Channel::Wechat, S::Closed, O::Abnormal),
            Event::Resolve(Basket::UnknownProduct)
        ),
        Refusal::UnknownProduct
    );
}

#[test]
fn an_out_of_range_basket_is_abnormal_and_cannot_resolve() {
    let l = purchase(Channel::Wechat, S::Open, O::Open);
    assert_eq!(
        step(l, Event::Recognized(Basket::OutOfRange)),
        Step {
            session: smove(S::Open, S::Closed),
            order: omove(O::Open, O::Abnormal),
            abnormal_reason: Some(OUT_OF_RANGE.to_owned()),
            ..Step::default()
        }
    );
    assert_eq!(
        refusal(
            purchase(Channel::Wechat, S::Closed, O::Abnormal),
            Event::Resolve(Basket::OutOfRange)
        ),
        Refusal::OutOfRange
    );
}

#[test]
fn resolve_restocked_on_a_purchase_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Closed, O::Abnormal),
        Event::Resolve(Basket::Restocked),
    );
}

#[test]
fn completed_before_completing_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Closed, O::PendingPayment),
        Event::Completed,
    );
}

#[test]
fn paid_when_open_is_refused() {
    not_applicable(purchase(Channel::Wechat, S::Open, O::Open), Event::Paid);
}

#[test]
fn paid_twice_is_refused() {
    not_applicable(purchase(Channel::Wechat, S::Closed, O::Paid), Event::Paid);
}

#[test]
fn deduction_failed_when_pending_payment_is_refused() {
    not_applicable(
        purchase(Channel::Wechat, S::Closed, O::PendingPayment),
        Event::DeductionFailed,
    );
}

#[test]
fn complete_failed_after_payment_is_refused() {
    not_applicable(
        purchase(Channel::Alipay, S::Closed, O::Paid),
        Event::CompleteFailed,
    );
}

#[test]
fn refusals_say_what_and_where() {
    let r = refusal(purchase(Channel::Wechat, S::Open, O::Open), Event::Paid);
    assert_eq!(
        r.to_string(),
        "paid does not apply to a session open / order open"
    );
    assert_eq!(
        Refusal::OrderNotAbnormal(O::PendingPayment).to_string(),
        "the order is pending_payment"
    );
}

// ---- whole journeys ----

fn walk(mut l: Lifecycle, events: Vec<Event>) -> (Lifecycle, Vec<Effect>) {
    let mut effects = vec![];
    for event in events {
        let s = step(l, event);
        effects.extend(s.effects.iter().copied());
        l = s.next(l);
    }
    (l, effects)
}

#[test]
fn a_wechat_purchase_walks_from_confirmation_to_paid() {
    let (end, effects) = walk(
        Lifecycle::start(SessionMode::Purchase, Channel::Wechat),
        vec![
            Event::Confirmed,
            Event::UnlockAcked,
            Event::Recognized(Basket::Priced { total_fen: 990 }),
            Event::Completed,
            Event::DeductionFailed,
            Event::Paid,
        ],
    );
    assert_eq!(end, purchase(Channel::Wechat, S::Closed, O::Paid));
    assert_eq!(
        effects,
        vec![
            Effect::SendUnlock,
            Effect::CompleteWithProvider { total_fen: 990 },
            Effect::CheckDeductionLater,
            Effect::ReleaseShopper,
        ]
    );
}

#[test]
fn a_restock_walks_from_unlock_to_closed_without_a_provider() {
    let (end, effects) = walk(
        Lifecycle::start(SessionMode::Restock, Channel::None),
        vec![Event::UnlockAcked, Event::Recognized(Basket::Restocked)],
    );
    assert_eq!(end, restock(S::Closed, O::Closed));
    assert_eq!(effects, vec![]);
}

// ---- ended from outside: the door never opened, an operator, the supervisor ----

#[test]
fn a_door_that_never_opened_fails_the_session_and_cancels_the_order() {
    for channel in [Channel::Wechat, Channel::Alipay] {
        let s = step(purchase(channel, S::Open, O::Open), Event::DoorNeverOpened);
        assert_eq!(s.session, smove(S::Open, S::Failed));
        assert_eq!(s.order, omove(O::Open, O::Cancelled));
        assert_eq!(s.failure, Some(FailReason::DoorNeverOpened));
        assert_eq!(s.effects, vec![cancel("door_never_opened")]);
    }
    // A restock has no provider order to cancel.
    let s = step(restock(S::Open, O::Open), Event::DoorNeverOpened);
    assert_eq!(s.order, omove(O::Open, O::Cancelled));
    assert!(s.effects.is_empty());
    // Once the recognition settled the order, a late timeout changes nothing.
    not_applicable(
        purchase(Channel::Wechat, S::Closed, O::Completing),
        Event::DoorNeverOpened,
    );
}

fn close(by_operator: bool, door_may_have_opened: bool) -> Event {
    Event::Close {
        by_operator,
        door_may_have_opened,
    }
}

#[test]
fn closing_before_the_door_can_have_opened_cancels() {
    for from in [S::Confirming, S::Unlocking, S::Open] {
        let s = step(purchase(Channel::Wechat, from, O::Open), close(true, false));
        assert_eq!(s.session, smove(from, S::Failed));
        assert_eq!(s.order, omove(O::Open, O::Cancelled));
        assert_eq!(s.failure, Some(FailReason::ClosedByOperator));
        assert_eq!(s.effects, vec![cancel("closed_by_operator")]);
        let s = step(
            purchase(Channel::Alipay, from, O::Open),
            close(false, false),
        );
        assert_eq!(s.failure, Some(FailReason::Expired));
        assert_eq!(s.effects, vec![cancel("expired")]);
    }
    // A confirming session never sent its unlock, whatever is claimed about the door.
    let s = step(
        purchase(Channel::Wechat, S::Confirming, O::Open),
        close(true, true),
    );
    assert_eq!(s.failure, Some(FailReason::ClosedByOperator));
}

#[test]
fn closing_after_the_door_may_have_opened_leaves_the_order_to_a_person() {
    for from in [S::Unlocking, S::Open] {
        let s = step(purchase(Channel::Wechat, from, O::Open), close(true, true));
        assert_eq!(s.session, smove(from, S::Closed));
        assert_eq!(s.order, omove(O::Open, O::Abnormal));
        assert_eq!(s.abnormal_reason.as_deref(), Some(CLOSED_BY_OPERATOR));
        assert!(s.effects.is_empty(), "nothing is cancelled or charged yet");
        let s = step(purchase(Channel::Wechat, from, O::Open), close(false, true));
        assert_eq!(s.abnormal_reason.as_deref(), Some(SESSION_TIMEOUT));
    }
    // A session already over is not closed again.
    for (session, order) in [
        (S::Closed, O::Completing),
        (S::Closed, O::Abnormal),
        (S::Failed, O::Cancelled),
    ] {
        not_applicable(purchase(Channel::Wechat, session, order), close(true, true));
    }
}

// ---- exhaustive invariants ----

fn events() -> Vec<Event> {
    let baskets = [
        Basket::NothingTaken,
        Basket::Priced { total_fen: 0 },
        Basket::Priced { total_fen: 1234 },
        Basket::UnknownProduct,
        Basket::OutOfRange,
        Basket::Restocked,
    ];
    let mut events = vec![
        Event::Confirmed,
        Event::NotConfirmed,
        Event::UnlockAcked,
        Event::HubRestarted,
        Event::Abnormal("door_timeout".into()),
        Event::Abnormal(RECOGNITION_FAILED.into()),
        Event::Completed,
        Event::Paid,
        Event::DeductionFailed,
        Event::CompleteFailed,
        Event::DoorNeverOpened,
    ];
    for by_operator in [false, true] {
        for door_may_have_opened in [false, true] {
            events.push(Event::Close {
                by_operator,
                door_may_have_opened,
            });
        }
    }
    events.extend(FailReason::iter().map(Event::UnlockFailed));
    events.extend(baskets.iter().map(|b| Event::Recognized(*b)));
    events.extend(baskets.iter().map(|b| Event::Resolve(*b)));
    events
}

/// How far along a session is; a move never goes to a lower rank.
fn rank(s: SessionState) -> u8 {
    match s {
        S::Confirming => 0,
        S::Unlocking => 1,
        S::Open => 2,
        S::Closed | S::Failed => 3,
    }
}

fn check_invariants(l: Lifecycle, event: &Event, s: &Step) {
    let ctx = format!("{event:?} on {l:?} -> {s:?}");
    if let Some(m) = s.session {
        assert_eq!(m.from, l.session, "{ctx}");
        assert_ne!(m.from, m.to, "{ctx}");
        assert!(
            !matches!(l.session, S::Failed | S::Closed),
            "a finished session moved: {ctx}"
        );
        assert!(rank(m.to) > rank(m.from), "a session moved back: {ctx}");
    }
    if let Some(m) = s.order {
        assert_eq!(m.from, l.order, "{ctx}");
        assert_ne!(m.from, m.to, "{ctx}");
        assert!(
            !matches!(l.order, O::Paid | O::Closed | O::Cancelled),
            "a final order moved: {ctx}"
        );
    }
    let completes = s
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::CompleteWithProvider { .. }))
        .count();
    if s.order.map(|m| m.to) == Some(O::Completing) {
        assert_eq!(completes, 1, "{ctx}");
    } else {
        assert_eq!(completes, 0, "completion without completing: {ctx}");
    }
    if l.channel == Channel::None {
        assert!(
            !s.effects
                .iter()
                .any(|e| matches!(e, Effect::CancelProviderOrder { .. })),
            "cancel without a provider: {ctx}"
        );
    }
    assert_eq!(
        s.failure.is_some(),
        s.session.map(|m| m.to) == Some(S::Failed),
        "failure iff the session fails: {ctx}"
    );
    assert_eq!(
        s.abnormal_reason.is_some(),
        s.order.map(|m| m.to) == Some(O::Abnormal),
        "abnormal reason iff the order becomes abnormal: {ctx}"
    );
}

#[test]
fn every_combination_keeps_the_invariants() {
    let events = events();
    let mut applied = 0;
    let mut combinations = 0;
    for session in SessionState::iter() {
        for order in OrderStatus::iter() {
            for mode in MODES {
                for channel in Channel::iter() {
                    let l = Lifecycle {
                        mode,
                        channel,
                        session,
                        order,
                    };
                    for event in &events {
                        combinations += 1;
                        match l.transition(event) {
                            Ok(s) => {
                                applied += 1;
                                check_invariants(l, event, &s);
                                let next = s.next(l);
                                assert_eq!((next.mode, next.channel), (mode, channel));
                            }
                            Err(Refusal::NotApplicable {
                                event: name,
                                session: rs,
                                order: ro,
                            }) => {
                                assert_eq!((name, rs, ro), (event.name(), session, order));
                            }
                            Err(Refusal::OrderNotAbnormal(o)) => {
                                assert!(matches!(event, Event::Resolve(_)));
                                assert_eq!(o, order);
                                assert_ne!(o, O::Abnormal);
                            }
                            Err(Refusal::UnknownProduct) => {
                                assert_eq!(event, &Event::Resolve(Basket::UnknownProduct));
                            }
                            Err(Refusal::OutOfRange) => {
                                assert_eq!(event, &Event::Resolve(Basket::OutOfRange));
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(combinations, 5 * 7 * 2 * 3 * events.len());
    assert!(applied > 0 && applied < combinations, "{applied}");
}

#[test]
fn event_names_are_distinct() {
    let mut names: Vec<_> = events().iter().map(Event::name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 14);
}

// ---- stored names ----

fn round_trips<T>()
where
    T: IntoEnumIterator
        + Copy
        + PartialEq
        + std::fmt::Debug
        + std::fmt::Display
        + std::str::FromStr
        + Into<&'static str>
        + serde::Serialize
        + serde::de::DeserializeOwned,
    <T as std::str::FromStr>::Err: std::fmt::Debug,
{
    for v in T::iter() {
        let name: &'static str = v.into();
        assert_eq!(v.to_string(), name);
        assert_eq!(
            name.parse::<T>()
                .unwrap_or_else(|e| panic!("{name}: {e:?}")),
            v
        );
        let json = serde_json::to_string(&v).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(json, format!("\"{name}\""));
        let back: T = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(back, v);
    }
}

#[test]
fn stored_names_round_trip() {
    round_trips::<SessionState>();
    round_trips::<OrderStatus>();
    round_trips::<Channel>();
    round_trips::<FailReason>();
}

#[test]
fn stored_names_are_snake_case() {
    assert_eq!(
        "pending_payment".parse::<OrderStatus>(),
        Ok(O::PendingPayment)
    );
    assert_eq!(O::PendingPayment.as_str(), "pending_payment");
    assert_eq!(S::Confirming.as_str(), "confirming");
    assert_eq!(Channel::None.as_str(), "none");
    assert_eq!(Channel::Wechat.as_str(), "wechat");
    assert_eq!(FailReason::HubRestarted.as_str(), "hub_restarted");
    assert!("PendingPayment".parse::<OrderStatus>().is_err());
}
