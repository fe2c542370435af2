//! The session and order supervisor: the money path of a pay-after-use purchase.
//!
//! `start` checks the cabinet and shopper, stores the session and its order, creates the
//! provider's pay-after-use order, waits for the shopper's confirmation (notification or query),
//! unlocks the cabinet through its actor and answers once the cabinet acked. The cabinet's
//! session events (recognition, abnormal endings) arrive through `on_event`; provider
//! notifications through `on_wechat_notification`. Every state change is stored before it is
//! acknowledged and guarded by a conditional update, so redeliveries change nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use cabinet_actors::actor::{CabinetMeta, CheckSession, Clock, SendCommand};
use cabinet_actors::ids::CabinetId;
use cabinet_actors::machine::{CommandOutcome, Refusal, SessionEvent};
use cabinet_actors::pricing::{price_basket, BasketItem, PricingError};
use cabinet_actors::protocol::{CommandBody, RecognitionStatus, SessionMode};
use cabinet_actors::registry::Registry;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::payments::wechat::{CreateOrder, RiskFund, SignedHeaders, TimeRange, WechatClient};
use crate::secrets::token;
use crate::store::{OrderRow, SessionRow, Store, StoreError};

mod alipay_flow;
mod exceptions;

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

/// Why a session was not started: an API error code and its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// Stable code (API.md).
    pub code: String,
    /// Human text.
    pub message: String,
}

fn refused(status: u16, code: &str, message: impl Into<String>) -> Refused {
    Refused {
        status,
        code: code.to_owned(),
        message: message.into(),
    }
}

/// What the merchant's settings say of a WeChat Pay Score order.
struct PaymentTerms {
    /// The risk ceiling (`risk_fund.amount`), fen.
    ceiling_fen: i64,
    /// The merchant's second-level merchant number.
    sub_mchid: String,
}

/// What `POST /api/v1/sessions` takes.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    /// Cabinet.
    pub cabinet_id: String,
    /// Shopper (openid) or restocker.
    pub user_id: String,
    /// `wechat` or `alipay`; ignored for restock.
    #[serde(default)]
    pub channel: Option<String>,
    /// `purchase` or `restock`.
    pub mode: SessionMode,
}

/// The supervisor.
pub struct Sessions {
    store: Store,
    registry: Arc<Registry>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    settings: Settings,
    wechat: Option<Arc<WechatClient>>,
    alipay: Option<Arc<crate::payments::alipay::AlipayClient>>,
    confirmations: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

fn mode_str(m: SessionMode) -> &'static str {
    match m {
        SessionMode::Purchase => "purchase",
        SessionMode::Restock => "restock",
    }
}

