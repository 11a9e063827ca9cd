"""The lossless default pipeline on every zoo model, through the command line.

``onnxopt <zoo model> -o out.onnx --verify --report r.json`` must succeed, leave the outputs
within float tolerance of the original (ORT, graph optimizations disabled), and fold every
BatchNormalization the zoo model's structure allows.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxopt.cli import main
from onnxopt.models.registry import REGISTRY

pytest.importorskip("torch")

#: BNs that no exact fold can remove (each sits between two activations, or before a
#: padded Conv behind an activation); every other BN of the zoo must be folded.
UNFOLDABLE_BN = {"preact_resnet": 3, "densenet": 6, "edge_bn_after_relu_conv": 1}


@pytest.mark.parametrize("name", sorted(REGISTRY), ids=str)
def test_default_pipeline_verifies_on_zoo_model(name: str, zoo_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxopt.models.build import build_zoo_model

    source = build_zoo_model(name, zoo_cache)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main([str(source), "-o", str(out), "--verify", "--report", str(report_path)]) == 0
    table = capsys.readouterr().err
    assert "verify" in table and "PASSED" in table

    report = json.loads(report_path.read_text())
    verification = report["verification"]
    assert verification["passed"]
    assert all(o["max_rel"] < 1e-5 and o["cosine"] > 0.999999 for o in verification["outputs"])

    before = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(source)).graph.node)
    after = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    assert after == UNFOLDABLE_BN.get(name, 0), f"{name}: {before} BN -> {after}"
    folding = next(p for p in report["passes"] if p["name"] == "fold-batchnorm")
    assert folding["stats"]["bn_folded"] == before - after
    assert len(folding["refusals"]) == after
