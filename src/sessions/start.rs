//! Starting a session: the checks, the stored session and order, the provider's pay-after-use
//! order, the shopper's confirmation (notification or query), the unlock, and the answer once
//! the cabinet acked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use cabinet_actors::ids::CabinetId;
use cabinet_actors::machine::{CommandOutcome, Refusal};
use cabinet_actors::protocol::{CommandBody, SessionMode};
use cabinet_actors::session::{Channel, Effect, Event, FailReason, Lifecycle};
use cabinet_actors::CommandError;

use super::provider::PaymentTerms;
use super::Sessions;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::payments::wechat::{CreateOrder, RiskFund, TimeRange};
use crate::payments::Confirmation;
use crate::secrets::{sha256_hex, token};
use crate::store::{KeyedSession, OrderRow, OrderUpdate, SessionRow, StoreError};
use crate::views::{ConfirmingView, OrderView, SessionView};

/// Where the time of one session start went, stage by stage: answered as `Server-Timing` and
/// observed in `session_start_stage_seconds`, so the provider's share (its round trip and the
/// shopper's confirmation) is told apart from the hub's own.
#[derive(Debug, Clone)]
pub struct StartTimings {
    stages: Vec<(&'static str, Duration)>,
    mark: Instant,
}

impl Default for StartTimings {
    fn default() -> Self {
        Self {
            stages: Vec::with_capacity(6),
            mark: Instant::now(),
        }
    }
}

impl StartTimings {
    /// Closes the stage that ran since the previous one ended.
    fn lap(&mut self, stage: &'static str) {
        let now = Instant::now();
        self.stages.push((stage, now - self.mark));
        self.mark = now;
    }