impl Sessions {
    /// Builds the supervisor.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
        settings: Settings,
        wechat: Option<Arc<WechatClient>>,
        alipay: Option<Arc<crate::payments::alipay::AlipayClient>>,
    ) -> Self {
        Self {
            store,
            registry,
            metrics,
            clock,
            settings,
            wechat,
            alipay,
            confirmations: Mutex::new(HashMap::new()),
        }
    }

    fn now(&self) -> i64 {
        self.clock.now_ms() as i64
    }

    fn sub_mchid(&self, merchant_id: &str, configured: Option<String>) -> String {
        // The simulator accepts any sub-merchant; a real deployment stores each merchant's.
        configured.unwrap_or_else(|| format!("sim{merchant_id}"))
    }

    /// Starts a session; answers with the stored session view or a refusal. Idempotent by key.
    pub async fn start(
        self: &Arc<Self>,
        merchant_scope: Option<&str>,
        req: StartSession,
        idempotency_key: Option<String>,
        timings: &mut StartTimings,
    ) -> Result<Value, Refused> {
        let internal = |e: StoreError| refused(500, "internal", e.to_string());
        let Ok(cid) = CabinetId::parse(&req.cabinet_id) else {
            return Err(refused(404, "cabinet_not_found", "no such cabinet"));
        };
        let cabinet = match self.store.cabinet(cid.as_str()).await.map_err(internal)? {
            Some(c) if merchant_scope.is_none_or(|m| m == c.merchant_id) => c,
            _ => return Err(refused(404, "cabinet_not_found", "no such cabinet")),
        };
        if let Some(key) = &idempotency_key {
            if let Some((s, response)) = self
                .store
                .session_by_key(&cabinet.merchant_id, key)
                .await
                .map_err(internal)?
            {
                return match response.and_then(|r| serde_json::from_str::<Value>(&r).ok()) {
                    Some(v) if v["status"] == 201 => Ok(v["body"].clone()),
                    Some(v) => Err(Refused {
                        status: v["status"]
                            .as_u64()
                            .and_then(|s| u16::try_from(s).ok())
                            .unwrap_or(500),
                        code: v["body"]["error"]["code"]
                            .as_str()
                            .unwrap_or("internal")
                            .to_owned(),
                        message: v["body"]["error"]["message"]
                            .as_str()
                            .unwrap_or("")
                            .to_owned(),
                    }),
                    None => Err(refused(
                        409,
                        "request_in_progress",
                        format!(
                            "session {} for this Idempotency-Key is still starting",
                            s.id
                        ),
                    )),
                };
            }
        }
        if req.user_id.is_empty() || req.user_id.len() > 64 {
            return Err(refused(
                400,
                "invalid_request",
                "user_id must be 1 to 64 characters",
            ));
        }
        let channel = match (req.mode, req.channel.as_deref()) {
            (SessionMode::Restock, _) => "none",
            (SessionMode::Purchase, Some("wechat")) => "wechat",
            (SessionMode::Purchase, Some("alipay")) if self.alipay.is_some() => "alipay",
            (SessionMode::Purchase, Some("alipay")) => {
                return Err(refused(
                    422,
                    "payment_declined",
                    "the Alipay channel is not configured on this hub",
                ))
            }
            (SessionMode::Purchase, _) => {
                return Err(refused(
                    400,
                    "invalid_request",
                    "channel must be \"wechat\" or \"alipay\" for a purchase",
                ))
            }
        };
        if !cabinet.active {
            return Err(refused(
                409,
                "cabinet_not_active",
                "the cabinet is not activated",
            ));
        }
        if cabinet.service_expires_at.is_some_and(|e| e <= self.now()) {
            return Err(refused(
                422,
                "service_expired",
                "the cabinet's service time has expired",
            ));
        }
        let Some(actor) = self.registry.get(&cid) else {
            return Err(refused(
                503,
                "cabinet_offline",
                "the cabinet is not connected",
            ));
        };
        // The cabinet's own check, the shopper's standing and the merchant's payment settings
        // do not depend on one another: asked together, they cost one wait instead of four.
        let purchase = req.mode == SessionMode::Purchase;
        let (check, standing, payment) = tokio::join!(
            actor.send(CheckSession(req.mode)),
            async {
                if purchase {
                    self.check_blacklist(&cabinet.merchant_id, &req.user_id)
                        .await
                } else {
                    Ok(())
                }
            },
            async {
                if channel == "wechat" {
                    self.store.merchant_payment(&cabinet.merchant_id).await
                } else {
                    Ok(None)
                }
            },
        );
        match check {
            Ok(None) => {}
            Ok(Some(Refusal::CabinetOffline)) | Err(_) => {
                return Err(refused(
                    503,
                    "cabinet_offline",
                    "the cabinet is not connected",
                ))
            }
            Ok(Some(Refusal::CabinetBusy)) => {
                return Err(refused(
                    409,
                    "cabinet_busy",
                    "another session is open on this cabinet",
                ))
            }
            Ok(Some(Refusal::CabinetFaulted)) => {
                return Err(refused(
                    409,
                    "cabinet_faulted",
                    "the cabinet is faulted or locked down",
                ))
            }
        }
        standing?;
        let (ceiling, sub) = payment.map_err(internal)?.unwrap_or((20_000, None));
        let payment = PaymentTerms {
            ceiling_fen: ceiling,
            sub_mchid: self.sub_mchid(&cabinet.merchant_id, sub),
        };

        let now = self.now();
        let id = format!(
            "s{}",
            token(20).map_err(|_| refused(500, "internal", "no randomness"))?
        );
        let session = SessionRow {
            id: id.clone(),
            cabinet_id: cid.to_string(),
            merchant_id: cabinet.merchant_id.clone(),
            user_id: req.user_id.clone(),
            channel: channel.to_owned(),
            mode: mode_str(req.mode).to_owned(),
            state: if channel == "none" {
                "unlocking"
            } else {
                "confirming"
            }
            .to_owned(),
            failure: None,
            idempotency_key: idempotency_key.clone(),
            created_at: now,
            updated_at: now,
            unlocked_at: None,
        };
        let order = OrderRow {
            id: format!("o{}", &id[1..]),
            session_id: id.clone(),
            cabinet_id: cid.to_string(),
            merchant_id: cabinet.merchant_id.clone(),
            user_id: req.user_id.clone(),
            channel: channel.to_owned(),
            status: "open".into(),
            abnormal_reason: None,
            items: None,
            priced: None,
            total_fen: None,
            paid_fen: 0,
            refunded_fen: 0,
            collect_attempts: 0,
            provider_order_no: (channel != "none").then(|| id.clone()),
            transaction_id: None,
            created_at: now,
            updated_at: now,
        };
        match self.store.create_session(&session, &order).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(refused(
                    409,
                    "cabinet_busy",
                    "another session is open on this cabinet",
                ))
            }
            Err(e) => return Err(internal(e)),
        }
        timings.lap("checks");
        let outcome = self
            .run_start(&session, &order, &payment, req.mode, timings)
            .await;
        let mode = mode_str(req.mode);
        let mut answer_stored = false;
        let answer = match outcome {
            Ok((opened, stored)) => {
                answer_stored = stored;
                self.metrics
                    .sessions
                    .with_label_values(&[mode, "unlocked"])
                    .inc();
                self.metrics
                    .session_unlock
                    .observe((self.now() - now).max(0) as f64 / 1000.0);
                // Both rows as just committed: the order is untouched since it was stored.
                Ok(json!({"session": opened, "order": order_view(&order)}))
            }
            Err(r) => {
                self.metrics
                    .sessions
                    .with_label_values(&[mode, r.code.as_str()])
                    .inc();
                Err(r)
            }
        };
        // Kept only where a repeat can ask for it: under an Idempotency-Key. An opened session's
        // answer was stored with its move to `open`.
        if idempotency_key.is_some() && !answer_stored {
            let stored = match &answer {
                Ok(v) => json!({"status": 201, "body": v}),
                Err(r) => {
                    json!({"status": r.status, "body": {"error": {"code": r.code, "message": r.message}}})
                }
            };
            if let Err(e) = self
                .store
                .set_session_response(&id, &stored.to_string())
                .await
            {
                tracing::error!(session_id = %id, error = %e, "could not store the idempotent answer");
            }
        }
        timings.lap("record");
        for (stage, d) in timings.stages() {
            self.metrics
                .session_stages
                .with_label_values(&[stage])
                .observe(d.as_secs_f64());
        }
        answer
    }

    async fn fail(
        &self,
        s: &SessionRow,
        from: &str,
        code: &'static str,
        status: u16,
        message: &str,
    ) -> Refused {
        let now = self.now();
        if let Err(e) = self
            .store
            .transition_session(&s.id, from, "failed", Some(code), now)
            .await
        {
            tracing::error!(session_id = %s.id, error = %e, "could not record the failed session");
        }
        if let Ok(Some(o)) = self.store.order_of_session(&s.id).await {
            let _ = self
                .store
                .transition_order(
                    &o.id,
                    &["open"],
                    "cancelled",
                    Some(code),
                    None,
                    None,
                    Some(0),
                    now,
                )
                .await;
            self.metrics.orders.with_label_values(&["cancelled"]).inc();
        }
        if s.channel != "none" {
            self.cancel_provider_order(s, code).await;
        }
        refused(status, code, message)
    }

    /// Ends the wait for the shopper: refuse (and cancel the provider order) or move on to the
    /// unlock.
    pub(super) async fn after_confirmation(
        &self,
        s: &SessionRow,
        confirmed: bool,
    ) -> Result<(), Refused> {
        self.confirmations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.id);
        if !confirmed {
            return Err(self
                .fail(
                    s,
                    "confirming",
                    "payment_declined",
                    422,
                    "the shopper did not confirm pay-after-use",
                )
                .await);
        }
        self.store
            .transition_session(&s.id, "confirming", "unlocking", None, self.now())
            .await
            .map_err(|e| refused(500, "internal", e.to_string()))?;
        Ok(())
    }

    async fn cancel_provider_order(&self, s: &SessionRow, reason: &str) {
        if s.channel == "alipay" {
            return self.alipay_close(s, reason).await;
        }
        let Some(w) = &self.wechat else { return };
        let sub = self.sub_mchid(
            &s.merchant_id,
            self.store
                .merchant_payment(&s.merchant_id)
                .await
                .ok()
                .flatten()
                .and_then(|m| m.1),
        );
        let r = w.cancel_order(&sub, &s.id, reason).await;
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .payments
            .with_label_values(&["wechat", "cancel", outcome])
            .inc();
        if let Err(e) = r {
            // Not created, or already terminal: nothing to cancel. Logged for the operator.
            tracing::info!(session_id = %s.id, error = %e, "provider order not cancelled");
        }
    }

    /// Runs a stored session up to the open door. Answers the opened session and whether the
    /// answer to an idempotent request was stored with it.
    async fn run_start(
        &self,
        s: &SessionRow,
        order: &OrderRow,
        payment: &PaymentTerms,
        mode: SessionMode,
        timings: &mut StartTimings,
    ) -> Result<(SessionRow, bool), Refused> {
        if s.channel == "alipay" {
            self.alipay_confirm(s).await?;
            timings.lap("provider");
        }
        if s.channel == "wechat" {
            let Some(w) = self.wechat.clone() else {
                return Err(self
                    .fail(
                        s,
                        "confirming",
                        "payment_declined",
                        422,
                        "WeChat Pay is not configured",
                    )
                    .await);
            };
            let sub = payment.sub_mchid.clone();
            let (tx, rx) = oneshot::channel();
            self.confirmations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(s.id.clone(), tx);
            let start = time::OffsetDateTime::now_utc().to_offset(
                time::UtcOffset::from_whole_seconds(self.settings.pricing.utc_offset_min * 60)
                    .unwrap_or(time::UtcOffset::UTC),
            );
            let fmt = time::macros::format_description!("[year][month][day][hour][minute][second]");
            let create = CreateOrder {
                out_order_no: s.id.clone(),
                sub_mchid: sub.clone(),
                service_introduction: "智能柜购物".into(),
                risk_fund: RiskFund {
                    name: "ESTIMATE_ORDER_COST".into(),
                    amount: payment.ceiling_fen,
                },
                time_range: TimeRange {
                    start_time: start.format(&fmt).unwrap_or_default(),
                    end_time: None,
                },
                openid: s.user_id.clone(),
                attach: s.id.clone(),
                device: Some(json!({"start_device_id": s.cabinet_id})),
            };
            let created = w.create_order(&create).await;
            self.metrics
                .payments
                .with_label_values(&[
                    "wechat",
                    "create",
                    if created.is_ok() { "ok" } else { "error" },
                ])
                .inc();
            if let Err(e) = created {
                self.confirmations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&s.id);
                tracing::warn!(session_id = %s.id, error = %e, "pay-after-use order not created");
                return Err(self
                    .fail(
                        s,
                        "confirming",
                        "payment_declined",
                        422,
                        "the payment provider refused the order",
                    )
                    .await);
            }
            timings.lap("provider");
            let confirmed = self.await_confirmation(&w, &sub, &s.id, rx).await;
            timings.lap("confirm");
            self.after_confirmation(s, confirmed).await?;
            timings.lap("confirmed");
        }
        let Ok(cid) = CabinetId::parse(&s.cabinet_id) else {
            return Err(refused(500, "internal", "stored cabinet id invalid"));
        };
        let Some(actor) = self.registry.get(&cid) else {
            return Err(self
                .fail(
                    s,
                    "unlocking",
                    "cabinet_offline",
                    503,
                    "the cabinet is not connected",
                )
                .await);
        };
        let expires_at = self.clock.now_ms() + self.settings.cabinet.unlock_ack_timeout_ms;
        let result = actor
            .send(SendCommand(CommandBody::Unlock {
                session_id: s.id.clone(),
                mode,
                expires_at,
            }))
            .await;
        timings.lap("unlock");
        match result {
            Ok(Ok(r)) => match r.outcome {
                CommandOutcome::Ok => self.open(s, order).await,
                CommandOutcome::Timeout => Err(self
                    .fail(
                        s,
                        "unlocking",
                        "unlock_timeout",
                        503,
                        "the cabinet did not acknowledge the unlock",
                    )
                    .await),
                CommandOutcome::Rejected(e) => Err(self
                    .fail(
                        s,
                        "unlocking",
                        "unlock_rejected",
                        409,
                        &format!("the cabinet refused to unlock: {e}"),
                    )
                    .await),
                CommandOutcome::NotConnected => Err(self
                    .fail(
                        s,
                        "unlocking",
                        "cabinet_offline",
                        503,
                        "the cabinet is not connected",
                    )
                    .await),
            },
            Ok(Err(_)) | Err(_) => Err(self
                .fail(
                    s,
                    "unlocking",
                    "unlock_timeout",
                    503,
                    "the cabinet actor restarted during the unlock",
                )
                .await),
        }
    }

    /// Stores the session as open. Under an Idempotency-Key the answer goes into the same
    /// write, built from the row as the write will leave it; should the committed row differ,
    /// the answer is left for `start` to store from the real one.
    async fn open(&self, s: &SessionRow, order: &OrderRow) -> Result<(SessionRow, bool), Refused> {
        let internal = |e: StoreError| refused(500, "internal", e.to_string());
        let now = self.now();
        let expected = SessionRow {
            state: "open".to_owned(),
            updated_at: now,
            unlocked_at: Some(now),
            ..s.clone()
        };
        let answer = s.idempotency_key.is_some().then(|| {
            json!({"status": 201, "body": {"session": &expected, "order": order_view(order)}})
                .to_string()
        });
        let opened = self
            .store
            .open_session(&s.id, now, answer.as_deref())
            .await
            .map_err(internal)?;
        match opened {
            Some(row) => {
                let stored = answer.is_some() && row == expected;
                Ok((row, stored))
            }
            // Moved on meanwhile: answer with what is stored.
            None => self
                .store
                .session(&s.id)
                .await
                .map_err(internal)?
                .map(|row| (row, false))
                .ok_or_else(|| refused(500, "internal", "the session vanished")),
        }
    }

    /// Waits for USER_CONFIRM by notification, querying as a fallback.
    async fn await_confirmation(
        &self,
        w: &WechatClient,
        sub: &str,
        id: &str,
        rx: oneshot::Receiver<()>,
    ) -> bool {
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.settings.payments.confirm_timeout_ms);
        let mut rx = rx;
        loop {
            let poll = tokio::time::sleep(Duration::from_millis(1000));
            tokio::select! {
                r = &mut rx => if r.is_ok() { return true },
                _ = poll => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
            if let Ok(o) = w.query_order(sub, id).await {
                if o.state == "DOING" {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// The session and its order, as the API shows them.
    pub async fn view(&self, session_id: &str) -> Result<Value, StoreError> {
        let s = self.store.session(session_id).await?;
        let o = self.store.order_of_session(session_id).await?;
        Ok(json!({"session": s, "order": o.map(|o| order_view(&o))}))
    }

    /// A cabinet's session event (from its actor), processed in order.
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

    pub async fn on_event(&self, meta: &CabinetMeta, ev: SessionEvent) {
        if let Err(e) = self.handle_event(meta, ev).await {
            tracing::error!(cabinet_id = %meta.id, error = %e, "session event not applied");
            self.metrics
                .store_errors
                .with_label_values(&["session_event"])
                .inc();
        }
    }

    async fn handle_event(&self, meta: &CabinetMeta, ev: SessionEvent) -> Result<(), StoreError> {
        let now = self.now();
        match ev {
            SessionEvent::Recognized {
                session_id,
                recognition,
                ..
            } => {
                let (Some(s), Some(o)) = (
                    self.store.session(&session_id).await?,
                    self.store.order_of_session(&session_id).await?,
                ) else {
                    tracing::warn!(cabinet_id = %meta.id, session_id, "recognition for an unknown session");
                    return Ok(());
                };
                if s.cabinet_id != meta.id.as_str() {
                    tracing::warn!(cabinet_id = %meta.id, session_id, "recognition from another cabinet ignored");
                    return Ok(());
                }
                if recognition.status == RecognitionStatus::Failed {
                    self.abnormal(&s, &o, "recognition_failed").await?;
                    return Ok(());
                }
                if s.mode == "restock" {
                    let stock = serde_json::to_string(&recognition.stock).unwrap_or_default();
                    if self
                        .store
                        .transition_order(
                            &o.id,
                            &["open"],
                            "closed",
                            None,
                            Some(&stock),
                            None,
                            Some(0),
                            now,
                        )
                        .await?
                    {
                        self.metrics.orders.with_label_values(&["closed"]).inc();
                    }
                    self.store
                        .transition_session(&s.id, "open", "closed", None, now)
                        .await?;
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
                self.price_and_complete(&s, &o, basket, &["open"]).await
            }
            SessionEvent::Abnormal {
                session_id, reason, ..
            } => {
                let (Some(s), Some(o)) = (
                    self.store.session(&session_id).await?,
                    self.store.order_of_session(&session_id).await?,
                ) else {
                    return Ok(());
                };
                let reason = serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "abnormal".into());
                self.abnormal(&s, &o, &reason).await
            }
            SessionEvent::Unlocked { .. }
            | SessionEvent::UnlockFailed { .. }
            | SessionEvent::DoorClosed { .. } => Ok(()),
        }
    }

    async fn abnormal(&self, s: &SessionRow, o: &OrderRow, reason: &str) -> Result<(), StoreError> {
        let now = self.now();
        if self
            .store
            .transition_order(
                &o.id,
                &["open"],
                "abnormal",
                Some(reason),
                None,
                None,
                None,
                now,
            )
            .await?
        {
            self.metrics.orders.with_label_values(&["abnormal"]).inc();
            tracing::warn!(order_id = %o.id, session_id = %s.id, reason, "order is abnormal: an operator resolves it");
        }
        self.store
            .transition_session(&s.id, "open", "closed", None, now)
            .await?;
        Ok(())
    }

    async fn price_and_complete(
        &self,
        s: &SessionRow,
        o: &OrderRow,
        basket: Vec<BasketItem>,
        from: &[&str],
    ) -> Result<(), StoreError> {
        let now = self.now();
        let items_json = serde_json::to_string(&basket).unwrap_or_default();
        if basket.iter().all(|i| i.qty == 0) {
            // Nothing taken: no charge, the provider order is cancelled, the order closes at zero.
            let closed = self
                .store
                .transition_order(
                    &o.id,
                    from,
                    "closed",
                    None,
                    Some(&items_json),
                    None,
                    Some(0),
                    now,
                )
                .await?;
            // The session ends before the provider is told: the next shopper at this cabinet
            // must not meet `cabinet_busy` while a cancel call is in flight.
            self.store
                .transition_session(&s.id, "open", "closed", None, now)
                .await?;
            if closed {
                self.metrics.orders.with_label_values(&["closed"]).inc();
                self.cancel_provider_order(s, "未取商品").await;
            }
            return Ok(());
        }
        let list = self.store.prices(&s.cabinet_id, &s.merchant_id).await?;
        let promos = self
            .store
            .promotions_for(&s.merchant_id, &s.cabinet_id)
            .await?;
        let priced = match price_basket(
            &basket,
            &list,
            &promos,
            now,
            self.settings.pricing.utc_offset_min,
        ) {
            Ok(p) => p,
            Err(PricingError::UnknownSku(sku)) => {
                tracing::warn!(session_id = %s.id, sku, "recognised product not on the sellable list");
                return self.abnormal(s, o, "unknown_product").await;
            }
        };
        let priced_json = serde_json::to_string(&priced).unwrap_or_default();
        // Stored before the provider hears of it: after a crash the order is completed again,
        // and the provider's state (not a second charge) decides what that means.
        if !self
            .store
            .transition_order(
                &o.id,
                from,
                "completing",
                None,
                Some(&items_json),
                Some(&priced_json),
                Some(priced.total_fen),
                now,
            )
            .await?
        {
            return Ok(());
        }
        self.store
            .transition_session(&s.id, "open", "closed", None, now)
            .await?;
        self.finish_completion(s, &o.id, &priced).await
    }

    /// A deduction that fails sends no notification: check later, and mark the order pending
    /// payment (待支付) when it is still owed. An order the notification already settled is not
    /// asked about: at 100 sessions a second that is 100 provider calls a second saved.
    fn schedule_deduction_check(&self, s: SessionRow, order_id: String, sub: String) {
        let (Some(w), store, metrics, clock) = (
            self.wechat.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.clock.clone(),
        ) else {
            return;
        };
        let wait = Duration::from_millis(self.settings.payments.deduction_check_ms);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // A store error is no proof of payment: ask the provider then.
            if let Ok(Some(o)) = store.order(&order_id).await {
                if o.status != "completing" {
                    return;
                }
            }
            let r = w.query_order(&sub, &s.id).await;
            metrics
                .payments
                .with_label_values(&["wechat", "query", if r.is_ok() { "ok" } else { "error" }])
                .inc();
            let Ok(o) = r else {
                return;
            };
            let now = clock.now_ms() as i64;
            let c = o
                .collection
                .unwrap_or_else(|| crate::payments::wechat::Collection {
                    state: String::new(),
                    total_amount: 0,
                    paying_amount: 0,
                    paid_amount: 0,
                    details: vec![],
                });
            if c.state == "USER_PAID" {
                let txn = c.details.first().map(|d| d.transaction_id.clone());
                if store
                    .mark_order_paid(&order_id, c.paid_amount, txn.as_deref(), now)
                    .await
                    .unwrap_or(false)
                {
                    metrics.orders.with_label_values(&["paid"]).inc();
                }
            } else if c.state == "USER_PAYING"
                && store
                    .transition_order(
                        &order_id,
                        &["completing"],
                        "pending_payment",
                        None,
                        None,
                        None,
                        None,
                        now,
                    )
                    .await
                    .unwrap_or(false)
            {
                metrics.orders.with_label_values(&["pending_payment"]).inc();
            }
        });
    }

    /// A WeChat notification: verified, decrypted, de-duplicated by id, applied idempotently.
    /// Returns the reason when refused.
    pub async fn on_wechat_notification(
        &self,
        headers: &SignedHeaders,
        body: &str,
    ) -> Result<(), &'static str> {
        let Some(w) = &self.wechat else {
            return Err("not_configured");
        };
        let n = match w.parse_notification(headers, body) {
            Ok(n) => n,
            Err(e) => {
                let reason = match e {
                    crate::payments::wechat::NotificationError::Header(_) => "bad_header",
                    crate::payments::wechat::NotificationError::Verify(
                        crate::payments::wechat_crypto::CryptoError::Stale(_),
                    ) => "stale",
                    crate::payments::wechat::NotificationError::Verify(_) => "bad_signature",
                    crate::payments::wechat::NotificationError::Envelope(_) => "bad_envelope",
                    crate::payments::wechat::NotificationError::Decrypt => "decrypt_failed",
                };
                self.metrics
                    .notifications_rejected
                    .with_label_values(&["wechat", reason])
                    .inc();
                tracing::warn!(reason, error = %e, "WeChat notification refused");
                return Err(reason);
            }
        };
        let out_order_no = n.resource["out_order_no"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // The signature is verified: the shopper did confirm, so a session waiting for that
        // goes on now rather than after the notification is recorded. A redelivery finds no
        // one waiting.
        if n.event_type == "PAYSCORE.USER_CONFIRM" {
            if let Some(tx) = self
                .confirmations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&out_order_no)
            {
                let _ = tx.send(());
            }
        }
        let now = self.now();
        match self
            .store
            .record_notification(&n.id, "wechat", &n.event_type, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Already applied: answer success so the provider stops, change nothing.
                self.metrics
                    .notifications_rejected
                    .with_label_values(&["wechat", "replay"])
                    .inc();
                return Ok(());
            }
            Err(e) => {
                tracing::error!(error = %e, "notification not recorded; the provider will retry");
                return Err("store_error");
            }
        }
        match n.event_type.as_str() {
            // Handled above, before recording.
            "PAYSCORE.USER_CONFIRM" => {}
            "PAYSCORE.USER_PAID" => {
                let Ok(Some(o)) = self.store.order_of_session(&out_order_no).await else {
                    return Ok(());
                };
                let paid = n.resource["collection"]["paid_amount"]
                    .as_i64()
                    .unwrap_or(0);
                let txn = n.resource["collection"]["details"][0]["transaction_id"].as_str();
                if self
                    .store
                    .mark_order_paid(&o.id, paid, txn, now)
                    .await
                    .unwrap_or(false)
                {
                    tracing::info!(order_id = %o.id, paid, "order paid");
                    self.paid(&o).await;
                }
            }
            other => tracing::info!(event_type = other, "notification ignored"),
        }
        Ok(())
    }
}

/// An order as the API shows it.
pub fn order_view(o: &OrderRow) -> Value {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
    };
    json!({"id": o.id, "session_id": o.session_id, "refunded_fen": o.refunded_fen, "cabinet_id": o.cabinet_id, "merchant_id": o.merchant_id, "user_id": o.user_id,
           "channel": o.channel, "status": o.status, "abnormal_reason": o.abnormal_reason, "items": parse(&o.items),
           "priced": parse(&o.priced), "total_fen": o.total_fen, "paid_fen": o.paid_fen, "transaction_id": o.transaction_id,
           "created_at": crate::api::rfc3339(o.created_at), "updated_at": crate::api::rfc3339(o.updated_at)})
}

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
