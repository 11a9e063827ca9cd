"""Pass registry and presets.

A :class:`PassRegistry` is an ordinary object (no import-time global state): the built-in one
comes from :func:`onnxopt.passes.builtin_registry`, and a user can make their own, register
extra passes and presets, and hand it to :func:`onnxopt.optimize`.

Pass families add their CLI flags (:class:`~onnxopt.flags.FlagFamily`) with ``add_flags``.

Presets are plain data: a name, a description, a tuple of pass names and option defaults
(e.g. ``dfq`` turns SPIQ off); options the caller gives override a preset's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import PipelineError
from .flags import FlagFamily
from .pass_base import Pass


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    steps: tuple[str, ...]
    #: option defaults of this pipeline (the caller's options override them)
    options: Mapping[str, Any] = field(default_factory=dict)


class PassRegistry:
    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._presets: dict[str, Preset] = {}
        self._flags: list[FlagFamily] = []

    # -- registration
    def register(self, pass_cls: type[Pass]) -> type[Pass]:
        if not pass_cls.name or not pass_cls.summary:
            raise ValueError(f"{pass_cls.__name__} needs a name and a one-line summary")
        if pass_cls.name in self._passes:
            raise ValueError(f"a pass named {pass_cls.name!r} is already registered")
        self._passes[pass_cls.name] = pass_cls
        return pass_cls

    def add_preset(self, preset: Preset) -> None:
        for step in preset.steps:
            self.get(step)
        self._presets[preset.name] = preset

    def add_flags(self, family: FlagFamily) -> None:
        """CLI flags of a pass family (their groups appear in --help in this order)."""
        self._flags.append(family)

    # -- lookup
    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            raise PipelineError(f"unknown pass {name!r}{_suggest(name, self._passes)}; see --list-passes") from None

    def preset(self, name: str) -> Preset:
        try:
            return self._presets[name]
        except KeyError:
            raise PipelineError(f"unknown preset {name!r}{_suggest(name, self._presets)}; see --list-passes") from None

    def passes(self) -> list[type[Pass]]:
        return list(self._passes.values())

    def presets(self) -> list[Preset]:
        return list(self._presets.values())

    def flag_families(self) -> list[FlagFamily]:
        return list(self._flags)

    # -- pipelines
    def build(self, names: Iterable[str], options: Mapping[str, Any] | None = None) -> list[Pass]:
        """Instantiate the passes ``names``, giving each the options it declares.

        Every option must be declared by at least one pass of the pipeline; the options are
        type-checked, and the ordering and artifacts checked, before any pass runs.
        """
        classes = [self.get(name) for name in names]
        options = dict(options or {})
        accepted = {key for cls in classes for key in cls.options_spec}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise PipelineError(
                f"option(s) {', '.join(unknown)} not used by any pass of the pipeline "
                f"({', '.join(cls.name for cls in classes) or 'empty'})"
            )
        from .manager import check_pipeline

        passes = [cls(**{k: v for k, v in options.items() if k in cls.options_spec}) for cls in classes]
        check_pipeline(passes)
        return passes

    def describe(self) -> str:
        """The --list-passes text."""
        width = max((len(name) for name in self._passes), default=10) + 2
        lines = ["passes:"]
        for cls in self._passes.values():
            kind = "" if cls.lossless else " [lossy]"
            lines.append(f"  {cls.name:<{width}}{cls.summary}{kind}")
        lines.append("")
        lines.append("presets:")
        for preset in self._presets.values():
            lines.append(f"  {preset.name:<{width}}{preset.description}")
            lines.append(f"  {'':<{width}}= {','.join(preset.steps) or '(no passes)'}")
            if preset.options:
                lines.append(f"  {'':<{width}}  with {', '.join(f'{k}={v!r}' for k, v in preset.options.items())}")
        return "\n".join(lines)


def _suggest(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
