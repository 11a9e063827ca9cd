"""Model I/O: load from a path or a ModelProto, save atomically, external data.

Loading turns every failure into an :class:`~onnxopt.errors.OnnxoptError` subclass with a
one-line message (missing file, not ONNX, truncated, failed checker, unsupported opset).
Saving never replaces the input model or a file it references, writes into a staging folder
beside the target and renames into place, model and external data as one unit (the rules
live in :mod:`onnxopt.output`), and switches to external data automatically when the
tensors would break protobuf's 2 GB limit.

Large models: ``load_model(path, lazy=True)`` (what the CLI does) leaves the input's large
external initializers in its data file (:mod:`onnxopt.external`); saving copies their bytes
into the new data file in chunks and writes every in-memory tensor straight from the model,
so neither side holds a second copy of the weights.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Union

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from . import external
from .errors import InputNotFoundError, InvalidModelError, UnsupportedModelError
from .graph import payload_free_skeleton
from .output import check_output_path, replace_model_files

ModelSource = Union[str, os.PathLike, onnx.ModelProto]

#: Oldest default-domain opset whose BatchNormalization/Conv semantics the passes assume.
MIN_OPSET = 9
#: Tensors above this many bytes in total are saved as external data (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: With external data, tensors smaller than this stay in the model file (onnx's own default).
EXTERNAL_DATA_MIN_TENSOR = 1024

logger = logging.getLogger(__name__)


def default_opset(model: onnx.ModelProto) -> int | None:
    """Version of the default ("" or "ai.onnx") domain the model imports, if any."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def check_opset(model: onnx.ModelProto) -> None:
    """Raise UnsupportedModelError when the default-domain opset is outside what we handle."""
    version = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if version is None:
        raise UnsupportedModelError("model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= version <= newest:
        raise UnsupportedModelError(
            f"unsupported opset {version}: onnxopt handles ai.onnx opsets {MIN_OPSET}..{newest} "
            f"(convert with onnx.version_converter first)"
        )


def load_model(source: ModelSource, *, check: bool = True, lazy: bool = False) -> onnx.ModelProto:
    """Load a model from a path (external data included) or return the given ModelProto.

    With ``check`` the model must pass ``onnx.checker`` and use a supported opset.  With
    ``lazy`` the large initializers the file keeps as external data are not read: they stay
    references into the input's data file (see :mod:`onnxopt.external`), which
    :func:`onnxopt.optimize` and :func:`save_model` handle; ``external.materialized(model)``
    gives a fully loaded copy for other tools.  A model without external data loads the same
    either way.
    """
    if isinstance(source, onnx.ModelProto):
        model = source
        if check:
            _check(model, None)
        return model

    path = Path(source)
    if not path.exists():
        raise InputNotFoundError(f"input model not found: {path}")
    if not path.is_file():
        raise InputNotFoundError(f"input model is not a file: {path}")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(f"{path} is not a valid ONNX model (truncated or corrupt?): {exc}") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(f"{path} is not a valid ONNX model: no graph or no opset_import (truncated?)")
    try:
        if lazy:
            external.make_lazy(model, path.parent)
        else:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # a missing data file is a ValidationError
        raise InvalidModelError(f"{path}: cannot read its external data: {exc}") from exc
    if check:
        _check(model, path)
    return model


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    check_opset(model)
    try:
        if path is not None and (external.has_lazy(model) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD):
            onnx.checker.check_model(str(path))  # reads the graph from the file, not the weights
        elif external.has_lazy(model):
            onnx.checker.check_model(payload_free_skeleton(model))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"{path}: " if path else ""
        raise InvalidModelError(f"{where}model fails the ONNX checker: {first_line}") from exc


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer payloads (an estimate of the serialized size's bulk), lazy
    ones (still in the input's data file) included."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        elif external.is_lazy(tensor):
            total += external.stored_bytes(tensor)
        else:
            total += _field_bytes(tensor)
    return total


def lazy_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the lazy initializers' payloads (not part of the proto's own size)."""
    return sum(external.stored_bytes(t) for t in external.lazy_tensors(model))


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` computed without encoding the initializer payloads again.

    upb's ``ByteSize`` of a whole model re-encodes every tensor (~0.5 s for ResNet-50) while
    each tensor's own size is cheap, so the total is rebuilt from the parts: the model and
    graph without initializers, plus each initializer with its field tag and length prefix.
    """
    bare_graph = _copy_fields(model.graph, onnx.GraphProto(), skip="initializer")
    graph_bytes = bare_graph.ByteSize() + sum(_framed(tensor.ByteSize()) for tensor in model.graph.initializer)
    bare_model = _copy_fields(model, onnx.ModelProto(), skip="graph")
    return bare_model.ByteSize() + (_framed(graph_bytes) if model.HasField("graph") else 0)


def _copy_fields(source, target, *, skip: str | tuple[str, ...]):
    """Copy every set field of ``source`` but ``skip`` into ``target`` (same message type)."""
    skipped = (skip,) if isinstance(skip, str) else skip
    for field, value in source.ListFields():
        if field.name in skipped:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return target


def _framed(payload: int) -> int:
    """Bytes of a length-delimited field with a one-byte tag: tag, varint length, payload."""
    return 1 + _varint_bytes(payload) + payload


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * 8 if tensor.data_type in (onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64) else count * 4


def protected_inputs(input_path: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """The files no output may replace: the input model and every external data file it uses."""
    if input_path is None:
        return []
    protected = [(Path(input_path), "the input model")]
    protected += [(data, "the input's external data file") for data in sorted(external_data_files(input_path))]
    return protected


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
    protected: list[tuple[Path, str]] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path written.

    ``input_path`` is the model it came from: writing over it, or over any file it
    references, is refused (see :mod:`onnxopt.output` for every rule).  ``external_data``
    None means "only when needed" (tensors above :data:`EXTERNAL_DATA_THRESHOLD`); the data
    then goes to ``<name>.data`` (or ``<name>.1.data``, alternating, so the previous output
    stays whole until the new one is in place).  True puts every tensor into the data file.
    ``protected`` is :func:`protected_inputs` of ``input_path`` when the caller already has
    it (reading the input's references parses the input file).  ``model`` is left unchanged.
    """
    path = Path(path)
    if protected is None:
        protected = protected_inputs(input_path)
    check_output_path(path, protected=protected, what="output")
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD

    def write_staged(staged_model: Path, data_name: str | None) -> None:
        if data_name is None:
            onnx.save_model(external.materialized(model), str(staged_model))
            return
        _save_external(model, staged_model, data_name)
        if not (staged_model.parent / data_name).exists():
            logger.warning("external data requested but no tensor reaches %d bytes: %s holds everything", EXTERNAL_DATA_MIN_TENSOR, path)

    replace_model_files(path, write_staged, external_data=external_data, old_references=external_data_files, protected=protected)
    return path


def external_data_files(model_path: str | os.PathLike) -> set[Path]:
    """The external data files a model file refers to (empty if it has none or is unreadable).

    Every tensor counts: initializers and Constant attributes, in subgraphs and model-local
    functions too.
    """
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except (OSError, DecodeError, RuntimeError, ValueError):
        return set()
    base = Path(model_path).parent
    return {
        base / external_data_helper.ExternalDataInfo(tensor).location
        for tensor in external.all_tensors(proto)
        if external_data_helper.uses_external_data(tensor)
    }


def _save_external(model: onnx.ModelProto, staged_model: Path, data_name: str) -> None:
    """Save with every initializer of at least EXTERNAL_DATA_MIN_TENSOR bytes (the main
    graph's and the bodies', as ``onnx.save_model(save_as_external_data=True)`` picks them)
    in one external file, written tensor by tensor: lazy tensors are copied from the input's
    data file in chunks, in-memory ones written from the model, so no copy of the weights
    is made.  The caller's model stays exactly as it was, even if the save fails.
    """
    shell = _copy_fields(model, onnx.ModelProto(), skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")  # bodies (and their initializers) are copied
    with _DataWriter(staged_model.parent / data_name, data_name) as writer:
        for tensor in model.graph.initializer:
            stub = writer.externalized(tensor)
            shell.graph.initializer.append(tensor if stub is None else stub)
        for body in _bodies(shell.graph):
            for tensor in body.initializer:
                stub = writer.externalized(tensor)
                if stub is not None:
                    tensor.CopyFrom(stub)
    onnx.save_model(shell, str(staged_model))


class _DataWriter:
    """Appends tensor payloads to one external data file, opened at the first one."""

    def __init__(self, path: Path, location: str) -> None:
        self.path, self.location = path, location
        self.handle = None
        self.buffer: bytearray | None = None

    def __enter__(self) -> "_DataWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.handle.close()

    def externalized(self, tensor: onnx.TensorProto) -> onnx.TensorProto | None:
        """A payload-free copy of ``tensor`` pointing at its bytes, now written to the file;
        None when the tensor stays in the proto (under the size threshold, typed fields)."""
        if external.is_lazy(tensor):
            out = self._open()
            if self.buffer is None:
                self.buffer = bytearray(external.COPY_CHUNK)
            offset = out.tell()
            length = external.copy_payload(tensor, out, self.buffer)
        elif tensor.HasField("raw_data"):
            raw = tensor.raw_data
            if sys.getsizeof(raw) < EXTERNAL_DATA_MIN_TENSOR:  # onnx's own test, kept for identical files
                return None
            out = self._open()
            offset = out.tell()
            out.write(raw)
            length = len(raw)
            del raw
        else:
            return None
        stub = _copy_fields(tensor, onnx.TensorProto(), skip=("raw_data", "external_data", "data_location"))
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            entry = stub.external_data.add()
            entry.key, entry.value = key, str(value)
        return stub

    def _open(self):
        if self.handle is None:
            self.handle = open(self.path, "wb")
        return self.handle


def _bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph nested in ``graph`` (If branches, Loop/Scan bodies), depth first."""
    for node in graph.node:
        for attribute in node.attribute:
            nested = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for body in nested:
                yield body
                yield from _bodies(body)
