//! Alert types and their severities (PROTOCOL.md "What the hub does").

use serde::{Deserialize, Serialize};

/// An alert raised more than this many times within [`FLAP_WINDOW_MS`] is flapping.
pub const FLAP_RAISES: usize = 5;
/// The flapping window, and how long a flapping alert must be quiet (no toggle) to end.
pub const FLAP_WINDOW_MS: u64 = 600_000;

/// The anomalies the hub raises. One is active at most once per (cabinet, type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertType {
    /// No ack to `unlock` within the timeout.
    UnlockNoAck,
    /// Door closed, lock did not latch in time (门锁不落锁).
    LockNotLatched,
    /// Door opened with no session in progress.
    DoorForced,
    /// Door open longer than allowed.
    DoorOpenTooLong,
    /// The lock reports a fault.
    LockFault,
    /// A camera reports a fault.
    CameraFault,
    /// Missed heartbeats or the Last Will.
    CabinetOffline,
    /// Temperature outside the configured range for too long.
    TemperatureOutOfRange,
    /// The cabinet reported tampering.
    Tamper,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Goods or money at risk now.
    Critical,
    /// Service impaired.
    Major,
    /// Needs attention.
    Minor,
}

impl AlertType {
    /// Every type, for pre-registering metric series.
    pub const ALL: [AlertType; 9] = [
        AlertType::UnlockNoAck,
        AlertType::LockNotLatched,
        AlertType::DoorForced,
        AlertType::DoorOpenTooLong,
        AlertType::LockFault,
        AlertType::CameraFault,
        AlertType::CabinetOffline,
        AlertType::TemperatureOutOfRange,
        AlertType::Tamper,
    ];

    /// The stable wire name, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertType::UnlockNoAck => "unlock_no_ack",
            AlertType::LockNotLatched => "lock_not_latched",
            AlertType::DoorForced => "door_forced",
            AlertType::DoorOpenTooLong => "door_open_too_long",
            AlertType::LockFault => "lock_fault",
            AlertType::CameraFault => "camera_fault",
            AlertType::CabinetOffline => "cabinet_offline",
            AlertType::TemperatureOutOfRange => "temperature_out_of_range",
            AlertType::Tamper => "tamper",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// How urgent this type is.
    pub fn severity(self) -> Severity {
        match self {
            AlertType::DoorForced
            | AlertType::LockNotLatched
            | AlertType::LockFault
            | AlertType::Tamper => Severity::Critical,
            AlertType::UnlockNoAck
            | AlertType::CameraFault
            | AlertType::CabinetOffline
            | AlertType::DoorOpenTooLong => Severity::Major,
            AlertType::TemperatureOutOfRange => Severity::Minor,
        }
    }

    /// Whether an active alert of this type faults the cabinet (no new purchase sessions).
    pub fn faults_cabinet(self) -> bool {
        matches!(self, AlertType::LockNotLatched | AlertType::LockFault)
    }
}

impl Severity {
    /// The stable wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
        }
    }
}

/// An alert while it is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAlert {
    /// Stable id, used by the HTTP API.
    pub id: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: AlertType,
    /// Unix ms.
    pub raised_at: u64,
    /// Whether an operator acknowledged it.
    pub acked: bool,
    /// Context (camera ids, temperature, event detail).
    pub detail: Option<String>,
    /// Raised more than [`FLAP_RAISES`] times within [`FLAP_WINDOW_MS`]: it stays this one
    /// active alert while its condition toggles, and ends once quiet for the window.
    #[serde(default)]
    pub flapping: bool,
    /// While flapping: how many times its condition was raised, this alert's own raise and the
    /// ones before it in the window included; 0 otherwise.
    #[serde(default)]
    pub flaps: u32,
}

/// Who cleared an alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by", content = "who")]
pub enum ClearedBy {
    /// The condition ended.
    Condition,
    /// An operator (the API key id).
    Operator(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for t in AlertType::ALL {
            assert_eq!(AlertType::parse(t.as_str()), Some(t));
            let json = serde_json::to_string(&t).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
        assert_eq!(AlertType::parse("nope"), None);
    }
}
