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
environment) and ``<out>/bn_fold.md`` (tables and flags: :mod:`bench.bn_fold_report`).

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
from typing import Any, Callable, Sequence

import numpy as np
import onnx

import onnxopt
from bench.bn_fold_report import render_markdown
from bench.common import (
    command_line,
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
    Timing,
    settings_record,
    time_interleaved,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
THREADS = (1, 2)
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
    command = command_line("python -m bench.bn_fold", argv)
    data = run(collect_models(only), Settings.for_mode(args.quick), command.strip())
    json_path, md_path = write_results(data, args.out)
    log(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
