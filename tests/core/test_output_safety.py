"""Never lose a user's data: refused output targets, model + data replaced as one unit,
stale staging folders removed, files published with normal permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
import pytest

import onnxopt.io as io
import onnxopt.output as output
from onnxopt.cli import main
from onnxopt.errors import OutputPathError
from tests.conftest import assert_same_model


def _save_input_with_data(model: onnx.ModelProto, path: Path, location: str) -> None:
    """An input model as another tool writes it: every tensor in ``location``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location=location, size_threshold=0)


def _scaled(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy whose large weights differ, so two outputs are told apart by their tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        if array.size >= 64:
            tensor.CopyFrom(onnx.numpy_helper.from_array(array * factor, tensor.name))
    return copy


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def input_with_data(tmp_path, demo):
    path = tmp_path / "m.onnx"
    _save_input_with_data(demo, path, "w.bin")
    return path, tmp_path / "w.bin", (tmp_path / "w.bin").read_bytes()


# --------------------------------------------------------------------------- refused targets
def test_output_onto_the_inputs_data_file_is_refused(capsys, input_with_data, demo):
    model, data, before = input_with_data
    code, err = _cli(capsys, model, "-o", data)
    assert code == 6 and "the input's external data file" in err and "Traceback" not in err
    assert data.read_bytes() == before
    # A hard link to the data file is the same file.
    os.link(data, data.with_name("alias.bin"))
    code, _ = _cli(capsys, model, "-o", data.with_name("alias.bin"))
    assert code == 6 and data.read_bytes() == before
    data.with_name("alias.bin").unlink()  # onnx refuses to read hard-linked data
    assert_same_model(io.load_model(model), demo)


def test_report_onto_the_inputs_data_or_the_output_is_refused(capsys, input_with_data, tmp_path):
    model, data, before = input_with_data
    out = tmp_path / "out.onnx"
    for target in (data, model, out, tmp_path / "out.onnx.data"):
        code, err = _cli(capsys, model, "-o", out, "--report", target)
        assert code == 6 and "refusing to overwrite" in err and "with the report" in err, err
    assert data.read_bytes() == before
    assert not out.exists(), "nothing may be written when a target is refused"


def test_analyze_report_onto_the_input_is_refused(capsys, tmp_path, demo):
    from onnxopt import optimize

    quantized, _ = optimize(demo, preset="quantize")
    path = tmp_path / "q.onnx"
    onnx.save_model(quantized, str(path))
    before = path.read_bytes()
    code, err = _cli(capsys, "analyze", "accumulators", path, "--report", path)
    assert code == 6 and "refusing to overwrite the input model" in err
    assert path.read_bytes() == before
    code, err = _cli(capsys, "analyze", "accumulators", path, "--report", tmp_path / "missing" / "r.json")
    assert code == 6 and "does not exist" in err and "Traceback" not in err
    code, err = _cli(capsys, "analyze", "accumulators", path, "--report", tmp_path)
    assert code == 6 and "is a directory" in err


def test_output_onto_a_fifo_or_symlink_is_refused(capsys, tmp_path, demo_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, err = _cli(capsys, demo_path, "-o", fifo)
    assert code == 6 and "not a regular file" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    target = tmp_path / "real.onnx"
    target.write_bytes(b"keep")
    (tmp_path / "link.onnx").symlink_to(target)
    code, err = _cli(capsys, demo_path, "-o", tmp_path / "link.onnx", "--report", fifo)
    assert code == 6 and "symbolic link" in err
    assert target.read_bytes() == b"keep" and (tmp_path / "link.onnx").is_symlink()
    with pytest.raises(OutputPathError, match="not a regular file"):
        output.check_output_path(fifo)


# --------------------------------------------------------------------------- atomic pairs
def test_model_and_data_are_replaced_as_one_unit(tmp_path, demo, monkeypatch):
    out = tmp_path / "out.onnx"
    first, second = _scaled(demo, 2.0), _scaled(demo, 3.0)
    io.save_model(first, out, external_data=True)
    assert io.external_data_files(out) == {tmp_path / "out.onnx.data"}

    real_replace = os.replace

    def model_rename_fails(src, dst):
        if Path(dst) == out:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", model_rename_fails)
    with pytest.raises(OutputPathError, match="Input/output error"):
        io.save_model(second, out, external_data=True)
    monkeypatch.setattr(os, "replace", real_replace)
    # The old output still loads, with its own weights: the new data went under the other name.
    assert_same_model(io.load_model(out), first)

    io.save_model(second, out, external_data=True)
    assert_same_model(io.load_model(out), second)
    assert io.external_data_files(out) == {tmp_path / "out.onnx.1.data"}
    assert not (tmp_path / "out.onnx.data").exists(), "the replaced output's data was left behind"
    io.save_model(first, out, external_data=True)  # and back to the first name
    assert io.external_data_files(out) == {tmp_path / "out.onnx.data"}
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    # Going back to a single file removes the data file the old output used.
    io.save_model(first, out, external_data=False)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_foreign_data_files_of_a_replaced_output_are_kept(tmp_path, demo):
    out = tmp_path / "out.onnx"
    _save_input_with_data(demo, out, "shared.bin")  # another tool's model, maybe shared
    io.save_model(demo, out, external_data=True)
    assert (tmp_path / "shared.bin").exists()


def test_stale_staging_folders_are_removed(tmp_path, demo):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".out.onnx{output.STAGING_MARK}{dead_pid}-abc"
    stale.mkdir()
    (stale / "out.onnx.data").write_bytes(b"x" * 1000)
    live = tmp_path / f".other.onnx{output.STAGING_MARK}1-xyz"  # pid 1 is alive
    live.mkdir()
    legacy = tmp_path / ".out.onnx.k3j_9x0a"
    legacy.mkdir()
    (legacy / "out.onnx").write_bytes(b"old")
    os.utime(legacy, (1, 1))
    unrelated = tmp_path / ".git12345"
    unrelated.mkdir()
    empty_lookalike = tmp_path / ".cache.override"  # legacy staging shape, but empty: not ours to judge
    empty_lookalike.mkdir()
    os.utime(empty_lookalike, (1, 1))
    io.save_model(demo, tmp_path / "out.onnx")
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and unrelated.exists() and empty_lookalike.exists()


def test_outputs_get_normal_permissions(tmp_path, demo):
    old_mask = os.umask(0o022)
    try:
        io.save_model(demo, tmp_path / "out.onnx", external_data=True)
        output.write_text_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(old_mask)
    for name in ("out.onnx", "out.onnx.data", "r.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_external_data_always_with_only_small_tensors(capsys, tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(tmp_path / "in.onnx"))
    code, err = _cli(capsys, tmp_path / "in.onnx", "-o", tmp_path / "out.onnx", "--external-data", "always")
    assert code == 0, err
    assert_same_model(io.load_model(tmp_path / "out.onnx"), model)


def test_a_data_file_referenced_from_a_model_local_function_is_protected(tmp_path: Path, capsys) -> None:
    """A Constant inside a model-local function that keeps its tensor in an external file:
    that file is one of the input's files, so -o may not replace it."""
    from onnx import TensorProto, helper

    value = helper.make_tensor("c", TensorProto.FLOAT, [1], [2.0])
    value.data_location = TensorProto.EXTERNAL
    for key, entry in (("location", "fn.bin"), ("offset", "0"), ("length", "4")):
        value.external_data.add(key=key, value=entry)
    value.ClearField("float_data")
    (tmp_path / "fn.bin").write_bytes(b"\x00\x00\x00\x40")
    function = helper.make_function(
        "local", "Scale", ["x"], ["y"],
        [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Mul", ["x", "c"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("Scale", ["x"], ["y"], domain="local")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert io.external_data_files(path) == {tmp_path / "fn.bin"}
    code = main([str(path), "-o", str(tmp_path / "fn.bin")])
    assert code == 6 and (tmp_path / "fn.bin").read_bytes() == b"\x00\x00\x00\x40"
    assert "fn.bin" in capsys.readouterr().err
