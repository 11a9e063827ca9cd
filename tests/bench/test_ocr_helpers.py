"""Helpers the PP-OCR benchmarks rely on: greedy CTC decoding, --only results merged into the
existing JSON, the Softmax's logits found through the opset-13 Flatten/Reshape form, and the
static-shape copy REx's MACs/BOPs are counted on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnxopt.models.ocr import ctc_greedy_decode

from bench.common import merge_previous
from bench.fidelity import run_model, softmax_input
from bench.rex import with_static_input
from onnxopt.metrics import count_macs
from tests.conftest import text_model


def one_hot(indices: list[list[int]], classes: int) -> np.ndarray:
    return np.eye(classes)[np.array(indices)]


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    characters = ["", "a", "b", " "]
    scores = one_hot([[1, 1, 0, 1, 2, 2, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0]], 4)
    assert ctc_greedy_decode(scores, characters) == ["aab ", ""]


def test_merge_previous_keeps_the_other_models(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    known = ["a", "b", "c"]
    results, command = merge_previous(path, "models", {"c": 3}, ["c"], known, "run --only c")
    assert results == {"c": 3} and command == "run --only c"  # no previous file
    path.write_text(json.dumps({"command": "run", "models": {"b": 2, "a": 1, "c": 0}}))
    results, command = merge_previous(path, "models", {"c": 3}, ["c"], known, "run --only c")
    assert list(results.items()) == [("a", 1), ("b", 2), ("c", 3)] and command == "run ; then run --only c"
    results, command = merge_previous(path, "models", {"a": 9, "b": 8, "c": 7}, known, known, "run")
    assert results == {"a": 9, "b": 8, "c": 7} and command == "run"  # every model: the file is replaced
    path.write_text(json.dumps({"command": "run ; then run --only c ; then run --only b", "models": {"a": 1, "b": 2, "c": 0}}))
    _, command = merge_previous(path, "models", {"c": 3}, ["c"], known, "run --only c")
    assert command == "run ; then run --only b ; then run --only c"  # a repeated run replaces its earlier entry


def softmax_model(form: str) -> onnx.ModelProto:
    arrays = {"w": np.arange(8, dtype=np.float32).reshape(4, 2) / 8, "shape": np.array([-1, 2], np.int64)}
    body = ["z = MatMul(x, w)"]
    if form == "identity":
        body += ["p = Softmax <axis = 1> (z)", "y = Identity(p)"]
    else:  # what the opset-13 upgrade makes of an opset-11 Softmax
        body += ["f = Flatten <axis = 1> (z)", "p = Softmax <axis = 1> (f)", "y = Reshape(p, shape)"]
    return text_model("(float[N,4] x) => (float[N,2] y)", body, arrays)


def test_run_model_gives_the_logits_of_a_softmax_output(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    expected = x.astype(np.float64) @ (np.arange(8).reshape(4, 2) / 8)
    for form, logits in (("identity", "z"), ("flatten", "f")):
        path = tmp_path / f"{form}.onnx"
        onnx.save(softmax_model(form), path)
        assert softmax_input(path) == logits
        np.testing.assert_allclose(run_model(path, x), expected, rtol=1e-5, atol=1e-6)


def test_static_input_copy_counts_the_real_macs() -> None:
    arrays = {"w": np.ones((4, 3, 3, 3), np.float32)}
    model = text_model('(float[N,3,H,W] x) => (float[N,4,8,10] y)', ["y = Conv(x, w)"], arrays)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("y_stale", onnx.TensorProto.FLOAT, ["N", 4, "unk__0", "unk__1"]))
    static = with_static_input(model, (7, 3, 10, 12))
    assert not static.graph.value_info
    dims = [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 10, 12] and [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][2:] == ["H", "W"]
    assert count_macs(static)[0] == 4 * 8 * 10 * 27


def test_jittered_copy_jitters_constant_node_weights(tmp_path: Path) -> None:
    """Paddle2ONNX keeps the weights in Constant nodes: the noise-floor copies must move them too."""
    from onnx import helper, numpy_helper

    from bench.spiq_decision import JITTER, jittered_copy

    weight = np.linspace(1, 2, 8, dtype=np.float32).reshape(4, 2)
    constant = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w"))
    graph = helper.make_graph([constant, helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])])
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    jittered = onnx.load(str(jittered_copy(src, tmp_path / "copy.onnx", 1)))
    values = numpy_helper.to_array(jittered.graph.node[0].attribute[0].t)
    change = np.abs(values / weight - 1)
    assert 0 < change.max() < 10 * JITTER
