"""The cases of the third-party benchmark (:mod:`bench.third_party`): the models and how
each is exported the way a third party would (torch's default TorchScript export, BN folded;
optionally moved into both branches of an ``If``), the configurations and goals compared, and
the count of the constant-weight layers a file holds and how many of them are quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
from onnx import TensorProto, helper

THREADS = (1, 2)
LAYER_OPS = ("Conv", "Gemm", "MatMul")
TITLES = {"mobilenet_v2": "MobileNetV2", "efficientnet_lite0": "EfficientNet-Lite0", "fashion_mnist": "Fashion-MNIST BN-ResNet"}
GOALS = {"coverage": 0.95, "vs_static": 1.05, "agreement_points": 2.0, "kl_ratio": 1.5, "exit_code": 10}
CONFIGS = ("fp32", "onnxopt", "ort_static")
NO_SPIQ = "onnxopt_no_spiq"  # diagnostic: the same run with --no-spiq (fidelity only, opset-17 dynamic exports)
#: diagnostic: the same run with each --act-ranges mode named (fidelity only, opset-17 dynamic exports)
ACT_RANGES = {f"onnxopt_{mode}": ["--act-ranges", mode] for mode in ("minmax", "moments", "percentile")}
DIAGNOSTICS = {NO_SPIQ: ["--no-spiq"], **ACT_RANGES}


@dataclass(frozen=True)
class Case:
    model: str  # a key of TITLES
    opset: int
    dynamic: bool = True
    wrap_if: bool = False

    @property
    def key(self) -> str:
        return f"{self.model}_op{self.opset}_{'dyn' if self.dynamic else 'static'}{'_if' if self.wrap_if else ''}"

    @property
    def title(self) -> str:
        batch = "dynamic batch" if self.dynamic else "static batch 1"
        return f"{TITLES[self.model]}, opset {self.opset}, {batch}" + (", body inside If" if self.wrap_if else "")


CASES = (
    *(Case(model, opset) for model in ("mobilenet_v2", "efficientnet_lite0", "fashion_mnist") for opset in (11, 12, 17)),
    Case("mobilenet_v2", 17, dynamic=False),
    Case("fashion_mnist", 17, wrap_if=True),
)


# --------------------------------------------------------------------------- models
def torch_model(name: str) -> tuple[Any, tuple[int, ...]]:
    """(module in eval mode, input shape of one sample) with the real weights."""
    if name == "fashion_mnist":
        from onnxopt.models.train_fashion_mnist import load_trained, train_and_export

        return load_trained(train_and_export(log=False)["state_dict"]), (1, 28, 28)
    from onnxopt.models.pretrained import load_pretrained

    return load_pretrained(name).eval(), (3, 224, 224)


def export_plain(module: Any, sample_shape: Sequence[int], path: Path, opset: int, dynamic: bool) -> Path:
    """torch's default TorchScript export (BN folded, no statistics left), input ``input``."""
    import warnings

    import torch

    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.zeros(1, *sample_shape), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return path


def _prefixed(graph: onnx.GraphProto, prefix: str, keep: set[str]) -> onnx.GraphProto:
    """A branch body: ``graph``'s nodes with every tensor not in ``keep`` renamed ``prefix + name``."""
    def rename(name: str) -> str:
        return name if not name or name in keep else prefix + name

    body = onnx.GraphProto(name=prefix.rstrip("/"))
    for node in graph.node:
        copy = body.node.add()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
    for out in graph.output:
        info = body.output.add()
        info.CopyFrom(out)
        info.name = rename(out.name)
    return body


def wrap_in_if(src: Path, dst: Path) -> Path:
    """``src`` with its whole body in both branches of ``If(ReduceMax(input) > -1e30)``: a
    condition that depends on the input, so no optimizer can fold the If away.  The
    initializers stay in the main graph (read from the outer scope), as exporters emit them."""
    model = onnx.load(str(src))
    graph = model.graph
    keep = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    x = graph.input[0].name
    nodes = [
        helper.make_node("ReduceMax", [x], ["if_max"], keepdims=0),
        helper.make_node("Greater", ["if_max", "if_floor"], ["if_cond"]),
        helper.make_node("If", ["if_cond"], [o.name for o in graph.output],
                         then_branch=_prefixed(graph, "then/", keep), else_branch=_prefixed(graph, "else/", keep)),
    ]
    floor = helper.make_tensor("if_floor", TensorProto.FLOAT, [], [-1e30])
    wrapped = helper.make_graph(nodes, graph.name + "_in_if", list(graph.input), list(graph.output), [*graph.initializer, floor])
    out = helper.make_model(wrapped, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    onnx.checker.check_model(out, full_check=True)
    onnx.save(out, str(dst))
    return dst


def export_case(case: Case, workdir: Path) -> Path:
    module, shape = torch_model(case.model)
    plain = export_plain(module, shape, workdir / f"{case.key.removesuffix('_if')}.onnx", case.opset, case.dynamic)
    return wrap_in_if(plain, workdir / f"{case.key}.onnx") if case.wrap_if else plain


# --------------------------------------------------------------------------- layers
def subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found += subgraphs(sub)
    return found


def layer_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Conv/Gemm/MatMul nodes with a constant weight (input 1: an initializer or a Constant of any
    enclosing scope, or a DequantizeLinear of one), in every (sub)graph; how many read a DequantizeLinear."""
    graphs = subgraphs(model.graph)
    constants = {t.name for g in graphs for t in g.initializer}
    constants |= {o for g in graphs for n in g.node if n.op_type == "Constant" for o in n.output}
    dequantized = {o for g in graphs for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in constants for o in n.output}
    layers = [n for g in graphs for n in g.node if n.op_type in LAYER_OPS and n.domain in ("", "ai.onnx") and len(n.input) > 1]
    weighted = [n for n in layers if n.input[1] in constants or n.input[1] in dequantized]
    in_subgraphs = sum(1 for g in graphs[1:] for n in g.node if n.op_type in LAYER_OPS)
    return {"layers": len(weighted), "quantized": sum(1 for n in weighted if n.input[1] in dequantized), "in_subgraphs": in_subgraphs}


def coverage(source: onnx.ModelProto, output: onnx.ModelProto) -> dict[str, Any]:
    """Layers quantized in ``output`` of the constant-weight layers of ``source``."""
    before, after = layer_counts(source), layer_counts(output)
    share = after["quantized"] / before["layers"] if before["layers"] else 0.0
    return {"layers": before["layers"], "quantized": after["quantized"], "share": share,
            "layers_in_output": after["layers"], "layers_in_subgraphs": before["in_subgraphs"]}
