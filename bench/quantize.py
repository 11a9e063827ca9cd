"""Data-free QDQ quantization benchmark: onnxopt's ``quantize`` preset against ONNX Runtime's quantizers.

Models: the real pretrained MobileNetV2 and EfficientNet-Lite0
(``onnxopt.models.pretrained.export_pretrained``: opset 17, BatchNormalization kept), with
the models package's preprocessing (``onnxopt.models.datasets``: shorter side 256,
center crop 224; ImageNet mean/std for MobileNetV2, ``(x*255-127)/128`` for
EfficientNet-Lite0).

Configurations (each one an ONNX file, all run by ONNX Runtime on the CPU):

* ``fp32_original``: the exported FP32 model (the reference of every fidelity measure);
  ``fp32_folded``: ``onnxopt.optimize(path)``, the lossless default (BN folded).
* ``ort_static_minmax`` / ``ort_static_percentile``: ``onnxruntime.quantization.quantize_static``
  on the BN-folded FP32 model, after ORT's recommended ``quant_pre_process`` (symbolic
  shape inference + ORT's graph optimizations); QDQ format, per-channel int8 weights,
  uint8 activations, MinMax or Percentile (ORT default 99.999) calibration.  Calibration
  images: the 20 CIFAR-10 and 20 CIFAR-100 images shipped by foolbox (32x32, upscaled by the
  same preprocessing to 224): real photos, but never the evaluation images.
* ``ort_dynamic_int8``: ``quantize_dynamic`` with int8 weights (per tensor, ORT's default),
  as asked; ``ort_dynamic_uint8``: the same with uint8 weights, ORT's fastest dynamic form
  on CPU (ConvInteger with int8 weights is several times slower, docs/custom-ops.md), so the
  dynamic-quantization latency goal is checked against the faster of the two.
* ``onnxopt_{spiq,auto,pt}_w{8,6,4}a8``: ``onnxopt.optimize(fp32_path, preset="quantize",
  weight_bits=W, act_bits=8, spiq=S)`` on the original (BN-carrying) model, data-free;
  ``spiq=True`` forces SPIQ wherever possible, ``"auto"`` (the pass default) applies it
  where its error estimate wins, ``spiq=False`` is per-tensor static data-free quantization.  When the ``quantize``
  preset is not in ``onnxopt.passes.builtin_registry()`` these are recorded as
  "absent (pass not landed)"; when the call raises, as "error" with the message.  Nothing
  else ever stands in for them.
* ``onnxopt_spiq_w8a8_input_range`` (extra): SPIQ W8A8 also given ``input_range=(lo, hi)``,
  the model's normalisation applied to pixel values 0 and 1 (a property of the
  preprocessing formula, not data), so the layer reading the graph input can be quantized.
* ``onnxopt_auto_w4a8_int4`` (extra): SPIQ-auto W4A8 with ``int4_weights=True`` on the model
  converted to opset 21 (``onnx.version_converter``): INT4 weight storage; ORT's CPU
  provider does not fuse INT4 DequantizeLinear, so its layers run as float Convs.

Measured per configuration:

1. Fidelity on real inputs: the 20 ImageNet samples in 4 deterministic views (the standard
   center crop, its horizontal flip, a tighter crop -- shorter side 320 -- and a wider one
   -- shorter side 224) = 80 inputs (``--quick``: the first 3 views, 60): top-1 agreement with FP32, mean KL(FP32 || config) of
   the softmax outputs, cosine similarity of the logits (mean and min); top-1 accuracy on
   the 20 labelled images (standard view) and on all 80 (the labels hold for every view).
   Outputs come from ORT at ORT_ENABLE_ALL (the kernels that are deployed).
2. Model file size; the time the quantizer took (ORT: wall time of the call; onnxopt:
   ``report.total_seconds`` and the wall time of ``optimize()``).
3. The graph ORT actually runs (ORT_ENABLE_ALL, saved with
   ``SessionOptions.optimized_model_filepath``): its op counts, the number of QLinearConv
   nodes (any domain, NHWC variants included), float Convs (``Conv``/``FusedConv`` in any
   domain, NCHWc included) and ConvInteger; "fused" = QLinearConv present and no float Conv.
4. Latency in ORT (ORT_ENABLE_ALL, 1 and 2 intra-op threads, batch 1, one real image):
   every configuration of a model in one process, warmed up, timed round-robin
   (:func:`bench.common.time_interleaved`, intra-op spinning off); median and IQR in ms;
   ratios are taken between medians of the same block.
5. The onnxopt quantization time on the zoo ResNet-50 (SPIQ W8A8), when the preset exists.
6. Noise floor of the SPIQ-vs-per-tensor comparison: the mean KL moves by up to ~25 % when the
   FP32 weights change in the 6th significant digit (rounding luck: which weights and
   activations land on the other side of a rounding boundary).  Every onnxopt W{8,6,4}
   configuration is therefore also quantized from ``JITTER_COPIES`` copies of the model whose
   float initializers are multiplied by ``1 + 1e-6·N(0, 1)``; the goals are given both on
   the model itself and on the average over the model and its copies.
7. all-MiniLM-L6-v2 (transformer): onnxopt W8A8 data-free (LayerNorm statistics) and ORT
   ``quantize_dynamic`` against FP32: cosine of the sentence embeddings of SENTENCES to the
   FP32 ones, file size, integer/float MatMul-like ops in the graph ORT runs, latency at
   1 thread (batch 1, interleaved).

Outputs: ``<out>/quantize.json`` (raw numbers and the environment) and ``<out>/quantize.md``
(tables and the goals: SPIQ W8A8 >= 99 % top-1 agreement on MobileNetV2; SPIQ better --
lower mean KL -- than per-tensor at every weight bit-width; SPIQ W8A8 latency <= 1.05x
quantize_static W8A8; SPIQ W8A8 >= 1.15x faster than quantize_dynamic and >= 1.5x faster
than FP32 on MobileNetV2 at 1 thread; ResNet-50 quantization < 5 s).

    python -m bench.quantize [--out bench/results] [--quick] [--only mobilenet_v2,efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable, Sequence

import numpy as np
import onnx

import onnxopt
from bench.common import (
    compact_number_lists,
    environment,
    json_safe,
    load_average,
    op_counts,
    ort_optimized_model,
    ort_session,
    summarize,
    table,
    Timing,
    settings_record,
    time_interleaved,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
THREADS = (1, 2)
MODELS = {"mobilenet_v2": "MobileNetV2", "efficientnet_lite0": "EfficientNet-Lite0"}
NORMALIZATION = {"mobilenet_v2": "imagenet", "efficientnet_lite0": "efficientnet"}
# (name, shorter side after resize, horizontal flip): deterministic views of the 20 ImageNet samples.
VIEWS = (("center", 256, False), ("center_flip", 256, True), ("tight", 320, False), ("wide", 224, False))
CALIBRATION_GLOB = "cifar10*_*.png"  # foolbox's 20 CIFAR-10 + 20 CIFAR-100 images
WEIGHT_BITS = (8, 6, 4)
ACT_BITS = 8
QUANTIZE_PRESET = "quantize"
GOALS = {
    "agreement": 0.99,  # SPIQ W8A8 top-1 agreement with FP32 on MobileNetV2
    "vs_static": 1.05,  # SPIQ W8A8 latency / quantize_static W8A8 latency, at most
    "vs_dynamic": 1.15,  # quantize_dynamic latency / SPIQ W8A8 latency, at least (MobileNetV2, 1 thread)
    "vs_fp32": 1.5,  # FP32 latency / SPIQ W8A8 latency, at least (MobileNetV2, 1 thread)
    "resnet50_seconds": 5.0,
}
ORT_STATIC_OPTIONS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                      "reduce_range": False, "quant_pre_process": True}


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    family: str  # "fp32", "ort" or "onnxopt"
    weight_bits: int | None = None
    spiq: bool | str | None = None  # True (forced), "auto" (the pass default) or False
    input_range: bool = False  # also pass the input range implied by the model's normalisation
    int4: bool = False  # int4_weights=True on the model converted to opset 21


INPUT_RANGE_KEY = f"onnxopt_spiq_w8a{ACT_BITS}_input_range"
INT4_KEY = f"onnxopt_auto_w4a{ACT_BITS}_int4"
#: relative size of the weight jitter of the noise-floor copies, and how many copies
JITTER, JITTER_COPIES = 1e-6, 2


SPIQ_MODES = {True: ("spiq", "SPIQ"), "auto": ("auto", "SPIQ-auto (default)"), False: ("pt", "per-tensor")}


def onnxopt_key(bits: int, spiq: bool | str) -> str:
    return f"onnxopt_{SPIQ_MODES[spiq][0]}_w{bits}a{ACT_BITS}"


CONFIGS = [
    Config("fp32_original", "FP32 original", "fp32"),
    Config("fp32_folded", "FP32 onnxopt default (BN folded)", "fp32"),
    Config("ort_static_minmax", "ORT quantize_static MinMax W8A8", "ort"),
    Config("ort_static_percentile", "ORT quantize_static Percentile W8A8", "ort"),
    Config("ort_dynamic_int8", "ORT quantize_dynamic int8 weights", "ort"),
    Config("ort_dynamic_uint8", "ORT quantize_dynamic uint8 weights", "ort"),
    *(
        Config(onnxopt_key(bits, spiq), f"onnxopt {SPIQ_MODES[spiq][1]} W{bits}A{ACT_BITS}", "onnxopt", bits, spiq)
        for bits in WEIGHT_BITS for spiq in (True, "auto", False)
    ),
    Config(INPUT_RANGE_KEY, f"onnxopt SPIQ W8A{ACT_BITS} + input_range (extra)", "onnxopt", 8, True, input_range=True),
    Config(INT4_KEY, f"onnxopt SPIQ-auto W4A{ACT_BITS} INT4 storage, opset 21 (extra)", "onnxopt", 4, "auto", int4=True),
]
CONFIG_BY_KEY = {c.key: c for c in CONFIGS}


@dataclass(frozen=True)
class Settings:
    quick: bool
    views: int  # how many of VIEWS to evaluate on (20 inputs each)
    optimize_repeats: int
    timing: Timing

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            return cls(True, views=3, optimize_repeats=1, timing=Timing(warmup=3, min_runs=20, max_runs=20, target_seconds=0.0))
        return cls(False, views=len(VIEWS), optimize_repeats=3, timing=Timing(warmup=10, min_runs=40, max_runs=400, target_seconds=8.0))


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


# --------------------------------------------------------------------------- availability
def quantize_availability() -> dict[str, Any]:
    """Whether the ``quantize`` preset exists in the built-in registry, and the quantization passes."""
    try:
        from onnxopt.passes import builtin_registry

        registry = builtin_registry()
    except Exception as exc:  # noqa: BLE001 - a pass module being edited may not import
        return {"available": False, "preset_steps": None, "quant_passes": {}, "presets": [], "error": error_text(exc)}
    presets = [p.name for p in registry.presets()]
    passes = {  # pass name -> its options and their defaults
        cls.name: {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in cls.options_spec.items()}
        for cls in registry.passes() if "quant" in cls.name
    }
    steps = list(registry.preset(QUANTIZE_PRESET).steps) if QUANTIZE_PRESET in presets else None
    sources = {cls.name: source_digest(cls) for cls in registry.passes() if "quant" in cls.name}
    return {"available": steps is not None, "preset_steps": steps, "quant_passes": passes, "presets": presets,
            "pass_source_sha256": sources}


def source_digest(cls: type) -> str | None:
    """sha256 (first 16 hex digits) of the .py files of the package/module defining ``cls``:
    the pass is edited concurrently, so the git commit alone does not say which version ran."""
    try:
        path = Path(inspect.getfile(cls))
    except (TypeError, OSError):
        return None
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


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


def load_data(name: str, views_count: int) -> EvalData:
    from onnxopt.models.datasets import normalize

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

    ends = normalize(np.stack([np.zeros((3, 1, 1)), np.ones((3, 1, 1))]).astype(np.float32), NORMALIZATION[name])
    return [float(ends.min()), float(ends.max())]


# --------------------------------------------------------------------------- configurations
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


def build_fp32_folded(src: Path, dst: Path) -> Built:
    try:
        (model, report), seconds = timed(lambda: onnxopt.optimize(src))
        onnxopt.save_model(model, dst)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        return Built("error", detail=error_text(exc))
    return Built("ok", dst, extra={"optimize_seconds": seconds, "report_total_seconds": report.total_seconds})


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


def pass_summary(report: Any) -> dict[str, Any]:
    """Each pass of an onnxopt report: seconds, modified, stats, number of refusals (and the first few)."""
    def brief(name: str, stats: dict[str, Any]) -> dict[str, Any]:
        return stats if name == QUANTIZE_PRESET else {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}

    return {
        p.name: {
            "seconds": p.seconds, "modified": p.modified, "stats": brief(p.name, p.stats),
            "refusals": len(p.refusals), "first_refusals": [r.to_dict() for r in p.refusals[:5]],
        }
        for p in report.passes
    }


def quantize_with_onnxopt(src: Path, repeats: int, **options: Any) -> tuple[onnx.ModelProto, Any, list[float], list[float]]:
    """``repeats`` calls of the quantize preset: (first model, first report, total_seconds, wall seconds)."""
    totals: list[float] = []
    walls: list[float] = []
    first: tuple[onnx.ModelProto, Any] | None = None
    for _ in range(repeats):
        (model, report), seconds = timed(lambda: onnxopt.optimize(src, preset=QUANTIZE_PRESET, **options))
        totals.append(report.total_seconds)
        walls.append(seconds)
        first = first or (model, report)
    if first is None:
        raise ValueError("repeats must be at least 1")
    return first[0], first[1], totals, walls


def onnxopt_options(config: Config, model_name: str) -> dict[str, Any]:
    options: dict[str, Any] = {"weight_bits": config.weight_bits, "act_bits": ACT_BITS, "spiq": config.spiq}
    if config.input_range:
        options["input_range"] = tuple(input_range(model_name))
    if config.int4:
        options["int4_weights"] = True
    return options


def at_opset_21(src: Path, dst: Path) -> Path:
    """``src`` converted with onnx.version_converter to opset 21 (IR 10), as int4_weights requires."""
    from onnx import version_converter

    if not dst.exists():
        converted = version_converter.convert_version(onnx.load(str(src)), 21)
        converted.ir_version = max(converted.ir_version, 10)
        onnx.save(converted, str(dst))
    return dst


def build_onnxopt(src: Path, dst: Path, config: Config, model_name: str, availability: dict[str, Any], repeats: int) -> Built:
    if not availability["available"]:
        return Built("absent", detail=f"pass not landed: no {QUANTIZE_PRESET!r} preset in onnxopt.passes.builtin_registry()")
    if config.input_range and not any("input_range" in opts for opts in availability["quant_passes"].values()):
        return Built("absent", detail="the quantize pass has no input_range option")
    options = onnxopt_options(config, model_name)
    try:
        model, report, totals, walls = quantize_with_onnxopt(src, repeats, **options)
        onnxopt.save_model(model, dst)
    except Exception as exc:  # noqa: BLE001 - the pass's own error, recorded verbatim
        traceback.print_exc()
        return Built("error", detail=error_text(exc))
    extra = {
        "call": f"onnxopt.optimize(path, preset={QUANTIZE_PRESET!r}, "
                + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")",
        "report_total_seconds": totals, "optimize_seconds": walls, "lossless": report.lossless,
        "passes": pass_summary(report),
    }
    return Built("ok", dst, extra=extra)


def build_configs(
    name: str, src: Path, data: EvalData, availability: dict[str, Any], settings: Settings, workdir: Path
) -> dict[str, Built]:
    built: dict[str, Built] = {"fp32_original": Built("ok", src)}
    built["fp32_folded"] = build_fp32_folded(src, workdir / "fp32_folded.onnx")
    log(f"  fp32_folded: {built['fp32_folded'].status}")
    folded = built["fp32_folded"].file if built["fp32_folded"].ok else src
    pre = workdir / "fp32_folded.preprocessed.onnx"
    pre_seconds = pre_process(folded, pre)
    for method in ("MinMax", "Percentile"):
        key = f"ort_static_{method.lower()}"
        built[key] = build_ort_static(pre, workdir / f"{key}.onnx", method, data)
        built[key].extra["pre_process_seconds"] = pre_seconds
        log(f"  {key}: {built[key].status} {built[key].detail}")
    for weight_type in ("QInt8", "QUInt8"):
        key = f"ort_dynamic_{weight_type[1:].lower()}"
        built[key] = build_ort_dynamic(folded, workdir / f"{key}.onnx", weight_type)
        log(f"  {key}: {built[key].status} {built[key].detail}")
    for config in CONFIGS:
        if config.family == "onnxopt":
            source = at_opset_21(src, workdir / "opset21.onnx") if config.int4 else src
            built[config.key] = build_onnxopt(source, workdir / f"{config.key}.onnx", config, name, availability, settings.optimize_repeats)
            log(f"  {config.key}: {built[config.key].status} {built[config.key].detail}")
    return built


# --------------------------------------------------------------------------- measurements
def run_model(path: Path, inputs: np.ndarray, chunk: int = 20) -> np.ndarray:
    """First output of the model for every input, ORT_ENABLE_ALL; batches of ``chunk``, or one by one."""
    sess = ort_session(path, "all")
    name = sess.get_inputs()[0].name
    try:
        parts = [sess.run(None, {name: inputs[i : i + chunk]})[0] for i in range(0, len(inputs), chunk)]
    except Exception:  # noqa: BLE001 - a fixed batch dimension
        parts = [sess.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))]
    return np.concatenate(parts).reshape(len(inputs), -1).astype(np.float64)


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


def measure_config(built: Built, reference: np.ndarray, data: EvalData, workdir: Path, key: str) -> dict[str, Any]:
    record: dict[str, Any] = {"status": built.status, **({"detail": built.detail} if built.detail else {}), **built.extra}
    if not built.ok:
        return record
    record["size_bytes"] = built.file.stat().st_size
    try:
        record["fidelity"] = fidelity(reference, run_model(built.file, data.inputs), data.labels, data.views)
        record["ort_graph"] = ort_graph(built.file, workdir / f"{key}.ort_all.onnx")
    except Exception as exc:  # noqa: BLE001 - e.g. ORT cannot load the model
        traceback.print_exc()
        record["status"] = "error"
        record["detail"] = f"running in ORT: {error_text(exc)}"
    return record


def latency_block(paths: dict[str, Path], feeds: dict[str, np.ndarray], threads: int, settings: Settings) -> dict[str, Any]:
    sessions = {key: ort_session(p, "all", threads, spinning=False) for key, p in paths.items()}
    load_before = load_average()
    samples = time_interleaved(sessions, feeds, **settings.timing.kwargs())
    stats = {key: summarize(values) for key, values in samples.items()}
    base = stats.get("fp32_folded") or stats["fp32_original"]
    for s in stats.values():
        s["speedup_vs_fp32_folded"] = base["median_ms"] / s["median_ms"]
    return {
        "stats": stats, "samples_ms": {k: [round(v, 4) for v in vals] for k, vals in samples.items()},
        "load_average_before": load_before, "load_average_after": load_average(),
    }


def measure_latency(records: dict[str, dict[str, Any]], built: dict[str, Built], data: EvalData, settings: Settings) -> dict[str, Any]:
    paths = {key: b.file for key, b in built.items() if b.ok and records[key]["status"] == "ok"}
    input_name = onnx.load(str(paths["fp32_original"]), load_external_data=False).graph.input[0].name
    feeds = {input_name: data.inputs[:1]}
    per_threads = {}
    for threads in THREADS:
        try:
            per_threads[str(threads)] = latency_block(paths, feeds, threads, settings)
        except Exception as exc:  # noqa: BLE001
            per_threads[str(threads)] = {"error": error_text(exc)}
    return {"level": "ORT_ENABLE_ALL", "intra_op_spinning": False, "batch": 1, "threads": per_threads}


def bench_model(name: str, availability: dict[str, Any], settings: Settings, workdir: Path) -> dict[str, Any]:
    from onnxopt.models.pretrained import export_pretrained

    result: dict[str, Any] = {"name": name, "title": MODELS[name], "normalization": NORMALIZATION[name]}
    try:
        src = with_retry(lambda: export_pretrained(name))
        data = load_data(name, settings.views)
    except Exception as exc:  # noqa: BLE001 - e.g. torch or an asset package missing
        result["error"] = f"could not export the model or load the images: {error_text(exc)}"
        return result
    result["inputs"] = {
        "count": len(data.inputs), "views": [v[0] for v in VIEWS[: settings.views]],
        "calibration_images": data.calibration_files, "input_range": input_range(name),
    }
    t0 = time.perf_counter()
    built = build_configs(name, src, data, availability, settings, workdir)
    log(f"  configurations built in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    reference = run_model(src, data.inputs)
    result["configs"] = {key: measure_config(b, reference, data, workdir, key) for key, b in built.items()}
    log(f"  fidelity and ORT graphs in {time.perf_counter() - t0:.1f} s; noise floor")
    result["noise_floor"] = noise_floor(name, src, data, reference, workdir, availability)
    log("  timing")
    result["latency"] = measure_latency(result["configs"], built, data, settings)
    return result


def jittered_copy(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with every float initializer multiplied by (1 + JITTER·N(0, 1)): the same network
    to ~6 significant digits, so its quantized KL shows how much rounding luck moves the figure."""
    from onnx import numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 1:
            jittered = (values * (1 + JITTER * rng.standard_normal(values.shape))).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(jittered, tensor.name))
    onnx.save(model, str(dst))
    return dst


