//! The MQTT edge: rumqttd embedded on its own threads, authentication against registered and
//! active cabinets, the uplink pump that parses every message once and routes it to the
//! cabinet's actor, and the command publisher.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{
    Broker, Config, ConnectionSettings, Notification, RouterConfig, SegmentConfig, ServerSettings,
    TlsConfig,
};

use cabinet_actors::actor::{CabinetMeta, Deliver, PublishError};
use cabinet_actors::ids::{CabinetId, MerchantId};
use cabinet_actors::protocol::{
    command_topic, parse_topic, parse_uplink, Command, RejectReason, Rejection, TopicTarget,
};
use cabinet_actors::registry::{ActorSeed, PendingSeed, Registry};

use crate::metrics::Metrics;
use crate::secrets::{constant_time_eq, sha256_hex};
use crate::store::Store;

/// Why a connection was refused. Stable metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The client id is not a valid cabinet id.
    BadClientId,
    /// Username differs from the client id.
    UsernameMismatch,
    /// No such cabinet.
    UnknownCabinet,
    /// Registered but not activated.
    NotActive,
    /// Wrong secret.
    BadSecret,
}

impl AuthFailure {
    /// Every reason.
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::BadClientId,
        AuthFailure::UsernameMismatch,
        AuthFailure::UnknownCabinet,
        AuthFailure::NotActive,
        AuthFailure::BadSecret,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::BadClientId => "bad_client_id",
            AuthFailure::UsernameMismatch => "username_mismatch",
            AuthFailure::UnknownCabinet => "unknown_cabinet",
            AuthFailure::NotActive => "not_active",
            AuthFailure::BadSecret => "bad_secret",
        }
    }
}

/// What the edge knows of a registered cabinet.
#[derive(Debug, Clone)]
pub struct DirectoryEntry {
    /// Owner.
    pub merchant: MerchantId,
    /// SHA-256 hex of the MQTT secret.
    pub secret_hash: String,
    /// Activated.
    pub active: bool,
}

/// The in-memory credential cache: loaded from storage at start, written through by the API
/// on every registration and activation, read on every connect and every uplink message.
#[derive(Debug, Default)]
pub struct Directory {
    map: RwLock<HashMap<CabinetId, DirectoryEntry>>,
}

impl Directory {
    /// Adds or replaces an entry.
    pub fn put(&self, id: CabinetId, entry: DirectoryEntry) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry);
    }

    /// An entry.
    pub fn get(&self, id: &CabinetId) -> Option<DirectoryEntry> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Loads every registered cabinet.
    pub async fn load(store: &Store) -> anyhow::Result<Self> {
        let d = Self::default();
        for c in store.cabinets(None).await? {
            let (Ok(id), Ok(merchant)) =
                (CabinetId::parse(&c.id), MerchantId::parse(&c.merchant_id))
            else {
                tracing::error!(cabinet_id = %c.id, "stored cabinet has an invalid id; skipped");
                continue;
            };
            d.put(
                id,
                DirectoryEntry {
                    merchant,
                    secret_hash: c.secret_hash,
                    active: c.active,
                },
            );
        }
        Ok(d)
    }

    /// Checks a password-mode login.
    pub fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<CabinetId, AuthFailure> {
        let id = CabinetId::parse(client_id).map_err(|_| AuthFailure::BadClientId)?;
        if username != client_id {
            return Err(AuthFailure::UsernameMismatch);
        }
        let entry = self.get(&id).ok_or(AuthFailure::UnknownCabinet)?;
        if !constant_time_eq(&sha256_hex(password), &entry.secret_hash) {
            return Err(AuthFailure::BadSecret);
        }
        if !entry.active {
            return Err(AuthFailure::NotActive);
        }
        Ok(id)
    }
}

/// A new actor's stored state: its desired configuration and its active alerts, read side by
/// side. A failed read is counted and the actor starts without it.
async fn read_seed(store: &Store, metrics: &Metrics, id: &CabinetId) -> ActorSeed {
    let (desired, alerts) = tokio::join!(
        store.latest_config(id.as_str()),
        store.active_alerts(id.as_str())
    );
    if let Err(e) = desired
        .as_ref()
        .map(|_| ())
        .and(alerts.as_ref().map(|_| ()))
    {
        tracing::error!(cabinet_id = %id, error = %e, "could not read the cabinet's stored state; starting the actor without it");
        metrics
            .store_errors
            .with_label_values(&["seed_actor"])
            .inc();
    }
    ActorSeed {
        desired: desired.ok().flatten(),
        alerts: alerts.unwrap_or_default(),
    }
}

/// Publishes commands through the hub's local link. rumqttd link publishes are QoS 0;
/// commands are acknowledged at the application level (`ack`), so a lost one times out
/// truthfully.
pub struct CommandPublisher {
    tx: Mutex<LinkTx>,
}

impl CommandPublisher {
    /// Publishes one command without blocking.
    pub fn publish(&self, cabinet: &CabinetId, command: &Command) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(command).map_err(|e| PublishError(e.to_string()))?;
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.try_publish(command_topic(cabinet), payload)
            .map(|_| ())
            .map_err(|e| PublishError(e.to_string()))
    }
}

/// The broker's listeners.
#[derive(Debug, Clone)]
pub struct BrokerListeners {
    /// Password mode.
    pub plain: SocketAddr,
    /// Certificate mode: address, CA, server cert, server key.
    pub tls: Option<(SocketAddr, PathBuf, PathBuf, PathBuf)>,
    /// Connection limit.
    pub max_connections: usize,
    /// The hub's uplink buffer, MiB.
    pub uplink_buffer_mib: usize,
}

fn connection_settings() -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Larger than the protocol's 16 KiB so that an oversize payload reaches the edge
        // parser and is counted with its reason rather than silently disconnected.
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    }
}

/// Starts rumqttd on its own threads and returns the hub's link to it.
pub fn start_broker(
    listeners: &BrokerListeners,
    directory: Arc<Directory>,
    metrics: Metrics,
) -> anyhow::Result<(CommandPublisher, LinkRx)> {
    let mut plain = ServerSettings {
        name: "password".to_owned(),
        listen: listeners.plain,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connection_settings(),
    };
    plain.set_auth_handler(move |client_id: String, username: String, password: String| {
        let result = directory.authenticate(&client_id, &username, &password);
        if let Err(reason) = result {
            metrics.mqtt_auth_failures.with_label_values(&[reason.as_str()]).inc();
            tracing::warn!(client_id = %client_id.chars().take(64).collect::<String>(), reason = reason.as_str(), "MQTT connection refused");
        }
        std::future::ready(result.is_ok())
    });
    let mut v4 = HashMap::new();
    v4.insert("1".to_owned(), plain);
    if let Some((addr, ca, cert, key)) = &listeners.tls {
        v4.insert(
            "2".to_owned(),
            ServerSettings {
                name: "certificate".to_owned(),
                listen: *addr,
                tls: Some(TlsConfig::Rustls {
                    capath: Some(ca.display().to_string()),
                    certpath: cert.display().to_string(),
                    keypath: key.display().to_string(),
                }),
                next_connection_delay_ms: 0,
                connections: connection_settings(),
            },
        );
    }
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: listeners.max_connections + 10,
            max_outgoing_packet_count: 1000,
            // rumqttd appends every publish to the commit log of each *filter* it matches. The
            // hub reads everything through one `#` filter: its log must hold any burst the pump
            // has not read yet, or the reader jumps ahead and messages are lost (at 16 KiB × 2
            // the ingest scenario lost thousands); `uplink_buffer_mib` sizes it. Read logs are
            // emptied (`discard_consumed`), so the cap is a ceiling, not a resting size.
            max_segment_size: (listeners.uplink_buffer_mib.max(1) * 1024 * 1024) / 4,
            max_segment_count: 4,
            // A cabinet's commands are read within milliseconds and expire anyway: a few
            // hundred unread ones are plenty.
            custom_segment: Some(
                [(
                    "/tenants/+/cmd".to_owned(),
                    SegmentConfig {
                        max_segment_size: 32 * 1024,
                        max_segment_count: 2,
                    },
                )]
                .into_iter()
                .collect(),
            ),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
            // Logs emptied once every reader has read them (our patch, PATCHES.md 9): the caps
            // above then bound a burst the hub has not read yet, not memory kept for good.
            discard_consumed: true,
        },
        v4: Some(v4),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    let (mut tx, rx) = broker.link("cabinet-hub")?;
    // Everything, so that unknown topics are counted too; our own commands are skipped.
    tx.subscribe("#")?;
    std::thread::Builder::new()
        .name("rumqttd".to_owned())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "MQTT broker stopped");
            }
        })?;
    Ok((CommandPublisher { tx: Mutex::new(tx) }, rx))
}

/// Everything the pump needs.
pub struct Pump {
    /// Credentials and owners.
    pub directory: Arc<Directory>,
    /// Actors.
    pub registry: Arc<Registry>,
    /// Seeds new actors.
    pub store: Store,
    /// Counters.
    pub metrics: Metrics,
    /// Cleared when the pump stops.
    pub alive: Arc<AtomicBool>,
}

impl Pump {
    fn reject(&self, r: &Rejection) {
        self.metrics
            .mqtt_rejected
            .with_label_values(&[r.reason.as_str()])
            .inc();
        tracing::warn!(
            cabinet_id = r.cabinet.as_ref().map(|c| c.as_str()).unwrap_or("-"),
            reason = r.reason.as_str(),
            detail = %r.detail,
            "uplink rejected"
        );
    }

