"""Verification: run the original and the optimized model in ONNX Runtime and compare.

Both sessions run with ORT graph optimizations disabled, so the comparison measures what
onnxopt changed and nothing ORT would fuse on its own.  Inputs are the user's or random
ones (:mod:`onnxopt.runtime`: loading, checks, dynamic-dim defaults).

When random inputs make the *original* model fail in ONNX Runtime (e.g. a reflect Pad on a
signal shorter than its padding), nothing can be compared: the result is "not possible"
(``possible`` False, with ORT's first error line as the ``reason``), which is distinct from
"failed" and not an error.  A model that fails on the user's own inputs is an error.

Per output the result gives the max absolute error, the max error relative to the largest
reference magnitude (``max|a−b| / max|b|``, robust to near-zero entries), the cosine
similarity of the flattened outputs and, for outputs of rank ≥ 2, the top-1 agreement of
the argmax over the last axis.  ``passed`` means every output satisfies
``max|a−b| ≤ atol + rtol·max|b|``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from .errors import InputDataError, ValidationError, VerificationError
from .io import EXTERNAL_DATA_THRESHOLD, tensor_bytes
from .runtime import (  # noqa: F401 - re-exported: verify's public names before runtime.py existed
    DEFAULT_BATCH,
    DEFAULT_DYNAMIC_DIM,
    MAX_RANDOM_INPUT_BYTES,
    _first_line,
    check_input_names,
    default_shape,
    is_dynamic,
    load_inputs,
    parse_input_shapes,
    random_inputs,
    run,
    session,
)


@dataclass
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None

    def within(self, atol: float, rtol: float, reference_max: float) -> bool:
        return self.max_abs <= atol + rtol * reference_max

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "cosine": self.cosine,
            "top1_agreement": self.top1_agreement,
        }


@dataclass
class VerifyResult:
    outputs: list[OutputComparison]
    passed: bool
    atol: float
    rtol: float
    input_source: str
    failures: list[str] = field(default_factory=list)
    #: False for a lossy pipeline: the figures measure fidelity, the tolerance does not apply.
    judged: bool = True
    #: False when the original model cannot run on the inputs: nothing was compared.
    possible: bool = True
    #: why verification was not possible (ORT's first error line and what to do)
    reason: str = ""

    @classmethod
    def not_possible(cls, atol: float, rtol: float, input_source: str, reason: str) -> "VerifyResult":
        return cls([], False, atol, rtol, input_source, possible=False, reason=reason)

    @property
    def status(self) -> str:
        """'passed', 'failed', 'not possible' or 'measured' (lossy: figures, no verdict)."""
        if not self.possible:
            return "not possible"
        if not self.judged:
            return "measured"
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "passed": self.passed,
            "possible": self.possible,
            "reason": self.reason,
            "judged": self.judged,
            "atol": self.atol,
            "rtol": self.rtol,
            "inputs": self.input_source,
            "outputs": [o.to_dict() for o in self.outputs],
            "failures": self.failures,
        }

    def format(self) -> str:
        if not self.possible:
            return f"verify ({self.input_source}): NOT POSSIBLE (not a failure: nothing was compared): {self.reason}"
        if self.judged:
            status = "PASSED" if self.passed else "FAILED"
            lines = [f"verify ({self.input_source}; tolerance atol={self.atol:g} rtol={self.rtol:g}): {status}"]
        else:
            lines = [f"verify ({self.input_source}; lossy pipeline: fidelity figures, no tolerance)"]
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else f"  top-1 agreement {o.top1_agreement:.1%}"
            lines.append(
                f"  {o.name} {list(o.shape)}: max abs {o.max_abs:.3g}  max rel {o.max_rel:.3g}  cosine {o.cosine:.6f}{top1}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs
def check_loads_in_ort(optimized: onnx.ModelProto, original: onnx.ModelProto, last_change: str) -> None:
    """ValidationError (exit 8) when ONNX Runtime cannot load ``optimized`` but loads
    ``original`` (a model ORT never could load is not onnxopt's doing).  Above protobuf's
    2 GB limit the check is skipped: it would write a temporary copy of every weight."""
    if tensor_bytes(optimized) > EXTERNAL_DATA_THRESHOLD:
        return
    try:
        session(optimized)
    except Exception as exc:  # ORT's errors have no common base class  # noqa: BLE001
        try:
            session(original)
        except Exception:  # noqa: BLE001
            return
        raise ValidationError(f"final check: {last_change} produced a model ONNX Runtime cannot load: {_first_line(exc)}") from exc


def compare_outputs(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise VerificationError(f"output {name}: shape {list(cand.shape)} differs from the original's {list(ref.shape)}")
    diff = np.abs(ref - cand)
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    norms = np.linalg.norm(ref) * np.linalg.norm(cand)
    cosine = float(np.dot(ref.ravel(), cand.ravel()) / norms) if norms > 0 else float(max_abs == 0)
    top1 = None
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        top1 = float(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    return OutputComparison(name, tuple(ref.shape), max_abs, max_rel, cosine, top1)


def verify(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    inputs_label: str = "given inputs",
) -> VerifyResult:
    """Compare ``optimized`` with ``original`` in ORT on the same inputs; ``inputs_label``
    names feeds given as arrays in the report (e.g. the file they were loaded from)."""
    if inputs is None:
        feeds, source = random_inputs(original, input_shapes, seed), f"random inputs, seed {seed}"
    elif isinstance(inputs, (str, os.PathLike)):
        feeds, source = load_inputs(inputs, original), f"inputs from {inputs}"
    else:
        feeds, source = dict(inputs), inputs_label
    try:
        reference = run(original, feeds)
    except Exception as exc:  # ORT's errors have no common base class  # noqa: BLE001
        if inputs is not None:
            raise InputDataError(f"ONNX Runtime failed to run the original model on {source}: {_first_line(exc)}") from exc
        shapes = ", ".join(f"{name}={list(array.shape)}" for name, array in feeds.items())
        reason = (
            f"the original model fails in ONNX Runtime on random inputs ({shapes}): {_first_line(exc)}; "
            "pass real inputs with --inputs x.npz (or other shapes with --input-shape NAME=D0,D1,..)"
        )
        return VerifyResult.not_possible(atol, rtol, source, reason)
    try:
        candidate = run(optimized, feeds)
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"ONNX Runtime failed to run the models: the optimized model fails where the original runs: {_first_line(exc)}") from exc
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise VerificationError(f"optimized model lost output(s) {missing}")
    outputs, failures = [], []
    for name, ref in reference.items():
        comparison = compare_outputs(name, ref, candidate[name])
        outputs.append(comparison)
        ref_max = float(np.abs(np.asarray(ref, dtype=np.float64)).max()) if np.size(ref) else 0.0
        if not comparison.within(atol, rtol, ref_max):
            failures.append(f"{name}: max abs error {comparison.max_abs:.3g} > {atol:g} + {rtol:g}·{ref_max:.3g}")
    return VerifyResult(outputs, not failures, atol, rtol, source, failures)
