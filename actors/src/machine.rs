//! The cabinet's behaviour as a deterministic state machine: `handle(input, now) -> effects`.
//!
//! No runtime, no clock, no I/O: the actor shell feeds it inputs and the current time in Unix
//! milliseconds, carries out the effects, and wakes it with [`Input::Tick`] at
//! [`CabinetMachine::next_deadline`]. Every row of PROTOCOL.md's "What the hub does" table is
//! decided here.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::alert::{ActiveAlert, AlertType, ClearedBy, FLAP_RAISES, FLAP_WINDOW_MS};
use crate::ids::CabinetId;
use crate::protocol::{
    Ack, CabinetConfig, CameraStatus, Command, CommandBody, CommandKind, Door, Event, EventType,
    Heartbeat, Light, Lock, Recognition, RecognitionStatus, SessionMode, Status, UplinkBody,
};
use crate::seq::{SeqVerdict, SeqWindow};

/// The durations the machine enforces (all configurable; defaults from PROTOCOL.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// No ack to `unlock` → `unlock_timeout`.
    pub unlock_ack_timeout_ms: u64,
    /// No ack to any other command → `timeout`.
    pub command_ack_timeout_ms: u64,
    /// Door closed, not latched → `lock_not_latched`.
    pub latch_timeout_ms: u64,
    /// Door open longer → `door_open_too_long`.
    pub door_open_max_ms: u64,
    /// Heartbeat interval when the desired configuration does not say.
    pub heartbeat_s: u32,
    /// Missed heartbeats before offline.
    pub missed_heartbeats: u32,
    /// Temperature out of range this long → alert.
    pub temp_out_of_range_ms: u64,
    /// Purchase door closed, no recognition → abnormal.
    pub recognition_timeout_ms: u64,
    /// Unlock acked, the door not opened this long → the session fails `door_never_opened`
    /// (nothing can have been taken; the provider order is cancelled).
    pub door_open_timeout_ms: u64,
    /// Unlock acked, the door not closed this long → the order is abnormal `session_timeout`
    /// and the cabinet is free again.
    pub session_open_timeout_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            unlock_ack_timeout_ms: 5_000,
            command_ack_timeout_ms: 5_000,
            latch_timeout_ms: 10_000,
            door_open_max_ms: 120_000,
            heartbeat_s: 30,
            missed_heartbeats: 3,
            temp_out_of_range_ms: 600_000,
            recognition_timeout_ms: 60_000,
            door_open_timeout_ms: 60_000,
            session_open_timeout_ms: 600_000,
        }
    }
}

/// What the machine reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A parsed uplink message.
    Uplink(UplinkBody),
    /// Send a command (from an operator or a session supervisor).
    Command {
        /// Its id, from [`CabinetMachine::next_cmd_id`].
        cmd_id: String,
        /// What to send.
        body: CommandBody,
    },
    /// A new desired configuration.
    DesiredConfig(CabinetConfig),
    /// An operator acknowledged an alert.
    AckAlert(AlertType),
    /// An operator cleared an alert.
    ClearAlert {
        /// Which.
        kind: AlertType,
        /// The operator's key id.
        by: String,
    },
    /// An operator or the session supervisor ends this session (a session the actor does
    /// not hold changes nothing). See [`CabinetMachine::session_phase`] for what it was.
    CloseSession {
        /// Which.
        session_id: String,
    },
    /// A deadline may have passed.
    Tick,
    /// Another node's last picture of the cabinet, which came over from it without a word
    /// from the cabinet yet (see [`LiveSeed`]).
    Restore(LiveSeed),
}

/// How a command ended — truthfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "error")]
pub enum CommandOutcome {
    /// The cabinet acked `ok: true`.
    Ok,
    /// Sent, no ack within the timeout.
    Timeout,
    /// The cabinet acked with an error.
    Rejected(String),
    /// The cabinet was offline: never sent.
    NotConnected,
}

impl CommandOutcome {
    /// The stable metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            CommandOutcome::Ok => "ok",
            CommandOutcome::Timeout => "timeout",
            CommandOutcome::Rejected(_) => "rejected",
            CommandOutcome::NotConnected => "not_connected",
        }
    }
}

/// Why a session's door phase ended abnormally, for the session supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbnormalReason {
    /// No recognition within the timeout after the door closed.
    RecognitionTimeout,
    /// The cabinet reported recognition failed.
    RecognitionFailed,
    /// The cabinet rebooted with the session open.
    Rebooted,
    /// The door stayed open (or never closed) past `session_open_timeout_ms`.
    SessionTimeout,
}

