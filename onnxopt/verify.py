"""Verification: run the original and the optimized model in ONNX Runtime and compare.

Both sessions run with ORT graph optimizations disabled, so the comparison measures what
onnxopt changed and nothing ORT would fuse on its own.  Inputs are either the user's
(``.npz`` with one array per graph input name; any size where the model's dim is dynamic)
or random: standard normal for float inputs, small non-negative integers for integer
inputs.  Dynamic dimensions (symbolic, unnamed, or ``dim_value ≤ 0`` such as the ``-1``
PaddlePaddle writes) are taken from ``input_shapes`` (name → shape), else a leading
(batch) dim is ``DEFAULT_BATCH`` and any other ``DEFAULT_DYNAMIC_DIM``; a symbolic name gets
the same size everywhere it appears.

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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputDataError, ValidationError, VerificationError
from .graph import make_node_names_unique
from .io import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes


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
def parse_input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """Parse ``name=1,3,224,224`` strings (the CLI's --input-shape)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise InputDataError(f"bad --input-shape {spec!r}: expected name=d0,d1,... (e.g. input=1,3,224,224)") from None
        if any(d < 0 for d in shapes[name]):
            raise InputDataError(f"--input-shape {name}: negative dimension in {shapes[name]}; give the size to use")
    return shapes


def check_input_names(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    """Every ``--input-shape`` name must be a graph input of ``model``."""
    names = [i.name for i in _graph_inputs(model)]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise InputDataError(f"--input-shape names unknown input(s) {unknown}; the model's inputs are {names}")


#: Random verification inputs above this many bytes are refused (a typo such as 1024 for 1).
MAX_RANDOM_INPUT_BYTES = 2 * 1024**3


#: the size random inputs give a dynamic leading (batch) dimension
DEFAULT_BATCH = 1
#: the size random inputs give any other dynamic dimension (spatial, sequence, ...)
DEFAULT_DYNAMIC_DIM = 32


def is_dynamic(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """True for a symbolic or unnamed dimension, or a ``dim_value ≤ 0`` (the ``-1`` some exporters write)."""
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def default_shape(info: onnx.ValueInfoProto, sizes: dict[str, int]) -> list[int]:
    """The shape random inputs give ``info``: static dims as declared, dynamic ones the
    defaults; ``sizes`` (symbol → size) makes a symbol the same size in every input."""
    shape = []
    for axis, dim in enumerate(info.type.tensor_type.shape.dim):
        if not is_dynamic(dim):
            shape.append(dim.dim_value)
            continue
        size = DEFAULT_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM
        if dim.HasField("dim_param") and dim.dim_param:
            size = sizes.setdefault(dim.dim_param, size)
        shape.append(size)
    return shape


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def random_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random feeds for every graph input (see the module docstring)."""
    input_shapes = dict(input_shapes or {})
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    inputs = _graph_inputs(model)
    check_input_names(model, input_shapes)
    sizes = _symbol_sizes(inputs, input_shapes)
    for info in inputs:
        tensor_type = info.type.tensor_type
        if not tensor_type.elem_type:
            raise InputDataError(f"input {info.name} is not a tensor; give inputs with --inputs x.npz")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = input_shapes.get(info.name) or default_shape(info, sizes)
        if any(d < 0 for d in shape):
            raise InputDataError(f"--input-shape {info.name}: negative dimension in {list(shape)}")
        nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if nbytes > MAX_RANDOM_INPUT_BYTES:
            raise InputDataError(
                f"random input {info.name} of shape {list(shape)} would take {nbytes / 1024**3:.3g} GiB "
                f"(limit {MAX_RANDOM_INPUT_BYTES / 1024**3:g} GiB); give a smaller --input-shape"
            )
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[info.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[info.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def _symbol_sizes(inputs: Sequence[onnx.ValueInfoProto], input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Symbol → size for the symbols of the inputs given with ``input_shapes``, so other
    inputs sharing a symbol (e.g. ``seq`` of ids and mask) get the same size."""
    sizes: dict[str, int] = {}
    for info in inputs:
        given = input_shapes.get(info.name)
        if not given:
            continue
        for dim, size in zip(info.type.tensor_type.shape.dim, given):
            if dim.HasField("dim_param") and dim.dim_param:
                sizes.setdefault(dim.dim_param, int(size))
    return sizes


def load_inputs(path: str | os.PathLike[str], model: onnx.ModelProto, *, batched: bool = False) -> dict[str, np.ndarray]:
    """Read inputs from an ``.npz`` (one array per graph input) or, for a single-input model,
    an ``.npy``; check names, rank, static dims and dtype kind (a float input takes float
    data, an integer input integers).  Pickled arrays are refused.

    ``batched``: the arrays stack samples on axis 0 (calibration data), so a fixed batch
    dimension of the model is not compared with it.
    """
    expected = {i.name: i for i in _graph_inputs(model)}
    feeds = _read_arrays(path, list(expected))
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise InputDataError(f"inputs {path}: missing {missing}, unexpected {extra}; model inputs are {sorted(expected)}")
    for name, info in expected.items():
        tensor_type = info.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dims = tensor_type.shape.dim
        array = feeds[name]
        compared = list(zip(dims, array.shape))[1 if batched else 0 :]
        if array.ndim != len(dims) or any(not is_dynamic(d) and d.dim_value != s for d, s in compared):
            raise InputDataError(f"inputs {path}: {name} has shape {list(array.shape)}, model expects {_dims(dims)}")
        if _kind(array.dtype) != _kind(np.dtype(dtype)):
            raise InputDataError(f"inputs {path}: {name} has dtype {array.dtype}, model expects {np.dtype(dtype).name}")
        feeds[name] = array.astype(dtype, copy=False)
    return feeds


def _read_arrays(path: str | os.PathLike[str], input_names: list[str]) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise InputDataError(f"inputs {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputDataError(f"cannot read inputs {path} (expected .npz or .npy without pickles): {_first_line(exc)}") from exc
    if isinstance(loaded, np.ndarray):  # .npy: one array
        if len(input_names) != 1:
            raise InputDataError(f"inputs {path}: an .npy holds one array, the model has inputs {input_names}; use an .npz")
        return {input_names[0]: loaded}
    try:
        with loaded as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputDataError(f"cannot read inputs {path}: {_first_line(exc)}") from exc


def _kind(dtype: np.dtype) -> str:
    """'float', 'int' (signed or unsigned) or 'bool': the kinds that never mix silently."""
    if np.issubdtype(dtype, np.floating):
        return "float"
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.integer):
        return "int"
    return dtype.kind


def _dims(dims: Sequence[onnx.TensorShapeProto.Dimension]) -> list[object]:
    return [d.dim_value if not is_dynamic(d) else (d.dim_param or "?") for d in dims]


# --------------------------------------------------------------------------- running
def session(model: onnx.ModelProto, *, optimize: bool = False, threads: int = 0) -> ort.InferenceSession:
    """An ORT CPU session for ``model`` (graph optimizations disabled unless ``optimize``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_loads_in_ort(optimized: onnx.ModelProto, original: onnx.ModelProto, last_change: str) -> None:
    """ValidationError (exit 8) when ONNX Runtime cannot load ``optimized`` but loads
    ``original`` (a model ORT never could load is not onnxopt's doing)."""
    try:
        session(optimized)
    except Exception as exc:  # ORT's errors have no common base class  # noqa: BLE001
        try:
            session(original)
        except Exception:  # noqa: BLE001
            return
        raise ValidationError(f"final check: {last_change} produced a model ONNX Runtime cannot load: {_first_line(exc)}") from exc


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds``.  ORT refuses repeated node names (which the ONNX
    checker accepts and some exporters write), so such a model runs as a renamed copy."""
    names = [node.name for node in model.graph.node if node.name]
    if len(set(names)) != len(names):
        renamed = onnx.ModelProto()
        renamed.CopyFrom(model)
        make_node_names_unique(renamed.graph)
        model = renamed
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


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
) -> VerifyResult:
    """Compare ``optimized`` with ``original`` in ORT on the same inputs."""
    if inputs is None:
        feeds, source = random_inputs(original, input_shapes, seed), f"random inputs, seed {seed}"
    elif isinstance(inputs, (str, os.PathLike)):
        feeds, source = load_inputs(inputs, original), f"inputs from {inputs}"
    else:
        feeds, source = dict(inputs), "given inputs"
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
