//! `dataplane`: trimtab's reverse proxy for HTTP/1.1, HTTP/2 (h2c), WebSocket, other upgraded
//! protocols, CONNECT, raw TCP and TLS passthrough.
//!
//! A connection is accepted ([`server`]), its protocol detected from its first bytes
//! ([`detect`]), its request routed ([`routing`]) and handled
//! ([`proxy`]): plain HTTP through the upstream keep-alive [`pool`], upgrades through one of
//! the two forwarders ([`forward::zero_copy`], [`forward::frame_aware`]) with the settings the
//! [`source::SettingsSource`] decided. When an upgraded connection ends its statistics
//! ([`stats`], [`frames`]) become a profile for the [`source::ProfileSink`].

pub mod config;
pub mod decisions;
pub mod deflate;
pub mod detect;
pub mod forward;
pub mod frames;
pub mod h1;
pub mod h2c;
pub mod headers;
pub mod pool;
pub mod prefixed;
pub mod profiles;
pub mod proxy;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod sniff;
pub mod source;
pub mod sse;
pub mod stall;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod upgrade;

pub use config::Config;
pub use server::DataPlane;
