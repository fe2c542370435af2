//! cabinet-hub: the realtime hub for smart open-door vending cabinets.
//!
//! `main` is a thin shell over [`app::Application`], the composition root; tests build the same
//! application on free ports. The layers, top down (each imports only from below it):
//!
//! - `app`: builds and wires everything.
//! - `http`: the API, one file per resource; `http::state::AppState` is what handlers share.
//! - `sessions`: the money path's supervisor, the shell of `cabinet_actors::session`.
//! - `ports`, `mqtt`: the actors' outside world: commands out, uplinks in, alerts to storage.
//! - `feed`: the operator feed's fan-out and replay.
//! - `sweep`: after a restart, cabinets that were online and do not come back go offline.
//! - `payments`, `simulators`: provider clients, and the providers' simulators (a feature).
//! - `views`, `error`: the JSON views and the one error model of the API.
//! - `store`, `metrics`, `config`, `telemetry`, `secrets`, `private`, `ca`,
//!   `backoff`: leaves.

/// jemalloc for every binary of this crate, tests included, so that the memory figures
/// (`telemetry::memory_use`) describe the allocator in use. Against glibc's malloc in the same
/// run it held a fleet in a third less memory and cut the rush's p99 by a fifth
/// (docs/architecture.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start. `background_thread`: unused pages go back to the OS
/// on a thread of jemalloc's own, on its decay clock, rather than only when some allocation
/// happens to run the purge; with it an idle hub returns what a storm left behind.
#[allow(non_upper_case_globals)]
#[used]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true\0";

pub mod app;
pub mod backoff;
pub mod bills;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod error;
pub mod feed;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod payments;
pub mod ports;
pub mod private;
pub mod reminders;
pub mod secrets;
pub mod sessions;
#[cfg(feature = "simulators")]
pub mod simulators;
pub mod store;
pub mod sweep;
pub mod telemetry;
pub mod views;

pub use app::Application;
pub use config::Settings;
