"""weight-only: block-wise MatMulNBits weights — the packed bytes against an independent numpy
decoder and round-to-nearest reference, ONNX Runtime against x @ dequant(W), the search
never worse than round to nearest, a GPT-style stack with external data, Gemm forms,
keep_8bit, shared weights, opsets/IR versions, the no-op error and the CLI flags."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.runtime import run
from onnxopt.errors import NothingToDoError, PipelineError
from onnxopt.passes.weight_only.blockwise import dequantize_packed, packed_tensors, quantize_blocks

#: the numerics checks compare ORT with x @ dequant(W): float products (accuracy_level 0), not
#: the default 4 (int8 activations inside the kernel, checked separately)
EXACT = {"accuracy_level": 0}

RNG = np.random.default_rng(17)


# --------------------------------------------------------------------------- helpers
def heavy_tailed(k: int, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, size=(k, n)) * 0.02).astype(np.float32)


def matmul_model(weight: np.ndarray, x_shape=(2, 3, None), opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """x[..., K] ── MatMul(W) ── y."""
    k, n = weight.shape
    x_dims = [d if d is not None else k for d in x_shape]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [*x_dims[:-1], n])], [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def nbits_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]


def attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute}


def decoded_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """Ŵ[K, N] decoded from the node's packed initializers (independent of the pass's objects)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    a = attrs(node)
    zero_points = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    return dequantize_packed(inits[node.input[1]], inits[node.input[2]], zero_points, k=a["K"], n=a["N"], bits=a["bits"], block_size=a["block_size"])


