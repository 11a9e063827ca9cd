"""RED / RED++ passes: hash-weights, merge-neurons, decompose-depthwise (docs/pruning.md)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxopt.passes.red.hashing import hash_values

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.errors import NothingToDoError
from onnxopt.verify import verify
from tests.conftest import (
    assert_equivalent,
    bn_line,
    initializers,
    ops,
    run_passes,
    text_model,
)

RNG = np.random.default_rng(7)


def _stats(report, name):
    entry = next(p for p in report.to_dict()["passes"] if p["name"] == name)
    return entry["stats"], [r["reason"] for r in entry.get("refusals", [])]


def _conv(n_o, n_i, k=1):
    return RNG.standard_normal((n_o, n_i, k, k)).astype(np.float32)


def _bias(n):
    return RNG.standard_normal(n).astype(np.float32)


# --------------------------------------------------------------------------- hashing
def test_hashing_lands_on_density_maxima_and_respects_bound():
    centers = np.array([-0.3, -0.1, 0.05, 0.2])
    weights = (RNG.choice(centers, 4000) + RNG.standard_normal(4000) * 2e-3).astype(np.float32)
    result = hash_values(weights)
    assert result.distinct_after < result.distinct_before / 2
    # every hashed value stays in the cluster its weight came from (the density maxima of a cluster lie inside it)
    assert np.max(np.abs(result.values - weights)) < 0.02
    assert result.mean_abs_error <= result.bound
    again = hash_values(result.values)
    assert again.distinct_after <= result.distinct_after


def test_hash_weights_pass_on_zoo_bound_holds(zoo_cache):
    from onnxopt.models.build import build_zoo_model

    model = onnx.load(str(build_zoo_model("resnet20", zoo_cache)))
    hashed, report = run_passes(model, "fold-batchnorm", "hash-weights")
    stats, _ = _stats(report, "hash-weights")
    assert stats["layers_hashed"] == 20 and stats["distinct_after"] < stats["distinct_before"]
    for layer in stats["layers"]:
        assert layer["mean_abs_error"] <= layer["bound"], layer
    result = verify(model, hashed, atol=1e-6, rtol=1e-5)
    assert not result.passed  # lossy: weights really changed
    assert stats["layers_with_bn_statistics"] > 0 and stats["network_bound"] is not None


# --------------------------------------------------------------------------- merge: graph cases
def _duplicate_rows(weight, bias, pairs, scale=1.0):
    for i, j in pairs:
        weight[j] = scale * weight[i]
        bias[j] = scale * bias[i]
    return weight, bias


def test_conv_relu_conv_exact_merge():
    w1, b1 = _duplicate_rows(_conv(6, 3, 3), _bias(6), [(0, 3), (1, 5)])
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv <pads = [1,1,1,1]> (x, w1, b1)", "r = Relu (a)", "y = Conv (r, w2, b2)"],
        {"w1": w1, "b1": b1, "w2": _conv(4, 6), "b2": _bias(4)},
    )
    out, report = run_passes(model, "merge-neurons")
    assert initializers(out)["w1"].shape[0] == 4 and initializers(out)["w2"].shape[1] == 4
    assert _stats(report, "merge-neurons")[0]["exact"] == 2
    assert_equivalent(model, out)


def test_conv_bn_relu_conv_merges_only_identical_bn_rows():
    w1, b1 = _duplicate_rows(_conv(6, 3), _bias(6), [(0, 3), (1, 5)])
    g, b, m, v = _bias(6), _bias(6), _bias(6), np.abs(_bias(6)) + 0.5
    for arr in (g, b, m, v):
        arr[3] = arr[0]  # pair (0, 3) identical through the BN; pair (1, 5) is not
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv (x, w1, b1)", bn_line("bn", "a", "n"), "r = Relu (n)", "y = Conv (r, w2, b2)"],
        {"w1": w1, "b1": b1, "bn_g": g, "bn_b": b, "bn_m": m, "bn_v": v, "w2": _conv(4, 6), "b2": _bias(4)},
    )
    out, _ = run_passes(model, "merge-neurons")
    assert initializers(out)["w1"].shape[0] == 5 and initializers(out)["bn_g"].shape == (5,)
    assert_equivalent(model, out)


def test_gemm_chain_exact_and_angular_merge():
    w1 = RNG.standard_normal((8, 10)).astype(np.float32)  # transB: rows are neurons
    b1 = _bias(8)
    w1[3], b1[3] = w1[0], b1[0]
    w1[5], b1[5] = 2.0 * w1[1], 2.0 * b1[1]  # collinear, λ = 2 > 0
    model = text_model(
        "(float[2,10] x) => (float[2,4] y)",
        ["a = Gemm <transB = 1> (x, w1, b1)", "r = Relu (a)", "y = Gemm (r, w2, b2)"],
        {"w1": w1, "b1": b1, "w2": RNG.standard_normal((8, 4)).astype(np.float32), "b2": _bias(4)},
    )
    out, report = run_passes(model, "merge-neurons", channel_multiple=1)
    stats, _ = _stats(report, "merge-neurons")
    assert (stats["exact"], stats["angular"]) == (1, 1)
    assert initializers(out)["w1"].shape == (6, 10) and initializers(out)["w2"].shape == (6, 4)
    assert_equivalent(model, out)


def test_relu6_path_refuses_angular_merge_but_keeps_exact():
    w1, b1 = _conv(6, 3), _bias(6)
    w1[3], b1[3] = w1[0], b1[0]
    w1[5], b1[5] = 2.0 * w1[1], 2.0 * b1[1]
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv (x, w1, b1)", "r = Clip (a, lo, hi)", "y = Conv (r, w2, b2)"],
        {"w1": w1, "b1": b1, "lo": np.array(0, np.float32), "hi": np.array(6, np.float32), "w2": _conv(4, 6), "b2": _bias(4)},
    )
    out, report = run_passes(model, "merge-neurons")
    stats, _ = _stats(report, "merge-neurons")
    assert (stats["exact"], stats["angular"]) == (1, 0)
    assert initializers(out)["w1"].shape[0] == 5
    assert_equivalent(model, out)


def _refusal_for(model, text):
    """merge-neurons merges nothing: the run stops with the refusal's reason (never a silent no-op)."""
    with pytest.raises(NothingToDoError, match=f"merge-neurons rewrote nothing: .*{text}"):
        run_passes(model, "merge-neurons")


