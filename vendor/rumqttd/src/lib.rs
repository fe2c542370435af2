use std::fmt;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};
use tracing_subscriber::{
    filter::EnvFilter,
    fmt::{
        format::{Format, Pretty},
        Layer,
    },
    layer::Layered,
    reload::Handle,
    Registry,
};

pub use link::alerts;
pub use link::local;
pub use link::meters;
pub use router::{Alert, Forward, IncomingMeter, Meter, Notification, OutgoingMeter, Router};
use segments::Storage;
pub use server::{Broker, LinkType, Server};

pub use self::router::shared_subs::Strategy;

mod link;
pub mod protocol;
mod router;
mod segments;
mod server;

pub type ConnectionId = usize;
pub type RouterId = usize;
pub type NodeId = usize;
pub type Topic = String;
pub type Filter = String;
pub type TopicId = usize;
pub type Offset = (u64, u64);
pub type Cursor = (u64, u64);

pub type ClientId = String;
pub type AuthUser = String;
pub type AuthPass = String;
pub type AuthHandler = Arc<
    dyn Fn(ClientId, AuthUser, AuthPass) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct Config {
    pub id: usize,
    pub router: RouterConfig,
    pub v4: Option<HashMap<String, ServerSettings>>,
    pub v5: Option<HashMap<String, ServerSettings>>,
    pub ws: Option<HashMap<String, ServerSettings>>,
    pub cluster: Option<ClusterSettings>,
    pub console: Option<ConsoleSettings>,
    pub bridge: Option<BridgeConfig>,
    pub prometheus: Option<PrometheusSetting>,
    pub metrics: Option<HashMap<MetricType, MetricSettings>>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct PrometheusSetting {
    #[deprecated(note = "Use listen instead")]
    port: Option<u16>,
    listen: Option<SocketAddr>,
    // How frequently to update metrics
    interval: u64,
}

// TODO: Change names without _ until config-rs issue is resolved
// https://github.com/mehcode/config-rs/issues/369
#[derive(Debug, Serialize, Deserialize, Clone)]
#[serde(untagged)]
pub enum TlsConfig {
    Rustls {
        capath: Option<String>,
        certpath: String,
        keypath: String,
    },
    NativeTls {
        pkcs12path: String,
        pkcs12pass: String,
    },
}

impl TlsConfig {
    // Returns true only if all of the file paths inside `TlsConfig` actually exists on file system.
    // NOTE: This doesn't verify if certificate files are in required format or not.
    pub fn validate_paths(&self) -> bool {
        match self {
            TlsConfig::Rustls {
                capath,
                certpath,
                keypath,
            } => {
                let ca = capath.is_none() || capath.as_ref().is_some_and(|v| Path::new(v).exists());

                ca && [certpath, keypath].iter().all(|v| Path::new(v).exists())
            }
            TlsConfig::NativeTls { pkcs12path, .. } => Path::new(pkcs12path).exists(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ServerSettings {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub next_connection_delay_ms: u64,
    pub connections: ConnectionSettings,
}

impl ServerSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.connections.set_auth_handler(auth_fn)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct BridgeConfig {
    pub name: String,
    pub addr: String,
    pub qos: u8,
    pub sub_path: Filter,
    pub reconnection_delay: u64,
    pub ping_delay: u64,
    pub connections: ConnectionSettings,
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct ConnectionSettings {
    pub connection_timeout_ms: u16,
    pub max_payload_size: usize,
    pub max_inflight_count: usize,
    pub auth: Option<HashMap<String, String>>,
    #[serde(skip)]
    pub external_auth: Option<AuthHandler>,
    #[serde(default)]
    pub dynamic_filters: bool,
    /// cabinet-hub patch (PATCHES.md 10): once authenticated, the client id is the client's
    /// tenant, exactly as the certificate's Organization is in certificate mode, so that the
    /// router confines a password client to `/tenants/{client id}/` too. A client id that is
    /// not a valid tenant id (alphanumeric, non-empty) is refused.
    #[serde(default)]
    pub bind_tenant_to_client_id: bool,
    /// cabinet-hub patch (PATCHES.md 10): asked after the TLS handshake with the tenant (the
    /// certificate's Organization) and the certificate's serial (lowercase hex); `false`
    /// refuses the connection. Lets the embedding application revoke certificates.
    #[serde(skip)]
    pub certificate_check: Option<CertificateCheck>,
}

/// cabinet-hub patch (PATCHES.md 10): `(tenant, serial hex) -> allowed`.
pub type CertificateCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// cabinet-hub patch (PATCHES.md 10): what a client bound to a tenant may do beyond staying
/// inside `/tenants/{id}/` (which `validate-tenant-prefix` already enforces).
#[derive(Clone, Default)]
pub struct TenantPolicy {
    /// Topics a tenant client may publish to, spelled after its prefix (`heartbeat`, ...).
    pub publish: Vec<String>,
    /// Filters it may subscribe to, spelled after its prefix; matched exactly, so no wildcard
    /// is ever granted.
    pub subscribe: Vec<String>,
    /// Whether a tenant client may publish retained messages (its will included).
    pub allow_retain: bool,
    /// Longest topic or filter in bytes; 0 = unlimited.
    pub max_topic_len: usize,
    /// Most subscriptions one connection may hold; 0 = unlimited.
    pub max_subscriptions: usize,
    /// Told of every refusal.
    pub on_refusal: Option<Arc<dyn Fn(&Refusal<'_>) + Send + Sync>>,
}

impl fmt::Debug for TenantPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantPolicy")
            .field("publish", &self.publish)
            .field("subscribe", &self.subscribe)
            .field("allow_retain", &self.allow_retain)
            .field("max_topic_len", &self.max_topic_len)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("on_refusal", &self.on_refusal.is_some())
            .finish()
    }
}

/// cabinet-hub patch (PATCHES.md 10): why a tenant client's publish or subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// A topic outside the client's own `/tenants/{id}/`.
    ForeignTopic,
    /// A topic of its own that it may not publish to.
    NotUplink,
    /// A filter it may not subscribe to (another tenant's, a wildcard, anything not granted).
    ForbiddenFilter,
    /// A retained publish.
    Retain,
    /// Longer than `max_topic_len`.
    TopicTooLong,
    /// More than `max_subscriptions`.
    TooManySubscriptions,
}

/// cabinet-hub patch (PATCHES.md 10): one refusal, as told to [`TenantPolicy::on_refusal`].
#[derive(Debug)]
pub struct Refusal<'a> {
    /// The connection's client id (`tenant.client`).
    pub client_id: &'a str,
    /// The topic or filter refused (the will's topic for a will).
    pub topic: &'a str,
    /// Why.
    pub reason: RefusalReason,
    /// The connection's first refusal: log it; count every one.
    pub first: bool,
    /// A publish (the connection is then closed without an ack), not a subscription (answered
    /// with a failure return code, the connection kept).
    pub publish: bool,
}

impl TenantPolicy {
    /// Why a publish by a client with `prefix` is refused, if it is.
    pub fn check_publish(&self, prefix: &str, topic: &str, retain: bool) -> Option<RefusalReason> {
        if self.max_topic_len > 0 && topic.len() > self.max_topic_len {
            return Some(RefusalReason::TopicTooLong);
        }
        let Some(own) = topic.strip_prefix(prefix) else {
            return Some(RefusalReason::ForeignTopic);
        };
        if !self.publish.iter().any(|t| t == own) {
            return Some(RefusalReason::NotUplink);
        }
        if retain && !self.allow_retain {
            return Some(RefusalReason::Retain);
        }
        None
    }

    /// Why a subscription by a client with `prefix` already holding `held` others is refused.
    pub fn check_subscribe(
        &self,
        prefix: &str,
        filter: &str,
        held: usize,
    ) -> Option<RefusalReason> {
        if self.max_topic_len > 0 && filter.len() > self.max_topic_len {
            return Some(RefusalReason::TopicTooLong);
        }
        let granted = filter
            .strip_prefix(prefix)
            .is_some_and(|own| self.subscribe.iter().any(|t| t == own));
        if !granted {
            return Some(RefusalReason::ForbiddenFilter);
        }
        if self.max_subscriptions > 0 && held >= self.max_subscriptions {
            return Some(RefusalReason::TooManySubscriptions);
        }
        None
    }
}

impl ConnectionSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.external_auth = Some(Arc::new(move |client_id, username, password| {
            let auth = auth_fn(client_id, username, password).into_future();
            Box::pin(auth)
        }));
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_inflight_count", &self.max_inflight_count)
            .field("auth", &self.auth)
            .field("external_auth", &self.external_auth.is_some())
            .field("dynamic_filters", &self.dynamic_filters)
            .field("bind_tenant_to_client_id", &self.bind_tenant_to_client_id)
            .field("certificate_check", &self.certificate_check.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Id with which this node connects to other nodes of the mesh
    pub node_id: NodeId,
    /// Address on which this broker is listening for mesh connections
    pub listen: String,
    /// Address of clusters that this node has to initiate connection
    pub seniors: Vec<(ConnectionId, String)>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RouterConfig {
    pub max_connections: usize,
    pub max_outgoing_packet_count: u64,
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub custom_segment: Option<HashMap<String, SegmentConfig>>,
    pub initialized_filters: Option<Vec<Filter>>,
    // defaults to Round Robin
    #[serde(default)]
    pub shared_subscriptions_strategy: Strategy,
    /// cabinet-hub patch (PATCHES.md): empty a filter's log as soon as every subscriber has read
    /// all of it, instead of keeping it up to the segment caps. Only while no persistent
    /// session is saved and no shared subscription exists (those may read from older cursors).
    /// Off by default: upstream's behaviour.
    #[serde(default)]
    pub discard_consumed: bool,
    /// cabinet-hub patch (PATCHES.md 10): what clients bound to a tenant may publish and
    /// subscribe to. `None`: upstream's behaviour (anything under the tenant's prefix).
    #[serde(skip)]
    pub tenant_policy: Option<TenantPolicy>,
    /// cabinet-hub patch (PATCHES.md 11): filters whose readers never lose a message to the
    /// log's retention. A full log of such a filter does not evict what a reader has not read
    /// yet; instead the router stops taking publishes from network connections (no acks; their
    /// links stop reading the socket, so MQTT's in-flight window and TCP hold the senders back)
    /// until the reader has moved out of the oldest segment. A connection that reads one of
    /// these filters is never held, and its own publishes grow the log past its cap instead.
    /// Empty: upstream's behaviour (the oldest segment is evicted, read or not).
    #[serde(default)]
    pub lossless_filters: Vec<Filter>,
    /// cabinet-hub patch (PATCHES.md 11): counts of the flow control above, for the embedder.
    #[serde(skip)]
    pub flow_meter: Option<Arc<FlowMeter>>,
}

/// cabinet-hub patch (PATCHES.md 11): what the router's flow control did, readable at any time
/// from any thread.
#[derive(Debug, Default)]
pub struct FlowMeter {
    /// Times a network connection was held because a lossless filter's log was full.
    pub holds: std::sync::atomic::AtomicU64,
    /// Network connections held right now.
    pub held: std::sync::atomic::AtomicU64,
    /// Times a reader's cursor jumped over messages evicted before it read them (any filter).
    /// Zero on lossless filters; elsewhere the messages a slow subscriber lost.
    pub cursor_jumps: std::sync::atomic::AtomicU64,
    /// Messages skipped by those jumps, where the log could tell.
    pub skipped: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SegmentConfig {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
}

type ReloadHandle = Handle<EnvFilter, Layered<Layer<Registry, Pretty, Format<Pretty>>, Registry>>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConsoleSettings {
    pub listen: String,
    #[serde(skip)]
    filter_handle: Option<ReloadHandle>,
}

impl ConsoleSettings {
    pub fn set_filter_reload_handle(&mut self, handle: ReloadHandle) {
        self.filter_handle.replace(handle);
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub enum Transport {
    #[serde(rename = "tcp")]
    #[default]
    Tcp,
    #[serde(rename = "tls")]
    Tls {
        ca: PathBuf,
        client_auth: Option<ClientAuth>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientAuth {
    certs: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, Clone, Hash, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Meters,
    Alerts,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct MetricSettings {
    push_interval: u64,
}

/// cabinet-hub patch (PATCHES.md 10).
#[cfg(test)]
mod tenant_policy_tests {
    use super::{RefusalReason as R, TenantPolicy};

    fn policy() -> TenantPolicy {
        TenantPolicy {
            publish: vec!["heartbeat".into(), "status".into()],
            subscribe: vec!["cmd".into()],
            allow_retain: false,
            max_topic_len: 40,
            max_subscriptions: 1,
            on_refusal: None,
        }
    }

    #[test]
    fn a_tenant_publishes_only_its_granted_topics_without_retain() {
        let p = policy();
        let me = "/tenants/A/";
        assert_eq!(p.check_publish(me, "/tenants/A/heartbeat", false), None);
        assert_eq!(
            p.check_publish(me, "/tenants/B/heartbeat", false),
            Some(R::ForeignTopic)
        );
        assert_eq!(
            p.check_publish(me, "/tenants/AB/heartbeat", false),
            Some(R::ForeignTopic)
        );
        assert_eq!(
            p.check_publish(me, "/tenants/A/cmd", false),
            Some(R::NotUplink)
        );
        assert_eq!(
            p.check_publish(me, "/tenants/A/heartbeat/x", false),
            Some(R::NotUplink)
        );
        assert_eq!(
            p.check_publish(me, "/tenants/A/heartbeat", true),
            Some(R::Retain)
        );
        let long = format!("/tenants/A/{}", "x".repeat(40));
        assert_eq!(p.check_publish(me, &long, false), Some(R::TopicTooLong));
    }

    #[test]
    fn a_tenant_subscribes_only_to_granted_filters_spelled_exactly() {
        let p = policy();
        let me = "/tenants/A/";
        assert_eq!(p.check_subscribe(me, "/tenants/A/cmd", 0), None);
        for f in [
            "#",
            "/tenants/+/cmd",
            "/tenants/A/#",
            "/tenants/A/+",
            "/tenants/B/cmd",
            "/tenants/A/heartbeat",
        ] {
            assert_eq!(p.check_subscribe(me, f, 0), Some(R::ForbiddenFilter), "{f}");
        }
        assert_eq!(
            p.check_subscribe(me, "/tenants/A/cmd", 1),
            Some(R::TooManySubscriptions)
        );
    }
}

/// cabinet-hub patch (PATCHES.md 11): a lossless filter's reader loses nothing; the publisher
/// waits instead.
#[cfg(test)]
mod flow_control_tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Broker, Config, FlowMeter, Notification, RouterConfig};
    use crate::local::{LinkRx, LinkTx};

    const N: usize = 2_000;

    fn broker(lossless: bool, meter: &Arc<FlowMeter>) -> Broker {
        Broker::new(Config {
            id: 0,
            router: RouterConfig {
                max_connections: 10,
                max_outgoing_packet_count: 200,
                // Two segments of 1 KiB: a log of some twenty messages, so that a reader that
                // waits is overrun many times over.
                max_segment_size: 1024,
                max_segment_count: 2,
                lossless_filters: if lossless { vec!["#".into()] } else { vec![] },
                flow_meter: Some(meter.clone()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn payload(i: usize) -> String {
        format!("{i:08}:{}", "x".repeat(40))
    }

    /// Reads what the `#` reader is sent until nothing arrives for a second.
    fn read_all(rx: &mut LinkRx) -> Vec<usize> {
        let mut got = Vec::new();
        loop {
            match rx.recv_deadline(Instant::now() + Duration::from_secs(1)) {
                Ok(Some(Notification::Forward(f))) => {
                    let text = std::str::from_utf8(&f.publish.payload).unwrap();
                    got.push(text[..8].parse().unwrap());
                }
                Ok(Some(Notification::Unschedule)) => rx.ready().unwrap(),
                Ok(Some(_)) | Ok(None) => {}
                Err(_) => return got,
            }
        }
    }

    /// Publishes `N` numbered messages from a second link while the `#` reader reads nothing,
    /// waits until the router has taken them all or holds the publisher, then reads.
    fn burst_past_a_waiting_reader(lossless: bool) -> (Vec<usize>, Arc<FlowMeter>, LinkTx) {
        let meter = Arc::new(FlowMeter::default());
        let broker = broker(lossless, &meter);
        let (mut reader_tx, mut reader) = broker.link("reader").unwrap();
        reader_tx.subscribe("#").unwrap();
        let (mut publisher, _publisher_rx) = broker.link("publisher").unwrap();
        for i in 0..N {
            publisher.publish("/t/x", payload(i)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !publisher.buffer().is_empty() && meter.held.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "the router took nothing for a minute"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = read_all(&mut reader);
        (got, meter, publisher)
    }

    #[test]
    fn a_lossless_reader_gets_every_message_and_the_publisher_waits_for_it() {
        let (got, meter, publisher) = burst_past_a_waiting_reader(true);
        assert_eq!(got, (0..N).collect::<Vec<_>>());
        assert!(meter.holds.load(Ordering::Relaxed) >= 1, "never held");
        assert_eq!(meter.held.load(Ordering::Relaxed), 0, "still held");
        assert_eq!(meter.cursor_jumps.load(Ordering::Relaxed), 0);
        assert!(publisher.buffer().is_empty());
    }

    /// The same burst without the patch's setting: upstream's eviction, which the test above
    /// would see if the flow control did nothing.
    #[test]
    fn without_a_lossless_filter_the_same_burst_evicts_and_the_meter_counts_it() {
        let (got, meter, _publisher) = burst_past_a_waiting_reader(false);
        assert!(got.len() < N, "nothing was lost: {}", got.len());
        assert!(meter.cursor_jumps.load(Ordering::Relaxed) >= 1);
        assert_eq!(
            meter.skipped.load(Ordering::Relaxed) as usize,
            N - got.len(),
            "every lost message counted"
        );
        assert_eq!(meter.holds.load(Ordering::Relaxed), 0);
    }

    /// The reader's own publishes are never held (that could not help it read): its log grows
    /// past the cap instead of evicting.
    #[test]
    fn the_readers_own_publishes_grow_the_log_rather_than_wait_or_evict() {
        let meter = Arc::new(FlowMeter::default());
        let broker = broker(true, &meter);
        let (mut tx, mut rx) = broker.link("reader").unwrap();
        tx.subscribe("#").unwrap();
        for i in 0..N {
            tx.publish("/t/x", payload(i)).unwrap();
        }
        let got = read_all(&mut rx);
        assert_eq!(got, (0..N).collect::<Vec<_>>());
        assert_eq!(meter.holds.load(Ordering::Relaxed), 0);
        assert_eq!(meter.cursor_jumps.load(Ordering::Relaxed), 0);
    }
}
