"""The quantize family's CLI flags: ``--quantize wNaM`` and its options.

``--quantize`` is shared with the weight-only family: ``wNaM`` (weights and activations)
selects the quantize pass here, ``wN`` (weights only) the weight-only pass
(:mod:`..weight_only.flags`); ``--power-quant`` swaps in power-quant (it reads the same
options).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from onnxopt.errors import PipelineError
from onnxopt.flags import FlagFamily, parse_bits, parse_floats, parse_pair, parse_weight_only
from onnxopt.options import flag_of

from . import QuantizeOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    quant = parser.add_argument_group("quantization (lossy; emits standard QDQ that ONNX Runtime fuses)")
    quant.add_argument(
        "--quantize", metavar="wNaM|wN",
        help="quantize weights to N bits and activations to M bits (2..8), e.g. w8a8, w4a8; wN (w4, w8, w2) quantizes "
        "only the MatMul/Gemm weights, block-wise, to ONNX Runtime's MatMulNBits (float activations; decoder LLMs)",
    )
    quant.add_argument("--spiq", action=argparse.BooleanOptionalAction, default=None, help="per-channel SPIQ activation scales folded into weights: --spiq wherever possible, --no-spiq never (default: where the estimated error is lower)")
    quant.add_argument(
        "--act-ranges", choices=("bn", "minmax", "percentile", "moments"),
        help="activation ranges: from BN statistics (default, data-free) or calibration data: 0.01/99.99 percentiles "
        "(default with --calibration-data), per-channel min/max, or moments (the per-channel mean and std of every layer output "
        "measured on the samples, used like BN statistics: mean ± λ·std)",
    )
    quant.add_argument("--calibration-data", metavar="PATH", help="calibration samples: an .npz (one array per graph input, batch on axis 0), a folder of .npy files or a folder of images (.jpg/.png; resized, center-cropped, ImageNet-normalised)")
    quant.add_argument("--calibration-mean", metavar="M[,M,M]", help="per-channel mean subtracted from calibration images in [0, 1] (default ImageNet's 0.485,0.456,0.406)")
    quant.add_argument("--calibration-std", metavar="S[,S,S]", help="per-channel std dividing calibration images (default ImageNet's 0.229,0.224,0.225)")
    quant.add_argument("--calibration-layout", choices=("NCHW", "NHWC"), help="layout of the model input fed with calibration images (default NCHW)")
    quant.add_argument("--lambda", dest="lam", type=float, help="BN range width in standard deviations (default 9 at 8 bits, 4 at <= 6 bits)")
    quant.add_argument("--input-range", metavar="LO,HI", help="range of the graph input, so the first layer is quantized too (default: it stays float)")
    quant.add_argument("--no-bias-correction", action="store_true", help="skip the data-free bias correction (eq. 3.8)")
    quant.add_argument("--per-tensor-weights", action="store_true", help="one weight scale per layer instead of per output channel")
    quant.add_argument(
        "--dynamic-fallback", choices=("auto", "on", "off", "all"),
        help="MatMul/Gemm layers without an activation range: auto (default) quantizes them dynamically (DynamicQuantizeLinear, "
        "ORT's DynamicQuantizeMatMul) when the model has statistics elsewhere, on always, off keeps them float, all makes every "
        "MatMul/Gemm dynamic",
    )
    quant.add_argument("--no-check-fusion", action="store_true", help="skip the check of which layers ONNX Runtime fuses into integer kernels (and the fallbacks it drives)")
    quant.add_argument(
        "--unfused-conv-float", action=argparse.BooleanOptionalAction, default=None,
        help="a QDQ Conv that ONNX Runtime does not fuse (e.g. one writing a graph output) is put back in float (default: "
        "a QDQ Conv ORT runs in float is slower than the float Conv); --no-unfused-conv-float keeps its QDQ form (reported as not fused)",
    )
    quant.add_argument(
        "--float-depthwise-before-float", action=argparse.BooleanOptionalAction, default=None,
        help="a depthwise Conv whose int8 output ONNX Runtime only dequantizes (float readers: hard-swish, squeeze-excite) "
        "is put back in float (default: ORT's int8 depthwise kernel is slower than the float one and the conversion is paid "
        "anyway); --no-float-depthwise-before-float keeps it quantized",
    )
    quant.add_argument(
        "--int4-weights", action="store_true",
        help="store weights of <= 4 bits as INT4 (needs opset >= 21): a smaller file, but ONNX Runtime's CPU provider does not fuse "
        "INT4 DequantizeLinear, so those layers run in float (slower than the default int8 storage)",
    )


#: Quantize flags the weight-only family (``--quantize wN``) reads too: its calibration samples.
WEIGHT_ONLY_SHARED = ("calibration_data", "calibration_mean", "calibration_std", "calibration_layout")


def pipeline_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Options of the quantize pass (also read by power-quant) and the pass itself."""
    given = {
        "spiq": args.spiq,
        "act_ranges": args.act_ranges,
        "calibration_data": args.calibration_data,
        "calibration_mean": parse_floats("--calibration-mean", args.calibration_mean),
        "calibration_std": parse_floats("--calibration-std", args.calibration_std),
        "calibration_layout": args.calibration_layout,
        "lam": args.lam,
        "input_range": parse_pair(args.input_range) if args.input_range else None,
        "bias_correction": False if args.no_bias_correction else None,
        "per_channel": False if args.per_tensor_weights else None,
        "int4_weights": True if args.int4_weights else None,
        "dynamic_fallback": {"auto": "auto", "on": True, "off": False, "all": "all", None: None}[args.dynamic_fallback],
        "check_fusion": False if args.no_check_fusion else None,
        "unfused_conv_to_float": args.unfused_conv_float,
        "float_depthwise_before_float": args.float_depthwise_before_float,
    }
    options = {key: value for key, value in given.items() if value is not None}
    if args.lam is not None and not (math.isfinite(args.lam) and args.lam > 0):
        raise PipelineError(f"bad --lambda {args.lam!r}: expected a finite number of standard deviations > 0, e.g. 6")
    if args.quantize is not None and parse_weight_only(args.quantize) is not None:
        options = {key: value for key, value in options.items() if key not in WEIGHT_ONLY_SHARED}  # read by the weight-only family
    if args.quantize is None or parse_weight_only(args.quantize) is not None:
        if options:
            raise PipelineError(f"{', '.join(flag_of(QuantizeOptions, key) for key in options)} need --quantize wNaM")
        return {}, []
    options["weight_bits"], options["act_bits"] = parse_bits(args.quantize)
    if args.calibration_data and "act_ranges" not in options:
        options["act_ranges"] = "percentile"
    return options, ["quantize"]


FLAGS = FlagFamily("quantize", add_arguments, pipeline_options)
