"""Which ``MatMulNBits`` forms ONNX Runtime's CPU kernel runs on its fast path.

ONNX Runtime's CPU ``MatMulNBits`` (MLAS) multiplies block by block without decoding the
weight for only some combinations of bits, block size, ``accuracy_level`` and zero-point
type; every other one dequantizes the whole weight to float on every call, which makes
decoding many times slower than the fast form of the same layer, and slower than the float
model.  The rule below is what ``python -m bench.nbits_kernels`` measured on ONNX Runtime
1.32 (one 2048 × 2048 layer, one token; the figures are in ``bench/results/nbits_kernels.md``,
which also checks this rule against them):

* 4 bits: fast at every accuracy_level and block size, with uint8 zero points or none;
* 8 bits: fast only at accuracy_level 4;
* 2 bits: fast only at accuracy_level 4 and in blocks of 32, 64 or 128;
* float zero points: never fast.

The weight-only pass counts the nodes it writes in a slow form and the report prints them
as a warning with the reason (:func:`cpu_slow_form`): a requested setting that makes the
model slower than its float input is said, not left to be found.
"""

from __future__ import annotations

#: Block sizes of the 2-bit fast kernel (at accuracy_level 4).
FAST_2BIT_BLOCKS = (32, 64, 128)
#: The accuracy_level at which 2- and 8-bit weights are on the fast path.
FAST_LEVEL = 4


def cpu_slow_form(bits: int, block_size: int, accuracy_level: int, float_zero_points: bool = False) -> str | None:
    """Why a MatMulNBits of this form runs off ONNX Runtime's CPU fast path (the fix in the
    text), or None when it is on it."""
    if float_zero_points:
        return "float zero points (zero_points='uint8' is the fast form)"
    if bits == 4:
        return None
    if accuracy_level != FAST_LEVEL:
        return f"{bits}-bit weights at accuracy_level {accuracy_level} (use accuracy_level {FAST_LEVEL})"
    if bits == 2 and block_size not in FAST_2BIT_BLOCKS:
        return f"2-bit weights in blocks of {block_size} (use blocks of {', '.join(map(str, FAST_2BIT_BLOCKS))})"
    return None


def slow_nodes(records: list[dict], accuracy_level: int) -> dict[str, int]:
    """Per reason, how many of the MatMulNBits nodes the pass wrote (each layer's base and
    its residual order, from the layer records) run off the CPU fast path."""
    reasons: dict[str, int] = {}
    for record in records:
        forms = [(record["bits"], record["block_size"], record.get("zero_points") == "float")]
        if record.get("rex_bits"):
            forms.append((record["rex_bits"], record["rex_block_size"], False))  # residual orders keep uint8 zero points
        for bits, block_size, float_zero_points in forms:
            reason = cpu_slow_form(bits, block_size, accuracy_level, float_zero_points)
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


__all__ = ["FAST_2BIT_BLOCKS", "FAST_LEVEL", "cpu_slow_form", "slow_nodes"]
