"""Weight-only MatMulNBits benchmark: onnxopt's ``weight-only`` pass against ONNX Runtime's
``MatMulNBitsQuantizer`` (RTN, its default algorithm, and HQQ), same bits and block size.

    python -m bench.weight_only                       # 8-layer synthetic decoder + MiniLM → bench/results/weight_only.md
    python -m bench.weight_only --quick               # 2 layers, shorter timing
    python -m bench.weight_only --bits 4 --block-size 128

Models:

* **synthetic decoder stack**: ``layers`` × [LayerNorm → MatMul(D, D) → residual Add →
  LayerNorm → MatMul(D, F) → Gelu → MatMul(F, D) → residual Add], D = 2048, F = 8192,
  weights Student-t(5)/√K (heavy-tailed, like trained LLM weights), saved with external
  data.  Fidelity: 16 random tokens [1, 16, D] through the stack, relative L2 output error to
  FP32 and the mean cosine per token.  Latency: one token [1, 1, D] (batch-1 decoding: every
  weight read once per token).
* **all-MiniLM-L6-v2** real weights (``onnxopt.models.pretrained.export_minilm``), after
  onnxopt's lossless default (its Transpose(W) become initializers; every quantizer starts
  from that file): sentence-embedding cosine to FP32 over ``bench.quantize.SENTENCES``
  (mean and min); latency of one sentence (batch 1, the export's sequence length).

Configurations (all MatMulNBits, accuracy_level 0 = float products, ORT's default):
``ours_rtn`` (``scale_search=False``), ``ours_search`` (the pass's default), ``ort_rtn``
(``MatMulNBitsQuantizer(bits, block_size, is_symmetric=False)``: its DEFAULT algorithm, round
to nearest with uint8 zero points), ``ort_hqq`` (``HQQWeightOnlyQuantConfig``: float zero
points).  Measured: fidelity, file size (model + data), quantization wall time, latency at 1
and 2 intra-op threads (every configuration in one process, timed round-robin with
:func:`bench.common.time_interleaved`, spinning off; median and IQR).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxopt
from bench.common import Timing, config_rows, environment, json_safe, ort_session, summarize, table, time_interleaved

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "fp32": "FP32",
    "ours_rtn": "onnxopt weight-only, round to nearest",
    "ours_search": "onnxopt weight-only, clipping search (default)",
    "ort_rtn": "ORT MatMulNBitsQuantizer RTN (default algorithm)",
    "ort_hqq": "ORT MatMulNBitsQuantizer HQQ",
}


NOTES = [
    "* All four quantized configurations emit the same op (MatMulNBits, uint8 zero points except HQQ) with the same bits and "
    "block size; ours_rtn computes the same round to nearest as ORT's RTN (equal fidelity to all printed digits), so the latency spread between "
    "ours_rtn / ours_search / ort_rtn is the noise of this shared 2-core machine (load above), not a kernel difference.",
    "* ORT's HQQ stores float zero points: a better weight fit (hence its lower output error on the synthetic stack), but ONNX "
    "Runtime's CPU MatMulNBits then leaves the MLAS fast path — decoding is many times slower than with uint8 zero points (tables), and "
    "the file is larger. onnxopt keeps integer zero points on purpose; its search closes part of the RTN→HQQ gap there "
    "(uint8 zero points pin 0 to a level, which limits how close a least-squares fit can get).",
    "* On MiniLM the search's data-free LayerNorm weighting (E[x_k²] ≈ γ_k² + β_k² per input feature) decides: the output-error "
    "objective beats HQQ's weight-only fit. The synthetic stack's LayerNorm γ are all near 1 (uniform 0.8–1.2), so the weighting "
    "barely changes anything there; trained decoders have far more uneven norm weights.",
    "* MiniLM latency is one 128-token sentence (compute-bound, not decoding); the synthetic stack's one-token latency is the "
    "memory-bound decoding case.",
]


def log(message: str) -> None:
    print(f"[weight_only] {message}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# --------------------------------------------------------------------------- models
def synthetic_decoder(layers: int, d: int = 2048, ff: int = 8192, seed: int = 0) -> onnx.ModelProto:
    """The decoder-like stack of the module docstring (input x [1, T, D], dynamic T)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    h = "x"
    for i in range(layers):
        for name, (k, n) in (("attn", (d, d)), ("up", (d, ff)), ("down", (ff, d))):
            w = (rng.standard_t(5, size=(k, n)).astype(np.float32) / np.float32(np.sqrt(k)))
            inits.append(numpy_helper.from_array(w, f"layers.{i}.{name}.weight"))
        for j in ("a", "b"):
            inits.append(numpy_helper.from_array(rng.uniform(0.8, 1.2, d).astype(np.float32), f"ln{i}{j}.g"))
            inits.append(numpy_helper.from_array((rng.standard_normal(d) * 0.05).astype(np.float32), f"ln{i}{j}.b"))
        nodes += [
            helper.make_node("LayerNormalization", [h, f"ln{i}a.g", f"ln{i}a.b"], [f"n{i}a"], name=f"ln{i}a", axis=-1),
            helper.make_node("MatMul", [f"n{i}a", f"layers.{i}.attn.weight"], [f"att{i}"], name=f"layers.{i}.attn"),
            helper.make_node("Add", [h, f"att{i}"], [f"r{i}"], name=f"res{i}a"),
            helper.make_node("LayerNormalization", [f"r{i}", f"ln{i}b.g", f"ln{i}b.b"], [f"n{i}b"], name=f"ln{i}b", axis=-1),
            helper.make_node("MatMul", [f"n{i}b", f"layers.{i}.up.weight"], [f"up{i}"], name=f"layers.{i}.up"),
            helper.make_node("Gelu", [f"up{i}"], [f"g{i}"], name=f"gelu{i}"),
            helper.make_node("MatMul", [f"g{i}", f"layers.{i}.down.weight"], [f"down{i}"], name=f"layers.{i}.down"),
            helper.make_node("Add", [f"r{i}", f"down{i}"], [f"h{i + 1}"], name=f"res{i}b"),
        ]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", 1, [1, "T", d])],
                              [helper.make_tensor_value_info("y", 1, [1, "T", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    return path


def file_bytes(path: Path) -> int:
    """The model file and every external data file it references."""
    model = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


# --------------------------------------------------------------------------- quantizers
def build_ours(src: Path, dst: Path, bits: int, block_size: int, search: bool) -> dict[str, Any]:
    (model, report), seconds = timed(lambda: onnxopt.optimize(src, preset="weight-only", weight_bits=bits, block_size=block_size, scale_search=search,
                                                           accuracy_level=0))  # the comparison is at ORT's default level
    save_external(model, dst)
    stats = next(p for p in report.passes if p.name == "weight-only").stats
    return {"quant_seconds": seconds, "layers_quantized": stats["layers_quantized"],
            "weight_error_rtn": stats.get("rtn_relative_error_mean"), "weight_error": stats.get("relative_error_mean")}


def build_ort(src: Path, dst: Path, bits: int, block_size: int, algorithm: str) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    def run() -> onnx.ModelProto:
        model = onnx.load(str(src))
        if algorithm == "hqq":
            quantizer = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
        else:
            quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False)
        quantizer.process()
        return quantizer.model.model

    with contextlib.redirect_stdout(None):
        model, seconds = timed(run)
    save_external(model, dst)
    return {"quant_seconds": seconds, "layers_quantized": sum(n.op_type == "MatMulNBits" for n in model.graph.node)}


def build_all(src: Path, work: Path, bits: int, block_size: int, only: set[str] | None = None) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    paths: dict[str, Path] = {"fp32": src}
    records: dict[str, dict[str, Any]] = {"fp32": {}}
    builders = {
        "ours_rtn": lambda dst: build_ours(src, dst, bits, block_size, False),
        "ours_search": lambda dst: build_ours(src, dst, bits, block_size, True),
        "ort_rtn": lambda dst: build_ort(src, dst, bits, block_size, "rtn"),
        "ort_hqq": lambda dst: build_ort(src, dst, bits, block_size, "hqq"),
    }
    for key, build in builders.items():
        if only and key not in only:
            continue
        dst = work / f"{key}.onnx"
        try:
            records[key] = build(dst)
            paths[key] = dst
            log(f"  {key}: {records[key]}")
        except Exception as exc:  # noqa: BLE001 - a baseline that does not run here is reported, not fatal
            records[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            log(f"  {key}: ERROR {records[key]['error']}")
    for key, path in paths.items():
        records[key]["size_bytes"] = file_bytes(path)
    return paths, records


def measure_latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], timing: Timing, records: dict[str, dict[str, Any]]) -> None:
    for threads in (1, 2):
        sessions = {key: ort_session(path, "all", threads, spinning=False) for key, path in paths.items()}
        samples = time_interleaved(sessions, feeds, **timing.kwargs())
        for key, values in samples.items():
            records[key][f"latency_{threads}thread"] = summarize(values)
        del sessions


# --------------------------------------------------------------------------- benches
def bench_synthetic(layers: int, bits: int, block_size: int, timing: Timing, only: set[str] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_nbits_") as tmp:
        work = Path(tmp)
        model, seconds = timed(lambda: synthetic_decoder(layers))
        src = save_external(model, work / "fp32.onnx")
        del model
        log(f"synthetic decoder: {layers} layers built in {seconds:.1f} s, {file_bytes(src) / 1e6:.0f} MB")
        paths, records = build_all(src, work, bits, block_size, only)
        rng = np.random.default_rng(5)
        tokens = {"x": rng.standard_normal((1, 16, 2048)).astype(np.float32)}
        outputs = {key: ort_session(path, "all").run(None, tokens)[0][0] for key, path in paths.items()}
        reference = outputs["fp32"]
        for key, out in outputs.items():
            cos = (out * reference).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(reference, axis=-1))
            records[key]["relative_error"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            records[key]["cosine_mean"] = float(cos.mean())
        measure_latency(paths, {"x": tokens["x"][:, :1]}, timing, records)
    return {"layers": layers, "d": 2048, "ff": 8192, "configs": records}


def minilm_inputs() -> tuple[Path, dict[str, np.ndarray], int]:
    """MiniLM's raw export, the tokenized benchmark sentences and their sequence length."""
    from bench.quantize import SENTENCES
    from onnxopt.models.pretrained import export_minilm, minilm_embedder, minilm_tokenize

    raw = export_minilm()
    tokenizer, _ = minilm_embedder()
    seq_len = next(d.dim_value for d in onnx.load(str(raw), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:])
    return raw, minilm_tokenize(tokenizer, SENTENCES, seq_len), seq_len


def record_embedding_cosines(paths: dict[str, Path], feeds: dict[str, np.ndarray], records: dict[str, dict[str, Any]]) -> None:
    """Each configuration's sentence embeddings (one sentence per run) against ``fp32``'s:
    mean and min cosine, into ``records``."""
    count = len(next(iter(feeds.values())))
    outputs = {}
    for key, path in paths.items():
        sess = ort_session(path, "all")
        outputs[key] = np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(count)])
    reference = outputs["fp32"]
    for key, out in outputs.items():
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        records[key].update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))