/// Session progress the session supervisor needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum SessionEvent {
    /// Recognition arrived.
    Recognized {
        /// Session.
        session_id: String,
        /// Mode.
        mode: SessionMode,
        /// What the cabinet recognised.
        recognition: Recognition,
    },
    /// The cabinet acked the unlock and the door did not open within
    /// `door_open_timeout_ms`: the session is over, nothing was taken.
    DoorNeverOpened {
        /// Session.
        session_id: String,
        /// Mode.
        mode: SessionMode,
    },
    /// The session cannot be priced automatically.
    Abnormal {
        /// Session.
        session_id: String,
        /// Mode.
        mode: SessionMode,
        /// Why.
        reason: AbnormalReason,
    },
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish a command on the cabinet's command topic.
    Publish(Command),
    /// A command ended.
    CommandDone {
        /// Which.
        cmd_id: String,
        /// Its kind.
        kind: CommandKind,
        /// How.
        outcome: CommandOutcome,
        /// From request to outcome.
        elapsed_ms: u64,
    },
    /// An alert was raised.
    AlertRaised(ActiveAlert),
    /// An operator acknowledged an alert.
    AlertAcked(ActiveAlert),
    /// A flapping alert's condition came back: no new alert, only its count went up.
    AlertFlapped(ActiveAlert),
    /// An alert was cleared.
    AlertCleared {
        /// The alert as it was.
        alert: ActiveAlert,
        /// By whom.
        by: ClearedBy,
        /// When (Unix ms).
        at: u64,
    },
    /// The cabinet came online (`true`) or went offline (`false`).
    OnlineChanged(bool),
    /// Visible state changed (for live screens).
    StateChanged,
    /// A redelivered heartbeat or event was dropped.
    Duplicate {
        /// Its seq.
        seq: u64,
    },
    /// A heartbeat or event's seq was far outside the duplicate window: taken as the cabinet's
    /// counter having jumped, processed, and the window restarted there.
    SeqReset {
        /// The highest seq before.
        from: u64,
        /// The seq that restarted the window.
        to: u64,
    },
    /// An ack for no pending command (late, after a timeout, or unknown).
    StrayAck {
        /// Its cmd id.
        cmd_id: String,
    },
    /// Session progress.
    Session(SessionEvent),
}

/// Why a new session cannot start on this cabinet right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Not connected.
    CabinetOffline,
    /// Another session is open.
    CabinetBusy,
    /// Lock not latched, lock fault, locked down, or (purchase) no working camera.
    CabinetFaulted,
}

impl Refusal {
    /// The API error code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::CabinetOffline => "cabinet_offline",
            Refusal::CabinetBusy => "cabinet_busy",
            Refusal::CabinetFaulted => "cabinet_faulted",
        }
    }
}

/// Recent raises of one alert type, to tell flapping from a fault that comes and goes.
#[derive(Debug, Clone, Default, PartialEq)]
struct FlapTrack {
    /// Raise times within the last [`FLAP_WINDOW_MS`] (at most `FLAP_RAISES + 1`).
    raises: Vec<u64>,
    /// The condition ended while the alert was flapping: the alert is kept active.
    held: bool,
    /// The last raise or end of the condition while flapping.
    last_toggle: u64,
    /// The flap count last handed out to be stored, and when: a count is stored at most once
    /// per [`FLAP_WRITE_EVERY_MS`] (and once more when the alert ends), so a cabinet toggling
    /// as fast as it can send costs the database writer one update per interval.
    written: (u32, u64),
}

/// How often a flapping alert's growing count is stored at most.
pub const FLAP_WRITE_EVERY_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq)]
struct Pending {
    kind: CommandKind,
    sent_at: u64,
    deadline: u64,
    body: CommandBody,
}

/// Where an open session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionPhase {
    /// `unlock` sent, no ack yet.
    Unlocking,
    /// Acked; the door may open.
    Unlocked,
    /// The door opened.
    DoorOpen,
    /// The door closed; waiting for recognition.
    DoorClosed,
}

/// An open session as the cabinet's actor sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenSession {
    /// Session id.
    pub id: String,
    /// Mode.
    pub mode: SessionMode,
    /// Phase.
    pub phase: SessionPhase,
    /// When the door closed (Unix ms).
    #[serde(skip)]
    closed_at: Option<u64>,
    /// When the cabinet acked the unlock (Unix ms).
    #[serde(skip)]
    acked_at: Option<u64>,
}

impl OpenSession {
    /// When the door phase runs out of time: acked and never opened by
    /// `door_open_timeout_ms`, or open (never closed) by `session_open_timeout_ms`. A closed
    /// door waits for the recognition instead.
    fn door_deadline(&self, t: &Timing) -> Option<u64> {
        let acked = self.acked_at?;
        match self.phase {
            SessionPhase::Unlocked => Some(acked + t.door_open_timeout_ms),
            SessionPhase::DoorOpen => Some(acked + t.session_open_timeout_ms),
            SessionPhase::Unlocking | SessionPhase::DoorClosed => None,
        }
    }
}

/// The live state of a cabinet, as the API and screens show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CabinetSnapshot {
    /// Cabinet id.
    pub id: CabinetId,
    /// Connected and heard from recently.
    pub online: bool,
    /// Door, when known.
    pub door: Option<Door>,
    /// Lock, when known.
    pub lock: Option<Lock>,
    /// Cameras, when known.
    pub cameras: Vec<CameraStatus>,
    /// Inside temperature, when known.
    pub temp_c: Option<f64>,
    /// Light strip, when known.
    pub light: Option<Light>,
    /// Current boot.
    pub boot_id: Option<String>,
    /// Firmware.
    pub fw: Option<String>,
    /// Model reported by the cabinet.
    pub model: Option<String>,
    /// The configuration version the hub wants.
    pub config_version_desired: Option<u64>,
    /// The configuration version the cabinet reports.
    pub config_version_reported: Option<u64>,
    /// Lock not latched or lock fault: no new purchase sessions.
    pub faulted: bool,
    /// The cabinet acked a lock-down.
    pub locked_down: bool,
    /// Active alerts.
    pub alerts: Vec<ActiveAlert>,
    /// The open session.
    pub session: Option<OpenSession>,
    /// Last accepted message (Unix ms).
    pub last_seen_ms: Option<u64>,
}

