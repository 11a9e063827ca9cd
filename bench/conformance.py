"""Conformance of onnxopt's default pipeline on the ONNX backend test models.

Models: the backend test data of the installed ``onnx``
(``onnx/backend/test/data``), by source folder:

* ``simple``, ``pytorch-converted``, ``pytorch-operator``: ``model.onnx`` with
  ``test_data_set_*/{input,output}_*.pb``, shipped in the wheel;
* ``light``: the ``light_*.onnx`` CNNs with ``light_*_output_0.pb``; the input is the one the
  official runner feeds them (``Runner.generate_dummy_data(seed=0, random=False)``) and the
  tolerance the one of ``real/test_*/data.json`` (the ``real`` folder only points at them);
* ``node``: the one-operator cases, not in the wheel: generated from the case modules of
  ``onnx.backend.test.case.node`` into the cache (``$ONNXOPT_ASSET_CACHE/conformance``, else
  ``~/.cache/onnxopt/conformance``), once per onnx version and module, in the layout of
  ``onnx/backend/test/cmd_tools.py generate-data``; named ``node/<module>/<case>``.

Per model (:func:`check_case`): ``onnxopt.optimize(model)`` (the default pipeline),
``onnx.checker.check_model(full_check=True)`` on the output, the original and the optimized
model in ONNX Runtime (graph optimizations off) on the test inputs, outputs compared to the
expected ones with the case's tolerance (``Runner.assert_similar_outputs``). Categories:

* ``ok``;
* ``refused``: a clean one-line refusal (``UnsupportedModelError``, or ``InvalidModelError``
  on an input that fails the checker) -- acceptable;
* ``ORT fails``: ORT cannot load or run the original, or its outputs differ from the
  expected ones: nothing to compare against -- skipped (``error``/``invalid`` still apply);
* ``wrong``: the optimized outputs differ from the expected ones where the original's matched;
* ``invalid``: the checker or ORT rejects the output but not the input (the reason also says
  whether ORT still computes the expected outputs from it);
* ``error``: ``optimize`` raised anything else (an internal error);
* ``slow``: otherwise ok, but ``optimize`` took more than :data:`SLOW_SECONDS`.

    python -m bench.conformance [--folders node,light] [--only NAME,...] [--out bench/results]

writes ``<out>/conformance.md`` and ``<out>/conformance.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bench.common import environment, json_safe, table

SLOW_SECONDS = 20.0
FOLDERS = ("simple", "pytorch-converted", "pytorch-operator", "light", "node")
OK, REFUSED, ORT_FAILS, WRONG, INVALID, ERROR, SLOW = "ok", "refused", "ORT fails", "wrong", "invalid", "error", "slow"
CATEGORIES = (OK, REFUSED, ORT_FAILS, WRONG, INVALID, ERROR, SLOW)
#: Categories that count against onnxopt.
FAILURES = (WRONG, INVALID, ERROR, SLOW)
DEFAULT_OUT = Path("bench/results")

DataSet = tuple[list[Any], list[Any]]


def backend_data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def cache_dir() -> Path:
    """Where the generated node cases go: ``$ONNXOPT_ASSET_CACHE/conformance`` or ``~/.cache/onnxopt/conformance``."""
    env = os.environ.get("ONNXOPT_ASSET_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "onnxopt") / "conformance"


# --------------------------------------------------------------------------- test data on disk
def to_proto(value: Any, type_proto: onnx.TypeProto, name: str) -> Any:
    """A test value as the protobuf ``cmd_tools.py generate-data`` writes for this type."""
    if type_proto.HasField("map_type"):
        return numpy_helper.from_dict(value, name)
    if type_proto.HasField("sequence_type"):
        return numpy_helper.from_list(value, name)
    if type_proto.HasField("optional_type"):
        return numpy_helper.from_optional(value, name)
    return value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(np.asarray(value), name)


def from_proto(data: bytes, type_proto: onnx.TypeProto) -> Any:
    """A value read back the way ``onnx.backend.test.runner`` reads it (numpy, list, optional)."""
    if type_proto.HasField("sequence_type"):
        proto: Any = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if type_proto.HasField("map_type"):
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def write_case(case: Any, folder: Path) -> None:
    """One in-memory backend TestCase as ``model.onnx`` + ``test_data_set_*`` (+ ``data.json``)."""
    folder.mkdir(parents=True)
    graph = case.model.graph
    (folder / "model.onnx").write_bytes(case.model.SerializeToString())
    (folder / "data.json").write_text(json.dumps({"rtol": case.rtol, "atol": case.atol}))
    for i, (inputs, outputs) in enumerate(case.data_sets):
        data_set = folder / f"test_data_set_{i}"
        data_set.mkdir()
        for prefix, values, infos in (("input", inputs, graph.input), ("output", outputs, graph.output)):
            for j, value in enumerate(values):
                proto = to_proto(value, infos[j].type, infos[j].name)
                (data_set / f"{prefix}_{j}.pb").write_bytes(proto.SerializeToString())


NODE_PACKAGE = "onnx.backend.test.case.node"


def node_root() -> Path:
    return cache_dir() / f"onnx-{onnx.__version__}" / "node"


def node_modules() -> list[str]:
    """The case modules of ``onnx.backend.test.case.node`` (``ai_onnx_ml.*`` when onnx has ML ops)."""
    import onnx.backend.test.case.node as package

    prefix = f"{NODE_PACKAGE}."
    names = [m.name[len(prefix):] for m in pkgutil.walk_packages(package.__path__, prefix)
             if not m.ispkg and not m.name.split(".")[-1].startswith("_")]
    return sorted(n for n in names if onnx.ONNX_ML or not n.startswith("ai_onnx_ml"))


def node_module_dir(module: str) -> Path:
    """The node cases of one case module (e.g. ``conv``), generated into the cache on first use.

    Importing a case module runs its ``export*`` functions (each after ``np.random.seed(0)``),
    which append its cases to the package's list: the same data as ``collect_testcases``.
    """
    dest = node_root() / module
    if dest.is_dir():
        return dest
    from onnx.backend.test.case import node

    full_name = f"{NODE_PACKAGE}.{module}"
    if full_name in sys.modules:
        raise RuntimeError(f"{full_name} was imported before its cases were cached: rerun in a new process")
    before = len(node._NodeTestCases)
    with warnings.catch_warnings():  # the case scripts divide by zero on purpose
        warnings.simplefilter("ignore")
        importlib.import_module(full_name)
    staging = dest.with_name(f"{module}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for case in node._NodeTestCases[before:]:
        write_case(case, staging / case.name)
    try:
        staging.rename(dest)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One backend test model: ``folder/name``, its files and its tolerance."""

    folder: str
    name: str
    model_path: Path
    rtol: float = 1e-3
    atol: float = 1e-7
    expected: tuple[Path, ...] = ()  # light models: output files next to the model

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.name}"

    def load(self) -> tuple[onnx.ModelProto, list[DataSet]]:
        model = onnx.load(str(self.model_path))
        return model, (self._light_data(model) if self.folder == "light" else self._data_sets(model))

    def _data_sets(self, model: onnx.ModelProto) -> list[DataSet]:
        sets = []
        for folder in sorted(self.model_path.parent.glob("test_data_set_*")):
            read = lambda prefix, infos: [from_proto((folder / f"{prefix}_{i}.pb").read_bytes(), infos[i].type)  # noqa: E731
                                          for i in range(len(list(folder.glob(f"{prefix}_*.pb"))))]
            sets.append((read("input", model.graph.input), read("output", model.graph.output)))
        return sets

    def _light_data(self, model: onnx.ModelProto) -> list[DataSet]:
        from onnx.backend.test.runner import Runner

        initializers = {t.name for t in model.graph.initializer}
        inputs = [Runner.generate_dummy_data(x, seed=0, name=self.name, random=False)
                  for x in model.graph.input if x.name not in initializers]
        outputs = [from_proto(p.read_bytes(), model.graph.output[i].type) for i, p in enumerate(self.expected)]
        return [(inputs, outputs)]


