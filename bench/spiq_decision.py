"""SPIQ decision benchmark: is ``spiq="auto"`` (the default) at least as good as both of its
options, per tensor and forced SPIQ, within a measured noise floor?

Models, images and fidelity metrics are those of :mod:`bench.fidelity`: the real pretrained
MobileNetV2 and EfficientNet-Lite0 (BatchNormalization kept), the 20 ImageNet samples in the
first ``--views`` deterministic views, mean KL(FP32 || config) of the softmax outputs from ONNX
Runtime (ORT_ENABLE_ALL); and the PP-OCR text-orientation classifier (``ppocr_cls``, Paddle2ONNX
with BN kept) on 250 rendered text lines per view, 2 classes (0° / 180°).  Data-free (BN
statistics as ranges), weights per output channel.

Configurations: W8A8, W8A6 and W6A8, each with ``spiq="auto"``, ``spiq=True`` (SPIQ wherever
possible) and ``spiq=False`` (per tensor): ``onnxopt.optimize(path, preset="quantize", ...)``.

Noise floor, two ways:

* **weight jitter**: the same configuration quantized from ``--jitter-copies`` copies of the
  model whose float initializers are multiplied by ``1 + 1e-6·N(0, 1)`` (the same network to
  ~6 significant digits: only rounding luck changes).  Per configuration: the KL on the
  model and on every copy, their mean and max − min.
* **input bootstrap**: the per-input KL difference (auto − other) on the model itself,
  resampled ``BOOTSTRAP`` times over the inputs: its 90 % interval.

Verdict per (model, bits, other option): auto "≤ within noise" when the mean over the model
and its copies of KL(auto) − KL(other) is at most the noise floor, the larger of the two
configurations' jitter spreads (max − min over model and copies).

Outputs: ``<out>/spiq_decision.json`` and ``<out>/spiq_decision.md``.

``--only`` updates those models' entries in the existing JSON and keeps the others.

    python -m bench.spiq_decision [--out bench/results] [--views 2] [--jitter-copies 2] [--only mobilenet_v2,ppocr_cls]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

import onnxopt
from bench.common import chosen_models, command_line, environment, merge_previous, table, write_json_and_markdown
from bench.fidelity import ALL_MODELS, bench_each_model, load_data, log, log_softmax, model_path, run_model, with_retry

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
BITS = ((8, 8), (8, 6), (6, 8))
MODES = {"auto": "auto", "spiq": True, "per_tensor": False}
JITTER = 1e-6
BOOTSTRAP = 1000


def per_input_kl(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    log_p, log_q = log_softmax(reference), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def jittered_copy(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with every float initializer and Constant node value (Paddle2ONNX keeps the
    weights in Constant nodes) multiplied by (1 + JITTER·N(0, 1))."""
    from onnx import numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for tensor in [*model.graph.initializer, *constants]:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 1:
            tensor.CopyFrom(numpy_helper.from_array((values * (1 + JITTER * rng.standard_normal(values.shape))).astype(np.float32), tensor.name))
    onnx.save(model, str(dst))
    return dst


