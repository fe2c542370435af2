//! One test per row of PROTOCOL.md's "What the hub does" table, plus reboot, reconnect,
//! duplicates and command outcomes, driven with a fake clock (plain numbers).

use super::*;
use crate::alert::FLAP_WINDOW_MS;
use crate::protocol::{parse_uplink, LightSchedule, UplinkKind};

const T0: u64 = 1_763_700_000_000;

fn cfg(version: u64) -> CabinetConfig {
    CabinetConfig {
        version,
        temp_target_c: 5.0,
        temp_range_c: [2.0, 8.0],
        light: LightSchedule {
            on: "07:00".into(),
            off: "23:00".into(),
        },
        heartbeat_s: 30,
        foreign_object_lock: true,
    }
}

struct Rig {
    m: CabinetMachine,
    now: u64,
    seq: u64,
}

impl Rig {
    fn new() -> Self {
        let id = CabinetId::parse("KM1").unwrap_or_else(|e| panic!("{e}"));
        Self {
            m: CabinetMachine::new(id, Timing::default(), "t".into(), Some(cfg(1)), vec![]),
            now: T0,
            seq: 0,
        }
    }

    fn up(&mut self, kind: UplinkKind, json: &str) -> Vec<Effect> {
        let u = parse_uplink(self.m.id().clone(), kind, json.as_bytes())
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        self.m.handle(Input::Uplink(u.body), self.now)
    }

    /// Online with a fresh boot, config acked, healthy heartbeat.
    fn online() -> Self {
        let mut r = Self::new();
        let fx = r.up(
            UplinkKind::Status,
            r#"{"online":true,"boot_id":"b1","config_version":1}"#,
        );
        for c in published(&fx) {
            r.ack(&c.cmd_id, true, None);
        }
        r.heartbeat("closed", "locked", 4.0, true);
        r
    }

    fn event(&mut self, kind: &str) -> Vec<Effect> {
        self.seq += 1;
        let json = format!(
            r#"{{"seq":{},"ts":{},"type":"{kind}"}}"#,
            self.seq, self.now
        );
        self.up(UplinkKind::Event, &json)
    }

    fn heartbeat(&mut self, door: &str, lock: &str, temp: f64, cam_ok: bool) -> Vec<Effect> {
        self.seq += 1;
        let json = format!(
            r#"{{"seq":{},"ts":{},"door":"{door}","lock":"{lock}","temp_c":{temp},"light":"on","cameras":[{{"id":0,"ok":true}},{{"id":1,"ok":{cam_ok}}}],"config_version":1}}"#,
            self.seq, self.now
        );
        self.up(UplinkKind::Heartbeat, &json)
    }

    fn ack(&mut self, cmd_id: &str, ok: bool, error: Option<&str>) -> Vec<Effect> {
        let json = match error {
            Some(e) => format!(r#"{{"cmd_id":"{cmd_id}","ok":{ok},"error":"{e}"}}"#),
            None => format!(r#"{{"cmd_id":"{cmd_id}","ok":{ok}}}"#),
        };
        self.up(UplinkKind::Ack, &json)
    }

    fn advance(&mut self, ms: u64) -> Vec<Effect> {
        self.now += ms;
        self.m.handle(Input::Tick, self.now)
    }

    fn command(&mut self, body: CommandBody) -> (String, Vec<Effect>) {
        let id = self.m.next_cmd_id();
        let fx = self.m.handle(
            Input::Command {
                cmd_id: id.clone(),
                body,
            },
            self.now,
        );
        (id, fx)
    }

    fn unlock(&mut self, session: &str) -> (String, Vec<Effect>) {
        self.command(CommandBody::Unlock {
            session_id: session.into(),
            mode: SessionMode::Purchase,
            expires_at: self.now + 5000,
        })
    }

    /// A purchase session up to an open door.
    fn session_open(&mut self, session: &str) {
        let (id, _) = self.unlock(session);
        self.ack(&id, true, None);
        let fx = self.event("door_opened");
        assert!(raised(&fx).is_empty(), "{fx:?}");
    }
}

fn raised(fx: &[Effect]) -> Vec<AlertType> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::AlertRaised(a) => Some(a.kind),
            _ => None,
        })
        .collect()
}

fn cleared(fx: &[Effect]) -> Vec<AlertType> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::AlertCleared { alert, .. } => Some(alert.kind),
            _ => None,
        })
        .collect()
}

fn published(fx: &[Effect]) -> Vec<Command> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Publish(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn outcomes(fx: &[Effect]) -> Vec<(CommandKind, CommandOutcome)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::CommandDone { kind, outcome, .. } => Some((*kind, outcome.clone())),
            _ => None,
        })
        .collect()
}

