"""onnxopt.verify: inputs (random with dynamic dims, .npz), comparison figures, failures."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.errors import InputDataError, VerificationError
from onnxopt.verify import compare_outputs, load_inputs, parse_input_shapes, random_inputs, run, verify
from tests.conftest import parse
from tests.user_models import REFLECT_PAD, duplicate_names_model, minus_one_conv_model, reflect_pad_model

# y = x @ w + b on a dynamic batch: logits-like output of rank 2 (top-1 is defined).
LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,5] y) <float[4,5] w = {0.1, 0.2, 0.3, 0.4, 0.5, -0.1, -0.2, -0.3, -0.4, -0.5,
     1.0, 0.0, -1.0, 0.5, 0.25, 0.3, 0.1, 0.7, -0.6, 0.2}, float[5] b = {0.0, 0.1, 0.2, 0.3, 0.4}> {
  h = MatMul(x, w)
  y = Add(h, b)
}
"""


@pytest.fixture
def linear() -> onnx.ModelProto:
    return parse(LINEAR)


def _perturbed(model: onnx.ModelProto, column: int, delta: float) -> onnx.ModelProto:
    """``model`` with one output column of w shifted by ``delta``."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    (w,) = [t for t in changed.graph.initializer if t.name == "w"]
    values = numpy_helper.to_array(w).copy()
    values[:, column] += delta
    w.CopyFrom(numpy_helper.from_array(values, "w"))
    return changed


# --------------------------------------------------------------------------- inputs
def test_random_inputs_fill_dynamic_dims_from_input_shapes(linear):
    feeds = random_inputs(linear, {"x": [7, 4]})
    assert feeds["x"].shape == (7, 4) and feeds["x"].dtype == np.float32
    assert random_inputs(linear)["x"].shape == (1, 4)  # symbolic dims default to 1
    np.testing.assert_array_equal(random_inputs(linear, seed=3)["x"], random_inputs(linear, seed=3)["x"])
    assert not np.array_equal(random_inputs(linear, seed=3)["x"], random_inputs(linear, seed=4)["x"])

    result = verify(linear, linear, input_shapes={"x": [7, 4]})
    assert result.passed and result.outputs[0].shape == (7, 5)
    assert result.outputs[0].max_abs == 0.0 and result.outputs[0].max_rel == 0.0
    assert result.input_source == "random inputs, seed 0"


def test_random_inputs_for_integer_and_bool_inputs():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[3,4] i, bool[6] m) => (int64[3,4] y, bool[6] n) {
          y = Neg(i)
          n = Not(m)
        }
        """
    )
    feeds = random_inputs(model)
    assert feeds["i"].dtype == np.int64 and feeds["i"].min() >= 0 and feeds["i"].max() < 4
    assert feeds["m"].dtype == np.bool_ and feeds["m"].shape == (6,)
    assert verify(model, model).passed


def test_input_shapes_for_an_unknown_input(linear):
    with pytest.raises(InputDataError, match=r"unknown input\(s\) \['z'\]; the model's inputs are \['x'\]"):
        random_inputs(linear, {"z": [1, 4]})


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,224,224", "mask=2"]) == {"x": [1, 3, 224, 224], "mask": [2]}
    for bad in ["x", "=1,2", "x=1,a", "x="]:
        with pytest.raises(InputDataError, match="bad --input-shape"):
            parse_input_shapes([bad])


def test_npz_inputs(tmp_path, linear):
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    feeds = load_inputs(tmp_path / "in.npz", linear)
    np.testing.assert_array_equal(feeds["x"], x)
    result = verify(linear, _perturbed(linear, 0, 1e-3), inputs=tmp_path / "in.npz")
    assert result.input_source == f"inputs from {tmp_path / 'in.npz'}"
    assert result.outputs[0].shape == (3, 5)
    # The difference is exactly what the perturbation does on *these* inputs.
    assert result.outputs[0].max_abs == pytest.approx(float(np.abs(x.sum(axis=1)).max()) * 1e-3, rel=1e-3)


