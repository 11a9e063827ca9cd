"""Decode and prefill latency, weight bytes and fidelity of weight-only MatMulNBits models,
with REx's residual order (``rex_budget``) against W4, W8 and ONNX Runtime's quantizers.

    python -m bench decode                          # 4-layer synthetic stack + MiniLM → bench/results/decode.md (+ .json, .png)
    python -m bench decode --layers 20 --configs fp32,w8,w4,w4_rex25 --skip minilm --tag 3gb   # ≥ 3 GB stack
    python -m bench decode --combine                # how a partial residual order joins the output (→ decode_combine.md)
    python -m bench decode --configs w4,w8,ort_rtn,ort_hqq,w4_fzp,w4_a4,w8_a4,ort_rtn_a4,ort_hqq_a4,w4_fzp_a4 --tag zero_points
    python -m bench decode --allocation --layers 2  # per-layer vs network residual allocation, fidelity and bytes (→ decode_allocation.md)

Models (from :mod:`bench.weight_only`):

* **synthetic decoder stack** (``--layers``, default 4: about 0.6 GB of float32 weights):
  LayerNorm → MatMul(D, D) → Add → LayerNorm → MatMul(D, 4D) → Gelu → MatMul(4D, D) → Add,
  D = 2048, Student-t(5) weights.  Fidelity: relative L2 output error to FP32 on 16 random
  tokens.  Latency: **decode** = one token [1, 1, D] (batch 1: every weight read once),
  **prefill** = ``--prefill`` tokens [1, T, D]; each at 1 and 2 intra-op threads.
* **all-MiniLM-L6-v2** (real weights): sentence-embedding cosine to FP32 (mean, min) over
  ``bench.quantize.SENTENCES``; fidelity and bytes only (its latency is in weight_only.md).

Configurations: ``fp32``; ``w8`` and ``w4`` (onnxopt weight-only, clipping search, block 32);
``w4_rex25`` / ``w4_rex50`` / ``w4_rex100`` (W4 + a 4-bit residual order at budget 0.25 / 0.5 /
1.0 of the base's bytes, the same share in every layer: ``rex_allocation="layer"``);
``w4_rex2b`` (W4 + a 2-bit residual in blocks of 128 over all columns: 0.44 of the base's
bytes); ``w4g64_rex2b`` (the same on a W4 base in blocks of 64: 1.33× W4's bytes in all);
``w4_rexnet20`` / ``w4_rexnet25`` / ``w4_rexnet33`` / ``w4_rexnet40`` (budget 0.2 / 0.25 / 0.33 / 0.4 spent over the whole model,
``rex_allocation="network"``: 2-bit residual columns in blocks of 128, 4-bit where that removes
more per byte, one residual width per layer); ``ort_rtn`` / ``ort_hqq`` (ONNX Runtime's
MatMulNBitsQuantizer, 4 bits, block 32; HQQ stores float zero points); ``w4_fzp`` (W4 with
``zero_points="float"``: least-squares-fitted float zero points, as HQQ's format);
``<config>_a4``: the same file with ``accuracy_level`` 4 (int8 activations inside the kernel).

Timing: all configurations of one (tokens, threads) setting in one process, round-robin
(:func:`bench.common.time_interleaved`, spinning off), median and IQR.  The machine is shared
with other jobs, so latency is noisy: the load average is recorded, and ratios between rows
of one table (measured interleaved) are more meaningful than absolute times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

import onnxopt
from bench.common import (
    Timing,
    config_rows,
    environment,
    json_safe,
    ort_session,
    summarize,
    table,
    time_interleaved,
)
from bench.weight_only import (
    minilm_inputs,
    record_embedding_cosines,
    build_ort,
    file_bytes,
    save_external,
    synthetic_decoder,
    timed,
)

RESULTS = Path(__file__).parent / "results"
D_MODEL, FF = 2048, 8192
CONFIGS = {
    "fp32": "FP32",
    "w8": "W8 (onnxopt)",
    "w4": "W4 (onnxopt, clipping search)",
    "w4_rex25": "W4 + REx 0.25 (onnxopt)",
    "w4_rex50": "W4 + REx 0.5 (onnxopt)",
    "w4_rex100": "W4 + REx 1.0 (onnxopt, full 2nd order)",
    "w4_rex2b": "W4 + 2-bit REx (block 128, all columns, 0.44)",
    "w4g64_rex2b": "W4 block 64 + 2-bit REx (block 128, all columns)",
    "w4_rexnet20": "W4 + REx 0.2, network allocation (2/4-bit residual, block 128)",
    "w4_rexnet25": "W4 + REx 0.25, network allocation (2/4-bit residual, block 128)",
    "w4_rexnet33": "W4 + REx 0.33, network allocation (2/4-bit residual, block 128)",
    "w4_rexnet40": "W4 + REx 0.4, network allocation (2/4-bit residual, block 128)",
    "ort_rtn": "W4 ORT MatMulNBitsQuantizer RTN",
    "ort_hqq": "W4 ORT MatMulNBitsQuantizer HQQ",
    "w4_fzp": "W4 float zero points (onnxopt)",
    "w8_a4": "W8, accuracy_level 4",
    "w4_a4": "W4, accuracy_level 4",
    "w4_rex25_a4": "W4 + REx 0.25, accuracy_level 4",
    "w4_rex50_a4": "W4 + REx 0.5, accuracy_level 4",
    "w4_rex100_a4": "W4 + REx 1.0, accuracy_level 4",
    "w4_rex2b_a4": "W4 + 2-bit REx (block 128, all columns, 0.44), accuracy_level 4",
    "w4g64_rex2b_a4": "W4 block 64 + 2-bit REx (block 128, all columns), accuracy_level 4",
    "ort_rtn_a4": "W4 ORT RTN, accuracy_level 4",
    "ort_hqq_a4": "W4 ORT HQQ, accuracy_level 4",
    "w4_fzp_a4": "W4 float zero points (onnxopt), accuracy_level 4",
    "w4_rexnet20_a4": "W4 + REx 0.2, network allocation (2/4-bit residual, block 128), accuracy_level 4",
    "w4_rexnet25_a4": "W4 + REx 0.25, network allocation (2/4-bit residual, block 128), accuracy_level 4",
    "w4_rexnet33_a4": "W4 + REx 0.33, network allocation (2/4-bit residual, block 128), accuracy_level 4",
    "w4_rexnet40_a4": "W4 + REx 0.4, network allocation (2/4-bit residual, block 128), accuracy_level 4",
}
#: The per-layer rows keep ``rex_allocation="layer"`` (the same share of every layer's bytes); ``w4_rexnet*`` spend the budget
#: over the whole model (the default allocation: 2-bit residual columns, upgraded to 4 bits where that removes more per byte).
PER_LAYER = {"rex_allocation": "layer"}
NETWORK = {"rex_allocation": "network", "rex_block_size": 128}
OURS = {"w8": {"weight_bits": 8}, "w4": {}, "w4_rex25": {"rex_budget": 0.25, **PER_LAYER}, "w4_rex50": {"rex_budget": 0.5, **PER_LAYER},
        "w4_rex100": {"rex_budget": 1.0, **PER_LAYER},
        "w4_rex2b": {"rex_budget": 0.45, "rex_bits": 2, "rex_block_size": 128, **PER_LAYER},
        "w4g64_rex2b": {"block_size": 64, "rex_budget": 0.5, "rex_bits": 2, "rex_block_size": 128, **PER_LAYER},
        "w4_rexnet20": {"rex_budget": 0.2, **NETWORK}, "w4_rexnet25": {"rex_budget": 0.25, **NETWORK}, "w4_rexnet33": {"rex_budget": 0.33, **NETWORK}, "w4_rexnet40": {"rex_budget": 0.4, **NETWORK},
        "w4_fzp": {"zero_points": "float"}}
#: ``<config>_a4``: the same file with every MatMulNBits at accuracy_level 4 (int8 activations inside the kernel).
ACCURACY4 = "_a4"
REX = ("w4_rex25", "w4_rex50", "w4_rex100", "w4_rex2b", "w4g64_rex2b", "w4_rexnet20", "w4_rexnet25", "w4_rexnet33", "w4_rexnet40")
#: Float zero points (ORT HQQ's and ours): off ORT's fast CPU path at every accuracy_level.
FLOAT_ZERO_POINTS = ("ort_hqq", "w4_fzp", "ort_hqq_a4", "w4_fzp_a4")
#: Timed apart with few runs: far off ORT's fast path (W8 and the 2-bit residuals at accuracy_level 0, float zero points).
SLOW = ("w8", "w4_rex2b", "w4g64_rex2b", "w4_rexnet20", "w4_rexnet25", "w4_rexnet33", "w4_rexnet40", *FLOAT_ZERO_POINTS)
#: Run by default: all but the 2-bit residuals at accuracy_level 0 (off ORT's fast path, see the notes).
DEFAULT_CONFIGS = [k for k in CONFIGS if k not in ("w4_rex2b", "w4g64_rex2b", "w4_rexnet20", "w4_rexnet25", "w4_rexnet33", "w4_rexnet40")]
#: REx goal: the residual order closes at least this share of the W4 → W8 fidelity gap ...
GAP_SHARE = 0.5
#: ... at most this times W4's decode latency (and below W8's).
LATENCY_FACTOR = 1.35


def log(message: str) -> None:
    print(f"[decode] {message}", flush=True)


# --------------------------------------------------------------------------- building
def weight_bytes(path: Path) -> int:
    """Bytes of the model's initializers (the weights a forward pass reads)."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        entry = {e.key: e.value for e in tensor.external_data}
        total += int(entry["length"]) if "length" in entry else len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


