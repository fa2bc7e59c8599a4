//! `dataplane`: trimtab's reverse proxy for HTTP/1.1, WebSocket and other upgraded protocols.
//!
//! A connection is accepted ([`server`]), its request routed ([`routing`]) and handled
//! ([`proxy`]): plain HTTP through the upstream keep-alive [`pool`], upgrades through one of
//! the two forwarders ([`forward::zero_copy`], [`forward::frame_aware`]) with the settings the
//! [`source::SettingsSource`] decided. When an upgraded connection ends its statistics
//! ([`stats`], [`frames`]) become a profile for the [`source::ProfileSink`].

pub mod config;
pub mod decisions;
pub mod deflate;
pub mod forward;
pub mod frames;
pub mod headers;
pub mod pool;
pub mod profiles;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod sniff;
pub mod source;
pub mod stats;
pub mod telemetry;

pub use config::Config;
pub use server::DataPlane;
