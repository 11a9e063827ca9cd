"""The configurations of the quantization benchmark (bench/quantize.py) and its goals: which
onnxopt quantize calls are measured (weight bit-widths, SPIQ modes, the extras), their keys and
titles, the jitter of the noise-floor copies and the goal thresholds.  Shared by bench/quantize.py
(which builds and measures them) and bench/quantize_report.py (which judges and renders them).
"""

from __future__ import annotations

from dataclasses import dataclass

THREADS = (1, 2)
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
