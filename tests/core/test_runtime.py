"""onnxopt.runtime: one home for ORT sessions and sample inputs (verify re-exports them)."""

from __future__ import annotations

import importlib

import numpy as np

from onnxopt import runtime


def test_verify_reexports_the_runtime_names():
    verify = importlib.import_module("onnxopt.verify")
    for name in ("session", "run", "load_inputs", "random_inputs", "parse_input_shapes", "check_input_names", "is_dynamic"):
        assert getattr(verify, name) is getattr(runtime, name), name


def test_run_gives_the_demo_logits_for_random_inputs(demo):
    feeds = runtime.random_inputs(demo, {"input": [2, 3, 16, 16]})
    assert feeds["input"].shape == (2, 3, 16, 16) and feeds["input"].dtype == np.float32
    outputs = runtime.run(demo, feeds)
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (2, 10)
    assert np.isfinite(outputs["logits"]).all()
