"""Large models: lazy external initializers (onnxopt.external) and the streamed save.

A decoder-like stack (LayerNorm → MatMul → Gelu → MatMul → Add, 16 MB of weights) saved with
external data goes through the default pipeline and ``--quantize w4`` with its weights left
in the input's data file: nothing is read that no pass changes, the output matches ONNX
Runtime's outputs of the input (default) or of the same pipeline run on the fully loaded
model (W4), and the written files are valid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import onnxopt.io as io
from onnxopt import cli, external
from onnxopt.api import optimize
from onnxopt.errors import InvalidModelError
from onnxopt.graph import export_model, import_graph

D = 512
BLOCKS = 2


def _decoder(path: Path, location: str = "weights.bin") -> Path:
    """Write the stack with every tensor of 1 KB or more in ``location``; return the path."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for b in range(BLOCKS):
        inits += [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(D)).astype(np.float32), f"b{b}_g"),
            numpy_helper.from_array((0.1 * rng.standard_normal(D)).astype(np.float32), f"b{b}_beta"),
            numpy_helper.from_array((0.05 * rng.standard_normal((D, 4 * D))).astype(np.float32), f"b{b}_w1"),
            numpy_helper.from_array((0.05 * rng.standard_normal((4 * D, D))).astype(np.float32), f"b{b}_w2"),
        ]
        nodes += [
            helper.make_node("LayerNormalization", [x, f"b{b}_g", f"b{b}_beta"], [f"b{b}_ln"], axis=-1),
            helper.make_node("MatMul", [f"b{b}_ln", f"b{b}_w1"], [f"b{b}_up"]),
            helper.make_node("Gelu", [f"b{b}_up"], [f"b{b}_act"]),
            helper.make_node("MatMul", [f"b{b}_act", f"b{b}_w2"], [f"b{b}_down"]),
            helper.make_node("Add", [x, f"b{b}_down"], [f"b{b}_out"]),
        ]
        x = f"b{b}_out"
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", D])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "seq", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return path


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return _decoder(tmp_path_factory.mktemp("decoder") / "model.onnx")


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((1, 7, D)).astype(np.float32)}


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _weights(model: onnx.ModelProto) -> list[str]:
    return [f"b{b}_{w}" for b in range(BLOCKS) for w in ("w1", "w2")]


# --------------------------------------------------------------------------- loading
def test_lazy_load_leaves_large_weights_in_the_data_file(decoder):
    lazy = io.load_model(decoder, lazy=True)
    eager = io.load_model(decoder)
    assert sorted(t.name for t in external.lazy_tensors(lazy)) == sorted(_weights(lazy))
    small = {t.name: t for t in lazy.graph.initializer if not external.is_lazy(t)}
    assert set(small) == {f"b{b}_{n}" for b in range(BLOCKS) for n in ("g", "beta")}
    assert not any(external_data_helper.uses_external_data(t) for t in small.values()), "small tensors are loaded"
    assert lazy.ByteSize() < 100_000 < eager.ByteSize()
    assert io.tensor_bytes(lazy) == io.tensor_bytes(eager)
    for tensor in external.lazy_tensors(lazy):
        original = next(t for t in eager.graph.initializer if t.name == tensor.name)
        np.testing.assert_array_equal(external.read_array(tensor), numpy_helper.to_array(original))


