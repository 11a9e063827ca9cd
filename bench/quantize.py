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

Code: this file builds and measures the configurations (defined in bench/quantize_configs.py);
bench/quantize_report.py judges the goals and writes the markdown; the models, inputs, fidelity
metrics and ORT quantizer wrappers are the shared library bench/fidelity.py.

    python -m bench.quantize [--out bench/results] [--quick] [--only mobilenet_v2,efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

import onnxopt
from bench.common import (
    chosen_models,
    command_line,
    compact_number_lists,
    environment,
    json_safe,
    load_average,
    op_counts,
    ort_optimized_model,
    ort_session,
    summarize,
    Timing,
    settings_record,
    time_interleaved,
)

# The shared library (models, real inputs, fidelity, ORT's quantizers) is bench/fidelity.py; every
# name it defines stays importable from here for scripts written against the old layout.
from bench.fidelity import (  # noqa: F401
    CALIBRATION_GLOB,
    MODELS,
    NORMALIZATION,
    ORT_STATIC_OPTIONS,
    SENTENCES,
    VIEWS,
    Built,
    EvalData,
    build_ort_dynamic,
    build_ort_static,
    calibration_images,
    calibration_reader,
    error_text,
    fidelity,
    image_views,
    input_range,
    load_data,
    log,
    log_softmax,
    ort_graph,
    pre_process,
    quiet_quantizer,
    run_model,
    timed,
    with_retry,
)
from bench.quantize_configs import (  # noqa: F401
    ACT_BITS,
    CONFIG_BY_KEY,
    CONFIGS,
    GOALS,
    INPUT_RANGE_KEY,
    INT4_KEY,
    JITTER,
    JITTER_COPIES,
    QUANTIZE_PRESET,
    SPIQ_MODES,
    THREADS,
    WEIGHT_BITS,
    Config,
    onnxopt_key,
)
from bench.quantize_report import evaluate_goals, render_markdown

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


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


# --------------------------------------------------------------------------- configurations
def build_fp32_folded(src: Path, dst: Path) -> Built:
    try:
        (model, report), seconds = timed(lambda: onnxopt.optimize(src))
        onnxopt.save_model(model, dst)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        return Built("error", detail=error_text(exc))
    return Built("ok", dst, extra={"optimize_seconds": seconds, "report_total_seconds": report.total_seconds})


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
    names = chosen_models(parser, args.only, list(MODELS))
    command = command_line("python -m bench.quantize", argv)
    data = run(names, Settings.for_mode(args.quick), command)
    json_path, md_path = write_results(data, args.out)
    log(f"wrote {json_path} and {md_path} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
