//! The model contract, and an ONNX writer for tree ensembles that honours it.
//!
//! A trimtab model is one ONNX graph:
//! - input `features`: `float32 [N, F]`, `F` = [`crate::feature_len`], encoded by
//!   [`crate::encode`];
//! - for every [`Target`] a `TreeEnsembleClassifier` (ai.onnx.ml) with outputs `<target>`
//!   (`int64 [N]`, the class index on the target's grid) and `<target>_probabilities`;
//! - metadata `trimtab.contract` = [`CONTRACT`] and `trimtab.schema_hash` =
//!   [`crate::schema_hash`], so a model trained on another feature encoding is refused.
//!
//! Two-class targets are written with a third, never-predicted class label: with exactly two
//! labels ONNX Runtime switches to its binary-classifier convention (one score per row), which
//! would change what `label` means. Any model with this contract is accepted, whoever wrote it
//! (the trainer, or a notebook through skl2onnx).
//!
//! The protobuf messages are the few of `onnx.proto` a tree ensemble needs, written with prost
//! (no protoc at build time).

use crate::settings::Target;

/// The contract tag in every model's metadata.
pub const CONTRACT: &str = "trimtab-model-v1";
/// Name of the input.
pub const INPUT: &str = "features";

/// A decision tree over the feature vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    /// Nodes; node 0 is the root.
    pub nodes: Vec<TreeNode>,
}

/// One node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TreeNode {
    /// `features[feature] <= threshold` goes to `yes`, else to `no`.
    Branch {
        /// Feature index.
        feature: usize,
        /// Threshold.
        threshold: f32,
        /// Node index when the test holds.
        yes: usize,
        /// Node index otherwise.
        no: usize,
    },
    /// A class (index on the target's grid).
    Leaf {
        /// Class index.
        class: usize,
    },
}

impl Tree {
    /// A tree that always answers `class`.
    pub fn constant(class: usize) -> Tree {
        Tree {
            nodes: vec![TreeNode::Leaf { class }],
        }
    }

    /// The class this tree gives a feature vector.
    pub fn predict(&self, x: &[f32]) -> usize {
        match self.nodes[self.leaf(x)] {
            TreeNode::Leaf { class } => class,
            TreeNode::Branch { .. } => unreachable!("leaf() ends at a leaf"),
        }
    }

    /// The index of the leaf a feature vector reaches.
    pub fn leaf(&self, x: &[f32]) -> usize {
        let mut i = 0;
        loop {
            match self.nodes[i] {
                TreeNode::Leaf { .. } => return i,
                TreeNode::Branch {
                    feature,
                    threshold,
                    yes,
                    no,
                } => i = if x[feature] <= threshold { yes } else { no },
            }
        }
    }
}

/// The trees of one target (a majority vote when there are several).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetModel {
    /// The target.
    pub target: Target,
    /// Its trees.
    pub trees: Vec<Tree>,
}

impl TargetModel {
    /// The class most of the trees answer for a feature vector; a tie goes to the lowest class,
    /// as ONNX Runtime's `TreeEnsembleClassifier` resolves it (every tree's leaf adds the same
    /// weight to its class, and the first class of the highest sum wins).
    pub fn predict(&self, x: &[f32]) -> usize {
        let mut votes = vec![0usize; self.target.classes().max(1)];
        for t in &self.trees {
            let c = t.predict(x).min(votes.len() - 1);
            votes[c] += 1;
        }
        let top = votes.iter().copied().max().unwrap_or(0);
        votes.iter().position(|v| *v == top).unwrap_or(0)
    }
}

/// Number of class labels written for a target (two-class targets get a padding label).
pub fn written_classes(t: Target) -> usize {
    t.classes().max(3)
}

mod pb {
    //! The subset of onnx.proto used here (field numbers as in onnx.proto).
    #![allow(missing_docs, missing_debug_implementations)]

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(string, tag = "2")]
        pub producer_name: String,
        #[prost(string, tag = "3")]
        pub producer_version: String,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(message, repeated, tag = "14")]
        pub metadata_props: Vec<StringStringEntryProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringStringEntryProto {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
        #[prost(string, tag = "7")]
        pub domain: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(bytes = "vec", tag = "4")]
        pub s: Vec<u8>,
        #[prost(float, repeated, tag = "7")]
        pub floats: Vec<f32>,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        #[prost(bytes = "vec", repeated, tag = "9")]
        pub strings: Vec<Vec<u8>>,
        #[prost(int32, tag = "20")]
        pub r#type: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TensorType>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorType {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(int64, optional, tag = "1")]
        pub dim_value: Option<i64>,
        #[prost(string, optional, tag = "2")]
        pub dim_param: Option<String>,
    }
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;
const ATTR_STRING: i32 = 3;
const ATTR_FLOATS: i32 = 6;
const ATTR_INTS: i32 = 7;
const ATTR_STRINGS: i32 = 8;

fn ints(name: &str, v: Vec<i64>) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        ints: v,
        r#type: ATTR_INTS,
        ..Default::default()
    }
}

fn floats(name: &str, v: Vec<f32>) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        floats: v,
        r#type: ATTR_FLOATS,
        ..Default::default()
    }
}

