"""The pass contract, PassManager, registry, report and the optimize() API."""

from __future__ import annotations

from dataclasses import dataclass

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxopt
from onnxopt.api import resolve_pipeline
from onnxopt.errors import OutputPathError, PipelineError, ValidationError
from onnxopt.graph import cleanup, replace_all_uses
from onnxopt.manager import PassManager
from onnxopt.pass_base import Pass, PassContext, PassResult, PreconditionFailed
from onnxopt.passes import builtin_registry
from onnxopt.registry import PassRegistry, Preset
from onnxopt.verify import run
from tests.conftest import CLASSIC, assert_equivalent, ops, parse

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) {
  h = Relu(x)
  y = Neg(h)
}
"""


def make_pass(name: str, *, tags=(), after=(), before=(), call=None, requires=None, options=None) -> type[Pass]:
    """A tiny Pass subclass; ``call(graph, ctx)`` returns a PassResult (default: no change)."""
    attrs = {
        "name": name,
        "summary": f"test pass {name}",
        "tags": frozenset(tags),
        "runs_after": frozenset(after),
        "runs_before": frozenset(before),
        "options_spec": options or {},
        "call": lambda self, graph, ctx: (call or (lambda g, c: PassResult(False)))(graph, ctx),
    }
    if requires is not None:
        attrs["requires"] = lambda self, graph, ctx: requires(graph, ctx)
    return type(name.title().replace("-", ""), (Pass,), attrs)


# --------------------------------------------------------------------------- ordering
def test_runs_after_violation_names_both_passes():
    prune = make_pass("prune-a", tags={"prune"})
    quant = make_pass("quant-a", after={"prune"})
    PassManager([prune(), quant()])  # the declared order: fine
    with pytest.raises(PipelineError, match="pass quant-a must run after prune-a, but is scheduled before it"):
        PassManager([quant(), prune()])


def test_runs_before_violation_names_both_passes():
    fold = make_pass("fold-a", before={"quantize"})
    quant = make_pass("quant-b", tags={"quantize"})
    PassManager([fold(), quant()])
    with pytest.raises(PipelineError, match="pass fold-a must run before quant-b, but is scheduled after it"):
        PassManager([quant(), fold()])


def test_a_pass_name_is_a_tag_and_unrelated_passes_are_free():
    first = make_pass("first")
    second = make_pass("second", after={"first"})
    other = make_pass("other")
    PassManager([other(), first(), other(), second()])
    with pytest.raises(PipelineError, match="second must run after first"):
        PassManager([second(), other(), first()])


def test_builtin_fold_conv_bn_must_precede_pruning():
    registry = builtin_registry()
    prune = make_pass("prune-channels", tags={"prune"})
    registry.register(prune)
    PassManager(registry.build(["fold-conv-bn", "prune-channels"]))
    with pytest.raises(PipelineError, match="pass fold-conv-bn must run before prune-channels"):
        PassManager(registry.build(["prune-channels", "fold-conv-bn"]))


def test_max_rounds_must_be_positive():
    with pytest.raises(PipelineError, match="max_rounds must be at least 1"):
        PassManager([], max_rounds=0)


# --------------------------------------------------------------------------- refusals
def _refusing_call(graph, ctx):
    ctx.refuse("node /block/conv", "weight is shared with /other/conv")
    ctx.refuse("node /head/fc", "bias is a graph input")
    return PassResult(False, {"looked_at": 2})


def test_refusals_reach_the_report_table_and_dict():
    refuser = make_pass("refuser", call=_refusing_call)
    _, report = PassManager([refuser()]).run(parse(RELU))

    assert [(name, r.subject, r.reason) for name, r in report.refusals] == [
        ("refuser", "node /block/conv", "weight is shared with /other/conv"),
        ("refuser", "node /head/fc", "bias is a graph input"),
    ]
    table = report.format_table()
    assert "not rewritten (2):" in table
    assert "[refuser] node /block/conv: weight is shared with /other/conv" in table
    assert "[refuser] node /head/fc: bias is a graph input" in table
    entry = report.to_dict()["passes"][0]
    assert entry["refusals"] == [
        {"subject": "node /block/conv", "reason": "weight is shared with /other/conv"},
        {"subject": "node /head/fc", "reason": "bias is a graph input"},
    ]
    assert entry["stats"] == {"looked_at": 2} and entry["modified"] is False


def test_refusals_are_logged(caplog):
    refuser = make_pass("refuser", call=_refusing_call)
    with caplog.at_level("INFO", logger="onnxopt.passes.refuser"):
        PassManager([refuser()]).run(parse(RELU))
    assert "node /head/fc not rewritten: bias is a graph input" in caplog.text


def test_long_refusal_lists_are_truncated_in_the_table():
    def many(graph, ctx):
        for i in range(30):
            ctx.refuse(f"node {i}", "reason")
        return PassResult(False)

    _, report = PassManager([make_pass("many", call=many)()]).run(parse(RELU))
    table = report.format_table(max_refusals=5)
    assert "not rewritten (30):" in table
    assert "[many] node 4: reason" in table and "[many] node 5: reason" not in table
    assert "... 25 more (see the JSON report)" in table
    assert len(report.to_dict()["passes"][0]["refusals"]) == 30


def test_failed_precondition_is_a_refusal_and_the_pass_does_not_run():
    def requires(graph, ctx):
        raise PreconditionFailed("the graph has no BatchNormalization")

    def call(graph, ctx):
        raise AssertionError("call() ran although requires() refused")

    guarded = make_pass("guarded", requires=requires, call=call)
    model = parse(RELU)
    out, report = PassManager([guarded()]).run(model)
    assert report.refusals[0][0] == "guarded"
    assert report.refusals[0][1].subject == "graph"
    assert report.refusals[0][1].reason == "pass not run: the graph has no BatchNormalization"
    assert report.passes[0].modified is False
    assert out is model


# --------------------------------------------------------------------------- validation
def _dangling_input(graph, ctx):
    (relu,) = [n for n in graph.nodes if n.op == "Relu"]
    relu.inputs[0] = gs.Variable("ghost", dtype=np.float32, shape=[2, 3])
    return PassResult(True)


def _type_error(graph, ctx):
    (relu,) = [n for n in graph.nodes if n.op == "Relu"]
    offset = gs.Constant("offset", np.ones((2, 3), np.int64))
    shifted = gs.Variable("shifted")
    graph.nodes.append(gs.Node("Add", "bad_add", inputs=[relu.inputs[0], offset], outputs=[shifted]))
    relu.inputs[0] = shifted
    graph.toposort()
    return PassResult(True)


def _duplicate_names(graph, ctx):
    for node in graph.nodes:
        node.name = "same"
    return PassResult(True)


@pytest.mark.parametrize(
    "call, message",
    [
        (_dangling_input, "pass breaker produced an invalid model: .*ghost"),
        (_type_error, r"pass breaker produced an invalid model: .*bad_add.*inconsistent type tensor\(int64\)"),
        (_duplicate_names, "pass breaker produced a duplicate node name 'same'"),
    ],
    ids=["dangling-tensor", "type-error", "duplicate-names"],
)
def test_validation_catches_a_pass_that_breaks_the_graph(call, message):
    breaker = make_pass("breaker", call=call)
    with pytest.raises(ValidationError, match=message) as info:
        PassManager([breaker()], validate=True).run(parse(RELU))
    assert info.value.exit_code == 8


@pytest.mark.parametrize(
    "call, message",
    [
        (_dangling_input, "final check: pass breaker produced an invalid model: .*ghost"),
        (_type_error, r"final check: pass breaker produced an invalid model: .*bad_add"),
        (_duplicate_names, "final check: pass breaker produced a duplicate node name 'same'"),
    ],
    ids=["dangling-tensor", "type-error", "duplicate-names"],
)
def test_without_validation_the_final_model_is_still_checked(call, message):
    """validate=False skips the check after each pass, never the one of the final model:
    no invalid model is ever returned (or written by the CLI)."""
    breaker = make_pass("breaker", call=call)
    with pytest.raises(ValidationError, match=message) as info:
        PassManager([breaker(), make_pass("no-op")()], validate=False).run(parse(RELU))
    assert info.value.exit_code == 8


def test_final_check_above_the_protobuf_limit_checks_the_graph_without_payloads(monkeypatch, demo, caplog):
    """Above 2 GB the checker cannot take the proto: it checks a stand-in whose large
    initializers are typed inputs, still catching a broken graph, and says so."""
    import onnxopt.manager as manager

    monkeypatch.setattr(manager, "EXTERNAL_DATA_THRESHOLD", 100)
    with caplog.at_level("WARNING", logger="onnxopt.manager"):
        assert manager.model_problem(demo) is None
    assert "not the initializer payloads" in caplog.text
    broken = onnx.ModelProto()
    broken.CopyFrom(demo)
    broken.graph.node[0].input[0] = "ghost"
    assert "ghost" in manager.model_problem(broken)


def test_validation_accepts_a_correct_rewrite():
    def drop_neg(graph, ctx):
        (neg,) = [n for n in graph.nodes if n.op == "Neg"]
        neg.op = "Abs"
        return PassResult(True, {"renamed": 1})

    model = parse(RELU)
    out, report = PassManager([make_pass("to-abs", call=drop_neg)()], validate=True).run(model)
    assert ops(out) == {"Relu": 1, "Abs": 1}
    assert report.passes[0].ops_removed == {"Neg": 1} and report.passes[0].ops_added == {"Abs": 1}
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})["y"], np.abs(np.maximum(x, 0)))


# --------------------------------------------------------------------------- fixed point
IDENTITY_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) {
  a = Identity(x)
  b = Identity(a)
  c = Identity(b)
  d = Identity(c)
  e = Identity(d)
  y = Relu(e)
}
"""


