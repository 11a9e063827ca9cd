"""Helpers shared by the benchmarks: environment, op counting, ORT sessions, timing, peers.

Timing protocol (:func:`time_interleaved`): every configuration of one model gets its own
ORT session in the same process; each is warmed up, then the timed repetitions go
round-robin over the configurations (the order rotates every repetition so no
configuration always runs right after the same other one).  Timed sessions should be made
with ``spinning=False``: otherwise the worker threads of the session that just ran keep
spin-waiting on the cores while the next configuration runs.  The number of repetitions is
the same for every configuration: at least ``min_runs``, more when the model is fast
enough to fill ``target_seconds`` per configuration, at most ``max_runs``.
"""

from __future__ import annotations

import argparse

import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import math
import sys
import multiprocessing
import os
import platform
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

REPO_ROOT = Path(__file__).resolve().parent.parent
ORT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# ORT's NCHWc transformer (ORT_ENABLE_ALL) rewrites a BatchNormalization it cannot fuse into
# a depthwise 1x1 NCHWc Conv named "<bn output>_bn_nchwc": the BN is still computed.
NCHWC_BN_MARKER = "_bn_nchwc"


# --------------------------------------------------------------------------- environment
def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Versions, machine and source state, for the results file."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dirty = _git("status", "--porcelain")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "versions": {
            name: package_version(name)
            for name in ("onnxopt", "onnx", "onnxruntime", "onnxoptimizer", "numpy", "torch", "protobuf")
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": len(dirty.splitlines()) if dirty else 0,
    }


# --------------------------------------------------------------------------- graphs
def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """op_type (prefixed with its domain when not the default one) -> count, main graph only."""
    return dict(Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node))


def count_bn(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")


def count_bn_as_nchwc_conv(model: onnx.ModelProto) -> int:
    """BatchNormalizations ORT_ENABLE_ALL turned into NCHWc depthwise Convs (still computed)."""
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and NCHWC_BN_MARKER in n.name)


# --------------------------------------------------------------------------- ORT
def session_options(level: str = "all", threads: int = 0, *, spinning: bool = True) -> ort.SessionOptions:
    """CPU session options; ``spinning=False`` stops idle intra-op workers from spin-waiting,
    which matters when several sessions take turns in one process (see time_interleaved)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ORT_LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # ORT warns about every Unsqueeze it cannot remove
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def ort_session(
    path: str | os.PathLike[str], level: str = "all", threads: int = 0, *, spinning: bool = True
) -> ort.InferenceSession:
    options = session_options(level, threads, spinning=spinning)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def ort_optimized_model(path: str | os.PathLike[str], level: str, out_path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The graph ORT runs after its own optimizations at ``level`` (saved via optimized_model_filepath)."""
    options = session_options(level)
    options.optimized_model_filepath = os.fspath(out_path)
    ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(os.fspath(out_path))


