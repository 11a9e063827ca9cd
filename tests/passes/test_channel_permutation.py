"""channel_permutation: a random permutation of a channel group leaves the model's outputs
unchanged (ORT, graph optimizations disabled), on small text-format graphs covering every
supported form and on zoo models (float after the default preset, and W8A8 quantized);
the group structure of MobileNetV2; every refusal carries its reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.graph import cleanup, export_model, import_graph, with_inferred_shapes
from onnxopt.verify import run
from onnxopt.passes.common.channel_permutation import ChannelGroup, PermutationRefused, channel_group, permute
from tests.conftest import assert_equivalent, text_model

RNG = np.random.default_rng(7)


def weights(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.4).astype(np.float32)


def graph_of(model: onnx.ModelProto) -> gs.Graph:
    return import_graph(with_inferred_shapes(model))


def node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def names(nodes: list[gs.Node]) -> list[str]:
    return sorted(n.name for n in nodes)


def permuted(model: onnx.ModelProto, graph: gs.Graph, groups: list[ChannelGroup], seed: int = 0) -> onnx.ModelProto:
    """Apply a random non-identity permutation to each group and export."""
    rng = np.random.default_rng(seed)
    for group in groups:
        order = rng.permutation(group.channels)
        while group.channels > 1 and np.array_equal(order, np.arange(group.channels)):
            order = rng.permutation(group.channels)
        permute(graph, group, order)
    result = export_model(cleanup(graph), model)
    onnx.checker.check_model(result, full_check=True)
    return result


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# --------------------------------------------------------------------------- small graphs
def every_form_model() -> onnx.ModelProto:
    """Conv → Relu → Mul[C,1,1] → depthwise Conv → Add(residual) → per-channel Q/DQ (shared
    scale) → GlobalAveragePool → Flatten → Gemm(transB=0) → Add[C] → MatMul → output."""
    body = [
        "a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)",
        "r = Relu (a)",
        "s = Mul (r, k)",
        "d = Conv <group = 8, pads = [1, 1, 1, 1]> (s, wd, bd)",
        "e = Add (d, s)",
        "q = QuantizeLinear <axis = 1> (e, qs, qz)",
        "dq = DequantizeLinear <axis = 1> (q, qs, qz)",
        "p = GlobalAveragePool (dq)",
        "f = Flatten (p)",
        "g = Gemm <transB = 0> (f, wg, bg)",
        "h = Add (g, c6)",
        "y = MatMul (h, wm)",
    ]
    arrays = {
        "w1": weights(8, 3, 3, 3), "b1": weights(8), "k": weights(8, 1, 1), "wd": weights(8, 1, 3, 3), "bd": weights(8),
        "qs": np.linspace(0.01, 0.03, 8).astype(np.float32), "qz": np.arange(8).astype(np.uint8) + 120,
        "wg": weights(8, 6), "bg": weights(6), "c6": weights(6), "wm": weights(6, 5),
    }  # fmt: skip
    model = text_model("(float[1, 3, 8, 8] x) => (float[1, 5] y)", body, arrays)
    model.graph.node[0].name, model.graph.node[9].name = "conv", "gemm"
    return model


def test_every_supported_form_keeps_the_outputs():
    model = every_form_model()
    graph = graph_of(model)
    conv_group = channel_group(graph, node(graph, "conv"))
    gemm_group = channel_group(graph, node(graph, "gemm"))
    assert conv_group.channels == 8 and gemm_group.channels == 6
    passthrough = ["Relu", "Mul", "Conv", "Add", "QuantizeLinear", "DequantizeLinear", "GlobalAveragePool", "Flatten"]
    assert [n.op for n in conv_group.passthrough] == passthrough
    assert [n.op for n in conv_group.consumers] == ["Gemm"] and [n.op for n in gemm_group.consumers] == ["MatMul"]
    assert {n.op for n in gemm_group.passthrough} == {"Add"}
    result = permuted(model, graph, [conv_group, gemm_group])
    assert_equivalent(model, result)
    assert not np.array_equal(initializer(result, "w1"), initializer(model, "w1"))  # the rewrite did something


def test_order_semantics_new_channel_i_is_old_order_i():
    model = every_form_model()
    graph = graph_of(model)
    group = channel_group(graph, node(graph, "conv"))
    order = np.roll(np.arange(8), 3)
    permute(graph, group, order)
    result = export_model(cleanup(graph), model)
    np.testing.assert_array_equal(initializer(result, "w1"), initializer(model, "w1")[order])
    np.testing.assert_array_equal(initializer(result, "wg"), initializer(model, "wg")[order])
    with pytest.raises(ValueError, match="permutation"):
        permute(graph, group, np.zeros(8, dtype=np.int64))


def test_shared_dequantized_weight_is_copied_for_the_rewrite():
    """Two Convs read one DequantizeLinear weight; only the first one's group is permuted,
    so the DequantizeLinear (and its codes and per-channel scale) is cloned for it."""
    body = [
        "w = DequantizeLinear <axis = 0> (codes, scale, zero)",
        "a = Conv (x, w)",
        "b = Conv (x, w)",
        "r = Relu (a)",
        "c = Conv (r, w2)",
        "y = Add (c, b)",
    ]
    arrays = {
        "codes": RNG.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8),
        "scale": np.linspace(0.01, 0.04, 4).astype(np.float32),
        "zero": np.zeros(4, np.int8),
        "w2": weights(4, 4, 1, 1),
    }
    model = text_model("(float[1, 4, 5, 5] x) => (float[1, 4, 5, 5] y)", body, arrays)
    model.graph.node[1].name = "first"
    graph = graph_of(model)
    group = channel_group(graph, node(graph, "first"))
    assert names(group.producers) == ["first"] and [n.op for n in group.consumers] == ["Conv"]
    result = permuted(model, graph, [group])
    assert_equivalent(model, result)
    assert sum(n.op_type == "DequantizeLinear" for n in result.graph.node) == 2
    np.testing.assert_array_equal(initializer(result, "codes"), arrays["codes"])  # the other Conv's weight


def test_layer_that_reads_and_writes_the_group_is_permuted_on_both_axes():
    """x → Conv₁ → s; s + Conv₂(Relu(s)): Conv₂ is consumer and producer of one group."""
    body = ["s = Conv (x, w1)", "r = Relu (s)", "t = Conv (r, w2, b2)", "u = Add (s, t)", "y = Conv (u, w3)"]
    arrays = {"w1": weights(6, 3, 1, 1), "w2": weights(6, 6, 1, 1), "b2": weights(6), "w3": weights(2, 6, 1, 1)}
    model = text_model("(float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y)", body, arrays)
    model.graph.node[0].name, model.graph.node[2].name = "first", "inner"
    graph = graph_of(model)
    group = channel_group(graph, node(graph, "first"))
    assert names(group.producers) == ["first", "inner"]
    assert "inner" in names(group.consumers)
    assert_equivalent(model, permuted(model, graph, [group]))


def test_matmul_and_gemm_layouts_with_dequantized_bias():
    """Channels on the last axis: MatMul [1, T, 6]·[6, 8] → Add [8] → Relu → Gemm consumer
    after Reshape to [T, 8]; a Gemm producer (transB = 1) with an int32 DequantizeLinear
    bias and per-channel weight scale feeds a MatMul consumer."""
    body = [
        "m = MatMul (x, wm)",
        "a = Add (m, bm)",
        "r = Relu (a)",
        "f = Reshape (r, shape)",
        "w = DequantizeLinear <axis = 0> (codes, scale, zero)",
        "b = DequantizeLinear <axis = 0> (bcodes, bscale)",
        "g = Gemm <transB = 1> (f, w, b)",
        "h = Sigmoid (g)",
        "y = MatMul (h, wo)",
    ]
    arrays = {
        "wm": weights(6, 8), "bm": weights(8), "shape": np.array([4, 8]),
        "codes": RNG.integers(-127, 128, (5, 8)).astype(np.int8), "scale": np.linspace(0.01, 0.05, 5).astype(np.float32),
        "zero": np.zeros(5, np.int8), "bcodes": RNG.integers(-999, 999, 5).astype(np.int32),
        "bscale": np.linspace(1e-4, 5e-4, 5).astype(np.float32), "wo": weights(5, 3),
    }  # fmt: skip
    model = text_model("(float[1, 4, 6] x) => (float[4, 3] y)", body, arrays)
    model.graph.node[0].name, model.graph.node[6].name = "matmul", "gemm"
    graph = graph_of(model)
    first, second = channel_group(graph, node(graph, "matmul")), channel_group(graph, node(graph, "gemm"))
    assert first.axes["m"] == 2 and first.axes["f"] == 1
    assert [n.op for n in first.consumers] == ["Gemm"] and [n.op for n in second.consumers] == ["MatMul"]
    assert_equivalent(model, permuted(model, graph, [first, second]))


REFUSALS = {
    "concat on channels": (
        ["a = Conv (x, w1)", "c = Concat <axis = 1> (a, x)", "y = Conv (c, w2)"],
        {"w1": weights(4, 3, 1, 1), "w2": weights(2, 7, 1, 1)},
        "(float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y)",
        "Concat .* channel axis",
    ),
    "grouped conv": (
        ["a = Conv (x, w1)", "y = Conv <group = 2> (a, w2)"],
        {"w1": weights(4, 3, 1, 1), "w2": weights(4, 2, 1, 1)},
        "(float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y)",
        "grouped Conv \\(group=2",
    ),
    "graph output": (
        ["a = Conv (x, w1)", "y = Relu (a)"],
        {"w1": weights(4, 3, 1, 1)},
        "(float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y)",
        "y is a graph output",
    ),
    "slice on channels": (
        ["a = Conv (x, w1)", "s = Slice (a, st, en, ax)", "y = Conv (s, w2)"],
        {"w1": weights(4, 3, 1, 1), "w2": weights(2, 2, 1, 1), "st": np.array([0]), "en": np.array([2]), "ax": np.array([1])},
        "(float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y)",
        "slices the channel axis",
    ),
    "pad on channels": (
        ["a = Conv (x, w1)", "p = Pad (a, pads)", "y = Conv (p, w2)"],
        {"w1": weights(4, 3, 1, 1), "w2": weights(2, 6, 1, 1), "pads": np.array([0, 1, 0, 0, 0, 1, 0, 0])},
        "(float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y)",
        "pads the channel axis",
    ),
    "flatten mixing channels and pixels": (
        ["a = Conv (x, w1)", "f = Flatten (a)", "y = Gemm <transB = 1> (f, w2)"],
        {"w1": weights(4, 3, 1, 1), "w2": weights(2, 64)},
        "(float[1, 3, 4, 4] x) => (float[1, 2] y)",
        "mixes the channel axis",
    ),
    "unsupported op": (
        ["a = Conv (x, w1)", "s = Softmax <axis = 1> (a)", "y = Conv (s, w2)"],
        {"w1": weights(4, 3, 1, 1), "w2": weights(2, 4, 1, 1)},
        "(float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y)",
        "Softmax .* not an op",
    ),
    "tensor used as a weight": (
        ["a = Conv (x, w1)", "m = MatMul (v, a)", "y = Relu (m)"],
        {"w1": weights(4, 3, 1, 1)},
        "(float[1, 3, 4, 4] x, float[1, 4, 2, 4] v) => (float[1, 4, 2, 4] y)",
        "not an op|parameter",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_carry_the_reason(case):
    body, arrays, signature, reason = REFUSALS[case]
    model = text_model(signature, body, arrays)
    graph = graph_of(model)
    first = next(n for n in graph.nodes if n.op == "Conv")
    with pytest.raises(PermutationRefused, match=reason):
        channel_group(graph, first)


def test_only_dense_layers_start_a_group():
    body = ["a = Conv <group = 3> (x, w1)", "y = Conv (a, w2)"]
    model = text_model("(float[1, 3, 4, 4] x) => (float[1, 2, 4, 4] y)", body, {"w1": weights(3, 1, 1, 1), "w2": weights(2, 3, 1, 1)})
    graph = graph_of(model)
    with pytest.raises(PermutationRefused, match="not a dense"):
        channel_group(graph, graph.nodes[0])


# --------------------------------------------------------------------------- zoo
def zoo_model(name: str, cache) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    if name == "mobilenet_v2_pretrained":
        from onnxopt.models.pretrained import export_pretrained

        return onnx.load(export_pretrained("mobilenet_v2", cache))
    from onnxopt.models.build import build_zoo_model

    return onnx.load(build_zoo_model(name, cache))


def every_group(graph: gs.Graph) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The group of every Conv/Gemm producer (each group once) and the refusals by layer."""
    groups, refusals, covered = [], {}, set()
    for layer in [n for n in graph.nodes if n.op == "Gemm" or (n.op == "Conv" and n.attrs.get("group", 1) == 1)]:
        if id(layer) in covered:
            continue
        try:
            group = channel_group(graph, layer)
        except PermutationRefused as exc:
            refusals[layer.name] = str(exc)
            continue
        covered.update(id(p) for p in group.producers)
        groups.append(group)
    return groups, refusals


