//! The five per-connection settings, their grids and constraints.
//!
//! Every setting takes one value out of a small grid: those grid values are the classes the
//! models predict, the values overrides may name, and the only values the data plane applies.
//! Anything else is either rejected ([`Settings::validate`], for human input) or clamped to the
//! nearest valid value ([`Settings::clamp`], for model output), and the clamp is reported.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Grid of `buffer_size`, in bytes: 4, 16, 64 and 256 KiB.
pub const BUFFER_SIZES: [u32; 4] = [4 << 10, 16 << 10, 64 << 10, 256 << 10];
/// Grid of `ping_interval`, in seconds; 0 means off.
pub const PING_INTERVALS: [u32; 4] = [0, 15, 30, 60];
/// Grid of `idle_timeout`, in seconds.
pub const IDLE_TIMEOUTS: [u32; 5] = [30, 60, 120, 300, 900];
/// A peer that misses this many consecutive pongs is declared dead.
pub const MISSED_PONGS_FOR_DEAD_PEER: u32 = 3;

/// How the data plane forwards a WebSocket (or other upgraded) connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Bytes forwarded unmodified (splice(2) on Linux); frame headers tracked for accounting.
    ZeroCopy,
    /// Messages parsed on both legs; enables compression, pings and close-code handling.
    FrameAware,
}

impl Mode {
    /// Both modes, in class order.
    pub const ALL: [Mode; 2] = [Mode::ZeroCopy, Mode::FrameAware];

    /// The name used in config, JSON, SQL and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ZeroCopy => "zero_copy",
            Mode::FrameAware => "frame_aware",
        }
    }

    /// Parse the name used in config, JSON and SQL.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "zero_copy" => Some(Mode::ZeroCopy),
            "frame_aware" => Some(Mode::FrameAware),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The settings applied to one connection.
///
/// In config files the sizes and durations may be written for humans (`"64KiB"`, `"30s"`,
/// `"5m"`, `"off"`); on the wire and in the database they are plain integers (bytes, seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Per-direction read/copy buffer in bytes (also the WebSocket buffers in `frame_aware`).
    #[serde(deserialize_with = "de_bytes")]
    pub buffer_size: u32,
    /// Proxy-originated ping interval in seconds, 0 = off (TCP keepalive in `zero_copy`).
    #[serde(deserialize_with = "de_secs")]
    pub ping_interval: u32,
    /// Close after this many seconds without traffic.
    #[serde(deserialize_with = "de_secs")]
    pub idle_timeout: u32,
    /// permessage-deflate toward the client (requires `frame_aware`).
    pub compression: bool,
    /// Forwarding mode.
    pub mode: Mode,
}

impl Default for Settings {
    /// The shipped defaults: what a careful operator would pick with no knowledge of the traffic.
    fn default() -> Self {
        Settings {
            buffer_size: 16 << 10,
            ping_interval: 30,
            idle_timeout: 300,
            compression: false,
            mode: Mode::ZeroCopy,
        }
    }
}

/// A setting that is not on its grid or breaks a constraint. Names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The value is not one of the grid's values.
    #[error("{field} = {value} is not allowed (allowed: {allowed})")]
    OffGrid {
        /// The field's name.
        field: &'static str,
        /// The rejected value, as written.
        value: String,
        /// The allowed values, for the message.
        allowed: String,
    },
    /// `compression = true` together with `mode = zero_copy`.
    #[error("compression = true requires mode = \"frame_aware\" (mode is \"{mode}\")")]
    CompressionNeedsFrameAware {
        /// The mode that was asked for.
        mode: Mode,
    },
}

/// One change [`Settings::clamp`] made to bring a value onto its grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clamp {
    /// The field that was changed.
    pub field: &'static str,
    /// The value before.
    pub from: String,
    /// The value after.
    pub to: String,
}

fn nearest(grid: &[u32], v: u32) -> u32 {
    *grid
        .iter()
        .min_by_key(|g| (i64::from(**g) - i64::from(v)).unsigned_abs())
        .expect("grids are not empty")
}