fn sessions(fx: &[Effect]) -> Vec<SessionEvent> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Session(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn active(r: &Rig) -> Vec<AlertType> {
    r.m.alerts().map(|a| a.kind).collect()
}

// Row: no ack to `unlock` within 5 s → session fails `unlock_timeout`; alert `unlock_no_ack`.
#[test]
fn unlock_without_ack_times_out_and_alerts() {
    let mut r = Rig::online();
    let (_, fx) = r.unlock("s1");
    assert_eq!(published(&fx).len(), 1);
    assert_eq!(r.m.next_deadline(), Some(r.now + 5000));
    assert!(r.advance(4999).is_empty() || raised(&r.m.handle(Input::Tick, r.now)).is_empty());
    let fx = r.advance(1);
    assert_eq!(raised(&fx), vec![AlertType::UnlockNoAck]);
    assert_eq!(
        outcomes(&fx),
        vec![(CommandKind::Unlock, CommandOutcome::Timeout)]
    );
    assert!(
        sessions(&fx).is_empty(),
        "the supervisor learns of the failure from the command's outcome"
    );
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        None,
        "the failed session no longer blocks the cabinet"
    );
}

// Row: `door_closed`, then no `lock_locked` within 10 s → `lock_not_latched`; cabinet faulted.
#[test]
fn door_closed_without_latch_faults_and_locks_down() {
    let mut r = Rig::online();
    r.session_open("s1");
    r.event("door_closed");
    let fx = r.advance(9_999);
    assert!(raised(&fx).is_empty());
    let fx = r.advance(1);
    assert_eq!(raised(&fx), vec![AlertType::LockNotLatched]);
    let lockdown = published(&fx);
    assert!(
        matches!(
            lockdown.as_slice(),
            [Command {
                body: CommandBody::Lockdown { on: true, .. },
                ..
            }]
        ),
        "{fx:?}"
    );
    assert!(r.m.faulted());
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetFaulted)
    );
    // Latching ends it and releases the lock-down.
    let fx = r.event("lock_locked");
    assert_eq!(cleared(&fx), vec![AlertType::LockNotLatched]);
    assert!(matches!(
        published(&fx).as_slice(),
        [Command {
            body: CommandBody::Lockdown { on: false, .. },
            ..
        }]
    ));
    assert!(!r.m.faulted());
}

#[test]
fn latch_in_time_raises_nothing() {
    let mut r = Rig::online();
    r.session_open("s1");
    r.event("door_closed");
    r.advance(3_000);
    r.event("lock_locked");
    assert!(raised(&r.advance(60_000))
        .iter()
        .all(|a| *a != AlertType::LockNotLatched));
}

#[test]
fn operator_clear_of_lock_not_latched_unfaults() {
    let mut r = Rig::online();
    r.session_open("s1");
    r.event("door_closed");
    r.advance(10_000);
    let fx = r.m.handle(
        Input::ClearAlert {
            kind: AlertType::LockNotLatched,
            by: "k1".into(),
        },
        r.now,
    );
    assert_eq!(cleared(&fx), vec![AlertType::LockNotLatched]);
    assert!(!r.m.faulted());
    assert!(
        raised(&r.advance(60_000)).is_empty(),
        "not re-raised after an operator clear"
    );
}

// Row: `door_opened` with no session in progress → `door_forced` (critical).
#[test]
fn door_opened_without_session_is_forced() {
    let mut r = Rig::online();
    let fx = r.event("door_opened");
    assert_eq!(raised(&fx), vec![AlertType::DoorForced]);
    assert_eq!(
        AlertType::DoorForced.severity(),
        crate::alert::Severity::Critical
    );
    // Only an operator clears it; a closed door does not.
    let fx = r.event("door_closed");
    assert!(cleared(&fx).is_empty());
    let fx = r.m.handle(
        Input::ClearAlert {
            kind: AlertType::DoorForced,
            by: "k".into(),
        },
        r.now,
    );
    assert_eq!(cleared(&fx), vec![AlertType::DoorForced]);
}

// Row: door open longer than 120 s → `door_open_too_long`.
#[test]
fn door_open_too_long() {
    let mut r = Rig::online();
    r.session_open("s1");
    for _ in 0..3 {
        assert!(raised(&r.advance(30_000)).is_empty());
        r.heartbeat("open", "unlocked", 4.0, true);
    }
    assert!(raised(&r.advance(29_999)).is_empty());
    assert_eq!(raised(&r.advance(1)), vec![AlertType::DoorOpenTooLong]);
    assert_eq!(
        cleared(&r.event("door_closed")),
        vec![AlertType::DoorOpenTooLong]
    );
}

// Row: `lock_fault` event or heartbeat `lock: fault` → `lock_fault`; cabinet faulted.
#[test]
fn lock_fault_by_event_and_by_heartbeat() {
    let mut r = Rig::online();
    let fx = r.event("lock_fault");
    assert_eq!(raised(&fx), vec![AlertType::LockFault]);
    assert!(r.m.faulted());
    assert!(matches!(
        published(&fx).as_slice(),
        [Command {
            body: CommandBody::Lockdown { on: true, .. },
            ..
        }]
    ));
    assert_eq!(
        cleared(&r.heartbeat("closed", "locked", 4.0, true)),
        vec![AlertType::LockFault]
    );

    let mut r = Rig::online();
    assert_eq!(
        raised(&r.heartbeat("closed", "fault", 4.0, true)),
        vec![AlertType::LockFault]
    );
    assert!(
        r.heartbeat("closed", "fault", 4.0, true)
            .iter()
            .all(|e| !matches!(e, Effect::AlertRaised(_))),
        "raised once"
    );
}

