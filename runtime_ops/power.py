"""PowerQuantizeLinear / PowerDequantizeLinear: PowerQuant's operator (docs/powerquant.md,
thesis eqs. 3.13 and 3.15) as ONNX functions.

With ``L = 2^{b−1} − 1`` (signed) or ``2^b − 1`` (unsigned) and the step ``s`` in the power
domain (for a weight channel ``s = max|W|^a / L``)::

    q  = clip(round(sign(x)·|x|^a / s), −L·signed, L)              (PowerQuantizeLinear)
    x̂ = sign(q)·(|q|·s)^{1/a}                                      (PowerDequantizeLinear)

a = 1 is uniform quantization.  For a = 0.5 the bodies avoid ``Pow``: the quantizer uses
``Sqrt`` and the de-quantizer ``q·|q|·s²`` — an integer (q·|q|) times a scale, which is what
lets the power-quant pass feed MatMulInteger/ConvInteger (the "integer path").

The scale is per tensor (scalar) or per axis given as a tensor that broadcasts against x
(e.g. shape ``[C, 1, 1, 1]`` for Conv weights): numpy broadcasting replaces an ``axis``
attribute, so one body serves every rank.
"""

from __future__ import annotations

import numpy as np
import onnx

from .schema import Body, Formal, OpSchema, function

FLOAT = onnx.TensorProto.FLOAT


def _is_half(attrs: dict[str, object]) -> str:
    return "sqrt" if abs(float(attrs.get("exponent", 0.0)) - 0.5) < 1e-12 else "generic"


# --------------------------------------------------------------------------- quantize
def _quantize_body(opset: int, variant: str) -> onnx.FunctionProto:
    body = Body("pq")
    magnitude = body.op("Abs", "x")
    powered = body.op("Sqrt", magnitude) if variant == "sqrt" else body.op("Pow", magnitude, body.attr_float("exponent"))
    rounded = body.op("Mul", body.op("Round", body.op("Div", powered, "scale")), body.op("Sign", "x"))
    bits = body.op("Cast", body.attr_int("bits"), to=FLOAT)
    signed = body.op("Cast", body.attr_int("signed"), to=FLOAT)
    levels = body.op("Sub", body.op("Pow", body.const_float(2.0), body.op("Sub", bits, signed)), body.const_float(1.0))
    low = body.op("Neg", body.op("Mul", levels, signed))
    clipped = body.op("Clip", rounded, low, levels)
    body.op("Cast", clipped, outputs=["y"], to=onnx.TensorProto.INT32)
    return function("PowerQuantizeLinear", ["x", "scale"], ["y"], body, opset, ["exponent", "bits"], QUANTIZE_DOC, {"signed": 1})


def quantize_reference(x: np.ndarray, scale: np.ndarray, *, exponent: float, bits: int, signed: int = 1) -> np.ndarray:
    x = np.asarray(x, np.float32)
    magnitude = np.abs(x)
    powered = np.sqrt(magnitude) if abs(exponent - 0.5) < 1e-12 else np.power(magnitude, np.float32(exponent))
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    rounded = np.round(powered / np.asarray(scale, np.float32)) * np.sign(x)
    return np.clip(rounded, -levels if signed else 0, levels).astype(np.int32)


QUANTIZE_DOC = "q = clip(round(sign(x)·|x|^exponent / scale), −L·signed, L), L = 2^(bits−signed) − 1; int32 codes."

POWER_QUANTIZE = OpSchema(
    name="PowerQuantizeLinear",
    doc=QUANTIZE_DOC,
    inputs=(Formal("x", "T", "values to quantize"), Formal("scale", "T", "power-domain step, scalar or broadcastable to x (per axis)")),
    outputs=(Formal("y", "tensor(int32)", "codes in [−L·signed, L]"),),
    attributes={
        "exponent": ("float", None, "power a in (0, 1]; 1 = uniform"),
        "bits": ("int", None, "bit-width b (2..16)"),
        "signed": ("int", 1, "1: symmetric codes ±(2^(b−1)−1); 0: codes 0..2^b−1 (non-negative inputs)"),
    },
    type_constraints={"T": ("tensor(float)",)},
    build=_quantize_body,
    reference=quantize_reference,
    variant_of=_is_half,
)


# --------------------------------------------------------------------------- dequantize
def _dequantize_body(opset: int, variant: str) -> onnx.FunctionProto:
    body = Body("pdq")
    codes = body.op("Cast", "x", to=FLOAT)
    if variant == "sqrt":
        body.op("Mul", body.op("Mul", codes, body.op("Abs", codes)), body.op("Mul", "scale", "scale"), outputs=["y"])
    else:
        inverse = body.op("Div", body.const_float(1.0), body.attr_float("exponent"))
        magnitude = body.op("Pow", body.op("Mul", body.op("Abs", codes), "scale"), inverse)
        body.op("Mul", magnitude, body.op("Sign", codes), outputs=["y"])
    return function("PowerDequantizeLinear", ["x", "scale"], ["y"], body, opset, ["exponent"], DEQUANTIZE_DOC, {"bits": 8})


def dequantize_reference(q: np.ndarray, scale: np.ndarray, *, exponent: float, bits: int = 8) -> np.ndarray:
    codes = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    if abs(exponent - 0.5) < 1e-12:
        return (codes * np.abs(codes)) * (scale * scale)
    return np.power(np.abs(codes) * scale, np.float32(1.0) / np.float32(exponent)) * np.sign(codes)


DEQUANTIZE_DOC = "x̂ = sign(q)·(|q|·scale)^(1/exponent); for exponent 0.5 computed as q·|q|·scale²."

POWER_DEQUANTIZE = OpSchema(
    name="PowerDequantizeLinear",
    doc=DEQUANTIZE_DOC,
    inputs=(Formal("x", "T1", "integer codes"), Formal("scale", "T2", "power-domain step, scalar or broadcastable to x")),
    outputs=(Formal("y", "T2", "de-quantized values"),),
    attributes={
        "exponent": ("float", None, "power a of the quantizer"),
        "bits": ("int", 8, "bit-width of the codes (informative: the decoder does not need it)"),
    },
    type_constraints={"T1": ("tensor(int8)", "tensor(uint8)", "tensor(int32)"), "T2": ("tensor(float)",)},
    build=_dequantize_body,
    reference=dequantize_reference,
    variant_of=_is_half,
)
