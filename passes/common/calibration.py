"""Calibration samples for the quantizers (``--calibration-data PATH``, option ``calibration_data``).

Accepted formats, all giving one float array per graph input with the samples on axis 0:

* **an .npz file**: one array per graph input, named like it, samples stacked on axis 0
  (read by :func:`onnxopt.verify.load_inputs` with ``batched=True``).
* **.npy files** (a folder of them, or a single file): each file holds one sample (the
  input's rank minus the batch axis) or a batch of samples (the input's full rank), files
  taken in name order and concatenated.  With one graph input every file feeds it; with
  several, each file is named ``<input>_<anything>.npy`` and every input gets the same
  number of samples.
* **images** (a folder of ``.jpg``/``.jpeg``/``.png`` files, or a single one), for a model
  with one 4-D float input.  Preprocessing, per image in name order: decode with Pillow and
  convert to RGB; resize (bilinear) so that the shorter side is ``round(min(H, W) / 0.875)``
  (256 for a 224 crop, the usual ImageNet evaluation resize) and the image covers H×W;
  center-crop to H×W; scale to [0, 1]; normalise per channel ``(x − mean) / std`` with the
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) unless
  ``calibration_mean`` / ``calibration_std`` say otherwise (one value or one per channel;
  mean 0 and std 1 keep [0, 1]; EfficientNet-Lite's ``(255x − 127)/128`` is mean 0.498,
  std 0.502); lay out as ``calibration_layout`` (``NCHW``, the default, or ``NHWC``) and
  cast to the input's float type.  H and W come from the graph input's shape; a dynamic one
  is 224 (DEFAULT_IMAGE_SIDE).  The input must have 3 channels (or a dynamic count).

Every problem with the data (missing path, empty folder, a folder with neither .npy files
nor images, an unreadable file, a wrong rank, shape, dtype kind or channel count, NaN or
infinite values, inputs with different sample counts) is a one-line
:class:`~onnxopt.errors.InputDataError` (exit code 11, the class for unusable sample data)
naming the file.  One sample is enough to run; fewer than
FEW_SAMPLES are flagged in the pass statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import onnx

from onnxopt.errors import InputDataError, PipelineError
from onnxopt.options import OptionProblem, PassOptions, option

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("NCHW", "NHWC")
#: Side used for a dynamic H or W of the graph input.
DEFAULT_IMAGE_SIDE = 224
#: Share of the resized image the center crop keeps (224 of 256).
CROP_FRACTION = 0.875
#: Fewer samples than this still run, with a warning in the pass statistics.
FEW_SAMPLES = 8
#: The options the quantize and power-quant passes declare for the data (with their defaults).
IMAGE_OPTIONS = ("calibration_mean", "calibration_std", "calibration_layout")


@dataclass(frozen=True)
class ImagePreprocessing:
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    layout: str = "NCHW"


@dataclass
class CalibrationData:
    #: graph input name → samples on axis 0
    feeds: dict[str, np.ndarray]
    #: "npz", "npy" or "images"
    kind: str
    files: list[Path] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(next(iter(self.feeds.values())))

    def stats(self) -> dict[str, Any]:
        """What the pass reports: the sample count, and a warning when it is small."""
        stats: dict[str, Any] = {"calibration_samples": self.count, "calibration_format": self.kind}
        if self.count < FEW_SAMPLES:
            stats["calibration_warning"] = (
                f"only {self.count} calibration sample(s): ranges from fewer than {FEW_SAMPLES} are noisy, give more if you have them"
            )
        return stats


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class CalibrationOptions(PassOptions):
    """The calibration options of the quantizers (``--calibration-data`` and the image
    preprocessing flags)."""

    calibration_data: str | os.PathLike | None = option(None, flag="--calibration-data")
    calibration_mean: float | tuple[float, ...] | None = option(None, flag="--calibration-mean")
    calibration_std: float | tuple[float, ...] | None = option(None, flag="--calibration-std")
    calibration_layout: Literal["NCHW", "NHWC", "nchw", "nhwc"] | None = option(None, flag="--calibration-layout")

    def check(self) -> None:
        super().check()
        for key in ("calibration_mean", "calibration_std"):
            values = _floats(self[key]) if self[key] is not None else None
            if values is not None and len(values) not in (1, 3):
                raise OptionProblem(key, f"must be one number or three (one per RGB channel), got {self[key]!r}")
            if key == "calibration_std" and values is not None and min(values) <= 0:
                raise OptionProblem(key, f"must be positive, got {self[key]!r}")
        given = [key for key in IMAGE_OPTIONS if self[key] is not None]
        if given and not self.calibration_data:
            raise OptionProblem(given[0], f"preprocesses calibration images; give them with calibration_data (--calibration-data, a folder of images)")


def preprocessing_from_options(options: Mapping[str, Any]) -> ImagePreprocessing:
    mean = _floats(options["calibration_mean"]) if options.get("calibration_mean") is not None else IMAGENET_MEAN
    std = _floats(options["calibration_std"]) if options.get("calibration_std") is not None else IMAGENET_STD
    layout = str(options.get("calibration_layout") or "NCHW").upper()
    return ImagePreprocessing(tuple(mean), tuple(std), layout)


def _floats(value: Any) -> tuple[float, ...] | None:
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def calibration_samples(pass_name: str, options: Mapping[str, Any], model: onnx.ModelProto) -> CalibrationData:
    """The samples the pass options point to; image options on non-image data are an error."""
    data = load_calibration_data(options["calibration_data"], model, preprocessing_from_options(options))
    given = [key for key in IMAGE_OPTIONS if options.get(key) is not None]
    if given and data.kind != "images":
        raise PipelineError(f"{pass_name}: {', '.join(given)} apply to a folder of images; {options['calibration_data']} holds {data.kind} data")
    return data


# --------------------------------------------------------------------------- loading
def load_calibration_data(
    path: str | os.PathLike[str], model: onnx.ModelProto, preprocessing: ImagePreprocessing | None = None
) -> CalibrationData:
    """Samples for every graph input of ``model`` from an .npz, .npy files or images (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"calibration data {path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".npz":
        from onnxopt.runtime import load_inputs

        data = CalibrationData(load_inputs(path, model, batched=True), "npz", [path])
        for name, array in data.feeds.items():
            _check_finite(array, path, name)
    else:
        files = _data_files(path)
        if files[0].suffix.lower() == ".npy":
            data = CalibrationData(_load_npy_files(files, model), "npy", files)
        else:
            data = CalibrationData(_load_images(files, model, preprocessing or ImagePreprocessing()), "images", files)
    _check_counts(data.feeds, path)
    return data


def _data_files(path: Path) -> list[Path]:
    """The .npy files or the images of a folder (or the one given file), in name order."""
    supported = (".npy", *IMAGE_SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in supported:
            raise InputDataError(f"calibration data {path}: expected an .npz, .npy files or images ({', '.join(IMAGE_SUFFIXES)}), or a folder of them")
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise InputDataError(f"calibration data {path}: the folder is empty")
    npy = [p for p in entries if p.is_file() and p.suffix.lower() == ".npy"]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if npy and images:
        raise InputDataError(f"calibration data {path}: the folder mixes .npy files and images; keep one kind")
    if not npy and not images:
        raise InputDataError(f"calibration data {path}: no .npy files or images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return npy or images


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _dims(info: onnx.ValueInfoProto) -> list[int | None]:
    """The input's dimensions, None where dynamic."""
    return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]


def _dtype(info: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))


def _kind(dtype: np.dtype) -> str:
    """float, integer, bool or other: a float input takes float data, an integer input integers."""
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "integer"
    return "bool" if dtype == np.bool_ else str(dtype)


def _load_npy_files(files: Sequence[Path], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inputs = graph_inputs(model)
    by_input: dict[str, list[Path]] = {i.name: [] for i in inputs}
    for file in files:
        by_input[_input_of(file, inputs)].append(file)
    feeds = {}
    for info in inputs:
        if not by_input[info.name]:
            raise InputDataError(f"calibration data {files[0].parent}: no {info.name}_*.npy file for graph input {info.name}")
        chunks = [_npy_samples(file, info) for file in by_input[info.name]]
        for file, chunk in zip(by_input[info.name], chunks):
            if chunk.shape[1:] != chunks[0].shape[1:]:
                raise InputDataError(
                    f"calibration data {file}: sample shape {list(chunk.shape[1:])} differs from {list(chunks[0].shape[1:])} of {by_input[info.name][0].name}"
                )
        feeds[info.name] = np.concatenate(chunks, axis=0)
    return feeds


def _input_of(file: Path, inputs: Sequence[onnx.ValueInfoProto]) -> str:
    """The graph input a .npy file feeds: the only one, else the longest ``<input>_`` prefix."""
    if len(inputs) == 1:
        return inputs[0].name
    matches = [i.name for i in inputs if file.name.startswith(f"{i.name}_")]
    if not matches:
        raise InputDataError(
            f"calibration data {file}: the model has several inputs ({', '.join(i.name for i in inputs)}); name each file <input>_*.npy"
        )
    return max(matches, key=len)


def _npy_samples(file: Path, info: onnx.ValueInfoProto) -> np.ndarray:
    """The samples of one .npy file for input ``info``, with the batch axis."""
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputDataError(f"calibration data {file}: cannot read it as .npy ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    dims = _dims(info)
    if array.ndim == len(dims) - 1:
        array = array[None]
    if array.ndim != len(dims) or any(d is not None and d != s for d, s in list(zip(dims, array.shape))[1:]):
        expected = ["?" if d is None else d for d in dims]
        raise InputDataError(
            f"calibration data {file}: shape {list(array.shape)} does not fit input {info.name} {expected} (one sample without the batch axis, or a batch)"
        )
    expected = _dtype(info)
    if _kind(array.dtype) != _kind(expected):
        raise InputDataError(f"calibration data {file}: dtype {array.dtype}, input {info.name} expects {expected.name}")
    array = array.astype(expected, copy=False)
    _check_finite(array, file, info.name)
    return array


# --------------------------------------------------------------------------- images
def _load_images(files: Sequence[Path], model: onnx.ModelProto, preprocessing: ImagePreprocessing) -> dict[str, np.ndarray]:
    inputs = graph_inputs(model)
    where = files[0].parent if len(files) > 1 else files[0]
    if len(inputs) != 1:
        raise InputDataError(f"calibration data {where}: images feed a model with one input; this one has {len(inputs)}: give an .npz or <input>_*.npy files")
    info = inputs[0]
    dims, dtype = _dims(info), _dtype(info)
    if len(dims) != 4 or not np.issubdtype(dtype, np.floating):
        raise InputDataError(f"calibration data {where}: images need a 4-D float input, {info.name} is {dtype} of rank {len(dims)}: give .npy files")
    channel_axis, height_axis = (1, 2) if preprocessing.layout == "NCHW" else (3, 1)
    channels = dims[channel_axis]
    if channels not in (None, 3):
        raise InputDataError(
            f"calibration data {where}: images give 3 (RGB) channels, input {info.name} has {channels} on axis {channel_axis} "
            f"({preprocessing.layout}); check calibration_layout or give .npy files"
        )
    height = dims[height_axis] or DEFAULT_IMAGE_SIDE
    width = dims[height_axis + 1] or DEFAULT_IMAGE_SIDE
    mean = np.asarray(preprocessing.mean, np.float32).reshape(-1)
    std = np.asarray(preprocessing.std, np.float32).reshape(-1)
    images = np.stack([preprocess_image(file, height, width) for file in files])  # N, H, W, 3 in [0, 1]
    images = (images - mean) / std
    if preprocessing.layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    return {info.name: np.ascontiguousarray(images, dtype=dtype)}


def preprocess_image(file: Path, height: int, width: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side (module docstring), center-crop: float32 HWC in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputDataError(f"calibration data {file}: cannot read the image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    side = round(min(height, width) / CROP_FRACTION)
    scale = side / min(image.size)
    size = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- checks
def _check_finite(array: np.ndarray, where: Path, name: str) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if bad.any():
        sample = int(np.argmax(bad.reshape(len(array), -1).any(axis=1)))
        raise InputDataError(
            f"calibration data {where}: input {name} holds {int(bad.sum())} NaN/inf value(s) (first in sample {sample}); "
            "calibration samples must be finite"
        )


def _check_counts(feeds: Mapping[str, np.ndarray], path: Path) -> None:
    """Every input has the same number (≥ 1) of samples."""
    counts = {name: len(array) if array.ndim else 0 for name, array in feeds.items()}
    if min(counts.values()) < 1:
        raise InputDataError(f"calibration data {path}: no samples (an input has an empty batch axis)")
    if len(set(counts.values())) > 1:
        raise InputDataError(f"calibration data {path}: the inputs have different sample counts {counts}")
