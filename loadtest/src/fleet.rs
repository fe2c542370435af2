//! The simulated cabinets: each one a task with its own MQTT connection that speaks PROTOCOL.md
//! — status on connect, heartbeats at the configured interval, acks within the deadline, the
//! door and lock events of a visit and the recognition after the door closes — with optional
//! faults (unlock ignored, lock not latching, camera failing, abrupt disconnects).

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::Packet;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::hub::FleetCabinet;
use crate::mqtt::{Conn, Login};

/// Connections per loopback source address. The kernel finds a free ephemeral port (32768–60999)
/// per (source, destination) pair by probing; at 20,000 connections from one address those probes
/// took most of the simulator's CPU (`__inet_hash_connect` in perf). 5,000 per address keeps the
/// range mostly free, so a fleet spreads over 127.0.0.1, 127.0.0.2, …
pub const PER_SOURCE: usize = 5_000;

/// What can go wrong with a cabinet, as probabilities (0–1).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// An `unlock` is neither acked nor acted on.
    pub unlock_ignored: f64,
    /// After a visit the door closes but the lock never reports latched.
    pub lock_not_latching: f64,
    /// The cabinet reports a camera fault at connect.
    pub camera_failing: f64,
    /// Per heartbeat: the connection is dropped without DISCONNECT, then re-established.
    pub abrupt_disconnect: f64,
}

/// How every cabinet behaves.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Heartbeat interval until a `configure` says otherwise.
    pub heartbeat_s: u32,
    /// How long a shopper keeps the door open.
    pub door_open: Duration,
    /// What the cameras see taken.
    pub items: Value,
    /// Injected faults.
    pub faults: Faults,
    /// Connections per second while the fleet comes up; all at once when unset.
    pub ramp_per_s: Option<f64>,
}

/// Counters shared by the whole fleet.
#[derive(Default, Debug)]
pub struct Stats {
    /// Connections established (including reconnects).
    pub connected: AtomicU64,
    /// Connections that failed.
    pub connect_failed: AtomicU64,
    /// Connections lost unexpectedly.
    pub dropped: AtomicU64,
    /// Uplink publishes sent.
    pub published: AtomicU64,
    /// PUBACKs received from the broker.
    pub pubacks: AtomicU64,
    /// Commands received.
    pub commands: AtomicU64,
    /// Unlocks received.
    pub unlocks: AtomicU64,
    /// Recognitions sent.
    pub recognitions: AtomicU64,
    /// Payloads from the hub this simulator could not read.
    pub bad_commands: AtomicU64,
}

impl Stats {
    /// A counter's value.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Orders from a scenario to one cabinet.
#[derive(Debug)]
pub enum Control {
    /// Publish this event type now.
    Event(&'static str),
    /// Publish a heartbeat now, with this temperature (a marker the feed will show).
    HeartbeatTemp(f64),
}

/// A running cabinet.
pub struct Handle {
    /// Its id.
    pub id: String,
    /// Orders to it.
    pub tx: mpsc::UnboundedSender<Control>,
}

/// The loopback source address for the `i`-th connection: 127.0.0.1 for the first
/// `PER_SOURCE`, then 127.0.0.2, 127.0.0.3, …
pub fn source_for(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i / PER_SOURCE).min(250) as u8,
    ))
}

/// Starts one task per cabinet; they run until `stop` turns true. Cabinet `i` connects to
/// `brokers[i % n]` and, when that refuses or does not answer, to the next, as cabinets behind a
/// load balancer reach whichever node is up.
pub fn start(
    brokers: &[SocketAddr],
    cabinets: &[FleetCabinet],
    behaviour: Arc<Behaviour>,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) -> Vec<Handle> {
    cabinets
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (tx, rx) = mpsc::unbounded_channel();
            let start_after = behaviour
                .ramp_per_s
                .map_or(Duration::ZERO, |r| Duration::from_secs_f64(i as f64 / r));
            let sim = Sim {
                start_after,
                cab: c.clone(),
                src: source_for(i),
                brokers: brokers.to_vec().into(),
                preferred: i,
                behaviour: behaviour.clone(),
                stats: stats.clone(),
                seq: 0,
                boot_id: format!("lt{i:x}"),
                config_version: 0,
                heartbeat: Duration::from_secs(u64::from(behaviour.heartbeat_s.max(1))),
                door: "closed",
                lock: "locked",
                temp: 4.5,
                camera_ok: true,
                actions: VecDeque::new(),
            };
            tokio::spawn(sim.run(rx, stop.clone()));
            Handle {
                id: c.id.clone(),
                tx,
            }
        })
        .collect()
}

