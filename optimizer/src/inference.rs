//! ONNX Runtime, loaded dynamically: one environment per process, sessions from model bytes.
//!
//! `ort` panics on its first call when the shared library is missing, so [`Runtime::init`]
//! checks the path first and returns a clear error instead.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;

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
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/smoke.onnx"))
            .expect("models/smoke.onnx");
        let mut s = rt.session(&bytes).expect("session");
        assert_eq!(s.inputs()[0].name(), "features");
        let labels =
            predict_labels(&mut s, "features", vec![0.2, 0.0, 0.9, 0.0, 0.5, 7.0], 2).expect("run");
        assert_eq!(labels, vec![0, 1, 0]);
    }
}
