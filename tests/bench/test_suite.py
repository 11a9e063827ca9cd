"""The benchmark suite: configuration availability, metric functions, README regeneration,
and a tiny end-to-end run (one small zoo model, two configurations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import configs
from bench.configs import CONFIG_BY_NAME, CONFIGS, Config, availability, expand_passes
from bench.measures import (
    bops,
    classifier_fidelity,
    cosine,
    effective_bops,
    embedding_fidelity,
    fit_logistic,
    integer_bits,
    kl_divergence,
    predict_logistic,
    top1_agreement,
)
from bench.readme import README_END, README_START, update_readme_text
from bench.report import KEY_END, KEY_START

PRESETS = {"default": ("eliminate-identity", "fold-batchnorm", "eliminate-dead")}
PASSES = {"eliminate-identity", "fold-batchnorm", "eliminate-dead", "quantize"}


# --------------------------------------------------------------------------- configurations
def test_config_names_are_unique_and_onnxopt_configs_name_passes() -> None:
    assert len({c.name for c in CONFIGS}) == len(CONFIGS)
    for c in CONFIGS:
        if c.family == "onnxopt":
            assert c.passes, c.name


def test_preset_reference_expands_to_its_steps() -> None:
    assert expand_passes(("@default", "quantize"), PRESETS) == [*PRESETS["default"], "quantize"]


def test_config_with_registered_passes_is_available() -> None:
    assert availability(CONFIG_BY_NAME["onnxopt_spiq_w8a8"], PASSES, PRESETS) == (True, "available")


def test_config_with_unregistered_passes_is_absent_and_names_them() -> None:
    ok, why = availability(CONFIG_BY_NAME["onnxopt_red_a0.05"], PASSES, PRESETS)
    assert not ok
    assert why == "absent (pass not landed): hash-weights, merge-neurons, decompose-depthwise"
    ok, why = availability(CONFIG_BY_NAME["onnxopt_rex_w4a8_o2_b0.5"], PASSES | {"rex"}, PRESETS)
    assert ok, why  # lights up once the pass is registered


def test_config_with_unknown_preset_is_absent() -> None:
    config = Config("x", "x", "onnxopt", passes=("@nosuch",))
    assert availability(config, PASSES, PRESETS) == (False, "absent (preset not defined): nosuch")


def test_peer_not_installed_is_absent() -> None:
    ok, why = availability(CONFIG_BY_NAME["onnxsim"], PASSES, PRESETS, {"onnxsim": False})
    assert (ok, why) == (False, "absent (onnxsim not installed)")
    assert availability(CONFIG_BY_NAME["onnxsim"], PASSES, PRESETS, {"onnxsim": True})[0]


def test_select_adds_the_reference_and_rejects_unknown_names() -> None:
    assert [c.name for c in configs.select(True, ["onnxopt_default"])] == ["fp32", "onnxopt_default"]
    assert all(c.quick for c in configs.select(True))
    assert len(configs.select(False)) == len(CONFIGS)
    with pytest.raises(KeyError, match="nosuch"):
        configs.select(True, ["nosuch"])


def test_registry_state_matches_the_builtin_registry() -> None:
    from onnxopt.passes import builtin_registry

    passes, presets, error = configs.registry_state()
    assert error is None
    assert passes == {cls.name for cls in builtin_registry().passes()}
    assert presets["default"] == tuple(builtin_registry().preset("default").steps)


# --------------------------------------------------------------------------- metrics
def test_bops_is_bits_times_bits_times_macs() -> None:
    assert bops(1_000, 32, 32) == 1_024_000
    assert bops(1_000, 4, 8) == 32_000
    assert bops(None, 8, 8) is None


def test_integer_bits_reads_the_width_the_values_use() -> None:
    assert integer_bits(np.array([-7, 3, 7], dtype=np.int8)) == 4
    assert integer_bits(np.array([-31, 30], dtype=np.int8)) == 6
    assert integer_bits(np.array([-128, 127], dtype=np.int8)) == 8
    assert integer_bits(np.array([0, 200], dtype=np.uint8)) == 8
    assert integer_bits(np.zeros(3, dtype=np.int8)) == 1


def test_effective_bops_counts_quantized_and_float_layers() -> None:
    from tests.conftest import text_model

    rng = np.random.default_rng(0)
    model = text_model(
        "(float[N, 4] x) => (float[N, 2] z)",
        [
            "xq = QuantizeLinear (x, sx, zx)",
            "xd = DequantizeLinear (xq, sx, zx)",
            "wd = DequantizeLinear (wq, sw)",
            "y = MatMul (xd, wd)",
            "z = MatMul (y, wf)",
        ],
        {"sx": np.array(0.1, np.float32), "zx": np.array(0, np.uint8), "sw": np.array(0.05, np.float32),
         "wq": rng.integers(-7, 8, (4, 3)).astype(np.int8), "wf": rng.standard_normal((3, 2)).astype(np.float32)},
    )
    counted = effective_bops(model, {"x": [1, 4]}, bits_a=8)
    # 4x3 MatMul: 12 MACs at 8 (activation) x 4 (weights in [-7, 7]); 3x2 float MatMul: 6 MACs at 32 x 32
    assert counted == {"macs": 18, "bops": 12 * 8 * 4 + 6 * 32 * 32, "quantized_mac_fraction": 12 / 18,
                       "unknown_mac_nodes": 0}
    assert effective_bops(model, {"x": [5, 4]}, bits_a=8)["macs"] == 5 * 18


def test_kl_matches_a_direct_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    ref, out = rng.standard_normal((6, 10)) * 3, rng.standard_normal((6, 10)) * 3
    p = np.exp(ref) / np.exp(ref).sum(axis=1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(kl_divergence(ref, out), (p * np.log(p / q)).sum(axis=1), rtol=1e-10)
    np.testing.assert_allclose(kl_divergence(ref, ref), 0.0, atol=1e-12)
    assert (kl_divergence(ref, out) > 0).all()


def test_agreement_and_cosine() -> None:
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    out = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 4.0], [2.0, 0.0, 1.0]])
    assert top1_agreement(ref, out) == 0.5
    expected = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(ref, out)]
    np.testing.assert_allclose(cosine(ref, out), expected, rtol=1e-12)
    record = classifier_fidelity(ref, out, np.array([0, 2, 2, 0]))
    assert record["top1_agreement"] == 0.5 and record["accuracy"] == 1.0
    assert record["cosine_min"] == pytest.approx(min(expected))


def test_logistic_probe_separates_and_scores_embeddings() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    x = rng.standard_normal((200, 5)) + 2.5 * labels[:, None] * np.array([1, 0, 0, 0, 0])
    weights = fit_logistic(x[:100], labels[:100])
    assert (predict_logistic(weights, x[100:]) == labels[100:]).mean() > 0.85
    same = embedding_fidelity(x, x.copy(), labels, 100)
    assert same["top1_agreement"] == 1.0 and same["cosine_mean"] == pytest.approx(1.0)
    flipped = embedding_fidelity(x, -x, labels, 100)
    assert flipped["cosine_mean"] == pytest.approx(-1.0) and flipped["accuracy"] < 0.5


# --------------------------------------------------------------------------- README
RESULTS_MD = f"# results\n\n{KEY_START}\n| a | b |\n|---|---|\n| 1 | 2 |\n{KEY_END}\nmore\n"


def test_readme_section_is_appended_then_replaced_idempotently() -> None:
    readme = "# onnxopt\n\nIntro.\n"
    once = update_readme_text(readme, RESULTS_MD)
    assert once.startswith(readme.rstrip("\n"))
    assert README_START in once and README_END in once and "| 1 | 2 |" in once
    assert "bench/results/fidelity_vs_bops.png" in once
    assert update_readme_text(once, RESULTS_MD) == once
    changed = update_readme_text(once + "\n## Later section\n", RESULTS_MD.replace("| 1 | 2 |", "| 3 | 4 |"))
    assert "| 3 | 4 |" in changed and "| 1 | 2 |" not in changed and changed.endswith("## Later section\n")
    assert changed.count(README_START) == 1


def test_readme_needs_the_key_table_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        update_readme_text("# x\n", "no markers here")


# --------------------------------------------------------------------------- end to end
@pytest.mark.zoo
def test_tiny_run_writes_results_and_marks_absent_configs(tmp_path: Path, zoo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import suite

    monkeypatch.setenv("ONNXOPT_ZOO_CACHE", str(zoo_cache))
    absent = Config("onnxopt_not_landed", "not landed", "onnxopt", passes=("@default", "no-such-pass"))
    monkeypatch.setattr(configs, "CONFIGS", (*configs.CONFIGS, absent))
    monkeypatch.setitem(configs.CONFIG_BY_NAME, absent.name, absent)
    out = tmp_path / "results"
    data = suite.run(quick=True, out=out, models=["resnet20"], config_names=["onnxopt_default", absent.name],
                     command="test", plots=False)

    saved = json.loads((out / "results.json").read_text())
    records = saved["models"]["resnet20"]["configs"]
    assert set(records) == {"fp32", "onnxopt_default", absent.name}
    assert records[absent.name] == {"status": "absent", "detail": "absent (pass not landed): no-such-pass"}
    default, fp32 = records["onnxopt_default"], records["fp32"]
    assert default["status"] == "ok" and fp32["bn"] > 0 and default["bn"] == 0
    assert default["fidelity"]["top1_agreement"] == 1.0 and default["fidelity"]["kl_mean"] < 1e-8
    assert default["bops"] == default["macs"] * 32 * 32 and default["macs"] == fp32["macs"] > 0
    assert default["seconds"] > 0 and default["peak_rss_mb"] >= default["baseline_rss_mb"] > 0
    for threads in ("1", "2"):
        assert default["latency"][threads]["runs"] >= 20
        assert fp32["latency"][threads]["speedup_vs_fp32"] == 1.0
    assert data["models"]["resnet20"]["latency"]["1"]["samples_ms"].keys() == {"fp32", "onnxopt_default"}

    markdown = (out / "RESULTS.md").read_text()
    assert KEY_START in markdown and "absent (pass not landed): no-such-pass" in markdown
    absent_row = next(line for line in markdown.splitlines() if line.startswith("| not landed |"))
    assert set(absent_row.split("|")[4:-1]) == {" — "}  # no figure for an absent configuration (col 3: its bits)


def test_bench_each_model_keeps_going_after_one_model_fails() -> None:
    from bench.fidelity import bench_each_model

    seen = []

    def one(name, workdir):
        seen.append(workdir.is_dir())
        if name == "efficientnet_lite0":
            raise ValueError("boom")
        return {"name": name}

    results = bench_each_model(["efficientnet_lite0", "mobilenet_v2"], "test_each_", one)
    assert seen == [True, True]
    assert results == {"efficientnet_lite0": {"name": "efficientnet_lite0", "title": "EfficientNet-Lite0", "error": "ValueError: boom"},
                       "mobilenet_v2": {"name": "mobilenet_v2"}}


def test_config_rows_in_order_skip_missing_and_pad_failures() -> None:
    from bench.common import config_rows

    configs = {"a": "A", "b": "B", "c": "C"}
    records = {"c": {"x": 3}, "a": {"x": 1}, "b": {"error": "boom"}}
    rows = config_rows(configs, records, 4, lambda key, rec: [key, str(rec["x"]), "!"])
    assert rows == [["A", "a", "1", "!"], ["B", "did not run: boom", "-", "-"], ["C", "c", "3", "!"]]
    assert config_rows(configs, {}, 4, lambda key, rec: []) == []
