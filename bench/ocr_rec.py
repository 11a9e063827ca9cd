"""PP-OCRv4 text recogniser: onnxopt's calibrated W8A8 quantization against ONNX Runtime's
``quantize_static``, with the same calibration lines.

Model: PaddleOCR's ``ch_PP-OCRv4_rec_infer.onnx`` (SVTR-LCNet, Paddle2ONNX opset 12, BN
folded by the exporter, so no statistics: the data-free path has nothing to work from),
from the ``rapidocr-onnxruntime`` wheel (:mod:`onnxopt.models.ocr`; ``python -m
onnxopt.models install-assets``).  Inputs: ``--lines`` upright text lines rendered with
Pillow's default font (seed 0) at 48×320; calibration: 16 other lines (seed 1000), never
evaluated.

Configurations:

* ``fp32``: the model as shipped;
* ``onnxopt_minmax`` / ``onnxopt_percentile``: ``onnxopt.optimize(path, preset="quantize",
  calibration_data=<the 16 lines as .npz>, act_ranges=...)`` (W8A8, per-channel weights);
* ``ort_static_minmax``: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8
  weights, uint8 activations, MinMax calibration: :func:`bench.fidelity.build_ort_static`)
  after ORT's ``quant_pre_process`` with ``skip_symbolic_shape=True`` (its symbolic shape
  inference fails on this graph; without the pre-processing ``quantize_static`` leaves every
  weight in float: Paddle2ONNX keeps them in Constant nodes, and ORT quantizes initializers
  only); its output of the opset-12 file does not load in ORT (DequantizeLinear's ``axis``
  needs opset 13), which is recorded, and the file is then upgraded to opset 13 with
  ``onnx.version_converter`` (what onnxopt does itself) and quantized again.

Metrics against FP32 on the evaluation lines: mean KL(FP32 ‖ config) per time step of the
CTC output (over every step of every line), exact match of the greedy CTC decode (also with
spaces ignored: leading spaces come and go at the first quantization step), and the
share of the constant-weight Conv/MatMul layers quantized; FP32's own decode is compared
with the drawn text (spaces ignored) as a sanity figure.  No latency (a shared machine).

Outputs: ``<out>/ocr_rec.json`` and ``<out>/ocr_rec.md``.

    python -m bench.ocr_rec [--out bench/results] [--lines 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import onnxopt
from bench.common import (
    command_line,
    environment,
    ort_session,
    table,
    write_json_and_markdown,
)
from bench.fidelity import EvalData, build_ort_static, error_text, log, quiet_quantizer
from bench.third_party_cases import coverage

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CALIBRATION_LINES = 16
CALIBRATION_SEED = 1000
ONNXOPT_RANGES = ("minmax", "percentile")


def lines(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    from onnxopt.models.ocr import rec_preprocess, upright_lines

    images, texts = upright_lines(count, seed)
    return np.stack([rec_preprocess(image) for image in images]), texts


def probabilities(path: Path, inputs: np.ndarray, chunk: int = 10) -> np.ndarray:
    sess = ort_session(path, "all")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inputs[i : i + chunk]})[0] for i in range(0, len(inputs), chunk)]).astype(np.float64)


def compare(reference: np.ndarray, candidate: np.ndarray, characters: list[str]) -> dict[str, Any]:
    from onnxopt.models.ocr import ctc_greedy_decode

    eps = 1e-12
    kl = (reference * (np.log(reference + eps) - np.log(candidate + eps))).sum(axis=-1)
    expected, got = ctc_greedy_decode(reference, characters), ctc_greedy_decode(candidate, characters)
    same = [a == b for a, b in zip(expected, got)]
    spaceless = [a.replace(" ", "") == b.replace(" ", "") for a, b in zip(expected, got)]
    return {"kl_per_step_mean": float(kl.mean()), "kl_per_step_max": float(kl.max()), "decode_exact_match": float(np.mean(same)),
            "decode_match_ignoring_spaces": float(np.mean(spaceless)),
            "examples": [{"fp32": a, "config": b} for a, b, ok in zip(expected, got, same) if not ok][:5]}


def ort_pre_process(src: Path, dst: Path) -> Path:
    """ORT's recommended ``quant_pre_process`` (it also turns the Constant-node weights into
    initializers); its symbolic shape inference fails on this graph ("Incomplete symbolic
    shape inference"), so that step is skipped, the ORT graph optimization and ONNX shape
    inference still run."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_quantizer():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def build_ort(src: Path, work: Path, data: EvalData) -> dict[str, Any]:
    """quantize_static after pre-processing; an output that does not load in ORT (opset < 13:
    DequantizeLinear's ``axis`` needs 13) is recorded, and the pre-processed file is upgraded
    to opset 13 with ``onnx.version_converter`` (what onnxopt does itself) and quantized again."""
    from onnx import version_converter

    prepared = ort_pre_process(src, work / "ort_pre_processed.onnx")
    dst = work / "ort_static_minmax.onnx"
    built = build_ort_static(prepared, dst, "MinMax", data)
    record: dict[str, Any] = {"status": built.status, "detail": built.detail, **built.extra}
    if built.ok:
        try:
            ort_session(dst)
            return record
        except Exception as exc:  # noqa: BLE001 - the failed try is recorded
            record["failed_try"] = error_text(exc)
    upgraded = work / "ort_pre_processed_op13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(prepared)), 13), str(upgraded))
    built = build_ort_static(upgraded, dst, "MinMax", data)
    return {**record, "status": built.status, "detail": built.detail, **built.extra, "upgraded_to_opset": 13}


def build_onnxopt(src: Path, dst: Path, calibration: Path, act_ranges: str) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        model, report = onnxopt.optimize(src, preset="quantize", calibration_data=str(calibration), act_ranges=act_ranges)
        onnxopt.save_model(model, dst)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        return {"status": "error", "detail": error_text(exc)}
    stats = next(p for p in report.passes if p.name == "quantize").stats
    return {"status": "ok", "seconds": time.perf_counter() - start, "call": f"onnxopt.optimize(path, preset='quantize', calibration_data=..., act_ranges={act_ranges!r})",
            "pass_coverage": stats.get("coverage")}


def run(count: int) -> dict[str, Any]:
    from onnxopt.models.ocr import (
        ctc_greedy_decode,
        ppocr_rec_characters,
        ppocr_rec_path,
    )

    src = ppocr_rec_path()
    characters = ppocr_rec_characters()
    inputs, texts = lines(count, 0)
    calibration, _ = lines(CALIBRATION_LINES, CALIBRATION_SEED)
    reference = probabilities(src, inputs)
    decoded = ctc_greedy_decode(reference, characters)
    sanity = float(np.mean([a.replace(" ", "") == b.replace(" ", "") for a, b in zip(decoded, texts)]))
    configs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ocr_rec_") as tmp:
        work = Path(tmp)
        npz = work / "calibration.npz"
        np.savez(npz, x=calibration)
        built = {f"onnxopt_{mode}": (work / f"onnxopt_{mode}.onnx", build_onnxopt(src, work / f"onnxopt_{mode}.onnx", npz, mode)) for mode in ONNXOPT_RANGES}
        data = EvalData(inputs, np.zeros(len(inputs), np.int64), ["text"] * len(inputs), calibration, [f"line {i}" for i in range(len(calibration))])
        built["ort_static_minmax"] = (work / "ort_static_minmax.onnx", build_ort(src, work, data))
        source = onnx.load(str(src))
        for key, (path, record) in built.items():
            log(f"  {key}: {record['status']}")
            if record["status"] == "ok":
                record.update(compare(reference, probabilities(path, inputs), characters), coverage=coverage(source, onnx.load(str(path))))
            configs[key] = record
    return {"lines": count, "calibration_lines": CALIBRATION_LINES, "fp32_matches_drawn_text": sanity, "configs": configs}


def render_markdown(data: dict[str, Any]) -> str:
    env, r = data["environment"], data["result"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines_ = [
        "# PP-OCRv4 recogniser: calibrated W8A8, onnxopt vs ORT quantize_static", "",
        f"Generated by `{data['command']}` on {env['date']} ({data['seconds']:.0f} s). {env['cpu_model']}, "
        f"{env['cpus_usable']} usable CPU(s); {versions}. Source: {env['git_commit'] or '?'}"
        f"{' + uncommitted changes' if env['git_dirty_files'] else ''}. Raw numbers: ocr_rec.json. "
        "What is measured and how: the docstring of bench/ocr_rec.py.", "",
        f"{r['lines']} rendered lines, {r['calibration_lines']} other lines for calibration. FP32's greedy decode equals "
        f"the drawn text (spaces ignored) on {100 * r['fp32_matches_drawn_text']:.0f} % of the lines.", "",
    ]
    rows = []
    for key, c in r["configs"].items():
        if c["status"] != "ok":
            rows.append([key, f"{c['status']}: {c.get('detail', '')[:120]}", "", "", "", ""])
            continue
        cov = c["coverage"]
        rows.append([key, f"{c['kl_per_step_mean']:.4f}", f"{c['kl_per_step_max']:.2f}", f"{100 * c['decode_exact_match']:.1f} %",
                     f"{100 * c['decode_match_ignoring_spaces']:.1f} %", f"{cov['quantized']}/{cov['layers']}"])
    lines_ += table(["configuration", "mean KL per step", "max KL per step", "decode = FP32's", "same, spaces ignored", "layers quantized"], rows)
    reasons = {k: c["pass_coverage"].get("reasons") for k, c in r["configs"].items() if c.get("pass_coverage")}
    if reasons:
        lines_ += ["", "Layers onnxopt left float, by reason: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + "."]
    for key, c in r["configs"].items():
        if c.get("failed_try"):
            lines_ += ["", f"{key}: the first output did not load in ORT ({c['failed_try'][:200]}); the numbers are for the file "
                       f"upgraded to opset {c.get('upgraded_to_opset')} and quantized again."]
    lines_ += ["", "Decodes that differ from FP32 (first few):", ""]
    for key, c in r["configs"].items():
        for e in c.get("examples", [])[:3]:
            lines_.append(f"- {key}: `{e['fp32']}` → `{e['config']}`")
    return "\n".join(lines_) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ocr_rec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--lines", type=int, default=100, help="evaluation lines (default 100)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    env = environment()
    result = run(args.lines)
    command = command_line("python -m bench.ocr_rec", argv)
    data = {"benchmark": "ocr_rec", "command": command, "environment": env, "seconds": time.perf_counter() - start, "result": result}
    written = write_json_and_markdown(args.out, "ocr_rec", data, render_markdown(data))
    log(f"wrote {written} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