def _peel_one_identity(graph, ctx):
    identities = [n for n in graph.nodes if n.op == "Identity"]
    if not identities:
        return PassResult(False)
    node = identities[0]
    source, result = node.inputs[0], node.outputs[0]
    node.inputs.clear()
    replace_all_uses(graph, result, source)
    node.outputs.clear()
    cleanup(graph)
    return PassResult(True, {"peeled": 1})


@pytest.mark.parametrize("max_rounds, expected_runs, left", [(1, 1, 4), (3, 3, 2), (10, 6, 0)])
def test_max_rounds_bounds_the_fixed_point(max_rounds, expected_runs, left):
    peel = make_pass("peel", call=_peel_one_identity)
    model = parse(IDENTITY_CHAIN)
    out, report = PassManager([peel()], max_rounds=max_rounds).run(model)
    names = [p.name for p in report.passes]
    assert names == ["peel"] + [f"peel#{i}" for i in range(2, expected_runs + 1)]
    assert ops(out)["Identity"] == left
    # With 10 rounds allowed, the sixth round changed nothing and ended the loop.
    assert report.passes[-1].modified is (left != 0)
    assert_equivalent(model, out)


# --------------------------------------------------------------------------- report
def test_report_has_stats_time_and_metrics_per_pass(demo):
    out, report = onnxopt.optimize(demo, passes=CLASSIC)
    data = json.loads(json.dumps(report.to_dict()))  # serializable as is
    assert [p["name"] for p in data["passes"]] == list(CLASSIC)
    for entry in data["passes"]:
        assert set(entry) == {"name", "seconds", "modified", "stats", "ops_removed", "ops_added", "refusals", "before", "after"}
        assert isinstance(entry["seconds"], float) and entry["seconds"] >= 0
        assert set(entry["before"]) == {"nodes", "parameters", "macs", "size_bytes"}
    by_name = {p["name"]: p for p in data["passes"]}
    assert by_name["eliminate-identity"]["ops_removed"] == {"Dropout": 1, "Identity": 1}
    assert by_name["eliminate-identity"]["stats"] == {"removed": {"Identity": 1, "Dropout": 1}}
    assert by_name["fold-constants"]["ops_removed"] == {"Concat": 1, "Constant": 2}
    assert by_name["fold-conv-bn"]["stats"] == {"bn_folded": 3, "bn_kept": 1}
    assert [r["subject"] for r in by_name["fold-conv-bn"]["refusals"]] == ["BN block/post_bn"]
    assert by_name["fold-conv-bn"]["ops_removed"] == {"BatchNormalization": 3}
    assert by_name["fold-conv-bn"]["after"]["parameters"] == by_name["fold-conv-bn"]["before"]["parameters"] - 3 * 4 * 8 + 3 * 8
    assert by_name["eliminate-dead"]["modified"] is False
    assert data["before"]["nodes"] == 20 and data["after"]["nodes"] == 12
    assert data["before"]["op_counts"]["BatchNormalization"] == 4
    assert data["after"]["op_counts"]["BatchNormalization"] == 1  # after the residual Add: not adjacent to a Conv
    assert data["after"]["macs"] == data["before"]["macs"] > 0
    assert data["lossless"] is True and data["verification"] is None
    assert data["onnxopt_version"] == onnxopt.__version__
    assert data["total_seconds"] >= sum(p["seconds"] for p in data["passes"]) - 1e-3
    table = report.format_table()
    assert "-3 BatchNormalization, bn_folded=3, bn_kept=1" in table
    assert "20->12" in table and "BN block/post_bn: input is not produced by a Conv (Add)" in table and table.splitlines()[0].startswith("pass")
    assert_equivalent(demo, out)


