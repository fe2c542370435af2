//! The hub's implementation of the actors' ports: commands to the broker, alerts to storage
//! and online state (through one ordered writer) and to Prometheus, outcomes to metrics.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use cabinet_actors::actor::{CabinetMeta, CabinetPorts, PublishError};
use cabinet_actors::alert::{ActiveAlert, ClearedBy};
use cabinet_actors::machine::{CabinetSnapshot, Effect};
use cabinet_actors::protocol::Command;

use crate::backoff::Backoff;
use crate::feed::Feed;
use crate::metrics::Metrics;
use crate::mqtt::publisher::CommandPublisher;
use crate::store::Store;
use crate::views::{ActiveAlertView, AlertEvent, CabinetLive};

/// A write to the alert history.
#[derive(Debug)]
pub enum AlertWrite {
    /// Raised, under the cabinet's lease token (0: unfenced).
    Raised(CabinetMeta, ActiveAlert, u64),
    /// Cleared.
    Cleared {
        /// Alert id.
        id: String,
        /// Its cabinet.
        cabinet: String,
        /// The cabinet's lease token (0: unfenced).
        fence: u64,
        /// `condition` or a key id.
        by: String,
        /// Unix ms.
        at: i64,
    },
    /// A cabinet came online (`Some(at)`) or went offline (`None`): kept so that a restart
    /// knows which cabinets to wait for (`crate::sweep`).
    Online {
        /// Cabinet id.
        cabinet: String,
        /// Unix ms, or `None` for offline.
        at: Option<i64>,
        /// The cabinet's lease token (0: unfenced).
        fence: u64,
    },
    /// A flapping alert's new count.
    Flaps {
        /// Alert id.
        id: String,
        /// Raises so far.
        flaps: u32,
    },
    /// Answered once every write queued before it has landed (shutdown).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Wires actors to the world.
pub struct HubPorts {
    /// Commands out.
    pub publisher: Arc<CommandPublisher>,
    /// Counters.
    pub metrics: Metrics,
    /// Alert history, in order.
    pub alerts: mpsc::UnboundedSender<AlertWrite>,
    /// The operator feed.
    pub feed: Arc<Feed>,
    /// Session progress, in order, to the session supervisor.
    pub sessions: mpsc::UnboundedSender<(CabinetMeta, cabinet_actors::machine::SessionEvent)>,
    /// Cabinet leases: a cabinet another node took is not commanded from here.
    pub cluster: Arc<crate::cluster::Cluster>,
}

impl CabinetPorts for HubPorts {
    fn publish(&self, cabinet: &CabinetMeta, command: &Command) -> Result<(), PublishError> {
        // The cabinet connected to another node (which took its lease, with a newer fence) or
        // this node could not renew the lease in time: a command from here could act on stale
        // state, and the cabinet is not listening here anyway.
        if !self.cluster.may_command(cabinet.id.as_str()) {
            self.metrics.cluster_commands_refused.inc();
            return Err(PublishError(
                "another node owns this cabinet now".to_owned(),
            ));
        }
        self.publisher.publish(&cabinet.id, command)?;
        self.metrics
            .mqtt_out
            .with_label_values(&[command.body.kind().as_str()])
            .inc();
        Ok(())
    }

