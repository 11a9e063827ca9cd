"""onnxopt's model zoo: PyTorch reference models, real pretrained weights and data, ONNX exports.

Importing this package imports neither torch nor any submodule; the names below are
loaded on first use.  Modules: ``registry`` (name -> spec), ``cnn``, ``mobile``,
``transformer``, ``edge_cases`` (definitions), ``common`` (seeding, BN statistics),
``build`` (cached ONNX exports), ``assets`` / ``datasets`` / ``pretrained`` (real
weights and data), ``ocr`` (PaddleOCR ONNX models from the rapidocr wheel, rendered text
lines), ``train_fashion_mnist``.  Command line: ``python -m onnxopt.models``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "REGISTRY": "registry",
    "ModelSpec": "registry",
    "get_spec": "registry",
    "create_model": "registry",
    "sample_input": "registry",
    "count_batchnorms": "common",
    "randomize_bn_stats": "common",
    "build_zoo_model": "build",
    "build_zoo": "build",
    "zoo_cache_dir": "build",
    "zoo_model_path": "build",
    "asset_available": "assets",
    "install_assets": "assets",
    "load_imagenet_samples": "datasets",
    "load_fashion_mnist": "datasets",
    "load_mobilenet_v2_pretrained": "pretrained",
    "load_efficientnet_lite0_pretrained": "pretrained",
    "load_minilm": "pretrained",
    "minilm_embed": "pretrained",
    "export_pretrained": "pretrained",
}

__all__ = [
    "REGISTRY",
    "ModelSpec",
    "asset_available",
    "build_zoo",
    "build_zoo_model",
    "count_batchnorms",
    "create_model",
    "export_pretrained",
    "get_spec",
    "install_assets",
    "load_efficientnet_lite0_pretrained",
    "load_fashion_mnist",
    "load_imagenet_samples",
    "load_minilm",
    "load_mobilenet_v2_pretrained",
    "minilm_embed",
    "randomize_bn_stats",
    "sample_input",
    "zoo_cache_dir",
    "zoo_model_path",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
