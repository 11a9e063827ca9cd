"""Zoo models export with every BatchNormalization kept and run identically under onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from onnxopt.models import build as zoo_build
from onnxopt.models.common import count_batchnorms
from onnxopt.models.registry import REGISTRY, create_model, get_spec, sample_input

from onnxopt.errors import OnnxoptError

pytestmark = pytest.mark.zoo

SMALL = [name for name, spec in REGISTRY.items() if spec.small]
LARGE = [name for name, spec in REGISTRY.items() if not spec.small]
EXPECTED_BN = {
    "resnet18": 20,
    "resnet50": 53,
    "resnet20": 19,
    "mobilenet_v2": 52,
    "efficientnet_lite0": 49,
    "vit_tiny": 0,
}


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """Elementwise relative tolerance ``rel``, with an absolute floor of ``rel`` x the largest |expected|."""
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * float(np.abs(expected).max()))


def check_export(name: str, cache: Path) -> None:
    path = zoo_build.build_zoo_model(name, cache)
    assert path.is_file() and path.parent == cache
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17

    module = create_model(name)
    n_bn = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    assert n_bn == count_batchnorms(module)
    if name in EXPECTED_BN:
        assert n_bn == EXPECTED_BN[name]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"

    x = sample_input(name, batch=3, seed=1)  # not the export sample, and a different batch size
    with torch.no_grad():
        expected = module(x).numpy()
    (actual,) = ort_session(path).run(None, {"input": x.numpy()})
    assert actual.shape == expected.shape
    assert np.abs(expected).max() > 1e-3  # a non-degenerate output
    assert_close(actual, expected)


@pytest.mark.parametrize("name", SMALL)
def test_small_model_exports_and_matches_torch(name: str, zoo_cache: Path) -> None:
    check_export(name, zoo_cache)


@pytest.mark.parametrize("name", LARGE)
def test_large_model_exports_and_matches_torch(name: str, zoo_cache: Path) -> None:
    check_export(name, zoo_cache)


@pytest.mark.parametrize("name", SMALL + LARGE)
def test_bn_statistics_are_nontrivial_and_deterministic(name: str) -> None:
    module = create_model(name)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        assert not bn.training
        assert torch.all((bn.running_var >= 0.5) & (bn.running_var <= 2.0))
        assert torch.all((bn.weight.abs() >= 0.5) & (bn.weight.abs() <= 1.5))
        assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0
        assert (bn.weight < 0).any() or bn.num_features < 4  # random signs
    again = create_model(name).state_dict()
    for key, value in module.state_dict().items():
        assert torch.equal(value, again[key]), key
    if bns:
        other = create_model(name, seed=1).state_dict()
        var_key = next(k for k in again if k.endswith("running_var"))
        assert not torch.equal(other[var_key], again[var_key])


def test_create_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_model("resnet20")
    assert torch.equal(torch.rand(3), expected)


def _graph(name: str, cache: Path) -> onnx.GraphProto:
    return onnx.load(str(zoo_build.build_zoo_model(name, cache))).graph


def _producer(graph: onnx.GraphProto, tensor: str) -> str | None:
    return next((n.op_type for n in graph.node if tensor in n.output), None)


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[str]:
    return [n.op_type for n in graph.node if tensor in n.input]


@pytest.mark.parametrize(
    "name, before, after",
    [
        ("edge_bn_after_add", "Add", ["Relu"]),
        ("edge_bn_after_concat", "Concat", ["Relu"]),
        ("edge_bn_before_conv_nopad", None, ["Conv"]),
        ("edge_bn_pool_linear", "Relu", ["GlobalAveragePool"]),
        ("edge_bn_after_relu_conv", "Relu", ["Conv"]),
    ],
)
def test_edge_case_graph_patterns(name: str, before: str | None, after: list[str], zoo_cache: Path) -> None:
    graph = _graph(name, zoo_cache)
    (bn,) = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert _producer(graph, bn.input[0]) == before
    if before is None:
        assert bn.input[0] == graph.input[0].name
    assert _consumers(graph, bn.output[0]) == after
    if after == ["Conv"]:
        conv = next(n for n in graph.node if bn.output[0] in n.input)
        pads = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        assert (max(pads) == 0) == (name == "edge_bn_before_conv_nopad")
    if name == "edge_bn_pool_linear":
        ops = [n.op_type for n in graph.node]
        assert ops[ops.index("BatchNormalization") :] == ["BatchNormalization", "GlobalAveragePool", "Flatten", "Gemm"]


def test_preact_and_densenet_patterns(zoo_cache: Path) -> None:
    graph = _graph("preact_resnet", zoo_cache)
    bn_consumers = [_consumers(graph, n.output[0]) for n in graph.node if n.op_type == "BatchNormalization"]
    assert all(c == ["Relu"] for c in bn_consumers)  # BN-ReLU-Conv order everywhere
    graph = _graph("densenet", zoo_cache)
    concat_out = {n.output[0] for n in graph.node if n.op_type == "Concat"}
    assert len(concat_out) == 6
    assert any(n.op_type == "BatchNormalization" and n.input[0] in concat_out for n in graph.node)


def test_vit_uses_layernorm_gelu_matmul(zoo_cache: Path) -> None:
    ops = {n.op_type for n in _graph("vit_tiny", zoo_cache).node}
    assert {"LayerNormalization", "MatMul", "Softmax", "Erf", "Conv"} <= ops


def test_efficientnet_and_mobilenet_key_names() -> None:
    eff = create_model("efficientnet_lite0").state_dict()
    assert {k.split(".")[0] for k in eff} == {"_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc"}
    assert {int(k.split(".")[1]) for k in eff if k.startswith("_blocks.")} == set(range(16))
    assert "_blocks.0._expand_conv.weight" not in eff and "_blocks.1._expand_conv.weight" in eff
    assert eff["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    module = create_model("efficientnet_lite0")
    assert all(m.eps == 1e-3 for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    mnv2 = create_model("mobilenet_v2").state_dict()
    assert "features.0.0.weight" in mnv2 and "features.18.1.running_var" in mnv2
    assert mnv2["classifier.1.weight"].shape == (1000, 1280)


def test_cache_reuses_and_rebuilds_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = zoo_build.build_zoo_model("edge_bn_after_add", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert zoo_build.build_zoo_model("edge_bn_after_add", tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # not re-exported
    monkeypatch.setattr(zoo_build, "_torch_version", lambda: "0.0-changed")
    second = zoo_build.build_zoo_model("edge_bn_after_add", tmp_path)
    assert second != first and second.is_file()
    assert not first.exists()  # the stale export was removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [second.name]


def test_key_depends_on_definition_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec("edge_bn_after_add")
    key = zoo_build.model_key(spec.name)
    changed = tmp_path / "edge_cases.py"
    changed.write_text(spec.source_files[0].read_text() + "\n# changed\n")
    monkeypatch.setattr(type(spec), "source_files", property(lambda self: (changed,)))
    assert zoo_build.model_key(spec.name) != key


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXOPT_ZOO_CACHE", str(tmp_path / "env"))
    assert zoo_build.zoo_cache_dir() == tmp_path / "env"
    assert zoo_build.zoo_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("ONNXOPT_ZOO_CACHE")
    assert zoo_build.zoo_cache_dir() == Path.home() / ".cache" / "onnxopt" / "zoo"


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxoptError, match="unknown zoo model 'nope'"):
        zoo_build.build_zoo(["edge_bn_after_add", "nope"], tmp_path)
    assert not any(tmp_path.iterdir())  # validated before exporting anything


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onnxopt.models", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_cli_build_and_list(tmp_path: Path) -> None:
    proc = _run_cli("build", "--cache", str(tmp_path), "--only", "edge_bn_after_add,edge_bn_after_concat")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert set(lines) == {"edge_bn_after_add", "edge_bn_after_concat"}
    assert all(Path(p).is_file() and Path(p).parent == tmp_path for p in lines.values())
    assert "[2/2] edge_bn_after_concat" in proc.stderr and "exported" in proc.stderr
    again = _run_cli("build", "--cache", str(tmp_path), "--only", "edge_bn_after_add")
    assert again.returncode == 0 and "up to date" in again.stderr
    listing = _run_cli("list", "--cache", str(tmp_path))
    assert listing.returncode == 0
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:] if not line.startswith("asset")}
    assert set(rows) == set(REGISTRY)
    assert " built " in rows["edge_bn_after_add"] and " built " not in rows["resnet50"]
    bad = _run_cli("build", "--cache", str(tmp_path), "--only", "nope")
    assert bad.returncode == 1 and "unknown zoo model" in bad.stderr


def test_package_import_does_not_import_torch() -> None:
    code = (
        "import sys, onnxopt.models as m, onnxopt.models.build as b;"
        "m.REGISTRY; b.zoo_model_path('resnet20');"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "ONNXOPT_ZOO_CACHE": os.devnull}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
