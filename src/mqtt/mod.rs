//! The MQTT edge: rumqttd embedded on its own threads, authentication against registered and
//! active cabinets (`auth`), the uplink pump that parses every message once and routes it to
//! the cabinet's actor (`pump`), and the command publisher (`publisher`); or, instead of the
//! embedded broker, the hub as a client of an external one (`external`).

pub mod auth;
pub mod external;
pub mod publisher;
pub mod pump;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rumqttd::local::LinkRx;
use rumqttd::{
    Broker, Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings, TlsConfig,
};
use strum::IntoEnumIterator;

use cabinet_actors::protocol::UplinkKind;

use crate::metrics::Metrics;
use auth::{AuthFailure, Directory};
use publisher::CommandPublisher;
pub use pump::Pump;

/// The broker's listeners.
#[derive(Debug, Clone)]
pub struct BrokerListeners {
    /// Password mode; off for certificate-only deployments.
    pub plain: Option<SocketAddr>,
    /// Certificate mode: address, CA, server cert, server key.
    pub tls: Option<(SocketAddr, PathBuf, PathBuf, PathBuf)>,
    /// Connection limit.
    pub max_connections: usize,
    /// The hub's uplink buffer, MiB.
    pub uplink_buffer_mib: usize,
    /// Longest topic or filter a cabinet may use, bytes.
    pub max_topic_len: usize,
    /// Most subscriptions one cabinet connection may hold.
    pub max_subscriptions: usize,
}

/// Why the broker refused a cabinet's publish or subscription. Stable metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Refused {
    /// Another cabinet's topic (or anything outside its own `/tenants/{id}/`).
    ForeignTopic,
    /// One of its own topics that is not an uplink (its `cmd`, or an unknown name).
    NotUplink,
    /// A subscription other than its own `cmd` (wildcards included).
    ForbiddenFilter,
    /// A retained publish.
    Retain,
    /// A topic or filter longer than `mqtt.max_topic_len`.
    TopicTooLong,
    /// More subscriptions than `mqtt.max_subscriptions`.
    TooManySubscriptions,
}

impl From<rumqttd::RefusalReason> for Refused {
    fn from(r: rumqttd::RefusalReason) -> Self {
        use rumqttd::RefusalReason as R;
        match r {
            R::ForeignTopic => Self::ForeignTopic,
            R::NotUplink => Self::NotUplink,
            R::ForbiddenFilter => Self::ForbiddenFilter,
            R::Retain => Self::Retain,
            R::TopicTooLong => Self::TopicTooLong,
            R::TooManySubscriptions => Self::TooManySubscriptions,
        }
    }
}

/// Every cabinet, in both modes, is confined to its own namespace: it publishes its uplinks
/// and subscribes to its commands, nothing else (PROTOCOL.md). The broker enforces it (our
/// patch, vendor/rumqttd/PATCHES.md 10); each refusal is counted, and logged once per
/// connection so that a misbehaving cabinet cannot flood the log.
fn tenant_policy(listeners: &BrokerListeners, metrics: Metrics) -> rumqttd::TenantPolicy {
    rumqttd::TenantPolicy {
        publish: UplinkKind::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect(),
        subscribe: vec!["cmd".to_owned()],
        allow_retain: false,
        max_topic_len: listeners.max_topic_len,
        max_subscriptions: listeners.max_subscriptions,
        on_refusal: Some(Arc::new(move |r: &rumqttd::Refusal<'_>| {
            let reason = Refused::from(r.reason);
            let label: &'static str = reason.into();
            metrics.mqtt_refused.with_label_values(&[label]).inc();
            if r.first {
                let topic: String = r.topic.chars().take(160).collect();
                let client: String = r.client_id.chars().take(80).collect();
                let action = if r.publish {
                    "publish refused, connection closed"
                } else {
                    "subscription refused"
                };
                tracing::warn!(client_id = %client, topic = %topic, reason = label, "{action} (further refusals on this connection are counted, not logged)");
            }
        })),
    }
}

fn connection_settings() -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Larger than the protocol's 16 KiB so that an oversize payload reaches the edge
        // parser and is counted with its reason rather than silently disconnected; beyond it
        // the broker closes the connection.
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
        bind_tenant_to_client_id: false,
        certificate_check: None,
    }
}

/// Starts rumqttd on its own threads and returns the hub's link to it.
pub fn start_broker(
    listeners: &BrokerListeners,
    directory: Arc<Directory>,
    metrics: Metrics,
) -> anyhow::Result<(CommandPublisher, LinkRx)> {
    // Every reason is exported from the start (at zero), so that an alert on a rate of
    // refusals has a series to read before the first one.
    for reason in AuthFailure::iter() {
        metrics
            .mqtt_auth_failures
            .with_label_values(&[reason.as_str()]);
    }
    for reason in Refused::iter() {
        let label: &'static str = reason.into();
        metrics.mqtt_refused.with_label_values(&[label]);
    }
    let mut v4 = HashMap::new();
    if let Some(listen) = listeners.plain {
        let mut connections = connection_settings();
        connections.bind_tenant_to_client_id = true;
        let mut plain = ServerSettings {
            name: "password".to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let (directory, metrics) = (directory.clone(), metrics.clone());
        plain.set_auth_handler(move |client_id: String, username: String, password: String| {
            let result = directory.authenticate(&client_id, &username, &password);
            if let Err(reason) = result {
                metrics.mqtt_auth_failures.with_label_values(&[reason.as_str()]).inc();
                tracing::warn!(client_id = %client_id.chars().take(64).collect::<String>(), reason = reason.as_str(), "MQTT connection refused");
            }
            std::future::ready(result.is_ok())
        });
        v4.insert("1".to_owned(), plain);
    }
    if let Some((addr, ca, cert, key)) = &listeners.tls {
        let mut connections = connection_settings();
        let (directory, metrics) = (directory.clone(), metrics.clone());
        connections.certificate_check = Some(Arc::new(move |tenant: &str, serial: &str| {
            let result = directory.check_certificate(tenant, serial);
            if let Err(reason) = result {
                metrics
                    .mqtt_auth_failures
                    .with_label_values(&[reason.as_str()])
                    .inc();
                tracing::warn!(cabinet_id = %tenant, serial, reason = reason.as_str(), "MQTT certificate refused");
            }
            result.is_ok()
        }));
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
                connections,
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
            // emptied (`discard_consumed`), so the cap is a ceiling, not a resting size. When it
            // is full the broker holds the publishers (`lossless_filters` below).
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
            tenant_policy: Some(tenant_policy(listeners, metrics.clone())),
            // The hub reads every uplink through `#`: a full log of it holds the cabinets'
            // connections (no reads, no acks; MQTT's in-flight window and TCP hold the senders)
            // instead of evicting what the hub has not read (our patch, PATCHES.md 11). Before,
            // a burst the pump could not keep up with lost up to a third of what the broker
            // had acknowledged, silently.
            lossless_filters: vec!["#".to_owned()],
            flow_meter: Some(metrics.flow.clone()),
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
    Ok((CommandPublisher::Embedded(Mutex::new(tx)), rx))
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
