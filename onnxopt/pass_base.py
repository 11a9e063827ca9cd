"""The pass contract.

A pass is a small class with a ``name``, a one-line ``summary``, declared ordering
constraints and ``call(graph, ctx) -> PassResult``.  ``requires`` runs before ``call`` and
refuses the whole pass (raising :class:`PreconditionFailed` with the reason) when the graph
does not meet its preconditions; ``ensures`` checks the postcondition afterwards.

Inside ``call`` a pass separates *match*, *check* and *rewrite*: it never mutates the graph
before all checks of a match passed, and records every refusal with ``ctx.refuse(subject,
reason)`` (logged and kept in the report).

Ordering: ``tags`` name what a pass is (its own name is always a tag); ``runs_after`` lists
tags that, when present in the same pipeline, must be scheduled earlier, ``runs_before``
tags that must be scheduled later.  The PassManager validates this before running.

Stage: where a pass goes when a CLI flag adds it to a pipeline (``--quantize`` adds
quantize to the default pipeline): before the first pass of a later :class:`Stage`, and
before any pass that must run after it.

Artifacts: what one pass leaves for a later one is a typed object (``ctx.publish(obj)``,
``ctx.artifact(Type)``).  The producer lists its type in ``produces``, the consumer in
``consumes`` (or ``required_artifacts()`` when it depends on the options); a pipeline whose
consumer has no producer before it is refused before anything runs.  The run's template
model and metadata are ``ctx.export(graph)`` and ``ctx.metadata``.

Options: a pass declares ``Options``, a frozen dataclass derived from
:class:`~onnxopt.options.PassOptions` (one typed field per option, with its default and CLI
flag, and ``check()`` for the rules between fields).  They are built and checked when the
pipeline is assembled, before any pass runs; ``requires`` keeps only the checks that need
the graph.  ``self.options`` is that dataclass (also readable as a mapping).  A pass may
still give a plain ``options_spec`` dict (name → default; numbers type-checked only).

Compressions: a pass serving a user's request (``request = "quantize"``, ``"prune"``, ...)
must rewrite something.  When every pass of a request in the pipeline rewrote nothing the
PassManager raises :class:`~onnxopt.errors.NothingToDoError` with ``nothing_done``'s line
(the cause and the fix; None when the options asked for no change, e.g. a REx budget of 0).  A pass whose rewrite emits ops of a newer opset declares
``min_opset``; the PassManager upgrades an older model once, before the first pass.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence, TypeVar

import onnx
import onnx_graphsurgeon as gs

from .errors import PipelineError
from .graph import export_model
from .options import PassOptions
from .progress import Progress

T = TypeVar("T")


class PreconditionFailed(Exception):
    """Raised by ``Pass.requires`` to refuse running the pass, with the reason as message."""


@dataclass
class PassResult:
    """What a pass did: whether it modified the graph and its own counters."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Refusal:
    """A rewrite the pass did not apply, and why."""

    subject: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"subject": self.subject, "reason": self.reason}


@dataclass
class PipelineRun:
    """What the passes of one pipeline run share, typed (the PassManager makes one per run)."""

    #: the input model: IR version, opsets and functions of mid-pass exports (:meth:`PassContext.export`)
    template: onnx.ModelProto | None = None
    #: the model's metadata_props; passes add entries (e.g. the BN statistics fold-batchnorm keeps)
    metadata: dict[str, str] = field(default_factory=dict)
    #: the pipeline, in order
    passes: tuple["Pass", ...] = ()
    #: initializers the import already dropped (eliminate-dead reports them)
    unused_initializers: list[str] = field(default_factory=list)
    #: artifact type → the artifact an earlier pass published (see Pass.produces)
    artifacts: dict[type, Any] = field(default_factory=dict)
    #: the pass registry the pipeline came from (None: the built-in one), for ``ctx.delegate``
    registry: Any = None

    def pass_class(self, name: str) -> type["Pass"]:
        """The registered pass called ``name``."""
        registry = self.registry
        if registry is None:
            from onnxopt.passes import builtin_registry

            registry = builtin_registry()
        return registry.get(name)


