"""The PowerQuant family's CLI flags: ``--power-quant [A]`` with ``--quantize wNaM``."""

from __future__ import annotations

import argparse
from typing import Any

from onnxopt.errors import PipelineError
from onnxopt.flags import FlagFamily


def add_arguments(parser: argparse.ArgumentParser) -> None:
    power = parser.add_argument_group("PowerQuant (non-uniform quantization; custom ops with ONNX function bodies)")
    power.add_argument("--power-quant", nargs="?", const="search", metavar="A", help="PowerQuant instead of uniform quantization (with --quantize wNaM): exponent searched (Nelder-Mead) or fixed A, e.g. 0.5")
    power.add_argument("--power-per-layer", action="store_true", help="with --power-quant: one exponent per layer")


def pipeline_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """power-quant's own options and the pass (its quantization options come from the
    quantize family's flags)."""
    if args.power_quant is None:
        if args.power_per_layer:
            raise PipelineError("--power-per-layer needs --power-quant")
        return {}, []
    if args.quantize is None:
        raise PipelineError("--power-quant needs --quantize wNaM (the bit-widths)")
    exponent = None if args.power_quant == "search" else _exponent(args.power_quant)
    return {"power_exponent": exponent, "power_per_layer": args.power_per_layer}, ["power-quant"]


def _exponent(spec: str) -> float:
    try:
        value = float(spec)
    except ValueError:
        raise PipelineError(f"bad --power-quant {spec!r}: expected an exponent such as 0.5") from None
    if not 0 < value <= 1:  # also false for NaN
        raise PipelineError(f"bad --power-quant {spec!r}: the exponent must be in (0, 1], e.g. 0.5")
    return value


FLAGS = FlagFamily("power-quant", add_arguments, pipeline_options)
