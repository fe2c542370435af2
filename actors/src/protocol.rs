//! The cabinet ↔ hub MQTT contract (PROTOCOL.md, version 1) as types, and the one parser every
//! uplink message goes through. Nothing that fails here reaches an actor.

use serde::{Deserialize, Serialize};

use crate::ids::CabinetId;
use crate::pricing::Limits;

/// Largest payload a cabinet may send (PROTOCOL.md: "at most 16 KiB").
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Longest opaque token (boot id, session id, command id) the hub accepts.
pub const MAX_TOKEN_LEN: usize = 64;
/// Longest free-text `detail` or `reason`.
pub const MAX_TEXT_LEN: usize = 1024;
/// Largest quantity of one line of a purchase recognition's `items` (the default
/// `limits.max_line_qty`).
pub const MAX_RECOGNITION_QTY: u32 = Limits::DEFAULT.max_line_qty;
/// Most lines in a purchase recognition's `items` (the default `limits.max_basket_lines`).
pub const MAX_RECOGNITION_LINES: usize = Limits::DEFAULT.max_basket_lines;

/// Why an uplink message was refused. The label values are stable: they are metric labels
/// (`mqtt_rejected_total{reason}`) and log fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The topic is not `/tenants/{id}/{kind}`.
    BadTopic,
    /// The topic names a kind the protocol does not define.
    UnknownTopic,
    /// The id in the topic is not a valid cabinet id.
    BadCabinetId,
    /// More than [`MAX_PAYLOAD_BYTES`].
    Oversize,
    /// Not UTF-8 or not a JSON object.
    MalformedJson,
    /// JSON, but a field is missing, of the wrong type or out of range.
    InvalidPayload,
    /// A well-formed message from a cabinet that is not registered and active.
    UnknownCabinet,
    /// A recognition whose `items` has more than [`MAX_RECOGNITION_LINES`] lines or a line
    /// above [`MAX_RECOGNITION_QTY`].
    OutOfRange,
}

impl RejectReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::BadTopic,
        RejectReason::UnknownTopic,
        RejectReason::BadCabinetId,
        RejectReason::Oversize,
        RejectReason::MalformedJson,
        RejectReason::InvalidPayload,
        RejectReason::UnknownCabinet,
        RejectReason::OutOfRange,
    ];

    /// The stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadTopic => "bad_topic",
            RejectReason::UnknownTopic => "unknown_topic",
            RejectReason::BadCabinetId => "bad_cabinet_id",
            RejectReason::Oversize => "oversize",
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::InvalidPayload => "invalid_payload",
            RejectReason::UnknownCabinet => "unknown_cabinet",
            RejectReason::OutOfRange => "out_of_range",
        }
    }
}

/// A refused uplink message: the reason, a human detail, and the cabinet when the topic named one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} ({detail})", reason.as_str())]
pub struct Rejection {
    /// The counted reason.
    pub reason: RejectReason,
    /// What exactly was wrong, for the log.
    pub detail: String,
    /// The cabinet named by the topic, when it parsed.
    pub cabinet: Option<CabinetId>,
}

/// The uplink topics a cabinet publishes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UplinkKind {
    /// `/tenants/{id}/status`
    Status,
    /// `/tenants/{id}/heartbeat`
    Heartbeat,
    /// `/tenants/{id}/event`
    Event,
    /// `/tenants/{id}/ack`
    Ack,
    /// `/tenants/{id}/recognition`
    Recognition,
}

impl UplinkKind {
    /// Every kind, for pre-registering metric series.
    pub const ALL: [UplinkKind; 5] = [
        UplinkKind::Status,
        UplinkKind::Heartbeat,
        UplinkKind::Event,
        UplinkKind::Ack,
        UplinkKind::Recognition,
    ];

    /// The topic suffix, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkKind::Status => "status",
            UplinkKind::Heartbeat => "heartbeat",
            UplinkKind::Event => "event",
            UplinkKind::Ack => "ack",
            UplinkKind::Recognition => "recognition",
        }
    }
}

/// Where a topic points, once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicTarget {
    /// An uplink topic of a cabinet.
    Uplink(CabinetId, UplinkKind),
    /// The hub's own downlink topic (`/tenants/{id}/cmd`): not an uplink, ignored by the pump.
    Command(CabinetId),
}

/// The downlink topic of a cabinet.
pub fn command_topic(id: &CabinetId) -> String {
    format!("/tenants/{id}/cmd")
}

