"""The third-party benchmark's goals (met / not met per model) and its markdown report
(bench/results/third_party.md).  The rows are measured by :mod:`bench.third_party`, whose
docstring says what is measured and how.
"""

from __future__ import annotations

from typing import Any

from bench.common import table
from bench.third_party_cases import ACT_RANGES, CONFIGS, GOALS, NO_SPIQ, THREADS, TITLES


# --------------------------------------------------------------------------- goals
def _fid(row: dict[str, Any], key: str) -> dict[str, Any] | None:
    rec = row.get("fidelity", {}).get(key)
    return rec if rec and "error" not in rec else None


def _median(row: dict[str, Any], threads: int, key: str) -> float | None:
    stats = row.get("latency", {}).get(str(threads), {}).get("stats", {}).get(key)
    return stats["median_ms"] if stats else None


def goal(text: str, verdicts: dict[str, bool | None], values: dict[str, str]) -> dict[str, Any]:
    known = [v for v in verdicts.values() if v is not None]
    met = None if not known else all(known) and len(known) == len(verdicts)
    failed = [k for k, v in verdicts.items() if v is False]
    missing = [k for k, v in verdicts.items() if v is None]
    return {"goal": text, "met": met, "failed": failed, "missing": missing, "values": values}


def data_is_the_fix(row: dict[str, Any]) -> bool:
    """The calibrated onnxopt run quantized something: the run without data should name --calibration-data."""
    return row["onnxopt"].get("exit_code") == 0


def ort_process_seconds(ort: dict[str, Any]) -> float:
    """quantize_static's process wall time without what onnxopt does not do: ORT's pre-processing
    and, on an opset < 13 file, the first attempt whose output ORT could not load."""
    return ort["wall_seconds"] - ort["pre_process_seconds"] - ort.get("failed_attempt", {}).get("seconds", 0.0)


def evaluate_goals(rows: list[dict[str, Any]], bn_row: dict[str, Any] | None) -> list[dict[str, Any]]:
    goals = []
    cov = {r["case"]: r["onnxopt"].get("coverage", {}).get("share") for r in rows}
    goals.append(goal(f"onnxopt quantizes >= {GOALS['coverage']:.0%} of the constant-weight Conv/Gemm/MatMul layers on every model",
                      {k: None if v is None else v >= GOALS["coverage"] for k, v in cov.items()},
                      {k: "no output" if v is None else f"{v:.0%}" for k, v in cov.items()}))
    fid_v, fid_s = {}, {}
    for r in rows:
        ours, ort = _fid(r, "onnxopt"), _fid(r, "ort_static")
        fid_v[r["case"]] = None if not ours or not ort else ours["top1_agreement"] >= ort["top1_agreement"] and ours["kl_mean"] <= ort["kl_mean"]
        fid_s[r["case"]] = "-" if not ours or not ort else (
            f"agreement {ours['top1_agreement']:.1%} vs {ort['top1_agreement']:.1%}, KL {ours['kl_mean']:.4f} vs {ort['kl_mean']:.4f}")
    goals.append(goal("fidelity >= quantize_static's (top-1 agreement >= and mean KL <=, vs FP32)", fid_v, fid_s))
    for threads in THREADS:
        lat_v, lat_s = {}, {}
        for r in rows:
            ours, ort, fp32 = (_median(r, threads, k) for k in CONFIGS[1:] + CONFIGS[:1])
            lat_v[r["case"]] = None if None in (ours, ort, fp32) else ours <= GOALS["vs_static"] * ort and ours < fp32
            lat_s[r["case"]] = "-" if None in (ours, ort, fp32) else f"{ours / ort:.2f}x static, {ours / fp32:.2f}x FP32"
        goals.append(goal(f"latency <= {GOALS['vs_static']}x quantize_static's and < FP32 at {threads} thread(s)", lat_v, lat_s))
    time_v, time_s = {}, {}
    for r in rows:
        ours, ort = r["onnxopt"], r["ort_static"]
        if ours.get("exit_code") or ort.get("exit_code") or "total_seconds" not in ours:
            time_v[r["case"]], time_s[r["case"]] = None, "-"
            continue
        ort_wall = ort_process_seconds(ort)
        time_v[r["case"]] = ours["wall_seconds"] <= ort_wall and ours["total_seconds"] <= ort["call_seconds"]
        time_s[r["case"]] = f"process {ours['wall_seconds']:.1f} vs {ort_wall:.1f} s, in-process {ours['total_seconds']:.1f} vs {ort['call_seconds']:.1f} s"
    goals.append(goal("calibrated quantization time <= quantize_static's (process wall time without ORT's pre-processing, "
                      "and report.total_seconds vs the quantize_static call)", time_v, time_s))
    exit_v = {r["case"]: r["no_data"]["exit_code"] == GOALS["exit_code"] and r["no_data"]["names_flag"] == data_is_the_fix(r)
              and not r["no_data"]["wrote_output"] for r in rows}
    goals.append(goal("without --calibration-data: exit 10, no output written, and an error line naming --calibration-data "
                      "exactly where data is the fix (the calibrated run quantizes)", exit_v,
                      {r["case"]: f"exit {r['no_data']['exit_code']}: {r['no_data']['message']}" for r in rows}))
    goals.append(bn_goal(rows, bn_row))
    return goals


