"""rex_combine="fold": a W4 base plus a REx order 2 folded into one int8 layer.

ORT's CPU provider computes every fused QDQ layer with int8 weight codes, whatever the
bit-width the codes were chosen for.  When the order-2 step of an expanded channel is an
integer fraction of its base step, ``s2_c = s1_c / m``, the two orders add up to integer
codes on one grid::

    R¹_c + R²_c = q1·s1_c + q2·s2_c = (m·q1 + q2)·s2_c

Order 1 is symmetric with ``|q1| ≤ L = 2^{b−1} − 1`` and leaves ``|W − R¹| ≤ s1/2`` (the
scale is max|W|/L: nothing clips), so ``q2 = round((W − R¹)/s2)`` stays within ``±⌈m/2⌉``
(b-bit codes as long as m ≤ 2L), and the folded codes within ``L·m + ⌈m/2⌉``: int8 codes
with the per-channel scale ``s2_c`` while that is ≤ 127.  Channels that are not expanded
keep ``q1`` and ``s1_c``.  Per-output-channel weight scales make every budget a single
QDQ layer: no branch, no Add, no re-quantization of a branch output, the base layer's
latency, and the sum of the two orders is exact.

Since ``m·q1`` is an integer, ``m·q1 + q2 = round(W/s2_c)``: a folded channel is the weight
quantized on the grid ``s1_c/m``, i.e. with ``L·m`` levels per side, and its cost is wider
codes, not a branch: MACs × the bits its codes need (``bops_relative_to_base``).

The divisor ladder (the default): each channel takes one rung of :func:`divisor_ladder`,
for every code width b+1 .. 8 the largest m ≤ 2L that fits it (4 bits: m = 2, 4, 8, 14 →
5, 6, 7, 8-bit codes; m = 2L is REx's own order-2 step, 98 levels per side).  The network
allocation (:func:`.allocation.allocate_network`) takes (layer, unit, rung) candidates by
the relative error a rung removes (measured per unit like the orders, with that rung's
divisor) per extra BOP (the unit's MACs × the rung's extra bits), a unit's rungs in order,
within γ × the folding layers' base BOPs: +100 % is m = 2L on every channel.
``rex_fold_divisor`` = m instead folds every expanded channel with that one m, counted
as one order per channel (γ: a share of MACs, the branch forms' accounting);
``rex_allocation="uniform"`` folds its share of every layer with the top rung m = 2L.

Does not fit (refused per layer: those layers keep their base quantization and the budget
counts only the layers that fold): a layer whose finest divisor (2L, or the explicit m)
gives codes beyond ±127 — weights of ≥ 5 bits (at 5 bits, m = 30: 15·30 + 15 = 465), e.g.
the first/last layers at 8 bits — and a divisor m > 2L (order-2 codes would clip).  K ≥ 3
is refused for the whole run (4 bits, m = 7: L·(m² + m) + ⌈m/2⌉ = 396 > 127).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.graph import NameFactory, constant_values, node_label, producer
from onnxopt.pass_base import PassContext

from ..common.emit import quantize_layer_bias
from ..common.operators import QuantizedWeight, UniformWeightOperator
from ..common.quantization import QuantizedLayer
from .site import mean_shift, scalar_value

INT8_PEAK = 127
UNIFORM = UniformWeightOperator()


def levels(bits: int) -> int:
    """Largest symmetric code of a b-bit weight, L = 2^{b−1} − 1."""
    return 2 ** (bits - 1) - 1


def top_divisor(bits: int) -> int:
    """m = 2L, REx's own order-2 step for a residual of at most s1/2 (order-2 codes ±L):
    the finest divisor that keeps the order-2 codes within the b-bit range."""
    return max(2 * levels(bits), 2)


def fold_peak(bits: int, divisor: int | np.ndarray) -> int | np.ndarray:
    """Largest |m·q1 + q2| of a folded channel: L·m + ⌈m/2⌉ (m: one divisor or an array)."""
    return levels(bits) * divisor - (-divisor // 2)


def code_bits(peak: int | np.ndarray) -> int | np.ndarray:
    """Signed bits of codes up to ±peak: ⌈log2(peak + 1)⌉ + 1 (at least 2)."""
    bits = np.maximum(np.ceil(np.log2(np.asarray(peak) + 1)).astype(int) + 1, 2)
    return int(bits) if bits.ndim == 0 else bits


def divisor_ladder(bits: int) -> tuple[int, ...]:
    """The rungs of a b-bit layer's fold: for each code width t = b+1 .. 8, the largest
    divisor m ≤ 2L whose folded codes fit t bits (4 bits: m = 2, 4, 8, 14 → 5, 6, 7, 8-bit
    codes).  Empty when even m = 2 does not fit int8."""
    ladder: list[int] = []
    for width in range(bits + 1, 9):
        fitting = [m for m in range(2, top_divisor(bits) + 1) if code_bits(fold_peak(bits, m)) <= width]
        if fitting and fitting[-1] not in ladder:
            ladder.append(fitting[-1])
    return tuple(ladder)


def rung_bits(bits: int, ladder: tuple[int, ...]) -> np.ndarray:
    """Code bits of the base (b) and of each rung of the ladder."""
    return np.array([bits, *(code_bits(fold_peak(bits, m)) for m in ladder)], np.int64)


def fold_refusal(bits: int, divisor: int) -> str | None:
    """Why a b-bit layer cannot fold order 2 with step s1/m into int8 codes (None: it can)."""
    if divisor > 2 * levels(bits):
        return f"rex fold: divisor m = {divisor} > 2·(2^{bits - 1} − 1): order-2 codes of a {bits}-bit residual would clip"
    peak = fold_peak(bits, divisor)
    if peak > INT8_PEAK:
        return (f"rex fold: {bits}-bit weights with order-2 step s1/{divisor} need codes up to ±{peak} "
                f"(L·m + ⌈m/2⌉) > 127: not one int8 layer")
    return None


def auto_combine(options: Mapping[str, Any], quantized_layers: Mapping[str, QuantizedLayer]) -> str:
    """``rex_combine="auto"`` (the default): ``"fold"`` where it applies — K = 2, the uniform
    operator, no input expansion or outlier residue, and a base whose codes fold into int8
    (≤ 4-bit weights) — since it runs at the base's speed; ``"permute"`` otherwise."""
    fits = any(fold_refusal(layer.bits, top_divisor(layer.bits)) is None for layer in quantized_layers.values())
    applies = (
        options["rex_order"] == 2
        and options["rex_operator"] == "uniform"
        and not options["rex_input_expansion"]
        and not options["rex_outliers"]
        and options["rex_weight_only"] is None
        and fits
    )
    return "fold" if applies else "permute"