def test_npz_values_are_cast_to_the_input_type(tmp_path, linear):
    np.savez(tmp_path / "in.npz", x=np.ones((2, 4), np.float64))
    assert load_inputs(tmp_path / "in.npz", linear)["x"].dtype == np.float32


def test_npz_with_wrong_names(tmp_path, linear):
    np.savez(tmp_path / "in.npz", input=np.ones((2, 4), np.float32))
    with pytest.raises(InputDataError, match=r"missing \['x'\], unexpected \['input'\]; model inputs are \['x'\]") as info:
        verify(linear, linear, inputs=tmp_path / "in.npz")
    assert info.value.exit_code == 11


@pytest.mark.parametrize("shape", [(2, 3), (2, 4, 1), (4,)])
def test_npz_with_wrong_shape(tmp_path, linear, shape):
    np.savez(tmp_path / "in.npz", x=np.ones(shape, np.float32))
    with pytest.raises(InputDataError, match=re.escape(f"x has shape {list(shape)}, model expects ['N', 4]")):
        verify(linear, linear, inputs=tmp_path / "in.npz")


def test_unreadable_npz(tmp_path, linear):
    (tmp_path / "in.npz").write_text("not an archive")
    with pytest.raises(InputDataError, match="cannot read inputs"):
        verify(linear, linear, inputs=tmp_path / "in.npz")
    with pytest.raises(InputDataError, match="no such file"):
        verify(linear, linear, inputs=tmp_path / "missing.npz")


# --------------------------------------------------------------------------- comparison
def test_a_changed_model_fails_with_the_output_listed(linear):
    changed = _perturbed(linear, 2, 0.5)
    result = verify(linear, changed, input_shapes={"x": [16, 4]})
    assert not result.passed
    assert len(result.failures) == 1 and result.failures[0].startswith("y: max abs error")
    assert result.outputs[0].max_abs > 0.1
    assert "FAILED" in result.format() and "y [16, 5]" in result.format()
    assert result.to_dict()["passed"] is False and result.to_dict()["failures"] == result.failures
    # The same change passes when the tolerance is loose enough to hide it.
    assert verify(linear, changed, input_shapes={"x": [16, 4]}, atol=10.0).passed


def test_identical_models_agree_perfectly(linear):
    result = verify(linear, linear, input_shapes={"x": [32, 4]})
    (out,) = result.outputs
    assert result.passed and result.failures == []
    assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert out.top1_agreement == 1.0
    assert "PASSED" in result.format() and "top-1 agreement 100.0%" in result.format()


