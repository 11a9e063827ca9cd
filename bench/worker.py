"""Run one optimizer (onnxopt or a peer) on one model in a fresh process; print a JSON result.

The suite starts ``python -m bench.worker SPEC.json`` once per model x configuration, so
every optimizer starts from the same state, a crash or hang cannot end the run, and the
process's peak memory belongs to that one optimizer call:

* ``seconds``: wall time of the optimizer call alone (``time.perf_counter`` around it; for
  ORT's quantizers it includes ``quant_pre_process``, ORT's recommended first step; for ORT
  graph-optimization levels it is the session creation that writes the optimized model);
* ``peak_rss_mb``: the worker's peak resident set (``VmHWM`` in /proc/self/status) at the end
  (the whole process: interpreter, imports, model, optimizer); ``baseline_rss_mb``: the same
  right before the call (after the imports); their difference is what the call itself added
  to the high-water mark.

The result is the last line of stdout; the suite reads nothing else.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def _rss_mb() -> float:
    """Peak resident set of this process so far, MB: VmHWM of /proc/self/status (Linux).  Not
    ``ru_maxrss``: after fork + exec it still carries the parent's peak at fork time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _onnxopt(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxopt

    options = dict(spec["config"]["options"])
    start = time.perf_counter()
    model, report = onnxopt.optimize(spec["src"], passes=spec["passes"], **options)
    seconds = time.perf_counter() - start
    onnxopt.save_model(model, spec["dst"])
    passes = {p.name: {"seconds": round(p.seconds, 4), "modified": p.modified, "refusals": len(p.refusals)}
              for p in report.passes}
    return {"seconds": seconds, "report_seconds": report.total_seconds, "passes": passes,
            "lossless": report.lossless}


def _onnxoptimizer(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.common import onnxoptimizer_optimize

    start = time.perf_counter()
    onnxoptimizer_optimize(spec["src"], spec["dst"], spec["config"]["options"].get("passes"))
    return {"seconds": time.perf_counter() - start}


def _onnxsim(spec: dict[str, Any]) -> dict[str, Any]:
    import onnx
    import onnxsim

    model = onnx.load(spec["src"])
    start = time.perf_counter()
    simplified, check = onnxsim.simplify(model)
    seconds = time.perf_counter() - start
    onnx.save(simplified, spec["dst"])
    return {"seconds": seconds, "check": bool(check)}


def _onnxslim(spec: dict[str, Any]) -> dict[str, Any]:
    import onnx
    import onnxslim

    model = onnx.load(spec["src"])
    start = time.perf_counter()
    slimmed = onnxslim.slim(model)
    seconds = time.perf_counter() - start
    onnx.save(slimmed, spec["dst"])
    return {"seconds": seconds}


def _ort_level(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.common import ort_optimized_model

    start = time.perf_counter()
    ort_optimized_model(spec["src"], spec["config"]["options"]["level"], spec["dst"])
    return {"seconds": time.perf_counter() - start}


class _Calibration:
    """What bench.fidelity.build_ort_static reads from its data argument."""

    def __init__(self, images: np.ndarray) -> None:
        self.calibration = images


def _ort_quant(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.fidelity import build_ort_dynamic, build_ort_static, pre_process

    dst = Path(spec["dst"])
    pre = dst.with_suffix(".pre.onnx")
    pre_seconds = pre_process(Path(spec["src"]), pre)
    options = spec["config"]["options"]
    if spec["config"]["tool"] == "ort_static":
        built = build_ort_static(pre, dst, options["method"], _Calibration(np.load(spec["calibration"])))
    else:
        built = build_ort_dynamic(pre, dst, options["weight_type"])
    pre.unlink(missing_ok=True)
    if not built.ok:
        raise RuntimeError(built.detail)
    return {"seconds": pre_seconds + built.extra["quantize_seconds"], "pre_process_seconds": pre_seconds}


TOOLS = {"onnxopt": _onnxopt, "onnxoptimizer": _onnxoptimizer, "onnxsim": _onnxsim, "onnxslim": _onnxslim,
         "ort_level": _ort_level, "ort_static": _ort_quant, "ort_dynamic": _ort_quant}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    # imports first, so the baseline includes them
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    import onnxopt  # noqa: F401

    baseline = _rss_mb()
    try:
        result = {"status": "ok", **TOOLS[spec["config"]["tool"]](spec)}
    except Exception as exc:  # noqa: BLE001 - the tool's own error, recorded verbatim
        traceback.print_exc(file=sys.stderr)
        result = {"status": "error", "detail": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
    result.update(baseline_rss_mb=round(baseline, 1), peak_rss_mb=round(_rss_mb(), 1))
    sys.stdout.flush()
    print("\n" + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