/// Parses a topic into the cabinet and kind.
pub fn parse_topic(topic: &str) -> Result<TopicTarget, Rejection> {
    let reject = |reason, detail: String, cabinet| Rejection {
        reason,
        detail,
        cabinet,
    };
    let Some(rest) = topic.strip_prefix("/tenants/") else {
        return Err(reject(
            RejectReason::BadTopic,
            format!("topic {topic:?} does not start with /tenants/"),
            None,
        ));
    };
    let mut parts = rest.split('/');
    let (Some(id), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(reject(
            RejectReason::BadTopic,
            format!("topic {topic:?} is not /tenants/{{id}}/{{kind}}"),
            None,
        ));
    };
    let cabinet = CabinetId::parse(id).map_err(|e| {
        reject(
            RejectReason::BadCabinetId,
            format!("cabinet id {id:?} in topic: {e}"),
            None,
        )
    })?;
    let kind = match kind {
        "status" => UplinkKind::Status,
        "heartbeat" => UplinkKind::Heartbeat,
        "event" => UplinkKind::Event,
        "ack" => UplinkKind::Ack,
        "recognition" => UplinkKind::Recognition,
        "cmd" => return Ok(TopicTarget::Command(cabinet)),
        other => {
            return Err(reject(
                RejectReason::UnknownTopic,
                format!("unknown topic kind {other:?}"),
                Some(cabinet),
            ))
        }
    };
    Ok(TopicTarget::Uplink(cabinet, kind))
}

/// Why a cabinet (re)booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootReason {
    /// Power was applied.
    PowerOn,
    /// The watchdog reset it.
    Watchdog,
    /// A firmware update.
    Ota,
    /// Only the network connection was re-established.
    Reconnect,
}

/// `/tenants/{id}/status`: the online notice after every connect, or the Last Will.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `false` in the Last Will.
    pub online: bool,
    /// Changes at every boot; required when `online`.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Firmware version.
    #[serde(default)]
    pub fw: Option<String>,
    /// Cabinet model.
    #[serde(default)]
    pub model: Option<String>,
    /// The configuration version the cabinet runs.
    #[serde(default)]
    pub config_version: Option<u64>,
    /// Why it booted.
    #[serde(default)]
    pub boot: Option<BootReason>,
}

/// Door position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Door {
    /// Open.
    Open,
    /// Closed.
    Closed,
}

/// Lock state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lock {
    /// Latched.
    Locked,
    /// Released.
    Unlocked,
    /// The lock reports a fault.
    Fault,
}

/// Light strip state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Light {
    /// On.
    On,
    /// Off.
    Off,
}

/// One camera's health in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CameraStatus {
    /// Camera index.
    pub id: u32,
    /// Whether it works.
    pub ok: bool,
}

/// `/tenants/{id}/heartbeat`: periodic state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Per-boot sequence number shared with events.
    pub seq: u64,
    /// Cabinet clock, Unix ms.
    pub ts: u64,
    /// Door position.
    pub door: Door,
    /// Lock state.
    pub lock: Lock,
    /// Inside temperature; absent on unrefrigerated cabinets.
    #[serde(default)]
    pub temp_c: Option<f64>,
    /// Light strip.
    #[serde(default)]
    pub light: Option<Light>,
    /// Cameras; absent on gravity-shelf cabinets.
    #[serde(default)]
    pub cameras: Option<Vec<CameraStatus>>,
    /// The configuration version the cabinet runs.
    #[serde(default)]
    pub config_version: Option<u64>,
}

/// The event types of `/tenants/{id}/event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// The door opened.
    DoorOpened,
    /// The door closed.
    DoorClosed,
    /// The lock latched.
    LockLocked,
    /// The lock released.
    LockUnlocked,
    /// The lock reports a fault.
    LockFault,
    /// A camera failed.
    CameraFault,
    /// Cameras work again.
    CameraOk,
    /// Power came back after a cut.
    PowerRestored,
    /// Someone tampered with the cabinet.
    Tamper,
}

/// `/tenants/{id}/event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Per-boot sequence number shared with heartbeats.
    pub seq: u64,
    /// Cabinet clock, Unix ms.
    pub ts: u64,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The session the cabinet knows to be in progress.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Free text.
    #[serde(default)]
    pub detail: Option<String>,
}

/// `/tenants/{id}/ack`: the reply to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The command answered.
    pub cmd_id: String,
    /// Whether it was carried out.
    pub ok: bool,
    /// Why not (`lock_jammed`, `busy`, `expired`, `locked_down`, `unknown_command`, `bad_config`).
    #[serde(default)]
    pub error: Option<String>,
}

