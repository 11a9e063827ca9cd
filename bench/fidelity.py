"""Shared library of the quantization benchmarks: models, real inputs, fidelity, ORT's quantizers.

* The two ImageNet models (``MODELS``, their ``NORMALIZATION``), the 20 labelled ImageNet
  samples in deterministic ``VIEWS`` and the CIFAR calibration images (:func:`load_data`,
  :func:`image_views`, :func:`calibration_images`, :func:`input_range`).
* ``TEXT_MODELS``: the PP-OCR text-orientation classifier (real weights from the
  ``rapidocr-onnxruntime`` wheel, :mod:`onnxopt.models.ocr`), evaluated on seeded rendered
  text lines, half rotated 180° (labels 0 / 180); ``ALL_MODELS`` = both kinds, and
  :func:`model_path` gives the ONNX file of any of them.
* Running a model in ORT and comparing it with a reference: :func:`run_model`,
  :func:`fidelity` (top-1 agreement, KL, logit cosine, accuracy), :func:`log_softmax`, and
  :func:`ort_graph` (what ORT actually runs: QLinearConv / float Conv / ConvInteger counts).
* ORT's own quantizers as baselines: :func:`pre_process`, :func:`build_ort_static`,
  :func:`build_ort_dynamic` (each returns a :class:`Built`), and helpers (:func:`timed`,
  :func:`quiet_quantizer`, :func:`with_retry`, :func:`log`, :func:`error_text`).
* The real English ``SENTENCES`` the MiniLM measurements embed.

Used by bench/quantize.py (which re-exports every name here), bench/equalize.py,
bench/power_quant.py, bench/rex.py, bench/red.py, bench/minilm_dynamic.py, bench/worker.py and
bench/workloads.py.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

import onnxopt
from bench.common import op_counts, ort_optimized_model, ort_session

MODELS = {"mobilenet_v2": "MobileNetV2", "efficientnet_lite0": "EfficientNet-Lite0"}
NORMALIZATION = {"mobilenet_v2": "imagenet", "efficientnet_lite0": "efficientnet"}
TEXT_MODELS = {"ppocr_cls": "PP-OCR text-orientation classifier"}
ALL_MODELS = {**MODELS, **TEXT_MODELS}
#: rendered text lines per view (each view a different seed), and the calibration lines' seed
TEXT_LINES_PER_VIEW = 250
TEXT_CALIBRATION_SEED = 1000
# (name, shorter side after resize, horizontal flip): deterministic views of the 20 ImageNet samples.
VIEWS = (("center", 256, False), ("center_flip", 256, True), ("tight", 320, False), ("wide", 224, False))
CALIBRATION_GLOB = "cifar10*_*.png"  # foolbox's 20 CIFAR-10 + 20 CIFAR-100 images
ORT_STATIC_OPTIONS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                      "reduce_range": False, "quant_pre_process": True}


@dataclass
class Built:
    """One configuration's ONNX file (or why there is none) and how it was made."""

    status: str  # "ok", "absent" or "error"
    path: Path | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def file(self) -> Path:
        if self.path is None:
            raise ValueError(f"no model file ({self.status}: {self.detail})")
        return self.path


@dataclass
class EvalData:
    inputs: np.ndarray  # [20 * views, 3, 224, 224]
    labels: np.ndarray  # [20 * views]
    views: list[str]  # view name of each input
    calibration: np.ndarray  # [40, 3, 224, 224]
    calibration_files: list[str]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


