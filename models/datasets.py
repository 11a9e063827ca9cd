"""Real data: the 20 labelled ImageNet validation JPEGs shipped by foolbox, and Fashion-MNIST.

Images are decoded with Pillow (imported lazily), resized so the shorter side is 256
(bilinear), center-cropped to 224 and returned as float32 NCHW arrays, either in [0, 1]
or normalised for a given model family.  Fashion-MNIST is read from the IDX files of the
Debian package (see :mod:`onnxopt.models.assets`).  Everything is numpy; no torch needed.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from onnxopt.errors import OnnxoptError

from .assets import asset_dir, fashion_mnist_dir

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
Normalization = Literal["none", "imagenet", "efficientnet"]

_IMAGENET_NAME = re.compile(r"imagenet_(\d+)_(\d+)\.jpg$")


def _pil_image() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as exc:
        raise OnnxoptError("decoding the sample images needs Pillow: pip install pillow") from exc
    return Image


def imagenet_sample_files() -> list[tuple[Path, int]]:
    """(path, ImageNet class index) of foolbox's 20 ImageNet JPEGs, in file-name order."""
    folder = asset_dir("imagenet_samples") / "data"
    found = []
    for path in sorted(folder.glob("imagenet_*.jpg")):
        match = _IMAGENET_NAME.search(path.name)
        if match:
            found.append((path, int(match.group(2))))
    if not found:
        raise OnnxoptError(f"no imagenet_XX_LABEL.jpg files in {folder}")
    return found


def preprocess_image(path: Path, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Decode to RGB, resize shorter side to ``resize``, center-crop ``crop``: float32 CHW in [0, 1]."""
    image_mod = _pil_image()
    with image_mod.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = resize / min(width, height)
        size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
        image = image.resize(size, image_mod.Resampling.BILINEAR)
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def normalize(images: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Apply a model family's input normalisation to [0, 1] NCHW images."""
    if normalization == "none":
        return images
    if normalization == "imagenet":
        return (images - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    if normalization == "efficientnet":
        return (images * 255.0 - 127.0) / 128.0
    raise OnnxoptError(f"unknown normalization {normalization!r}")


def load_imagenet_samples(normalization: Normalization = "imagenet") -> tuple[np.ndarray, np.ndarray]:
    """The 20 ImageNet samples as (images float32 [20, 3, 224, 224], labels int64 [20])."""
    files = imagenet_sample_files()
    images = np.stack([preprocess_image(path) for path, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return normalize(images, normalization).astype(np.float32), labels


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, dims) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    if data[:3] != b"\x00\x00\x08":
        raise OnnxoptError(f"{path}: not an unsigned-byte IDX file")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: Literal["train", "test"] = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as (images uint8 [N, 28, 28], labels uint8 [N]); N = 60000 or 10000."""
    folder = fashion_mnist_dir()
    assert folder is not None
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise OnnxoptError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels
