"""The shape every custom op of :mod:`onnxopt.runtime_ops` has: a schema, a function body
builder and a numpy reference.

A function body is an ONNX ``FunctionProto`` of standard ops in the op's domain.  Attributes
reach the body by *reference* (``AttributeProto.ref_attr_name``), so one function serves
every attribute value (bits, exponent, Conv strides ...): a ``Constant`` node turns an
attribute into a tensor the body computes with (e.g. ``2^(bits−1)``), and ORT's constant
folding removes that arithmetic once the function is inlined.  What references cannot do is
choose *which* ops run: the fast a = 0.5 PowerQuant bodies (Sqrt / Mul instead of Pow) are a
second body *variant*, picked per model from the attribute values its nodes use
(:meth:`OpSchema.variant`).  Likewise ``WrapToBits`` uses ``BitwiseAnd`` from opset 18 and
``Mod`` (~10× slower, docs/custom-ops.md) below it, picked from the model's opset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, helper

from . import DOMAIN


@dataclass(frozen=True)
class Formal:
    """A formal input/output: name, type-constraint letter, description."""

    name: str
    type_str: str
    doc: str


@dataclass(frozen=True)
class OpSchema:
    name: str
    doc: str
    inputs: tuple[Formal, ...]
    outputs: tuple[Formal, ...]
    #: attribute name -> (type, default or None if required, description)
    attributes: dict[str, tuple[str, object, str]]
    #: constraint letter -> allowed types
    type_constraints: dict[str, tuple[str, ...]]
    #: (opset, variant) -> FunctionProto
    build: Callable[[int, str], onnx.FunctionProto]
    #: numpy reference: (*inputs, **attributes) -> output
    reference: Callable[..., np.ndarray]
    #: attributes of one node -> body variant name ("generic" unless a faster body applies)
    variant_of: Callable[[dict[str, object]], str] = field(default=lambda attrs: "generic")

    def variant(self, nodes_attrs: Sequence[dict[str, object]]) -> str:
        """The body variant serving every node (a faster variant only if all nodes allow it)."""
        variants = {self.variant_of(attrs) for attrs in nodes_attrs}
        return variants.pop() if len(variants) == 1 else "generic"

    def describe(self) -> str:
        lines = [f"{DOMAIN}::{self.name} (version 1)", "", self.doc, "", "Inputs:"]
        lines += [f"  {f.name}: {f.type_str} — {f.doc}" for f in self.inputs]
        lines += ["Outputs:"] + [f"  {f.name}: {f.type_str} — {f.doc}" for f in self.outputs]
        lines += ["Attributes:"] + [f"  {k} ({t}, default {d!r}): {doc}" for k, (t, d, doc) in self.attributes.items()]
        lines += ["Type constraints:"] + [f"  {k} in {', '.join(v)}" for k, v in self.type_constraints.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------- body building
class Body:
    """Collects the nodes of a function body with fresh internal names."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._count = 0

    def op(self, op_type: str, *inputs: str, outputs: Sequence[str] | None = None, **attrs: object) -> str:
        if outputs is None:
            self._count += 1
            outputs = [f"_{self._prefix}{self._count}"]
        node = helper.make_node(op_type, list(inputs), list(outputs))
        for key, value in attrs.items():
            node.attribute.append(value if isinstance(value, AttributeProto) else helper.make_attribute(key, value))
        self.nodes.append(node)
        return outputs[0]

    def attr_int(self, attribute: str) -> str:
        """A scalar int64 tensor holding the value of the function attribute ``attribute``."""
        return self.op("Constant", value_int=_ref("value_int", attribute, AttributeProto.INT))

    def attr_float(self, attribute: str) -> str:
        return self.op("Constant", value_float=_ref("value_float", attribute, AttributeProto.FLOAT))

    def const_float(self, value: float) -> str:
        return self.op("Constant", value_float=helper.make_attribute("value_float", float(value)))

    def const_int(self, value: int) -> str:
        return self.op("Constant", value_int=helper.make_attribute("value_int", int(value)))

    def pass_attr(self, name: str, attr_type: int) -> AttributeProto:
        """An attribute of an inner node that forwards the function attribute of the same name."""
        return _ref(name, name, attr_type)


def _ref(name: str, refers_to: str, attr_type: int) -> AttributeProto:
    attribute = helper.make_attribute_ref(name, attr_type)
    attribute.ref_attr_name = refers_to
    return attribute


def function(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    body: Body,
    opset: int,
    attributes: Sequence[str],
    doc: str,
    defaults: dict[str, object] | None = None,
) -> onnx.FunctionProto:
    """A FunctionProto in :data:`DOMAIN`; ``attributes`` have no default, ``defaults`` do."""
    protos = [helper.make_attribute(k, v) for k, v in (defaults or {}).items()]
    return helper.make_function(
        DOMAIN,
        name,
        list(inputs),
        list(outputs),
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(attributes),
        attribute_protos=protos,
        doc_string=doc,
    )


def wrap_nodes(body: Body, acc: str, output: str, opset: int) -> str:
    """Signed wrap of integer ``acc`` to ``bits`` bits (attribute), into ``output``:
    ``BitwiseAnd(acc + 2^{b−1}, 2^b − 1) − 2^{b−1}`` (opset ≥ 18), else with ``Mod``."""
    bits = body.op("Cast", body.attr_int("bits"), to=onnx.TensorProto.FLOAT)
    half_f = body.op("Pow", body.const_float(2.0), body.op("Sub", bits, body.const_float(1.0)))
    half = body.op("CastLike", half_f, acc)
    shifted = body.op("Add", acc, half)
    modulus = body.op("Add", half, half)
    if opset >= 18:
        low_bits = body.op("BitwiseAnd", shifted, body.op("Sub", modulus, body.op("CastLike", body.const_int(1), acc)))
    else:
        low_bits = body.op("Mod", shifted, modulus)
    return body.op("Sub", low_bits, half, outputs=[output])


def wrap_reference(acc: np.ndarray, bits: int) -> np.ndarray:
    """numpy: signed two's-complement wrap of ``acc`` to ``bits`` bits (dtype kept)."""
    wide = acc.astype(np.int64)
    half = np.int64(1) << np.int64(bits - 1)
    return (((wide + half) & ((half << 1) - 1)) - half).astype(acc.dtype)
