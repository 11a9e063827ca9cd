"""onnxopt.graph: the helpers every pass relies on (shared constants, names, rewiring)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt.graph import (
    NameFactory,
    export_model,
    import_graph,
    per_channel,
    replace_all_uses,
    set_constant_input,
    static_shape,
    unused_initializers,
)
from onnxopt.verify import run
from tests.conftest import initializers, parse

SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] a, float[2,3] b) <float[3] w = {1.0, 2.0, 3.0}> {
  a = Mul(x, w)
  b = Add(x, w)
}
"""

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def _node(graph: gs.Graph, op: str) -> gs.Node:
    (node,) = [n for n in graph.nodes if n.op == op]
    return node


def test_set_constant_input_copies_a_shared_initializer():
    model = parse(SHARED)
    graph = import_graph(model)
    mul, add = _node(graph, "Mul"), _node(graph, "Add")
    shared = mul.inputs[1]
    assert shared is add.inputs[1]

    fresh = set_constant_input(graph, mul, 1, np.array([10, 20, 30], np.float32), NameFactory(graph))

    assert fresh is not shared and fresh.name == "w_1"
    assert mul.inputs[1] is fresh and add.inputs[1] is shared
    np.testing.assert_array_equal(shared.values, [1, 2, 3])
    out = export_model(graph, model)
    assert initializers(out).keys() == {"w", "w_1"}
    result = run(out, {"x": X})
    np.testing.assert_allclose(result["a"], X * [10, 20, 30], rtol=1e-6)
    np.testing.assert_allclose(result["b"], X + [1, 2, 3], rtol=1e-6)


def test_set_constant_input_edits_an_exclusive_initializer_in_place():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] a) <float[3] w = {1.0, 2.0, 3.0}> {
          a = Mul(x, w)
        }
        """
    )
    graph = import_graph(model)
    mul = _node(graph, "Mul")
    original = mul.inputs[1]

    result = set_constant_input(graph, mul, 1, np.array([4, 5, 6], np.float32), NameFactory(graph))

    assert result is original and result.name == "w"
    out = export_model(graph, model)
    assert list(initializers(out)) == ["w"]
    np.testing.assert_array_equal(initializers(out)["w"], [4, 5, 6])
    np.testing.assert_allclose(run(out, {"x": X})["a"], X * [4, 5, 6], rtol=1e-6)
    # The caller's model is untouched.
    np.testing.assert_array_equal(initializers(model)["w"], [1, 2, 3])


def test_set_constant_input_copies_when_the_node_reads_the_constant_twice():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x) => (float[3] y) <float[3] w = {1.0, 2.0, 3.0}> {
          s = Add(w, w)
          y = Mul(x, s)
        }
        """
    )
    graph = import_graph(model)
    add = _node(graph, "Add")
    fresh = set_constant_input(graph, add, 1, np.array([0, 0, 0], np.float32), NameFactory(graph))
    assert add.inputs[0] is not fresh
    np.testing.assert_array_equal(add.inputs[0].values, [1, 2, 3])
    out = export_model(graph, model)
    np.testing.assert_allclose(run(out, {"x": np.ones(3, np.float32)})["y"], [1, 2, 3])


def test_set_constant_input_creates_a_missing_optional_input():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,2,3,3] x) => (float[1,2,1,1] y) <float[2,2,3,3] w = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0}> {
          y = Conv(x, w)
        }
        """
    )
    graph = import_graph(model)
    conv = _node(graph, "Conv")
    bias = set_constant_input(graph, conv, 2, np.array([0.5, -1], np.float32), NameFactory(graph), base_name="w")
    assert bias.name == "w_1" and conv.inputs[2] is bias
    out = export_model(graph, model)
    x = np.ones((1, 2, 3, 3), np.float32)
    np.testing.assert_allclose(run(out, {"x": x})["y"].ravel(), [18.5, 17.0], rtol=1e-6)


def test_name_factory_never_repeats_a_name():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) {
          y = If(c) <then_branch = t () => (float[2] inner) { inner = Neg(x) },
                     else_branch = e () => (float[2] other) { other = Abs(x) }>
        }
        """
    )
    graph = import_graph(model)
    graph.nodes[0].name = "the_if"
    names = NameFactory(graph)
    assert names.new("fresh") == "fresh"
    assert names.new("fresh") == "fresh_1"
    assert names.new("fresh") == "fresh_2"
    assert names.new("x") == "x_1"  # a graph input
    assert names.new("the_if") == "the_if_1"  # a node name
    assert names.new("inner") == "inner_1"  # a tensor of a subgraph
    generated = [names.new("y") for _ in range(50)]
    assert len(set(generated)) == 50 and "y" not in generated