    /// The stages in order.
    pub fn stages(&self) -> &[(&'static str, Duration)] {
        &self.stages
    }

    /// The `Server-Timing` header value (W3C), durations in milliseconds.
    pub fn server_timing(&self) -> String {
        self.stages
            .iter()
            .map(|(name, d)| format!("{name};dur={:.3}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What `POST /api/v1/sessions` takes.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    /// Cabinet.
    pub cabinet_id: String,
    /// Shopper (openid) or restocker, 1 to 64 characters.
    pub user_id: String,
    /// `wechat` or `alipay`; ignored for restock.
    #[serde(default)]
    pub channel: Option<String>,
    /// `purchase` or `restock`.
    #[schema(value_type = String)]
    pub mode: SessionMode,
    /// A restock's plan: what the restocker brings (or, negative, takes away) per product;
    /// the cabinet's count after the door closes is checked against the stock before plus
    /// this, and each difference kept as a stock discrepancy (库存不一致). Left out, the
    /// restock is a stock-taking (盘点): the count should find what was there.
    #[serde(default)]
    pub planned: Option<Vec<PlannedItem>>,
}

/// One product of a restock's plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlannedItem {
    /// Product.
    pub sku: String,
    /// Brought (positive) or taken away (negative).
    pub qty: i64,
}

/// A request's `Idempotency-Key` and what it is bound to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Idempotency {
    /// The caller's key.
    pub key: String,
    /// [`request_hash`] of the request that carries it.
    pub request_hash: String,
}

/// What binds an `Idempotency-Key` to one request: its method, path and (canonical JSON) body.
pub fn request_hash(method: &str, path: &str, body: &serde_json::Value) -> String {
    sha256_hex(&format!("{method} {path}\n{body}"))
}

/// An unanswered key is reclaimed even from this process once its start has run longer than
/// any start can: the shopper's confirmation and the unlock ack have their own deadlines
/// (both configurable), and this margin covers the provider calls around them.
const RECLAIM_MARGIN_MS: u64 = 60_000;

/// An answer stored under an `Idempotency-Key`: `{"status": 201 | 202, "body": …}` or the
/// refusal's status and error body (the format earlier versions stored, so their answers replay
/// too).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer<'a> {
    status: u16,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(serde::Deserialize)]
struct StoredError {
    error: StoredErrorDetail,
}

#[derive(serde::Deserialize)]
struct StoredErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

/// A start's answer: its status (201 opened, 202 waiting for the shopper) and body.
pub type StartAnswer = (u16, Box<RawValue>);

fn stored_answer(answer: &ApiResult<StartAnswer>) -> Option<String> {
    let text = match answer {
        Ok((status, v)) => serde_json::to_string(&StoredAnswer {
            status: *status,
            body: v,
        }),
        Err(e) => serde_json::to_string(&serde_json::json!({
            "status": e.status().as_u16(), "body": e.body()
        })),
    };
    text.ok()
}

fn replay(stored: &str) -> ApiResult<StartAnswer> {
    let answer: StoredAnswer<'_> = serde_json::from_str(stored).map_err(ApiError::internal)?;
    if answer.status == 201 || answer.status == 202 {
        return Ok((answer.status, answer.body.to_owned()));
    }
    let e: StoredError = serde_json::from_str(answer.body.get()).map_err(ApiError::internal)?;
    Err(ApiError::from_stored(&e.error.code, &e.error.message))
}

fn to_raw(view: &SessionView) -> ApiResult<Box<RawValue>> {
    serde_json::value::to_raw_value(view).map_err(ApiError::internal)
}

fn cabinet_not_found() -> ApiError {
    ApiError::new(ErrorCode::CabinetNotFound, "no such cabinet")
}

fn offline() -> ApiError {
    ApiError::new(ErrorCode::CabinetOffline, "the cabinet is not connected")
}

/// The refusal a failed session answers with.
fn failure_answer(reason: FailReason, detail: &str) -> ApiError {
    let code = match reason {
        FailReason::PaymentDeclined => ErrorCode::PaymentDeclined,
        FailReason::CabinetOffline => ErrorCode::CabinetOffline,
        FailReason::UnlockTimeout => ErrorCode::UnlockTimeout,
        FailReason::UnlockRejected => ErrorCode::UnlockRejected,
        FailReason::HubRestarted => ErrorCode::HubRestarted,
        // Reached only by a start whose session was ended from outside while it waited.
        FailReason::DoorNeverOpened | FailReason::ClosedByOperator | FailReason::Expired => {
            ErrorCode::SessionClosed
        }
    };
    ApiError::new(code, detail)
}

/// How a start ended.
enum Started {
    /// The door is open (restock): the session's view, and whether the answer to an idempotent
    /// request was stored with it.
    Opened(Box<RawValue>, bool),
    /// The shopper must confirm (需确认模式): the session, its order and the confirmation their
    /// front end needs. The session goes on by itself once the provider says they confirmed.
    Confirming(Box<RawValue>),
}

impl Sessions {
    /// Starts a session; answers the stored session view (as JSON text, so that a repeat under
    /// the same `Idempotency-Key` answers byte for byte the same) with 201 once the door is
    /// open, or with 202 and the shopper's confirmation while it waits for them; or a refusal.
    pub async fn start(
        self: &Arc<Self>,
        merchant_scope: Option<&str>,
        req: StartSession,
        idempotency: Option<Idempotency>,
        timings: &mut StartTimings,
    ) -> ApiResult<StartAnswer> {
        let cid = CabinetId::parse(&req.cabinet_id).map_err(|_| cabinet_not_found())?;
        let cabinet = match self.store.cabinet(cid.as_str()).await? {
            Some(c) if merchant_scope.is_none_or(|m| m == c.merchant_id) => c,
            _ => return Err(cabinet_not_found()),
        };
        if let Some(idem) = &idempotency {
            if let Some(found) = self
                .store
                .session_by_key(&cabinet.merchant_id, &idem.key)
                .await?
            {
                if let Some(first) = self.replay_or_reclaim(found, idem).await? {
                    return Ok(first);
                }
            }
        }
        let idempotency_key = idempotency.as_ref().map(|i| i.key.clone());
        let planned = match (&req.planned, req.mode) {
            (None, _) => None,
            (Some(_), SessionMode::Purchase) => {
                return Err(ApiError::bad_request("planned is for restock sessions"))
            }
            (Some(p), SessionMode::Restock) => Some(plan_json(p)?),
        };
        if req.user_id.is_empty() || req.user_id.len() > 64 {
            return Err(ApiError::bad_request("user_id must be 1 to 64 characters"));
        }
        let channel = match (req.mode, req.channel.as_deref()) {
            (SessionMode::Restock, _) => Channel::None,
            (SessionMode::Purchase, Some("wechat")) => Channel::Wechat,
            (SessionMode::Purchase, Some("alipay")) if self.providers.alipay.is_some() => {
                Channel::Alipay
            }
            (SessionMode::Purchase, Some("alipay")) => {
                return Err(ApiError::new(
                    ErrorCode::PaymentDeclined,
                    "the Alipay channel is not configured on this hub",
                ))
            }
            (SessionMode::Purchase, _) => {
                return Err(ApiError::bad_request(
                    "channel must be \"wechat\" or \"alipay\" for a purchase",
                ))
            }
        };
        if !cabinet.active {
            return Err(ApiError::new(
                ErrorCode::CabinetNotActive,
                "the cabinet is not activated",
            ));
        }
        if cabinet.service_expires_at.is_some_and(|e| e <= self.now()) {
            return Err(ApiError::new(
                ErrorCode::ServiceExpired,
                "the cabinet's service time has expired",
            ));
        }
        let Some(handle) = self.registry.get(&cid) else {
            return Err(offline());
        };
        // The cabinet's own check, the shopper's standing and the merchant's payment terms do
        // not depend on one another: asked together, they cost one wait instead of three.
        let purchase = req.mode == SessionMode::Purchase;
        let (check, standing, terms) = tokio::join!(
            handle.check_session(req.mode),
            async {
                if purchase {
                    self.check_blacklist(&cabinet.merchant_id, &req.user_id)
                        .await
                } else {
                    Ok(())
                }
            },
            async {
                if channel != Channel::None {
                    self.terms(&cabinet.merchant_id, channel).await.map(Some)
                } else {
                    Ok(None)
                }
            },
        );
        match check {
            Ok(None) => {}
            Ok(Some(Refusal::CabinetOffline)) | Err(_) => return Err(offline()),
            Ok(Some(Refusal::CabinetBusy)) => return Err(busy()),
            Ok(Some(Refusal::CabinetFaulted)) => {
                return Err(ApiError::new(
                    ErrorCode::CabinetFaulted,
                    "the cabinet is faulted or locked down",
                ))
            }
        }
        standing?;
        let terms = terms?;

        let now = self.now();
        let id = format!("s{}", token(20)?);
        let life = Lifecycle::start(req.mode, channel);
        let session = SessionRow {
            id: id.clone(),
            cabinet_id: cid.to_string(),
            merchant_id: cabinet.merchant_id.clone(),
            user_id: req.user_id.clone(),
            channel: channel.as_str().to_owned(),
            mode: mode_str(req.mode).to_owned(),
            state: life.session.as_str().to_owned(),
            failure: None,
            idempotency_key: idempotency_key.clone(),
            created_at: now,
            updated_at: now,
            unlocked_at: None,
            closed_by: None,
            close_note: None,
        };
        let order = OrderRow {
            id: format!("o{}", &id[1..]),
            session_id: id.clone(),
            cabinet_id: cid.to_string(),
            merchant_id: cabinet.merchant_id.clone(),
            user_id: req.user_id.clone(),
            channel: channel.as_str().to_owned(),
            status: life.order.as_str().to_owned(),
            abnormal_reason: None,
            items: None,
            priced: None,
            total_fen: None,
            paid_fen: 0,
            refunded_fen: 0,
            collect_attempts: 0,
            refund_reserved_fen: 0,
            paid_at: None,
            recognized_at: None,
            recognition_fee_fen: 0,
            price_terms: None,
            authorised_fen: terms.as_ref().map(|t| t.ceiling_fen),
            deduction_failure: None,
            provider_order_no: (channel != Channel::None).then(|| id.clone()),
            transaction_id: None,
            created_at: now,
            updated_at: now,
        };
        let claim = idempotency
            .as_ref()
            .map(|i| (i.request_hash.as_str(), self.boot_id.as_str()));
        match self
            .store
            .create_session(&session, &order, claim, planned.as_deref())
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict) => return Err(busy()),
            Err(e) => return Err(e.into()),
        }
        timings.lap("checks");
        let outcome = self
            .run_start(&session, &order, terms.as_ref(), req.mode, timings)
            .await;
        let mode = mode_str(req.mode);
        let mut answer_stored = false;
        let answer = match outcome {
            Ok(Started::Opened(opened, stored)) => {
                answer_stored = stored;
                self.count_outcome(mode, now, &Ok(()));
                Ok((201, opened))
            }
            // Counted when the shopper's answer and the unlock are in (`proceed`).
            Ok(Started::Confirming(body)) => Ok((202, body)),
            Err(e) => {
                self.count_outcome(mode, now, &Err(e.clone()));
                Err(e)
            }
        };
        // Kept only where a repeat can ask for it: under an Idempotency-Key. An opened session's
        // answer was stored with its move to `open`.
        if idempotency_key.is_some() && !answer_stored {
            if let Some(stored) = stored_answer(&answer) {
                if let Err(e) = self.store.set_session_response(&id, &stored).await {
                    tracing::error!(session_id = %id, error = %e, "could not store the idempotent answer");
                }
            }
        }
        timings.lap("record");
        self.observe_stages(timings);
        answer
    }

