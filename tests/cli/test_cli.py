"""The onnxopt command: outputs, report, flags, and one clear line + exit code per bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.cli import main
from onnxopt.demo import demo_model
from onnxopt.io import load_model
from onnxopt.passes import builtin_registry
from tests.conftest import CLASSIC, assert_equivalent, ops
from tests.user_models import REFLECT_PAD, duplicate_names_model, minus_one_conv_model, reflect_pad_model

PASSES = ",".join(CLASSIC)
ONNXOPT = Path(sys.executable).with_name("onnxopt")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- happy paths
def test_optimize_writes_the_model_and_prints_the_table(capsys, tmp_path, demo, demo_path):
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, demo_path, "-o", out, "--passes", PASSES)
    assert code == 0 and stdout == ""
    optimized = load_model(out)
    assert ops(optimized)["BatchNormalization"] == 1 and ops(optimized)["Identity"] == 0
    assert_equivalent(demo, optimized)
    lines = err.splitlines()
    assert lines[0].split()[:2] == ["pass", "time"]
    for name in CLASSIC:
        assert any(line.startswith(name) for line in lines), name
    assert any(line.startswith("total") and "20->12" in line for line in lines)
    assert "-3 BatchNormalization" in err
    assert lines[-1] == f"onnxopt: wrote {out}"


def test_quiet_prints_nothing(capsys, tmp_path, demo_path):
    code, stdout, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--passes", PASSES, "-q")
    assert code == 0 and stdout == "" and err == ""
    assert (tmp_path / "out.onnx").exists()


def test_report_json(capsys, tmp_path, demo_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, _ = cli(capsys, demo_path, "-o", out, "--passes", PASSES, "--report", report)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["input"] == str(demo_path) and data["output"] == str(out)
    assert [p["name"] for p in data["passes"]] == list(CLASSIC)
    assert data["before"]["nodes"] == 20 and data["after"]["nodes"] == 12
    assert data["after"]["nodes"] == len(load_model(out).graph.node)
    folded = {p["name"]: p for p in data["passes"]}["fold-conv-bn"]
    assert folded["stats"] == {"bn_folded": 3, "bn_kept": 1} and folded["modified"] is True
    assert data["verification"] is None and data["lossless"] is True


def test_report_with_verify(capsys, tmp_path, demo_path):
    report = tmp_path / "report.json"
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--passes", PASSES, "--verify", "--report", report)
    assert code == 0
    verification = json.loads(report.read_text())["verification"]
    assert verification["passed"] is True and verification["failures"] == []
    (logits,) = verification["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [1, 10]
    assert logits["max_rel"] < 1e-5 and logits["top1_agreement"] == 1.0
    assert "PASSED" in err


def test_list_passes(capsys):
    code, stdout, _ = cli(capsys, "--list-passes")
    assert code == 0
    registry = builtin_registry()
    pass_section = stdout.split("presets:")[0]  # a preset may share a pass's name (quantize)
    for cls in registry.passes():
        (line,) = [line for line in pass_section.splitlines() if line.split() and line.split()[0] == cls.name]
        assert cls.summary in line
    for preset in registry.presets():
        assert preset.description in stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnxopt {onnxopt.__version__}"


def test_demo(capsys, tmp_path):
    out = tmp_path / "demo.opt.onnx"
    code, _, err = cli(capsys, "--demo", "-o", out, "--passes", PASSES, "--verify")
    assert code == 0
    assert "verify (random inputs, seed 0" in err and "PASSED" in err
    assert ops(load_model(out))["BatchNormalization"] == 1  # classic passes: the BN after the Add stays
    assert_equivalent(demo_model(), load_model(out))


def test_save_demo(capsys, tmp_path):
    path = tmp_path / "example.onnx"
    code, _, err = cli(capsys, "--save-demo", path)
    assert code == 0 and f"wrote the example model to {path}" in err
    assert load_model(path).SerializeToString() == demo_model().SerializeToString()


def test_dry_run_writes_nothing(capsys, tmp_path, demo_path):
    out, before = tmp_path / "out.onnx", sorted(os.listdir(tmp_path))
    code, _, err = cli(capsys, demo_path, "-o", out, "--passes", PASSES, "--dry-run")
    assert code == 0 and "fold-conv-bn" in err and "wrote" not in err
    assert sorted(os.listdir(tmp_path)) == before
    code, _, err = cli(capsys, demo_path, "--dry-run", "--passes", PASSES)  # -o is optional then
    assert code == 0 and sorted(os.listdir(tmp_path)) == before


def test_verify_with_input_shape(capsys, tmp_path, demo_path):
    report = tmp_path / "r.json"
    code, _, err = cli(
        capsys, demo_path, "--dry-run", "--passes", PASSES, "--verify", "--input-shape", "input=3,3,16,16", "--report", report
    )
    assert code == 0, err
    (logits,) = json.loads(report.read_text())["verification"]["outputs"]
    assert logits["shape"] == [3, 10]
    assert "logits [3, 10]" in err


def test_verify_with_npz_inputs(capsys, tmp_path, demo_path):
    inputs, report = tmp_path / "in.npz", tmp_path / "r.json"
    np.savez(inputs, input=np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32))
    code, _, err = cli(capsys, demo_path, "--dry-run", "--passes", PASSES, "--inputs", inputs, "--report", report)
    assert code == 0, err
    verification = json.loads(report.read_text())["verification"]
    assert verification["inputs"] == f"inputs from {inputs}"
    assert verification["outputs"][0]["shape"] == [2, 10] and verification["passed"] is True


def test_failed_lossless_verification_writes_no_model(capsys, tmp_path, demo_path):
    # Folding BN moves float rounding (~1e-7); zero tolerance makes that a failure.
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, demo_path, "-o", out, "--passes", PASSES, "--verify", "--atol", "0", "--rtol", "0")
    assert code == 9
    assert "FAILED" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("onnxopt: error: lossless pipeline changed the outputs beyond tolerance (logits:")
    assert "the output was not written" in err
    assert not out.exists()


def test_a_pass_that_breaks_the_graph_exits_8_and_writes_nothing(capsys, tmp_path, demo_path, monkeypatch):
    """Without --validate the final model is still checked (onnx.checker full_check)."""
    import onnx_graphsurgeon as gs

    from onnxopt.pass_base import PassResult
    from onnxopt.passes.cleanup import EliminateIdentity

    def dangling(self, graph, ctx):
        graph.nodes[0].inputs[0] = gs.Variable("ghost", dtype=np.float32, shape=[1])
        return PassResult(True)

    monkeypatch.setattr(EliminateIdentity, "call", dangling)
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, demo_path, "-o", out, "--passes", "eliminate-identity", "-q")
    assert code == 8
    assert_one_error_line(err, "final check: pass eliminate-identity produced an invalid model", "ghost")
    assert not out.exists()


def test_external_data_always(capsys, tmp_path, demo, demo_path):
    out = tmp_path / "out.onnx"
    code, _, _ = cli(capsys, demo_path, "-o", out, "--passes", "eliminate-identity", "--external-data", "always")
    assert code == 0 and (tmp_path / "out.onnx.data").exists()
    assert_equivalent(demo, load_model(out))


def test_set_option_reaches_the_pass(capsys, tmp_path, demo_path):
    report = tmp_path / "r.json"
    # Folding the Reshape target would create a 16-byte constant: a 1-byte limit keeps it.
    code, _, _ = cli(capsys, demo_path, "--dry-run", "--passes", "fold-constants", "--set", "max_constant_bytes=1", "--report", report)
    assert code == 0
    (entry,) = json.loads(report.read_text())["passes"]
    assert entry["ops_removed"].get("Concat", 0) == 0
    code, _, _ = cli(capsys, demo_path, "--dry-run", "--passes", "fold-constants", "--report", report)
    (entry,) = json.loads(report.read_text())["passes"]
    assert entry["ops_removed"]["Concat"] == 1


# --------------------------------------------------------------------------- bad inputs
def test_missing_file_exit_3(capsys, tmp_path):
    code, _, err = cli(capsys, tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx")
    assert code == 3
    assert_one_error_line(err, "input model not found", "nope.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    "content",
    [b"this is not an ONNX model\n", demo_model().SerializeToString()[: len(demo_model().SerializeToString()) // 2]],
    ids=["not-onnx", "truncated"],
)
def test_invalid_model_exit_4(capsys, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, _, err = cli(capsys, bad, "-o", tmp_path / "out.onnx")
    assert code == 4
    assert_one_error_line(err, "is not a valid ONNX model")


def test_unsupported_opset_exit_5(capsys, tmp_path):
    model = demo_model()
    model.opset_import[0].version = 5
    onnx.save_model(model, str(tmp_path / "old.onnx"))
    code, _, err = cli(capsys, tmp_path / "old.onnx", "-o", tmp_path / "out.onnx")
    assert code == 5
    assert_one_error_line(err, "unsupported opset 5")


def test_output_is_the_input_exit_6(capsys, demo_path):
    before = demo_path.read_bytes()
    code, _, err = cli(capsys, demo_path, "-o", demo_path, "--passes", PASSES)
    assert code == 6
    assert_one_error_line(err, "refusing to overwrite the input model")
    assert demo_path.read_bytes() == before


def test_output_is_a_symlink_to_the_input_exit_6(capsys, tmp_path, demo_path):
    before = demo_path.read_bytes()
    (tmp_path / "alias.onnx").symlink_to(demo_path)
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "alias.onnx", "--passes", PASSES)
    assert code == 6
    assert_one_error_line(err, "refusing to overwrite the input model")
    assert demo_path.read_bytes() == before


def test_missing_output_dir_exit_6(capsys, tmp_path, demo_path):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "no" / "such" / "out.onnx")
    assert code == 6
    assert_one_error_line(err, "output directory", "does not exist")


def test_output_is_a_directory_exit_6(capsys, tmp_path, demo_path):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path)
    assert code == 6
    assert_one_error_line(err, "is a directory")


def test_unwritable_output_dir_exit_6(capsys):
    """Needs a directory the process cannot write: as root, run the CLI as nobody."""
    as_root = os.geteuid() == 0
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if as_root:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no unwritable directory available")
        probe = subprocess.run([*as_nobody, str(ONNXOPT), "--version"], capture_output=True, text=True, timeout=60, cwd="/")
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot run {ONNXOPT}: {probe.stderr.strip()[:200]}")
    base = Path(tempfile.mkdtemp(prefix="onnxopt-ro-"))
    try:
        base.chmod(0o755)
        model = base / "in.onnx"
        onnx.save_model(demo_model(), str(model))
        model.chmod(0o644)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        args = [str(model), "-o", str(locked / "out.onnx"), "--passes", PASSES]
        if as_root:
            proc = subprocess.run(
                [*as_nobody, str(ONNXOPT), *args],
                capture_output=True, text=True, timeout=120, cwd=base,
            )
            code, err = proc.returncode, proc.stderr
            err = "\n".join(line for line in err.splitlines() if "onnxruntime" not in line)  # ORT's own notices
        else:
            code, _, err = cli(capsys, *args)
        assert code == 6, err
        assert "onnxopt: error: output directory" in err and "is not writable" in err
        assert "Traceback" not in err
        assert os.listdir(locked) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_report_over_the_input_exit_6(capsys, tmp_path, demo_path):
    before = demo_path.read_bytes()
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--passes", PASSES, "--report", demo_path)
    assert code == 6
    assert_one_error_line(err, f"refusing to overwrite the input model {demo_path} with the report")
    assert demo_path.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_report_in_a_missing_dir_exit_6(capsys, tmp_path, demo_path):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--passes", PASSES, "--report", tmp_path / "no" / "r.json")
    assert code == 6
    assert_one_error_line(err, "report directory", "does not exist")
    assert not (tmp_path / "out.onnx").exists()  # checked before anything runs


def test_unknown_pass_exit_7(capsys, tmp_path, demo_path):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--passes", "eliminate-identity,fold-constant")
    assert code == 7
    assert_one_error_line(err, "unknown pass 'fold-constant'", "did you mean 'fold-constants'")
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_preset_exit_7(capsys, tmp_path, demo_path):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--preset", "cleanpu")
    assert code == 7
    assert_one_error_line(err, "unknown preset 'cleanpu'", "did you mean 'cleanup'")


@pytest.mark.parametrize(
    "setting, message",
    [("max_constant_bytes", "bad --set 'max_constant_bytes': expected KEY=VALUE"), ("colour=red", "option(s) colour not used")],
    ids=["no-equals", "unknown-option"],
)
def test_bad_set_exit_7(capsys, tmp_path, demo_path, setting, message):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--passes", PASSES, "--set", setting)
    assert code == 7
    assert_one_error_line(err, message)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lambda", "inf"], "bad --lambda inf"),
        (["--lambda", "nan"], "bad --lambda nan"),
        (["--input-range=-inf,inf"], "bad --input-range '-inf,inf'"),
        (["--input-range=nan,1"], "bad --input-range 'nan,1'"),
        (["--power-quant", "nan"], "bad --power-quant 'nan'"),
        (["--rex", "2", "--rex-budget", "inf"], "bad --rex-budget 'inf'"),
    ],
)
def test_non_finite_option_values_exit_7(capsys, tmp_path, demo_path, flags, fragment):
    """A NaN/inf option value would become a NaN/inf quantization scale: refused at parsing."""
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, demo_path, "-o", out, "--quantize", "w8a8", *flags, "-q")
    assert code == 7
    assert_one_error_line(err, fragment)
    assert not out.exists()


def test_calibration_data_with_nan_exits_11_naming_file_and_input(capsys, tmp_path, demo_path):
    samples = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    samples[1, 2, 3, 4] = np.nan
    np.savez(tmp_path / "cal.npz", input=samples)
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, demo_path, "-o", out, "--quantize", "w8a8", "--calibration-data", tmp_path / "cal.npz", "-q")
    assert code == 11
    assert_one_error_line(err, f"calibration data {tmp_path / 'cal.npz'}: input input holds 1 NaN/inf value(s) (first in sample 1)")
    assert not out.exists()


def test_bad_verify_inputs_exit_11(capsys, tmp_path, demo_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3, 16, 16), np.float32))
    code, _, err = cli(capsys, demo_path, "--dry-run", "--passes", PASSES, "--inputs", tmp_path / "in.npz", "-q")
    assert code == 11
    assert_one_error_line(err, "missing ['input'], unexpected ['x']")
    code, _, err = cli(capsys, demo_path, "--dry-run", "--verify", "--input-shape", "input:1,3,16,16")
    assert code == 11
    assert_one_error_line(err, "bad --input-shape 'input:1,3,16,16'")


@pytest.mark.parametrize(
    "args, message",
    [([], "give one input: MODEL or --demo"), (["--demo", "m.onnx", "-o", "x.onnx"], "give one input"), (["m.onnx"], "missing -o OUTPUT")],
    ids=["nothing", "model-and-demo", "no-output"],
)
def test_usage_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------- real processes
def test_console_script_end_to_end(tmp_path, demo, demo_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = subprocess.run(
        [str(ONNXOPT), str(demo_path), "-o", str(out), "--passes", PASSES, "--verify", "--report", str(report)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fold-conv-bn" in proc.stderr and "PASSED" in proc.stderr
    assert json.loads(report.read_text())["verification"]["passed"] is True
    assert_equivalent(demo, load_model(out))


def test_python_m_bad_input_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    args = [sys.executable, "-m", "onnxopt", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out.onnx")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stderr.strip() == f"onnxopt: error: input model not found: {tmp_path / 'missing.onnx'}"
    verbose = subprocess.run([*args, "-v"], capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 3
    assert "Traceback" in verbose.stderr and "InputNotFoundError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == f"onnxopt: error: input model not found: {tmp_path / 'missing.onnx'}"


# --------------------------------------------------------------------------- models users bring
def _written(out: Path) -> onnx.ModelProto:
    model = load_model(out)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("batch, spatial", [(-1, -1), ("N", "S")])
def test_verify_with_minus_one_or_symbolic_dims(capsys, tmp_path, batch, spatial):
    original = minus_one_conv_model(batch, spatial)
    path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(original, path)
    code, _, err = cli(capsys, path, "-o", out, "--passes", PASSES, "--verify", "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["verification_status"] == "passed" and data["verification"]["outputs"][0]["shape"] == [1, 4, 32, 32]
    optimized = _written(out)
    assert ops(optimized)["BatchNormalization"] == 0
    assert_equivalent(original, optimized, input_shapes={"x": [2, 3, 9, 7]})


def test_npz_inputs_with_another_batch_for_a_minus_one_model(capsys, tmp_path):
    original = minus_one_conv_model()
    path, out, inputs, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "x.npz", tmp_path / "r.json"
    onnx.save(original, path)
    np.savez(inputs, x=np.random.default_rng(2).standard_normal((3, 3, 12, 8)).astype(np.float32))
    code, _, err = cli(capsys, path, "-o", out, "--passes", PASSES, "--inputs", inputs, "--report", report)
    assert code == 0, err
    verification = json.loads(report.read_text())["verification"]
    assert verification["status"] == "passed" and verification["outputs"][0]["shape"] == [3, 4, 12, 8]
    assert_equivalent(original, _written(out), inputs=dict(np.load(inputs)))


def test_verify_not_possible_when_the_original_fails_on_random_inputs(capsys, tmp_path):
    original = reflect_pad_model()
    path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(original, path)
    code, _, err = cli(capsys, path, "-o", out, "--verify", "--report", report)
    assert code == 0, err
    assert "NOT POSSIBLE" in err and "Pad" in err and "--inputs" in err and "onnxopt: error" not in err
    assert err.strip().splitlines()[-1] == f"onnxopt: wrote {out}"
    data = json.loads(report.read_text())
    assert data["verification_status"] == "not possible" and data["verification"]["possible"] is False
    optimized = _written(out)
    assert ops(optimized)["Identity"] == 0
    assert_equivalent(original, optimized, input_shapes={"x": [2, REFLECT_PAD + 8]})


def test_repeated_node_names_are_made_unique(capsys, tmp_path):
    original = duplicate_names_model()
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(original, path)
    code, _, err = cli(capsys, path, "-o", out, "--passes", PASSES, "--verify")
    assert code == 0, err
    assert "PASSED" in err
    optimized = _written(out)
    names = [node.name for node in optimized.graph.node]
    assert ops(optimized)["Identity"] == 0 and len(names) == len(set(names)) == 8
    assert names[0] == "F0::anon" and all(name.startswith("F0::anon__") for name in names[1:])
    assert_equivalent(original, optimized, input_shapes={"x": [3, 4]})


# --------------------------------------------------------------------------- quantizer coverage (issue 14)
@pytest.mark.parametrize("extra", [[], ["--rex", "2"], ["--modular-accumulator", "auto"]], ids=["quantize", "rex", "modular"])
def test_quantize_that_quantizes_nothing_exit_10(capsys, tmp_path, extra):
    from tests.passes.test_quantize_coverage import plain_model

    src, out = tmp_path / "plain.onnx", tmp_path / "out.onnx"
    onnx.save(plain_model(), str(src))
    code, _, err = cli(capsys, src, "-o", out, "--quantize", "w4a8", *extra)
    assert code == 10
    assert_one_error_line(err, "quantize: 0 of 2 layers quantized: no BatchNormalization/LayerNormalization statistics", "--calibration-data")
    assert "needs the quantize pass" not in err
    assert not out.exists()


def test_quantize_partial_coverage_is_a_summary_line_and_in_the_json(capsys, tmp_path):
    from tests.passes.test_quantize_coverage import bn_model

    src, out, report = tmp_path / "bn.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(bn_model(extra_matmul=True), str(src))
    # by default the second Conv (read by the MatMul only: no range, so ORT would run its QDQ form in float) goes back to float
    code, _, err = cli(capsys, src, "-o", out, "--quantize", "w8a8")
    assert code == 10 and "quantize: 0 of 3 layers quantized: 1 non-constant weight, 1 no statistics, 1 not fused by ORT" in err
    assert not out.exists()
    # --no-unfused-conv-float: it stays QDQ and counts as quantized
    code, _, err = cli(capsys, src, "-o", out, "--quantize", "w8a8", "--no-unfused-conv-float", "--report", report)
    assert code == 0
    assert "warning: quantize: quantized 1/3 layers; 2 float: 1 non-constant weight, 1 no statistics" in err.splitlines()
    coverage = json.loads(report.read_text())["coverage"]
    assert coverage["quantize"]["done"] == 1 and coverage["quantize"]["total"] == 3
    assert ops(load_model(out))["DequantizeLinear"] >= 1


def test_epilog_documents_exit_10(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "10 a requested compression rewrote nothing" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, note", [(["--quantize", "w8a8"], "opset 11 → 13 upgraded for quantize"), (["--quantize", "w4a8", "--rex", "2"], "opset 11 → 13 upgraded for quantize, rex")]
)
def test_opset_11_model_is_upgraded_and_quantized(capsys, tmp_path, flags, note):
    from tests.passes.test_quantize_coverage import torch_net_model

    src, out, report = tmp_path / "old.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(torch_net_model(tmp_path, 11), str(src))
    code, _, err = cli(capsys, src, "-o", out, *flags, "--input-range=-3,3", "--verify", "--report", report)
    assert code == 0, err
    assert f"note: {note}" in err.splitlines()
    assert "quantize: quantized 3/3 layers" in err.splitlines()
    data = json.loads(report.read_text())
    assert data["notes"] == [note] and data["coverage"]["quantize"]["done"] == 3
    result = load_model(out)
    assert next(e.version for e in result.opset_import if e.domain == "") == 13
    onnx.checker.check_model(result, full_check=True)
    assert {p.key: p.value for p in result.metadata_props}["author"] == "someone"


def test_float16_model_exit_10_names_the_conversion(capsys, tmp_path):
    from tests.passes.test_quantize_coverage import bn_model, cast_model

    src, out = tmp_path / "fp16.onnx", tmp_path / "out.onnx"
    onnx.save(cast_model(bn_model(), np.float16, onnx.TensorProto.FLOAT16), str(src))
    code, _, err = cli(capsys, src, "-o", out, "--quantize", "w8a8", "--input-range=-3,3")
    assert code == 10
    assert_one_error_line(err, "quantize: 0 of 2 layers quantized: 2 float16 layers", "onnxconverter-common's float16 → float32")
    assert not out.exists()


def test_rex_with_power_quant_exit_7_names_the_conflict(capsys, tmp_path, demo_path):
    code, _, err = cli(capsys, demo_path, "-o", tmp_path / "out.onnx", "--quantize", "w4a8", "--power-quant", "0.5", "--rex", "2")
    assert code == 7
    assert_one_error_line(err, "--rex expands uniform quantization", "cannot follow --power-quant")
    assert "needs the quantize pass" not in err