def test_replace_all_uses_rewires_consumers_and_graph_outputs():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] a, float[2,3] b) <float[2,3] c> {
          a = Relu(x)
          b = Neg(a)
          c = Abs(x)
        }
        """,
        check=False,  # c is dead until rewired
    )
    graph = import_graph(model)
    relu, neg, abs_ = _node(graph, "Relu"), _node(graph, "Neg"), _node(graph, "Abs")
    old, new = relu.outputs[0], abs_.outputs[0]

    replace_all_uses(graph, old, new)

    assert neg.inputs[0] is new
    assert graph.outputs[0] is new
    assert old.outputs == [] and old not in graph.outputs
    out = export_model(graph.cleanup().toposort(), model)
    assert [o.name for o in out.graph.output] == ["c", "b"]
    assert "Relu" not in {n.op_type for n in out.graph.node}
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    result = run(out, {"x": x})
    np.testing.assert_array_equal(result["c"], np.abs(x))
    np.testing.assert_array_equal(result["b"], -np.abs(x))


def test_unused_initializers_sees_subgraph_reads():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) <float[2] inside = {1.0, 2.0}, float[2] nobody = {3.0, 4.0}> {
          y = If(c) <then_branch = t () => (float[2] p) { p = Add(x, inside) },
                     else_branch = e () => (float[2] q) { q = Neg(x) }>
        }
        """
    )
    assert unused_initializers(model, import_graph(model)) == ["nobody"]


def test_per_channel_and_static_shape():
    assert per_channel(np.arange(3), 1, 4).shape == (1, 3, 1, 1)
    assert per_channel(np.arange(3), 0, 2).shape == (3, 1)
    assert static_shape(gs.Variable("v", np.float32, [1, 3, 4])) == [1, 3, 4]
    assert static_shape(gs.Variable("v", np.float32, ["batch", 3])) is None
    assert static_shape(gs.Variable("v", np.float32, None)) is None


@pytest.mark.parametrize("template_opset", [13, 17])
def test_export_keeps_the_template_metadata(template_opset):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : {template_opset}, "com.example" : 1], producer_name: "me", model_version: 3>
        g (float[2] x) => (float[2] y) {{
          y = Relu(x)
        }}
        """
    )
    onnx_meta = model.metadata_props.add()
    onnx_meta.key, onnx_meta.value = "author", "test"
    out = export_model(import_graph(model), model)
    assert (out.ir_version, out.producer_name, out.model_version) == (8, "me", 3)
    assert {(o.domain, o.version) for o in out.opset_import} >= {("", template_opset), ("com.example", 1)}
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "test")]


def test_initializers_listed_as_graph_inputs_stay_inputs():
    """Old-style models list overridable initializers as inputs: optimizing keeps the interface."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import onnxopt

    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    optimized, report = onnxopt.optimize(model, passes=["eliminate-identity"], validate=True)
    assert report.passes[0].modified
    assert [i.name for i in optimized.graph.input] == ["x", "w"]
    assert "Identity" not in {n.op_type for n in optimized.graph.node}
    onnx.checker.check_model(optimized, full_check=True)


