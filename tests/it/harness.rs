//! The hub on free ports with a fresh database (SQLite file, or a new PostgreSQL database on
//! the machine's server), reqwest as the API client, rumqttc clients as cabinets.

use std::net::{SocketAddr, TcpListener};

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Transport};
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::sync::mpsc;

use cabinet_hub::{Application, Settings};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";

/// The least a test waits for something the hub should do "at once". The suite must pass on a
/// busy 2-core machine running another copy of itself, where a step that takes milliseconds
/// alone can be starved for seconds. Every wait on a condition returns as soon as it holds, so
/// a generous deadline costs nothing when the hub works and only delays the report of a failure;
/// latency itself is measured by the benchmarks (`scripts/bench`), not asserted here.
pub const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each listed test body once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[actix_rt::test]
                async fn sqlite() {
                    super::$name($crate::harness::Backend::Sqlite).await
                }
                #[actix_rt::test]
                async fn postgres() {
                    super::$name($crate::harness::Backend::Postgres).await
                }
            }
        )*
    };
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

pub fn postgres_admin_url() -> String {
    std::env::var("HUB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh PostgreSQL database. A missing server fails the test: it is never skipped.
pub async fn fresh_postgres() -> String {
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let mut conn = sqlx::AnyConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} is required for these tests (HUB_TEST_POSTGRES_URL): {e}")
        });
    let name = format!(
        "hub_test_{}",
        cabinet_hub::secrets::token(16)
            .unwrap_or_default()
            .to_lowercase()
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE: {e}"));
    let mut url = url::Url::parse(&admin).unwrap_or_else(|e| panic!("{e}"));
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// Whether the hub's database (`db_url`) holds `cabinet` as online: the state a restarted hub
/// starts from. The hub writes it behind the live state, so a test about restarts waits for this
/// before it stops the hub rather than sleeping and hoping it landed.
pub async fn stored_online(db_url: &str, cabinet: &str) -> bool {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(db_url)
        .await
        .unwrap_or_else(|e| panic!("{db_url}: {e}"));
    let online_at: Option<i64> = sqlx::query("SELECT online_at FROM cabinets WHERE id = $1")
        .bind(cabinet)
        .fetch_one(&mut conn)
        .await
        .and_then(|r| r.try_get("online_at"))
        .unwrap_or_else(|e| panic!("{cabinet}'s online_at: {e}"));
    online_at.is_some()
}

/// The URL of the SQLite database of a hub whose data directory is `data`.
pub fn sqlite_url(data: &std::path::Path) -> String {
    format!("sqlite://{}", data.join("hub.db").display())
}

pub struct TestHub {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub mqtt_tls: Option<SocketAddr>,
    pub client: reqwest::Client,
    /// Its data directory, and those of starts given up (see `start_with`); none when the hub
    /// is another process that owns its data directory (tests/it/node.rs).
    _dirs: Vec<tempfile::TempDir>,
}

pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::defaults(dir).unwrap_or_else(|e| panic!("{e}"));
    s.http.listen = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    s.http.workers = 1;
    s.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    s.auth.admin_key = Some(ADMIN_KEY.to_owned());
    s.actors.threads = 2;
    // The hub's own deadlines, all longer than a test's patience: a cabinet that acks, latches,
    // recognises or beats as the test scripts it must never be taken for a silent one because
    // the machine was slow. A test about one of these deadlines sets it short itself, where
    // nothing else depends on it.
    s.cabinet.unlock_ack_timeout_ms = 60_000;
    s.cabinet.command_ack_timeout_ms = 60_000;
    s.cabinet.latch_timeout_ms = 60_000;
    s.cabinet.heartbeat_s = 30;
    s.cabinet.missed_heartbeats = 3;
    s.session.recognition_timeout_ms = 120_000;
    // Cabinets sell from activation: a free first year, set explicitly (the default has none).
    s.cabinet.initial_service_days = 365;
    s.log.level = "warn".into();
    s
}