/// Outcome of a recognition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecognitionStatus {
    /// Recognised.
    Ok,
    /// Recognition failed.
    Failed,
}

/// A product and a count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemCount {
    /// Product code.
    pub sku: String,
    /// How many.
    pub qty: u32,
}

/// `/tenants/{id}/recognition`: what was taken (purchase) or counted (restock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recognition {
    /// The session recognised.
    pub session_id: String,
    /// Whether recognition worked.
    pub status: RecognitionStatus,
    /// Purchase: the goods taken.
    #[serde(default)]
    pub items: Option<Vec<ItemCount>>,
    /// Restock: the full stock counted.
    #[serde(default)]
    pub stock: Option<Vec<ItemCount>>,
    /// Why recognition failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A parsed uplink payload.
#[derive(Debug, Clone, PartialEq)]
pub enum UplinkBody {
    /// Online notice or Last Will.
    Status(Status),
    /// Periodic state.
    Heartbeat(Heartbeat),
    /// Door, lock, camera and power events.
    Event(Event),
    /// Command reply.
    Ack(Ack),
    /// Recognition result.
    Recognition(Recognition),
}

impl UplinkBody {
    /// The topic kind this body came from.
    pub fn kind(&self) -> UplinkKind {
        match self {
            UplinkBody::Status(_) => UplinkKind::Status,
            UplinkBody::Heartbeat(_) => UplinkKind::Heartbeat,
            UplinkBody::Event(_) => UplinkKind::Event,
            UplinkBody::Ack(_) => UplinkKind::Ack,
            UplinkBody::Recognition(_) => UplinkKind::Recognition,
        }
    }
}

/// A parsed uplink message.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    /// The cabinet named by the topic.
    pub cabinet: CabinetId,
    /// The payload.
    pub body: UplinkBody,
}

fn invalid(cabinet: &CabinetId, detail: String) -> Rejection {
    Rejection {
        reason: RejectReason::InvalidPayload,
        detail,
        cabinet: Some(cabinet.clone()),
    }
}

fn check_token(cabinet: &CabinetId, field: &str, value: Option<&str>) -> Result<(), Rejection> {
    match value {
        Some(v) if v.is_empty() || v.len() > MAX_TOKEN_LEN => Err(invalid(
            cabinet,
            format!("{field} must be 1 to {MAX_TOKEN_LEN} characters"),
        )),
        _ => Ok(()),
    }
}

fn check_text(cabinet: &CabinetId, field: &str, value: Option<&str>) -> Result<(), Rejection> {
    match value {
        Some(v) if v.len() > MAX_TEXT_LEN => Err(invalid(
            cabinet,
            format!("{field} longer than {MAX_TEXT_LEN} bytes"),
        )),
        _ => Ok(()),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    cabinet: &CabinetId,
    payload: &[u8],
) -> Result<T, Rejection> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| Rejection {
        reason: RejectReason::MalformedJson,
        detail: format!("not JSON: {e}"),
        cabinet: Some(cabinet.clone()),
    })?;
    if !value.is_object() {
        return Err(Rejection {
            reason: RejectReason::MalformedJson,
            detail: "payload is not a JSON object".to_owned(),
            cabinet: Some(cabinet.clone()),
        });
    }
    serde_json::from_value(value).map_err(|e| invalid(cabinet, e.to_string()))
}