fn value_info(name: &str, elem: i32, dims: &[Option<i64>]) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            tensor_type: Some(pb::TensorType {
                elem_type: elem,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Some(v) => pb::Dimension {
                                dim_value: Some(*v),
                                dim_param: None,
                            },
                            None => pb::Dimension {
                                dim_value: None,
                                dim_param: Some("N".into()),
                            },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn ensemble_node(m: &TargetModel) -> pb::NodeProto {
    let classes = written_classes(m.target);
    let mut tree_ids = Vec::new();
    let mut node_ids = Vec::new();
    let mut features = Vec::new();
    let mut values = Vec::new();
    let mut modes = Vec::new();
    let mut yes_ids = Vec::new();
    let mut no_ids = Vec::new();
    let mut class_tree = Vec::new();
    let mut class_node = Vec::new();
    let mut class_id = Vec::new();
    let mut class_w = Vec::new();
    let weight = 1.0 / m.trees.len().max(1) as f32;
    for (t, tree) in m.trees.iter().enumerate() {
        for (n, node) in tree.nodes.iter().enumerate() {
            tree_ids.push(t as i64);
            node_ids.push(n as i64);
            match *node {
                TreeNode::Branch {
                    feature,
                    threshold,
                    yes,
                    no,
                } => {
                    features.push(feature as i64);
                    values.push(threshold);
                    modes.push(b"BRANCH_LEQ".to_vec());
                    yes_ids.push(yes as i64);
                    no_ids.push(no as i64);
                }
                TreeNode::Leaf { class } => {
                    features.push(0);
                    values.push(0.0);
                    modes.push(b"LEAF".to_vec());
                    yes_ids.push(0);
                    no_ids.push(0);
                    class_tree.push(t as i64);
                    class_node.push(n as i64);
                    class_id.push(class.min(classes - 1) as i64);
                    class_w.push(weight);
                }
            }
        }
    }
    let name = m.target.name();
    pb::NodeProto {
        input: vec![INPUT.into()],
        output: vec![name.into(), format!("{name}_probabilities")],
        name: format!("{name}_trees"),
        op_type: "TreeEnsembleClassifier".into(),
        domain: "ai.onnx.ml".into(),
        attribute: vec![
            ints("classlabels_int64s", (0..classes as i64).collect()),
            ints("nodes_treeids", tree_ids),
            ints("nodes_nodeids", node_ids),
            ints("nodes_featureids", features),
            floats("nodes_values", values),
            pb::AttributeProto {
                name: "nodes_modes".into(),
                strings: modes,
                r#type: ATTR_STRINGS,
                ..Default::default()
            },
            ints("nodes_truenodeids", yes_ids),
            ints("nodes_falsenodeids", no_ids),
            ints("class_treeids", class_tree),
            ints("class_nodeids", class_node),
            ints("class_ids", class_id),
            floats("class_weights", class_w),
            pb::AttributeProto {
                name: "post_transform".into(),
                s: b"NONE".to_vec(),
                r#type: ATTR_STRING,
                ..Default::default()
            },
        ],
    }
}

/// Write a model for every target (a target without trees gets a constant tree answering
/// `fallback`'s class) as ONNX bytes, tagged with `version`.
pub fn export(models: &[TargetModel], fallback: &crate::Settings, version: &str) -> Vec<u8> {
    use prost::Message as _;
    let f = crate::feature_len() as i64;
    let mut nodes = Vec::new();
    let mut outputs = Vec::new();
    for t in Target::ALL {
        let m = models
            .iter()
            .find(|m| m.target == t && !m.trees.is_empty())
            .cloned()
            .unwrap_or_else(|| TargetModel {
                target: t,
                trees: vec![Tree::constant(t.class_of(fallback))],
            });
        nodes.push(ensemble_node(&m));
        outputs.push(value_info(t.name(), INT64, &[None]));
        outputs.push(value_info(
            &format!("{}_probabilities", t.name()),
            FLOAT,
            &[None, Some(written_classes(t) as i64)],
        ));
    }
    let model = pb::ModelProto {
        ir_version: 8,
        producer_name: "trimtab".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(pb::GraphProto {
            node: nodes,
            name: "trimtab_settings".into(),
            input: vec![value_info(INPUT, FLOAT, &[None, Some(f)])],
            output: outputs,
        }),
        opset_import: vec![
            pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
            pb::OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 3,
            },
        ],
        metadata_props: vec![
            pb::StringStringEntryProto {
                key: "trimtab.contract".into(),
                value: CONTRACT.into(),
            },
            pb::StringStringEntryProto {
                key: "trimtab.schema_hash".into(),
                value: crate::schema_hash(),
            },
            pb::StringStringEntryProto {
                key: "trimtab.version".into(),
                value: version.into(),
            },
        ],
    };
    model.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_predict_by_threshold() {
        let t = Tree {
            nodes: vec![
                TreeNode::Branch {
                    feature: 1,
                    threshold: 0.5,
                    yes: 1,
                    no: 2,
                },
                TreeNode::Leaf { class: 0 },
                TreeNode::Leaf { class: 3 },
            ],
        };
        assert_eq!(t.predict(&[9.0, 0.5]), 0);
        assert_eq!(t.predict(&[9.0, 0.6]), 3);
    }

    #[test]
    fn export_writes_every_target_and_the_schema_hash() {
        let bytes = export(&[], &crate::Settings::default(), "v-test");
        assert!(bytes.len() > 100);
        let s = String::from_utf8_lossy(&bytes);
        for t in Target::ALL {
            assert!(s.contains(t.name()), "{}", t.name());
        }
        assert!(s.contains(&crate::schema_hash()));
        assert!(s.contains(CONTRACT));
    }
}