def noise_floor(name: str, src: Path, data: EvalData, reference: np.ndarray, workdir: Path, availability: dict[str, Any]) -> dict[str, Any]:
    """Mean KL of the onnxopt W{8,6,4} configurations on JITTER_COPIES jittered copies of the model."""
    if not availability["available"]:
        return {}
    kls: dict[str, list[float]] = {}
    for seed in range(1, JITTER_COPIES + 1):
        copy = jittered_copy(src, workdir / f"jitter{seed}.onnx", seed)
        for bits in WEIGHT_BITS:
            for spiq in (True, "auto", False):
                config = CONFIG_BY_KEY[onnxopt_key(bits, spiq)]
                try:
                    model, _ = onnxopt.optimize(copy, preset=QUANTIZE_PRESET, **onnxopt_options(config, name))
                    path = workdir / f"jitter{seed}_{config.key}.onnx"
                    onnxopt.save_model(model, path)
                    kls.setdefault(config.key, []).append(fidelity(reference, run_model(path, data.inputs), data.labels, data.views)["kl_mean"])
                except Exception as exc:  # noqa: BLE001
                    log(f"  noise floor {config.key} seed {seed}: {error_text(exc)}")
    return {"jitter": JITTER, "copies": JITTER_COPIES, "kl_means": kls}


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
MINILM_CONFIGS = {
    "fp32": "FP32",
    "onnxopt_auto_w8a8": "onnxopt W8A8 data-free (LayerNorm ranges, SPIQ-auto)",
    "ort_dynamic_int8": "ORT quantize_dynamic int8 weights (on the constant-folded FP32)",
}