    fn observe_stages(&self, timings: &StartTimings) {
        for (stage, d) in timings.stages() {
            self.metrics
                .session_stages
                .with_label_values(&[stage])
                .observe(d.as_secs_f64());
        }
    }

    /// Counts a start's outcome: unlocked (with the time from its creation to the open door,
    /// the shopper's confirmation included) or the refusal's code.
    fn count_outcome(&self, mode: &str, created_at: i64, outcome: &ApiResult<()>) {
        match outcome {
            Ok(()) => {
                self.metrics
                    .sessions
                    .with_label_values(&[mode, "unlocked"])
                    .inc();
                self.metrics
                    .session_unlock
                    .observe((self.now() - created_at).max(0) as f64 / 1000.0);
            }
            Err(e) => self
                .metrics
                .sessions
                .with_label_values(&[mode, e.code.as_str()])
                .inc(),
        }
    }

    /// A repeat of a keyed request: the first answer (`Some`), a refusal (another request's
    /// key; the first still running), or `None` when the key was reclaimed from a first request
    /// that died with its process or has been running longer than any start can (see
    /// `RECLAIM_MARGIN_MS`).
    async fn replay_or_reclaim(
        &self,
        found: KeyedSession,
        idem: &Idempotency,
    ) -> ApiResult<Option<StartAnswer>> {
        // Rows stored before requests were hashed match any request.
        if found
            .request_hash
            .as_deref()
            .is_some_and(|h| h != idem.request_hash)
        {
            return Err(StoreError::KeyReused.into());
        }
        if let Some(r) = found.response {
            return replay(&r).map(Some);
        }
        let s = found.session;
        let ours = found.claimed_by.as_deref() == Some(self.boot_id.as_str());
        let longest = self.settings.payments.confirm_timeout_ms
            + self.settings.cabinet.unlock_ack_timeout_ms
            + RECLAIM_MARGIN_MS;
        let longest = i64::try_from(longest).unwrap_or(i64::MAX);
        if ours && self.now() - s.created_at < longest {
            return Err(ApiError::new(
                ErrorCode::RequestInProgress,
                format!(
                    "session {} for this Idempotency-Key is still starting",
                    s.id
                ),
            ));
        }
        if s.unlocked_at.is_some() {
            // The first request got the door open before it died: that is its answer.
            let answer = Ok((201, to_raw(&self.view(&s.id).await?)?));
            if let Some(stored) = stored_answer(&answer) {
                if let Err(e) = self.store.set_session_response(&s.id, &stored).await {
                    tracing::error!(session_id = %s.id, error = %e, "could not store the idempotent answer");
                }
            }
            return answer.map(Some);
        }
        if !self.store.release_session_key(&s.id, &idem.key).await? {
            return Err(ApiError::new(
                ErrorCode::RequestInProgress,
                "another request is reclaiming this Idempotency-Key",
            ));
        }
        tracing::warn!(session_id = %s.id, state = %s.state, first_by_this_process = ours,
            "Idempotency-Key reclaimed from a request that never answered");
        Ok(None)
    }