fn list(grid: &[u32]) -> String {
    grid.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Settings {
    /// Check every field against its grid and the constraints; the first problem is returned.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem with these settings (empty when valid).
    pub fn problems(&self) -> Vec<SettingsError> {
        let mut out = Vec::new();
        for (field, grid, v) in [
            ("buffer_size", &BUFFER_SIZES[..], self.buffer_size),
            ("ping_interval", &PING_INTERVALS[..], self.ping_interval),
            ("idle_timeout", &IDLE_TIMEOUTS[..], self.idle_timeout),
        ] {
            if !grid.contains(&v) {
                out.push(SettingsError::OffGrid {
                    field,
                    value: v.to_string(),
                    allowed: list(grid),
                });
            }
        }
        if self.compression && self.mode != Mode::FrameAware {
            out.push(SettingsError::CompressionNeedsFrameAware { mode: self.mode });
        }
        out
    }

    /// Bring every field onto its grid (nearest value) and satisfy the constraints
    /// (compression is turned off in `zero_copy`). Returns what was changed, for counting.
    pub fn clamp(self) -> (Settings, Vec<Clamp>) {
        let mut s = self;
        let mut clamps = Vec::new();
        for (field, grid, slot) in [
            ("buffer_size", &BUFFER_SIZES[..], &mut s.buffer_size),
            ("ping_interval", &PING_INTERVALS[..], &mut s.ping_interval),
            ("idle_timeout", &IDLE_TIMEOUTS[..], &mut s.idle_timeout),
        ] {
            let n = nearest(grid, *slot);
            if n != *slot {
                clamps.push(Clamp {
                    field,
                    from: slot.to_string(),
                    to: n.to_string(),
                });
                *slot = n;
            }
        }
        if s.compression && s.mode != Mode::FrameAware {
            clamps.push(Clamp {
                field: "compression",
                from: "true".into(),
                to: "false".into(),
            });
            s.compression = false;
        }
        (s, clamps)
    }

    /// The dead-peer timeout derived from the ping interval (3 missed pongs), if pings are on.
    pub fn dead_peer_after_secs(&self) -> Option<u32> {
        (self.ping_interval > 0).then(|| self.ping_interval * MISSED_PONGS_FOR_DEAD_PEER)
    }

    /// Apply a partial override on top of these settings (fields it names win).
    pub fn with(self, p: &PartialSettings) -> Settings {
        Settings {
            buffer_size: p.buffer_size.unwrap_or(self.buffer_size),
            ping_interval: p.ping_interval.unwrap_or(self.ping_interval),
            idle_timeout: p.idle_timeout.unwrap_or(self.idle_timeout),
            compression: p.compression.unwrap_or(self.compression),
            mode: p.mode.unwrap_or(self.mode),
        }
    }
}

/// Some of the settings: what an override or a per-service config names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialSettings {
    /// See [`Settings::buffer_size`].
    #[serde(
        default,
        deserialize_with = "de_opt_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub buffer_size: Option<u32>,
    /// See [`Settings::ping_interval`].
    #[serde(
        default,
        deserialize_with = "de_opt_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub ping_interval: Option<u32>,
    /// See [`Settings::idle_timeout`].
    #[serde(
        default,
        deserialize_with = "de_opt_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<u32>,
    /// See [`Settings::compression`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<bool>,
    /// See [`Settings::mode`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

impl PartialSettings {
    /// Check the named fields against their grids. The combined constraint
    /// (compression needs `frame_aware`) is checked on the settings it produces.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let full = Settings {
            compression: false,
            ..Settings::default().with(self)
        };
        full.validate()
    }

    /// True when no field is named.
    pub fn is_empty(&self) -> bool {
        *self == PartialSettings::default()
    }
}

/// Parse a human size: `16384`, `"16384"`, `"16KiB"`, `"16k"`, `"1MiB"`.
pub fn parse_bytes(s: &str) -> Option<u32> {
    u32::try_from(parse_bytes_u64(s)?).ok()
}

/// Parse a human size that may exceed 4 GiB: `"1GiB"`, `"512MiB"`, `1048576`.
pub fn parse_bytes_u64(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Parse a human duration in whole seconds: `30`, `"30s"`, `"5m"`, `"1h"`, `"off"` (0).
pub fn parse_secs(s: &str) -> Option<u32> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Some(0);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    u32::try_from(n.checked_mul(mul)?).ok()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

fn human<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Option<u32>,
    what: &str,
) -> Result<u32, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => u32::try_from(n)
            .map_err(|_| serde::de::Error::custom(format!("{n} is too large for {what}"))),
        NumOrStr::Str(s) => {
            parse(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not {what}")))
        }
    }
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    human(d, parse_bytes, "a size (e.g. 16384 or \"16KiB\")")
}

fn de_secs<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    human(
        d,
        parse_secs,
        "a duration (e.g. 30, \"30s\", \"5m\" or \"off\")",
    )
}

fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    de_bytes(d).map(Some)
}

fn de_opt_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    de_secs(d).map(Some)
}

/// One of the five learned targets: its grid, as classes, and how to read and write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `buffer_size`
    BufferSize,
    /// `ping_interval`
    PingInterval,
    /// `idle_timeout`
    IdleTimeout,
    /// `compression`
    Compression,
    /// `mode`
    Mode,
}

impl Target {
    /// Every target, in the order models are exported.
    pub const ALL: [Target; 5] = [
        Target::BufferSize,
        Target::PingInterval,
        Target::IdleTimeout,
        Target::Compression,
        Target::Mode,
    ];