impl TestHub {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// A hub on `test_settings` changed by `tweak`. The MQTT port `test_settings` picks is free
    /// when picked, but the broker binds it only later in the start: meanwhile another process
    /// (a second copy of the suite, or any outgoing connection's local port) may take it, or a
    /// starved broker thread may not listen within the hub's start-up wait. Such a start is
    /// given up and made again from scratch (a fresh directory, database and port), at most
    /// twice; any other failure, or one on a port the test chose itself, fails the test.
    pub async fn start_with(backend: Backend, mut tweak: impl FnMut(&mut Settings)) -> Self {
        let mut dirs = Vec::new();
        let app = loop {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let mut s = test_settings(dir.path());
            dirs.push(dir);
            if backend == Backend::Postgres {
                s.database.url = Some(fresh_postgres().await);
            }
            let picked = s.mqtt.listen;
            tweak(&mut s);
            let port_is_ours = s.mqtt.listen == picked;
            match Application::build(s).await {
                Ok(app) => break app,
                Err(e) => {
                    let e = format!("{e:#}");
                    let again = port_is_ours && e.contains("(HUB__MQTT__LISTEN)");
                    assert!(again && dirs.len() < 3, "hub did not start: {e}");
                }
            }
        };
        let hub = TestHub {
            http: app.http_addr(),
            mqtt: app.mqtt_addr(),
            mqtt_tls: app.mqtt_tls_addr(),
            client: reqwest::Client::new(),
            _dirs: dirs,
        };
        actix_rt::spawn(async move {
            let _ = app.run_until_stopped().await;
        });
        hub
    }

