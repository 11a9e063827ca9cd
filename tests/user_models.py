"""Small helper-built models with the quirks of models users bring from other exporters:
``-1`` dims (PaddlePaddle), symbolic dims, an op that fails on too-short random inputs,
repeated node names (checker-valid, refused by ORT)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, arrays: dict[str, np.ndarray], opset: int = 12) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "user_model", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="helper")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def minus_one_conv_model(batch: object = -1, spatial: object = -1) -> onnx.ModelProto:
    """Conv → BN → Relu on an input declared ``[batch, 3, spatial, spatial]`` (default ``-1``
    everywhere but the channels, as PaddlePaddle writes)."""
    rng = np.random.default_rng(3)
    arrays = {
        "w": (rng.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "b": rng.normal(0, 1, 4).astype(np.float32),
        "m": rng.normal(0, 1, 4).astype(np.float32),
        "v": rng.uniform(0.5, 2.0, 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["z"], name="bn"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, spatial, spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, spatial, spatial])],
        arrays,
        opset=11,
    )


REFLECT_PAD = 40


def reflect_pad_model() -> onnx.ModelProto:
    """A reflect Pad of ``REFLECT_PAD`` samples on a signal ``[N, T]``: fails in ORT when
    T ≤ REFLECT_PAD (as on the default random input), with an Identity for the passes."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="pad"),
        helper.make_node("Identity", ["p"], ["i"], name="identity"),
        helper.make_node("Relu", ["i"], ["y"], name="relu"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T_padded"])],
        {"pads": np.array([0, REFLECT_PAD, 0, REFLECT_PAD], np.int64)},
        opset=13,
    )


def duplicate_names_model(count: int = 15) -> onnx.ModelProto:
    """``count`` nodes all named ``F0::anon`` (Relu and Identity alternating, a final Neg),
    input ``[-1, 4]``."""
    nodes, previous = [], "x"
    for index in range(count - 1):
        op = "Identity" if index % 2 else "Relu"
        nodes.append(helper.make_node(op, [previous], [f"t{index}"], name="F0::anon"))
        previous = f"t{index}"
    nodes.append(helper.make_node("Neg", [previous], ["y"], name="F0::anon"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])],
        {},
        opset=13,
    )