def random_feeds(path: str | os.PathLike[str], shape: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds of ``shape`` for every input of the model at ``path``."""
    rng = np.random.default_rng(seed)
    inputs = ort_session(path, "disabled").get_inputs()
    return {i.name: rng.standard_normal(shape).astype(np.float32) for i in inputs}


# --------------------------------------------------------------------------- timing
def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """median, quartiles, IQR, min, mean (ms) and the sample count."""
    data = np.asarray(samples_ms, dtype=np.float64)
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    return {
        "median_ms": float(median),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "iqr_ms": float(q3 - q1),
        "min_ms": float(data.min()),
        "mean_ms": float(data.mean()),
        "runs": int(data.size),
    }


def _run_once_ms(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    sess.run(None, dict(feeds))
    return (time.perf_counter() - start) * 1e3


@dataclasses.dataclass(frozen=True)
class Timing:
    """How :func:`time_interleaved` samples: warm-up runs, then rounds until ``min_runs`` and
    ``target_seconds`` are reached, at most ``max_runs`` (a benchmark's quick/full settings)."""

    warmup: int = 5
    min_runs: int = 20
    max_runs: int = 2000
    target_seconds: float = 2.0

    def kwargs(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def settings_record(settings: Any) -> dict[str, Any]:
    """A benchmark's settings (a dataclass with a ``timing`` field) as the flat JSON record
    the results files keep: the Timing fields beside the others."""
    record = {key: value for key, value in vars(settings).items() if key != "timing"}
    record.update(settings.timing.kwargs())
    return record


def time_interleaved(
    sessions: Mapping[str, ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 2000,
    target_seconds: float = 2.0,
) -> dict[str, list[float]]:
    """Per-configuration latencies (ms), measured round-robin (see the module docstring)."""
    names = list(sessions)
    slowest_ms = 0.0
    for name in names:
        warm = [_run_once_ms(sessions[name], feeds) for _ in range(max(warmup, 1))]
        slowest_ms = max(slowest_ms, float(np.median(warm)))
    runs = min(max_runs, max(min_runs, math.ceil(target_seconds * 1e3 / max(slowest_ms, 1e-3))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(runs):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_run_once_ms(sessions[name], feeds))
    return samples


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (other processes on the machine add noise)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def slower_beyond_noise(candidate: Mapping[str, float], baseline: Mapping[str, float], min_slowdown: float = 0.02) -> bool:
    """The candidate's interquartile range lies wholly above the baseline's (Q1 > baseline Q3)
    and its median is at least ``min_slowdown`` (relative) slower: separated and not negligible."""
    separated = candidate["q1_ms"] > baseline["q3_ms"]
    return separated and candidate["median_ms"] >= baseline["median_ms"] * (1 + min_slowdown)


# --------------------------------------------------------------------------- isolation
class IsolatedRunner:
    """Run a function in a spawned worker process so a native crash cannot end the benchmark.

    ``call`` returns ``("ok", value)``, ``("error", message)`` for an exception, or
    ``("crash", message)`` when the worker died (segfault, abort, timeout); the worker is
    replaced after a crash.
    """

    def __init__(self, timeout: float = 900.0) -> None:
        self.timeout = timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context)
        return self._pool

    def call(self, fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
        future = self._executor().submit(fn, *args)
        try:
            return "ok", future.result(timeout=self.timeout)
        except concurrent.futures.process.BrokenProcessPool as exc:
            self.close()
            return "crash", f"worker process died: {exc}"
        except concurrent.futures.TimeoutError:
            self.close(kill=True)
            return "crash", f"timed out after {self.timeout:.0f} s"
        except Exception as exc:  # noqa: BLE001 - the peer's own error, recorded verbatim
            return "error", f"{type(exc).__name__}: {str(exc).strip()[:500]}"

    def close(self, kill: bool = False) -> None:
        if self._pool is not None:
            if kill:
                for process in list(getattr(self._pool, "_processes", {}).values()):
                    process.kill()
            self._pool.shutdown(wait=not kill, cancel_futures=True)
            self._pool = None


# --------------------------------------------------------------------------- peers
def onnxoptimizer_optimize(src: str, dst: str, passes: Sequence[str] | None) -> str:
    """onnxoptimizer on the model at ``src`` (``passes`` None: its default fuse-and-eliminate
    passes), saved to ``dst``; returns onnxoptimizer's version.  Meant for IsolatedRunner."""
    import onnxoptimizer

    model = onnx.load(src)
    optimized = onnxoptimizer.optimize(model, list(passes)) if passes else onnxoptimizer.optimize(model)
    onnx.save(optimized, dst)
    return getattr(onnxoptimizer, "__version__", "") or (package_version("onnxoptimizer") or "")


# --------------------------------------------------------------------------- result files
def chosen_models(parser: argparse.ArgumentParser, only: str | None, known: Sequence[str]) -> list[str]:
    """The models of ``--only a,b`` (all of ``known`` without it); an unknown name is a usage error."""
    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(known)}")
    return names


def merge_previous(path: Path, field: str, results: Mapping[str, Any], names: Sequence[str], known: Sequence[str], command: str) -> tuple[dict[str, Any], str]:
    """``--only`` runs update their models in the results file ``path`` and keep the others:
    (the previous file's ``field`` entries updated with ``results``, in ``known``'s order; the
    command line "<previous> ; then <command>").  A run of every model replaces the file."""
    if set(names) == set(known) or not path.exists():
        return dict(results), command
    old = json.loads(path.read_text(encoding="utf-8"))
    merged = {**old.get(field, {}), **results}
    order = [*known, *(k for k in merged if k not in known)]
    return {k: merged[k] for k in order if k in merged}, chained_command(old.get("command", "?"), command)


def command_line(program: str, argv: Sequence[str] | None) -> str:
    """The command a results file records: ``program`` and the arguments it ran with
    (``argv``, or the process's own when None)."""
    return (program + " " + " ".join(sys.argv[1:] if argv is None else argv)).strip()


def chained_command(previous: str, command: str) -> str:
    """The command line of a results file updated by ``command``: "<previous> ; then <command>",
    with an earlier identical run dropped (its rows were replaced by this one)."""
    steps = [step for step in previous.split(" ; then ") if step != command]
    return " ; then ".join([*steps, command])


def config_rows(
    configs: Mapping[str, str], records: Mapping[str, Mapping[str, Any]], width: int, cells: Callable[[str, Mapping[str, Any]], list[str]]
) -> list[list[str]]:
    """One table row per configuration (``configs``: key → row name) that has a record, in
    ``configs``' order: ``[name, *cells(key, record)]``, or ``did not run: <error>`` padded
    with "-" to ``width`` cells for a configuration that failed."""
    rows = []
    for key, name in configs.items():
        record = records.get(key)
        if record is None:
            continue
        if "error" in record:
            rows.append([name, f"did not run: {record['error']}", *["-"] * (width - 2)])
        else:
            rows.append([name, *cells(key, record)])
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_json_and_markdown(out: Path, stem: str, data: Mapping[str, Any], markdown: str) -> Path:
    """``<out>/<stem>.json`` (the raw numbers, :func:`json_safe`, one space of indent) and
    ``<out>/<stem>.md``; returns the Markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(json_safe(data), indent=1, default=str) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    return out / f"{stem}.md"


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with strings; keys become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def compact_number_lists(text: str) -> str:
    """Put JSON arrays of plain numbers on one line (the latency samples)."""
    number_list = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")
    return number_list.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
