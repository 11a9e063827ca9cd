"""The goals and the markdown report of the quantization benchmark (bench/quantize.py): each
goal's verdict from the raw results (:func:`evaluate_goals`) and ``quantize.md``
(:func:`render_markdown`: goals, presence of the pass, what it did, fidelity, latency and op
tables, the MiniLM section, failures and how things were measured).
"""

from __future__ import annotations

import json
from statistics import median
from typing import Any, Sequence

import numpy as np

from bench.common import table
from bench.fidelity import MODELS
from bench.quantize_configs import (
    CONFIG_BY_KEY,
    GOALS,
    INPUT_RANGE_KEY,
    JITTER_COPIES,
    QUANTIZE_PRESET,
    SPIQ_MODES,
    THREADS,
    WEIGHT_BITS,
    Config,
    onnxopt_key,
)


# --------------------------------------------------------------------------- goals
def block_stats(result: dict[str, Any], threads: int) -> dict[str, Any]:
    return result.get("latency", {}).get("threads", {}).get(str(threads), {}).get("stats", {})


def kl_of(result: dict[str, Any], key: str) -> float | None:
    rec = result.get("configs", {}).get(key, {})
    return rec.get("fidelity", {}).get("kl_mean") if rec.get("status") == "ok" else None


def goal(text: str, met: bool | None, value: str) -> dict[str, Any]:
    return {"goal": text, "met": met, "value": value}


