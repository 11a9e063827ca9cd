"""The BN folding benchmark's verdicts and markdown report (bench/results/bn_fold.md):
BN nodes left per tool against the best peer, the flags (more BN than a peer, a missed
strictly-fewer goal, slower beyond noise) and the tables.  The measurements are made by
:mod:`bench.bn_fold`, whose docstring says what is measured and how.
"""

from __future__ import annotations

from statistics import median
from typing import Any

from bench.common import table

RESNET50_PASS_GOAL_S = 2.0

# Tool key -> column title.  "onnxopt" is the default preset (fold-batchnorm).
TOOLS = {
    "onnxopt": "onnxopt default",
    "onnxopt_classic": "onnxopt classic",
    "onnxoptimizer_fuse_bn": "onnxoptimizer fuse_bn_into_conv",
    "onnxoptimizer_default": "onnxoptimizer default",
    "ort_extended": "ORT EXTENDED",
    "ort_all": "ORT ALL",
}
PEERS = {"onnxoptimizer": ("onnxoptimizer_fuse_bn", "onnxoptimizer_default"), "ORT": ("ort_extended", "ort_all")}
# Models on which onnxopt should leave strictly fewer BN than every peer (why).
STRICT_GOAL = {
    "edge_bn_after_add": "BN after Add",
    "edge_bn_after_concat": "BN after Concat",
    "edge_bn_pool_linear": "BN before GlobalAveragePool -> Linear",
    "edge_bn_before_conv_nopad": "BN before an unpadded Conv",
    "preact_resnet": "BN after the residual Add",
    "densenet": "BN after Concat and AveragePool",
}


# --------------------------------------------------------------------------- verdicts
def bn_left(tool: dict[str, Any], computed: bool) -> int | None:
    """BN nodes a tool left (``computed``: plus those ORT turned into NCHWc Convs); None if it failed."""
    if tool.get("status") != "ok":
        return None
    return tool["bn"] + (tool.get("bn_as_nchwc_conv", 0) if computed else 0)


def best_peer(result: dict[str, Any], computed: bool) -> tuple[int | None, str]:
    """Fewest BN any peer tool left, and which tool(s)."""
    counts = {key: bn_left(result["tools"][key], computed) for keys in PEERS.values() for key in keys}
    counts = {k: v for k, v in counts.items() if v is not None}
    if not counts:
        return None, ""
    best = min(counts.values())
    return best, ", ".join(TOOLS[k] for k, v in counts.items() if v == best)


def bn_flags(result: dict[str, Any]) -> list[str]:
    """Where onnxopt leaves more BN than a peer, or misses the strictly-fewer goal."""
    if "tools" not in result:
        return []
    name, mine = result["name"], bn_left(result["tools"]["onnxopt"], False)
    if mine is None:
        return [f"{name}: onnxopt failed: {result['tools']['onnxopt'].get('detail', '')}"]
    flags = []
    computed, who = best_peer(result, True)
    literal, who_literal = best_peer(result, False)
    if computed is not None and mine > computed:
        flags.append(f"{name}: onnxopt leaves {mine} BN, more than {who} ({computed})")
    elif literal is not None and mine > literal:
        flags.append(
            f"{name}: onnxopt leaves {mine} BatchNormalization node(s), {who_literal} shows {literal}: "
            f"ORT_ENABLE_ALL rewrote the BN as NCHWc depthwise Conv(s) (still computed, not folded)"
        )
    if name in STRICT_GOAL and computed is not None and mine >= computed:
        flags.append(f"{name}: goal missed: {STRICT_GOAL[name]}, onnxopt {mine} BN is not fewer than {who} ({computed})")
    return flags


def changed_by(result: dict[str, Any]) -> str:
    """Which passes of onnxopt's default pipeline modified the model."""
    pipeline = result["tools"]["onnxopt"].get("pipeline", {})
    return ", ".join(name for name, p in pipeline.items() if p["modified"]) or "none"