def bench_minilm(bits: int, block_size: int, timing: Timing, only: set[str] | None = None) -> dict[str, Any]:
    raw, feeds, seq_len = minilm_inputs()
    with tempfile.TemporaryDirectory(prefix="bench_nbits_minilm_") as tmp:
        work = Path(tmp)
        folded, _ = onnxopt.optimize(raw)
        src = save_external(folded, work / "fp32.onnx")
        paths, records = build_all(src, work, bits, block_size, only)
        record_embedding_cosines(paths, feeds, records)
        measure_latency(paths, {k: v[:1] for k, v in feeds.items()}, timing, records)
    return {"sentences": len(next(iter(feeds.values()))), "seq_len": seq_len, "configs": records}


# --------------------------------------------------------------------------- report
def fmt_ms(record: dict[str, Any], threads: int) -> str:
    lat = record.get(f"latency_{threads}thread")
    return f"{lat['median_ms']:.2f} ({lat['iqr_ms']:.2f})" if lat else "-"


def ratio(records: dict[str, dict[str, Any]], key: str, base: str, threads: int) -> str:
    a, b = records.get(key, {}).get(f"latency_{threads}thread"), records.get(base, {}).get(f"latency_{threads}thread")
    return f"{a['median_ms'] / b['median_ms']:.3f}" if a and b else "-"