def bn_goal(rows: list[dict[str, Any]], bn_row: dict[str, Any] | None) -> dict[str, Any]:
    text = (f"MobileNetV2 BN-folded (opset 17) + 10 samples: top-1 agreement at most {GOALS['agreement_points']:g} points below and mean KL "
            f"at most {GOALS['kl_ratio']}x data-free W8A8 on the BN-preserving export")
    folded = next((r for r in rows if r["case"] == "mobilenet_v2_op17_dyn"), None)
    ours, free = (_fid(folded, "onnxopt") if folded else None), (_fid(bn_row, "onnxopt") if bn_row else None)
    if not ours or not free:
        return goal(text, {"mobilenet_v2": None}, {"mobilenet_v2": "not run"})
    points = 100 * (free["top1_agreement"] - ours["top1_agreement"])
    ratio = ours["kl_mean"] / free["kl_mean"]
    met = points <= GOALS["agreement_points"] and ratio <= GOALS["kl_ratio"]
    return goal(text, {"mobilenet_v2": met}, {"mobilenet_v2": (
        f"agreement {ours['top1_agreement']:.1%} vs {free['top1_agreement']:.1%} data-free; KL {ours['kl_mean']:.4f} vs "
        f"{free['kl_mean']:.4f} ({ratio:.2f}x)")})


# --------------------------------------------------------------------------- markdown
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _cov(rec: dict[str, Any]) -> str:
    c = rec.get("coverage")
    if not c:
        return "-"
    return f"{c['quantized']}/{c['layers']} ({c['share']:.0%})"


def _report_cov(rec: dict[str, Any]) -> str:
    c = rec.get("report_coverage")
    return "-" if not c else f"{c['done']}/{c['total']}"


def _fid_cells(row: dict[str, Any], key: str) -> list[str]:
    rec = _fid(row, key)
    return ["-", "-"] if not rec else [_pct(rec["top1_agreement"]), f"{rec['kl_mean']:.4f}"]


def _ms(row: dict[str, Any], threads: int, key: str) -> str:
    value = _median(row, threads, key)
    return "-" if value is None else f"{value:.3g}"


