"""RESULTS.md from the suite's results (pure formatting: every figure comes from results.json)."""

from __future__ import annotations

import os

from typing import Any

from bench.common import table

KEY_START = "<!-- key-table:start -->"
KEY_END = "<!-- key-table:end -->"
KEY_MODEL = "mobilenet_v2"  # the model of the key table (falls back to the first measured one)
KEY_CONFIGS = (
    "fp32", "onnxopt_default", "onnxopt_spiq_w8a8", "onnxopt_spiq_w6a8", "onnxopt_spiq_w4a8",
    "onnxopt_rex_w4a8_o2_b0.5", "onnxopt_powerquant_w4a8", "onnxopt_red_a0.05",
    "ort_all", "onnxoptimizer_default", "onnxsim", "onnxslim", "ort_static_minmax", "ort_static_percentile",
    "ort_dynamic_int8",
)


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    return "—" if value is None else fmt.format(value)


def _giga(value: Any) -> str:
    return "—" if value is None else f"{value / 1e9:.3g}"


def _mb(value: Any) -> str:
    return "—" if value is None else f"{value / 1e6:.2f}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _lat(record: dict[str, Any], threads: str) -> str:
    stats = record.get("latency", {}).get(threads)
    return "—" if not stats else f"{stats['median_ms']:.2f} ({stats['iqr_ms']:.2f})"


def _speedup(record: dict[str, Any], threads: str) -> str:
    stats = record.get("latency", {}).get(threads)
    return "—" if not stats or stats.get("speedup_vs_fp32") is None else f"{stats['speedup_vs_fp32']:.2f}x"


def _status(record: dict[str, Any]) -> str:
    if record.get("status") == "ok":
        return "ok"
    if str(record.get("detail", "")).startswith(str(record.get("status"))):
        return str(record["detail"]).replace("|", "/")[:120]
    return f"{record.get('status')}: {record.get('detail', '')}".replace("|", "/")[:120]


def _bn(record: dict[str, Any]) -> str:
    if "bn" not in record:
        return "—"
    nchwc = record.get("bn_as_nchwc_conv", 0)
    return f"{record['bn']}" + (f" (+{nchwc} as NCHWc Conv)" if nchwc else "")


def titles(data: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["title"] for c in data["configs"]}


def model_table(data: dict[str, Any], name: str, only: tuple[str, ...] | None = None, full: bool = True) -> list[str]:
    model = data["models"][name]
    names = titles(data)
    header = ["configuration", "status", "BOPs (G)", "size (MB)", "top-1 agr.", "KL", "cos", "accuracy",
              "1 thr ms (IQR)", "speed-up 1 thr", "2 thr ms (IQR)", "speed-up 2 thr"]
    if full:
        header[2:2] = ["W/A bits", "params", "MACs (G)", "int MACs"]
        header[-4:-4] = ["BN left", "optimizer s", "peak RSS MB"]
    rows = []
    bits = {c["name"]: f"{c['bits_w']}/{c['bits_a']}" for c in data["configs"]}
    for config, record in model["configs"].items():
        if only is not None and config not in only:
            continue
        fid = record.get("fidelity", {})
        row = [names.get(config, config), _status(record), _giga(record.get("bops")), _mb(record.get("size_bytes")),
               _pct(fid.get("top1_agreement")), _num(fid.get("kl_mean")), _num(fid.get("cosine_mean"), "{:.4f}"),
               _pct(fid.get("accuracy")), _lat(record, "1"), _speedup(record, "1"), _lat(record, "2"), _speedup(record, "2")]
        if full:
            row[2:2] = [bits.get(config, "—"), _num(record.get("parameters"), "{:,}"), _giga(record.get("macs")),
                        _pct(record.get("quantized_mac_fraction"))]
            row[-4:-4] = [_bn(record), _num(record.get("seconds"), "{:.2f}"), _num(record.get("peak_rss_mb"), "{:.0f}")]
        rows.append(row)
    return table(header, rows)


def key_model(data: dict[str, Any]) -> str | None:
    measured = [n for n, m in data["models"].items() if "configs" in m]
    return KEY_MODEL if KEY_MODEL in measured else (measured[0] if measured else None)


def key_section(data: dict[str, Any]) -> list[str]:
    name = key_model(data)
    if name is None:
        return [KEY_START, "No model was measured.", KEY_END]
    model = data["models"][name]
    return [
        KEY_START,
        f"**{model['title']}**, {model['inputs']}; accuracy: {model['label_note'] or 'none'}. "
        f"Latency: ORT CPU, batch 1, median (IQR) ms, speed-up vs FP32 in the same interleaved block "
        f"(`{data['mode']}` run, {data['environment'].get('cpus_usable')} cores, {_load_note(data)}).",
        "",
        *model_table(data, name, KEY_CONFIGS, full=False),
        KEY_END,
    ]


def _load_note(data: dict[str, Any]) -> str:
    start, end = data.get("load_average_start"), data.get("load_average_end")
    # the benchmark itself keeps up to ~1.5 cores busy on the 2-core machines: more is others' load
    loaded = any(x and x[0] > 0.75 * (os.cpu_count() or 2) for x in (start, end))
    text = f"load average {start[0] if start else '?'} → {end[0] if end else '?'}"
    return text + (": measured under load from other processes" if loaded else "")


