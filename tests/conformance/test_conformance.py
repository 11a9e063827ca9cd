"""onnxopt's default pipeline on the ONNX backend test models (``bench/conformance.py``).

Each model goes through ``onnxopt.optimize``; the output must pass ``onnx.checker`` (full
check), load in ONNX Runtime and reproduce the expected outputs of the backend test within
its tolerance. The default run checks a fast, diverse subset with the category each model
must get; the whole set (about 2000 models, minutes) runs with ``pytest -m conformance``.
"""

from __future__ import annotations

import warnings

import onnx
import pytest

from bench import conformance
from bench.conformance import FAILURES, OK, ORT_FAILS, REFUSED

#: Models failing today for a reason already being fixed elsewhere; the lead removes entries
#: as the fixes land.  The fast subset marks them xfail; the whole-set test reports them.
KNOWN_FAILURES: dict[str, str] = {}  # model -> reason, for failures being fixed (xfail, not strict)

OPSET6 = REFUSED  # the pytorch-* folders are mostly opset 6, below the supported range
#: ``ok`` and fewer nodes: the ``*_expanded`` node cases are function bodies with Constant
#: nodes (shapes, epsilons, axes) that the default pipeline folds.
FOLDED = "ok, fewer nodes"
#: The fast subset: model -> the category it must get.
FAST = {
    "simple/test_single_relu_model": OK,
    "simple/test_expand_shape_model1": OK,
    "simple/test_expand_shape_model3": OK,
    "simple/test_sequence_model1": OK,
    "simple/test_sequence_model4": OK,
    "simple/test_sequence_model7": OK,
    "simple/test_shrink": OK,
    "simple/test_sign_model": OK,
    "simple/test_strnorm_model_nostopwords_nochangecase": OK,
    "simple/test_gradient_of_add": ORT_FAILS,  # ai.onnx.preview.training:Gradient
    "pytorch-converted/test_MaxPool1d_stride_padding_dilation": OK,
    "pytorch-converted/test_MaxPool2d_stride_padding_dilation": OK,
    "pytorch-converted/test_Conv2d": OPSET6,
    "pytorch-converted/test_BatchNorm2d_eval": OPSET6,
    "pytorch-converted/test_PixelShuffle": OK,
    "pytorch-operator/test_operator_conv": OPSET6,
    "pytorch-operator/test_operator_repeat": OK,
    "pytorch-operator/test_operator_repeat_dim_overflow": OK,
    "light/light_squeezenet": OK,
    "light/light_zfnet512": OK,
    "node/conv/test_conv_with_strides_and_asymmetric_padding": OK,
    "node/batch_normalization/test_batchnorm_epsilon": OK,
    "node/gemm/test_gemm_all_attributes": OK,
    "node/matmul/test_matmul_3d": OK,
    "node/reshape/test_reshape_negative_dim": OK,
    "node/constant/test_constant": FOLDED,
    "node/constantofshape/test_constantofshape_float_ones": OK,
    "node/if_/test_if_seq": OK,
    "node/loop/test_loop11": OK,
    "node/loop/test_loop16_seq_none": REFUSED,  # optional type inside the body: graphsurgeon cannot export it
    "node/scan/test_scan9_sum": OK,
    "node/qlinearmatmul/test_qlinearmatmul_3D_int8_float32": OK,
    "node/qlinearconv/test_qlinearconv": OK,
    "node/resize/test_resize_downsample_scales_linear": OK,
    "node/slice/test_slice_default_steps": OK,
    "node/split/test_split_equal_parts_1d_opset18": OK,
    "node/transpose/test_transpose_all_permutations_3": OK,
    "node/cast/test_cast_DOUBLE_to_FLOAT16": OK,
    "node/splittosequence/test_split_to_sequence_1": OK,
    "node/sequence_map/test_sequence_map_add_2_sequences_expanded": OK,
    "node/ai_onnx_ml.label_encoder/test_ai_onnx_ml_label_encoder_tensor_mapping": REFUSED,  # no ai.onnx opset
    "node/matmulinteger/test_matmulinteger": OK,
    "node/lstm/test_lstm_defaults": OK,
    "node/einsum/test_einsum_batch_matmul": OK,
    "node/topk/test_top_k_negative_axis": OK,
    "node/layernormalization/test_layer_normalization_2d_axis0_expanded": FOLDED,
    "node/rmsnormalization/test_rms_normalization_2d_axis0_expanded": FOLDED,
    "node/groupnormalization/test_group_normalization_example_expanded": FOLDED,
    "node/meanvariancenormalization/test_mvn_expanded": FOLDED,
    "node/attention/test_attention_3d_attn_mask_expanded": FOLDED,
    "node/rotaryembedding/test_rotary_embedding_expanded": FOLDED,
    "node/linear_attention/test_linear_attention_delta_expanded": FOLDED,
    "node/causal_conv_with_state/test_causal_conv_with_state_basic_expanded": FOLDED,
    "node/depthtospace/test_depthtospace_crd_mode_example_expanded": FOLDED,
    "node/spacetodepth/test_spacetodepth_example_expanded": FOLDED,
    "node/affinegrid/test_affine_grid_2d_expanded": FOLDED,
    "node/blackmanwindow/test_blackmanwindow_expanded": FOLDED,
    "node/center_crop_pad/test_center_crop_pad_crop_and_pad_expanded": FOLDED,
    "node/dynamicquantizelinear/test_dynamicquantizelinear_expanded": FOLDED,
    "node/gelu/test_gelu_tanh_1_expanded": FOLDED,
    "node/negativeloglikelihoodloss/test_nllloss_NCd1_ii_expanded": FOLDED,
    "node/softmax_cross_entropy_loss/test_sce_NCd1_mean_weight_negative_ii_expanded": FOLDED,
    "node/rangeop/test_range_float_type_positive_delta_expanded": FOLDED,
    "node/selu/test_selu_expanded_ver18": FOLDED,
    "node/logsoftmax/test_logsoftmax_axis_0_expanded": FOLDED,
    "node/reduce_log_sum_exp/test_reduce_log_sum_exp_default_axes_keepdims_random_expanded": FOLDED,
}


