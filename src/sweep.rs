//! Offline is true after a restart. A cabinet's actor starts at its first uplink, so a cabinet
//! that was online when the hub stopped and never comes back would have no actor, hence no
//! missed-heartbeat deadline and no `cabinet_offline` alert: it would just vanish from the
//! online count. Whether a cabinet is online is stored (`cabinets.online_at`, written from the
//! actors' `OnlineChanged`); at start-up this sweep waits `heartbeat_s × missed_heartbeats` for
//! each cabinet stored online and, for one that has not come back, raises `cabinet_offline`
//! through an actor seeded with it: the actor clears it as usual when the cabinet returns.
//! With several nodes, cabinets another live node serves are left to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cabinet_actors::actor::{ActorSeed, CabinetMeta, CabinetPorts, Clock};
use cabinet_actors::alert::{ActiveAlert, AlertType};
use cabinet_actors::ids::{CabinetId, MerchantId};
use cabinet_actors::machine::Effect;
use cabinet_actors::registry::Registry;

use crate::metrics::Metrics;
use crate::ports::HubPorts;
use crate::store::{CabinetRow, Store};

/// What the sweep needs.
pub struct OfflineSweep {
    /// Storage.
    pub store: Store,
    /// The actors.
    pub registry: Arc<Registry>,
    /// Feed, metrics and alert history, as the actors' own effects reach them.
    pub ports: Arc<HubPorts>,
    /// Counters.
    pub metrics: Metrics,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The configured heartbeat, for cabinets with no stored configuration.
    pub heartbeat_s: u32,
    /// Missed heartbeats before offline.
    pub missed_heartbeats: u32,
}

impl OfflineSweep {
    /// Runs once, from start-up: returns when every cabinet stored online came back or was
    /// marked offline.
    pub async fn run(self) {
        let started = tokio::time::Instant::now();
        let rows = match self.store.cabinets_stored_online().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "could not read the cabinets online before the restart; they show offline without an alert");
                self.metrics
                    .store_errors
                    .with_label_values(&["offline_sweep"])
                    .inc();
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            // The window the actor itself would give the cabinet: its desired heartbeat.
            let heartbeat_s = match self.store.latest_config(&row.id).await {
                Ok(Some(c)) => c.heartbeat_s,
                _ => self.heartbeat_s,
            };
            let window = u64::from(heartbeat_s.max(1)) * u64::from(self.missed_heartbeats.max(1));
            due.push((started + Duration::from_secs(window), row));
        }
        due.sort_by_key(|(at, _)| *at);
        tracing::info!(
            cabinets = due.len(),
            "waiting for the cabinets online before the restart"
        );
        for (at, row) in due {
            tokio::time::sleep_until(at).await;
            self.check(&row).await;
        }
    }

    async fn check(&self, row: &CabinetRow) {
        let (Ok(id), Ok(merchant)) = (
            CabinetId::parse(&row.id),
            MerchantId::parse(&row.merchant_id),
        ) else {
            tracing::error!(cabinet_id = %row.id, "stored cabinet id or merchant invalid; not swept");
            return;
        };
        // Several nodes: a cabinet another live node serves is that node's to judge (a node
        // joining a cluster took every other node's cabinets offline here).
        if self.ports.cluster.serves_elsewhere(id.as_str()).await {
            return;
        }
        if let Some(h) = self.registry.get(&id) {
            // It has spoken since the start: its actor keeps its state (and its deadlines).
            if !h.snapshot().await.is_ok_and(|s| s.online) {
                tracing::info!(cabinet_id = %id, "cabinet heard from after the restart but offline now; its actor keeps it");
            }
            return;
        }
        let meta = CabinetMeta { id, merchant };
        let now = self.clock.now_ms();
        let alert = ActiveAlert {
            // The machine's own id scheme, so that ids stay unique and alike.
            id: format!("{}-{}-{now}", meta.id, AlertType::CabinetOffline.as_str()),
            kind: AlertType::CabinetOffline,
            raised_at: now,
            acked: false,
            detail: Some("not back after the hub restarted".into()),
            flapping: false,
            flaps: 0,
        };
        // The alert is stored before the actor reads its seed, so the actor holds it and
        // clears it when the cabinet comes back. Only when this sweep starts the actor: should
        // the cabinet connect in between, its own actor has it and nothing is written.
        let seeded = AtomicBool::new(false);
        self.registry.get_or_start(&meta, || {
            seeded.store(true, Ordering::SeqCst);
            let (store, a, m) = (self.store.clone(), alert.clone(), meta.clone());
            let read = tokio::spawn(async move {
                if let Err(e) = store
                    .insert_alert(m.id.as_str(), m.merchant.as_str(), &a)
                    .await
                {
                    tracing::error!(cabinet_id = %m.id, error = %e, "could not store cabinet_offline");
                }
                let (desired, alerts) = tokio::join!(
                    store.latest_config(m.id.as_str()),
                    store.active_alerts(m.id.as_str())
                );
                ActorSeed {
                    desired: desired.ok().flatten(),
                    alerts: alerts.unwrap_or_else(|_| vec![a]),
                    live: None,
                }
            });
            Box::pin(async move { read.await.unwrap_or_default() })
        });
        if !seeded.load(Ordering::SeqCst) {
            // The cabinet connected in between: its own actor has it.
            return;
        }
        self.metrics.cabinet_actors.set(self.registry.len() as i64);
        // Announced as an actor's raise is: feed, gauge, log (its history write finds the row).
        self.ports.effect(&meta, &Effect::AlertRaised(alert));
        if let Err(e) = self.store.set_cabinet_online(meta.id.as_str(), None).await {
            tracing::error!(cabinet_id = %meta.id, error = %e, "could not store the cabinet offline");
        }
        self.metrics.offline_after_restart.inc();
    }
}
