"""DFQ baseline benchmark: cross-layer equalization (the ``equalize`` pass) against and with SPIQ.

Models, images and fidelity metrics are those of :mod:`bench.fidelity` (its functions are
imported): the real pretrained MobileNetV2 and EfficientNet-Lite0 (BatchNormalization kept in
the export), the 20 ImageNet samples in the first ``--views`` deterministic views, top-1
agreement with FP32, mean KL(FP32 || config) of the softmax outputs, cosine of the logits,
all from ONNX Runtime at ORT_ENABLE_ALL; and the PP-OCR text-orientation classifier
(``ppocr_cls``) on 250 rendered text lines per view (2 classes, 0° / 180°: "top-1 correct"
is the orientation accuracy; the metrics use the logits, the Softmax input).

Configurations, at W8A8, W6A8 and W4A8 (weights per output channel, the quantize default;
first and last layer at 8 bits):

* ``pt``: ``preset="quantize", spiq=False`` — data-free per-tensor activations;
* ``spiq_auto``: ``preset="quantize"`` — SPIQ where its error estimate wins (the default);
* ``dfq``: ``preset="dfq"`` — equalize + absorb-high-bias, then per-tensor (``spiq=False``);
* ``dfq_spiq_auto``: ``preset="dfq", spiq="auto"`` — the same, then SPIQ-auto.

Extra, DFQ's own setting (per-tensor *weights*, ``per_channel=False``), at W8A8 only:
``pt_ptw`` and ``dfq_ptw``.  Equalization mostly helps a per-tensor weight quantizer (it
balances the channels' weight ranges), so this is where DFQ should show its gain.

Also: the spread of the data-free per-channel activation ranges (kept BN statistics) after
BN folding, after equalize, and after equalize + absorb-high-bias (see :func:`activation_spread`).

Outputs: ``<out>/equalize.json`` and ``<out>/equalize.md``.

``--only`` updates those models' entries in the existing JSON and keeps the others.

    python -m bench.equalize [--out bench/results] [--views 2] [--only mobilenet_v2,ppocr_cls]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import onnxopt
from bench.common import chosen_models, command_line, environment, merge_previous, table, write_json_and_markdown
from bench.fidelity import ALL_MODELS, bench_each_model, error_text, fidelity, load_data, log, model_path, run_model, with_retry

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
WEIGHT_BITS = (8, 6, 4)
ACT_BITS = 8
#: key -> (title, preset, extra options)
CONFIGS = {
    "pt": ("per-tensor (data-free)", "quantize", {"spiq": False}),
    "spiq_auto": ("SPIQ-auto (default)", "quantize", {}),
    "dfq": ("DFQ (equalize + per-tensor)", "dfq", {}),
    "dfq_spiq_auto": ("DFQ + SPIQ-auto", "dfq", {"spiq": "auto"}),
}
#: DFQ's own setting: per-tensor weights too (W8A8 only)
PER_TENSOR_WEIGHT_CONFIGS = {
    "pt_ptw": ("per-tensor, per-tensor weights", "quantize", {"spiq": False, "per_channel": False}),
    "dfq_ptw": ("DFQ, per-tensor weights", "dfq", {"per_channel": False}),
}


def pass_stats(report: Any, name: str) -> dict[str, Any]:
    entry = next((p for p in report.passes if p.name == name), None)
    if entry is None:
        return {}
    return {k: v for k, v in entry.stats.items() if not isinstance(v, (list, dict))}


def build_and_measure(src: Path, dst: Path, preset: str, options: dict[str, Any], data: Any, reference: Any) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        model, report = onnxopt.optimize(src, preset=preset, **options)
        onnxopt.save_model(model, dst)
    except Exception as exc:  # noqa: BLE001 - recorded verbatim, the benchmark goes on
        traceback.print_exc()
        return {"status": "error", "detail": error_text(exc)}
    seconds = time.perf_counter() - start
    logits = run_model(dst, data.inputs)
    return {
        "status": "ok",
        "call": f"onnxopt.optimize(path, preset={preset!r}, " + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")",
        "optimize_seconds": seconds,
        "fidelity": fidelity(reference, logits, data.labels, data.views),
        "quantize": pass_stats(report, "quantize"),
        "equalize": pass_stats(report, "equalize"),
    }


LOSSLESS = ["eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv"]
SPREAD_PIPELINES = {"BN folded": [], "+ equalize": ["equalize"], "+ equalize + absorb-high-bias": ["equalize", "absorb-high-bias"]}


def activation_spread(src: Path) -> dict[str, Any]:
    """How unequal the channels' data-free activation ranges (β + 9|γ| of the kept BN
    statistics) are, per pipeline: the worst tensor's max/median, and the median tensor's."""
    from onnxopt.passes.bn_fold import read_bn_statistics

    result = {}
    for title, extra in SPREAD_PIPELINES.items():
        model, _ = onnxopt.optimize(src, passes=LOSSLESS + extra)
        spreads = {}
        for tensor, entry in read_bn_statistics(model).items():
            high = np.maximum(np.asarray(entry["mean"]) + 9 * np.asarray(entry["std"]), 1e-12)
            spreads[tensor] = float(high.max() / np.median(high))
        worst = max(spreads, key=spreads.get)
        result[title] = {"worst": spreads[worst], "worst_tensor": worst, "median": float(np.median(list(spreads.values())))}
    return result


def bench_model(name: str, views: int, workdir: Path) -> dict[str, Any]:
    src = with_retry(lambda: model_path(name))
    data = load_data(name, views)
    reference = run_model(src, data.inputs)
    configs: dict[str, dict[str, Any]] = {}
    plan = [(f"{key}_w{bits}a{ACT_BITS}", preset, {**options, "weight_bits": bits, "act_bits": ACT_BITS})
            for bits in WEIGHT_BITS for key, (_, preset, options) in CONFIGS.items()]
    plan += [(f"{key}_w8a{ACT_BITS}", preset, {**options, "weight_bits": 8, "act_bits": ACT_BITS})
             for key, (_, preset, options) in PER_TENSOR_WEIGHT_CONFIGS.items()]
    for key, preset, options in plan:
        configs[key] = build_and_measure(src, workdir / f"{key}.onnx", preset, options, data, reference)
        f = configs[key].get("fidelity", {})
        log(f"  {key}: {configs[key]['status']} agreement {f.get('top1_agreement')} KL {f.get('kl_mean')}")
    return {"name": name, "title": ALL_MODELS[name], "inputs": len(data.inputs), "configs": configs, "spread": activation_spread(src)}


# --------------------------------------------------------------------------- report
def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def row(title: str, bits: int, rec: dict[str, Any]) -> list[str]:
    if rec["status"] != "ok":
        return [title, f"W{bits}A{ACT_BITS}", "error: " + rec.get("detail", "")[:80], "", "", "", "", ""]
    f, q, e = rec["fidelity"], rec["quantize"], rec["equalize"]
    pairs = f"{e['pairs_equalized']} ({e['sweeps']} sweeps)" if e else "—"
    return [title, f"W{bits}A{ACT_BITS}", f"{100 * f['top1_agreement']:.1f}%", fmt(f["kl_mean"]), f"{f['cosine_mean']:.4f}",
            f"{f['accuracy_all'][0]}/{f['accuracy_all'][1]}", f"{100 * q.get('spiq_coverage', 0):.0f}%", pairs]


HEADER = ["configuration", "bits", "top-1 agreement", "mean KL", "mean cosine", "top-1 correct", "SPIQ coverage", "pairs equalized"]


def model_section(result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [f"### {result['title']}", "", f"error: {result['error']}"]
    rows = []
    for bits in WEIGHT_BITS:
        for key, (title, _, _) in CONFIGS.items():
            rows.append(row(title, bits, result["configs"][f"{key}_w{bits}a{ACT_BITS}"]))
    for key, (title, _, _) in PER_TENSOR_WEIGHT_CONFIGS.items():
        rows.append(row(title, 8, result["configs"][f"{key}_w8a{ACT_BITS}"]))
    return [f"### {result['title']} ({result['inputs']} real inputs, fidelity vs FP32)", "", *table(HEADER, rows)]


def kl(result: dict[str, Any], key: str) -> float | None:
    rec = result.get("configs", {}).get(key, {})
    return rec["fidelity"]["kl_mean"] if rec.get("status") == "ok" else None


def summary_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """Which configuration has the lowest mean KL, per model and bit-width."""
    rows = []
    for result in results.values():
        if "configs" not in result:
            continue
        for bits in WEIGHT_BITS:
            values = {CONFIGS[k][0]: kl(result, f"{k}_w{bits}a{ACT_BITS}") for k in CONFIGS}
            known = {k: v for k, v in values.items() if v is not None}
            best = min(known, key=known.get) if known else "—"
            rows.append([result["title"], f"W{bits}A{ACT_BITS}", *(fmt(values[CONFIGS[k][0]]) for k in CONFIGS), best])
        values = {k: kl(result, f"{k}_w8a{ACT_BITS}") for k in PER_TENSOR_WEIGHT_CONFIGS}
        rows.append([result["title"], "W8A8, per-tensor weights", fmt(values["pt_ptw"]), "", fmt(values["dfq_ptw"]), "",
                     "DFQ" if None not in values.values() and values["dfq_ptw"] < values["pt_ptw"] else "per-tensor"])
    header = ["model", "bits", *(CONFIGS[k][0] for k in CONFIGS), "lowest KL"]
    return ["## Mean KL vs FP32 (lower is better)", "", *table(header, rows)]


def spread_section(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = [[r["title"], title, f"{v['worst']:.1f}", v["worst_tensor"], f"{v['median']:.2f}"]
            for r in results.values() if "spread" in r for title, v in r["spread"].items()]
    return ["## Why per-tensor activations suffer after equalization", "",
            "Per-channel activation range spread (max/median over the channels of β + 9|γ|, the data-free range quantize uses) "
            "of every tensor with kept BN statistics.  Equalization balances the *weights*; a channel whose scale s_c is small "
            "gets an activation range 1/s_c wider, and one per-tensor activation scale must cover it.", "",
            *table(["model", "pipeline", "worst tensor spread", "worst tensor", "median tensor spread"], rows)]


def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# DFQ baseline: cross-layer equalization vs SPIQ",
        "",
        f"Generated by `{data['command']}` on {env['date']} ({data['seconds']:.0f} s). {env['cpu_model']}, "
        f"{env['cpus_usable']} usable CPU(s); {versions}. Source: {env['git_commit'] or '?'}"
        f"{' + uncommitted changes' if env['git_dirty_files'] else ''}. Raw numbers: equalize.json. "
        "What is measured and how: the docstring of bench/equalize.py.",
        "",
        *summary_section(data["models"]),
        "",
        *spread_section(data["models"]),
        "",
        "## Results",
        "",
    ]
    for result in data["models"].values():
        lines += [*model_section(result), ""]
    lines += [
        "## Notes",
        "",
        "- Weights are quantized per output channel (the quantize default) except in the two per-tensor-weight rows; "
        "the first and last layers keep 8-bit weights (`first_last_bits`).",
        "- The equalize pass rewrites each ReLU6 on an equalized path into Relu + a per-channel Min (exact); ONNX Runtime "
        "does not fuse that Min into the quantized Conv, so DFQ models run more float elementwise ops (latency not measured here).",
        "- Rounding luck moves the mean KL by up to ~25 % between near-identical weights (bench/results/quantize.md, "
        "noise floor); differences smaller than that are ties.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.equalize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--views", type=int, default=2, help="views of the 20 ImageNet samples (1-4, default 2 = 40 inputs)")
    parser.add_argument("--only", help=f"comma-separated model names (default: {','.join(ALL_MODELS)})")
    args = parser.parse_args(argv)
    names = chosen_models(parser, args.only, list(ALL_MODELS))
    start = time.perf_counter()
    env = environment()
    results = bench_each_model(names, "bench_equalize_", lambda name, workdir: bench_model(name, args.views, workdir))
    command = command_line("python -m bench.equalize", argv)
    results, command = merge_previous(args.out / "equalize.json", "models", results, names, list(ALL_MODELS), command)
    data = {"benchmark": "equalize", "command": command, "environment": env, "views": args.views,
            "seconds": time.perf_counter() - start, "models": results}
    written = write_json_and_markdown(args.out, "equalize", data, render_markdown(data))
    log(f"wrote {written} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
