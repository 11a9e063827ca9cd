"""The optimization report: what each pass changed, how long it took, what it refused.

``Report.format_table()`` gives the human-readable summary printed to stderr by the CLI;
``Report.to_dict()`` / ``write_json()`` give the machine-readable form (``--report``).
``verification_status`` tells a verification that failed from one that was not possible
(the original model itself fails in ORT on the random inputs).

A pass whose stats hold a ``coverage`` entry (``{"verb", "unit", "done", "total", "left",
"reasons": {label: count}}``, optionally ``"kinds"`` counts, e.g. quantize) gets one counted line in the summary — a
warning when it left some of them untouched — and a ``coverage`` entry in the JSON.  With
``"fused"`` (op → count of layers ORT runs with that integer kernel) and ``"not_fused"`` (a
count), a second line says what ORT runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .metrics import ModelMetrics
from .output import write_text_atomic
from .pass_base import Refusal


@dataclass
class PassReport:
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    refusals: list[Refusal]
    before: ModelMetrics
    after: ModelMetrics

    @property
    def ops_removed(self) -> dict[str, int]:
        return _positive_diff(self.before.op_counts, self.after.op_counts)

    @property
    def ops_added(self) -> dict[str, int]:
        return _positive_diff(self.after.op_counts, self.before.op_counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 6),
            "modified": self.modified,
            "stats": self.stats,
            "ops_removed": self.ops_removed,
            "ops_added": self.ops_added,
            "refusals": [r.to_dict() for r in self.refusals],
            "before": _brief(self.before),
            "after": _brief(self.after),
        }


def _positive_diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {op: a[op] - b.get(op, 0) for op in sorted(a) if a[op] > b.get(op, 0)}


def _brief(m: ModelMetrics) -> dict[str, int]:
    return {"nodes": m.nodes, "parameters": m.parameters, "macs": m.macs, "size_bytes": m.size_bytes}


@dataclass
class Report:
    """Everything one optimization run did, ready to print or serialize."""

    passes: list[PassReport] = field(default_factory=list)
    before: ModelMetrics | None = None
    after: ModelMetrics | None = None
    input_path: str | None = None
    output_path: str | None = None
    total_seconds: float = 0.0
    #: True when every pass of the pipeline is lossless (outputs equal up to float rounding).
    lossless: bool = True
    verification: Any = None  # onnxopt.verify.VerifyResult, kept loose to avoid an import cycle
    #: One-line notes on what the run did besides the passes (e.g. an opset upgrade).
    notes: list[str] = field(default_factory=list)

    @property
    def verification_status(self) -> str:
        """'not run', or the verification's 'passed' / 'failed' / 'not possible' (the original
        model cannot run on the inputs: nothing compared, not a failure) / 'measured' (lossy)."""
        return "not run" if self.verification is None else self.verification.status

    @property
    def refusals(self) -> list[tuple[str, Refusal]]:
        return [(p.name, r) for p in self.passes for r in p.refusals]

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnxopt_version": __version__,
            "input": self.input_path,
            "output": self.output_path,
            "total_seconds": round(self.total_seconds, 6),
            "lossless": self.lossless,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "notes": list(self.notes),
            "passes": [p.to_dict() for p in self.passes],
            "verification_status": self.verification_status,
            "coverage": {p.name: p.stats["coverage"] for p in self.passes if isinstance(p.stats.get("coverage"), dict)},
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }

    def write_json(self, path: str | os.PathLike[str], *, protected: Iterable[tuple[Path, str]] = ()) -> None:
        """Write the JSON report atomically; never onto a ``protected`` file (see onnxopt.output)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n", protected=protected, what="report")

    def format_table(self, max_refusals: int = 20) -> str:
        """Human-readable summary: one row per pass, totals, refusals, verification."""
        header = f"{'pass':<22} {'time':>8} {'nodes':>13} {'params':>21} {'MACs':>21}  changes"
        lines = [header, "-" * len(header)]
        for p in self.passes:
            changes = _changes(p)
            lines.append(
                f"{p.name:<22} {_seconds(p.seconds):>8} {_arrow(p.before.nodes, p.after.nodes):>13} "
                f"{_arrow(p.before.parameters, p.after.parameters, _si):>21} "
                f"{_arrow(p.before.macs, p.after.macs, _si):>21}  {changes}"
            )
        if self.before and self.after:
            lines.append("-" * len(header))
            lines.append(
                f"{'total':<22} {_seconds(self.total_seconds):>8} {_arrow(self.before.nodes, self.after.nodes):>13} "
                f"{_arrow(self.before.parameters, self.after.parameters, _si):>21} "
                f"{_arrow(self.before.macs, self.after.macs, _si):>21}  "
                f"size {_bytes(self.before.size_bytes)} -> {_bytes(self.after.size_bytes)}"
            )
            for label, metrics in (("input", self.before), ("output", self.after)):
                if metrics.unknown_macs:
                    lines.append(f"note: MACs of the {label} model exclude {len(metrics.unknown_macs)} node(s) whose shapes ONNX shape inference could not determine")
        if self.notes:
            lines.append("")
            lines.extend(f"note: {note}" for note in self.notes)
        coverage = [(p.name, p.stats["coverage"]) for p in self.passes if isinstance(p.stats.get("coverage"), dict)]
        if coverage:
            lines.append("")
            for name, c in coverage:
                lines.append(coverage_line(name, c))
                lines += [line for line in (fusion_line(name, c), slow_kernel_line(name, c)) if line]
        refusals = self.refusals
        if refusals:
            lines.append("")
            lines.append(f"not rewritten ({len(refusals)}):")
            for name, refusal in refusals[:max_refusals]:
                lines.append(f"  [{name}] {refusal.subject}: {refusal.reason}")
            if len(refusals) > max_refusals:
                lines.append(f"  ... {len(refusals) - max_refusals} more (see the JSON report)")
        if self.verification is not None:
            lines.append("")
            lines.append(self.verification.format())
        return "\n".join(lines)


