"""What the quantizers (quantize, power-quant, rex) share beyond the arithmetic: which layers
can be quantized, the coverage line and the error naming the fix when none was, the checks of
the bit-width and range options, and the bias correction (W − Ŵ)·E[X] (DFQ).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import NameFactory, constant_values, node_label, optional_input, set_constant_input
from onnxopt.options import OptionProblem, option

from .calibration import CalibrationOptions
from .layers import transposed_weight

#: Why a layer stayed float, as counted in the coverage line: reason prefix -> short label.
FLOAT_LABELS = (
    ("no statistics", "no statistics"),
    ("not fused by ORT", "not fused by ORT"),
    ("depthwise before float ops", "depthwise before float ops"),
    ("weight is not a float initializer", "non-constant weight"),
    ("float16", "float16 layers"),
    ("float64", "float64 layers"),
    ("bias is not an initializer", "non-constant bias"),
    ("Gemm with", "Gemm with transA or alpha/beta"),
    ("MatMul other than", "MatMul not x × W"),
)
#: The fix named by the NothingToDoError for the most frequent reason no layer was quantized.
FIXES = {
    "not fused by ORT": "ORT fuses a QDQ Conv into QLinearConv only when its output is quantized too; a Conv whose output is "
    "a graph output or has no range stays float (an unfused QDQ Conv is slower than the float one; --no-unfused-conv-float keeps it QDQ)",
    "no statistics": "pass --calibration-data samples.npz (10 real inputs are enough) or export with BN kept (onnxopt.export_torch)",
    "float16 layers": "quantize supports float32 models; convert with onnxconverter-common's float16 → float32 first",
    "float64 layers": "quantize supports float32 models; convert the model's double tensors to float32 first",
}


def layer_refusal(node: gs.Node) -> str | None:
    """Why the weight of layer ``node`` cannot be quantized (None when it can); shared with
    the other quantizers (power-quant)."""
    weight = constant_values(node, 1)
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return "weight is not a float initializer"
    if weight.dtype != np.float32:  # QuantizeLinear takes float16 only from opset 19, double never
        return f"{weight.dtype} weights and activations: quantize supports float32 models only"
    if optional_input(node, 2) is not None and constant_values(node, 2) is None:
        return "bias is not an initializer"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta ≠ 1"
    if node.op == "MatMul" and (weight.ndim != 2 or not _matrix_rows(node.inputs[0], weight.shape[0])):
        return "MatMul other than x[…, K] × constant matrix W[K, N]"
    return None


def no_layer_message(pass_name: str, coverage: dict[str, Any], cause: str | None = None) -> str:
    """``<pass>: 0 of N layers quantized: <cause>; <fix>`` (the fix of the most frequent reason);
    ``cause`` defaults to the counted reasons."""
    if not coverage["total"]:
        return f"{pass_name}: the model has no Conv, ConvTranspose, Gemm or MatMul layer to quantize"
    reasons = Counter(coverage["reasons"])
    main = reasons.most_common(1)[0][0] if reasons else "other"
    cause = cause or ", ".join(f"{n} {label}" for label, n in reasons.most_common())
    fix = FIXES.get(main, "only Conv/ConvTranspose/Gemm/MatMul layers with constant float32 weights are quantized")
    return f"{pass_name}: 0 of {coverage['total']} layers quantized: {cause}; {fix}"


def float_label(reason: str) -> str:
    """The short label of a refusal ``reason`` in the coverage line."""
    return next((label for prefix, label in FLOAT_LABELS if reason.startswith(prefix)), "other")


def _matrix_rows(tensor: gs.Tensor, depth: int) -> bool:
    """``tensor`` is a 2-D [M, K] or 3-D [B, T, K] input (transformer linear layer) with K = ``depth``."""
    shape = tensor.shape
    if shape is None or len(shape) not in (2, 3):
        return False
    return not isinstance(shape[-1], int) or shape[-1] == depth


@dataclass(frozen=True)
class QuantizedLayer:
    """What the quantize pass leaves for later passes (REx) about one layer it quantized."""

    #: the float weight, after the SPIQ scales were folded into it
    float_weight: np.ndarray
    bits: int
    per_channel: bool
    #: E[x] per input channel that the bias correction used (None without bias correction)
    input_mean: np.ndarray | None
    #: E[x²] per input channel (data-free estimate, after SPIQ), for REx's error weighting
    input_moment: np.ndarray | None


@dataclass
class QuantizedLayers:
    """The quantize pass's artifact: the layers it quantized statically, by output tensor name."""

    layers: dict[str, QuantizedLayer]