def latency_flags(result: dict[str, Any]) -> list[str]:
    flags = []
    for threads, block in result.get("latency", {}).get("threads", {}).items():
        opt = block.get("stats", {}).get("onnxopt")
        if opt and opt["slower_beyond_noise"]:
            base = block["stats"]["original"]
            identical = result["tools"]["onnxopt"].get("identical_to_original")
            cause = (
                "the onnxopt model is byte-identical to the original, so this is the difference between two "
                "sessions of the same graph (measurement noise)" if identical
                else f"passes that changed the model: {changed_by(result)}"
            )
            flags.append(
                f"{result['name']} ({threads} thread(s)): onnxopt model slower than the original beyond noise: "
                f"{opt['median_ms']:.4g} ms [IQR {opt['q1_ms']:.4g}-{opt['q3_ms']:.4g}] vs "
                f"{base['median_ms']:.4g} ms [IQR {base['q1_ms']:.4g}-{base['q3_ms']:.4g}]; {cause}"
            )
    return flags


# --------------------------------------------------------------------------- markdown
def fmt_bn(tool: dict[str, Any]) -> str:
    if tool.get("status") != "ok":
        return tool.get("status", "?")
    extra = tool.get("bn_as_nchwc_conv", 0)
    return f"{tool['bn']} (+{extra} NCHWc)" if extra else str(tool["bn"])