def summary_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        ours, ort = r["onnxopt"], r["ort_static"]
        fp32 = _fid(r, "fp32")
        out.append([
            r["title"], _cov(ours), _report_cov(ours), _cov(ort),
            *_fid_cells(r, "onnxopt"), *_fid_cells(r, "ort_static"),
            "-" if not fp32 else f"{fp32['accuracy_all'][0]}/{fp32['accuracy_all'][1]}",
            " / ".join(_ms(r, 1, k) for k in CONFIGS), " / ".join(_ms(r, 2, k) for k in CONFIGS),
            f"{ours['wall_seconds']:.1f}" + (f" ({ours['total_seconds']:.1f})" if "total_seconds" in ours else " (no model)"),
            "-" if ort.get("exit_code") else (f"{ort['wall_seconds']:.1f} ({ort['call_seconds']:.1f} + pre {ort['pre_process_seconds']:.1f}"
                                               + (" + failed try" if "failed_attempt" in ort else "") + ")"),
            f"{r['no_data']['exit_code']}" + (", names --calibration-data" if r["no_data"]["names_flag"] else ", names another cause"),
        ])
    return out


SUMMARY_HEADER = [
    "model", "onnxopt layers quantized", "report coverage", "quantize_static layers", "onnxopt agreement", "onnxopt KL",
    "static agreement", "static KL", "FP32 top-1 (labels)", "1 thr ms FP32 / ours / static", "2 thr ms FP32 / ours / static",
    "onnxopt s: process (report)", "static s: process (call + pre)", "no data: exit",
]


