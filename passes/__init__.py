"""onnxopt.passes: the built-in passes, one module per pass family.

:func:`builtin_registry` returns a fresh :class:`~onnxopt.registry.PassRegistry` holding them
and the presets; nothing is registered at import time.
"""

from __future__ import annotations

from onnxopt.registry import PassRegistry, Preset

from .bn_fold import FoldBatchNorm
from .cleanup import EliminateDead, EliminateIdentity
from .constant_folding import FoldConstants
from .pad_fusion import FusePadConv
from .quantize import Quantize
from .rex import Rex
from .conv_bn_fold import FoldConvBn

BUILTIN_PASSES = (EliminateIdentity, FoldConstants, FoldBatchNorm, FoldConvBn, FusePadConv, Quantize, Rex, EliminateDead)

BUILTIN_PRESETS = (
    Preset(
        "default",
        "lossless: remove no-ops, fold constants, fold every foldable BN exactly, fuse zero Pads into Convs, remove dead code",
        ("eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "eliminate-dead"),
    ),
    Preset(
        "classic",
        "lossless baseline: like default but only the adjacent Conv→BN fold other tools do",
        ("eliminate-identity", "fold-constants", "fold-conv-bn", "eliminate-dead"),
    ),
    Preset(
        "quantize",
        "default, then data-free static QDQ quantization with SPIQ scales (options weight_bits, act_bits, spiq, ...)",
        ("eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "quantize", "eliminate-dead"),
    ),
    Preset(
        "rex",
        "quantize, then REx residual branches (options rex_order K, rex_budget γ, ...; METHODS.md §5)",
        ("eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "quantize", "rex", "eliminate-dead"),
    ),
    Preset("cleanup", "lossless graph cleanup only (no BN folding)", ("eliminate-identity", "fold-constants", "eliminate-dead")),
    Preset("none", "run no pass (measure, verify or re-save a model)", ()),
)


def builtin_registry() -> PassRegistry:
    registry = PassRegistry()
    for pass_cls in BUILTIN_PASSES:
        registry.register(pass_cls)
    for preset in BUILTIN_PRESETS:
        registry.add_preset(preset)
    return registry


__all__ = ["builtin_registry", "BUILTIN_PASSES", "BUILTIN_PRESETS"]