def test_residual_block_is_skipped_with_reason():
    w1, b1 = _duplicate_rows(_conv(3, 3), _bias(3), [(0, 1)])
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,3,8,8] y)",
        ["a = Conv (x, w1, b1)", "s = Add (a, x)", "r = Relu (s)", "y = Conv (r, w2, b2)"],
        {"w1": w1, "b1": b1, "w2": _conv(3, 3), "b2": _bias(3)},
    )
    _refusal_for(model, "residual")


def test_concat_block_merges_at_the_channel_offset():
    w1, b1 = _duplicate_rows(_conv(4, 3), _bias(4), [(0, 1)])
    g, b, m, v = _bias(7), _bias(7), _bias(7), np.abs(_bias(7)) + 0.5
    for arr in (g, b, m, v):
        arr[4] = arr[3]  # the producer's channels 0 and 1 sit at offsets 3 and 4 of the Concat
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv (x, w1, b1)", "c = Concat <axis = 1> (x, a)", bn_line("bn", "c", "n"), "r = Relu (n)", "y = Conv (r, w2, b2)"],
        {"w1": w1, "b1": b1, "bn_g": g, "bn_b": b, "bn_m": m, "bn_v": v, "w2": _conv(4, 7), "b2": _bias(4)},
    )
    out, _ = run_passes(model, "merge-neurons")
    inits = initializers(out)
    assert inits["w1"].shape[0] == 3 and inits["bn_g"].shape == (6,) and inits["w2"].shape[1] == 6
    np.testing.assert_array_equal(inits["bn_g"][:3], g[:3])  # the other Concat input keeps its rows
    assert_equivalent(model, out)


def test_merged_channel_feeding_graph_output_is_refused():
    w1, b1 = _duplicate_rows(_conv(4, 3), _bias(4), [(0, 1)])
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] r)",
        ["a = Conv (x, w1, b1)", "r = Relu (a)"],
        {"w1": w1, "b1": b1},
    )
    _refusal_for(model, "graph output")


