"""Calibration time: ``onnxopt --quantize w8a8 --calibration-data`` against ORT's ``quantize_static``.

Model: the real pretrained MobileNetV2 (``onnxopt.models.pretrained.load_pretrained``)
exported with plain ``torch.onnx.export(model.eval(), x, path, opset_version=17,
dynamo=False)``: BN folded by the exporter, fixed batch 1, so there are no BN statistics and
calibration data is required.  ``--dynamic-batch`` exports with a dynamic batch axis instead.

Samples: the first ``--samples`` (default 10) of the 20 ImageNet JPEGs of the
``imagenet_samples`` asset, given to onnxopt as the folder of JPEGs (its own documented
preprocessing: shorter side 256, center crop 224, ImageNet mean/std, NCHW) or, with
``--data npz``, as an ``.npz`` of the same arrays (the only format older versions read).
``quantize_static`` gets the same arrays one sample per ``get_next`` (as bench/fidelity.py
calls it): QDQ, per-channel int8 weights, uint8 activations, MinMax, no ``quant_pre_process``.

Each configuration runs as a separate process (imports and model loading included, as a
user would see it), ``--repeats`` times round-robin; the medians of the wall times are
printed, with the time of the quantize pass (onnxopt's report) or of the ``quantize_static``
call (ORT).  Fidelity: cosine of the logits and top-1 agreement with FP32 on all 20 images.

    python -m bench.calibration [--work /tmp/calib] [--samples 10] [--repeats 3] [--data images|npz]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

ORT_STATIC_SCRIPT = """
import sys, time, numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
src, dst, data, name = sys.argv[1:5]
images = np.load(data)[name]
class Reader(CalibrationDataReader):
    def __init__(self):
        self._it = iter([{name: images[i:i + 1]} for i in range(len(images))])
    def get_next(self):
        return next(self._it, None)
start = time.perf_counter()
quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
print(f"CALL_SECONDS {time.perf_counter() - start:.3f}")
"""


def prepare(work: Path, samples: int, dynamic_batch: bool) -> tuple[Path, Path, Path, str]:
    """(model, image folder, npz, input name) in ``work``."""
    import onnx
    import torch

    from onnxopt.models.datasets import imagenet_sample_files, load_imagenet_samples
    from onnxopt.models.pretrained import load_pretrained

    work.mkdir(parents=True, exist_ok=True)
    model_path = work / ("mobilenet_v2_folded_dynamic.onnx" if dynamic_batch else "mobilenet_v2_folded.onnx")
    if not model_path.exists():
        axes = {"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
        torch.onnx.export(load_pretrained("mobilenet_v2").eval(), torch.zeros(1, 3, 224, 224), str(model_path),
                          opset_version=17, dynamo=False, input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    proto = onnx.load(str(model_path))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node), "expected a BN-folded export"
    name = proto.graph.input[0].name
    folder = work / f"images{samples}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for path, _ in imagenet_sample_files()[:samples]:
        shutil.copy(path, folder / path.name)
    npz = work / f"calibration{samples}.npz"
    np.savez(npz, **{name: load_imagenet_samples("imagenet")[0][:samples]})
    return model_path, folder, npz, name


def run_onnxopt(model: Path, data: Path, out: Path, method: str) -> tuple[float, float]:
    cmd = ["onnxopt", str(model), "-o", str(out), "--quantize", "w8a8", "--calibration-data", str(data), "--act-ranges", method]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"onnxopt failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    match = re.search(r"^quantize\s+([\d.]+)(m?s)", proc.stdout + proc.stderr, re.M)
    seconds = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1) if match else float("nan")
    return wall, seconds


def run_ort_static(model: Path, npz: Path, name: str, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", ORT_STATIC_SCRIPT, str(model), str(out), str(npz), name], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"quantize_static failed: {proc.stderr.strip().splitlines()[-1]}")
    return wall, float(re.search(r"CALL_SECONDS ([\d.]+)", proc.stdout).group(1))


def fidelity(reference: Path, quantized: Path) -> dict[str, float]:
    from onnxopt.models.datasets import load_imagenet_samples
    from onnxopt.runtime import session

    import onnx

    images = load_imagenet_samples("imagenet")[0]

    def logits(path: Path) -> np.ndarray:
        sess = session(onnx.load(str(path)), optimize=True)
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))]).astype(np.float64)

    ref, got = logits(reference), logits(quantized)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    return {"cosine_mean": round(float(cos.mean()), 5), "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxopt-calibration-bench"))
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", choices=("images", "npz"), default="images")
    parser.add_argument("--methods", default="minmax,percentile")
    parser.add_argument("--dynamic-batch", action="store_true")
    args = parser.parse_args(argv)
    model, folder, npz, name = prepare(args.work, args.samples, args.dynamic_batch)
    data = folder if args.data == "images" else npz
    configs = {f"onnxopt_{m}": (lambda m=m: run_onnxopt(model, data, args.work / f"q_{m}.onnx", m)) for m in args.methods.split(",")}
    configs["ort_quantize_static_minmax"] = lambda: run_ort_static(model, npz, name, args.work / "q_ort.onnx")
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in configs}
    for _ in range(args.repeats):
        for key, call in configs.items():
            times[key].append(call())
    outputs = {f"onnxopt_{m}": args.work / f"q_{m}.onnx" for m in args.methods.split(",")} | {"ort_quantize_static_minmax": args.work / "q_ort.onnx"}
    result = {
        key: {"wall_seconds": round(median(w for w, _ in runs), 2), "quantize_seconds": round(median(s for _, s in runs), 2),
              **fidelity(model, outputs[key])}
        for key, runs in times.items()
    }
    print(json.dumps({"model": model.name, "samples": args.samples, "data": str(data), "repeats": args.repeats, "results": result}, indent=1))


if __name__ == "__main__":
    main()
