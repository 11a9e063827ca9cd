"""The compression flags of the CLI → pipeline pass names and pass options.

The base pipeline is ``--passes`` (in that order), else ``--preset``, else ``default``.
Each compression flag then adds the pass it needs when the base does not have it, at its
place in the canonical order (pruning before quantization, the expansion and the modular
rewrite after it, dead-code removal last)::

    --prune red                  hash-weights, merge-neurons, decompose-depthwise
    --quantize wNaM              quantize            (power-quant with --power-quant)
    --quantize wN                weight-only         (MatMulNBits; --block-size, --symmetric, --keep-8bit,
                                                      --rex-budget G: a residual MatMulNBits order)
    --rex K                      rex                 (needs --quantize)
    --modular-accumulator BITS   modular-accumulator (needs --quantize, uniform)

so ``onnxopt m.onnx -o out.onnx --prune red --quantize w4a8 --rex 2`` runs default → RED →
quantize → rex → eliminate-dead.  Bad values raise PipelineError (exit code 7).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Sequence

from .errors import PipelineError

RED_PASSES = ("hash-weights", "merge-neurons", "decompose-depthwise")

# Where a pass added by a flag goes: before the first pass of the pipeline ranked after it.
CANONICAL_ORDER = (*RED_PASSES, "quantize", "weight-only", "power-quant", "rex", "modular-accumulator", "eliminate-dead")


#: Flags whose value may start with "-" (a negative number): ``--input-range -3,3``.
NEGATIVE_VALUE_FLAGS = ("--input-range",)


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--input-range -3,3`` → ``--input-range=-3,3``: argparse takes a value that starts
    with "-" and is not a plain number for an option and fails."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if token in NEGATIVE_VALUE_FLAGS and following is not None and re.match(r"^-[\d.]", following):
            joined.append(f"{token}={following}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The argument groups of the compression flags."""
    quant = parser.add_argument_group("quantization (lossy; emits standard QDQ that ONNX Runtime fuses)")
    quant.add_argument(
        "--quantize", metavar="wNaM|wN",
        help="quantize weights to N bits and activations to M bits (2..8), e.g. w8a8, w4a8; wN (w4, w8, w2) quantizes "
        "only the MatMul/Gemm weights, block-wise, to ONNX Runtime's MatMulNBits (float activations; decoder LLMs)",
    )
    quant.add_argument("--block-size", type=int, metavar="N", help="with --quantize wN: K rows per scale (16, 32, 64, 128, 256; default 32)")
    quant.add_argument("--symmetric", action="store_true", help="with --quantize wN: no zero points (slightly faster kernel, larger error)")
    quant.add_argument("--keep-8bit", metavar="NAME,...", help="with --quantize wN: layers whose node or weight name contains one of these stay at 8 bits (e.g. lm_head,embed)")
    quant.add_argument("--spiq", action=argparse.BooleanOptionalAction, default=None, help="per-channel SPIQ activation scales folded into weights: --spiq wherever possible, --no-spiq never (default: where the estimated error is lower)")
    quant.add_argument("--act-ranges", choices=("bn", "minmax", "percentile"), help="activation ranges: from BN statistics (default, data-free) or calibration data")
    quant.add_argument("--calibration-data", metavar="PATH", help="calibration samples: an .npz (one array per graph input, batch on axis 0), a folder of .npy files or a folder of images (.jpg/.png; resized, center-cropped, ImageNet-normalised)")
    quant.add_argument("--calibration-mean", metavar="M[,M,M]", help="per-channel mean subtracted from calibration images in [0, 1] (default ImageNet's 0.485,0.456,0.406)")
    quant.add_argument("--calibration-std", metavar="S[,S,S]", help="per-channel std dividing calibration images (default ImageNet's 0.229,0.224,0.225)")
    quant.add_argument("--calibration-layout", choices=("NCHW", "NHWC"), help="layout of the model input fed with calibration images (default NCHW)")
    quant.add_argument("--lambda", dest="lam", type=float, help="BN range width in standard deviations (default 9 at 8 bits, 4 at <= 6 bits)")
    quant.add_argument("--input-range", metavar="LO,HI", help="range of the graph input, so the first layer is quantized too (default: it stays float)")
    quant.add_argument("--no-bias-correction", action="store_true", help="skip the data-free bias correction (eq. 3.8)")
    quant.add_argument("--per-tensor-weights", action="store_true", help="one weight scale per layer instead of per output channel")
    quant.add_argument(
        "--dynamic-fallback", choices=("auto", "on", "off", "all"),
        help="MatMul/Gemm layers without an activation range: auto (default) quantizes them dynamically (DynamicQuantizeLinear, "
        "ORT's DynamicQuantizeMatMul) when the model has statistics elsewhere, on always, off keeps them float, all makes every "
        "MatMul/Gemm dynamic",
    )
    quant.add_argument(
        "--int4-weights", action="store_true",
        help="store weights of <= 4 bits as INT4 (needs opset >= 21): a smaller file, but ONNX Runtime's CPU provider does not fuse "
        "INT4 DequantizeLinear, so those layers run in float (slower than the default int8 storage)",
    )

    prune = parser.add_argument_group("pruning (lossy, data-free RED/RED++: weight hashing, neuron merging, depthwise decomposition)")
    prune.add_argument("--prune", choices=("red",), help="prune with RED: hash-weights, merge-neurons, decompose-depthwise after the lossless passes")
    prune.add_argument("--prune-alpha", type=float, metavar="A", help="merge-neurons alpha in [0,1]: also merge this fraction of the closest neurons (lossy)")

    rex = parser.add_argument_group("REx residual expansion (with --quantize; parallel low-bit branches, docs/rex.md)")
    rex.add_argument("--rex", type=int, metavar="K", help="expansion order K >= 1 (1 = the quantized layer only)")
    rex.add_argument("--rex-budget", metavar="G", help="extra output channels over all orders >= 2: 0.5, 50 or 50%% (default 0.5; numbers > 1 are percentages); with --quantize wN: a residual MatMulNBits order whose bytes are G × the base's, on the columns with the largest error (1.0 = a full second order)")
    rex.add_argument("--rex-allocation", choices=("network", "uniform"), help="where the budget goes: network = the channels whose relative error falls most per MAC across the model (default), uniform = the same share of every layer (the thesis's rule)")
    rex.add_argument("--rex-combine", choices=("auto", "fold", "permute", "gather", "pad", "scatter", "dense"), help="how the residual order joins the layer: fold = K=2 at <= 4 bits folded into one int8 layer with per-channel scales (no branch, the base's speed), permute = branches after a channel-group reorder, Pad + Add, gather = a Gather of the branch codes; auto (default) = fold where it applies, else permute")
    rex.add_argument("--rex-input-expansion", action="store_true", help="also expand the activations' quantization error (eqs. 3.20-3.21)")

    power = parser.add_argument_group("PowerQuant and modular arithmetic (custom ops with ONNX function bodies)")
    power.add_argument("--power-quant", nargs="?", const="search", metavar="A", help="PowerQuant instead of uniform quantization (with --quantize wNaM): exponent searched (Nelder-Mead) or fixed A, e.g. 0.5")
    power.add_argument("--power-per-layer", action="store_true", help="with --power-quant: one exponent per layer")
    power.add_argument("--modular-accumulator", metavar="BITS|auto", help="after --quantize: integer layers whose accumulator wraps to BITS bits ('auto': per-layer safe width)")
    power.add_argument("--inline-functions", action="store_true", help="inline the custom ops' function bodies (for consumers without model-local functions)")


