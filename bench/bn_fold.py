"""BatchNormalization folding benchmark: onnxopt's ``fold-batchnorm`` against its peers.

Models: every zoo model of ``onnxopt.models.registry.REGISTRY`` (seeded weights, random
non-trivial BN statistics, opset 17, BN kept by the export) and the real pretrained
MobileNetV2 and EfficientNet-Lite0 (``onnxopt.models.pretrained.export_pretrained``).

Measured per model:

1. BatchNormalization nodes left by each tool: onnxopt's default preset (``fold-batchnorm``),
   onnxopt's ``classic`` preset (adjacent Conv->BN only), onnxoptimizer's
   ``fuse_bn_into_conv`` alone and its default fuse-and-eliminate passes, and ONNX Runtime's
   own graph optimizer at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL (the graph ORT would run,
   saved with ``SessionOptions.optimized_model_filepath``).  ORT_ENABLE_ALL's NCHWc
   transformer rewrites a BN it cannot fuse into a depthwise 1x1 NCHWc Conv: that BN is no
   longer a BatchNormalization node but is still computed, so it is counted separately
   ("+k NCHWc").  onnxoptimizer runs in a separate worker process, so a crash is recorded
   as such; a tool that is not installed or fails is recorded as absent/error, never guessed.
2. Correctness: ``onnxopt.verify`` (ORT, graph optimizations off, random inputs of the
   model's shape) of each tool's output against the original: max relative error
   (``max|a-b| / max|b|``); the pretrained models are also checked on the 20 real ImageNet
   samples (top-1 agreement).
3. Latency in ORT at its default level (ORT_ENABLE_ALL) of the original, the onnxopt output
   and the onnxoptimizer ``fuse_bn_into_conv`` output, with 1 and 2 intra-op threads: all
   configurations of a model in one process, warmed up, then timed round-robin (see
   :mod:`bench.common`); median and IQR in ms, speed-up = original median / median.
   "Slower beyond noise": the onnxopt IQR lies wholly above the original's and its median
   is at least 2 % higher.
4. Optimizer time: ``report.passes[...].seconds`` of ``fold-batchnorm`` and the wall time of
   the whole ``onnxopt.optimize(path)`` call (load included), median of a few repeats.

Outputs (both written by this script): ``<out>/bn_fold.json`` (raw numbers and the
environment) and ``<out>/bn_fold.md`` (tables and flags).

    python -m bench.bn_fold [--out bench/results] [--quick] [--only resnet50,densenet]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable, Sequence

import numpy as np
import onnx

import onnxopt
from bench.common import (
    compact_number_lists,
    count_bn,
    count_bn_as_nchwc_conv,
    environment,
    IsolatedRunner,
    json_safe,
    load_average,
    onnxoptimizer_optimize,
    op_counts,
    ort_optimized_model,
    ort_session,
    package_version,
    random_feeds,
    slower_beyond_noise,
    summarize,
    table,
    Timing,
    settings_record,
    time_interleaved,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
THREADS = (1, 2)
RESNET50_PASS_GOAL_S = 2.0

# Tool key -> column title.  "onnxopt" is the default preset (fold-batchnorm).
TOOLS = {
    "onnxopt": "onnxopt default",
    "onnxopt_classic": "onnxopt classic",
    "onnxoptimizer_fuse_bn": "onnxoptimizer fuse_bn_into_conv",
    "onnxoptimizer_default": "onnxoptimizer default",
    "ort_extended": "ORT EXTENDED",
    "ort_all": "ORT ALL",
}
PEERS = {"onnxoptimizer": ("onnxoptimizer_fuse_bn", "onnxoptimizer_default"), "ORT": ("ort_extended", "ort_all")}
# Models on which onnxopt should leave strictly fewer BN than every peer (why).
STRICT_GOAL = {
    "edge_bn_after_add": "BN after Add",
    "edge_bn_after_concat": "BN after Concat",
    "edge_bn_pool_linear": "BN before GlobalAveragePool -> Linear",
    "edge_bn_before_conv_nopad": "BN before an unpadded Conv",
    "preact_resnet": "BN after the residual Add",
    "densenet": "BN after Concat and AveragePool",
}
ONNXOPT_PASS = {"default": "fold-batchnorm", "classic": "fold-conv-bn"}


@dataclass(frozen=True)
class Settings:
    quick: bool
    optimize_repeats: int
    timing: Timing

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            return cls(True, optimize_repeats=1, timing=Timing(warmup=5, min_runs=20, max_runs=200, target_seconds=0.5))
        return cls(False, optimize_repeats=3, timing=Timing(warmup=10, min_runs=30, max_runs=500, target_seconds=6.0))


@dataclass(frozen=True)
class BenchModel:
    name: str
    source: str  # "zoo" or "pretrained"
    description: str
    input_shape: tuple[int, ...]
    large: bool
    build: Callable[[], Path]
    real_inputs: Callable[[], np.ndarray] | None = None


@dataclass
class ToolOutput:
    """One tool's result on one model: the optimized graph (kept in memory and on disk) and numbers."""

    status: str  # "ok", "error", "crash" or "absent"
    model: onnx.ModelProto | None = None
    path: Path | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"status": self.status}
        if self.detail:
            rec["detail"] = self.detail
        if self.model is not None:
            rec["bn"] = count_bn(self.model)
            rec["bn_as_nchwc_conv"] = count_bn_as_nchwc_conv(self.model)
            rec["nodes"] = len(self.model.graph.node)
            rec["op_counts"] = op_counts(self.model)
        return {**rec, **self.extra}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


