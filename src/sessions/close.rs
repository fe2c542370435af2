//! No session outlives its purpose: an operator closes one (`POST /api/v1/sessions/{id}/close`),
//! and the supervisor's sweep closes those no cabinet actor will ever end (the actor's own
//! timers end the ones it holds: door never opened, door open too long, no recognition).
//!
//! Either way the outcome follows what can be known about the door: a session whose door
//! cannot have opened fails and its provider order is cancelled; one whose door may have opened
//! leaves its order abnormal, for a person to price what was taken.

use cabinet_actors::ids::CabinetId;
use cabinet_actors::machine::SessionPhase;
use cabinet_actors::session::{Event, SessionState};

use super::Sessions;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::store::{OrderUpdate, SessionRow, StoreError};
use crate::views::SessionView;

/// Who closes a session, as recorded on it.
pub enum Closer<'a> {
    /// An operator's key id.
    Operator(&'a str),
    /// The supervisor's sweep.
    Supervisor,
}

/// How many sessions one sweep looks at; the rest wait for the next.
const SWEEP_BATCH: i64 = 200;

impl Sessions {
    /// Ends a session that is still under way (confirming, unlocking or open) and frees its
    /// cabinet. Answers the session as it ends; `session_not_open` when it is already over.
    pub async fn close(&self, id: &str, by: Closer<'_>, note: &str) -> ApiResult<SessionView> {
        let (s, o) = tokio::join!(self.store.session(id), self.store.order_of_session(id));
        let (Some(s), Some(o)) = (s?, o?) else {
            return Err(ApiError::not_found("session"));
        };
        let state = s.state.parse::<SessionState>().ok();
        if !matches!(
            state,
            Some(SessionState::Confirming | SessionState::Unlocking | SessionState::Open)
        ) {
            return Err(ApiError::new(
                ErrorCode::SessionNotOpen,
                format!("the session is {}", s.state),
            ));
        }
        let door_may_have_opened = self.end_on_cabinet(&s).await;
        let event = Event::Close {
            by_operator: matches!(by, Closer::Operator(_)),
            door_may_have_opened,
        };
        let who = match by {
            Closer::Operator(key) => key,
            Closer::Supervisor => "supervisor",
        };
        match self.apply(&s, &o, &event, OrderUpdate::default()).await? {
            Some(step) => {
                self.store.record_close(&s.id, who, note).await?;
                tracing::warn!(session_id = %s.id, cabinet_id = %s.cabinet_id, closed_by = who, note,
                    door_may_have_opened, "session closed from outside");
                self.metrics
                    .sessions_closed
                    .with_label_values(&[match by {
                        Closer::Operator(_) => "operator",
                        Closer::Supervisor => "supervisor",
                    }])
                    .inc();
                self.run_effects(&s, &step.effects).await;
                // A start still waiting for the shopper's confirmation looks again now: its
                // move finds the session over and it answers `session_closed` at once, not at
                // the confirmation timeout.
                self.confirmed(&s.id);
            }
            // Something else ended it meanwhile (the recognition, the shopper's answer): that
            // outcome stands.
            None => {
                return Err(ApiError::new(
                    ErrorCode::SessionNotOpen,
                    "the session ended meanwhile",
                ))
            }
        }
        self.view(id).await
    }

    /// Ends the session on its cabinet's actor; answers whether the door may have opened. A
    /// confirming session never sent its unlock. When the actor does not hold the session
    /// (restarted, or the cabinet is unknown to this node), an unlocking or open session's door
    /// cannot be ruled out.
    async fn end_on_cabinet(&self, s: &SessionRow) -> bool {
        if s.state == SessionState::Confirming.as_str() {
            return false;
        }
        let handle = CabinetId::parse(&s.cabinet_id)
            .ok()
            .and_then(|cid| self.registry.get(&cid));
        let phase = match handle {
            Some(h) => h.close_session(&s.id).await.ok().flatten(),
            None => None,
        };
        match phase {
            Some(SessionPhase::Unlocking | SessionPhase::Unlocked) => false,
            Some(SessionPhase::DoorOpen | SessionPhase::DoorClosed) | None => true,
        }
    }

    /// One pass of the backstop: closes sessions under way for longer than any of their
    /// timers allows (a confirming one past the confirmation timeout, an unlocking or open one
    /// past the door's and the recognition's), which only happens when no actor holds them.
    /// Answers how many it closed.
    pub async fn sweep_stale(&self) -> Result<usize, StoreError> {
        // The actor's own timers fire at exactly those durations: one sweep later, they have
        // had their turn.
        let margin = self.settings.session.sweep_interval_ms;
        let payments = &self.settings.payments;
        let session = &self.settings.session;
        let confirm_limit = self.now() - (payments.confirm_timeout_ms + margin) as i64;
        let open_limit = self.now()
            - (session.open_timeout_ms
                + session.recognition_timeout_ms
                + self.settings.cabinet.unlock_ack_timeout_ms
                + margin) as i64;
        let stale = self
            .store
            .sessions_under_way_since(confirm_limit.max(open_limit), SWEEP_BATCH)
            .await?;
        let mut closed = 0;
        for s in stale {
            let since = s.unlocked_at.unwrap_or(s.created_at);
            let limit = if s.state == SessionState::Confirming.as_str() {
                confirm_limit
            } else {
                open_limit
            };
            if since >= limit {
                continue;
            }
            match self
                .close(&s.id, Closer::Supervisor, "outlived its timeouts")
                .await
            {
                Ok(v) => {
                    closed += 1;
                    self.audit(
                        super::Actor::SUPERVISOR,
                        super::Audited {
                            action: "session.close",
                            merchant_id: Some(&s.merchant_id),
                            subject: &s.id,
                            order_id: v.order.as_ref().map(|o| o.id.as_str()),
                            reason: Some("outlived its timeouts"),
                            detail: serde_json::json!({"state_before": s.state}),
                        },
                    )
                    .await;
                }
                Err(e) if e.code == ErrorCode::SessionNotOpen => {}
                Err(e) => {
                    tracing::error!(session_id = %s.id, error = %e, "stale session not closed")
                }
            }
        }
        Ok(closed)
    }
}