    /// The API of a hub running elsewhere (the real binary), for the same helpers.
    pub fn attach(http: SocketAddr, mqtt: SocketAddr, mqtt_tls: Option<SocketAddr>) -> Self {
        TestHub {
            http,
            mqtt,
            mqtt_tls,
            client: reqwest::Client::new(),
            _dirs: Vec::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = self.client.request(m, self.url(path)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.call("GET", path, key, None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, key, Some(body)).await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
            .await
            .unwrap_or_default()
    }

    /// The value of one series, 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// A new API key of `role` for `merchant`, minted with `by`: the whole answer (`id`, `key`, …).
    pub async fn new_key(&self, by: &str, merchant: &str, role: &str) -> Value {
        let (s, b) = self
            .post(
                "/api/v1/api-keys",
                by,
                json!({"merchant_id": merchant, "role": role}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        b
    }

    /// A merchant with a merchant_admin key and an operator key: (merchant_admin, operator).
    pub async fn merchant(&self, id: &str) -> (String, String) {
        let (s, b) = self
            .post(
                "/api/v1/merchants",
                ADMIN_KEY,
                json!({"id": id, "name": format!("Merchant {id}"), "commission_bps": 500}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let b = self.new_key(ADMIN_KEY, id, "merchant_admin").await;
        let admin = b["key"].as_str().unwrap_or_default().to_owned();
        let b = self.new_key(&admin, id, "operator").await;
        (admin, b["key"].as_str().unwrap_or_default().to_owned())
    }

    /// Registers and activates a cabinet; returns its secret.
    pub async fn cabinet(&self, merchant_admin: &str, merchant: &str, id: &str) -> String {
        let (s, b) = self
            .post(
                "/api/v1/cabinets",
                merchant_admin,
                json!({"id": id, "merchant_id": merchant, "model": "KM-400", "point": "lobby"}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let secret = b["secret"].as_str().unwrap_or_default().to_owned();
        let (s, b) = self
            .post(
                &format!("/api/v1/cabinets/{id}/activate"),
                merchant_admin,
                json!({}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        secret
    }

    /// Polls `f` until it returns Some or the time runs out: `within`, and never less than
    /// [`PATIENCE`].
    pub async fn eventually<T, F, Fut>(&self, within: Duration, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let within = within.max(PATIENCE);
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if start.elapsed() > within {
                panic!("timed out after {within:?} waiting for {what}");
            }
            actix_rt::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn cabinet_state(&self, key: &str, id: &str) -> Value {
        let (s, b) = self.get(&format!("/api/v1/cabinets/{id}"), key).await;
        assert_eq!(s, 200, "{b}");
        b
    }

    /// Waits until the hub reports the cabinet online.
    pub async fn wait_online(&self, key: &str, id: &str) {
        self.eventually(PATIENCE, "online", || async {
            (self.cabinet_state(key, id).await["online"] == true).then_some(())
        })
        .await;
    }

    pub async fn active_alert(&self, key: &str, cabinet: &str, kind: &str) -> Option<Value> {
        let (_, b) = self
            .get(
                &format!("/api/v1/alerts?active=true&cabinet_id={cabinet}"),
                key,
            )
            .await;
        b["items"]
            .as_array()?
            .iter()
            .find(|a| a["type"] == kind)
            .cloned()
    }
}

/// What a simulated cabinet receives.
#[derive(Debug)]
pub enum Got {
    ConnAck,
    Command(Value),
    /// The broker's answer to a subscription: one code per filter.
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    /// The broker took a QoS 1 publish.
    PubAck,
    Closed(String),
}

/// A cabinet as a real MQTT client.
pub struct Cabinet {
    pub id: String,
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Got>,
    pub seq: u64,
    pump: tokio::task::JoinHandle<()>,
}

pub fn options(hub_mqtt: SocketAddr, id: &str, secret: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, hub_mqtt.ip().to_string(), hub_mqtt.port());
    o.set_credentials(id, secret);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_last_will(LastWill::new(
        format!("/tenants/{id}/status"),
        r#"{"online":false}"#,
        QoS::AtLeastOnce,
        false,
    ));
    o
}

pub fn tls_options(addr: SocketAddr, id: &str, ca: &str, cert: &str, key: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "localhost", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: ca.as_bytes().to_vec(),
            alpn: None,
            client_auth: Some((cert.as_bytes().to_vec(), key.as_bytes().to_vec())),
        },
    ));
    o
}

fn pump(mut ev: EventLoop, tx: mpsc::UnboundedSender<Got>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send(Got::ConnAck);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let _ = tx.send(Got::Command(v));
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    let _ = tx.send(Got::SubAck(a.return_codes));
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = tx.send(Got::PubAck);
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Got::Closed(e.to_string()));
                    return;
                }
            }
        }
    })
}

impl Cabinet {
    /// Connects; returns Err with the reason when the broker refuses.
    pub async fn try_connect(opts: MqttOptions) -> Result<Self, String> {
        let id = opts.client_id();
        let (client, ev) = AsyncClient::new(opts, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = pump(ev, tx);
        // A refusal is a CONNACK with a code (or a closed socket) and comes as fast as an
        // acceptance: only a broker that never answers waits this long.
        match tokio::time::timeout(PATIENCE, rx.recv()).await {
            Ok(Some(Got::ConnAck)) => {}
            Ok(Some(other)) => {
                task.abort();
                return Err(format!("{other:?}"));
            }
            Ok(None) | Err(_) => {
                task.abort();
                return Err("no answer".into());
            }
        }
        let id = id.split('.').next_back().unwrap_or_default().to_owned();
        Ok(Self {
            id,
            client,
            rx,
            seq: 0,
            pump: task,
        })
    }

    /// Connects with password credentials, subscribes to commands and says it is online.
    pub async fn connect(hub: &TestHub, id: &str, secret: &str) -> Self {
        Self::connect_as(hub, id, secret, "b1", 1).await
    }

    pub async fn connect_as(
        hub: &TestHub,
        id: &str,
        secret: &str,
        boot_id: &str,
        config_version: u64,
    ) -> Self {
        Self::connect_with(options(hub.mqtt, id, secret), boot_id, config_version).await
    }

    /// Connects with `opts` (either mode), subscribes to commands and says it is online.
    pub async fn connect_with(opts: MqttOptions, boot_id: &str, config_version: u64) -> Self {
        let id = opts.client_id();
        let mut c = Self::try_connect(opts)
            .await
            .unwrap_or_else(|e| panic!("connect {id}: {e}"));
        c.subscribe_commands().await;
        c.publish("status", json!({"online": true, "boot_id": boot_id, "fw": "2.4.1", "model": "KM-400", "config_version": config_version, "boot": "power_on"})).await;
        c
    }

    /// Subscribes to its command topic and waits for the SUBACK: commands sent from then on
    /// arrive (a command published before the broker took the subscription would be lost).
    pub async fn subscribe_commands(&mut self) {
        let filter = format!("/tenants/{}/cmd", self.id);
        assert!(
            self.try_subscribe(&filter, PATIENCE).await,
            "{filter} was refused"
        );
    }

    pub async fn publish(&self, kind: &str, payload: Value) {
        self.publish_raw(
            &format!("/tenants/{}/{kind}", self.id),
            payload.to_string().into_bytes(),
        )
        .await;
    }

    pub async fn publish_raw(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn heartbeat(
        &mut self,
        door: &str,
        lock: &str,
        cameras_ok: bool,
        config_version: u64,
    ) {
        self.seq += 1;
        let hb = json!({"seq": self.seq, "ts": 1_763_700_000_000u64, "door": door, "lock": lock, "temp_c": 4.6, "light": "on",
                        "cameras": [{"id": 0, "ok": cameras_ok}], "config_version": config_version});
        self.publish("heartbeat", hb).await;
    }

    /// Heartbeats every 500 ms in the background until the handle is aborted (or the connection
    /// ends): a cabinet that stays online however long the test takes meanwhile, for tests with
    /// a short heartbeat window. It carries on from the cabinet's `seq` without advancing it, so
    /// the cabinet sends nothing else numbered while it beats.
    pub fn keep_beating(&self) -> tokio::task::JoinHandle<()> {
        let (client, topic, mut seq) = (
            self.client.clone(),
            format!("/tenants/{}/heartbeat", self.id),
            self.seq,
        );
        tokio::spawn(async move {
            loop {
                seq += 1;
                let hb = json!({"seq": seq, "ts": 1_763_700_000_000u64, "door": "closed", "lock": "locked",
                                "temp_c": 4.6, "light": "on", "cameras": [{"id": 0, "ok": true}], "config_version": 1});
                if client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, hb.to_string())
                    .await
                    .is_err()
                {
                    return;
                }
                actix_rt::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    pub async fn event(&mut self, kind: &str) {
        self.seq += 1;
        self.publish(
            "event",
            json!({"seq": self.seq, "ts": 1_763_700_000_000u64, "type": kind}),
        )
        .await;
    }

    /// The next command of `kind`, skipping others, within `within` and never less than
    /// [`PATIENCE`].
    pub async fn expect_command(&mut self, kind: &str, within: Duration) -> Value {
        let within = within.max(PATIENCE);
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Got::Command(c))) if c["type"] == kind => return c,
                Ok(Some(Got::Command(_) | Got::ConnAck | Got::SubAck(_) | Got::PubAck)) => {}
                Ok(Some(Got::Closed(e))) => {
                    panic!("connection closed while waiting for {kind}: {e}")
                }
                Ok(None) | Err(_) => panic!("no {kind} command within {within:?}"),
            }
        }
    }

    /// The next command of `kind` within exactly `within`, or `None`: for what must not come.
    pub async fn try_command(&mut self, kind: &str, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Got::Command(c))) if c["type"] == kind => return Some(c),
                Ok(Some(Got::Command(_) | Got::ConnAck | Got::SubAck(_) | Got::PubAck)) => {}
                Ok(Some(Got::Closed(e))) => {
                    panic!("connection closed while watching for {kind}: {e}")
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    pub async fn ack(&self, cmd: &Value, ok: bool, error: Option<&str>) {
        let mut a = json!({"cmd_id": cmd["cmd_id"], "ok": ok});
        if let Some(e) = error {
            a["error"] = json!(e);
        }
        self.publish("ack", a).await;
    }

    /// Drops the TCP connection without DISCONNECT, as a power cut would: the broker fires
    /// the Last Will.
    pub fn cut(self) {
        self.pump.abort();
    }

    /// Subscribes to `filter` and answers whether the broker granted it (waiting `within`, and
    /// never less than [`PATIENCE`]).
    pub async fn try_subscribe(&mut self, filter: &str, within: Duration) -> bool {
        self.subscribe_or_closed(filter, within)
            .await
            .unwrap_or_else(|e| panic!("closed while subscribing to {filter}: {e}"))
    }

    /// As [`Cabinet::try_subscribe`], but a connection closed before the SUBACK is Err(why).
    pub async fn subscribe_or_closed(
        &mut self,
        filter: &str,
        within: Duration,
    ) -> Result<bool, String> {
        let within = within.max(PATIENCE);
        if let Err(e) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
            return Err(e.to_string());
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Got::SubAck(codes))) => {
                    return Ok(codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))))
                }
                Ok(Some(Got::Closed(e))) => return Err(e),
                // Skipped here, it would be lost to the test that reads commands next.
                Ok(Some(Got::Command(c))) => {
                    panic!("a command arrived while subscribing to {filter}: {c}")
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err("channel closed".into()),
                Err(_) => panic!("no SUBACK for {filter} within {within:?}"),
            }
        }
    }

    /// Waits for the broker to close the connection (`within`, and never less than
    /// [`PATIENCE`]).
    pub async fn expect_closed(&mut self, within: Duration) -> String {
        let within = within.max(PATIENCE);
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Got::Closed(e))) => return e,
                Ok(Some(_)) => {}
                Ok(None) => return "channel closed".into(),
                Err(_) => panic!("the broker did not close the connection within {within:?}"),
            }
        }
    }
}
