"""Modular (wrap-around) integer arithmetic: WrapToBits, ModularMatMul, ModularConv
(docs/modular-arithmetic.md, thesis §4.5).

A b-bit accumulator wraps instead of saturating::

    wrap_b(acc) = ((acc + 2^{b−1}) mod 2^b) − 2^{b−1}
                = BitwiseAnd(acc + 2^{b−1}, 2^b − 1) − 2^{b−1}     (two's complement)

``BitwiseAnd`` (opset 18) is ~10× faster than ``Mod`` in ORT (§7); models below opset 18
get the ``Mod`` body (same numbers).  ModularMatMul / ModularConv are ``MatMulInteger`` /
``ConvInteger`` plus an int32 bias, wrapped: the bias is part of the accumulator, as in
an integer accelerator.  Weights are meant to be stored as uint8 ``w + 128`` with zero
point 128 (ConvInteger with int8 weights is ~4.7× slower on ORT 1.32 CPU); both zero points
are explicit inputs.  Valid for widths 2..31 (the int32 accumulator itself must not
overflow: ``acc + 2^{b−1}`` is computed in int32).
"""

from __future__ import annotations

import numpy as np
import onnx

from .schema import Body, Formal, OpSchema, function, wrap_nodes, wrap_reference

INTS, INT, STRING = onnx.AttributeProto.INTS, onnx.AttributeProto.INT, onnx.AttributeProto.STRING
CONV_ATTRIBUTES = {"strides": INTS, "pads": INTS, "dilations": INTS, "kernel_shape": INTS, "group": INT, "auto_pad": STRING}
BITS_DOC = ("int", None, "accumulator width b in bits (2..31)")


# --------------------------------------------------------------------------- WrapToBits
def _wrap_body(opset: int, variant: str) -> onnx.FunctionProto:
    body = Body("wrap")
    wrap_nodes(body, "x", "y", opset)
    return function("WrapToBits", ["x"], ["y"], body, opset, ["bits"], WRAP.doc)


def wrap_to_bits_reference(x: np.ndarray, *, bits: int) -> np.ndarray:
    return wrap_reference(np.asarray(x), bits)


WRAP = OpSchema(
    name="WrapToBits",
    doc="y = ((x + 2^(bits−1)) mod 2^bits) − 2^(bits−1): two's-complement wrap of an integer tensor to `bits` bits.",
    inputs=(Formal("x", "T", "integer tensor"),),
    outputs=(Formal("y", "T", "x wrapped to [−2^(bits−1), 2^(bits−1) − 1]"),),
    attributes={"bits": BITS_DOC},
    type_constraints={"T": ("tensor(int32)", "tensor(int64)")},
    build=_wrap_body,
    reference=wrap_to_bits_reference,
)


# --------------------------------------------------------------------------- ModularMatMul
def _matmul_body(opset: int, variant: str) -> onnx.FunctionProto:
    body = Body("mm")
    product = body.op("MatMulInteger", "A", "B", "a_zero_point", "b_zero_point")
    wrap_nodes(body, body.op("Add", product, "bias"), "Y", opset)
    return function("ModularMatMul", ["A", "B", "a_zero_point", "b_zero_point", "bias"], ["Y"], body, opset, ["bits"], MATMUL.doc)


def matmul_reference(a, b, a_zero_point, b_zero_point, bias, *, bits: int) -> np.ndarray:
    left = np.asarray(a).astype(np.int64) - np.int64(np.asarray(a_zero_point))
    right = np.asarray(b).astype(np.int64) - np.asarray(b_zero_point).astype(np.int64)
    return wrap_reference(left @ right + np.asarray(bias, np.int64), bits).astype(np.int32)


