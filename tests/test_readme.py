"""The README's Python API snippet runs as written on the bundled example model."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from onnxopt.demo import demo_model

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_api_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's Python API section"
    return match.group(1)


def test_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    onnx.save_model(demo_model(), "model.onnx")
    namespace: dict = {}
    exec(compile(_python_api_snippet(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"].passed
    ops = {node.op_type for node in namespace["expanded"].graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert Path("model.opt.onnx").is_file()
    assert "cosine" in capsys.readouterr().out
