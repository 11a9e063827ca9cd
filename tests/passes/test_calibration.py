"""Calibration data (passes/common/calibration.py) and streaming calibration (measured_ranges.py).

* the three formats (.npz, a folder of .npy files, a folder of images) load to the same
  arrays; the image preprocessing against an independent numpy/Pillow computation;
* each bad input is one InputDataError line naming the file (exit code 11 on the CLI);
* batched calibration gives exactly the min/max of one sample per run, and the percentiles
  of numpy over all values;
* end to end: a BN-free (folded) model quantized with ``--calibration-data`` a folder of
  .npy files stays close to float in ORT;
* ``act_ranges="moments"``: the streamed per-channel mean/std equal numpy's over all values,
  the ranges are exactly mean ± λ·std of the layer outputs (through ReLU6), the quantized
  model stays close to float, and moments without calibration data is exit 7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxopt.cli import main
from onnxopt.errors import InputDataError, PipelineError
from onnxopt.passes.common import measured_ranges
from onnxopt.passes.common.numerics import activation_quant
from onnxopt.passes.common.calibration import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessing,
    load_calibration_data,
)
from onnxopt.verify import run
from tests.conftest import text_model as model, run_passes

RNG = np.random.default_rng(1411)
QUANTIZE = ("fold-batchnorm", "quantize")
MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


# --------------------------------------------------------------------------- models
def conv_model(channels: int = 3, side: int = 7, batch: str = "N", layout: str = "NCHW") -> onnx.ModelProto:
    """Conv → Relu → Conv (→ Transpose first for an NHWC input), no BatchNormalization."""
    arrays = {"w1": (RNG.standard_normal((8, channels, 3, 3)) * 0.4).astype(np.float32), "b1": RNG.standard_normal(8).astype(np.float32),
              "w2": (RNG.standard_normal((4, 8, 1, 1)) * 0.4).astype(np.float32), "b2": RNG.standard_normal(4).astype(np.float32)}
    body = ["c = Conv <pads = [1,1,1,1]> (t, w1, b1)", "r = Relu(c)", "y = Conv(r, w2, b2)"]
    if layout == "NHWC":
        signature = f"(float[{batch},{side},{side},{channels}] x) => (float[{batch},4,{side},{side}] y)"
        body.insert(0, "t = Transpose <perm = [0,3,1,2]> (x)")
    else:
        signature = f"(float[{batch},{channels},{side},{side}] x) => (float[{batch},4,{side},{side}] y)"
        body.insert(0, "t = Identity(x)")
    return model(signature, body, arrays)


def folded_net() -> onnx.ModelProto:
    """A small CNN as a BN-folded export looks: Conv(+bias) → Relu ×3 → pool → Gemm, dynamic batch."""
    arrays = {}
    body, x = [], "x"
    for i, (cin, cout) in enumerate([(3, 16), (16, 16), (16, 32)]):
        arrays[f"w{i}"] = (RNG.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        arrays[f"b{i}"] = (RNG.standard_normal(cout) * 0.1).astype(np.float32)
        body += [f"c{i} = Conv <pads = [1,1,1,1]> ({x}, w{i}, b{i})", f"r{i} = Relu(c{i})"]
        x = f"r{i}"
    arrays["wf"] = (RNG.standard_normal((10, 32)) * 0.3).astype(np.float32)
    arrays["bf"] = (RNG.standard_normal(10) * 0.1).astype(np.float32)
    body += [f"p = GlobalAveragePool({x})", "f = Flatten(p)", "y = Gemm <transB = 1> (f, wf, bf)"]
    return model("(float[N,3,12,12] x) => (float[N,10] y)", body, arrays)


def write_png(path: Path, height: int, width: int) -> np.ndarray:
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


# =========================================================================== formats
def test_npz_npy_folder_and_images_load_the_same_arrays(tmp_path: Path) -> None:
    proto = conv_model(side=7)
    images = tmp_path / "images"
    images.mkdir()
    # 8×8 PNGs for a 7×7 input: the shorter side is resized to round(7 / 0.875) = 8 (no change),
    # then the center crop starts at (8 - 7) // 2 = 0
    pixels = [write_png(images / f"img{i}.png", 8, 8) for i in range(3)]
    expected = np.stack([((p[:7, :7] / np.float32(255)) - MEAN) / STD for p in pixels]).transpose(0, 3, 1, 2).astype(np.float32)

    np.savez(tmp_path / "cal.npz", x=expected)
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a_first.npy", expected[0])  # one sample, without the batch axis
    np.save(npy / "b_rest.npy", expected[1:])  # a batch of two

    loaded = {kind: load_calibration_data(tmp_path / kind, proto) for kind in ("images", "npy", "cal.npz")}
    assert [d.kind for d in loaded.values()] == ["images", "npy", "npz"]
    for data in loaded.values():
        assert data.count == 3 and data.feeds["x"].dtype == np.float32
        np.testing.assert_allclose(data.feeds["x"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(loaded["npy"].feeds["x"], loaded["cal.npz"].feeds["x"])


def test_images_are_resized_on_the_shorter_side_and_center_cropped(tmp_path: Path) -> None:
    """A 30×40 image for a 16×16 input: shorter side → round(16 / 0.875) = 18, so 18×24, crop at (4, 1)."""
    pixels = write_png(tmp_path / "wide.png", 30, 40)
    data = load_calibration_data(tmp_path / "wide.png", conv_model(side=16), ImagePreprocessing(mean=(0.0,), std=(1.0,)))
    resized = np.asarray(Image.fromarray(pixels).resize((24, 18), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(data.feeds["x"][0], resized[1:17, 4:20].transpose(2, 0, 1), atol=1e-6)


def test_image_preprocessing_matches_the_models_package_on_the_imagenet_samples(tmp_path: Path) -> None:
    datasets = pytest.importorskip("onnxopt.models.datasets")
    try:
        files = [path for path, _ in datasets.imagenet_sample_files()[:2]]
    except Exception as exc:  # noqa: BLE001 - the asset is optional
        pytest.skip(f"imagenet_samples asset missing: {exc}")
    folder = tmp_path / "imagenet"
    folder.mkdir()
    for path in files:
        (folder / path.name).write_bytes(path.read_bytes())
    data = load_calibration_data(folder, conv_model(side=224))
    reference = datasets.normalize(np.stack([datasets.preprocess_image(p) for p in files]), "imagenet")
    np.testing.assert_allclose(data.feeds["x"], reference, atol=1e-5)


def test_nhwc_layout_and_custom_normalisation(tmp_path: Path) -> None:
    pixels = write_png(tmp_path / "one.png", 8, 8)
    data = load_calibration_data(tmp_path / "one.png", conv_model(side=7, layout="NHWC"), ImagePreprocessing((0.5,), (0.25,), "NHWC"))
    np.testing.assert_allclose(data.feeds["x"][0], (pixels[:7, :7] / np.float32(255) - 0.5) / 0.25, atol=1e-6)


def test_multi_input_npy_files_are_matched_by_name(tmp_path: Path) -> None:
    proto = model("(float[N,4] a, float[N,2] b) => (float[N,4] y)", ["s = ReduceSum <keepdims = 1> (b)", "y = Add(a, s)"], {})
    a, b = RNG.standard_normal((3, 4)).astype(np.float32), RNG.standard_normal((3, 2)).astype(np.float32)
    np.save(tmp_path / "a_0.npy", a[:2])
    np.save(tmp_path / "a_1.npy", a[2])
    np.save(tmp_path / "b_all.npy", b)
    feeds = load_calibration_data(tmp_path, proto).feeds
    np.testing.assert_array_equal(feeds["a"], a)
    np.testing.assert_array_equal(feeds["b"], b)


# =========================================================================== errors
def _bad_png(folder: Path) -> Path:
    (folder / "bad.png").write_bytes(b"not an image at all")
    return folder


def _npy(folder: Path, name: str, array: np.ndarray) -> Path:
    np.save(folder / name, array)
    return folder


def _npz_with_inf(folder: Path) -> Path:
    samples = RNG.standard_normal((4, 3, 7, 7)).astype(np.float32)
    samples[2, 0, 0, 0] = np.inf
    np.savez(folder / "cal.npz", x=samples)
    return folder / "cal.npz"


def _mixed(folder: Path) -> Path:
    write_png(folder / "a.png", 8, 8)
    return _npy(folder, "b.npy", np.zeros((3, 7, 7), np.float32))


def _only_text(folder: Path) -> Path:
    (folder / "notes.txt").write_text("hello")
    return folder


def _nan_npy(folder: Path) -> Path:
    sample = np.zeros((3, 7, 7), np.float32)
    sample[1, 2, 3] = np.nan
    _npy(folder, "good.npy", np.zeros((3, 7, 7), np.float32))
    return _npy(folder, "nan.npy", sample)


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d: d / "missing", ["missing", "no such file"]),
        (lambda d: d, ["the folder is empty"]),
        (_only_text, ["no .npy files or images"]),
        (_bad_png, ["bad.png", "cannot read the image"]),
        (lambda d: (d / "broken.npy").write_bytes(b"garbage") and d, ["broken.npy", "cannot read it as .npy"]),
        (_nan_npy, ["nan.npy", "NaN/inf value(s)", "first in sample 0"]),
        (_npz_with_inf, ["cal.npz", "NaN/inf value(s)", "first in sample 2"]),
        (lambda d: _npy(d, "flat.npy", np.zeros((7, 7), np.float32)), ["flat.npy", "shape [7, 7]", "input x"]),
        (lambda d: _npy(d, "wide.npy", np.zeros((2, 3, 7, 9), np.float32)), ["wide.npy", "shape [2, 3, 7, 9]"]),
        (_mixed, ["mixes .npy files and images"]),
        (lambda d: _npy(d, "ints.npy", np.zeros((3, 7, 7), np.int64)), ["ints.npy", "dtype int64", "expects float32"]),
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", ["notes.txt", "expected an .npz"]),
    ],
)
def test_bad_calibration_data_is_one_verification_error_line(tmp_path: Path, make, fragments) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = make(folder)
    with pytest.raises(InputDataError) as info:
        load_calibration_data(path, conv_model(side=7))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_images_for_a_one_channel_input_are_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 8, 8)
    with pytest.raises(InputDataError, match=r"images give 3 \(RGB\) channels, input x has 1 on axis 1"):
        load_calibration_data(tmp_path, conv_model(channels=1, side=7))


def test_multi_input_files_without_input_names_are_refused(tmp_path: Path) -> None:
    proto = model("(float[N,4] a, float[N,4] b) => (float[N,4] y)", ["y = Add(a, b)"], {})
    np.save(tmp_path / "sample.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(InputDataError, match=r"sample.npy: the model has several inputs \(a, b\); name each file <input>_\*.npy"):
        load_calibration_data(tmp_path, proto)


def test_cli_bad_calibration_data_is_one_line_with_exit_code_11(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(side=7), path)
    _bad_png(tmp_path)
    code = main([str(path), "-o", str(tmp_path / "q.onnx"), "--quantize", "w8a8", "--calibration-data", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 11 and len(err) == 1 and "bad.png" in err[0] and "cannot read the image" in err[0], err


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"calibration_mean": [0.5, 0.5]}, r"calibration_mean \(--calibration-mean\) of pass quantize must be one number or three"),
        ({"calibration_std": 0.0}, r"calibration_std \(--calibration-std\) of pass quantize must be positive"),
        ({"calibration_layout": "CHWN"}, r"calibration_layout \(--calibration-layout\) of pass quantize must be 'NCHW', 'NHWC'"),
        ({"calibration_std": 0.5}, "calibration_std apply to a folder of images"),
    ],
)
def test_bad_image_options_are_pipeline_errors(tmp_path: Path, options: dict, fragment: str) -> None:
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((2, 3, 7, 7)).astype(np.float32))
    options = {"calibration_data": str(tmp_path / "cal.npz"), **options}
    with pytest.raises(PipelineError, match=fragment):
        run_passes(conv_model(side=7), *QUANTIZE, act_ranges="minmax", **options)


@pytest.mark.parametrize("count, warned", [(1, True), (7, True), (8, False)])
def test_fewer_than_8_samples_run_with_a_warning_in_the_stats(tmp_path: Path, count: int, warned: bool) -> None:
    for i in range(count):
        np.save(tmp_path / f"s{i:02d}.npy", RNG.standard_normal((3, 7, 7)).astype(np.float32))
    # the last Conv writes the graph output (ORT would run its QDQ form in float): kept QDQ so both layers count
    _, report = run_passes(conv_model(side=7), *QUANTIZE, act_ranges="minmax", calibration_data=str(tmp_path), unfused_conv_to_float=False)
    (stats,) = [p.stats for p in report.passes if p.name == "quantize"]
    assert stats["layers_quantized"] == 2 and stats["calibration_samples"] == count and stats["calibration_format"] == "npy"
    assert ("calibration_warning" in stats) == warned
    if warned:
        assert f"only {count} calibration sample(s)" in stats["calibration_warning"]


# =========================================================================== streaming calibration
TENSORS = ["t", "c", "r", "y"]


def test_batched_minmax_equals_one_sample_per_run(monkeypatch) -> None:
    proto = conv_model(side=9)
    samples = {"x": RNG.standard_normal((21, 3, 9, 9)).astype(np.float32)}
    runs: list[int] = []
    original = measured_ranges.sample_batches

    def counting(*args, **kwargs):
        batches = original(*args, **kwargs)
        runs.append(len(batches))
        return batches

    monkeypatch.setattr(measured_ranges, "sample_batches", counting)
    batched = measured_ranges.calibrated_ranges(proto, TENSORS, samples, "minmax")
    single = measured_ranges.calibrated_ranges(proto, TENSORS, samples, "minmax", batch=1)
    assert runs == [2, 21]  # 16 + 5 samples per ORT run vs one each
    values = {name: v for name, v in zip(TENSORS, _intermediates(proto, samples))}
    for name in TENSORS:
        np.testing.assert_array_equal(batched[name].lo, single[name].lo)
        np.testing.assert_array_equal(batched[name].hi, single[name].hi)
        # means: float32 sums per run, float64 across runs
        np.testing.assert_allclose(batched[name].mean, single[name].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(batched[name].hi, values[name].max(axis=(0, 2, 3)))
        np.testing.assert_allclose(batched[name].mean, values[name].astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_a_graph_that_breaks_at_batch_above_one_is_calibrated_one_sample_per_run() -> None:
    """Reshape to [1, 48] only works for one sample: the batched run fails, calibration restarts unbatched."""
    arrays = {"shape": np.array([1, 48], np.int64), "w": RNG.standard_normal((48, 5)).astype(np.float32)}
    proto = model("(float[N,3,4,4] x) => (float[1,5] y)", ["f = Reshape(x, shape)", "y = MatMul(f, w)"], arrays)
    samples = {"x": RNG.standard_normal((6, 3, 4, 4)).astype(np.float32)}
    got = measured_ranges.calibrated_ranges(proto, ["f", "y"], samples, "minmax")
    reference = measured_ranges.calibrated_ranges(proto, ["f", "y"], samples, "minmax", batch=1)
    for name in ("f", "y"):
        np.testing.assert_array_equal(got[name].lo, reference[name].lo)
        np.testing.assert_array_equal(got[name].hi, reference[name].hi)


def test_fixed_batch_model_is_fed_by_its_batch_size_with_the_last_batch_filled() -> None:
    proto = conv_model(side=5, batch="2")
    samples = {"x": RNG.standard_normal((5, 3, 5, 5)).astype(np.float32)}
    got = measured_ranges.calibrated_ranges(proto, TENSORS, samples, "minmax")
    values = {name: v for name, v in zip(TENSORS, _intermediates(proto, samples, step=1, pad_to=2))}
    for name in TENSORS:
        np.testing.assert_array_equal(got[name].lo, values[name].min(axis=(0, 2, 3)))
        np.testing.assert_array_equal(got[name].hi, values[name].max(axis=(0, 2, 3)))


def test_percentile_equals_numpy_over_all_values() -> None:
    proto = conv_model(side=30)
    samples = {"x": RNG.standard_normal((10, 3, 30, 30)).astype(np.float32)}
    got = measured_ranges.calibrated_ranges(proto, TENSORS, samples, "percentile", batch=4)
    for name, values in zip(TENSORS, _intermediates(proto, samples)):
        rows = np.moveaxis(values, 1, -1).reshape(-1, values.shape[1]).astype(np.float64)
        np.testing.assert_allclose(got[name].lo, np.percentile(rows, 0.01, axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[name].hi, np.percentile(rows, 99.99, axis=0), rtol=1e-6, atol=1e-6)
        assert np.all(got[name].hi < rows.max(axis=0))  # the extremes are clipped


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shapes", [[(1, 3)], [(7, 3), (7, 3), (3, 3)], [(4000, 3)] * 3 + [(17, 3)], [(2, 3, 40, 50)] * 4 + [(1, 3, 40, 50)]])
def test_running_percentile_keeps_just_enough_tail_values(shapes: list[tuple[int, ...]], ties: bool) -> None:
    """Heavy-tailed values, with or without ties, rank 2 (each value its own block) or 4 (rows of 50 as blocks)."""
    chunks = [RNG.standard_cauchy(shape).astype(np.float32) for shape in shapes]
    if ties:
        chunks = [np.round(c * 4) for c in chunks]
    reducer = measured_ranges.RunningRange("percentile", len(shapes))
    for chunk in chunks:
        reducer.update(chunk)
    everything = np.concatenate([np.moveaxis(c, 1, -1).reshape(-1, 3) for c in chunks]).astype(np.float64)
    result = reducer.result()
    assert reducer.largest.shape[1] <= max(reducer.keep, np.prod(shapes[0]) // 3)
    np.testing.assert_allclose(result.lo, np.percentile(everything, 0.01, axis=0), rtol=1e-9)
    np.testing.assert_allclose(result.hi, np.percentile(everything, 99.99, axis=0), rtol=1e-9)
    np.testing.assert_allclose(result.mean, everything.mean(axis=0), atol=1e-6 * np.abs(everything).max())  # float32 sums


def _intermediates(proto: onnx.ModelProto, samples: dict[str, np.ndarray], step: int | None = None, pad_to: int = 1) -> list[np.ndarray]:
    """``TENSORS`` of ``proto`` on all samples, computed ``pad_to`` samples per run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in TENSORS[:-1]:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    x = samples["x"]
    if pad_to == 1:
        outputs = run(probe, {"x": x})
        return [outputs[name] for name in TENSORS]
    chunks = [run(probe, {"x": x[np.arange(i, i + pad_to) % len(x)]}) for i in range(0, len(x), pad_to)]
    return [np.concatenate([c[name] for c in chunks]) for name in TENSORS]


