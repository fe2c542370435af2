//! What every request handler shares.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cabinet_actors::actor::Clock;
use cabinet_actors::registry::Registry;

use crate::ca::DeviceCa;
use crate::config::Settings;
use crate::feed::Feed;
use crate::metrics::Metrics;
use crate::mqtt::auth::Directory;
use crate::sessions::Sessions;
use crate::store::Store;

/// Shared by every request handler.
pub struct AppState {
    /// Configuration in force.
    pub settings: Settings,
    /// Storage.
    pub store: Store,
    /// Leases shared with the other nodes (or this node alone).
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Cabinet actors, reached through their handles.
    pub registry: Arc<Registry>,
    /// Credentials and owners.
    pub directory: Arc<Directory>,
    /// Metrics.
    pub metrics: Metrics,
    /// Device CA.
    pub ca: Arc<DeviceCa>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Where readiness probes the broker.
    pub mqtt_probe: Option<SocketAddr>,
    /// The external broker's side, when the hub is a client of one.
    pub external: Option<Arc<crate::mqtt::external::External>>,
    /// Whether the uplink pump runs.
    pub pump_alive: Arc<AtomicBool>,
    /// The session and order supervisor.
    pub sessions: Arc<Sessions>,
    /// The operator feed.
    pub feed: Arc<Feed>,
    /// API keys' last use, feed tickets and revocations.
    pub access: Arc<super::access::KeyAccess>,
    /// The in-process payment simulators, when on.
    #[cfg(feature = "simulators")]
    pub simulators: Option<crate::simulators::Simulators>,
}

impl AppState {
    /// Now, Unix ms.
    pub fn now(&self) -> i64 {
        self.clock.now_ms() as i64
    }

    /// Whether this hub runs the payment simulators (and serves their routes).
    pub fn simulators_on(&self) -> bool {
        #[cfg(feature = "simulators")]
        return self.simulators.is_some();
        #[cfg(not(feature = "simulators"))]
        return false;
    }
}