QUANTIZE = {"preset": "quantize", "weight_bits": 8, "act_bits": 8}


ZOO_CASES = [
    ("resnet20", False),
    ("resnet20", True),
    ("mobilenet_v2", False),
    ("mobilenet_v2", True),
    ("mobilenet_v2_pretrained", False),
    ("efficientnet_lite0", False),
    ("efficientnet_lite0", True),
    # pretrained W8A8: test_permuted_quantized_pretrained_mobilenet_v2_is_within_the_rounding_noise
]


@pytest.mark.zoo
@pytest.mark.parametrize(("name", "quantized"), ZOO_CASES, ids=[f"{n}-{'w8a8' if q else 'float'}" for n, q in ZOO_CASES])
def test_random_permutation_of_every_zoo_group_keeps_the_outputs(zoo_cache, name, quantized):
    """Every group of the model is permuted at random at once; ORT outputs agree to float
    rounding (rtol 1e-5).  Refused layers: only those the rules forbid (ResNet-20's option-A
    shortcut pads the channel axis; the classifier produces the graph output)."""
    model, _ = onnxopt.optimize(zoo_model(name, zoo_cache), **(QUANTIZE if quantized else {}))
    graph = graph_of(model)
    groups, refusals = every_group(graph)
    permutable = {p.name for g in groups for p in g.producers}
    for layer, reason in refusals.items():
        assert "pads the channel axis" in reason or ("graph output" in reason and "Gemm" in layer), (layer, reason)
    if name == "resnet20":
        assert len(permutable) == 9  # the first Conv of each block
    elif name == "efficientnet_lite0":
        assert len(refusals) == 1 and max(len(g.producers) for g in groups) == 4  # stage of 4 blocks
    else:
        assert len(permutable) == 35 and len(refusals) == 1  # every dense Conv; the classifier Gemm is refused
        assert max(len(g.producers) for g in groups) == 4  # stage of 4 blocks: 3 residual Adds
    if quantized:
        assert all(any(n.op == "DequantizeLinear" for n in g.passthrough) for g in groups)
        # Compared on the integer kernels ORT runs (exact integer sums): with graph
        # optimizations off, QDQ is simulated in float, and a permuted float summation
        # order can move a value across a rounding boundary of the next QuantizeLinear.
        assert_same_integer_outputs(model, permuted(model, graph, groups))
    else:
        assert_equivalent(model, permuted(model, graph, groups))