MATMUL = OpSchema(
    name="ModularMatMul",
    doc="Y = wrap_bits(MatMulInteger(A, B, a_zero_point, b_zero_point) + bias), int32.",
    inputs=(
        Formal("A", "T1", "activation codes"),
        Formal("B", "T2", "weight codes (uint8 w+128 recommended)"),
        Formal("a_zero_point", "T1", "scalar zero point of A"),
        Formal("b_zero_point", "T2", "scalar (or per-column) zero point of B"),
        Formal("bias", "tensor(int32)", "integer bias broadcastable to Y (zeros if none)"),
    ),
    outputs=(Formal("Y", "tensor(int32)", "wrapped accumulator"),),
    attributes={"bits": BITS_DOC},
    type_constraints={"T1": ("tensor(uint8)", "tensor(int8)"), "T2": ("tensor(uint8)", "tensor(int8)")},
    build=_matmul_body,
    reference=matmul_reference,
)


# --------------------------------------------------------------------------- ModularConv
def _conv_body(opset: int, variant: str) -> onnx.FunctionProto:
    body = Body("mc")
    forwarded = {name: body.pass_attr(name, kind) for name, kind in CONV_ATTRIBUTES.items()}
    product = body.op("ConvInteger", "x", "w", "x_zero_point", "w_zero_point", **forwarded)
    wrap_nodes(body, body.op("Add", product, "bias"), "y", opset)
    return function("ModularConv", ["x", "w", "x_zero_point", "w_zero_point", "bias"], ["y"], body, opset, ["bits", *CONV_ATTRIBUTES], CONV.doc)


def conv_reference(x, w, x_zero_point, w_zero_point, bias, *, bits: int, strides=None, pads=None, dilations=None, group: int = 1, **_: object) -> np.ndarray:
    """2-D integer convolution (NCHW) in int64, plus bias, wrapped (numpy, vectorised)."""
    xi = np.asarray(x).astype(np.int64) - np.int64(np.asarray(x_zero_point))
    wi = np.asarray(w).astype(np.int64) - np.int64(np.asarray(w_zero_point))
    sh, sw = strides or (1, 1)
    dh, dw = dilations or (1, 1)
    top, left, bottom, right = pads or (0, 0, 0, 0)
    xi = np.pad(xi, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, height, width = xi.shape
    m, cg, kh, kw = wi.shape
    out_h = (height - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (width - (dw * (kw - 1) + 1)) // sw + 1
    rows = (np.arange(out_h) * sh)[:, None] + np.arange(kh) * dh  # [out_h, kh]
    cols = (np.arange(out_w) * sw)[:, None] + np.arange(kw) * dw  # [out_w, kw]
    patches = xi[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # n, c, out_h, out_w, kh, kw
    patches = patches.reshape(n, group, cg, out_h, out_w, kh, kw)
    weights = wi.reshape(group, m // group, cg, kh, kw)
    acc = np.einsum("ngchwij,gmcij->ngmhw", patches, weights).reshape(n, m, out_h, out_w)
    return wrap_reference(acc + np.asarray(bias, np.int64), bits).astype(np.int32)


CONV = OpSchema(
    name="ModularConv",
    doc="y = wrap_bits(ConvInteger(x, w, x_zero_point, w_zero_point) + bias), int32; Conv attributes as ConvInteger.",
    inputs=(
        Formal("x", "T1", "activation codes, NCHW"),
        Formal("w", "T2", "weight codes; uint8 w+128 with zero point 128 is ~4.7× faster than int8 on ORT CPU"),
        Formal("x_zero_point", "T1", "scalar zero point of x"),
        Formal("w_zero_point", "T2", "scalar zero point of w"),
        Formal("bias", "tensor(int32)", "integer bias broadcastable to y, e.g. [M, 1, 1] (zeros if none)"),
    ),
    outputs=(Formal("y", "tensor(int32)", "wrapped accumulator"),),
    attributes={
        "bits": BITS_DOC,
        **{name: ("ints" if kind == INTS else "int" if kind == INT else "string", None, "as ConvInteger (optional)") for name, kind in CONV_ATTRIBUTES.items()},
    },
    type_constraints={"T1": ("tensor(uint8)", "tensor(int8)"), "T2": ("tensor(uint8)", "tensor(int8)")},
    build=_conv_body,
    reference=conv_reference,
)