def _param(key: str):
    if key in KNOWN_FAILURES:
        return pytest.param(key, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[key], strict=False))
    return key


@pytest.mark.parametrize("key", [_param(k) for k in FAST])
def test_default_pipeline_on_backend_model(key: str) -> None:
    result = conformance.check_case(conformance.find_case(key), slow_seconds=None)
    assert result.category == (OK if FAST[key] == FOLDED else FAST[key]), result.reason
    if FAST[key] == FOLDED:
        assert result.nodes_after < result.nodes_before, "nothing was folded"


def test_fast_subset_spans_every_source_folder() -> None:
    # two of the smallest light_* CNNs (under a second each); the rest run in the whole-set
    # test and the benchmark
    assert {k.split("/")[0] for k in FAST} == set(conformance.FOLDERS)


@pytest.mark.conformance
@pytest.mark.parametrize("folder", conformance.FOLDERS)
def test_whole_folder(folder: str) -> None:
    """Every model of one source folder; known failures are reported as a warning, new ones fail."""
    results = conformance.run(conformance.folder_cases(folder), slow_seconds=None)
    failed = {r.key: f"{r.category}: {r.reason}" for r in results if r.category in FAILURES}
    known = {k: v for k, v in failed.items() if k in KNOWN_FAILURES}
    if known:
        warnings.warn(f"{len(known)} known failures in {folder}: {sorted(known)}", stacklevel=1)
    assert not {k: v for k, v in failed.items() if k not in KNOWN_FAILURES}


# --------------------------------------------------------------------------- the classification itself
RELU = "simple/test_single_relu_model"


def _classify_with(monkeypatch: pytest.MonkeyPatch, fake_optimize) -> conformance.Result:
    import onnxopt

    monkeypatch.setattr(onnxopt, "optimize", fake_optimize)
    return conformance.check_case(conformance.find_case(RELU), slow_seconds=None)


def _rewritten(op_type: str, inputs: list[str] | None = None):
    def optimize(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        node = out.graph.node[0]
        node.op_type = op_type
        if inputs is not None:
            node.input[:] = inputs
        return out, None

    return optimize


def test_changed_outputs_are_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _classify_with(monkeypatch, _rewritten("Neg"))  # Relu -> Neg
    assert result.category == conformance.WRONG and "Mismatched elements" in result.reason


def test_output_failing_the_checker_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _classify_with(monkeypatch, _rewritten("Relu", ["no_such_tensor"]))
    assert result.category == conformance.INVALID and result.reason.startswith("checker on the output")


def test_refusal_and_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxopt.errors import UnsupportedModelError

    def refuse(model):
        raise UnsupportedModelError("unsupported opset 6")

    def crash(model):
        raise KeyError("x")

    assert _classify_with(monkeypatch, refuse).category == conformance.REFUSED
    result = _classify_with(monkeypatch, crash)
    assert result.category == conformance.ERROR and result.reason == "KeyError: 'x'"


def test_unchanged_model_is_ok_and_slow_only_with_a_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _classify_with(monkeypatch, _rewritten("Relu")).category == OK
    import onnxopt

    monkeypatch.setattr(onnxopt, "optimize", _rewritten("Relu"))
    assert conformance.check_case(conformance.find_case(RELU), slow_seconds=0.0).category == conformance.SLOW