// Row: camera not ok (event or heartbeat) → `camera_fault` until `camera_ok` / healthy heartbeat;
// no purchase sessions with no working camera.
#[test]
fn camera_fault_and_recovery() {
    let mut r = Rig::online();
    assert_eq!(
        raised(&r.heartbeat("closed", "locked", 4.0, false)),
        vec![AlertType::CameraFault]
    );
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        None,
        "one camera still works"
    );
    assert_eq!(
        cleared(&r.heartbeat("closed", "locked", 4.0, true)),
        vec![AlertType::CameraFault]
    );
    assert_eq!(
        raised(&r.event("camera_fault")),
        vec![AlertType::CameraFault]
    );
    assert_eq!(cleared(&r.event("camera_ok")), vec![AlertType::CameraFault]);
}

#[test]
fn no_working_camera_refuses_purchase_not_restock() {
    let mut r = Rig::online();
    r.seq += 1;
    let json = format!(
        r#"{{"seq":{},"ts":1,"door":"closed","lock":"locked","cameras":[{{"id":0,"ok":false}}]}}"#,
        r.seq
    );
    r.up(UplinkKind::Heartbeat, &json);
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetFaulted)
    );
    assert_eq!(r.m.session_refusal(SessionMode::Restock), None);
}

// Row: no heartbeat for 3 × heartbeat_s, or the Last Will → offline; `cabinet_offline`.
#[test]
fn offline_by_missed_heartbeats() {
    let mut r = Rig::online();
    assert!(raised(&r.advance(89_999)).is_empty());
    let fx = r.advance(1);
    assert_eq!(raised(&fx), vec![AlertType::CabinetOffline]);
    assert!(fx.contains(&Effect::OnlineChanged(false)));
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetOffline)
    );
    let fx = r.heartbeat("closed", "locked", 4.0, true);
    assert_eq!(cleared(&fx), vec![AlertType::CabinetOffline]);
    assert!(fx.contains(&Effect::OnlineChanged(true)));
}

#[test]
fn offline_by_last_will() {
    let mut r = Rig::online();
    let fx = r.up(UplinkKind::Status, r#"{"online":false}"#);
    assert_eq!(raised(&fx), vec![AlertType::CabinetOffline]);
    assert!(!r.m.online());
    // Commands are not sent to an offline cabinet.
    let (_, fx) = r.command(CommandBody::Reboot);
    assert!(published(&fx).is_empty());
    assert_eq!(
        outcomes(&fx),
        vec![(CommandKind::Reboot, CommandOutcome::NotConnected)]
    );
}

#[test]
fn offline_window_follows_the_desired_heartbeat() {
    let mut r = Rig::online();
    let mut c = cfg(2);
    c.heartbeat_s = 10;
    r.m.handle(Input::DesiredConfig(c), r.now);
    assert_eq!(raised(&r.advance(30_000)), vec![AlertType::CabinetOffline]);
}

// Row: temperature outside `temp_range_c` for 10 min → `temperature_out_of_range`.
#[test]
fn temperature_out_of_range_for_ten_minutes() {
    let mut r = Rig::online();
    r.heartbeat("closed", "locked", 9.5, true);
    // Keep it online with heartbeats every 30 s; the alert comes at 10 minutes, not before.
    let mut raised_at = None;
    for i in 1..=21 {
        let mut fx = r.advance(30_000);
        fx.extend(r.heartbeat("closed", "locked", 9.5, true));
        if raised(&fx).contains(&AlertType::TemperatureOutOfRange) {
            raised_at = Some(i * 30_000);
            break;
        }
    }
    assert_eq!(raised_at, Some(600_000));
    assert_eq!(
        cleared(&r.heartbeat("closed", "locked", 5.0, true)),
        vec![AlertType::TemperatureOutOfRange]
    );
}

#[test]
fn brief_temperature_excursion_raises_nothing() {
    let mut r = Rig::online();
    r.heartbeat("closed", "locked", 9.5, true);
    r.advance(30_000);
    r.heartbeat("closed", "locked", 5.0, true);
    for _ in 0..25 {
        let fx = r.advance(30_000);
        assert!(raised(&fx).is_empty());
        r.heartbeat("closed", "locked", 5.0, true);
    }
}

// Row: purchase door closed, no recognition within 60 s → abnormal `recognition_timeout`.
#[test]
fn recognition_timeout_makes_the_order_abnormal() {
    let mut r = Rig::online();
    r.session_open("s1");
    let fx = r.event("door_closed");
    assert!(
        sessions(&fx).is_empty(),
        "a closed door alone settles nothing"
    );
    assert!(matches!(
        r.m.snapshot().session.map(|s| s.phase),
        Some(SessionPhase::DoorClosed)
    ));
    r.event("lock_locked");
    assert!(sessions(&r.advance(59_999)).is_empty());
    let fx = r.advance(1);
    assert_eq!(
        sessions(&fx),
        vec![SessionEvent::Abnormal {
            session_id: "s1".into(),
            mode: SessionMode::Purchase,
            reason: AbnormalReason::RecognitionTimeout
        }]
    );
    assert_eq!(r.m.session_refusal(SessionMode::Purchase), None);
}

// Row: unlock acked, door not opened within 60 s → the session fails `door_never_opened`.
#[test]
fn a_door_never_opened_ends_the_session_and_frees_the_cabinet() {
    let mut r = Rig::online();
    let (id, _) = r.unlock("s1");
    // The ack comes 2 s later: the door's minute counts from the ack, not the command.
    r.advance(2_000);
    r.ack(&id, true, None);
    assert_eq!(r.m.next_deadline(), Some(r.now + 60_000));
    assert!(sessions(&r.advance(59_999)).is_empty());
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetBusy)
    );
    assert_eq!(
        sessions(&r.advance(1)),
        vec![SessionEvent::DoorNeverOpened {
            session_id: "s1".into(),
            mode: SessionMode::Purchase,
        }]
    );
    assert_eq!(r.m.session_refusal(SessionMode::Purchase), None);
    // Opening the door now is not the shopper's: the lock re-latched long ago.
    assert!(raised(&r.event("door_opened")).contains(&AlertType::DoorForced));
}