    /// Reads a new actor's stored state on the hub's runtime, where storage's connections live;
    /// the actor, on its own arbiter, waits for the result. The pump goes on with the next
    /// message meanwhile: it used to wait for both reads, which made a connect storm of N
    /// cabinets take N × two storage round trips in a row.
    fn seed_later(&self, id: &CabinetId) -> PendingSeed {
        let (store, metrics, id) = (self.store.clone(), self.metrics.clone(), id.clone());
        let read = tokio::spawn(async move { read_seed(&store, &metrics, &id).await });
        Box::pin(async move {
            read.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading a cabinet's stored state failed; starting the actor without it");
                ActorSeed::default()
            })
        })
    }

    /// Handles one message from the broker.
    pub fn handle(&self, topic: &[u8], payload: &[u8]) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            self.reject(&Rejection {
                reason: RejectReason::BadTopic,
                detail: "topic not UTF-8".into(),
                cabinet: None,
            });
            return;
        };
        let (id, kind) = match parse_topic(topic) {
            Ok(TopicTarget::Uplink(id, kind)) => (id, kind),
            Ok(TopicTarget::Command(_)) => return,
            Err(r) => return self.reject(&r),
        };
        let entry = match self.directory.get(&id) {
            Some(e) if e.active => e,
            Some(_) | None => {
                return self.reject(&Rejection {
                    reason: RejectReason::UnknownCabinet,
                    detail: "not a registered, active cabinet".into(),
                    cabinet: Some(id),
                })
            }
        };
        let uplink = match parse_uplink(id, kind, payload) {
            Ok(u) => u,
            Err(r) => return self.reject(&r),
        };
        self.metrics
            .mqtt_in
            .with_label_values(&[kind.as_str()])
            .inc();
        let addr = match self.registry.get(&uplink.cabinet) {
            Some(a) => a,
            None => {
                let meta = CabinetMeta {
                    id: uplink.cabinet.clone(),
                    merchant: entry.merchant,
                };
                let addr = self
                    .registry
                    .get_or_start(&meta, || self.seed_later(&uplink.cabinet));
                self.metrics.cabinet_actors.set(self.registry.len() as i64);
                addr
            }
        };
        addr.do_send(Deliver(uplink.body));
    }

    /// Runs until the broker link closes.
    pub async fn run(self, mut rx: LinkRx) {
        self.alive.store(true, Ordering::SeqCst);
        loop {
            match rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    self.handle(&f.publish.topic, &f.publish.payload)
                }
                // The router stops feeding a link whose buffer filled (a burst of uplinks) and
                // waits to be told the link is ready again. Without this the hub stopped
                // receiving every cabinet's messages for good after the first burst of ~200,
                // while the broker kept acking them (found by the loadtest's ingest scenario).
                Ok(Some(Notification::Unschedule)) => {
                    self.metrics.mqtt_link_unscheduled.inc();
                    if let Err(e) = rx.wake().await {
                        tracing::error!(error = %e, "MQTT link could not be woken; uplink pump stopped");
                        break;
                    }
                }
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "MQTT link closed; uplink pump stopped");
                    break;
                }
            }
        }
        self.alive.store(false, Ordering::SeqCst);
    }
}

/// The accept backlog given to the broker's listeners.
const MQTT_BACKLOG: i32 = 4096;

/// Tunes the broker's listening sockets, which rumqttd creates itself with no way to configure
/// them: found among this process's descriptors by their port, each gets TCP_NODELAY (inherited
/// by every accepted cabinet connection on Linux; without it, Nagle's algorithm meets the
/// cabinet's delayed ACK and holds a command up to 40 ms) and an accept backlog of 4,096
/// instead of 128 (a connect storm otherwise overflows the queue and cabinets wait for SYN
/// retransmits).
pub fn tune_listeners(ports: Vec<u16>) {
    use std::os::fd::BorrowedFd;
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!("cannot list /proc/self/fd; MQTT listeners left untuned");
        return;
    };
    let mut tuned = 0;
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is open in this process (listed in /proc/self/fd); it is only
        // borrowed for the calls below, and a descriptor closed meanwhile makes them fail with
        // EBADF, which is ignored.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&borrowed);
        let listening = sock.is_listener().unwrap_or(false);
        let port = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port());
        if !listening || !port.is_some_and(|p| ports.contains(&p)) {
            continue;
        }
        if let Err(e) = sock.set_tcp_nodelay(true) {
            tracing::warn!(error = %e, "MQTT listener: TCP_NODELAY not set");
        }
        // listen() again on a listening socket only changes its backlog.
        if let Err(e) = sock.listen(MQTT_BACKLOG) {
            tracing::warn!(error = %e, "MQTT listener: backlog not raised");
        }
        tuned += 1;
    }
    if tuned < ports.len() {
        tracing::warn!(
            tuned,
            expected = ports.len(),
            "not every MQTT listener was found to tune"
        );
    }
}