def test_depthwise_channel_pruned_in_mobilenet_block():
    w1, b1 = _duplicate_rows(_conv(8, 4), _bias(8), [(0, 5)])
    dw, dwb = _conv(8, 1, 3), _bias(8)
    dw[5], dwb[5] = dw[0], dwb[0]
    model = text_model(
        "(float[1,4,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv (x, w1, b1)", "r = Relu (a)", "d = Conv <group = 8, pads = [1,1,1,1]> (r, dw, dwb)", "e = Clip (d, lo, hi)", "y = Conv (e, w2, b2)"],
        {"w1": w1, "b1": b1, "dw": dw, "dwb": dwb, "lo": np.array(0, np.float32), "hi": np.array(6, np.float32), "w2": _conv(4, 8), "b2": _bias(4)},
    )
    out, _ = run_passes(model, "merge-neurons", channel_multiple=1)
    assert initializers(out)["dw"].shape[0] == 7
    group = next(a.i for n in out.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group")
    assert group == 7
    assert_equivalent(model, out)


@pytest.mark.parametrize("pairs, kept", [(8, 8), (2, 16)])
def test_channel_counts_stay_multiples_of_8(pairs, kept):
    w1, b1 = _duplicate_rows(_conv(16, 3), _bias(16), [(i, i + 8) for i in range(pairs)])
    model = text_model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv (x, w1, b1)", "r = Relu (a)", "y = Conv (r, w2, b2)"],
        {"w1": w1, "b1": b1, "w2": _conv(4, 16), "b2": _bias(4)},
    )
    if kept == 16:  # 2 pairs merged would leave 14 channels: undone for alignment, nothing merged
        with pytest.raises(NothingToDoError, match="merge-neurons rewrote nothing"):
            run_passes(model, "merge-neurons")
        return
    out, _ = run_passes(model, "merge-neurons")
    assert initializers(out)["w1"].shape[0] == kept
    assert_equivalent(model, out)


# --------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("layout, expected", [("padded", {"Conv": 2}), ("bucketed", {"Conv": 4, "Gather": 3, "Concat": 1}), ("auto", {"Conv": 4, "Gather": 3, "Concat": 1})])
def test_decompose_uneven_ranks_exact(layout, expected):
    n_o, n_i = 16, 6
    ranks = np.array([1, 3, 0, 1, 3, 2])  # a rank-0 (all-zero) channel disappears when bucketed
    basis = RNG.standard_normal((n_i, 3, 9)) * (np.arange(3)[None, :, None] < ranks[:, None, None])
    coeff = RNG.standard_normal((n_i, n_o, 3))
    weight = np.einsum("iot,itk->oik", coeff, basis).reshape(n_o, n_i, 3, 3).astype(np.float32)
    model = text_model(
        "(float[1,6,10,10] x) => (float[1,16,5,5] y)",
        ["y = Conv <strides = [2,2], pads = [1,1,1,1], dilations = [1,1]> (x, w, b)"],
        {"w": weight, "b": _bias(16)},
    )
    out, report = run_passes(model, "decompose-depthwise", layout=layout)
    stats, _ = _stats(report, "decompose-depthwise")
    assert stats["convs_decomposed"] == 1 and stats["layers"][0]["rank_sum"] == 10
    assert {op: ops(out)[op] for op in expected} == expected
    assert stats["params_after"] < stats["params_before"]
    assert_equivalent(model, out)


def test_full_rank_conv_not_decomposed():
    model = text_model("(float[1,4,6,6] x) => (float[1,16,4,4] y)", ["y = Conv (x, w)"], {"w": _conv(16, 4, 3)})
    with pytest.raises(NothingToDoError, match=r"decompose-depthwise rewrote nothing: no parameter saving \(eq. 2.11"):
        run_passes(model, "decompose-depthwise")


