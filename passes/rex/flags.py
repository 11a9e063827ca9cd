"""The REx family's CLI flags: ``--rex K`` and its budget, allocation and combine form."""

from __future__ import annotations

import argparse
from typing import Any

from onnxopt.errors import PipelineError
from onnxopt.flags import FlagFamily, parse_budget, parse_weight_only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    rex = parser.add_argument_group("REx residual expansion (with --quantize; parallel low-bit branches, docs/rex.md)")
    rex.add_argument("--rex", type=int, metavar="K", help="expansion order K >= 1 (1 = the quantized layer only)")
    rex.add_argument("--rex-budget", metavar="G", help="extra output channels over all orders >= 2: 0.5, 50 or 50%% (default 0.5; numbers > 1 are percentages); with --quantize wN: a residual MatMulNBits order whose bytes are G × the base's, on the columns with the largest error (1.0 = a full second order)")
    rex.add_argument("--rex-allocation", choices=("network", "uniform", "layer"), help="where the budget goes: network = the channels whose relative error falls most per MAC across the model (default), uniform = the same share of every layer (the thesis's rule); with --quantize wN: network = the residual columns (2-bit, or rex_bits wide: --set rex_bits=4) removing most relative error per byte across the model, layer = the same share of every layer's bytes")
    rex.add_argument("--rex-combine", choices=("auto", "fold", "permute", "gather", "pad", "scatter", "dense"), help="how the residual order joins the layer: fold = K=2 at <= 4 bits folded into one int8 layer with per-channel scales (no branch, the base's speed), permute = branches after a channel-group reorder, Pad + Add, gather = a Gather of the branch codes; auto (default) = fold where it applies, else permute")
    rex.add_argument("--rex-input-expansion", action="store_true", help="also expand the activations' quantization error (eqs. 3.20-3.21)")


def pipeline_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    if parse_weight_only(args.quantize) is not None:
        return {}, []  # --quantize wN: the weight-only pass's residual order (weight_only.flags.weight_only_rex)
    options: dict[str, Any] = {}
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


FLAGS = FlagFamily("rex", add_arguments, pipeline_options)
