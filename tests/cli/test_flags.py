"""The compression flags compose one pipeline in the canonical order."""

from __future__ import annotations

import pytest

from onnxopt.cli import build_parser
from onnxopt.errors import PipelineError
from onnxopt.flags import pipeline_from_flags
from onnxopt.passes import builtin_registry
from onnxopt.passes import BUILTIN_PRESETS

DEFAULT = next(p.steps for p in BUILTIN_PRESETS if p.name == "default")


def compose(*flags: str, base=DEFAULT):
    registry = builtin_registry()
    return pipeline_from_flags(base, build_parser(registry).parse_args(["m.onnx", "-o", "o.onnx", *flags]), registry)


def test_no_flag_keeps_the_base():
    assert compose() == (list(DEFAULT), {})


def test_prune_quantize_and_modular_go_in_canonical_order():
    names, options = compose("--modular-accumulator", "auto", "--quantize", "w4a8", "--prune", "red", "--prune-alpha", "0.1")
    assert names[: len(DEFAULT) - 1] == list(DEFAULT[:-1])
    assert names[len(DEFAULT) - 1 :] == ["hash-weights", "merge-neurons", "decompose-depthwise", "quantize", "modular-accumulator", "eliminate-dead"]
    assert options == {"weight_bits": 4, "act_bits": 8, "alpha": 0.1, "accumulator_bits": "auto"}


def test_power_quant_replaces_quantize_of_the_base():
    names, options = compose("--quantize", "w6a8", "--power-quant", "0.5", base=(*DEFAULT[:-1], "quantize", "eliminate-dead"))
    assert "quantize" not in names and names[-2:] == ["power-quant", "eliminate-dead"]
    assert options["power_exponent"] == 0.5 and options["weight_bits"] == 6


def test_rex_budget_forms_and_errors():
    for spec in ("0.5", "50", "50%"):
        names, options = compose("--quantize", "w4a8", "--rex", "2", "--rex-budget", spec)
        assert options["rex_budget"] == 0.5 and names[-3:] == ["quantize", "rex", "eliminate-dead"]
    with pytest.raises(PipelineError, match="need --quantize"):
        compose("--rex", "2")
    with pytest.raises(PipelineError, match="need --rex K"):
        compose("--quantize", "w4a8", "--rex-budget", "0.3")
    _, options = compose("--quantize", "w4a8", "--rex", "2", "--rex-allocation", "uniform", "--rex-combine", "gather")
    assert options["rex_allocation"] == "uniform" and options["rex_combine"] == "gather"
    with pytest.raises(PipelineError, match="need --rex K"):
        compose("--quantize", "w4a8", "--rex-allocation", "network")


def test_flag_dependencies_are_errors():
    with pytest.raises(PipelineError, match="--prune-alpha needs --prune"):
        compose("--prune-alpha", "0.2")
    with pytest.raises(PipelineError, match=r"\[0, 1\]"):
        compose("--prune", "red", "--prune-alpha", "2")
    with pytest.raises(PipelineError, match="--power-quant needs --quantize"):
        compose("--power-quant")
    with pytest.raises(PipelineError, match="need --quantize"):
        compose("--spiq")


def test_a_family_registered_elsewhere_brings_its_flags_and_its_place_in_the_order() -> None:
    """A pass family outside onnxopt declares its stage and flags; the kernel has no list of
    pass names: ``--smooth`` inserts its pass after pruning and before quantization."""
    import argparse

    from onnxopt.flags import FlagFamily
    from onnxopt.pass_base import Pass, PassResult, Stage

    class Smooth(Pass):
        name = "smooth"
        summary = "a third-party pass"
        stage = Stage.PRUNE
        runs_after = frozenset({"prune"})

        def call(self, graph, ctx):
            return PassResult(False)

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument_group("smoothing").add_argument("--smooth", action="store_true")

    registry = builtin_registry()
    registry.register(Smooth)
    registry.add_flags(FlagFamily("smooth", add, lambda args: ({}, ["smooth"] if args.smooth else [])))
    parser = build_parser(registry)
    base = list(registry.preset("default").steps)
    names, _ = pipeline_from_flags(base, parser.parse_args(["m.onnx", "-o", "o.onnx", "--smooth", "--prune", "red", "--quantize", "w8a8"]), registry)
    assert names == [*base[:-1], "hash-weights", "merge-neurons", "decompose-depthwise", "smooth", "quantize", "eliminate-dead"]
    assert "--smooth" in parser.format_help()


def test_fusion_check_flags_reach_the_quantize_options():
    names, options = compose("--quantize", "w8a8", "--no-check-fusion", "--no-unfused-conv-float")
    assert "quantize" in names and options["check_fusion"] is False and options["unfused_conv_to_float"] is False
    assert compose("--quantize", "w8a8", "--unfused-conv-float")[1]["unfused_conv_to_float"] is True
    assert not {"check_fusion", "unfused_conv_to_float"} & set(compose("--quantize", "w8a8")[1])  # the pass defaults: True, True
    assert compose("--quantize", "w8a8", "--no-float-depthwise-before-float")[1]["float_depthwise_before_float"] is False
    assert "float_depthwise_before_float" not in compose("--quantize", "w8a8")[1]  # the pass default: True
    with pytest.raises(PipelineError, match="--no-check-fusion need --quantize"):
        compose("--no-check-fusion")
