"""How good can a 4-bit block fit with integer zero points get?  The search of onnxopt's
weight-only pass against an exhaustive search, and against float zero points (ORT's HQQ
and onnxopt's ``zero_points="float"``).

ONNX Runtime's fast CPU ``MatMulNBits`` kernel takes uint8 zero points (an integer level);
float zero points move it off that path.  So "HQQ's fidelity at round-to-nearest's speed"
asks an integer-zero-point fit to match a float-zero-point one.  This benchmark measures
how far an integer zero point can go at all: for every block, every zero point 0..15 and a
dense grid of steps (then least-squares refits of the step with the codes fixed), the
lowest squared error found — an exhaustive search, not a proof, but its grid is far finer
than the pass's.  If onnxopt's search is at that optimum and HQQ is still better, the gap
is the format's, not the search's.

Weights: the synthetic decoder stack's three matrices of one layer (Student-t(5) entries,
as in :func:`bench.weight_only.synthetic_decoder`) and every constant-weight MatMul of
all-MiniLM-L6-v2 (real weights, after onnxopt's lossless pipeline folds the export's weight
Transposes); ``--columns`` output columns of each matrix (seeded) so
the exhaustive search stays short.  Error: relative weight error sqrt(Σ(W − Ŵ)² / ΣW²)
over all those columns, unweighted for every method (the pass weights rows by LayerNorm
statistics; that is left out here so that the fits are compared on one objective).
Configurations, all 4 bits, block 32, asymmetric:

* ``rtn``: round to nearest (onnxopt's, the same as ORT's default);
* ``search``: onnxopt's default clipping/zero-point search (integer zero points);
* ``exhaustive``: the exhaustive integer-zero-point search above;
* ``float``: onnxopt's ``zero_points="float"`` fit;
* ``ort_hqq``: ORT's ``MatMulNBitsQuantizer`` with ``HQQWeightOnlyQuantConfig`` (float zero
  points), run on a one-MatMul model per matrix and decoded from its initializers.

    python -m bench.zero_point_bound [--out bench/results] [--columns 256]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bench.common import environment, write_json_and_markdown
from onnxopt.passes.weight_only.blockwise import blocked, dequantize_packed, quantize_blocks

RESULTS = Path(__file__).parent / "results"
BITS, BLOCK = 4, 32
#: Steps tried per zero point, as multiples of the block's RTN step (range / 15).
STEP_GRID = np.linspace(0.5, 1.5, 101, dtype=np.float32)
REFIT_ROUNDS = 3
#: Blocks processed at once by the exhaustive search (bounds its temporaries).
BLOCK_CHUNK = 4096


def exhaustive_integer_fit(weight: np.ndarray) -> np.ndarray:
    """Ŵ[K, N]: per block, the best (step, integer zero point) over every zero point and
    :data:`STEP_GRID`, then least-squares refits of the step for the fixed zero point."""
    k, n = weight.shape
    w = blocked(weight, BLOCK).reshape(-1, BLOCK)
    out = np.empty_like(w)
    for start in range(0, len(w), BLOCK_CHUNK):
        out[start:start + BLOCK_CHUNK] = _best_block_fit(w[start:start + BLOCK_CHUNK])
    return out.reshape(n, -1)[:, :k].T


def _best_block_fit(w: np.ndarray) -> np.ndarray:
    top = 2**BITS - 1
    rtn_step = np.maximum(w.max(-1) - w.min(-1), 1e-12) / top
    best_error = np.full(len(w), np.inf, np.float32)
    best = np.zeros_like(w)
    for zero in range(top + 1):
        zero_error = np.full(len(w), np.inf, np.float32)
        zero_step = rtn_step.copy()
        for factor in STEP_GRID:  # the best grid step for this zero point
            step = rtn_step * factor
            error = np.square(_decoded(w, step, zero) - w).sum(-1)
            zero_step = np.where(error < zero_error, step, zero_step)
            zero_error = np.minimum(error, zero_error)
        for _ in range(REFIT_ROUNDS + 1):  # then least-squares steps for its codes
            codes = np.clip(np.rint(w / zero_step[:, None]) + zero, 0, top) - zero
            decoded = codes * zero_step[:, None]
            error = np.square(decoded - w).sum(-1)
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best[better] = decoded[better]
            energy = np.square(codes).sum(-1)
            refit = (codes * w).sum(-1) / np.maximum(energy, 1e-30)
            zero_step = np.where((energy > 0) & (refit > 0), refit, zero_step).astype(np.float32)
    return best


def _decoded(w: np.ndarray, step: np.ndarray, zero: int) -> np.ndarray:
    top = 2**BITS - 1
    return (np.clip(np.rint(w / step[:, None]) + zero, 0, top) - zero) * step[:, None]


def ort_hqq_fit(weight: np.ndarray) -> np.ndarray:
    """Ŵ of ORT's HQQ on a one-MatMul model holding ``weight``, decoded from its initializers."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "one",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with contextlib.redirect_stdout(None):
        quantizer = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=BITS))
        quantizer.process()
    node = next(n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    b, scales = inits[node.input[1]], inits[node.input[2]]
    zero_points = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    return dequantize_packed(b, scales, zero_points, k=k, n=n, bits=BITS, block_size=BLOCK)


METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rtn": lambda w: quantize_blocks(w, BITS, BLOCK, search=False).dequantized(),
    "search": lambda w: quantize_blocks(w, BITS, BLOCK).dequantized(),
    "exhaustive": exhaustive_integer_fit,
    "float": lambda w: quantize_blocks(w, BITS, BLOCK, float_zero_points=True).dequantized(),
    "ort_hqq": ort_hqq_fit,
}
LABELS = {
    "rtn": "round to nearest (integer zero points)",
    "search": "onnxopt search (integer zero points, the default)",
    "exhaustive": "exhaustive integer-zero-point search",
    "float": "onnxopt `--zero-points float`",
    "ort_hqq": "ORT MatMulNBitsQuantizer HQQ (float zero points)",
}
INTEGER = ("rtn", "search", "exhaustive")


