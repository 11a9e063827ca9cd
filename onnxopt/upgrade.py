"""Opset upgrade before passes that emit newer ops.

A pass declares ``min_opset`` (quantize: 13, for per-axis DequantizeLinear; the custom-op
passes: 15, for CastLike in their function bodies).  :func:`upgrade_for` raises an older
model's default-domain opset once, before the first pass, with
``onnx.version_converter.convert_version``, keeping the model's metadata_props, doc_string,
producer and version, and says so in one line for the report.  A failed conversion is an
UnsupportedModelError (exit 5) naming the opsets and the fix.
"""

from __future__ import annotations

from typing import Sequence

import onnx
from onnx import version_converter

from .errors import UnsupportedModelError
from .io import default_opset
from .pass_base import Pass


def upgrade_for(model: onnx.ModelProto, passes: Sequence[Pass]) -> tuple[onnx.ModelProto, str | None]:
    """``model`` (unchanged) and None, or the upgraded copy and the report's note
    ``opset 11 → 13 upgraded for quantize`` when a pass needs a newer opset."""
    current = default_opset(model)
    needing = [p for p in passes if p.min_opset is not None and current is not None and current < p.min_opset]
    if not needing:
        return model, None
    target = max(p.min_opset for p in needing)  # type: ignore[type-var]
    names = ", ".join(dict.fromkeys(p.name for p in needing))
    return upgrade_opset(model, target, names), f"opset {current} → {target} upgraded for {names}"


def upgrade_opset(model: onnx.ModelProto, target: int, purpose: str) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset ``target``, its metadata kept."""
    current = default_opset(model)
    try:
        upgraded = version_converter.convert_version(model, target)
        upgraded.ir_version = max(upgraded.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)]))
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError, ValidationError, IndexError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"{purpose} needs opset >= {target}, the model has opset {current} and onnx.version_converter could not "
            f"upgrade it ({first}); re-export the model at opset {target} or newer"
        ) from None
    _keep_model_fields(upgraded, model)
    return upgraded


def _keep_model_fields(upgraded: onnx.ModelProto, original: onnx.ModelProto) -> None:
    upgraded.producer_name = original.producer_name
    upgraded.producer_version = original.producer_version
    upgraded.domain = original.domain
    upgraded.model_version = original.model_version
    upgraded.doc_string = original.doc_string
    upgraded.graph.doc_string = original.graph.doc_string
    del upgraded.metadata_props[:]
    upgraded.metadata_props.extend(original.metadata_props)
