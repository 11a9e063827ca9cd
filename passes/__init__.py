"""onnxopt.passes: the built-in passes, one module per pass family.

:func:`builtin_registry` returns a fresh :class:`~onnxopt.registry.PassRegistry` holding them
and the presets; nothing is registered at import time.
"""

from __future__ import annotations

from onnxopt.registry import PassRegistry, Preset

from .bn_fold import FoldBatchNorm
from .cleanup import EliminateDead, EliminateIdentity
from .constant_folding import FoldConstants
from .equalize import AbsorbHighBias, Equalize
from .conv_bn_fold import FoldConvBn
from .modular import ModularAccumulator
from .pad_fusion import FusePadConv
from .power_quant import PowerQuant
from .quantize import Quantize
from .red import DecomposeDepthwise, HashWeights, MergeNeurons
from .rex import Rex
from .weight_only import WeightOnlyQuantize
from . import modular
from .power_quant.flags import FLAGS as POWER_QUANT_FLAGS
from .quantize.flags import FLAGS as QUANTIZE_FLAGS
from .red.flags import FLAGS as RED_FLAGS
from .rex.flags import FLAGS as REX_FLAGS
from .weight_only.flags import FLAGS as WEIGHT_ONLY_FLAGS

BUILTIN_PASSES = (
    EliminateIdentity,
    FoldConstants,
    FoldBatchNorm,
    FoldConvBn,
    FusePadConv,
    HashWeights,
    MergeNeurons,
    DecomposeDepthwise,
    Equalize,
    AbsorbHighBias,
    Quantize,
    WeightOnlyQuantize,
    PowerQuant,
    Rex,
    ModularAccumulator,
    EliminateDead,
)

# The CLI flags of each family, in --help order (also the order their checks run in).
BUILTIN_FLAGS = (RED_FLAGS, QUANTIZE_FLAGS, WEIGHT_ONLY_FLAGS, POWER_QUANT_FLAGS, REX_FLAGS, modular.FLAGS)

# The lossless default pipeline; the lossy presets insert their passes before eliminate-dead.
LOSSLESS = ("eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv")
FINISH = ("eliminate-dead",)

BUILTIN_PRESETS = (
    Preset(
        "default",
        "lossless: remove no-ops, fold constants, fold every foldable BN exactly, fuse zero Pads into Convs, remove dead code",
        LOSSLESS + FINISH,
    ),
    Preset(
        "classic",
        "lossless baseline: like default but only the adjacent Conv→BN fold other tools do",
        ("eliminate-identity", "fold-constants", "fold-conv-bn", "eliminate-dead"),
    ),
    Preset(
        "quantize",
        "default, then data-free static QDQ quantization with SPIQ scales (options weight_bits, act_bits, spiq, ...)",
        LOSSLESS + ("quantize",) + FINISH,
    ),
    Preset(
        "dfq",
        "the DFQ baseline (Nagel et al. 2019): default, then cross-layer equalization and high-bias absorption, then data-free quantization with SPIQ off (spiq=auto for DFQ + SPIQ)",
        LOSSLESS + ("equalize", "absorb-high-bias", "quantize") + FINISH,
        {"spiq": False},
    ),
    Preset(
        "weight-only",
        "default, then weight-only block-wise quantization of MatMul/Gemm weights to ONNX Runtime's MatMulNBits (options weight_bits, block_size, symmetric, keep_8bit, ...)",
        LOSSLESS + ("weight-only",) + FINISH,
    ),
    Preset(
        "red",
        "lossy data-free pruning (RED/RED++): default, then weight hashing, neuron merging (option alpha), uneven depthwise decomposition",
        LOSSLESS + ("hash-weights", "merge-neurons", "decompose-depthwise") + FINISH,
    ),
    Preset(
        "rex",
        "quantize, then REx residual branches (options rex_order K, rex_budget γ, ...; docs/rex.md)",
        LOSSLESS + ("quantize", "rex") + FINISH,
    ),
    Preset(
        "power-quant",
        "default, then PowerQuant (non-uniform power quantization, custom ops with ONNX function bodies; options weight_bits, act_bits, power_exponent, ...)",
        LOSSLESS + ("power-quant",) + FINISH,
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
    for family in BUILTIN_FLAGS:
        registry.add_flags(family)
    return registry


__all__ = ["builtin_registry", "BUILTIN_FLAGS", "BUILTIN_PASSES", "BUILTIN_PRESETS"]
