"""Which MatMulNBits forms ONNX Runtime's CPU kernel runs fast: one 2048 × 2048 layer, one
token, every bits (2, 4, 8) × block size (16–256) × accuracy_level (0, 4) × zero points
(uint8 or none), each timed against the 4-bit form of the same block size and level.

The weight-only pass's rule (:mod:`onnxopt.passes.weight_only.kernels`) says which forms are
slow; this benchmark is where that rule comes from, and a column checks the two agree: a
form the rule calls fast must be within :data:`FAST_FACTOR` of the 4-bit one, a slow one
beyond it.  Float zero points are measured apart (4 bits).  One thread; medians of
``--runs`` calls after a warm-up.

    python -m bench.nbits_kernels [--out bench/results] [--runs 30]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxopt.passes.weight_only.blockwise import packed_tensors, quantize_blocks
from onnxopt.passes.weight_only.kernels import cpu_slow_form

from bench.common import environment, write_json_and_markdown

RESULTS = Path(__file__).parent / "results"
K = N = 2048
BITS, BLOCKS, LEVELS = (2, 4, 8), (16, 32, 64, 128, 256), (0, 4)
#: A form slower than this times the 4-bit form (same block size and level) counts as slow.
FAST_FACTOR = 5.0


def nbits_model(weight: np.ndarray, bits: int, block_size: int, level: int, symmetric: bool, float_zero_points: bool) -> bytes:
    result = quantize_blocks(weight, bits, block_size, search=False, symmetric=symmetric, float_zero_points=float_zero_points)
    b, scales, zero_points = packed_tensors(result)
    inits = [numpy_helper.from_array(b.reshape(N, -1, block_size * bits // 8), "b"), numpy_helper.from_array(scales, "s")]
    inputs = ["x", "b", "s"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block_size, accuracy_level=level)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", 1, [1, K])], [helper.make_tensor_value_info("y", 1, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def median_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def measure(runs: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    feeds = {"x": rng.standard_normal((1, K)).astype(np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    rows = []
    forms = [(b, s, lv, sym, False) for b, s, lv, sym in itertools.product(BITS, BLOCKS, LEVELS, (False, True))]
    forms += [(4, s, lv, False, True) for s, lv in itertools.product(BLOCKS, LEVELS)]
    for bits, block_size, level, symmetric, float_zp in forms:
        session = ort.InferenceSession(nbits_model(weight, bits, block_size, level, symmetric, float_zp), options, providers=["CPUExecutionProvider"])
        rows.append({"bits": bits, "block_size": block_size, "accuracy_level": level, "zero_points": "none" if symmetric else ("float" if float_zp else "uint8"),
                     "median_ms": median_ms(session, feeds, runs), "rule_slow": cpu_slow_form(bits, block_size, level, float_zp)})
    for row in rows:
        four = next(r for r in rows if (r["bits"], r["block_size"], r["accuracy_level"], r["zero_points"]) == (4, row["block_size"], row["accuracy_level"], "uint8"))
        row["vs_4bit"] = row["median_ms"] / four["median_ms"]
        row["agrees"] = (row["vs_4bit"] > FAST_FACTOR) == (row["rule_slow"] is not None)
    return rows


def markdown(data: dict[str, Any]) -> str:
    agree = sum(r["agrees"] for r in data["rows"])
    lines = [
        "# MatMulNBits forms on ONNX Runtime's CPU kernel: fast path or not",
        "",
        (f"`{data['command']}` — one {K} × {N} layer, one token [1, {K}], 1 thread, median of {data['runs']} calls; "
        f"ONNX Runtime {ort.__version__}; load average {data['load']}. \"× 4-bit\": against the 4-bit uint8 form of the same block size and "
        f"accuracy_level; slow = beyond {FAST_FACTOR:g}×. The weight-only pass warns about the forms its rule calls slow "
        f"(`passes/weight_only/kernels.py`); the rule agrees with this measurement on {agree} of {len(data['rows'])} forms."),
        "",
        "| bits | block | accuracy_level | zero points | ms | × 4-bit | pass's rule | agrees |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['bits']} | {r['block_size']} | {r['accuracy_level']} | {r['zero_points']} | {r['median_ms']:.3f} | {r['vs_4bit']:.1f} | "
                     f"{'slow: ' + r['rule_slow'] if r['rule_slow'] else 'fast'} | {'yes' if r['agrees'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nbits_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    command = "python -m bench.nbits_kernels" + (f" --runs {args.runs}" if args.runs != 30 else "")
    rows = measure(args.runs)
    data = {"command": command, "runs": args.runs, "load": [round(x, 2) for x in os.getloadavg()], "environment": environment(), "rows": rows}
    path = write_json_and_markdown(args.out, "nbits_kernels", data, markdown(data))
    print(path.read_text(encoding="utf-8"))
    return 0 if all(r["agrees"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
