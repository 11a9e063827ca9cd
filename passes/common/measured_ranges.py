"""Activation ranges measured on calibration data (the data-free ones: :mod:`.ranges`).

Calibration (samples read by :mod:`.calibration`): the tensors are computed by ONNX Runtime
on the user's samples in one session (the probe model of :mod:`.tensor_probe`), several
samples per run when the batch axis is dynamic, and reduced as the runs come; per channel
(axis 1) either min/max or the
0.01 / 99.99 percentiles (exact, from the kept tails: :class:`RunningRange`), and the mean.
Samples holding NaN/inf are refused with the file and input named (InputDataError).

Measured moments (``act_ranges="moments"``): the per-channel mean and standard deviation of
the tensors where BN statistics would sit in a BN-folded model (:func:`statistics_sites`:
the outputs of Conv/ConvTranspose/Gemm and 2-D MatMul layers) are measured on the samples
(streamed, :class:`RunningRange`) and given to :class:`RangeEstimator` in place of the BN
statistics (:func:`moment_ranges`): ranges μ ± λσ, propagated like the data-free ones; a
tensor the propagation does not reach (the graph input) keeps its measured min/max.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import InputDataError, OnnxoptError
from onnxopt.graph import all_graphs, constant_values, is_default_domain

from .ops import LAYER_OPS
from .ranges import ChannelRange, RangeEstimator
from .tensor_probe import Source, expose_tensors, forced_if, has_if


def calibrated_ranges(
    model: onnx.ModelProto, tensors: list[str], samples: Mapping[str, np.ndarray], method: str, *, batch: int | None = None
) -> dict[str, ChannelRange]:
    """Per-channel ranges (axis 1) of ``tensors`` over the calibration ``samples``.

    One ORT session (graph optimizations off) computes every tensor at once, fed
    ``batch`` samples per run (default: the model's fixed batch size, else CALIBRATION_BATCH); the ranges are reduced as the batches come
    (:class:`RunningRange`), so memory holds one batch of activations, not all of them.
    When a batched run fails or changes a tensor's channel count (a graph that is not
    batch-agnostic), calibration restarts one sample per run.

    Tensors inside If/Loop/Scan bodies are threaded out (:func:`.tensor_probe.expose_tensors`).
    Those of an If branch that no sample takes get their range from the same samples run with
    every If condition forced to true, then to false (``forced_branch`` set on the range); a forced
    run that fails leaves them without a range."""
    probe, sources = expose_tensors(model, list(dict.fromkeys(tensors)))
    fixed = fixed_batch(model)
    step = batch or fixed or CALIBRATION_BATCH
    result = _run_probe(probe, sources, samples, method, step, fixed is not None)
    missing = {name: places for name, places in sources.items() if name not in result and places}
    for value in (True, False) if missing and has_if(probe.graph) else ():
        try:
            forced = _run_probe(forced_if(probe, value), missing, samples, method, step, fixed is not None)
        except OnnxoptError:
            continue  # the forced branch does not run on these samples: its tensors keep no range
        for name, channel_range in forced.items():
            channel_range.forced_branch = True
            result[name] = channel_range
            missing.pop(name)
    return result


def _run_probe(
    probe: onnx.ModelProto, sources: Mapping[str, list[Source]], samples: Mapping[str, np.ndarray], method: str, step: int, fixed: bool
) -> dict[str, ChannelRange]:
    from onnxopt.runtime import session

    sess = session(probe)
    try:
        return _reduce_batches(sess, sources, sample_batches(samples, step, fill=fixed), method)
    except Exception as exc:  # noqa: BLE001 - ORT's errors have no common base class
        if step > 1 and not fixed:
            return _reduce_batches(sess, sources, sample_batches(samples, 1), method)
        raise calibration_run_error(exc) from exc


def calibration_run_error(exc: Exception) -> Exception:
    """The error to raise when ONNX Runtime fails on the calibration samples: an onnxopt
    error as it is, anything else as an InputDataError (exit 11) with ORT's first line."""
    if isinstance(exc, OnnxoptError):
        return exc
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return InputDataError(f"ONNX Runtime failed on the calibration samples: {first}")