# --------------------------------------------------------------------------- models
def collect_models(only: Sequence[str] | None = None) -> list[BenchModel]:
    """The zoo models and the two pretrained image models, optionally filtered by name."""
    from onnxopt.models.build import build_zoo_model
    from onnxopt.models.pretrained import export_pretrained, pretrained_input
    from onnxopt.models.registry import REGISTRY

    models = [
        BenchModel(name, "zoo", spec.description, spec.input_shape, not spec.small, lambda n=name: build_zoo_model(n))
        for name, spec in REGISTRY.items()
    ]
    for key, title in (("mobilenet_v2", "MobileNetV2"), ("efficientnet_lite0", "EfficientNet-Lite0")):
        models.append(
            BenchModel(
                f"{key}_pretrained", "pretrained", f"real pretrained {title} (ImageNet weights)", (1, 3, 224, 224),
                True, lambda k=key: export_pretrained(k), lambda k=key: pretrained_input(k),
            )
        )
    if only:
        known = {m.name for m in models}
        unknown = sorted(set(only) - known)
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(sorted(known))}")
        models = [m for m in models if m.name in only]
    return models


# --------------------------------------------------------------------------- tools
def run_onnxopt(path: Path, preset: str, repeats: int, out_path: Path) -> ToolOutput:
    """onnxopt.optimize ``repeats`` times; keeps the first result and every timing."""
    pass_name = ONNXOPT_PASS[preset]
    pass_seconds, wall_seconds, report_seconds, all_passes_seconds = [], [], [], []
    first = None
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            model, report = onnxopt.optimize(path, preset=preset)
            wall_seconds.append(time.perf_counter() - start)
            report_seconds.append(report.total_seconds)
            fold = next(p for p in report.passes if p.name == pass_name)
            pass_seconds.append(fold.seconds)
            all_passes_seconds.append(sum(p.seconds for p in report.passes))
            first = first or (model, fold.stats, {p.name: {"seconds": p.seconds, "modified": p.modified} for p in report.passes})
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        return ToolOutput("error", detail=error_text(exc))
    model, stats, pipeline = first
    onnxopt.save_model(model, out_path)
    extra = {
        "pass": pass_name,
        "pass_stats": stats,
        "pipeline": pipeline,  # every pass of the preset (first repeat): seconds, modified
        "all_passes_seconds": all_passes_seconds,  # sum of the preset's pass times, per repeat
        "pass_seconds": pass_seconds,
        "optimize_seconds": wall_seconds,
        "report_total_seconds": report_seconds,
    }
    return ToolOutput("ok", model, out_path, extra=extra)