enum Step {
    Event(&'static str, Option<String>),
    Recognition(String),
}

struct Sim {
    /// When to connect first, for a ramped start.
    start_after: Duration,
    cab: FleetCabinet,
    src: IpAddr,
    brokers: Arc<[SocketAddr]>,
    /// Index (modulo the list) of the broker tried first.
    preferred: usize,
    behaviour: Arc<Behaviour>,
    stats: Arc<Stats>,
    seq: u64,
    boot_id: String,
    config_version: u64,
    heartbeat: Duration,
    door: &'static str,
    lock: &'static str,
    temp: f64,
    camera_ok: bool,
    actions: VecDeque<(Instant, Step)>,
}

fn chance(p: f64) -> bool {
    p > 0.0 && rand_unit() < p
}

/// A cheap per-thread xorshift: fault injection needs no cryptographic randomness.
fn rand_unit() -> f64 {
    use std::cell::Cell;
    thread_local!(static S: Cell<u64> = Cell::new(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id())));
    S.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Sim {
    fn topic(&self, kind: &str) -> String {
        format!("/tenants/{}/{kind}", self.cab.id)
    }

    async fn publish(&mut self, conn: &mut Conn, kind: &str, body: Value) -> std::io::Result<()> {
        let topic = self.topic(kind);
        conn.publish(&topic, body.to_string().as_bytes()).await?;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn heartbeat(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        self.seq += 1;
        let hb = json!({"seq": self.seq, "ts": now_ms(), "door": self.door, "lock": self.lock, "temp_c": self.temp,
                        "light": "on", "cameras": [{"id": 0, "ok": self.camera_ok}, {"id": 1, "ok": true}],
                        "config_version": self.config_version});
        self.publish(conn, "heartbeat", hb).await
    }

    async fn event(
        &mut self,
        conn: &mut Conn,
        kind: &'static str,
        session: Option<String>,
    ) -> std::io::Result<()> {
        match kind {
            "door_opened" => self.door = "open",
            "door_closed" => self.door = "closed",
            "lock_locked" => self.lock = "locked",
            "lock_unlocked" => self.lock = "unlocked",
            "lock_fault" => self.lock = "fault",
            "camera_fault" => self.camera_ok = false,
            "camera_ok" => self.camera_ok = true,
            _ => {}
        }
        self.seq += 1;
        let mut ev = json!({"seq": self.seq, "ts": now_ms(), "type": kind});
        if let Some(s) = session {
            ev["session_id"] = json!(s);
        }
        self.publish(conn, "event", ev).await
    }

    async fn connect(&mut self, stop: &watch::Receiver<bool>) -> Option<Conn> {
        let mut backoff = Duration::from_millis(200);
        let mut attempt_no = 0usize;
        loop {
            let broker = *self
                .brokers
                .get((self.preferred + attempt_no) % self.brokers.len().max(1))?;
            attempt_no += 1;
            if *stop.borrow() {
                return None;
            }
            let login = Login {
                client_id: &self.cab.id,
                credentials: Some((&self.cab.id, &self.cab.secret)),
                keep_alive: 60,
                will: Some((self.topic("status"), br#"{"online":false}"#.to_vec())),
            };
            // A connection the broker neither refuses nor answers (SYN or CONNECT lost in a
            // storm) is abandoned after 30 s and tried again, as cabinet firmware does; a shorter
            // deadline only adds abandoned sockets to a broker that is already behind.
            let attempt = tokio::time::timeout(
                Duration::from_secs(30),
                Conn::connect(broker, self.src, login),
            )
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no CONNACK within 30 s",
                ))
            });
            match attempt {
                Ok(mut conn) => {
                    self.stats.connected.fetch_add(1, Ordering::Relaxed);
                    let status = json!({"online": true, "boot_id": self.boot_id, "fw": "2.4.1", "model": "KM-400",
                                        "config_version": self.config_version, "boot": "power_on"});
                    let topic = self.topic("cmd");
                    let ok = conn.subscribe(&topic).await.is_ok()
                        && self.publish(&mut conn, "status", status).await.is_ok()
                        && self.heartbeat(&mut conn).await.is_ok();
                    if ok {
                        return Some(conn);
                    }
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Jittered so a fleet that failed together does not retry together.
            tokio::time::sleep(backoff.mul_f64(0.5 + rand_unit())).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Control>,
        mut stop: watch::Receiver<bool>,
    ) {
        if chance(self.behaviour.faults.camera_failing) {
            self.camera_ok = false;
        }
        if !self.start_after.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(self.start_after) => {}
                _ = stop.changed() => return,
            }
        }
        'session: loop {
            let Some(mut conn) = self.connect(&stop).await else {
                return;
            };
            // Spread heartbeats over the interval instead of beating in lockstep.
            let first = self.heartbeat.mul_f64(rand_unit());
            let mut beat = tokio::time::interval_at(Instant::now() + first, self.heartbeat);
            loop {
                let next_action = self.actions.front().map(|(t, _)| *t);
                tokio::select! {
                    p = conn.read() => match p {
                        Ok(Packet::Publish(p)) => {
                            if conn.puback(p.pkid).await.is_err() { break; }
                            if self.command(&mut conn, &p.payload).await.is_err() { break; }
                        }
                        Ok(Packet::PubAck(_)) => { self.stats.pubacks.fetch_add(1, Ordering::Relaxed); }
                        Ok(_) => {}
                        Err(_) => {
                            if *stop.borrow() { return; }
                            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            continue 'session;
                        }
                    },
                    _ = beat.tick() => {
                        if chance(self.behaviour.faults.abrupt_disconnect) {
                            drop(conn);
                            continue 'session;
                        }
                        if self.heartbeat(&mut conn).await.is_err() { break; }
                    }
                    _ = sleep_until(next_action) => {
                        if let Some((_, step)) = self.actions.pop_front() {
                            let r = match step {
                                Step::Event(kind, session) => self.event(&mut conn, kind, session).await,
                                Step::Recognition(session) => {
                                    self.stats.recognitions.fetch_add(1, Ordering::Relaxed);
                                    let items = self.behaviour.items.clone();
                                    self.publish(&mut conn, "recognition", json!({"session_id": session, "status": "ok", "items": items})).await
                                }
                            };
                            if r.is_err() { break; }
                        }
                    }
                    c = rx.recv() => {
                        let r = match c {
                            Some(Control::Event(kind)) => self.event(&mut conn, kind, None).await,
                            Some(Control::HeartbeatTemp(t)) => { self.temp = t; self.heartbeat(&mut conn).await }
                            None => { std::future::pending::<()>().await; Ok(()) }
                        };
                        if r.is_err() { break; }
                    }
                    _ = stop.changed() => {
                        let _ = conn.send(&Packet::Disconnect).await;
                        return;
                    }
                }
            }
            if *stop.borrow() {
                return;
            }
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn command(&mut self, conn: &mut Conn, payload: &[u8]) -> std::io::Result<()> {
        self.stats.commands.fetch_add(1, Ordering::Relaxed);
        let Ok(cmd) = serde_json::from_slice::<Value>(payload) else {
            self.stats.bad_commands.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let cmd_id = cmd["cmd_id"].as_str().unwrap_or_default().to_owned();
        match cmd["type"].as_str() {
            Some("unlock") => {
                self.stats.unlocks.fetch_add(1, Ordering::Relaxed);
                if chance(self.behaviour.faults.unlock_ignored) {
                    return Ok(());
                }
                if cmd["expires_at"].as_u64().is_some_and(|e| e < now_ms()) {
                    return self
                        .publish(
                            conn,
                            "ack",
                            json!({"cmd_id": cmd_id, "ok": false, "error": "expired"}),
                        )
                        .await;
                }
                self.publish(conn, "ack", json!({"cmd_id": cmd_id, "ok": true}))
                    .await?;
                let session = cmd["session_id"].as_str().map(str::to_owned);
                let t = Instant::now();
                let open = self.behaviour.door_open;
                self.actions.push_back((
                    t + Duration::from_millis(20),
                    Step::Event("door_opened", session.clone()),
                ));
                self.actions
                    .push_back((t + open, Step::Event("door_closed", session.clone())));
                if !chance(self.behaviour.faults.lock_not_latching) {
                    self.actions.push_back((
                        t + open + Duration::from_millis(20),
                        Step::Event("lock_locked", session.clone()),
                    ));
                }
                if let Some(s) = session {
                    self.actions
                        .push_back((t + open + Duration::from_millis(60), Step::Recognition(s)));
                }
                Ok(())
            }
            Some("configure") => {
                if let Some(v) = cmd["config"]["version"].as_u64() {
                    self.config_version = v;
                }
                if let Some(h) = cmd["config"]["heartbeat_s"].as_u64() {
                    self.heartbeat = Duration::from_secs(h.max(1));
                }
                self.publish(conn, "ack", json!({"cmd_id": cmd_id, "ok": true}))
                    .await
            }
            Some(_) => {
                self.publish(conn, "ack", json!({"cmd_id": cmd_id, "ok": true}))
                    .await
            }
            None => {
                self.stats.bad_commands.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