    /// The session failed before its door opened: the machine's moves are stored (session
    /// failed, order cancelled) and the provider order cancelled; answers the refusal.
    pub(super) async fn fail(&self, s: &SessionRow, event: Event, detail: &str) -> ApiError {
        let reason = match &event {
            Event::UnlockFailed(r) => *r,
            Event::HubRestarted => FailReason::HubRestarted,
            _ => FailReason::PaymentDeclined,
        };
        // Read afresh: the row the start holds predates its own moves (confirmed → unlocking).
        let (fresh, order) = tokio::join!(
            self.store.session(&s.id),
            self.store.order_of_session(&s.id)
        );
        let rows = match (fresh, order) {
            (Ok(Some(s)), Ok(o)) => Ok(o.map(|o| (s, o))),
            (Ok(None), _) => Ok(None),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match rows {
            Ok(Some((s, o))) => match self.apply(&s, &o, &event, OrderUpdate::default()).await {
                Ok(Some(step)) => self.run_effects(&s, &step.effects).await,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(session_id = %s.id, error = %e, "could not record the failed session")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::error!(session_id = %s.id, error = %e, "could not record the failed session")
            }
        }
        failure_answer(reason, detail)
    }

    /// Carries out the effects of a step that are not the start's own (the unlock).
    pub(super) async fn run_effects(&self, s: &SessionRow, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::CancelProviderOrder { reason } => {
                    self.cancel_provider_order(s, reason).await
                }
                // The start sends the unlock itself and waits for its outcome; the others are
                // carried out where the money moves (`charge`, `exceptions`).
                Effect::SendUnlock
                | Effect::CompleteWithProvider { .. }
                | Effect::CheckDeductionLater
                | Effect::ReleaseShopper => {}
            }
        }
    }

    /// Ends the wait for the shopper: the session fails (and the provider order is cancelled)
    /// or moves on to the unlock.
    pub(super) async fn after_confirmation(
        &self,
        s: &SessionRow,
        o: &OrderRow,
        confirmed: bool,
    ) -> ApiResult<()> {
        self.forget_confirmation(&s.id);
        if !confirmed {
            return Err(self
                .fail(
                    s,
                    Event::NotConfirmed,
                    "the shopper did not confirm pay-after-use",
                )
                .await);
        }
        // The order as the start stored it: nothing moves an order before its door opened, and
        // the confirmation moves only the session (conditionally on its state). A move that did
        // not take means the session was ended meanwhile (an operator's close, the sweep): the
        // door must not open for it.
        match self
            .apply(s, o, &Event::Confirmed, OrderUpdate::default())
            .await?
        {
            Some(_) => Ok(()),
            None => Err(ApiError::new(
                ErrorCode::SessionClosed,
                "the session was closed before the shopper confirmed",
            )),
        }
    }

    pub(super) async fn cancel_provider_order(&self, s: &SessionRow, reason: &str) {
        if s.channel == Channel::Alipay.as_str() {
            return self.alipay_close(s, reason).await;
        }
        let Some(w) = &self.providers.wechat else {
            return;
        };
        let sub = self.sub_mchid(&s.merchant_id).await;
        if let Err(e) = self.counted(
            "wechat",
            "cancel",
            w.cancel_order(&sub, &s.id, reason).await,
        ) {
            // Not created, or already terminal: nothing to cancel. Logged for the operator.
            tracing::info!(session_id = %s.id, error = %e, "provider order not cancelled");
        }
    }

    /// Runs a stored session: a restock's up to the open door; a purchase's up to the
    /// provider's order, after which it waits for the shopper in the background (`proceed`).
    async fn run_start(
        &self,
        s: &SessionRow,
        order: &OrderRow,
        terms: Option<&PaymentTerms>,
        mode: SessionMode,
        timings: &mut StartTimings,
    ) -> ApiResult<Started> {
        let channel = s.channel.parse::<Channel>().unwrap_or(Channel::None);
        if channel == Channel::None {
            let (view, stored) = self.unlock(s, order, mode, timings, true).await?;
            return Ok(Started::Opened(view, stored));
        }
        // Registered before the provider's order exists: its notification may come first.
        let rx = self.await_confirmation_of(&s.id);
        let created = match channel {
            Channel::Alipay => self.alipay_create(s, order, terms).await,
            _ => self.wechat_create(s, terms).await,
        };
        timings.lap("provider");
        let confirmation = match created {
            Ok(c) => c,
            Err(e) => {
                self.forget_confirmation(&s.id);
                return Err(e);
            }
        };
        let body = serde_json::value::to_raw_value(&ConfirmingView {
            session: Some(s.clone()),
            order: Some(OrderView::from(order)),
            confirmation,
        })
        .map_err(ApiError::internal)?;
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| ApiError::internal("the supervisor is shutting down"))?;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.settings.payments.confirm_timeout_ms);
        let (s, order) = (s.clone(), order.clone());
        tokio::spawn(async move { me.proceed(s, order, rx, deadline).await });
        Ok(Started::Confirming(body))
    }

    /// The rest of a purchase's start, after its 202: waits for the shopper's confirmation
    /// (the provider's notification, or its answer to a query) until `deadline`, then unlocks;
    /// or fails the session and cancels the provider's order. Every step is stored, so the
    /// session's state, its feed events and `GET /api/v1/sessions/{id}?wait_s=` tell the
    /// outcome.
    pub(super) async fn proceed(
        self: Arc<Self>,
        s: SessionRow,
        order: OrderRow,
        rx: oneshot::Receiver<()>,
        deadline: tokio::time::Instant,
    ) {
        let mut timings = StartTimings::default();
        let confirmed = self.wait_for_shopper(&s, rx, deadline).await;
        timings.lap("confirm");
        let outcome = match self.after_confirmation(&s, &order, confirmed).await {
            Ok(()) => {
                timings.lap("confirmed");
                self.unlock(&s, &order, SessionMode::Purchase, &mut timings, false)
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        };
        self.observe_stages(&timings);
        if let Err(e) = &outcome {
            tracing::info!(session_id = %s.id, code = %e.code.as_str(), "session did not open");
        }
        self.count_outcome(mode_str(SessionMode::Purchase), s.created_at, &outcome);
    }

    /// Waits for the shopper: the notification wakes the wait; the provider is also asked,
    /// at growing intervals (1 s to 5 s), in case a notification is late or lost; and once
    /// more at the deadline.
    async fn wait_for_shopper(
        &self,
        s: &SessionRow,
        rx: oneshot::Receiver<()>,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut rx = Some(rx);
        let mut poll = Duration::from_secs(1);
        loop {
            let now = tokio::time::Instant::now();
            if now < deadline {
                let wait = tokio::time::sleep(poll.min(deadline - now));
                match rx.as_mut() {
                    Some(r) => tokio::select! {
                        got = r => {
                            if got.is_ok() {
                                return true;
                            }
                            // The sender went without a word: ask the provider from now on.
                            rx = None;
                        }
                        _ = wait => {}
                    },
                    None => wait.await,
                }
                poll = (poll * 2).min(Duration::from_secs(5));
            }
            if self.provider_says_confirmed(s).await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Whether the provider's order says the shopper confirmed.
    async fn provider_says_confirmed(&self, s: &SessionRow) -> bool {
        if s.channel == Channel::Alipay.as_str() {
            let Some(a) = &self.providers.alipay else {
                return false;
            };
            let m = self.order_terms(&s.merchant_id).await.alipay;
            return a
                .query(&s.id, m.as_ref())
                .await
                .is_ok_and(|q| q["user_confirmed"] == true);
        }
        let Some(w) = &self.providers.wechat else {
            return false;
        };
        let sub = self.sub_mchid(&s.merchant_id).await;
        w.query_order(&sub, &s.id)
            .await
            .is_ok_and(|o| o.state == "DOING")
    }

    /// Sends the unlock and waits for the cabinet's ack: the session opens, or fails (and the
    /// provider's order is cancelled). `answer_with_open`: under an Idempotency-Key, store the
    /// answer in the same write as the open (a start that already answered 202 does not).
    async fn unlock(
        &self,
        s: &SessionRow,
        order: &OrderRow,
        mode: SessionMode,
        timings: &mut StartTimings,
        answer_with_open: bool,
    ) -> ApiResult<(Box<RawValue>, bool)> {
        let cid = CabinetId::parse(&s.cabinet_id)
            .map_err(|_| ApiError::internal("stored cabinet id invalid"))?;
        let Some(handle) = self.registry.get(&cid) else {
            return Err(self
                .fail(
                    s,
                    Event::UnlockFailed(FailReason::CabinetOffline),
                    "the cabinet is not connected",
                )
                .await);
        };
        let expires_at = self.clock.now_ms() + self.settings.cabinet.unlock_ack_timeout_ms;
        let result = handle
            .command(CommandBody::Unlock {
                session_id: s.id.clone(),
                mode,
                expires_at,
            })
            .await;
        timings.lap("unlock");
        let (reason, detail) = match result {
            Ok(r) => match r.outcome {
                CommandOutcome::Ok => return self.open(s, order, answer_with_open).await,
                CommandOutcome::Timeout => (
                    FailReason::UnlockTimeout,
                    "the cabinet did not acknowledge the unlock".to_owned(),
                ),
                CommandOutcome::Rejected(e) => (
                    FailReason::UnlockRejected,
                    format!("the cabinet refused to unlock: {e}"),
                ),
                CommandOutcome::NotConnected => (
                    FailReason::CabinetOffline,
                    "the cabinet is not connected".to_owned(),
                ),
            },
            Err(CommandError::Restarted | CommandError::Unreachable(_)) => (
                FailReason::UnlockTimeout,
                "the cabinet actor restarted during the unlock".to_owned(),
            ),
        };
        Err(self.fail(s, Event::UnlockFailed(reason), &detail).await)
    }

    /// Creates the Pay Score order; answers what the shopper's mini-program confirms it with.
    async fn wechat_create(
        &self,
        s: &SessionRow,
        terms: Option<&PaymentTerms>,
    ) -> ApiResult<Confirmation> {
        let (Some(w), Some(terms)) = (self.providers.wechat.clone(), terms) else {
            return Err(self
                .fail(s, Event::NotConfirmed, "WeChat Pay is not configured")
                .await);
        };
        let start = time::OffsetDateTime::now_utc().to_offset(
            time::UtcOffset::from_whole_seconds(self.settings.pricing.utc_offset_min * 60)
                .unwrap_or(time::UtcOffset::UTC),
        );
        let fmt = time::macros::format_description!("[year][month][day][hour][minute][second]");
        let create = CreateOrder {
            out_order_no: s.id.clone(),
            sub_mchid: terms.sub_mchid.clone(),
            service_introduction: "智能柜购物".into(),
            risk_fund: RiskFund {
                name: "ESTIMATE_ORDER_COST".into(),
                amount: terms.ceiling_fen,
            },
            time_range: TimeRange {
                start_time: start.format(&fmt).unwrap_or_default(),
                end_time: None,
            },
            openid: s.user_id.clone(),
            attach: s.id.clone(),
            device: Some(serde_json::json!({"start_device_id": s.cabinet_id})),
        };
        let created = match self.counted("wechat", "create", w.create_order(&create).await) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(session_id = %s.id, error = %e, "pay-after-use order not created");
                return Err(self
                    .fail(
                        s,
                        Event::NotConfirmed,
                        "the payment provider refused the order",
                    )
                    .await);
            }
        };
        let package = created.package.filter(|p| !p.is_empty());
        match package.map(|p| w.confirmation(&p)) {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => {
                tracing::error!(session_id = %s.id, error = %e, "confirmation not signed");
                Err(self
                    .fail(
                        s,
                        Event::NotConfirmed,
                        "the shopper's confirmation could not be signed",
                    )
                    .await)
            }
            None => Err(self
                .fail(
                    s,
                    Event::NotConfirmed,
                    "the payment provider's answer carried no package to confirm",
                )
                .await),
        }
    }

    /// Registers a wait for the shopper's confirmation of `session_id`.
    pub(super) fn await_confirmation_of(&self, session_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.confirmations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session_id.to_owned(), tx);
        rx
    }

    /// Nobody waits for `session_id`'s confirmation any more.
    fn forget_confirmation(&self, session_id: &str) {
        self.confirmations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session_id);
    }

    /// Stores the session as open. Under an Idempotency-Key (and `answer_with`) the answer goes
    /// into the same write, built from the row as the write will leave it; should the committed
    /// row differ, the answer is left for `start` to store from the real one.
    async fn open(
        &self,
        s: &SessionRow,
        order: &OrderRow,
        answer_with: bool,
    ) -> ApiResult<(Box<RawValue>, bool)> {
        let now = self.now();
        let expected = SessionRow {
            state: cabinet_actors::session::SessionState::Open
                .as_str()
                .to_owned(),
            updated_at: now,
            unlocked_at: Some(now),
            ..s.clone()
        };
        // Both rows as about to be committed: the order is untouched since it was stored.
        let view = to_raw(&SessionView {
            session: Some(expected.clone()),
            order: Some(OrderView::from(order)),
        })?;
        let answer = (answer_with && s.idempotency_key.is_some())
            .then(|| stored_answer(&Ok((201, view.clone()))))
            .flatten();
        match self
            .store
            .open_session(&s.id, now, answer.as_deref())
            .await?
        {
            Some(row) if row == expected => Ok((view, answer.is_some())),
            Some(row) => Ok((
                to_raw(&SessionView {
                    session: Some(row),
                    order: Some(OrderView::from(order)),
                })?,
                false,
            )),
            // Moved on meanwhile: answer with what is stored.
            None => {
                let row = self
                    .store
                    .session(&s.id)
                    .await?
                    .ok_or_else(|| ApiError::internal("the session vanished"))?;
                Ok((
                    to_raw(&SessionView {
                        session: Some(row),
                        order: Some(OrderView::from(order)),
                    })?,
                    false,
                ))
            }
        }
    }
}

fn busy() -> ApiError {
    ApiError::new(
        ErrorCode::CabinetBusy,
        "another session is open on this cabinet",
    )
}

fn mode_str(m: SessionMode) -> &'static str {
    match m {
        SessionMode::Purchase => "purchase",
        SessionMode::Restock => "restock",
    }
}

/// A restock plan, checked (at most 500 products, each once, -10,000 to 10,000) and as stored.
fn plan_json(p: &[PlannedItem]) -> ApiResult<String> {
    if p.len() > 500 {
        return Err(ApiError::bad_request("planned: at most 500 products"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, it) in p.iter().enumerate() {
        if it.sku.is_empty() || it.sku.len() > 64 || !seen.insert(it.sku.as_str()) {
            return Err(ApiError::bad_request(format!(
                "planned[{i}].sku: 1 to 64 characters, each product once"
            )));
        }
        if !(-10_000..=10_000).contains(&it.qty) {
            return Err(ApiError::bad_request(format!(
                "planned[{i}].qty must be -10000 to 10000"
            )));
        }
    }
    serde_json::to_string(p).map_err(ApiError::internal)
}