// Row: unlock acked, door not closed within 10 min → abnormal `session_timeout`.
#[test]
fn a_door_left_open_ends_the_session_after_the_open_timeout() {
    let mut r = Rig::online();
    r.session_open("s1");
    let mut ended = vec![];
    for _ in 0..19 {
        ended.extend(sessions(&r.advance(30_000)));
        r.heartbeat("open", "unlocked", 4.0, true);
    }
    assert!(ended.is_empty(), "{ended:?}");
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetBusy)
    );
    assert_eq!(
        sessions(&r.advance(30_000)),
        vec![SessionEvent::Abnormal {
            session_id: "s1".into(),
            mode: SessionMode::Purchase,
            reason: AbnormalReason::SessionTimeout
        }]
    );
    assert_eq!(r.m.session_refusal(SessionMode::Purchase), None);
}

#[test]
fn a_door_opened_before_the_ack_still_times_out() {
    let mut r = Rig::online();
    let (id, _) = r.unlock("s1");
    r.seq += 1;
    let json = format!(
        r#"{{"seq":{},"ts":{},"type":"door_opened","session_id":"s1"}}"#,
        r.seq, r.now
    );
    assert!(raised(&r.up(UplinkKind::Event, &json)).is_empty());
    r.ack(&id, true, None);
    assert_eq!(
        r.m.session_phase("s1"),
        Some(SessionPhase::DoorOpen),
        "the ack does not send the phase back"
    );
    assert!(sessions(&r.advance(599_999)).is_empty());
    assert!(matches!(
        sessions(&r.advance(1)).as_slice(),
        [SessionEvent::Abnormal {
            reason: AbnormalReason::SessionTimeout,
            ..
        }]
    ));
}

#[test]
fn closing_a_session_frees_the_cabinet_and_forgets_its_unlock() {
    let mut r = Rig::online();
    let (id, _) = r.unlock("s1");
    assert_eq!(r.m.session_phase("s1"), Some(SessionPhase::Unlocking));
    assert_eq!(r.m.session_phase("s2"), None);
    // Another session's close changes nothing.
    assert!(r
        .m
        .handle(
            Input::CloseSession {
                session_id: "s2".into()
            },
            r.now
        )
        .is_empty());
    r.m.handle(
        Input::CloseSession {
            session_id: "s1".into(),
        },
        r.now,
    );
    assert_eq!(r.m.session_phase("s1"), None);
    assert_eq!(r.m.session_refusal(SessionMode::Purchase), None);
    // Its unlock no longer times out into a session outcome.
    assert!(sessions(&r.advance(5_000)).is_empty());
    let _ = id;
}

// Row: recognition `failed` → abnormal `recognition_failed`.
#[test]
fn recognition_failed_makes_the_order_abnormal() {
    let mut r = Rig::online();
    r.session_open("s1");
    r.event("door_closed");
    let fx = r.up(
        UplinkKind::Recognition,
        r#"{"session_id":"s1","status":"failed","reason":"camera_blocked"}"#,
    );
    assert_eq!(
        sessions(&fx),
        vec![SessionEvent::Abnormal {
            session_id: "s1".into(),
            mode: SessionMode::Purchase,
            reason: AbnormalReason::RecognitionFailed
        }]
    );
}

#[test]
fn recognition_ok_hands_the_items_on() {
    let mut r = Rig::online();
    r.session_open("s1");
    r.event("door_closed");
    let fx = r.up(
        UplinkKind::Recognition,
        r#"{"session_id":"s1","status":"ok","items":[{"sku":"690","qty":2}]}"#,
    );
    assert!(
        matches!(sessions(&fx).as_slice(), [SessionEvent::Recognized { session_id, mode: SessionMode::Purchase, .. }] if session_id == "s1")
    );
    assert!(
        sessions(&r.advance(120_000)).is_empty(),
        "no timeout after recognition"
    );
}

