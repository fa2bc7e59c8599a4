//! ONNX Runtime (feature `onnxruntime`), loaded dynamically: one environment per process,
//! sessions from model bytes, and models validated against the contract of [`crate::onnx`]
//! before they are used. The optimizer serves with it; the trainer evaluates with it.
//!
//! `ort` panics on its first call when the shared library is missing, so [`Runtime::init`]
//! checks the path first and returns a clear error instead.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;

use crate::onnx::{CONTRACT, INPUT};
use crate::{ConnectionContext, ContextAggregates, Settings, Target};

/// Why the runtime or a model could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// `ORT_DYLIB_PATH` is not set and no path was configured.
    #[error(
        "ONNX Runtime library not configured: set ORT_DYLIB_PATH or `onnxruntime_library` (./dev sets it up)"
    )]
    NotConfigured,
    /// The configured path does not exist.
    #[error("ONNX Runtime library {0} does not exist")]
    Missing(PathBuf),
    /// Loading or initialising the library failed.
    #[error("ONNX Runtime library {path} could not be loaded: {reason}")]
    Load {
        /// The library path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The model is not usable.
    #[error("model rejected: {0}")]
    Model(String),
    /// Running the model failed.
    #[error("inference failed: {0}")]
    Run(String),
}

/// The process's ONNX Runtime environment.
#[derive(Debug)]
pub struct Runtime {
    env: Environment,
    /// The library in use.
    pub library: PathBuf,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

impl Runtime {
    /// Load the library at `path` (or `ORT_DYLIB_PATH`) once per process and return the runtime.
    pub fn init(path: Option<&Path>) -> Result<&'static Runtime, InferenceError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => std::env::var_os("ORT_DYLIB_PATH")
                .map(PathBuf::from)
                .ok_or(InferenceError::NotConfigured)?,
        };
        if !path.is_file() {
            return Err(InferenceError::Missing(path));
        }
        let r = RUNTIME.get_or_init(|| {
            let env = ort::init_from(&path)
                .map_err(|e| e.to_string())?
                .with_name("trimtab")
                .build()
                .map_err(|e| e.to_string())?;
            Ok(Runtime {
                env,
                library: path.clone(),
            })
        });
        r.as_ref().map_err(|reason| InferenceError::Load {
            path,
            reason: reason.clone(),
        })
    }

    /// Build a session from model bytes (single-threaded: decisions are tiny and many).
    pub fn session(&self, onnx: &[u8]) -> Result<Session, InferenceError> {
        Session::builder(&self.env)
            .map_err(|e| InferenceError::Model(e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| InferenceError::Model(e.to_string()))?
            .commit_from_memory(onnx)
            .map_err(|e| InferenceError::Model(e.to_string()))
    }
}

/// Run a classifier session on a batch of rows (`rows.len() / width` rows of `width`
/// features) and return the `label` output as class indices.
pub fn predict_labels(
    session: &mut Session,
    input: &str,
    rows: Vec<f32>,
    width: usize,
) -> Result<Vec<i64>, InferenceError> {
    if width == 0 || !rows.len().is_multiple_of(width) {
        return Err(InferenceError::Run(format!(
            "{} values do not make rows of {width}",
            rows.len()
        )));
    }
    let n = rows.len() / width;
    let tensor =
        Tensor::from_array(([n, width], rows)).map_err(|e| InferenceError::Run(e.to_string()))?;
    let out = session
        .run(ort::inputs![input => tensor])
        .map_err(|e| InferenceError::Run(e.to_string()))?;
    let (_, labels) = out["label"]
        .try_extract_tensor::<i64>()
        .map_err(|e| InferenceError::Run(e.to_string()))?;
    Ok(labels.to_vec())
}

/// A model ready to decide.
#[derive(Debug)]
pub struct LoadedModel {
    /// Its registry version.
    pub version: String,
    session: Mutex<Session>,
    width: usize,
}

fn bad(msg: impl Into<String>) -> InferenceError {
    InferenceError::Model(msg.into())
}