def check_fold_options(options: dict[str, Any]) -> None:
    """Run-wide refusals of rex_combine="fold" (PipelineError, exit 7)."""
    if options["rex_combine"] != "fold":
        if options["rex_fold_divisor"] is not None:
            raise PipelineError("rex: rex_fold_divisor only applies to rex_combine='fold'")
        return
    divisor = options["rex_fold_divisor"]
    if divisor is not None and (not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 2):
        raise PipelineError(f"rex: rex_fold_divisor must be an integer m ≥ 2 (order-2 step s1/m), got {divisor!r}")
    if options["rex_order"] > 2:
        raise PipelineError(
            f"rex: rex_combine='fold' folds one residual order into int8 codes; K = {options['rex_order']} does not fit "
            "(4 bits, m = 7: order 3 needs codes up to ±396 > 127): use K = 2 or a branch form (permute, gather)"
        )
    if options["rex_operator"] != "uniform":
        raise PipelineError(f"rex: rex_combine='fold' needs the uniform weight operator (integer codes on one grid), got {options['rex_operator']!r}")
    if options["rex_input_expansion"] or options["rex_outliers"]:
        raise PipelineError("rex: rex_combine='fold' emits no branch: it cannot carry rex_input_expansion or rex_outliers; use a branch form")


def prepare_fold(sites: list, options: dict[str, Any], ctx: PassContext) -> list:
    """The sites whose codes fit int8, each given its divisors (``site.fold``: the ladder
    of :func:`divisor_ladder`, or ``(m,)`` for an explicit ``rex_fold_divisor``); a layer
    folds only if its finest divisor (m = 2L, or the explicit m) fits.  The others are
    refused (reported) and keep their base quantization: a branch beside a folded network
    would bring back the re-quantized sum the fold removes (the 8-bit first/last layers
    have little residual left anyway)."""
    kept, explicit = [], options["rex_fold_divisor"]
    for site in sites:
        reason = fold_refusal(site.bits, explicit or top_divisor(site.bits))
        if reason:
            ctx.refuse(f"layer {node_label(site.node)}", f"{reason}: left at its base quantization (a branch form, e.g. rex_combine='gather', expands it)")
            continue
        site.fold = (explicit,) if explicit else divisor_ladder(site.bits)
        kept.append(site)
    return kept