// Row: heartbeat `config_version` below the desired version → `configure` again.
#[test]
fn heartbeat_behind_desired_config_resends_once() {
    let mut r = Rig::online();
    let fx = r.m.handle(Input::DesiredConfig(cfg(2)), r.now);
    let sent = published(&fx);
    assert!(
        matches!(sent.as_slice(), [Command { body: CommandBody::Configure { config }, .. }] if config.version == 2)
    );
    // Heartbeat still reports 1 while the configure is in flight: not sent twice.
    assert!(published(&r.heartbeat("closed", "locked", 4.0, true)).is_empty());
    // The configure timed out: the next heartbeat behind sends it again.
    r.advance(5_000);
    let fx = r.heartbeat("closed", "locked", 4.0, true);
    assert!(
        matches!(published(&fx).as_slice(), [Command { body: CommandBody::Configure { config }, .. }] if config.version == 2)
    );
}

#[test]
fn rejected_configuration_is_not_resent_on_every_heartbeat() {
    let mut r = Rig::online();
    let fx = r.m.handle(Input::DesiredConfig(cfg(2)), r.now);
    let id = published(&fx)[0].cmd_id.clone();
    let fx = r.ack(&id, false, Some("bad_config"));
    assert_eq!(
        outcomes(&fx),
        vec![(
            CommandKind::Configure,
            CommandOutcome::Rejected("bad_config".into())
        )]
    );
    assert!(published(&r.heartbeat("closed", "locked", 4.0, true)).is_empty());
}

// Row: status with a new `boot_id` → `configure` again and, with a session open, how it ended.
#[test]
fn reboot_resends_configure_and_ends_the_session() {
    let mut r = Rig::online();
    r.session_open("s1");
    let fx = r.up(
        UplinkKind::Status,
        r#"{"online":true,"boot_id":"b2","config_version":1,"boot":"watchdog"}"#,
    );
    assert!(published(&fx)
        .iter()
        .any(|c| matches!(c.body, CommandBody::Configure { .. })));
    assert_eq!(
        sessions(&fx),
        vec![SessionEvent::Abnormal {
            session_id: "s1".into(),
            mode: SessionMode::Purchase,
            reason: AbnormalReason::Rebooted
        }]
    );
    // Sequence numbers restart with the boot.
    r.seq = 0;
    assert!(!r
        .heartbeat("closed", "locked", 4.0, true)
        .iter()
        .any(|e| matches!(e, Effect::Duplicate { .. })));
}