def synthetic_weights() -> dict[str, np.ndarray]:
    from bench.weight_only import synthetic_decoder

    model = synthetic_decoder(1)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".weight")}


def minilm_weights() -> dict[str, np.ndarray]:
    import onnxopt
    from onnxopt.models.pretrained import export_minilm

    model, _ = onnxopt.optimize(export_minilm())  # the lossless pipeline folds the weights' Transposes
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            array = numpy_helper.to_array(inits[node.input[1]])
            if array.ndim == 2 and array.shape[0] >= BLOCK:
                weights[node.input[1]] = array.astype(np.float32)
    return weights


def measure(weights: dict[str, np.ndarray], columns: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    squared = {key: 0.0 for key in METHODS}
    energy = 0.0
    for name, weight in weights.items():
        picked = np.sort(rng.choice(weight.shape[1], min(columns, weight.shape[1]), replace=False))
        w = np.ascontiguousarray(weight[:, picked])
        energy += float(np.square(w, dtype=np.float64).sum())
        for key, fit in METHODS.items():
            squared[key] += float(np.square(fit(w) - w, dtype=np.float64).sum())
        print(f"  {name}: {w.shape}", file=sys.stderr, flush=True)
    return {"matrices": len(weights), "columns_per_matrix": columns,
            "relative_error": {key: float(np.sqrt(value / energy)) for key, value in squared.items()}}


def markdown(data: dict[str, Any], command: str) -> str:
    lines = [
        "# 4-bit blocks with integer zero points: onnxopt's search against an exhaustive search and float zero points",
        "",
        f"`{command}` — 4 bits, block 32, asymmetric; relative weight error sqrt(Σ(W − Ŵ)² / ΣW²), unweighted, "
        f"over {data['columns']} seeded output columns of every matrix. See the module docstring of `bench/zero_point_bound.py`.",
        "",
        "| method | synthetic stack (Student-t weights) | all-MiniLM-L6-v2 (real weights) |",
        "|---|---|---|",
    ]
    for key, label in LABELS.items():
        cells = [f"{data[model]['relative_error'][key]:.5f}" for model in ("synthetic", "minilm")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "## Reading", ""]
    for model in ("synthetic", "minilm"):
        errors = data[model]["relative_error"]
        share = (errors["rtn"] - errors["search"]) / max(errors["rtn"] - errors["exhaustive"], 1e-30)
        lines.append(
            f"* {model}: the default search reaches {share:.1%} of the way from round to nearest to the exhaustive "
            f"integer-zero-point fit; the best integer fit is {'below' if errors['exhaustive'] < errors['ort_hqq'] else 'above'} "
            f"HQQ's error ({errors['exhaustive']:.5f} vs {errors['ort_hqq']:.5f}); float zero points: {errors['float']:.5f}."
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zero_point_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--columns", type=int, default=256, help="output columns per matrix (seeded)")
    args = parser.parse_args(argv)
    command = "python -m bench.zero_point_bound" + (f" --columns {args.columns}" if args.columns != 256 else "")
    data: dict[str, Any] = {"command": command, "columns": args.columns, "environment": environment()}
    for model, source in (("synthetic", synthetic_weights), ("minilm", minilm_weights)):
        print(f"{model}:", file=sys.stderr, flush=True)
        data[model] = measure(source(), args.columns)
    path = write_json_and_markdown(args.out, "zero_point_bound", data, markdown(data, command))
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
