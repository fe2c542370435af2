//! The cabinet supervisor: one actor per cabinet, spread over one arbiter per core, each under
//! an actix `Supervisor` that restarts it when its logic panics.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, RwLock};

use actix::prelude::*;

use crate::actor::{CabinetActor, CabinetMeta, CabinetPorts, Clock, PendingSeed};
use crate::handle::CabinetHandle;
use crate::ids::CabinetId;
use crate::machine::Timing;

/// Owns the arbiters and the map from cabinet to actor.
pub struct Registry {
    arbiters: Vec<Arbiter>,
    actors: RwLock<HashMap<CabinetId, Addr<CabinetActor>>>,
    ports: Arc<dyn CabinetPorts>,
    clock: Arc<dyn Clock>,
    timing: Timing,
}

impl Registry {
    /// Starts `threads` arbiters (at least one). Must run inside an actix `System`.
    pub fn new(
        threads: usize,
        ports: Arc<dyn CabinetPorts>,
        clock: Arc<dyn Clock>,
        timing: Timing,
    ) -> Self {
        let arbiters = (0..threads.max(1)).map(|_| Arbiter::new()).collect();
        Self {
            arbiters,
            actors: RwLock::new(HashMap::new()),
            ports,
            clock,
            timing,
        }
    }

    /// The cabinet's handle, when it has an actor on this node.
    pub fn get(&self, id: &CabinetId) -> Option<CabinetHandle> {
        self.addr(id).map(CabinetHandle::local)
    }

    fn addr(&self, id: &CabinetId) -> Option<Addr<CabinetActor>> {
        self.actors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// How many actors run.
    pub fn len(&self) -> usize {
        self.actors.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no actor runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cabinet's handle, its actor started from `seed()` when it has none.
    pub fn get_or_start(
        &self,
        meta: &CabinetMeta,
        seed: impl FnOnce() -> PendingSeed,
    ) -> CabinetHandle {
        if let Some(addr) = self.addr(&meta.id) {
            return CabinetHandle::local(addr);
        }
        let mut actors = self.actors.write().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = actors.get(&meta.id) {
            return CabinetHandle::local(addr.clone());
        }
        let mut h = DefaultHasher::new();
        meta.id.hash(&mut h);
        let idx = (h.finish() as usize) % self.arbiters.len();
        let seed = seed();
        let (meta_c, timing, ports, clock) = (
            meta.clone(),
            self.timing.clone(),
            self.ports.clone(),
            self.clock.clone(),
        );
        let addr = Supervisor::start_in_arbiter(&self.arbiters[idx].handle(), move |_| {
            CabinetActor::seeded_later(meta_c, timing, ports, clock, seed)
        });
        actors.insert(meta.id.clone(), addr.clone());
        CabinetHandle::local(addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for a in &self.arbiters {
            a.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::actor::{ActorSeed, PublishError, SystemClock};
    use crate::alert::ActiveAlert;
    use crate::alert::AlertType;
    use crate::ids::MerchantId;
    use crate::machine::{CabinetSnapshot, Effect};
    use crate::protocol::{parse_uplink, Command, UplinkKind};

    #[derive(Default)]
    struct CountingPorts {
        restarts: AtomicUsize,
        published: AtomicUsize,
    }

    impl CabinetPorts for CountingPorts {
        fn publish(&self, _: &CabinetMeta, _: &Command) -> Result<(), PublishError> {
            self.published.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn effect(&self, _: &CabinetMeta, _: &Effect) {}
        fn state_changed(&self, _: &CabinetMeta, _: &CabinetSnapshot) {}
        fn actor_restarted(&self, _: &CabinetMeta) {
            self.restarts.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn meta(id: &str) -> CabinetMeta {
        CabinetMeta {
            id: CabinetId::parse(id).unwrap_or_else(|e| panic!("{e}")),
            merchant: MerchantId::parse("m1").unwrap_or_else(|e| panic!("{e}")),
        }
    }

    #[actix_rt::test]
    async fn a_panicking_actor_is_restarted_counted_and_keeps_serving() {
        let ports = Arc::new(CountingPorts::default());
        let registry = Registry::new(2, ports.clone(), Arc::new(SystemClock), Timing::default());
        let m = meta("KM1");
        let addr = registry.get_or_start(&m, || ActorSeed::default().ready());
        let hb = parse_uplink(
            m.id.clone(),
            UplinkKind::Heartbeat,
            br#"{"seq":1,"ts":1,"door":"closed","lock":"locked"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        addr.deliver(hb.body);
        assert!(addr.snapshot().await.map(|s| s.online).unwrap_or(false));

        addr.inject_panic().await.unwrap_or_else(|e| panic!("{e}"));
        // The supervisor restarts it in place: the same address answers, state re-learned. Asked
        // until it does, for as long as a starved machine may need: only "never" fails.
        let mut snapshot = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(s) = addr.snapshot().await {
                snapshot = Some(s);
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        let snapshot = snapshot.unwrap_or_else(|| panic!("actor did not come back"));
        assert_eq!(ports.restarts.load(Ordering::SeqCst), 1);
        assert!(
            !snapshot.online,
            "a restarted actor re-learns state from the next message"
        );
        assert!(registry.get(&m.id).is_some());
    }

    #[actix_rt::test]
    async fn an_actor_takes_no_message_before_its_seed_is_in() {
        let ports = Arc::new(CountingPorts::default());
        let registry = Registry::new(2, ports, Arc::new(SystemClock), Timing::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<ActorSeed>();
        let addr = registry.get_or_start(&meta("KM1"), || {
            Box::pin(async move { rx.await.unwrap_or_default() })
        });
        // Delivered while the seed is still being read: it must wait for it.
        let hb = parse_uplink(
            CabinetId::parse("KM1").unwrap_or_else(|e| panic!("{e}")),
            UplinkKind::Heartbeat,
            br#"{"seq":1,"ts":1,"door":"closed","lock":"locked"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        addr.deliver(hb.body);
        let reader = addr.clone();
        let snapshot = actix_rt::spawn(async move { reader.snapshot().await });
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        assert!(!snapshot.is_finished(), "answered before the seed was in");

        let stored = ActiveAlert {
            id: "a1".into(),
            kind: AlertType::DoorForced,
            raised_at: 1,
            acked: true,
            detail: None,
            flapping: false,
            flaps: 0,
        };
        tx.send(ActorSeed {
            desired: None,
            alerts: vec![stored.clone()],
            live: None,
        })
        .unwrap_or_else(|_| panic!("actor gone"));
        let s = snapshot
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.alerts, vec![stored], "the stored alert was kept");
        assert!(
            s.online,
            "the heartbeat sent before the seed was processed after it"
        );
    }

    #[actix_rt::test]
    async fn one_actor_per_cabinet() {
        let ports = Arc::new(CountingPorts::default());
        let registry = Registry::new(2, ports, Arc::new(SystemClock), Timing::default());
        let a = registry.get_or_start(&meta("A1"), || ActorSeed::default().ready());
        let b = registry.get_or_start(&meta("A1"), || panic!("must not seed twice"));
        assert_eq!(a, b);
        registry.get_or_start(&meta("B1"), || ActorSeed::default().ready());
        assert_eq!(registry.len(), 2);
    }
}