#[test]
fn reconnect_with_same_boot_reconciles_only_when_behind() {
    let mut r = Rig::online();
    let fx = r.up(
        UplinkKind::Status,
        r#"{"online":true,"boot_id":"b1","config_version":1,"boot":"reconnect"}"#,
    );
    assert!(published(&fx).is_empty(), "{fx:?}");
    // The config changed while the cabinet was offline: it gets it on reconnect.
    r.up(UplinkKind::Status, r#"{"online":false}"#);
    let fx = r.m.handle(Input::DesiredConfig(cfg(2)), r.now);
    assert!(published(&fx).is_empty(), "offline: not sent");
    let fx = r.up(
        UplinkKind::Status,
        r#"{"online":true,"boot_id":"b1","config_version":1,"boot":"reconnect"}"#,
    );
    assert!(
        matches!(published(&fx).as_slice(), [Command { body: CommandBody::Configure { config }, .. }] if config.version == 2)
    );
}

#[test]
fn faulted_cabinet_is_locked_down_again_on_reconnect() {
    let mut r = Rig::online();
    r.event("lock_fault");
    r.up(UplinkKind::Status, r#"{"online":false}"#);
    let fx = r.up(
        UplinkKind::Status,
        r#"{"online":true,"boot_id":"b1","config_version":1}"#,
    );
    assert!(published(&fx)
        .iter()
        .any(|c| matches!(c.body, CommandBody::Lockdown { on: true, .. })));
}

#[test]
fn duplicates_are_dropped() {
    let mut r = Rig::online();
    r.heartbeat("closed", "locked", 4.0, true);
    let seq = r.seq;
    let json = format!(r#"{{"seq":{seq},"ts":1,"type":"door_opened"}}"#);
    let fx = r.up(UplinkKind::Event, &json);
    assert_eq!(fx, vec![Effect::Duplicate { seq }]);
    assert!(
        active(&r).is_empty(),
        "a redelivered message changes nothing"
    );
}

/// A heartbeat with this exact seq and temperature.
fn heartbeat_at(r: &mut Rig, seq: u64, temp: f64) -> Vec<Effect> {
    let json = format!(
        r#"{{"seq":{seq},"ts":{},"door":"closed","lock":"locked","temp_c":{temp},"cameras":[{{"id":0,"ok":true}},{{"id":1,"ok":true}}],"config_version":1}}"#,
        r.now
    );
    r.up(UplinkKind::Heartbeat, &json)
}

fn resets(fx: &[Effect]) -> Vec<(u64, u64)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::SeqReset { from, to } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

fn is_duplicate(fx: &[Effect]) -> bool {
    fx.iter().any(|e| matches!(e, Effect::Duplicate { .. }))
}

#[test]
fn a_huge_seq_cannot_silence_the_cabinet() {
    let mut r = Rig::online();
    for seq in 2..=42 {
        heartbeat_at(&mut r, seq, 4.0);
    }
    let fx = heartbeat_at(&mut r, u64::MAX, 4.5);
    assert_eq!(resets(&fx), vec![(42, u64::MAX)], "counted as a reset");
    assert_eq!(r.m.snapshot().temp_c, Some(4.5), "and processed");

    let fx = heartbeat_at(&mut r, 43, 6.0);
    assert!(!is_duplicate(&fx), "{fx:?}");
    assert_eq!(resets(&fx), vec![(u64::MAX, 43)]);
    assert_eq!(
        r.m.snapshot().temp_c,
        Some(6.0),
        "the genuine 43 is processed"
    );
    let fx = heartbeat_at(&mut r, 44, 7.0);
    assert!(!is_duplicate(&fx) && resets(&fx).is_empty(), "{fx:?}");
    assert_eq!(r.m.snapshot().temp_c, Some(7.0), "and so is 44");
}

#[test]
fn qos1_redelivery_is_still_a_duplicate() {
    let mut r = Rig::online();
    heartbeat_at(&mut r, 100, 4.0);
    heartbeat_at(&mut r, 101, 5.0);
    // Redelivered (with a payload that would change state, to see that it is dropped).
    let fx = heartbeat_at(&mut r, 100, 9.0);
    assert_eq!(fx, vec![Effect::Duplicate { seq: 100 }]);
    let fx = heartbeat_at(&mut r, 101, 9.0);
    assert_eq!(fx, vec![Effect::Duplicate { seq: 101 }]);
    assert_eq!(r.m.snapshot().temp_c, Some(5.0));
    // An event redelivered after later messages, still within the window.
    let json = r#"{"seq":102,"ts":1,"type":"tamper"}"#;
    assert_eq!(
        raised(&r.up(UplinkKind::Event, json)),
        vec![AlertType::Tamper]
    );
    for seq in 103..600 {
        heartbeat_at(&mut r, seq, 5.0);
    }
    assert_eq!(
        r.up(UplinkKind::Event, json),
        vec![Effect::Duplicate { seq: 102 }]
    );
}

#[test]
fn out_of_order_within_the_window_is_accepted_once() {
    let mut r = Rig::online();
    heartbeat_at(&mut r, 10, 4.0);
    heartbeat_at(&mut r, 13, 4.0);
    let fx = heartbeat_at(&mut r, 11, 6.5);
    assert!(!is_duplicate(&fx) && resets(&fx).is_empty(), "{fx:?}");
    assert_eq!(r.m.snapshot().temp_c, Some(6.5), "late but new: processed");
    assert!(is_duplicate(&heartbeat_at(&mut r, 11, 3.0)), "only once");
    assert!(!is_duplicate(&heartbeat_at(&mut r, 12, 3.0)));
    // Far below the window: a reset, not a duplicate.
    heartbeat_at(&mut r, 5000, 4.0);
    let fx = heartbeat_at(&mut r, 11, 3.5);
    assert_eq!(resets(&fx), vec![(5000, 11)]);
    assert_eq!(r.m.snapshot().temp_c, Some(3.5));
}

#[test]
fn a_new_boot_forgets_the_window() {
    let mut r = Rig::online();
    heartbeat_at(&mut r, 500, 4.0);
    r.up(
        UplinkKind::Status,
        r#"{"online":true,"boot_id":"b2","config_version":1}"#,
    );
    let fx = heartbeat_at(&mut r, 500, 5.0);
    assert!(!is_duplicate(&fx) && resets(&fx).is_empty(), "{fx:?}");
    assert_eq!(r.m.snapshot().temp_c, Some(5.0));
}

#[test]
fn command_outcomes_ok_rejected_timeout_not_connected() {
    let mut r = Rig::online();
    let (id, _) = r.command(CommandBody::Reboot);
    assert_eq!(
        outcomes(&r.ack(&id, true, None)),
        vec![(CommandKind::Reboot, CommandOutcome::Ok)]
    );
    let (id, _) = r.command(CommandBody::Reboot);
    assert_eq!(
        outcomes(&r.ack(&id, false, Some("busy"))),
        vec![(CommandKind::Reboot, CommandOutcome::Rejected("busy".into()))]
    );
    let (_, _) = r.command(CommandBody::Reboot);
    assert_eq!(
        outcomes(&r.advance(5_000)),
        vec![(CommandKind::Reboot, CommandOutcome::Timeout)]
    );
    // A late ack after the timeout is stray, not a second outcome.
    let fx = r.ack("c_t_999", true, None);
    assert!(matches!(fx.as_slice(), [Effect::StrayAck { .. }]));
    r.up(UplinkKind::Status, r#"{"online":false}"#);
    let (_, fx) = r.command(CommandBody::Reboot);
    assert_eq!(
        outcomes(&fx),
        vec![(CommandKind::Reboot, CommandOutcome::NotConnected)]
    );
}

#[test]
fn unlock_rejected_fails_the_session() {
    let mut r = Rig::online();
    let (id, _) = r.unlock("s1");
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetBusy)
    );
    let fx = r.ack(&id, false, Some("lock_jammed"));
    assert_eq!(
        outcomes(&fx),
        vec![(
            CommandKind::Unlock,
            CommandOutcome::Rejected("lock_jammed".into())
        )]
    );
    assert!(sessions(&fx).is_empty());
    assert_eq!(r.m.session_refusal(SessionMode::Purchase), None);
}

#[test]
fn alerts_raise_once_under_bursts() {
    let mut r = Rig::online();
    let mut n = 0;
    for _ in 0..50 {
        n += raised(&r.event("door_opened")).len();
        r.event("door_closed");
        r.event("lock_locked");
    }
    assert_eq!(n, 1);
}

#[test]
fn alerts_from_storage_are_not_raised_twice() {
    let id = CabinetId::parse("KM1").unwrap_or_else(|e| panic!("{e}"));
    let stored = ActiveAlert {
        id: "a1".into(),
        kind: AlertType::DoorForced,
        raised_at: T0,
        acked: false,
        detail: None,
        flapping: false,
        flaps: 0,
    };
    let mut m = CabinetMachine::new(
        id,
        Timing::default(),
        "t".into(),
        Some(cfg(1)),
        vec![stored],
    );
    let u = parse_uplink(
        m.id().clone(),
        UplinkKind::Event,
        br#"{"seq":1,"ts":1,"type":"door_opened"}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let fx = m.handle(Input::Uplink(u.body), T0);
    assert!(raised(&fx).is_empty());
}

fn flapped(fx: &[Effect]) -> Vec<u32> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::AlertFlapped(a) => Some(a.flaps),
            _ => None,
        })
        .collect()
}