def coverage_line(pass_name: str, coverage: dict[str, Any]) -> str:
    """``quantize: quantized 61/64 layers; 3 float: 2 no statistics, 1 non-constant weight``,
    prefixed with ``warning:`` when some were left untouched."""
    done, total = coverage["done"], coverage["total"]
    kinds = coverage.get("kinds")
    line = f"{pass_name}: {coverage['verb']} {done}/{total} {coverage['unit']}"
    line += f" ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})" if kinds else ""
    if done == total:
        return line
    reasons = sorted(coverage.get("reasons", {}).items(), key=lambda item: -item[1])
    detail = ", ".join(f"{n} {label}" for label, n in reasons)
    return f"warning: {line}; {total - done} {coverage['left']}" + (f": {detail}" if detail else "")


def fusion_line(pass_name: str, coverage: dict[str, Any]) -> str | None:
    """``quantize: ORT runs 24 MatMulIntegerToFloat, 12 DynamicQuantizeMatMul`` from the
    coverage's ``fused`` counts (the kernels ORT was seen to build), a warning naming the
    count of ``not_fused`` layers; None without a fusion check."""
    if "fused" not in coverage:
        return None
    fused = ", ".join(f"{n} {op}" for op, n in coverage["fused"].items()) or "no integer kernel"
    line = f"{pass_name}: ORT runs {fused}"
    missing = coverage.get("not_fused", 0)
    return f"warning: {line}; {missing} quantized layer(s) not fused: ORT runs them in float (see not rewritten)" if missing else line


def slow_kernel_line(pass_name: str, coverage: dict[str, Any]) -> str | None:
    """``warning: weight-only: 12 MatMulNBits run off ONNX Runtime's CPU fast path …`` from the
    coverage's ``slow_kernel`` counts (reason → nodes); None when every node is on it."""
    slow = coverage.get("slow_kernel")
    if not slow:
        return None
    detail = "; ".join(f"{n} with {reason}" for reason, n in slow.items())
    return (f"warning: {pass_name}: {sum(slow.values())} MatMulNBits run off ONNX Runtime's CPU fast path (the kernel decodes the "
            f"whole weight on every call: decoding is many times slower, possibly slower than the float model): {detail}")


def _changes(p: PassReport) -> str:
    parts = [f"-{n} {op}" for op, n in p.ops_removed.items()]
    parts += [f"+{n} {op}" for op, n in p.ops_added.items()]
    parts += [f"{k}={v}" for k, v in p.stats.items() if not isinstance(v, (list, dict))]
    return ", ".join(parts) if parts else "no change"


def _arrow(a: int, b: int, fmt: Any = str) -> str:
    return fmt(a) if a == b else f"{fmt(a)}->{fmt(b)}"


def _si(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _bytes(value: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