def test_write_json(tmp_path, demo):
    _, report = onnxopt.optimize(demo, preset="cleanup")
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_failure_is_an_output_error(tmp_path, demo):
    _, report = onnxopt.optimize(demo, preset="none")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputPathError, match="report path .* is a directory"):
        report.write_json(tmp_path / "taken")
    with pytest.raises(OutputPathError, match="report directory .* does not exist"):
        report.write_json(tmp_path / "missing" / "r.json")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


# --------------------------------------------------------------------------- registry
def test_unknown_pass_and_preset_suggest_a_name():
    registry = builtin_registry()
    with pytest.raises(PipelineError, match=r"unknown pass 'fold-constant' \(did you mean 'fold-constants'\?\); see --list-passes"):
        registry.get("fold-constant")
    with pytest.raises(PipelineError, match=r"unknown preset 'defualt' \(did you mean 'default'\?\)"):
        registry.preset("defualt")
    with pytest.raises(PipelineError, match=r"unknown pass 'zzzz'; see --list-passes"):
        registry.get("zzzz")


def test_options_reach_only_the_passes_declaring_them():
    registry = PassRegistry()
    registry.register(make_pass("alpha", options={"size": 1}))
    registry.register(make_pass("beta", options={"size": 2, "depth": 3}))
    registry.register(make_pass("gamma"))
    alpha, beta, gamma = registry.build(["alpha", "beta", "gamma"], {"depth": 9})
    assert alpha.options == {"size": 1}
    assert beta.options == {"size": 2, "depth": 9}
    assert gamma.options == {}
    alpha, beta = registry.build(["alpha", "beta"], {"size": 5})
    assert alpha.options == {"size": 5} and beta.options == {"size": 5, "depth": 3}


