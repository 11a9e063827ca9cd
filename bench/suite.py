"""The benchmark suite: every model x every configuration, one results.json + RESULTS.md + plots.

For each model (``bench.workloads``) the suite

1. builds the ONNX file (zoo export, real pretrained export, or the trained Fashion-MNIST
   model; all cached) and loads its real evaluation inputs;
2. produces every configuration (``bench.configs``) in its own fresh worker process
   (``bench.worker``: wall time and peak RSS of the optimizer call); a configuration whose
   onnxopt passes are not registered, or whose peer is not installed, is recorded as absent;
3. measures each produced model: file size, parameters, MACs (``onnxopt.metrics``), BOPs
   (``bench.measures``), BatchNormalization nodes left, outputs on the evaluation inputs
   under ONNX Runtime (fidelity to the FP32 model's outputs, labelled accuracy);
4. times all configurations of the model in this one process, interleaved
   (``bench.common.time_interleaved``), at 1 and 2 intra-op threads; speed-ups are ratios of
   medians of the same block.

Every session runs at ORT_ENABLE_ALL (what a deployment uses) except the ORT-level peers,
which run the model ORT wrote at their own level, at that level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from bench import configs as configs_mod
from bench import workloads as workloads_mod
from bench.common import (
    REPO_ROOT,
    compact_number_lists,
    count_bn,
    count_bn_as_nchwc_conv,
    environment,
    json_safe,
    load_average,
    ort_session,
    summarize,
    Timing,
    settings_record,
    time_interleaved,
)
from bench.configs import Config
from bench.measures import bops, classifier_fidelity, effective_bops, embedding_fidelity
from bench.workloads import EvalSet, Workload

THREADS = (1, 2)
WORKER_TIMEOUT = 900.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    timing: Timing

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            return cls(True, Timing(warmup=3, min_runs=20, max_runs=60, target_seconds=1.0))
        return cls(False, Timing(warmup=10, min_runs=40, max_runs=300, target_seconds=4.0))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


# --------------------------------------------------------------------------- producing configurations
def worker_env() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH (the worker runs elsewhere)."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_worker(spec: dict[str, Any], workdir: Path, timeout: float = WORKER_TIMEOUT) -> dict[str, Any]:
    """``python -m bench.worker`` on ``spec``; its JSON result, or an error/crash record."""
    spec_path = workdir / f"{spec['config']['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    try:
        # cwd: the model's temporary folder, because ORT's quant_pre_process leaves files in the cwd
        proc = subprocess.run([sys.executable, "-m", "bench.worker", str(spec_path)], capture_output=True, text=True,
                              timeout=timeout, cwd=workdir, env=worker_env())
    except subprocess.TimeoutExpired:
        return {"status": "crash", "detail": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"status": "crash", "detail": f"worker exited with {proc.returncode}: {' | '.join(tail)[:500]}"}
    result["process_seconds"] = time.perf_counter() - start
    return result


def produce(config: Config, src: Path, data: EvalSet, workdir: Path, presets: dict[str, tuple[str, ...]]) -> tuple[dict[str, Any], Path | None]:
    """Make the configuration's model: (record, path of the model or None)."""
    if config.family == "reference":
        return {"status": "ok"}, src
    if config.images_only and data.calibration is None:
        return {"status": "n/a", "detail": "needs image calibration data (this model has token inputs)"}, None
    dst = workdir / f"{config.name}.onnx"
    spec: dict[str, Any] = {"config": config.as_dict(), "src": str(src), "dst": str(dst)}
    if config.family == "onnxopt":
        spec["passes"] = configs_mod.expand_passes(config.passes, presets)
    if config.tool == "ort_static":
        calibration = workdir / "calibration.npy"
        if not calibration.exists():
            np.save(calibration, data.calibration)
        spec["calibration"] = str(calibration)
    record = run_worker(spec, workdir)
    if record["status"] == "ok" and not dst.is_file():
        record = {**record, "status": "error", "detail": "the tool wrote no model"}
    return record, dst if record["status"] == "ok" else None