def render_markdown(data: dict[str, Any]) -> str:
    env, rows, bn = data["environment"], data["rows"], data.get("bn_preserved")
    verdict = {True: "met", False: "**NOT met**", None: "n/a"}
    goal_rows = []
    for g in data["goals"]:
        detail = "; ".join(f"{k}: {v}" for k, v in g["values"].items() if k in g["failed"] or k in g["missing"] or len(g["values"]) == 1)
        tail = f"failed on {', '.join(g['failed'])}" if g["failed"] else ""
        tail += (("; " if tail else "") + f"not measured on {', '.join(g['missing'])}") if g["missing"] else ""
        goal_rows.append([g["goal"], verdict[g["met"]], "; ".join(x for x in (tail, detail) if x) or "every model"])
    lines = [
        "# Third-party models: BN-folded exports at opsets 11-17, calibrated with 10 real samples",
        "",
        f"Generated by `{data['command']}` on {env['date']} ({'quick' if data['settings']['quick'] else 'full'} mode, "
        f"{data['seconds']:.0f} s), {env['cpus_usable']} usable CPU(s) shared with other jobs "
        f"(1-minute load average at the start {data['load_average_start']}); source {env['git_commit'] or '?'}"
        f"{' + uncommitted changes' if env['git_dirty_files'] else ''}. What is measured and how: the docstring of "
        "bench/third_party.py. Raw numbers: third_party.json.",
        "",
        "## Goals", "",
        *table(["goal", "verdict", "where / measured"], goal_rows),
        "",
        "## Per model", "",
        "onnxopt = `onnxopt SRC -o OUT --quantize w8a8 --calibration-data <10 samples>`; static = ORT `quant_pre_process` + "
        "`quantize_static` (QDQ, per-channel, MinMax) on the same 10 samples. Layers quantized = constant-weight "
        "Conv/Gemm/MatMul of the FP32 file (subgraphs included) whose weight reads a DequantizeLinear in the output; "
        "report coverage = the `coverage` entry of onnxopt's JSON report. Agreement / KL: vs FP32 in ORT. Latency: "
        "ORT_ENABLE_ALL, batch 1, medians of interleaved runs. Times: wall time of the process (report.total_seconds; "
        "for ORT the quantize_static call + its pre-processing).",
        "",
        *table(SUMMARY_HEADER, summary_rows(rows)),
        "",
        "Evaluation inputs: " + "; ".join(dict.fromkeys(f"{TITLES.get(r.get('model', ''), r['title'])}: {r['eval_inputs']}" for r in rows)) + ".",
        "",
    ]
    diag = [[r["title"], *_fid_cells(r, "onnxopt"), *_fid_cells(r, NO_SPIQ), *_fid_cells(r, "ort_static")] for r in rows if NO_SPIQ in r]
    if diag:
        lines += ["## Diagnostic: the same calibrated run with `--no-spiq`", "",
                  "Fidelity only (not timed), on the opset-17 dynamic-batch exports: whether the SPIQ scale folding "
                  "(`spiq=auto`, the default) helps or hurts when the ranges come from 10 calibration samples.", "",
                  *table(["model", "default agreement", "default KL", "--no-spiq agreement", "--no-spiq KL",
                          "static agreement", "static KL"], diag), ""]
    modes = [[r["title"], *(c for key in [*ACT_RANGES, "ort_static"] for c in _fid_cells(r, key))] for r in rows if NO_SPIQ in r]
    if modes:
        lines += ["## Diagnostic: the calibrated run with each `--act-ranges` mode", "",
                  "Fidelity only (not timed), on the opset-17 dynamic-batch exports, 10 calibration samples: `minmax` (per-channel "
                  "min/max of every quantized tensor), `moments` (per-channel mean and std of every layer output, used like BN "
                  "statistics: mean ± λ·std propagated through ReLU/ReLU6/Add/pooling, SPIQ decided as data-free), `percentile` "
                  "(0.01/99.99 percentiles).", "",
                  *table(["model", *(f"{m} {what}" for m in ("minmax", "moments", "percentile", "static") for what in ("agreement", "KL"))],
                         modes), ""]
    if bn:
        ours = _fid(bn, "onnxopt")
        lines += ["## BN-preserving export, data-free", "",
                  f"{bn['title']}: `{bn['onnxopt']['command']}`: exit {bn['onnxopt']['exit_code']}, layers quantized "
                  f"{_cov(bn['onnxopt'])} (the first Conv reads the graph input, which has no statistics: float by default), "
                  + ("no fidelity" if not ours else f"top-1 agreement {ours['top1_agreement']:.1%}, mean KL {ours['kl_mean']:.4f}")
                  + " on the same evaluation inputs as the MobileNetV2 rows.", ""]
    problems = [f"- {r['title']}: {e}" for r in [*rows, *([bn] if bn else [])] for e in r.get("errors", [])]
    problems += [f"- {r['title']}: quantize_static ran without ORT's pre-processing ({r['ort_static']['pre_process_error']})"
                 for r in rows if r["ort_static"].get("pre_process") is False]
    problems += [f"- {r['title']}: quantize_static's output of the opset-{r['ort_static']['converted_from_opset']} file does not load "
                 f"in ORT (`{load_error_tail(r['ort_static']['failed_attempt'].get('load_error', ''))}`); its numbers are for the file "
                 "upgraded to opset 13 with onnx.version_converter (what onnxopt does itself)" for r in rows if "failed_attempt" in r["ort_static"]]
    problems += [f"- {r['title']}: quantize_static's output does not load in ORT: {r['ort_static']['load_error']}"
                 for r in rows if "load_error" in r["ort_static"]]
    problems += [f"- {r['title']}: quantize_static exited 0 but quantized none of the {r['ort_static']['coverage']['layers']} layers "
                 "(silently)" for r in rows if r["ort_static"].get("coverage", {}).get("quantized", 1) == 0]
    said: dict[str, list[str]] = {}
    for r in rows:
        said.setdefault(r["no_data"]["message"] or "(nothing)", []).append(r["title"])
    problems += [f"- without calibration data ({'; '.join(titles)}): `{message}`" for message, titles in said.items()]
    notes = sorted({n for r in rows for n in r["onnxopt"].get("notes", [])})
    lines += ["## Messages, failures and notes", "", *(problems or ["none"]), "",
              "onnxopt report notes seen: " + ("; ".join(f"`{n}`" for n in notes) if notes else "none") + ".", ""]
    return "\n".join(lines)


def load_error_tail(message: str) -> str:
    """The part of an ORT load error that says what is wrong (not the temporary path)."""
    tail = message.split("failed:", 1)[-1]
    return tail[tail.rfind("Error "):] if "Error " in tail else tail[-200:]
