"""Writes models/smoke.onnx: the smallest model that proves the ONNX Runtime path.

One decision tree (ai.onnx.ml TreeEnsembleClassifier) over two float features:
x0 <= 0.5 -> class 0; else x1 <= 5 -> class 1; else class 2. Three classes on purpose: with
exactly two, ONNX Runtime applies its binary-classifier convention (one score, weights of the
positive class only), which a real exporter must follow for two-class targets. The test suite loads it with `ort` (load-dynamic) and
checks both predictions. Regenerate with: pip install onnx && python models/make_smoke_model.py
"""
import onnx
from onnx import TensorProto, helper

node = helper.make_node(
    "TreeEnsembleClassifier",
    inputs=["features"],
    outputs=["label", "probabilities"],
    domain="ai.onnx.ml",
    classlabels_int64s=[0, 1, 2],
    nodes_treeids=[0, 0, 0, 0, 0],
    nodes_nodeids=[0, 1, 2, 3, 4],
    nodes_featureids=[0, 0, 1, 0, 0],
    nodes_values=[0.5, 0.0, 5.0, 0.0, 0.0],
    nodes_modes=["BRANCH_LEQ", "LEAF", "BRANCH_LEQ", "LEAF", "LEAF"],
    nodes_truenodeids=[1, 0, 3, 0, 0],
    nodes_falsenodeids=[2, 0, 4, 0, 0],
    class_treeids=[0, 0, 0],
    class_nodeids=[1, 3, 4],
    class_ids=[0, 1, 2],
    class_weights=[1.0, 1.0, 1.0],
    post_transform="NONE",
)
graph = helper.make_graph(
    [node],
    "trimtab_smoke",
    [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 2])],
    [
        helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3]),
    ],
)
model = helper.make_model(
    graph,
    opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    producer_name="trimtab",
)
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, __file__.replace("make_smoke_model.py", "smoke.onnx"))
