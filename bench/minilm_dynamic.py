"""all-MiniLM-L6-v2: onnxopt's quantize (static from LayerNorm statistics + dynamic fallback)
against ONNX Runtime's ``quantize_dynamic`` and FP32.

Run: ``python -m bench.minilm_dynamic`` (writes ``bench/results/minilm_dynamic.{md,json}``).

* Model: ``export_minilm(seq_len=32)`` (real weights, dynamic batch), inputs: the first 20
  real sentences of :data:`bench.fidelity.SENTENCES`, tokenized and padded to 32 tokens.
* Configurations: ``fp32`` (``onnxopt.optimize`` lossless default: constant-folded),
  ``ort_dynamic`` (``quantize_dynamic`` int8 weights, ORT's defaults, on that folded model:
  on the raw export the weights are Transpose outputs and it quantizes nothing),
  ``onnxopt_auto`` (``preset="quantize"`` W8A8, ``dynamic_fallback="auto"``, the default:
  static QDQ where LayerNorm statistics give the range, dynamic elsewhere) and
  ``onnxopt_all`` (``dynamic_fallback="all"``: every linear dynamic, per-channel weights).
* Fidelity: cosine of each sentence embedding to FP32, run one sentence at a time (batch 1)
  and as one batch of 20 (dynamic quantization takes one range per batch).
* Latency: ORT_ENABLE_ALL, 1 intra-op thread, spinning off, batch 1 (the first sentence) and
  batch 20, all configurations timed round-robin in one process
  (:func:`bench.common.time_interleaved`); median and IQR in ms.
* The graph ORT runs: integer kernels and float MatMuls counted in the ORT-optimized graph.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import onnxopt
from bench.common import load_average, op_counts, ort_optimized_model, ort_session, summarize, time_interleaved
from bench.fidelity import SENTENCES, build_ort_dynamic

RESULTS = Path(__file__).parent / "results"
SEQ_LEN = 32
BATCH = 20
CONFIGS = {
    "fp32": "FP32 (constant-folded)",
    "ort_dynamic": "ORT quantize_dynamic (int8 weights per tensor)",
    "onnxopt_auto": "onnxopt W8A8: static from LayerNorm + dynamic fallback (default)",
    "onnxopt_all": "onnxopt W8A8 dynamic_fallback='all' (per-channel weights)",
}
INTEGER = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm", "MatMulInteger")


def build(tmp: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    from models.pretrained import export_minilm

    src = export_minilm(seq_len=SEQ_LEN)
    paths = {"fp32": tmp / "fp32.onnx"}
    folded, _ = onnxopt.optimize(src)
    onnxopt.save_model(folded, paths["fp32"])
    dynamic = build_ort_dynamic(paths["fp32"], tmp / "ort_dynamic.onnx", "QInt8")
    if not dynamic.ok:
        raise RuntimeError(f"quantize_dynamic failed: {dynamic.detail}")
    paths["ort_dynamic"] = dynamic.file
    reports = {}
    for key, mode in (("onnxopt_auto", "auto"), ("onnxopt_all", "all")):
        model, report = onnxopt.optimize(src, preset="quantize", weight_bits=8, act_bits=8, dynamic_fallback=mode)
        paths[key] = tmp / f"{key}.onnx"
        onnxopt.save_model(model, paths[key])
        (stats,) = [p.stats for p in report.passes if p.name == "quantize"]
        lines = [line for line in report.format_table().splitlines() if line.startswith(("quantize:", "warning: quantize:"))]
        reports[key] = {"coverage_lines": lines, "fused_by_ort": stats.get("fused_by_ort"), "not_fused": stats.get("not_fused"),
                        "layers_quantized": stats["layers_quantized"], "layers_dynamic": stats["layers_dynamic"]}
    return paths, reports


def embeddings(path: Path, feeds: dict[str, np.ndarray], batched: bool) -> np.ndarray:
    sess = ort_session(path, "all", 1)
    if batched:
        return sess.run(None, feeds)[0]
    rows = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(rows)])


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def ort_graph(path: Path, tmp: Path) -> dict[str, int]:
    counts = op_counts(ort_optimized_model(path, "all", tmp / f"{path.stem}.ort.onnx"))
    short = {op.rsplit(":", 1)[-1]: n for op, n in counts.items()}
    return {
        "integer_matmuls": sum(short.get(op, 0) for op in INTEGER),
        "float_matmuls": sum(short.get(op, 0) for op in ("MatMul", "FusedMatMul", "Gemm")),
        **{op: short[op] for op in (*INTEGER, "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") if op in short},
    }


def measure(target_seconds: float) -> dict[str, Any]:
    from models.pretrained import minilm_embedder, minilm_tokenize

    tokenizer, _ = minilm_embedder()
    feeds = minilm_tokenize(tokenizer, SENTENCES[:BATCH], SEQ_LEN)
    result: dict[str, Any] = {"sentences": BATCH, "seq_len": SEQ_LEN, "threads": 1, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="minilm_dynamic_") as folder:
        tmp = Path(folder)
        paths, result["onnxopt"] = build(tmp)
        reference = {b: embeddings(paths["fp32"], feeds, b) for b in (False, True)}
        for key, path in paths.items():
            result["configs"][key] = {
                "size_bytes": path.stat().st_size,
                "cosine_batch1": cosines(embeddings(path, feeds, False), reference[False]),
                "cosine_batch20": cosines(embeddings(path, feeds, True), reference[True]),
                "ort_graph": ort_graph(path, tmp),
            }
        sessions = {key: ort_session(path, "all", 1, spinning=False) for key, path in paths.items()}
        result["load_average_before"] = load_average()
        for batch in (1, BATCH):
            sample = {k: v[:batch] for k, v in feeds.items()}
            samples = time_interleaved(sessions, sample, warmup=5, min_runs=20, max_runs=2000, target_seconds=target_seconds)
            for key, values in samples.items():
                result["configs"][key][f"latency_batch{batch}"] = summarize(values)
        result["load_average_after"] = load_average()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# all-MiniLM-L6-v2: onnxopt quantize (static + dynamic linears) vs ORT quantize_dynamic",
        "",
        f"{result['sentences']} real sentences (bench/quantize.py SENTENCES), padded to {result['seq_len']} tokens; "
        "ORT_ENABLE_ALL, 1 thread, configurations timed round-robin (median ms, IQR in brackets). "
        "Command: `python -m bench.minilm_dynamic`.",
        "",
        "| configuration | cosine to FP32, batch 1: mean (min) | batch 20: mean (min) | batch 1 ms | batch 20 ms | ORT graph: integer / float MatMuls | size MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, title in CONFIGS.items():
        rec = result["configs"][key]
        lat = [rec[f"latency_batch{b}"] for b in (1, BATCH)]
        lines.append(
            f"| {title} | {rec['cosine_batch1']['mean']:.4f} ({rec['cosine_batch1']['min']:.4f}) | "
            f"{rec['cosine_batch20']['mean']:.4f} ({rec['cosine_batch20']['min']:.4f}) | "
            + " | ".join(f"{s['median_ms']:.2f} [{s['iqr_ms']:.2f}]" for s in lat)
            + f" | {rec['ort_graph']['integer_matmuls']} / {rec['ort_graph']['float_matmuls']} | {rec['size_bytes'] / 1e6:.1f} |"
        )
    lines += ["", "onnxopt's report lines:", ""]
    for key in ("onnxopt_auto", "onnxopt_all"):
        lines += [f"* `{key}`: " + " / ".join(f"`{line}`" for line in result["onnxopt"][key]["coverage_lines"])]
    lines += [
        "",
        "Float MatMuls left in every configuration are the attention products (Q·Kᵀ, softmax·V): no constant weight.",
        f"Load average (1, 5, 15 min) before / after the timing: {result.get('load_average_before')} / "
        f"{result.get('load_average_after')} (a shared machine: medians within the IQRs are ties).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="target timing seconds per batch size")
    args = parser.parse_args()
    result = measure(args.seconds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "minilm_dynamic.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "minilm_dynamic.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