STAT_KEYS = ("layers_quantized", "relative_error_mean", "rex_columns_share", "rex_bytes_share", "rex_relative_error_mean")


def build_ours(src: Path, dst: Path, options: dict[str, Any], isolate: bool = False) -> dict[str, Any]:
    """The weight-only preset with ``options``; ``isolate``: in a child ``onnxopt`` process
    (large models: its memory is returned to the system when it exits).  Built at
    accuracy_level 0 (the pass's default is 4); the ``_a4`` rows set 4 on the same files."""
    options = {"accuracy_level": 0, **options}
    if isolate:
        report_path = dst.with_suffix(".report.json")
        args = [sys.executable, "-m", "onnxopt", str(src), "-o", str(dst), "--preset", "weight-only", "--report", str(report_path), "-q"]
        args += [a for key, value in options.items() for a in ("--set", f"{key}={json.dumps(value)}")]
        proc, seconds = timed(lambda: subprocess.run(args, capture_output=True, text=True))
        if proc.returncode:
            raise RuntimeError(f"onnxopt exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        stats = next(p for p in json.loads(report_path.read_text())["passes"] if p["name"] == "weight-only")["stats"]
    else:
        (model, report), seconds = timed(lambda: onnxopt.optimize(src, preset="weight-only", **options))
        save_external(model, dst)
        stats = next(p for p in report.passes if p.name == "weight-only").stats
    return {"quant_seconds": seconds, **{k: stats[k] for k in STAT_KEYS if k in stats}}


def with_accuracy_level(src: Path, dst: Path, level: int) -> dict[str, Any]:
    """``src`` with every MatMulNBits at ``accuracy_level`` (the weights are shared; ORT's
    quantizer omits the attribute at 0, so it is added where missing)."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [attr for attr in node.attribute if attr.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    save_external(model, dst)
    return {"derived_from": src.stem}


def build_all(src: Path, work: Path, only: set[str], isolate: bool = False) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    paths: dict[str, Path] = {"fp32": src}
    records: dict[str, dict[str, Any]] = {"fp32": {}}
    wanted = only | {k.removesuffix(ACCURACY4) for k in only if k.endswith(ACCURACY4)}
    for key in CONFIGS:
        if key == "fp32" or key not in wanted:
            continue
        dst = work / f"{key}.onnx"
        try:
            if key.endswith(ACCURACY4):
                base = key.removesuffix(ACCURACY4)
                records[key] = {**{k: v for k, v in records[base].items() if k != "quant_seconds"}, **with_accuracy_level(paths[base], dst, 4)}
            elif key in OURS:
                records[key] = build_ours(src, dst, OURS[key], isolate)
            else:
                records[key] = build_ort(src, dst, 4, 32, key.removeprefix("ort_"))
            paths[key] = dst
            log(f"  {key}: {records[key]}")
        except Exception as exc:  # noqa: BLE001 - a baseline that does not run here is reported, not fatal
            records[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            log(f"  {key}: ERROR {records[key]['error']}")
    for key in [k for k in paths if k not in only]:  # built only to derive an accuracy_level 4 configuration
        del paths[key], records[key]
    for key, path in paths.items():
        records[key]["size_bytes"] = file_bytes(path)
        records[key]["weight_bytes"] = weight_bytes(path)
    return paths, records


# --------------------------------------------------------------------------- measuring
SLOW_TIMING = Timing(warmup=1, min_runs=5, max_runs=5, target_seconds=0.0)


def measure_latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], timing: Timing, records: dict[str, dict[str, Any]], label: str,
                    skip: set[str] = frozenset()) -> None:
    """Latency at 1 and 2 threads: the fast configurations round-robin with ``timing``, the
    SLOW ones apart with 5 runs (else they would set the run count of all)."""
    for threads in (1, 2):
        for group, group_timing in ((lambda k: k not in SLOW, timing), (lambda k: k in SLOW, SLOW_TIMING)):
            sessions = {key: ort_session(path, "all", threads, spinning=False) for key, path in paths.items() if key not in skip and group(key)}
            if not sessions:
                continue
            samples = time_interleaved(sessions, feeds, **group_timing.kwargs())
            for key, values in samples.items():
                records[key][f"{label}_{threads}t"] = summarize(values)
            log(f"  {label} {threads} thread(s): " + ", ".join(f"{k} {summarize(v)['median_ms']:.2f}" for k, v in samples.items()))
            del sessions


def bench_synthetic(layers: int, only: set[str], timing: Timing, prefill: int, prefill_timing: Timing, slow_prefill: bool, isolate: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        work = Path(tmp)
        model, seconds = timed(lambda: synthetic_decoder(layers, D_MODEL, FF))
        src = save_external(model, work / "fp32.onnx")
        del model
        log(f"synthetic decoder: {layers} layers built in {seconds:.1f} s, {file_bytes(src) / 1e9:.2f} GB")
        paths, records = build_all(src, work, only, isolate)
        tokens = {"x": np.random.default_rng(5).standard_normal((1, 16, D_MODEL)).astype(np.float32)}
        reference = None
        for key, path in paths.items():
            out = ort_session(path, "all").run(None, tokens)[0][0]
            reference = out if key == "fp32" else reference
            records[key]["relative_error"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        measure_latency(paths, {"x": tokens["x"][:, :1]}, timing, records, "decode")
        if prefill:
            x = np.random.default_rng(6).standard_normal((1, prefill, D_MODEL)).astype(np.float32)
            measure_latency(paths, {"x": x}, prefill_timing, records, "prefill", set() if slow_prefill else set(FLOAT_ZERO_POINTS))
    return {"layers": layers, "d": D_MODEL, "ff": FF, "prefill_tokens": prefill, "fp32_gb": layers * (D_MODEL * D_MODEL + 2 * D_MODEL * FF) * 4 / 1e9, "configs": records}


def bench_minilm(only: set[str]) -> dict[str, Any]:
    raw, feeds, seq_len = minilm_inputs()
    with tempfile.TemporaryDirectory(prefix="bench_decode_minilm_") as tmp:
        work = Path(tmp)
        folded, _ = onnxopt.optimize(raw)
        src = save_external(folded, work / "fp32.onnx")
        paths, records = build_all(src, work, only)
        record_embedding_cosines(paths, feeds, records)
    return {"sentences": len(next(iter(feeds.values()))), "seq_len": seq_len, "configs": records}


# --------------------------------------------------------------------------- per-layer vs network allocation
#: The allocation sweep's configurations (fidelity and bytes only, accuracy_level 0): per-layer budgets at 4 bits (block 32) and at
#: 2 bits (block 128), and the network allocation with the residual in blocks of 32 (the base's) and 128.
ALLOCATION_BUDGETS = (0.1, 0.25, 0.5)
ALLOCATION_FORMS = {
    "layer, 4-bit residual, block 32": {"rex_allocation": "layer"},
    "layer, 2-bit residual, block 128": {"rex_allocation": "layer", "rex_bits": 2, "rex_block_size": 128},
    "network, 2/4-bit residual, block 32": {"rex_allocation": "network", "rex_block_size": 32},  # the network default is 128
    "network, 2/4-bit residual, block 128": {"rex_allocation": "network", "rex_block_size": 128},
}
ALLOCATION_STATS = ("rex_bytes_share", "rex_columns_share", "rex_one_rung_kept", "rex_mixed_layers", "rex_bits_layers")


def allocation_sweep(src: Path, work: Path, error_of: Callable[[Path], float]) -> dict[str, Any]:
    """W8, W4 and every (form, budget) of the sweep built from ``src`` (accuracy_level 0):
    weight bytes, quantization time, the residual's stats and ``error_of(model)``."""
    configs: dict[str, dict[str, Any]] = {"W8": {"weight_bits": 8}, "W4": {}}
    configs.update({f"{form} @ {budget:g}": {"rex_budget": budget, **options} for budget in ALLOCATION_BUDGETS for form, options in ALLOCATION_FORMS.items()})
    records = {}
    for key, options in configs.items():
        (model, report), seconds = timed(lambda options=options: onnxopt.optimize(src, preset="weight-only", accuracy_level=0, **options))
        stats = next(p for p in report.passes if p.name == "weight-only").stats
        dst = save_external(model, work / f"sweep_{len(records)}.onnx")
        del model
        records[key] = {"quant_seconds": seconds, "weight_bytes": weight_bytes(dst), "error": error_of(dst), **{k: stats[k] for k in ALLOCATION_STATS if k in stats}}
        log(f"  {key}: {records[key]}")
    return records


def bench_allocation(layers: int, skip: set[str]) -> dict[str, Any]:
    """The allocation sweep on the synthetic stack (relative output error) and MiniLM (1 − mean cosine)."""
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_decode_alloc_") as tmp:
        work = Path(tmp)
        if "synthetic" not in skip:
            src = save_external(synthetic_decoder(layers, D_MODEL, FF), work / "fp32.onnx")
            tokens = {"x": np.random.default_rng(5).standard_normal((1, 16, D_MODEL)).astype(np.float32)}
            reference = ort_session(src, "all").run(None, tokens)[0]

            def output_error(path: Path) -> float:
                out = ort_session(path, "all").run(None, tokens)[0]
                return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

            data["synthetic"] = {"layers": layers, "error": "relative output error", "configs": allocation_sweep(src, work, output_error)}
        if "minilm" not in skip:
            raw, feeds, _ = minilm_inputs()
            folded, _ = onnxopt.optimize(raw)
            src = save_external(folded, work / "minilm.onnx")

            def cosine_error(path: Path) -> float:
                records: dict[str, dict[str, Any]] = {"fp32": {}, "q": {}}
                record_embedding_cosines({"fp32": src, "q": path}, feeds, records)
                return 1 - records["q"]["cosine_mean"]

            data["minilm"] = {"error": "1 − mean cosine", "configs": allocation_sweep(src, work, cosine_error)}
    return data


def allocation_markdown(data: dict[str, Any], command: str) -> list[str]:
    lines = ["# REx in MatMulNBits form: per-layer vs network allocation of the residual budget", "",
             (f"`{command}` — W4 base in blocks of 32 (clipping search), accuracy_level 0 (float products: the weights' effect alone); "
              "fidelity and bytes only (decode latency: decode_network.md). Gap closed = (error(W4) − error) / (error(W4) − error(W8)). "
              "`one rung kept`: the weighted error reduction of one residual node per layer as a share of the network greedy's with "
              "mixed 2/4-bit columns in a layer (what a second residual node per layer could add at most). The network rows have the "
              "pass's defaults: a residual without zero points whose codes are rounded together with its columns' base codes "
              "(rex_symmetric, rex_joint; docs/weight-only.md)."), ""]
    for model, title in (("synthetic", "Synthetic decoder stack ({layers} layers, D 2048, FF 8192)"), ("minilm", "all-MiniLM-L6-v2")):
        if model not in data:
            continue
        result, records = data[model], data[model]["configs"]
        w4, w8 = records["W4"], records["W8"]
        rows = []
        for key, rec in records.items():
            closed = (w4["error"] - rec["error"]) / (w4["error"] - w8["error"])
            rows.append([key, f"{rec['error']:.5f}", f"{closed:.2f}", f"{rec['weight_bytes'] / w4['weight_bytes']:.3f}",
                         str(rec.get("rex_bytes_share", "-")), str(rec.get("rex_one_rung_kept", "-")),
                         ", ".join(f"{n} × {b}-bit" for b, n in rec.get("rex_bits_layers", {}).items()) or "-", f"{rec['quant_seconds']:.0f}"])
        lines += [f"## {title.format(**result)}", "",
                  *table(["configuration @ budget", result["error"], "W4→W8 gap closed", "weight bytes / W4", "residual bytes / base",
                          "one rung kept", "residual layers", "quantization s"], rows), ""]
    return lines


# --------------------------------------------------------------------------- the join of a partial order
def bench_combine(timing: Timing) -> list[str]:
    """One 2048 × 8192 4-bit layer with a residual order on a quarter of its columns, joined
    five ways; latency at 1 and 128 tokens, 1 and 2 threads (random codes: only speed)."""
    from onnx import helper, numpy_helper

    k, n, share = D_MODEL, FF, 0.25
    rng = np.random.default_rng(0)
    n_blocks = k // 32
    count = int(n * share)
    columns = np.sort(rng.choice(n, count, replace=False)).astype(np.int64)
    rest = np.setdiff1d(np.arange(n), columns)
    inverse = np.argsort(np.concatenate([columns, rest])).astype(np.int64)

    def nbits(name: str, out: str, width: int) -> tuple[list[Any], list[Any]]:
        inits = [numpy_helper.from_array(rng.integers(0, 256, (width, n_blocks, 16), dtype=np.uint8), f"{name}_B"),
                 numpy_helper.from_array((rng.random(width * n_blocks) * 0.01).astype(np.float32), f"{name}_S"),
                 numpy_helper.from_array(rng.integers(0, 256, width * n_blocks // 2, dtype=np.uint8), f"{name}_Z")]
        node = helper.make_node("MatMulNBits", ["x", f"{name}_B", f"{name}_S", f"{name}_Z"], [out], domain="com.microsoft",
                                K=k, N=width, bits=4, block_size=32, accuracy_level=0)
        return [node], inits

    def const(name: str, value: np.ndarray) -> Any:
        return numpy_helper.from_array(value, name)

    def full_order() -> tuple[list[Any], list[Any]]:
        nodes, inits = nbits("r", "r", n)
        return [*nodes, helper.make_node("Add", ["yb", "r"], ["y"])], inits

    forms: dict[str, Callable[[], tuple[list[Any], list[Any]]]] = {
        "W4 base alone": lambda: ([helper.make_node("Identity", ["yb"], ["y"])], []),
        "full order, Add (2× bytes)": lambda: full_order(),
        "ScatterElements(add) (emitted)": lambda: (
            [helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Expand", ["cols", "s"], ["i"]),
             helper.make_node("ScatterElements", ["yb", "i", "r"], ["y"], axis=-1, reduction="add")], [const("cols", columns)]),
        "reordered base, Pad + Add + Gather": lambda: (
            [helper.make_node("Pad", ["r", "pads"], ["rp"]), helper.make_node("Add", ["yb", "rp"], ["t"]),
             helper.make_node("Gather", ["t", "inv"], ["y"], axis=-1)],
            [const("pads", np.array([0, 0, 0, 0, 0, n - count], np.int64)), const("inv", inverse)]),
        "reordered base, Split + Add + Concat + Gather": lambda: (
            [helper.make_node("Split", ["yb", "sp"], ["a", "b"], axis=-1), helper.make_node("Add", ["a", "r"], ["ar"]),
             helper.make_node("Concat", ["ar", "b"], ["c"], axis=-1), helper.make_node("Gather", ["c", "inv"], ["y"], axis=-1)],
            [const("sp", np.array([count, n - count], np.int64)), const("inv", inverse)]),
        "Gather(residual) × mask + Add": lambda: (
            [helper.make_node("Gather", ["r", "map"], ["g"], axis=-1), helper.make_node("Mul", ["g", "mask"], ["gm"]),
             helper.make_node("Add", ["yb", "gm"], ["y"])],
            [const("map", np.where(np.isin(np.arange(n), columns), np.searchsorted(columns, np.arange(n)), 0).astype(np.int64)),
             const("mask", np.isin(np.arange(n), columns).astype(np.float32))]),
    }
    with tempfile.TemporaryDirectory(prefix="bench_decode_combine_") as tmp:
        paths = {}
        for index, (label, make) in enumerate(forms.items()):
            nodes, inits = nbits("base", "yb", n)
            join, extra = make()
            if index >= 2:
                partial, partial_inits = nbits("r", "r", count)
                nodes, inits = nodes + partial, inits + partial_inits
            graph = helper.make_graph(nodes + join, "layer", [helper.make_tensor_value_info("x", 1, [1, "T", k])],
                                      [helper.make_tensor_value_info("y", 1, [1, "T", n])], inits + extra)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
            paths[label] = Path(tmp) / f"form{index}.onnx"
            onnx.save(model, str(paths[label]))
        results: dict[str, dict[str, float]] = {label: {} for label in forms}
        for tokens in (1, 128):
            x = {"x": rng.standard_normal((1, tokens, k)).astype(np.float32)}
            for threads in (1, 2):
                sessions = {label: ort_session(path, "all", threads, spinning=False) for label, path in paths.items()}
                for label, values in time_interleaved(sessions, x, **timing.kwargs()).items():
                    results[label][f"{tokens}/{threads}"] = summarize(values)["median_ms"]
    header = ["join", "1 token, 1 thread ms", "1 token, 2 threads", "128 tokens, 1 thread", "128 tokens, 2 threads"]
    rows = [[label, *(f"{r[c]:.3f}" for c in ("1/1", "1/2", "128/1", "128/2"))] for label, r in results.items()]
    return [
        "# How a partial REx order joins the base output (MatMulNBits)",
        "",
        (f"`python -m bench decode --combine` — one {k} × {n} 4-bit layer (block 32), a residual order on {share:.0%} of the columns "
         f"({count}); medians over round-robin runs, ORT {__import__('onnxruntime').__version__}, shared 2-core machine (load {load()})."),
        "",
        *table(header, rows),
        "",
        ("The ScatterElements form is what the weight-only pass emits (no reordering of the base, one op after the residual). The "
         "machine is shared: differences of a few percent between the joins are within the noise."),
    ]


# --------------------------------------------------------------------------- report
def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ms(record: dict[str, Any], key: str) -> str:
    lat = record.get(key)
    return f"{lat['median_ms']:.2f} ({lat['iqr_ms']:.2f})" if lat else "-"


def level(key: str) -> str:
    """The accuracy-level suffix of a configuration ("" or "_a4")."""
    return ACCURACY4 if key.endswith(ACCURACY4) else ""


def gap_closed(records: dict[str, dict[str, Any]], key: str, error: Callable[[dict[str, Any]], float]) -> float | None:
    """Share of the W4 → W8 error gap the configuration closes (1 = as good as W8), against
    W4 and W8 at the configuration's accuracy level."""
    suffix = level(key)
    w4, w8, rec = records.get("w4" + suffix, {}), records.get("w8" + suffix, {}), records.get(key, {})
    if any("error" in r or not r for r in (w4, w8, rec)):
        return None
    gap = error(w4) - error(w8)
    return (error(w4) - error(rec)) / gap if gap > 0 else None


def synthetic_section(result: dict[str, Any]) -> list[str]:
    records = result["configs"]

    def cells(key: str, rec: Mapping[str, Any]) -> list[str]:
        closed = gap_closed(records, key, lambda r: r["relative_error"])
        w4 = records.get("w4" + level(key), {})
        ratio = (f"{rec['decode_1t']['median_ms'] / w4['decode_1t']['median_ms']:.2f} / {rec['decode_2t']['median_ms'] / w4['decode_2t']['median_ms']:.2f}"
                 if "decode_1t" in w4 and "decode_1t" in rec else "-")
        return [f"{rec['relative_error']:.4f}", "-" if closed is None else f"{closed:.2f}", f"{rec['weight_bytes'] / 1e6:.1f}",
                ms(rec, "decode_1t"), ms(rec, "decode_2t"), ratio, ms(rec, "prefill_1t"), ms(rec, "prefill_2t"),
                f"{rec['quant_seconds']:.0f}" if "quant_seconds" in rec else "-"]

    rows = config_rows(CONFIGS, records, 10, cells)
    header = ["configuration", "relative output error", "W4→W8 gap closed", "weight MB", "decode 1t ms: median (IQR)", "decode 2t ms",
              "decode / W4 same level (1t / 2t)", f"prefill {result['prefill_tokens']} tok 1t ms", "prefill 2t ms", "quantization s"]
    if not result["prefill_tokens"]:  # no prefill timed: drop its columns
        header = header[:7] + header[9:]
        rows = [row[:7] + row[9:] for row in rows]
    return [f"## Synthetic decoder stack: {result['layers']} layers, D {result['d']}, FF {result['ff']} ({result['fp32_gb']:.2f} GB float32)", "",
            *table(header, rows), ""]


def minilm_section(result: dict[str, Any]) -> list[str]:
    records = result["configs"]

    def cells(key: str, rec: Mapping[str, Any]) -> list[str]:
        closed = gap_closed(records, key, lambda r: 1 - r["cosine_mean"])
        return [f"{rec['cosine_mean']:.5f} ({rec['cosine_min']:.5f})", "-" if closed is None else f"{closed:.2f}", f"{rec['weight_bytes'] / 1e6:.1f}"]

    rows = config_rows(CONFIGS, records, 4, cells)
    header = ["configuration", "embedding cosine to FP32: mean (min)", "W4→W8 gap closed (1 − cosine)", "weight MB"]
    return [f"## all-MiniLM-L6-v2 (real weights): {result['sentences']} sentences, seq {result['seq_len']}", "", *table(header, rows), ""]


def goal_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    syn = data.get("synthetic", {}).get("configs", {})
    for suffix in ("", ACCURACY4):
        w4, w8 = syn.get("w4" + suffix, {}), syn.get("w8" + suffix, {})
        if "decode_1t" not in w4 or "decode_1t" not in w8:
            continue
        for key in (k + suffix for k in REX):
            rec = syn.get(key)
            if not rec or "decode_1t" not in rec:
                continue
            closed = gap_closed(syn, key, lambda r: r["relative_error"])
            fast, parts = latency_goal(rec, w4, w8, suffix)
            ok = closed is not None and closed >= GAP_SHARE and fast
            lines.append(f"* synthetic {key}: closes {closed:.2f} of the W4→W8 gap (goal ≥ {GAP_SHARE}), decode {'; '.join(parts)} "
                         f"(goal ≤ {LATENCY_FACTOR}× W4 and < W8): **{'met' if ok else 'NOT met'}**")
    mini = data.get("minilm", {}).get("configs", {})
    for key in (k + suffix for suffix in ("", ACCURACY4) for k in REX):
        closed = gap_closed(mini, key, lambda r: 1 - r["cosine_mean"])
        if closed is not None:
            bytes_ratio = mini[key]["weight_bytes"] / mini["w4" + level(key)]["weight_bytes"]
            lines.append(f"* MiniLM {key}: closes {closed:.2f} of the W4→W8 gap in 1 − cosine at {bytes_ratio:.2f}× W4's weight bytes (embeddings included; fidelity part of the goal ≥ {GAP_SHARE}: "
                         f"**{'met' if closed >= GAP_SHARE else 'NOT met'}**)")
    lines += split_goal_lines(syn, mini)
    for model, records, better, what in (("synthetic", syn, lambda a, b: a["relative_error"] <= b["relative_error"], "relative error"),
                                         ("MiniLM", mini, lambda a, b: a["cosine_mean"] >= b["cosine_mean"], "mean cosine")):
        for base in ("ort_rtn", "ort_hqq"):
            if "error" in records.get("w4", {"error": 1}) or "error" in records.get(base, {"error": 1}):
                continue
            lines.append(f"* {model}: W4 ours at least as faithful as {base} ({what}): **{'met' if better(records['w4'], records[base]) else 'NOT met'}**")
    lines += zero_point_goal_lines(syn, mini)
    return lines


def latency_goal(rec: dict[str, Any], w4: dict[str, Any], w8: dict[str, Any], suffix: str) -> tuple[bool, list[str]]:
    """Whether ``rec`` decodes within LATENCY_FACTOR × W4 and below W8 at 1 and 2 threads,
    and the ratios as text (one part per thread count)."""
    ok, parts = True, []
    for t in (1, 2):
        a, b, c = rec[f"decode_{t}t"]["median_ms"], w4[f"decode_{t}t"]["median_ms"], w8[f"decode_{t}t"]["median_ms"]
        ok &= a <= LATENCY_FACTOR * b and a < c
        parts.append(f"{t}t: {a / b:.2f}× W4{suffix}, {a / c:.2f}× W8{suffix}")
    return ok, parts


def split_goal_lines(syn: dict[str, dict[str, Any]], mini: dict[str, dict[str, Any]]) -> list[str]:
    """The REx goal as the issue splits its measures: fidelity on MiniLM's real weights (the
    share of its W4 → W8 gap closed), latency on the synthetic stack (decode at 1 and 2
    threads against W4 and W8 at the same accuracy level).  Random weights spread the base
    error evenly over the columns, so the synthetic fidelity lines above are the harder case."""
    lines = []
    for key in (k + suffix for suffix in ("", ACCURACY4) for k in REX):
        closed = gap_closed(mini, key, lambda r: 1 - r["cosine_mean"])
        rec, w4, w8 = syn.get(key, {}), syn.get("w4" + level(key), {}), syn.get("w8" + level(key), {})
        if closed is None or any("decode_1t" not in r for r in (rec, w4, w8)):
            continue
        fast, parts = latency_goal(rec, w4, w8, level(key))
        ok = closed >= GAP_SHARE and fast
        lines.append(f"* {key}, fidelity on MiniLM and latency on the synthetic stack: closes {closed:.2f} of MiniLM's W4→W8 gap "
                     f"(goal ≥ {GAP_SHARE}), decode {'; '.join(parts)} (goal ≤ {LATENCY_FACTOR}× W4 and < W8): **{'met' if ok else 'NOT met'}**")
    return lines


#: Issue 17: W4 decode latency at most this times the compared quantizer's.
HQQ_LATENCY_FACTOR = 1.05


def zero_point_goal_lines(syn: dict[str, dict[str, Any]], mini: dict[str, dict[str, Any]]) -> list[str]:
    """Float zero points (w4_fzp) against ORT HQQ, and the default W4 against ORT RTN, at the
    same accuracy level: fidelity at least theirs, decode latency at most 1.05× theirs."""
    lines = []
    for ours, theirs in (("w4_fzp", "ort_hqq"), ("w4", "ort_rtn")):
        for suffix in ("", ACCURACY4):
            a, b = ours + suffix, theirs + suffix
            if "relative_error" in syn.get(a, {}) and "relative_error" in syn.get(b, {}):
                ok = syn[a]["relative_error"] <= syn[b]["relative_error"]
                parts = [f"relative error {syn[a]['relative_error']:.4f} vs {syn[b]['relative_error']:.4f}"]
                for t in (1, 2):
                    if f"decode_{t}t" in syn[a] and f"decode_{t}t" in syn[b]:
                        ratio = syn[a][f"decode_{t}t"]["median_ms"] / syn[b][f"decode_{t}t"]["median_ms"]
                        ok &= ratio <= HQQ_LATENCY_FACTOR
                        parts.append(f"decode {t}t {ratio:.2f}× theirs")
                lines.append(f"* synthetic {a} vs {b}: {', '.join(parts)} (goal: error ≤ theirs, decode ≤ {HQQ_LATENCY_FACTOR}× theirs): **{'met' if ok else 'NOT met'}**")
            if "cosine_mean" in mini.get(a, {}) and "cosine_mean" in mini.get(b, {}):
                ok = mini[a]["cosine_mean"] >= mini[b]["cosine_mean"]
                lines.append(f"* MiniLM {a} vs {b}: mean cosine {mini[a]['cosine_mean']:.5f} vs {mini[b]['cosine_mean']:.5f}: **{'met' if ok else 'NOT met'}**")
    return lines


def write_plot(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    syn = data.get("synthetic", {}).get("configs", {})
    mini = data.get("minilm", {}).get("configs", {})
    panels = [p for p in (
        ("synthetic: error vs weight bytes", syn, lambda r: r.get("weight_bytes", 0) / 1e6, "weight MB", lambda r: r.get("relative_error"), "relative output error"),
        ("synthetic: error vs decode latency (1 thread)", syn, lambda r: r.get("decode_1t", {}).get("median_ms"), "decode ms, 1 thread (median)",
         lambda r: r.get("relative_error"), "relative output error"),
        ("MiniLM: 1 − cosine vs weight bytes", mini, lambda r: r.get("weight_bytes", 0) / 1e6, "weight MB", lambda r: 1 - r["cosine_mean"] if "cosine_mean" in r else None, "1 − mean cosine to FP32"),
    ) if p[1]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, records, x_of, xlabel, y_of, ylabel) in zip(axes.flat, panels):
        for key, rec in records.items():
            if "error" in rec or key == "fp32":
                continue
            x, y = x_of(rec), y_of(rec)
            if not x or y is None:
                continue
            color = "tab:orange" if key.startswith("ort") else ("tab:green" if key.removesuffix(ACCURACY4) in REX else "tab:blue")
            ax.scatter(x, y, color=color)
            ax.annotate(key, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        for suffix in ("", ACCURACY4):
            series = (f"w4{suffix}", *(r + suffix for r in REX[:3]))  # the 4-bit residual at budgets 0.25, 0.5, 1.0
            rex = [(x_of(records[k]), y_of(records[k])) for k in series if k in records and "error" not in records[k] and x_of(records[k])]
            if len(rex) > 1:
                ax.plot(*zip(*rex), color="tab:green", alpha=0.5, linestyle="-" if not suffix else ":")
        ax.set_yscale("log")
        if "latency" in title:
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("weight-only MatMulNBits: fidelity vs bytes vs decode latency (green: W4 + REx; lines: 4-bit residual at 0.25/0.5/1.0, "
                 "solid accuracy_level 0, dotted 4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_markdown(data: dict[str, Any], path: Path, plot: str | None) -> None:
    env = data["environment"]
    lines = ["# Decode latency, bytes and fidelity: W4 + REx (MatMulNBits) vs W4, W8 and ORT's quantizers", "",
             (f"`{data['command']}` — block size 32, accuracy_level 0 unless the row says 4 (int8 activations inside the kernel); ORT {env['versions']['onnxruntime']}, {env['cpu_model']}, "
              f"{env['cpus_usable']} usable cores **shared with other jobs** (load average at the end {data['load']}): latencies are noisy; "
              "every configuration of a table was timed round-robin in one process (medians, IQR in parentheses), so compare rows, not runs."),
             "Weight MB = the bytes of all initializers (codes, scales, zero points, residual orders, LayerNorm parameters).", ""]
    if "synthetic" in data:
        lines += synthetic_section(data["synthetic"])
    if "minilm" in data:
        lines += minilm_section(data["minilm"])
    if plot:
        lines += [f"![fidelity vs bytes vs decode latency]({plot})", ""]
    lines += ["## Goals (issue 17)", "", *goal_lines(data), "", "## Notes", "", *NOTES, *data.get("extra_notes", [])]
    path.write_text("\n".join(lines) + "\n")


NOTES = [
    "* W4→W8 gap closed = (error(W4) − error(config)) / (error(W4) − error(W8)), with the relative output error (synthetic) or 1 − mean cosine (MiniLM).",
    ("* The w4_rex25/50/100 and 2-bit rows cover the columns whose (LayerNorm-weighted) base error is largest, per layer, with the same share of bytes "
     "in every layer (rex_allocation='layer'); the w4_rexnet rows spend the budget over the whole model where a residual removes the largest share "
     "of its layer's weighted error per byte (rex_allocation='network', the default)."),
    "* accuracy_level 4 rows are the same files as their accuracy_level 0 rows with the attribute changed (same weights and weight bytes; the "
    "kernel quantizes the activations to int8 per block, hence a slightly different output error). In ONNX Runtime 1.32's CPU kernel 8-bit "
    "and 2-bit MatMulNBits are on the fast path only at accuracy_level 4 (at 0 they are dequantized on every call: W8 is timed apart, 5 runs).",
    ("* Float zero points (ORT HQQ's and onnxopt's w4_fzp) take ONNX Runtime's CPU MatMulNBits off its fast path at every accuracy_level (see "
     "docs/weight-only.md); they are timed apart with 5 runs, round-robin among themselves, and their prefill is not timed unless --hqq-prefill."),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="synthetic decoder layers (4 ≈ 0.6 GB float32; 20 ≈ 3 GB)")
    parser.add_argument("--prefill", type=int, default=128, help="prefill tokens (0: no prefill timing)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--skip", default="", help="comma-separated: synthetic, minilm")
    parser.add_argument("--hqq-prefill", action="store_true", help="also time ORT HQQ's prefill (slow)")
    parser.add_argument("--quick", action="store_true", help="short timing")
    parser.add_argument("--isolate", action="store_true", help="quantize in child onnxopt processes (large models: bounded memory of this one)")
    parser.add_argument("--allocation", action="store_true", help="only the per-layer vs network allocation sweep, fidelity and bytes (→ decode_allocation.md)")
    parser.add_argument("--combine", action="store_true", help="only the join-form micro-benchmark (→ decode_combine.md)")
    parser.add_argument("--tag", default="", help="suffix of the result files (decode_<tag>.md)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--rewrite", action="store_true", help="only re-render the markdown and plot from the JSON in --out")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = Timing(warmup=2, min_runs=8, max_runs=100, target_seconds=2.0) if args.quick else Timing(warmup=3, min_runs=25, max_runs=1000, target_seconds=10.0)
    if args.allocation:
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        command = "python -m bench decode " + " ".join(argv if argv is not None else sys.argv[1:])
        data = {"command": command.strip(), "environment": environment(), **bench_allocation(args.layers, skip)}
        (out / "decode_allocation.json").write_text(json.dumps(json_safe(data), indent=1))
        (out / "decode_allocation.md").write_text("\n".join(allocation_markdown(data, data["command"])) + "\n")
        log(f"wrote {out}/decode_allocation.md")
        return 0
    if args.combine:
        (out / "decode_combine.md").write_text("\n".join(bench_combine(timing)) + "\n")
        log(f"wrote {out}/decode_combine.md")
        return 0
    stem = f"decode_{args.tag}" if args.tag else "decode"
    if args.rewrite:
        data = json.loads((out / f"{stem}.json").read_text())
    else:
        only = {c.strip() for c in args.configs.split(",") if c.strip()} | {"fp32"}
        unknown = only - set(CONFIGS)
        if unknown:
            parser.error(f"unknown configurations: {', '.join(sorted(unknown))}")
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        prefill_timing = Timing(warmup=1, min_runs=5, max_runs=50, target_seconds=2.0) if args.quick else Timing(warmup=2, min_runs=10, max_runs=200, target_seconds=10.0)
        command = "python -m bench decode " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        data: dict[str, Any] = {"command": command.strip(), "environment": environment(),
                                "settings": {"layers": args.layers, "prefill": args.prefill, **timing.kwargs()}}
        if "synthetic" not in skip:
            data["synthetic"] = bench_synthetic(args.layers, only, timing, args.prefill, prefill_timing, args.hqq_prefill, args.isolate)
        if "minilm" not in skip:
            data["minilm"] = bench_minilm(only)
        data["load"] = load()
        (out / f"{stem}.json").write_text(json.dumps(json_safe(data), indent=1))
    plot = f"{stem}.png" if write_plot(data, out / f"{stem}.png") else None
    write_markdown(data, out / f"{stem}.md", plot)
    log(f"wrote {out}/{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
