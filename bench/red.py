"""RED / RED++ benchmark: weight hashing, neuron merging, depthwise decomposition.

For each model: % distinct weight values removed by ``hash-weights`` and its fidelity
(top-1 agreement and KL of the hashed vs the BN-folded float model), the per-layer bound U
(eq. 2.8) against the measured E|w − w̃|, % parameters / MACs removed by ``merge-neurons``
and by ``decompose-depthwise`` (onnxopt.metrics.measure), the hashing time, ORT latency
of the BN-folded model vs the pruned one at 1 and 2 threads (interleaved, bench/common.py).

Inputs: the 20 real ImageNet samples for the pretrained MobileNetV2 / EfficientNet-Lite0;
random normal inputs for the zoo ResNet-20 / ResNet-50, whose weights are random (untrained):
their fidelity numbers only say how far hashing moves an untrained network.

    python -m bench.red [--models resnet20,resnet50,mobilenet_v2,efficientnet_lite0] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import onnxopt
from bench.common import (
    environment,
    json_safe,
    load_average,
    ort_session,
    summarize,
    table,
    time_interleaved,
)
from bench.fidelity import log_softmax
from onnxopt.metrics import measure

RESULTS = Path(__file__).parent / "results"
PRETRAINED = ("mobilenet_v2", "efficientnet_lite0")
BASE = ["eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "eliminate-dead"]


def load(name: str) -> onnx.ModelProto:
    if name in PRETRAINED:
        from onnxopt.models.pretrained import export_pretrained

        return onnx.load(str(export_pretrained(name)))
    from onnxopt.models.build import build_zoo_model

    return onnx.load(str(build_zoo_model(name)))


def inputs_for(name: str, model: onnx.ModelProto) -> np.ndarray:
    if name in PRETRAINED:
        from onnxopt.models.pretrained import pretrained_input

        return pretrained_input(name)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(0).standard_normal((8, *dims[1:])).astype(np.float32)


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save_model(model, str(path))
        sess = ort_session(path, "disabled", threads=2)
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: images[i : i + 1]})[0].reshape(1, -1) for i in range(len(images))])


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return {
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "kl_mean": float(kl.mean()),
        "max_abs": float(np.abs(reference - candidate).max()),
        "mean_abs": float(np.abs(reference - candidate).mean()),
    }


def stats_of(report, name: str) -> dict[str, Any]:
    return next(p for p in report.to_dict()["passes"] if p["name"] == name)


def latency(models: dict[str, onnx.ModelProto], images: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for key, model in models.items():
            paths[key] = Path(tmp) / f"{key}.onnx"
            onnx.save_model(model, str(paths[key]))
        for threads in (1, 2):
            sessions = {key: ort_session(path, "all", threads=threads, spinning=False) for key, path in paths.items()}
            name = next(iter(sessions.values())).get_inputs()[0].name
            samples = time_interleaved(sessions, {name: images[:1]}, target_seconds=3.0, max_runs=200)
            out[f"{threads}_thread"] = {key: summarize(v) for key, v in samples.items()}
    return out


def run_model(name: str, alpha: float) -> dict[str, Any]:
    original = load(name)
    images = inputs_for(name, original)
    base, _ = onnxopt.optimize(original, passes=BASE)
    start = time.perf_counter()
    hashed, hash_report = onnxopt.optimize(base, passes=["hash-weights"])
    hash_seconds = time.perf_counter() - start
    # each stage is measured even when it finds nothing to rewrite (its refusals are the result)
    merged, merge_report = onnxopt.optimize(hashed, passes=["merge-neurons", "eliminate-dead"], allow_no_op=True)
    decomposed, dec_report = onnxopt.optimize(merged, passes=["decompose-depthwise", "eliminate-dead"], allow_no_op=True)
    relaxed, relax_report = onnxopt.optimize(hashed, passes=["merge-neurons", "decompose-depthwise", "eliminate-dead"], alpha=alpha, allow_no_op=True)
    metrics = {key: measure(m).to_dict() for key, m in (("base", base), ("merged", merged), ("decomposed", decomposed), ("alpha", relaxed))}
    reference = logits(base, images)
    hashed_logits = logits(hashed, images)
    hstats = stats_of(hash_report, "hash-weights")["stats"]
    layers = hstats.pop("layers")
    mstats = stats_of(merge_report, "merge-neurons")
    dstats = stats_of(dec_report, "decompose-depthwise")
    record = {
        "model": name,
        "weights": "real pretrained (ImageNet)" if name in PRETRAINED else "random (untrained zoo export)",
        "inputs": f"{len(images)} real ImageNet images" if name in PRETRAINED else f"{len(images)} random normal inputs",
        "hash": {**hstats, "seconds": hash_seconds, "bound_holds_all_layers": all(l["mean_abs_error"] <= l["bound"] for l in layers),
                 "mean_abs_error_over_bound_max": max(l["mean_abs_error"] / l["bound"] for l in layers if l["bound"] > 0)},
        "hash_fidelity": fidelity(reference, hashed_logits),
        "strict_exact_vs_hashed": fidelity(hashed_logits, logits(decomposed, images)),
        "merge": {k: v for k, v in mstats["stats"].items() if k != "layers"},
        "merge_refusals": len(mstats.get("refusals", [])),
        "merge_refusal_examples": [r["reason"] for r in mstats.get("refusals", [])[:3]],
        "decompose": {k: v for k, v in dstats["stats"].items() if k != "layers"},
        "decompose_refusal_examples": sorted({r["reason"].split(" (")[0] for r in dstats.get("refusals", [])}),
        "alpha": alpha,
        "alpha_merge": {k: v for k, v in stats_of(relax_report, "merge-neurons")["stats"].items() if k != "layers"},
        "alpha_fidelity": fidelity(reference, logits(relaxed, images)),
        "metrics": {k: {"parameters": v["parameters"], "macs": v["macs"]} for k, v in metrics.items()},
        "latency": latency({"base": base, "red": decomposed, f"red_alpha{alpha}": relaxed}, images),
    }
    return record


def pct(a: float, b: float) -> str:
    return f"{100.0 * (1 - b / a):.1f} %" if a else "-"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# RED / RED++ benchmark (hash-weights, merge-neurons, decompose-depthwise)", "",
             f"Command: `{result['command']}`. Latencies were measured under load (other helpers shared the 2 cores), interleaved in one process.", "",
             "## Hashing", ""]
    rows = []
    for r in result["models"]:
        h, f = r["hash"], r["hash_fidelity"]
        rows.append([r["model"], r["weights"], f"{h['distinct_removed_pct']:.1f} %", f"{h['seconds']:.1f} s", "yes" if h["bound_holds_all_layers"] else "no",
                     f"{f['top1_agreement']:.0%}", f"{f['kl_mean']:.2e}", r["inputs"]])
    lines += table(["model", "weights", "distinct values removed", "hash time", "E|w−w̃| ≤ U every layer", "top-1 agreement", "KL", "fidelity inputs"], rows)
    lines += ["", "## Merging and decomposition (strict, exact relative to the hashed model)", ""]
    rows = []
    for r in result["models"]:
        m = r["metrics"]
        rows.append([r["model"], str(r["merge"]["neurons_removed"]), pct(m["base"]["parameters"], m["merged"]["parameters"]), pct(m["base"]["macs"], m["merged"]["macs"]),
                     str(r["decompose"]["convs_decomposed"]), pct(m["merged"]["parameters"], m["decomposed"]["parameters"]), pct(m["merged"]["macs"], m["decomposed"]["macs"]),
                     f"{r['strict_exact_vs_hashed']['max_abs']:.1e}"])
    lines += table(["model", "neurons merged", "params removed (merge)", "MACs removed (merge)", "convs decomposed", "params removed (decomp.)", "MACs removed (decomp.)", "max |Δlogit| vs hashed"], rows)
    lines += ["", "## α relaxation", ""]
    rows = []
    for r in result["models"]:
        m = r["metrics"]
        rows.append([r["model"], str(r["alpha"]), str(r["alpha_merge"]["neurons_removed"]), pct(m["base"]["parameters"], m["alpha"]["parameters"]), pct(m["base"]["macs"], m["alpha"]["macs"]),
                     f"{r['alpha_fidelity']['top1_agreement']:.0%}", f"{r['alpha_fidelity']['kl_mean']:.2e}"])
    lines += table(["model", "alpha", "neurons merged", "params removed", "MACs removed", "top-1 agreement", "KL"], rows)
    lines += ["", "## ORT latency (ORT_ENABLE_ALL, median ms, batch 1)", ""]
    rows = []
    for r in result["models"]:
        for threads in ("1_thread", "2_thread"):
            lat = r["latency"][threads]
            rows.append([r["model"], threads.replace("_", " "), *[f"{v['median_ms']:.2f}" for v in lat.values()]])
    lines += table(["model", "threads", "BN-folded", "red (strict)", f"red α={result['alpha']}"], rows)
    layout = RESULTS / "red_layout.json"
    if layout.exists():
        data = json.loads(layout.read_text())
        lines += ["", f"## Depthwise layout (one layer, 64→64 channels 3×3 at 56×56, ranks 1–4, Σr = {data['ranks_sum']}; `python -m bench.red_layout`)", ""]
        lines += table(["threads", "padded (median ms)", "bucketed (median ms)"],
                       [[k.replace("_", " "), f"{v['padded']['median_ms']:.2f}", f"{v['bucketed']['median_ms']:.2f}"] for k, v in data["latency"].items()])
    lines += ["", "## Notes", "", *result["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet20,resnet50,mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    records = []
    for name in args.models.split(","):
        print("model", name, flush=True)
        records.append(run_model(name, args.alpha))
        print(json.dumps(json_safe({k: records[-1][k] for k in ("hash", "merge", "decompose", "metrics")}))[:1500], flush=True)
    result = {
        "command": "python -m bench.red " + (f"--models {args.models} " if args.models else "") + f"--alpha {args.alpha}",
        "alpha": args.alpha,
        "environment": environment(),
        "load_average": load_average(),
        "models": records,
        "notes": [
            "* Thesis references: Table 2.1 reports ≥ 96 % of distinct weight values removed by hashing (99.9 % on ImageNet ResNet-50, 61–97 % on MobileNetV2); Table 2.4 reports 65–91 % parameters removed on CIFAR ResNets with the decomposition.",
            "* The zoo ResNet-20 and ResNet-50 have random (untrained) weights: no trained CIFAR ResNet is available offline, so their merge/decomposition figures say nothing about the thesis numbers (random kernels are full rank and never identical).",
            "* Distinct values: the thesis' ImageNet column of Table 2.1 gives 61.3 % (MobileNetV2 1.0) and 72.3 % (EfficientNet-B0) removed by adaptive hashing, 0.60 / 0.44 points of accuracy lost; our real MobileNetV2 / EfficientNet-Lite0 rows are comparable in reduction; the ≥ 96 % figures are CIFAR models and ImageNet ResNets, which we only have with random weights (74 % on the random ResNet-50, far below the thesis' 99.9 %). The bandwidth is eq. 2.3's median consecutive difference; for the largest layers the KDE grid is capped at 2^22 bins (resolution range/2^22 instead of Δ/2), which keeps ResNet-50 under 30 s.",
            "* Strict merging and decomposition removed nothing on these four models: no two output neurons are identical after hashing and no k×k Conv has per-input-channel kernel ranks low enough for eq. 2.11. The thesis' 65–91 % (Table 2.4) come from trained CIFAR ResNets; our graph tests show the rewrites are exact where the redundancy exists (tests/passes/test_red_passes.py).",
            "* Layout of the uneven depthwise decomposition: see the table above (`python -m bench.red_layout`, one synthetic layer); `layout=auto` buckets when padding would add > 25 % depthwise channels.",
            "* The network bound of eq. 2.9 (`network_bound` in the json) multiplies one term per layer and subtracts the product of the mean BN shifts β; with ~50 layers both products vanish (1e-35 … 1e-159, even negative): as implemented from the thesis formula it is not a usable figure, only the per-layer bound U (eq. 2.8) is checked.",
            "* Where E|w − w̃| > U for some layer, it is the monomodal term of eq. 2.8 (Δ/√(2π)·(√(2/π)+√3)) that fails, not the partition bound U_part (eq. 2.6), which holds by construction.",
            "* merge-neurons keeps channel counts multiples of 8 (`channel_multiple`): a first run without it made the α-merged MobileNetV2 2.2× slower at 1 thread (131.9 vs 58.8 ms) — ragged channel counts lose ORT's NCHWc kernels.",
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "red.json").write_text(json.dumps(json_safe(result), indent=1))
    (RESULTS / "red.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