# =========================================================================== end to end
def test_cli_quantizes_a_bn_folded_model_from_a_folder_of_npy_files(tmp_path: Path, capsys) -> None:
    proto = folded_net()
    source = tmp_path / "folded.onnx"
    onnx.save(proto, source)
    folder = tmp_path / "calibration"
    folder.mkdir()
    samples = RNG.standard_normal((10, 3, 12, 12)).astype(np.float32)
    for i, sample in enumerate(samples):
        np.save(folder / f"sample_{i:02d}.npy", sample)
    out = tmp_path / "q.onnx"
    code = main([str(source), "-o", str(out), "--quantize", "w8a8", "--calibration-data", str(folder)])
    assert code == 0, capsys.readouterr().err
    quantized = onnx.load(out)
    onnx.checker.check_model(quantized, full_check=True)
    op_types = [n.op_type for n in quantized.graph.node]
    assert op_types.count("Conv") == 3 and op_types.count("QuantizeLinear") >= 4
    assert "calibration_samples=10" in capsys.readouterr().err  # the report goes to stderr
    reference, got = run(proto, {"x": samples})["y"], run(quantized, {"x": samples})["y"]
    cosine = float((reference * got).sum() / np.linalg.norm(reference) / np.linalg.norm(got))
    assert cosine > 0.99, cosine