impl LoadedModel {
    /// Load and validate: input name and width, one output per target, the contract and the
    /// feature-schema hash in the metadata, and every prediction of a probe batch on its grid.
    pub fn load(rt: &Runtime, version: &str, onnx: &[u8]) -> Result<LoadedModel, InferenceError> {
        let session = rt.session(onnx)?;
        let width = crate::feature_len();
        {
            let inputs = session.inputs();
            if inputs.len() != 1 || inputs[0].name() != INPUT {
                return Err(bad(format!(
                    "the model must have exactly one input named {INPUT:?}"
                )));
            }
            let dims = inputs[0].dtype().tensor_shape().map(|s| s.to_vec());
            match dims.as_deref() {
                Some([_, w]) if *w == width as i64 => {}
                other => {
                    return Err(bad(format!(
                        "input {INPUT:?} must be [N, {width}], the model has {other:?}"
                    )));
                }
            }
            let outputs: Vec<String> = session
                .outputs()
                .iter()
                .map(|o| o.name().to_string())
                .collect();
            for t in Target::ALL {
                if !outputs.iter().any(|o| o == t.name()) {
                    return Err(bad(format!("output {:?} is missing", t.name())));
                }
            }
        }
        let meta = session
            .metadata()
            .map_err(|e| bad(format!("metadata: {e}")))?;
        let contract = meta.custom("trimtab.contract");
        if contract.as_deref() != Some(CONTRACT) {
            return Err(bad(format!(
                "metadata trimtab.contract is {contract:?}, expected {CONTRACT:?}"
            )));
        }
        let hash = meta.custom("trimtab.schema_hash");
        let want = crate::schema_hash();
        if hash.as_deref() != Some(want.as_str()) {
            return Err(bad(format!(
                "feature schema hash {hash:?} does not match this build's {want:?}"
            )));
        }
        drop(meta);
        let m = LoadedModel {
            version: version.to_string(),
            session: Mutex::new(session),
            width,
        };
        // Probe: every class the model gives must be on its target's grid.
        let probe = probe_contexts();
        let rows: Vec<Vec<f32>> = probe
            .iter()
            .map(|c| crate::encode(c, &ContextAggregates::default()))
            .collect();
        let labels = m.labels(&rows)?;
        for (t, ls) in Target::ALL.iter().zip(&labels) {
            if let Some(bad_label) = ls.iter().find(|l| **l < 0 || **l as usize >= t.classes()) {
                return Err(bad(format!(
                    "output {:?} gave class {bad_label}, outside its grid of {}",
                    t.name(),
                    t.classes()
                )));
            }
        }
        Ok(m)
    }

    /// Class labels per target for a batch of feature rows.
    pub fn labels(&self, rows: &[Vec<f32>]) -> Result<Vec<Vec<i64>>, InferenceError> {
        let n = rows.len();
        let mut flat = Vec::with_capacity(n * self.width);
        for r in rows {
            flat.extend_from_slice(r);
        }
        let tensor = ort::value::Tensor::from_array(([n, self.width], flat))
            .map_err(|e| InferenceError::Run(e.to_string()))?;
        let mut s = self.session.lock().expect("session");
        let out = s
            .run(ort::inputs![INPUT => tensor])
            .map_err(|e| InferenceError::Run(e.to_string()))?;
        Target::ALL
            .iter()
            .map(|t| {
                out[t.name()]
                    .try_extract_tensor::<i64>()
                    .map(|(_, v)| v.to_vec())
                    .map_err(|e| InferenceError::Run(e.to_string()))
            })
            .collect()
    }

    /// The settings the model picks for one context, clamped onto the grids and constraints;
    /// also returns how many values had to be clamped.
    pub fn settings(
        &self,
        ctx: &ConnectionContext,
        agg: &ContextAggregates,
        base: Settings,
    ) -> Result<(Settings, usize), InferenceError> {
        let labels = self.labels(&[crate::encode(ctx, agg)])?;
        let mut s = base;
        let mut clamped = 0;
        for (t, l) in Target::ALL.iter().zip(&labels) {
            let c = l.first().copied().unwrap_or(0);
            if c < 0 || c as usize >= t.classes() {
                clamped += 1;
            }
            t.set_class(&mut s, c.max(0) as usize);
        }
        let (s, clamps) = s.clamp();
        Ok((s, clamped + clamps.len()))
    }
}

