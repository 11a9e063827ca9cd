"""PowerQuant vs uniform quantization, and accumulator overflow (issue 8).

Part 1 — real pretrained MobileNetV2 and EfficientNet-Lite0 (models/pretrained.py), the real
ImageNet samples of bench/fidelity.py (its ``load_data``/``run_model``/``fidelity``, imported),
data-free:

* uniform: the ``quantize`` preset (SPIQ-auto, bias correction, first/last layer 8-bit);
* PowerQuant: the ``power-quant`` preset, exponent searched (Nelder–Mead), fixed 0.5, and
  per-layer exponents; same bit-widths, same BN-derived activation ranges, same first/last
  layer rule;

at W4A8 and W6A8: weight reconstruction error (eq. 3.14, as the pass reports it), top-1
agreement with FP32, KL, labelled accuracy, file size, ORT latency (interleaved, 1 thread).

Part 2 — accumulator overflow: zoo models quantized W4A4 and W8A8 (uniform), the worst-case
bits per layer and the observed overflow rate for 8/12/16-bit accumulators on sample inputs,
and on the real MobileNetV2 (W8A8, W6A6) the labelled accuracy when the accumulators wrap (ModularConv)
vs saturate (the plain integer model with a Clip on each accumulator — the order-independent
"clamp the final sum" reference).

    python -m bench.power_quant            # writes bench/results/power_quant.{json,md}
    python -m bench.power_quant --quick    # 1 view (20 images), fewer timing runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

import onnxopt
from bench.common import environment, json_safe, load_average, ort_session, summarize, table, time_interleaved
from bench.fidelity import MODELS, fidelity, input_range, load_data, run_model

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    # key: (title, preset, options)
    "fp32": ("FP32 (BN folded)", "default", {}),
    "uniform_w6a8": ("uniform W6A8 (quantize pass)", "quantize", {"weight_bits": 6, "act_bits": 8}),
    "power_w6a8": ("PowerQuant W6A8, a searched", "power-quant", {"weight_bits": 6, "act_bits": 8}),
    "uniform_w4a8": ("uniform W4A8 (quantize pass)", "quantize", {"weight_bits": 4, "act_bits": 8}),
    "power_w4a8": ("PowerQuant W4A8, a searched", "power-quant", {"weight_bits": 4, "act_bits": 8}),
    "power_w4a8_a05": ("PowerQuant W4A8, a = 0.5", "power-quant", {"weight_bits": 4, "act_bits": 8, "power_exponent": 0.5}),
    "power_w4a8_layer": ("PowerQuant W4A8, per-layer a", "power-quant", {"weight_bits": 4, "act_bits": 8, "power_per_layer": True}),
    "power_w4a8_uniform_act": ("PowerQuant W4A8 weights, uniform activations", "power-quant", {"weight_bits": 4, "act_bits": 8, "power_activations": False}),
    "power_w4a8_no_bc": ("PowerQuant W4A8, no bias correction", "power-quant", {"weight_bits": 4, "act_bits": 8, "bias_correction": False}),
    "uniform_w4a8_no_bc": ("uniform W4A8, no bias correction", "quantize", {"weight_bits": 4, "act_bits": 8, "bias_correction": False}),
}
OVERFLOW_MODELS = ("resnet20", "preact_resnet", "densenet", "mobilenet_v2")
OVERFLOW_BITS = (8, 12, 16)
WRAP_BITS = (12, 16, 20)


def log(message: str) -> None:
    print(f"[power_quant] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- part 1
def build(src: Path, workdir: Path, key: str) -> dict[str, Any]:
    title, preset, options = CONFIGS[key]
    start = time.perf_counter()
    model, report = onnxopt.optimize(src, preset=preset, **options)
    seconds = time.perf_counter() - start
    path = workdir / f"{key}.onnx"
    onnxopt.save_model(model, path)
    stats = next((p.stats for p in report.passes if p.name in ("power-quant", "quantize")), {})
    record = {"title": title, "call": f"onnxopt.optimize(src, preset={preset!r}, " + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"}
    record.update({"optimize_seconds": seconds, "size_bytes": path.stat().st_size, "path": str(path)})
    for name in ("exponent", "weight_error", "weight_error_uniform", "integer_layers"):
        if name in stats:
            record[name] = stats[name]
    if "exponents_per_layer" in stats:
        values = list(stats["exponents_per_layer"].values())
        record["exponents_per_layer"] = {"min": min(values), "median": float(np.median(values)), "max": max(values)}
    return record


def bench_model(name: str, views: int, workdir: Path, timing_runs: int) -> dict[str, Any]:
    from onnxopt.models.pretrained import export_pretrained

    src = export_pretrained(name)
    data = load_data(name, views)
    reference = run_model(src, data.inputs)
    configs: dict[str, Any] = {}
    for key in CONFIGS:
        log(f"{name}: {key}")
        try:
            record = build(src, workdir, key)
            record["fidelity"] = fidelity(reference, run_model(Path(record["path"]), data.inputs), data.labels, data.views)
        except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
            record = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
        configs[key] = record
    paths = {k: Path(r["path"]) for k, r in configs.items() if "path" in r}
    sessions = {k: ort_session(p, "all", 1, spinning=False) for k, p in paths.items()}
    feeds = {sessions["fp32"].get_inputs()[0].name: data.inputs[:1]}
    load_before = load_average()
    samples = time_interleaved(sessions, feeds, warmup=3, min_runs=timing_runs, max_runs=timing_runs, target_seconds=0.0)
    for key, values in samples.items():
        configs[key]["latency_1thread"] = summarize(values)
    return {"name": name, "title": MODELS[name], "inputs": len(data.inputs), "input_range": input_range(name), "configs": configs, "load_average": [load_before, load_average()]}


MINILM_SENTENCES = [
    "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.", "movie is awesome",
    "so great", "A man is playing guitar.", "Stocks fell sharply on Monday.", "The cat sleeps on the sofa.",
]
MINILM_CONFIGS = {
    "uniform_w4": ("uniform W4 (a = 1: power-quant emits the quantize pass's QDQ)", {"weight_bits": 4, "act_bits": 8, "power_exponent": 1.0}),
    "power_w4": ("PowerQuant W4 weights, a searched", {"weight_bits": 4, "act_bits": 8}),
    "uniform_w6": ("uniform W6 (a = 1: power-quant emits the quantize pass's QDQ)", {"weight_bits": 6, "act_bits": 8, "power_exponent": 1.0}),
    "power_w6": ("PowerQuant W6 weights, a searched", {"weight_bits": 6, "act_bits": 8}),
}


def bench_minilm() -> dict[str, Any]:
    """all-MiniLM-L6-v2 (seq 32): embedding cosine to FP32.  The uniform baseline is a = 1,
    where power-quant emits what the ``quantize`` pass emits (standard QDQ)."""
    from onnxopt.models.pretrained import export_minilm, load_minilm, minilm_tokenize
    from onnxopt.runtime import session

    src = export_minilm(seq_len=32)
    tokenizer, _ = load_minilm()
    feeds = minilm_tokenize(tokenizer, MINILM_SENTENCES, 32)
    reference = session(onnxopt.load_model(src)).run(None, feeds)[0]
    results: dict[str, Any] = {"sentences": len(MINILM_SENTENCES)}
    for key, (title, options) in MINILM_CONFIGS.items():
        log(f"minilm {key}")
        start = time.perf_counter()
        model, report = onnxopt.optimize(src, preset="power-quant", **options)
        seconds = time.perf_counter() - start
        stats = next(p.stats for p in report.passes if p.name == "power-quant")
        out = session(model).run(None, feeds)[0]
        cos = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
        results[key] = {"title": title, "exponent": stats["exponent"], "weight_error": stats["weight_error"], "layers": stats["layers_quantized"],
                        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "optimize_seconds": seconds}
    return results


# --------------------------------------------------------------------------- part 2
def saturating(model: onnx.ModelProto, records: list[dict[str, Any]], bits: int) -> onnx.ModelProto:
    """The plain integer model with each accumulator clamped to the signed ``bits`` range."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for index, record in enumerate(records):
        acc = tensors[record["accumulator"]]
        clamped = gs.Variable(f"{acc.name}_saturated", dtype=np.int32)
        readers = list(acc.outputs)
        low = gs.Constant(f"sat_low_{index}", np.array(-(2 ** (bits - 1)), np.int32))
        high = gs.Constant(f"sat_high_{index}", np.array(2 ** (bits - 1) - 1, np.int32))
        graph.nodes.append(gs.Node("Clip", f"saturate_{index}", inputs=[acc, low, high], outputs=[clamped]))
        for reader in readers:
            reader.inputs[reader.inputs.index(acc)] = clamped
    return gs.export_onnx(graph.toposort())