/// What another node last published of a cabinet's live state (the feed's `cabinet` event;
/// unknown fields are ignored), for an actor that takes the cabinet over without a word from
/// it yet.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LiveSeed {
    /// Connected and heard from recently.
    pub online: bool,
    /// Door.
    #[serde(default)]
    pub door: Option<Door>,
    /// Lock.
    #[serde(default)]
    pub lock: Option<Lock>,
    /// Cameras.
    #[serde(default)]
    pub cameras: Vec<CameraStatus>,
    /// Temperature.
    #[serde(default)]
    pub temp_c: Option<f64>,
    /// Light strip.
    #[serde(default)]
    pub light: Option<Light>,
    /// Firmware.
    #[serde(default)]
    pub fw: Option<String>,
    /// Model.
    #[serde(default)]
    pub reported_model: Option<String>,
    /// Boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Locked down.
    #[serde(default)]
    pub locked_down: bool,
}

/// One cabinet's logic. See the module docs.
#[derive(Debug, Clone)]
pub struct CabinetMachine {
    id: CabinetId,
    timing: Timing,
    cmd_prefix: String,
    cmd_counter: u64,

    online: bool,
    last_seen: Option<u64>,
    boot_id: Option<String>,
    /// Duplicate detection for the current boot; `None` until the first seq.
    seqs: Option<SeqWindow>,
    fw: Option<String>,
    model: Option<String>,

    door: Option<Door>,
    lock: Option<Lock>,
    cameras: Vec<CameraStatus>,
    temp_c: Option<f64>,
    light: Option<Light>,

    desired: Option<CabinetConfig>,
    reported_version: Option<u64>,
    rejected_version: Option<u64>,

    door_open_since: Option<u64>,
    latch_wait_since: Option<u64>,
    temp_out_since: Option<u64>,

    alerts: BTreeMap<AlertType, ActiveAlert>,
    /// Only for types raised within the flapping window; empty for a quiet cabinet.
    flaps: BTreeMap<AlertType, FlapTrack>,
    /// The last raise's time and how many raises came before it in that millisecond: alert
    /// ids are `{cabinet}-{type}-{ms}`, suffixed when a condition toggles within one ms.
    last_raise: (u64, u32),
    locked_down: bool,
    session: Option<OpenSession>,
    pending: HashMap<String, Pending>,
}

impl CabinetSnapshot {
    /// A cabinet with no actor: offline, nothing known.
    pub fn offline(id: CabinetId) -> Self {
        Self {
            id,
            online: false,
            door: None,
            lock: None,
            cameras: vec![],
            temp_c: None,
            light: None,
            boot_id: None,
            fw: None,
            model: None,
            config_version_desired: None,
            config_version_reported: None,
            faulted: false,
            locked_down: false,
            alerts: vec![],
            session: None,
            last_seen_ms: None,
        }
    }
}

impl CabinetMachine {
    /// A machine for a cabinet that has not been heard from. `cmd_prefix` makes command ids
    /// unique across actor incarnations; `desired` is the stored desired configuration;
    /// `alerts` are the alerts still active in storage.
    pub fn new(
        id: CabinetId,
        timing: Timing,
        cmd_prefix: String,
        desired: Option<CabinetConfig>,
        alerts: Vec<ActiveAlert>,
    ) -> Self {
        Self {
            id,
            timing,
            cmd_prefix,
            cmd_counter: 0,
            online: false,
            last_seen: None,
            boot_id: None,
            seqs: None,
            fw: None,
            model: None,
            door: None,
            lock: None,
            cameras: Vec::new(),
            temp_c: None,
            light: None,
            desired,
            reported_version: None,
            rejected_version: None,
            door_open_since: None,
            latch_wait_since: None,
            temp_out_since: None,
            alerts: alerts.into_iter().map(|a| (a.kind, a)).collect(),
            flaps: BTreeMap::new(),
            last_raise: (0, 0),
            locked_down: false,
            session: None,
            pending: HashMap::new(),
        }
    }

    /// The cabinet.
    pub fn id(&self) -> &CabinetId {
        &self.id
    }

    /// A fresh command id.
    pub fn next_cmd_id(&mut self) -> String {
        self.cmd_counter += 1;
        format!("c_{}_{}", self.cmd_prefix, self.cmd_counter)
    }

    /// Whether the cabinet is online.
    pub fn online(&self) -> bool {
        self.online
    }

    /// The active alerts.
    pub fn alerts(&self) -> impl Iterator<Item = &ActiveAlert> {
        self.alerts.values()
    }

    /// Lock not latched or lock fault.
    pub fn faulted(&self) -> bool {
        self.alerts.keys().any(|k| k.faults_cabinet())
    }

    fn has_working_camera(&self) -> bool {
        if self.cameras.is_empty() {
            !self.alerts.contains_key(&AlertType::CameraFault)
        } else {
            self.cameras.iter().any(|c| c.ok)
        }
    }

    /// Takes over what another node last knew of the cabinet, as if heard from it `now`: it
    /// is online (until its heartbeats stop), and its door, lock and cameras are as they were.
    /// Sequence numbers start afresh at its next message; the configuration it reports is
    /// learnt from its next heartbeat.
    fn restore(&mut self, live: LiveSeed, now: u64, fx: &mut Vec<Effect>) {
        if live.online && !self.online {
            self.online = true;
            self.last_seen = Some(now);
            fx.push(Effect::OnlineChanged(true));
            self.clear(AlertType::CabinetOffline, ClearedBy::Condition, now, fx);
        }
        self.door = live.door;
        self.lock = live.lock;
        self.cameras = live.cameras;
        self.temp_c = live.temp_c;
        self.light = live.light;
        self.fw = live.fw;
        self.model = live.reported_model;
        self.boot_id = live.boot_id;
        self.locked_down = live.locked_down;
        fx.push(Effect::StateChanged);
    }