def section(title: str, result: dict[str, Any], fidelity: Callable[[dict[str, Any]], str], fidelity_header: str) -> list[str]:
    records = result["configs"]

    def cells(key: str, rec: Mapping[str, Any]) -> list[str]:
        quant = f"{rec['quant_seconds']:.1f}" if "quant_seconds" in rec else "-"
        return [fidelity(rec), f"{rec['size_bytes'] / 1e6:.1f}", quant, fmt_ms(rec, 1), fmt_ms(rec, 2),
                f"{ratio(records, key, 'ort_rtn', 1)} / {ratio(records, key, 'ort_rtn', 2)}"]

    rows = config_rows(CONFIGS, records, 7, cells)
    header = ["configuration", fidelity_header, "size MB", "quantization s", "1 thread ms: median (IQR)", "2 threads ms", "latency / ORT RTN (1t / 2t)"]
    return [f"## {title}", "", *table(header, rows), ""]


def goals(result: dict[str, Any], better: Callable[[dict[str, Any], dict[str, Any]], bool], name: str) -> list[str]:
    records = result["configs"]
    ours = records.get("ours_search", {})
    lines = []
    for base in ("ort_rtn", "ort_hqq"):
        other = records.get(base, {})
        if "error" in other or "error" in ours or not other:
            lines.append(f"* {name}: fidelity vs {base}: not measured ({other.get('error', 'missing')})")
            continue
        lines.append(f"* {name}: fidelity of ours_search ≥ {base}: **{'met' if better(ours, other) else 'NOT met'}**")
        for threads in (1, 2):
            a, b = ours.get(f"latency_{threads}thread"), other.get(f"latency_{threads}thread")
            if a and b:
                r = a["median_ms"] / b["median_ms"]
                lines.append(f"* {name}: latency ours_search / {base} at {threads} thread(s) = {r:.3f} (goal ≤ 1.05): **{'met' if r <= 1.05 else 'NOT met'}**")
    return lines