def test_spiq_auto_stays_per_tensor_with_calibrated_ranges_and_spiq_forces_it(tmp_path: Path) -> None:
    """spiq="auto" with calibration data: per tensor everywhere (the estimate is built for BN
    ranges; per tensor measured better with samples), said in the stats; --spiq still folds."""
    proto = folded_net()
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((10, 3, 12, 12)).astype(np.float32))
    common = dict(act_ranges="minmax", calibration_data=str(tmp_path / "cal.npz"))
    _, report = run_passes(proto, "quantize", **common)
    stats = next(p for p in report.passes if p.name == "quantize").stats
    assert stats["spiq_coverage"] == 0.0 and stats["spiq_auto"].startswith("per tensor: ranges measured on calibration data")
    _, forced = run_passes(proto, "quantize", spiq=True, **common)
    forced_stats = next(p for p in forced.passes if p.name == "quantize").stats
    assert forced_stats["spiq_coverage"] > 0 and "spiq_auto" not in forced_stats


# =========================================================================== act_ranges="moments"
def relu6_net() -> onnx.ModelProto:
    """A BN-folded block: Conv → Clip(0, 6) (ReLU6) → Conv (linear bottleneck) → Conv, dynamic batch."""
    arrays = {"w1": (RNG.standard_normal((8, 3, 3, 3)) * 0.15).astype(np.float32), "b1": (RNG.standard_normal(8) * 0.2).astype(np.float32),
              "w2": (RNG.standard_normal((6, 8, 1, 1)) * 0.3).astype(np.float32), "b2": (RNG.standard_normal(6) * 0.1).astype(np.float32),
              "w3": (RNG.standard_normal((4, 6, 1, 1)) * 0.3).astype(np.float32), "b3": (RNG.standard_normal(4) * 0.1).astype(np.float32),
              "low": np.array(0.0, np.float32), "high": np.array(6.0, np.float32)}
    body = ["c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)", "r1 = Clip(c1, low, high)", "c2 = Conv(r1, w2, b2)", "y = Conv(c2, w3, b3)"]
    return model("(float[N,3,9,9] x) => (float[N,4,9,9] y)", body, arrays)