/// Healthy heartbeats every 30 s for `ms`, then a tick at exactly `ms` later.
fn healthy_for(r: &mut Rig, ms: u64) -> Vec<Effect> {
    let end = r.now + ms;
    let mut fx = Vec::new();
    while r.now + 30_000 < end {
        r.now += 30_000;
        fx.extend(r.heartbeat("closed", "locked", 4.0, true));
        fx.extend(r.m.handle(Input::Tick, r.now));
    }
    r.now = end;
    fx.extend(r.m.handle(Input::Tick, r.now));
    fx
}

#[test]
fn a_camera_toggling_as_fast_as_it_can_costs_one_count_write_per_interval() {
    let mut r = Rig::online();
    let mut writes = Vec::new();
    // 200 toggles, one every 100 ms: 20 s.
    for _ in 0..100 {
        r.now += 50;
        writes.extend(flapped(&r.heartbeat("closed", "locked", 4.0, false)));
        r.now += 50;
        writes.extend(flapped(&r.heartbeat("closed", "locked", 4.0, true)));
    }
    assert!(
        writes.len() <= 3,
        "at most one count written per {FLAP_WRITE_EVERY_MS} ms: {writes:?}"
    );
    let a =
        r.m.alerts()
            .find(|a| a.kind == AlertType::CameraFault)
            .cloned()
            .unwrap_or_else(|| panic!("still active"));
    assert!(a.flapping);
    // Quiet for the window: the final count is written before the alert ends.
    let fx = healthy_for(&mut r, FLAP_WINDOW_MS);
    assert_eq!(flapped(&fx), vec![a.flaps], "{fx:?}");
    assert_eq!(cleared(&fx), vec![AlertType::CameraFault]);
}

#[test]
fn a_flapping_camera_is_one_alert_with_a_count() {
    let mut r = Rig::online();
    let (mut rows, mut clears) = (0, 0);
    // Camera 1 toggles fault/ok every heartbeat (30 s): 40 toggles in 10 minutes.
    for i in 0..20 {
        r.now += 30_000;
        let fx = r.heartbeat("closed", "locked", 4.0, false);
        rows += raised(&fx).len();
        clears += cleared(&fx).len();
        if i >= 6 {
            assert!(raised(&fx).is_empty(), "no new alert per toggle: {fx:?}");
            assert_eq!(flapped(&fx).len(), 1, "but its count goes up");
        }
        r.now += 30_000;
        let fx = r.heartbeat("closed", "locked", 4.0, true);
        clears += cleared(&fx).len();
        assert!(flapped(&fx).is_empty() && raised(&fx).is_empty(), "{fx:?}");
    }
    assert_eq!(rows, 6, "five ordinary raises, then the one flapping alert");
    assert_eq!(clears, 5, "the flapping alert is not cleared per toggle");
    let a =
        r.m.alerts()
            .find(|a| a.kind == AlertType::CameraFault)
            .cloned()
            .unwrap_or_else(|| panic!("still active"));
    assert!(a.flapping);
    assert_eq!(a.flaps, 20, "every raise counted");
    assert_eq!(
        r.m.snapshot().alerts,
        vec![a.clone()],
        "the live view shows it"
    );

    // Quiet (camera ok) for the window: it ends, once, by itself.
    let fx = healthy_for(&mut r, FLAP_WINDOW_MS - 1);
    assert!(cleared(&fx).is_empty(), "{fx:?}");
    let fx = r.advance(1);
    assert_eq!(cleared(&fx), vec![AlertType::CameraFault]);
    assert!(active(&r).is_empty());
    // After the quiet window a new fault is an ordinary alert again.
    let fx = r.heartbeat("closed", "locked", 4.0, false);
    assert!(
        matches!(
            fx.iter().find_map(|e| match e {
                Effect::AlertRaised(a) => Some(a.flapping),
                _ => None,
            }),
            Some(false)
        ),
        "{fx:?}"
    );
}