# --------------------------------------------------------------------------- measuring
def static_figures(path: Path, config: Config, input_shapes: dict[str, list[int]], reference_macs: int | None) -> dict[str, Any]:
    """File size, parameters, MACs and BOPs (``bench.measures.effective_bops``; when ONNX shape
    inference cannot size some MAC node -- ORT's contrib ops -- the reference's MACs at the
    configuration's nominal bits), BN left."""
    from onnxopt.metrics import count_parameters

    model = onnx.load(str(path))
    figures: dict[str, Any] = {"size_bytes": path.stat().st_size, "nodes": len(model.graph.node),
                               "parameters": count_parameters(model),
                               "bn": count_bn(model), "bn_as_nchwc_conv": count_bn_as_nchwc_conv(model)}
    try:
        counted = effective_bops(model, input_shapes, config.bits_a)
    except Exception as exc:  # noqa: BLE001 - recorded; falls back below
        counted = {"unknown_mac_nodes": -1, "error": error_text(exc)}
    if counted.get("unknown_mac_nodes") == 0:
        figures.update(macs=counted["macs"], bops=counted["bops"], quantized_mac_fraction=counted["quantized_mac_fraction"],
                       macs_source="own")
    else:
        figures.update(macs=reference_macs, bops=bops(reference_macs, config.bits_w, config.bits_a),
                       quantized_mac_fraction=None,
                       macs_source=f"reference MACs at nominal bits ({counted.get('error') or str(counted['unknown_mac_nodes']) + ' MAC nodes of unknown shape'})")
    return figures


def run_outputs(path: Path, level: str, feeds: dict[str, np.ndarray], chunk: int = 100) -> np.ndarray:
    """First output for every sample, in batches of ``chunk`` (one by one if the batch is fixed)."""
    sess = ort_session(path, level)
    names = [i.name for i in sess.get_inputs()]
    count = len(feeds[names[0]]) if names[0] in feeds else len(next(iter(feeds.values())))
    batch = [feeds[n] if n in feeds else next(iter(feeds.values())) for n in names]

    def run(lo: int, hi: int) -> np.ndarray:
        return sess.run(None, {n: b[lo:hi] for n, b in zip(names, batch)})[0]

    try:
        parts = [run(i, i + chunk) for i in range(0, count, chunk)]
    except Exception:  # noqa: BLE001 - a fixed batch dimension
        parts = [run(i, i + 1) for i in range(count)]
    return np.concatenate(parts).reshape(count, -1).astype(np.float64)