    fn effect(&self, cabinet: &CabinetMeta, effect: &Effect) {
        // Several nodes: an actor left behind by a cabinet that moved to another node (which
        // took its lease) no longer speaks for it. Its timers would otherwise mark the cabinet
        // offline, raise alerts or end the session the new node is running.
        if self.cluster.lost(cabinet.id.as_str()) {
            if let Effect::OnlineChanged(online) = effect {
                if *online {
                    self.metrics.cabinets_online.inc();
                } else {
                    self.metrics.cabinets_online.dec();
                }
            }
            tracing::debug!(cabinet_id = %cabinet.id, effect = ?effect, "effect of an actor whose cabinet moved to another node: dropped");
            return;
        }
        let alert = |a: &ActiveAlert, state: &'static str| {
            let event = AlertEvent {
                cabinet_id: &cabinet.id,
                merchant_id: &cabinet.merchant,
                state,
                alert: ActiveAlertView::from(a),
                severity: a.kind.severity(),
            };
            self.feed
                .publish(cabinet.merchant.as_str(), "alert", &event);
        };
        match effect {
            Effect::AlertRaised(a) => alert(a, "raised"),
            Effect::AlertAcked(a) => alert(a, "acked"),
            Effect::AlertCleared { alert: a, .. } => alert(a, "cleared"),
            _ => {}
        }
        let m = &self.metrics;
        // Writes for the cabinet carry this node's lease token: storage refuses them once a
        // newer owner recorded its own (a node that lost the lease and does not know it yet).
        let fence = self.cluster.write_fence(cabinet.id.as_str());
        match effect {
            Effect::AlertRaised(a) => {
                m.alert_active
                    .with_label_values(&[
                        cabinet.id.as_str(),
                        cabinet.merchant.as_str(),
                        a.kind.as_str(),
                        a.kind.severity().as_str(),
                    ])
                    .set(1);
                m.alerts_raised.with_label_values(&[a.kind.as_str()]).inc();
                tracing::warn!(cabinet_id = %cabinet.id, alert = a.kind.as_str(), detail = a.detail.as_deref().unwrap_or(""), "alert raised");
                let _ = self
                    .alerts
                    .send(AlertWrite::Raised(cabinet.clone(), a.clone(), fence));
            }
            Effect::AlertCleared { alert, by, at } => {
                let _ = m.alert_active.remove_label_values(&[
                    cabinet.id.as_str(),
                    cabinet.merchant.as_str(),
                    alert.kind.as_str(),
                    alert.kind.severity().as_str(),
                ]);
                let by = match by {
                    ClearedBy::Condition => "condition".to_owned(),
                    ClearedBy::Operator(k) => k.clone(),
                };
                tracing::info!(cabinet_id = %cabinet.id, alert = alert.kind.as_str(), by = %by, "alert cleared");
                let _ = self.alerts.send(AlertWrite::Cleared {
                    id: alert.id.clone(),
                    cabinet: cabinet.id.to_string(),
                    fence,
                    by,
                    at: *at as i64,
                });
            }
            Effect::AlertAcked(_) => {}
            Effect::OnlineChanged(online) => {
                if *online {
                    m.cabinets_online.inc();
                } else {
                    m.cabinets_online.dec();
                    self.cluster.cabinet_gone(cabinet.id.as_str());
                }
                let at = online.then(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(1)
                });
                let _ = self.alerts.send(AlertWrite::Online {
                    cabinet: cabinet.id.to_string(),
                    at,
                    fence,
                });
            }
            Effect::AlertFlapped(a) => {
                tracing::debug!(cabinet_id = %cabinet.id, alert = a.kind.as_str(), flaps = a.flaps, "alert flapping");
                let _ = self.alerts.send(AlertWrite::Flaps {
                    id: a.id.clone(),
                    flaps: a.flaps,
                });
            }
            Effect::CommandDone {
                cmd_id,
                kind,
                outcome,
                elapsed_ms,
            } => {
                m.command_duration
                    .with_label_values(&[kind.as_str(), outcome.as_str()])
                    .observe(*elapsed_ms as f64 / 1000.0);
                tracing::info!(cabinet_id = %cabinet.id, cmd_id = %cmd_id, command = kind.as_str(), outcome = outcome.as_str(), elapsed_ms, "command ended");
            }
            Effect::Duplicate { seq } => {
                m.mqtt_duplicates.inc();
                tracing::debug!(cabinet_id = %cabinet.id, seq, "duplicate dropped");
            }
            Effect::SeqReset { from, to } => {
                m.mqtt_seq_resets.inc();
                tracing::debug!(cabinet_id = %cabinet.id, from, to, "seq jumped outside the duplicate window: accepted as a reset");
            }
            Effect::StrayAck { cmd_id } => {
                m.mqtt_stray_acks.inc();
                tracing::info!(cabinet_id = %cabinet.id, cmd_id = %cmd_id, "ack for no pending command");
            }
            Effect::Session(ev) => {
                tracing::info!(cabinet_id = %cabinet.id, event = ?ev, "session progress");
                let _ = self.sessions.send((cabinet.clone(), ev.clone()));
            }
            Effect::Publish(_) | Effect::StateChanged => {}
        }
    }

    fn state_changed(&self, cabinet: &CabinetMeta, snapshot: &CabinetSnapshot) {
        if self.cluster.lost(cabinet.id.as_str()) {
            return;
        }
        let live = CabinetLive::new(snapshot, cabinet.merchant.as_str());
        self.feed
            .publish(cabinet.merchant.as_str(), "cabinet", &live);
    }

    fn uplink_processed(&self, _cabinet: &CabinetMeta) {
        self.metrics.uplinks_processed.inc();
    }

    fn actor_restarted(&self, cabinet: &CabinetMeta) {
        self.metrics.actor_restarts.inc();
        tracing::error!(cabinet_id = %cabinet.id, "cabinet actor restarted");
    }
}

