"""fold-conv-bn: the adjacent Conv → BatchNormalization fold, and every hazard it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import assert_equivalent, initializers, ops, run_passes

EPS = 1e-3


def bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    gamma = rng.uniform(0.5, 1.5, channels)
    gamma[0] = 0.0  # a dead channel: s = 0 must fold exactly too
    return {
        f"{prefix}.scale": gamma.astype(np.float32),
        f"{prefix}.bias": rng.normal(0, 0.5, channels).astype(np.float32),
        f"{prefix}.mean": rng.normal(0, 0.5, channels).astype(np.float32),
        f"{prefix}.var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def build(
    *,
    c_in: int = 3,
    c_out: int = 4,
    group: int = 1,
    bias: bool = True,
    weight_as_input: bool = False,
    extra_nodes: list[onnx.NodeProto] = (),
    extra_outputs: list[onnx.ValueInfoProto] = (),
    bn_attrs: dict | None = None,
    bn_outputs: tuple[str, ...] = ("y",),
    seed: int = 0,
) -> onnx.ModelProto:
    """x[1,c_in,8,8] ── Conv(w[, b]) ── conv_out ── BatchNormalization ── y."""
    rng = np.random.default_rng(seed)
    arrays = {"w": (rng.standard_normal((c_out, c_in // group, 3, 3)) * 0.5).astype(np.float32)}
    if bias:
        arrays["b"] = rng.normal(0, 0.3, c_out).astype(np.float32)
    arrays.update(bn_params(rng, c_out))
    conv_inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", group=group, pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["conv_out", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            list(bn_outputs),
            name="bn",
            epsilon=EPS,
            **(bn_attrs or {}),
        ),
        *extra_nodes,
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(arrays.pop("w").shape)))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 8, 8])]
    for extra in bn_outputs[1:]:
        outputs.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, [c_out]))
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        inputs,
        outputs + list(extra_outputs),
        initializer=[numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def fold(model: onnx.ModelProto):
    out, report = run_passes(model, "fold-conv-bn")
    return out, report.passes[0]


def expected_fold(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """W' = s·W per output channel, b' = s·b + β − s·μ with s = γ/√(v+ε), in float64."""
    p = {k: v.astype(np.float64) for k, v in initializers(model).items()}
    s = p["bn.scale"] / np.sqrt(p["bn.var"] + EPS)
    b = p.get("b", np.zeros_like(s))
    return p["w"] * s[:, None, None, None], s * b + p["bn.bias"] - s * p["bn.mean"]


def conv_node(model: onnx.ModelProto, name: str = "conv") -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.name == name]
    return node


def assert_refused(model: onnx.ModelProto, reason: str) -> None:
    out, entry = fold(model)
    assert ops(out) == ops(model)
    assert not entry.modified
    assert entry.stats == {"bn_folded": 0, "bn_kept": 1}
    assert [(r.subject, r.reason) for r in entry.refusals] == [("BN bn", reason)]


# --------------------------------------------------------------------------- folds
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"c_in": 4, "c_out": 6, "group": 2}, {"c_in": 4, "c_out": 4, "group": 4}],
    ids=["conv-with-bias", "conv-without-bias", "grouped", "depthwise"],
)
def test_fold(kwargs):
    model = build(**kwargs)
    out, entry = fold(model)
    assert ops(out) == {"Conv": 1}
    assert entry.stats == {"bn_folded": 1, "bn_kept": 0} and entry.refusals == []
    conv = conv_node(out)
    assert len(conv.input) == 3, "the folded Conv needs a bias"
    assert list(conv.output) == ["y"]
    values = initializers(out)
    weight, bias = expected_fold(model)
    np.testing.assert_allclose(values[conv.input[1]], weight, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(values[conv.input[2]], bias, rtol=1e-6, atol=1e-7)
    assert values[conv.input[1]].dtype == np.float32 and values[conv.input[2]].dtype == np.float32
    assert not any(name.startswith("bn.") for name in values)
    assert_equivalent(model, out)


def test_bias_is_created_with_a_fresh_name():
    model = build(bias=False)
    out, _ = fold(model)
    assert list(conv_node(out).input) == ["x", "w", "conv_bias"]


def test_shared_weight_is_copied_and_the_other_conv_unchanged():
    other = helper.make_node("Conv", ["x", "w", "b"], ["other_out"], name="other", pads=[1, 1, 1, 1])
    model = build(extra_nodes=[other], extra_outputs=[helper.make_tensor_value_info("other_out", TensorProto.FLOAT, [1, 4, 8, 8])])
    out, entry = fold(model)
    assert ops(out) == {"Conv": 2} and entry.stats["bn_folded"] == 1
    folded, untouched = conv_node(out, "conv"), conv_node(out, "other")
    assert list(untouched.input) == ["x", "w", "b"]
    assert folded.input[1] not in ("w",) and folded.input[2] not in ("b",)
    values, original = initializers(out), initializers(model)
    np.testing.assert_array_equal(values["w"], original["w"])
    np.testing.assert_array_equal(values["b"], original["b"])
    weight, bias = expected_fold(model)
    np.testing.assert_allclose(values[folded.input[1]], weight, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(values[folded.input[2]], bias, rtol=1e-6, atol=1e-7)
    assert_equivalent(model, out)  # both outputs: y folded, other_out untouched


def test_one_bn_folded_and_one_refused():
    relu = helper.make_node("Relu", ["y"], ["r"], name="relu")
    bn2 = helper.make_node("BatchNormalization", ["r", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["z"], name="bn2")
    model = build(extra_nodes=[relu, bn2], extra_outputs=[helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])])
    out, entry = fold(model)
    assert ops(out) == {"Conv": 1, "Relu": 1, "BatchNormalization": 1}
    assert entry.stats == {"bn_folded": 1, "bn_kept": 1}
    assert [(r.subject, r.reason) for r in entry.refusals] == [("BN bn2", "input is not produced by a Conv (Relu)")]
    # bn2 still reads the original (shared) parameters.
    (kept,) = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert list(kept.input[1:]) == ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    assert_equivalent(model, out)


# --------------------------------------------------------------------------- refusals
def test_conv_output_read_by_another_node_is_refused():
    relu = helper.make_node("Relu", ["conv_out"], ["side"], name="relu")
    model = build(extra_nodes=[relu], extra_outputs=[helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 8, 8])])
    assert_refused(model, "Conv conv output is also read by relu")


def test_conv_output_that_is_a_graph_output_is_refused():
    model = build(extra_outputs=[helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [1, 4, 8, 8])])
    assert_refused(model, "Conv conv output is also a graph output")


def test_training_mode_bn_is_refused():
    model = build(bn_attrs={"training_mode": 1}, bn_outputs=("y", "running_mean", "running_var"))
    assert_refused(model, "BatchNormalization is in training mode")


def test_conv_weight_that_is_a_graph_input_is_refused():
    model = build(weight_as_input=True)
    assert_refused(model, "Conv conv weight is not an initializer")
    out, _ = fold(model)
    assert [i.name for i in out.graph.input] == ["x", "w"]
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert_equivalent(model, out, inputs={"x": x, "w": w})


def test_conv_bias_that_is_a_graph_input_is_refused():
    model = build()
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "b"][0])
    assert_refused(model, "Conv conv bias is not an initializer")


def test_bn_parameter_that_is_a_graph_input_is_refused():
    model = build()
    model.graph.input.append(helper.make_tensor_value_info("bn.var", TensorProto.FLOAT, [4]))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "bn.var"][0])
    assert_refused(model, "BN var is not an initializer")


@pytest.mark.parametrize("producer", ["Relu", "ConvTranspose"])
def test_bn_after_a_non_conv_is_refused(producer):
    model = build()
    conv = conv_node(model)
    if producer == "Relu":
        conv.op_type = "Relu"
        del conv.input[1:]
        del conv.attribute[:]
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
        for name in ("bn.scale", "bn.bias", "bn.mean", "bn.var"):
            (t,) = [t for t in model.graph.initializer if t.name == name]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:3], name))
    else:
        conv.op_type = "ConvTranspose"
        (w,) = [t for t in model.graph.initializer if t.name == "w"]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).transpose(1, 0, 2, 3).copy(), "w"))
    onnx.checker.check_model(model, full_check=True)
    assert_refused(model, f"input is not produced by a Conv ({producer})")
    out, _ = fold(model)
    assert_equivalent(model, out)


def test_bn_on_a_graph_input_is_refused():
    model = build()
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][0]
    bn.input[0] = "x"
    model.graph.node.remove(conv_node(model))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "w"][0])
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "b"][0])
    onnx.checker.check_model(model, full_check=True)
    assert_refused(model, "input is not produced by a Conv (graph input)")