def run_onnxoptimizer(path: Path, passes: Sequence[str] | None, runner: IsolatedRunner, out_path: Path) -> ToolOutput:
    if package_version("onnxoptimizer") is None:
        return ToolOutput("absent", detail="onnxoptimizer is not installed")
    start = time.perf_counter()
    status, value = runner.call(onnxoptimizer_optimize, str(path), str(out_path), passes)
    seconds = time.perf_counter() - start
    if status != "ok":
        return ToolOutput(status, detail=value)
    extra = {"passes": list(passes) if passes else "default (get_fuse_and_elimination_passes)", "seconds": seconds}
    return ToolOutput("ok", onnx.load(str(out_path)), out_path, extra=extra)


def run_ort(path: Path, level: str, out_path: Path) -> ToolOutput:
    try:
        start = time.perf_counter()
        model = ort_optimized_model(path, level, out_path)
        return ToolOutput("ok", model, out_path, extra={"seconds": time.perf_counter() - start})
    except Exception as exc:  # noqa: BLE001
        return ToolOutput("error", detail=error_text(exc))


def run_tools(entry: BenchModel, path: Path, settings: Settings, runner: IsolatedRunner, workdir: Path) -> dict[str, ToolOutput]:
    def out(key: str) -> Path:
        return workdir / f"{entry.name}.{key}.onnx"

    outputs = {
        "onnxopt": run_onnxopt(path, "default", settings.optimize_repeats, out("onnxopt")),
        "onnxopt_classic": run_onnxopt(path, "classic", 1, out("onnxopt_classic")),
        "onnxoptimizer_fuse_bn": run_onnxoptimizer(path, ["fuse_bn_into_conv"], runner, out("onnxoptimizer_fuse_bn")),
        "onnxoptimizer_default": run_onnxoptimizer(path, None, runner, out("onnxoptimizer_default")),
        "ort_extended": run_ort(path, "extended", out("ort_extended")),
        "ort_all": run_ort(path, "all", out("ort_all")),
    }
    for key, output in outputs.items():
        if not output.ok:
            log(f"  {key}: {output.status}: {output.detail}")
    return outputs


# --------------------------------------------------------------------------- measurements
def max_rel_error(result: onnxopt.VerifyResult) -> float:
    return max((o.max_rel for o in result.outputs), default=0.0)


