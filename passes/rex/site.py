"""A layer REx expands, as it sits in the graph, and the input statistics REx and the fold
both use (the bias correction R·E[X] of eq. 3.8, the E[x²] weighting of the residual error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class LayerSite:
    """Where a layer sits in the graph: its input quantizer and output quantizer, if any."""

    node: gs.Node
    weight: np.ndarray
    bits: int
    axis: int | None
    out_axis: int
    groups: int
    mean: np.ndarray | None
    moment: np.ndarray | None  #: E[x²] per input channel (data-free, from the quantize pass)
    input_dq: gs.Node | None  #: DequantizeLinear producing the layer's input (per tensor)
    output_range: tuple[float, float] | None  #: range of the quantizer after the layer's activation
    rank: int
    combine: str = "gather"  #: how this layer's branches are added (rex_combine; "permute" → "pad" on a prefix, or "gather")
    fold: int | None = None  #: rex_combine="fold": the divisor m of the order-2 step s1/m (None: branches)


def scalar_value(tensor: gs.Tensor) -> np.float32 | None:
    """The float32 value of a one-element constant (e.g. a per-tensor scale), else None."""
    if isinstance(tensor, gs.Constant) and np.size(tensor.values) == 1:
        return np.float32(np.asarray(tensor.values).reshape(()))
    return None


def _per_input_channel(site: LayerSite, vector: np.ndarray, channels: np.ndarray) -> np.ndarray | None:
    """``vector`` (one value per input channel of a possibly grouped Conv) at the input each
    weight column of the output ``channels`` reads: [len(channels), C_in/groups]; None when
    its length is not the Conv's input channel count."""
    c, per_group_in = site.weight.shape[0], site.weight.shape[1]
    if len(vector) != site.groups * per_group_in:
        return None
    return vector[(channels // (c // site.groups))[:, None] * per_group_in + np.arange(per_group_in)]


def mean_shift(site: LayerSite, sub: np.ndarray, channels: np.ndarray) -> np.ndarray | None:
    """R·E[X] for the output channels of the sub-weight ``sub`` (bias correction of eq. 3.8)."""
    mean = site.mean
    if site.node.op == "Conv":
        read = _per_input_channel(site, mean, channels)
        return None if read is None else (sub.reshape(*read.shape, -1).sum(-1) * read).sum(1)
    k_by_n = sub.T if site.out_axis == 0 else sub
    return mean @ k_by_n if len(mean) == k_by_n.shape[0] else None


def input_moment_weights(site: LayerSite) -> np.ndarray | None:
    """E[x_i²] of the input each weight multiplies, broadcastable to the weight (None when unknown)."""
    moment, w = site.moment, site.weight
    if moment is None:
        return None
    moment = np.asarray(moment, np.float64)
    if site.node.op == "Conv":
        read = _per_input_channel(site, moment, np.arange(w.shape[0]))
        return None if read is None else read.reshape(*read.shape, *([1] * (w.ndim - 2)))
    in_axis = 1 - site.out_axis
    if len(moment) != w.shape[in_axis]:
        return None
    return moment[None, :] if in_axis == 1 else moment[:, None]