def pipeline_from_flags(base: Sequence[str], args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """(pass names, options): ``base`` with the passes the compression flags need."""
    options: dict[str, Any] = {}
    wanted: list[str] = []
    for family in (pruning_options, weight_only_options, quantization_options, power_options, rex_options):
        family_options, family_passes = family(args)
        options.update(family_options)
        wanted += family_passes
    names = list(base)
    if "power-quant" in wanted and "quantize" in names:
        names[names.index("quantize")] = "power-quant"
    return insert_passes(names, wanted), options


def insert_passes(names: list[str], wanted: Sequence[str]) -> list[str]:
    """``names`` with each missing pass of ``wanted`` placed by CANONICAL_ORDER."""
    names = list(names)
    for name in wanted:
        if name in names:
            continue
        rank = CANONICAL_ORDER.index(name)
        later = [i for i, n in enumerate(names) if n in CANONICAL_ORDER and CANONICAL_ORDER.index(n) > rank]
        names.insert(later[0] if later else len(names), name)
    return names


# --------------------------------------------------------------------------- families
def parse_weight_only(spec: str | None) -> int | None:
    """``w4`` → 4 (weights only); None for anything else."""
    match = re.fullmatch(r"w(\d+)", (spec or "").strip().lower())
    return int(match.group(1)) if match else None


def weight_only_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Options of the weight-only pass and the pass itself, for ``--quantize wN``."""
    given = {
        "block_size": args.block_size,
        "symmetric": True if args.symmetric else None,
        "keep_8bit": [p.strip() for p in args.keep_8bit.split(",") if p.strip()] if args.keep_8bit else None,
    }
    options = {key: value for key, value in given.items() if value is not None}
    bits = parse_weight_only(args.quantize)
    if bits is None:
        if options:
            raise PipelineError(f"{', '.join('--' + k.replace('_', '-') for k in options)} need --quantize wN (weight-only, e.g. w4)")
        return {}, []
    others = [flag for flag, value in (("--power-quant", args.power_quant), ("--modular-accumulator", args.modular_accumulator),
                                       ("--rex-allocation", args.rex_allocation), ("--rex-combine", args.rex_combine),
                                       ("--rex-input-expansion", args.rex_input_expansion or None)) if value is not None]
    if others:
        raise PipelineError(f"{', '.join(others)} need --quantize wNaM (QDQ quantization); --quantize w{bits} is weight-only")
    options["weight_bits"] = bits
    options.update(weight_only_rex(args))
    return options, ["weight-only"]


def weight_only_rex(args: argparse.Namespace) -> dict[str, Any]:
    """REx in MatMulNBits form: ``--rex-budget G`` (``--rex 2`` alone: the default budget 0.5)
    → the weight-only pass's ``rex_budget``, a fraction of the base's weight bytes."""
    if args.rex is not None and args.rex != 2:
        raise PipelineError(f"--rex {args.rex} with --quantize wN: REx in MatMulNBits form has one residual order (--rex 2, or just --rex-budget G)")
    if args.rex_budget is not None:
        return {"rex_budget": parse_budget(args.rex_budget)}
    return {"rex_budget": 0.5} if args.rex is not None else {}


def parse_bits(spec: str) -> tuple[int, int]:
    """``w8a8`` → (8, 8)."""
    match = re.fullmatch(r"w(\d+)a(\d+)", spec.strip().lower())
    if not match:
        raise PipelineError(f"bad --quantize {spec!r}: expected wNaM (e.g. w8a8, w4a8) or wN for weight-only (e.g. w4)")
    return int(match.group(1)), int(match.group(2))


def quantization_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Options of the quantize pass (also read by power-quant) and the pass itself."""
    given = {
        "spiq": args.spiq,
        "act_ranges": args.act_ranges,
        "calibration_data": args.calibration_data,
        "calibration_mean": parse_floats("--calibration-mean", args.calibration_mean),
        "calibration_std": parse_floats("--calibration-std", args.calibration_std),
        "calibration_layout": args.calibration_layout,
        "lam": args.lam,
        "input_range": parse_pair(args.input_range) if args.input_range else None,
        "bias_correction": False if args.no_bias_correction else None,
        "per_channel": False if args.per_tensor_weights else None,
        "int4_weights": True if args.int4_weights else None,
        "dynamic_fallback": {"auto": "auto", "on": True, "off": False, "all": "all", None: None}[args.dynamic_fallback],
    }
    options = {key: value for key, value in given.items() if value is not None}
    if args.lam is not None and not (math.isfinite(args.lam) and args.lam > 0):
        raise PipelineError(f"bad --lambda {args.lam!r}: expected a finite number of standard deviations > 0, e.g. 6")
    if args.quantize is None or parse_weight_only(args.quantize) is not None:
        if options:
            raise PipelineError(f"{', '.join('--' + k.replace('_', '-') for k in options)} need --quantize wNaM")
        return {}, []
    options["weight_bits"], options["act_bits"] = parse_bits(args.quantize)
    if args.calibration_data and "act_ranges" not in options:
        options["act_ranges"] = "minmax"
    if args.power_quant is not None:
        return options, ["power-quant"]
    return options, ["quantize"]


def pruning_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    options: dict[str, Any] = {}
    if args.prune_alpha is not None:
        if not args.prune:
            raise PipelineError("--prune-alpha needs --prune red")
        if not 0.0 <= args.prune_alpha <= 1.0:
            raise PipelineError(f"--prune-alpha must be in [0, 1], got {args.prune_alpha}")
        options["alpha"] = args.prune_alpha
    return options, list(RED_PASSES) if args.prune else []


def power_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Options of power-quant and modular-accumulator; the pass of the latter."""
    options: dict[str, Any] = {}
    passes: list[str] = []
    if args.power_quant is not None:
        if args.quantize is None:
            raise PipelineError("--power-quant needs --quantize wNaM (the bit-widths)")
        options["power_exponent"] = None if args.power_quant == "search" else _exponent(args.power_quant)
        options["power_per_layer"] = args.power_per_layer
    elif args.power_per_layer:
        raise PipelineError("--power-per-layer needs --power-quant")
    if args.modular_accumulator is not None:
        if args.quantize is None or args.power_quant is not None:
            raise PipelineError("--modular-accumulator needs --quantize wNaM (uniform QDQ quantization)")
        spec = args.modular_accumulator.strip().lower()
        if spec == "auto":
            options["accumulator_bits"] = "auto"
        elif spec.isdigit():
            options["accumulator_bits"] = int(spec)
        else:
            raise PipelineError(f"bad --modular-accumulator {args.modular_accumulator!r}: expected BITS (2..31) or auto")
        passes.append("modular-accumulator")
    return options, passes


def rex_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    options: dict[str, Any] = {}
    if parse_weight_only(args.quantize) is not None:
        return {}, []  # the weight-only pass's residual order (weight_only_rex)
    if args.rex is not None:
        options["rex_order"] = args.rex
    if args.rex_budget is not None:
        options["rex_budget"] = parse_budget(args.rex_budget)
    if args.rex_input_expansion:
        options["rex_input_expansion"] = True
    if args.rex_allocation is not None:
        options["rex_allocation"] = args.rex_allocation
    if args.rex_combine is not None:
        options["rex_combine"] = args.rex_combine
    if not options:
        return {}, []
    if args.quantize is None:
        raise PipelineError("--rex/--rex-budget need --quantize wNaM (REx expands the residual of the quantized weights)")
    if args.power_quant is not None:
        raise PipelineError("--rex expands uniform quantization (--quantize wNaM); it cannot follow --power-quant: drop one of them")
    if "rex_order" not in options:
        raise PipelineError("--rex-budget/--rex-allocation/--rex-combine/--rex-input-expansion need --rex K")
    return options, ["rex"]


def parse_budget(spec: str) -> float:
    """``0.5``, ``50`` and ``50%`` → 0.5 (numbers above 1 without % are percentages too)."""
    text = spec.strip()
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise PipelineError(f"bad --rex-budget {spec!r}: expected a fraction (0.5) or a percentage (50 or 50%)") from None
    if text.endswith("%") or value > 1:
        value /= 100
    if not (math.isfinite(value) and value >= 0):
        raise PipelineError(f"bad --rex-budget {spec!r}: must be a finite number >= 0")
    return value


def _exponent(spec: str) -> float:
    try:
        value = float(spec)
    except ValueError:
        raise PipelineError(f"bad --power-quant {spec!r}: expected an exponent such as 0.5") from None
    if not 0 < value <= 1:  # also false for NaN
        raise PipelineError(f"bad --power-quant {spec!r}: the exponent must be in (0, 1], e.g. 0.5")
    return value


def parse_floats(flag: str, spec: str | None) -> list[float] | None:
    """``0.5`` or ``0.485,0.456,0.406`` → a list of floats (None stays None)."""
    if spec is None:
        return None
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise PipelineError(f"bad {flag} {spec!r}: expected one number or three separated by commas") from None


def parse_pair(spec: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in spec.split(","))
    except ValueError:
        raise PipelineError(f"bad --input-range {spec!r}: expected LO,HI (e.g. -2.2,2.7)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise PipelineError(f"bad --input-range {spec!r}: expected finite LO < HI (e.g. -2.2,2.7)")
    return low, high
