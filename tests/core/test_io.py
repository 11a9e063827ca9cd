"""onnxopt.io: loading (paths, protos, external data, every failure mode) and atomic saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import onnxopt.io as io
from onnxopt.errors import InputNotFoundError, InvalidModelError, OutputPathError, UnsupportedModelError
from tests.conftest import assert_same_model, parse


def _external_tensors(path: Path) -> list[str]:
    raw = onnx.load_model(str(path), load_external_data=False)
    return [t.name for t in raw.graph.initializer if external_data_helper.uses_external_data(t)]


def _save_with_external_data(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Write ``model`` as another tool would, every tensor in ``location`` (model left intact)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location=location, size_threshold=0)


def _model_with_opset(version: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
    model.ir_version = 7
    return model


# --------------------------------------------------------------------------- loading
def test_load_from_path_and_from_proto(demo, demo_path):
    loaded = io.load_model(demo_path)
    assert_same_model(loaded, demo)
    assert io.load_model(str(demo_path)).graph.name == "onnxopt_demo"
    # A ModelProto is checked and returned as is (no copy, no conversion).
    assert io.load_model(demo) is demo


def test_load_proto_is_checked_unless_asked_not_to():
    old = _model_with_opset(5)
    with pytest.raises(UnsupportedModelError, match="unsupported opset 5"):
        io.load_model(old)
    assert io.load_model(old, check=False) is old


def test_external_data_round_trip(tmp_path, demo):
    before = demo.SerializeToString()
    path = io.save_model(demo, tmp_path / "m.onnx", external_data=True)
    assert path == tmp_path / "m.onnx"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    # The large tensors (the 8x8x3x3 conv weights) went to the data file.
    assert set(_external_tensors(path)) == {"block.0.conv.weight", "block.1.conv.weight"}
    raw = onnx.load_model(str(path), load_external_data=False)
    locations = {external_data_helper.ExternalDataInfo(t).location for t in raw.graph.initializer if t.external_data}
    assert locations == {"m.onnx.data"}
    assert_same_model(io.load_model(path), demo)
    assert demo.SerializeToString() == before, "save_model changed the in-memory model"


def test_external_data_chosen_automatically_above_threshold(tmp_path, demo, monkeypatch):
    io.save_model(demo, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    assert io.tensor_bytes(demo) > 1000
    io.save_model(demo, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert _external_tensors(tmp_path / "big.onnx")
    assert_same_model(io.load_model(tmp_path / "big.onnx"), demo)
    # external_data=False wins over the threshold.
    io.save_model(demo, tmp_path / "forced.onnx", external_data=False)
    assert not (tmp_path / "forced.onnx.data").exists()


def test_model_with_external_data_loads(tmp_path, demo):
    _save_with_external_data(demo, tmp_path / "in.onnx", "weights.bin")
    assert len(_external_tensors(tmp_path / "in.onnx")) == len(demo.graph.initializer)
    loaded = io.load_model(tmp_path / "in.onnx")
    assert not any(external_data_helper.uses_external_data(t) for t in loaded.graph.initializer)
    assert_same_model(loaded, demo)


def test_missing_external_data_file_is_invalid(tmp_path, demo):
    _save_with_external_data(demo, tmp_path / "in.onnx", "weights.bin")
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(InvalidModelError, match="external data"):
        io.load_model(tmp_path / "in.onnx")


# --------------------------------------------------------------------------- saving
def test_save_is_atomic_when_the_write_fails(tmp_path, demo, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")

    def failing_save(model, f, *args, **kwargs):
        Path(f).write_bytes(model.SerializeToString()[:100])  # half-written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", failing_save)
    with pytest.raises(OutputPathError, match="No space left on device"):
        io.save_model(demo, out)
    assert out.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["out.onnx"], "temporary files left behind"


def test_failed_external_data_save_keeps_the_model_and_the_old_output(tmp_path, demo, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    before = demo.SerializeToString()
    real_externalized = io._DataWriter.externalized
    calls = []

    def fail_on_second_tensor(writer, tensor):
        stub = real_externalized(writer, tensor)
        if stub is not None:  # its bytes went to the data file
            calls.append(tensor.name)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return stub

    monkeypatch.setattr(io._DataWriter, "externalized", fail_on_second_tensor)
    with pytest.raises(OutputPathError, match="No space left"):
        io.save_model(demo, out, external_data=True)
    assert len(calls) == 2
    assert out.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert demo.SerializeToString() == before, "a failed save lost tensor payloads of the in-memory model"


def test_refuses_to_overwrite_the_input(tmp_path, demo, demo_path):
    original = demo_path.read_bytes()
    with pytest.raises(OutputPathError, match="refusing to overwrite the input model"):
        io.save_model(demo, demo_path, input_path=demo_path)
    link = tmp_path / "link.onnx"
    link.symlink_to(demo_path)
    with pytest.raises(OutputPathError, match="refusing to overwrite the input model"):
        io.save_model(demo, link, input_path=demo_path)
    # The other way round, and through a relative spelling of the same path.
    with pytest.raises(OutputPathError):
        io.save_model(demo, demo_path, input_path=link)
    with pytest.raises(OutputPathError):
        io.save_model(demo, tmp_path / "." / "demo.onnx", input_path=demo_path)
    assert demo_path.read_bytes() == original
    assert link.is_symlink()


def test_external_data_never_lands_on_the_inputs_data(tmp_path, demo):
    # The input's data file happens to be named like the output's: out.onnx.data.
    _save_with_external_data(demo, tmp_path / "in.onnx", "out.onnx.data")
    data_before = (tmp_path / "out.onnx.data").read_bytes()
    io.save_model(demo, tmp_path / "out.onnx", input_path=tmp_path / "in.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert io.external_data_files(tmp_path / "out.onnx") == {tmp_path / "out.onnx.1.data"}
    assert_same_model(io.load_model(tmp_path / "out.onnx"), demo)
    assert_same_model(io.load_model(tmp_path / "in.onnx"), demo)


def test_save_rejects_bad_output_paths(tmp_path, demo):
    with pytest.raises(OutputPathError, match="does not exist"):
        io.save_model(demo, tmp_path / "missing" / "out.onnx")
    with pytest.raises(OutputPathError, match="is a directory"):
        io.save_model(demo, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="does not exist"):
        io.save_model(demo, tmp_path / "file" / "out.onnx")


# --------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="input model not found: .*nope.onnx") as info:
        io.load_model(tmp_path / "nope.onnx")
    assert info.value.exit_code == 3


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(InputNotFoundError, match="is not a file"):
        io.load_model(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InvalidModelError, match="is empty") as info:
        io.load_model(tmp_path / "empty.onnx")
    assert info.value.exit_code == 4


@pytest.mark.parametrize(
    "content",
    [b"this is a text file, not an onnx model\n", bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8))],
    ids=["text", "random-bytes"],
)
def test_garbage_bytes(tmp_path, content):
    (tmp_path / "junk.onnx").write_bytes(content)
    with pytest.raises(InvalidModelError, match="not a valid ONNX model"):
        io.load_model(tmp_path / "junk.onnx")


def test_truncated_model(tmp_path, demo):
    data = demo.SerializeToString()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError, match="truncated"):
        io.load_model(tmp_path / "half.onnx")


def test_model_failing_the_checker(tmp_path):
    model = _model_with_opset(17)
    model.graph.node[0].input[0] = "undefined"  # reads a tensor nobody produces
    onnx.save_model(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(InvalidModelError, match="fails the ONNX checker") as info:
        io.load_model(tmp_path / "bad.onnx")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version", [5, onnx.defs.onnx_opset_version() + 10])
def test_unsupported_opset(tmp_path, version):
    onnx.save_model(_model_with_opset(version), str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedModelError, match=f"unsupported opset {version}: onnxopt handles ai.onnx opsets 9..") as info:
        io.load_model(tmp_path / "m.onnx")
    assert info.value.exit_code == 5


def test_model_without_default_opset():
    model = _model_with_opset(17)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedModelError, match="no default-domain"):
        io.load_model(model)


def test_tensor_bytes_counts_raw_and_typed_fields():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x) => (float[3] y) <float[3] a = {1.0, 2.0, 3.0}, int64[2] b = {1, 2}> {
          y = Add(x, a)
        }
        """
    )
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(5, np.float32), "c"))
    assert io.tensor_bytes(model) == 3 * 4 + 2 * 8 + 5 * 4


def test_serialized_size_equals_bytesize(demo):
    model = onnx.ModelProto()
    model.CopyFrom(demo)
    helper.set_model_props(model, {"k": "v" * 300})
    model.graph.doc_string = "d" * 200
    assert io.serialized_size(model) == model.ByteSize()
    assert io.serialized_size(onnx.ModelProto()) == 0
