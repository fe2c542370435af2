//! Cabinet actors: the per-cabinet actor, its deterministic state machine, the protocol types
//! and the ports through which actors reach storage, the broker and metrics.
//!
//! This crate knows no sqlx, Redis or rumqttd; `cabinet-hub` implements the ports.
#![warn(missing_docs)]

pub mod actor;
pub mod alert;
pub mod handle;
pub mod ids;
pub mod machine;
pub mod pricing;
pub mod protocol;
pub mod registry;
pub mod seq;
pub mod session;

pub use actor::{
    ActorSeed, CabinetActor, CabinetMeta, CabinetPorts, Clock, PendingSeed, SystemClock,
};
pub use alert::{ActiveAlert, AlertType, ClearedBy, Severity};
pub use handle::{CabinetHandle, CommandError, Unreachable};
pub use ids::{CabinetId, MerchantId};
pub use machine::{
    CabinetMachine, CabinetSnapshot, CommandOutcome, Effect, Input, Refusal, Timing,
};
pub use registry::Registry;
