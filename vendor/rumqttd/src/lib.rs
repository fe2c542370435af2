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
