"""The op catalog: which ONNX ops the passes treat alike.

One name per notion. Where a pass works on a narrower set than the general one, the narrower
set has its own name here (e.g. ``WITHOUT_TRANSPOSE_OPS`` for the passes that do not handle
ConvTranspose), so a pass says which set it means instead of redefining it.
"""

#: Layers with a constant weight: y = x ⊛ W (+ b).
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: The layers without ConvTranspose (equalize, power_quant, rex, modular, channel permutation).
WITHOUT_TRANSPOSE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: Nodes that can absorb a per-channel affine map into their constants.
EXPRESSIVE_OPS = LAYER_OPS | {"BatchNormalization"}
#: MatMul and Gemm: the layers ORT quantizes dynamically. Static QDQ layers ORT does not fuse are
#: re-emitted dynamically (or put back in float) for these ops; an unfused Conv is kept.
MATRIX_OPS = frozenset({"MatMul", "Gemm"})

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Activations a quantized layer's output range follows into (ORT fuses them with the layer).
FOLLOWING_ACTIVATIONS = frozenset({"Relu", "Clip"})

#: Max and average pools, local and global.
POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
#: All pools, including the Lp ones.
POOLING_OPS = POOL_OPS | {"LpPool", "GlobalLpPool"}
AVERAGING_OPS = frozenset({"AveragePool", "GlobalAveragePool"})

#: Activations with f(a·x) = a·f(x) for a > 0.
HOMOGENEOUS_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Identity"})
#: Ops that commute with a positive per-channel scale, (x/r) ↦ op(x)/r, pools included (spiq).
SCALE_COMMUTING_OPS = frozenset({"Relu", "Identity"}) | POOL_OPS
#: σ(λz) = λσ(z) for λ > 0, pools and Flatten too (red merge). PRelu with a per-channel slope is
#: homogeneous too but its slope is a per-channel parameter: kept out.
HOMOGENEOUS_OPS = HOMOGENEOUS_ACTIVATIONS | POOL_OPS | {"Flatten"}
#: Elementwise activations that do not commute with a positive scale.
NON_HOMOGENEOUS_OPS = frozenset(
    {"Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Erf", "ThresholdedRelu", "Exp", "Log", "Sqrt"}
)
#: Elementwise (one input, same shape) activations.
ELEMENTWISE_OPS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Identity", "Celu", "Mish", "ThresholdedRelu"}
)
#: Readers that only look at the shape of their input.
SHAPE_READERS = frozenset({"Shape", "Size"})