def fidelity(data: EvalSet, reference: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
    if data.kind == "embedding":
        return embedding_fidelity(reference, outputs, data.labels, data.train_size)
    return classifier_fidelity(reference, outputs, data.labels)


def measure_latency(paths: dict[str, tuple[Path, str]], feed: dict[str, np.ndarray], settings: Settings) -> dict[str, Any]:
    """Interleaved latency of every configuration at 1 and 2 threads; speed-up vs ``fp32`` per block."""
    blocks: dict[str, Any] = {}
    for threads in THREADS:
        sessions = {name: ort_session(path, level, threads, spinning=False) for name, (path, level) in paths.items()}
        feeds = {i.name: feed[i.name] for i in next(iter(sessions.values())).get_inputs()}
        load_before = load_average()
        samples = time_interleaved(sessions, feeds, **settings.timing.kwargs())
        stats = {name: summarize(s) for name, s in samples.items()}
        base = stats.get("fp32", {}).get("median_ms")
        for s in stats.values():
            s["speedup_vs_fp32"] = base / s["median_ms"] if base else None
        blocks[str(threads)] = {"stats": stats, "samples_ms": {k: [round(x, 4) for x in v] for k, v in samples.items()},
                                "load_average_before": load_before, "load_average_after": load_average()}
        del sessions
    return blocks


def bench_workload(workload: Workload, selected: Sequence[Config], settings: Settings, workdir: Path,
                   state: tuple[set[str], dict[str, tuple[str, ...]], str | None], installed: dict[str, bool]) -> dict[str, Any]:
    passes, presets, _ = state
    result: dict[str, Any] = {"title": workload.title, "source": workload.source}
    start = time.perf_counter()
    src = workload.build()
    result["build_seconds"] = time.perf_counter() - start
    data = workload.data(settings.quick)
    result.update(model_file=src.name, inputs=data.description, label_note=data.label_note, kind=data.kind)
    log(f"[{workload.name}] {src.name}; {data.description}")
    records: dict[str, dict[str, Any]] = {}
    paths: dict[str, tuple[Path, str]] = {}
    for config in selected:
        available, why = configs_mod.availability(config, passes, presets, installed)
        if not available:
            records[config.name] = {"status": "absent", "detail": why}
            continue
        record, path = produce(config, src, data, workdir, presets)
        records[config.name] = record
        if path is not None:
            paths[config.name] = (path, config.ort_level)
        log(f"  {config.name}: {record['status']} {record.get('detail', '')}"
            + (f" {record['seconds']:.2f} s" if "seconds" in record else ""))
    reference_macs = None
    input_shapes = {k: list(v.shape) for k, v in data.latency_feed.items()}
    reference = run_outputs(src, "all", data.feeds)
    for name, (path, level) in list(paths.items()):
        config = configs_mod.CONFIG_BY_NAME[name]
        record = records[name]
        try:
            record.update(static_figures(path, config, input_shapes, reference_macs))
            if name == "fp32":
                reference_macs = record.get("macs")
            record["fidelity"] = fidelity(data, reference, run_outputs(path, level, data.feeds))
        except Exception as exc:  # noqa: BLE001 - e.g. ORT cannot run the model
            traceback.print_exc()
            record.update(status="error", detail=f"measuring: {error_text(exc)}")
            del paths[name]
    log(f"  timing {len(paths)} configurations interleaved ...")
    result["latency"] = measure_latency(paths, data.latency_feed, settings)
    for name, record in records.items():
        for threads, block in result["latency"].items():
            if name in block["stats"]:
                record.setdefault("latency", {})[threads] = block["stats"][name]
    result["configs"] = records
    return result


# --------------------------------------------------------------------------- the run
def run(quick: bool, out: Path, models: list[str] | None = None, config_names: list[str] | None = None,
        command: str = "", plots: bool = True) -> dict[str, Any]:
    from bench import plots as plots_mod
    from bench import report as report_mod

    settings = Settings.for_mode(quick)
    selected = configs_mod.select(quick, config_names)
    chosen = workloads_mod.select(quick, models)
    state = configs_mod.registry_state()
    installed = configs_mod.installed_peers()
    started = time.perf_counter()
    data: dict[str, Any] = {
        "command": command, "mode": "quick" if quick else "full", "settings": settings_record(settings),
        "environment": environment(), "load_average_start": load_average(),
        "registry": {"passes": sorted(state[0]), "presets": {k: list(v) for k, v in state[1].items()}, "error": state[2]},
        "peers_installed": installed,
        "configs": [{**c.as_dict(), "availability": configs_mod.availability(c, state[0], state[1], installed)[1]}
                    for c in selected],
        "models": {},
    }
    for workload in chosen:
        with tempfile.TemporaryDirectory(prefix=f"bench-{workload.name}-") as tmp:
            try:
                data["models"][workload.name] = bench_workload(workload, selected, settings, Path(tmp), state, installed)
            except Exception as exc:  # noqa: BLE001 - e.g. an asset is missing: recorded, the run goes on
                traceback.print_exc()
                data["models"][workload.name] = {"title": workload.title, "source": workload.source,
                                                 "status": "error", "detail": error_text(exc)}
    data["wall_seconds"] = time.perf_counter() - started
    data["load_average_end"] = load_average()
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        data["plots"] = plots_mod.make_plots(data, out)
    write(data, out, report_mod.render(data))
    return data


def write(data: dict[str, Any], out: Path, markdown: str) -> None:
    text = json.dumps(json_safe(data), indent=1, default=str)
    (out / "results.json").write_text(compact_number_lists(text) + "\n")
    (out / "RESULTS.md").write_text(markdown)