def write_markdown(data: dict[str, Any], path: Path) -> None:
    s = data["settings"]
    lines = [
        "# Weight-only MatMulNBits: onnxopt vs ONNX Runtime's MatMulNBitsQuantizer",
        "",
        f"`{data['command']}` — {s['bits']} bits, block size {s['block_size']}, accuracy_level 0 everywhere; ORT {data['environment']['versions']['onnxruntime']}, "
        f"{data['environment']['cpu_model']}, {data['environment']['cpus_usable']} usable cores shared with other jobs (load {data.get('load')}).",
        "Latency: every configuration of a model in one process, timed round-robin, spinning off; ratio = median / ORT RTN's median.",
        "",
    ]
    if "synthetic" in data:
        syn = data["synthetic"]
        lines += section(
            f"Synthetic decoder stack: {syn['layers']} layers, D {syn['d']}, FF {syn['ff']}, one token (batch 1)", syn,
            lambda r: f"{r['relative_error']:.4f} / {r['cosine_mean']:.5f}", "relative output error / mean cosine (16 tokens)",
        )
    if "minilm" in data:
        mini = data["minilm"]
        lines += section(
            f"all-MiniLM-L6-v2 (real weights): {mini['sentences']} sentences, seq {mini['seq_len']}, batch 1", mini,
            lambda r: f"{r['cosine_mean']:.5f} ({r['cosine_min']:.5f})", "embedding cosine to FP32: mean (min)",
        )
    lines += ["## Goals (issue 17)", ""]
    for model in ("synthetic", "minilm"):
        records = data.get(model, {}).get("configs", {})
        if "latency_1thread" in records.get("ours_rtn", {}) and "latency_1thread" in records.get("ort_rtn", {}):
            lines.append(
                f"* {model}: noise check — ours_rtn and ort_rtn hold the same codes, scales and zero points (same fidelity, same op and "
                f"sizes), so their latency ratio ({ratio(records, 'ours_rtn', 'ort_rtn', 1)} / {ratio(records, 'ours_rtn', 'ort_rtn', 2)} at 1 / 2 threads) "
                "is measurement noise on this shared machine"
            )
    if "synthetic" in data:
        lines += goals(data["synthetic"], lambda a, b: a["relative_error"] <= b["relative_error"], "synthetic")
    if "minilm" in data:
        lines += goals(data["minilm"], lambda a, b: a["cosine_mean"] >= b["cosine_mean"], "MiniLM")
    lines += ["", "Weight reconstruction error (mean relative ‖W − Ŵ‖/‖W‖ over layers, from the pass's report):", ""]
    for model in ("synthetic", "minilm"):
        rec = data.get(model, {}).get("configs", {}).get("ours_search", {})
        if rec.get("weight_error") is not None:
            lines.append(f"* {model}: round to nearest {rec['weight_error_rtn']:.5f} → search {rec['weight_error']:.5f}")
    lines += ["", "## Notes", "", *NOTES, *data.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 synthetic layers, short timing")
    parser.add_argument("--layers", type=int, default=None, help="synthetic decoder layers (default 8; 2 with --quick)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma-separated: synthetic, minilm")
    parser.add_argument("--configs", default="", help=f"comma-separated subset of {', '.join(k for k in CONFIGS if k != 'fp32')} (FP32 always runs)")
    parser.add_argument("--rewrite", action="store_true", help="only re-render the markdown from the existing JSON in --out")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    layers = args.layers or (2 if args.quick else 8)
    timing = Timing(warmup=2, min_runs=10, max_runs=200, target_seconds=2.0) if args.quick else Timing(warmup=3, min_runs=30, max_runs=2000, target_seconds=8.0)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    only = {s.strip() for s in args.configs.split(",") if s.strip()} or None
    out = Path(args.out)
    suffix = "" if (args.bits, args.block_size) == (4, 32) else f"_w{args.bits}_b{args.block_size}"
    if args.rewrite:
        write_markdown(json.loads((out / f"weight_only{suffix}.json").read_text()), out / f"weight_only{suffix}.md")
        return 0
    command = "python -m bench.weight_only " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    data: dict[str, Any] = {"command": command.strip(), "environment": environment(),
                            "settings": {"bits": args.bits, "block_size": args.block_size, "layers": layers, **timing.kwargs()}}
    if "synthetic" not in skip:
        data["synthetic"] = bench_synthetic(layers, args.bits, args.block_size, timing, only)
    if "minilm" not in skip:
        data["minilm"] = bench_minilm(args.bits, args.block_size, timing, only)
    import os

    data["load"] = [round(x, 2) for x in os.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"weight_only{suffix}.json").write_text(json.dumps(json_safe(data), indent=1))
    write_markdown(data, out / f"weight_only{suffix}.md")
    log(f"wrote {out}/weight_only{suffix}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