    /// The field's name.
    pub fn name(self) -> &'static str {
        match self {
            Target::BufferSize => "buffer_size",
            Target::PingInterval => "ping_interval",
            Target::IdleTimeout => "idle_timeout",
            Target::Compression => "compression",
            Target::Mode => "mode",
        }
    }

    /// Number of classes (grid values).
    pub fn classes(self) -> usize {
        match self {
            Target::BufferSize => BUFFER_SIZES.len(),
            Target::PingInterval => PING_INTERVALS.len(),
            Target::IdleTimeout => IDLE_TIMEOUTS.len(),
            Target::Compression | Target::Mode => 2,
        }
    }

    /// The class index of this target's value in `s` (always in range for valid settings;
    /// off-grid values map to the nearest class).
    pub fn class_of(self, s: &Settings) -> usize {
        let idx = |grid: &[u32], v: u32| {
            grid.iter()
                .position(|g| *g == nearest(grid, v))
                .expect("nearest is on the grid")
        };
        match self {
            Target::BufferSize => idx(&BUFFER_SIZES, s.buffer_size),
            Target::PingInterval => idx(&PING_INTERVALS, s.ping_interval),
            Target::IdleTimeout => idx(&IDLE_TIMEOUTS, s.idle_timeout),
            Target::Compression => usize::from(s.compression),
            Target::Mode => usize::from(s.mode == Mode::FrameAware),
        }
    }

    /// Set this target's value in `s` to class `class` (clamped to the last class).
    pub fn set_class(self, s: &mut Settings, class: usize) {
        let c = class.min(self.classes() - 1);
        match self {
            Target::BufferSize => s.buffer_size = BUFFER_SIZES[c],
            Target::PingInterval => s.ping_interval = PING_INTERVALS[c],
            Target::IdleTimeout => s.idle_timeout = IDLE_TIMEOUTS[c],
            Target::Compression => s.compression = c == 1,
            Target::Mode => s.mode = Mode::ALL[c],
        }
    }
}

/// Format a byte count the way config files write it (`16KiB`).
pub fn fmt_bytes(b: u32) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}KiB", b >> 10)
    } else {
        format!("{b}B")
    }
}

/// Serialize helper for places that want the human form.
pub fn ser_human_bytes<S: Serializer>(b: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt_bytes(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Settings::default().validate(), Ok(()));
    }

    #[test]
    fn off_grid_value_is_named_with_field_and_value() {
        let s = Settings {
            buffer_size: 5000,
            ..Settings::default()
        };
        let e = s.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "buffer_size = 5000 is not allowed (allowed: 4096, 16384, 65536, 262144)"
        );
    }

    #[test]
    fn compression_needs_frame_aware() {
        let s = Settings {
            compression: true,
            mode: Mode::ZeroCopy,
            ..Settings::default()
        };
        assert!(matches!(
            s.validate(),
            Err(SettingsError::CompressionNeedsFrameAware { .. })
        ));
        let ok = Settings {
            mode: Mode::FrameAware,
            ..s
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn clamp_moves_to_nearest_grid_value_and_reports_it() {
        let s = Settings {
            buffer_size: 50_000,
            ping_interval: 20,
            idle_timeout: 10_000,
            compression: true,
            mode: Mode::ZeroCopy,
        };
        let (c, clamps) = s.clamp();
        assert_eq!(c.buffer_size, 65536);
        assert_eq!(c.ping_interval, 15);
        assert_eq!(c.idle_timeout, 900);
        assert!(!c.compression);
        assert_eq!(clamps.len(), 4);
        assert_eq!(c.validate(), Ok(()));
        assert!(Settings::default().clamp().1.is_empty());
    }

    #[test]
    fn human_forms_parse() {
        assert_eq!(parse_bytes("16KiB"), Some(16384));
        assert_eq!(parse_bytes("256k"), Some(262144));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_secs("off"), Some(0));
        assert_eq!(parse_secs("5m"), Some(300));
        assert_eq!(parse_secs("15s"), Some(15));
        assert_eq!(parse_secs("1d"), None);
        let s: Settings = serde_json::from_str(
            r#"{"buffer_size":"64KiB","ping_interval":"off","idle_timeout":"2m","compression":false,"mode":"zero_copy"}"#,
        )
        .unwrap();
        assert_eq!(s.buffer_size, 65536);
        assert_eq!(s.ping_interval, 0);
        assert_eq!(s.idle_timeout, 120);
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = serde_json::from_str::<PartialSettings>(r#"{"bufer_size":4096}"#).unwrap_err();
        assert!(e.to_string().contains("bufer_size"), "{e}");
    }

    #[test]
    fn partial_overrides_only_what_it_names() {
        let p = PartialSettings {
            idle_timeout: Some(900),
            ..PartialSettings::default()
        };
        let s = Settings::default().with(&p);
        assert_eq!(s.idle_timeout, 900);
        assert_eq!(s.buffer_size, Settings::default().buffer_size);
        assert!(
            PartialSettings {
                buffer_size: Some(1),
                ..PartialSettings::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn target_classes_round_trip() {
        for t in Target::ALL {
            for c in 0..t.classes() {
                let mut s = Settings {
                    mode: Mode::FrameAware,
                    ..Settings::default()
                };
                t.set_class(&mut s, c);
                assert_eq!(t.class_of(&s), c, "{t:?} class {c}");
            }
        }
    }
}
