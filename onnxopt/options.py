"""Typed pass options.

A pass declares its options as a frozen dataclass derived from :class:`PassOptions`: one
field per option, with its type annotation and default (``option(...)`` adds the CLI flag
that sets it, so an error can name the flag the user typed).  Shared pieces (bit-widths,
activation ranges, calibration) are small dataclasses that several passes' options
inherit from.

The options of every pass are built when the pipeline is assembled
(:meth:`onnxopt.registry.PassRegistry.build`), before any pass runs, so a bad value fails
at once with one line (:class:`~onnxopt.errors.PipelineError`, exit code 7):

1. each value must match its field's annotation (``int``, ``float``, ``bool``, ``str``,
   ``None``, ``Literal[...]``, ``tuple[...]`` and unions of them; a list where a tuple is
   declared becomes a tuple, an integer where a float is declared a float, and numbers
   must be finite);
2. then :meth:`PassOptions.check` applies the rules between fields (``rex_budget`` ≤ K−1,
   ``act_ranges='minmax'`` needs calibration data, ...).

A PassOptions is also a read-only mapping (``options["weight_bits"]``), so a pass reads
its options either way; ``options.weight_bits`` is the typed spelling.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Iterator, Literal, Union

from .errors import PipelineError


class OptionProblem(Exception):
    """Raised inside :meth:`PassOptions.check`: ``key``'s value is wrong because of the message."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def option(default: Any, *, flag: str | None = None) -> Any:
    """A dataclass field with its default and the CLI flag that sets it (for messages)."""
    return dataclasses.field(default=default, metadata={"flag": flag} if flag else {})


@dataclasses.dataclass(frozen=True)
class PassOptions(Mapping):
    """Base of every pass's options dataclass (frozen; also a read-only mapping)."""

    # -- construction ------------------------------------------------------------------
    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name → default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls, pass_name: str, given: Mapping[str, Any]) -> "PassOptions":
        """The options of pass ``pass_name`` from ``given`` (a subset of the fields):
        type-checked and coerced, then :meth:`check`-ed; PipelineError naming the option
        (and its flag) otherwise."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise PipelineError(f"pass {pass_name} has no option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in given.items():
            ok, coerced = conform(value, hints[key])
            if not ok:
                raise PipelineError(f"{_label(pass_name, known[key])} must be {describe(hints[key])}, got {value!r}")
            values[key] = coerced
        options = cls(**values)
        try:
            options.check()
        except OptionProblem as problem:
            raise PipelineError(f"{_label(pass_name, known[problem.key])} {problem}") from None
        return options

    def check(self) -> None:
        """Rules between fields; raise OptionProblem(key, "must be ..., got ...")."""

    # -- read-only mapping -------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(f.name for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return len(dataclasses.fields(self))


def flag_of(options: type[PassOptions], key: str) -> str:
    """The CLI flag that sets option ``key`` (``--key`` when the field names none)."""
    field = next((f for f in dataclasses.fields(options) if f.name == key), None)
    return (field.metadata.get("flag") if field is not None else None) or "--" + key.replace("_", "-")


def _label(pass_name: str, field: dataclasses.Field) -> str:
    flag = field.metadata.get("flag")
    return f"option {field.name}" + (f" ({flag})" if flag else "") + f" of pass {pass_name}"


# --------------------------------------------------------------------------- type checks
def conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` matches the annotation ``hint``, the value coerced to it)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None) or hint is None:
        return value is None, value
    if origin in (Union, types.UnionType):
        for member in typing.get_args(hint):
            ok, coerced = conform(value, member)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in typing.get_args(hint)), value
    if origin is tuple:
        return _conform_tuple(value, typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # an annotation this checker does not model: the pass checks it


def _conform_tuple(value: Any, args: tuple[Any, ...]) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    if len(args) == 2 and args[1] is Ellipsis:
        members = [args[0]] * len(value)
    elif len(args) != len(value):
        return False, value
    else:
        members = list(args)
    coerced = []
    for item, member in zip(value, members):
        ok, item = conform(item, member)
        if not ok:
            return False, value
        coerced.append(item)
    return True, tuple(coerced)


def describe(hint: Any) -> str:
    """``int | None`` → "an integer or None" (for messages)."""
    origin = typing.get_origin(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin in (Union, types.UnionType):
        return _either(describe(member) for member in typing.get_args(hint))
    if origin is Literal:
        choices = [repr(choice) for choice in typing.get_args(hint)]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a text"}.get(hint, getattr(hint, "__name__", str(hint)))


def _either(parts: Any) -> str:
    """"a, b or c" (a Literal's "one of x, y" merged into the list)."""
    flat = []
    for part in parts:
        part = part[len("one of "):] if part.startswith("one of ") else part
        flat += [piece for chunk in part.split(" or ") for piece in chunk.split(", ")]
    return flat[0] if len(flat) == 1 else ", ".join(flat[:-1]) + " or " + flat[-1]


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "texts"}.get(hint, describe(hint))


@dataclasses.dataclass(frozen=True)
class NoOptions(PassOptions):
    """The options of a pass that has none."""