def bench_minilm(availability: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """all-MiniLM-L6-v2: what onnxopt quantizes data-free (the linear layers fed by a LayerNorm),
    the embedding cosine to FP32 on SENTENCES, ORT's fused ops, latency at 1 thread."""
    if not availability["available"]:
        return {"status": "absent"}
    try:
        from onnxopt.models.pretrained import export_minilm, minilm_embedder, minilm_tokenize

        src = export_minilm()
        tokenizer, _ = minilm_embedder()
        seq_len = next(d.dim_value for d in onnx.load(str(src), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:])
        feeds = minilm_tokenize(tokenizer, SENTENCES, seq_len)
    except Exception as exc:  # noqa: BLE001 - the MiniLM asset or transformers missing
        return {"status": "error", "detail": f"could not export MiniLM: {error_text(exc)}"}
    result: dict[str, Any] = {"status": "ok", "sentences": len(SENTENCES), "seq_len": seq_len, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_minilm_") as tmp:
        paths = {"fp32": Path(src)}
        (model, report), seconds = timed(lambda: onnxopt.optimize(src, preset=QUANTIZE_PRESET, weight_bits=8, act_bits=8))
        paths["onnxopt_auto_w8a8"] = Path(tmp) / "onnxopt.onnx"
        onnxopt.save_model(model, paths["onnxopt_auto_w8a8"])
        result["onnxopt"] = {"report_total_seconds": report.total_seconds, "passes": pass_summary(report)}
        # on the raw export the linear weights are Transpose(initializer): quantize_dynamic then only
        # quantizes the embedding tables; onnxopt's lossless default folds them into initializers
        folded, _ = onnxopt.optimize(src)
        onnxopt.save_model(folded, Path(tmp) / "folded.onnx")
        dynamic = build_ort_dynamic(Path(tmp) / "folded.onnx", Path(tmp) / "dynamic.onnx", "QInt8")
        if dynamic.ok:
            paths["ort_dynamic_int8"] = dynamic.file
        outputs = {}
        for key, path in paths.items():
            sess = ort_session(path, "all")
            outputs[key] = np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(len(SENTENCES))])
            counts = op_counts(ort_optimized_model(path, "all", Path(tmp) / f"{key}.ort_all.onnx"))
            cos = (outputs[key] * outputs["fp32"]).sum(1) / (np.linalg.norm(outputs[key], axis=1) * np.linalg.norm(outputs["fp32"], axis=1))
            result["configs"][key] = {
                "size_bytes": path.stat().st_size, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "op_counts": counts,
                "integer_matmuls": sum(n for op, n in counts.items() if any(k in op for k in ("MatMulInteger", "QLinearMatMul", "QuantizeMatMul", "QGemm", "QAttention", "MatMulNBits"))),
                "float_matmuls": sum(n for op, n in counts.items() if op.rsplit(":", 1)[-1] in ("MatMul", "FusedMatMul", "Gemm", "Attention")),
            }
        sessions = {key: ort_session(path, "all", 1, spinning=False) for key, path in paths.items()}
        one = {k: v[:1] for k, v in feeds.items()}
        samples = time_interleaved(sessions, one, **settings.timing.kwargs())
        for key, values in samples.items():
            result["configs"][key]["latency_1thread"] = summarize(values)
    return result


