//! The JSON views of the API and the operator feed: typed, so that the OpenAPI document is
//! generated from the same structs that are sent. A leaf: views read rows and actor
//! snapshots and depend on nothing above them.

use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use cabinet_actors::alert::{ActiveAlert, Severity};
use cabinet_actors::machine::CabinetSnapshot;

use crate::store::{AlertRow, CabinetRow, OrderRow, PromotionRow};

/// Unix ms as RFC 3339 (UTC), as every time in a response.
pub fn rfc3339(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// An active alert as a cabinet's live state carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActiveAlertView {
    /// Alert id.
    pub id: String,
    /// Alert type (PROTOCOL.md).
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: cabinet_actors::alert::AlertType,
    /// `critical`, `warning` or `info`.
    #[schema(value_type = String)]
    pub severity: Severity,
    /// RFC 3339.
    pub raised_at: Option<String>,
    /// An operator acknowledged it.
    pub acked: bool,
    /// Context.
    pub detail: Option<String>,
    /// Raised more than 5 times within 10 minutes: kept as this one alert until quiet.
    pub flapping: bool,
    /// While flapping, how many times its condition was raised; 0 otherwise.
    pub flaps: u32,
}

impl From<&ActiveAlert> for ActiveAlertView {
    fn from(a: &ActiveAlert) -> Self {
        Self {
            id: a.id.clone(),
            kind: a.kind,
            severity: a.kind.severity(),
            raised_at: rfc3339(a.raised_at as i64),
            acked: a.acked,
            detail: a.detail.clone(),
            flapping: a.flapping,
            flaps: a.flaps,
        }
    }
}

/// Desired and reported configuration versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigVersions {
    /// The version the hub wants the cabinet on.
    pub desired: Option<u64>,
    /// The version the cabinet last reported.
    pub reported: Option<u64>,
}

/// A cabinet's live state, as the API and the feed's `cabinet` events show it (the same shape
/// in both, so a screen merges a delta into its snapshot row field by field).
#[derive(Debug, Serialize, ToSchema)]
pub struct CabinetLive {
    /// Cabinet id.
    #[schema(value_type = String)]
    pub id: cabinet_actors::ids::CabinetId,
    /// Owner.
    pub merchant_id: String,
    /// Connected and heard from recently.
    pub online: bool,
    /// `open` or `closed`.
    #[schema(value_type = Option<String>)]
    pub door: Option<cabinet_actors::protocol::Door>,
    /// `locked` or `unlocked`.
    #[schema(value_type = Option<String>)]
    pub lock: Option<cabinet_actors::protocol::Lock>,
    /// Camera health.
    #[schema(value_type = Vec<Object>)]
    pub cameras: Vec<cabinet_actors::protocol::CameraStatus>,
    /// Temperature.
    pub temp_c: Option<f64>,
    /// Light strip.
    #[schema(value_type = Option<String>)]
    pub light: Option<cabinet_actors::protocol::Light>,
    /// Firmware.
    pub fw: Option<String>,
    /// The model the cabinet reports.
    pub reported_model: Option<String>,
    /// The cabinet's current boot.
    pub boot_id: Option<String>,
    /// Configuration versions.
    pub config_version: ConfigVersions,
    /// A fault (camera, lock) stops sessions.
    pub faulted: bool,
    /// Locked down by an operator or the foreign-object rule.
    pub locked_down: bool,
    /// Active alerts.
    pub alerts: Vec<ActiveAlertView>,
    /// The open session, if any.
    #[schema(value_type = Option<Object>)]
    pub session: Option<cabinet_actors::machine::OpenSession>,
    /// RFC 3339.
    pub last_seen_at: Option<String>,
}

impl CabinetLive {
    /// The live view of a snapshot, for `merchant_id`'s screens.
    pub fn new(s: &CabinetSnapshot, merchant_id: &str) -> Self {
        Self {
            id: s.id.clone(),
            merchant_id: merchant_id.to_owned(),
            online: s.online,
            door: s.door,
            lock: s.lock,
            cameras: s.cameras.clone(),
            temp_c: s.temp_c,
            light: s.light,
            fw: s.fw.clone(),
            reported_model: s.model.clone(),
            boot_id: s.boot_id.clone(),
            config_version: ConfigVersions {
                desired: s.config_version_desired,
                reported: s.config_version_reported,
            },
            faulted: s.faulted,
            locked_down: s.locked_down,
            alerts: s.alerts.iter().map(ActiveAlertView::from).collect(),
            session: s.session.clone(),
            last_seen_at: s.last_seen_ms.and_then(|m| rfc3339(m as i64)),
        }
    }
}

