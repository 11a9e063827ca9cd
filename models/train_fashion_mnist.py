"""Train a small BN-ResNet on Fashion-MNIST, reproducibly, and export it to ONNX (BN preserved).

The network (:class:`FashionResNet`): 3x3 stem (16 ch), then residual stages of 16, 32
(stride 2) and 64 (stride 2) channels with Conv-BN-ReLU blocks, global average pool,
linear classifier; 9 BatchNorms.  Training: SGD + Nesterov, one-cycle learning rate,
random horizontal flips, fixed seed, ``torch.set_num_threads(2)``; about 91 % test accuracy
after 4 epochs, a few minutes on two cores.

Outputs go to ``<zoo cache>/fashion_mnist/`` and are named after a hash of this file and the
run configuration, so an unchanged configuration is not retrained:
``fmnist_resnet-<key>.pt`` (state_dict), ``.onnx`` (input ``[batch, 1, 28, 28]`` float32,
normalised with :func:`preprocess`) and ``.json`` (accuracy, timings, configuration).

    python -m onnxopt.models.train_fashion_mnist [--epochs 4] [--cache DIR] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxopt.errors import OnnxoptError

from .build import cache_key, zoo_cache_dir
from .datasets import load_fashion_mnist

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


class ResBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus (projected) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class FashionResNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(ResBlock(cin, width, 1 if i == 0 else 2))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 128
    max_lr: float = 0.2
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int = 2
    limit: int | None = None  # use only the first `limit` training images (quick runs, tests)
    eval_limit: int | None = None  # measure accuracy on the first `eval_limit` test images only (tests)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> normalised float32 [N, 1, 28, 28] (the ONNX model's input)."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on preprocessed ``images``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(images[start : start + batch_size]))
            correct += int((logits.argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return correct / len(images)


def loss_curve(step_losses: Sequence[float], points: int = 10) -> list[float]:
    """Mean training loss over each of (up to) ``points`` consecutive, equal parts of the steps."""
    parts = np.array_split(np.asarray(step_losses, dtype=np.float64), min(points, len(step_losses)))
    return [round(float(part.mean()), 5) for part in parts]


def train(config: TrainConfig, log: bool = True) -> tuple[FashionResNet, dict[str, Any]]:
    """Train from scratch; returns the model (eval mode) and metrics (test accuracy, seconds,
    ``loss_curve``: the training loss in up to ten stretches of the run, first to last)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if config.limit:
        train_x, train_y = train_x[: config.limit], train_y[: config.limit]
    x = torch.from_numpy(preprocess(train_x))
    y = torch.from_numpy(train_y.astype(np.int64))
    test_x, test_y = test_x[: config.eval_limit], test_y[: config.eval_limit]
    test_images = preprocess(test_x)

    model = FashionResNet()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.max_lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    steps_per_epoch = (len(x) + config.batch_size - 1) // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.max_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    start = time.perf_counter()
    step_losses: list[float] = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_losses.append(float(loss.detach()))
            total_loss += step_losses[-1] * len(idx)
        if log:
            acc = evaluate(model, test_images, test_y)
            print(
                f"epoch {epoch + 1}/{config.epochs}: loss {total_loss / len(x):.4f}, test acc {acc:.4f}, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, test_images, test_y)
    return model.eval(), {"test_accuracy": accuracy, "train_seconds": round(seconds, 1),
                          "loss_curve": loss_curve(step_losses)}


def output_stem(config: TrainConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/fashion_mnist/fmnist_resnet-<key>``: the key hashes this file and ``config``."""
    key = cache_key(Path(__file__).read_bytes(), json.dumps(dataclasses.asdict(config), sort_keys=True))
    return zoo_cache_dir(cache_dir) / "fashion_mnist" / f"fmnist_resnet-{key}"


def train_and_export(
    config: TrainConfig = TrainConfig(),
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    log: bool = True,
) -> dict[str, Any]:
    """Train (unless a finished run with this configuration is cached) and export; the run's metadata.

    The metadata has ``state_dict``, ``onnx`` (paths), ``test_accuracy`` (torch) and
    ``onnx_test_accuracy`` (onnxruntime, graph optimisations off).  ``log`` prints per-epoch
    test accuracy to stderr (an extra test-set pass per epoch).
    """
    stem = output_stem(config, cache_dir)
    meta_path = stem.with_suffix(".json")
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if Path(meta["onnx"]).is_file() and Path(meta["state_dict"]).is_file():
            print(f"up to date: {meta_path}", file=sys.stderr)
            return meta
    from onnxopt.export import export_torch

    model, metrics = train(config, log=log)
    stem.parent.mkdir(parents=True, exist_ok=True)
    pt_path = stem.with_suffix(".pt")
    tmp = pt_path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, pt_path)
    onnx_path = export_torch(model, torch.zeros(1, 1, 28, 28), stem.with_suffix(".onnx"))
    meta = {
        "state_dict": str(pt_path),
        "onnx": str(onnx_path),
        **metrics,
        "onnx_test_accuracy": onnx_accuracy(onnx_path, config.eval_limit),
        "torch_version": torch.__version__,
        "config": dataclasses.asdict(config),
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return meta


def onnx_accuracy(path: str | os.PathLike[str], limit: int | None = None) -> float:
    """Test-set accuracy (first ``limit`` images) of an exported model under onnxruntime
    (graph optimisations disabled)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = test_x[:limit], test_y[:limit]
    images = preprocess(test_x)
    name = session.get_inputs()[0].name
    predicted = np.concatenate(
        [session.run(None, {name: images[i : i + 1000]})[0].argmax(1) for i in range(0, len(images), 1000)]
    )
    return float((predicted == test_y).mean())


def load_trained(state_dict_path: str | os.PathLike[str]) -> FashionResNet:
    """A :class:`FashionResNet` with saved weights, eval mode."""
    model = FashionResNet()
    model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onnxopt.models.train_fashion_mnist", description=__doc__.split("\n")[0]
    )
    defaults = TrainConfig()
    parser.add_argument("--cache", help="output directory root (default: $ONNXOPT_ZOO_CACHE or ~/.cache/onnxopt/zoo)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.max_lr, help="peak one-cycle learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--limit", type=int, help="train on the first N images only")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached run exists")
    args = parser.parse_args(argv)
    config = TrainConfig(
        args.epochs, args.batch_size, args.lr, defaults.weight_decay, args.seed, args.threads, args.limit
    )
    try:
        meta = train_and_export(config, args.cache, force=args.force)
    except OnnxoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