/// Parses one uplink message. This is the only way into the hub for cabinet data.
pub fn parse_uplink(
    cabinet: CabinetId,
    kind: UplinkKind,
    payload: &[u8],
) -> Result<Uplink, Rejection> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Rejection {
            reason: RejectReason::Oversize,
            detail: format!("{} bytes, at most {MAX_PAYLOAD_BYTES}", payload.len()),
            cabinet: Some(cabinet),
        });
    }
    let body = match kind {
        UplinkKind::Status => {
            let s: Status = decode(&cabinet, payload)?;
            if s.online && s.boot_id.is_none() {
                return Err(invalid(&cabinet, "boot_id is required when online".into()));
            }
            check_token(&cabinet, "boot_id", s.boot_id.as_deref())?;
            check_text(&cabinet, "fw", s.fw.as_deref())?;
            check_text(&cabinet, "model", s.model.as_deref())?;
            UplinkBody::Status(s)
        }
        UplinkKind::Heartbeat => {
            let h: Heartbeat = decode(&cabinet, payload)?;
            if let Some(t) = h.temp_c {
                if !t.is_finite() || !(-100.0..=150.0).contains(&t) {
                    return Err(invalid(&cabinet, format!("temp_c {t} out of range")));
                }
            }
            if h.cameras.as_ref().is_some_and(|c| c.len() > 64) {
                return Err(invalid(&cabinet, "more than 64 cameras".into()));
            }
            UplinkBody::Heartbeat(h)
        }
        UplinkKind::Event => {
            let e: Event = decode(&cabinet, payload)?;
            check_token(&cabinet, "session_id", e.session_id.as_deref())?;
            check_text(&cabinet, "detail", e.detail.as_deref())?;
            UplinkBody::Event(e)
        }
        UplinkKind::Ack => {
            let a: Ack = decode(&cabinet, payload)?;
            check_token(&cabinet, "cmd_id", Some(&a.cmd_id))?;
            check_text(&cabinet, "error", a.error.as_deref())?;
            UplinkBody::Ack(a)
        }
        UplinkKind::Recognition => {
            let r: Recognition = decode(&cabinet, payload)?;
            check_token(&cabinet, "session_id", Some(&r.session_id))?;
            check_text(&cabinet, "reason", r.reason.as_deref())?;
            let lines = r.items.iter().chain(r.stock.iter()).flatten();
            for item in lines {
                if item.sku.is_empty() || item.sku.len() > MAX_TOKEN_LEN {
                    return Err(invalid(&cabinet, format!("sku {:?} invalid", item.sku)));
                }
            }
            // A purchase basket beyond the caps cannot be priced: refuse it here, counted,
            // rather than let a wrapped or absurd quantity reach pricing. (`stock` is a count,
            // not a sale; the payload size bounds it.)
            let items = r.items.as_deref().unwrap_or_default();
            let out_of_range = |detail: String| Rejection {
                reason: RejectReason::OutOfRange,
                detail,
                cabinet: Some(cabinet.clone()),
            };
            if items.len() > MAX_RECOGNITION_LINES {
                return Err(out_of_range(format!(
                    "{} item lines, at most {MAX_RECOGNITION_LINES}",
                    items.len()
                )));
            }
            if let Some((i, item)) = items
                .iter()
                .enumerate()
                .find(|(_, it)| it.qty > MAX_RECOGNITION_QTY)
            {
                return Err(out_of_range(format!(
                    "items[{i}] ({}): qty {} above {MAX_RECOGNITION_QTY}",
                    item.sku, item.qty
                )));
            }
            UplinkBody::Recognition(r)
        }
    };
    Ok(Uplink { cabinet, body })
}

/// Light strip schedule, local time `HH:MM`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LightSchedule {
    /// When the strip turns on.
    pub on: String,
    /// When the strip turns off.
    pub off: String,
}

/// The settings pushed to a cabinet with `configure`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CabinetConfig {
    /// Monotonic version; a cabinet reports the one it runs.
    pub version: u64,
    /// Target temperature.
    pub temp_target_c: f64,
    /// The allowed range; outside it for long raises `temperature_out_of_range`.
    pub temp_range_c: [f64; 2],
    /// Light strip schedule.
    pub light: LightSchedule,
    /// Heartbeat interval.
    pub heartbeat_s: u32,
    /// The foreign-object lock (异物锁柜) switch.
    pub foreign_object_lock: bool,
}

/// Unlock purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// A shopper buys.
    Purchase,
    /// A restocker fills.
    Restock,
}

/// A command's body, tagged by `type` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandBody {
    /// Open the door for a session.
    Unlock {
        /// The session.
        session_id: String,
        /// Purchase or restock.
        mode: SessionMode,
        /// Unix ms after which the cabinet must refuse (`expired`).
        expires_at: u64,
    },
    /// Apply settings.
    Configure {
        /// The settings.
        config: CabinetConfig,
    },
    /// Refuse (or allow again) local and remote opening.
    Lockdown {
        /// On or off.
        on: bool,
        /// Why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Restart the controller.
    Reboot,
}

/// The command kinds, for metrics and outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// `unlock`
    Unlock,
    /// `configure`
    Configure,
    /// `lockdown`
    Lockdown,
    /// `reboot`
    Reboot,
}

impl CommandKind {
    /// Every kind, for pre-registering metric series.
    pub const ALL: [CommandKind; 4] = [
        CommandKind::Unlock,
        CommandKind::Configure,
        CommandKind::Lockdown,
        CommandKind::Reboot,
    ];

