"""The public Python API: :func:`optimize`."""

from __future__ import annotations

import os
from typing import Any, Sequence

import onnx

from .errors import PipelineError
from .io import ModelSource, load_model
from .manager import PassManager
from .progress import Progress
from .registry import PassRegistry
from .report import Report

DEFAULT_PRESET = "default"


def resolve_pipeline(registry: PassRegistry, passes: Sequence[str] | str | None, preset: str | None) -> list[str]:
    """Pass names from an explicit list (or comma-separated string) or a preset name."""
    if passes is not None and preset is not None:
        raise PipelineError("give either passes or a preset, not both")
    if passes is None:
        return list(registry.preset(preset or DEFAULT_PRESET).steps)
    names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else list(passes)
    if any(not name for name in names):
        raise PipelineError(f"empty pass name in {passes!r}")
    return names


def preset_options(registry: PassRegistry, passes: Sequence[str] | str | None, preset: str | None) -> dict[str, Any]:
    """The option defaults of the preset that chose the pipeline (none for an explicit list)."""
    return {} if passes is not None else dict(registry.preset(preset or DEFAULT_PRESET).options)


def optimize(
    model_or_path: ModelSource,
    passes: Sequence[str] | str | None = None,
    preset: str | None = None,
    *,
    registry: PassRegistry | None = None,
    validate: bool = False,
    max_rounds: int = 1,
    progress: bool = False,
    allow_no_op: bool = False,
    report: Report | None = None,
    checked: bool = False,
    lazy: bool = False,
    **options: Any,
) -> tuple[onnx.ModelProto, Report]:
    """Optimize a model and return the new ModelProto and the report.

    ``passes`` (names, in order) or ``preset`` (default: ``"default"``, the lossless
    pipeline) choose the pipeline; ``options`` go to the passes that declare them.
    ``validate`` runs onnx.checker (full_check) after every pass.  The input is not modified.
    A requested compression (quantize, power-quant, rex, modular-accumulator, the RED
    passes) that rewrites nothing raises NothingToDoError naming the cause and the fix,
    unless ``allow_no_op`` (sweeps that want the report either way).  ``report`` is filled
    in (the CLI's carries the input and output paths); ``checked`` skips the input checker
    for a ModelProto that ``load_model`` already checked.  ``lazy`` (for a path): leave
    the large external initializers in the input's data file, read only when a pass needs
    them (see :mod:`onnxopt.external`; save the result with :func:`onnxopt.save_model`).
    """
    if registry is None:
        from onnxopt.passes import builtin_registry

        registry = builtin_registry()
    names = resolve_pipeline(registry, passes, preset)
    pipeline = registry.build(names, {**preset_options(registry, passes, preset), **options})
    model = load_model(model_or_path, check=not (checked and isinstance(model_or_path, onnx.ModelProto)), lazy=lazy)
    manager = PassManager(
        pipeline, validate=validate, max_rounds=max_rounds, progress=Progress(enabled=progress), allow_no_op=allow_no_op, registry=registry
    )
    if report is None:
        report = Report(input_path=None if isinstance(model_or_path, onnx.ModelProto) else os.fspath(model_or_path))
    return manager.run(model, report)