def overflow_zoo(samples: int) -> dict[str, Any]:
    from onnxopt.analyze import accumulator_report
    from onnxopt.models.build import build_zoo_model

    results: dict[str, Any] = {}
    for name in OVERFLOW_MODELS:
        src = Path(build_zoo_model(name))
        model = onnx.load(str(src))
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        inputs = {model.graph.input[0].name: np.random.default_rng(0).standard_normal([samples, *shape[1:]]).astype(np.float32)}
        for w, a in ((4, 4), (8, 8)):
            log(f"overflow {name} W{w}A{a}")
            quantized, _ = onnxopt.optimize(model, preset="quantize", weight_bits=w, act_bits=a, input_range=(-3.0, 3.0))
            records = accumulator_report(quantized, inputs, OVERFLOW_BITS)
            results[f"{name}_w{w}a{a}"] = {
                "layers": len(records),
                "required_bits_max": max(r["required_bits"] for r in records),
                "required_bits_median": float(np.median([r["required_bits"] for r in records])),
                "observed_bits_max": max(r.get("observed_bits", 0) for r in records),
                "overflow_rate_mean": {b: float(np.mean([r["overflow_rate"][b] for r in records])) for b in OVERFLOW_BITS},
                "layers_overflowing": {b: int(sum(r["overflow_rate"][b] > 0 for r in records)) for b in OVERFLOW_BITS},
            }
    return results


