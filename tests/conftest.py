"""Shared builders for the foundation tests: parse text-format models, count ops, check
that a rewritten model still computes the same outputs in ONNX Runtime (optimizations off)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.demo import demo_model
from onnxopt.verify import verify

#: The lossless pipeline of this suite, spelled out: the tests do not depend on what the
#: "default" preset holds (it changes as pass families are added).
CLASSIC = ("eliminate-identity", "fold-constants", "fold-conv-bn", "eliminate-dead")

#: Tolerance of every equivalence check: lossless rewrites only move float rounding.
MAX_REL = 1e-5


def parse(text: str, *, check: bool = True) -> onnx.ModelProto:
    """A model in the ONNX text format, checked with full shape inference."""
    model = onnx.parser.parse_model(text)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def text_model(signature: str, body: list[str], arrays: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A model from a text-format signature and node lines, with ``arrays`` as initializers."""
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\nagraph {signature} {{\n' + "\n".join(body) + "\n}"
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in arrays.items())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def bn_line(prefix: str, x: str, y: str, **attrs: str) -> str:
    """A BatchNormalization node line reading ``{prefix}_g/_b/_m/_v`` (ε = 1e-3)."""
    extra = "".join(f", {k} = {v}" for k, v in attrs.items())
    return f"{y} = BatchNormalization <epsilon = 0.001{extra}> ({x}, {prefix}_g, {prefix}_b, {prefix}_m, {prefix}_v)"


def ops(model: onnx.ModelProto) -> Counter:
    """Op type -> count in the main graph."""
    return Counter(node.op_type for node in model.graph.node)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_equivalent(original: onnx.ModelProto, optimized: onnx.ModelProto, **kwargs) -> None:
    """Outputs agree in ORT (graph optimizations disabled) within MAX_REL on every output."""
    result = verify(original, optimized, atol=1e-6, rtol=MAX_REL, **kwargs)
    assert result.passed, result.failures
    assert result.outputs, "no outputs compared"
    for out in result.outputs:
        assert out.max_rel < MAX_REL, out


def run_passes(model: onnx.ModelProto, *passes: str, **options):
    """Run the named passes with validation on (onnx.checker full_check after each pass)."""
    return onnxopt.optimize(model, passes=list(passes), validate=True, **options)


def assert_same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """Same nodes, interface and initializer values (ignores where the payloads are stored)."""
    assert list(a.graph.node) == list(b.graph.node)
    assert list(a.graph.input) == list(b.graph.input)
    assert list(a.graph.output) == list(b.graph.output)
    ia, ib = initializers(a), initializers(b)
    assert ia.keys() == ib.keys()
    for name in ia:
        np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)


@pytest.fixture
def demo() -> onnx.ModelProto:
    return demo_model()


@pytest.fixture
def demo_path(tmp_path: Path, demo: onnx.ModelProto) -> Path:
    path = tmp_path / "demo.onnx"
    onnx.save_model(demo, str(path))
    return path


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Zoo export cache: $ONNXOPT_ZOO_CACHE when set (reused across runs), else a session temp dir."""
    env = os.environ.get("ONNXOPT_ZOO_CACHE")
    if env:
        path = Path(env).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("zoo")
