"""eliminate-identity and eliminate-dead: what is removed, what is kept, and why."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_equivalent, initializers, ops, parse, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
IDENTITY_REFUSAL = "output is a graph output fed directly by a graph input, output or constant"


def model(signature: str, body: str, *, opsets: str = HEADER):
    return parse(f"{opsets}\n{signature} {{\n{body}\n}}")


def eliminate(m):
    out, report = run_passes(m, "eliminate-identity")
    return out, report.passes[0]


# --------------------------------------------------------------------------- removed no-ops
@pytest.mark.parametrize(
    "signature, body, removed",
    [
        ("g (float[2,3] x) => (float[2,3] y)", "h = Relu(x)\n i = Identity(h)\n y = Neg(i)", "Identity"),
        ("g (float[2,3] x) => (float[2,3] y)", "h = Relu(x)\n d = Dropout(h)\n y = Neg(d)", "Dropout"),
        (
            "g (float[2,3] x) => (float[2,3] y) <float r = {0.5}, bool t = {0}>",
            "h = Relu(x)\n d = Dropout(h, r, t)\n y = Neg(d)",
            "Dropout",
        ),
        ("g (float[2,3] x) => (float[2,3] y)", "c = Cast <to = 1> (x)\n y = Neg(c)", "Cast"),
        ("g (float[2,3,4] x) => (float[2,3,4] y)", "t = Transpose <perm = [0, 1, 2]> (x)\n y = Neg(t)", "Transpose"),
        ("g (float[2,3] x) => (float[2,3] y) <float[3] one = {1.0, 1.0, 1.0}>", "m = Mul(x, one)\n y = Neg(m)", "Mul"),
        ("g (float[2,3] x) => (float[2,3] y) <float[1,3] one = {1.0, 1.0, 1.0}>", "m = Mul(one, x)\n y = Neg(m)", "Mul"),
        ("g (float[2,3] x) => (float[2,3] y) <float zero = {0.0}>", "a = Add(x, zero)\n y = Neg(a)", "Add"),
        ("g (float[2,3] x) => (float[2,3] y) <float[3] zero = {0.0, 0.0, 0.0}>", "s = Sub(x, zero)\n y = Neg(s)", "Sub"),
        ("g (float[2,3] x) => (float[2,3] y) <float one = {1.0}>", "q = Div(x, one)\n y = Neg(q)", "Div"),
        ("g (float[2,3] x) => (float[2,3] y) <int64[4] pads = {0, 0, 0, 0}>", "p = Pad(x, pads)\n y = Neg(p)", "Pad"),
        ("g (float[2,3] x) => (float[2,3] y) <int64[2] shape = {2, 3}>", "r = Reshape(x, shape)\n y = Neg(r)", "Reshape"),
        ("g (float[2,3] x) => (float[2,3] y)", "c = Concat <axis = 0> (x)\n y = Neg(c)", "Concat"),
    ],
    ids=[
        "identity", "dropout", "dropout-training-false", "cast-same-type", "transpose-identity-perm", "x*1", "1*x",
        "x+0-scalar", "x-0", "x/1", "pad-zero", "reshape-same-shape", "concat-single",
    ],
)
def test_no_op_is_removed(signature, body, removed):
    m = model(signature, body)
    out, entry = eliminate(m)
    assert ops(out)[removed] == 0
    assert ops(out) == {"Neg": 1, **({"Relu": 1} if "Relu" in body else {})}
    assert entry.stats == {"removed": {removed: 1}} and entry.modified
    assert entry.refusals == []
    assert_equivalent(m, out)


# --------------------------------------------------------------------------- kept look-alikes
@pytest.mark.parametrize(
    "signature, body, kept",
    [
        # the mask output is read (by a node, or as a graph output): Dropout computes something
        ("g (float[2,3] x) => (float[2,3] y, float[2,3] m)", "d, mask = Dropout(x)\n y = Neg(d)\n m = Cast <to = 1> (mask)", "Dropout"),
        ("g (float[2,3] x) => (float[2,3] y, bool[2,3] mask)", "d, mask = Dropout(x)\n y = Neg(d)", "Dropout"),
        ("g (float[2,3] x) => (double[2,3] y)", "c = Cast <to = 11> (x)\n y = Neg(c)", "Cast"),
        ("g (float[2,3,4] x) => (float[2,4,3] y)", "t = Transpose <perm = [0, 2, 1]> (x)\n y = Neg(t)", "Transpose"),
        ("g (float[2,3] x) => (float[2,3] y) <float[3] two = {2.0, 2.0, 2.0}>", "m = Mul(x, two)\n y = Neg(m)", "Mul"),
        ("g (float[2,3] x) => (float[2,3] y) <float[3] mixed = {1.0, 1.0, 2.0}>", "m = Mul(x, mixed)\n y = Neg(m)", "Mul"),
        # broadcasting would grow x from [3] to [2,3] (or to rank 2): removing Add changes the shape
        ("g (float[3] x) => (float[2,3] y) <float[2,3] zero = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0}>", "a = Add(x, zero)\n y = Neg(a)", "Add"),
        ("g (float[3] x) => (float[1,3] y) <float[1,3] zero = {0.0, 0.0, 0.0}>", "a = Add(x, zero)\n y = Neg(a)", "Add"),
        # 0 - x and 1 / x are not x
        ("g (float[2,3] x) => (float[2,3] y) <float zero = {0.0}>", "s = Sub(zero, x)\n y = Neg(s)", "Sub"),
        ("g (float[2,3] x) => (float[2,3] y) <float one = {1.0}>", "q = Div(one, x)\n y = Neg(q)", "Div"),
        ("g (float[2,3] x) => (float[3,5] y) <int64[4] pads = {0, 1, 1, 1}>", "p = Pad(x, pads)\n y = Neg(p)", "Pad"),
        ("g (float[2,3] x) => (float[3,2] y) <int64[2] shape = {3, 2}>", "r = Reshape(x, shape)\n y = Neg(r)", "Reshape"),
        # -1 may well mean the same shape, but the rule only trusts a literal match
        ("g (float[2,3] x) => (float[2,3] y) <int64[2] shape = {-1, 3}>", "r = Reshape(x, shape)\n y = Neg(r)", "Reshape"),
        ("g (float[2,3] x, float[2,3] z) => (float[4,3] y)", "c = Concat <axis = 0> (x, z)\n y = Neg(c)", "Concat"),
        # a variable training_mode decides at run time
        ("g (float[2,3] x, bool t) => (float[2,3] y)", "d = Dropout(x, , t)\n y = Neg(d)", "Dropout"),
    ],
    ids=[
        "dropout-mask-read", "dropout-mask-output", "cast-other-type", "transpose-real", "x*2", "x*mixed", "x+0-broadcast-grows",
        "x+0-rank-grows", "0-x", "1/x", "pad-nonzero", "reshape-other-shape", "reshape-minus-one", "concat-two",
        "dropout-training-input",
    ],
)
def test_look_alike_is_kept(signature, body, kept):
    m = model(signature, body)
    out, entry = eliminate(m)
    assert ops(out) == ops(m)
    assert ops(out)[kept] == 1
    assert not entry.modified and entry.refusals == []
    if "Dropout(x, , t)" not in body:  # with a run-time training_mode input the model is random
        assert_equivalent(m, out)


def test_custom_domain_identity_is_kept():
    m = model(
        "g (float[2] x) => (float[2] y)",
        "h = Relu(x)\n i = com.example.Identity(h)\n y = Neg(i)",
        opsets='<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>',
    )
    out, entry = eliminate(m)
    assert ops(out) == {"Relu": 1, "Identity": 1, "Neg": 1}
    assert not entry.modified


def test_chain_of_no_ops_is_removed_in_one_pass():
    m = model(
        "g (float[2,3] x) => (float[2,3] y) <float one = {1.0}>",
        "a = Identity(x)\n b = Dropout(a)\n c = Cast <to = 1> (b)\n d = Mul(c, one)\n e = Identity(d)\n y = Relu(e)",
    )
    out, entry = eliminate(m)
    assert ops(out) == {"Relu": 1}
    assert entry.stats == {"removed": {"Identity": 2, "Dropout": 1, "Cast": 1, "Mul": 1}}
    assert_equivalent(m, out)


# --------------------------------------------------------------------------- graph outputs
def test_identity_from_graph_input_to_graph_output_is_refused():
    m = model("g (float[2,3] x) => (float[2,3] y)", "y = Identity(x)")
    m.graph.node[0].name = "passthrough"
    out, entry = eliminate(m)
    assert ops(out) == {"Identity": 1}
    assert [(r.subject, r.reason) for r in entry.refusals] == [("passthrough", IDENTITY_REFUSAL)]
    assert not entry.modified
    assert [o.name for o in out.graph.output] == ["y"] and [i.name for i in out.graph.input] == ["x"]
    assert_equivalent(m, out)


def test_identity_from_a_constant_or_another_output_is_refused():
    m = model(
        "g (float[2,3] x) => (float[2,3] a, float[2,3] b, float[3] c) <float[3] k = {1.0, 2.0, 3.0}>",
        "a = Relu(x)\n b = Identity(a)\n c = Identity(k)",
    )
    out, entry = eliminate(m)
    assert ops(out) == {"Relu": 1, "Identity": 2}
    assert sorted(r.subject for r in entry.refusals) == ["Identity->b", "Identity->c"]
    assert {r.reason for r in entry.refusals} == {IDENTITY_REFUSAL}
    assert_equivalent(m, out)


def test_identity_into_a_graph_output_from_an_internal_node_is_removed():
    m = model(
        "g (float[2,3] x) => (float[2,3] y, float[2,3] z)",
        "h = Relu(x)\n y = Identity(h)\n z = Neg(h)",
    )
    out, entry = eliminate(m)
    assert ops(out) == {"Relu": 1, "Neg": 1}
    assert entry.stats == {"removed": {"Identity": 1}} and entry.refusals == []
    assert [o.name for o in out.graph.output] == ["y", "z"]  # the interface keeps its names
    (relu,) = [n for n in out.graph.node if n.op_type == "Relu"]
    assert list(relu.output) == ["y"]
    (neg,) = [n for n in out.graph.node if n.op_type == "Neg"]
    assert list(neg.input) == ["y"]
    assert_equivalent(m, out)


# --------------------------------------------------------------------------- eliminate-dead
def test_dead_branch_and_unused_initializer_are_removed():
    m = model(
        "g (float[2,3] x) => (float[2,3] y) <float[3] w = {1.0, 2.0, 3.0}, float[3] unused = {4.0, 5.0, 6.0}>",
        "y = Mul(x, w)\n dead = Neg(x)\n dead2 = Abs(dead)\n k = Constant <value = float {1.0}> ()",
    )
    out, report = run_passes(m, "eliminate-dead")
    assert ops(out) == {"Mul": 1}
    assert list(initializers(out)) == ["w"]
    assert report.passes[0].stats == {"nodes_removed": 3, "initializers_removed": 1}
    assert report.passes[0].ops_removed == {"Abs": 1, "Constant": 1, "Neg": 1}
    assert_equivalent(m, out)


def test_unused_initializer_alone_is_removed():
    m = model("g (float[2,3] x) => (float[2,3] y) <float[3] unused = {4.0, 5.0, 6.0}>", "y = Relu(x)")
    out, report = run_passes(m, "eliminate-dead")
    assert list(initializers(out)) == []
    assert report.passes[0].modified
    assert report.passes[0].stats == {"nodes_removed": 0, "initializers_removed": 1}
    assert report.after.parameters == 0 and report.before.parameters == 3
    assert_equivalent(m, out)


def test_initializer_read_only_inside_a_subgraph_is_kept():
    m = model(
        "g (bool c, float[2] x) => (float[2] y) <float[2] inside = {1.0, 2.0}>",
        "y = If(c) <then_branch = t () => (float[2] p) { p = Add(x, inside) },\n"
        "           else_branch = e () => (float[2] q) { q = Neg(x) }>\n"
        "dead = Abs(x)",
    )
    out, report = run_passes(m, "eliminate-dead")
    assert report.passes[0].stats == {"nodes_removed": 1, "initializers_removed": 0}
    assert ops(out) == {"If": 1}
    # graphsurgeon may move the initializer into the branch that reads it; it must survive.
    branches = [attr.g for attr in out.graph.node[0].attribute]
    assert "inside" in [t.name for g in [out.graph, *branches] for t in g.initializer]
    for branch in (True, False):
        assert_equivalent(m, out, inputs={"c": np.array(branch), "x": np.array([3.0, -4.0], np.float32)})


def test_unused_graph_input_is_kept():
    m = model("g (float[2,3] x, float[4] extra) => (float[2,3] y)", "y = Relu(x)\n dead = Neg(extra)")
    out, report = run_passes(m, "eliminate-dead")
    assert ops(out) == {"Relu": 1}
    assert [i.name for i in out.graph.input] == ["x", "extra"]
    assert report.passes[0].stats["nodes_removed"] == 1
    assert_equivalent(m, out)


def test_nothing_dead_means_no_change():
    m = model("g (float[2,3] x) => (float[2,3] y) <float[3] w = {1.0, 2.0, 3.0}>", "y = Mul(x, w)")
    out, report = run_passes(m, "eliminate-dead")
    assert not report.passes[0].modified
    assert report.passes[0].stats == {"nodes_removed": 0, "initializers_removed": 0}
    assert out.SerializeToString() == m.SerializeToString()
