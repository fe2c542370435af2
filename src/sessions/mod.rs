//! The session and order supervisor: the money path of a pay-after-use purchase, as the thin
//! shell of the pure lifecycle machine in `cabinet_actors::session`.
//!
//! The machine decides what an event means; this shell reads the rows, stores the machine's
//! moves (each a conditional update on the state read, so a redelivered event or a concurrent
//! handler changes nothing twice), then carries out its effects: provider calls, the unlock,
//! deduction checks. Every change is stored before it is acknowledged.
//!
//! - `start`: checks, the provider order, the shopper's confirmation, the unlock.
//! - `events`: the cabinet's recognitions and abnormal endings, in 64 lanes by cabinet.
//! - `charge`: completing with the provider, deduction checks, collection, crash recovery.
//! - `exceptions`: the blacklist, abnormal orders resolved by a person, refunds.
//! - `notifications`: the providers' signed notifications.
//! - `provider`: one place for what every provider call shares (metrics, merchant terms).
//! - `settle`: the settlement supervisor (分账): split, follow, finish, returns before refunds.

mod alipay;
mod charge;
mod close;
mod events;
mod exceptions;
mod notifications;
mod provider;
mod recognition;
mod refunds;
mod service_time;
mod settle;
mod start;
mod stock;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;

use cabinet_actors::actor::Clock;
use cabinet_actors::protocol::SessionMode;
use cabinet_actors::registry::Registry;
use cabinet_actors::session::{Channel, Event, Lifecycle, OrderStatus, SessionState, Step};

use crate::config::Settings;
use crate::error::ApiResult;
use crate::metrics::Metrics;
use crate::payments::Providers;
use crate::store::{OrderRow, OrderUpdate, SessionRow, Store, StoreError};
use crate::views::{OrderView, SessionView};

pub use close::Closer;
pub use events::{event_lane, EVENT_LANES};
pub use notifications::NotificationRefusal;
pub use provider::{ChannelReadiness, PaymentReadiness};
pub use refunds::RefundAnswer;
pub use service_time::{NewServiceOrder, ServiceChannel};
pub use start::{request_hash, Idempotency, PlannedItem, StartSession, StartTimings};

/// Told the provider order number of a confirmation nobody on this node waits for.
type TellOthers = Box<dyn Fn(&str) + Send + Sync>;

/// The supervisor.
pub struct Sessions {
    store: Store,
    registry: Arc<Registry>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    settings: Settings,
    providers: Providers,
    /// Sessions waiting for the shopper's confirmation, by provider order number.
    confirmations: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// Completed WeChat orders whose deduction check is still to run, by order id: a payment
    /// takes its order out, and the check then has nothing to read (at 100 sessions a second,
    /// 100 reads a second saved). An order paid before its check was scheduled is read as
    /// before.
    unsettled: Mutex<std::collections::HashSet<String>>,
    /// Itself, for the checks it schedules to run later.
    me: Weak<Sessions>,
    /// This process, in the Idempotency-Keys it takes: a key taken by another boot whose
    /// request never answered died with that process and is reclaimed.
    boot_id: String,
    /// Several nodes: told of a confirmation nobody here waits for, so that the node whose
    /// session waits for it hears it (the provider's notice reaches any node).
    tell_others: std::sync::OnceLock<TellOthers>,
}

