"""The weight-only family's CLI flags: ``--quantize wN`` (the flag itself is declared by
the quantize family) with ``--block-size``, ``--symmetric``, ``--zero-points``,
``--accuracy-level``, ``--keep-8bit`` and the quantize family's ``--calibration-data``."""

from __future__ import annotations

import argparse
from typing import Any

from onnxopt.errors import PipelineError
from onnxopt.flags import FlagFamily, parse_budget, parse_floats, parse_weight_only
from onnxopt.options import flag_of

from . import WeightOnlyOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weight-only quantization (--quantize wN: MatMul/Gemm weights to ONNX Runtime's MatMulNBits)")
    group.add_argument("--block-size", type=int, metavar="N", help="with --quantize wN: K rows per scale (16, 32, 64, 128, 256; default 32)")
    group.add_argument("--symmetric", action="store_true", help="with --quantize wN: no zero points (slightly faster kernel, larger error)")
    group.add_argument("--zero-points", choices=("uint8", "float"), help="with --quantize wN: zero point type (default uint8: ONNX Runtime's fast CPU kernel; float: fitted float32 zero points, lower error, much slower on ORT CPU)")
    group.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), help="with --quantize wN: MatMulNBits accuracy_level (default 4: int8 activations inside ONNX Runtime's CPU kernel, its fast path; 0: float products, slower)")
    group.add_argument("--keep-8bit", metavar="NAME,...", help="with --quantize wN: layers whose node or weight name contains one of these stay at 8 bits (e.g. lm_head,embed)")


def pipeline_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Options of the weight-only pass and the pass itself, for ``--quantize wN``."""
    given = {
        "block_size": args.block_size,
        "symmetric": True if args.symmetric else None,
        "keep_8bit": [p.strip() for p in args.keep_8bit.split(",") if p.strip()] if args.keep_8bit else None,
        "accuracy_level": args.accuracy_level,
        "zero_points": args.zero_points,
    }
    options = {key: value for key, value in given.items() if value is not None}
    bits = parse_weight_only(args.quantize)
    if bits is None:
        if options:
            raise PipelineError(f"{', '.join(flag_of(WeightOnlyOptions, key) for key in options)} need --quantize wN (weight-only, e.g. w4)")
        return {}, []
    others = [flag for flag, value in (("--power-quant", args.power_quant), ("--modular-accumulator", args.modular_accumulator),
                                       ("--rex-combine", args.rex_combine),
                                       ("--rex-input-expansion", args.rex_input_expansion or None)) if value is not None]
    if others:
        raise PipelineError(f"{', '.join(others)} need --quantize wNaM (QDQ quantization); --quantize w{bits} is weight-only")
    options["weight_bits"] = bits
    options.update(weight_only_calibration(args))
    options.update(weight_only_rex(args))
    return options, ["weight-only"]


def weight_only_calibration(args: argparse.Namespace) -> dict[str, Any]:
    """``--calibration-data`` (and the image preprocessing flags; the quantize family declares
    them) with ``--quantize wN``: the row weights of the search measured on the samples."""
    given = {
        "calibration_data": args.calibration_data,
        "calibration_mean": parse_floats("--calibration-mean", args.calibration_mean),
        "calibration_std": parse_floats("--calibration-std", args.calibration_std),
        "calibration_layout": args.calibration_layout,
    }
    return {key: value for key, value in given.items() if value is not None}


def weight_only_rex(args: argparse.Namespace) -> dict[str, Any]:
    """REx in MatMulNBits form: ``--rex-budget G`` (``--rex 2`` alone: the default budget 0.5)
    → the weight-only pass's ``rex_budget``, a fraction of the base's weight bytes, and
    ``--rex-allocation network|layer`` → ``rex_allocation`` (the REx family declares these
    flags)."""
    if args.rex is not None and args.rex != 2:
        raise PipelineError(f"--rex {args.rex} with --quantize wN: REx in MatMulNBits form has one residual order (--rex 2, or just --rex-budget G)")
    options: dict[str, Any] = {}
    if args.rex_budget is not None:
        options["rex_budget"] = parse_budget(args.rex_budget)
    elif args.rex is not None:
        options["rex_budget"] = 0.5
    if args.rex_allocation is not None:
        if not options:
            raise PipelineError("--rex-allocation with --quantize wN needs --rex-budget G (the residual order it allocates)")
        if args.rex_allocation not in ("network", "layer"):
            raise PipelineError(f"--rex-allocation {args.rex_allocation} with --quantize wN: 'network' or 'layer' (the weight-only residual order)")
        options["rex_allocation"] = args.rex_allocation
    return options


FLAGS = FlagFamily("weight-only", add_arguments, pipeline_options)