def reference_rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """Round-to-nearest Ŵ written column by column, block by block (the textbook formulas)."""
    k, n = weight.shape
    top, half = 2**bits - 1, 2 ** (bits - 1)
    out = np.zeros_like(weight)
    for start in range(0, k, block_size):
        block = weight[start : start + block_size]  # [rows, N]
        if symmetric:
            extreme = block[np.abs(block).argmax(axis=0), np.arange(n)]
            scale = np.where(extreme == 0, 1.0, extreme / -half).astype(np.float32)
            zero = np.full(n, half, np.float32)
        else:
            lo, hi = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
            scale = ((hi - lo) / top).astype(np.float32)
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            zero = np.clip(np.rint(-lo / scale), 0, top).astype(np.float32)
        codes = np.clip(np.rint(block * (1.0 / scale)) + zero, 0, top)
        out[start : start + block_size] = (codes - zero) * scale
    return out


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size,k", [(32, 96), (32, 100), (64, 64), (128, 200)])
def test_packed_bytes_decode_to_round_to_nearest_exactly(bits, symmetric, block_size, k):
    weight = heavy_tailed(k, 24, seed=bits * 7 + k)
    result = quantize_blocks(weight, bits, block_size, symmetric=symmetric, search=False)
    b, scales, zero_points = packed_tensors(result)
    n_blocks = -(-k // block_size)
    assert b.dtype == np.uint8 and b.shape == (24, n_blocks, block_size * bits // 8)
    assert scales.shape == (24 * n_blocks,) and scales.dtype == np.float32
    if symmetric:
        assert zero_points is None
    else:
        assert zero_points.dtype == np.uint8 and zero_points.shape == (24 * -(-n_blocks * bits // 8),)
    decoded = dequantize_packed(b, scales, zero_points, k=k, n=24, bits=bits, block_size=block_size)
    np.testing.assert_array_equal(decoded, result.dequantized())
    np.testing.assert_array_equal(decoded, reference_rtn(weight, bits, block_size, symmetric))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_searched_weights_decode_exactly_and_codes_fit(bits):
    weight = heavy_tailed(160, 16, seed=bits)
    result = quantize_blocks(weight, bits, 32)
    assert result.codes.max() <= 2**bits - 1 and result.zero_points.max() <= 2**bits - 1
    decoded = dequantize_packed(*packed_tensors(result), k=160, n=16, bits=bits, block_size=32)
    np.testing.assert_array_equal(decoded, result.dequantized())
    assert np.isclose(np.square(decoded - weight, dtype=np.float64).sum(), result.sq_error, rtol=1e-4)


# --------------------------------------------------------------------------- search
@pytest.mark.parametrize("bits,block_size", [(4, 32), (4, 128), (2, 32), (8, 64)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_search_error_at_most_round_to_nearest(bits, block_size, symmetric):
    weight = heavy_tailed(512, 64, seed=block_size + bits)
    rtn = quantize_blocks(weight, bits, block_size, symmetric=symmetric, search=False)
    searched = quantize_blocks(weight, bits, block_size, symmetric=symmetric)
    assert searched.rtn_sq_error == pytest.approx(rtn.sq_error, rel=1e-6)
    # block by block: every block's error is at most its round-to-nearest error
    per_block = lambda r: np.square(r.dequantized() - weight, dtype=np.float64)  # noqa: E731
    k_blocks = -(-512 // block_size)
    pad = k_blocks * block_size - 512
    blocks = lambda e: np.pad(e, ((0, pad), (0, 0))).reshape(k_blocks, block_size, -1).sum(axis=1)  # noqa: E731
    assert np.all(blocks(per_block(searched)) <= blocks(per_block(rtn)) * (1 + 1e-5) + 1e-12)
    if bits <= 4:  # heavy tails: clipping pays at low bit-widths
        assert searched.relative_error < 0.99 * rtn.relative_error


# --------------------------------------------------------------------------- ONNX Runtime
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size,k", [(32, 64), (32, 100), (128, 256)])
def test_ort_matches_numpy_product_with_decoded_weight(bits, symmetric, block_size, k):
    weight = heavy_tailed(k, 40, seed=k)
    model = matmul_model(weight)
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, weight_bits=bits, block_size=block_size, symmetric=symmetric, validate=True)
    (node,) = nbits_nodes(out)
    assert attrs(node) == {"K": k, "N": 40, "bits": bits, "block_size": block_size, "accuracy_level": 0}
    assert (len(node.input) > 3) is not symmetric
    assert Counter(n.op_type for n in out.graph.node) == {"MatMulNBits": 1}
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ decoded_weight(out, node).astype(np.float64)
    got = run_ort(out, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    stats = next(p for p in report.passes if p.name == "weight-only").stats
    (layer,) = stats["layers"]
    assert layer["bits"] == bits and layer["relative_error"] <= layer["rtn_relative_error"] + 1e-9


def test_gemm_trans_b_alpha_beta_bias():
    k, n = 64, 24
    b = heavy_tailed(n, k, seed=3)  # [N, K], transB = 1
    c = RNG.standard_normal(n).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [4, k])], [helper.make_tensor_value_info("y", 1, [4, n])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(c, "C")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = onnxopt.optimize(model, preset="weight-only", **EXACT, validate=True)
    (fused,) = nbits_nodes(out)
    assert fused.input[5] and not fused.input[4]  # bias input, no g_idx
    x = RNG.standard_normal((4, k)).astype(np.float32)
    expected = x.astype(np.float64) @ decoded_weight(out, fused).astype(np.float64) + 2.0 * c
    np.testing.assert_allclose(run_ort(out, {"x": x}), expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    # the decoded weight quantizes alpha·Bᵀ
    assert np.linalg.norm(decoded_weight(out, fused) - 0.5 * b.T) < 0.15 * np.linalg.norm(0.5 * b.T)


def test_refusals_are_counted_with_reasons():
    """Gemm with transA and an activation × activation MatMul stay float; the others are rewritten."""
    w = heavy_tailed(32, 32, seed=5)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Transpose", ["h"], ["ht"]),
        helper.make_node("MatMul", ["h", "ht"], ["s"], name="scores"),
        helper.make_node("Gemm", ["s", "W"], ["y"], name="gemm_ta", transA=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [32, 32])], [helper.make_tensor_value_info("y", 1, [32, 32])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, validate=True)
    stats = next(p for p in report.passes if p.name == "weight-only")
    assert stats.stats["coverage"]["done"] == 1 and stats.stats["coverage"]["total"] == 3
    reasons = {r.subject: r.reason for r in stats.refusals}
    assert reasons["layer scores"].startswith("weight is not a constant")
    assert "transA" in reasons["layer gemm_ta"]
    assert Counter(n.op_type for n in out.graph.node)["Gemm"] == 1


def test_float16_weights_refused_with_the_reason():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    agraph (float16[4, 32] x) => (float16[4, 8] y) { y = MatMul (x, W) }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(heavy_tailed(32, 8).astype(np.float16), "W"))
    with pytest.raises(NothingToDoError, match="0 of 1 MatMul/Gemm layers quantized: 1 non-float32 weight"):
        onnxopt.optimize(model, preset="weight-only", **EXACT)


def test_keep_8bit_and_shared_weight():
    w = heavy_tailed(64, 64, seed=9)
    head = heavy_tailed(64, 16, seed=10)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="block.0.mlp"),
        helper.make_node("MatMul", ["a", "W"], ["b"], name="block.1.mlp"),
        helper.make_node("MatMul", ["b", "H"], ["y"], name="lm_head"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 64])], [helper.make_tensor_value_info("y", 1, [1, 16])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(head, "H")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, keep_8bit=["lm_head"], validate=True)
    by_name = {n.name: n for n in nbits_nodes(out)}
    bits = {name.rsplit("_Q", 1)[0]: attrs(node)["bits"] for name, node in by_name.items()}
    assert bits == {"block.0.mlp": 4, "block.1.mlp": 4, "lm_head": 8}
    mlp = [n for n in nbits_nodes(out) if n.name.startswith("block.")]
    assert mlp[0].input[1:] == mlp[1].input[1:]  # the shared weight is quantized and stored once
    stats = next(p for p in report.passes if p.name == "weight-only").stats
    assert stats["weights_quantized"] == 2 and stats["layers_quantized"] == 3 and stats["layers_8bit"] == 1
    # a pattern that matches nothing is said, not ignored
    _, report = onnxopt.optimize(model, preset="weight-only", **EXACT, keep_8bit=["lm_head", "embed_tokens", "H"])  # "H": the head's weight name
    weight_only = next(p for p in report.passes if p.name == "weight-only")
    assert weight_only.stats["keep_8bit_unmatched"] == ["embed_tokens"]
    assert any(r.subject == "keep_8bit 'embed_tokens'" and "matches no" in r.reason for r in weight_only.refusals)
    rows = np.random.default_rng(9).standard_normal((32, 64)).astype(np.float32)  # its own generator: the result must not depend on test order
    reference = np.concatenate([run_ort(model, {"x": row[None]}) for row in rows])
    got = np.concatenate([run_ort(out, {"x": row[None]}) for row in rows])
    assert np.linalg.norm(got - reference) < 0.2 * np.linalg.norm(reference)


def test_norm_weighting_lowers_output_error_behind_a_layernorm():
    """γ spanning two decades: the search weighted by γ² + β² (the LayerNorm output's power per
    feature) gives a smaller output error than the unweighted search, on real LayerNorm outputs."""
    k, n = 256, 64
    rng = np.random.default_rng(4)
    gamma = np.exp(rng.uniform(np.log(0.1), np.log(10.0), k)).astype(np.float32)
    beta = (rng.standard_normal(k) * 0.1).astype(np.float32)
    w = heavy_tailed(k, n, seed=12)
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1), helper.make_node("MatMul", ["h", "W"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [64, k])], [helper.make_tensor_value_info("y", 1, [64, n])],
                              [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": (rng.standard_normal((64, k)) * 3 + 1).astype(np.float32)}
    reference = run_ort(model, x)
    errors = {}
    for weighting in (False, True):
        out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, norm_weighting=weighting, validate=True)
        (layer,) = next(p for p in report.passes if p.name == "weight-only").stats["layers"]
        assert layer["weighted_by"] == ("ln" if weighting else None)
        errors[weighting] = np.linalg.norm(run_ort(out, x) - reference) / np.linalg.norm(reference)
    assert errors[True] < 0.9 * errors[False], errors


def test_weighted_search_never_above_weighted_round_to_nearest():
    weight = heavy_tailed(200, 32, seed=21)
    rows = np.random.default_rng(3).uniform(0.01, 5.0, 200).astype(np.float32)
    rtn = quantize_blocks(weight, 4, 32, search=False).dequantized()
    searched = quantize_blocks(weight, 4, 32, row_weight=rows).dequantized()
    weighted = lambda w_hat: float((rows[:, None] * np.square(w_hat - weight, dtype=np.float64)).sum())  # noqa: E731
    assert weighted(searched) < weighted(rtn)


# --------------------------------------------------------------------------- GPT-style, external data
def gpt_style_model(layers: int = 2, d: int = 64, ff: int = 256, vocab: int = 97, seq: int = 8) -> onnx.ModelProto:
    """ids → embedding Gather → [LayerNorm → MatMul(d, d) → Add residual → LayerNorm → MatMul(d, ff) → Gelu
    → MatMul(ff, d) → Add residual] × layers → LayerNorm → MatMul(lm_head)."""
    rng = np.random.default_rng(1)
    arrays = {"emb": (rng.standard_normal((vocab, d)) * 0.5).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h0"], name="embed")]
    h = "h0"
    for i in range(layers):
        for j, (k, n) in enumerate(((d, d), (d, ff), (ff, d))):
            arrays[f"w{i}_{j}"] = (rng.standard_t(4, size=(k, n)) / np.sqrt(k)).astype(np.float32)
        for j in range(2):
            arrays[f"g{i}_{j}"] = rng.uniform(0.8, 1.2, d).astype(np.float32)
            arrays[f"b{i}_{j}"] = (rng.standard_normal(d) * 0.1).astype(np.float32)
        nodes += [
            helper.make_node("LayerNormalization", [h, f"g{i}_0", f"b{i}_0"], [f"n{i}a"], name=f"ln{i}a", axis=-1),
            helper.make_node("MatMul", [f"n{i}a", f"w{i}_0"], [f"att{i}"], name=f"layers.{i}.attn.proj"),
            helper.make_node("Add", [h, f"att{i}"], [f"r{i}"], name=f"res{i}a"),
            helper.make_node("LayerNormalization", [f"r{i}", f"g{i}_1", f"b{i}_1"], [f"n{i}b"], name=f"ln{i}b", axis=-1),
            helper.make_node("MatMul", [f"n{i}b", f"w{i}_1"], [f"up{i}"], name=f"layers.{i}.mlp.up"),
            helper.make_node("Gelu", [f"up{i}"], [f"act{i}"], name=f"gelu{i}"),
            helper.make_node("MatMul", [f"act{i}", f"w{i}_2"], [f"down{i}"], name=f"layers.{i}.mlp.down"),
            helper.make_node("Add", [f"r{i}", f"down{i}"], [f"h{i + 1}"], name=f"res{i}b"),
        ]
        h = f"h{i + 1}"
    arrays.update(gf=np.ones(d, np.float32), bf=np.zeros(d, np.float32), head=(rng.standard_normal((d, vocab)) / np.sqrt(d)).astype(np.float32))
    nodes += [helper.make_node("LayerNormalization", [h, "gf", "bf"], ["nf"], name="ln_f", axis=-1),
              helper.make_node("MatMul", ["nf", "head"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "gpt", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", seq, vocab])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_gpt_style_model_with_external_data_round_trip(tmp_path):
    model = gpt_style_model()
    src = tmp_path / "gpt.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="gpt.onnx.data", size_threshold=0)
    assert (tmp_path / "gpt.onnx.data").exists()
    out, report = onnxopt.optimize(src, preset="weight-only", **EXACT, keep_8bit=["lm_head"], validate=True)
    dst = tmp_path / "gpt.w4.onnx"
    onnxopt.save_model(out, dst, external_data=True)
    written = onnx.load(str(dst), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    assert len(nbits_nodes(written)) == 7 and not any(n.op_type == "MatMul" for n in written.graph.node)
    onnx.checker.check_model(str(dst), full_check=True)
    ids = np.random.default_rng(2).integers(0, 97, size=(3, 8)).astype(np.int64)
    got = run_ort(str(dst), {"ids": ids})
    # exact: the float model with every weight replaced by its decoded Ŵ gives the same logits
    loaded = onnx.load(str(dst))
    decoded = {n.name.rsplit("_Q", 1)[0]: decoded_weight(loaded, n) for n in nbits_nodes(loaded)}
    substituted = onnx.ModelProto()
    substituted.CopyFrom(gpt_style_model())  # (saving moved the payloads of `model` out)
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    for init in substituted.graph.initializer:
        for name, weight_name in weight_of.items():
            if init.name == weight_name:
                init.CopyFrom(numpy_helper.from_array(decoded[name], weight_name))
    expected = run_ort(substituted, {"ids": ids})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # and close to the float model (4-bit heavy-tailed random weights, 7 layers)
    reference = run_ort(str(src), {"ids": ids})
    cosine = (got * reference).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine.min() > 0.95, cosine.min()
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.2
    stats = next(p for p in report.passes if p.name == "weight-only").stats
    assert stats["weight_bytes_after"] < stats["weight_bytes_before"] / 4


@pytest.mark.parametrize("opset,ir_version", [(11, 6), (13, 7), (21, 10)])
def test_opset_and_ir_version_kept(opset, ir_version):
    weight = heavy_tailed(64, 32, seed=opset)
    model = matmul_model(weight, x_shape=(4, None), opset=opset, ir_version=ir_version)
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, validate=True)
    assert out.ir_version == ir_version and not report.notes
    assert {o.domain: o.version for o in out.opset_import} == {"": opset, "com.microsoft": 1}
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    (node,) = nbits_nodes(out)
    np.testing.assert_allclose(run_ort(out, {"x": x}), x @ decoded_weight(out, node), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- errors and CLI
def test_no_constant_weight_is_a_no_op_error():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    agraph (float[4, 8] a, float[8, 4] b) => (float[4, 4] y) { y = MatMul (a, b) }"""
    with pytest.raises(NothingToDoError, match=r"0 of 1 MatMul/Gemm layers quantized: 1 activation × activation"):
        onnxopt.optimize(onnx.parser.parse_model(text), preset="weight-only", **EXACT)
    no_layers = """<ir_version: 8, opset_import: ["" : 17]>
    agraph (float[4, 8] a) => (float[4, 8] y) { y = Relu (a) }"""
    with pytest.raises(NothingToDoError, match="no MatMul or Gemm layer"):
        onnxopt.optimize(onnx.parser.parse_model(no_layers), preset="weight-only", **EXACT)


def if_model(weight: np.ndarray, with_outer_layer: bool) -> onnx.ModelProto:
    """y = If(c, x @ W, x @ W) (the MatMuls in the branches), then optionally @ W2 in the main graph."""
    k, n = weight.shape
    branch = lambda name: helper.make_graph([helper.make_node("MatMul", ["x", "W"], [f"{name}_y"], name=f"{name}_mm")], name, [],
                                           [helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, [2, n])])
    nodes = [helper.make_node("If", ["c"], ["h"], name="branch", then_branch=branch("then"), else_branch=branch("else"))]
    inits = [numpy_helper.from_array(weight, "W")]
    out = "h"
    if with_outer_layer:
        nodes.append(helper.make_node("MatMul", ["h", "W2"], ["y"], name="outer"))
        inits.append(numpy_helper.from_array(heavy_tailed(n, 16, seed=4), "W2"))
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [2, 16 if with_outer_layer else n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_layers_inside_control_flow_bodies_are_counted_with_the_reason():
    """A MatMul in an If branch stays float and says why: alone, the run is exit 10 naming
    the reason (not "no MatMul"); beside a main-graph layer, the coverage line counts it."""
    weight = heavy_tailed(64, 32, seed=3)
    with pytest.raises(NothingToDoError, match=r"0 of 2 MatMul/Gemm layers quantized: 2 inside If/Loop/Scan"):
        onnxopt.optimize(if_model(weight, False), preset="weight-only", **EXACT)
    model = if_model(weight, True)
    out, report = onnxopt.optimize(model, preset="weight-only", **EXACT, validate=True)
    stats = next(p for p in report.passes if p.name == "weight-only")
    assert stats.stats["coverage"]["done"] == 1 and stats.stats["coverage"]["total"] == 3
    assert stats.stats["coverage"]["reasons"] == {"inside If/Loop/Scan": 2}
    assert sum(r.reason.startswith("inside a control-flow body") for r in stats.refusals) == 2
    assert [n.name for n in nbits_nodes(out)] and "quantized 1/3 MatMul/Gemm layers" in report.format_table()
    rng = np.random.default_rng(12)  # its own generator: the result must not depend on test order
    for condition in (True, False):
        x = rng.standard_normal((2, 64)).astype(np.float32)
        reference = run(model, {"c": np.array(condition), "x": x})["y"]
        got = run(out, {"c": np.array(condition), "x": x})["y"]
        assert np.linalg.norm(got - reference) <= 0.15 * np.linalg.norm(reference)  # W4 of one 32-row block of t(3) weights: about 0.1


@pytest.mark.parametrize("options", [{"weight_bits": 3}, {"block_size": 48}, {"accuracy_level": 7}, {"keep_8bit": 5}, {"min_shrink": 0}])
def test_bad_options(options):
    with pytest.raises(PipelineError):
        onnxopt.optimize(matmul_model(heavy_tailed(32, 8)), preset="weight-only", **options)


def test_cli_weight_only_flags(tmp_path, capsys):
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_model(heavy_tailed(128, 16)), str(src))
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--block-size", "64", "--symmetric", "-q"]) == 0
    (node,) = nbits_nodes(onnx.load(str(dst)))
    assert attrs(node)["block_size"] == 64 and attrs(node)["bits"] == 4 and len(node.input) == 3
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w8", "--keep-8bit", "proj", "-q"]) == 0
    assert attrs(nbits_nodes(onnx.load(str(dst)))[0])["bits"] == 8
    assert cli_main([str(src), "-o", str(dst), "--block-size", "64"]) == 7
    assert cli_main([str(src), "-o", str(dst), "--quantize", "w4", "--spiq"]) == 7
    assert "need --quantize wN" in capsys.readouterr().err
    nothing = tmp_path / "relu.onnx"
    onnx.save(onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\nagraph (float[4, 8] a) => (float[4, 8] y) { y = Relu (a) }'), str(nothing))
    assert cli_main([str(nothing), "-o", str(dst), "--quantize", "w4"]) == 10


def test_default_accuracy_level_is_ort_s_int8_fast_path_and_stays_close():
    """Default accuracy_level 4: ORT's CPU kernel quantizes the activations to int8 per block
    (its fast path, the only one for 2- and 8-bit weights); the output stays close to
    x @ dequant(W); accuracy_level 0 (--accuracy-level 0) keeps float products."""
    weight = heavy_tailed(128, 32, seed=3)
    default, _ = onnxopt.optimize(matmul_model(weight), preset="weight-only", validate=True)
    exact, _ = onnxopt.optimize(matmul_model(weight), preset="weight-only", validate=True, **EXACT)
    levels = [next(a.i for a in n.attribute if a.name == "accuracy_level") for m in (default, exact) for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert levels == [4, 0]
    x = RNG.standard_normal((2, 3, 128)).astype(np.float32)
    reference = run(exact, {"x": x})["y"]
    got = run(default, {"x": x})["y"]
    assert np.abs(got - reference).max() <= 0.02 * np.abs(reference).max()