#[test]
fn alerts_raised_within_one_millisecond_have_distinct_ids() {
    let mut r = Rig::online();
    let mut ids = Vec::new();
    for _ in 0..3 {
        for e in r.event("camera_fault") {
            if let Effect::AlertRaised(a) = e {
                ids.push(a.id);
            }
        }
        r.event("camera_ok");
    }
    assert_eq!(ids.len(), 3);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "stored rows must not collide: {ids:?}");
}

#[test]
fn a_fault_that_persists_after_flapping_clears_normally_once_quiet() {
    let mut r = Rig::online();
    for _ in 0..6 {
        r.now += 10_000;
        r.event("camera_fault");
        r.now += 10_000;
        r.event("camera_ok");
    }
    r.now += 10_000;
    r.event("camera_fault");
    assert!(r.m.alerts().any(|a| a.flapping));
    // Broken for longer than the window, then repaired: cleared at once.
    r.now += FLAP_WINDOW_MS;
    let fx = r.event("camera_ok");
    assert_eq!(cleared(&fx), vec![AlertType::CameraFault]);
    // An operator may clear a flapping alert at any time.
    let mut r = Rig::online();
    for _ in 0..7 {
        r.event("camera_fault");
        r.event("camera_ok");
    }
    assert!(r.m.alerts().any(|a| a.flapping), "held while flapping");
    let fx = r.m.handle(
        Input::ClearAlert {
            kind: AlertType::CameraFault,
            by: "k1".into(),
        },
        r.now,
    );
    assert_eq!(cleared(&fx), vec![AlertType::CameraFault]);
    assert_eq!(r.m.next_deadline(), Some(r.now + 90_000), "nothing held");
}

#[test]
fn a_flapping_lock_does_not_toggle_the_lock_down() {
    let mut r = Rig::online();
    let mut lockdowns = 0;
    for _ in 0..15 {
        let fx = r.event("lock_fault");
        lockdowns += published(&fx)
            .iter()
            .filter(|c| matches!(c.body, CommandBody::Lockdown { .. }))
            .count();
        for c in published(&fx) {
            r.ack(&c.cmd_id, true, None);
        }
        let fx = r.event("lock_locked");
        lockdowns += published(&fx)
            .iter()
            .filter(|c| matches!(c.body, CommandBody::Lockdown { .. }))
            .count();
        for c in published(&fx) {
            r.ack(&c.cmd_id, true, None);
        }
    }
    // Five on/off pairs, then one "on" held while it flaps.
    assert_eq!(lockdowns, 11);
    assert!(
        r.m.faulted(),
        "a flapping lock keeps the cabinet faulted until quiet"
    );
    let fx = healthy_for(&mut r, FLAP_WINDOW_MS);
    assert_eq!(cleared(&fx), vec![AlertType::LockFault]);
    assert!(published(&fx)
        .iter()
        .any(|c| matches!(c.body, CommandBody::Lockdown { on: false, .. })));
}

#[test]
fn tamper_alerts() {
    let mut r = Rig::online();
    assert_eq!(raised(&r.event("tamper")), vec![AlertType::Tamper]);
}

#[test]
fn deadlines_are_exact() {
    let mut r = Rig::online();
    assert_eq!(
        r.m.next_deadline(),
        Some(r.now + 90_000),
        "only the offline window"
    );
    r.session_open("s1");
    assert_eq!(
        r.m.next_deadline(),
        Some(r.now + 90_000).min(Some(r.now + 120_000))
    );
}

// A cabinet that came over from another node (a partition of an external broker moving) is
// served from that node's last picture at once, and still goes offline when its heartbeats
// stop.
#[test]
fn restored_from_another_nodes_picture() {
    let mut r = Rig::new();
    assert_eq!(
        r.m.session_refusal(SessionMode::Purchase),
        Some(Refusal::CabinetOffline)
    );
    let live: LiveSeed = serde_json::from_str(
        r#"{"id":"KM1","merchant_id":"m1","online":true,"door":"closed","lock":"locked",
            "cameras":[{"id":0,"ok":true}],"temp_c":4.5,"light":"on","boot_id":"b7",
            "config_version":{"desired":1,"reported":1},"faulted":false,"locked_down":false,
            "alerts":[],"session":null,"last_seen_at":null}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let fx = r.m.handle(Input::Restore(live), r.now);
    assert!(fx.contains(&Effect::OnlineChanged(true)));
    assert!(fx.contains(&Effect::StateChanged));
    assert_eq!(r.m.session_refusal(SessionMode::Purchase), None);
    let s = r.m.snapshot();
    assert_eq!(
        (s.door, s.lock, s.temp_c),
        (Some(Door::Closed), Some(Lock::Locked), Some(4.5))
    );
    assert!(raised(&r.advance(89_999)).is_empty());
    let fx = r.advance(1);
    assert!(fx.contains(&Effect::OnlineChanged(false)));
}