def fmt_err(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    if "error" in record:
        return "error"
    value = record["max_rel"]
    return f"{value:.2e}" + ("" if record["passed"] else " FAIL")


def fmt_ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median_ms']:.4g} ({stats['iqr_ms']:.2g})"


def bn_verdict(result: dict[str, Any]) -> str:
    mine = bn_left(result["tools"]["onnxopt"], False)
    computed, _ = best_peer(result, True)
    if mine is None or computed is None:
        return "n/a"
    if mine > computed:
        return "**MORE**"
    return "fewer" if mine < computed else "equal"


def bn_section(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        [r["name"], str(r["bn_before"]), *(fmt_bn(r["tools"][k]) for k in TOOLS), bn_verdict(r)]
        for r in results if "tools" in r
    ]
    lines = ["## BatchNormalization nodes left", ""]
    lines += table(["model", "before", *TOOLS.values(), "onnxopt vs best peer"], rows)
    lines += [
        "",
        "\"+k NCHWc\": ORT_ENABLE_ALL turned k BatchNormalization nodes into NCHWc depthwise 1x1 Convs "
        "(named `*_bn_nchwc`): no longer BN nodes, but still computed. The verdict column compares onnxopt "
        "with the fewest BN any peer leaves counting those (\"fewer\" = strictly fewer).",
    ]
    return lines


def correctness_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        c = r.get("correctness")
        if c is None:
            continue
        real = c.get("onnxopt_real_images")
        real_text = "-" if not real else ("error" if "error" in real else f"{real['max_rel']:.2e}, top-1 {real['top1_agreement']:.0%}")
        rows.append([r["name"], *(fmt_err(c.get(k)) for k in ("onnxopt", "onnxopt_classic", "onnxoptimizer_fuse_bn", "onnxoptimizer_default")), real_text])
    lines = ["## Correctness (max relative error vs the original, `onnxopt.verify`)", ""]
    lines += table(["model", *(TOOLS[k] for k in ("onnxopt", "onnxopt_classic", "onnxoptimizer_fuse_bn", "onnxoptimizer_default")), "onnxopt on 20 real ImageNet images"], rows)
    lines += ["", "Random standard-normal inputs of the model's shape, ORT with graph optimizations off; "
              "max rel = max|a-b| / max|b| over each output; FAIL = outside atol 1e-5 + rtol 1e-4."]
    return lines


def latency_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        latency = r.get("latency", {})
        if "skipped" in latency:
            rows.append([r["name"], "-", latency["skipped"], "", "", "", "", "", ""])
        for threads, block in latency.get("threads", {}).items():
            if "error" in block:
                rows.append([r["name"], threads, "error: " + block["error"], "", "", "", "", "", ""])
                continue
            s = block["stats"]
            opt, peer = s.get("onnxopt"), s.get("onnxoptimizer_fuse_bn")
            flag = "**slower**" if opt and opt["slower_beyond_noise"] else ""
            load = block["load_average_before"][0] if block["load_average_before"] else "-"
            rows.append([
                r["name"], threads, fmt_ms(s["original"]), fmt_ms(opt), f"{opt['speedup']:.3f}x" if opt else "-",
                fmt_ms(peer), f"{peer['speedup']:.3f}x" if peer else "-", str(opt["runs"] if opt else s["original"]["runs"]),
                f"{load} {flag}".strip(),
            ])
    lines = ["## Latency in ONNX Runtime (ORT_ENABLE_ALL), ms: median (IQR)", ""]
    lines += table(["model", "threads", "original", "onnxopt", "speed-up", "onnxoptimizer fuse_bn", "speed-up", "runs", "load avg / flag"], rows)
    lines += ["", "Speed-up = original median / median, all configurations of a model timed round-robin in one process "
              "(intra-op spinning off). \"slower\" = the onnxopt IQR lies wholly above the original's "
              "and its median is at least 2 % higher. "
              "Load avg = the machine's 1-minute load average when the block started (other processes add noise)."]
    return lines


def pass_time_section(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        tool = r.get("tools", {}).get("onnxopt", {})
        if tool.get("status") != "ok":
            continue
        stats = tool["pass_stats"]
        classic = r["tools"]["onnxopt_classic"]
        classic_s = f"{classic['pass_seconds'][0]:.3f}" if classic.get("status") == "ok" else classic.get("status", "-")
        rows.append([
            r["name"], str(r["bn_before"]), str(stats.get("bn_folded", "-")), str(stats.get("bn_kept", "-")),
            f"{median(tool['pass_seconds']):.3f}", f"{min(tool['pass_seconds']):.3f}",
            f"{median(tool['all_passes_seconds']):.3f}", f"{median(tool['report_total_seconds']):.3f}",
            f"{median(tool['optimize_seconds']):.3f}", classic_s,
        ])
    lines = ["## Optimizer time, s", ""]
    header = ["model", "BN before", "folded", "kept", "fold-batchnorm (median)", "(min)", "all 4 passes",
              "report total", "whole optimize() call (median)", "fold-conv-bn (classic)"]
    lines += table(header, rows)
    lines += ["", "Medians over the repeats. \"all 4 passes\" = sum of the default preset's pass times; \"report total\" = the PassManager's "
              "total (passes plus the metrics taken around them); the whole call also loads the model from disk."]
    resnet50 = next((r for r in results if r["name"] == "resnet50" and r.get("tools", {}).get("onnxopt", {}).get("status") == "ok"), None)
    if resnet50:
        tool = resnet50["tools"]["onnxopt"]
        seconds = median(tool["pass_seconds"])
        verdict = "met" if seconds < RESNET50_PASS_GOAL_S else "**NOT met**"
        lines += ["", f"ResNet-50: fold-batchnorm pass {seconds:.3f} s (median of {len(tool['pass_seconds'])}), "
                      f"goal < {RESNET50_PASS_GOAL_S:g} s on 2 cores: {verdict}; whole optimize() "
                      f"{median(tool['optimize_seconds']):.3f} s, of which all passes "
                      f"{median(tool['all_passes_seconds']):.3f} s and the report total "
                      f"{median(tool['report_total_seconds']):.3f} s."]
    return lines


def failures_section(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"- {r['name']}: {r['error']}")
        for key, tool in r.get("tools", {}).items():
            if tool.get("status") != "ok":
                lines.append(f"- {r['name']} / {TOOLS[key]}: {tool['status']}: {tool.get('detail', '')}")
    return ["## Tool failures", "", *(lines or ["none"])]


def render_markdown(data: dict[str, Any]) -> str:
    results, env = data["models"], data["environment"]
    flags = [f for r in results for f in bn_flags(r) + latency_flags(r)]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# BatchNormalization folding benchmark",
        "",
        f"Generated by `{data['command']}` on {env['date']} ({'quick' if data['settings']['quick'] else 'full'} mode, "
        f"{data['seconds']:.0f} s). {env['cpu_model']}, {env['cpus_usable']} usable CPU(s); {versions}. "
        f"Source: {env['git_commit'] or '?'}{' + uncommitted changes' if env['git_dirty_files'] else ''}. "
        "Raw numbers: bn_fold.json. What is measured and how: the docstring of bench/bn_fold.py.",
        "",
        "## Flags",
        "",
        *([f"- {f}" for f in flags] or ["none: onnxopt never leaves more BN than a peer, and is never slower beyond noise"]),
        "",
        *bn_section(results), "",
        *correctness_section(results), "",
        *latency_section(results), "",
        *pass_time_section(results), "",
        *failures_section(results), "",
    ]
    return "\n".join(lines)
