"""Latency of a model whose last layer is a Conv writing a graph output (project issue 14).

ORT fuses a QDQ Conv into QLinearConv only when its output is quantized too; a Conv writing a
graph output gets no output QuantizeLinear (there is no range for it), so ORT runs it in float
behind the DequantizeLinear of its weight.  Compared here, on ONNX Runtime's CPU provider
(ORT_ENABLE_ALL, 1 intra-op thread, batch 1, spinning off), timed round-robin
(:func:`bench.common.time_interleaved`), median of each repeat:

* ``fp32``: the float model;
* ``qdq_kept``: quantized w8a8 with ``unfused_conv_to_float=False`` (the last Conv stays QDQ);
* ``conv_float``: quantized w8a8 with ``unfused_conv_to_float=True`` (it is put back in float).

Models: ``small`` (Conv-BN-ReLU ×3, then a 3×3 Conv 64→64 writing the output, 1×16×56×56)
and ``mobilenet_v2_features`` (the pretrained MobileNetV2 of the zoo, BatchNormalization kept,
cut after its last projection Conv ``features.17/conv.2`` 960→320: a real backbone whose
output is a Conv, as in a detection/segmentation feature extractor).  Data-free ranges from
the BN statistics, ``input_range`` (−3, 3) for ``small``, the normalised pixel range for MobileNetV2.

    python -m bench.unfused_conv [--repeats 5] [--seconds 3] [--out bench/results]

writes ``<out>/unfused_conv.md`` and ``<out>/unfused_conv.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxopt
from bench.common import environment, json_safe, load_average, ort_session, summarize, table, time_interleaved
from bench.fidelity import input_range

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CUT = "/features/features.17/conv/conv.2/Conv_output_0"


def small_model() -> onnx.ModelProto:
    """Three Conv-BN-ReLU blocks, then a Conv whose output is the graph output."""
    rng = np.random.default_rng(0)
    channels = [16, 64, 64, 64]
    nodes, inits = [], []
    x = "input"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:] + [64])):
        w = (rng.standard_normal((cout, cin, 3, 3)) * (2 / (9 * cin)) ** 0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"b{i}"))
        last = i == len(channels) - 1
        conv_out = "output" if last else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [conv_out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        if last:
            break
        bn_values = [rng.uniform(0.5, 1.5, cout), rng.normal(0, 0.5, cout), rng.normal(0, 0.5, cout), rng.uniform(0.5, 2, cout)]
        names = [f"bn{i}_{k}" for k in "gbmv"]
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(bn_values, names)]
        nodes.append(helper.make_node("BatchNormalization", [conv_out, *names], [f"n{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "small_last_conv",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 16, 56, 56])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 64, 56, 56])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mobilenet_features(tmp: Path) -> onnx.ModelProto:
    """The pretrained MobileNetV2 (BN kept) cut after features.17's projection Conv."""
    source = next(Path.home().joinpath(".cache/onnxopt/zoo").glob("mobilenet_v2_pretrained-*.onnx"))  # python -m onnxopt.models export-pretrained
    model = onnx.load(str(source))
    fixed = tmp / "mnv2_static.onnx"
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim
        if dim and dim[0].dim_param:
            dim[0].dim_value = 1
    onnx.save_model(model, fixed)
    cut = tmp / "mnv2_features.onnx"
    onnx.utils.extract_model(str(fixed), str(cut), [model.graph.input[0].name], [CUT])
    return onnx.load(str(cut))


def configurations(model: onnx.ModelProto, tmp: Path, name: str, low_high: tuple[float, float]) -> dict[str, Path]:
    paths = {"fp32": tmp / f"{name}_fp32.onnx"}
    onnx.save_model(model, paths["fp32"])
    for config, to_float in (("qdq_kept", False), ("conv_float", True)):
        quantized, report = onnxopt.optimize(
            model, preset="quantize", input_range=low_high, unfused_conv_to_float=to_float, validate=True
        )
        paths[config] = tmp / f"{name}_{config}.onnx"
        onnxopt.save_model(quantized, paths[config])
        stats = next(p for p in report.to_dict()["passes"] if p["name"] == "quantize")["stats"]
        print(f"{name} {config}: coverage {stats['coverage']['done']}/{stats['coverage']['total']}, fused {stats.get('fused_by_ort')}, not fused {len(stats.get('not_fused', []))}")
    return paths


def measure(paths: dict[str, Path], repeats: int, seconds: float) -> dict[str, Any]:
    sessions = {name: ort_session(path, "all", threads=1, spinning=False) for name, path in paths.items()}
    shape = [d.dim_value for d in onnx.load(str(paths["fp32"])).graph.input[0].type.tensor_type.shape.dim]
    feeds = {sessions["fp32"].get_inputs()[0].name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    reference = sessions["fp32"].run(None, feeds)[0]
    result: dict[str, Any] = {"medians_ms": {name: [] for name in paths}, "max_abs_err": {}}
    for name, session in sessions.items():
        out = session.run(None, feeds)[0]
        result["max_abs_err"][name] = float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-12))
    for _ in range(repeats):
        samples = time_interleaved(sessions, feeds, min_runs=50, target_seconds=seconds)
        for name, values in samples.items():
            result["medians_ms"][name].append(summarize(values)["median_ms"])
    result["median_of_medians_ms"] = {name: float(np.median(v)) for name, v in result["medians_ms"].items()}
    ratios = np.asarray(result["medians_ms"]["conv_float"]) / np.asarray(result["medians_ms"]["qdq_kept"])
    result["float_over_kept"] = float(np.median(ratios))  # per repeat, then the median: robust to load changes between repeats
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"environment": environment(), "load_before": load_average(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = (
            ("small", small_model, (-3.0, 3.0)),
            ("mobilenet_v2_features", lambda: mobilenet_features(tmp), tuple(input_range("mobilenet_v2"))),
        )
        for name, build, low_high in cases:
            paths = configurations(build(), tmp, name, low_high)
            results["models"][name] = measure(paths, args.repeats, args.seconds)
            print(name, results["models"][name]["median_of_medians_ms"])
    results["load_after"] = load_average()
    rows = []
    for name, r in results["models"].items():
        m = r["median_of_medians_ms"]
        rows.append([
            name, *(f"{m[c]:.3f}" for c in ("fp32", "qdq_kept", "conv_float")),
            f"{r['float_over_kept']:.3f}", f"{r['max_abs_err']['qdq_kept']:.4f}", f"{r['max_abs_err']['conv_float']:.4f}",
            " ".join(f"{f / k:.2f}" for f, k in zip(r["medians_ms"]["conv_float"], r["medians_ms"]["qdq_kept"])),
        ])
    lines = [
        "# Last Conv writing a graph output: QDQ kept vs put back in float", "",
        "Generated by `python -m bench.unfused_conv` (see its docstring). ORT CPU, ORT_ENABLE_ALL, 1 thread, "
        f"interleaved; median over {args.repeats} repeats of each repeat's median. Load average before/after: "
        f"{results['load_before']} / {results['load_after']}. rel err: max |out − fp32| / max |fp32| on one "
        "standard-normal input (not images).", "",
        *table(["model", "fp32 ms", "qdq_kept ms", "conv_float ms", "float/kept (median of per-repeat ratios)", "rel err kept", "rel err float", "float/kept per repeat"], rows),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unfused_conv.json").write_text(json.dumps(json_safe(results), indent=1))
    (args.out / "unfused_conv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