def statistics_sites(graph: gs.Graph) -> list[gs.Tensor]:
    """The tensors where BN statistics would sit in a BN-folded model (every scope): the
    outputs of Conv/ConvTranspose/Gemm layers and of MatMuls with a 2-D output (for a MatMul
    whose only reader is an Add with a constant operand, the bias, that Add's output).  A
    rank-3 MatMul output is left out: its axis 1 is not the feature axis."""
    sites = []
    for node in (n for scope in all_graphs(graph) for n in scope.nodes):
        if node.op not in LAYER_OPS or not is_default_domain(node) or not node.outputs:
            continue
        out = node.outputs[0]
        if node.op == "MatMul":
            if out.shape is None or len(out.shape) != 2:
                continue
            readers = out.outputs
            if len(readers) == 1 and readers[0].op == "Add" and len(readers[0].inputs) == 2 and any(
                constant_values(readers[0], i) is not None for i in (0, 1)
            ):
                out = readers[0].outputs[0]
        sites.append(out)
    return sites


def moment_ranges(
    wanted: list[gs.Tensor],
    sites: list[gs.Tensor],
    measured: Mapping[str, ChannelRange],
    lam: float,
    add_range: str = "sum",
    known: Mapping[str, ChannelRange] | None = None,
) -> dict[str, ChannelRange]:
    """Ranges of ``wanted`` from the per-channel (mean, std) ``measured`` on the ``sites``
    (``act_ranges="moments"``): those play the BN statistics in :class:`RangeEstimator` (so λ,
    the Relu/Clip caps and the SPIQ tail model apply as data-free); a wanted tensor the
    propagation does not reach keeps its measured min/max range."""
    stats = {t.name: measured[t.name].gaussian for t in sites if t.name in measured and measured[t.name].gaussian is not None}
    estimator = RangeEstimator(stats, lam, add_range, known)
    result = {}
    for tensor in wanted:
        found = estimator.range(tensor)
        if found is None and tensor.name in measured:
            r = measured[tensor.name]
            found = ChannelRange(r.lo, r.hi, r.mean, second_moment=r.second_moment, forced_branch=r.forced_branch)
        if found is not None:
            result[tensor.name] = found
    return result


#: Samples per ORT run when the model's batch axis is dynamic.
CALIBRATION_BATCH = 16
#: The percentiles of ``act_ranges="percentile"`` (per channel).
PERCENTILES = (0.01, 99.99)


class BatchMismatch(ValueError):
    """A tensor's channel count changed between runs (its axis 1 depends on the batch)."""


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed size of the graph inputs' axis 0 (None when dynamic)."""
    initializers = {t.name for t in model.graph.initializer}
    for info in model.graph.input:
        dims = info.type.tensor_type.shape.dim
        if info.name not in initializers and dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
    return None


def sample_batches(samples: Mapping[str, np.ndarray], step: int, *, fill: bool = False) -> list[dict[str, np.ndarray]]:
    """Feeds of ``step`` samples each (the last one smaller).  With ``fill`` (a model whose
    batch is fixed to ``step``) a last partial batch is filled up with the first samples
    again: min/max are unchanged, those samples count twice in the mean and percentiles."""
    count = len(next(iter(samples.values())))
    feeds = []
    for start in range(0, count, step):
        index = np.arange(start, start + step) % count if fill else np.arange(start, min(start + step, count))
        feeds.append({key: value[index] for key, value in samples.items()})
    return feeds


