"""The zoo's table of models: name -> :class:`ModelSpec`.  Pure data, no torch import.

A spec names its constructor as ``"module:callable"`` inside this package, so reading the
registry (``python -m onnxopt.models list``) needs no torch; :func:`create_model` imports
the module and builds the model deterministically (seeded, non-trivial BN statistics, eval).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from onnxopt.errors import OnnxoptError

if TYPE_CHECKING:
    import torch
    from torch import nn

PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelSpec:
    """How to build and feed one zoo model."""

    name: str
    factory: str  # "module:callable" inside this package, e.g. "cnn:resnet18"
    input_shape: tuple[int, ...]  # with batch 1; the batch axis is exported as dynamic
    description: str
    small: bool  # exports and runs in well under a few seconds: used by the fast tests

    @property
    def module_name(self) -> str:
        return f"{PACKAGE}.{self.factory.partition(':')[0]}"

    @property
    def source_files(self) -> tuple[Path, ...]:
        """Files whose content defines the model (hashed to decide whether a cached export is stale)."""
        return (PACKAGE_DIR / f"{self.factory.partition(':')[0]}.py", PACKAGE_DIR / "common.py")

    def constructor(self) -> Callable[[], nn.Module]:
        module_name, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(f"{PACKAGE}.{module_name}"), attr)


def _spec(name: str, factory: str, shape: tuple[int, ...], description: str, small: bool = True) -> ModelSpec:
    return ModelSpec(name, factory, shape, description, small)


_EDGE = (1, 8, 12, 12)

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec(
            "resnet18", "cnn:resnet18", (1, 3, 224, 224), "ResNet-18, ImageNet layout, 1000 classes, 20 BN", small=False
        ),
        _spec(
            "resnet50",
            "cnn:resnet50",
            (1, 3, 224, 224),
            "ResNet-50 (bottleneck, v1.5), ImageNet layout, 53 BN",
            small=False,
        ),
        _spec("resnet20", "cnn:resnet20", (1, 3, 32, 32), "ResNet-20, CIFAR layout (option A shortcuts), 10 classes"),
        _spec("preact_resnet", "cnn:preact_resnet_small", (1, 3, 32, 32), "small pre-activation ResNet (BN-ReLU-Conv)"),
        _spec("densenet", "cnn:densenet_small", (1, 3, 32, 32), "small DenseNet-BC (Concat of BN-ReLU-Conv outputs)"),
        _spec(
            "mobilenet_v2",
            "mobile:mobilenet_v2",
            (1, 3, 224, 224),
            "MobileNetV2 1.0, torchvision key names, 52 BN",
            small=False,
        ),
        _spec(
            "efficientnet_lite0",
            "mobile:efficientnet_lite0",
            (1, 3, 224, 224),
            "EfficientNet-Lite0, TF SAME padding, 49 BN",
            small=False,
        ),
        _spec(
            "vit_tiny",
            "transformer:vit_tiny",
            (1, 3, 32, 32),
            "ViT: 4x4 patches, dim 64, 2 layers, LayerNorm/GELU/MatMul",
        ),
        _spec("edge_bn_after_add", "edge_cases:BNAfterAdd", _EDGE, "Conv + Conv -> Add -> BN -> ReLU"),
        _spec("edge_bn_after_concat", "edge_cases:BNAfterConcat", _EDGE, "Conv, Conv -> Concat -> BN -> ReLU"),
        _spec("edge_bn_before_conv_nopad", "edge_cases:BNBeforeConvNoPad", _EDGE, "input -> BN -> Conv (no padding)"),
        _spec(
            "edge_bn_pool_linear",
            "edge_cases:BNBeforePoolLinear",
            _EDGE,
            "Conv -> ReLU -> BN -> GlobalAvgPool -> Flatten -> Linear",
        ),
        _spec(
            "edge_bn_after_relu_conv", "edge_cases:BNAfterReLUThenConv", _EDGE, "Conv -> ReLU -> BN -> Conv (padded)"
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The spec of zoo model ``name``; OnnxoptError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise OnnxoptError(f"unknown zoo model {name!r}; known: {', '.join(REGISTRY)}") from None


def create_model(name: str, seed: int = 0) -> nn.Module:
    """Build zoo model ``name`` deterministically: seeded init, random non-trivial BN stats, eval mode."""
    from .common import build_seeded

    return build_seeded(get_spec(name).constructor(), seed)


def sample_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic standard-normal input of the model's shape with ``batch`` rows."""
    import torch

    shape = (batch, *get_spec(name).input_shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
