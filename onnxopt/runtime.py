"""ONNX Runtime sessions and the sample inputs models run on.

* :func:`session` / :func:`run`: a CPU session (graph optimizations disabled unless asked,
  so what runs is what onnxopt wrote) and its outputs by name; models above protobuf's 2 GB
  limit, and models whose weights are still in the input's data file (lazy, see
  :mod:`onnxopt.external`), go through a temporary file with external data.
* :func:`load_inputs`: the user's samples (``.npz`` with one array per graph input, or an
  ``.npy`` for a single-input model), checked for names, rank, static dims and dtype kind
  (InputDataError, exit code 11); pickles are refused.
* :func:`random_inputs`: seeded random feeds; dynamic dims (symbolic, unnamed, or
  ``dim_value ≤ 0`` such as PaddlePaddle's ``-1``) come from ``input_shapes``, else a
  leading (batch) dim is ``DEFAULT_BATCH`` and any other ``DEFAULT_DYNAMIC_DIM``, a symbol
  the same size everywhere; random inputs above ``MAX_RANDOM_INPUT_BYTES`` are refused.

Used by verification, calibration, the fusion check and the benchmarks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputDataError
from .graph import make_node_names_unique
from .external import has_lazy
from .io import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes


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
    if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD and not has_lazy(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    # above the protobuf limit, or weights still in the input's data file: ORT reads a saved copy
    # (streamed tensor by tensor, so no second copy of the weights is built in memory)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