    /// Why a new session of `mode` cannot start now, if it cannot.
    pub fn session_refusal(&self, mode: SessionMode) -> Option<Refusal> {
        if !self.online {
            return Some(Refusal::CabinetOffline);
        }
        if self.faulted() || self.locked_down {
            return Some(Refusal::CabinetFaulted);
        }
        if mode == SessionMode::Purchase && !self.has_working_camera() {
            return Some(Refusal::CabinetFaulted);
        }
        if self.session.is_some() {
            return Some(Refusal::CabinetBusy);
        }
        None
    }

    /// The live state.
    pub fn snapshot(&self) -> CabinetSnapshot {
        CabinetSnapshot {
            id: self.id.clone(),
            online: self.online,
            door: self.door,
            lock: self.lock,
            cameras: self.cameras.clone(),
            temp_c: self.temp_c,
            light: self.light,
            boot_id: self.boot_id.clone(),
            fw: self.fw.clone(),
            model: self.model.clone(),
            config_version_desired: self.desired.as_ref().map(|c| c.version),
            config_version_reported: self.reported_version,
            faulted: self.faulted(),
            locked_down: self.locked_down,
            alerts: self.alerts.values().cloned().collect(),
            session: self.session.clone(),
            last_seen_ms: self.last_seen,
        }
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        let s = self
            .desired
            .as_ref()
            .map(|c| c.heartbeat_s)
            .unwrap_or(self.timing.heartbeat_s);
        u64::from(s.max(1)) * 1000
    }

