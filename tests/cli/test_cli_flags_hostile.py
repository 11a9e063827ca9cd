"""Flag values a user types that used to be misread or silently ignored."""

from __future__ import annotations

import json

import onnx

from onnxopt.cli import main
from tests.conftest import ops


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_input_range_with_a_negative_low_as_a_separate_word(capsys, tmp_path, demo_path):
    """The README form ``--input-range -3,3`` (argparse alone reads -3,3 as an option)."""
    out = tmp_path / "q.onnx"
    code, _, err = _cli(capsys, demo_path, "-o", out, "--quantize", "w8a8", "--input-range", "-3,3", "-q")
    assert code == 0, err
    quantized = onnx.load(str(out))
    # With the input range the first Conv reads a quantized input too.
    first_conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert producers[first_conv.input[0]] == "DequantizeLinear"


def test_set_with_a_non_numeric_value_for_a_numeric_option_exit_7(capsys, tmp_path, demo_path):
    code, _, err = _cli(capsys, demo_path, "-o", tmp_path / "o.onnx", "--set", "max_constant_bytes=abc")
    assert code == 7 and "max_constant_bytes" in err and "must be an integer" in err
    assert not (tmp_path / "o.onnx").exists()


def test_empty_quantize_spec_exit_7(capsys, tmp_path, demo_path):
    code, _, err = _cli(capsys, demo_path, "-o", tmp_path / "o.onnx", "--quantize", "")
    assert code == 7 and "bad --quantize ''" in err
    assert not (tmp_path / "o.onnx").exists()


def test_report_to_standard_output(capsys, tmp_path, demo_path):
    code, out, err = _cli(capsys, demo_path, "-o", tmp_path / "o.onnx", "--report", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == str(tmp_path / "o.onnx")
    assert ops(onnx.load(str(tmp_path / "o.onnx")))["BatchNormalization"] < report["before"]["op_counts"]["BatchNormalization"]
    assert report["after"]["op_counts"].get("BatchNormalization", 0) == ops(onnx.load(str(tmp_path / "o.onnx")))["BatchNormalization"]


# --------------------------------------------------------------------------- sample data (exit 11)
def test_npy_inputs_for_a_single_input_model(capsys, tmp_path, demo_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    code, _, err = _cli(capsys, demo_path, "-o", tmp_path / "o.onnx", "--inputs", tmp_path / "x.npy")
    assert code == 0, err
    assert "verify (inputs from" in err and "PASSED" in err


def test_unusable_sample_data_is_exit_11_before_any_work(capsys, tmp_path, demo_path):
    import numpy as np

    np.savez(tmp_path / "i64.npz", input=np.zeros((1, 3, 16, 16), np.int64))
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (["--inputs", tmp_path / "i64.npz"], "has dtype int64, model expects float32"),
        (["--inputs", tmp_path / "missing.npz"], "no such file"),
        (["--inputs", tmp_path / "text.npz"], "cannot read inputs"),
        (["--inputs", tmp_path / "obj.npy"], "cannot read inputs"),
        (["--quantize", "w8a8", "--calibration-data", tmp_path / "empty.npz"], "missing ['input']"),
        (["--input-shape", "nope=1,3,8,8"], "unknown input(s) ['nope']"),
        (["--verify", "--input-shape", "input=-1,3,8,8"], "negative dimension"),
        (["--verify", "--input-shape", "input=1024,1024,1024,1024"], "give a smaller --input-shape"),
    ]
    for extra, fragment in cases:
        code, _, err = _cli(capsys, demo_path, "-o", tmp_path / "o.onnx", *extra)
        lines = err.strip().splitlines()
        assert code == 11 and len(lines) == 1 and fragment in lines[0], (extra, err)
        assert not (tmp_path / "o.onnx").exists()


def test_an_output_ort_cannot_load_is_exit_8_and_not_written(capsys, tmp_path, demo_path, monkeypatch):
    """The last line of defence before writing: ORT must load what onnxopt writes (when it
    loads the input)."""
    import importlib

    verify = importlib.import_module("onnxopt.verify")  # the package exports a function of that name
    real_session = verify.session

    def refuses_rewritten_models(model, **kwargs):
        if len(model.graph.node) < 20:  # the demo has 20 nodes; the optimized model fewer
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : simulated")
        return real_session(model, **kwargs)

    monkeypatch.setattr(verify, "session", refuses_rewritten_models)
    code, _, err = _cli(capsys, demo_path, "-o", tmp_path / "o.onnx")
    assert code == 8 and "ONNX Runtime cannot load" in err and "simulated" in err
    assert not (tmp_path / "o.onnx").exists()


def test_dynamic_fallback_flag_reaches_the_quantize_pass(capsys, tmp_path):
    """--dynamic-fallback on: a statistics-free Gemm is quantized dynamically (auto asks for data)."""
    import numpy as np

    from tests.conftest import text_model

    rng = np.random.default_rng(3)
    proto = text_model("(float[N,16] x) => (float[N,6] y)", ["y = Gemm <transB = 1> (x, w, b)"],
                       {"w": rng.standard_normal((6, 16)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)})
    onnx.save(proto, str(tmp_path / "g.onnx"))
    code, _, err = _cli(capsys, tmp_path / "g.onnx", "-o", tmp_path / "auto.onnx", "--quantize", "w8a8")
    assert code == 10 and "--calibration-data" in err
    code, _, err = _cli(capsys, tmp_path / "g.onnx", "-o", tmp_path / "on.onnx", "--quantize", "w8a8", "--dynamic-fallback", "on")
    assert code == 0, err
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in onnx.load(str(tmp_path / "on.onnx")).graph.node}
    code, _, err = _cli(capsys, tmp_path / "g.onnx", "-o", tmp_path / "x.onnx", "--dynamic-fallback", "on")
    assert code == 7 and "need --quantize" in err
