"""Command line: ``onnxopt model.onnx -o out.onnx`` and friends (``onnxopt --help``).

Exit codes: 0 success, 1 internal error, 2 usage error, 3 input not found, 4 not a valid
ONNX model, 5 unsupported model, 6 bad output path, 7 bad pipeline or option,
8 a pass produced an invalid graph, 9 verification failed, 10 a requested compression
(--quantize, --power-quant, --rex, --modular-accumulator, --prune) rewrote nothing (the
message names the cause and the fix), 11 unusable sample data (--inputs, --calibration-data,
--input-shape).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ._version import __version__
from .errors import OnnxoptError, PipelineError, VerificationError
from .flags import add_arguments as add_compression_arguments
from .flags import join_negative_values, pipeline_from_flags
from .io import load_model, protected_inputs, save_model
from .manager import validate_final_model
from .output import check_output_path, data_file_candidates
from .registry import PassRegistry
from .report import Report
from .runtime import DEFAULT_BATCH, DEFAULT_DYNAMIC_DIM

EPILOG = """\
examples:
  onnxopt model.onnx -o model.opt.onnx                 lossless default pipeline
  onnxopt model.onnx -o out.onnx --verify --input-shape input=1,3,224,224
  onnxopt model.onnx -o out.onnx --passes fold-constants,fold-conv-bn --report report.json
  onnxopt model.onnx -o model.int8.onnx --quantize w8a8   data-free W8A8 QDQ (SPIQ scales)
  onnxopt model.onnx -o out.onnx --quantize w4a8 --rex 2 --rex-budget 50%
  onnxopt decoder.onnx -o decoder.w4.onnx --quantize w4 --keep-8bit lm_head   weight-only MatMulNBits (LLMs)
  onnxopt model.onnx -o out.onnx --prune red            data-free redundancy pruning
  onnxopt model.onnx -o out.onnx --quantize w4a8 --power-quant
  onnxopt analyze accumulators model.int8.onnx --bits 16
  onnxopt --demo -o demo.opt.onnx --verify             try it on the bundled example
  onnxopt --list-passes

exit codes: 0 ok, 2 usage, 3 input not found, 4 invalid ONNX, 5 unsupported model,
            6 bad output path, 7 bad pipeline/option, 8 invalid result, 9 verification failed,
            10 a requested compression rewrote nothing (cause and fix in the message),
            11 unusable sample data (--inputs, --calibration-data, --input-shape);
            verification "not possible" (the original model itself fails on the random inputs)
            is reported and exits 0 with the output written