def _tolerance(data_json: Path) -> dict[str, float]:
    if not data_json.is_file():
        return {}
    data = json.loads(data_json.read_text())
    return {k: float(data[k]) for k in ("rtol", "atol") if k in data}


def folder_cases(folder: str, log: Callable[[str], None] = lambda _: None) -> list[Case]:
    """Every case of one source folder, sorted by name (``node`` is generated on first use)."""
    data = backend_data_dir()
    if folder == "light":
        cases = []
        for path in sorted((data / "light").glob("light_*.onnx")):
            model_name = path.stem[len("light_"):]
            expected = tuple(sorted(path.parent.glob(f"{path.stem}_output_*.pb")))
            cases.append(Case("light", path.stem, path, expected=expected,
                              **_tolerance(data / "real" / f"test_{model_name}" / "data.json")))
        return cases
    if folder == "node":
        return node_cases(node_modules(), log)
    return _cases_in(folder, data / folder)


def _cases_in(folder: str, root: Path, prefix: str = "") -> list[Case]:
    return [Case(folder, prefix + d.name, d / "model.onnx", **_tolerance(d / "data.json"))
            for d in sorted(root.iterdir()) if (d / "model.onnx").is_file()]


def node_cases(modules: Sequence[str], log: Callable[[str], None] = lambda _: None) -> list[Case]:
    """The node cases of ``modules``, named ``<module>/<case>`` (generated into the cache if missing)."""
    missing = [m for m in modules if not (node_root() / m).is_dir()]
    start = time.perf_counter()
    cases = [case for m in modules for case in _cases_in("node", node_module_dir(m), f"{m}/")]
    if missing:
        log(f"generated the node cases of {len(missing)} modules into {node_root()} in {time.perf_counter() - start:.1f} s")
    return cases


