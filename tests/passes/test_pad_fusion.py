"""fuse-pad-conv: a zero spatial Pad folded into the Conv's pads, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_equivalent, ops, run_passes, text_model

RNG = np.random.default_rng(21)


def pad_conv(pads: list[int], *, mode: str = "constant", value: float | None = None, conv_attrs: str = "pads = [1, 0, 1, 0]",
             extra_body: tuple[str, ...] = (), outputs: str = "float[1,4,H,W] y"):
    arrays = {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "b": RNG.standard_normal(4).astype(np.float32),
              "pads": np.array(pads, np.int64)}
    inputs = "x, pads"
    if value is not None:
        arrays["value"] = np.array(value, np.float32)
        inputs += ", value"
    body = [f'p = Pad <mode = "{mode}"> ({inputs})', f"y = Conv <{conv_attrs}> (p, w, b)", *extra_body]
    return text_model(f"(float[1,3,9,9] x) => ({outputs})", body, arrays)


def test_asymmetric_zero_pad_is_folded_into_the_conv_pads() -> None:
    proto = pad_conv([0, 0, 0, 1, 0, 0, 2, 1])
    optimized, report = run_passes(proto, "fuse-pad-conv")
    assert report.passes[0].stats == {"pads_fused": 1}
    assert ops(optimized) == {"Conv": 1}
    conv = optimized.graph.node[0]
    assert [a.ints for a in conv.attribute if a.name == "pads"] == [[1, 1, 3, 1]]
    assert_equivalent(proto, optimized)


def test_explicit_zero_value_is_folded_too() -> None:
    proto = pad_conv([0, 0, 1, 1, 0, 0, 1, 1], value=0.0, conv_attrs="strides = [2, 2]")
    optimized, report = run_passes(proto, "fuse-pad-conv")
    assert report.passes[0].stats == {"pads_fused": 1} and ops(optimized) == {"Conv": 1}
    assert_equivalent(proto, optimized)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"}, "mode reflect is not zero padding"),
        ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 1.5}, "padding value is not a constant 0"),
        ({"pads": [0, 1, 1, 1, 0, 0, 1, 1]}, "pads the batch or channel axis"),
        ({"pads": [0, 0, -1, 0, 0, 0, 1, 1]}, "negative pads"),
        ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "conv_attrs": 'auto_pad = "SAME_UPPER"'}, "uses auto_pad"),
        (
            {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "extra_body": ("r = Relu(p)",), "outputs": "float[1,4,H,W] y, float[1,3,H2,W2] r"},
            "not read by exactly one Conv",
        ),
        ({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "outputs": "float[1,4,H,W] y, float[1,3,H2,W2] p"}, "graph output"),
    ],
)
def test_refusals(kwargs: dict, reason: str) -> None:
    pads = kwargs.pop("pads")
    proto = pad_conv(pads, **kwargs)
    optimized, report = run_passes(proto, "fuse-pad-conv")
    result = report.passes[0]
    assert result.stats == {"pads_fused": 0} and not result.modified
    assert len(result.refusals) == 1 and reason in result.refusals[0].reason
    assert ops(optimized)["Pad"] == 1
