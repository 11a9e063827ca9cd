"""Shared builders of the quantize tests (not collected: no ``test_`` prefix).

Small text-format graphs and their parameters (weights, BN parameters, the BN chain whose
statistics are exactly those of its data), probes of a model (initializers, nodes, attributes,
intermediate tensors, the Q/DQ parameters of a layer, the quantize pass's stats) and the
comparison metrics the tests use (relative error, cosine).  Imported by test_quantize.py,
test_quantize_numerics.py, test_quantize_spiq.py, test_quantize_layernorm.py and
test_equalize.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper
from scipy.stats import norm

from onnxopt.verify import run
from tests.conftest import text_model as model

RNG = np.random.default_rng(20240607)
QUANTIZE = ("fold-batchnorm", "quantize")
#: Keep a QDQ Conv ORT does not fuse in its QDQ form.  The last Conv of most models here writes
#: the graph output (no output quantizer, so ORT runs it in float), which the pass puts back in
#: float by default; the tests of the emitted QDQ itself (codes, scales, bias correction,
#: numerics against a fake-quant reference, bit-widths per layer) pass this to keep it.
KEEP_QDQ = {"unfused_conv_to_float": False}
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weights(*shape: int, scale: float = 0.4) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix: str, channels: int, *, gamma: tuple[float, float] = (0.5, 1.5), beta: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": RNG.uniform(*gamma, channels).astype(np.float32),
        f"{prefix}_b": RNG.normal(*beta, channels).astype(np.float32),
        f"{prefix}_m": RNG.normal(0, 1, channels).astype(np.float32),
        f"{prefix}_v": RNG.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def bn(prefix: str, x: str, y: str) -> str:
    return f"{y} = BatchNormalization <epsilon = 0.00001> ({x}, {prefix}_g, {prefix}_b, {prefix}_m, {prefix}_v)"


def inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def nodes(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == op]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def quantize_stats(report) -> tuple[dict, list[dict]]:
    """(stats, refusals) of the quantize pass in a report."""
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    return entry.stats, [r.to_dict() for r in entry.refusals]


def intermediate(proto: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Value of an intermediate tensor (added as an extra output of a copy of the model)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return run(probe, feeds)[name]


def with_data_statistics(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model with every BN's running mean/var set to the moments of its input on ``feeds``
    (in graph order), as training would leave them: the BN statistics then describe the data."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    for node in [n for n in result.graph.node if n.op_type == "BatchNormalization"]:
        values = intermediate(result, node.input[0], feeds).astype(np.float64)
        for index, stat in ((3, values.mean(axis=(0, 2, 3))), (4, values.var(axis=(0, 2, 3)))):
            (tensor,) = [t for t in result.graph.initializer if t.name == node.input[index]]
            tensor.CopyFrom(numpy_helper.from_array(stat.astype(np.float32), tensor.name))
    return result


def layer_params(proto: onnx.ModelProto, output: str) -> dict[str, np.ndarray]:
    """Quantization parameters of the layer producing ``output``: activation scale/zero point,
    weight codes/scales (and the DQ axis), bias codes/scales."""
    init = inits(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    layer = producers[output]
    x_dq, w_dq = producers[layer.input[0]], producers[layer.input[1]]
    assert x_dq.op_type == "DequantizeLinear" and producers[x_dq.input[0]].op_type == "QuantizeLinear"
    assert w_dq.op_type == "DequantizeLinear"
    params = {
        "x_scale": init[x_dq.input[1]], "x_zero": init[x_dq.input[2]],
        "w_codes": init[w_dq.input[0]], "w_scale": init[w_dq.input[1]], "w_zero": init[w_dq.input[2]], "w_axis": attr(w_dq, "axis"),
    }
    if len(layer.input) > 2 and layer.input[2]:
        b_dq = producers[layer.input[2]]
        assert b_dq.op_type == "DequantizeLinear"
        params.update(b_codes=init[b_dq.input[0]], b_scale=init[b_dq.input[1]], b_zero=init[b_dq.input[2]])
    return params


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    c, r = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(c - r) / np.linalg.norm(r))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def layer_readers(tensor: gs.Tensor) -> list[gs.Node]:
    return [n for n in tensor.outputs if n.op in LAYER_OPS]


def plain_model(batch: str = "N") -> onnx.ModelProto:
    """Conv → Relu → Conv without any BatchNormalization."""
    arrays = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "w2": weights(4, 8, 1, 1), "b2": weights(4)}
    body = ["c = Conv <pads = [1,1,1,1]> (x, w1, b1)", "r = Relu(c)", "y = Conv(r, w2, b2)"]
    return model(f"(float[{batch},3,8,8] x) => (float[{batch},4,8,8] y)", body, arrays)


# --- a 1x1 chain whose BN statistics are exactly those of the data
C, K, HW = 8, 6, 4
EPS = 1e-5


class BnChain:
    """x → Conv1 (1x1, invertible) → BN → Relu = r → Conv2 (1x1) → y.

    Inputs are drawn so that Conv1's output is N(μ, v) per channel exactly: the BN output then
    is N(β, γ²) — the statistics the pass derives its ranges and its bias correction from."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.w1 = (rng.standard_normal((C, C)) + 2 * np.eye(C)).astype(np.float32)
        self.b1 = rng.normal(0, 1, C).astype(np.float32)
        self.mean = rng.normal(0, 1, C).astype(np.float32)
        self.var = rng.uniform(0.5, 2, C).astype(np.float32)
        self.gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
        self.beta = rng.normal(0.5, 1, C).astype(np.float32)
        self.w2 = (rng.standard_normal((K, C)) * 0.5).astype(np.float32)
        self.b2 = rng.normal(0, 1, K).astype(np.float32)
        arrays = {
            "w1": self.w1.reshape(C, C, 1, 1), "b1": self.b1, "bn_g": self.gamma, "bn_b": self.beta, "bn_m": self.mean,
            "bn_v": self.var, "w2": self.w2.reshape(K, C, 1, 1), "b2": self.b2,
        }
        body = ["c = Conv(x, w1, b1)", bn("bn", "c", "z"), "r = Relu(z)", "y = Conv(r, w2, b2)"]
        self.model = model(f"(float[N,{C},{HW},{HW}] x) => (float[N,{K},{HW},{HW}] y)", body, arrays)

    def draw(self, n: int) -> np.ndarray:
        c = self.mean[None, :, None, None] + np.sqrt(self.var)[None, :, None, None] * self.rng.standard_normal((n, C, HW, HW))
        x = np.einsum("ij,njhw->nihw", np.linalg.inv(self.w1.astype(np.float64)), c - self.b1[None, :, None, None])
        return x.astype(np.float32)

    def relu_input(self, x: np.ndarray) -> np.ndarray:
        c = np.einsum("ij,njhw->nihw", self.w1.astype(np.float64), x.astype(np.float64)) + self.b1[None, :, None, None]
        s = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + EPS)
        return s[None, :, None, None] * (c - self.mean[None, :, None, None]) + self.beta[None, :, None, None]

    def reference(self, x: np.ndarray, *, spiq_on: bool, bits: int = 8, lam: float = 9.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.float32]:
        """Independent numpy fake-quant of docs/quantization.md (output, weight codes, bias codes, S)."""
        r = np.maximum(self.relu_input(x), 0.0)
        hi = np.maximum(self.beta + lam * np.abs(self.gamma), 0.0).astype(np.float64)  # range [β ± λ|γ|] after ReLU
        g = np.abs(self.gamma.astype(np.float64))
        mu = self.beta * norm.cdf(self.beta / g) + g * norm.pdf(self.beta / g)  # E[ReLU(N(β, γ²))]
        if spiq_on:
            step = hi / 255
            top = step.max()
            ratio = np.maximum(step / top, 1e-3)
        else:
            top, ratio = hi.max() / 255, np.ones(C)
        scale = np.float32(top)
        w2 = (self.w2.astype(np.float64) * ratio[None, :]).astype(np.float32)  # columns × r
        levels = 2 ** (bits - 1) - 1
        sw = (np.abs(w2).max(axis=1) / levels).astype(np.float32)
        codes = np.clip(np.rint(w2 / sw[:, None]), -levels, levels)
        w2_hat = codes * sw[:, None]
        bias = self.b2.astype(np.float64) + (w2.astype(np.float64) - w2_hat) @ (mu / ratio)  # eq. 3.8
        bias_scale = (scale * sw).astype(np.float32)
        bias_codes_ = np.rint(bias / bias_scale)
        a = np.clip(np.rint((r / ratio[None, :, None, None]).astype(np.float32) / scale), 0, 255) * scale
        y = np.einsum("kc,nchw->nkhw", w2_hat, a) + (bias_codes_ * bias_scale)[None, :, None, None]
        return y, codes, bias_codes_, scale


@pytest.fixture(scope="module")
def chain() -> BnChain:
    return BnChain()