def quantized_kl(src: Path, dst: Path, options: dict[str, Any], inputs: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(per-input KL, SPIQ coverage, layers quantized) of ``src`` quantized with ``options``."""
    model, report = onnxopt.optimize(src, preset="quantize", allow_no_op=True, **options)
    onnxopt.save_model(model, dst)
    stats = next(p for p in report.passes if p.name == "quantize").stats
    return per_input_kl(reference, run_model(dst, inputs)), float(stats.get("spiq_coverage", 0.0)), int(stats.get("layers_quantized", 0))


def bootstrap_interval(difference: np.ndarray, seed: int = 0) -> list[float]:
    """90 % interval of the mean of ``difference`` resampled over the inputs."""
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (BOOTSTRAP, len(difference)))].mean(axis=1)
    return [float(np.percentile(means, 5)), float(np.percentile(means, 95))]


def bench_model(name: str, views: int, copies: int, workdir: Path) -> dict[str, Any]:
    src = with_retry(lambda: model_path(name))
    data = load_data(name, views)
    reference = run_model(src, data.inputs)
    sources = [src] + [jittered_copy(src, workdir / f"jitter{seed}.onnx", seed) for seed in range(1, copies + 1)]
    configs: dict[str, Any] = {}
    for wb, ab in BITS:
        for mode, spiq in MODES.items():
            key = f"w{wb}a{ab}_{mode}"
            runs = [quantized_kl(s, workdir / f"{key}_{i}.onnx", {"weight_bits": wb, "act_bits": ab, "spiq": spiq}, data.inputs, reference)
                    for i, s in enumerate(sources)]
            kls = [float(kl.mean()) for kl, _, _ in runs]
            configs[key] = {"kl_model": kls[0], "kl_copies": kls[1:], "kl_mean": float(np.mean(kls)), "spread": float(max(kls) - min(kls)),
                            "spiq_coverage": runs[0][1], "layers_quantized": runs[0][2], "per_input": runs[0][0]}
            log(f"  {key}: KL {kls[0]:.4f} (copies {', '.join(f'{k:.4f}' for k in kls[1:])}), SPIQ coverage {runs[0][1]:.0%}")
    verdicts = []
    for wb, ab in BITS:
        auto = configs[f"w{wb}a{ab}_auto"]
        for other in ("spiq", "per_tensor"):
            rec = configs[f"w{wb}a{ab}_{other}"]
            difference = auto["kl_mean"] - rec["kl_mean"]
            noise = max(auto["spread"], rec["spread"])
            verdicts.append({"bits": f"W{wb}A{ab}", "other": other, "difference": difference, "noise_floor": noise,
                             "bootstrap_90": bootstrap_interval(auto["per_input"] - rec["per_input"]), "ok": difference <= noise})
    for rec in configs.values():
        rec.pop("per_input")
    return {"name": name, "title": ALL_MODELS[name], "inputs": len(data.inputs), "copies": copies, "configs": configs, "verdicts": verdicts}


# --------------------------------------------------------------------------- report
def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# SPIQ decision: auto against per tensor and forced SPIQ, with a noise floor", "",
        f"Generated by `{data['command']}` on {env['date']} ({data['seconds']:.0f} s). {env['cpu_model']}, "
        f"{env['cpus_usable']} usable CPU(s); {versions}. Source: {env['git_commit'] or '?'}"
        f"{' + uncommitted changes' if env['git_dirty_files'] else ''}. Raw numbers: spiq_decision.json. "
        "What is measured and how: the docstring of bench/spiq_decision.py.", "",
        "## Mean KL vs FP32 (lower is better): the model, and [min-max] over the model and its jittered copies", "",
    ]
    rows = []
    for r in data["models"].values():
        if "error" in r:
            rows.append([r["title"], "error", r["error"], "", ""])
            continue
        for wb, ab in BITS:
            cells = []
            for mode in MODES:
                c = r["configs"][f"w{wb}a{ab}_{mode}"]
                kls = [c["kl_model"], *c["kl_copies"]]
                if c.get("layers_quantized", 1) == 0:  # recorded since the PP-OCR rows; older rows lack it
                    cells.append(f"{c['kl_model']:.4f}: no layer quantized")
                else:
                    cells.append(f"{c['kl_model']:.4f} [{min(kls):.4f}-{max(kls):.4f}] ({c['spiq_coverage']:.0%} SPIQ)")
            rows.append([r["title"], f"W{wb}A{ab}", *cells])
    lines += table(["model", "bits", "auto (default)", "forced SPIQ", "per tensor"], rows)
    if any(c.get("layers_quantized", 1) == 0 for r in data["models"].values() if "configs" in r for c in r["configs"].values()):
        lines += ["", "\"no layer quantized\": every layer was put back in float; the model is then FP32."]
    lines += ["", "W8A6 rows are a simulation: below 8-bit activations a Clip precedes each 8-bit QuantizeLinear, ORT fuses no "
              "layer and the model runs in float (the quantizer keeps the QDQ form and says so, docs/quantization.md)."]
    lines += ["", "## Verdicts: auto − other (mean over model and copies) against the noise floor", "",
              "Noise floor: the larger jitter spread (max − min of KL over the model and its copies) of the two configurations. "
              "Bootstrap: 90 % interval of the mean per-input KL difference on the model itself, resampled over the inputs.", ""]
    rows = [[r["title"], v["bits"], "forced SPIQ" if v["other"] == "spiq" else "per tensor", f"{v['difference']:+.4f}", f"{v['noise_floor']:.4f}",
             f"[{v['bootstrap_90'][0]:+.4f}, {v['bootstrap_90'][1]:+.4f}]", "yes" if v["ok"] else "**no**"]
            for r in data["models"].values() if "verdicts" in r for v in r["verdicts"]]
    lines += table(["model", "bits", "other", "auto − other", "noise floor", "bootstrap 90 %", "auto ≤ other within noise"], rows)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spiq_decision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--views", type=int, default=2, help="views of the 20 ImageNet samples (1-4, default 2 = 40 inputs)")
    parser.add_argument("--jitter-copies", type=int, default=2, help="jittered copies of each model (default 2)")
    parser.add_argument("--only", help=f"comma-separated model names (default: {','.join(ALL_MODELS)})")
    args = parser.parse_args(argv)
    names = chosen_models(parser, args.only, list(ALL_MODELS))
    start = time.perf_counter()
    env = environment()
    results = bench_each_model(names, "bench_spiq_", lambda name, workdir: bench_model(name, args.views, args.jitter_copies, workdir))
    command = command_line("python -m bench.spiq_decision", argv)
    results, command = merge_previous(args.out / "spiq_decision.json", "models", results, names, list(ALL_MODELS), command)
    data = {"benchmark": "spiq_decision", "command": command, "environment": env, "seconds": time.perf_counter() - start, "models": results}
    written = write_json_and_markdown(args.out, "spiq_decision", data, render_markdown(data))
    log(f"wrote {written} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
