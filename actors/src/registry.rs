//! The cabinet supervisor: one actor per cabinet, spread over one arbiter per core, each under
//! an actix `Supervisor` that restarts it when its logic panics.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, RwLock};

use actix::prelude::*;

use crate::actor::{CabinetActor, CabinetMeta, CabinetPorts, Clock};
use crate::alert::ActiveAlert;
use crate::ids::CabinetId;
use crate::machine::Timing;
use crate::protocol::CabinetConfig;

/// What a new actor starts from (read from storage by the caller).
#[derive(Debug, Clone, Default)]
pub struct ActorSeed {
    /// The desired configuration.
    pub desired: Option<CabinetConfig>,
    /// Alerts still active in storage.
    pub alerts: Vec<ActiveAlert>,
}

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

    /// The actor of a cabinet, when it has one.
    pub fn get(&self, id: &CabinetId) -> Option<Addr<CabinetActor>> {
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

    /// The actor of a cabinet, started from `seed()` when it has none.
    pub fn get_or_start(
        &self,
        meta: &CabinetMeta,
        seed: impl FnOnce() -> ActorSeed,
    ) -> Addr<CabinetActor> {
        if let Some(addr) = self.get(&meta.id) {
            return addr;
        }
        let mut actors = self.actors.write().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = actors.get(&meta.id) {
            return addr.clone();
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
            CabinetActor::new(meta_c, timing, ports, clock, seed.desired, seed.alerts)
        });
        actors.insert(meta.id.clone(), addr.clone());
        addr
    }

    /// Every actor, for listing.
    pub fn all(&self) -> Vec<(CabinetId, Addr<CabinetActor>)> {
        self.actors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for a in &self.arbiters {
            a.stop();
        }
    }
}