/// A cabinet as the API shows it: its registration and its live state.
#[derive(Debug, Serialize, ToSchema)]
pub struct CabinetView {
    /// Live state (offline and empty when no actor runs for it).
    #[serde(flatten)]
    pub live: CabinetLive,
    /// The registered model.
    pub model: String,
    /// Placement (点位).
    pub point: String,
    /// `registered` or `active`.
    pub status: &'static str,
    /// RFC 3339.
    pub registered_at: Option<String>,
    /// RFC 3339.
    pub activated_at: Option<String>,
    /// RFC 3339.
    pub service_expires_at: Option<String>,
    /// Whether an actor runs for it on this node.
    pub actor: bool,
    /// The MQTT secret: only in the answer to the registration, never again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl CabinetView {
    /// The view of a registered cabinet, with its live state when it has an actor. `None` when
    /// the stored id is not a valid cabinet id (a hand-edited row).
    pub fn new(row: &CabinetRow, live: Option<&CabinetSnapshot>) -> Option<Self> {
        let offline;
        let snapshot = match live {
            Some(s) => s,
            None => {
                offline =
                    CabinetSnapshot::offline(cabinet_actors::ids::CabinetId::parse(&row.id).ok()?);
                &offline
            }
        };
        Some(Self {
            live: CabinetLive::new(snapshot, &row.merchant_id),
            model: row.model.clone(),
            point: row.point.clone(),
            status: if row.active { "active" } else { "registered" },
            registered_at: rfc3339(row.created_at),
            activated_at: row.activated_at.and_then(rfc3339),
            service_expires_at: row.service_expires_at.and_then(rfc3339),
            actor: live.is_some(),
            secret: None,
        })
    }
}

/// A stored alert, active or ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertView {
    /// Id.
    pub id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Alert type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Severity.
    pub severity: String,
    /// Context.
    pub detail: Option<String>,
    /// RFC 3339.
    pub raised_at: Option<String>,
    /// RFC 3339.
    pub acked_at: Option<String>,
    /// Key id.
    pub acked_by: Option<String>,
    /// RFC 3339.
    pub cleared_at: Option<String>,
    /// `condition` or a key id.
    pub cleared_by: Option<String>,
    /// Not cleared yet.
    pub active: bool,
    /// It flapped (raised more than 5 times within 10 minutes): one row for all of it.
    pub flapping: bool,
    /// How many times its condition was raised while it flapped; 0 if it never did.
    pub flaps: i64,
}

impl From<&AlertRow> for AlertView {
    fn from(a: &AlertRow) -> Self {
        Self {
            id: a.id.clone(),
            cabinet_id: a.cabinet_id.clone(),
            merchant_id: a.merchant_id.clone(),
            kind: a.kind.clone(),
            severity: a.severity.clone(),
            detail: a.detail.clone(),
            raised_at: rfc3339(a.raised_at),
            acked_at: a.acked_at.and_then(rfc3339),
            acked_by: a.acked_by.clone(),
            cleared_at: a.cleared_at.and_then(rfc3339),
            cleared_by: a.cleared_by.clone(),
            active: a.cleared_at.is_none(),
            flapping: a.flaps > 0,
            flaps: a.flaps,
        }
    }
}

/// An alert's change as the feed's `alert` events show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertEvent<'a> {
    /// Cabinet.
    #[schema(value_type = String)]
    pub cabinet_id: &'a cabinet_actors::ids::CabinetId,
    /// Merchant.
    #[schema(value_type = String)]
    pub merchant_id: &'a cabinet_actors::ids::MerchantId,
    /// `raised`, `acked` or `cleared`.
    pub state: &'static str,
    /// The alert.
    pub alert: ActiveAlertView,
    /// Its severity.
    #[schema(value_type = String)]
    pub severity: Severity,
}

/// A JSON column (items, priced order) sent as stored, without parsing it into a tree.
fn json_column(s: &Option<String>) -> Option<Box<RawValue>> {
    s.as_deref()
        .and_then(|t| RawValue::from_string(t.to_owned()).ok())
}

