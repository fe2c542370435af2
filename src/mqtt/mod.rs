//! The MQTT edge: rumqttd embedded on its own threads, authentication against registered and
//! active cabinets (`auth`), the uplink pump that parses every message once and routes it to
//! the cabinet's actor (`pump`), and the command publisher (`publisher`).

pub mod auth;
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

use crate::metrics::Metrics;
use auth::{AuthFailure, Directory};
use publisher::CommandPublisher;
pub use pump::Pump;

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
    // Every reason is exported from the start (at zero), so that an alert on a rate of
    // refusals has a series to read before the first one.
    for reason in AuthFailure::iter() {
        metrics
            .mqtt_auth_failures
            .with_label_values(&[reason.as_str()]);
    }
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
