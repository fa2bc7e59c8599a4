//! `tuning`: the shared vocabulary of trimtab.
//!
//! The data plane, the optimizer and the trainer all speak in these types, and all compute
//! features, cohorts and exploration draws with this crate's one implementation, so that
//! training and serving can never disagree. It has no I/O and no heavy dependencies.

pub mod aggregates;
pub mod cohort;
pub mod context;
pub mod cost;
pub mod decision;
pub mod features;
pub mod hash;
pub mod histogram;
pub mod onnx;
pub mod profile;
#[cfg(feature = "onnxruntime")]
pub mod runtime;
pub mod settings;
#[cfg(feature = "sql")]
pub mod sql;

pub use context::{ClientClass, ConnectionContext, Protocol};
pub use decision::{
    BucketDecision, ClientOverride, Cohort, Decision, Exploration, Reason, RolloutAnswer,
};
pub use features::{ContextAggregates, encode, feature_len, feature_names, schema_hash};
pub use profile::{ClosedBy, DirectionStats, Hist, PingStats, Profile, Timings};
pub use settings::{Mode, PartialSettings, Settings, SettingsError, Target};

/// A file of this checkout, by its path from the workspace root, for tests. The crate's
/// directory comes from `CARGO_MANIFEST_DIR` at run time (cargo and nextest set it): a test
/// binary reused from a build directory shared between checkouts then reads the checkout it
/// runs for, not the one it was first compiled in (a path baked in with `env!` would).
pub fn checkout_path(rel: &str) -> std::path::PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    crate_dir.join("..").join(rel)
}