@pytest.mark.parametrize("shapes", [[(5, 3)], [(2, 3, 4, 5), (2, 3, 4, 5), (1, 3, 4, 5)], [(16, 3, 7, 7), (3, 3, 7, 7)]])
def test_running_moments_equal_numpy_mean_and_std_over_all_values(shapes: list[tuple[int, ...]]) -> None:
    chunks = [(RNG.standard_normal(shape) * 3 + 100).astype(np.float32) for shape in shapes]  # a large mean: no cancellation
    reducer = measured_ranges.RunningRange("moments", len(shapes))
    for chunk in chunks:
        reducer.update(chunk)
    everything = np.concatenate([np.moveaxis(c, 1, -1).reshape(-1, 3) for c in chunks]).astype(np.float64)
    result = reducer.result()
    mean, std = result.gaussian
    np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, everything.std(axis=0), rtol=1e-6)  # float32 deviations, float64 sums
    np.testing.assert_allclose(result.second_moment, (everything**2).mean(axis=0), rtol=1e-9)
    np.testing.assert_array_equal(result.lo, everything.min(axis=0))
    np.testing.assert_array_equal(result.hi, everything.max(axis=0))


def test_moments_ranges_are_mean_plus_minus_lambda_std_of_the_layer_outputs(tmp_path: Path) -> None:
    """The quantizers' scales are exactly those of mean ± λ·std per channel (numpy over the
    samples) of each Conv output, clipped to [0, 6] by the ReLU6; the graph input keeps its
    measured min/max; the result (default λ) stays close to float in ORT."""
    proto = relu6_net()
    samples = RNG.standard_normal((12, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=samples)
    lam = 3.0
    quantized, report = run_passes(proto, "quantize", act_ranges="moments", calibration_data=str(tmp_path / "cal.npz"), lam=lam, spiq=False,
                                   unfused_conv_to_float=False)  # every layer's quantizers are checked, the last Conv's too
    stats = next(p for p in report.passes if p.name == "quantize").stats
    assert stats["layers_quantized"] == 3 and "spiq_auto" not in stats
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend([onnx.ValueInfoProto(name="c1"), onnx.ValueInfoProto(name="c2")])
    values = run(probe, {"x": samples})
    c1, c2 = (values[name].astype(np.float64) for name in ("c1", "c2"))
    hi1 = np.clip(c1.mean(axis=(0, 2, 3)) + lam * c1.std(axis=(0, 2, 3)), 0, 6)
    lo2, hi2 = (c2.mean(axis=(0, 2, 3)) + k * lam * c2.std(axis=(0, 2, 3)) for k in (-1, 1))
    assert hi1.max() < 6 and lo2.min() < 0  # the checks below exercise the unclipped ReLU6 range and a signed quantizer
    expected = {"x": activation_quant(float(samples.min()), float(samples.max()), 8),
                "r1": activation_quant(0.0, float(hi1.max()), 8),
                "c2": activation_quant(float(lo2.min()), float(hi2.max()), 8)}
    scales = {record["input"]: record["scale"] for record in stats["layers"]}
    assert scales.keys() == expected.keys()
    for name, quant in expected.items():
        assert scales[name] == pytest.approx(float(quant.scale), rel=1e-6), name
    onnx.checker.check_model(quantized, full_check=True)
    # the default λ (9 at 8 bits) keeps the Gaussian tails: close to float on held-out inputs
    quantized, _ = run_passes(proto, "quantize", act_ranges="moments", calibration_data=str(tmp_path / "cal.npz"))
    onnx.checker.check_model(quantized, full_check=True)
    held_out = RNG.standard_normal((8, 3, 9, 9)).astype(np.float32)
    reference, got = run(proto, {"x": held_out})["y"], run(quantized, {"x": held_out})["y"]
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    cosine = float((reference * got).sum() / np.linalg.norm(reference) / np.linalg.norm(got))
    assert cosine > 0.999, cosine


def test_moments_decides_spiq_like_the_data_free_path(tmp_path: Path) -> None:
    """With measured statistics the SPIQ-auto estimate runs (no blanket per-tensor line);
    minmax keeps the blanket per-tensor choice."""
    proto = folded_net()
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((10, 3, 12, 12)).astype(np.float32))
    for mode, blanket in (("moments", False), ("minmax", True)):
        _, report = run_passes(proto, "quantize", act_ranges=mode, calibration_data=str(tmp_path / "cal.npz"))
        stats = next(p for p in report.passes if p.name == "quantize").stats
        assert ("spiq_auto" in stats) == blanket, mode
        assert stats["layers_quantized"] == 4