def channel_divisors(ladder: tuple[int, ...], unit_rungs: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Per output channel, the divisor m of its unit's rung (``unit_rungs``: 0 = not
    expanded, r = ``ladder[r − 1]``); 1 on the channels that are not expanded."""
    table = np.array([1, *ladder], np.int64)
    return table[np.asarray(unit_rungs, np.int64)[units]]


def base_step_quantize(sub: np.ndarray, q1: QuantizedWeight, channels: np.ndarray, divisor: int | np.ndarray, out_axis: int) -> QuantizedWeight:
    """Order-k codes of the residual ``sub`` (the weight's ``channels``) on the step
    ``s1/divisor`` of the base scales ``q1`` (clipped to the b-bit range); ``divisor`` is
    one m, or one per channel of ``sub`` (then the scales are per output channel even
    when ``q1``'s are per tensor)."""
    top = levels(q1.bits)
    base = np.asarray(q1.scales, np.float32)
    base = base if q1.axis is None else base[channels]
    axis = q1.axis if np.ndim(divisor) == 0 else out_axis
    scales = (base / np.asarray(divisor, np.float32)).astype(np.float32)
    shape = [1] * sub.ndim
    if axis is not None:
        shape[axis] = -1
    codes = np.clip(np.round(sub / np.reshape(scales, shape)), -top, top).astype(np.int8)
    return QuantizedWeight(codes, scales, axis, q1.bits, {"divisor": divisor})


def folded_weight(expansion, out_axis: int) -> QuantizedWeight:
    """One int8 weight holding R¹ + R²: codes ``m·q1 + q2`` with scale ``s1/m`` on the
    order-2 channels (m: the order's divisor, one or one per channel), ``q1`` with ``s1``
    elsewhere (per-output-channel scales)."""
    first, second = expansion.orders[0], expansion.orders[1]
    divisor = second.q.params["divisor"]
    c = first.q.codes.shape[out_axis]
    codes = first.q.codes.astype(np.int32)
    scales = np.broadcast_to(np.asarray(first.q.scales, np.float32), (c,)).copy()
    index = [slice(None)] * codes.ndim
    index[out_axis] = second.channels
    shape = [1] * codes.ndim
    shape[out_axis] = -1
    multiplier = np.reshape(np.asarray(divisor, np.int32), shape if np.ndim(divisor) else [])
    codes[tuple(index)] = multiplier * codes[tuple(index)] + second.q.codes.astype(np.int32)
    scales[second.channels] = np.broadcast_to(second.q.scales, (len(second.channels),))
    peak = int(np.abs(codes).max(initial=0))
    if peak > INT8_PEAK:  # fold_refusal rules this out; a violation is a bug, not a user error
        raise AssertionError(f"rex fold: folded codes reach {peak} > 127 (divisor {divisor})")
    return QuantizedWeight(codes.astype(np.int8), scales, out_axis, 8, {"divisor": divisor})


def channel_bits(q: QuantizedWeight, out_axis: int) -> np.ndarray:
    """Signed bits each output channel's codes need: ⌈log2(max|code| + 1)⌉ + 1 (at least 2)."""
    moved = np.abs(np.moveaxis(q.codes.astype(np.int32), out_axis, 0)).reshape(q.codes.shape[out_axis], -1)
    return np.atleast_1d(code_bits(moved.max(axis=1)))


def fold_layer(graph: gs.Graph, site, expansion, names: NameFactory) -> QuantizedWeight:
    """Replace the layer's weight DequantizeLinear by the folded one and move the bias to the
    new scales (with the order-2 bias correction ``−R²·E[X]`` when the base was corrected);
    returns the folded weight.  A MatMul's correction is made by the caller, in the Add after it."""
    folded = folded_weight(expansion, site.out_axis)
    node = site.node
    node.inputs[1] = UNIFORM.emit(graph, folded, names, f"{node_label(node)}_rex_fold_weight")
    if node.op != "MatMul":
        _fold_bias(graph, site, expansion.orders[1], folded.scales, names)
    return folded


def _fold_bias(graph: gs.Graph, site, second, scales: np.ndarray, names: NameFactory) -> None:
    """Bias − R²·E[X] on the folded channels, re-quantized to int32 with S_x·s_w for the new
    weight scales when it was quantized (ORT fuses only that form)."""
    node = site.node
    bias, quantized = _current_bias(node)
    had_bias = bias is not None
    shift = None if site.mean is None else mean_shift(site, second.dequantized, second.channels)
    if bias is None and shift is None:
        return
    c = site.weight.shape[site.out_axis]
    bias = np.zeros(c) if bias is None else bias
    if shift is not None:
        bias[second.channels] -= shift
    constant = gs.Constant(names.new(f"{node_label(node)}_rex_fold_bias"), bias.astype(np.float32))
    if len(node.inputs) > 2:
        node.inputs[2] = constant
    else:
        node.inputs.append(constant)
    if site.input_dq is not None and (quantized or not had_bias):
        quantize_layer_bias(graph, node, scalar_value(site.input_dq.inputs[1]), scales, names)


def _current_bias(node: gs.Node) -> tuple[np.ndarray | None, bool]:
    """The layer's bias in float64 (dequantized when it is a DequantizeLinear of int32
    codes) and whether it was quantized."""
    if len(node.inputs) < 3 or node.inputs[2] is None or (isinstance(node.inputs[2], gs.Variable) and not node.inputs[2].inputs and not node.inputs[2].name):
        return None, False
    values = constant_values(node, 2)
    if values is not None:
        return values.astype(np.float64).copy(), False
    dq = producer(node.inputs[2])
    if dq is None or dq.op != "DequantizeLinear":
        raise PipelineError(f"rex fold: bias of {node_label(node)} is neither a constant nor a DequantizeLinear of one")
    codes, scale = constant_values(dq, 0), constant_values(dq, 1)
    zero = constant_values(dq, 2)
    zero = 0 if zero is None else zero.astype(np.float64)
    return (codes.astype(np.float64) - zero) * scale.astype(np.float64), True


__all__ = [
    "base_step_quantize", "channel_divisors", "check_fold_options", "code_bits", "divisor_ladder", "fold_layer", "fold_peak", "fold_refusal",
    "folded_weight", "prepare_fold", "rung_bits", "top_divisor",
]
