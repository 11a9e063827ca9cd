"""Does ORT's parallel executor run REx's independent branches concurrently to any gain?

Real pretrained MobileNetV2 (data-free, as in bench/rex.py): W8A8, W4A8 + REx 50 % with the
``permute`` and ``gather`` combine forms.  Each model runs in two session setups on the 2
cores, all interleaved in one process (:func:`bench.common.time_interleaved`):

* sequential executor, 2 intra-op threads (each kernel split over both cores);
* parallel executor (``ORT_PARALLEL``), 2 inter-op threads and 1 intra-op thread (independent
  nodes — a layer's base and branch — on different cores).

    python -m bench.rex_parallel   → bench/results/rex_parallel.{json,md}
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxopt

from .common import environment, json_safe, load_average, session_options, summarize, table, time_interleaved

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "w8a8": dict(preset="quantize", weight_bits=8, act_bits=8),
    "w4a8_rex50_permute": dict(preset="rex", weight_bits=4, act_bits=8, rex_order=2, rex_budget=0.5, rex_combine="permute"),
    "w4a8_rex50_gather": dict(preset="rex", weight_bits=4, act_bits=8, rex_order=2, rex_budget=0.5, rex_combine="gather"),
}
SETUPS = {"sequential_2x1": (ort.ExecutionMode.ORT_SEQUENTIAL, 2, 1), "parallel_1x2": (ort.ExecutionMode.ORT_PARALLEL, 1, 2)}


def session(path: Path, mode: ort.ExecutionMode, intra: int, inter: int) -> ort.InferenceSession:
    options = session_options("all", intra, spinning=False)
    options.execution_mode, options.inter_op_num_threads = mode, inter
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> int:
    from onnxopt.models.pretrained import export_pretrained

    src = export_pretrained("mobilenet_v2")
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, options in CONFIGS.items():
            model, _ = onnxopt.optimize(src, **options)
            path = Path(tmp) / f"{key}.onnx"
            onnx.save(model, path)
            for setup, (mode, intra, inter) in SETUPS.items():
                sessions[f"{key} {setup}"] = session(path, mode, intra, inter)
        x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
        feeds = {next(iter(sessions.values())).get_inputs()[0].name: x}
        before = load_average()
        samples = time_interleaved(sessions, feeds, warmup=10, min_runs=40, max_runs=300, target_seconds=6)
    stats = {k: summarize(v) for k, v in samples.items()}
    data = {"command": "python -m bench.rex_parallel", "environment": environment(), "load_before": before, "load_after": load_average(), "stats": stats}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rex_parallel.json").write_text(json.dumps(json_safe(data), indent=1) + "\n")
    rows = [[key, *(f"{stats[f'{key} {s}']['median_ms']:.2f} ({stats[f'{key} {s}']['iqr_ms']:.2f})" for s in SETUPS)] for key in CONFIGS]
    lines = ["# ORT parallel executor and REx branches (bench/rex_parallel.py)", "", f"Command: `{data['command']}`; MobileNetV2, batch 1, "
             f"median (IQR) ms, load average {before} before.", "", *table(["config", *SETUPS], rows), ""]
    (RESULTS / "rex_parallel.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
