"""An isolated depthwise Conv goes back to float (passes/quantize, ``isolated_depthwise_to_float``).

In a MobileNetV3-style block (PP-OCR's classifier) the depthwise Conv sits between two
hard-swishes (float: ORT has no integer kernel for them), and its output feeds a squeeze-excite
gate (float too).  ORT then quantizes its input from float and only dequantizes its output:
both conversions buy nothing, and ORT's int8 depthwise kernel is not faster than its float one.
The fusion check sees this on the graph ORT builds and puts such a layer back in float with
its output quantizer; a depthwise Conv in a ReLU block (int8 in, int8 out) and a dense Conv
between float ops stay QLinearConv.  Checked on the graph ORT runs (QLinearConv, QuantizeLinear,
DequantizeLinear counts) and against FP32 in ORT.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnxopt.passes.quantize.fusion import ort_optimized_graph
from onnxopt.verify import run
from tests.conftest import run_passes
from tests.conftest import text_model as model
from tests.passes.quantize_builders import bn, bn_params, quantize_stats, relative_error, weights, with_data_statistics
from tests.passes.test_quantize_hardswish import CONSTANTS, paddle_hardswish

QUANTIZE = ("fold-batchnorm", "quantize")  # the statistics of the folded BN give the ranges
OPTIONS = {"weight_bits": 8, "act_bits": 8, "input_range": (-3.0, 3.0)}


def se_block_model(gate: bool = True) -> onnx.ModelProto:
    """x → Conv 3→16 → BN → hard-swish → depthwise 3×3 → BN → hard-swish → SE gate (GlobalAveragePool
    → Conv → Relu → Conv → HardSigmoid → Mul) → Conv 16→8 → BN → Conv 8→16 → BN → Relu → depthwise
    3×3 → BN → Relu → Conv 16→4 → y: the first depthwise is isolated, the second (ReLU block) is not.
    ``gate=False``: the project Conv reads the first depthwise's BN output (no hard-swish, no SE)."""
    se_gate = [
        *paddle_hardswish("zd", "hd"), "p = GlobalAveragePool(hd)", "s1 = Conv(p, ws1, bs1)", "r1 = Relu(s1)",
        "s2 = Conv(r1, ws2, bs2)", "g = HardSigmoid <alpha = 0.1666666716337204, beta = 0.5> (s2)", "m = Mul(hd, g)",
    ]
    arrays = {
        "w1": weights(16, 3, 1, 1), "wd": weights(16, 1, 3, 3, scale=0.6), "ws1": weights(4, 16, 1, 1), "bs1": weights(4),
        "ws2": weights(16, 4, 1, 1), "bs2": weights(16), "wp": weights(8, 16, 1, 1), "we": weights(16, 8, 1, 1),
        "wd2": weights(16, 1, 3, 3, scale=0.6), "wo": weights(4, 16, 1, 1), "bo": weights(4),
        **bn_params("bn1", 16, beta=(0.0, 1.5)), **bn_params("bnd", 16, beta=(0.0, 1.5)), **bn_params("bnp", 8),
        **bn_params("bne", 16), **bn_params("bnd2", 16), **CONSTANTS,
    }
    if not gate:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("ws", "bs"))}
    body = [
        "c1 = Conv(x, w1)", bn("bn1", "c1", "z1"), *paddle_hardswish("z1", "h1"),
        "cd = Conv <group = 16, pads = [1,1,1,1]> (h1, wd)", bn("bnd", "cd", "zd"),
        *(se_gate if gate else []),
        "cp = Conv(m, wp)" if gate else "cp = Conv(zd, wp)", bn("bnp", "cp", "zp"), "ce = Conv(zp, we)", bn("bne", "ce", "ze"), "re = Relu(ze)",
        "cd2 = Conv <group = 16, pads = [1,1,1,1]> (re, wd2)", bn("bnd2", "cd2", "zd2"), "rd2 = Relu(zd2)",
        "y = Conv(rd2, wo, bo)",
    ]
    proto = model("(float[N,3,12,12] x) => (float[N,4,12,12] y)", body, arrays)
    return with_data_statistics(proto, feeds(16, seed=3))  # BN statistics that describe the data, as training leaves them


def ort_ops(proto: onnx.ModelProto) -> Counter:
    """Op type → count in the graph ORT's CPU provider runs (ORT_ENABLE_ALL)."""
    return Counter(node.op_type for node in ort_optimized_graph(proto).graph.node)


def feeds(n: int = 4, seed: int = 7) -> dict[str, np.ndarray]:
    return {"x": np.clip(np.random.default_rng(seed).standard_normal((n, 3, 12, 12)), -3, 3).astype(np.float32)}


def test_isolated_depthwise_goes_back_to_float_with_its_conversions() -> None:
    proto = se_block_model()
    quantized, report = run_passes(proto, *QUANTIZE, **OPTIONS)
    kept, kept_report = run_passes(proto, *QUANTIZE, isolated_depthwise_to_float=False, **OPTIONS)
    stats, refusals = quantize_stats(report)
    # the SE Convs (the second has no statistics, the first is unfused), cd, the output Conv (unfused: a graph output)
    assert stats["coverage"]["reasons"] == {"no statistics": 1, "not fused by ORT": 2, "isolated depthwise": 1}
    assert {layer["layer"] for layer in stats["layers"]} == {"Conv->c1", "Conv->cp", "Conv->ce", "Conv->cd2"}  # cd2 (ReLU block) stays int8
    assert any(r["subject"] == "layer Conv->cd" and "isolated depthwise" in r["reason"] for r in refusals)
    assert quantize_stats(kept_report)[0]["coverage"]["reasons"] == {"no statistics": 1, "not fused by ORT": 2}
    ours, before = ort_ops(quantized), ort_ops(kept)
    # cd in float: one QLinearConv less, no QuantizeLinear of h1 nor DequantizeLinear(s) of cd's output;
    # the dense c1 between float ops (input from x, output to hard-swish) stays QLinearConv
    assert (before["QLinearConv"], ours["QLinearConv"]) == (5, 4)
    assert (before["QuantizeLinear"], ours["QuantizeLinear"]) == (3, 2)
    assert ours["DequantizeLinear"] == before["DequantizeLinear"] - 2
    assert ours["Conv"] + ours["FusedConv"] == before["Conv"] + before["FusedConv"] + 1
    expected = run(proto, feeds())["y"]
    error = relative_error(run(quantized, feeds())["y"], expected)
    assert error < 0.15  # W8A8 through five quantized activations of a random net (h1, m, cp, re, rd2)
    assert error <= relative_error(run(kept, feeds())["y"], expected) + 1e-6  # two quantizers fewer


def test_depthwise_with_an_integer_neighbour_stays_quantized() -> None:
    """Without the SE gate and the second hard-swish the depthwise output feeds the project Conv
    (int8 out): only its input is converted, not isolated, so it stays QLinearConv."""
    proto = se_block_model(gate=False)
    quantized, report = run_passes(proto, *QUANTIZE, **OPTIONS)
    stats, _ = quantize_stats(report)
    assert "isolated depthwise" not in stats["coverage"]["reasons"]
    assert {"Conv->cd", "Conv->cd2"} <= {layer["layer"] for layer in stats["layers"]}
    assert relative_error(run(quantized, feeds())["y"], run(proto, feeds())["y"]) < 0.15
