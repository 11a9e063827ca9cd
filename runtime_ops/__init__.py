"""onnxopt.runtime_ops: custom ONNX Runtime operators emitted by onnxopt's passes.

All ops live in one custom domain, :data:`DOMAIN`, version :data:`DOMAIN_VERSION`:

=====================  ==========================================================
PowerQuantizeLinear    PowerQuant codes ``round(sign(x)|x|^a / s)`` (eq. 3.13)
PowerDequantizeLinear  ``sign(q)(|q|s)^{1/a}`` (eq. 3.15); ``q|q|s²`` for a = 0.5
WrapToBits             two's-complement wrap of an integer tensor to b bits
ModularMatMul          ``wrap_b(MatMulInteger(...) + bias)``
ModularConv            ``wrap_b(ConvInteger(...) + bias)``
=====================  ==========================================================

Each op has a schema (:data:`SCHEMAS`, :func:`describe`), a model-local FunctionProto
body of standard ONNX ops and a numpy reference.  The portable form is the function:
:func:`add_functions` puts the bodies a model uses into the model (the passes call it), and
any stock ONNX Runtime (Python, C++, C#, Triton's ORT backend) then runs the model with no
extra library — ORT inlines the bodies at session creation.  For consumers without
model-local function support (older runtimes, some converters) :func:`inline_functions`
replaces every call by its body (CLI ``--inline-functions``).

Native kernels: a serving stack that has compiled kernels for this domain registers them
with ``SessionOptions.register_custom_ops_library(path)``; a native kernel for a
(domain, op) overrides the function body, which stays as the fallback (docs/custom-ops.md).
:func:`register` does exactly that for a library given as argument or in the environment
variable ``ONNXOPT_RUNTIME_OPS_LIBRARY``.  onnxopt ships no compiled kernel (the ORT C/C++
headers are not in the onnxruntime wheel): without a library ``register`` is a no-op and
the function bodies run.
"""

from __future__ import annotations

import os
from typing import Iterable

import onnx
from onnx import helper

DOMAIN = "ai.onnxopt"
DOMAIN_VERSION = 1
#: Lowest default-domain opset the bodies need (CastLike).
MIN_OPSET = 15
LIBRARY_ENV = "ONNXOPT_RUNTIME_OPS_LIBRARY"

from .modular import CONV, MATMUL, WRAP  # noqa: E402
from .power import POWER_DEQUANTIZE, POWER_QUANTIZE  # noqa: E402
from .schema import OpSchema  # noqa: E402

SCHEMAS: dict[str, OpSchema] = {s.name: s for s in (POWER_QUANTIZE, POWER_DEQUANTIZE, WRAP, MATMUL, CONV)}


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("model imports no default-domain opset")


def _calls(model: onnx.ModelProto) -> dict[str, list[dict[str, object]]]:
    """Op name -> attribute dicts of every call of an op of :data:`DOMAIN` in the main graph."""
    calls: dict[str, list[dict[str, object]]] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            calls.setdefault(node.op_type, []).append({a.name: helper.get_attribute_value(a) for a in node.attribute})
    return calls


def function_for(name: str, opset: int, variant: str = "generic") -> onnx.FunctionProto:
    """The FunctionProto of op ``name`` for a model of default opset ``opset``."""
    if name not in SCHEMAS:
        raise KeyError(f"unknown op {DOMAIN}::{name}; known: {', '.join(SCHEMAS)}")
    return SCHEMAS[name].build(opset, variant)


def add_functions(model: onnx.ModelProto, ops: Iterable[str] | None = None) -> onnx.ModelProto:
    """Add (or refresh) the function bodies of the ops ``model`` calls (plus ``ops``) and the
    opset import of :data:`DOMAIN`; edits ``model`` in place and returns it.

    The body variant follows the calls: the a = 0.5 (Sqrt/Mul) bodies when every call of a
    Power op uses exponent 0.5; ``BitwiseAnd`` wraps from opset 18, ``Mod`` below."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"{DOMAIN} function bodies need opset >= {MIN_OPSET}, the model has {opset}")
    calls = _calls(model)
    wanted = set(calls) | set(ops or ())
    if not wanted:
        return model
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in wanted)]
    fresh = [function_for(name, opset, SCHEMAS[name].variant(calls.get(name, []))) for name in sorted(wanted)]
    del model.functions[:]
    model.functions.extend(kept + fresh)
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if model.ir_version < 8:
        model.ir_version = 8  # model-local functions
    return model


def add_functions_to_graph(graph) -> None:
    """:func:`add_functions` for an onnx-graphsurgeon graph (what the passes work on): the
    bodies of the :data:`DOMAIN` ops its nodes call become ``graph.functions``."""
    import onnx_graphsurgeon as gs

    calls: dict[str, list[dict[str, object]]] = {}
    for node in graph.nodes:
        if node.domain == DOMAIN:
            calls.setdefault(node.op, []).append(dict(node.attrs))
    if not calls:
        return
    opset = int(graph.opset)
    if opset < MIN_OPSET:
        raise ValueError(f"{DOMAIN} function bodies need opset >= {MIN_OPSET}, the model has {opset}")
    holder = helper.make_model(helper.make_graph([], "functions", [], []), opset_imports=[helper.make_opsetid("", opset)])
    holder.functions.extend(function_for(name, opset, SCHEMAS[name].variant(attrs)) for name, attrs in sorted(calls.items()))
    fresh = gs.import_onnx(holder).functions
    graph.functions = [f for f in graph.functions if not (f.domain == DOMAIN and f.name in calls)] + list(fresh)


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every model-local function call replaced by its body."""
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(model)
    if not any(node.domain == DOMAIN for node in inlined.graph.node):
        kept = [entry for entry in inlined.opset_import if entry.domain != DOMAIN]
        del inlined.opset_import[:]
        inlined.opset_import.extend(kept)
    return inlined


def register(session_options, library: str | os.PathLike[str] | None = None) -> bool:
    """Register native kernels for :data:`DOMAIN` in an ``onnxruntime.SessionOptions``.

    ``library`` (or ``$ONNXOPT_RUNTIME_OPS_LIBRARY``) is a shared library exporting
    ``RegisterCustomOps`` for this domain; its kernels override the function bodies.
    Returns True when a library was registered, False when none is configured (the model
    still runs through its function bodies)."""
    path = library or os.environ.get(LIBRARY_ENV)
    if not path:
        return False
    if not os.path.isfile(path):
        raise FileNotFoundError(f"custom-op library {path} not found")
    session_options.register_custom_ops_library(os.fspath(path))
    return True


def describe() -> str:
    """The schemas of every op, as text."""
    return "\n\n".join(schema.describe() for schema in SCHEMAS.values())


__all__ = ["DOMAIN", "DOMAIN_VERSION", "SCHEMAS", "add_functions", "add_functions_to_graph", "inline_functions", "register", "describe", "function_for"]
