//! Models: validated against `tuning`'s contract before they are accepted, run with ONNX
//! Runtime (`tuning::runtime`, shared with the trainer).

pub use tuning::runtime::{LoadedModel, probe_contexts};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tuning::onnx::{TargetModel, Tree, TreeNode, export};
    use tuning::runtime::Runtime;
    use tuning::{ContextAggregates, Settings, Target};

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
        let smoke = std::fs::read(tuning::checkout_path("models/smoke.onnx")).unwrap();
        let e = LoadedModel::load(rt, "smoke", &smoke).unwrap_err();
        assert!(e.to_string().contains("input \"features\" must be"), "{e}");
        let e = LoadedModel::load(rt, "junk", b"not onnx").unwrap_err();
        assert!(e.to_string().starts_with("model rejected"), "{e}");
    }
}
