"""Typed pass options: built and checked when the pipeline is assembled, before any pass runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import PipelineError
from onnxopt.passes import builtin_registry
from onnxopt.passes.quantize import QuantizeOptions


def built(name: str, **options):
    return builtin_registry().get(name)(**options).options


def test_options_are_frozen_dataclasses_readable_both_ways() -> None:
    options = built("quantize", weight_bits=4)
    assert isinstance(options, QuantizeOptions)
    assert options.weight_bits == options["weight_bits"] == 4 and options.act_bits == 8
    assert dict(options)["spiq"] == "auto" and len(options) == len(QuantizeOptions.defaults())
    with pytest.raises(AttributeError):
        options.weight_bits = 8  # type: ignore[misc]


def test_values_are_coerced_to_the_declared_types() -> None:
    assert built("quantize", input_range=[-3, 3]).input_range == (-3.0, 3.0)
    assert isinstance(built("rex", rex_budget=1).rex_budget, float)
    assert built("quantize", weight_bits=8.0).weight_bits == 8 and isinstance(built("quantize", weight_bits=8.0).weight_bits, int)
    assert built("weight-only", keep_8bit=["lm_head"]).keep_8bit == ("lm_head",)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("quantize", {"weight_bits": "8"}, r"option weight_bits \(--quantize\) of pass quantize must be an integer, got '8'"),
        ("quantize", {"weight_bits": 9}, r"option weight_bits \(--quantize\) of pass quantize must be an integer in 2..8, got 9"),
        ("quantize", {"dynamic_fallback": 1}, r"dynamic_fallback \(--dynamic-fallback\) of pass quantize must be true, false, 'auto' or 'all', got 1"),
        ("quantize", {"lam": float("nan")}, r"option lam \(--lambda\) of pass quantize must be a finite number or None"),
        ("quantize", {"act_ranges": "minmax"}, r"option act_ranges \(--act-ranges\) of pass quantize 'minmax' needs calibration data"),
        ("rex", {"rex_budget": 3.0}, r"option rex_budget \(--rex-budget\) of pass rex must be a fraction in \[0, K−1\]"),
        ("rex", {"rex_combine": "pad"}, r"rex_combine \(--rex-combine\) of pass rex 'pad' expands a contiguous window"),
        ("merge-neurons", {"alpha": 2}, r"option alpha of pass merge-neurons must be in \[0, 1\], got 2.0"),
        ("weight-only", {"block_size": 48}, r"option block_size \(--block-size\) of pass weight-only must be one of 16, 32"),
        ("modular-accumulator", {"accumulator_bits": 40}, r"accumulator_bits \(--modular-accumulator\) of pass modular-accumulator must be an integer in 2\.\."),
        ("fold-constants", {"max_constant_bytes": "big"}, r"option max_constant_bytes of pass fold-constants must be an integer"),
        ("quantize", {"no_such_option": 1}, r"option\(s\) no_such_option not used by any pass of the pipeline \(quantize\)"),
    ],
)
def test_a_bad_value_fails_when_the_pipeline_is_built(name: str, options: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        builtin_registry().build([name], options)


def test_bool_and_int_are_not_confused_in_choices() -> None:
    assert built("rex", rex_outliers=True, rex_weight_only=4).rex_outliers is True
    assert built("rex", rex_outliers=3, rex_weight_only=4).rex_outliers == 3
    assert built("quantize", dynamic_fallback=True).dynamic_fallback is True
    with pytest.raises(PipelineError, match="spiq"):
        built("quantize", spiq=1)


def _conv_model(path: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cli_set_value_fails_before_any_pass_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --set value of the last pass stops the run before the first pass (nothing
    written, exit 7, one line naming the option and its flag)."""
    model = _conv_model(tmp_path / "m.onnx")
    code = main([str(model), "-o", str(tmp_path / "out.onnx"), "--quantize", "w8a8", "--rex", "2", "--set", "rex_budget=abc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 7 and not (tmp_path / "out.onnx").exists()
    assert err == ["onnxopt: error: option rex_budget (--rex-budget) of pass rex must be a finite number, got 'abc'"]


def test_python_api_keyword_options_keep_working(tmp_path: Path) -> None:
    model = _conv_model(tmp_path / "m.onnx")
    with pytest.raises(PipelineError, match="option rex_order \\(--rex\\) of pass rex must be an integer K ≥ 1"):
        onnxopt.optimize(model, preset="rex", rex_order=0)
