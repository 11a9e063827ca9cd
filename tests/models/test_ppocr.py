"""The PP-OCR wheel asset (rapidocr-onnxruntime, fetched with pip download --no-deps and
unpacked into the asset cache), the rendered text-line inputs, and data-free quantization of
the real PP-OCR text-orientation classifier (skipped only when the asset is missing)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxopt.models import assets, ocr

import onnxopt
from onnxopt.errors import OnnxoptError
from onnxopt.metrics import _node_macs, tensor_shapes

HAVE_PPOCR = assets.asset_available("ppocr")
needs_ppocr = pytest.mark.skipif(not HAVE_PPOCR, reason=f"asset missing: {assets.WHEEL_ASSETS['ppocr'].install_hint}")
#: rendered lines the fidelity test runs (seed 0: 8 upright, 8 rotated)
LINES = 16


def test_missing_asset_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.ASSET_CACHE_ENV, str(tmp_path))
    assert not assets.asset_available("ppocr") and assets.asset_status()["ppocr"] is False
    with pytest.raises(OnnxoptError, match="python -m onnxopt.models install-assets.*pip download --no-deps rapidocr-onnxruntime==1.4.4"):
        ocr.ppocr_cls_path()


def test_install_unpacks_only_the_listed_members(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pip download (here: a stand-in writing a wheel) → only the ONNX members land in the cache."""
    monkeypatch.setenv(assets.ASSET_CACHE_ENV, str(tmp_path / "cache"))
    commands = []

    def fake_run(cmd: list[str], cwd: Path | None = None):
        commands.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl", "w") as wheel:
            for member in assets.WHEEL_ASSETS["ppocr"].members:
                wheel.writestr(member, b"onnx bytes of " + member.encode())
            wheel.writestr("rapidocr_onnxruntime/__init__.py", "import cv2\n")
        import subprocess

        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets, "_run", fake_run)
    folder = assets.install_wheel_asset("ppocr")
    (cmd,) = commands
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and cmd[-1] == "rapidocr-onnxruntime==1.4.4"
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == sorted(Path(m).name for m in assets.WHEEL_ASSETS["ppocr"].members)
    assert ocr.ppocr_cls_path().read_bytes().startswith(b"onnx bytes of")
    assert assets.install_wheel_asset("ppocr") == folder and len(commands) == 1  # installed: nothing fetched again


def test_rendered_text_lines_are_seeded_and_preprocessed_like_rapidocr() -> None:
    pytest.importorskip("PIL")
    x, labels = ocr.ppocr_cls_inputs(6, seed=3)
    again, _ = ocr.ppocr_cls_inputs(6, seed=3)
    other, _ = ocr.ppocr_cls_inputs(6, seed=4)
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.float32 and labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert np.array_equal(x, again) and not np.array_equal(x, other)
    assert -1.0 <= x.min() and x.max() <= 1.0
    images, _ = ocr.render_text_lines(6, seed=3)
    for image, row in zip(images, x):
        width = min(192, int(np.ceil(48 * image.shape[1] / image.shape[0])))
        assert np.all(row[:, :, width:] == 0) and np.any(row[:, :, :width] != 0)  # RapidOCR pads with 0 on the right


def conv_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Conv name → MACs at batch 1, 48×192 (the graph's H, W are symbolic)."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for dim, value in zip(static.graph.input[0].type.tensor_type.shape.dim, (1, 3, 48, 192)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(static))
    return {n.name: _node_macs(n, shapes) for n in static.graph.node if n.op_type == "Conv"}


@pytest.fixture(scope="module")
def quantized_cls() -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
    source = onnx.load(str(ocr.ppocr_cls_path()))
    folded, _ = onnxopt.optimize(source)
    model, report = onnxopt.optimize(source, preset="quantize", input_range=(-1.0, 1.0), validate=True)
    return folded, model, report


@needs_ppocr
def test_default_quantization_covers_the_classifier(quantized_cls) -> None:
    """W8A8 data-free: every dense Conv outside the squeeze-excite blocks is quantized and
    fused by ORT; the SE Convs (on 1×1 pooled tensors, whose ranges the BN statistics do not
    give) stay float, and so do the depthwise Convs between float hard-swish / SE ops (ORT's
    int8 depthwise kernel is slower than its float one there: "depthwise before float ops"),
    each counted with its reason."""
    folded, model, report = quantized_cls
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (entry,) = [p for p in report.passes if p.name == "quantize"]
    quantized = {layer["layer"] for layer in entry.stats["layers"]} - {item["layer"] for item in entry.stats.get("not_fused", [])}
    macs = conv_macs(folded)
    assert len(macs) == 53 and len(quantized & set(macs)) >= 26
    assert sum(macs[name] for name in quantized & set(macs)) >= 0.7 * sum(macs.values())
    assert entry.stats["fused_by_ort"] == {"QLinearConv": len(quantized & set(macs))}
    float_convs = set(macs) - quantized
    shapes = tensor_shapes(onnx.shape_inference.infer_shapes(folded))
    readers = {n.name: n for n in folded.graph.node}
    group = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in folded.graph.node}
    depthwise = {name for name in float_convs if group[name] > 1 and group[name] == shapes[readers[name].input[0]][1]}
    assert all(shapes[readers[name].input[0]][2:] == [1, 1] for name in float_convs - depthwise)  # the rest: SE Convs only
    assert entry.stats["coverage"]["reasons"]["depthwise before float ops"] == len(depthwise) > 0


@needs_ppocr
def test_quantized_classifier_keeps_the_orientation(quantized_cls) -> None:
    """On rendered lines: the FP32 model reads the orientation right, and the quantized one's
    2-class softmax stays within 0.1 of FP32 on average (max 0.5: a line the FP32 model is
    unsure of can move further) with the same decision on ≥ 15 of 16 lines."""
    folded, model, _ = quantized_cls
    x, labels = ocr.ppocr_cls_inputs(LINES, seed=0)

    def probabilities(proto: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    reference, quantized = probabilities(folded), probabilities(model)
    assert (reference.argmax(1) == labels).sum() >= LINES - 1
    difference = np.abs(quantized - reference)[:, 0]
    assert difference.mean() < 0.1 and difference.max() < 0.5
    assert (quantized.argmax(1) == reference.argmax(1)).sum() >= LINES - 1


@needs_ppocr
def test_fp32_classifier_reads_the_orientation_of_rendered_lines() -> None:
    """The sanity figure of ``python -m onnxopt.models sanity``: the real model is right on
    nearly every rendered line (the inputs are a fair test of it)."""
    correct, total = ocr.ppocr_cls_accuracy(40, seed=5)
    assert total == 40 and correct >= 38
