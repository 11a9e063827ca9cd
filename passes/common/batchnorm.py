"""An inference-mode BatchNormalization as a per-channel affine map z = s·y + t.

Shared by fold-conv-bn and fold-batchnorm: ``s = γ / √(v + ε)``, ``t = β − s·μ``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_values


def bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine map (s, t) of an inference-mode BatchNormalization, in float64."""
    gamma, beta, mean, var = (constant_values(bn, i).astype(np.float64) for i in range(1, 5))
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return scale, beta - scale * mean


def bn_refusal(bn: gs.Node) -> str | None:
    """Why ``bn`` cannot be folded at all (training mode, non-constant parameters), or None."""
    if bn.attrs.get("training_mode", 0) or len([t for t in bn.outputs if not t.is_empty()]) > 1:
        return "BatchNormalization is in training mode"
    if bn.attrs.get("spatial", 1) != 1:
        return "BatchNormalization with spatial=0 is not supported"
    for index, label in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")):
        values = constant_values(bn, index)
        if values is None:
            return f"BN {label} is not an initializer"
        if not np.issubdtype(values.dtype, np.floating):
            return f"BN {label} is not floating point"
    return None
