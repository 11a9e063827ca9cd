"""The compression flags of the CLI → pipeline pass names and pass options.

Each pass family contributes its own flags as a :class:`FlagFamily` (``passes/<family>/flags.py``:
the argparse group, and how the parsed flags become pass options and the passes to add),
registered with the pass registry.  The base pipeline is ``--passes`` (in that order), else
``--preset``, else ``default``; each pass a flag asks for is then inserted where its declared
``stage`` puts it (:class:`~onnxopt.pass_base.Stage`: pruning before quantization, the
expansion and the modular rewrite after it, dead-code removal last) and before any pass that
must run after it; a pass that ``replaces`` another takes its place (power-quant for
quantize)::

    --prune red                  hash-weights, merge-neurons, decompose-depthwise
    --quantize wNaM              quantize            (power-quant with --power-quant)
    --quantize wN                weight-only         (MatMulNBits; --block-size, --symmetric, --zero-points, --keep-8bit,
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import PipelineError

if TYPE_CHECKING:
    from .registry import PassRegistry


@dataclass(frozen=True)
class FlagFamily:
    """The CLI flags of one pass family."""

    name: str
    #: adds the family's argument group to the parser
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: parsed flags → (pass options, names of the passes to add); PipelineError on bad flags
    pipeline_options: Callable[[argparse.Namespace], tuple[dict[str, Any], list[str]]]


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


def add_arguments(parser: argparse.ArgumentParser, registry: "PassRegistry") -> None:
    """The argument groups of every registered flag family."""
    for family in registry.flag_families():
        family.add_arguments(parser)


def pipeline_from_flags(base: Sequence[str], args: argparse.Namespace, registry: "PassRegistry") -> tuple[list[str], dict[str, Any]]:
    """(pass names, options): ``base`` with the passes the compression flags need."""
    options: dict[str, Any] = {}
    wanted: list[str] = []
    for family in registry.flag_families():
        family_options, family_passes = family.pipeline_options(args)
        options.update(family_options)
        wanted += family_passes
    names = list(base)
    for name in list(wanted):
        replaced = registry.get(name).replaces
        if replaced:
            wanted = [w for w in wanted if w != replaced]
            names = [name if n == replaced else n for n in names]
    return insert_passes(names, wanted, registry), options


def insert_passes(names: list[str], wanted: Sequence[str], registry: "PassRegistry") -> list[str]:
    """``names`` with each missing pass of ``wanted`` inserted before the first pass of a
    later stage or one that must run after it (else at the end)."""
    names = list(names)
    for name in wanted:
        if name in names:
            continue
        new = registry.get(name)
        later = [
            i for i, other in enumerate(registry.get(n) for n in names)
            if other.stage > new.stage or other.runs_after & new.all_tags() or new.runs_before & other.all_tags()
        ]
        names.insert(later[0] if later else len(names), name)
    return names


# --------------------------------------------------------------------------- value parsers
def parse_bits(spec: str) -> tuple[int, int]:
    """``w8a8`` → (8, 8)."""
    match = re.fullmatch(r"w(\d+)a(\d+)", spec.strip().lower())
    if not match:
        raise PipelineError(f"bad --quantize {spec!r}: expected wNaM (e.g. w8a8, w4a8) or wN for weight-only (e.g. w4)")
    return int(match.group(1)), int(match.group(2))


def parse_weight_only(spec: str | None) -> int | None:
    """``w4`` → 4 (weights only); None for anything else."""
    match = re.fullmatch(r"w(\d+)", (spec or "").strip().lower())
    return int(match.group(1)) if match else None


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