def bench_each_model(names: Sequence[str], prefix: str, bench_one: Callable[[str, Path], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``bench_one(name, workdir)`` for each model of ``names`` (MODELS), each in its own
    temporary folder; a model whose benchmark raises gets an ``error`` entry instead, so one
    model's failure loses no other."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for name in names:
            log(name)
            workdir = Path(tmp) / name
            workdir.mkdir()
            try:
                results[name] = bench_one(name, workdir)
            except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the other
                traceback.print_exc()
                results[name] = {"name": name, "title": ALL_MODELS[name], "error": error_text(exc)}
    return results


# --------------------------------------------------------------------------- data
def with_retry(fn: Callable[[], Any], tries: int = 4, wait: float = 15.0) -> Any:
    """Retry an asset load: the shared venv's asset packages are sometimes being reinstalled."""
    for attempt in range(tries):
        try:
            return fn()
        except onnxopt.OnnxoptError as exc:
            if attempt == tries - 1:
                raise
            log(f"  asset not available ({exc}); retrying in {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def image_views(count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The ImageNet samples in the first ``count`` views of VIEWS, in [0, 1]: (images, labels, view names)."""
    from onnxopt.models.datasets import imagenet_sample_files, preprocess_image

    files = imagenet_sample_files()
    images, labels, views = [], [], []
    for view, resize, flip in VIEWS[:count]:
        for path, label in files:
            image = preprocess_image(path, resize=resize)
            images.append(image[:, :, ::-1] if flip else image)
            labels.append(label)
            views.append(view)
    return np.ascontiguousarray(np.stack(images)), np.array(labels, dtype=np.int64), views


def calibration_images() -> tuple[np.ndarray, list[str]]:
    """foolbox's CIFAR-10/100 images (not the evaluation set), upscaled to 224, in [0, 1]."""
    from onnxopt.models.assets import asset_dir
    from onnxopt.models.datasets import preprocess_image

    files = sorted((asset_dir("imagenet_samples") / "data").glob(CALIBRATION_GLOB))
    if not files:
        raise onnxopt.OnnxoptError(f"no {CALIBRATION_GLOB} calibration images in foolbox's data folder")
    return np.stack([preprocess_image(p) for p in files]), [p.name for p in files]


def model_path(name: str) -> Path:
    """The FP32 ONNX file of ``name`` (ALL_MODELS): the cached export of a pretrained ImageNet
    model, or the PP-OCR classifier from the asset cache."""
    if name == "ppocr_cls":
        from onnxopt.models.ocr import ppocr_cls_path

        return ppocr_cls_path()
    from onnxopt.models.pretrained import export_pretrained

    return export_pretrained(name)


def load_text_data(views_count: int) -> EvalData:
    """``views_count`` × TEXT_LINES_PER_VIEW rendered text lines (view v: seed v), label 1 =
    rotated 180°; calibration: 40 other lines (seed TEXT_CALIBRATION_SEED)."""
    from onnxopt.models.ocr import ppocr_cls_inputs

    parts = [ppocr_cls_inputs(TEXT_LINES_PER_VIEW, seed) for seed in range(views_count)]
    calibration, _ = ppocr_cls_inputs(40, TEXT_CALIBRATION_SEED)
    views = [f"text_lines_seed{seed}" for seed in range(views_count) for _ in range(TEXT_LINES_PER_VIEW)]
    return EvalData(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), views,
                    calibration, [f"rendered text line {i} (seed {TEXT_CALIBRATION_SEED})" for i in range(len(calibration))])


def load_data(name: str, views_count: int) -> EvalData:
    from onnxopt.models.datasets import normalize

    if name in TEXT_MODELS:
        return load_text_data(views_count)
    images, labels, views = with_retry(lambda: image_views(views_count))
    calibration, calibration_files = with_retry(calibration_images)
    norm = NORMALIZATION[name]
    return EvalData(
        normalize(images, norm).astype(np.float32), labels, views,
        normalize(calibration, norm).astype(np.float32), calibration_files,
    )


def input_range(name: str) -> list[float]:
    """[low, high] of the normalised input: the model's normalisation applied to pixel values 0 and 1 (no data)."""
    from onnxopt.models.datasets import normalize

    if name in TEXT_MODELS:
        return [-1.0, 1.0]  # (x / 255 − 0.5) / 0.5

    ends = normalize(np.stack([np.zeros((3, 1, 1)), np.ones((3, 1, 1))]).astype(np.float32), NORMALIZATION[name])
    return [float(ends.min()), float(ends.max())]


# --------------------------------------------------------------------------- ORT's quantizers
@contextlib.contextmanager
def quiet_quantizer():
    """ORT's quantizer prints progress on stdout and logs advice on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def calibration_reader(input_name: str, images: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{input_name: images[i : i + 1]} for i in range(len(images))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return Reader()


def pre_process(src: Path, dst: Path) -> float:
    """ORT's recommended quantization preprocessing; its wall time."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_quantizer():
        _, seconds = timed(lambda: quant_pre_process(str(src), str(dst)))
    return seconds


def build_ort_static(src: Path, dst: Path, method: str, data: EvalData) -> Built:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    try:
        with quiet_quantizer():
            _, seconds = timed(lambda: quantize_static(
                str(src), str(dst), calibration_reader(input_name, data.calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
            ))
    except Exception as exc:  # noqa: BLE001
        return Built("error", detail=error_text(exc))
    return Built("ok", dst, extra={"quantize_seconds": seconds, "calibration": method, "options": ORT_STATIC_OPTIONS,
                                   "calibration_images": len(data.calibration)})


def build_ort_dynamic(src: Path, dst: Path, weight_type: str) -> Built:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet_quantizer():
            _, seconds = timed(lambda: quantize_dynamic(str(src), str(dst), weight_type=getattr(QuantType, weight_type)))
    except Exception as exc:  # noqa: BLE001
        return Built("error", detail=error_text(exc))
    return Built("ok", dst, extra={"quantize_seconds": seconds, "weight_type": weight_type, "per_channel": False})


# --------------------------------------------------------------------------- measurements
def run_model(path: Path, inputs: np.ndarray, chunk: int = 20) -> np.ndarray:
    """First output of the model for every input, ORT_ENABLE_ALL; batches of ``chunk``, or one by
    one.  A model whose output is a Softmax's (the PP-OCR classifier) gives the Softmax's input,
    its logits, instead: the metrics here take logits, and a float32 probability saturated at
    0 or 1 has no usable logarithm."""
    logits = softmax_input(path)
    if logits is None:
        return _run_first_output(path, inputs, chunk)
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.append(onnx.ValueInfoProto(name=logits))
    with tempfile.TemporaryDirectory(prefix="bench_logits_") as tmp:
        probe = Path(tmp) / "logits.onnx"
        onnx.save(model, str(probe))
        return _run_first_output(probe, inputs, chunk)


def _run_first_output(path: Path, inputs: np.ndarray, chunk: int) -> np.ndarray:
    sess = ort_session(path, "all")
    name = sess.get_inputs()[0].name
    try:
        parts = [sess.run(None, {name: inputs[i : i + chunk]})[0] for i in range(0, len(inputs), chunk)]
    except Exception:  # noqa: BLE001 - a fixed batch dimension
        parts = [sess.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))]
    return np.concatenate(parts).reshape(len(inputs), -1).astype(np.float64)


def softmax_input(path: Path) -> str | None:
    """The input tensor of the Softmax writing the model's first output (through Identity and
    Reshape nodes: the opset-13 upgrade writes an opset-11 Softmax as Flatten → Softmax →
    Reshape), or None when that output is not a Softmax's."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type in ("Identity", "Reshape"):
        node = producers.get(node.input[0])
    return node.input[0] if node is not None and node.op_type == "Softmax" else None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fidelity(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray, views: Sequence[str]) -> dict[str, Any]:
    """Agreement, KL(reference || logits), cosine of logits, accuracy (standard view and all)."""
    log_p, log_q = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    cos = (reference * logits).sum(axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(logits, axis=1))
    top1 = logits.argmax(axis=1)
    standard = np.array([v == VIEWS[0][0] for v in views])
    return {
        "inputs": len(logits),
        "top1_agreement": float((top1 == reference.argmax(axis=1)).mean()),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
        "accuracy_20": [int((top1[standard] == labels[standard]).sum()), int(standard.sum())],
        "accuracy_all": [int((top1 == labels).sum()), len(labels)],
    }


def ort_graph(path: Path, out_path: Path) -> dict[str, Any]:
    """Op counts of the graph ORT runs at ORT_ENABLE_ALL, QLinearConv / float Conv / ConvInteger counts."""
    counts = op_counts(ort_optimized_model(path, "all", out_path))
    out_path.unlink(missing_ok=True)

    def total(pred: Callable[[str], bool]) -> int:
        return sum(n for op, n in counts.items() if pred(op.rsplit(":", 1)[-1]))

    qlinear = total(lambda op: "QLinearConv" in op)
    float_conv = total(lambda op: op in ("Conv", "FusedConv"))
    return {
        "op_counts": counts, "qlinearconv": qlinear, "float_conv": float_conv,
        "conv_integer": total(lambda op: op == "ConvInteger"), "fused": qlinear > 0 and float_conv == 0,
    }


# --------------------------------------------------------------------------- MiniLM (transformer)
#: Real English sentences (varied topics and lengths) embedded by MiniLM; no labels needed:
#: the measure is the cosine of each quantized embedding to its FP32 embedding.
SENTENCES = (
    "movie is awesome", "so great", "The weather is lovely today.", "It's so sunny outside!",
    "He drove to the stadium.", "A man is playing a guitar on stage.", "The new phone has a larger battery than the old one.",
    "Please send me the quarterly report by Friday.", "Your account has been suspended, click here to verify your password.",
    "Congratulations, you have won a free cruise!", "Can we move the meeting to Tuesday afternoon?",
    "The cat sat quietly on the windowsill watching the birds.", "Interest rates rose for the third time this year.",
    "I'm not sure this restaurant is worth the wait.", "Photosynthesis converts light energy into chemical energy.",
    "The train to Lyon was delayed by forty minutes.", "She finished the marathon in under four hours.",
    "Limited offer: buy one, get two free, today only!", "The committee approved the budget after a long debate.",
    "Water boils at a lower temperature at high altitude.", "My laptop keeps restarting after the update.",
    "A stunning goal in the final minute decided the match.", "Thanks for your help with the move last weekend.",
    "The museum reopens next month with a new exhibition.",
)