def availability_section(data: dict[str, Any]) -> list[str]:
    rows = []
    for c in data["configs"]:
        how = " → ".join(c["passes"]) if c["family"] == "onnxopt" else c["tool"]
        options = ", ".join(f"{k}={v!r}" for k, v in c["options"].items()) or "—"
        rows.append([c["name"], c["title"], how, options, c["availability"]])
    return ["## Configurations", "",
            "onnxopt pipelines run as `onnxopt.optimize(model, passes=[...], **options)` (`@default` = the registry's "
            "`default` preset). A configuration whose passes are not registered is **absent**: nothing stands in for it.",
            "", *table(["name", "title", "pipeline / tool", "options", "here"], rows)]


def bn_section(data: dict[str, Any]) -> list[str]:
    tools = ["fp32", "onnxopt_default", "onnxopt_bn_fold", "ort_basic", "ort_extended", "ort_all",
             "onnxoptimizer_fuse_bn", "onnxoptimizer_default", "onnxsim", "onnxslim"]
    names = titles(data)
    tools = [t for t in tools if t in names]
    rows = []
    for model_name, model in data["models"].items():
        if "configs" in model:
            rows.append([model_name, *(_bn(model["configs"].get(t, {})) for t in tools)])
    return ["## BatchNormalization nodes left per tool", "",
            "BN nodes in the model each tool writes. ORT_ENABLE_ALL turns a BN it cannot fold into an NCHWc "
            "depthwise Conv (still computed): counted in parentheses.", "",
            *table(["model", *(names[t] for t in tools)], rows)]


def failures_section(data: dict[str, Any]) -> list[str]:
    lines = []
    for model_name, model in data["models"].items():
        if model.get("status") == "error":
            lines.append(f"- {model_name}: {model.get('detail')}")
        for config, record in model.get("configs", {}).items():
            if record.get("status") in ("error", "crash"):
                lines.append(f"- {model_name} / {config}: {record['status']}: {record.get('detail')}")
    return ["## Failures", "", *(lines or ["None."])]


def method_notes(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    return [
        "## How it was measured", "",
        f"- Command: `{data['command']}`; wall time {data['wall_seconds']:.0f} s; {data['environment'].get('date')}, "
        f"commit {str(data['environment'].get('git_commit'))[:12]}, CPU {data['environment'].get('cpu_model')} "
        f"({data['environment'].get('cpus_usable')} usable cores), {_load_note(data)}.",
        "- Each optimizer runs in a fresh worker process (`bench/worker.py`): *optimizer s* is the wall time of the "
        "call alone (ORT quantizers: including `quant_pre_process`); *peak RSS MB* is the peak resident set of that "
        "process (`VmHWM`; interpreter, imports and model included).",
        "- Params: elements of initializers and Constants. MACs per sample (batch 1, graph inputs fixed to one "
        "evaluation sample's shape) on each configuration's own model (`onnxopt.metrics` MAC formulas on shapes from "
        "ORT's symbolic shape inference). BOPs = Σ over MAC nodes of "
        "MACs × bits of each operand, the bits read from the model: float 32; integer weights the width their values "
        "use (ceil(log2(max|q|+1))+1 signed: 4-bit weights in int8 storage count 4); quantized activations the "
        "configuration's activation bits. *int MACs* = share of MACs with both operands quantized. Where shape "
        "inference cannot size a node (ORT contrib ops) the FP32 MACs at the nominal bits are used (`macs_source`).",
        "- Fidelity against the FP32 model on the same real inputs, run by ONNX Runtime at ORT_ENABLE_ALL: top-1 "
        "agreement, mean KL(FP32 ‖ config) of the softmax, mean cosine of the logits. MiniLM: cosine of the "
        "embeddings; *top-1 agr.* is agreement of the spam/ham decisions with FP32's, *accuracy* that of a "
        "logistic regression fitted on FP32 embeddings of one half, tested on the other half.",
        f"- Latency: every configuration of a model in this one process, warmed up ({s['warmup']} runs), then "
        f"{s['min_runs']}–{s['max_runs']} round-robin runs each (`bench.common.time_interleaved`, intra-op spinning "
        "off), batch 1, 1 and 2 intra-op threads; median and IQR in ms. ORT-level peers run the model ORT wrote at "
        "their level, at that level; everything else at ORT_ENABLE_ALL. Speed-up = FP32 median / configuration median of the same "
        "block.",
    ]


def render(data: dict[str, Any]) -> str:
    lines = [
        "# onnxopt benchmark results", "",
        f"Generated by `{data['command']}` ({data['mode']} mode). Every number below comes from that one run "
        "(`results.json` holds the raw figures and latency samples). Do not edit by hand.", "",
        f"Latency note: {_load_note(data)}. Ratios are taken within one process; absolute times are noisy.", "",
        "## Key table", "", *key_section(data), "",
    ]
    for plot in data.get("plots", []):
        lines.append(f"![{plot['title']}]({plot['file']})")
    lines += ["", *availability_section(data), "", "## Per model", ""]
    for name, model in data["models"].items():
        lines += [f"### {model['title']}", ""]
        if "configs" not in model:
            lines += [f"{model.get('status')}: {model.get('detail')}", ""]
            continue
        lines += [f"Inputs: {model['inputs']}. Accuracy: {model['label_note'] or 'no labels'}. "
                  f"Model file `{model['model_file']}`.", "", *model_table(data, name), ""]
    lines += [*bn_section(data), "", *failures_section(data), "", *method_notes(data), ""]
    return "\n".join(lines)
