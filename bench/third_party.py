"""Third-party models: quantizing ONNX files onnxopt did not export itself (project issue 14).

Models, all with real weights: the pretrained MobileNetV2 and EfficientNet-Lite0
(``onnxopt.models.pretrained.load_pretrained``) and the project's Fashion-MNIST BN-ResNet
(``onnxopt.models.train_fashion_mnist``, trained once and cached), each exported the way a
third party would: ``torch.onnx.export(model.eval(), x, path, dynamo=False,
opset_version=V)`` with torch's defaults, so BatchNorm is folded into the Convs and the
file carries no BN statistics.  Cases (:data:`bench.third_party_cases.CASES`): opsets 11,
12 and 17 with a dynamic batch axis; MobileNetV2 at opset 17 with a static batch of 1; and
the Fashion-MNIST opset-17 graph moved into both branches of an ``If`` whose condition
depends on the input (:func:`bench.third_party_cases.wrap_in_if`), the shape of a model
exported from control flow.

Per case (:func:`bench_model`, also what the test runs on a tiny model):

* **onnxopt**: ``python -m onnxopt SRC -o OUT --quantize w8a8 --calibration-data DATA
  --report R.json`` in a subprocess, DATA = a folder of the first 10 ImageNet JPEGs (with
  ``--calibration-mean/--calibration-std`` for EfficientNet-Lite0's ``(255x - 127)/128``) or
  an .npz of 10 Fashion-MNIST test images.  Wall time of the process and the report's
  ``total_seconds``; the report's ``coverage`` entry.
* **quantize_static**: ONNX Runtime's ``quant_pre_process`` then ``quantize_static`` (QDQ,
  per-channel int8 weights, uint8 activations, MinMax; bench/quantize.py's call) on the same
  10 samples, one per ``get_next``, in a subprocess (:data:`ORT_STATIC_SCRIPT`): wall time of
  the process, of the call, and of the pre-processing.  Its per-channel QDQ output of an
  opset < 13 file does not load in ORT (DequantizeLinear's ``axis`` needs opset 13); that
  failure is recorded and the file is then upgraded to opset 13 with
  ``onnx.version_converter`` (what onnxopt does itself) and quantized again; the numbers are
  those of the second attempt.
* **Layers quantized**: Conv/Gemm/MatMul whose weight is a constant, counted in every
  (sub)graph of the FP32 file; quantized = its weight comes from a DequantizeLinear in the
  output (:func:`bench.third_party_cases.layer_counts`); shown beside the report's own
  coverage line.
* **Fidelity vs FP32** (ORT_ENABLE_ALL): top-1 agreement, mean KL(FP32 || config), on
  inputs never used for calibration: the other 10 ImageNet images in the first ``views``
  deterministic views of bench/quantize.py (standard crop, flip, tighter crop, wider crop),
  or the next ``fashion_inputs`` Fashion-MNIST test images.
* **Latency** (ORT_ENABLE_ALL, batch 1, 1 and 2 intra-op threads): FP32 / onnxopt /
  quantize_static in one process, warmed up, timed round-robin
  (:func:`bench.common.time_interleaved`, spinning off); medians.
* **Diagnostic** (opset-17 dynamic exports): the fidelity of the same onnxopt run with
  ``--no-spiq``, to show what the SPIQ scale folding does with calibrated ranges, and with
  each ``--act-ranges`` mode (``minmax``, ``moments``, ``percentile``) named explicitly.
* **No calibration data**: ``python -m onnxopt SRC -o OUT --quantize w8a8``: the exit code
  (10 expected), the error line and whether it names ``--calibration-data``, and whether
  no output was written.

Plus the BN-preserving export (``onnxopt.export_torch`` via ``export_pretrained``) of
MobileNetV2 quantized data-free (``--quantize w8a8``, no data), measured like the others,
to compare with the BN-folded opset-17 export calibrated on 10 images.

Goals (stated met / not met in the results): >= 95 % of the layers quantized on every
model; fidelity >= quantize_static's (agreement >= and mean KL <=); latency <= 1.05x
quantize_static's and < FP32 at 1 and 2 threads; calibration time <= quantize_static's
(process wall time, ORT's without its pre-processing, and report.total_seconds vs the
call); exit 10 naming ``--calibration-data`` without data; BN-folded + 10 samples within 2
points of agreement and 1.5x the mean KL of data-free on the BN-preserving export.

    python -m bench third-party [--quick] [--only mobilenet_v2,fashion_mnist] [--out bench/results]

writes ``<out>/third_party.md`` and ``<out>/third_party.json``.  The cases, exports and layer
counts are in :mod:`bench.third_party_cases`, the goals and tables in :mod:`bench.third_party_report`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from bench.common import (
    Timing,
    chosen_models,
    command_line,
    compact_number_lists,
    environment,
    json_safe,
    load_average,
    ort_session,
    settings_record,
    summarize,
    time_interleaved,
)
from bench.quantize import VIEWS, error_text, fidelity, log, run_model
from bench.third_party_cases import (
    CASES,
    CONFIGS,
    GOALS,
    DIAGNOSTICS,
    THREADS,
    TITLES,
    Case,
    coverage,
    export_case,
    export_plain as export_plain,  # re-exported: tests/bench/test_third_party.py
    layer_counts as layer_counts,
    subgraphs,
    wrap_in_if as wrap_in_if,
)
from bench.third_party_report import evaluate_goals, render_markdown

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ONNXOPT = [sys.executable, "-m", "onnxopt"]
CALIBRATION_SAMPLES = 10
#: --calibration-mean/std of EfficientNet-Lite0's (255x - 127)/128 on images in [0, 1]
EFFICIENTNET_IMAGE_ARGS = ["--calibration-mean", f"{127 / 255:.6f}", "--calibration-std", f"{128 / 255:.6f}"]

ORT_STATIC_SCRIPT = """
import json, sys, time, numpy as np, onnx, onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
src, stem, dst, data = sys.argv[1:5]
samples = dict(np.load(data))
def error(exc):
    return f"{type(exc).__name__}: {str(exc).strip()[:600]}"