"""


def build_parser(registry: PassRegistry | None = None) -> argparse.ArgumentParser:
    """The parser; the compression flags come from ``registry``'s pass families (default: the built-in ones)."""
    if registry is None:
        from onnxopt.passes import builtin_registry

        registry = builtin_registry()
    parser = argparse.ArgumentParser(
        prog="onnxopt",
        description="Optimize an ONNX model with exact graph rewrites and write a model stock ONNX Runtime runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="input .onnx model (never modified)")
    parser.add_argument("-o", "--output", help="where to write the optimized model (atomically)")
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")

    pipeline = parser.add_argument_group("pipeline")
    pipeline.add_argument("--passes", help="comma-separated pass names, run in this order")
    pipeline.add_argument("--preset", help="named pipeline (default: 'default', lossless)")
    pipeline.add_argument("--list-passes", action="store_true", help="list passes and presets, then exit")
    pipeline.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="pass option, e.g. --set max_constant_bytes=1000000"
    )
    pipeline.add_argument("--max-rounds", type=int, default=1, help="repeat the pipeline while it changes the graph, at most N times")

    add_compression_arguments(parser, registry)

    check = parser.add_argument_group("verification")
    check.add_argument(
        "--verify",
        action="store_true",
        help="compare original and optimized outputs in ONNX Runtime; if the original model itself fails on the "
        "random inputs, verification is reported 'not possible' (exit 0, output written): pass --inputs",
    )
    check.add_argument("--inputs", help="verify on these inputs (.npz, one array per graph input; any size where a dim is dynamic)")
    check.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help=f"shape of random verify input NAME; dynamic dims (symbolic, or -1) default to {DEFAULT_BATCH} for "
        f"the leading (batch) dim and {DEFAULT_DYNAMIC_DIM} for the others",
    )
    check.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of --verify (default 1e-5)")
    check.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to max |output| (default 1e-4)")
    check.add_argument("--validate", action="store_true", help="run onnx.checker (full) after every pass (implied by --verify)")

    out = parser.add_argument_group("output")
    out.add_argument("--report", metavar="FILE", help="write the JSON report here ('-': to standard output; the summary table goes to standard error)")
    out.add_argument("--external-data", choices=("auto", "always", "never"), default="auto", help="store tensors in <output>.data")
    out.add_argument("--inline-functions", action="store_true", help="inline the custom ops' function bodies (for consumers without model-local functions)")
    out.add_argument("--dry-run", action="store_true", help="run and report, write no model")
    out.add_argument("--demo", action="store_true", help="optimize the bundled example model instead of MODEL")
    out.add_argument("--save-demo", metavar="FILE", help="write the bundled example model to FILE and exit")
    out.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug); tracebacks on errors")
    out.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return parser


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses (numbers, true, lists)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise PipelineError(f"bad --set {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "analyze":
        from .analyze import main as analyze_main

        return analyze_main(argv[1:])
    from onnxopt.passes import builtin_registry

    registry = builtin_registry()
    parser = build_parser(registry)
    args = parser.parse_args(join_negative_values(argv))
    logging.basicConfig(
        level=logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="onnxopt: %(levelname)s: %(message)s",
    )
    return run_guarded(lambda: _run(parser, args, registry), verbose=args.verbose)


def run_guarded(run: Callable[[], int], *, verbose: int = 0) -> int:
    """Run a command: an OnnxoptError becomes one line and its exit code, a bug one line
    and exit 1 (tracebacks only with -v)."""
    try:
        return run()
    except OnnxoptError as exc:
        if verbose:
            logging.exception("details")
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in onnxopt: one line unless -v  # noqa: BLE001
        if verbose:
            logging.exception("internal error")
        print(f"onnxopt: internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, registry: PassRegistry) -> int:
    from .api import optimize, preset_options, resolve_pipeline
    from .demo import demo_model
    from .runtime import check_input_names, load_inputs, parse_input_shapes
    from .verify import check_loads_in_ort, verify

    if args.list_passes:
        print(registry.describe())
        return 0
    if args.save_demo:
        save_model(demo_model(), args.save_demo)
        _say(args, f"wrote the example model to {args.save_demo}")
        return 0
    if args.demo == bool(args.model):
        parser.error("give one input: MODEL or --demo")
    if not args.output and not args.dry_run:
        parser.error("missing -o OUTPUT (or --dry-run to write nothing)")
    input_files, report_protected = _check_output_paths(args)

    base = resolve_pipeline(registry, args.passes, args.preset)
    names, options = pipeline_from_flags(base, args, registry)
    options = {**preset_options(registry, args.passes, args.preset), **options, **parse_options(args.set)}
    registry.build(names, options)  # bad pass names or option values fail here, before the model is read
    input_shapes = parse_input_shapes(args.input_shape)

    model = demo_model() if args.demo else load_model(args.model, lazy=True)  # large weights stay in the input's data file
    check_input_names(model, input_shapes)  # before any work, --verify or not
    if input_shapes and not (args.verify or args.inputs):
        logging.getLogger(__name__).warning("--input-shape only shapes the random inputs of --verify; add --verify")
    sample_inputs = load_inputs(args.inputs, model) if args.inputs else None  # a bad file fails now, before the passes
    optimized, report = optimize(
        model,
        names,
        registry=registry,
        validate=args.validate or args.verify,
        max_rounds=args.max_rounds,
        progress=not args.quiet,
        report=Report(input_path="<demo>" if args.demo else args.model, output_path=args.output),
        checked=True,
        **options,
    )
    if args.inline_functions:
        from onnxopt.runtime_ops import inline_functions

        optimized = inline_functions(optimized)
        validate_final_model(optimized, "--inline-functions")

    if args.verify or args.inputs:
        start = time.perf_counter()
        report.verification = verify(
            model, optimized, inputs=sample_inputs, input_shapes=input_shapes, atol=args.atol, rtol=args.rtol,
            inputs_label=f"inputs from {args.inputs}",
        )
        report.verification.judged = report.lossless
        logging.getLogger(__name__).info("verification took %.2fs", time.perf_counter() - start)

    failed = report.verification is not None and report.verification.status == "failed"
    if args.output and not args.dry_run and not failed:
        if optimized is not model:
            check_loads_in_ort(optimized, model, "the pipeline")
        external = {"auto": None, "always": True, "never": False}[args.external_data]
        save_model(optimized, args.output, input_path=args.model, external_data=external, protected=input_files)
    if args.report == "-":
        print(json.dumps(report.to_dict(), indent=2))
    elif args.report:
        report.write_json(args.report, protected=report_protected)
    if not args.quiet:
        print(report.format_table(), file=sys.stderr)
    if failed:
        raise VerificationError(
            "lossless pipeline changed the outputs beyond tolerance ("
            + "; ".join(report.verification.failures)
            + "); the output was not written"
        )
    if args.output and not args.dry_run:
        _say(args, f"wrote {args.output}")
    return 0


def _check_output_paths(args: argparse.Namespace) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Refuse bad -o/--report targets before any work; return the files no output may
    replace (the input and its external data) and those the report may not replace."""
    input_files = protected_inputs(args.model)
    protected = list(input_files)
    if args.output:
        check_output_path(args.output, protected=protected, what="output")
        output = Path(args.output)
        protected += [(output, "the output model")]
        protected += [(output.parent / name, "the output's external data file") for name in data_file_candidates(output)]
    if args.report and args.report != "-":
        check_output_path(args.report, protected=protected, what="report")
    return input_files, protected


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"onnxopt: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