impl Sessions {
    /// Builds the supervisor.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
        settings: Settings,
        providers: Providers,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            registry,
            metrics,
            clock,
            settings,
            providers,
            confirmations: Mutex::new(HashMap::new()),
            unsettled: Mutex::new(std::collections::HashSet::new()),
            me: me.clone(),
            boot_id: boot_id(),
            tell_others: std::sync::OnceLock::new(),
        })
    }

    /// Who to tell of confirmations nobody on this node waits for. Call once, at start-up.
    pub fn on_confirmation_elsewhere(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.tell_others.set(Box::new(f));
    }

    /// Another node heard the shopper confirm: wake the session waiting here, if any.
    pub fn confirmed_elsewhere(&self, out_order_no: &str) {
        self.wake_confirmation(out_order_no);
    }

    fn now(&self) -> i64 {
        self.clock.now_ms() as i64
    }

    /// The supervisor's clock, Unix ms (what it stores its times in).
    pub fn now_ms(&self) -> i64 {
        self.now()
    }

    /// The session and its order, as the API shows them.
    pub async fn view(&self, session_id: &str) -> ApiResult<SessionView> {
        let (s, o) = tokio::join!(
            self.store.session(session_id),
            self.store.order_of_session(session_id)
        );
        Ok(SessionView {
            session: s?,
            order: o?.as_ref().map(OrderView::from),
        })
    }

    /// Someone waits for this session's confirmation: wake them (a redelivery finds no one),
    /// here or, with several nodes, on the node running the session.
    fn confirmed(&self, out_order_no: &str) {
        if !self.wake_confirmation(out_order_no) {
            if let Some(tell) = self.tell_others.get() {
                tell(out_order_no);
            }
        }
    }

    /// Wakes the wait for this confirmation on this node; false when none waits here.
    fn wake_confirmation(&self, out_order_no: &str) -> bool {
        match self
            .confirmations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(out_order_no)
        {
            Some(tx) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }

    /// Applies one event to a session's stored lifecycle: the machine decides; its moves are
    /// stored conditionally on the states read; `order_set` rides along with the order's move.
    /// Answers the step when its moves were stored (effects are the caller's to run), `None`
    /// when the machine refused (a late or redelivered event, logged) or a concurrent change
    /// got there first.
    async fn apply(
        &self,
        s: &SessionRow,
        o: &OrderRow,
        event: &Event,
        order_set: OrderUpdate<'_>,
    ) -> Result<Option<Step>, StoreError> {
        self.apply_to(&s.id, lifecycle(s, o)?, o, event, order_set)
            .await
    }

    /// [`Sessions::apply`] to the session `session_id` in lifecycle `life`.
    async fn apply_to(
        &self,
        session_id: &str,
        life: Lifecycle,
        o: &OrderRow,
        event: &Event,
        order_set: OrderUpdate<'_>,
    ) -> Result<Option<Step>, StoreError> {
        let step = match life.transition(event) {
            Ok(step) => step,
            Err(refusal) => {
                tracing::info!(session_id, order_id = %o.id, %refusal, "event changes nothing");
                return Ok(None);
            }
        };
        let now = self.now();
        let failure = step.failure.map(|f| f.as_str());
        let order_to = step.order.map(|m| m.to);
        // An order going abnormal unpriced keeps the prices and promotions of its shopping, so
        // that it is priced with them when a person resolves it (maybe after they changed).
        let terms = match order_to {
            Some(OrderStatus::Abnormal)
                if order_set.priced.is_none() && o.price_terms.is_none() =>
            {
                // A failed read leaves the order without them (priced with today's when
                // resolved) rather than keeping it from going abnormal.
                let captured = match self.store.session(session_id).await {
                    Ok(Some(s)) => self.price_terms_now(&s).await.map(Some),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                match captured {
                    Ok(t) => t.and_then(|t| serde_json::to_string(&t).ok()),
                    Err(e) => {
                        tracing::error!(session_id, error = %e, "prices of the shopping not captured");
                        None
                    }
                }
            }
            _ => None,
        };
        // A cancelled or closed order owes nothing.
        let owes_nothing = matches!(order_to, Some(OrderStatus::Cancelled | OrderStatus::Closed));
        let order_set = OrderUpdate {
            reason: step
                .abnormal_reason
                .as_deref()
                .or(failure)
                .or(order_set.reason),
            total_fen: order_set.total_fen.or(owes_nothing.then_some(0)),
            price_terms: order_set.price_terms.or(terms.as_deref()),
            ..order_set
        };
        // A failing session is recorded before its order: the cabinet is free as soon as it is.
        // Otherwise the order moves first and the session follows.
        let (session_first, session_last) = match step.failure {
            Some(_) => (step.session, None),
            None => (None, step.session),
        };
        if let Some(m) = session_first {
            self.store
                .transition_session(session_id, m.from.as_str(), m.to.as_str(), failure, now)
                .await?;
        }
        let mut took = true;
        if let Some(m) = step.order {
            took = self
                .store
                .transition_order(&o.id, &[m.from.as_str()], m.to.as_str(), &order_set, now)
                .await?;
            if took {
                self.metrics
                    .orders
                    .with_label_values(&[m.to.as_str()])
                    .inc();
            }
        }
        if let Some(m) = session_last {
            let moved = self
                .store
                .transition_session(session_id, m.from.as_str(), m.to.as_str(), None, now)
                .await?;
            if step.order.is_none() {
                took = moved.is_some();
            }
        }
        // Counted once the session has ended: the cabinet is free for the next shopper first.
        if took
            && step.order.is_some()
            && order_set.recognition_fee.is_some()
            && o.recognized_at.is_none()
        {
            self.recognized(&o.merchant_id).await;
        }
        Ok(took.then_some(step))
    }
}

/// Who did an audited action: an API key (its id and role), or the hub itself (`system`,
/// `supervisor`).
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    /// Key id, or `system` / `supervisor`.
    pub id: &'a str,
    /// The key's role, or `system`.
    pub role: &'a str,
}

