"""The bundled example model, so a new user can see onnxopt work with nothing of their own.

A small residual CNN as a PyTorch export would give it, with unfused BatchNormalization
nodes (one after the residual Add, which only the exact N&S folding removes), a residual Add, an Identity, a Dropout and a constant subgraph computing a Reshape
target — one thing for every pass of the default pipeline::

    x[1,3,16,16] ─ Conv ─ BN ─ Relu ─┬─ Conv ─ BN ─ Relu ─ Conv ─ BN ─ Add ─ BN ─ Relu ─ Identity
                                     └──────────── Conv 1×1 ────────┘
    ─ GlobalAveragePool ─ Reshape(Concat(Constant, Constant)) ─ Dropout ─ Gemm ─ logits[1,10]

The weights are drawn from a fixed seed, so the model is identical on every machine.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_OPSET = 17


def _conv_bn_parameters(rng: np.random.Generator, prefix: str, c_in: int, c_out: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array((rng.standard_normal((c_out, c_in, 3, 3)) * 0.3).astype(np.float32), f"{prefix}.conv.weight"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c_out).astype(np.float32), f"{prefix}.bn.weight"),
        numpy_helper.from_array(rng.normal(0, 0.3, c_out).astype(np.float32), f"{prefix}.bn.bias"),
        numpy_helper.from_array(rng.normal(0, 0.5, c_out).astype(np.float32), f"{prefix}.bn.running_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c_out).astype(np.float32), f"{prefix}.bn.running_var"),
    ]


def demo_model(seed: int = 0) -> onnx.ModelProto:
    """Build the example model (see the module docstring)."""
    rng = np.random.default_rng(seed)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv_bn(prefix: str, x: str, c_in: int, c_out: int) -> str:
        initializers.extend(_conv_bn_parameters(rng, prefix, c_in, c_out))
        nodes.append(helper.make_node("Conv", [x, f"{prefix}.conv.weight"], [f"{prefix}.conv_out"], name=f"{prefix}/conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"{prefix}.conv_out", f"{prefix}.bn.weight", f"{prefix}.bn.bias", f"{prefix}.bn.running_mean", f"{prefix}.bn.running_var"],
                [f"{prefix}.bn_out"],
                name=f"{prefix}/bn",
                epsilon=1e-5,
            )
        )
        return f"{prefix}.bn_out"

    stem = conv_bn("stem", "input", 3, 8)
    nodes.append(helper.make_node("Relu", [stem], ["stem.relu"], name="stem/relu"))
    branch = conv_bn("block.0", "stem.relu", 8, 8)
    nodes.append(helper.make_node("Relu", [branch], ["block.0.relu"], name="block.0/relu"))
    branch = conv_bn("block.1", "block.0.relu", 8, 8)
    initializers.append(numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "shortcut.weight"))
    nodes.append(helper.make_node("Conv", ["stem.relu", "shortcut.weight"], ["shortcut"], name="block/shortcut", kernel_shape=[1, 1]))
    nodes.append(helper.make_node("Add", [branch, "shortcut"], ["block.add"], name="block/add"))
    # A BN after the residual Add: no Conv directly before it, yet foldable backward into the
    # Convs of both branches (one of them takes the shift, the other only the scale).
    initializers.extend(_conv_bn_parameters(rng, "post", 8, 8)[1:])
    nodes.append(
        helper.make_node(
            "BatchNormalization",
            ["block.add", "post.bn.weight", "post.bn.bias", "post.bn.running_mean", "post.bn.running_var"],
            ["block.bn_out"],
            name="block/post_bn",
            epsilon=1e-5,
        )
    )
    nodes.append(helper.make_node("Relu", ["block.bn_out"], ["block.relu"], name="block/relu"))
    nodes.append(helper.make_node("Identity", ["block.relu"], ["features"], name="features/identity"))
    nodes.append(helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="head/pool"))
    nodes.append(helper.make_node("Constant", [], ["batch_dim"], name="head/batch_dim", value=numpy_helper.from_array(np.array([-1], np.int64))))
    nodes.append(helper.make_node("Constant", [], ["feature_dim"], name="head/feature_dim", value=numpy_helper.from_array(np.array([8], np.int64))))
    nodes.append(helper.make_node("Concat", ["batch_dim", "feature_dim"], ["flat_shape"], name="head/flat_shape", axis=0))
    nodes.append(helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="head/flatten"))
    nodes.append(helper.make_node("Dropout", ["flat"], ["dropped"], name="head/dropout"))
    initializers.append(numpy_helper.from_array((rng.standard_normal((10, 8)) * 0.5).astype(np.float32), "fc.weight"))
    initializers.append(numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["dropped", "fc.weight", "fc.bias"], ["logits"], name="head/fc", transB=1))

    graph = helper.make_graph(
        nodes,
        "onnxopt_demo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEMO_OPSET)], producer_name="onnxopt-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
