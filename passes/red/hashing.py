"""hash-weights: per-layer adaptive KDE weight hashing (RED, thesis §2.1, docs/pruning.md).

Before::   Conv(W) with W holding ~#W distinct float values
After::    Conv(h(W)) with h(W) holding a few hundred distinct values (same graph structure)

Maths (thesis eqs. 2.3–2.4):

* density of the layer's scalar weights: Gaussian KDE with bandwidth Δ = median of the
  differences of consecutive sorted distinct weight values (eq. 2.3; when that median is
  0, the median of the non-zero differences);
* the local minima m_k of the density partition the real line; every weight in
  [m_k, m_{k+1}] is replaced by the density's local maximum M_k of that interval (eq. 2.4).

The KDE is binned: a histogram on a grid of step Δ/2 convolved with the sampled Gaussian
(directly for the usual short kernel — faster than FFT there — else
``scipy.signal.fftconvolve``), so the cost is linear in the grid, not O(#W · grid).  The
grid has at most ``max_bins`` = 2²² points: for the largest layers, whose Δ is tiny next to
their range, the step grows to range/max_bins and the density is resolved at that step
(reported as ``grid_step``; U then uses max(Δ, step)).  Extrema are read on the grid: a
local minimum is the last point of a descent or plateau before an ascent, so zero-density
gaps separate intervals.

Error bound reported per layer (eq. 2.8): ``U = min(Δ/√(2π)·(√(2/π)+√3),
Σ_k (m_{k+1}−m_k)·P(w ∈ [m_k, m_{k+1}]))`` bounds E_{|x|≤1}|wx − w̃x|; the measured
E|w − w̃| is reported next to it.  When BN statistics of a layer's output are known (the
``onnxopt.bn_statistics`` metadata kept by fold-batchnorm, or a BN still reading it) the
network bound of eq. 2.9 is also reported over those layers.

Layers: Conv, ConvTranspose, Gemm and MatMul whose weight (input 1) is a float initializer
read by the layer only (a shared or graph-output weight is refused: hashing it would change
other readers).  Biases are left exact.  Lossy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from scipy.special import erf

from onnxopt.graph import (
    NameFactory,
    is_default_domain,
    is_graph_output,
    node_label,
    optional_input,
    set_constant_input,
)
from onnxopt.options import OptionProblem, PassOptions
from onnxopt.pass_base import Pass, PassContext, PassResult, Stage

from ..common.layers import transposed_weight
from ..common.ops import LAYER_OPS
from ..common.statistics import bn_statistics

MONOMODAL_FACTOR = (math.sqrt(2.0 / math.pi) + math.sqrt(3.0)) / math.sqrt(2.0 * math.pi)
#: grid points per bandwidth and kernel half-width (in bandwidths) of the binned KDE
BINS_PER_BANDWIDTH = 2
KERNEL_HALF_WIDTH = 4.0


@dataclass
class HashResult:
    """Hashed values and the per-layer quantities of eqs. 2.3–2.8."""

    values: np.ndarray
    bandwidth: float
    grid_step: float
    distinct_before: int
    distinct_after: int
    bound: float  # U of eq. 2.8
    mean_abs_error: float  # measured E|w - h(w)|


def bandwidth(sorted_distinct: np.ndarray) -> float:
    """Δ of eq. 2.3: median consecutive difference of the sorted (distinct) weights."""
    diffs = np.diff(sorted_distinct)
    if diffs.size == 0:
        return 0.0
    delta = float(np.median(diffs))
    if delta <= 0.0:
        positive = diffs[diffs > 0]
        delta = float(np.median(positive)) if positive.size else 0.0
    return delta


def _segment_ids(density: np.ndarray) -> np.ndarray:
    """Interval index per grid point: a new interval starts at each local minimum (the last
    point of a descent or plateau before an ascent; zero-density gaps therefore separate)."""
    minima = np.zeros(density.size, dtype=np.int32)
    minima[1:-1] = (density[1:-1] <= density[:-2]) & (density[1:-1] < density[2:])
    return np.cumsum(minima, dtype=np.int32)


def hash_values(weights: np.ndarray, max_bins: int = 1 << 22) -> HashResult:
    """Adaptive KDE hashing of one layer's weights (eqs. 2.3, 2.4, 2.8)."""
    flat = np.asarray(weights).reshape(-1)
    ordered = np.sort(flat)
    distinct = ordered[np.r_[True, ordered[1:] != ordered[:-1]]].astype(np.float64)
    delta = bandwidth(distinct)
    if distinct.size < 3 or delta <= 0.0:
        return HashResult(np.asarray(weights).copy(), delta, 0.0, distinct.size, distinct.size, 0.0, 0.0)
    low, high = float(distinct[0]) - KERNEL_HALF_WIDTH * delta, float(distinct[-1]) + KERNEL_HALF_WIDTH * delta
    step = max(delta / BINS_PER_BANDWIDTH, (high - low) / max_bins)
    bins = int(math.ceil((high - low) / step)) + 1
    index = np.minimum(((flat - low) / step).astype(np.int64), bins - 1)
    histogram = np.bincount(index, minlength=bins).astype(np.float32)
    half = int(math.ceil(KERNEL_HALF_WIDTH * delta / step))
    offsets = np.arange(-half, half + 1) * step
    kernel = np.exp(-0.5 * (offsets / delta) ** 2).astype(np.float32)
    if kernel.size <= 65:  # the usual short kernel: direct convolution is faster than FFT and exact-zero in gaps
        density = np.convolve(histogram, kernel, mode="same")
    else:
        from scipy.signal import fftconvolve  # imported when used: scipy.signal is slow to import (it pulls scipy.stats)

        density = fftconvolve(histogram, kernel, mode="same")
        density[density < 1e-9 * density.max()] = 0.0  # FFT round-off in the tails would create spurious extrema
    segment = _segment_ids(density)
    starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
    seg_max = np.maximum.reduceat(density, starts)
    at_max = np.flatnonzero(density == seg_max[segment])
    first_seg, first_pos = np.unique(segment[at_max], return_index=True)
    maxima = np.empty(seg_max.size)
    maxima[first_seg] = low + (at_max[first_pos] + 0.5) * step  # grid-point centres of the maxima
    weight_segment = segment[index]
    hashed = maxima[weight_segment]
    # U_part (eq. 2.6): interval widths weighted by their probability mass
    edges = np.r_[low, low + starts[1:] * step, high]
    mass = np.bincount(weight_segment, minlength=seg_max.size) / flat.size
    u_part = float(np.sum(np.diff(edges) * mass))
    u_mono = MONOMODAL_FACTOR * max(delta, step)  # the grid resolves the density at max(Δ, step)
    values = hashed.astype(np.asarray(weights).dtype).reshape(np.shape(weights))
    return HashResult(
        values,
        delta,
        step,
        int(distinct.size),
        int(np.count_nonzero(mass)),  # one value per occupied interval
        min(u_mono, u_part),
        float(np.mean(np.abs(values.reshape(-1).astype(np.float64) - flat))),
    )


