"""bench.third_party: the per-model core on a tiny BN-folded torch export, and the If wrapper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bench import third_party
from bench.common import Timing
from onnxopt.verify import session

torch = pytest.importorskip("torch")


def tiny_net() -> "torch.nn.Module":
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5),
    )
    for bn in (net[1], net[4]):  # non-trivial statistics, folded away by the export
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def samples(tmp_path, rng) -> third_party.Samples:
    calibration = rng.standard_normal((10, 3, 16, 16)).astype(np.float32)
    npz = tmp_path / "cal.npz"
    np.savez(npz, input=calibration)
    inputs = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    return third_party.Samples({"input": calibration}, npz, [], inputs, np.zeros(12, np.int64), ["center"] * 12, "12 random inputs")


def test_bench_model_row_on_a_tiny_bn_folded_export(tmp_path):
    src = third_party.export_plain(tiny_net(), (3, 16, 16), tmp_path / "tiny.onnx", opset=11, dynamic=True)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
    row = third_party.bench_model(src, samples(tmp_path, np.random.default_rng(0)), Timing(1, 2, 2, 0.0), tmp_path, "tiny")

    assert row["opset"] == 11 and row["batch"] == "batch" and row["errors"] == []
    ours, ort = row["onnxopt"], row["ort_static"]
    assert ours["exit_code"] == 0 and ort["exit_code"] == 0
    # 2 Convs + the Gemm, all with constant weights, quantized by both tools
    assert ours["coverage"] == {"layers": 3, "quantized": 3, "share": 1.0, "layers_in_output": 3, "layers_in_subgraphs": 0}
    assert ours["report_coverage"]["done"] == ours["report_coverage"]["total"] == 3
    assert ort["coverage"]["quantized"] == 3
    # quantize_static's per-channel QDQ of the opset-11 file does not load; measured after an upgrade to 13
    assert ort["converted_from_opset"] == 11 and "DequantizeLinear" in ort["failed_attempt"]["load_error"] and "load_error" not in ort
    assert any("opset 11" in note for note in ours["notes"])
    assert 0 < ours["total_seconds"] <= ours["wall_seconds"] and 0 < ort["call_seconds"] <= ort["wall_seconds"]
    assert ours["calibration"]["calibration_samples"] == 10
    # no BN statistics and no data: exit 10, the flag named, nothing written
    assert row["no_data"]["exit_code"] == 10 and row["no_data"]["names_flag"] and not row["no_data"]["wrote_output"]
    fid = row["fidelity"]
    assert fid["fp32"]["top1_agreement"] == 1.0 and fid["fp32"]["kl_mean"] == 0.0
    for key in ("onnxopt", "ort_static"):
        assert fid[key]["inputs"] == 12 and 0.0 <= fid[key]["kl_mean"] < 0.05 and fid[key]["cosine_mean"] > 0.99
    for threads in ("1", "2"):
        stats = row["latency"][threads]["stats"]
        assert set(stats) == {"fp32", "onnxopt", "ort_static"} and all(s["runs"] == 2 and s["median_ms"] > 0 for s in stats.values())

    goals = third_party.evaluate_goals([{**row, "case": "tiny"}], None)
    assert [g["met"] for g in goals][0] is True and goals[-1]["met"] is None  # coverage met; no BN-preserved row
    text = third_party.render_markdown({"environment": {"date": "d", "cpus_usable": 2, "git_commit": "c", "git_dirty_files": []},
                                        "rows": [{**row, "case": "tiny"}], "goals": goals, "command": "x", "seconds": 1.0,
                                        "settings": {"quick": True}, "load_average_start": None, "bn_preserved": None})
    assert "| tiny | 3/3 (100%) | 3/3 | 3/3 (100%) |" in text


def test_wrap_in_if_keeps_the_outputs(tmp_path):
    src = third_party.export_plain(tiny_net(), (3, 16, 16), tmp_path / "tiny.onnx", opset=17, dynamic=True)
    wrapped = third_party.wrap_in_if(src, tmp_path / "tiny_if.onnx")
    model = onnx.load(str(wrapped))
    assert [n.op_type for n in model.graph.node] == ["ReduceMax", "Greater", "If"]
    assert third_party.layer_counts(model) == {"layers": 6, "quantized": 0, "in_subgraphs": 6}  # 3 layers x 2 branches
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = session(onnx.load(str(src))).run(None, {"input": x})[0]
    np.testing.assert_allclose(session(model).run(None, {"input": x})[0], expected, rtol=1e-6, atol=1e-6)