def agreement_goal(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    text = f"SPIQ W8A8 top-1 agreement with FP32 on MobileNetV2 >= {GOALS['agreement']:.0%}"
    rec = results.get("mobilenet_v2", {}).get("configs", {}).get(onnxopt_key(8, True), {})
    if rec.get("status") != "ok":
        return goal(text, None, rec.get("status", "model not run"))
    agreement = rec["fidelity"]["top1_agreement"]
    return goal(text, agreement >= GOALS["agreement"], f"{agreement:.1%} of {rec['fidelity']['inputs']} inputs")


def kl_copies(result: dict[str, Any], key: str) -> list[float]:
    """Mean KL of ``key`` on the model and on its jittered copies (the noise floor)."""
    first = kl_of(result, key)
    return ([] if first is None else [first]) + result.get("noise_floor", {}).get("kl_means", {}).get(key, [])


def spiq_vs_pt_goal(results: dict[str, dict[str, Any]], mode: bool | str = True, copies: bool = False) -> dict[str, Any]:
    over = f" (average over the model and its {JITTER_COPIES} jittered copies; min-max in brackets)" if copies else " (the model itself)"
    text = f"{SPIQ_MODES[mode][1]} at least as good (mean KL vs FP32 <=) as per-tensor at every weight bit-width{over}"
    verdicts, parts = [], []
    for name, result in results.items():
        for bits in WEIGHT_BITS:
            if copies:
                spiq_all, pt_all = kl_copies(result, onnxopt_key(bits, mode)), kl_copies(result, onnxopt_key(bits, False))
                if len(spiq_all) < 2 or len(pt_all) < 2:
                    continue
                spiq, pt = float(np.mean(spiq_all)), float(np.mean(pt_all))
                verdicts.append(spiq <= pt)
                parts.append(f"{MODELS[name]} W{bits}: {spiq:.3g} [{min(spiq_all):.3g}-{max(spiq_all):.3g}] vs "
                             f"{pt:.3g} [{min(pt_all):.3g}-{max(pt_all):.3g}]")
                continue
            spiq, pt = kl_of(result, onnxopt_key(bits, mode)), kl_of(result, onnxopt_key(bits, False))
            if spiq is None or pt is None:
                continue
            verdicts.append(spiq <= pt)
            parts.append(f"{MODELS[name]} W{bits}: {spiq:.3g} vs {pt:.3g}")
    if not verdicts:
        return goal(text, None, "onnxopt configurations absent")
    return goal(text, all(verdicts), "; ".join(parts))


def latency_ratio(result: dict[str, Any], threads: int, numerator: str, denominator: str) -> float | None:
    stats = block_stats(result, threads)
    if numerator not in stats or denominator not in stats:
        return None
    return stats[numerator]["median_ms"] / stats[denominator]["median_ms"]


def vs_static_goal(results: dict[str, dict[str, Any]], key: str, what: str) -> dict[str, Any]:
    text = f"latency {what} / quantize_static (MinMax) W8A8 <= {GOALS['vs_static']}"
    measured = {
        f"{MODELS[name]} {t} thr": latency_ratio(result, t, key, "ort_static_minmax")
        for name, result in results.items() for t in THREADS
    }
    ratios = {k: v for k, v in measured.items() if v is not None}
    if not ratios:
        return goal(text, None, f"{key} absent")
    return goal(text, all(v <= GOALS["vs_static"] for v in ratios.values()), "; ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


def speedup_goal(results: dict[str, dict[str, Any]], baselines: Sequence[str], key: str, what: str) -> dict[str, Any]:
    """SPIQ W8A8 on MobileNetV2 at 1 thread at least GOALS[key] times faster than every baseline."""
    text = f"SPIQ W8A8 >= {GOALS[key]}x faster than {what} on MobileNetV2 at 1 thread"
    result = results.get("mobilenet_v2", {})
    measured = {b: latency_ratio(result, 1, b, onnxopt_key(8, True)) for b in baselines}
    ratios = {k: v for k, v in measured.items() if v is not None}
    if len(ratios) < len(measured):
        return goal(text, None, "onnxopt SPIQ W8A8 (or a baseline) absent")
    return goal(text, all(v >= GOALS[key] for v in ratios.values()), "; ".join(f"vs {k}: {v:.3f}x" for k, v in ratios.items()))


def resnet50_goal(resnet50: dict[str, Any]) -> dict[str, Any]:
    text = f"onnxopt quantization (SPIQ W8A8) of ResNet-50 < {GOALS['resnet50_seconds']:g} s (report.total_seconds)"
    if resnet50.get("status") != "ok":
        return goal(text, None, resnet50.get("status", "not run"))
    seconds = median(resnet50["report_total_seconds"])
    return goal(text, seconds < GOALS["resnet50_seconds"], f"{seconds:.2f} s (median of {len(resnet50['report_total_seconds'])})")


def evaluate_goals(results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        agreement_goal(results),
        spiq_vs_pt_goal(results),
        spiq_vs_pt_goal(results, "auto"),
        spiq_vs_pt_goal(results, True, copies=True),
        spiq_vs_pt_goal(results, "auto", copies=True),
        vs_static_goal(results, onnxopt_key(8, True), "SPIQ W8A8"),
        speedup_goal(results, ("ort_dynamic_int8", "ort_dynamic_uint8"), "vs_dynamic", "quantize_dynamic (int8 and uint8 weights)"),
        speedup_goal(results, ("fp32_folded", "fp32_original"), "vs_fp32", "FP32 (BN folded and original)"),
        resnet50_goal(resnet50),
        vs_static_goal(results, INPUT_RANGE_KEY, "(extra, not a stated goal) SPIQ W8A8 + input_range"),
    ]


# --------------------------------------------------------------------------- markdown
def quant_seconds(rec: dict[str, Any]) -> str:
    if "report_total_seconds" in rec and isinstance(rec["report_total_seconds"], list):
        return f"{median(rec['report_total_seconds']):.2f}"
    if "quantize_seconds" in rec:
        return f"{rec['quantize_seconds']:.2f}"
    return "-"


def fidelity_row(config: Config, rec: dict[str, Any]) -> list[str]:
    if rec.get("status") != "ok":
        label = "absent (pass not landed)" if rec.get("status") == "absent" else f"{rec.get('status')}: {rec.get('detail', '')[:120]}"
        return [config.title, label, *([""] * 7)]
    f, g = rec["fidelity"], rec["ort_graph"]
    graph = f"{g['qlinearconv']} / {g['float_conv']} / {g['conv_integer']}" + (" fused" if g["fused"] else "")
    return [
        config.title, f"{f['top1_agreement']:.1%}", f"{f['kl_mean']:.4f}", f"{f['cosine_mean']:.4f} ({f['cosine_min']:.3f})",
        f"{f['accuracy_20'][0]}/{f['accuracy_20'][1]}", f"{f['accuracy_all'][0]}/{f['accuracy_all'][1]}",
        f"{rec['size_bytes'] / 1e6:.2f}", quant_seconds(rec), graph,
    ]


def fidelity_section(result: dict[str, Any]) -> list[str]:
    header = ["configuration", "top-1 agreement", "mean KL", "cosine mean (min)", "acc 20", "acc all views",
              "size MB", "quantize s", "ORT graph: QLinearConv / float Conv / ConvInteger"]
    rows = [fidelity_row(CONFIG_BY_KEY[key], rec) for key, rec in result["configs"].items()]
    n = next((r["fidelity"]["inputs"] for r in result["configs"].values() if "fidelity" in r), "?")
    return [f"### {result['title']}: fidelity vs FP32 ({n} real inputs), size, ORT graph", "", *table(header, rows)]


def fmt_ms(stats: dict[str, Any] | None) -> str:
    return "-" if not stats else f"{stats['median_ms']:.3g} ({stats['iqr_ms']:.2g})"


def latency_section(result: dict[str, Any]) -> list[str]:
    blocks = result.get("latency", {}).get("threads", {})
    rows = []
    for key in result["configs"]:
        cells = [CONFIG_BY_KEY[key].title]
        for threads in THREADS:
            stats = blocks.get(str(threads), {}).get("stats", {}).get(key)
            cells += [fmt_ms(stats), f"{stats['speedup_vs_fp32_folded']:.2f}x" if stats else "-"]
        rows.append(cells)
    header = ["configuration"] + [h for t in THREADS for h in (f"{t} thread(s) ms: median (IQR)", "speed-up vs FP32 folded")]
    runs = {t: b["stats"]["fp32_original"]["runs"] for t, b in blocks.items() if "stats" in b}
    loads = {t: (b.get("load_average_before") or ["?"])[0] for t, b in blocks.items() if "stats" in b}
    errors = [f"{t} thread(s): {b['error']}" for t, b in blocks.items() if "error" in b]
    return [f"### {result['title']}: latency in ORT (ORT_ENABLE_ALL, batch 1)", "", *table(header, rows), "",
            f"Runs per configuration: {runs}; 1-minute load average before each block: {loads}." + (" Errors: " + "; ".join(errors) if errors else "")]


def op_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for key, rec in result["configs"].items():
        if rec.get("status") == "ok":
            ops = ", ".join(f"{op} {n}" for op, n in sorted(rec["ort_graph"]["op_counts"].items()))
            rows.append([CONFIG_BY_KEY[key].title, ops])
    return [f"### {result['title']}: op counts of the graph ORT runs (ORT_ENABLE_ALL)", "", *table(["configuration", "ops"], rows)]


def pass_seconds(rec: dict[str, Any], name: str) -> float | None:
    entry = rec.get("passes", {}).get(name)
    return entry["seconds"] if entry else None


def onnxopt_row(title: str, rec: dict[str, Any]) -> list[str]:
    stats = rec.get("passes", {}).get(QUANTIZE_PRESET, {}).get("stats", {})
    quantize_s = pass_seconds(rec, QUANTIZE_PRESET)
    all_passes = sum(p["seconds"] for p in rec.get("passes", {}).values())
    coverage = stats.get("spiq_coverage")
    return [
        title, f"{stats.get('layers_quantized', '-')} / {stats.get('layers_float', '-')}",
        "-" if coverage is None else f"{coverage:.0%}", str(stats.get("outputs_quantized", "-")),
        "-" if quantize_s is None else f"{quantize_s:.3f}", f"{all_passes:.3f}",
        f"{median(rec['report_total_seconds']):.3f}", f"{median(rec['optimize_seconds']):.3f}",
    ]


def onnxopt_section(results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[str]:
    rows = [
        onnxopt_row(f"{result['title']} / {CONFIG_BY_KEY[key].title}", rec)
        for result in results.values() for key, rec in result.get("configs", {}).items()
        if CONFIG_BY_KEY[key].family == "onnxopt" and rec.get("status") == "ok"
    ]
    if resnet50.get("status") == "ok":
        rows.append(onnxopt_row("ResNet-50 (zoo) / onnxopt SPIQ W8A8", resnet50))
    header = ["model / configuration", "layers quantized / float", "SPIQ coverage", "outputs quantized",
              "quantize pass s", "all passes s", "report.total_seconds", "optimize() wall s"]
    return ["## onnxopt quantization: what the pass did and how long it took", "", *table(header, rows), "",
            "Times are medians over the repeats (first repeat for the pass columns); report.total_seconds also counts the "
            "metrics the PassManager takes around every pass; the wall time also loads the model."]


def goals_section(goals: list[dict[str, Any]]) -> list[str]:
    verdict = {True: "met", False: "**NOT met**", None: "n/a"}
    rows = [[g["goal"], verdict[g["met"]], g["value"]] for g in goals]
    return ["## Goals", "", *table(["goal", "verdict", "measured"], rows)]


def presence_section(availability: dict[str, Any], results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[str]:
    lines = ["## onnxopt quantization: presence", ""]
    if availability["available"]:
        lines.append(f"Preset `{QUANTIZE_PRESET}` = {', '.join(availability['preset_steps'])}; quantization passes and their option defaults: "
                     f"{json.dumps(availability['quant_passes'])}; source sha256 (the pass is being edited): "
                     f"{json.dumps(availability.get('pass_source_sha256', {}))}.")
    else:
        lines.append(f"**The `{QUANTIZE_PRESET}` preset is not in `onnxopt.passes.builtin_registry()`** (presets: "
                     f"{', '.join(availability['presets'])}): every onnxopt configuration is recorded as absent (pass not landed); "
                     "nothing stands in for it.")
    for name, result in results.items():
        states = {k: r.get("status") for k, r in result.get("configs", {}).items() if CONFIG_BY_KEY[k].family == "onnxopt"}
        lines.append(f"- {MODELS[name]}: " + ", ".join(f"{CONFIG_BY_KEY[k].title}: {s}" for k, s in states.items()))
    lines.append(f"- ResNet-50 (zoo) SPIQ W8A8 timing: {resnet50.get('status')}"
                 + (f", report.total_seconds {', '.join(f'{s:.2f}' for s in resnet50['report_total_seconds'])}" if resnet50.get("status") == "ok" else ""))
    return lines


def failures_section(results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[str]:
    lines = []
    for name, result in results.items():
        if "error" in result:
            lines.append(f"- {MODELS[name]}: {result['error']}")
        for key, rec in result.get("configs", {}).items():
            if rec.get("status") == "error":
                lines.append(f"- {MODELS[name]} / {CONFIG_BY_KEY[key].title}: {rec.get('detail', '')}")
    if resnet50.get("status") == "error":
        lines.append(f"- ResNet-50: {resnet50['detail']}")
    return ["## Failures", "", *(lines or ["none"])]


def method_notes() -> list[str]:
    return [
        "## How",
        "",
        "- Fidelity: real inputs = the 20 foolbox ImageNet samples in deterministic views (standard 256/224 center crop, "
        "its horizontal flip, shorter side 320 and 224 center crops: 80 inputs; --quick uses the first 3 views, 60 inputs), models "
        "package preprocessing; reference = the FP32 original in ORT. Agreement = same argmax; KL = mean over inputs of "
        "KL(softmax FP32 || softmax config); cosine of the logit vectors. acc 20 = top-1 on the 20 labelled standard crops; "
        "acc all views = on every view (the labels hold).",
        "- ORT quantize_static: on the BN-folded FP32 model after `quant_pre_process` (ORT's recommended shape inference + "
        "graph optimization; here it changes no op and gives the same fused graph, it is kept because ORT asks for it); QDQ, "
        "per-channel int8 weights, uint8 activations, ORT's defaults otherwise. Calibrated on foolbox's 20 CIFAR-10 + 20 "
        "CIFAR-100 images upscaled to 224 (real photos, disjoint from the evaluation images; a domain shift that a data-free "
        "method does not have to pay, but also the only other real images shipped).",
        "- ORT quantize_dynamic: int8 weights (as specified) and uint8 weights (ORT's fastest ConvInteger form on CPU), per tensor.",
        "- onnxopt: `onnxopt.optimize(original_path, preset=\"quantize\", weight_bits=W, act_bits=8, spiq=S)`, no data "
        "(the graph input has no BN statistics, so the first Conv stays float by the pass's documented default). The extra "
        "configuration \"+ input_range\" also passes `input_range=(lo, hi)`, the model's input normalisation applied to pixel "
        "values 0 and 1 (a property of the preprocessing formula, not of data), so the first Conv is quantized too; "
        "\"quantize s\" = median `report.total_seconds`; for ORT the wall time of the quantizer call (plus calibration).",
        "- ORT graph column: QLinearConv nodes (any domain, NHWC included) / float Conv (Conv, FusedConv, NCHWc Conv) / "
        "ConvInteger in the graph ORT runs at ORT_ENABLE_ALL; \"fused\" = QLinearConv and no float Conv.",
        "- Latency: one real image, batch 1, every configuration in one process, warmed up, timed round-robin with intra-op "
        "spinning off; speed-ups and goal ratios are between medians of the same block.",
    ]


def render_markdown(data: dict[str, Any]) -> str:
    env, results = data["environment"], data["models"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Data-free QDQ quantization benchmark",
        "",
        f"Generated by `{data['command']}` on {env['date']} ({'quick' if data['settings']['quick'] else 'full'} mode, "
        f"{data['seconds']:.0f} s). {env['cpu_model']}, {env['cpus_usable']} usable CPU(s); {versions}. "
        f"Source: {env['git_commit'] or '?'}{' + uncommitted changes' if env['git_dirty_files'] else ''}. "
        "Raw numbers: quantize.json. What is measured and how: the docstring of bench/quantize.py.",
        "",
        *goals_section(data["goals"]), "",
        *presence_section(data["quantize_availability"], results, data["resnet50"]), "",
        *onnxopt_section(results, data["resnet50"]), "",
        "## Results", "",
    ]
    for result in results.values():
        if "configs" in result:
            lines += [*fidelity_section(result), "", *latency_section(result), ""]
    for result in results.values():
        if "configs" in result:
            lines += [*op_section(result), ""]
    lines += [*minilm_section(data.get("minilm", {})), ""]
    lines += [*failures_section(results, data["resnet50"]), "", *method_notes(), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- MiniLM (transformer)
MINILM_CONFIGS = {
    "fp32": "FP32",
    "onnxopt_auto_w8a8": "onnxopt W8A8 data-free (LayerNorm ranges, SPIQ-auto)",
    "ort_dynamic_int8": "ORT quantize_dynamic int8 weights (on the constant-folded FP32)",
}


def minilm_section(minilm: dict[str, Any]) -> list[str]:
    lines = ["## all-MiniLM-L6-v2 (transformer): data-free W8A8 from LayerNorm statistics", ""]
    if minilm.get("status") != "ok":
        return lines + [f"not run: {minilm.get('status')} {minilm.get('detail', '')}"]
    quant = minilm["onnxopt"]["passes"].get("quantize", {})
    rows = []
    for key, title in MINILM_CONFIGS.items():
        rec = minilm["configs"].get(key)
        if rec is None:
            continue
        lat = rec.get("latency_1thread", {})
        rows.append([title, f"{rec['cosine_mean']:.4f} ({rec['cosine_min']:.4f})", f"{rec['size_bytes'] / 1e6:.2f}",
                     f"{rec['integer_matmuls']} / {rec['float_matmuls']}", fmt_ms(lat) if lat else "-"])
    header = ["configuration", "embedding cosine to FP32: mean (min)", "size MB", "ORT graph: integer / float MatMul-like ops", "1 thread ms: median (IQR)"]
    stats = quant.get("stats", quant)
    return lines + [
        f"{minilm['sentences']} real sentences padded to {minilm['seq_len']} tokens, batch 1; onnxopt quantize stats: "
        f"layers quantized / float {stats.get('layers_quantized', '?')} / {stats.get('layers_float', '?')}, SPIQ coverage "
        f"{stats.get('spiq_coverage', '?')} (in this post-LN BERT every LayerNorm output is also read by the residual Add, "
        "so the scales cannot be folded: per-tensor fallback); the attention output projections and the FFN output layers "
        "read tensors without data-free statistics and get the dynamic form (dynamic_fallback='auto', see "
        "bench/results/minilm_dynamic.md); float MatMul-like ops include the attention products.",
        "", *table(header, rows),
    ]
