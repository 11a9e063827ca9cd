"""Property test of fold-batchnorm on random DAGs.

Hypothesis builds random graphs from Conv (1×1 unpadded, 3×3 padded, grouped), BN (with
negative scales), Relu, Add, Add/Sub of a constant (scalar or per channel), Concat, Max/Average pooling (with and without counting the
padding), Identity, a Reshape whose target shape is computed at run time (shape inference
cannot see through it) and a Gemm head, sometimes exposing an inner tensor as a second graph
output.  The input has static, symbolic or ``-1`` batch and spatial dims (opset 11, 12 or
17), and some graphs carry value_info without a shape for some tensors (as exporters write),
which hides what shape inference would find.  For every graph: onnx.checker (full) accepts
the result, ORT outputs match the original within 1e-5 relative, every BN the report calls
folded is gone, the BNs left are exactly the ones it refused, and fold-batchnorm never
leaves more BNs than the classic fold-conv-bn.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import assert_equivalent, run_passes

SPATIAL = 6
OPS = ("conv1", "conv3", "gconv", "bn", "bn", "bn", "relu", "add", "concat", "maxpool", "avgpool", "identity", "bias", "subconst", "opaque")
#: how the input declares its batch and spatial dims: (batch, spatial)
DIM_STYLES = ((1, SPATIAL), ("N", SPATIAL), (-1, SPATIAL), ("N", "H"), (-1, -1))
#: the shape the random feed gets when the input's dims are dynamic
FEED_BATCH, FEED_SPATIAL = 2, 5


class GraphBuilder:
    def __init__(self, rng: np.random.Generator, channels: int) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.tensors: list[tuple[str, int]] = [("x", channels)]

    def const(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], channels: int, **attrs: object) -> None:
        index = len(self.nodes)
        out = f"t{index}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{index}", **attrs))
        self.tensors.append((out, channels))

    def add_op(self, kind: str, pick: int, pick2: int) -> None:
        # mostly extend one of the three newest tensors: deep chains rather than a bush
        name, c = self.tensors[-1 - pick % min(3, len(self.tensors))]
        i = len(self.nodes)
        rng = self.rng
        if kind in ("conv1", "conv3"):
            k = 1 if kind == "conv1" else 3
            c_out = int(rng.integers(2, 6))
            w = self.const(f"w{i}", rng.standard_normal((c_out, c, k, k)) * 0.5)
            inputs = [name, w] + ([self.const(f"b{i}", rng.standard_normal(c_out))] if rng.random() < 0.5 else [])
            self.node("Conv", inputs, c_out, pads=[k // 2] * 4)
        elif kind == "gconv":
            if c % 2:
                return self.add_op("conv1", pick, pick2)
            c_out = 2 * int(rng.integers(1, 3))
            w = self.const(f"w{i}", rng.standard_normal((c_out, c // 2, 1, 1)) * 0.5)
            self.node("Conv", [name, w], c_out, group=2)
        elif kind == "bn":
            gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
            params = [
                self.const(f"g{i}", gamma),
                self.const(f"be{i}", rng.normal(0, 1, c)),
                self.const(f"m{i}", rng.normal(0, 1, c)),
                self.const(f"v{i}", rng.uniform(0.5, 2.0, c)),
            ]
            self.node("BatchNormalization", [name, *params], c, epsilon=1e-3)
        elif kind == "relu":
            self.node("Relu", [name], c)
        elif kind == "identity":
            self.node("Identity", [name], c)
        elif kind == "maxpool":
            self.node("MaxPool", [name], c, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif kind == "avgpool":
            self.node("AveragePool", [name], c, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=int(rng.integers(0, 2)))
        elif kind in ("bias", "subconst"):
            shape = (1, c, 1, 1) if rng.random() < 0.7 else ()
            k = self.const(f"k{i}", rng.standard_normal(shape))
            inputs = [name, k] if kind == "bias" or rng.random() < 0.5 else [k, name]
            self.node("Add" if kind == "bias" else "Sub", inputs, c)
        elif kind == "add":
            same = [t for t in self.tensors if t[1] == c and t[0] != name]
            if not same:
                return self.add_op("relu", pick, pick2)
            other = same[pick2 % len(same)][0]
            self.node("Add", [name, other], c)
        elif kind == "concat":
            other, c2 = self.tensors[pick2 % len(self.tensors)]
            self.node("Concat", [name, other], c + c2, axis=1)
        elif kind == "opaque":  # Reshape to [N, C, -1, W] read from Shape(t): the same shape, unknown to inference
            ints = {f"i{i}_{k}": np.array(v, np.int64) for k, v in (("0", [0]), ("2", [2]), ("3", [3]), ("4", [4]), ("m1", [-1]))}
            self.initializers.extend(numpy_helper.from_array(v, k) for k, v in ints.items())
            p = f"i{i}_"
            self.nodes.append(helper.make_node("Shape", [name], [f"s{i}"], name=f"shape{i}"))
            self.nodes.append(helper.make_node("Slice", [f"s{i}", p + "0", p + "2"], [f"nc{i}"], name=f"slice_nc{i}"))
            self.nodes.append(helper.make_node("Slice", [f"s{i}", p + "3", p + "4"], [f"w{i}_"], name=f"slice_w{i}"))
            self.nodes.append(helper.make_node("Concat", [f"nc{i}", p + "m1", f"w{i}_"], [f"shape_of{i}"], name=f"shape_concat{i}", axis=0))
            self.node("Reshape", [name, f"shape_of{i}"], c)

    def model(self, extra_output: int | None, dims: tuple = (1, SPATIAL), opset: int = 17, hidden: int = 0) -> onnx.ModelProto:
        """The graph; ``dims`` = (batch, spatial) of the input; the value_info of every
        ``hidden``-th computed tensor is given without a shape (0: none)."""
        batch, spatial = dims
        height, width = ("H", "W") if spatial == "H" else (spatial, spatial)
        n = len(self.nodes)
        read = {name for node in self.nodes for name in node.input}
        dangling = [(t, ch) for t, ch in self.tensors[1:] if t not in read] or [self.tensors[-1]]
        if len(dangling) > 1:  # keep every branch alive: the head reads all of them
            joined = "joined"
            self.nodes.append(helper.make_node("Concat", [t for t, _ in dangling], [joined], name="head_concat", axis=1))
            dangling = [(joined, sum(ch for _, ch in dangling))]
        last, c = dangling[0]
        self.nodes.append(helper.make_node("GlobalAveragePool", [last], ["pooled"], name="head_pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="head_flatten"))
        w = self.const("head_w", self.rng.standard_normal((3, c)))
        b = self.const("head_b", self.rng.standard_normal(3))
        self.nodes.append(helper.make_node("Gemm", ["flat", w, b], ["logits"], name="head_gemm", transB=1))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])]
        if extra_output is not None and n > 1:
            name, ch = self.tensors[1 + extra_output % (len(self.tensors) - 1)]
            if name != last:
                outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, ch, height, width]))
        shown = {o.name for o in outputs}
        value_info = [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name, _ in (self.tensors[1::hidden] if hidden else []) if name not in shown
        ]
        graph = helper.make_graph(
            self.nodes,
            "random_dag",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, self.tensors[0][1], height, width])],
            outputs,
            initializer=self.initializers,
            value_info=value_info,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        return model


@st.composite
def random_dags(draw: st.DrawFn) -> onnx.ModelProto:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    builder = GraphBuilder(rng, draw(st.integers(2, 4)))
    steps = draw(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50)), min_size=2, max_size=12))
    for kind, pick, pick2 in steps:
        builder.add_op(kind, pick, pick2)
    extra = draw(st.one_of(st.none(), st.integers(0, 50)))
    dims = draw(st.sampled_from(DIM_STYLES))
    return builder.model(extra, dims, draw(st.sampled_from((11, 12, 17))), draw(st.sampled_from((0, 0, 1, 2, 3))))


def _feed_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Concrete input shapes for the ORT comparison (dynamic dims get a batch of 2, 5×5)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 0 for d in dims]
    return {"x": [sizes[0] or FEED_BATCH, sizes[1], sizes[2] or FEED_SPATIAL, sizes[3] or FEED_SPATIAL]}


def _bn_left(proto: onnx.ModelProto) -> int:
    return sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_fold_batchnorm_on_random_dags(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto, full_check=True)
    proto, _ = run_passes(proto, "eliminate-dead")  # random graphs have dead branches
    optimized, report = run_passes(proto, "fold-batchnorm")  # validate=True: full checker after the pass
    result = report.passes[0]
    remaining = {n.name for n in optimized.graph.node if n.op_type == "BatchNormalization"}
    folded = {record["bn"] for record in result.stats["folds"]}
    original = {n.name for n in proto.graph.node if n.op_type == "BatchNormalization"}
    assert not folded & remaining
    assert remaining | folded == original
    assert len(remaining) == result.stats["bn_kept"] == len(result.refusals)
    shapes = _feed_shapes(proto)
    assert_equivalent(proto, optimized, input_shapes=shapes)
    classic, _ = run_passes(proto, "fold-conv-bn")
    assert len(remaining) <= _bn_left(classic), result.refusals  # the N&S fold never folds fewer
    assert_equivalent(proto, classic, input_shapes=shapes)
