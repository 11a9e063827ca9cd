"""Lazy external data: large weights whose bytes stay in the input model's data file.

A model loaded with ``load_model(path, lazy=True)`` keeps every main-graph initializer of at
least :data:`LAZY_MIN_BYTES` that the input stores as external data *unread*: the
TensorProto keeps its ``location``/``offset``/``length`` entries and gains a ``basepath``
entry (one of the keys ONNX's external-data format defines) naming the input's folder.
Such a tensor is "lazy".  The rest of onnxopt treats it like any other initializer:

* import (:func:`attach`): graphsurgeon's constant for a lazy tensor gets
  :class:`ExternalValues`, so ``constant.values`` reads that one tensor from the file
  (``np.fromfile``, no mmap) when a pass asks for it; a constant nobody reads stays unread,
  and export writes the small reference again, not the bytes;
* a pass that reads a weight once (weight-only) uses :func:`read_values`, which does not
  cache the array in the constant;
* after each pass (:func:`release_unchanged`): values a pass read but did not change
  (same array object, same shape, dtype and content hash) become lazy again, so reading a
  weight to inspect it does not keep it in memory for the rest of the run;
* saving (``io.save_model``): each lazy tensor's bytes are copied from the input's data
  file into the new data file in chunks; :func:`materialized` gives a fully loaded copy
  for what needs the bytes in the proto (a model saved without external data, ONNX Runtime
  sessions of models under the protobuf limit).

Sizes, shapes and types come from the TensorProto's dims and data type, so measuring and
checking a lazy model never reads its payloads.  Small external tensors (shape constants,
norm scales) and external tensors outside the main graph's initializers are loaded at once,
as before.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

#: The external_data key that marks a lazy tensor: the folder its ``location`` is relative to.
SOURCE_KEY = "basepath"
#: External initializers at least this large stay in the input's data file until needed.
LAZY_MIN_BYTES = 1 << 20
#: Bytes copied at once when a lazy tensor is written to a new data file.
COPY_CHUNK = 16 << 20
#: Data types whose raw little-endian bytes are exactly numpy's layout (read with np.fromfile).
_PLAIN_TYPES = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
}


class ExternalDataError(ValueError):
    """A lazy tensor's reference is unusable (bad location, file too short)."""


