"""fold-conv-bn: the classic adjacent Conv → BatchNormalization fold.

Before::    x ── Conv(W, b) ── y ── BatchNormalization(γ, β, μ, v, ε) ── z
After::     x ── Conv(W', b') ── z

Maths (notation of docs/bn-folding.md): the BN computes, per output channel c,
``z_c = s_c·y_c + t_c`` with ``s = γ / √(v + ε)`` and ``t = β − s·μ``.  Since
``y_c = W[c] ∗ x + b_c``::

    W'[c] = s_c · W[c]            (scale the c-th output filter)
    b'_c  = s_c · b_c + t_c       (b = 0 when the Conv has no bias: one is created)

This is exact for any s (γ = 0 included) and any group count, since each output channel of a
Conv has its own filter.  The general necessary-and-sufficient BN folding (across Add,
Concat, pooling, forward into the next layer) is a separate pass family.

Conditions checked (the refusal reason names the first one that fails):

1. the BN is in the default domain, in inference mode (no ``training_mode=1``, one output);
2. its input is produced by a default-domain Conv;
3. the Conv output is read by the BN only and is not a graph output;
4. the Conv weight (and bias, when present) and the four BN parameters are initializers;
5. the parameter shapes match the Conv's output channel count and are floating point.

Initializers shared with other nodes are copied before they are edited.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NameFactory,
    cleanup,
    constant_values,
    detach,
    is_default_domain,
    is_graph_output,
    node_label,
    optional_input,
    per_channel,
    producer,
    set_constant_input,
    substitute,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

from .common.batchnorm import bn_refusal, bn_scale_shift



class FoldConvBn(Pass):
    name = "fold-conv-bn"
    summary = "fold a BatchNormalization into the Conv directly before it (classic adjacent fold)"
    tags = frozenset({"bn-fold"})
    runs_before = frozenset({"prune", "quantize"})

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameFactory(graph)
        folded = 0
        candidates = [n for n in graph.nodes if n.op == "BatchNormalization" and is_default_domain(n)]
        for bn in ctx.progress(candidates, label="BatchNormalization"):
            reason = self.check(graph, bn)
            if reason:
                ctx.refuse(f"BN {node_label(bn)}", reason)
                continue
            self.rewrite(graph, bn, names)
            folded += 1
        if folded:
            cleanup(graph)
        return PassResult(folded > 0, {"bn_folded": folded, "bn_kept": len(candidates) - folded})

    @staticmethod
    def check(graph: gs.Graph, bn: gs.Node) -> str | None:
        reason = bn_refusal(bn)
        if reason:
            return reason
        conv = producer(bn.inputs[0])
        if conv is None or conv.op != "Conv" or not is_default_domain(conv):
            return f"input is not produced by a Conv ({conv.op if conv else 'graph input'})"
        conv_out = bn.inputs[0]
        if is_graph_output(graph, conv_out):
            return f"Conv {node_label(conv)} output is also a graph output"
        others = [n for n in conv_out.outputs if n is not bn]
        if others:
            return f"Conv {node_label(conv)} output is also read by {node_label(others[0])}"
        weight = constant_values(conv, 1)
        if weight is None:
            return f"Conv {node_label(conv)} weight is not an initializer"
        if not np.issubdtype(weight.dtype, np.floating):
            return f"Conv {node_label(conv)} weight is not floating point"
        if optional_input(conv, 2) is not None and constant_values(conv, 2) is None:
            return f"Conv {node_label(conv)} bias is not an initializer"
        channels = weight.shape[0]
        if any(constant_values(bn, i).size != channels for i in range(1, 5)):
            return f"BN parameters do not have the Conv's {channels} output channels"
        return None

    @staticmethod
    def rewrite(graph: gs.Graph, bn: gs.Node, names: NameFactory) -> None:
        conv = producer(bn.inputs[0])
        assert conv is not None
        scale, shift = bn_scale_shift(bn)
        weight = constant_values(conv, 1)
        bias = constant_values(conv, 2)
        bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        new_weight = (weight.astype(np.float64) * per_channel(scale, 0, weight.ndim)).astype(weight.dtype)
        new_bias = (scale * bias + shift).astype(weight.dtype)
        set_constant_input(graph, conv, 1, new_weight, names)
        set_constant_input(graph, conv, 2, new_bias, names, base_name=f"{conv.name or 'conv'}_bias")
        conv_out, bn_out = bn.inputs[0], bn.outputs[0]
        detach(bn)
        substitute(conv.outputs, conv_out, bn_out)