def verify_record(original: onnx.ModelProto, candidate: onnx.ModelProto, **kwargs: Any) -> dict[str, Any]:
    try:
        result = onnxopt.verify(original, candidate, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return {"error": error_text(exc)}
    top1 = [o.top1_agreement for o in result.outputs if o.top1_agreement is not None]
    return {
        "max_rel": max_rel_error(result),
        "max_abs": max((o.max_abs for o in result.outputs), default=0.0),
        "passed": result.passed,
        "top1_agreement": min(top1) if top1 else None,
        "inputs": result.input_source,
    }


def measure_correctness(entry: BenchModel, original: onnx.ModelProto, outputs: dict[str, ToolOutput]) -> dict[str, Any]:
    """verify() of each standard-ONNX tool output against the original (ORT outputs are ORT-internal)."""
    input_name = original.graph.input[0].name
    shapes = {input_name: list(entry.input_shape)}
    records: dict[str, Any] = {}
    for key in ("onnxopt", "onnxopt_classic", "onnxoptimizer_fuse_bn", "onnxoptimizer_default"):
        if outputs[key].ok:
            records[key] = verify_record(original, outputs[key].model, input_shapes=shapes)
    if entry.real_inputs is not None and outputs["onnxopt"].ok:
        try:
            images = entry.real_inputs()
            records["onnxopt_real_images"] = verify_record(original, outputs["onnxopt"].model, inputs={input_name: images})
        except Exception as exc:  # noqa: BLE001 - e.g. the sample images are not installed
            records["onnxopt_real_images"] = {"error": error_text(exc)}
    return records


def latency_block(sessions: dict[str, Any], feeds: dict[str, np.ndarray], settings: Settings) -> dict[str, Any]:
    load_before = load_average()
    samples = time_interleaved(sessions, feeds, **settings.timing.kwargs())
    stats = {name: summarize(values) for name, values in samples.items()}
    base = stats["original"]
    for name, s in stats.items():
        if name != "original":
            s["speedup"] = base["median_ms"] / s["median_ms"]
            s["slower_beyond_noise"] = slower_beyond_noise(s, base)
    return {
        "stats": stats,
        "samples_ms": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def measure_latency(entry: BenchModel, path: Path, outputs: dict[str, ToolOutput], settings: Settings) -> dict[str, Any]:
    if settings.quick and entry.large:
        return {"skipped": "--quick skips the large models' latency"}
    paths = {"original": path}
    for key in ("onnxopt", "onnxoptimizer_fuse_bn"):
        if outputs[key].ok:
            paths[key] = outputs[key].path
    feeds = random_feeds(path, entry.input_shape)
    per_threads = {}
    for threads in THREADS:
        try:
            sessions = {name: ort_session(p, "all", threads, spinning=False) for name, p in paths.items()}
            per_threads[str(threads)] = latency_block(sessions, feeds, settings)
        except Exception as exc:  # noqa: BLE001
            per_threads[str(threads)] = {"error": error_text(exc)}
    return {"level": "ORT_ENABLE_ALL", "intra_op_spinning": False, "threads": per_threads}


def bench_model(entry: BenchModel, settings: Settings, runner: IsolatedRunner, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": entry.name, "source": entry.source, "description": entry.description,
        "input_shape": list(entry.input_shape), "large": entry.large,
    }
    try:
        path = entry.build()
    except Exception as exc:  # noqa: BLE001 - e.g. torch or a weight package missing
        result["error"] = f"could not build/export the model: {error_text(exc)}"
        return result
    original = onnx.load(str(path))
    result["bn_before"] = count_bn(original)
    result["nodes_before"] = len(original.graph.node)
    outputs = run_tools(entry, path, settings, runner, workdir)
    result["tools"] = {key: output.record() for key, output in outputs.items()}
    original_bytes = original.SerializeToString()
    for key, output in outputs.items():
        if output.ok:
            result["tools"][key]["identical_to_original"] = output.model.SerializeToString() == original_bytes
    result["correctness"] = measure_correctness(entry, original, outputs)
    result["latency"] = measure_latency(entry, path, outputs, settings)
    for output in outputs.values():
        if output.path is not None:
            output.path.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- verdicts
def bn_left(tool: dict[str, Any], computed: bool) -> int | None:
    """BN nodes a tool left (``computed``: plus those ORT turned into NCHWc Convs); None if it failed."""
    if tool.get("status") != "ok":
        return None
    return tool["bn"] + (tool.get("bn_as_nchwc_conv", 0) if computed else 0)


def best_peer(result: dict[str, Any], computed: bool) -> tuple[int | None, str]:
    """Fewest BN any peer tool left, and which tool(s)."""
    counts = {key: bn_left(result["tools"][key], computed) for keys in PEERS.values() for key in keys}
    counts = {k: v for k, v in counts.items() if v is not None}
    if not counts:
        return None, ""
    best = min(counts.values())
    return best, ", ".join(TOOLS[k] for k, v in counts.items() if v == best)


def bn_flags(result: dict[str, Any]) -> list[str]:
    """Where onnxopt leaves more BN than a peer, or misses the strictly-fewer goal."""
    if "tools" not in result:
        return []
    name, mine = result["name"], bn_left(result["tools"]["onnxopt"], False)
    if mine is None:
        return [f"{name}: onnxopt failed: {result['tools']['onnxopt'].get('detail', '')}"]
    flags = []
    computed, who = best_peer(result, True)
    literal, who_literal = best_peer(result, False)
    if computed is not None and mine > computed:
        flags.append(f"{name}: onnxopt leaves {mine} BN, more than {who} ({computed})")
    elif literal is not None and mine > literal:
        flags.append(
            f"{name}: onnxopt leaves {mine} BatchNormalization node(s), {who_literal} shows {literal}: "
            f"ORT_ENABLE_ALL rewrote the BN as NCHWc depthwise Conv(s) (still computed, not folded)"
        )
    if name in STRICT_GOAL and computed is not None and mine >= computed:
        flags.append(f"{name}: goal missed: {STRICT_GOAL[name]}, onnxopt {mine} BN is not fewer than {who} ({computed})")
    return flags


def changed_by(result: dict[str, Any]) -> str:
    """Which passes of onnxopt's default pipeline modified the model."""
    pipeline = result["tools"]["onnxopt"].get("pipeline", {})
    return ", ".join(name for name, p in pipeline.items() if p["modified"]) or "none"


def latency_flags(result: dict[str, Any]) -> list[str]:
    flags = []
    for threads, block in result.get("latency", {}).get("threads", {}).items():
        opt = block.get("stats", {}).get("onnxopt")
        if opt and opt["slower_beyond_noise"]:
            base = block["stats"]["original"]
            identical = result["tools"]["onnxopt"].get("identical_to_original")
            cause = (
                "the onnxopt model is byte-identical to the original, so this is the difference between two "
                "sessions of the same graph (measurement noise)" if identical
                else f"passes that changed the model: {changed_by(result)}"
            )
            flags.append(
                f"{result['name']} ({threads} thread(s)): onnxopt model slower than the original beyond noise: "
                f"{opt['median_ms']:.4g} ms [IQR {opt['q1_ms']:.4g}-{opt['q3_ms']:.4g}] vs "
                f"{base['median_ms']:.4g} ms [IQR {base['q1_ms']:.4g}-{base['q3_ms']:.4g}]; {cause}"
            )
    return flags


# --------------------------------------------------------------------------- markdown
def fmt_bn(tool: dict[str, Any]) -> str:
    if tool.get("status") != "ok":
        return tool.get("status", "?")
    extra = tool.get("bn_as_nchwc_conv", 0)
    return f"{tool['bn']} (+{extra} NCHWc)" if extra else str(tool["bn"])


def fmt_err(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    if "error" in record:
        return "error"
    value = record["max_rel"]
    return f"{value:.2e}" + ("" if record["passed"] else " FAIL")


def fmt_ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median_ms']:.4g} ({stats['iqr_ms']:.2g})"


def bn_verdict(result: dict[str, Any]) -> str:
    mine = bn_left(result["tools"]["onnxopt"], False)
    computed, _ = best_peer(result, True)
    if mine is None or computed is None:
        return "n/a"
    if mine > computed:
        return "**MORE**"
    return "fewer" if mine < computed else "equal"


def bn_section(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        [r["name"], str(r["bn_before"]), *(fmt_bn(r["tools"][k]) for k in TOOLS), bn_verdict(r)]
        for r in results if "tools" in r
    ]
    lines = ["## BatchNormalization nodes left", ""]
    lines += table(["model", "before", *TOOLS.values(), "onnxopt vs best peer"], rows)
    lines += [
        "",
        "\"+k NCHWc\": ORT_ENABLE_ALL turned k BatchNormalization nodes into NCHWc depthwise 1x1 Convs "
        "(named `*_bn_nchwc`): no longer BN nodes, but still computed. The verdict column compares onnxopt "
        "with the fewest BN any peer leaves counting those (\"fewer\" = strictly fewer).",
    ]
    return lines


def correctness_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        c = r.get("correctness")
        if c is None:
            continue
        real = c.get("onnxopt_real_images")
        real_text = "-" if not real else ("error" if "error" in real else f"{real['max_rel']:.2e}, top-1 {real['top1_agreement']:.0%}")
        rows.append([r["name"], *(fmt_err(c.get(k)) for k in ("onnxopt", "onnxopt_classic", "onnxoptimizer_fuse_bn", "onnxoptimizer_default")), real_text])
    lines = ["## Correctness (max relative error vs the original, `onnxopt.verify`)", ""]
    lines += table(["model", *(TOOLS[k] for k in ("onnxopt", "onnxopt_classic", "onnxoptimizer_fuse_bn", "onnxoptimizer_default")), "onnxopt on 20 real ImageNet images"], rows)
    lines += ["", "Random standard-normal inputs of the model's shape, ORT with graph optimizations off; "
              "max rel = max|a-b| / max|b| over each output; FAIL = outside atol 1e-5 + rtol 1e-4."]
    return lines


def latency_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        latency = r.get("latency", {})
        if "skipped" in latency:
            rows.append([r["name"], "-", latency["skipped"], "", "", "", "", "", ""])
        for threads, block in latency.get("threads", {}).items():
            if "error" in block:
                rows.append([r["name"], threads, "error: " + block["error"], "", "", "", "", "", ""])
                continue
            s = block["stats"]
            opt, peer = s.get("onnxopt"), s.get("onnxoptimizer_fuse_bn")
            flag = "**slower**" if opt and opt["slower_beyond_noise"] else ""
            load = block["load_average_before"][0] if block["load_average_before"] else "-"
            rows.append([
                r["name"], threads, fmt_ms(s["original"]), fmt_ms(opt), f"{opt['speedup']:.3f}x" if opt else "-",
                fmt_ms(peer), f"{peer['speedup']:.3f}x" if peer else "-", str(opt["runs"] if opt else s["original"]["runs"]),
                f"{load} {flag}".strip(),
            ])
    lines = ["## Latency in ONNX Runtime (ORT_ENABLE_ALL), ms: median (IQR)", ""]
    lines += table(["model", "threads", "original", "onnxopt", "speed-up", "onnxoptimizer fuse_bn", "speed-up", "runs", "load avg / flag"], rows)
    lines += ["", "Speed-up = original median / median, all configurations of a model timed round-robin in one process "
              "(intra-op spinning off). \"slower\" = the onnxopt IQR lies wholly above the original's "
              "and its median is at least 2 % higher. "
              "Load avg = the machine's 1-minute load average when the block started (other processes add noise)."]
    return lines


def pass_time_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        tool = r.get("tools", {}).get("onnxopt", {})
        if tool.get("status") != "ok":
            continue
        stats = tool["pass_stats"]
        classic = r["tools"]["onnxopt_classic"]
        classic_s = f"{classic['pass_seconds'][0]:.3f}" if classic.get("status") == "ok" else classic.get("status", "-")
        rows.append([
            r["name"], str(r["bn_before"]), str(stats.get("bn_folded", "-")), str(stats.get("bn_kept", "-")),
            f"{median(tool['pass_seconds']):.3f}", f"{min(tool['pass_seconds']):.3f}",
            f"{median(tool['all_passes_seconds']):.3f}", f"{median(tool['report_total_seconds']):.3f}",
            f"{median(tool['optimize_seconds']):.3f}", classic_s,
        ])
    lines = ["## Optimizer time, s", ""]
    header = ["model", "BN before", "folded", "kept", "fold-batchnorm (median)", "(min)", "all 4 passes",
              "report total", "whole optimize() call (median)", "fold-conv-bn (classic)"]
    lines += table(header, rows)
    lines += ["", "Medians over the repeats. \"all 4 passes\" = sum of the default preset's pass times; \"report total\" = the PassManager's "
              "total (passes plus the metrics taken around them); the whole call also loads the model from disk."]
    resnet50 = next((r for r in results if r["name"] == "resnet50" and r.get("tools", {}).get("onnxopt", {}).get("status") == "ok"), None)
    if resnet50:
        tool = resnet50["tools"]["onnxopt"]
        seconds = median(tool["pass_seconds"])
        verdict = "met" if seconds < RESNET50_PASS_GOAL_S else "**NOT met**"
        lines += ["", f"ResNet-50: fold-batchnorm pass {seconds:.3f} s (median of {len(tool['pass_seconds'])}), "
                      f"goal < {RESNET50_PASS_GOAL_S:g} s on 2 cores: {verdict}; whole optimize() "
                      f"{median(tool['optimize_seconds']):.3f} s, of which all passes "
                      f"{median(tool['all_passes_seconds']):.3f} s and the report total "
                      f"{median(tool['report_total_seconds']):.3f} s."]
    return lines


def failures_section(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"- {r['name']}: {r['error']}")
        for key, tool in r.get("tools", {}).items():
            if tool.get("status") != "ok":
                lines.append(f"- {r['name']} / {TOOLS[key]}: {tool['status']}: {tool.get('detail', '')}")
    return ["## Tool failures", "", *(lines or ["none"])]


def render_markdown(data: dict[str, Any]) -> str:
    results, env = data["models"], data["environment"]
    flags = [f for r in results for f in bn_flags(r) + latency_flags(r)]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# BatchNormalization folding benchmark",
        "",
        f"Generated by `{data['command']}` on {env['date']} ({'quick' if data['settings']['quick'] else 'full'} mode, "
        f"{data['seconds']:.0f} s). {env['cpu_model']}, {env['cpus_usable']} usable CPU(s); {versions}. "
        f"Source: {env['git_commit'] or '?'}{' + uncommitted changes' if env['git_dirty_files'] else ''}. "
        "Raw numbers: bn_fold.json. What is measured and how: the docstring of bench/bn_fold.py.",
        "",
        "## Flags",
        "",
        *([f"- {f}" for f in flags] or ["none: onnxopt never leaves more BN than a peer, and is never slower beyond noise"]),
        "",
        *bn_section(results), "",
        *correctness_section(results), "",
        *latency_section(results), "",
        *pass_time_section(results), "",
        *failures_section(results), "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def write_results(data: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bn_fold.json", out_dir / "bn_fold.md"
    json_path.write_text(compact_number_lists(json.dumps(json_safe(data), indent=1)) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(data), encoding="utf-8")
    return json_path, md_path


def run(models: list[BenchModel], settings: Settings, command: str) -> dict[str, Any]:
    start = time.perf_counter()
    env = environment()
    results = []
    runner = IsolatedRunner()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_bn_fold_") as tmp:
            for i, entry in enumerate(models, 1):
                log(f"[{i}/{len(models)}] {entry.name}")
                t0 = time.perf_counter()
                try:
                    results.append(bench_model(entry, settings, runner, Path(tmp)))
                except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others
                    traceback.print_exc()
                    results.append({"name": entry.name, "source": entry.source, "error": error_text(exc)})
                log(f"  done in {time.perf_counter() - t0:.1f} s")
    finally:
        runner.close()
    return {
        "benchmark": "bn_fold",
        "command": command,
        "settings": settings_record(settings),
        "environment": env,
        "seconds": time.perf_counter() - start,
        "models": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bn_fold", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="no latency for the large models, fewer runs")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    command = "python -m bench.bn_fold " + " ".join(sys.argv[1:] if argv is None else argv)
    data = run(collect_models(only), Settings.for_mode(args.quick), command.strip())
    json_path, md_path = write_results(data, args.out)
    log(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
