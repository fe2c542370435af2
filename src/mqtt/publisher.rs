//! Commands out: published through the hub's own link to the embedded broker.

use std::sync::Mutex;

use rumqttd::local::LinkTx;

use cabinet_actors::actor::PublishError;
use cabinet_actors::ids::CabinetId;
use cabinet_actors::protocol::{command_topic, Command};

/// Publishes commands through the hub's local link. rumqttd link publishes are QoS 0;
/// commands are acknowledged at the application level (`ack`), so a lost one times out
/// truthfully.
pub struct CommandPublisher {
    pub(super) tx: Mutex<LinkTx>,
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