def all_cases(folders: Sequence[str] = FOLDERS, log: Callable[[str], None] = lambda _: None) -> list[Case]:
    return [case for folder in folders for case in folder_cases(folder, log)]


def find_case(key: str) -> Case:
    """The case ``folder/name`` (``node/<module>/<case>`` for a node case)."""
    folder, name = key.split("/", 1)
    candidates = node_cases([name.split("/")[0]]) if folder == "node" else folder_cases(folder)
    for case in candidates:
        if case.name == name:
            return case
    raise KeyError(f"no backend test model {key!r}")


# --------------------------------------------------------------------------- checking one model
@dataclass
class Result:
    key: str
    folder: str
    category: str
    reason: str = ""
    optimize_seconds: float = 0.0
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int | None = None  # None: optimize raised


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def checker_problem(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker/shape-inference failure is a finding
        return one_line(exc)
    return None


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_model(model: onnx.ModelProto, data_sets: list[DataSet]) -> tuple[str, list[list[Any]] | None]:
    """ORT outputs per data set, or the stage and reason it failed ("load: ..." / "run: ...")."""
    try:
        session = ort_session(model)
    except Exception as exc:  # noqa: BLE001
        return f"load: {one_line(exc)}", None
    names = [i.name for i in session.get_inputs()]
    try:
        return "", [session.run(None, dict(zip(names, inputs))) for inputs, _ in data_sets]
    except Exception as exc:  # noqa: BLE001
        return f"run: {one_line(exc)}", None


def mismatch(case: Case, data_sets: list[DataSet], outputs: list[list[Any]]) -> str | None:
    """Why ``outputs`` differ from the expected ones within the case's tolerance (None: they match)."""
    from onnx.backend.test.runner import Runner

    for (_, expected), actual in zip(data_sets, outputs):
        try:
            Runner.assert_similar_outputs(expected, actual, rtol=case.rtol, atol=case.atol)
        except (AssertionError, TypeError, ValueError) as exc:
            return " ".join(str(exc).split())[:300]
    return None


def check_case(case: Case, slow_seconds: float | None = SLOW_SECONDS) -> Result:
    """Optimize one model with the default pipeline and classify the outcome (module docstring)."""
    import onnxopt
    from onnxopt.errors import InvalidModelError, UnsupportedModelError

    start = time.perf_counter()
    result = Result(case.key, case.folder, OK)

    def done(category: str, reason: str = "") -> Result:
        result.category, result.reason, result.seconds = category, reason, time.perf_counter() - start
        return result

    model, data_sets = case.load()
    result.nodes_before = len(model.graph.node)
    input_problem = checker_problem(model)
    stage, original = run_model(model, data_sets)
    ort_reason = f"original {stage}" if original is None else mismatch(case, data_sets, original)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized, _ = onnxopt.optimize(model)
    except (UnsupportedModelError, InvalidModelError) as exc:
        clean = isinstance(exc, UnsupportedModelError) or input_problem is not None
        return done(REFUSED if clean else ERROR, one_line(exc))
    except Exception as exc:  # noqa: BLE001 - an internal error is the finding
        return done(ERROR, one_line(exc))
    finally:
        result.optimize_seconds = time.perf_counter() - t0
    result.nodes_after = len(optimized.graph.node)
    problem = checker_problem(optimized)
    invalid = f"checker on the output: {problem}" if problem and not input_problem else ""
    if ort_reason:
        if invalid:
            return done(INVALID, invalid)
        return done(ORT_FAILS, ort_reason if original is None else f"original vs expected: {ort_reason}")
    stage, outputs = run_model(optimized, data_sets)
    wrong = f"ORT {stage}" if outputs is None else mismatch(case, data_sets, outputs)
    if invalid:  # say whether ORT computes the right outputs all the same
        return done(INVALID, f"{invalid}; in ORT: {wrong or 'outputs as expected'}")
    if outputs is None:
        return done(INVALID, wrong)
    if wrong:
        return done(WRONG, wrong)
    if slow_seconds is not None and result.optimize_seconds > slow_seconds:
        return done(SLOW, f"optimize took {result.optimize_seconds:.1f} s")
    return done(OK)


# --------------------------------------------------------------------------- the run and its report
def run(cases: Sequence[Case], log: Callable[[str], None] = lambda _: None,
        slow_seconds: float | None = SLOW_SECONDS) -> list[Result]:
    """:func:`check_case` on every case; a case whose test data cannot be read counts as ``ORT fails``."""
    results = []
    for i, case in enumerate(cases, 1):
        try:
            result = check_case(case, slow_seconds)
        except Exception as exc:  # noqa: BLE001 - e.g. unreadable test data: recorded, the run goes on
            result = Result(case.key, case.folder, ORT_FAILS, f"loading the test case: {one_line(exc)}")
        results.append(result)
        if result.category != OK or result.seconds > 5:
            log(f"[{i}/{len(cases)}] {case.key}: {result.category} {result.reason} ({result.seconds:.1f} s)")
    return results


def render(results: Sequence[Result], wall_seconds: float, command: str, env: dict[str, Any]) -> str:
    folders = [f for f in FOLDERS if any(r.folder == f for r in results)]
    count = lambda rs, c: sum(r.category == c for r in rs)  # noqa: E731
    failures = sum(count(results, c) for c in FAILURES)
    lines = ["# Conformance: onnxopt's default pipeline on the ONNX backend test models", "",
             f"`{command}` -- onnx {env.get('versions', {}).get('onnx') or onnx.__version__}, "
             f"onnxruntime {ort.__version__}, {env.get('date', '')}, commit {env.get('git_commit', '?')}.", "",
             "Module docstring of `bench/conformance.py` for what each category means; failures "
             f"(counted against onnxopt): {', '.join(FAILURES)}. `refused` and `ORT fails` are not.", "",
             f"**{len(results)} models, {failures} failures, {wall_seconds:.0f} s in total.**", "",
             "## Counts", ""]
    def row(label: str, chosen: list[Result]) -> list[str]:
        shrunk = sum(r.nodes_after is not None and r.nodes_after < r.nodes_before for r in chosen)
        return [label, str(len(chosen)), *(str(count(chosen, c)) for c in CATEGORIES), str(shrunk)]

    rows = [row(f, [r for r in results if r.folder == f]) for f in folders] + [row("**all**", list(results))]
    lines += table(["folder", "models", *CATEGORIES, "fewer nodes"], rows)
    lines += ["", "`fewer nodes`: models whose optimized graph has fewer nodes than the original (whatever the category)."]
    for title, categories in (("Failures", FAILURES), ("Refused (clean one-line error)", (REFUSED,)),
                              ("ORT fails on the original (skipped)", (ORT_FAILS,))):
        chosen = [r for r in results if r.category in categories]
        lines += ["", f"## {title}: {len(chosen)}", ""]
        lines += table(["model", "category", "reason"], [[r.key, r.category, r.reason.replace("|", "\\|")] for r in chosen]) if chosen else ["none"]
    over = [r for r in results if r.optimize_seconds > SLOW_SECONDS]
    lines += ["", f"## optimize over {SLOW_SECONDS:.0f} s (any category): {len(over)}", ""]
    lines += [f"* {r.key}: {r.optimize_seconds:.0f} s ({r.category})" for r in over] or ["none"]
    slowest = sorted(results, key=lambda r: r.seconds, reverse=True)[:15]
    lines += ["", "## Slowest models", ""]
    lines += table(["model", "optimize (s)", "whole check (s)", "category"],
                   [[r.key, f"{r.optimize_seconds:.2f}", f"{r.seconds:.2f}", r.category] for r in slowest])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", default=",".join(FOLDERS), help="comma-separated source folders (default: all)")
    parser.add_argument("--only", help="comma-separated models folder/name (overrides --folders)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.only:
        cases = [find_case(k.strip()) for k in args.only.split(",") if k.strip()]
    else:
        unknown = set(args.folders.split(",")) - set(FOLDERS)
        if unknown:
            parser.error(f"unknown folder(s) {sorted(unknown)}; choose from {', '.join(FOLDERS)}")
        cases = all_cases([f for f in FOLDERS if f in args.folders.split(",")], log)
    start = time.perf_counter()
    results = run(cases, log)
    wall = time.perf_counter() - start
    env = environment()
    command = "python -m bench.conformance " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.md").write_text(render(results, wall, command.strip(), env))
    (out / "conformance.json").write_text(json.dumps(json_safe({"command": command.strip(), "environment": env,
                                                                 "wall_seconds": wall,
                                                                 "results": [asdict(r) for r in results]}), indent=1) + "\n")
    failures = sum(r.category in FAILURES for r in results)
    log(f"wrote {out}/conformance.md: {len(results)} models, {failures} failures, {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