/// An order as the API and the feed's `order` events show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderView {
    /// Id.
    pub id: String,
    /// Its session.
    pub session_id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Shopper.
    pub user_id: String,
    /// `wechat`, `alipay` or `none`.
    pub channel: String,
    /// `open`, `completing`, `pending_payment`, `paid`, `closed`, `abnormal`, `cancelled`.
    pub status: String,
    /// Why abnormal.
    pub abnormal_reason: Option<String>,
    /// Recognised items.
    #[schema(value_type = Option<Object>)]
    pub items: Option<Box<RawValue>>,
    /// The priced order: lines, discounts, total.
    #[schema(value_type = Option<Object>)]
    pub priced: Option<Box<RawValue>>,
    /// Final amount, fen.
    pub total_fen: Option<i64>,
    /// Paid, fen.
    pub paid_fen: i64,
    /// Refunded, fen: refunds the provider says succeeded.
    pub refunded_fen: i64,
    /// Refunds in flight (processing), fen: reserved against the paid amount.
    pub refunding_fen: i64,
    /// When it was paid, RFC 3339 (the provider's refund window runs from here).
    pub paid_at: Option<String>,
    /// The provider's trade number.
    pub transaction_id: Option<String>,
    /// A failed deduction's side: `merchant` (its collection limits; the shopper is not held to
    /// it), otherwise the shopper's.
    pub deduction_failure: Option<String>,
    /// RFC 3339.
    pub created_at: Option<String>,
    /// RFC 3339.
    pub updated_at: Option<String>,
    /// `GET /api/v1/orders/{id}` only: its refunds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunds: Option<Vec<crate::store::RefundRow>>,
    /// `GET /api/v1/orders/{id}` only: who did what to it (newest first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<Vec<crate::store::AuditRow>>,
    /// `GET /api/v1/orders/{id}` only: how its payment is split between the platform and the
    /// merchant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settlement: Option<SettlementView>,
}

/// An order's settlement (分账) as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettlementView {
    /// `none` (no settlement follows this order: not a WeChat order, settlement off, nothing
    /// paid), `pending`, `splitting`, `split`, `finished`, `failed`, `returned`.
    pub state: String,
    /// The platform's commission, basis points (fixed when the order was completed).
    pub commission_bps: Option<i64>,
    /// The platform's share, fen (fixed when the split is asked for).
    pub platform_fen: i64,
    /// The merchant's share, fen.
    pub merchant_fen: i64,
    /// Of the platform's share, what went back to the merchant ahead of refunds, fen.
    pub returned_fen: i64,
    /// Failures in a row; the last one's words.
    pub failures: i64,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the supervisor takes it next, RFC 3339 (while not settled).
    pub next_attempt_at: Option<String>,
    /// RFC 3339.
    pub updated_at: Option<String>,
    /// Returns of the platform's share ahead of refunds.
    pub returns: Vec<crate::store::SettlementReturnRow>,
}

impl SettlementView {
    /// The view of a settlement and its returns, or `none`.
    pub fn of(
        s: Option<&crate::store::SettlementRow>,
        returns: Vec<crate::store::SettlementReturnRow>,
    ) -> Self {
        match s {
            None => Self {
                state: "none".into(),
                commission_bps: None,
                platform_fen: 0,
                merchant_fen: 0,
                returned_fen: 0,
                failures: 0,
                last_error: None,
                next_attempt_at: None,
                updated_at: None,
                returns,
            },
            Some(s) => Self {
                state: s.state.clone(),
                commission_bps: Some(s.commission_bps),
                platform_fen: s.platform_fen,
                merchant_fen: s.merchant_fen,
                returned_fen: s.returned_fen,
                failures: s.failures,
                last_error: s.last_error.clone(),
                next_attempt_at: matches!(
                    s.state.as_str(),
                    "pending" | "splitting" | "split" | "failed"
                )
                .then(|| rfc3339(s.due_at))
                .flatten(),
                updated_at: rfc3339(s.updated_at),
                returns,
            },
        }
    }
}

impl From<&OrderRow> for OrderView {
    fn from(o: &OrderRow) -> Self {
        Self {
            id: o.id.clone(),
            session_id: o.session_id.clone(),
            cabinet_id: o.cabinet_id.clone(),
            merchant_id: o.merchant_id.clone(),
            user_id: o.user_id.clone(),
            channel: o.channel.clone(),
            status: o.status.clone(),
            abnormal_reason: o.abnormal_reason.clone(),
            items: json_column(&o.items),
            priced: json_column(&o.priced),
            total_fen: o.total_fen,
            paid_fen: o.paid_fen,
            refunded_fen: o.refunded_fen,
            refunding_fen: o.refund_reserved_fen,
            paid_at: o.paid_at.and_then(rfc3339),
            transaction_id: o.transaction_id.clone(),
            deduction_failure: o.deduction_failure.clone(),
            created_at: rfc3339(o.created_at),
            updated_at: rfc3339(o.updated_at),
            refunds: None,
            audit: None,
            settlement: None,
        }
    }
}