def assert_same_integer_outputs(original: onnx.ModelProto, changed: onnx.ModelProto) -> None:
    """Bit-identical outputs in ORT with its QDQ fusions (QLinearConv etc.) on."""
    from onnxopt.runtime import random_inputs, session

    feeds = random_inputs(original, seed=0)
    expected = session(original, optimize=True).run(None, feeds)
    actual = session(changed, optimize=True).run(None, feeds)
    for a, b in zip(expected, actual):
        np.testing.assert_array_equal(a, b)


@pytest.mark.zoo
def test_mobilenet_v2_group_structure(zoo_cache):
    """An expansion 1×1 Conv: the depthwise Conv is passthrough, the projection the consumer.
    A residual stage (features.11–13, 96 channels): its three projections are the producers
    of one group that the next blocks' expansions read (and the following stage's)."""
    model, _ = onnxopt.optimize(zoo_model("mobilenet_v2", zoo_cache), **QUANTIZE)
    graph = graph_of(model)
    block = "/features/features.12/conv"
    expansion = channel_group(graph, node(graph, f"{block}/conv.0/conv.0.0/Conv"))
    assert expansion.channels == 576
    assert names(expansion.producers) == [f"{block}/conv.0/conv.0.0/Conv"]
    assert [n.name for n in expansion.passthrough if n.op == "Conv"] == [f"{block}/conv.1/conv.1.0/Conv"]
    assert names(expansion.consumers) == [f"{block}/conv.2/Conv"]
    assert {n.op for n in expansion.passthrough} == {"Conv", "Clip", "QuantizeLinear", "DequantizeLinear"}

    stage = channel_group(graph, node(graph, "/features/features.12/conv/conv.2/Conv"))
    projections = [f"/features/features.{i}/conv/conv.2/Conv" for i in (11, 12, 13)]
    expansions = [f"/features/features.{i}/conv/conv.0/conv.0.0/Conv" for i in (12, 13, 14)]
    assert stage.channels == 96
    assert names(stage.producers) == sorted(projections)
    assert names(stage.consumers) == sorted(expansions)
    assert sum(n.op == "Add" for n in stage.passthrough) == 2
    assert names(channel_group(graph, node(graph, projections[0])).producers) == names(stage.producers)  # same component from any producer


