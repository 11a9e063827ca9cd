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
from .conv_bn_fold import FoldConvBn
from .modular import ModularAccumulator
from .power_quant import PowerQuant

BUILTIN_PASSES = (EliminateIdentity, FoldConstants, FoldBatchNorm, FoldConvBn, FusePadConv, Quantize, EliminateDead, PowerQuant, ModularAccumulator)

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
        "power-quant",
        "default, then PowerQuant (non-uniform power quantization, custom ops with ONNX function bodies; options weight_bits, act_bits, power_exponent, ...)",
        ("eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "power-quant", "eliminate-dead"),
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