# --------------------------------------------------------------------------- marking
def make_lazy(model: onnx.ModelProto, base_dir: str | os.PathLike, *, min_bytes: int = LAZY_MIN_BYTES) -> int:
    """Mark the main graph's external initializers of at least ``min_bytes`` lazy and load
    every other external tensor (subgraphs, attributes, small ones) into the proto.
    Returns how many tensors stay lazy.  Raises ExternalDataError (or OSError) for a
    reference outside ``base_dir`` or past the end of its file."""
    base = Path(base_dir).resolve()
    lazy_ids = set()
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor) and stored_bytes(tensor) >= min_bytes:
            _resolve(base, tensor)  # validates location, offset and length now, not at the first read
            _set_entry(tensor, SOURCE_KEY, str(base))
            lazy_ids.add(id(tensor))
    for tensor in all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_lazy(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
    return len(lazy_ids)


def is_lazy(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL and any(e.key == SOURCE_KEY for e in tensor.external_data)


def lazy_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """The lazy initializers of the main graph."""
    return [t for t in model.graph.initializer if is_lazy(t)]


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


def stored_bytes(tensor: TensorProto) -> int:
    """Bytes of an external tensor's payload: its ``length`` entry, else dims × item size."""
    info = external_data_helper.ExternalDataInfo(tensor)
    if info.length is not None:
        return int(info.length)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError):
        return count


def _set_entry(tensor: TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value


def _resolve(base: Path, tensor: TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, checked: the file lies inside ``base``
    and holds ``offset + length`` bytes."""
    info = external_data_helper.ExternalDataInfo(tensor)
    location = info.location
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise ExternalDataError(f"tensor {tensor.name!r}: external data location {location!r} must be a relative path inside the model's folder")
    path = base / location
    if not path.resolve().is_relative_to(base.resolve()):
        raise ExternalDataError(f"tensor {tensor.name!r}: external data location {location!r} leaves the model's folder")
    offset = int(info.offset or 0)
    length = stored_bytes(tensor)
    size = path.stat().st_size
    if offset + length > size:
        raise ExternalDataError(f"tensor {tensor.name!r}: {location} has {size} bytes, the tensor needs {offset + length}")
    return path, offset, length


def source(tensor: TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of a lazy tensor's bytes."""
    info = external_data_helper.ExternalDataInfo(tensor)
    return Path(info.basepath) / info.location, int(info.offset or 0), stored_bytes(tensor)


# --------------------------------------------------------------------------- reading
def read_bytes(tensor: TensorProto) -> bytes:
    path, offset, length = source(tensor)
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise ExternalDataError(f"tensor {tensor.name!r}: {path} ended {length - len(data)} bytes early")
    return data


def read_array(tensor: TensorProto) -> np.ndarray:
    """The values of a lazy tensor, read from its file (a fresh, writable array)."""
    if tensor.data_type in _PLAIN_TYPES:
        path, offset, length = source(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if count * dtype.itemsize != length:
            raise ExternalDataError(f"tensor {tensor.name!r}: {length} bytes stored for {count} elements of {dtype}")
        with open(path, "rb") as handle:
            values = np.fromfile(handle, dtype=dtype, count=count, offset=offset)
        if values.size != count:
            raise ExternalDataError(f"tensor {tensor.name!r}: {path} ended early")
        return values.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))
    loaded = TensorProto()
    loaded.CopyFrom(tensor)
    load_into(loaded)
    return np.array(numpy_helper.to_array(loaded))


def load_into(tensor: TensorProto) -> None:
    """Turn a lazy tensor into an ordinary in-memory one (raw_data), in place."""
    tensor.raw_data = read_bytes(tensor)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when nothing is lazy, else a copy with every lazy tensor loaded."""
    if not has_lazy(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in lazy_tensors(copy):
        load_into(tensor)
    return copy


def copy_payload(tensor: TensorProto, out, buffer: bytearray | None = None) -> int:
    """Append a lazy tensor's bytes to the open binary file ``out`` in chunks; returns the
    number of bytes written."""
    path, offset, length = source(tensor)
    buffer = buffer if buffer is not None else bytearray(min(COPY_CHUNK, max(length, 1)))
    view = memoryview(buffer)
    left = length
    with open(path, "rb") as handle:
        handle.seek(offset)
        while left:
            got = handle.readinto(view[: min(left, len(buffer))])
            if not got:
                raise ExternalDataError(f"tensor {tensor.name!r}: {path} ended {left} bytes early")
            out.write(view[:got])
            left -= got
    return length


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model: initializers, sparse ones and attributes, subgraphs and
    functions included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for body in attribute.graphs:
            yield from _graph_tensors(body)


# --------------------------------------------------------------------------- graphsurgeon
class ExternalValues(LazyValues):
    """graphsurgeon lazy values read from a lazy tensor's file on each first access.
    Remembers (weakly) the array it handed out, so :func:`release_unchanged` can tell an
    untouched read from an edit."""

    reads = 0  # arrays read from files so far (all instances): what tests count

    def __init__(self, tensor: TensorProto) -> None:
        super().__init__(tensor)
        self._handed_out: weakref.ref | None = None
        self._layout: tuple | None = None

    def load(self) -> np.ndarray:
        values = read_array(self.tensor)
        ExternalValues.reads += 1
        self._handed_out = weakref.ref(values)
        self._layout = (values.shape, values.dtype)
        return values

    def unchanged(self, values: object) -> bool:
        """True if ``values`` is the array this object read, with its shape, type and bytes
        (compared with the file chunk by chunk)."""
        handed = self._handed_out() if self._handed_out is not None else None
        if handed is None or handed is not values or (values.shape, values.dtype) != self._layout:
            return False
        return self.tensor.data_type in _PLAIN_TYPES and equals_file(self.tensor, values)


def equals_file(tensor: TensorProto, values: np.ndarray) -> bool:
    """True if the bytes of ``values`` are those of the lazy ``tensor``'s file (chunk by chunk)."""
    path, offset, length = source(tensor)
    flat = np.ascontiguousarray(values).view(np.uint8).reshape(-1)
    if flat.size != length:
        return False
    with open(path, "rb") as handle:
        handle.seek(offset)
        for start in range(0, length, COPY_CHUNK):
            chunk = handle.read(min(COPY_CHUNK, length - start))
            if chunk != flat[start : start + len(chunk)].tobytes():
                return False
    return True


def _constants(graph: gs.Graph) -> Iterable[gs.Constant]:
    return (t for t in graph.tensors(check_duplicates=False).values() if isinstance(t, gs.Constant))


#: Attribute of a graphsurgeon constant holding the ExternalValues it was imported with.
_SOURCE_ATTR = "_onnxopt_external"


def attach(graph: gs.Graph) -> int:
    """Give every lazy constant of an imported graph :class:`ExternalValues` (in place of
    graphsurgeon's own lazy values, which would read the file relative to the working
    directory); returns how many."""
    count = 0
    for constant in _constants(graph):
        values = constant._values
        if type(values) is LazyValues and isinstance(values.tensor, TensorProto) and is_lazy(values.tensor):
            external = ExternalValues(values.tensor)
            constant._values = external
            setattr(constant, _SOURCE_ATTR, external)
            constant.data_location = None  # an edited value is exported in memory, as usual
            count += 1
    return count


def release_unchanged(graph: gs.Graph) -> int:
    """Make lazy again each constant whose values a pass read but left as they were (the
    same array object, shape, type and bytes); returns how many were released.  A constant
    given new values keeps them and is an ordinary in-memory constant from then on."""
    released = 0
    for constant in _constants(graph):
        external = getattr(constant, _SOURCE_ATTR, None)
        current = constant._values
        if external is None or current is external:
            continue
        if isinstance(current, np.ndarray) and external.unchanged(current):
            constant._values = external
            released += 1
        else:
            delattr(constant, _SOURCE_ATTR)
    return released


def read_values(constant: gs.Constant) -> np.ndarray:
    """The values of ``constant`` for reading: a lazy one is read from its file for the
    caller *without* being kept by the constant (``constant.values`` would cache it), so the
    array goes as soon as the caller drops it; any other constant gives ``.values``."""
    values = constant._values
    if isinstance(values, ExternalValues):
        return values.load()
    return constant.values


def lazy_constants(graph: gs.Graph) -> list[gs.Constant]:
    """The constants of ``graph`` whose values are still unread (in their file)."""
    return [c for c in _constants(graph) if isinstance(c._values, ExternalValues)]
