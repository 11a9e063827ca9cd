"""Which ONNX form of the uneven depthwise decomposition does ORT run faster?

One decomposed layer (n_i = n_o = 64, 3×3, 56×56 input, ranks r_i drawn uneven in 1..4):

* padded: depthwise Conv with multiplier m = max r_i (zero kernels pad the smaller ranks,
  group = n_i) + 1×1 Conv — the form ``decompose-depthwise`` emits;
* bucketed: channels grouped by r_i (Gather on the channel axis), one depthwise Conv per
  bucket with multiplier r, Concat, 1×1 Conv (no zero kernels, but copies).

    python -m bench.red_layout   → bench/results/red_layout.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.common import (
    json_safe,
    load_average,
    ort_session,
    summarize,
    time_interleaved,
)

N_I = N_O = 64
SIZE = 56
RESULTS = Path(__file__).parent / "results"


def _model(nodes, inits, out_channels):
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N_I, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, SIZE, SIZE])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def padded(ranks, rng):
    m = int(ranks.max())
    dw = rng.standard_normal((N_I * m, 1, 3, 3)).astype(np.float32)
    pw = rng.standard_normal((N_O, N_I * m, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "dw"], ["d"], group=N_I, pads=[1, 1, 1, 1]), helper.make_node("Conv", ["d", "pw"], ["y"])]
    return _model(nodes, {"dw": dw, "pw": pw}, N_O)


def bucketed(ranks, rng):
    nodes, inits, parts = [], {}, []
    for r in np.unique(ranks):
        idx = np.flatnonzero(ranks == r).astype(np.int64)
        inits[f"i{r}"] = idx
        inits[f"dw{r}"] = rng.standard_normal((idx.size * r, 1, 3, 3)).astype(np.float32)
        nodes.append(helper.make_node("Gather", ["x", f"i{r}"], [f"g{r}"], axis=1))
        nodes.append(helper.make_node("Conv", [f"g{r}", f"dw{r}"], [f"d{r}"], group=int(idx.size), pads=[1, 1, 1, 1]))
        parts.append(f"d{r}")
    nodes.append(helper.make_node("Concat", parts, ["c"], axis=1))
    inits["pw"] = rng.standard_normal((N_O, int(ranks.sum()), 1, 1)).astype(np.float32)
    nodes.append(helper.make_node("Conv", ["c", "pw"], ["y"]))
    return _model(nodes, inits, N_O)


def main() -> None:
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 5, N_I)
    result = {"ranks_sum": int(ranks.sum()), "max_rank": int(ranks.max()), "load_average": load_average(), "latency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, build in (("padded", padded), ("bucketed", bucketed)):
            paths[name] = Path(tmp) / f"{name}.onnx"
            onnx.save_model(build(ranks, rng), str(paths[name]))
        feeds = {"x": rng.standard_normal((1, N_I, SIZE, SIZE)).astype(np.float32)}
        for threads in (1, 2):
            sessions = {k: ort_session(p, "all", threads=threads, spinning=False) for k, p in paths.items()}
            samples = time_interleaved(sessions, feeds, target_seconds=3.0, max_runs=500)
            result["latency"][f"{threads}_thread"] = {k: summarize(v) for k, v in samples.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "red_layout.json").write_text(json.dumps(json_safe(result), indent=1))
    for threads, lat in result["latency"].items():
        print(threads, {k: round(v["median_ms"], 3) for k, v in lat.items()})


if __name__ == "__main__":
    main()