def wrap_vs_saturate(views: int, workdir: Path) -> dict[str, Any]:
    """Real MobileNetV2, uniform W8A8 and W6A6 (input_range given so every layer is integer):
    labelled accuracy and agreement when wrapping vs saturating at 12/16/20 bits."""
    from onnxopt.models.pretrained import export_pretrained

    src = export_pretrained("mobilenet_v2")
    data = load_data("mobilenet_v2", views)
    reference = run_model(src, data.inputs)
    results: dict[str, Any] = {}
    for w, a in ((8, 8), (6, 6)):
        quantized, _ = onnxopt.optimize(src, preset="quantize", weight_bits=w, act_bits=a, input_range=tuple(input_range("mobilenet_v2")))
        plain, report = onnxopt.optimize(quantized, passes=["modular-accumulator"], accumulator_bits=None)
        records = report.passes[0].stats["layers"]
        row: dict[str, Any] = {"required_bits_max": max(r["required_bits"] for r in records)}
        variants = {"integer (no wrap)": plain}
        for bits in WRAP_BITS:
            variants[f"wrap {bits}"] = onnxopt.optimize(quantized, passes=["modular-accumulator"], accumulator_bits=bits)[0]
            variants[f"saturate {bits}"] = saturating(plain, records, bits)
        for label, model in variants.items():
            log(f"wrap/saturate W{w}A{a} {label}")
            path = workdir / "variant.onnx"
            onnx.save(model, str(path))
            f = fidelity(reference, run_model(path, data.inputs), data.labels, data.views)
            row[label] = {"top1_agreement": f["top1_agreement"], "accuracy_all": f["accuracy_all"], "kl_mean": f["kl_mean"]}
        results[f"w{w}a{a}"] = row
    return results


# --------------------------------------------------------------------------- report
def _by_bits(mapping: dict[Any, Any], bits: int) -> Any:
    """``mapping[bits]``, also after a JSON round trip turned the keys into strings."""
    return mapping[bits] if bits in mapping else mapping[str(bits)]