    fn offline_deadline(&self) -> Option<u64> {
        if !self.online {
            return None;
        }
        let window = self.heartbeat_interval_ms() * u64::from(self.timing.missed_heartbeats.max(1));
        self.last_seen.map(|t| t + window)
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let t = &self.timing;
        let latch = self
            .latch_wait_since
            .filter(|_| !self.alerts.contains_key(&AlertType::LockNotLatched))
            .map(|s| s + t.latch_timeout_ms);
        let door = self
            .door_open_since
            .filter(|_| !self.alerts.contains_key(&AlertType::DoorOpenTooLong))
            .map(|s| s + t.door_open_max_ms);
        let temp = self
            .temp_out_since
            .filter(|_| !self.alerts.contains_key(&AlertType::TemperatureOutOfRange))
            .map(|s| s + t.temp_out_of_range_ms);
        let recognition = self
            .session
            .as_ref()
            .and_then(|s| s.closed_at)
            .map(|c| c + t.recognition_timeout_ms);
        let session_end = self.session.as_ref().and_then(|s| s.door_deadline(t));
        let pending = self.pending.values().map(|p| p.deadline).min();
        let flap_end = self
            .flaps
            .values()
            .filter(|f| f.held)
            .map(|f| f.last_toggle + FLAP_WINDOW_MS)
            .min();
        [
            flap_end,
            latch,
            door,
            temp,
            recognition,
            session_end,
            pending,
            self.offline_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Feeds one input at time `now` (Unix ms) and returns what to do.
    pub fn handle(&mut self, input: Input, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let faulted_before = self.faulted();
        match input {
            Input::Uplink(body) => self.uplink(body, now, &mut fx),
            Input::Command { cmd_id, body } => self.send(cmd_id, body, now, &mut fx),
            Input::DesiredConfig(config) => {
                let version = config.version;
                self.desired = Some(config);
                self.rejected_version = None;
                if self.online && self.reported_version != Some(version) {
                    self.send_configure(now, &mut fx);
                }
                fx.push(Effect::StateChanged);
            }
            Input::AckAlert(kind) => {
                if let Some(a) = self.alerts.get_mut(&kind) {
                    if !a.acked {
                        a.acked = true;
                        fx.push(Effect::AlertAcked(a.clone()));
                        fx.push(Effect::StateChanged);
                    }
                }
            }
            Input::ClearAlert { kind, by } => {
                if self.alerts.contains_key(&kind) {
                    self.reset_condition(kind, now);
                    self.clear(kind, ClearedBy::Operator(by), now, &mut fx);
                    fx.push(Effect::StateChanged);
                }
            }
            Input::CloseSession { session_id } => {
                if self.session.as_ref().is_some_and(|s| s.id == session_id) {
                    self.session = None;
                    self.pending.retain(|_, p| {
                        !matches!(&p.body, CommandBody::Unlock { session_id: id, .. } if *id == session_id)
                    });
                    fx.push(Effect::StateChanged);
                }
            }
            Input::Tick => self.tick(now, &mut fx),
            Input::Restore(live) => self.restore(live, now, &mut fx),
        }
        self.reconcile_fault(faulted_before, now, &mut fx);
        fx
    }

    /// An operator cleared an alert: forget the condition so it is not re-raised at once.
    fn reset_condition(&mut self, kind: AlertType, now: u64) {
        match kind {
            AlertType::LockNotLatched => self.latch_wait_since = None,
            AlertType::DoorOpenTooLong => {
                self.door_open_since = self.door_open_since.map(|_| now);
            }
            AlertType::TemperatureOutOfRange => {
                self.temp_out_since = self.temp_out_since.map(|_| now);
            }
            AlertType::UnlockNoAck
            | AlertType::DoorForced
            | AlertType::LockFault
            | AlertType::CameraFault
            | AlertType::CabinetOffline
            | AlertType::Tamper => {}
        }
    }

    /// Lock the cabinet down when it becomes faulted and release it when the fault ends.
    fn reconcile_fault(&mut self, before: bool, now: u64, fx: &mut Vec<Effect>) {
        let after = self.faulted();
        if before == after {
            return;
        }
        let reason = self
            .alerts
            .keys()
            .find(|k| k.faults_cabinet())
            .map(|k| k.as_str().to_owned());
        let cmd_id = self.next_cmd_id();
        self.send(cmd_id, CommandBody::Lockdown { on: after, reason }, now, fx);
    }

    fn raise(&mut self, kind: AlertType, detail: Option<String>, now: u64, fx: &mut Vec<Effect>) {
        let track = self.flaps.entry(kind).or_default();
        if let Some(a) = self.alerts.get_mut(&kind) {
            // Active: a condition that persists is not raised again. A flapping alert whose
            // condition had ended (held) and is back counts one more flap, quietly.
            if a.flapping && track.held {
                track.held = false;
                track.last_toggle = now;
                a.flaps = a.flaps.saturating_add(1);
                if now.saturating_sub(track.written.1) >= FLAP_WRITE_EVERY_MS {
                    track.written = (a.flaps, now);
                    fx.push(Effect::AlertFlapped(a.clone()));
                }
            }
            return;
        }
        track
            .raises
            .retain(|t| now.saturating_sub(*t) < FLAP_WINDOW_MS);
        track.raises.push(now);
        if track.raises.len() > FLAP_RAISES + 1 {
            track.raises.remove(0);
        }
        let flapping = track.raises.len() > FLAP_RAISES;
        if flapping {
            track.held = false;
            track.last_toggle = now;
            track.written = (u32::try_from(track.raises.len()).unwrap_or(u32::MAX), now);
        }
        self.last_raise = match self.last_raise {
            (at, n) if at == now => (now, n.saturating_add(1)),
            _ => (now, 0),
        };
        let id = match self.last_raise.1 {
            0 => format!("{}-{}-{}", self.id, kind.as_str(), now),
            n => format!("{}-{}-{}-{n}", self.id, kind.as_str(), now),
        };
        let alert = ActiveAlert {
            id,
            kind,
            raised_at: now,
            acked: false,
            detail,
            flapping,
            flaps: if flapping {
                u32::try_from(track.raises.len()).unwrap_or(u32::MAX)
            } else {
                0
            },
        };
        self.alerts.insert(kind, alert.clone());
        fx.push(Effect::AlertRaised(alert));
    }

    fn clear(&mut self, kind: AlertType, by: ClearedBy, now: u64, fx: &mut Vec<Effect>) {
        let Some(alert) = self.alerts.get(&kind) else {
            return;
        };
        if alert.flapping && by == ClearedBy::Condition {
            // A flapping alert from storage (the hub restarted): its history is gone, so its
            // quiet window starts now.
            let track = self.flaps.entry(kind).or_insert_with(|| FlapTrack {
                raises: Vec::new(),
                held: false,
                last_toggle: now,
                written: (alert.flaps, now),
            });
            let quiet = now.saturating_sub(track.last_toggle) >= FLAP_WINDOW_MS;
            if !quiet {
                // Kept active: no clear (and so no next raise) per toggle. It ends once the
                // condition has stayed away for the window (`tick`).
                if !track.held {
                    track.held = true;
                    track.last_toggle = now;
                }
                return;
            }
        }
        if let Some(alert) = self.alerts.remove(&kind) {
            if let Some(track) = self.flaps.get_mut(&kind) {
                track.held = false;
                // The count toggles added since it was last stored, before the alert ends.
                if alert.flapping && track.written.0 != alert.flaps {
                    track.written = (alert.flaps, now);
                    fx.push(Effect::AlertFlapped(alert.clone()));
                }
            }
            fx.push(Effect::AlertCleared { alert, by, at: now });
        }
    }

    /// Ends flapping alerts whose condition has stayed away for the window, and forgets
    /// raise history older than the window.
    fn settle_flaps(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let done: Vec<AlertType> = self
            .flaps
            .iter()
            .filter(|(_, f)| f.held && now >= f.last_toggle + FLAP_WINDOW_MS)
            .map(|(k, _)| *k)
            .collect();
        for kind in done {
            let written = self.flaps.get(&kind).map(|t| t.written.0);
            if let Some(alert) = self.alerts.remove(&kind) {
                // The count toggles added since it was last stored, before the alert ends.
                if written.is_some_and(|w| w != alert.flaps) {
                    fx.push(Effect::AlertFlapped(alert.clone()));
                }
                fx.push(Effect::AlertCleared {
                    alert,
                    by: ClearedBy::Condition,
                    at: now,
                });
                fx.push(Effect::StateChanged);
            }
            if let Some(track) = self.flaps.get_mut(&kind) {
                track.held = false;
            }
        }
        let alerts = &self.alerts;
        self.flaps.retain(|kind, f| {
            f.raises.retain(|t| now.saturating_sub(*t) < FLAP_WINDOW_MS);
            f.held || !f.raises.is_empty() || alerts.get(kind).is_some_and(|a| a.flapping)
        });
    }

    /// Removes a pending command. The map is let go once empty: a cabinet is nearly always
    /// without a command in flight, and an emptied map keeps its buckets (~0.5 KB) for life.
    fn take_pending(&mut self, cmd_id: &str) -> Option<Pending> {
        let p = self.pending.remove(cmd_id);
        if self.pending.is_empty() {
            self.pending = HashMap::new();
        }
        p
    }

    fn send(&mut self, cmd_id: String, body: CommandBody, now: u64, fx: &mut Vec<Effect>) {
        let kind = body.kind();
        if !self.online {
            fx.push(Effect::CommandDone {
                cmd_id,
                kind,
                outcome: CommandOutcome::NotConnected,
                elapsed_ms: 0,
            });
            return;
        }
        let timeout = match kind {
            CommandKind::Unlock => self.timing.unlock_ack_timeout_ms,
            CommandKind::Configure | CommandKind::Lockdown | CommandKind::Reboot => {
                self.timing.command_ack_timeout_ms
            }
        };
        if let CommandBody::Unlock {
            session_id, mode, ..
        } = &body
        {
            self.session = Some(OpenSession {
                id: session_id.clone(),
                mode: *mode,
                phase: SessionPhase::Unlocking,
                closed_at: None,
                acked_at: None,
            });
            fx.push(Effect::StateChanged);
        }
        self.pending.insert(
            cmd_id.clone(),
            Pending {
                kind,
                sent_at: now,
                deadline: now + timeout,
                body: body.clone(),
            },
        );
        fx.push(Effect::Publish(Command { cmd_id, body }));
    }

    fn send_configure(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let Some(config) = self.desired.clone() else {
            return;
        };
        let already = self.pending.values().any(|p| {
            matches!(&p.body, CommandBody::Configure { config: c } if c.version == config.version)
        });
        if already {
            return;
        }
        let cmd_id = self.next_cmd_id();
        self.send(cmd_id, CommandBody::Configure { config }, now, fx);
    }

    fn uplink(&mut self, body: UplinkBody, now: u64, fx: &mut Vec<Effect>) {
        if let UplinkBody::Status(Status { online: false, .. }) = body {
            self.go_offline(now, fx);
            return;
        }
        if let UplinkBody::Heartbeat(Heartbeat { seq, .. }) | UplinkBody::Event(Event { seq, .. }) =
            &body
        {
            let seq = *seq;
            match self.seqs.as_mut().map(|w| w.check(seq)) {
                None => self.seqs = Some(SeqWindow::starting_at(seq)),
                Some(SeqVerdict::Fresh) => {}
                Some(SeqVerdict::Duplicate) => {
                    fx.push(Effect::Duplicate { seq });
                    return;
                }
                Some(SeqVerdict::Reset { from }) => fx.push(Effect::SeqReset { from, to: seq }),
            }
        }
        self.last_seen = Some(now);
        if !self.online {
            self.online = true;
            fx.push(Effect::OnlineChanged(true));
            self.clear(AlertType::CabinetOffline, ClearedBy::Condition, now, fx);
            fx.push(Effect::StateChanged);
        }
        match body {
            UplinkBody::Status(s) => self.status(s, now, fx),
            UplinkBody::Heartbeat(h) => self.heartbeat(h, now, fx),
            UplinkBody::Event(e) => self.event(e, now, fx),
            UplinkBody::Ack(a) => self.ack(a, now, fx),
            UplinkBody::Recognition(r) => self.recognition(r, fx),
        }
    }

    fn go_offline(&mut self, now: u64, fx: &mut Vec<Effect>) {
        if !self.online {
            return;
        }
        self.online = false;
        fx.push(Effect::OnlineChanged(false));
        self.raise(AlertType::CabinetOffline, None, now, fx);
        fx.push(Effect::StateChanged);
    }

    fn status(&mut self, s: Status, now: u64, fx: &mut Vec<Effect>) {
        let new_boot = s.boot_id.is_some() && s.boot_id != self.boot_id;
        if s.fw.is_some() {
            self.fw = s.fw;
        }
        if s.model.is_some() {
            self.model = s.model;
        }
        if s.config_version.is_some() {
            self.reported_version = s.config_version;
        }
        if new_boot {
            self.boot_id = s.boot_id;
            self.seqs = None;
            // A reboot ends whatever the controller was doing: the door state, a pending
            // latch wait and the lock-down are re-learned from the next heartbeat.
            self.locked_down = false;
            if let Some(session) = self.session.take() {
                let fail_unlock = session.phase == SessionPhase::Unlocking;
                self.pending
                    .retain(|_, p| !matches!(p.kind, CommandKind::Unlock));
                // A session still unlocking never opened: its unlock's outcome tells the
                // supervisor. One past the unlock needs a person.
                if !fail_unlock {
                    fx.push(Effect::Session(SessionEvent::Abnormal {
                        session_id: session.id,
                        mode: session.mode,
                        reason: AbnormalReason::Rebooted,
                    }));
                }
            }
            if self.desired.is_some() {
                self.send_configure(now, fx);
            }
        } else if self.behind_desired() {
            self.send_configure(now, fx);
        }
        if self.faulted() {
            // The lock-down may never have reached the cabinet (it was offline), or the
            // reboot dropped it: say it again.
            let reason = self
                .alerts
                .keys()
                .find(|k| k.faults_cabinet())
                .map(|k| k.as_str().to_owned());
            let cmd_id = self.next_cmd_id();
            self.send(cmd_id, CommandBody::Lockdown { on: true, reason }, now, fx);
        }
        fx.push(Effect::StateChanged);
    }

    fn behind_desired(&self) -> bool {
        match (&self.desired, self.reported_version) {
            (Some(d), Some(r)) => r < d.version && self.rejected_version != Some(d.version),
            (Some(d), None) => self.rejected_version != Some(d.version),
            (None, _) => false,
        }
    }

    fn heartbeat(&mut self, h: Heartbeat, now: u64, fx: &mut Vec<Effect>) {
        let before = self.snapshot();
        self.door = Some(h.door);
        self.lock = Some(h.lock);
        if h.light.is_some() {
            self.light = h.light;
        }
        if h.config_version.is_some() {
            self.reported_version = h.config_version;
        }

        match h.door {
            Door::Open => {
                if self.door_open_since.is_none() {
                    self.door_open_since = Some(now);
                }
            }
            Door::Closed => {
                self.door_open_since = None;
                self.clear(AlertType::DoorOpenTooLong, ClearedBy::Condition, now, fx);
            }
        }
        match h.lock {
            Lock::Fault => self.raise(AlertType::LockFault, Some("heartbeat".into()), now, fx),
            Lock::Locked => {
                self.clear(AlertType::LockFault, ClearedBy::Condition, now, fx);
                if h.door == Door::Closed {
                    self.latched(now, fx);
                }
            }
            Lock::Unlocked => self.clear(AlertType::LockFault, ClearedBy::Condition, now, fx),
        }

        if let Some(cameras) = h.cameras {
            self.cameras = cameras;
            let broken: Vec<String> = self
                .cameras
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.id.to_string())
                .collect();
            if broken.is_empty() {
                self.clear(AlertType::CameraFault, ClearedBy::Condition, now, fx);
            } else {
                self.raise(
                    AlertType::CameraFault,
                    Some(format!("cameras {} not ok", broken.join(","))),
                    now,
                    fx,
                );
            }
        }

        if let Some(t) = h.temp_c {
            self.temp_c = Some(t);
            let range = self.desired.as_ref().map(|c| c.temp_range_c);
            let out = range.is_some_and(|[lo, hi]| t < lo || t > hi);
            if out {
                if self.temp_out_since.is_none() {
                    self.temp_out_since = Some(now);
                }
            } else {
                self.temp_out_since = None;
                self.clear(
                    AlertType::TemperatureOutOfRange,
                    ClearedBy::Condition,
                    now,
                    fx,
                );
            }
        }

        if self.behind_desired() {
            self.send_configure(now, fx);
        }
        if self.snapshot() != before {
            fx.push(Effect::StateChanged);
        }
    }

    /// The lock latched with the door closed: the latch wait and its alert end.
    fn latched(&mut self, now: u64, fx: &mut Vec<Effect>) {
        self.latch_wait_since = None;
        self.clear(AlertType::LockNotLatched, ClearedBy::Condition, now, fx);
    }

    fn event(&mut self, e: Event, now: u64, fx: &mut Vec<Effect>) {
        match e.kind {
            EventType::DoorOpened => {
                self.door = Some(Door::Open);
                self.door_open_since = Some(now);
                // A door opened while the lock should be latched means the latch wait is moot.
                self.latch_wait_since = None;
                let in_session = match &mut self.session {
                    Some(s)
                        if s.phase != SessionPhase::Unlocking
                            || e.session_id.as_deref() == Some(s.id.as_str()) =>
                    {
                        s.phase = SessionPhase::DoorOpen;
                        s.closed_at = None;
                        true
                    }
                    _ => false,
                };
                if !in_session {
                    let detail = match e.session_id {
                        Some(sid) => format!("no session in progress (cabinet named {sid})"),
                        None => "no session in progress".to_owned(),
                    };
                    self.raise(AlertType::DoorForced, Some(detail), now, fx);
                }
            }
            EventType::DoorClosed => {
                self.door = Some(Door::Closed);
                self.door_open_since = None;
                self.clear(AlertType::DoorOpenTooLong, ClearedBy::Condition, now, fx);
                if self.lock != Some(Lock::Locked) || self.latch_wait_since.is_none() {
                    self.latch_wait_since = Some(now);
                }
                if let Some(s) = &mut self.session {
                    if s.phase == SessionPhase::DoorOpen {
                        s.phase = SessionPhase::DoorClosed;
                        s.closed_at = Some(now);
                    }
                }
            }
            EventType::LockLocked => {
                self.lock = Some(Lock::Locked);
                self.clear(AlertType::LockFault, ClearedBy::Condition, now, fx);
                if self.door != Some(Door::Open) {
                    self.latched(now, fx);
                }
            }
            EventType::LockUnlocked => {
                self.lock = Some(Lock::Unlocked);
                self.clear(AlertType::LockFault, ClearedBy::Condition, now, fx);
            }
            EventType::LockFault => {
                self.lock = Some(Lock::Fault);
                self.raise(AlertType::LockFault, e.detail, now, fx);
            }
            EventType::CameraFault => {
                if self.cameras.len() == 1 {
                    self.cameras[0].ok = false;
                }
                self.raise(AlertType::CameraFault, e.detail, now, fx);
            }
            EventType::CameraOk => {
                for c in &mut self.cameras {
                    c.ok = true;
                }
                self.clear(AlertType::CameraFault, ClearedBy::Condition, now, fx);
            }
            EventType::Tamper => self.raise(AlertType::Tamper, e.detail, now, fx),
            EventType::PowerRestored => {}
        }
        fx.push(Effect::StateChanged);
    }

    fn ack(&mut self, a: Ack, now: u64, fx: &mut Vec<Effect>) {
        let Some(p) = self.take_pending(&a.cmd_id) else {
            fx.push(Effect::StrayAck { cmd_id: a.cmd_id });
            return;
        };
        let outcome = if a.ok {
            CommandOutcome::Ok
        } else {
            CommandOutcome::Rejected(a.error.unwrap_or_else(|| "unspecified".to_owned()))
        };
        match (&p.body, &outcome) {
            (CommandBody::Unlock { session_id, .. }, CommandOutcome::Ok) => {
                self.clear(AlertType::UnlockNoAck, ClearedBy::Condition, now, fx);
                if let Some(s) = self.session.as_mut().filter(|s| &s.id == session_id) {
                    if s.phase == SessionPhase::Unlocking {
                        s.phase = SessionPhase::Unlocked;
                    }
                    // Also when the door-opened event overtook the ack.
                    s.acked_at.get_or_insert(now);
                }
            }
            (CommandBody::Unlock { session_id, .. }, _) => {
                self.end_session(session_id);
            }
            (CommandBody::Configure { config }, CommandOutcome::Ok) => {
                self.reported_version = Some(config.version);
            }
            (CommandBody::Configure { config }, _) => {
                // A cabinet that refuses a configuration would refuse it again: do not resend
                // it on every heartbeat; a new desired version tries again.
                self.rejected_version = Some(config.version);
            }
            (CommandBody::Lockdown { on, .. }, CommandOutcome::Ok) => self.locked_down = *on,
            (CommandBody::Lockdown { .. } | CommandBody::Reboot, _) => {}
        }
        fx.push(Effect::CommandDone {
            cmd_id: a.cmd_id,
            kind: p.kind,
            outcome,
            elapsed_ms: now.saturating_sub(p.sent_at),
        });
        fx.push(Effect::StateChanged);
    }

    /// Where this actor's session stands, if it holds `session_id`.
    pub fn session_phase(&self, session_id: &str) -> Option<SessionPhase> {
        self.session
            .as_ref()
            .filter(|s| s.id == session_id)
            .map(|s| s.phase)
    }

    fn end_session(&mut self, session_id: &str) {
        if self.session.as_ref().is_some_and(|s| s.id == session_id) {
            self.session = None;
        }
    }

    fn recognition(&mut self, r: Recognition, fx: &mut Vec<Effect>) {
        let Some(session) = self.session.as_ref().filter(|s| s.id == r.session_id) else {
            // Recognition for a session this actor does not hold (e.g. after a hub restart):
            // the session supervisor decides what it belongs to.
            fx.push(Effect::Session(SessionEvent::Recognized {
                session_id: r.session_id.clone(),
                mode: if r.stock.is_some() {
                    SessionMode::Restock
                } else {
                    SessionMode::Purchase
                },
                recognition: r,
            }));
            return;
        };
        let mode = session.mode;
        let event = match r.status {
            RecognitionStatus::Ok => SessionEvent::Recognized {
                session_id: r.session_id.clone(),
                mode,
                recognition: r.clone(),
            },
            RecognitionStatus::Failed => SessionEvent::Abnormal {
                session_id: r.session_id.clone(),
                mode,
                reason: AbnormalReason::RecognitionFailed,
            },
        };
        self.session = None;
        fx.push(Effect::Session(event));
        fx.push(Effect::StateChanged);
    }

    fn tick(&mut self, now: u64, fx: &mut Vec<Effect>) {
        self.settle_flaps(now, fx);
        let t = self.timing.clone();
        let mut expired: Vec<(String, Pending)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        expired.sort_by_key(|(_, p)| p.deadline);
        for (cmd_id, p) in expired {
            self.take_pending(&cmd_id);
            if let CommandBody::Unlock { session_id, .. } = &p.body {
                self.end_session(session_id);
                self.raise(
                    AlertType::UnlockNoAck,
                    Some(format!("session {session_id}")),
                    now,
                    fx,
                );
                fx.push(Effect::StateChanged);
            }
            fx.push(Effect::CommandDone {
                cmd_id,
                kind: p.kind,
                outcome: CommandOutcome::Timeout,
                elapsed_ms: now.saturating_sub(p.sent_at),
            });
        }
        if self
            .latch_wait_since
            .is_some_and(|s| now >= s + t.latch_timeout_ms)
        {
            self.raise(
                AlertType::LockNotLatched,
                Some(format!(
                    "door closed, not latched within {} ms",
                    t.latch_timeout_ms
                )),
                now,
                fx,
            );
        }
        if self
            .door_open_since
            .is_some_and(|s| now >= s + t.door_open_max_ms)
        {
            self.raise(AlertType::DoorOpenTooLong, None, now, fx);
        }
        if self
            .temp_out_since
            .is_some_and(|s| now >= s + t.temp_out_of_range_ms)
        {
            let detail = self.temp_c.map(|c| format!("{c} °C"));
            self.raise(AlertType::TemperatureOutOfRange, detail, now, fx);
        }
        let recognition_late = self
            .session
            .as_ref()
            .and_then(|s| s.closed_at)
            .is_some_and(|c| now >= c + t.recognition_timeout_ms);
        if recognition_late {
            if let Some(s) = self.session.take() {
                fx.push(Effect::Session(SessionEvent::Abnormal {
                    session_id: s.id,
                    mode: s.mode,
                    reason: AbnormalReason::RecognitionTimeout,
                }));
                fx.push(Effect::StateChanged);
            }
        }
        let door_late = self
            .session
            .as_ref()
            .and_then(|s| s.door_deadline(&t))
            .is_some_and(|d| now >= d);
        if door_late {
            if let Some(s) = self.session.take() {
                fx.push(Effect::Session(match s.phase {
                    SessionPhase::Unlocked => SessionEvent::DoorNeverOpened {
                        session_id: s.id,
                        mode: s.mode,
                    },
                    _ => SessionEvent::Abnormal {
                        session_id: s.id,
                        mode: s.mode,
                        reason: AbnormalReason::SessionTimeout,
                    },
                }));
                fx.push(Effect::StateChanged);
            }
        }
        if self.offline_deadline().is_some_and(|d| now >= d) {
            self.go_offline(now, fx);
        }
    }
}

impl CabinetMachine {
    /// The desired configuration.
    pub fn desired(&self) -> Option<&CabinetConfig> {
        self.desired.as_ref()
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
