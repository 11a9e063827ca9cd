"""fold-batchnorm: one test per folding rule on small text-format graphs.

Every positive test checks what was folded (direction, roots, leaves, BN count) and that
ORT (graph optimizations disabled) computes the same outputs; every negative test checks
the BN is still there and the refusal reason.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.passes.common.statistics import STATISTICS_KEY, read_bn_statistics, statistics_from_metadata, statistics_to_metadata
from tests.conftest import bn_line as bn, text_model as model, assert_equivalent, ops, run_passes

RNG = np.random.default_rng(1234)


def weights(*shape: int, scale: float = 0.4) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix: str, channels: int, gamma: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Non-trivial statistics: negative scales included, shifts far from 0."""
    if gamma is None:
        gamma = (RNG.uniform(0.5, 1.5, channels) * RNG.choice([-1, 1], channels)).astype(np.float32)
    return {
        f"{prefix}_g": gamma.astype(np.float32),
        f"{prefix}_b": RNG.normal(0, 1, channels).astype(np.float32),
        f"{prefix}_m": RNG.normal(0, 1, channels).astype(np.float32),
        f"{prefix}_v": RNG.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def positive_bn(prefix: str, channels: int) -> dict[str, np.ndarray]:
    return bn_params(prefix, channels, RNG.uniform(0.5, 1.5, channels).astype(np.float32))






def fold(proto: onnx.ModelProto):
    optimized, report = run_passes(proto, "fold-batchnorm")
    return optimized, report.passes[0]


def single_fold(result) -> dict:
    folds = result.stats["folds"]
    assert len(folds) == 1, folds
    return folds[0]


# --------------------------------------------------------------------------- backward
def test_conv_bn_with_shared_conv_output_makes_the_other_reader_a_leaf() -> None:
    arrays = {"w1": weights(6, 3, 3, 3), "b1": weights(6), "w2": weights(4, 6, 1, 1), **bn_params("bn", 6)}
    proto = model(
        "(float[1,3,8,8] x) => (float[1,6,8,8] r, float[1,4,8,8] y2)",
        ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", bn("bn", "c", "z"), "r = Relu(z)", "y2 = Conv(c, w2)"],
        arrays,
    )
    optimized, result = fold(proto)
    record = single_fold(result)
    assert record["direction"] == "backward"
    assert len(record["roots"]) == 1 and len(record["leaves"]) == 1
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(proto, optimized)


def test_bn_after_add_of_two_convs_adds_the_shift_once() -> None:
    arrays = {"w1": weights(4, 3, 3, 3), "w2": weights(4, 3, 1, 1), "b2": weights(4), **bn_params("bn", 4)}
    proto = model(
        "(float[1,3,8,8] x) => (float[1,4,8,8] y)",
        ["a = Conv <pads = [1,1,1,1]> (x, w1)", "b = Conv(x, w2, b2)", "s = Add(a, b)", bn("bn", "s", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    record = single_fold(result)
    assert record["direction"] == "backward" and len(record["roots"]) == 2
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(proto, optimized)


def test_bn_after_concat_splits_the_map_across_inputs() -> None:
    arrays = {"w1": weights(3, 3, 1, 1), "w2": weights(5, 3, 3, 3), **bn_params("bn", 8)}
    proto = model(
        "(float[1,3,8,8] x) => (float[1,8,8,8] y)",
        ["a = Conv(x, w1)", "b = Conv <pads = [1,1,1,1]> (x, w2)", "c = Concat <axis = 1> (a, b)", bn("bn", "c", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(proto, optimized)


def test_bn_after_matmul_gets_a_bias_add() -> None:
    arrays = {"w": weights(16, 6), **bn_params("bn", 6)}
    proto = model("(float[4,16] x) => (float[4,6] y)", ["m = MatMul(x, w)", bn("bn", "m", "z"), "y = Relu(z)"], arrays)
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert ops(optimized) == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert_equivalent(proto, optimized)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_after_gemm(trans_b: int) -> None:
    w = weights(6, 10) if trans_b else weights(10, 6)
    arrays = {"w": w, "c": weights(6), **bn_params("bn", 6)}
    proto = model(
        "(float[3,10] x) => (float[3,6] y)",
        [f"g = Gemm <transB = {trans_b}, alpha = 0.7, beta = 0.5> (x, w, c)", bn("bn", "g", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert_equivalent(proto, optimized)


def test_conv_transpose_with_groups_then_bn() -> None:
    arrays = {"w": weights(4, 3, 3, 3), "b": weights(6), **bn_params("bn", 6)}
    proto = model(
        "(float[1,4,5,5] x) => (float[1,6,11,11] y)",
        ["t = ConvTranspose <group = 2, strides = [2,2]> (x, w, b)", bn("bn", "t", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert_equivalent(proto, optimized)


def test_depthwise_conv_then_bn() -> None:
    arrays = {"w": weights(6, 1, 3, 3), **bn_params("bn", 6)}
    proto = model(
        "(float[1,6,8,8] x) => (float[1,6,8,8] y)",
        ["d = Conv <group = 6, pads = [1,1,1,1]> (x, w)", bn("bn", "d", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert_equivalent(proto, optimized)


def test_backward_through_pooling_slice_and_reshape() -> None:
    arrays = {"w": weights(8, 3, 1, 1), "starts": np.array([2], np.int64), "ends": np.array([8], np.int64), "axes": np.array([1], np.int64)}
    arrays |= positive_bn("bn", 6)
    proto = model(
        "(float[1,3,8,8] x) => (float[1,6,4,4] y)",
        [
            "c = Conv(x, w)",
            "p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (c)",
            "s = Slice(p, starts, ends, axes)",
            bn("bn", "s", "z"),
            "y = Relu(z)",
        ],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert_equivalent(proto, optimized)


# --------------------------------------------------------------------------- forward
def test_bn_pool_flatten_gemm_folds_forward() -> None:
    arrays = {"w": weights(10, 6), "c": weights(10), **bn_params("bn", 6)}
    proto = model(
        "(float[2,6,5,5] x) => (float[2,10] y)",
        ["r = Relu(x)", bn("bn", "r", "z"), "p = GlobalAveragePool(z)", "f = Flatten(p)", "y = Gemm <transB = 1> (f, w, c)"],
        arrays,
    )
    optimized, result = fold(proto)
    record = single_fold(result)
    assert record["direction"] == "forward" and len(record["leaves"]) == 1
    assert_equivalent(proto, optimized)


def test_bn_before_unpadded_conv_folds_forward() -> None:
    arrays = {"w": weights(5, 4, 3, 3), "b": weights(5), **bn_params("bn", 4)}
    proto = model(
        "(float[1,4,7,7] x) => (float[1,5,5,5] y)",
        ["r = Relu(x)", bn("bn", "r", "z"), "y = Conv(z, w, b)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "forward"
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(proto, optimized)


def test_bn_before_grouped_unpadded_conv_folds_forward() -> None:
    arrays = {"w": weights(6, 2, 1, 1), **bn_params("bn", 4)}
    proto = model(
        "(float[1,4,7,7] x) => (float[1,6,7,7] y)",
        ["r = Relu(x)", bn("bn", "r", "z"), "y = Conv <group = 2> (z, w)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "forward"
    assert_equivalent(proto, optimized)


def test_bn_then_bn_folds_the_first_into_the_second() -> None:
    arrays = {**bn_params("bn1", 4), **bn_params("bn2", 4)}
    proto = model(
        "(float[1,4,6,6] x) => (float[1,4,6,6] y)",
        ["r = Relu(x)", bn("bn1", "r", "z1"), bn("bn2", "z1", "z2"), "y = Relu(z2)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert result.stats["bn_folded"] == 1 and result.stats["bn_kept"] == 1
    assert ops(optimized)["BatchNormalization"] == 1
    assert_equivalent(proto, optimized)


def test_bn_before_matmul_in_channels_last_layout() -> None:
    arrays = {"w": weights(6, 3), "perm_dummy": np.zeros(1, np.float32), **bn_params("bn", 6)}
    del arrays["perm_dummy"]
    proto = model(
        "(float[2,6,5] x) => (float[2,5,3] y)",
        ["r = Relu(x)", bn("bn", "r", "z"), "t = Transpose <perm = [0,2,1]> (z)", "y = MatMul(t, w)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "forward"
    assert_equivalent(proto, optimized)


# --------------------------------------------------------------------------- refusals
def refusal_reason(result) -> str:
    assert result.stats["bn_folded"] == 0
    assert len(result.refusals) == 1
    return result.refusals[0].reason


def test_bn_after_relu_before_padded_conv_is_refused() -> None:
    arrays = {"w": weights(5, 4, 3, 3), **bn_params("bn", 4)}
    proto = model(
        "(float[1,4,7,7] x) => (float[1,5,7,7] y)",
        ["r = Relu(x)", bn("bn", "r", "z"), "y = Conv <pads = [1,1,1,1]> (z, w)"],
        arrays,
    )
    optimized, result = fold(proto)
    reason = refusal_reason(result)
    assert "backward: path to Relu" in reason and "zero padding" in reason
    assert ops(optimized)["BatchNormalization"] == 1


def test_bn_feeding_a_graph_output_folds_backward_and_keeps_the_output_name() -> None:
    arrays = {"w": weights(4, 3, 1, 1), **bn_params("bn", 4)}
    proto = model("(float[1,3,4,4] x) => (float[1,4,4,4] z)", ["c = Conv(x, w)", bn("bn", "c", "z")], arrays)
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert ops(optimized)["BatchNormalization"] == 0
    assert [o.name for o in optimized.graph.output] == ["z"]
    assert optimized.graph.node[0].output[0] == "z"
    assert list(read_bn_statistics(optimized)) == ["z"]
    assert_equivalent(proto, optimized)


def test_bn_feeding_a_graph_output_after_a_relu_is_refused() -> None:
    arrays = {"w": weights(4, 3, 1, 1), **bn_params("bn", 4)}
    proto = model("(float[1,3,4,4] x) => (float[1,4,4,4] z)", ["c = Conv(x, w)", "r = Relu(c)", bn("bn", "r", "z")], arrays)
    optimized, result = fold(proto)
    assert "graph output z" in refusal_reason(result)
    assert ops(optimized)["BatchNormalization"] == 1


def test_gamma_zero_folds_into_roots_alone() -> None:
    gamma = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    arrays = {"w": weights(4, 3, 1, 1), **bn_params("bn", 4, gamma)}
    proto = model("(float[1,3,4,4] x) => (float[1,4,4,4] y)", ["c = Conv(x, w)", bn("bn", "c", "z"), "y = Relu(z)"], arrays)
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(proto, optimized)


def test_gamma_zero_is_refused_when_a_leaf_needs_the_inverse() -> None:
    gamma = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    arrays = {"w": weights(4, 3, 1, 1), "w2": weights(2, 4, 1, 1), **bn_params("bn", 4, gamma)}
    proto = model(
        "(float[1,3,4,4] x) => (float[1,4,4,4] y, float[1,2,4,4] y2)",
        ["c = Conv(x, w)", bn("bn", "c", "z"), "y = Relu(z)", "y2 = Conv(c, w2)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert "γ = 0" in refusal_reason(result) and "leaf" in refusal_reason(result)
    assert ops(optimized)["BatchNormalization"] == 1


def test_training_mode_bn_is_refused() -> None:
    arrays = {"w": weights(4, 3, 1, 1), **bn_params("bn", 4)}
    proto = model(
        "(float[1,3,4,4] x) => (float[1,4,4,4] y)",
        ["c = Conv(x, w)", bn("bn", "c", "z, running_mean, running_var", training_mode="1"), "y = Relu(z)"],
        arrays,
        opset=15,
    )
    _, result = fold(proto)
    assert "training mode" in refusal_reason(result)


def test_negative_scale_through_maxpool_is_refused() -> None:
    gamma = np.array([1.0, -1.0, 0.5], np.float32)
    arrays = {"w": weights(3, 3, 1, 1), **bn_params("bn", 3, gamma)}
    proto = model(
        "(float[1,3,8,8] x) => (float[1,3,4,4] y)",
        ["c = Conv(x, w)", "p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (c)", bn("bn", "p", "z"), "y = Relu(z)"],
        arrays,
    )
    _, result = fold(proto)
    assert "negative scale" in refusal_reason(result)


def test_shift_through_zero_pad_is_refused_but_scale_only_folds() -> None:
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    arrays = {"w": weights(3, 3, 1, 1), "pads": pads, **bn_params("bn", 3)}
    proto = model(
        "(float[1,3,4,4] x) => (float[1,3,6,6] y)",
        ["c = Conv(x, w)", "p = Pad(c, pads)", bn("bn", "p", "z"), "y = Relu(z)"],
        arrays,
    )
    _, result = fold(proto)
    assert "shift cannot pass Pad" in refusal_reason(result)

    arrays = {"w": weights(3, 3, 1, 1), "pads": pads, "bn_g": np.float32([1, 2, 3]), "bn_b": np.zeros(3, np.float32)}
    arrays |= {"bn_m": np.zeros(3, np.float32), "bn_v": np.ones(3, np.float32)}
    proto = model(
        "(float[1,3,4,4] x) => (float[1,3,6,6] y)",
        ["c = Conv(x, w)", "p = Pad(c, pads)", bn("bn", "p", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert_equivalent(proto, optimized)


def test_shared_weight_is_copied_before_editing() -> None:
    arrays = {"w": weights(4, 4, 1, 1), **bn_params("bn", 4)}
    proto = model(
        "(float[1,4,4,4] x) => (float[1,4,4,4] y, float[1,4,4,4] y2)",
        ["c = Conv(x, w)", bn("bn", "c", "z"), "y = Relu(z)", "y2 = Conv(x, w)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert_equivalent(proto, optimized)


# --------------------------------------------------------------------------- statistics
def test_folded_bn_statistics_are_kept_in_metadata() -> None:
    arrays = {"w": weights(4, 3, 1, 1), **bn_params("bn", 4)}
    proto = model("(float[1,3,4,4] x) => (float[1,4,4,4] y)", ["c = Conv(x, w)", bn("bn", "c", "z"), "y = Relu(z)"], arrays)
    optimized, _ = fold(proto)
    stats = read_bn_statistics(optimized)
    assert list(stats) == ["c"]
    np.testing.assert_allclose(stats["c"]["mean"], arrays["bn_b"], rtol=1e-6)
    np.testing.assert_allclose(stats["c"]["std"], np.abs(arrays["bn_g"]), rtol=1e-6)
    assert any(p.key == STATISTICS_KEY for p in optimized.metadata_props)


def test_statistics_metadata_round_trips_and_reads_plain_json() -> None:
    statistics = {"t": {"axis": 1, "mean": [0.5, -1.25, 3e-8], "std": [1.0, 2.0, 0.1], "source": "bn"}}
    text = statistics_to_metadata(statistics)
    assert "0.5" not in text  # vectors are stored as base64 float32, not decimal text
    decoded = statistics_from_metadata({STATISTICS_KEY: text})
    np.testing.assert_allclose(decoded["t"]["mean"], statistics["t"]["mean"], rtol=1e-7)
    np.testing.assert_allclose(decoded["t"]["std"], statistics["t"]["std"], rtol=1e-7)
    assert decoded["t"]["source"] == "bn" and decoded["t"]["axis"] == 1
    legacy = statistics_from_metadata({STATISTICS_KEY: json.dumps(statistics)})  # written by 0.1 before the encoding
    assert legacy == statistics


# --------------------------------------------------------------------------- constant operands
def test_bn_after_linear_on_3d_input_folds_into_matmul_and_its_bias_constant() -> None:
    """torch's Linear on a [B, T, C] input exports MatMul + Add(bias); BatchNorm1d then
    works on [B, C, T] through a Transpose."""
    arrays = {"w": weights(8, 6), "bias": weights(6), "perm_dummy": np.zeros(1, np.float32), **bn_params("bn", 6)}
    del arrays["perm_dummy"]
    proto = model(
        "(float[2,5,8] x) => (float[2,6,5] y)",
        ["m = MatMul(x, w)", "a = Add(m, bias)", "t = Transpose <perm = [0,2,1]> (a)", bn("bn", "t", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    record = single_fold(result)
    assert record["direction"] == "backward" and len(record["roots"]) == 1
    assert ops(optimized) == {"MatMul": 1, "Add": 1, "Transpose": 1, "Relu": 1}  # the shift went into the bias
    assert_equivalent(proto, optimized)


@pytest.mark.parametrize("expression", ["a = Add(c, k)", "a = Add(k, c)", "a = Sub(c, k)", "a = Sub(k, c)"])
def test_constant_operand_of_add_or_sub_takes_the_shift(expression: str) -> None:
    arrays = {"w": weights(4, 3, 1, 1), "k": weights(1, 4, 1, 1), **bn_params("bn", 4)}
    proto = model(
        "(float[1,3,5,5] x) => (float[1,4,5,5] y)",
        ["c = Conv(x, w)", expression, bn("bn", "a", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(proto, optimized)


def test_scalar_constant_operand_becomes_per_channel() -> None:
    arrays = {"w": weights(4, 3, 1, 1), "k": np.array(0.7, np.float32), **bn_params("bn", 4)}
    proto = model(
        "(float[1,3,5,5] x) => (float[1,4,5,5] y)",
        ["c = Conv(x, w)", "a = Add(c, k)", bn("bn", "a", "z"), "y = Relu(z)"],
        arrays,
    )
    optimized, result = fold(proto)
    assert single_fold(result)["direction"] == "backward"
    add = next(n for n in optimized.graph.node if n.op_type == "Add")
    constant = next(t for t in optimized.graph.initializer if t.name in add.input)
    assert list(constant.dims) == [1, 4, 1, 1]
    assert_equivalent(proto, optimized)


def test_constant_operand_of_concat_is_still_refused() -> None:
    arrays = {"w": weights(4, 3, 1, 1), "k": weights(1, 2, 5, 5), **bn_params("bn", 6)}
    proto = model(
        "(float[1,3,5,5] x) => (float[1,6,5,5] y)",
        ["c = Conv(x, w)", "a = Concat <axis = 1> (c, k)", bn("bn", "a", "z"), "y = Relu(z)"],
        arrays,
    )
    _, result = fold(proto)
    assert "Concat" in refusal_reason(result) and "constant operand" in refusal_reason(result)


# --------------------------------------------------------------------------- dynamic shapes
def _bn_count(proto: onnx.ModelProto) -> int:
    return ops(proto)["BatchNormalization"]


def _torch_conv_bn_net():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        """Conv-BN-Relu blocks behind a nearest Resize and a Reshape with a computed shape."""

        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
            self.c3, self.b3 = torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4)

        def forward(self, x):  # type: ignore[no-untyped-def]
            x = torch.relu(self.b1(self.c1(x)))
            x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            x = torch.relu(self.b2(self.c2(x)))
            x = x.reshape(x.shape[0], 8, -1, x.shape[3])
            return torch.relu(self.b3(self.c3(x)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return torch, net


@pytest.mark.parametrize("opset", [11, 12])
def test_torch_export_with_dynamic_batch_and_spatial_dims_folds_every_bn(opset: int, tmp_path) -> None:
    torch, net = _torch_conv_bn_net()
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net, torch.randn(1, 3, 16, 16), str(path), opset_version=opset, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N", 2: "H", 3: "W"}}, dynamo=False,
        do_constant_folding=False,  # keep the BNs: torch would fold them itself
    )
    proto = onnx.load(str(path))
    assert _bn_count(proto) == 3
    classic, _ = run_passes(proto, "fold-conv-bn")
    optimized, result = fold(proto)
    assert _bn_count(classic) == 0
    assert _bn_count(optimized) == 0, result.refusals  # the Conv after the Reshape: no inferred shape
    assert result.stats["bn_folded"] == 3 and result.stats["backward"] == 3
    assert_equivalent(proto, optimized, input_shapes={"x": [2, 3, 10, 12]})


def _opaque_reshape_model() -> onnx.ModelProto:
    """Paddle-style: ``-1`` batch and spatial dims, a Reshape whose shape is computed from
    Shape(x) before the first Conv, a value_info with unknown dims for a Conv output."""
    from onnx import TensorProto, helper

    arrays = {
        "w1": weights(4, 3, 3, 3), "w2": weights(5, 4, 1, 1), "b2": weights(5),
        **bn_params("bn1", 4), **bn_params("bn2", 5),
    }
    shape_consts = {"starts": np.array([0], np.int64), "ends": np.array([2], np.int64), "tail": np.array([-1, 8], np.int64)}
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Slice", ["s", "starts", "ends"], ["nc"], name="slice"),
        helper.make_node("Concat", ["nc", "tail"], ["new_shape"], axis=0, name="new_shape"),
        helper.make_node("Reshape", ["x", "new_shape"], ["xr"], name="reshape"),
        helper.make_node("Conv", ["xr", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["z1"], epsilon=1e-3, name="bn1"),
        helper.make_node("Relu", ["z1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["z2"], epsilon=1e-3, name="bn2"),
        helper.make_node("Relu", ["z2"], ["y"], name="relu2"),
    ]
    graph = helper.make_graph(
        nodes, "paddle_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 5, -1, -1])],
        [numpy_helper.from_array(v, k) for k, v in {**arrays, **shape_consts}.items()],
        value_info=[helper.make_tensor_value_info("c1", TensorProto.FLOAT, [None] * 4)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 6
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_minus_one_dims_and_opaque_reshape_fold_from_the_layer_weights() -> None:
    proto = _opaque_reshape_model()
    classic, _ = run_passes(proto, "fold-conv-bn")
    optimized, result = fold(proto)
    assert _bn_count(classic) == 0
    assert _bn_count(optimized) == 0, result.refusals
    assert {r["bn"] for r in result.stats["folds"]} == {"bn1", "bn2"}
    assert_equivalent(proto, optimized, input_shapes={"x": [2, 3, 4, 6]})
