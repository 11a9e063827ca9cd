"""bench.hostile: the battery's own checks catch a violation and pass a clean case."""

from __future__ import annotations

from bench import hostile


def test_a_refused_target_is_clean_and_a_wrong_expectation_is_caught(tmp_path):
    refused = hostile.run_case(hostile.Case("refused", ["ext.onnx", "-o", "w.bin"], 6, fragment="external data file"), tmp_path)
    assert refused["clean"], refused["problems"]
    # the same run judged against a wrong expectation is reported, with the reason
    wrong = hostile.run_case(hostile.Case("wrong", ["in.onnx", "-o", "out.onnx", "-q"], 6), tmp_path)
    assert not wrong["clean"]
    assert "exit 0, expected 6" in wrong["problems"] and "unexpected files ['out.onnx']" in wrong["problems"]


def test_results_table(tmp_path):
    rows = [{"case": "c", "exit": 6, "expected_exit": 6, "clean": True, "problems": [], "message": "onnxopt: error: x | y"}]
    hostile.write_results(rows, tmp_path)
    text = (tmp_path / "hostile.md").read_text()
    assert "**1 tried, 1 clean, 0 wrong.**" in text and "x \\| y" in text
