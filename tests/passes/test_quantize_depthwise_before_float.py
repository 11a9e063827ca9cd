"""A depthwise Conv whose output only float ops read goes back to float (passes/quantize,
``float_depthwise_before_float``).

In a MobileNetV3-style block (PP-OCR's classifier) the depthwise Conv's output goes to a
hard-swish and a squeeze-excite gate, both float: ORT dequantizes its int8 output anyway, and
its int8 depthwise kernel is slower than its float one.  The fusion check sees this on the graph
ORT builds and puts such a layer back in float with its output quantizer; a depthwise Conv
feeding an int8 layer (a ReLU block's project Conv) and a dense Conv before float ops stay
QLinearConv.  Checked on the graph ORT runs (QLinearConv, QuantizeLinear, DequantizeLinear
counts) and against FP32 in ORT.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnxopt.passes.quantize.fusion import ort_optimized_graph

from onnxopt.verify import run
from tests.conftest import run_passes
from tests.conftest import text_model as model
from tests.passes.quantize_builders import (
    bn,
    intermediate,
    quantize_stats,
    relative_error,
    with_data_statistics,
)
from tests.passes.test_quantize_hardswish import CONSTANTS, paddle_hardswish

QUANTIZE = ("fold-batchnorm", "quantize")  # the statistics of the folded BN give the ranges
OPTIONS = {"weight_bits": 8, "act_bits": 8, "input_range": (-3.0, 3.0)}
LABEL = "depthwise before float ops"


def parameters(seed: int = 5):
    """weights(*shape, scale) and bn_params(prefix, channels, beta) from one generator per model:
    the same net whatever ran before."""
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.4) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def bn_params(prefix: str, channels: int, beta: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
        return {
            f"{prefix}_g": rng.uniform(0.5, 1.5, channels).astype(np.float32), f"{prefix}_b": rng.normal(*beta, channels).astype(np.float32),
            f"{prefix}_m": rng.normal(0, 1, channels).astype(np.float32), f"{prefix}_v": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        }

    return weights, bn_params


def feeds(n: int = 4, seed: int = 7) -> dict[str, np.ndarray]:
    return {"x": np.clip(np.random.default_rng(seed).standard_normal((n, 3, 12, 12)), -3, 3).astype(np.float32)}


def se_block_model(first: str = "hardswish", gate: bool = True, after: str = "hardswish") -> onnx.ModelProto:
    """x → Conv c1 3→16 → BN → ``first`` (hard-swish or Relu) → depthwise cd 3×3 → BN → [hard-swish →
    SE gate (GlobalAveragePool → Conv → Relu → Conv → HardSigmoid → Mul)] → Conv cp 16→8 → BN → Conv ce
    8→16 → BN → Relu → depthwise cd2 3×3 → BN → Relu → Conv cq 16→8 → BN → Relu → Conv 8→4 → y.
    ``gate=False``: cp reads cd's BN output (int8 out).  ``after="relu"``: a Relu instead of the hard-swish
    after cd (ORT first fuses GlobalAveragePool → Q into QLinearGlobalAveragePool, until the first SE Conv,
    unfused, goes back to float).  cd2 (ReLU block) always feeds cq."""
    weights, bn_params = parameters()
    se_gate = [
        *(paddle_hardswish("zd", "hd") if after == "hardswish" else ["hd = Relu(zd)"]), "p = GlobalAveragePool(hd)", "s1 = Conv(p, ws1, bs1)", "r1 = Relu(s1)",
        "s2 = Conv(r1, ws2, bs2)", "g = HardSigmoid <alpha = 0.1666666716337204, beta = 0.5> (s2)", "m = Mul(hd, g)",
    ]
    arrays = {
        "w1": weights(16, 3, 1, 1), "wd": weights(16, 1, 3, 3, scale=0.6), "ws1": weights(4, 16, 1, 1), "bs1": weights(4),
        "ws2": weights(16, 4, 1, 1), "bs2": weights(16), "wp": weights(8, 16, 1, 1), "we": weights(16, 8, 1, 1),
        "wd2": weights(16, 1, 3, 3, scale=0.6), "wq": weights(8, 16, 1, 1), "wo": weights(4, 8, 1, 1), "bo": weights(4),
        **bn_params("bn1", 16, beta=(0.0, 1.5)), **bn_params("bnd", 16, beta=(0.0, 1.5)), **bn_params("bnp", 8),
        **bn_params("bne", 16), **bn_params("bnd2", 16), **bn_params("bnq", 8), **CONSTANTS,
    }
    if not gate:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("ws", "bs"))}
    if first == "relu" and not gate:
        arrays = {k: v for k, v in arrays.items() if k not in CONSTANTS}
    body = [
        "c1 = Conv(x, w1)", bn("bn1", "c1", "z1"), *(paddle_hardswish("z1", "h1") if first == "hardswish" else ["h1 = Relu(z1)"]),
        "cd = Conv <group = 16, pads = [1,1,1,1]> (h1, wd)", bn("bnd", "cd", "zd"), *(se_gate if gate else []),
        "cp = Conv(m, wp)" if gate else "cp = Conv(zd, wp)", bn("bnp", "cp", "zp"), "ce = Conv(zp, we)", bn("bne", "ce", "ze"),
        "re = Relu(ze)", "cd2 = Conv <group = 16, pads = [1,1,1,1]> (re, wd2)", bn("bnd2", "cd2", "zd2"), "rd2 = Relu(zd2)",
        "cq = Conv(rd2, wq)", bn("bnq", "cq", "zq"), "rq = Relu(zq)", "y = Conv(rq, wo, bo)",
    ]
    proto = model("(float[N,3,12,12] x) => (float[N,4,12,12] y)", body, arrays)
    return with_data_statistics(proto, feeds(16, seed=3))  # BN statistics that describe the data, as training leaves them


def ort_ops(proto: onnx.ModelProto) -> Counter:
    """Op type → count in the graph ORT's CPU provider runs (ORT_ENABLE_ALL)."""
    return Counter(node.op_type for node in ort_optimized_graph(proto).graph.node)


