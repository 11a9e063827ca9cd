"""The configurations of the benchmark suite, as data: who optimizes the model and how.

A :class:`Config` is one way of producing the model that gets measured:

* ``reference``: the exported FP32 model itself (the reference of every fidelity figure);
* ``onnxopt``: ``onnxopt.optimize(model, passes=[...], **options)``; ``passes`` may name a
  preset as ``"@name"``, expanded to that preset's steps from the registry at run time;
* ``peer``: another tool (``tool`` says which, ``options`` its arguments).

An onnxopt configuration whose passes are not all in ``onnxopt.passes.builtin_registry()``
is *absent*: it is listed with the missing pass names and never replaced by something
else.  It runs as soon as the passes are registered (nothing here has to change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

FLOAT_BITS = 32  # BOPs of an unquantized model: 32 x 32 bits per MAC


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    family: str  # "reference", "onnxopt" or "peer"
    tool: str = "onnxopt"  # onnxopt | onnxoptimizer | onnxsim | onnxslim | ort_level | ort_static | ort_dynamic | reference
    passes: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    bits_w: int = FLOAT_BITS
    bits_a: int = FLOAT_BITS
    quick: bool = True  # part of --quick runs
    lossless: bool = True
    images_only: bool = False  # needs image calibration data (ORT quantize_static)
    ort_level: str = "all"  # the ORT graph-optimization level its latency and outputs are measured at

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "family": self.family, "tool": self.tool,
            "passes": list(self.passes), "options": dict(self.options), "bits_w": self.bits_w,
            "bits_a": self.bits_a, "quick": self.quick, "lossless": self.lossless, "ort_level": self.ort_level,
        }


def _spiq(bits: int, quick: bool = True) -> Config:
    return Config(f"onnxopt_spiq_w{bits}a8", f"onnxopt W{bits}A8 data-free (SPIQ auto)", "onnxopt", passes=("@default", "quantize"),
                  options={"weight_bits": bits, "act_bits": 8}, bits_w=bits, bits_a=8, quick=quick,
                  lossless=False)


def _rex(order: int, budget: float, quick: bool = True) -> Config:
    return Config(f"onnxopt_rex_w4a8_o{order}_b{budget:g}", f"onnxopt W4A8 + REx order {order}, budget {budget:g}",
                  "onnxopt", passes=("@default", "quantize", "rex"),
                  options={"weight_bits": 4, "act_bits": 8, "rex_order": order, "rex_budget": budget},
                  bits_w=4, bits_a=8, quick=quick, lossless=False)


def _power(bits: int, quick: bool = True) -> Config:
    return Config(f"onnxopt_powerquant_w{bits}a8", f"onnxopt PowerQuant W{bits}A8", "onnxopt",
                  passes=("@default", "power-quant"),
                  options={"weight_bits": bits, "act_bits": 8, "power_exponent": None},
                  bits_w=bits, bits_a=8, quick=quick, lossless=False)


def _red(alpha: float, quick: bool = True) -> Config:
    return Config(f"onnxopt_red_a{alpha:g}", f"onnxopt RED prune (alpha {alpha:g})", "onnxopt",
                  passes=("@default", "hash-weights", "merge-neurons", "decompose-depthwise"),
                  options={"alpha": alpha}, quick=quick, lossless=False)


def _ort_level(level: str) -> Config:
    return Config(f"ort_{level}", f"ORT graph optimizations {level.upper()}", "peer", tool="ort_level",
                  options={"level": level}, ort_level=level)


CONFIGS: tuple[Config, ...] = (
    Config("fp32", "FP32 original (ORT ALL)", "reference", tool="reference"),
    # onnxopt
    Config("onnxopt_default", "onnxopt default (lossless)", "onnxopt", passes=("@default",)),
    Config("onnxopt_bn_fold", "onnxopt fold-batchnorm only", "onnxopt", passes=("fold-batchnorm",)),
    _spiq(8), _spiq(6), _spiq(4),
    _rex(2, 0.5), _rex(2, 0.25, quick=False), _rex(2, 0.75, quick=False),
    _power(4), _power(6, quick=False),
    _red(0.05), _red(0.0, quick=False),
    # peers
    _ort_level("basic"), _ort_level("extended"), _ort_level("all"),
    Config("onnxoptimizer_fuse_bn", "onnxoptimizer fuse_bn_into_conv", "peer", tool="onnxoptimizer",
           options={"passes": ["fuse_bn_into_conv"]}),
    Config("onnxoptimizer_default", "onnxoptimizer default passes", "peer", tool="onnxoptimizer", options={"passes": None}),
    Config("onnxsim", "onnxsim simplify", "peer", tool="onnxsim"),
    Config("onnxslim", "onnxslim slim", "peer", tool="onnxslim"),
    Config("ort_static_minmax", "ORT quantize_static MinMax W8A8", "peer", tool="ort_static",
           options={"method": "MinMax"}, bits_w=8, bits_a=8, lossless=False, images_only=True),
    Config("ort_static_percentile", "ORT quantize_static Percentile W8A8", "peer", tool="ort_static",
           options={"method": "Percentile"}, bits_w=8, bits_a=8, lossless=False, images_only=True),
    Config("ort_dynamic_int8", "ORT quantize_dynamic int8 weights", "peer", tool="ort_dynamic",
           options={"weight_type": "QInt8"}, bits_w=8, bits_a=8, lossless=False),
    Config("ort_dynamic_uint8", "ORT quantize_dynamic uint8 weights", "peer", tool="ort_dynamic",
           options={"weight_type": "QUInt8"}, bits_w=8, bits_a=8, lossless=False, quick=False),
)
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}
PEER_PACKAGES = {"onnxoptimizer": "onnxoptimizer", "onnxsim": "onnxsim", "onnxslim": "onnxslim"}


def registry_state() -> tuple[set[str], dict[str, tuple[str, ...]], str | None]:
    """(registered pass names, preset name -> steps, import error) of the built-in registry."""
    try:
        from onnxopt.passes import builtin_registry

        registry = builtin_registry()
    except Exception as exc:  # noqa: BLE001 - a pass module being edited elsewhere may not import
        return set(), {}, f"{type(exc).__name__}: {exc}"
    return {cls.name for cls in registry.passes()}, {p.name: tuple(p.steps) for p in registry.presets()}, None


def expand_passes(passes: Iterable[str], presets: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Pass names with ``@preset`` replaced by that preset's steps (KeyError for an unknown preset)."""
    out: list[str] = []
    for step in passes:
        out.extend(presets[step[1:]] if step.startswith("@") else (step,))
    return out