def test_moments_without_calibration_data_is_exit_7(tmp_path: Path, capsys) -> None:
    source = tmp_path / "folded.onnx"
    onnx.save(relu6_net(), source)
    code = main([str(source), "-o", str(tmp_path / "q.onnx"), "--quantize", "w8a8", "--act-ranges", "moments"])
    err = capsys.readouterr().err
    assert code == 7 and "'moments' needs calibration data" in err and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(PipelineError, match="needs calibration data"):
        run_passes(relu6_net(), "quantize", act_ranges="moments")


def test_power_quant_reads_moments_ranges_too(tmp_path: Path) -> None:
    """power-quant shares the option: the ReLU6 output's range is the measured-statistics one
    (every layer's input gets one) and the result stays close to float."""
    proto = relu6_net()
    samples = RNG.standard_normal((12, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=samples)
    quantized, report = run_passes(proto, "power-quant", act_ranges="moments", calibration_data=str(tmp_path / "cal.npz"), power_exponent=1.0)
    stats = next(p for p in report.passes if p.name == "power-quant").stats
    # exponent 1 runs the uniform quantizer, which puts the last Conv (it writes the graph
    # output, so ORT cannot fuse it) back in float: 2 of the 3 layers are quantized
    assert stats["layers_quantized"] == 2, stats
    held_out = RNG.standard_normal((8, 3, 9, 9)).astype(np.float32)
    reference, got = run(proto, {"x": held_out})["y"], run(quantized, {"x": held_out})["y"]
    cosine = float((reference * got).sum() / np.linalg.norm(reference) / np.linalg.norm(got))
    assert cosine > 0.999, cosine
