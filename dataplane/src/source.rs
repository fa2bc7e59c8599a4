//! Where a connection's settings come from, and where its profile goes.
//!
//! [`SettingsSource`] answers at once, without I/O: the data path never waits on the optimizer.
//! Today the source is the service's static settings; the optimizer's decision cache plugs in
//! here. [`ProfileSink`] takes a finished connection's profile without blocking; the
//! PostgreSQL writer plugs in there.

use tuning::{ConnectionContext, Decision, Profile, Reason};

use crate::config::Service;
use crate::telemetry::METRICS;

/// Decides the settings of a new connection. Must not block.
pub trait SettingsSource: Send + Sync + std::fmt::Debug + 'static {
    /// The decision for one connection (`connection_id` seeds its exploration draw) with this
    /// context to this service.
    fn decide(
        &self,
        ctx: &ConnectionContext,
        service: &Service,
        connection_id: &uuid::Uuid,
    ) -> Decision;
}

/// The service's static settings, reason `default`.
#[derive(Debug, Default)]
pub struct StaticSettings;

impl SettingsSource for StaticSettings {
    fn decide(&self, _ctx: &ConnectionContext, service: &Service, _id: &uuid::Uuid) -> Decision {
        Decision::fixed(service.settings, Reason::Default)
    }
}

/// Bring a decision's settings onto the grid and the constraints, counting every change.
pub fn applicable(mut d: Decision) -> Decision {
    let (s, clamps) = d.settings.clamp();
    let changed = clamps.len();
    if changed > 0 {
        METRICS
            .settings_clamped
            .fetch_add(changed as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(?clamps, "settings clamped");
    }
    d.settings = s;
    d
}

/// Receives profiles of finished connections. Must not block.
pub trait ProfileSink: Send + Sync + std::fmt::Debug + 'static {
    /// Take one profile.
    fn emit(&self, p: Profile);
}

/// Writes one log line per connection (the profile's key fields) and keeps nothing.
#[derive(Debug, Default)]
pub struct LogSink;

impl ProfileSink for LogSink {
    fn emit(&self, p: Profile) {
        log_profile(&p);
    }
}

/// The one log line per finished connection.
pub fn log_profile(p: &Profile) {
    tracing::info!(
        connection_id = %p.connection_id,
        service = %p.context.service,
        route = %p.context.route,
        protocol = p.context.protocol.as_str(),
        subprotocol = p.context.subprotocol.as_deref(),
        client = p.context.client_key.as_deref(),
        mode = p.decision.settings.mode.as_str(),
        compression = p.decision.settings.compression,
        reason = p.decision.reason.as_str(),
        duration_ms = p.duration_us / 1000,
        c2u_messages = p.client_to_upstream.messages,
        u2c_messages = p.upstream_to_client.messages,
        c2u_bytes = p.client_to_upstream.bytes,
        u2c_bytes = p.upstream_to_client.bytes,
        closed_by = p.closed_by.as_str(),
        close_code = p.close_code,
        error = p.error_class.as_deref(),
        "connection closed"
    );
}
