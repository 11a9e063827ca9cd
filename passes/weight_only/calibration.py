"""Measured row weights for the weight-only search: E[x_k²] of each layer's input feature k on
the user's calibration samples (``calibration_data``, read by :mod:`..common.calibration`).

One ONNX Runtime session (graph optimizations off) computes every layer input at once (the
probe model of :mod:`..common.tensor_probe`), several samples per run when the batch axis is
dynamic; each run only adds to per-feature float64 sums of x² and a row count, so memory
holds one batch of activations, never all of them.  E[x_k²] is the mean over every axis but
the last.

Token mask: a model fed padded sequences (a fixed ``seq_len`` export) computes the padding
positions too, although its output ignores them, and their activations can differ a lot
from the real tokens'.  A graph input of shape [batch, tokens] holding 0/1 (``calibration_mask``;
"auto": an input named ``attention_mask``) leaves the positions where it is 0 out of the
means, for each input tensor laid out [batch, tokens, …, K] or [batch·tokens, K]; other
tensors take every row.  A model whose batch axis is fixed gets its last partial batch filled
up with the first samples again; those repeated samples are left out the same way (for
tensors whose axis 0 is the batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import InputDataError, PipelineError

from ..common.measured_ranges import (
    CALIBRATION_BATCH,
    calibration_run_error,
    fixed_batch,
    sample_batches,
)
from ..common.tensor_probe import expose_tensors

#: ``calibration_mask="auto"`` uses the graph input of this name when it has rank 2.
AUTO_MASK_INPUT = "attention_mask"


def token_mask_input(model: onnx.ModelProto, option: str | None, pass_name: str) -> str | None:
    """The graph input whose zeros mark padding positions (None: every position counts)."""
    inputs = {i.name: i for i in model.graph.input}
    if option in (None, "none"):
        return None
    if option == "auto":
        info = inputs.get(AUTO_MASK_INPUT)
        return AUTO_MASK_INPUT if info is not None and len(info.type.tensor_type.shape.dim) == 2 else None
    if option not in inputs or len(inputs[option].type.tensor_type.shape.dim) != 2:
        raise PipelineError(f"{pass_name}: calibration_mask {option!r} is not a graph input of rank 2 ([batch, tokens]); "
                            f"inputs: {', '.join(inputs)} (or 'auto' / 'none')")
    return option


class SecondMoment:
    """Streaming E[x_k²] over the last axis: float64 sums of x² and of row weights."""

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.count = 0.0

    def update(self, value: np.ndarray, rows: np.ndarray | None) -> None:
        """Add ``value`` [..., K]; ``rows`` weights its leading positions (flattened), or None."""
        flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
        if rows is None:
            sums, count = np.einsum("rk,rk->k", flat, flat), float(flat.shape[0])
        else:
            sums, count = np.einsum("r,rk,rk->k", rows, flat, flat), float(rows.sum())
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += count

    def result(self) -> np.ndarray | None:
        if self.sums is None or self.count <= 0:
            return None
        return (self.sums / self.count).astype(np.float32)


def row_weights_for(value: np.ndarray, samples: np.ndarray, tokens: np.ndarray | None) -> np.ndarray | None:
    """Weights of ``value``'s rows (its leading positions, flattened): ``samples`` [B] (0 for a
    repeated filler sample) times ``tokens`` [B, T] (the mask) when the layout is
    [B, T, …, K] or [B·T, K]; the sample weights alone when only axis 0 is the batch; None
    (every row) otherwise or when nothing is left out."""
    batch = samples.shape[0]
    lead = value.shape[:-1]
    if not lead:
        return None
    rows = int(np.prod(lead))
    if tokens is not None and tokens.size and rows == tokens.size and (lead[0] == batch or (len(lead) == 1 and lead[0] == tokens.size)):
        weights = (tokens * samples[:, None]).reshape(-1)
    elif lead[0] == batch and not samples.all():
        weights = np.repeat(samples, rows // batch)
    else:
        return None
    return None if weights.all() else weights.astype(np.float64)


def measured_row_weights(
    model: onnx.ModelProto, tensors: list[str], samples: Mapping[str, np.ndarray], mask_input: str | None
) -> dict[str, np.ndarray]:
    """E[x_k²] (over every axis but the last) of each of ``tensors`` (main-graph tensors)
    over the calibration ``samples``; a tensor no run produced, or with no row left after
    the mask, is missing from the result."""
    from onnxopt.runtime import session

    probe, sources = expose_tensors(model, list(dict.fromkeys(tensors)))
    outputs = {name: places[0][0] for name, places in sources.items() if places}
    fixed = fixed_batch(model)
    step = fixed or CALIBRATION_BATCH
    count = len(next(iter(samples.values())))
    sess = session(probe)
    try:
        return _reduce(sess, outputs, samples, step, fixed is not None, count, mask_input)
    except Exception as exc:  # ORT's errors have no common base class
        if step > 1 and fixed is None and not isinstance(exc, InputDataError):
            return _reduce(sess, outputs, samples, 1, False, count, mask_input)
        raise calibration_run_error(exc) from exc


def _reduce(sess: Any, outputs: Mapping[str, str], samples: Mapping[str, np.ndarray], step: int, fill: bool, count: int,
            mask_input: str | None) -> dict[str, np.ndarray]:
    reducers = {name: SecondMoment() for name in outputs}
    names = list(dict.fromkeys(outputs.values()))
    for start, feeds in zip(range(0, count, step), sample_batches(samples, step, fill=fill)):
        batch = len(next(iter(feeds.values())))
        real = (np.arange(start, start + batch) < count).astype(np.float64)  # 0: a filler sample repeated
        tokens = None if mask_input is None else _mask(feeds[mask_input], mask_input)
        values = dict(zip(names, sess.run(names, feeds)))
        for name, out in outputs.items():
            value = np.asarray(values[out])
            if value.size and value.ndim >= 1:
                reducers[name].update(value, row_weights_for(value, real, tokens))
    return {name: r for name, reducer in reducers.items() if (r := reducer.result()) is not None}


def _mask(values: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(values, dtype=np.float64)
    if not np.isin(mask, (0.0, 1.0)).all():
        raise InputDataError(f"calibration data: the token mask input {name!r} holds values other than 0 and 1")
    return mask.reshape(mask.shape[0], -1)


__all__ = ["AUTO_MASK_INPUT", "SecondMoment", "measured_row_weights", "row_weights_for", "token_mask_input"]
