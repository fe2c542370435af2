//! cabinet-hub: the realtime hub for smart open-door vending cabinets.
//!
//! `main` is a thin shell over [`app::Application`]; tests build the same application on free
//! ports.

pub mod api;
pub mod api_catalog;
pub mod api_feed;
pub mod api_sessions;
pub mod app;
pub mod ca;
pub mod config;
pub mod feed;
pub mod metrics;
pub mod mqtt;
pub mod payments;
pub mod ports;
pub mod secrets;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod web;

pub use app::Application;
pub use config::Settings;
