//! Uplinks in: every message the broker routes to the hub is parsed once, checked against the
//! directory and handed to its cabinet's actor, started (and seeded from storage) on first use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rumqttd::local::LinkRx;
use rumqttd::Notification;

use cabinet_actors::actor::{ActorSeed, CabinetMeta, PendingSeed};
use cabinet_actors::ids::CabinetId;
use cabinet_actors::machine::LiveSeed;
use cabinet_actors::protocol::{parse_topic, parse_uplink, RejectReason, Rejection, TopicTarget};
use cabinet_actors::registry::Registry;

use super::auth::Directory;
use crate::metrics::Metrics;
use crate::store::Store;

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
        live: None,
    }
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
    /// Cabinet leases: an uplink here means the cabinet's connection is here.
    pub cluster: Arc<crate::cluster::Cluster>,
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
    fn seed_later(&self, id: &CabinetId, live: Option<LiveSeed>) -> PendingSeed {
        let (store, metrics, id) = (self.store.clone(), self.metrics.clone(), id.clone());
        let read = tokio::spawn(async move { read_seed(&store, &metrics, &id).await });
        Box::pin(async move {
            let seed = read.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading a cabinet's stored state failed; starting the actor without it");
                ActorSeed::default()
            });
            ActorSeed { live, ..seed }
        })
    }

    /// Takes over a cabinet that came from another node without a word from it yet (a
    /// partition of an external broker moving here): its actor starts from what that node
    /// last published of it, and this node takes its lease, so that it is served at once
    /// rather than from its next heartbeat. Nothing happens when an actor is here already:
    /// the cabinet's own messages say more than another node's picture.
    pub fn adopt(&self, id: &CabinetId, live: LiveSeed) {
        let Some(entry) = self.directory.get(id).filter(|e| e.active) else {
            return;
        };
        if self.registry.get(id).is_some() {
            return;
        }
        if live.online {
            self.cluster.cabinet_here(id.as_str());
        }
        let meta = CabinetMeta {
            id: id.clone(),
            merchant: entry.merchant,
        };
        self.registry
            .get_or_start(&meta, || self.seed_later(id, Some(live)));
        self.metrics.cabinet_actors.set(self.registry.len() as i64);
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
        // Its connection is on this node's broker: this node owns it.
        self.cluster.cabinet_here(uplink.cabinet.as_str());
        let cabinet = match self.registry.get(&uplink.cabinet) {
            Some(c) => c,
            None => {
                let meta = CabinetMeta {
                    id: uplink.cabinet.clone(),
                    merchant: entry.merchant,
                };
                let cabinet = self
                    .registry
                    .get_or_start(&meta, || self.seed_later(&uplink.cabinet, None));
                self.metrics.cabinet_actors.set(self.registry.len() as i64);
                cabinet
            }
        };
        cabinet.deliver(uplink.body);
    }

    /// Runs until the broker link closes.
    pub async fn run(self: std::sync::Arc<Self>, mut rx: LinkRx) {
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