/// A spread of contexts to probe a model with.
pub fn probe_contexts() -> Vec<ConnectionContext> {
    use crate::{ClientClass, Protocol};
    let mut v = Vec::new();
    for (i, p) in Protocol::ALL.iter().enumerate() {
        for (j, c) in ClientClass::ALL.iter().enumerate() {
            v.push(ConnectionContext {
                service: format!("probe-{i}"),
                route: format!("/r{j}"),
                protocol: *p,
                subprotocol: (j % 2 == 0).then(|| "p".to_string()),
                offers_deflate: (i + j) % 2 == 0,
                client_class: *c,
                client_region: "unknown".into(),
                hour_of_week: ((i * 37 + j * 11) % 168) as u16,
                client_key: None,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_a_clear_error() {
        let e = Runtime::init(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ONNX Runtime library /nonexistent/libonnxruntime.so does not exist"
        );
    }

    /// Proves the runtime path CI depends on: the dynamically loaded library runs the tree
    /// ensemble committed under `models/` (ai.onnx.ml domain).
    #[test]
    fn onnx_runtime_runs_the_committed_smoke_model() {
        let rt = Runtime::init(None).expect("ONNX Runtime (./dev sets ORT_DYLIB_PATH)");
        let bytes =
            std::fs::read(crate::checkout_path("models/smoke.onnx")).expect("models/smoke.onnx");
        let mut s = rt.session(&bytes).expect("session");
        assert_eq!(s.inputs()[0].name(), "features");
        let labels =
            predict_labels(&mut s, "features", vec![0.2, 0.0, 0.9, 0.0, 0.5, 7.0], 2).expect("run");
        assert_eq!(labels, vec![0, 1, 0]);
    }

    /// A forest exported by [`crate::onnx::export`] answers in ONNX Runtime what
    /// [`crate::onnx::TargetModel::predict`] answers in Rust, ties included (three trees voting
    /// three different classes; two trees voting two), on a target of four classes and on a
    /// two-class one written with a padding label.
    #[test]
    fn onnx_runtime_votes_a_forest_as_the_trainer_does() {
        use crate::onnx::{TargetModel, Tree, TreeNode, export};
        let split = |feature: usize, yes: usize, no: usize| Tree {
            nodes: vec![
                TreeNode::Branch {
                    feature,
                    threshold: 0.5,
                    yes: 1,
                    no: 2,
                },
                TreeNode::Leaf { class: yes },
                TreeNode::Leaf { class: no },
            ],
        };
        let models = vec![
            TargetModel {
                target: Target::BufferSize,
                trees: vec![split(0, 0, 1), split(1, 1, 2), Tree::constant(2)],
            },
            TargetModel {
                target: Target::Compression,
                trees: vec![split(0, 0, 1), split(1, 1, 0)],
            },
        ];
        let rt = Runtime::init(None).expect("ONNX Runtime (./dev sets ORT_DYLIB_PATH)");
        let bytes = export(&models, &Settings::default(), "v-forest");
        let m = LoadedModel::load(rt, "v-forest", &bytes).expect("load");
        let rows: Vec<Vec<f32>> = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
            .iter()
            .map(|(a, b)| {
                let mut r = vec![0.0; crate::feature_len()];
                r[0] = *a;
                r[1] = *b;
                r
            })
            .collect();
        let labels = m.labels(&rows).expect("run");
        for (i, t) in Target::ALL.iter().enumerate() {
            let Some(model) = models.iter().find(|m| m.target == *t) else {
                continue;
            };
            let rust: Vec<i64> = rows.iter().map(|r| model.predict(r) as i64).collect();
            assert_eq!(labels[i], rust, "{}", t.name());
        }
        let at = |t: Target| labels[Target::ALL.iter().position(|x| *x == t).unwrap()].clone();
        assert_eq!(at(Target::BufferSize), vec![0, 1, 2, 2]);
        assert_eq!(at(Target::Compression), vec![0, 1, 0, 0]);
    }
}
