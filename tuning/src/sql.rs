//! Reading profiles back from PostgreSQL (feature `sql`): the one mapping from a `profiles` row
//! to a [`Profile`], for the trainer and the optimizer's rollout gates.

use sqlx::Row as _;
use sqlx::postgres::PgRow;

use crate::context::{ClientClass, ConnectionContext, Protocol};
use crate::decision::{Cohort, Decision, Reason};
use crate::profile::{ClosedBy, DirectionStats, Hist, PingStats, Profile, Timings};
use crate::settings::{Mode, Settings};

/// The columns [`profile_from_row`] reads, in order.
pub const PROFILE_COLUMNS: &str = "connection_id, dataplane_id, started_at, duration_us, service, route, protocol, \
    subprotocol, offers_deflate, client_class, client_region, hour_of_week, client_key, buffer_size, \
    ping_interval_s, idle_timeout_s, compression, mode, reason, model_version, cohort, propensity, explored, \
    c2u_bytes, c2u_messages, c2u_msg_size_hist, c2u_gap_ms_hist, c2u_max_gap_ms, c2u_sampled_in, c2u_sampled_out, \
    u2c_bytes, u2c_messages, u2c_msg_size_hist, u2c_gap_ms_hist, u2c_max_gap_ms, u2c_sampled_in, u2c_sampled_out, \
    c2u_first_message_us, u2c_first_message_us, closed_by, close_code, close_reason, error_class, dead_peer, \
    idle_timeout_fired";

fn class(s: &str) -> ClientClass {
    ClientClass::ALL
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(ClientClass::Other)
}

fn protocol(s: &str) -> Protocol {
    Protocol::ALL
        .into_iter()
        .find(|p| p.as_str() == s)
        .unwrap_or(Protocol::Websocket)
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

/// Build a profile from a row selected with [`PROFILE_COLUMNS`].
pub fn profile_from_row(r: &PgRow) -> Result<Profile, sqlx::Error> {
    let dir = |bytes: usize| -> Result<DirectionStats, sqlx::Error> {
        Ok(DirectionStats {
            bytes: u(r.try_get(bytes)?),
            messages: u(r.try_get(bytes + 1)?),
            msg_sizes: Hist::from_slice(&r.try_get::<Vec<i64>, _>(bytes + 2)?),
            read_sizes: Hist::default(),
            gaps_ms: Hist::from_slice(&r.try_get::<Vec<i64>, _>(bytes + 3)?),
            max_gap_ms: u(r.try_get(bytes + 4)?),
            sampled_in: u(r.try_get(bytes + 5)?),
            sampled_out: u(r.try_get(bytes + 6)?),
            first_message_us: None,
        })
    };
    let mut c2u = dir(23)?;
    let mut u2c = dir(30)?;
    c2u.first_message_us = r.try_get::<Option<i64>, _>(37)?.map(u);
    u2c.first_message_us = r.try_get::<Option<i64>, _>(38)?.map(u);
    let settings = Settings {
        buffer_size: r.try_get::<i32, _>(13)?.max(0) as u32,
        ping_interval: r.try_get::<i32, _>(14)?.max(0) as u32,
        idle_timeout: r.try_get::<i32, _>(15)?.max(0) as u32,
        compression: r.try_get(16)?,
        mode: Mode::parse(r.try_get(17)?).unwrap_or(Mode::ZeroCopy),
    };
    let reason: &str = r.try_get(18)?;
    let cohort: &str = r.try_get(20)?;
    let closed_by: &str = r.try_get(39)?;
    Ok(Profile {
        connection_id: r.try_get(0)?,
        dataplane_id: r.try_get(1)?,
        started_at: r.try_get(2)?,
        duration_us: u(r.try_get(3)?),
        context: ConnectionContext {
            service: r.try_get(4)?,
            route: r.try_get(5)?,
            protocol: protocol(r.try_get(6)?),
            subprotocol: r.try_get(7)?,
            offers_deflate: r.try_get(8)?,
            client_class: class(r.try_get(9)?),
            client_region: r.try_get(10)?,
            hour_of_week: r.try_get::<i16, _>(11)?.max(0) as u16,
            client_key: r.try_get(12)?,
        },
        decision: Decision {
            settings,
            reason: Reason::parse(reason).unwrap_or(Reason::Default),
            model_version: r.try_get(19)?,
            cohort: match cohort {
                "canary" => Cohort::Canary,
                "control" => Cohort::Control,
                _ => Cohort::None,
            },
            propensity: r.try_get(21)?,
            explored: r.try_get(22)?,
            shadow: None,
        },
        timings: Timings::default(),
        client_to_upstream: c2u,
        upstream_to_client: u2c,
        ping_client: PingStats::default(),
        ping_upstream: PingStats::default(),
        paused_ms: 0,
        peak_buffered_bytes: 0,
        closed_by: match closed_by {
            "upstream" => ClosedBy::Upstream,
            "proxy" => ClosedBy::Proxy,
            _ => ClosedBy::Client,
        },
        close_code: r.try_get::<Option<i32>, _>(40)?.map(|c| c as u16),
        close_reason: r.try_get(41)?,
        error_class: r.try_get(42)?,
        dead_peer: r.try_get(43)?,
        idle_timeout_fired: r.try_get(44)?,
    })
}