/// A session and its order.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// The session (times in Unix ms).
    pub session: Option<crate::store::SessionRow>,
    /// Its order.
    pub order: Option<OrderView>,
}

/// A purchase session waiting for the shopper's confirmation (需确认模式), as
/// `POST /api/v1/sessions` answers it (202): the merchant's front end passes `confirmation` on
/// unchanged to the shopper's WeChat or Alipay.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfirmingView {
    /// The session, `confirming`.
    pub session: Option<crate::store::SessionRow>,
    /// Its order.
    pub order: Option<OrderView>,
    /// WeChat: `{"channel":"wechat","business_type":"wxpayScoreUse","extra_data":{"mch_id",
    /// "package","timestamp","nonce_str","sign_type":"HMAC-SHA256","sign"}}`; Alipay:
    /// `{"channel":"alipay","order_str"}`.
    #[schema(value_type = Object)]
    pub confirmation: crate::payments::Confirmation,
}

/// A promotion.
#[derive(Debug, Serialize, ToSchema)]
pub struct PromotionView {
    /// Id.
    pub id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Name (shown on the provider's bill).
    pub name: String,
    /// When it applies.
    #[schema(value_type = Object)]
    pub window: cabinet_actors::pricing::Window,
    /// What it takes off.
    #[schema(value_type = Object)]
    pub offer: cabinet_actors::pricing::Offer,
    /// Only these cabinets; all the merchant's when absent.
    pub cabinet_ids: Option<Vec<String>>,
    /// RFC 3339.
    pub created_at: Option<String>,
    /// RFC 3339.
    pub ended_at: Option<String>,
    /// Not ended.
    pub active: bool,
}

impl From<&PromotionRow> for PromotionView {
    fn from(p: &PromotionRow) -> Self {
        Self {
            id: p.id.clone(),
            merchant_id: p.merchant_id.clone(),
            name: p.name.clone(),
            window: p.rule.window.clone(),
            offer: p.rule.offer.clone(),
            cabinet_ids: p.cabinet_ids.clone(),
            created_at: rfc3339(p.created_at),
            ended_at: p.ended_at.and_then(rfc3339),
            active: p.ended_at.is_none(),
        }
    }
}

/// A list answer: the items and how many.
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T> {
    /// The items.
    pub items: Vec<T>,
    /// How many.
    pub count: usize,
}

impl<T> From<Vec<T>> for List<T> {
    fn from(items: Vec<T>) -> Self {
        Self {
            count: items.len(),
            items,
        }
    }
}

/// A service-time order.
#[derive(Serialize, ToSchema)]
pub struct ServiceOrderView {
    /// Id (the provider's out_trade_no).
    id: String,
    /// Whose.
    merchant_id: String,
    /// The cabinets.
    cabinet_ids: Vec<String>,
    /// Years for each.
    years: i64,
    /// One cabinet's year (fen).
    unit_fen: i64,
    /// What is owed (fen).
    amount_fen: i64,
    /// `wechat` or `offline`.
    channel: String,
    /// `unpaid`, `paid` (the cabinets' service was extended), `cancelled`.
    status: String,
    /// What the payer scans with WeChat while it is unpaid.
    code_url: Option<String>,
    /// The provider's transaction id.
    transaction_id: Option<String>,
    /// An offline payment's voucher reference.
    voucher: Option<String>,
    /// RFC 3339.
    created_at: Option<String>,
    /// Unpaid by then, it is closed and cancelled (RFC 3339).
    pay_by: Option<String>,
    /// RFC 3339.
    paid_at: Option<String>,
    /// RFC 3339.
    cancelled_at: Option<String>,
}

impl From<crate::store::ServiceOrderRow> for ServiceOrderView {
    fn from(o: crate::store::ServiceOrderRow) -> Self {
        let cabinet_ids = o.cabinet_list();
        let unpaid = o.status == "unpaid";
        Self {
            id: o.id,
            merchant_id: o.merchant_id,
            cabinet_ids,
            years: o.years,
            unit_fen: o.unit_fen,
            amount_fen: o.amount_fen,
            channel: o.channel,
            status: o.status,
            code_url: o.code_url.filter(|_| unpaid),
            transaction_id: o.transaction_id,
            voucher: o.voucher,
            created_at: rfc3339(o.created_at),
            pay_by: if unpaid { rfc3339(o.due_at) } else { None },
            paid_at: o.paid_at.and_then(rfc3339),
            cancelled_at: o.cancelled_at.and_then(rfc3339),
        }
    }
}
