"""fold-constants: what is folded, what never is, the size limit, and ORT failures."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt import optimize
from onnxopt.pass_base import PassContext
from onnxopt.passes.constant_folding import FoldConstants
from onnxopt.verify import run
from tests.conftest import assert_equivalent, initializers, ops, parse, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def model(signature: str, body: str, *, check: bool = True, opsets: str = HEADER):
    return parse(f"{opsets}\n{signature} {{\n{body}\n}}", check=check)


def fold(m, **options):
    out, report = run_passes(m, "fold-constants", **options)
    return out, report.passes[0]


def test_constant_concat_reshape_target_is_folded():
    m = model(
        "g (float[2,3,4] x) => (float[2,12] y)",
        """
        a = Constant <value = int64[1] {2}> ()
        b = Constant <value = int64[1] {12}> ()
        shape = Concat <axis = 0> (a, b)
        y = Reshape(x, shape)
        """,
    )
    out, entry = fold(m)
    assert ops(out) == {"Reshape": 1}
    (target,) = initializers(out).values()
    np.testing.assert_array_equal(target, [2, 12])
    assert entry.stats == {"nodes_folded": 3} and entry.ops_removed == {"Concat": 1, "Constant": 2}
    assert_equivalent(m, out)


def test_constant_weight_arithmetic_is_folded():
    m = model(
        "g (float[1,2,4,4] x) => (float[1,3,4,4] y)",
        """
        w = Constant <value = float[3,2,1,1] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> ()
        s = Constant <value = float[3,1,1,1] {0.5, -1.0, 2.0}> ()
        ws = Mul(w, s)
        y = Conv(x, ws)
        """,
    )
    out, _ = fold(m)
    assert ops(out) == {"Conv": 1}
    (weight,) = initializers(out).values()
    np.testing.assert_allclose(weight.ravel(), [0.5, 1.0, -3.0, -4.0, 10.0, 12.0])
    assert_equivalent(m, out)


def test_shape_of_a_static_tensor_is_folded():
    m = model(
        "g (float[2,3,4] x) => (float[24] y, float[2,12] z)",
        """
        s = Shape(x)
        n = ReduceProd <keepdims = 1> (s)
        y = Reshape(x, n)
        tail = Shape <start = -2> (x)
        m = ReduceProd <keepdims = 1> (tail)
        minus_one = Constant <value = int64[1] {-1}> ()
        k = Concat <axis = 0> (minus_one, m)
        z = Reshape(x, k)
        """,
    )
    out, entry = fold(m)
    assert ops(out) == {"Reshape": 2}
    assert sorted(v.tolist() for v in initializers(out).values()) == [[-1, 12], [24]]
    assert entry.ops_removed == {"Shape": 2, "ReduceProd": 2, "Constant": 1, "Concat": 1}
    # The x input stays an input; the reshapes are not folded (x is not constant).
    assert [i.name for i in out.graph.input] == ["x"]
    assert_equivalent(m, out)


@pytest.mark.parametrize(
    "attrs, expected",
    [("", [2, 3, 4]), ("<start = 1>", [3, 4]), ("<start = -2>", [3, 4]), ("<start = 0, end = -1>", [2, 3]), ("<start = 1, end = 2>", [3])],
)
def test_shape_start_and_end_are_honoured(attrs, expected):
    m = model(
        f"g (float[2,3,4] x) => (float[{len(expected)}] y)",
        f"""
        s = Shape {attrs} (x)
        y = Cast <to = 1> (s)
        """,
    )
    out, _ = fold(m)
    assert "Shape" not in ops(out)
    assert_equivalent(m, out)
    np.testing.assert_array_equal(run(out, {"x": np.zeros((2, 3, 4), np.float32)})["y"], expected)


def test_shape_of_a_dynamic_tensor_is_kept():
    m = model(
        "g (float[N,3] x) => (float[M] y)",
        """
        s = Shape(x)
        n = ReduceProd <keepdims = 1> (s)
        y = Reshape(x, n)
        """,
    )
    out, entry = fold(m)
    assert ops(out) == ops(m)
    assert not entry.modified
    assert_equivalent(m, out, input_shapes={"x": [5, 3]})


def test_integer_arithmetic_through_float_casts_is_not_changed():
    # Cast(int→float) · 0.5 → Cast(float→int) truncates; doing the Mul in integers with the
    # constant cast to int (0.5 → 0) would give 0 everywhere.
    m = model(
        "g (int64[8] x) => (int64[8] y)",
        """
        half = Constant <value = float {0.5}> ()
        xf = Cast <to = 1> (x)
        p = Mul(xf, half)
        y = Cast <to = 7> (p)
        """,
    )
    out, _ = fold(m)
    assert ops(out) == {"Cast": 2, "Mul": 1}
    x = np.arange(8, dtype=np.int64)
    assert_equivalent(m, out, inputs={"x": x})


def test_dequantize_linear_of_a_constant_weight_is_not_folded():
    m = model(
        "g (float[2,3] x) => (float[2,2] y, float[3] z) <int8[3,2] wq = {10, -20, 30, -40, 50, -60}, float scale = {0.1}, int8 zp = {0}>",
        """
        w = DequantizeLinear(wq, scale, zp)
        y = MatMul(x, w)
        c = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        nc = Neg(c)
        z = Add(nc, nc)
        """,
    )
    out, entry = fold(m)
    assert ops(out)["DequantizeLinear"] == 1 and ops(out)["MatMul"] == 1
    assert "Neg" not in ops(out)  # the pass did run: the float constant subgraph was folded
    assert "wq" in initializers(out) and initializers(out)["wq"].dtype == np.int8
    assert entry.modified
    assert_equivalent(m, out)


def test_random_generators_are_not_folded():
    m = model(
        "g (float[2,3] x) => (float[2,3] y)",
        """
        r = RandomNormal <shape = [2, 3], dtype = 1> ()
        a = Abs(r)
        c = Constant <value = float {2.0}> ()
        n = Neg(c)
        xn = Mul(x, n)
        y = Add(xn, a)
        """,
    )
    out, entry = fold(m)
    # The constant branch was folded (the pass ran); the random one and its consumer were not.
    assert ops(out) == {"RandomNormal": 1, "Abs": 1, "Mul": 1, "Add": 1}
    assert entry.ops_removed == {"Constant": 1, "Neg": 1}


def test_custom_domain_nodes_are_not_folded():
    m = model(
        "g (float[3] x) => (float[3] y)",
        """
        c = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        d = com.example.Double(c)
        y = Add(x, d)
        """,
        opsets='<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>',
    )
    out, _ = fold(m)
    assert ops(out)["Double"] == 1 and ops(out)["Add"] == 1


EXPAND = """
one = Constant <value = float {1.0}> ()
shape = Constant <value = int64[2] {100, 100}> ()
big = Expand(one, shape)
y = Add(x, big)
"""


def test_size_threshold_keeps_large_results_unfolded():
    m = model("g (float[100,100] x) => (float[100,100] y)", EXPAND)
    limited, entry = fold(m, max_constant_bytes=1000, max_constant_growth=0)
    assert ops(limited)["Expand"] == 1
    assert all(v.nbytes <= 1000 for v in initializers(limited).values())
    assert_equivalent(m, limited)

    unlimited, entry = fold(m, max_constant_growth=0)
    assert "Expand" not in ops(unlimited)
    assert max(v.nbytes for v in initializers(unlimited).values()) == 100 * 100 * 4
    assert_equivalent(m, unlimited)


def test_generated_results_stay_computed_and_are_reported():
    # By default the 40 kB result of a 4-byte constant is not stored; its inputs (two
    # Constant nodes) still become initializers, and the pass says what it left and why.
    m = model("g (float[100,100] x) => (float[100,100] y)", EXPAND)
    out, entry = fold(m)
    assert ops(out) == {"Expand": 1, "Add": 1}
    assert sorted(v.nbytes for v in initializers(out).values()) == [4, 16]
    assert entry.modified and entry.ops_removed == {"Constant": 2}
    (refusal,) = entry.refusals
    assert refusal.reason.startswith("1 constant result(s) left to be computed at run time (Expand×1)")
    assert "max_constant_growth=0" in refusal.reason
    assert_equivalent(m, out)


def test_generated_weight_of_a_conv_stays_computed_but_its_shape_is_folded():
    # The "light" model zoo pattern: a weight made by ConstantOfShape from a shape tensor.
    m = model(
        "g (float[1,8,6,6] x) => (float[1,16,6,6] y)",
        """
        a = Constant <value = int64[2] {16, 8}> ()
        b = Constant <value = int64[2] {1, 1}> ()
        shape = Concat <axis = 0> (a, b)
        w = ConstantOfShape <value = float[1] {0.02}> (shape)
        y = Conv(x, w)
        """,
    )
    out, entry = fold(m)
    assert ops(out) == {"ConstantOfShape": 1, "Conv": 1}
    (shape,) = initializers(out).values()
    np.testing.assert_array_equal(shape, [16, 8, 1, 1])
    assert entry.ops_removed == {"Concat": 1, "Constant": 2}
    assert_equivalent(m, out)


def test_a_generated_intermediate_that_is_reduced_again_is_folded():
    # Expand makes 40 kB, ReduceSum brings it back to 4 bytes: only the small result is stored.
    m = model(
        "g (float[100,100] x) => (float[100,100] y)",
        """
        one = Constant <value = float {1.0}> ()
        shape = Constant <value = int64[2] {100, 100}> ()
        big = Expand(one, shape)
        total = ReduceSum <keepdims = 0> (big)
        y = Add(x, total)
        """,
    )
    out, entry = fold(m)
    assert ops(out) == {"Add": 1}
    (total,) = initializers(out).values()
    assert total.ravel().tolist() == [10000.0] and not entry.refusals
    assert_equivalent(m, out)


def test_all_foldable_nodes_are_evaluated_in_one_session(monkeypatch):
    import onnxruntime as ort

    sessions = []
    real = ort.InferenceSession

    def counting(model, *args, **kwargs):
        sessions.append(model)
        return real(model, *args, **kwargs)

    m = model(
        "g (float[4] x) => (float[4] y)",
        """
        a = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
        b = Neg(a)
        c = Abs(b)
        d = Exp(a)
        e = Sqrt(d)
        xc = Mul(x, c)
        y = Add(xc, e)
        """,
    )
    graph = gs.import_onnx(m)
    monkeypatch.setattr(ort, "InferenceSession", counting)
    result = FoldConstants().call(graph, PassContext("fold-constants"))
    assert result.modified and sorted(n.op for n in graph.nodes) == ["Add", "Mul"]
    assert len(sessions) == 1


# Evaluating this constant subgraph fails in ORT (6 values reshaped to 4).
BROKEN = """
c = Constant <value = float[6] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> ()
s = Constant <value = int64[1] {4}> ()
r = Reshape(c, s)
z = ReduceSum(r)
h = Identity(x)
y = Add(h, z)
"""


def test_ort_failure_is_refused_and_the_model_unchanged():
    m = model("g (float[2,3] x) => (float[2,3] y)", BROKEN, check=False)
    out, entry = fold(m)
    assert not entry.modified and out.SerializeToString() == m.SerializeToString()
    (refusal,) = entry.refusals
    assert refusal.subject == "graph"
    assert refusal.reason.startswith("constant folding failed in ONNX Runtime, graph left as is: ")
    assert "Reshape" in refusal.reason and "\n" not in refusal.reason


def test_ort_failure_leaves_the_graph_as_it_was_for_later_passes():
    m = model("g (float[2,3] x) => (float[2,3] y)", BROKEN, check=False)
    # The graph itself, not just the exported model, must be left as is.
    graph = gs.import_onnx(m)
    ctx = PassContext("fold-constants")
    result = FoldConstants().call(graph, ctx)
    assert not result.modified and len(ctx.refusals) == 1
    assert sorted(n.op for n in graph.nodes) == sorted(n.op_type for n in m.graph.node)
    # A later pass that does change the graph exports the Constant nodes untouched.
    out, report = optimize(m, passes=["fold-constants", "eliminate-identity"])
    assert ops(out) == {"Constant": 2, "Reshape": 1, "ReduceSum": 1, "Add": 1}
    assert report.passes[1].ops_removed == {"Identity": 1}


def test_light_model_zoo_weights_made_by_constant_of_shape_do_not_bloat_the_file():
    # onnx ships "light" zoo models whose weights are ConstantOfShape(shape initializer): the
    # default pipeline used to store every generated weight (15 kB -> 4.9 MB for SqueezeNet).
    import os

    import onnx
    import onnxruntime as ort
    from onnx.backend.test.runner import Runner

    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    path = os.path.join(folder, "light_squeezenet.onnx")
    m = onnx.load(path)
    out, report = optimize(m)
    data = out.SerializeToString()
    assert len(data) <= 1.1 * os.path.getsize(path)
    assert ops(out)["ConstantOfShape"] == ops(m)["ConstantOfShape"]
    fold_entry = next(p for p in report.passes if p.name == "fold-constants")
    assert fold_entry.refusals[0].reason.startswith(f"{ops(m)['ConstantOfShape']} constant result(s) left")
    onnx.checker.check_model(out, full_check=True)
    # The inputs onnx's backend test runner feeds light models, and the outputs shipped beside them.
    constants = {t.name for t in m.graph.initializer}
    feeds = {x.name: Runner.generate_dummy_data(x, random=False) for x in m.graph.input if x.name not in constants}
    expected = onnx.numpy_helper.to_array(onnx.load_tensor(os.path.join(folder, "light_squeezenet_output_0.pb")))
    (got,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_folded_graph_output_read_by_another_folded_node_keeps_its_value():
    m = model(
        "g (float[3] x) => (float[3] y, float[3] n)",
        """
        c = Constant <value = float[3] {1.0, -2.0, 3.0}> ()
        n = Neg(c)
        z = Abs(n)
        y = Add(x, z)
        """,
    )
    out, _ = fold(m)
    assert ops(out) == {"Add": 1}
    np.testing.assert_array_equal(initializers(out)["n"], [-1.0, 2.0, -3.0])
    assert_equivalent(m, out)


def test_a_folded_scalar_stays_a_scalar():
    m = model(
        "g (float[3] x) => (float[3] y)",
        """
        one = Constant <value = float {1.0}> ()
        two = Add(one, one)
        y = Mul(x, two)
        """,
    )
    out, _ = fold(m)
    assert ops(out) == {"Mul": 1}
    (two,) = initializers(out).values()
    assert two.shape == () and two == 2.0


def _model_with_bodies():
    """If and Loop bodies with constant work inside: the then-branch scales x by
    |−s|·k (−s computed in the main graph, k a body Constant), the else-branch returns −s
    (only an outer constant), the Loop body doubles its carry by (1 + 1) and adds s."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def vec(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [4])

    k = numpy_helper.from_array(np.array([0.5, 0.5, 2.0, 2.0], np.float32))
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value=k),
            helper.make_node("Abs", ["neg_s"], ["abs_s"]),
            helper.make_node("Mul", ["abs_s", "k"], ["scale"]),
            helper.make_node("Mul", ["x", "scale"], ["t_out"]),
        ],
        "then",
        [],
        [vec("t_out")],
    )
    else_branch = helper.make_graph([helper.make_node("Neg", ["s"], ["e_out"])], "else", [], [vec("e_out")])
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.float32(1.0))),
            helper.make_node("Add", ["one", "one"], ["two"]),
            helper.make_node("Mul", ["acc", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "s"], ["acc_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []), vec("acc")],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), vec("acc_out")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["s"], ["neg_s"]),
            helper.make_node("If", ["cond"], ["b"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Loop", ["trip", "", "b"], ["y"], body=body),
        ],
        "g",
        [vec("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vec("y")],
        [numpy_helper.from_array(np.array([1.0, -2.0, 3.0, -4.0], np.float32), "s"), numpy_helper.from_array(np.array(3, np.int64), "trip")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bodies(model):
    (if_node, loop_node) = [n for n in model.graph.node if n.op_type in ("If", "Loop")]
    branches = {a.name: a.g for a in if_node.attribute}
    return branches["then_branch"], branches["else_branch"], loop_node.attribute[0].g


def test_constants_inside_if_and_loop_bodies_are_folded():
    import onnx
    from onnx import numpy_helper

    m = _model_with_bodies()
    out, entry = fold(m)
    onnx.checker.check_model(out, full_check=True)
    then_branch, else_branch, body = _bodies(out)
    assert [n.op_type for n in then_branch.node] == ["Mul"]
    assert {t.name: numpy_helper.to_array(t).tolist() for t in then_branch.initializer} == {"scale": [0.5, 1.0, 6.0, 8.0]}
    assert not else_branch.node and numpy_helper.to_array(else_branch.initializer[0]).tolist() == [-1.0, 2.0, -3.0, 4.0]
    assert sorted(n.op_type for n in body.node) == ["Add", "Identity", "Mul"]
    (two,) = [t for t in body.initializer if t.name == "two"]
    assert numpy_helper.to_array(two).shape == ()
    # The outer constant s is stored once (only the Loop body still reads it).
    everywhere = list(out.graph.initializer) + [t for g in (then_branch, else_branch, body) for t in g.initializer]
    assert [t.name for t in everywhere].count("s") == 1
    assert entry.ops_removed == {"Neg": 1}  # main graph; with the bodies: 2 Neg, Abs, Mul, 2 Constant, Add
    assert entry.stats == {"nodes_folded": 7}
    x = np.arange(4, dtype=np.float32)
    for cond in (True, False):
        assert_equivalent(m, out, inputs={"x": x, "cond": np.array(cond)})


def test_a_sequence_of_constants_is_not_stored_but_a_tensor_made_from_it_is():
    m = model(
        "g (float[2] x) => (float[4] y)",
        """
        a = Constant <value = float[2] {1.0, 2.0}> ()
        b = Constant <value = float[2] {3.0, 4.0}> ()
        seq = SequenceConstruct(a, b)
        c = ConcatFromSequence <axis = 0> (seq)
        xx = Concat <axis = 0> (x, x)
        y = Add(xx, c)
        """,
    )
    out, _ = fold(m)
    assert ops(out) == {"Concat": 1, "Add": 1}
    np.testing.assert_array_equal(initializers(out)["c"], [1.0, 2.0, 3.0, 4.0])
    assert_equivalent(m, out)

    # A sequence some node that stays reads is no initializer: its producer stays.
    m = model(
        "g (float[2] x) => (float[6] y)",
        """
        a = Constant <value = float[2] {1.0, 2.0}> ()
        seq = SequenceConstruct(a, a)
        xseq = SequenceInsert(seq, x)
        y = ConcatFromSequence <axis = 0> (xseq)
        """,
    )
    out, _ = fold(m)
    assert ops(out) == {"SequenceConstruct": 1, "SequenceInsert": 1, "ConcatFromSequence": 1}
    assert_equivalent(m, out)