def _reduce_batches(sess: Any, sources: Mapping[str, list[Source]], batches: list[dict[str, np.ndarray]], method: str) -> dict[str, ChannelRange]:
    """Per requested tensor, the range over every batch and every place it comes out of
    (:func:`.tensor_probe.expose_tensors`); a tensor no run computed (an If branch never taken) has none."""
    reducers = {name: RunningRange(method, len(batches)) for name in sources}
    outputs = list(dict.fromkeys(out for places in sources.values() for out, _ in places))
    for feeds in batches:
        try:
            values = dict(zip(outputs, sess.run(outputs, feeds)))
        except Exception as exc:  # noqa: BLE001
            raise calibration_run_error(exc) from exc
        for name, places in sources.items():
            for out, depth in places:
                value = np.asarray(values[out])
                if value.size == 0:
                    continue  # the If branch that did not compute it, or a Loop without iterations
                reducers[name].update(value.reshape((-1, *value.shape[depth + 1 :])) if depth else value)
    return {name: reducer.result() for name, reducer in reducers.items() if reducer.lo is not None}


class RunningRange:
    """Streaming per-channel (axis 1) min, max and mean of a tensor over the batches.

    ``percentile`` keeps, per channel, only the smallest and largest ⌈10⁻⁴·n⌉ + 2 values
    seen (n: the values per channel over all ``batches``, estimated from the first one),
    which is exactly what numpy's linear-interpolation 0.01 / 99.99 percentiles read: the
    result equals ``np.percentile`` over all values without holding them.

    ``moments`` also keeps the sum of squared deviations per channel, merged across batches
    with Chan et al.'s pairwise formula (float64 sums, centred per batch: no cancellation), so the
    result carries the population standard deviation (``gaussian`` = (mean, std)) and
    E[x²]."""

    def __init__(self, method: str, batches: int) -> None:
        self.method = method
        self.batches = batches
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.count = 0
        self.keep = 0
        self.smallest: np.ndarray | None = None  # [C, ≤ keep], per channel
        self.largest: np.ndarray | None = None
        self.moment_mean: np.ndarray | None = None  # "moments": float64 mean and Σ(x − mean)² per channel
        self.squares: np.ndarray | None = None

    def update(self, value: np.ndarray) -> None:
        grid = _as_grid(value)
        # float32 partial sums (numpy sums each contiguous run pairwise), float64 across runs
        total = grid.sum(axis=(0, 2, 3)).astype(np.float64)
        if self.method == "percentile":
            column_min, column_max = grid.min(axis=2), grid.max(axis=2)  # [B, C, L]: extrema of each column
            lo, hi = column_min.min(axis=(0, 2)), column_max.max(axis=(0, 2))
        else:
            lo, hi = grid.min(axis=(0, 2, 3)), grid.max(axis=(0, 2, 3))
        if self.lo is None:
            self.lo, self.hi, self.total = lo, hi, total
            self.keep = math.ceil(self.batches * grid[:, 0].size * PERCENTILES[0] / 100) + 2
        elif len(lo) != len(self.lo):
            raise BatchMismatch(f"channel count {len(lo)} after {len(self.lo)}")
        else:
            self.lo, self.hi, self.total = np.minimum(self.lo, lo), np.maximum(self.hi, hi), self.total + total
        if self.method == "moments":
            self._merge_moments(grid)
        self.count += grid[:, 0].size
        if self.method == "percentile":
            self._keep_tails(grid, column_min, column_max)

    def _merge_moments(self, grid: np.ndarray) -> None:
        """Merge ``grid``'s per-channel mean and Σ(x − mean)² into the running ones (before
        ``count`` grows by this batch)."""
        n = grid[:, 0].size
        mean = grid.sum(axis=(0, 2, 3), dtype=np.float64) / n
        centre = mean.astype(grid.dtype)  # float32 deviations, float64 sums; the rounding of the centre is corrected below
        deviation = grid - centre[None, :, None, None]
        offset = deviation.sum(axis=(0, 2, 3), dtype=np.float64)
        squares = np.square(deviation).sum(axis=(0, 2, 3), dtype=np.float64) - offset**2 / n
        if self.moment_mean is None:
            self.moment_mean, self.squares = mean, squares
            return
        seen = self.count
        delta = mean - self.moment_mean
        self.moment_mean = self.moment_mean + delta * (n / (seen + n))
        self.squares = self.squares + squares + delta**2 * (seen * n / (seen + n))

    def _keep_tails(self, grid: np.ndarray, column_min: np.ndarray, column_max: np.ndarray) -> None:
        """Per channel, the ``keep`` smallest and largest of the kept values and ``grid``'s.

        The values of a channel are cut into columns (:func:`_as_grid`): its ``keep``
        largest values all lie in the ``keep`` columns with the largest maxima (a value
        outside them is at most each of those ``keep`` maxima), so only those columns are
        gathered and partitioned, likewise with minima: exact, for the price of the
        column extrema, which also give min/max."""
        k = self.keep
        smallest, largest = _column_candidates(grid, column_min, k, low=True), _column_candidates(grid, column_max, k, low=False)
        if self.smallest is not None:
            smallest = np.concatenate([self.smallest, smallest], axis=1)
            largest = np.concatenate([self.largest, largest], axis=1)
        if smallest.shape[1] > k:
            smallest = np.partition(smallest, k - 1, axis=1)[:, :k]
            largest = np.partition(largest, largest.shape[1] - k, axis=1)[:, -k:]
        self.smallest, self.largest = smallest, largest

    def result(self) -> ChannelRange:
        assert self.lo is not None and self.total is not None
        mean = self.total / self.count
        if self.method == "moments":
            assert self.moment_mean is not None and self.squares is not None
            mean, std = self.moment_mean, np.sqrt(self.squares / self.count)
            return ChannelRange(self.lo.astype(np.float64), self.hi.astype(np.float64), mean, (mean, std), mean**2 + std**2)
        if self.method != "percentile":
            return ChannelRange(self.lo.astype(np.float64), self.hi.astype(np.float64), mean)
        return ChannelRange(self._percentile(PERCENTILES[0]), self._percentile(PERCENTILES[1]), mean)

    def _percentile(self, q: float) -> np.ndarray:
        """numpy's linear percentile of all ``count`` values per channel, from the kept tails."""
        n = self.count
        position = q / 100 * (n - 1)
        below = math.floor(position)
        above = min(below + 1, n - 1)
        if q < 50:
            values = np.sort(self.smallest, axis=1).astype(np.float64)
            a, b = values[:, below], values[:, above]
        else:
            values = np.sort(self.largest, axis=1).astype(np.float64)
            width = values.shape[1]
            a, b = values[:, width - (n - below)], values[:, width - (n - above)]
        fraction = position - below
        return a + (b - a) * fraction


