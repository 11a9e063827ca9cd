"""fuse-pad-conv: fold a zero Pad on the spatial axes into the Conv that reads it.

Before::   x ── Pad(pads = [0, 0, t, l, 0, 0, b, r], constant 0) ── Conv(pads = p) ── y
After::    x ── Conv(pads = p + [t, l, b, r]) ── y

Exact: a Conv's own padding is zero padding, so padding first with zeros and then
convolving computes the same values.  Exported TensorFlow-style "SAME" padding
(EfficientNet) produces such Pads; left in the graph they cost a copy of the activation
and, in a quantized model, a float Pad between QDQ pairs.

Refused (with the reason): non-constant pads, a non-zero constant value, reflect/edge
modes, padding of the batch or channel axis, negative pads (cropping), an ``axes`` input,
a Pad output read by anything but one Conv or that is a graph output, a Conv with
``auto_pad``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import cleanup, constant_values, detach, is_default_domain, is_graph_output, node_label, string_attr
from onnxopt.pass_base import Pass, PassContext, PassResult


def spatial_pads(pad: gs.Node) -> np.ndarray | str:
    """[begin…, end…] of the spatial axes of a zero Pad, or why it is not one."""
    if string_attr(pad, "mode", "constant") != "constant":
        return f"mode {string_attr(pad, 'mode', 'constant')} is not zero padding"
    pads = constant_values(pad, 1) if len(pad.inputs) > 1 else np.asarray(pad.attrs.get("pads", []), dtype=np.int64)
    if pads is None or pads.size == 0:
        return "pads are not constant"
    value = constant_values(pad, 2) if len(pad.inputs) > 2 and not pad.inputs[2].is_empty() else np.asarray(pad.attrs.get("value", 0.0))
    if value is None or np.any(value):
        return "the padding value is not a constant 0"
    if len(pad.inputs) > 3 and not pad.inputs[3].is_empty():
        return "Pad with an axes input"
    rank = pads.size // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or np.any(begin[:2]) or np.any(end[:2]):
        return "pads the batch or channel axis"
    if np.any(pads < 0):
        return "negative pads (cropping)"
    return np.concatenate([begin[2:], end[2:]]).astype(np.int64)


class FusePadConv(Pass):
    name = "fuse-pad-conv"
    summary = "fold a zero Pad on the spatial axes into the Conv that reads it (exported SAME padding)"
    tags = frozenset({"cleanup"})

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused = 0
        for pad in [n for n in graph.nodes if n.op == "Pad" and is_default_domain(n)]:
            reason = self._check(graph, pad)
            if isinstance(reason, str):
                ctx.refuse(f"Pad {node_label(pad)}", reason)
                continue
            conv, extra = reason
            pads = np.asarray(conv.attrs.get("pads", [0] * len(extra)), dtype=np.int64)
            conv.attrs["pads"] = [int(v) for v in pads + extra]
            conv.inputs[0] = pad.inputs[0]
            detach(pad)
            fused += 1
        if fused:
            cleanup(graph)
        return PassResult(fused > 0, {"pads_fused": fused})

    @staticmethod
    def _check(graph: gs.Graph, pad: gs.Node) -> tuple[gs.Node, np.ndarray] | str:
        out = pad.outputs[0]
        readers = list(out.outputs)
        if is_graph_output(graph, out):
            return "its output is a graph output"
        if len(readers) != 1 or readers[0].op != "Conv" or not is_default_domain(readers[0]):
            return "its output is not read by exactly one Conv"
        conv = readers[0]
        if conv.inputs[0] is not out or any(t is out for t in conv.inputs[1:]):
            return "the Conv reads it as a parameter"
        if string_attr(conv, "auto_pad", "NOTSET") != "NOTSET":
            return f"Conv {node_label(conv)} uses auto_pad"
        extra = spatial_pads(pad)
        if isinstance(extra, str):
            return extra
        kernel_rank = len(conv.attrs.get("kernel_shape", [])) or (len(conv.inputs[1].shape) - 2 if conv.inputs[1].shape else 0)
        if len(extra) != 2 * kernel_rank:
            return "pad rank does not match the Conv"
        return conv, extra
