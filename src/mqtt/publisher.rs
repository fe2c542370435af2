//! Commands out: through the hub's own link to the embedded broker, or as a client of an
//! external broker.

use std::sync::Mutex;

use rumqttd::local::LinkTx;

use cabinet_actors::actor::PublishError;
use cabinet_actors::ids::CabinetId;
use cabinet_actors::protocol::{command_topic, Command};

/// Publishes commands without blocking. Commands are acknowledged at the application level
/// (`ack`), so a lost one times out truthfully.
pub enum CommandPublisher {
    /// The embedded broker's local link (QoS 0 inside the process).
    Embedded(Mutex<LinkTx>),
    /// A client of the external broker, QoS 1; queued while it reconnects.
    External(rumqttc::AsyncClient),
}

impl CommandPublisher {
    /// Publishes one command without blocking.
    pub fn publish(&self, cabinet: &CabinetId, command: &Command) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(command).map_err(|e| PublishError(e.to_string()))?;
        match self {
            Self::Embedded(tx) => {
                let mut tx = tx.lock().unwrap_or_else(|p| p.into_inner());
                tx.try_publish(command_topic(cabinet), payload)
                    .map(|_| ())
                    .map_err(|e| PublishError(e.to_string()))
            }
            Self::External(client) => client
                .try_publish(
                    command_topic(cabinet),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| PublishError(e.to_string())),
        }
    }
}