def quantize_both(proto: onnx.ModelProto):
    """(with the rule, its report), (without it, its report)."""
    return run_passes(proto, *QUANTIZE, **OPTIONS), run_passes(proto, *QUANTIZE, float_depthwise_before_float=False, **OPTIONS)


@pytest.mark.parametrize(("first", "after"), [("hardswish", "hardswish"), ("relu", "hardswish"), ("relu", "relu")])
def test_depthwise_before_float_ops_goes_back_to_float_with_its_output_quantizer(first: str, after: str) -> None:
    """hard-swish before cd: ORT quantized cd's input from float too (one QuantizeLinear less);
    Relu before cd: c1's int8 output fed it, so the DequantizeLinear moves before cd (c1 stays int8).
    Relu after cd: found on the second fusion check, after the first SE Conv went back to float."""
    proto = se_block_model(first, after=after)
    (quantized, report), (kept, kept_report) = quantize_both(proto)
    stats, refusals = quantize_stats(report)
    # the SE Convs (the second has no statistics, the first is unfused), cd, the output Conv (unfused: a graph output)
    assert stats["coverage"]["reasons"] == {"no statistics": 1, "not fused by ORT": 2, LABEL: 1}
    assert {layer["layer"] for layer in stats["layers"]} == {f"Conv->{n}" for n in ("c1", "cp", "ce", "cd2", "cq")}
    assert any(r["subject"] == "layer Conv->cd" and r["reason"].startswith(LABEL) for r in refusals)
    assert quantize_stats(kept_report)[0]["coverage"]["reasons"] == {"no statistics": 1, "not fused by ORT": 2}
    ours, before = ort_ops(quantized), ort_ops(kept)
    assert (before["QLinearConv"], ours["QLinearConv"]) == (6, 5)
    assert ours["QuantizeLinear"] == before["QuantizeLinear"] - (1 if first == "hardswish" else 0)
    assert ours["QLinearGlobalAveragePool"] == before["QLinearGlobalAveragePool"] == 0
    assert ours["DequantizeLinear"] <= before["DequantizeLinear"] - (2 if first == "hardswish" else 0)
    assert ours["Conv"] + ours["FusedConv"] == before["Conv"] + before["FusedConv"] + 1
    gated = [relative_error(intermediate(m, "m", feeds()), intermediate(proto, "m", feeds())) for m in (quantized, kept)]
    assert gated[0] < gated[1] < 0.1  # the SE output, behind cd: one quantizer fewer on its path
    assert relative_error(run(quantized, feeds())["y"], run(proto, feeds())["y"]) < 0.1  # W8A8 through six quantized activations


def test_depthwise_feeding_an_int8_layer_stays_quantized() -> None:
    """Without the SE gate and the hard-swish after it, cd's output feeds cp (int8 out): it stays QLinearConv."""
    proto = se_block_model(gate=False)
    (quantized, report), (kept, _) = quantize_both(proto)
    stats, _ = quantize_stats(report)
    assert LABEL not in stats["coverage"]["reasons"]
    assert {"Conv->cd", "Conv->cd2"} <= {layer["layer"] for layer in stats["layers"]}
    assert ort_ops(quantized) == ort_ops(kept)
    assert relative_error(run(quantized, feeds())["y"], run(proto, feeds())["y"]) < 0.1