def test_top1_and_cosine_on_hand_made_outputs():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    cand = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    cmp = compare_outputs("y", ref, cand)
    assert cmp.top1_agreement == 0.5
    assert cmp.cosine == pytest.approx(24.0 / 28.0)  # (14 + 10) / (sqrt(28) * sqrt(28))
    assert cmp.max_abs == 2.0 and cmp.max_rel == pytest.approx(2.0 / 3.0)
    negated = compare_outputs("y", ref, -ref)
    assert negated.cosine == pytest.approx(-1.0) and negated.top1_agreement == 0.0
    vector = compare_outputs("v", np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert vector.top1_agreement is None and vector.cosine == pytest.approx(1.0)
    zeros = compare_outputs("z", np.zeros(3), np.zeros(3))
    assert zeros.cosine == 1.0 and zeros.max_rel == 0.0
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs("y", ref, ref[:1])


def test_perturbation_lowers_top1_agreement(linear):
    # Shifting one logit column by a lot makes it the argmax of most rows.
    result = verify(linear, _perturbed(linear, 4, 50.0), input_shapes={"x": [64, 4]})
    (out,) = result.outputs
    assert out.top1_agreement is not None and out.top1_agreement < 0.8
    assert out.cosine < 0.99


def test_optimized_model_that_lost_an_output(linear):
    renamed = onnx.ModelProto()
    renamed.CopyFrom(linear)
    renamed.graph.node[-1].output[0] = "z"
    renamed.graph.output[0].name = "z"
    with pytest.raises(VerificationError, match=r"optimized model lost output\(s\) \['y'\]"):
        verify(linear, renamed)


def test_runtime_failure_is_a_verification_error(linear):
    broken = onnx.ModelProto()
    broken.CopyFrom(linear)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(VerificationError, match="ONNX Runtime failed to run the models"):
        verify(linear, broken)


def test_run_uses_the_given_feeds(linear):
    x = np.eye(4, dtype=np.float32)
    w = numpy_helper.to_array(linear.graph.initializer[0])
    b = numpy_helper.to_array(linear.graph.initializer[1])
    np.testing.assert_allclose(run(linear, {"x": x})["y"], x @ w + b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- models users bring
def test_minus_one_and_symbolic_dims_get_the_documented_defaults():
    from onnxopt.verify import DEFAULT_BATCH, DEFAULT_DYNAMIC_DIM

    model = minus_one_conv_model()
    assert random_inputs(model)["x"].shape == (DEFAULT_BATCH, 3, DEFAULT_DYNAMIC_DIM, DEFAULT_DYNAMIC_DIM) == (1, 3, 32, 32)
    assert random_inputs(minus_one_conv_model("N", "S"))["x"].shape == (1, 3, 32, 32)
    assert random_inputs(model, {"x": [2, 3, 7, 9]})["x"].shape == (2, 3, 7, 9)
    result = verify(model, model)
    assert result.passed and result.status == "passed" and result.outputs[0].shape == (1, 4, 32, 32)


def test_a_symbol_shared_by_two_inputs_gets_one_size():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[B,S] ids, int64[B,S] mask) => (int64[B,S] y) {
          y = Add(ids, mask)
        }
        """
    )
    feeds = random_inputs(model)
    assert feeds["ids"].shape == feeds["mask"].shape == (1, 32)
    feeds = random_inputs(model, {"ids": [2, 5]})
    assert feeds["mask"].shape == (2, 5)  # the shape given for ids fixes B and S
    assert verify(model, model, input_shapes={"ids": [2, 5]}).passed


def test_negative_input_shape_is_refused():
    with pytest.raises(InputDataError, match="negative dimension"):
        random_inputs(minus_one_conv_model(), {"x": [-1, 3, 8, 8]})


def test_npz_inputs_take_any_size_where_the_model_dim_is_minus_one(tmp_path):
    model = minus_one_conv_model()
    x = np.random.default_rng(0).standard_normal((3, 3, 10, 6)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert load_inputs(tmp_path / "in.npz", model)["x"].shape == (3, 3, 10, 6)
    result = verify(model, model, inputs=tmp_path / "in.npz")
    assert result.passed and result.outputs[0].shape == (3, 4, 10, 6)
    np.savez(tmp_path / "bad.npz", x=x[:, :2])  # the channel dim is static: still checked
    with pytest.raises(InputDataError, match=re.escape("x has shape [3, 2, 10, 6], model expects ['?', 3, '?', '?']")):
        load_inputs(tmp_path / "bad.npz", model)


def test_original_failing_on_random_inputs_makes_verification_not_possible(tmp_path):
    model = reflect_pad_model()
    result = verify(model, model)
    assert result.status == "not possible" and not result.possible and not result.passed
    assert result.outputs == [] and result.failures == []
    assert "Pad" in result.reason and "x=[1, 32]" in result.reason and "--inputs" in result.reason
    assert "NOT POSSIBLE" in result.format() and "FAILED" not in result.format()
    assert result.to_dict()["status"] == "not possible" and result.to_dict()["reason"] == result.reason
    # long enough random signals verify normally
    assert verify(model, model, input_shapes={"x": [1, REFLECT_PAD + 10]}).status == "passed"
    # the user's own inputs failing on the original is an error, not "not possible"
    np.savez(tmp_path / "short.npz", x=np.ones((1, 8), np.float32))
    with pytest.raises(InputDataError, match="failed to run the original model on inputs from"):
        verify(model, model, inputs=tmp_path / "short.npz")


def test_repeated_node_names_run_in_ort_as_a_renamed_copy():
    model = duplicate_names_model()
    assert len({n.name for n in model.graph.node}) == 1
    result = verify(model, model)
    assert result.passed and result.outputs[0].max_abs == 0.0
    assert len({n.name for n in model.graph.node}) == 1  # the caller's model is untouched
