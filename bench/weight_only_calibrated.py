"""Weight-only W4 (block 32) with row weights measured on calibration samples
(``calibration_data``) against the default (LayerNorm-derived row weights where a LayerNorm
feeds the layer, none elsewhere).

* all-MiniLM-L6-v2 (folded by ``onnxopt.optimize`` first): mean and min cosine of the
  sentence embeddings of ``bench.quantize.SENTENCES`` (the evaluation sentences) to FP32's,
  and the per-sentence paired difference to the default (mean ± standard error).
  Calibrated on two disjoint sets of 32 other English sentences (CALIBRATION_A / _B below,
  none of them an evaluation sentence), padded to the export's 128 tokens like the
  evaluation; with the token mask (``attention_mask``, the default ``calibration_mask="auto"``)
  and without it (``calibration_mask="none"``: the padding positions count too).
* the synthetic decoder stack (``bench.weight_only.synthetic_decoder``): relative output
  error against FP32 on the random tokens of ``bench.decode`` (seed 5), calibrated on
  8 × 16 other random tokens (seeds 11 and 12).

accuracy_level 0 (float products: the weights' effect alone), as bench.weight_only.

Run: ``python -m bench.weight_only_calibrated`` → bench/results/weight_only_calibrated.md/json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import onnxopt
from bench.common import environment, ort_session, table, write_json_and_markdown
from bench.weight_only import minilm_inputs, save_external, synthetic_decoder

RESULTS = Path(__file__).resolve().parent / "results"
D_MODEL = 2048
CALIBRATION_A = (
    "The river flooded the lower fields after three days of heavy rain.",
    "Our team meeting has been moved to the large conference room.",
    "I bought a second-hand bicycle with a broken front light.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The invoice is attached; payment is due within thirty days.",
    "He forgot his umbrella and got soaked on the way home.",
    "The concert tickets sold out in less than ten minutes.",
    "Remember to water the tomatoes before you leave for the weekend.",
    "Stock markets fell sharply after the announcement.",
    "The children built a sandcastle near the pier.",
    "You have been selected to receive a $1000 gift card, reply now!",
    "The library extended its opening hours during exam season.",
    "Her novel was translated into twelve languages.",
    "This soup needs more salt and a little pepper.",
    "The software update fixed the login problem on older phones.",
    "A strong wind knocked down several trees in the park.",
    "Could you review my pull request before lunch?",
    "The hotel room was clean but the breakfast was disappointing.",
    "Astronomers observed a comet passing close to the sun.",
    "The bakery on the corner sells the best croissants in town.",
    "URGENT: your parcel could not be delivered, confirm your address here.",
    "The doctor recommended a short walk after every meal.",
    "They renovated the old factory into modern apartments.",
    "The final exam covers chapters four through nine.",
    "My grandmother taught me how to knit scarves.",
    "The airline lost my suitcase on the connecting flight.",
    "Electric cars are becoming cheaper every year.",
    "The volunteers cleaned up the beach on Saturday morning.",
    "I can't believe how fast this summer went by.",
    "The mayor promised to repair the bridge before winter.",
    "Quantum computers may one day break current encryption.",
    "We watched the sunset from the top of the hill.",
)
CALIBRATION_B = (
    "The printer on the third floor is out of toner again.",
    "A small earthquake shook the coastal town overnight.",
    "Please bring your passport and a copy of the booking.",
    "The orchestra rehearsed the symphony for six weeks.",
    "Win a brand new car by answering three simple questions!",
    "The dog barked at every person who walked past the gate.",
    "Our quarterly revenue exceeded the forecast by five percent.",
    "The recipe calls for two eggs and a cup of flour.",
    "Traffic on the highway was stuck for almost an hour.",
    "She painted the kitchen walls a pale shade of green.",
    "The museum guide explained the history of the old castle.",
    "The vaccine trial enrolled more than ten thousand volunteers.",
    "I think the second movie was better than the first one.",
    "The farmer sold fresh strawberries at the market.",
    "The server crashed during the busiest hour of the sale.",
    "Glaciers in the Alps are melting faster than expected.",
    "Let's grab a coffee after the presentation.",
    "The referee showed a red card in the first half.",
    "He is learning Japanese to prepare for his trip.",
    "The new law takes effect at the beginning of next year.",
    "Your subscription will renew automatically unless cancelled.",
    "The kids were excited about the snow day.",
    "The chef prepared a five-course dinner for the guests.",
    "Bees play a crucial role in pollinating crops.",
    "This keyboard is too loud for an open office.",
    "The ferry leaves the harbour every two hours.",
    "The students presented their robotics project to the jury.",
    "Prices at the supermarket have gone up again.",
    "The lighthouse has guided ships for over a century.",
    "My phone battery dies before the end of the day.",
    "The company announced plans to hire two hundred engineers.",
    "The garden looks beautiful in the early spring.",
)


def quantize(src: Path, dst: Path, **options: Any) -> dict[str, Any]:
    start = time.perf_counter()
    model, report = onnxopt.optimize(src, preset="weight-only", weight_bits=4, block_size=32, accuracy_level=0, **options)
    seconds = time.perf_counter() - start
    save_external(model, dst)
    stats = next(p for p in report.passes if p.name == "weight-only").stats
    return {"quant_seconds": round(seconds, 1), "layers_row_weights": stats["layers_row_weights"],
            "calibration_mask": stats.get("calibration_mask"), "relative_weight_error": stats["relative_error_mean"]}


def embeddings(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort_session(path, "all")
    count = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(count)])


def cosines(out: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))


def bench_minilm() -> dict[str, Any]:
    from models.pretrained import minilm_embedder, minilm_tokenize

    raw, feeds, seq_len = minilm_inputs()
    tokenizer, _ = minilm_embedder()
    folded, _ = onnxopt.optimize(raw)
    configs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_wocal_minilm_") as tmp:
        work = Path(tmp)
        src = save_external(folded, work / "fp32.onnx")
        reference = embeddings(src, feeds)
        runs = {"default": {}}
        for name, sentences in (("A", CALIBRATION_A), ("B", CALIBRATION_B)):
            data = work / f"calibration_{name}.npz"
            np.savez(data, **minilm_tokenize(tokenizer, sentences, seq_len))
            runs[f"calibration {name}"] = {"calibration_data": str(data)}
            runs[f"calibration {name}, no token mask"] = {"calibration_data": str(data), "calibration_mask": "none"}
        per_sentence = {}
        for key, options in runs.items():
            dst = work / f"{len(configs)}.onnx"
            configs[key] = quantize(src, dst, **options)
            per_sentence[key] = cosines(embeddings(dst, feeds), reference)
            configs[key].update(cosine_mean=float(per_sentence[key].mean()), cosine_min=float(per_sentence[key].min()))
            log(f"  minilm {key}: {configs[key]}")
        for key, values in per_sentence.items():
            diff = values - per_sentence["default"]
            configs[key].update(paired_gain=float(diff.mean()), paired_gain_se=float(diff.std(ddof=1) / np.sqrt(diff.size)) if key != "default" else 0.0,
                                sentences_better=int((diff > 0).sum()))
    return {"sentences": len(reference), "seq_len": seq_len, "calibration_sentences": [len(CALIBRATION_A), len(CALIBRATION_B)], "configs": configs}


def bench_synthetic(layers: int) -> dict[str, Any]:
    configs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_wocal_synthetic_") as tmp:
        work = Path(tmp)
        src = save_external(synthetic_decoder(layers), work / "fp32.onnx")
        tokens = {"x": np.random.default_rng(5).standard_normal((1, 16, D_MODEL)).astype(np.float32)}
        reference = ort_session(src, "all").run(None, tokens)[0]
        runs: dict[str, dict[str, Any]] = {"default": {}}
        for seed in (11, 12):
            data = work / f"calibration_{seed}.npz"
            np.savez(data, x=np.random.default_rng(seed).standard_normal((8, 16, D_MODEL)).astype(np.float32))
            runs[f"calibration seed {seed}"] = {"calibration_data": str(data)}
        for key, options in runs.items():
            dst = work / f"{len(configs)}.onnx"
            configs[key] = quantize(src, dst, **options)
            out = ort_session(dst, "all").run(None, tokens)[0]
            configs[key]["relative_error"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            log(f"  synthetic {key}: {configs[key]}")
    return {"layers": layers, "configs": configs}


def log(message: str) -> None:
    print(message, flush=True)


def markdown(data: dict[str, Any]) -> str:
    lines = ["# Weight-only W4 with row weights measured on calibration samples", "",
             (f"`{data['command']}` — W4, block 32, uint8 zero points, clipping search, accuracy_level 0. Default: row weights "
              "γ² + β² where a LayerNorm feeds the layer, none elsewhere; calibration: E[x_k²] of every layer input measured on the "
              "samples (`calibration_data`). Samples are never evaluation inputs."), ""]
    if "minilm" in data:
        m = data["minilm"]
        rows = [[key, f"{r['cosine_mean']:.5f}", f"{r['cosine_min']:.5f}",
                 "-" if key == "default" else f"{r['paired_gain']:+.5f} ± {r['paired_gain_se']:.5f}",
                 "-" if key == "default" else f"{r['sentences_better']}/{m['sentences']}",
                 ", ".join(f"{n} {s}" for s, n in r["layers_row_weights"].items()), str(r["calibration_mask"] or "-")]
                for key, r in m["configs"].items()]
        lines += [(f"## all-MiniLM-L6-v2 ({m['sentences']} evaluation sentences, padded to {m['seq_len']} tokens; "
                   f"calibration sets A and B of {m['calibration_sentences'][0]} and {m['calibration_sentences'][1]} other sentences)"), "",
                  *table(["row weights", "mean cosine", "min cosine", "paired gain over default (± s.e.)", "sentences better",
                          "layers by row-weight source", "token mask"], rows), ""]
    if "synthetic" in data:
        s = data["synthetic"]
        rows = [[key, f"{r['relative_error']:.5f}", ", ".join(f"{n} {k}" for k, n in r["layers_row_weights"].items()), f"{r['quant_seconds']:.0f}"]
                for key, r in s["configs"].items()]
        lines += [f"## Synthetic decoder stack ({s['layers']} layers, D 2048, FF 8192; calibration: 8 × 16 random tokens)", "",
                  *table(["row weights", "relative output error", "layers by row-weight source", "quantization s"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="synthetic decoder layers (default 4, as bench.decode)")
    parser.add_argument("--skip", default="", help="comma-separated: synthetic, minilm")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    command = "python -m bench.weight_only_calibrated " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    data: dict[str, Any] = {"command": command.strip(), "environment": environment()}
    if "minilm" not in skip:
        data["minilm"] = bench_minilm()
    if "synthetic" not in skip:
        data["synthetic"] = bench_synthetic(args.layers)
    print(write_json_and_markdown(Path(args.out), "weight_only_calibrated", data, markdown(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