def test_unknown_option_is_rejected():
    registry = builtin_registry()
    with pytest.raises(PipelineError, match=r"option\(s\) max_constant_bytes not used by any pass of the pipeline \(eliminate-identity\)"):
        registry.build(["eliminate-identity"], {"max_constant_bytes": 10})
    (fold,) = registry.build(["fold-constants"], {"max_constant_bytes": 10})
    assert fold.options["max_constant_bytes"] == 10
    with pytest.raises(PipelineError, match=r"pass fold-constants has no option\(s\) colour"):
        type(fold)(colour="red")


def test_registry_objects_are_independent():
    first, second = builtin_registry(), builtin_registry()
    first.register(make_pass("extra"))
    assert "extra" in {p.name for p in first.passes()}
    assert "extra" not in {p.name for p in second.passes()}
    with pytest.raises(ValueError, match="already registered"):
        first.register(make_pass("extra"))
    with pytest.raises(ValueError, match="needs a name and a one-line summary"):
        first.register(type("Nameless", (Pass,), {}))
    with pytest.raises(PipelineError, match="unknown pass 'nope'"):
        first.add_preset(Preset("broken", "has an unknown step", ("eliminate-dead", "nope")))


def test_describe_lists_every_pass_and_preset():
    registry = builtin_registry()
    text = registry.describe()
    for cls in registry.passes():
        assert f"{cls.name}" in text and cls.summary in text
    for preset in registry.presets():
        assert preset.description in text
        assert ",".join(preset.steps) in text or not preset.steps
    assert "(no passes)" in text  # the 'none' preset


# --------------------------------------------------------------------------- optimize()
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"passes": ["eliminate-identity", "eliminate-dead"]}, ["eliminate-identity", "eliminate-dead"]),
        ({"passes": "eliminate-identity, fold-conv-bn"}, ["eliminate-identity", "fold-conv-bn"]),
        ({"preset": "cleanup"}, ["eliminate-identity", "fold-constants", "eliminate-dead"]),
        ({"preset": "none"}, []),
    ],
    ids=["list", "comma-string", "preset", "empty-preset"],
)
def test_optimize_pipeline_choices(demo, kwargs, expected):
    out, report = onnxopt.optimize(demo, **kwargs)
    assert [p.name for p in report.passes] == expected
    if "fold-conv-bn" in expected:
        assert ops(out)["BatchNormalization"] == 1
    else:
        assert ops(out)["BatchNormalization"] == 4
    assert_equivalent(demo, out)


def test_no_pipeline_means_the_default_preset():
    registry = builtin_registry()
    assert resolve_pipeline(registry, None, None) == list(registry.preset("default").steps)
    assert resolve_pipeline(registry, None, "cleanup") == list(registry.preset("cleanup").steps)
    assert resolve_pipeline(registry, ["a", "b"], None) == ["a", "b"]