def minilm_section(minilm: dict[str, Any]) -> list[str]:
    lines = ["## all-MiniLM-L6-v2 (transformer): data-free W8A8 from LayerNorm statistics", ""]
    if minilm.get("status") != "ok":
        return lines + [f"not run: {minilm.get('status')} {minilm.get('detail', '')}"]
    quant = minilm["onnxopt"]["passes"].get("quantize", {})
    rows = []
    for key, title in MINILM_CONFIGS.items():
        rec = minilm["configs"].get(key)
        if rec is None:
            continue
        lat = rec.get("latency_1thread", {})
        rows.append([title, f"{rec['cosine_mean']:.4f} ({rec['cosine_min']:.4f})", f"{rec['size_bytes'] / 1e6:.2f}",
                     f"{rec['integer_matmuls']} / {rec['float_matmuls']}", fmt_ms(lat) if lat else "-"])
    header = ["configuration", "embedding cosine to FP32: mean (min)", "size MB", "ORT graph: integer / float MatMul-like ops", "1 thread ms: median (IQR)"]
    stats = quant.get("stats", quant)
    return lines + [
        f"{minilm['sentences']} real sentences padded to {minilm['seq_len']} tokens, batch 1; onnxopt quantize stats: "
        f"layers quantized / float {stats.get('layers_quantized', '?')} / {stats.get('layers_float', '?')}, SPIQ coverage "
        f"{stats.get('spiq_coverage', '?')} (in this post-LN BERT every LayerNorm output is also read by the residual Add, "
        "so the scales cannot be folded: per-tensor fallback); the attention output projections and the FFN output layers "
        "read tensors without data-free statistics and get the dynamic form (dynamic_fallback='auto', see "
        "bench/results/minilm_dynamic.md); float MatMul-like ops include the attention products.",
        "", *table(header, rows),
    ]