class PassContext:
    """Per-pass services: options, logging, refusal recording, progress, and the run's
    shared state (template model, metadata, artifacts)."""

    def __init__(self, pass_name: str, *, progress: Progress | None = None, run: PipelineRun | None = None) -> None:
        self.pass_name = pass_name
        self.logger = logging.getLogger(f"onnxopt.passes.{pass_name}")
        self.refusals: list[Refusal] = []
        self._progress = progress or Progress(enabled=False)
        self.run = run if run is not None else PipelineRun()

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata_props of this run (passes may add entries)."""
        return self.run.metadata

    def publish(self, artifact: Any) -> None:
        """Leave ``artifact`` for later passes (they find it by its type)."""
        self.run.artifacts[type(artifact)] = artifact

    def artifact(self, kind: type[T]) -> T | None:
        """The ``kind`` artifact an earlier pass published; None when none did."""
        return self.run.artifacts.get(kind)

    def consumed_later(self, kind: type) -> bool:
        """Whether a pass after this one in the pipeline uses the ``kind`` artifact."""
        names = [p.name for p in self.run.passes]
        later = self.run.passes[names.index(self.pass_name) + 1 :] if self.pass_name in names else ()
        return any(kind in p.required_artifacts() for p in later)

    def export(self, graph: gs.Graph) -> onnx.ModelProto:
        """The graph as it is now, as a model with the run's IR version, opsets and metadata
        (a plain export outside a pipeline run)."""
        if self.run.template is None:
            return gs.export_onnx(graph)
        return export_model(graph, self.run.template, self.run.metadata)

    def delegate(self, name: str, graph: gs.Graph, **options: Any) -> PassResult:
        """Run the registered pass ``name`` on ``graph`` as part of this pass (its options
        built and checked like any pass's; its refusals land in this pass's report): a family
        that falls back to another family's rewrite uses it by name instead of importing it
        (power-quant hands uniform layers to quantize)."""
        helper = self.run.pass_class(name)(**options)
        helper.requires(graph, self)
        return helper.call(graph, self)

    def take_unused_initializers(self) -> list[str]:
        """The initializers the import dropped, once (eliminate-dead counts them)."""
        names, self.run.unused_initializers = self.run.unused_initializers, []
        return names

    def refuse(self, subject: str, reason: str) -> None:
        """Record that ``subject`` was left unchanged because of ``reason``."""
        self.refusals.append(Refusal(subject, reason))
        self.logger.info("%s: %s not rewritten: %s", self.pass_name, subject, reason)

    def progress(self, items: Iterable[T], total: int | None = None, label: str = "") -> Iterator[T]:
        """Iterate over ``items`` while reporting progress for long passes."""
        return self._progress.track(items, total=total, label=f"{self.pass_name} {label}".strip())


def check_option_type(pass_name: str, key: str, value: Any, default: Any) -> None:
    """An option whose default is a number takes a finite number (an integer where the
    default is one, or None): ``--set max_constant_bytes=abc`` fails here, before any pass
    runs.  Options with text or boolean defaults may take other forms ("auto", 1) and are
    checked by their pass."""
    if value is None or isinstance(default, bool) or not isinstance(default, (int, float)):
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and isinstance(default, int) and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        kind = "an integer" if isinstance(default, int) else "a finite number"
        raise PipelineError(f"option {key} of pass {pass_name} must be {kind}, got {value!r}")


class Stage(IntEnum):
    """The phases of a pipeline, in order (a pass's ``stage``)."""

    CLEANUP = 0  #: lossless cleanup and folding (the default pipeline)
    PRUNE = 1  #: pruning and the rewrites that prepare quantization (RED, equalization)
    QUANTIZE = 2  #: quantization (QDQ, weight-only, PowerQuant)
    EXPAND = 3  #: rewrites of quantized layers (REx, modular accumulators)
    FINISH = 4  #: dead-code removal


class Pass:
    """Base class of all passes.  Subclasses set the class attributes and implement call."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: A lossless pass keeps outputs equal up to float rounding (verified with tolerances).
    lossless: ClassVar[bool] = True
    tags: ClassVar[frozenset[str]] = frozenset()
    runs_after: ClassVar[frozenset[str]] = frozenset()
    runs_before: ClassVar[frozenset[str]] = frozenset()
    #: Artifact types this pass publishes (``ctx.publish``) for later passes.
    produces: ClassVar[frozenset[type]] = frozenset()
    #: Artifact types this pass needs from an earlier pass (see required_artifacts).
    consumes: ClassVar[frozenset[type]] = frozenset()
    #: Where a CLI flag inserts this pass (see Stage).
    stage: ClassVar[Stage] = Stage.CLEANUP
    #: The pass this one takes the place of when a flag asks for it (power-quant: quantize).
    replaces: ClassVar[str | None] = None
    #: The typed options (a frozen PassOptions dataclass); None for a pass without options
    #: or one that declares a plain ``options_spec`` dict instead.
    Options: ClassVar[type[PassOptions] | None] = None
    #: Option name -> default value (derived from ``Options`` when it is declared).
    #: Options given to the pipeline reach the passes declaring them.
    options_spec: ClassVar[Mapping[str, Any]] = {}
    #: The compression this pass serves; when all its passes rewrite nothing, the run fails.
    request: ClassVar[str | None] = None
    #: Oldest default-domain opset the rewrite can emit into (the manager upgrades older models).
    min_opset: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("Options") is not None:
            cls.options_spec = cls.Options.defaults()

    def __init__(self, **options: Any) -> None:
        """Build and check the options (PipelineError naming the option on a bad value)."""
        if self.Options is not None:
            self.options: Mapping[str, Any] = self.Options.build(self.name, options)
            return
        unknown = set(options) - set(self.options_spec)
        if unknown:
            raise PipelineError(f"pass {self.name} has no option(s) {', '.join(sorted(unknown))}")
        for key, value in options.items():
            check_option_type(self.name, key, value, self.options_spec[key])
        self.options = {**self.options_spec, **options}

    @classmethod
    def all_tags(cls) -> frozenset[str]:
        return cls.tags | {cls.name}

    def required_artifacts(self) -> frozenset[type]:
        """The artifacts this pass needs with its options (default: ``consumes``); the
        pipeline is refused before it runs when no earlier pass produces one of them."""
        return self.consumes

    def missing_artifact(self, kind: type, earlier: Sequence["Pass"]) -> str:
        """The message when no pass of ``earlier`` produces ``kind``: the cause and the fix."""
        return f"pass {self.name} needs the {kind.__name__} an earlier pass produces, and no pass before it does"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PreconditionFailed(reason) if the pass cannot run on ``graph``."""

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement call()")

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise an exception if the postcondition of the pass does not hold."""

    def nothing_done(self, result: PassResult, refusals: list[Refusal]) -> str | None:
        """One line for NothingToDoError: why this pass rewrote nothing (and how to fix it);
        None when its options asked for no change.  The default names the most frequent
        refusal reasons."""
        if not refusals:
            return f"{self.name} rewrote nothing: the model has nothing it applies to"
        counts: dict[str, int] = {}
        for refusal in refusals:
            counts[refusal.reason] = counts.get(refusal.reason, 0) + 1
        top = sorted(counts.items(), key=lambda item: -item[1])[:3]
        return f"{self.name} rewrote nothing: " + "; ".join(f"{reason} ({n}x)" if n > 1 else reason for reason, n in top)

    def run(self, graph: gs.Graph, ctx: PassContext) -> tuple[PassResult, float]:
        """requires → call → ensures, timed.  A failed precondition becomes a refusal."""
        start = time.perf_counter()
        try:
            self.requires(graph, ctx)
        except PreconditionFailed as reason:
            ctx.refuse("graph", f"pass not run: {reason}")
            return PassResult(False), time.perf_counter() - start
        result = self.call(graph, ctx)
        self.ensures(graph, ctx)
        return result, time.perf_counter() - start
