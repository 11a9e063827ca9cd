"""Export zoo models to ONNX into a cache directory outside the source tree, on demand.

Cached files are content-addressed: ``<name>-<key>.onnx`` where ``key`` hashes everything
that determines the export (the model's definition source, the BN-randomisation helpers,
the registry entry, onnxopt's exporter, the torch version and the export settings).  A
changed definition therefore gets a new file and rebuilds; an unchanged one is reused
without importing torch.  Writes are atomic (``export_torch``), so concurrent builders
of the same model at worst both do the work.

Cache directory: the ``cache_dir`` argument, else ``$ONNXOPT_ZOO_CACHE``, else
``~/.cache/onnxopt/zoo``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from onnxopt.errors import OnnxoptError

from .registry import REGISTRY, create_model, get_spec, sample_input

if TYPE_CHECKING:
    import torch
    from torch import nn

OPSET = 17
CACHE_ENV = "ONNXOPT_ZOO_CACHE"


def zoo_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory zoo exports go to (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxopt" / "zoo"


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise OnnxoptError("building zoo models needs PyTorch: pip install 'onnxopt[test]'") from None


def _exporter_source() -> bytes:
    spec = importlib.util.find_spec("onnxopt.export")
    if spec is None or spec.origin is None:  # pragma: no cover - broken install
        raise OnnxoptError("onnxopt.export not found")
    return Path(spec.origin).read_bytes()


def cache_key(*parts: str | bytes) -> str:
    """A 16-hex-digit digest of ``parts`` plus the torch version, exporter source and opset."""
    h = hashlib.sha256()
    for part in (_torch_version(), str(OPSET), _exporter_source(), *parts):
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def model_key(name: str) -> str:
    """Cache key of zoo model ``name``: changes whenever its definition or the exporter changes."""
    spec = get_spec(name)
    return cache_key(repr(spec), *(path.read_bytes() for path in spec.source_files))


def zoo_model_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the current export of zoo model ``name`` lives (it may not exist yet)."""
    return zoo_cache_dir(cache_dir) / f"{name}-{model_key(name)}.onnx"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cached_export(
    path: Path,
    make: Callable[[], tuple[nn.Module, torch.Tensor | tuple[torch.Tensor, ...]]],
    *,
    force: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export ``make()``'s (module, sample input) to ``path`` unless it exists; drop stale siblings.

    Siblings are files named ``<stem>-<other key>.onnx`` next to ``path`` (``path`` is
    ``<stem>-<key>.onnx``): exports of older definitions of the same model.
    """
    if path.is_file() and not force:
        _log(f"  {path.name}: up to date")
        return path
    from onnxopt.export import export_torch

    start = time.perf_counter()
    module, sample = make()
    with warnings.catch_warnings():
        # torch notes that it cannot constant-fold strided Slice; folding is off anyway.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        export_torch(module, sample, path, input_names=input_names, output_names=output_names, opset=OPSET)
    _log(f"  {path.name}: exported in {time.perf_counter() - start:.1f} s")
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.onnx"):
        if old != path and old.name.rsplit("-", 1)[0] == stem:
            old.unlink(missing_ok=True)
    return path


def build_zoo_model(name: str, cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Export zoo model ``name`` (opset 17, dynamic batch, BN preserved) unless cached; its path."""
    path = zoo_model_path(name, cache_dir)
    return cached_export(path, lambda: (create_model(name), sample_input(name)), force=force)


def build_zoo(
    names: Iterable[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Build ``names`` (default: every registered model); name -> exported path."""
    selected = list(names) if names is not None else list(REGISTRY)
    for name in selected:
        get_spec(name)  # fail before exporting anything on an unknown name
    _log(f"zoo cache: {zoo_cache_dir(cache_dir)}")
    paths = {}
    for i, name in enumerate(selected, 1):
        _log(f"[{i}/{len(selected)}] {name}")
        paths[name] = build_zoo_model(name, cache_dir, force=force)
    return paths