def bench_resnet50(availability: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """onnxopt quantize (SPIQ W8A8) time on the zoo ResNet-50."""
    if not availability["available"]:
        return {"status": "absent", "detail": f"pass not landed: no {QUANTIZE_PRESET!r} preset"}
    try:
        from onnxopt.models.build import build_zoo_model

        src = build_zoo_model("resnet50")
        _, report, totals, walls = quantize_with_onnxopt(src, settings.optimize_repeats, weight_bits=8, act_bits=ACT_BITS, spiq=True)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return {"status": "error", "detail": error_text(exc)}
    return {"status": "ok", "report_total_seconds": totals, "optimize_seconds": walls, "passes": pass_summary(report)}


# --------------------------------------------------------------------------- goals
def block_stats(result: dict[str, Any], threads: int) -> dict[str, Any]:
    return result.get("latency", {}).get("threads", {}).get(str(threads), {}).get("stats", {})


def kl_of(result: dict[str, Any], key: str) -> float | None:
    rec = result.get("configs", {}).get(key, {})
    return rec.get("fidelity", {}).get("kl_mean") if rec.get("status") == "ok" else None


def goal(text: str, met: bool | None, value: str) -> dict[str, Any]:
    return {"goal": text, "met": met, "value": value}


def agreement_goal(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    text = f"SPIQ W8A8 top-1 agreement with FP32 on MobileNetV2 >= {GOALS['agreement']:.0%}"
    rec = results.get("mobilenet_v2", {}).get("configs", {}).get(onnxopt_key(8, True), {})
    if rec.get("status") != "ok":
        return goal(text, None, rec.get("status", "model not run"))
    agreement = rec["fidelity"]["top1_agreement"]
    return goal(text, agreement >= GOALS["agreement"], f"{agreement:.1%} of {rec['fidelity']['inputs']} inputs")


def kl_copies(result: dict[str, Any], key: str) -> list[float]:
    """Mean KL of ``key`` on the model and on its jittered copies (the noise floor)."""
    first = kl_of(result, key)
    return ([] if first is None else [first]) + result.get("noise_floor", {}).get("kl_means", {}).get(key, [])


def spiq_vs_pt_goal(results: dict[str, dict[str, Any]], mode: bool | str = True, copies: bool = False) -> dict[str, Any]:
    over = f" (average over the model and its {JITTER_COPIES} jittered copies; min-max in brackets)" if copies else " (the model itself)"
    text = f"{SPIQ_MODES[mode][1]} at least as good (mean KL vs FP32 <=) as per-tensor at every weight bit-width{over}"
    verdicts, parts = [], []
    for name, result in results.items():
        for bits in WEIGHT_BITS:
            if copies:
                spiq_all, pt_all = kl_copies(result, onnxopt_key(bits, mode)), kl_copies(result, onnxopt_key(bits, False))
                if len(spiq_all) < 2 or len(pt_all) < 2:
                    continue
                spiq, pt = float(np.mean(spiq_all)), float(np.mean(pt_all))
                verdicts.append(spiq <= pt)
                parts.append(f"{MODELS[name]} W{bits}: {spiq:.3g} [{min(spiq_all):.3g}-{max(spiq_all):.3g}] vs "
                             f"{pt:.3g} [{min(pt_all):.3g}-{max(pt_all):.3g}]")
                continue
            spiq, pt = kl_of(result, onnxopt_key(bits, mode)), kl_of(result, onnxopt_key(bits, False))
            if spiq is None or pt is None:
                continue
            verdicts.append(spiq <= pt)
            parts.append(f"{MODELS[name]} W{bits}: {spiq:.3g} vs {pt:.3g}")
    if not verdicts:
        return goal(text, None, "onnxopt configurations absent")
    return goal(text, all(verdicts), "; ".join(parts))


def latency_ratio(result: dict[str, Any], threads: int, numerator: str, denominator: str) -> float | None:
    stats = block_stats(result, threads)
    if numerator not in stats or denominator not in stats:
        return None
    return stats[numerator]["median_ms"] / stats[denominator]["median_ms"]


def vs_static_goal(results: dict[str, dict[str, Any]], key: str, what: str) -> dict[str, Any]:
    text = f"latency {what} / quantize_static (MinMax) W8A8 <= {GOALS['vs_static']}"
    measured = {
        f"{MODELS[name]} {t} thr": latency_ratio(result, t, key, "ort_static_minmax")
        for name, result in results.items() for t in THREADS
    }
    ratios = {k: v for k, v in measured.items() if v is not None}
    if not ratios:
        return goal(text, None, f"{key} absent")
    return goal(text, all(v <= GOALS["vs_static"] for v in ratios.values()), "; ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


def speedup_goal(results: dict[str, dict[str, Any]], baselines: Sequence[str], key: str, what: str) -> dict[str, Any]:
    """SPIQ W8A8 on MobileNetV2 at 1 thread at least GOALS[key] times faster than every baseline."""
    text = f"SPIQ W8A8 >= {GOALS[key]}x faster than {what} on MobileNetV2 at 1 thread"
    result = results.get("mobilenet_v2", {})
    measured = {b: latency_ratio(result, 1, b, onnxopt_key(8, True)) for b in baselines}
    ratios = {k: v for k, v in measured.items() if v is not None}
    if len(ratios) < len(measured):
        return goal(text, None, "onnxopt SPIQ W8A8 (or a baseline) absent")
    return goal(text, all(v >= GOALS[key] for v in ratios.values()), "; ".join(f"vs {k}: {v:.3f}x" for k, v in ratios.items()))


def resnet50_goal(resnet50: dict[str, Any]) -> dict[str, Any]:
    text = f"onnxopt quantization (SPIQ W8A8) of ResNet-50 < {GOALS['resnet50_seconds']:g} s (report.total_seconds)"
    if resnet50.get("status") != "ok":
        return goal(text, None, resnet50.get("status", "not run"))
    seconds = median(resnet50["report_total_seconds"])
    return goal(text, seconds < GOALS["resnet50_seconds"], f"{seconds:.2f} s (median of {len(resnet50['report_total_seconds'])})")


def evaluate_goals(results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        agreement_goal(results),
        spiq_vs_pt_goal(results),
        spiq_vs_pt_goal(results, "auto"),
        spiq_vs_pt_goal(results, True, copies=True),
        spiq_vs_pt_goal(results, "auto", copies=True),
        vs_static_goal(results, onnxopt_key(8, True), "SPIQ W8A8"),
        speedup_goal(results, ("ort_dynamic_int8", "ort_dynamic_uint8"), "vs_dynamic", "quantize_dynamic (int8 and uint8 weights)"),
        speedup_goal(results, ("fp32_folded", "fp32_original"), "vs_fp32", "FP32 (BN folded and original)"),
        resnet50_goal(resnet50),
        vs_static_goal(results, INPUT_RANGE_KEY, "(extra, not a stated goal) SPIQ W8A8 + input_range"),
    ]


# --------------------------------------------------------------------------- markdown
def quant_seconds(rec: dict[str, Any]) -> str:
    if "report_total_seconds" in rec and isinstance(rec["report_total_seconds"], list):
        return f"{median(rec['report_total_seconds']):.2f}"
    if "quantize_seconds" in rec:
        return f"{rec['quantize_seconds']:.2f}"
    return "-"


def fidelity_row(config: Config, rec: dict[str, Any]) -> list[str]:
    if rec.get("status") != "ok":
        label = "absent (pass not landed)" if rec.get("status") == "absent" else f"{rec.get('status')}: {rec.get('detail', '')[:120]}"
        return [config.title, label, *([""] * 7)]
    f, g = rec["fidelity"], rec["ort_graph"]
    graph = f"{g['qlinearconv']} / {g['float_conv']} / {g['conv_integer']}" + (" fused" if g["fused"] else "")
    return [
        config.title, f"{f['top1_agreement']:.1%}", f"{f['kl_mean']:.4f}", f"{f['cosine_mean']:.4f} ({f['cosine_min']:.3f})",
        f"{f['accuracy_20'][0]}/{f['accuracy_20'][1]}", f"{f['accuracy_all'][0]}/{f['accuracy_all'][1]}",
        f"{rec['size_bytes'] / 1e6:.2f}", quant_seconds(rec), graph,
    ]


def fidelity_section(result: dict[str, Any]) -> list[str]:
    header = ["configuration", "top-1 agreement", "mean KL", "cosine mean (min)", "acc 20", "acc all views",
              "size MB", "quantize s", "ORT graph: QLinearConv / float Conv / ConvInteger"]
    rows = [fidelity_row(CONFIG_BY_KEY[key], rec) for key, rec in result["configs"].items()]
    n = next((r["fidelity"]["inputs"] for r in result["configs"].values() if "fidelity" in r), "?")
    return [f"### {result['title']}: fidelity vs FP32 ({n} real inputs), size, ORT graph", "", *table(header, rows)]


def fmt_ms(stats: dict[str, Any] | None) -> str:
    return "-" if not stats else f"{stats['median_ms']:.3g} ({stats['iqr_ms']:.2g})"


def latency_section(result: dict[str, Any]) -> list[str]:
    blocks = result.get("latency", {}).get("threads", {})
    rows = []
    for key in result["configs"]:
        cells = [CONFIG_BY_KEY[key].title]
        for threads in THREADS:
            stats = blocks.get(str(threads), {}).get("stats", {}).get(key)
            cells += [fmt_ms(stats), f"{stats['speedup_vs_fp32_folded']:.2f}x" if stats else "-"]
        rows.append(cells)
    header = ["configuration"] + [h for t in THREADS for h in (f"{t} thread(s) ms: median (IQR)", "speed-up vs FP32 folded")]
    runs = {t: b["stats"]["fp32_original"]["runs"] for t, b in blocks.items() if "stats" in b}
    loads = {t: (b.get("load_average_before") or ["?"])[0] for t, b in blocks.items() if "stats" in b}
    errors = [f"{t} thread(s): {b['error']}" for t, b in blocks.items() if "error" in b]
    return [f"### {result['title']}: latency in ORT (ORT_ENABLE_ALL, batch 1)", "", *table(header, rows), "",
            f"Runs per configuration: {runs}; 1-minute load average before each block: {loads}." + (" Errors: " + "; ".join(errors) if errors else "")]


def op_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for key, rec in result["configs"].items():
        if rec.get("status") == "ok":
            ops = ", ".join(f"{op} {n}" for op, n in sorted(rec["ort_graph"]["op_counts"].items()))
            rows.append([CONFIG_BY_KEY[key].title, ops])
    return [f"### {result['title']}: op counts of the graph ORT runs (ORT_ENABLE_ALL)", "", *table(["configuration", "ops"], rows)]


def pass_seconds(rec: dict[str, Any], name: str) -> float | None:
    entry = rec.get("passes", {}).get(name)
    return entry["seconds"] if entry else None


def onnxopt_row(title: str, rec: dict[str, Any]) -> list[str]:
    stats = rec.get("passes", {}).get(QUANTIZE_PRESET, {}).get("stats", {})
    quantize_s = pass_seconds(rec, QUANTIZE_PRESET)
    all_passes = sum(p["seconds"] for p in rec.get("passes", {}).values())
    coverage = stats.get("spiq_coverage")
    return [
        title, f"{stats.get('layers_quantized', '-')} / {stats.get('layers_float', '-')}",
        "-" if coverage is None else f"{coverage:.0%}", str(stats.get("outputs_quantized", "-")),
        "-" if quantize_s is None else f"{quantize_s:.3f}", f"{all_passes:.3f}",
        f"{median(rec['report_total_seconds']):.3f}", f"{median(rec['optimize_seconds']):.3f}",
    ]


def onnxopt_section(results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[str]:
    rows = [
        onnxopt_row(f"{result['title']} / {CONFIG_BY_KEY[key].title}", rec)
        for result in results.values() for key, rec in result.get("configs", {}).items()
        if CONFIG_BY_KEY[key].family == "onnxopt" and rec.get("status") == "ok"
    ]
    if resnet50.get("status") == "ok":
        rows.append(onnxopt_row("ResNet-50 (zoo) / onnxopt SPIQ W8A8", resnet50))
    header = ["model / configuration", "layers quantized / float", "SPIQ coverage", "outputs quantized",
              "quantize pass s", "all passes s", "report.total_seconds", "optimize() wall s"]
    return ["## onnxopt quantization: what the pass did and how long it took", "", *table(header, rows), "",
            "Times are medians over the repeats (first repeat for the pass columns); report.total_seconds also counts the "
            "metrics the PassManager takes around every pass; the wall time also loads the model."]


def goals_section(goals: list[dict[str, Any]]) -> list[str]:
    verdict = {True: "met", False: "**NOT met**", None: "n/a"}
    rows = [[g["goal"], verdict[g["met"]], g["value"]] for g in goals]
    return ["## Goals", "", *table(["goal", "verdict", "measured"], rows)]


def presence_section(availability: dict[str, Any], results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[str]:
    lines = ["## onnxopt quantization: presence", ""]
    if availability["available"]:
        lines.append(f"Preset `{QUANTIZE_PRESET}` = {', '.join(availability['preset_steps'])}; quantization passes and their option defaults: "
                     f"{json.dumps(availability['quant_passes'])}; source sha256 (the pass is being edited): "
                     f"{json.dumps(availability.get('pass_source_sha256', {}))}.")
    else:
        lines.append(f"**The `{QUANTIZE_PRESET}` preset is not in `onnxopt.passes.builtin_registry()`** (presets: "
                     f"{', '.join(availability['presets'])}): every onnxopt configuration is recorded as absent (pass not landed); "
                     "nothing stands in for it.")
    for name, result in results.items():
        states = {k: r.get("status") for k, r in result.get("configs", {}).items() if CONFIG_BY_KEY[k].family == "onnxopt"}
        lines.append(f"- {MODELS[name]}: " + ", ".join(f"{CONFIG_BY_KEY[k].title}: {s}" for k, s in states.items()))
    lines.append(f"- ResNet-50 (zoo) SPIQ W8A8 timing: {resnet50.get('status')}"
                 + (f", report.total_seconds {', '.join(f'{s:.2f}' for s in resnet50['report_total_seconds'])}" if resnet50.get("status") == "ok" else ""))
    return lines


def failures_section(results: dict[str, dict[str, Any]], resnet50: dict[str, Any]) -> list[str]:
    lines = []
    for name, result in results.items():
        if "error" in result:
            lines.append(f"- {MODELS[name]}: {result['error']}")
        for key, rec in result.get("configs", {}).items():
            if rec.get("status") == "error":
                lines.append(f"- {MODELS[name]} / {CONFIG_BY_KEY[key].title}: {rec.get('detail', '')}")
    if resnet50.get("status") == "error":
        lines.append(f"- ResNet-50: {resnet50['detail']}")
    return ["## Failures", "", *(lines or ["none"])]


def method_notes() -> list[str]:
    return [
        "## How",
        "",
        "- Fidelity: real inputs = the 20 foolbox ImageNet samples in deterministic views (standard 256/224 center crop, "
        "its horizontal flip, shorter side 320 and 224 center crops: 80 inputs; --quick uses the first 3 views, 60 inputs), models "
        "package preprocessing; reference = the FP32 original in ORT. Agreement = same argmax; KL = mean over inputs of "
        "KL(softmax FP32 || softmax config); cosine of the logit vectors. acc 20 = top-1 on the 20 labelled standard crops; "
        "acc all views = on every view (the labels hold).",
        "- ORT quantize_static: on the BN-folded FP32 model after `quant_pre_process` (ORT's recommended shape inference + "
        "graph optimization; here it changes no op and gives the same fused graph, it is kept because ORT asks for it); QDQ, "
        "per-channel int8 weights, uint8 activations, ORT's defaults otherwise. Calibrated on foolbox's 20 CIFAR-10 + 20 "
        "CIFAR-100 images upscaled to 224 (real photos, disjoint from the evaluation images; a domain shift that a data-free "
        "method does not have to pay, but also the only other real images shipped).",
        "- ORT quantize_dynamic: int8 weights (as specified) and uint8 weights (ORT's fastest ConvInteger form on CPU), per tensor.",
        "- onnxopt: `onnxopt.optimize(original_path, preset=\"quantize\", weight_bits=W, act_bits=8, spiq=S)`, no data "
        "(the graph input has no BN statistics, so the first Conv stays float by the pass's documented default). The extra "
        "configuration \"+ input_range\" also passes `input_range=(lo, hi)`, the model's input normalisation applied to pixel "
        "values 0 and 1 (a property of the preprocessing formula, not of data), so the first Conv is quantized too; "
        "\"quantize s\" = median `report.total_seconds`; for ORT the wall time of the quantizer call (plus calibration).",
        "- ORT graph column: QLinearConv nodes (any domain, NHWC included) / float Conv (Conv, FusedConv, NCHWc Conv) / "
        "ConvInteger in the graph ORT runs at ORT_ENABLE_ALL; \"fused\" = QLinearConv and no float Conv.",
        "- Latency: one real image, batch 1, every configuration in one process, warmed up, timed round-robin with intra-op "
        "spinning off; speed-ups and goal ratios are between medians of the same block.",
    ]


def render_markdown(data: dict[str, Any]) -> str:
    env, results = data["environment"], data["models"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Data-free QDQ quantization benchmark",
        "",
        f"Generated by `{data['command']}` on {env['date']} ({'quick' if data['settings']['quick'] else 'full'} mode, "
        f"{data['seconds']:.0f} s). {env['cpu_model']}, {env['cpus_usable']} usable CPU(s); {versions}. "
        f"Source: {env['git_commit'] or '?'}{' + uncommitted changes' if env['git_dirty_files'] else ''}. "
        "Raw numbers: quantize.json. What is measured and how: the docstring of bench/quantize.py.",
        "",
        *goals_section(data["goals"]), "",
        *presence_section(data["quantize_availability"], results, data["resnet50"]), "",
        *onnxopt_section(results, data["resnet50"]), "",
        "## Results", "",
    ]
    for result in results.values():
        if "configs" in result:
            lines += [*fidelity_section(result), "", *latency_section(result), ""]
    for result in results.values():
        if "configs" in result:
            lines += [*op_section(result), ""]
    lines += [*minilm_section(data.get("minilm", {})), ""]
    lines += [*failures_section(results, data["resnet50"]), "", *method_notes(), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_results(data: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "quantize.json", out_dir / "quantize.md"
    text = json.dumps(json_safe(json.loads(json.dumps(data, default=json_default))), indent=1)
    json_path.write_text(compact_number_lists(text) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(data), encoding="utf-8")
    return json_path, md_path


def run(names: Sequence[str], settings: Settings, command: str) -> dict[str, Any]:
    start = time.perf_counter()
    env = environment()
    availability = quantize_availability()
    log(f"quantize preset available: {availability['available']} (presets: {availability['presets']})")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        for i, name in enumerate(names, 1):
            log(f"[{i}/{len(names)}] {name}")
            workdir = Path(tmp) / name
            workdir.mkdir()
            t0 = time.perf_counter()
            try:
                results[name] = bench_model(name, availability, settings, workdir)
            except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the other
                traceback.print_exc()
                results[name] = {"name": name, "title": MODELS[name], "error": error_text(exc)}
            log(f"  done in {time.perf_counter() - t0:.1f} s")
    resnet50 = bench_resnet50(availability, settings)
    log("MiniLM")
    try:
        minilm = bench_minilm(availability, settings)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        minilm = {"status": "error", "detail": error_text(exc)}
    return {
        "minilm": minilm,
        "benchmark": "quantize", "command": command, "settings": settings_record(settings), "environment": env,
        "quantize_availability": availability, "goals": evaluate_goals(results, resnet50), "resnet50": resnet50,
        "seconds": time.perf_counter() - start, "models": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="fewer latency runs, one onnxopt repeat (~2 min)")
    parser.add_argument("--only", help=f"comma-separated model names (default: {','.join(MODELS)})")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    command = ("python -m bench.quantize " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    data = run(names, Settings.for_mode(args.quick), command)
    json_path, md_path = write_results(data, args.out)
    log(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