class Reader(CalibrationDataReader):
    def __init__(self):
        count = len(next(iter(samples.values())))
        self._it = iter([{k: v[i:i + 1] for k, v in samples.items()} for i in range(count)])
    def get_next(self):
        return next(self._it, None)
def attempt(path):
    record, start = {}, time.perf_counter()
    try:
        quant_pre_process(path, stem + ".pre.onnx")
        record["pre_process"], path = True, stem + ".pre.onnx"
    except Exception as exc:  # ORT's pre-processing cannot handle every graph: quantize the original
        record["pre_process"], record["pre_process_error"] = False, error(exc)
    record["pre_process_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    quantize_static(path, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    record["call_seconds"] = time.perf_counter() - start
    try:
        ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    except Exception as exc:
        record["load_error"] = error(exc)
    return record
start = time.perf_counter()
record = attempt(src)
opset = next(o.version for o in onnx.load(src, load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
if "load_error" in record and opset < 13:  # per-channel QDQ needs opset 13: upgrade as onnxopt does, then again
    failed = {**record, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    onnx.save(version_converter.convert_version(onnx.load(src), 13), stem + ".op13.onnx")
    convert = time.perf_counter() - start
    record = {**attempt(stem + ".op13.onnx"), "convert_seconds": convert, "converted_from_opset": opset, "failed_attempt": failed}
print("ORT_STATIC " + json.dumps(record))
"""


@dataclass(frozen=True)
class Settings:
    quick: bool
    views: int  # ImageNet views of the 10 evaluation images
    fashion_inputs: int  # Fashion-MNIST evaluation images
    timing: Timing

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            return cls(True, views=3, fashion_inputs=300, timing=Timing(warmup=3, min_runs=30, max_runs=30, target_seconds=0.0))
        return cls(False, views=len(VIEWS), fashion_inputs=1000, timing=Timing(warmup=5, min_runs=30, max_runs=200, target_seconds=3.0))


@dataclass
class Samples:
    """What a model is calibrated and evaluated with."""

    calibration: dict[str, np.ndarray]  # graph input -> the calibration samples (what quantize_static gets)
    onnxopt_data: Path  # what --calibration-data gets: the same samples as images or as an .npz
    onnxopt_args: list[str]  # extra calibration flags (image normalisation)
    inputs: np.ndarray  # evaluation inputs, never used for calibration
    labels: np.ndarray
    views: list[str]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data
def imagenet_samples(name: str, views: int, workdir: Path) -> Samples:
    """The first 10 ImageNet JPEGs for calibration (as a folder for onnxopt), the other 10 in
    ``views`` views of bench/quantize.py for evaluation; normalised for ``name``."""
    from bench.quantize import NORMALIZATION, image_views
    from onnxopt.models.datasets import imagenet_sample_files, normalize, preprocess_image

    files = imagenet_sample_files()
    calibration_files = [path for path, _ in files[:CALIBRATION_SAMPLES]]
    folder = workdir / f"calibration_{name}"
    folder.mkdir(exist_ok=True)
    for path in calibration_files:
        shutil.copy(path, folder / path.name)
    norm = NORMALIZATION[name]
    calibration = normalize(np.stack([preprocess_image(p) for p in calibration_files]), norm).astype(np.float32)
    images, labels, view_names = image_views(views)
    held_out = np.tile(np.arange(len(files)) >= CALIBRATION_SAMPLES, views)
    return Samples(
        {"input": calibration}, folder, EFFICIENTNET_IMAGE_ARGS if norm == "efficientnet" else [],
        normalize(images[held_out], norm).astype(np.float32), labels[held_out], [v for v, h in zip(view_names, held_out) if h],
        f"{int(held_out.sum())} inputs: the {len(files) - CALIBRATION_SAMPLES} ImageNet images not used for calibration "
        f"x {views} views ({', '.join(v[0] for v in VIEWS[:views])})",
        {"calibration_files": [p.name for p in calibration_files]},
    )


def fashion_samples(count: int, workdir: Path) -> Samples:
    """The first 10 Fashion-MNIST test images for calibration (an .npz), the next ``count`` for evaluation."""
    from onnxopt.models.datasets import load_fashion_mnist
    from onnxopt.models.train_fashion_mnist import preprocess

    test_x, test_y = load_fashion_mnist("test")
    calibration = preprocess(test_x[:CALIBRATION_SAMPLES])
    npz = workdir / "calibration_fashion_mnist.npz"
    np.savez(npz, input=calibration)
    stop = CALIBRATION_SAMPLES + count
    return Samples({"input": calibration}, npz, [], preprocess(test_x[CALIBRATION_SAMPLES:stop]),
                   test_y[CALIBRATION_SAMPLES:stop].astype(np.int64), [VIEWS[0][0]] * count,
                   f"Fashion-MNIST test images {CALIBRATION_SAMPLES}..{stop - 1} (0..{CALIBRATION_SAMPLES - 1} calibrate)")


def load_samples(name: str, settings: Settings, workdir: Path) -> Samples:
    if name == "fashion_mnist":
        return fashion_samples(settings.fashion_inputs, workdir)
    return imagenet_samples(name, settings.views, workdir)


# --------------------------------------------------------------------------- quantizers
def run_onnxopt(src: Path, dst: Path, data: Path | None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``python -m onnxopt SRC -o DST --quantize w8a8 [--calibration-data DATA ...]``: exit code, the
    error line, wall time, and from the JSON report total_seconds, coverage and notes."""
    report = dst.with_suffix(".report.json")
    cmd = [*ONNXOPT, str(src), "-o", str(dst), "--quantize", "w8a8", "--report", str(report), "-q"]
    if data is not None:
        cmd += ["--calibration-data", str(data), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxopt:")]
    record: dict[str, Any] = {
        "command": " ".join(["onnxopt", src.name, "-o", dst.name, "--quantize", "w8a8",
                             *(["--calibration-data", Path(data).name, *extra] if data is not None else [])]),
        "exit_code": proc.returncode, "message": errors[0] if errors else "", "wall_seconds": wall,
        "wrote_output": dst.exists(), "traceback": "Traceback" in proc.stderr,
    }
    if report.exists():
        data_ = json.loads(report.read_text())
        quant = next((p for p in data_.get("passes", []) if p["name"] == "quantize"), {})
        record.update({"total_seconds": data_["total_seconds"], "report_coverage": data_.get("coverage", {}).get("quantize"),
                       "notes": data_.get("notes", []), "quantize_pass_seconds": quant.get("seconds"),
                       "calibration": {k: v for k, v in quant.get("stats", {}).items() if k.startswith("calibration")}})
    return record


def run_quantize_static(src: Path, dst: Path, calibration: dict[str, np.ndarray], workdir: Path) -> dict[str, Any]:
    """ORT's quant_pre_process + quantize_static (QDQ, per-channel, MinMax) in a subprocess."""
    npz = workdir / f"{dst.stem}.calibration.npz"
    np.savez(npz, **calibration)
    cmd = [sys.executable, "-c", ORT_STATIC_SCRIPT, str(src), str(workdir / dst.stem), str(dst), str(npz)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ORT_STATIC ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"exit_code": proc.returncode, "error": tail[:400], "wall_seconds": wall}
    return {"exit_code": 0, "wall_seconds": wall, **json.loads(line[len("ORT_STATIC ") :])}


# --------------------------------------------------------------------------- measures
def measure_fidelity(paths: dict[str, Path], samples: Samples) -> dict[str, Any]:
    reference = run_model(paths["fp32"], samples.inputs)
    result = {}
    for key, path in paths.items():
        try:
            got = reference if key == "fp32" else run_model(path, samples.inputs)
            result[key] = fidelity(reference, got, samples.labels, samples.views)
        except Exception as exc:  # noqa: BLE001 - e.g. ORT cannot run one of the outputs
            result[key] = {"error": error_text(exc)}
    return result


def measure_latency(paths: dict[str, Path], feed: np.ndarray, timing: Timing) -> dict[str, Any]:
    blocks: dict[str, Any] = {}
    for threads in THREADS:
        try:
            sessions = {key: ort_session(path, "all", threads, spinning=False) for key, path in paths.items()}
            name = next(iter(sessions.values())).get_inputs()[0].name
            load = load_average()
            samples = time_interleaved(sessions, {name: feed}, **timing.kwargs())
            blocks[str(threads)] = {"stats": {k: summarize(v) for k, v in samples.items()}, "load_average_before": load}
        except Exception as exc:  # noqa: BLE001
            blocks[str(threads)] = {"error": error_text(exc)}
    return blocks


def bench_model(src: Path, samples: Samples, timing: Timing, workdir: Path, title: str = "", no_spiq: bool = False) -> dict[str, Any]:
    """One FP32 model: onnxopt (calibrated) vs quantize_static, coverage, fidelity, latency, time,
    and the run without calibration data.  The row of the results table.  ``no_spiq`` also
    measures the fidelity of the diagnostic configurations (:data:`DIAGNOSTICS`: ``--no-spiq``
    and each ``--act-ranges`` mode; not timed)."""
    row: dict[str, Any] = {"title": title or src.stem, "source": src.name, "eval_inputs": samples.description,
                           "errors": [], **samples.extra}
    source = onnx.load(str(src))
    row["opset"] = next(o.version for o in source.opset_import if o.domain in ("", "ai.onnx"))
    row["batch"] = source.graph.input[0].type.tensor_type.shape.dim[0].dim_param or "static"
    row["bn_in_source"] = sum(1 for g in subgraphs(source.graph) for n in g.node if n.op_type == "BatchNormalization")
    row["onnxopt"] = run_onnxopt(src, workdir / f"{src.stem}.onnxopt.onnx", samples.onnxopt_data, samples.onnxopt_args)
    row["ort_static"] = run_quantize_static(src, workdir / f"{src.stem}.ort_static.onnx", samples.calibration, workdir)
    row["no_data"] = run_onnxopt(src, workdir / f"{src.stem}.nodata.onnx", None)
    row["no_data"]["names_flag"] = "--calibration-data" in row["no_data"]["message"]
    keys = ["onnxopt", "ort_static"]
    if no_spiq:
        for key, flags in DIAGNOSTICS.items():
            keys.append(key)
            row[key] = run_onnxopt(src, workdir / f"{src.stem}.{key}.onnx", samples.onnxopt_data, [*samples.onnxopt_args, *flags])
    paths = {"fp32": src}
    for key in keys:
        out = workdir / f"{src.stem}.{key}.onnx"
        if row[key]["exit_code"] == 0 and out.exists():
            paths[key] = out
            row[key]["coverage"] = coverage(source, onnx.load(str(out)))
            row[key]["size_bytes"] = out.stat().st_size
        else:
            row["errors"].append(f"{key}: exit {row[key]['exit_code']}: {row[key].get('message') or row[key].get('error', '')}")
            if key == "onnxopt" and row[key]["exit_code"] == GOALS["exit_code"]:  # quantized nothing: no model, 0 layers
                row[key]["coverage"] = {**coverage(source, source), "layers_in_output": None}
    row["fidelity"] = measure_fidelity(paths, samples)
    row["latency"] = measure_latency({k: p for k, p in paths.items() if k in CONFIGS}, samples.inputs[:1], timing)
    return row


def bench_case(case: Case, settings: Settings, workdir: Path) -> dict[str, Any]:
    src = export_case(case, workdir)
    samples = load_samples(case.model, settings, workdir)
    no_spiq = case.opset == 17 and case.dynamic and not case.wrap_if
    return {"case": case.key, "model": case.model, **bench_model(src, samples, settings.timing, workdir, case.title, no_spiq)}


def bench_bn_preserved(settings: Settings, workdir: Path) -> dict[str, Any]:
    """MobileNetV2 exported with BN kept (onnxopt's own export): data-free W8A8 fidelity."""
    from onnxopt.models.pretrained import export_pretrained

    src = Path(export_pretrained("mobilenet_v2"))
    local = workdir / "mobilenet_v2_bn_preserved.onnx"
    shutil.copy(src, local)
    samples = load_samples("mobilenet_v2", settings, workdir)
    run = run_onnxopt(local, workdir / "mobilenet_v2_bn_preserved.onnxopt.onnx", None)
    row: dict[str, Any] = {"case": "mobilenet_v2_bn_preserved", "title": "MobileNetV2, BN-preserving export (onnxopt.export_torch), data-free",
                           "onnxopt": run, "errors": []}
    out = workdir / "mobilenet_v2_bn_preserved.onnxopt.onnx"
    if run["exit_code"] == 0:
        row["onnxopt"]["coverage"] = coverage(onnx.load(str(local)), onnx.load(str(out)))
        row["fidelity"] = measure_fidelity({"fp32": local, "onnxopt": out}, samples)
    else:
        row["errors"].append(f"onnxopt: exit {run['exit_code']}: {run['message']}")
    return row


# --------------------------------------------------------------------------- main
def write_results(data: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "third_party.json", out / "third_party.md"
    json_path.write_text(compact_number_lists(json.dumps(json_safe(data), indent=1, default=str)) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(data), encoding="utf-8")
    return json_path, md_path


def guarded(what: str, fn: Callable[[], dict[str, Any]], fallback: dict[str, Any]) -> dict[str, Any]:
    """``fn()``, or ``fallback`` with the error when it raises: one model's failure loses no other."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        result = {**fallback, "errors": [f"benchmark error: {error_text(exc)}"]}
    log(f"  {what}: {time.perf_counter() - t0:.0f} s")
    return result


def empty_row(case: Case) -> dict[str, Any]:
    blank = {"exit_code": None, "wall_seconds": float("nan"), "message": "", "names_flag": False, "wrote_output": False}
    return {"case": case.key, "model": case.model, "title": case.title, "eval_inputs": "-", "onnxopt": dict(blank),
            "ort_static": {"exit_code": None}, "no_data": dict(blank)}


def run(cases: Sequence[Case], settings: Settings, command: str, bn_preserved: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    env, load_start = environment(), load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_third_party_") as tmp:
        for i, case in enumerate(cases, 1):
            log(f"[{i}/{len(cases)}] {case.title}")
            workdir = Path(tmp) / case.key
            workdir.mkdir()
            rows.append(guarded(case.key, lambda: bench_case(case, settings, workdir), empty_row(case)))
        bn_row = None
        if bn_preserved:
            log("MobileNetV2 BN-preserving export, data-free")
            workdir = Path(tmp) / "bn_preserved"
            workdir.mkdir()
            bn_row = guarded("bn_preserved", lambda: bench_bn_preserved(settings, workdir),
                             {"case": "mobilenet_v2_bn_preserved", "title": "MobileNetV2, BN-preserving export", "onnxopt": {}})
    return {
        "benchmark": "third_party", "command": command, "settings": settings_record(settings), "environment": env,
        "load_average_start": load_start, "cases": [asdict(c) | {"key": c.key} for c in cases], "goals": evaluate_goals(rows, bn_row),
        "rows": rows, "bn_preserved": bn_row, "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench third-party", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="fewer evaluation inputs and timed runs")
    parser.add_argument("--only", help=f"comma-separated models ({', '.join(TITLES)}); default: all")
    args = parser.parse_args(argv)
    models = chosen_models(parser, args.only, list(TITLES))
    command = command_line("python -m bench third-party", argv)
    cases = [c for c in CASES if c.model in models]
    data = run(cases, Settings.for_mode(args.quick), command, bn_preserved="mobilenet_v2" in models)
    json_path, md_path = write_results(data, args.out)
    log(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