def markdown(result: dict[str, Any]) -> str:
    lines = ["# PowerQuant vs uniform quantization; accumulator overflow", ""]
    lines += [f"Command: `{result['command']}`. Taken on a 2-core machine shared with 4 other jobs: latencies are noisy (interleaved in one process, 1 thread, median of {result['timing_runs']} runs).", ""]
    for model in result["models"]:
        lines += [f"## {model['title']} ({model['inputs']} real ImageNet inputs, data-free quantization)", ""]
        header = ["configuration", "a*", "weight error (eq. 3.14)", "top-1 agreement", "KL", "accuracy", "size", "latency 1T (ms)"]
        rows = []
        for key, r in model["configs"].items():
            if "fidelity" not in r:
                rows.append([key, "error", r.get("detail", ""), "", "", "", "", ""])
                continue
            f = r["fidelity"]
            a = r.get("exponent", "per layer {min:.2f}–{max:.2f}".format(**r["exponents_per_layer"]) if "exponents_per_layer" in r else "")
            err = f"{r['weight_error']:.2f} (a=1: {r['weight_error_uniform']:.2f})" if "weight_error" in r else ""
            lat = r.get("latency_1thread", {}).get("median_ms")
            rows.append([r["title"], str(a), err, f"{100 * f['top1_agreement']:.1f}%", f"{f['kl_mean']:.3f}", f"{f['accuracy_all'][0]}/{f['accuracy_all'][1]}", f"{r['size_bytes'] / 1e6:.2f} MB", f"{lat:.2f}" if lat else "-"])
        lines += table(header, rows) + [""]
    lines += ["## Accumulator overflow on the zoo (uniform quantize pass, input range ±3, random normal inputs)", ""]
    header = ["model", "layers", "worst-case bits (max / median)", "observed bits (max)"] + [f"overflow rate @{b} (layers overflowing)" for b in OVERFLOW_BITS]
    rows = [
        [k, str(v["layers"]), f"{v['required_bits_max']} / {v['required_bits_median']:.0f}", str(v["observed_bits_max"])]
        + [f"{100 * _by_bits(v['overflow_rate_mean'], b):.3f}% ({_by_bits(v['layers_overflowing'], b)})" for b in OVERFLOW_BITS]
        for k, v in result["overflow"].items()
    ]
    lines += table(header, rows) + [""]
    lines += ["## Wrapping vs saturating accumulators, real MobileNetV2 (top-1 agreement with FP32 / labelled accuracy)", ""]
    for config, row in result["wrap_vs_saturate"].items():
        lines += [f"{config.upper()} (worst-case bound: {row['required_bits_max']} bits)", ""]
        rows = [[label, f"{100 * v['top1_agreement']:.1f}%", f"{v['accuracy_all'][0]}/{v['accuracy_all'][1]}", f"{v['kl_mean']:.3f}"] for label, v in row.items() if isinstance(v, dict)]
        lines += table(["accumulator", "top-1 agreement", "accuracy", "KL"], rows) + [""]
    if "minilm" in result:
        m = result["minilm"]
        lines += [f"## MiniLM (all-MiniLM-L6-v2, seq 32, {m['sentences']} sentences): weight-only, embedding cosine to FP32", ""]
        lines += ["The `quantize` pass refuses MiniLM's 3-D MatMuls and there are no LayerNorm statistics for activation ranges, so both rows quantize the 36 MatMul weights only; the uniform baseline is the same per-channel operator at a = 1.", ""]
        rows = [[v["title"], str(v["exponent"]), f"{v['weight_error']:.2f}", f"{v['cosine_mean']:.5f}", f"{v['cosine_min']:.5f}", f"{v['optimize_seconds']:.0f} s"] for k, v in m.items() if isinstance(v, dict)]
        lines += table(["configuration", "a", "weight error", "cosine mean", "cosine min", "optimize time"], rows) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--minilm-only", action="store_true", help="add the MiniLM section to the existing results")
    args = parser.parse_args(argv)
    if args.minilm_only:
        result = json.loads((RESULTS / "power_quant.json").read_text())
        result["minilm"] = bench_minilm()
        result["command"] += "; python -m bench.power_quant --minilm-only"
        (RESULTS / "power_quant.json").write_text(json.dumps(json_safe(result), indent=1))
        (RESULTS / "power_quant.md").write_text(markdown(result))
        return 0
    views, runs, samples = (1, 10, 4) if args.quick else (2, 30, 8)
    result: dict[str, Any] = {"command": "python -m bench.power_quant" + (" --quick" if args.quick else ""), "timing_runs": runs, "environment": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        result["models"] = [bench_model(name, views, workdir, runs) for name in args.models.split(",") if name]
        result["overflow"] = overflow_zoo(samples)
        result["wrap_vs_saturate"] = wrap_vs_saturate(views, workdir)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "power_quant.json").write_text(json.dumps(json_safe(result), indent=1))
    (RESULTS / "power_quant.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