# --------------------------------------------------------------------------- zoo + presets
@pytest.mark.zoo
def test_red_preset_exact_after_hashing_on_zoo_and_alpha(zoo_cache):
    from onnxopt.models.build import build_zoo_model

    model = onnx.load(str(build_zoo_model("resnet20", zoo_cache)))
    hashed, _ = onnxopt.optimize(model, passes=["eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "hash-weights"])
    # exact merging and decomposition find nothing in ResNet-20 once hashed: an error, not a silent copy
    with pytest.raises(NothingToDoError, match="prune: nothing rewritten: merge-neurons rewrote nothing: .*decompose-depthwise rewrote nothing"):
        run_passes(hashed, "merge-neurons", "decompose-depthwise", "eliminate-dead")
    relaxed, report = onnxopt.optimize(hashed, passes=["merge-neurons", "eliminate-dead"], alpha=0.25)
    stats, _ = _stats(report, "merge-neurons")
    assert stats["alpha_merged"] > 0 and stats["alpha_relative_change_max"] > 0
    result = verify(hashed, relaxed, atol=1e-6, rtol=1e-5)
    assert not result.passed and result.outputs[0].max_abs > 0
    through_preset, _ = onnxopt.optimize(model, preset="red", alpha=0.25)
    assert sum(t.dims[0] for t in through_preset.graph.initializer if len(t.dims) == 4) < sum(t.dims[0] for t in model.graph.initializer if len(t.dims) == 4)


def test_cli_prune_red(tmp_path, demo_path):
    out = tmp_path / "out.onnx"
    assert cli_main([str(demo_path), "-o", str(out), "--prune", "red", "--prune-alpha", "0.1", "-q"]) == 0
    assert out.exists()
    assert cli_main([str(demo_path), "-o", str(out), "--prune-alpha", "0.1", "-q"]) != 0


def _edit(model: onnx.ModelProto, node_name: str, edit) -> None:
    """Apply ``edit(weight, bias) -> (weight, bias)`` to a Conv's initializers in place."""
    from onnx import numpy_helper

    node = next(n for n in model.graph.node if n.name == node_name)
    tensors = {t.name: t for t in model.graph.initializer}
    weight, bias = (numpy_helper.to_array(tensors[name]).copy() for name in node.input[1:3])
    weight, bias = edit(weight, bias)
    for name, value in zip(node.input[1:3], (weight, bias)):
        tensors[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _hashed_zoo(zoo_cache, name):
    from onnxopt.models.build import build_zoo_model

    model = onnx.load(str(build_zoo_model(name, zoo_cache)))
    hashed, _ = onnxopt.optimize(model, passes=["eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "hash-weights"])
    return hashed


def _copy_rows(half):
    def edit(weight, bias):
        weight[half:], bias[half:] = weight[:half], bias[:half]
        return weight, bias

    return edit


@pytest.mark.zoo
def test_injected_redundancy_in_resnet20_is_removed_exactly(zoo_cache):
    hashed = _hashed_zoo(zoo_cache, "resnet20")
    _edit(hashed, "/layer1/layer1.0/conv1/Conv", _copy_rows(8))  # 8 duplicate neurons: Conv → Relu → Conv

    def rank_one(weight, bias):  # every input channel's 16 kernels are multiples of one kernel
        return weight[:, :, :1, :1] * weight[:1, :, :, :], bias

    _edit(hashed, "/layer1/layer1.1/conv1/Conv", rank_one)
    out, report = run_passes(hashed, "merge-neurons", "decompose-depthwise", "eliminate-dead")
    merge, _ = _stats(report, "merge-neurons")
    decompose, _ = _stats(report, "decompose-depthwise")
    assert merge["exact"] == 8 and merge["layers"][0]["neurons_after"] == 8
    assert decompose["convs_decomposed"] == 1 and decompose["layers"][0]["rank_sum"] == 16
    assert ops(out)["Conv"] == ops(hashed)["Conv"] + 1
    assert_equivalent(hashed, out)


@pytest.mark.zoo
def test_injected_redundancy_in_mobilenet_v2_block_prunes_the_depthwise_channel(zoo_cache):
    hashed = _hashed_zoo(zoo_cache, "mobilenet_v2")
    _edit(hashed, "/features/features.2/conv/conv.0/conv.0.0/Conv", _copy_rows(48))  # expand 1×1: 96 → 48 distinct
    _edit(hashed, "/features/features.2/conv/conv.1/conv.1.0/Conv", _copy_rows(48))  # and the same depthwise kernels
    out, report = run_passes(hashed, "merge-neurons", "eliminate-dead")
    merge, _ = _stats(report, "merge-neurons")
    assert merge["exact"] == 48  # through Clip (ReLU6): exact merge only, no angular
    dw = next(n for n in out.graph.node if n.name == "/features/features.2/conv/conv.1/conv.1.0/Conv")
    assert next(a.i for a in dw.attribute if a.name == "group") == 48
    assert_equivalent(hashed, out)
