"""Transformer linears in the quantize pass (issue 14 items 5 and 8): every MatMul/Gemm with a
constant weight quantized — static QDQ where LayerNorm statistics give the range, the dynamic
integer form (DynamicQuantizeLinear → MatMulInteger → Cast → Mul) where nothing does — and
what ONNX Runtime runs checked on the graph ORT builds, not assumed.

The model is the small ViT of ``models/transformer.py`` (2 pre-norm layers: qkv and fc1 read a
LayerNorm, proj reads the attention output, fc2 the GELU output, the head a Gather of the
final LayerNorm), exported by PyTorch with a dynamic and with a static batch.  With a static
batch ORT's MatMul+Add → Gemm fusion puts a Reshape between the DequantizeLinear and the
Gemm, so ORT 1.32 does not fuse the static QDQ MatMul: the pass must notice it (fusion check)
and emit those layers in the dynamic form.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.errors import PipelineError
from onnxopt.passes.quantize.fusion import INTEGER_OPS, check_fusion, ort_optimized_graph
from onnxopt.verify import run

torch = pytest.importorskip("torch")

LINEARS = 9  # 2 layers × (qkv, proj, fc1, fc2) + head
STATIC = 4  # qkv and fc1 read a LayerNorm


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.transformer import VisionTransformer
    from onnxopt.export import export_torch

    torch.manual_seed(14)
    module = VisionTransformer(32, 4, 64, 2, 4, 10).eval()
    sample = torch.randn(2, 3, 32, 32)
    folder = tmp_path_factory.mktemp("vit")
    return {batch: export_torch(module, sample, folder / f"vit_{batch}.onnx", dynamic_batch=batch == "dynamic") for batch in ("dynamic", "static")}


def quantize(path: Path, **options: object) -> tuple[onnx.ModelProto, dict, list[str]]:
    optimized, report = onnxopt.optimize(path, preset="quantize", validate=True, **options)
    (stats,) = [p.stats for p in report.passes if p.name == "quantize"]
    return optimized, stats, report.format_table().splitlines()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def images() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(8).standard_normal((2, 3, 32, 32)).astype(np.float32)}


def ort_kernels(model: onnx.ModelProto) -> Counter[str]:
    """Integer kernels in the graph ORT builds (counted independently of the pass)."""
    return Counter(n.op_type for n in ort_optimized_graph(model).graph.node if n.op_type in INTEGER_OPS)


def test_every_linear_is_quantized_static_where_layernorm_gives_the_range(vit: dict[str, Path]) -> None:
    optimized, stats, lines = quantize(vit["dynamic"])
    modes = Counter(r["mode"] for r in stats["layers"])
    assert stats["layers_quantized"] == LINEARS and stats["layers_dynamic"] == LINEARS - STATIC
    assert modes["dynamic"] == LINEARS - STATIC and modes["per-tensor"] + modes["spiq"] == STATIC
    dynamic_layers = {r["layer"] for r in stats["layers"] if r["mode"] == "dynamic"}
    assert all(any(k in name for k in ("attn/proj", "mlp/mlp.2", "head")) for name in dynamic_layers), dynamic_layers
    assert stats["coverage"]["kinds"] == {"static": STATIC, "dynamic": LINEARS - STATIC}
    # 14 = 9 linears + the 4 attention products (no constant weight) + the patch Conv (reads the graph input)
    assert "warning: quantize: quantized 9/14 layers (4 static, 5 dynamic); 5 float: 4 non-constant weight, 1 no statistics" in lines
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["MatMulInteger"] == LINEARS - STATIC and ops["DynamicQuantizeLinear"] == 2 * 2 + 1  # proj, fc2 per layer; head
    assert cosine(run(optimized, images())["output"], run(onnx.load(str(vit["dynamic"])), images())["output"]) > 0.99


@pytest.mark.parametrize("batch", ["dynamic", "static"])
def test_ort_fuses_every_quantized_linear_and_the_report_says_so(vit: dict[str, Path], batch: str) -> None:
    optimized, stats, lines = quantize(vit[batch])
    kernels = ort_kernels(optimized)
    assert stats["not_fused"] == [] and stats["coverage"]["not_fused"] == 0
    assert stats["fused_by_ort"] == dict(kernels) and sum(kernels.values()) == LINEARS
    assert set(kernels) <= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    fused = ", ".join(f"{n} {op}" for op, n in stats["fused_by_ort"].items())
    assert f"quantize: ORT runs {fused}" in lines
    assert cosine(run(optimized, images())["output"], run(onnx.load(str(vit[batch])), images())["output"]) > 0.99


def test_static_batch_qdq_matmuls_are_not_fused_by_ort_and_are_re_emitted_dynamic(vit: dict[str, Path]) -> None:
    """Without the check the static-batch export keeps static QDQ MatMuls that ORT runs in
    float (the helper sees it); with it they become dynamic layers, all fused."""
    unchecked, stats, _ = quantize(vit["static"], check_fusion=False)
    weights = {n.name: n.input[0] for n in unchecked.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]}
    assert len(weights) == STATIC
    check = check_fusion(unchecked, weights)
    assert check.error is None and not check.fused and len(check.not_fused) == STATIC
    assert all("DequantizeLinear" in reason for reason in check.not_fused.values())

    checked, stats, _ = quantize(vit["static"])
    assert stats["layers_quantized"] == LINEARS and stats["layers_dynamic"] == LINEARS
    converted = [r for r in stats["layers"] if "static_not_fused" in r]
    assert len(converted) == STATIC
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in checked.graph.node)


def test_dynamic_fallback_off_keeps_them_float(vit: dict[str, Path]) -> None:
    _, stats, lines = quantize(vit["dynamic"], dynamic_fallback=False)
    assert stats["layers_quantized"] == STATIC and stats["layers_dynamic"] == 0
    assert stats["coverage"]["reasons"]["no statistics"] == LINEARS - STATIC + 1


def test_dynamic_all_quantizes_every_linear_dynamically(vit: dict[str, Path]) -> None:
    optimized, stats, _ = quantize(vit["dynamic"], dynamic_fallback="all")
    assert stats["layers_dynamic"] == stats["layers_quantized"] == LINEARS
    assert sum(stats["fused_by_ort"].values()) == LINEARS
    assert cosine(run(optimized, images())["output"], run(onnx.load(str(vit["dynamic"])), images())["output"]) > 0.99


@pytest.mark.parametrize("options", [{"dynamic_fallback": "sometimes"}, {"check_fusion": "yes"}])
def test_bad_dynamic_options_are_pipeline_errors(vit: dict[str, Path], options: dict) -> None:
    with pytest.raises(PipelineError, match="option (dynamic_fallback|check_fusion).* of pass quantize must be"):
        onnxopt.optimize(vit["dynamic"], preset="quantize", **options)


def test_a_gemm_without_statistics_gets_the_dynamic_form_with_its_bias() -> None:
    """Gemm(transB=1, bias) on a graph input: W transposed to [K, N], the bias in an Add.
    (dynamic_fallback=True: with "auto" a model without any statistics stops with exit 10 and
    asks for calibration data instead — test_quantize_coverage.)"""
    from tests.conftest import text_model

    rng = np.random.default_rng(3)
    arrays = {"w": rng.standard_normal((6, 16)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    proto = text_model("(float[N,16] x) => (float[N,6] y)", ["y = Gemm <transB = 1> (x, w, b)"], arrays)
    optimized, report = onnxopt.optimize(proto, preset="quantize", validate=True, dynamic_fallback=True)
    (stats,) = [p.stats for p in report.passes if p.name == "quantize"]
    assert stats["layers_dynamic"] == 1 and stats["fused_by_ort"] == {"DynamicQuantizeMatMul": 1}
    x = {"x": rng.standard_normal((8, 16)).astype(np.float32)}
    assert cosine(run(optimized, x)["y"], run(proto, x)["y"]) > 0.999


def test_residual_add_of_a_post_ln_block_reads_the_float_layernorm_output() -> None:
    """Post-LN (BERT): the LayerNorm output is quantized for the MatMul, but the residual Add
    (its output goes to the next LayerNorm, never to a QuantizeLinear: ORT cannot fuse it)
    reads the float tensor, not the fake-quantized one."""
    from tests.conftest import text_model

    rng = np.random.default_rng(5)
    arrays = {
        "g": rng.uniform(0.5, 1.5, 8).astype(np.float32), "b": rng.normal(0, 0.3, 8).astype(np.float32),
        "w": (rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "bias": rng.normal(0, 0.1, 8).astype(np.float32),
    }
    body = [
        "n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, g, b)", "m = MatMul(n, w)", "a = Add(m, bias)",
        "r = Add(a, n)", "y = LayerNormalization <axis = -1, epsilon = 0.00001> (r, g, b)",
    ]
    proto = text_model("(float[B,5,8] x) => (float[B,5,8] y)", body, arrays)
    optimized, report = onnxopt.optimize(proto, preset="quantize", validate=True)
    (stats,) = [p.stats for p in report.passes if p.name == "quantize"]
    assert stats["layers_quantized"] == 1 and stats["float_readers_restored"] == 1
    (residual,) = [n for n in optimized.graph.node if n.output[0] == "r"]
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    assert "n" in residual.input and producers["n"] == "LayerNormalization"
    x = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    assert cosine(run(optimized, x)["y"], run(proto, x)["y"]) > 0.999


def test_an_unnamed_static_batch_matmul_re_emitted_dynamic_is_still_counted() -> None:
    """Unnamed nodes (a layer's label comes from its output name): a static-batch QDQ MatMul
    ORT does not fuse is re-emitted dynamically, which renames its output; the fusion check
    must still find it under the label it had before (this crashed with a KeyError)."""
    from tests.conftest import text_model

    rng = np.random.default_rng(5)
    arrays = {
        "g": rng.uniform(0.05, 2, 8).astype(np.float32), "b": rng.normal(0, 0.3, 8).astype(np.float32),
        "w": (rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "bias": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": (rng.standard_normal((8, 8)) * 0.3).astype(np.float32),
    }
    body = [
        "n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, g, b)", "m = MatMul(n, w)", "a = Add(m, bias)",
        "r = Add(a, n)", "z = LayerNormalization <axis = -1, epsilon = 0.00001> (r, g, b)", "q = Relu(z)", "y = MatMul(q, w2)",
    ]
    proto = text_model("(float[2,5,8] x) => (float[2,5,8] y)", body, arrays, opset=17)
    assert not any(node.name for node in proto.graph.node)
    optimized, report = onnxopt.optimize(proto, preset="quantize", validate=True)
    (stats,) = [p.stats for p in report.passes if p.name == "quantize"]
    assert stats["layers_quantized"] == 2 and stats["layers_dynamic"] == 1 and stats["not_fused"] == []
    assert stats["fused_by_ort"] == {"DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1}
    x = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    assert cosine(run(optimized, x)["y"], run(proto, x)["y"]) > 0.99