impl Actor<'static> {
    /// The hub's own decisions (the automatic blacklist).
    pub const SYSTEM: Actor<'static> = Actor {
        id: "system",
        role: "system",
    };
    /// The session supervisor's sweep.
    pub const SUPERVISOR: Actor<'static> = Actor {
        id: "supervisor",
        role: "system",
    };
}

/// What an audited action did.
pub struct Audited<'a> {
    /// `order.refund` and the like (see [`crate::store::AuditRow`]).
    pub action: &'a str,
    /// Whose.
    pub merchant_id: Option<&'a str>,
    /// To what.
    pub subject: &'a str,
    /// The order it concerns.
    pub order_id: Option<&'a str>,
    /// Why.
    pub reason: Option<&'a str>,
    /// What, as JSON.
    pub detail: serde_json::Value,
}

impl Sessions {
    /// Records an action on the audit trail once it took effect. A failed write is logged as
    /// an error (the action stands; the trail has a gap the log tells of).
    pub async fn audit(&self, actor: Actor<'_>, a: Audited<'_>) {
        let row = crate::store::AuditRow {
            id: format!("au{}", crate::secrets::token(20).unwrap_or_default()),
            merchant_id: a.merchant_id.map(str::to_owned),
            actor: actor.id.to_owned(),
            role: actor.role.to_owned(),
            action: a.action.to_owned(),
            subject: a.subject.to_owned(),
            order_id: a.order_id.map(str::to_owned),
            reason: a.reason.map(str::to_owned),
            detail: a.detail.to_string(),
            at: self.now(),
        };
        if let Err(e) = self.store.record_audit(&row).await {
            tracing::error!(action = a.action, subject = a.subject, actor = actor.id, error = %e,
                "audit record not written");
        }
    }
}

/// A fresh id for this process: random, or (should the system have no randomness) the
/// process id and start time, which differ between boots all the same.
fn boot_id() -> String {
    crate::secrets::token(12).unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("p{}-{nanos}", std::process::id())
    })
}

/// The lifecycle a payment outcome (completed, paid, deduction or completion failed) meets:
/// the order's alone. Those events never read or move the session (see
/// `cabinet_actors::session`), so the session's row is not read for them; `Closed` stands in.
fn payment_lifecycle(o: &OrderRow) -> Result<Lifecycle, StoreError> {
    let corrupt = |what: &str, v: &str| StoreError::Corrupt(format!("{what} {v:?} of {}", o.id));
    let channel = o
        .channel
        .parse::<Channel>()
        .map_err(|_| corrupt("channel", &o.channel))?;
    Ok(Lifecycle {
        mode: match channel {
            Channel::None => SessionMode::Restock,
            Channel::Wechat | Channel::Alipay => SessionMode::Purchase,
        },
        channel,
        session: SessionState::Closed,
        order: o
            .status
            .parse::<OrderStatus>()
            .map_err(|_| corrupt("order status", &o.status))?,
    })
}

/// The typed lifecycle of stored rows; a state this version does not know is a corrupt row.
pub(super) fn lifecycle(s: &SessionRow, o: &OrderRow) -> Result<Lifecycle, StoreError> {
    let corrupt = |what: &str, v: &str| StoreError::Corrupt(format!("{what} {v:?} of {}", s.id));
    Ok(Lifecycle {
        mode: match s.mode.as_str() {
            "purchase" => SessionMode::Purchase,
            "restock" => SessionMode::Restock,
            m => return Err(corrupt("mode", m)),
        },
        channel: s
            .channel
            .parse::<Channel>()
            .map_err(|_| corrupt("channel", &s.channel))?,
        session: s
            .state
            .parse::<SessionState>()
            .map_err(|_| corrupt("session state", &s.state))?,
        ..payment_lifecycle(o)?
    })
}