@pytest.mark.zoo
@pytest.mark.slow
def test_permuted_quantized_pretrained_mobilenet_v2_is_within_the_rounding_noise(zoo_cache):
    """Pretrained MobileNetV2 at W8A8, every group permuted at once, on the 20 real ImageNet
    images.  A consumer summing its inputs in another order moves its output by ~1e-6, which
    flips the rounding of a few activation codes, and this network amplifies such flips to
    ~0.2 on the logits: so the reference is the same quantized model fed the images scaled
    by (1 + 1e-6).  The permuted model must not deviate more than twice as much (a wrong
    order deviates by whole logits)."""
    from onnxopt.models.datasets import load_imagenet_samples

    model, _ = onnxopt.optimize(zoo_model("mobilenet_v2_pretrained", zoo_cache), **QUANTIZE)
    graph = graph_of(model)
    groups, refusals = every_group(graph)
    assert sum(len(g.producers) for g in groups) == 35 and len(refusals) == 1
    result = permuted(model, graph, groups)
    images, _ = load_imagenet_samples()
    name, output = model.graph.input[0].name, model.graph.output[0].name
    original = run(model, {name: images})[output]
    noise = np.abs(run(model, {name: images * np.float32(1 + 1e-6)})[output] - original).mean()
    deviation = np.abs(run(result, {name: images})[output] - original)
    assert 0 < noise < 0.5  # measured 0.197
    assert deviation.mean() <= 2 * noise, (deviation.mean(), noise)  # measured 0.192
    assert (run(result, {name: images})[output].argmax(1) == original.argmax(1)).mean() >= 0.9


def test_unknown_shapes_are_refused():
    """Without shape inference the channel count of the intermediate tensors is unknown."""
    model = every_form_model()
    graph = import_graph(model)
    with pytest.raises(PermutationRefused, match="unknown"):
        channel_group(graph, node(graph, "conv"))
