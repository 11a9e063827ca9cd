"""onnxopt.metrics: MACs, parameters and op counts, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnxopt.metrics import count_macs, count_parameters, measure
from tests.conftest import parse


def _macs(body: str, inputs: str, outputs: str, initializers: str = "") -> int:
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g ({inputs}) => ({outputs}) {initializers} {{
          {body}
        }}
        """
    )
    macs, unknown = count_macs(model)
    assert unknown == []
    return macs


@pytest.mark.parametrize(
    "body, inputs, outputs, expected",
    [
        # Conv 3->4, 3x3, 8x8 -> 6x6: N*Cout*Hout*Wout * Cin*kh*kw = 1*4*6*6 * 3*3*3
        ("y = Conv(x, w)", "float[1,3,8,8] x, float[4,3,3,3] w", "float[1,4,6,6] y", 1 * 4 * 6 * 6 * 3 * 3 * 3),
        # stride 2, batch 2: 8x8 -> 3x3
        ("y = Conv <strides = [2, 2]> (x, w)", "float[2,3,8,8] x, float[4,3,3,3] w", "float[2,4,3,3] y", 2 * 4 * 3 * 3 * 27),
        # grouped Conv: 4->8 channels in 2 groups, each output sees Cin/group = 2 channels
        (
            "y = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w)",
            "float[1,4,8,8] x, float[8,2,3,3] w",
            "float[1,8,8,8] y",
            1 * 8 * 8 * 8 * 2 * 3 * 3,
        ),
        # depthwise: one 3x3 filter per channel
        ("y = Conv <group = 6> (x, w)", "float[1,6,5,5] x, float[6,1,3,3] w", "float[1,6,3,3] y", 6 * 3 * 3 * 9),
        # ConvTranspose: every input element is multiplied by Cout/group * kh * kw weights
        (
            "y = ConvTranspose <strides = [2, 2]> (x, w)",
            "float[1,4,5,5] x, float[4,2,3,3] w",
            "float[1,2,11,11] y",
            1 * 4 * 5 * 5 * 2 * 3 * 3,
        ),
        # Gemm with transA: A is [K=5, M=3], B is [K=5, N=7] -> Y [3,7], K=5 MACs each
        ("y = Gemm <transA = 1> (a, b)", "float[5,3] a, float[5,7] b", "float[3,7] y", 3 * 7 * 5),
        ("y = Gemm <transB = 1> (a, b)", "float[3,5] a, float[7,5] b", "float[3,7] y", 3 * 7 * 5),
        # batched MatMul broadcasting a 2-D weight: [2,3,4,5] x [5,6] -> [2,3,4,6], K=5
        ("y = MatMul(a, b)", "float[2,3,4,5] a, float[5,6] b", "float[2,3,4,6] y", 2 * 3 * 4 * 6 * 5),
        # batched on both sides
        ("y = MatMul(a, b)", "float[2,4,5] a, float[2,5,6] b", "float[2,4,6] y", 2 * 4 * 6 * 5),
    ],
    ids=["conv", "conv-stride-batch", "grouped-conv", "depthwise", "conv-transpose", "gemm-transA", "gemm-transB", "matmul-batched", "matmul-both-batched"],
)
def test_macs_by_hand(body, inputs, outputs, expected):
    assert _macs(body, inputs, outputs) == expected


def test_symbolic_batch_counts_as_one_and_ops_add_up():
    macs = _macs(
        "h = MatMul(x, w1)\n          y = Gemm(h, w2)",
        "float[N,4] x, float[4,8] w1, float[8,2] w2",
        "float[N,2] y",
    )
    assert macs == 1 * 8 * 4 + 1 * 2 * 8


def test_measure_counts_parameters_and_ops():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,8,8] x) => (float[1,4,6,6] y) <float[4,3,3,3] w, float[4] b> {
          c = Constant <value = float[2] {1.0, 2.0}> ()
          s = Conv(x, w, b)
          y = Relu(s)
        }
        """,
        check=False,  # w and b are declared only; their values are added below
    )
    del model.graph.initializer[:]
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    )
    assert count_parameters(model) == 4 * 27 + 4 + 2
    metrics = measure(model)
    assert metrics.nodes == 3
    assert metrics.op_counts == {"Constant": 1, "Conv": 1, "Relu": 1}
    assert metrics.macs == 4 * 6 * 6 * 27
    assert metrics.size_bytes == model.ByteSize()
    assert metrics.to_dict()["op_counts"] == {"Constant": 1, "Conv": 1, "Relu": 1}


def test_minus_one_dims_never_give_negative_macs():
    """PaddlePaddle writes a dynamic batch as dim_value -1: per sample, not a negative count."""
    from onnx import TensorProto, helper

    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [conv], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4, 8, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    macs, unknown = count_macs(model)
    assert (macs, unknown) == (4 * 8 * 8 * 27, [])
    # a dynamic spatial dim written as -1 makes the count unknown, not negative
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -1
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = -1
    macs, unknown = count_macs(model)
    assert macs == 0 and len(unknown) == 1


def test_custom_ops_with_computing_bodies_are_listed_as_uncounted():
    from onnx import TensorProto, helper

    body = helper.make_function("ai.test", "MyConv", ["x", "w"], ["y"], [helper.make_node("Conv", ["x", "w"], ["y"])], [helper.make_opsetid("", 17)])
    node = helper.make_node("MyConv", ["x", "w"], ["y"], domain="ai.test", name="custom_conv")
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.test", 1)], functions=[body])
    macs, unknown = count_macs(model)
    assert macs == 0 and unknown == ["custom_conv (custom op)"]