def _as_grid(value: np.ndarray) -> np.ndarray:
    """``value`` viewed as [B, C, M, L]: channel axis 1, L the last axis (image columns),
    M every axis between (1 for rank ≤ 3)."""
    if value.ndim < 2:
        value = value.reshape(-1, 1)
    rest = value.shape[2:]
    last = rest[-1] if rest else 1
    return value.reshape(value.shape[0], value.shape[1], -1, last)


def _column_candidates(grid: np.ndarray, extrema: np.ndarray, k: int, *, low: bool) -> np.ndarray:
    """[C, ≤ k·M]: per channel, the values of the ``k`` columns (b, l) with the smallest
    (``low``) or largest ``extrema`` [B, C, L]; every value when there are ≤ k columns."""
    batch, channels, middle, last = grid.shape
    columns = batch * last
    if columns <= k:
        return np.moveaxis(grid, 1, 0).reshape(channels, -1)
    keys = np.moveaxis(extrema, 1, 0).reshape(channels, columns)
    index = np.argpartition(keys, k - 1, axis=1)[:, :k] if low else np.argpartition(keys, columns - k, axis=1)[:, columns - k :]
    b, l = np.divmod(index, last)
    return grid[b, np.arange(channels)[:, None], :, l].reshape(channels, -1)