    /// The wire name, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Unlock => "unlock",
            CommandKind::Configure => "configure",
            CommandKind::Lockdown => "lockdown",
            CommandKind::Reboot => "reboot",
        }
    }
}

impl CommandBody {
    /// The kind of this command.
    pub fn kind(&self) -> CommandKind {
        match self {
            CommandBody::Unlock { .. } => CommandKind::Unlock,
            CommandBody::Configure { .. } => CommandKind::Configure,
            CommandBody::Lockdown { .. } => CommandKind::Lockdown,
            CommandBody::Reboot => CommandKind::Reboot,
        }
    }
}

/// A command as published on `/tenants/{id}/cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Idempotency key; the cabinet acks with it.
    pub cmd_id: String,
    /// What to do.
    #[serde(flatten)]
    pub body: CommandBody,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> CabinetId {
        CabinetId::parse("KM400A00017").unwrap_or_else(|e| panic!("{e}"))
    }

    fn reason(kind: UplinkKind, payload: &str) -> Option<RejectReason> {
        parse_uplink(id(), kind, payload.as_bytes())
            .err()
            .map(|r| r.reason)
    }

    #[test]
    fn the_protocol_examples_parse() {
        let ok = [
            (
                UplinkKind::Status,
                r#"{"online":true,"boot_id":"b7f3","fw":"2.4.1","model":"KM-400","config_version":3,"boot":"power_on"}"#,
            ),
            (UplinkKind::Status, r#"{"online":false}"#),
            (
                UplinkKind::Heartbeat,
                r#"{"seq":42,"ts":1763700000000,"door":"closed","lock":"locked","temp_c":4.6,"light":"on","cameras":[{"id":0,"ok":true},{"id":1,"ok":false}],"config_version":3}"#,
            ),
            (
                UplinkKind::Event,
                r#"{"seq":43,"ts":1763700001000,"type":"door_opened","session_id":"s_01J"}"#,
            ),
            (UplinkKind::Ack, r#"{"cmd_id":"c_01J","ok":true}"#),
            (
                UplinkKind::Ack,
                r#"{"cmd_id":"c_01J","ok":false,"error":"lock_jammed"}"#,
            ),
            (
                UplinkKind::Recognition,
                r#"{"session_id":"s_01J","status":"ok","items":[{"sku":"6901234567890","qty":2}]}"#,
            ),
            (
                UplinkKind::Recognition,
                r#"{"session_id":"s_01J","status":"failed","reason":"camera_blocked"}"#,
            ),
            (
                UplinkKind::Recognition,
                r#"{"session_id":"s_01J","status":"ok","stock":[{"sku":"6901234567890","qty":12}]}"#,
            ),
        ];
        for (kind, payload) in ok {
            let parsed = parse_uplink(id(), kind, payload.as_bytes());
            assert!(parsed.is_ok(), "{payload}: {parsed:?}");
            assert_eq!(parsed.map(|u| u.body.kind()).ok(), Some(kind));
        }
    }

    #[test]
    fn bad_payloads_get_their_reason() {
        assert_eq!(
            reason(UplinkKind::Heartbeat, "{not json"),
            Some(RejectReason::MalformedJson)
        );
        assert_eq!(
            reason(UplinkKind::Heartbeat, "[1,2]"),
            Some(RejectReason::MalformedJson)
        );
        assert_eq!(
            reason(
                UplinkKind::Heartbeat,
                r#"{"seq":"x","ts":1,"door":"closed","lock":"locked"}"#
            ),
            Some(RejectReason::InvalidPayload)
        );
        assert_eq!(
            reason(
                UplinkKind::Heartbeat,
                r#"{"seq":1,"ts":1,"door":"ajar","lock":"locked"}"#
            ),
            Some(RejectReason::InvalidPayload)
        );
        assert_eq!(
            reason(UplinkKind::Event, r#"{"seq":1,"ts":1,"type":"exploded"}"#),
            Some(RejectReason::InvalidPayload)
        );
        assert_eq!(
            reason(UplinkKind::Status, r#"{"online":true}"#),
            Some(RejectReason::InvalidPayload)
        );
        let big = format!(
            r#"{{"cmd_id":"c","ok":true,"error":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES)
        );
        assert_eq!(reason(UplinkKind::Ack, &big), Some(RejectReason::Oversize));
        assert_eq!(
            reason(
                UplinkKind::Ack,
                &format!(r#"{{"cmd_id":"{}","ok":true}}"#, "c".repeat(65))
            ),
            Some(RejectReason::InvalidPayload)
        );
    }

    #[test]
    fn recognitions_beyond_the_caps_are_out_of_range() {
        let basket = |lines: &[(&str, u64)]| {
            let items: Vec<String> = lines
                .iter()
                .map(|(sku, q)| format!(r#"{{"sku":"{sku}","qty":{q}}}"#))
                .collect();
            format!(
                r#"{{"session_id":"s1","status":"ok","items":[{}]}}"#,
                items.join(",")
            )
        };
        let r = |lines: &[(&str, u64)]| reason(UplinkKind::Recognition, &basket(lines));
        assert_eq!(r(&[("a", 99), ("b", 99)]), None, "at the cap");
        assert_eq!(r(&[("a", 1), ("b", 100)]), Some(RejectReason::OutOfRange));
        assert_eq!(
            r(&[("a", 4_294_967_295), ("a", 1)]),
            Some(RejectReason::OutOfRange)
        );
        assert_eq!(
            r(&[("a", 4_294_967_296)]),
            Some(RejectReason::InvalidPayload),
            "not a u32 at all"
        );
        let many: Vec<(&str, u64)> = vec![("a", 1); MAX_RECOGNITION_LINES + 1];
        assert_eq!(r(&many), Some(RejectReason::OutOfRange));
        assert_eq!(r(&many[1..]), None);
        // A restock count is not a sale: not capped per line.
        assert_eq!(
            reason(
                UplinkKind::Recognition,
                r#"{"session_id":"s1","status":"ok","stock":[{"sku":"a","qty":500}]}"#
            ),
            None
        );
        let e = parse_uplink(
            id(),
            UplinkKind::Recognition,
            basket(&[("a", 100)]).as_bytes(),
        );
        assert_eq!(
            e.err().and_then(|r| r.cabinet),
            Some(id()),
            "logged with the cabinet id"
        );
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("/tenants/A1/heartbeat"),
            Ok(TopicTarget::Uplink(
                CabinetId::parse("A1").unwrap_or_else(|e| panic!("{e}")),
                UplinkKind::Heartbeat
            ))
        );
        assert!(matches!(
            parse_topic("/tenants/A1/cmd"),
            Ok(TopicTarget::Command(_))
        ));
        assert_eq!(
            parse_topic("tenants/A1/heartbeat").map_err(|r| r.reason),
            Err(RejectReason::BadTopic)
        );
        assert_eq!(
            parse_topic("/tenants/A1/heartbeat/x").map_err(|r| r.reason),
            Err(RejectReason::BadTopic)
        );
        assert_eq!(
            parse_topic("/tenants/A-1/heartbeat").map_err(|r| r.reason),
            Err(RejectReason::BadCabinetId)
        );
        assert_eq!(
            parse_topic("/tenants/A1/telemetry").map_err(|r| r.reason),
            Err(RejectReason::UnknownTopic)
        );
    }

    #[test]
    fn commands_serialize_as_the_protocol_shows() {
        let c = Command {
            cmd_id: "c_1".into(),
            body: CommandBody::Lockdown {
                on: true,
                reason: Some("lock_not_latched".into()),
            },
        };
        let v = serde_json::to_value(&c).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"cmd_id":"c_1","type":"lockdown","on":true,"reason":"lock_not_latched"})
        );
        let r = serde_json::to_value(Command {
            cmd_id: "c_2".into(),
            body: CommandBody::Reboot,
        })
        .unwrap_or_default();
        assert_eq!(r, serde_json::json!({"cmd_id":"c_2","type":"reboot"}));
    }

    proptest! {
        #[test]
        fn parser_never_panics(kind in 0usize..5, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_uplink(id(), UplinkKind::ALL[kind], &payload);
        }

        #[test]
        fn topic_parser_never_panics(topic in "\\PC{0,80}") {
            let _ = parse_topic(&topic);
        }

        /// Topics built from the real shape with arbitrary parts: a cabinet's own uplink
        /// topics parse to it, anything else is refused with a reason.
        #[test]
        fn structured_topics(
            prefix in prop_oneof![Just("/tenants/".to_owned()), "\\PC{0,12}"],
            cabinet in prop_oneof!["[A-Za-z0-9]{1,32}", "\\PC{0,40}"],
            kind in prop_oneof![
                Just("status".to_owned()), Just("heartbeat".to_owned()), Just("event".to_owned()),
                Just("ack".to_owned()), Just("recognition".to_owned()), Just("cmd".to_owned()),
                "\\PC{0,12}",
            ],
            tail in prop_oneof![Just(String::new()), "/\\PC{0,8}"],
        ) {
            let topic = format!("{prefix}{cabinet}/{kind}{tail}");
            match parse_topic(&topic) {
                Ok(TopicTarget::Uplink(c, k)) => {
                    prop_assert_eq!(format!("/tenants/{}/{}", c, k.as_str()), topic);
                }
                Ok(TopicTarget::Command(c)) => prop_assert_eq!(command_topic(&c), topic),
                Err(r) => prop_assert!(RejectReason::ALL.contains(&r.reason)),
            }
        }

        /// The protocol's examples with fields replaced by values of other types, extreme
        /// numbers, long strings and deep nesting, fields removed and unknown ones added:
        /// parsed or refused with a reason, never a panic; what parses respects the bounds.
        #[test]
        fn mutated_valid_payloads(
            kind in 0usize..5,
            edits in proptest::collection::vec((0usize..12, json_value(), any::<bool>()), 0..5),
        ) {
            let kind = UplinkKind::ALL[kind];
            let mut v = example(kind);
            let keys: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            for (i, value, remove) in edits {
                let key = keys.get(i).cloned().unwrap_or_else(|| format!("extra{i}"));
                if let Some(o) = v.as_object_mut() {
                    if remove { o.remove(&key); } else { o.insert(key, value); }
                }
            }
            let payload = serde_json::to_vec(&v).unwrap_or_default();
            match parse_uplink(id(), kind, &payload) {
                Ok(u) => {
                    prop_assert_eq!(u.body.kind(), kind);
                    prop_assert!(payload.len() <= MAX_PAYLOAD_BYTES);
                    check_bounds(&u.body)?;
                }
                Err(r) => {
                    prop_assert!(RejectReason::ALL.contains(&r.reason));
                    prop_assert_eq!(r.cabinet, Some(id()));
                }
            }
        }

        /// Commands under arbitrary ids, sessions, reasons and (finite) configurations encode
        /// to a JSON object that decodes back to the same command.
        #[test]
        fn command_encoding_round_trips(cmd in command()) {
            let bytes = serde_json::to_vec(&cmd).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            prop_assert!(v.is_object(), "{}", v);
            prop_assert_eq!(v["cmd_id"].as_str(), Some(cmd.cmd_id.as_str()));
            prop_assert_eq!(v["type"].as_str(), Some(cmd.body.kind().as_str()));
            let back: Command = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back.cmd_id, cmd.cmd_id);
            match (back.body, cmd.body) {
                (CommandBody::Configure { config: a }, CommandBody::Configure { config: b }) => {
                    let close = |x: f64, y: f64| x == y || (x - y).abs() <= y.abs() * 1e-15;
                    prop_assert!(close(a.temp_target_c, b.temp_target_c));
                    prop_assert!(close(a.temp_range_c[0], b.temp_range_c[0]));
                    prop_assert!(close(a.temp_range_c[1], b.temp_range_c[1]));
                    prop_assert_eq!(
                        (a.version, a.light, a.heartbeat_s, a.foreign_object_lock),
                        (b.version, b.light, b.heartbeat_s, b.foreign_object_lock)
                    );
                }
                (a, b) => prop_assert_eq!(a, b),
            }
        }

        /// Even a configuration with non-finite temperatures (the API refuses them) encodes to
        /// valid JSON rather than failing or panicking.
        #[test]
        fn command_encoding_is_json_for_any_float(t in any::<f64>(), lo in any::<f64>(), hi in any::<f64>()) {
            let cmd = Command {
                cmd_id: "c_1".into(),
                body: CommandBody::Configure { config: CabinetConfig {
                    version: 1, temp_target_c: t, temp_range_c: [lo, hi],
                    light: LightSchedule { on: "07:00".into(), off: "23:00".into() },
                    heartbeat_s: 30, foreign_object_lock: true,
                } },
            };
            let bytes = serde_json::to_vec(&cmd).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v.is_object()));
        }
    }

    fn example(kind: UplinkKind) -> serde_json::Value {
        let text = match kind {
            UplinkKind::Status => {
                r#"{"online":true,"boot_id":"b7f3","fw":"2.4.1","model":"KM-400","config_version":3,"boot":"power_on"}"#
            }
            UplinkKind::Heartbeat => {
                r#"{"seq":42,"ts":1763700000000,"door":"closed","lock":"locked","temp_c":4.6,"light":"on","cameras":[{"id":0,"ok":true}],"config_version":3}"#
            }
            UplinkKind::Event => {
                r#"{"seq":43,"ts":1763700001000,"type":"door_opened","session_id":"s_01J","detail":"x"}"#
            }
            UplinkKind::Ack => r#"{"cmd_id":"c_01J","ok":false,"error":"lock_jammed"}"#,
            UplinkKind::Recognition => {
                r#"{"session_id":"s_01J","status":"ok","items":[{"sku":"6901234567890","qty":2}],"stock":[{"sku":"a","qty":1}],"reason":"r"}"#
            }
        };
        serde_json::from_str(text).unwrap_or_default()
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::{json, Value};
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            Just(json!(u64::MAX)),
            Just(json!(-1)),
            any::<f64>().prop_map(Value::from),
            Just(json!(1e308)),
            "\\PC{0,70}".prop_map(Value::from),
            (0usize..20_000).prop_map(|n| Value::from("x".repeat(n))),
            prop_oneof![
                Just("open"),
                Just("closed"),
                Just("locked"),
                Just("fault"),
                Just("ok"),
                Just("failed"),
                Just("door_opened"),
                Just("tamper")
            ]
            .prop_map(Value::from),
            (0usize..100, 0u64..200)
                .prop_map(|(n, q)| json!(vec![json!({"sku": "a", "qty": q}); n])),
            (0usize..80).prop_map(|n| json!(vec![json!({"id": 0, "ok": false}); n])),
        ];
        leaf.prop_recursive(3, 32, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// What the parser promises about anything it lets through.
    fn check_bounds(body: &UplinkBody) -> Result<(), TestCaseError> {
        let token = |t: &str| !t.is_empty() && t.len() <= MAX_TOKEN_LEN;
        match body {
            UplinkBody::Status(s) => {
                prop_assert!(!s.online || s.boot_id.is_some());
                prop_assert!(s.boot_id.as_deref().is_none_or(token));
                prop_assert!(s.fw.as_deref().is_none_or(|f| f.len() <= MAX_TEXT_LEN));
            }
            UplinkBody::Heartbeat(h) => {
                prop_assert!(h
                    .temp_c
                    .is_none_or(|t| t.is_finite() && (-100.0..=150.0).contains(&t)));
                prop_assert!(h.cameras.as_ref().is_none_or(|c| c.len() <= 64));
            }
            UplinkBody::Event(e) => {
                prop_assert!(e.session_id.as_deref().is_none_or(token));
                prop_assert!(e.detail.as_deref().is_none_or(|d| d.len() <= MAX_TEXT_LEN));
            }
            UplinkBody::Ack(a) => {
                prop_assert!(token(&a.cmd_id));
                prop_assert!(a.error.as_deref().is_none_or(|d| d.len() <= MAX_TEXT_LEN));
            }
            UplinkBody::Recognition(r) => {
                prop_assert!(token(&r.session_id));
                let items = r.items.as_deref().unwrap_or_default();
                prop_assert!(items.len() <= MAX_RECOGNITION_LINES);
                prop_assert!(items
                    .iter()
                    .all(|i| i.qty <= MAX_RECOGNITION_QTY && token(&i.sku)));
            }
        }
        Ok(())
    }

    fn command() -> impl Strategy<Value = Command> {
        let text = "\\PC{0,80}";
        let finite = prop_oneof![
            -1e6f64..1e6,
            Just(0.0),
            Just(-0.0),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE)
        ];
        let body = prop_oneof![
            (text, any::<bool>(), any::<u64>()).prop_map(|(session_id, restock, expires_at)| {
                CommandBody::Unlock {
                    session_id,
                    mode: if restock {
                        SessionMode::Restock
                    } else {
                        SessionMode::Purchase
                    },
                    expires_at,
                }
            }),
            (
                any::<u64>(),
                finite.clone(),
                finite.clone(),
                finite,
                text,
                text,
                any::<u32>(),
                any::<bool>()
            )
                .prop_map(
                    |(version, t, lo, hi, on, off, heartbeat_s, foreign_object_lock)| {
                        CommandBody::Configure {
                            config: CabinetConfig {
                                version,
                                temp_target_c: t,
                                temp_range_c: [lo, hi],
                                light: LightSchedule { on, off },
                                heartbeat_s,
                                foreign_object_lock,
                            },
                        }
                    }
                ),
            (any::<bool>(), proptest::option::of(text))
                .prop_map(|(on, reason)| CommandBody::Lockdown { on, reason }),
            Just(CommandBody::Reboot),
        ];
        (text, body).prop_map(|(cmd_id, body)| Command { cmd_id, body })
    }
}
