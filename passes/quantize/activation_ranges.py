"""The activation ranges the quantize pass quantizes with: per-channel ranges of the layers'
inputs and outputs, propagated from BN/LayerNorm statistics (:class:`..common.ranges.RangeEstimator`)
or measured on calibration data (:func:`..common.measured_ranges.calibrated_ranges`; ``act_ranges="moments"``
measures per-channel mean/std at the layer outputs and propagates them like BN statistics), and the user's
``input_range`` for the graph inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.pass_base import PassContext

from ..common.calibration import calibration_samples
from ..common.measured_ranges import calibrated_ranges, moment_ranges, statistics_sites
from ..common.ranges import ChannelRange, RangeEstimator, default_lambda
from ..common.statistics import bn_statistics


@dataclass
class FoundRanges:
    """What :func:`activation_ranges` found: the ranges by tensor name, whether the graph has no
    statistics at all (``act_ranges="bn"`` without ``input_range``), and the calibration stats."""

    ranges: dict[str, ChannelRange]
    no_statistics: bool = False
    calibration_stats: dict[str, Any] = field(default_factory=dict)


def activation_ranges(graph: gs.Graph, ctx: PassContext, wanted: list[gs.Tensor], options: Mapping[str, Any], pass_name: str) -> FoundRanges:
    """Per-channel ranges of the ``wanted`` tensors: data-free from the BN/LN statistics
    (``act_ranges="bn"``) or measured on calibration data, plus the user's ``input_range``."""
    found = FoundRanges({})
    result = found.ranges
    given = input_ranges(graph, options)
    mode = options["act_ranges"]
    if mode == "bn":
        stats = bn_statistics(graph, ctx.metadata)
        if not stats and options["input_range"] is None:
            found.no_statistics = True  # every layer is refused; nothing_done says how to get ranges
            return found
        lam = options["lam"] if options["lam"] is not None else default_lambda(options["act_bits"])
        estimator = RangeEstimator(stats, lam, options["add_range"], given)
        for tensor in wanted:
            channel_range = estimator.range(tensor)
            if channel_range is not None:
                result[tensor.name] = channel_range
    elif mode == "moments":  # measured statistics, used like BN statistics
        sites = statistics_sites(graph)
        measured, found.calibration_stats = calibrate(graph, ctx, [*wanted, *sites], options, pass_name)
        lam = options["lam"] if options["lam"] is not None else default_lambda(options["act_bits"])
        result.update(moment_ranges(wanted, sites, measured, lam, options["add_range"], given))
    else:
        result.update(given)
        calibrated, found.calibration_stats = calibrate(graph, ctx, wanted, options, pass_name)
        result.update(calibrated)
    return found


def input_ranges(graph: gs.Graph, options: Mapping[str, Any]) -> dict[str, ChannelRange]:
    """The user's ``input_range`` for every graph input with a static channel count."""
    if options["input_range"] is None:
        return {}
    low, high = (float(v) for v in options["input_range"])
    ranges = {}
    for tensor in graph.inputs:
        if tensor.shape is not None and len(tensor.shape) >= 2 and isinstance(tensor.shape[1], int):
            c = tensor.shape[1]
            ranges[tensor.name] = ChannelRange(np.full(c, low), np.full(c, high), np.full(c, (low + high) / 2))
    return ranges


def calibrate(
    graph: gs.Graph, ctx: PassContext, tensors: list[gs.Tensor], options: Mapping[str, Any], pass_name: str
) -> tuple[dict[str, ChannelRange], dict[str, Any]]:
    """Ranges of ``tensors`` measured on the calibration samples, and the calibration stats."""
    model = ctx.export(graph)
    data = calibration_samples(pass_name, options, model)
    stats = data.stats()
    names = [t.name for t in tensors if t.shape is None or len(t.shape) >= 2]  # body tensors may have no inferred shape
    ranges = calibrated_ranges(model, names, data.feeds, options["act_ranges"])
    forced = sum(1 for r in ranges.values() if r.forced_branch)
    if forced:
        ctx.refuse("calibration", f"{forced} tensor(s) lie in If branches no calibration sample takes: measured with the If conditions forced")
        stats["calibration_forced_branch_tensors"] = forced
    return ranges, stats