def availability(
    config: Config,
    passes: set[str],
    presets: Mapping[str, tuple[str, ...]],
    installed: Mapping[str, bool] | None = None,
) -> tuple[bool, str]:
    """Whether ``config`` can run here, and why not ("absent (pass not landed): rex" ...)."""
    if config.family == "onnxopt":
        missing_presets = [s[1:] for s in config.passes if s.startswith("@") and s[1:] not in presets]
        if missing_presets:
            return False, f"absent (preset not defined): {', '.join(missing_presets)}"
        missing = [p for p in expand_passes(config.passes, presets) if p not in passes]
        if missing:
            return False, f"absent (pass not landed): {', '.join(dict.fromkeys(missing))}"
        return True, "available"
    package = PEER_PACKAGES.get(config.tool)
    if package is not None and installed is not None and not installed.get(package, False):
        return False, f"absent ({package} not installed)"
    return True, "available"


def installed_peers() -> dict[str, bool]:
    from bench.common import package_version

    return {pkg: package_version(pkg) is not None for pkg in PEER_PACKAGES.values()}


def select(quick: bool, names: Iterable[str] | None = None) -> list[Config]:
    """The configurations of a run: all (full), the ``quick`` ones, or the named ones (plus the reference)."""
    if names:
        wanted = set(names) | {"fp32"}
        unknown = wanted - set(CONFIG_BY_NAME)
        if unknown:
            raise KeyError(f"unknown configuration(s): {', '.join(sorted(unknown))}; known: {', '.join(CONFIG_BY_NAME)}")
        return [c for c in CONFIGS if c.name in wanted]
    return [c for c in CONFIGS if c.quick or not quick]