/// Writes alert history in the order the actors produced it, retrying a failed write so that
/// a database blip does not lose a raise or a clear.
pub async fn alert_writer(
    store: Store,
    metrics: Metrics,
    mut rx: mpsc::UnboundedReceiver<AlertWrite>,
) {
    while let Some(w) = rx.recv().await {
        if let AlertWrite::Flush(done) = w {
            let _ = done.send(());
            continue;
        }
        // A write under a token older than the cabinet's recorded one comes from a node that
        // lost the cabinet and does not know it yet: refused (the statements check it too,
        // atomically; this read is what tells a refusal from a no-op, for the count).
        let fenced = match &w {
            AlertWrite::Raised(c, _, f) => Some((c.id.as_str(), *f)),
            AlertWrite::Cleared { cabinet, fence, .. }
            | AlertWrite::Online { cabinet, fence, .. } => Some((cabinet.as_str(), *fence)),
            _ => None,
        };
        if let Some((cabinet, fence)) = fenced.filter(|(_, f)| *f > 0) {
            if store
                .lease_fence(cabinet)
                .await
                .is_ok_and(|newest| newest > fence)
            {
                metrics.cluster_writes_refused.inc();
                tracing::info!(cabinet_id = cabinet, fence, write = ?w, "write for a cabinet another node owns now: refused");
                continue;
            }
        }
        let mut wait = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        for attempt in 1..=8 {
            let r = match &w {
                AlertWrite::Raised(c, a, fence) => store
                    .insert_alert_fenced(c.id.as_str(), c.merchant.as_str(), a, *fence)
                    .await
                    .map(|_| ()),
                AlertWrite::Cleared {
                    id, by, at, fence, ..
                } => store
                    .clear_alert_fenced(id, by, *at, *fence)
                    .await
                    .map(|_| ()),
                AlertWrite::Online { cabinet, at, fence } => store
                    .set_cabinet_online_fenced(cabinet, *at, *fence)
                    .await
                    .map(|_| ()),
                AlertWrite::Flaps { id, flaps } => {
                    store.set_alert_flaps(id, *flaps).await.map(|_| ())
                }
                AlertWrite::Flush(_) => Ok(()),
            };
            match r {
                Ok(()) => break,
                Err(e) => {
                    metrics
                        .store_errors
                        .with_label_values(&["alert_write"])
                        .inc();
                    tracing::error!(error = %e, attempt, write = ?w, "alert history write failed");
                    tokio::time::sleep(wait.next_delay()).await;
                }
            }
        }
    }
}
