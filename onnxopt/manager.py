"""The PassManager: validate ordering, run passes, validate the graph, collect the report.

Running a pipeline:

1. the declared ordering constraints, and that every artifact a pass needs is produced by
   an earlier pass, are checked before anything runs;
2. when a pass declares a ``min_opset`` above the model's, the model is upgraded once
   (onnx.version_converter, metadata kept; a note in the report, UnsupportedModelError if
   the conversion fails), then imported once into a graphsurgeon graph that every pass
   rewrites in place;
3. after each pass the graph is exported and measured (nodes, parameters, MACs, size); in
   validate mode the export must pass ``onnx.checker`` with ``full_check`` (strict shape
   inference), have unique node names and be topologically sorted, or the run stops with a
   ValidationError naming the pass; without validate mode the final model gets the same
   check (every model returned or written passes it, else ValidationError, exit code 8);
4. a compression the pipeline requests (the passes declaring the same ``request``, e.g.
   quantize, or the three RED passes for prune) that rewrote nothing in the first round
   stops the run with a NothingToDoError naming the cause and the fix, right after its last
   pass (so a later pass never reports a misleading consequence of it) — unless
   ``allow_no_op`` (then only the report and its coverage lines say so);
5. with ``max_rounds > 1`` the pipeline is repeated while some pass still modifies the
   graph, at most ``max_rounds`` times (a bounded fixed point).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Sequence

import onnx

from .errors import NothingToDoError, PipelineError, ValidationError
from .external import has_lazy, release_unchanged
from .graph import import_graph, payload_free_skeleton, unused_initializers, with_inferred_shapes
from .io import EXTERNAL_DATA_THRESHOLD, tensor_bytes
from .metrics import measure
from .pass_base import Pass, PassContext, PassResult, PipelineRun, Refusal
from .progress import Progress
from .report import PassReport, Report
from .upgrade import upgrade_for

logger = logging.getLogger(__name__)


def check_pipeline(passes: Sequence[Pass]) -> None:
    """Raise PipelineError if a pass is scheduled against a declared ordering constraint, or
    needs an artifact that no earlier pass produces."""
    check_ordering(passes)
    for index, consumer in enumerate(passes):
        for kind in sorted(consumer.required_artifacts(), key=lambda k: k.__name__):
            if not any(kind in early.produces for early in passes[:index]):
                raise PipelineError(consumer.missing_artifact(kind, passes[:index]))


def check_ordering(passes: Sequence[Pass]) -> None:
    """Raise PipelineError if a pass is scheduled against a declared ordering constraint."""
    for i, early in enumerate(passes):
        for late in passes[i + 1 :]:
            if early.runs_after & late.all_tags():
                raise PipelineError(f"pass {early.name} must run after {late.name}, but is scheduled before it")
            if late.runs_before & early.all_tags():
                raise PipelineError(f"pass {late.name} must run before {early.name}, but is scheduled after it")


def validate_model(model: onnx.ModelProto, after_pass: str) -> None:
    """onnx.checker full_check + unique node names; raises ValidationError naming the pass."""
    problem = model_problem(model)
    if problem:
        raise ValidationError(f"pass {after_pass} produced {problem}")


def validate_final_model(model: onnx.ModelProto, last_change: str) -> None:
    """The check every model onnxopt returns or writes passes (whatever ``validate`` says):
    onnx.checker full_check and unique node names, else ValidationError (exit code 8)
    naming ``last_change``, the step that last rewrote the model."""
    problem = model_problem(model)
    if problem:
        raise ValidationError(f"final check: {last_change} produced {problem}")


def model_problem(model: onnx.ModelProto) -> str | None:
    """Why ``model`` fails onnx.checker (full_check; "an invalid model: <first line>") or
    "a duplicate node name ..."; None when it passes.  Above protobuf's 2 GB limit the
    checker cannot take the proto: the graph is checked on a stand-in whose large
    initializers are typed inputs (structure, types and shapes; not the payloads), and a
    warning says so."""
    if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        logger.warning("model above 2 GB: onnx.checker checks its graph, types and shapes but not the initializer payloads")
        model = payload_free_skeleton(model)
    elif has_lazy(model):  # weights still in the input's data file (which the input's check covered)
        model = payload_free_skeleton(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"an invalid model: {first}"
    seen: set[str] = set()
    for node in model.graph.node:
        if node.name and node.name in seen:
            return f"a duplicate node name {node.name!r}"
        seen.add(node.name)
    return None


class PassManager:
    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        validate: bool = False,
        max_rounds: int = 1,
        progress: Progress | None = None,
        allow_no_op: bool = False,
        registry: Any = None,
    ) -> None:
        if max_rounds < 1:
            raise PipelineError("max_rounds must be at least 1")
        check_pipeline(passes)
        self.passes = list(passes)
        self.validate = validate
        self.max_rounds = max_rounds
        self.progress = progress or Progress(enabled=False)
        #: True: a requested compression that rewrote nothing is only reported (benchmarks, sweeps).
        self.allow_no_op = allow_no_op
        #: the registry the passes came from (``ctx.delegate`` looks passes up there)
        self.registry = registry

    @property
    def lossless(self) -> bool:
        return all(p.lossless for p in self.passes)

    def run(self, model: onnx.ModelProto, report: Report | None = None) -> tuple[onnx.ModelProto, Report]:
        """Run the pipeline on ``model`` (left unchanged) and return the result and report."""
        report = report or Report()
        report.lossless = self.lossless
        start = time.perf_counter()
        model, note = upgrade_for(model, self.passes)
        if note:
            report.notes.append(note)
            logger.info("%s", note)
        inferred = with_inferred_shapes(model)  # a new proto, unless inference failed
        graph = import_graph(inferred, copy=inferred is model)
        lazy = has_lazy(model)
        current = model
        metrics = report.before = measure(model, inferred=inferred)
        run = PipelineRun(
            template=model,
            metadata={p.key: p.value for p in model.metadata_props},
            passes=tuple(self.passes),
            unused_initializers=unused_initializers(model, graph),
            registry=self.registry,
        )
        last_change = ""
        for round_index in range(self.max_rounds):
            changed = False
            outcomes: list[tuple[Pass, PassResult, list[Refusal]]] = []
            for index, pass_ in enumerate(self.passes):
                ctx = PassContext(pass_.name, progress=self.progress, run=run)
                logger.info("running pass %s", pass_.name)
                result, seconds = pass_.run(graph, ctx)
                if lazy:
                    release_unchanged(graph)  # weights the pass only read go back to the input's data file
                    gc.collect()  # graphsurgeon's node/tensor cycles: a dropped constant's array goes now
                if result.modified:
                    current = ctx.export(graph)
                    last_change = pass_.name
                    if self.validate:
                        validate_model(current, pass_.name)
                    after = measure(current)
                else:
                    after = metrics
                name = pass_.name if round_index == 0 else f"{pass_.name}#{round_index + 1}"
                report.passes.append(PassReport(name, seconds, result.modified, result.stats, ctx.refusals, metrics, after))
                metrics = after
                changed |= result.modified
                if round_index == 0 and pass_.request and not self.allow_no_op:
                    outcomes.append((pass_, result, ctx.refusals))
                    self._check_request(pass_.request, index, outcomes)
            if not changed:
                break
        if current is not model and not self.validate:
            validate_final_model(current, f"pass {last_change}")
        report.after = metrics
        report.total_seconds = time.perf_counter() - start
        return current, report

    def _check_request(self, request: str, index: int, outcomes: list[tuple[Pass, PassResult, list[Refusal]]]) -> None:
        """After the last pass serving ``request``: raise NothingToDoError if none rewrote anything."""
        if any(p.request == request for p in self.passes[index + 1 :]):
            return
        group = [(p, result, refusals) for p, result, refusals in outcomes if p.request == request]
        if any(result.modified for _, result, _ in group):
            return
        lines = [p.nothing_done(result, refusals) for p, result, refusals in group]
        if any(line is None for line in lines):  # the options asked for no change
            return
        raise NothingToDoError(lines[0] if len(lines) == 1 else f"{request}: nothing rewritten: " + "; ".join(lines))