def test_inferred_shapes_are_not_shipped_in_the_output(demo):
    """Passes see inferred shapes, but the output keeps only the input's value_info (shipping
    the inferred ones changes which fusions ORT applies)."""
    import onnxopt

    assert not demo.graph.value_info
    optimized, report = onnxopt.optimize(demo)
    assert any(p.modified for p in report.passes)
    assert not optimized.graph.value_info


def test_inferred_shapes_on_the_skeleton_equal_full_inference():
    """Large initializers are stood in by typed inputs; small ones (a Reshape target) keep
    their data so data propagation still gives the reshaped dimensions."""
    import onnx

    from onnxopt.graph import with_inferred_shapes

    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((16, 8, 3, 3), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    full = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    fast = with_inferred_shapes(model)
    assert {v.name: v for v in fast.graph.value_info} == {v.name: v for v in full.graph.value_info}
    assert [d.dim_value for d in {v.name: v for v in fast.graph.value_info}["r"].type.tensor_type.shape.dim] == [1, 4, 400]
    assert len(fast.graph.initializer) == 2 and fast.graph.initializer[0].dims == [16, 8, 3, 3]
    assert not model.graph.value_info  # the input model is left alone


def test_import_makes_repeated_node_names_unique_and_keeps_empty_ones():
    import onnx

    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
          a = Relu(x)
          b = Neg(a)
          c = Abs(b)
          d = Relu(c)
          y = Neg(d)
        }
        """
    )
    for node, name in zip(model.graph.node, ["n", "n", "n__2", "", "n"]):
        node.name = name
    graph = import_graph(model)
    assert [node.name for node in graph.nodes] == ["n", "n__3", "n__2", "", "n__4"]
    assert [node.name for node in model.graph.node] == ["n", "n", "n__2", "", "n"]  # the caller's copy is untouched
    exported = export_model(graph, model)
    onnx.checker.check_model(exported, full_check=True)


def _if_model_sharing_a_weight(main_reads_it: bool) -> "onnx.ModelProto":
    """y = MatMul(If(cond, then: 2·(x@W), else: -(x@W)), W) (or y = b + x): W (256×256) is
    an outer initializer read by both branches (outer scope) and maybe by the main graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    out_info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 256])  # noqa: E731
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0))),
            helper.make_node("MatMul", ["x", "W"], ["t0"]),
            helper.make_node("Mul", ["t0", "two"], ["t_out"]),
        ],
        "then",
        [],
        [out_info("t_out")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["e0"]), helper.make_node("Neg", ["e0"], ["e_out"])],
        "else",
        [],
        [out_info("e_out")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["b"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("MatMul", ["b", "W"], ["y"]) if main_reads_it else helper.make_node("Add", ["b", "x"], ["y"]),
        ],
        "g",
        [out_info("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [out_info("y")],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _ir3_conv_bn_model():
    """An IR-3 model in the old style: every initializer is also a graph input; a Constant
    node feeds a Reshape (folding it makes a new initializer), a BN follows the Conv (folding
    it removes its four initializers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    arrays = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "beta": rng.standard_normal(4).astype(np.float32),
        "mean": rng.standard_normal(4).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 4).astype(np.float32),
    }
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape_value")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Reshape", ["b", "shape"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in arrays.items()]
    graph = helper.make_graph(
        nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        initializer=[numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def _constant_payloads(graph) -> list[tuple[str, int]]:
    """(name, bytes) of every initializer and Constant-node value, bodies included."""
    from onnx import AttributeProto, numpy_helper

    found = [(t.name, numpy_helper.to_array(t).nbytes) for t in graph.initializer]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                found.append((node.output[0], numpy_helper.to_array(attribute.t).nbytes))
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                found += _constant_payloads(body)
    return found


@pytest.mark.parametrize("main_reads_it", [True, False])
def test_if_branches_reading_an_outer_weight_do_not_get_a_copy_of_it(main_reads_it):
    import onnx

    from onnxopt import optimize

    model = _if_model_sharing_a_weight(main_reads_it)
    out, _ = optimize(model)
    onnx.checker.check_model(out, full_check=True)
    payloads = _constant_payloads(out.graph)
    assert [name for name, size in payloads if size == 256 * 256 * 4] == ["W"]
    assert sum(size for _, size in payloads) == 256 * 256 * 4 + 4  # W and the Constant 2.0
    assert len(out.SerializeToString()) <= len(model.SerializeToString()) + 100
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(out, feeds)["y"], run(model, feeds)["y"], rtol=1e-6, atol=1e-5)


def test_ir3_export_lists_every_initializer_as_an_input_and_drops_removed_ones():
    """Below IR 4 every initializer must be a graph input: the folded Constant's new
    initializer is listed (with its type and shape), the BN's removed ones are not."""
    import onnx

    import onnxopt

    model = _ir3_conv_bn_model()
    optimized, report = onnxopt.optimize(model)
    assert {"BatchNormalization", "Constant"}.isdisjoint(n.op_type for n in optimized.graph.node)
    assert optimized.ir_version == 3
    onnx.checker.check_model(optimized, full_check=True)
    declared = {i.name: i for i in optimized.graph.input}
    stored = {t.name: t for t in optimized.graph.initializer}
    assert set(declared) == {"x"} | set(stored)
    assert not {"gamma", "beta", "mean", "var"} & set(declared)
    for name, tensor in stored.items():
        tensor_type = declared[name].type.tensor_type
        assert tensor_type.elem_type == tensor.data_type
        assert [d.dim_value for d in tensor_type.shape.dim] == list(tensor.dims)
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(optimized, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


#: IR-3 conformance models whose optimized output failed onnx.checker ("in initializer but
#: not in graph input"): a folded Constant became an initializer (the light models generate
#: their weights with Constant nodes); the fast ones of the twelve.
IR3_CASES = [
    "pytorch-converted/test_PixelShuffle/model.onnx",
    "pytorch-operator/test_operator_repeat/model.onnx",
    "pytorch-operator/test_operator_repeat_dim_overflow/model.onnx",
    "light/light_zfnet512.onnx",
    "light/light_squeezenet.onnx",
]


def _conformance_case(relative: str):
    """(model path, feeds, expected outputs) of an onnx backend test: ``test_data_set_0``
    next to ``model.onnx``, or for a light model the inputs onnx's runner generates
    (``arange(n) / n``) and ``<name>_output_0.pb``."""
    import glob
    import os

    import onnx
    from onnx import numpy_helper

    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    path = os.path.join(root, relative)
    model = onnx.load(path)
    initializers_ = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers_]
    load = lambda file: numpy_helper.to_array(onnx.load_tensor(file))  # noqa: E731
    if relative.startswith("light/"):
        feeds = {}
        for info in inputs:
            shape = tuple(d.dim_value or 1 for d in info.type.tensor_type.shape.dim)
            count = int(np.prod(shape))
            feeds[info.name] = (np.arange(count).reshape(shape) / count).astype(np.float32)
        expected = [load(path[: -len(".onnx")] + "_output_0.pb")]
    else:
        data = os.path.join(os.path.dirname(path), "test_data_set_0")
        feeds = {info.name: load(os.path.join(data, f"input_{k}.pb")) for k, info in enumerate(inputs)}
        expected = [load(file) for file in sorted(glob.glob(os.path.join(data, "output_*.pb")))]
    return path, model, feeds, expected


@pytest.mark.parametrize("relative", IR3_CASES)
def test_ir3_conformance_models_stay_valid_and_exact(relative):
    import onnx

    import onnxopt

    path, model, feeds, expected = _conformance_case(relative)
    assert model.ir_version == 3
    optimized, report = onnxopt.optimize(path)
    assert any(p.modified for p in report.passes)
    assert optimized.ir_version == 3
    onnx.checker.check_model(optimized, full_check=True)
    assert {t.name for t in optimized.graph.initializer} <= {i.name for i in optimized.graph.input}
    outputs = run(optimized, feeds)
    assert len(outputs) == len(expected)
    for output, reference in zip((outputs[o.name] for o in optimized.graph.output), expected):
        np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-6)
