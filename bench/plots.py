"""PNG plots of the suite's results (matplotlib, Agg backend; in the ``bench`` extra).

* ``fidelity_vs_bops.png``: per model, KL(FP32 ‖ config) (lower is better) against BOPs;
* ``fidelity_vs_latency.png``: the same against the 1-thread median latency;
* ``bn_counts.png``: BatchNormalization nodes left per tool and model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KL_FLOOR = 1e-7  # lossless configurations have KL ~ 0: drawn at this floor on the log axis
FAMILY_MARKERS = {"reference": "*", "onnxopt": "o", "peer": "s"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _measured(data: dict[str, Any]) -> list[str]:
    return [n for n, m in data["models"].items() if "configs" in m]


def _points(data: dict[str, Any], model: str, x_of: Any) -> list[tuple[str, str, float, float]]:
    family = {c["name"]: c["family"] for c in data["configs"]}
    points = []
    for name, record in data["models"][model]["configs"].items():
        fid = record.get("fidelity", {})
        kl = fid.get("kl_mean")
        if kl is None and "cosine_mean" in fid:
            kl = 1.0 - fid["cosine_mean"]  # embedding models: 1 - cosine
        x = x_of(record)
        if kl is not None and x:
            points.append((name, family.get(name, "peer"), float(x), max(float(kl), KL_FLOOR)))
    return points


def _scatter(data: dict[str, Any], out: Path, file: str, x_of: Any, xlabel: str, title: str) -> dict[str, str] | None:
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    models = _measured(data)
    if not models:
        return None
    cols = min(2, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models):
        floor: list[str] = []
        for name, family, x, y in _points(data, model, x_of):
            ax.scatter(x, y, marker=FAMILY_MARKERS.get(family, "s"), alpha=0.8,
                       color={"reference": "black", "onnxopt": "tab:blue"}.get(family, "tab:orange"))
            if y <= KL_FLOOR:
                floor.append(name)
                continue
            ax.annotate(name.replace("onnxopt_", "").replace("onnxoptimizer", "onnxoptzr"), (x, y), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        if floor:
            ax.annotate(f"{len(floor)} configurations without measurable change", (0.02, 0.02), xycoords="axes fraction", fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges: overlapping minor labels otherwise
        ax.set_title(data["models"][model]["title"], fontsize=9)
        ax.set_xlabel(xlabel)
        kind = data["models"][model].get("kind")
        ax.set_ylabel("1 - cosine vs FP32 (embedding)" if kind == "embedding" else "KL(FP32 || config), mean")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title} (blue: onnxopt, orange: peers; no change drawn at {KL_FLOOR:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return {"file": file, "title": title}


def _bn_counts(data: dict[str, Any], out: Path) -> dict[str, str] | None:
    plt = _pyplot()
    import numpy as np

    tools = ["fp32", "onnxopt_default", "ort_extended", "ort_all", "onnxoptimizer_fuse_bn", "onnxoptimizer_default",
             "onnxsim", "onnxslim"]
    models = _measured(data)
    tools = [t for t in tools if any(data["models"][m]["configs"].get(t, {}).get("status") == "ok" for m in models)]
    if not models or not tools:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models)), 4.0))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        counts = [(data["models"][m]["configs"].get(tool, {}).get("bn") or 0)
                  + (data["models"][m]["configs"].get(tool, {}).get("bn_as_nchwc_conv") or 0) for m in models]
        ax.bar(np.arange(len(models)) + i * width, counts, width, label=tool)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, fontsize=8)
    ax.set_ylabel("BatchNormalization left (incl. as NCHWc Conv)")
    ax.legend(fontsize=7)
    ax.set_title("BN nodes left per tool", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "bn_counts.png", dpi=110)
    plt.close(fig)
    return {"file": "bn_counts.png", "title": "BN nodes left per tool"}


def make_plots(data: dict[str, Any], out: Path) -> list[dict[str, str]]:
    """Write the PNGs into ``out``; their file names and titles (empty without matplotlib)."""
    try:
        _pyplot()
    except ImportError:
        return []
    made = [
        _scatter(data, out, "fidelity_vs_bops.png", lambda r: r.get("bops"), "BOPs (bits_w x bits_a x MACs)",
                 "Fidelity vs BOPs"),
        _scatter(data, out, "fidelity_vs_latency.png", lambda r: r.get("latency", {}).get("1", {}).get("median_ms"),
                 "ORT latency, 1 thread, median ms", "Fidelity vs latency"),
        _bn_counts(data, out),
    ]
    return [m for m in made if m]