@dataclass(frozen=True)
class QuantizationOptions(CalibrationOptions):
    """The options quantize and power-quant share: bit-widths, where activation ranges come
    from (BN/LayerNorm statistics or calibration data) and how wide they are."""

    weight_bits: int = option(8, flag="--quantize")
    act_bits: int = option(8, flag="--quantize")
    #: bits of the first and last layers (None: the same as the others)
    first_last_bits: int | None = 8
    act_ranges: Literal["bn", "minmax", "percentile", "moments"] = option("bn", flag="--act-ranges")
    #: BN range width in standard deviations (None: 9 at 8 bits, 4 at <= 6 bits)
    lam: float | None = option(None, flag="--lambda")
    input_range: tuple[float, float] | None = option(None, flag="--input-range")
    add_range: Literal["sum", "independent"] = "sum"
    bias_correction: bool = option(True, flag="--no-bias-correction")

    def check(self) -> None:
        super().check()
        for key in ("weight_bits", "act_bits"):
            if not 2 <= self[key] <= 8:
                raise OptionProblem(key, f"must be an integer in 2..8, got {self[key]!r}")
        if self.first_last_bits is not None and self.first_last_bits not in range(2, 9):
            raise OptionProblem("first_last_bits", f"must be None or an integer in 2..8, got {self.first_last_bits!r}")
        if self.lam is not None and self.lam <= 0:
            raise OptionProblem("lam", f"must be a finite positive number of standard deviations, got {self.lam!r}")
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise OptionProblem("input_range", f"needs finite low < high, got {self.input_range!r}")
        if self.act_ranges != "bn" and not self.calibration_data:
            raise OptionProblem("act_ranges", f"{self.act_ranges!r} needs calibration data (--calibration-data x.npz)")
        if self.act_ranges == "bn" and self.calibration_data:
            raise OptionProblem("calibration_data", "is only used with act_ranges='minmax', 'percentile' or 'moments'")


def correct_matmul_bias(graph: gs.Graph, layer: gs.Node, correction: np.ndarray | None, names: NameFactory) -> bool:
    """A MatMul's bias is the constant [N] operand of the Add reading its output (a Linear
    exported from PyTorch): add the correction there.  False (left as is) without such an Add."""
    out = layer.outputs[0]
    if correction is None or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return False
    add = out.outputs[0]
    index = 1 if add.inputs[0] is out else 0
    bias = constant_values(add, index)
    if bias is None or bias.shape[-1:] != correction.shape or bias.size != correction.size:
        return False
    corrected = (bias.astype(np.float64) + correction.reshape(bias.shape)).astype(bias.dtype)
    set_constant_input(graph, add, index, corrected, names, base_name=f"{node_label(layer)}_bias")
    return True


def mean_shift(layer: gs.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """(W − Ŵ)·E[X] per output channel (summed over kernel positions); None if shapes differ."""
    if layer.op == "Conv":
        groups = int(layer.attrs.get("group", 1))
        out, per_group = delta.shape[0], delta.shape[1]
        if len(mean) != groups * per_group:
            return None
        grouped = delta.reshape(groups, out // groups, per_group, -1)
        return np.einsum("gojk,gj->go", grouped, mean.reshape(groups, per_group)).reshape(out)
    k_by_n = delta.T if transposed_weight(layer) else delta
    return mean @ k_by_n if len(mean) == k_by_n.shape[0] else None
