//! Models: validated against `tuning`'s contract before they are accepted, run with ONNX Runtime.

use std::sync::Mutex;

use ort::session::Session;
use tuning::onnx::{CONTRACT, INPUT};
use tuning::{ConnectionContext, ContextAggregates, Settings, Target};

use crate::inference::{InferenceError, Runtime};

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
        let width = tuning::feature_len();
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
        let want = tuning::schema_hash();
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
            .map(|c| tuning::encode(c, &ContextAggregates::default()))
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
        let labels = self.labels(&[tuning::encode(ctx, agg)])?;
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
    use tuning::{ClientClass, Protocol};
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
pub(crate) mod tests {
    use super::*;
    use tuning::onnx::{TargetModel, Tree, TreeNode, export};

    /// A hand-made model: deflate offered → compression on and frame_aware; browsers get 64 KiB
    /// buffers. Used to check the export and the runtime agree.
    pub(crate) fn rule_model() -> Vec<u8> {
        let names = tuning::feature_names();
        let at = |n: &str| names.iter().position(|x| x == n).unwrap();
        let split = |f: usize, no: usize, yes: usize| Tree {
            nodes: vec![
                TreeNode::Branch {
                    feature: f,
                    threshold: 0.5,
                    yes: 1,
                    no: 2,
                },
                TreeNode::Leaf { class: no },
                TreeNode::Leaf { class: yes },
            ],
        };
        export(
            &[
                TargetModel {
                    target: Target::Compression,
                    trees: vec![split(at("offers_deflate"), 0, 1)],
                },
                TargetModel {
                    target: Target::Mode,
                    trees: vec![split(at("offers_deflate"), 0, 1)],
                },
                TargetModel {
                    target: Target::BufferSize,
                    trees: vec![split(at("class_browser"), 1, 2)],
                },
            ],
            &Settings::default(),
            "rule-1",
        )
    }

    #[test]
    fn exported_trees_run_in_onnx_runtime_and_agree_with_rust() {
        let rt = Runtime::init(None).expect("ONNX Runtime (./dev sets ORT_DYLIB_PATH)");
        let m = LoadedModel::load(rt, "rule-1", &rule_model()).expect("valid model");
        let mut deflate = probe_contexts()[0].clone();
        deflate.offers_deflate = true;
        deflate.client_class = tuning::ClientClass::Browser;
        let (s, clamped) = m
            .settings(&deflate, &ContextAggregates::default(), Settings::default())
            .unwrap();
        assert_eq!(clamped, 0);
        assert!(s.compression);
        assert_eq!(s.mode, tuning::Mode::FrameAware);
        assert_eq!(s.buffer_size, 65536);
        assert_eq!(s.idle_timeout, Settings::default().idle_timeout);
        let mut plain = deflate.clone();
        plain.offers_deflate = false;
        plain.client_class = tuning::ClientClass::Server;
        let (s, _) = m
            .settings(&plain, &ContextAggregates::default(), Settings::default())
            .unwrap();
        assert!(!s.compression);
        assert_eq!(s.mode, tuning::Mode::ZeroCopy);
        assert_eq!(s.buffer_size, 16384);
    }

    #[test]
    fn a_model_for_another_feature_schema_is_refused() {
        let rt = Runtime::init(None).expect("ONNX Runtime");
        let smoke =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/smoke.onnx")).unwrap();
        let e = LoadedModel::load(rt, "smoke", &smoke).unwrap_err();
        assert!(e.to_string().contains("input \"features\" must be"), "{e}");
        let e = LoadedModel::load(rt, "junk", b"not onnx").unwrap_err();
        assert!(e.to_string().starts_with("model rejected"), "{e}");
    }
}