def test_a_reference_outside_the_model_folder_is_an_invalid_model(tmp_path):
    path = _decoder(tmp_path / "model.onnx")
    proto = onnx.load_model(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save_model(proto, str(path))
    with pytest.raises(InvalidModelError, match="external data"):
        io.load_model(path, lazy=True)


# --------------------------------------------------------------------------- default pipeline
def test_default_pipeline_reads_no_weight_and_writes_them_unchanged(decoder, feeds, tmp_path):
    reads = external.ExternalValues.reads
    optimized, report = optimize(decoder, lazy=True)
    assert external.ExternalValues.reads == reads, "a pass read a weight it did not change"
    assert sorted(t.name for t in external.lazy_tensors(optimized)) == sorted(_weights(optimized))
    assert report.before.size_bytes == report.after.size_bytes >= 16 * D * D * BLOCKS

    out = io.save_model(optimized, tmp_path / "out.onnx", input_path=decoder, external_data=True)
    onnx.checker.check_model(str(out), full_check=True)
    written = io.load_model(out)
    for tensor in io.load_model(decoder).graph.initializer:
        copy = next(t for t in written.graph.initializer if t.name == tensor.name)
        np.testing.assert_array_equal(numpy_helper.to_array(copy), numpy_helper.to_array(tensor))
    np.testing.assert_array_equal(_ort(out, feeds), _ort(decoder, feeds))


def test_cli_default_pipeline_round_trip(decoder, feeds, tmp_path):
    for mode, data_files in (("always", ["out.onnx.data"]), ("auto", [])):
        folder = tmp_path / mode
        folder.mkdir()
        out = folder / "out.onnx"
        assert cli.main([str(decoder), "-o", str(out), "--external-data", mode, "-q"]) == 0
        assert sorted(p.name for p in folder.iterdir()) == sorted(["out.onnx", *data_files])
        onnx.checker.check_model(str(out), full_check=True)
        np.testing.assert_allclose(_ort(out, feeds), _ort(decoder, feeds), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- weight-only
def test_cli_w4_matches_the_fully_loaded_run(decoder, feeds, tmp_path):
    reads = external.ExternalValues.reads
    out = tmp_path / "w4.onnx"
    assert cli.main([str(decoder), "-o", str(out), "--quantize", "w4", "--external-data", "always", "-q"]) == 0
    assert external.ExternalValues.reads - reads == len(_weights(None)), "each weight read exactly once"
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load_model(str(out))
    assert [n.op_type for n in written.graph.node].count("MatMulNBits") == 2 * BLOCKS
    assert not {t.name for t in written.graph.initializer} & set(_weights(None)), "float weights dropped"

    eager, _ = optimize(io.load_model(decoder), ["eliminate-identity", "fold-constants", "fold-batchnorm", "fuse-pad-conv", "weight-only", "eliminate-dead"])
    reference = tmp_path / "eager.onnx"
    onnx.save_model(eager, str(reference))
    lazy_values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    for tensor in eager.graph.initializer:
        np.testing.assert_array_equal(lazy_values[tensor.name], numpy_helper.to_array(tensor))
    np.testing.assert_array_equal(_ort(out, feeds), _ort(reference, feeds))
    float_out = _ort(decoder, feeds)  # 4-bit random Gaussian weights: ~8 % relative weight error
    assert np.linalg.norm(_ort(out, feeds) - float_out) < 0.15 * np.linalg.norm(float_out)


# --------------------------------------------------------------------------- graphsurgeon
def test_read_but_unchanged_values_go_back_to_the_file(decoder):
    model = io.load_model(decoder, lazy=True)
    graph = import_graph(model)
    constants = {c.name: c for c in external.lazy_constants(graph)}
    assert sorted(constants) == sorted(_weights(model))
    read_only, edited = constants["b0_w1"], constants["b0_w2"]
    assert read_only.values.shape == (D, 4 * D)
    edited.values[0, 0] += 1.0  # in place: must not be mistaken for an untouched read
    assert external.release_unchanged(graph) == 1
    assert isinstance(read_only._values, external.ExternalValues)
    assert isinstance(edited._values, np.ndarray)

    exported = export_model(graph, model)
    by_name = {t.name: t for t in exported.graph.initializer}
    assert external.is_lazy(by_name["b0_w1"]) and not external.is_lazy(by_name["b0_w2"])
    assert by_name["b0_w2"].data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(by_name["b0_w2"]), edited.values)


def test_read_values_does_not_keep_a_lazy_weight_in_its_constant(decoder):
    graph = import_graph(io.load_model(decoder, lazy=True))
    weight = next(c for c in external.lazy_constants(graph) if c.name == "b1_w1")
    reads = external.ExternalValues.reads
    values = external.read_values(weight)
    assert values.shape == (D, 4 * D) and external.ExternalValues.reads == reads + 1
    assert isinstance(weight._values, external.ExternalValues), "the array would live as long as the graph"
    np.testing.assert_array_equal(values, weight.values)


def test_materialized_copy_is_an_ordinary_model(decoder, feeds):
    model = io.load_model(decoder, lazy=True)
    full = external.materialized(model)
    assert external.has_lazy(model) and not external.has_lazy(full)
    onnx.checker.check_model(full, full_check=True)
    session = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feeds)[0], _ort(decoder, feeds), rtol=0, atol=1e-6)
    assert isinstance(gs.import_onnx(full), gs.Graph)
