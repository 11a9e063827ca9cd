"""Small models with layers inside If and Loop bodies, for the control-flow tests of
quantize and fold-batchnorm (issue 14).

* :func:`if_cnn` — ``If(ReduceMax(x) > -1e30)`` whose two branches each hold a small CNN
  (Conv → BN → Relu → Conv → BN → Relu → GlobalAveragePool → Flatten → Gemm) reading the
  outer input ``x`` and the weights from the enclosing graph (as exporters write them);
  the branches differ (the else branch has its own weights), so a wrong branch is visible.
* :func:`loop_mlp` — ``Loop`` (3 iterations) carrying ``h`` [N, 16] with body
  ``h = Relu(MatMul(h, W) + b)``: a linear layer whose input is a loop-carried value.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _weights(rng: np.random.Generator, *shape: int, scale: float = 0.4) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _bn_arrays(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_b": rng.normal(0.3, 0.5, channels).astype(np.float32),
        f"{prefix}_m": rng.normal(0, 1, channels).astype(np.float32),
        f"{prefix}_v": rng.uniform(0.5, 2, channels).astype(np.float32),
    }


def _branch(tag: str, weights: str) -> onnx.GraphProto:
    """One branch: the CNN on the outer ``x`` with the outer weights ``{weights}_*``."""
    w = lambda name: f"{weights}_{name}"  # noqa: E731
    t = lambda name: f"{tag}_{name}"  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", w("w1"), w("b1")], [t("c1")], pads=[1, 1, 1, 1], name=t("conv1")),
        helper.make_node("BatchNormalization", [t("c1"), w("bn1_g"), w("bn1_b"), w("bn1_m"), w("bn1_v")], [t("n1")], epsilon=1e-3, name=t("bn1")),
        helper.make_node("Relu", [t("n1")], [t("r1")], name=t("relu1")),
        helper.make_node("Conv", [t("r1"), w("w2"), w("b2")], [t("c2")], pads=[1, 1, 1, 1], name=t("conv2")),
        helper.make_node("BatchNormalization", [t("c2"), w("bn2_g"), w("bn2_b"), w("bn2_m"), w("bn2_v")], [t("n2")], epsilon=1e-3, name=t("bn2")),
        helper.make_node("Relu", [t("n2")], [t("r2")], name=t("relu2")),
        helper.make_node("GlobalAveragePool", [t("r2")], [t("p")], name=t("pool")),
        helper.make_node("Flatten", [t("p")], [t("f")], name=t("flatten")),
        helper.make_node("Gemm", [t("f"), w("fc_w"), w("fc_b")], [t("y")], transB=1, name=t("fc")),
    ]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(t("y"), TensorProto.FLOAT, ["N", 10])])


def if_cnn(seed: int = 14) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"floor": np.array(-1e30, np.float32)}
    for weights in ("a", "b"):
        arrays |= {f"{weights}_w1": _weights(rng, 16, 3, 3, 3), f"{weights}_b1": _weights(rng, 16),
                   f"{weights}_w2": _weights(rng, 16, 16, 3, 3, scale=0.15), f"{weights}_b2": _weights(rng, 16),
                   f"{weights}_fc_w": _weights(rng, 10, 16), f"{weights}_fc_b": _weights(rng, 10)}
        arrays |= _bn_arrays(rng, f"{weights}_bn1", 16) | _bn_arrays(rng, f"{weights}_bn2", 16)
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0, name="max"),
        helper.make_node("Greater", ["m", "floor"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["y"], then_branch=_branch("then", "a"), else_branch=_branch("else", "b"), name="if"),
    ]
    graph = helper.make_graph(nodes, "if_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_mlp(seed: int = 15, iterations: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w"], ["mm"], name="body_matmul"),
            helper.make_node("Add", ["mm", "bias"], ["pre"], name="body_add"),
            helper.make_node("Relu", ["pre"], ["h_out"], name="body_relu"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", 16])],
    )
    arrays = {"w": _weights(rng, 16, 16, scale=0.3), "bias": _weights(rng, 16, scale=0.1),
              "trips": np.array(iterations, np.int64), "true": np.array(True)}
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body, name="loop")],
        "loop_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model