def test_optimize_rejects_bad_pipelines(demo):
    with pytest.raises(PipelineError, match="either passes or a preset"):
        onnxopt.optimize(demo, passes=["eliminate-dead"], preset="cleanup")
    with pytest.raises(PipelineError, match="empty pass name"):
        onnxopt.optimize(demo, passes="eliminate-dead,,fold-conv-bn")
    with pytest.raises(PipelineError, match="unknown pass 'fold-bn'"):
        onnxopt.optimize(demo, passes="fold-bn")
    with pytest.raises(PipelineError, match="not used by any pass"):
        onnxopt.optimize(demo, passes="eliminate-dead", max_constant_bytes=1)


def test_optimize_from_a_path_records_it(demo_path, demo):
    out, report = onnxopt.optimize(demo_path, passes="fold-conv-bn")
    assert report.input_path == str(demo_path)
    assert ops(out)["BatchNormalization"] == 1
    assert_equivalent(demo, out)


def test_optimize_does_not_modify_its_input(demo):
    before = demo.SerializeToString()
    out, _ = onnxopt.optimize(demo, passes=CLASSIC, validate=True)
    assert demo.SerializeToString() == before
    assert out is not demo and ops(out) != ops(demo)


def test_optimize_does_not_rename_the_callers_constant_nodes():
    # graphsurgeon names the TensorProto behind a lowered Constant node on export; that must
    # happen on a copy, not on the caller's model.
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) {
          c = Constant <value = float[1,3] {1.0, 2.0, 3.0}> ()
          y = Add(x, c)
        }
        """
    )
    before = model.SerializeToString()
    out, _ = onnxopt.optimize(model, passes="fold-constants")
    assert ops(out) == {"Add": 1}
    assert model.SerializeToString() == before
    assert_equivalent(model, out)


def test_optimize_with_a_custom_registry(demo):
    registry = PassRegistry()
    seen = []

    def record(graph, ctx):
        seen.append(len(graph.nodes))
        return PassResult(False)

    registry.register(make_pass("count-nodes", call=record))
    registry.add_preset(Preset("default", "just count", ("count-nodes",)))
    out, report = onnxopt.optimize(demo, registry=registry)
    assert seen == [20] and [p.name for p in report.passes] == ["count-nodes"]
    assert out.SerializeToString() == demo.SerializeToString()


@dataclass
class Note:
    text: str


def test_a_typed_artifact_goes_from_its_producer_to_its_consumer():
    def write(graph, ctx):
        ctx.publish(Note("from writer"))
        return PassResult(False)

    def read(graph, ctx):
        ctx.refuse("artifact", ctx.artifact(Note).text)
        return PassResult(False)

    writer = make_pass("writer", call=write)
    writer.produces = frozenset({Note})
    reader = make_pass("reader", call=read)
    reader.consumes = frozenset({Note})
    _, report = PassManager([writer(), reader()]).run(parse(RELU))
    assert report.refusals[0][1].reason == "from writer"
    assert PassContext("x").artifact(Note) is None


def test_a_consumer_without_an_earlier_producer_is_refused_before_anything_runs():
    ran = []
    writer = make_pass("writer", call=lambda graph, ctx: ran.append("writer") or PassResult(False))
    writer.produces = frozenset({Note})
    reader = make_pass("reader", call=lambda graph, ctx: ran.append("reader") or PassResult(False))
    reader.consumes = frozenset({Note})
    with pytest.raises(PipelineError, match="pass reader needs the Note an earlier pass produces, and no pass before it does"):
        PassManager([reader(), writer()])
    assert ran == []


def test_a_pass_delegates_to_another_registered_pass_by_name():
    """ctx.delegate runs a pass of the pipeline's registry (options checked like any pass's)
    inside the calling pass; its refusals land in the caller's report."""
    def call(graph, ctx):
        return ctx.delegate("refuser", graph)

    def refuse(graph, ctx):
        ctx.refuse("node x", "delegated refusal")
        return PassResult(False)

    registry = builtin_registry()
    registry.register(make_pass("refuser", call=refuse))
    registry.register(make_pass("caller", call=call))
    _, report = onnxopt.optimize(parse(RELU), passes=["caller"], registry=registry)
    assert [(name, r.reason) for name, r in report.refusals] == [("caller", "delegated refusal")]
    with pytest.raises(PipelineError, match="unknown pass 'nope'"):
        PassContext("x").delegate("nope", None)
