"""The RED family's CLI flags: ``--prune red`` and ``--prune-alpha``."""

from __future__ import annotations

import argparse
from typing import Any

from onnxopt.errors import PipelineError
from onnxopt.flags import FlagFamily

from . import RED_PASSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prune = parser.add_argument_group("pruning (lossy, data-free RED/RED++: weight hashing, neuron merging, depthwise decomposition)")
    prune.add_argument("--prune", choices=("red",), help="prune with RED: hash-weights, merge-neurons, decompose-depthwise after the lossless passes")
    prune.add_argument("--prune-alpha", type=float, metavar="A", help="merge-neurons alpha in [0,1]: also merge this fraction of the closest neurons (lossy)")


def pipeline_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    options: dict[str, Any] = {}
    if args.prune_alpha is not None:
        if not args.prune:
            raise PipelineError("--prune-alpha needs --prune red")
        if not 0.0 <= args.prune_alpha <= 1.0:
            raise PipelineError(f"--prune-alpha must be in [0, 1], got {args.prune_alpha}")
        options["alpha"] = args.prune_alpha
    return options, list(RED_PASSES) if args.prune else []


FLAGS = FlagFamily("red", add_arguments, pipeline_options)
