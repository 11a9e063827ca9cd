"""``onnxopt analyze accumulators MODEL``: accumulator widths of a quantized model
(docs/modular-arithmetic.md).

Per quantized layer (QDQ Conv/MatMul/Gemm, as the ``quantize`` pass emits): the worst-case
accumulator magnitude ``Σ|q_w|·max|q_x| + |q_b|`` (max over output channels) and the signed
bits it needs, ``⌈log2(v + 1)⌉ + 1``.  With sample inputs (``--inputs x.npz``, batch on axis
0) the plain integer model runs in ONNX Runtime and, for ``--bits B``, the share of
accumulator values outside ``[−2^{B−1}, 2^{B−1} − 1]`` (the observed overflow rate) and the
largest observed magnitude are reported.  A float model can be quantized on the fly with
``--quantize wNaM`` (data-free, as ``onnxopt --quantize``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import numpy as np
import onnx

from .errors import PipelineError
from .graph import import_graph, node_label
from .io import load_model, protected_inputs
from .output import check_output_path, write_text_atomic


def accumulator_report(model: onnx.ModelProto, inputs: dict[str, np.ndarray] | None = None, bits: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One record per integer-convertible layer: required bits, worst case and, with
    ``inputs``, the observed max |acc| and overflow rate for each width in ``bits``."""
    from onnxopt.passes.modular import integer_layers

    graph = import_graph(model)
    found, _ = integer_layers(graph)
    records = [
        {"layer": node_label(item.layer), "op": item.layer.op, "worst_case": int(item.worst_case().max()), "required_bits": item.required_bits(), "x_max": item.x_max}
        for item in found
    ]
    if inputs is None or not records:
        return records
    accumulators = observed_accumulators(model, inputs)
    for record in records:
        values = accumulators.get(record["layer"])
        if values is None:
            continue
        record["observed_max"] = int(np.abs(values).max())
        record["observed_bits"] = int(np.ceil(np.log2(record["observed_max"] + 1)) + 1)
        record["overflow_rate"] = {int(b): float(np.mean((values < -(2 ** (b - 1))) | (values > 2 ** (b - 1) - 1))) for b in bits}
    return records


def observed_accumulators(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer label → all int32 accumulator values of the plain integer model on ``inputs``
    (the samples stack on axis 0; fed one at a time, or by the model's fixed batch size)."""
    import onnxopt
    from onnxopt.runtime import session

    integer, report = onnxopt.optimize(model, passes=["modular-accumulator"], accumulator_bits=None)
    layers = report.passes[0].stats.get("layers", [])
    probe = onnx.ModelProto()
    probe.CopyFrom(integer)
    for record in layers:
        probe.graph.output.append(onnx.ValueInfoProto(name=record["accumulator"]))
    sess = session(probe)
    names = [record["accumulator"] for record in layers]
    count = len(next(iter(inputs.values())))
    first = model.graph.input[0].type.tensor_type.shape.dim
    step = first[0].dim_value if first and first[0].HasField("dim_value") and first[0].dim_value > 0 else 1  # fixed batch
    collected: dict[str, list[np.ndarray]] = {r["layer"]: [] for r in layers}
    for index in range(0, count - step + 1, step):
        feeds = {key: value[index : index + step] for key, value in inputs.items()}
        for record, value in zip(layers, sess.run(names, feeds)):
            collected[record["layer"]].append(np.asarray(value).reshape(-1))
    return {layer: np.concatenate(chunks) for layer, chunks in collected.items() if chunks}


def format_table(records: list[dict[str, Any]], bits: Sequence[int]) -> str:
    header = ["layer", "op", "worst |acc|", "bits needed", "observed bits"] + [f"overflow @{b}" for b in bits]
    rows = [
        [r["layer"], r["op"], str(r["worst_case"]), str(r["required_bits"]), str(r.get("observed_bits", "-"))]
        + [f"{100 * r['overflow_rate'][b]:.3f}%" if "overflow_rate" in r else "-" for b in bits]
        for r in records
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxopt analyze", description="Analyses of a model (no model is written).")
    sub = parser.add_subparsers(dest="analysis", required=True)
    acc = sub.add_parser("accumulators", help="worst-case and observed accumulator widths of the quantized layers (docs/modular-arithmetic.md)")
    acc.add_argument("model", help="QDQ-quantized .onnx (or a float model with --quantize)")
    acc.add_argument("--inputs", metavar="X.npz", help="sample inputs (batch on axis 0) for observed overflow rates")
    acc.add_argument("--bits", type=int, action="append", default=[], metavar="B", help="accumulator width for the overflow rate (repeatable)")
    acc.add_argument("--quantize", metavar="wNaM", help="quantize a float model first (data-free quantize pass)")
    acc.add_argument("--input-range", metavar="LO,HI", help="with --quantize: range of the graph input")
    acc.add_argument("--report", metavar="FILE", help="write the records as JSON")
    return parser


def main(argv: Sequence[str]) -> int:
    from .cli import run_guarded

    from .flags import join_negative_values

    args = build_parser().parse_args(join_negative_values(argv))
    return run_guarded(lambda: _accumulators(args))


def _accumulators(args: argparse.Namespace) -> int:
    from .flags import parse_bits, parse_pair
    from .runtime import load_inputs

    protected = protected_inputs(args.model)
    if args.report:
        check_output_path(args.report, protected=protected, what="report")
    model = load_model(args.model)
    if args.quantize:
        import onnxopt

        weight_bits, act_bits = parse_bits(args.quantize)
        options: dict[str, Any] = {"weight_bits": weight_bits, "act_bits": act_bits}
        if args.input_range:
            options["input_range"] = parse_pair(args.input_range)
        model, _ = onnxopt.optimize(model, preset="quantize", **options)
    if any(b < 2 or b > 31 for b in args.bits):
        raise PipelineError("--bits must be in 2..31")
    inputs = load_inputs(args.inputs, model, batched=True) if args.inputs else None
    records = accumulator_report(model, inputs, args.bits)
    if not records:
        raise PipelineError("no quantized (QDQ) Conv/MatMul/Gemm layers found: quantize the model first (--quantize wNaM)")
    print(format_table(records, args.bits if inputs is not None else []))
    if args.report:
        document = json.dumps({"model": args.model, "bits": args.bits, "layers": records}, indent=1) + "\n"
        write_text_atomic(args.report, document, protected=protected, what="report")
    return 0