def network_bound(layers: list[dict[str, Any]]) -> float | None:
    """Eq. 2.9 over the layers that have BN statistics (mean β, std γ of their output)."""
    terms = [layer for layer in layers if "beta" in layer]
    if not terms:
        return None
    product, beta_product = 1.0, 1.0
    for layer in terms:
        beta, gamma = layer["beta"], max(layer["gamma"], 1e-12)
        active = 1.0 - erf(-beta / (gamma * math.sqrt(2.0)))
        product *= layer["bound"] / (2.0 * math.sqrt(layer["fan_in"])) * active + beta
        beta_product *= beta
    return float(product - beta_product)


def _fan_in(node: gs.Node, weights: np.ndarray) -> int:
    if node.op in ("Conv", "ConvTranspose"):
        return int(np.prod(weights.shape[1:]))
    return int(weights.shape[1] if transposed_weight(node) else weights.shape[0])


@dataclass(frozen=True)
class HashingOptions(PassOptions):
    #: the most hash bins of one layer's weights
    max_bins: int = 1 << 22

    def check(self) -> None:
        super().check()
        if self.max_bins < 1:
            raise OptionProblem("max_bins", f"must be an integer >= 1, got {self.max_bins}")

class HashWeights(Pass):
    name = "hash-weights"
    summary = "RED adaptive KDE weight hashing per layer (few distinct values; reports the data-free error bound U)"
    stage = Stage.PRUNE
    lossless = False
    tags = frozenset({"prune", "red"})
    request = "prune"
    runs_after = frozenset({"bn-fold"})
    runs_before = frozenset({"quantize"})
    Options = HashingOptions

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameFactory(graph)
        statistics = bn_statistics(graph, ctx.metadata)
        layers: list[dict[str, Any]] = []
        for node in ctx.progress([n for n in graph.nodes if n.op in LAYER_OPS and is_default_domain(n)], label="layers"):
            weight = optional_input(node, 1)
            reason = self._check(graph, node, weight)
            if reason:
                ctx.refuse(f"{node.op} {node_label(node)}", reason)
                continue
            values = np.asarray(weight.values)
            result = hash_values(values, int(self.options["max_bins"]))
            set_constant_input(graph, node, 1, result.values, names)
            layer = {
                "layer": node_label(node),
                "weights": int(values.size),
                "distinct_before": result.distinct_before,
                "distinct_after": result.distinct_after,
                "bandwidth": result.bandwidth,
                "grid_step": result.grid_step,
                "bound": result.bound,
                "mean_abs_error": result.mean_abs_error,
                "fan_in": _fan_in(node, values),
            }
            stats = statistics.get(node.outputs[0].name)
            if stats is not None:
                layer["beta"], layer["gamma"] = float(np.mean(stats[0])), float(np.mean(stats[1]))
            layers.append(layer)
        before = sum(layer["distinct_before"] for layer in layers)
        after = sum(layer["distinct_after"] for layer in layers)
        summary = {
            "layers_hashed": len(layers),
            "distinct_before": before,
            "distinct_after": after,
            "distinct_removed_pct": 100.0 * (1 - after / before) if before else 0.0,
            "network_bound": network_bound(layers),
            "layers_with_bn_statistics": sum("beta" in layer for layer in layers),
            "layers": layers,
        }
        return PassResult(bool(layers), summary)

    @staticmethod
    def _check(graph: gs.Graph, node: gs.Node, weight: gs.Tensor | None) -> str | None:
        if not isinstance(weight, gs.Constant):
            return "weight is not an initializer"
        if is_graph_output(graph, weight):
            return "weight is a graph output"
        if any(reader is not node for reader in weight.outputs):
            return "weight is shared with other nodes"
        if np.asarray(weight.values).dtype.kind != "f":
            return "weight is not float"
        return None
