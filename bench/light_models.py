"""The default pipeline on onnx's "light" model zoo (weights made by ConstantOfShape).

onnx ships light versions of nine zoo models under ``onnx/backend/test/data/light``: every
weight is ``ConstantOfShape(shape initializer)``, so the files are a few kB.  For each model:
wall time of ``onnxopt.optimize`` (default preset) and of its fold-constants pass, file size
before and after, and the largest difference to the output onnx ships beside the model, fed
the input onnx's backend test runner generates for light models.

    python -m bench.light_models   → bench/results/light_models.{json,md}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.backend.test.runner import Runner

import onnxopt

RESULTS = Path(__file__).parent / "results"
FOLDER = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def measure(path: Path) -> dict:
    model = onnx.load(str(path))
    start = time.perf_counter()
    out, report = onnxopt.optimize(model)
    seconds = time.perf_counter() - start
    data = out.SerializeToString()
    constants = {t.name for t in model.graph.initializer}
    feeds = {x.name: Runner.generate_dummy_data(x, random=False) for x in model.graph.input if x.name not in constants}
    expected = onnx.numpy_helper.to_array(onnx.load_tensor(str(path).replace(".onnx", "_output_0.pb")))
    (got,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    fold = next(p for p in report.passes if p.name == "fold-constants")
    return {
        "model": path.stem,
        "seconds": round(seconds, 3),
        "fold_constants_seconds": round(fold.seconds, 3),
        "bytes_before": os.path.getsize(path),
        "bytes_after": len(data),
        "max_abs_error": float(np.max(np.abs(got - expected))),
    }


def main() -> None:
    onnxopt.optimize(onnx.load(str(FOLDER / "light_squeezenet.onnx")))  # imports off the clock
    rows = [measure(path) for path in sorted(FOLDER.glob("light_*.onnx"))]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "light_models.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | optimize s | fold-constants s | bytes before | bytes after | max abs error |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['seconds']:.2f} | {r['fold_constants_seconds']:.2f} | {r['bytes_before']} | {r['bytes_after']} | {r['max_abs_error']:.1e} |"
        for r in rows
    ]
    (RESULTS / "light_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
