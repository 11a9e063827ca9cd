"""Hostile and careless inputs through the real ``onnxopt`` command: every case must end
with its expected exit code and one error line (never a traceback), leave every input file
byte-for-byte unchanged, write nothing where nothing may be written, and, when it writes a
model, write one that passes ``onnx.checker`` (full check) and loads in ONNX Runtime.

    python -m bench.hostile [--out bench/results]      # → hostile.md / hostile.json

Each case runs in a fresh folder with the bundled example model (``in.onnx``) and, where
the case needs them, a copy with external data (``ext.onnx`` + ``w.bin``), a quantized
model, sample files, a FIFO.  "clean" means every expectation held; "wrong" lists which
did not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

ONNXOPT = [sys.executable, "-m", "onnxopt"]


@dataclass
class Case:
    name: str
    args: list[str]
    exit_code: int
    #: files (relative to the case folder) the run must create; others must not appear
    creates: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    fragment: str = ""  # expected in the error line
    results: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- fixtures
def _fixtures(folder: Path) -> None:
    from onnxopt.demo import demo_model

    model = demo_model()
    onnx.save_model(model, str(folder / "in.onnx"))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(folder / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    rng = np.random.default_rng(0)
    np.savez(folder / "good.npz", input=rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    np.savez(folder / "nan.npz", input=np.full((2, 3, 16, 16), np.nan, np.float32))
    np.savez(folder / "i64.npz", input=np.zeros((1, 3, 16, 16), np.int64))
    np.savez(folder / "empty.npz")
    np.save(folder / "x.npy", rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "truncated.onnx").write_bytes((folder / "in.onnx").read_bytes()[:300])
    (folder / "adir").mkdir()
    os.mkfifo(folder / "fifo")


def _quantized(folder: Path) -> None:
    subprocess.run([*ONNXOPT, "in.onnx", "-o", "q.onnx", "--quantize", "w8a8", "-q"], cwd=folder, check=True, capture_output=True)


def _symlink_out(folder: Path) -> None:
    (folder / "target.onnx").write_bytes(b"keep me")
    (folder / "link.onnx").symlink_to(folder / "target.onnx")


def _stale_staging(folder: Path) -> None:
    stale = folder / f".out.onnx.onnxopt-staging-{2**22 + 4321}-x"
    stale.mkdir()
    (stale / "out.onnx.data").write_bytes(b"0" * 4096)


def _opset(version: int) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)]), str(folder / "old.onnx"))

    return make


CASES = [
    # data safety
    Case("-o is the input", ["in.onnx", "-o", "in.onnx"], 6, fragment="refusing to overwrite the input model"),
    Case("-o is the input's external data", ["ext.onnx", "-o", "w.bin"], 6, fragment="external data file"),
    Case("--report is the input's external data", ["ext.onnx", "-o", "out.onnx", "--report", "w.bin"], 6, fragment="external data file"),
    Case("--report is the input", ["in.onnx", "-o", "out.onnx", "--report", "in.onnx"], 6),
    Case("--report is the output", ["in.onnx", "-o", "out.onnx", "--report", "out.onnx"], 6),
    Case("analyze --report is the input", ["analyze", "accumulators", "q.onnx", "--report", "q.onnx"], 6, setup=_quantized),
    Case("analyze --report in a missing folder", ["analyze", "accumulators", "q.onnx", "--report", "no/r.json"], 6, setup=_quantized),
    Case("analyze --report is a folder", ["analyze", "accumulators", "q.onnx", "--report", "adir"], 6, setup=_quantized),
    Case("-o is a FIFO", ["in.onnx", "-o", "fifo"], 6, fragment="not a regular file"),
    Case("-o is /dev/null", ["in.onnx", "-o", "/dev/null"], 6, fragment="not a regular file"),
    Case("-o is a symlink", ["in.onnx", "-o", "link.onnx"], 6, setup=_symlink_out, fragment="symbolic link"),
    Case("-o is a folder", ["in.onnx", "-o", "adir"], 6),
    Case("-o in a missing folder", ["in.onnx", "-o", "no/out.onnx"], 6),
    Case("stale staging removed", ["in.onnx", "-o", "out.onnx", "-q"], 0, creates=("out.onnx",), setup=_stale_staging),
    Case("external data output", ["ext.onnx", "-o", "out.onnx", "--external-data", "always", "-q"], 0, creates=("out.onnx", "out.onnx.data")),
    Case("--external-data always, tiny tensors", ["old.onnx", "-o", "out.onnx", "--external-data", "always", "-q"], 0,
         creates=("out.onnx",), setup=_opset(13)),
    # bad models
    Case("missing model", ["nope.onnx", "-o", "out.onnx"], 3),
    Case("model is a folder", ["adir", "-o", "out.onnx"], 3),
    Case("empty file", ["empty.onnx", "-o", "out.onnx"], 4),
    Case("garbage bytes", ["garbage.onnx", "-o", "out.onnx"], 4),
    Case("truncated model", ["truncated.onnx", "-o", "out.onnx"], 4),
    Case("opset 5", ["old.onnx", "-o", "out.onnx"], 5, setup=_opset(5)),
    # flags and options
    Case("--set numeric option with text", ["in.onnx", "-o", "out.onnx", "--set", "max_constant_bytes=abc"], 7),
    Case("--set unknown option", ["in.onnx", "-o", "out.onnx", "--set", "nope=1"], 7),
    Case("--quantize ''", ["in.onnx", "-o", "out.onnx", "--quantize", ""], 7),
    Case("--quantize w9a8", ["in.onnx", "-o", "out.onnx", "--quantize", "w9a8"], 7),
    Case("--lambda inf", ["in.onnx", "-o", "out.onnx", "--quantize", "w8a8", "--lambda", "inf"], 7),
    Case("--input-range -inf,inf", ["in.onnx", "-o", "out.onnx", "--quantize", "w8a8", "--input-range=-inf,inf"], 7),
    Case("--input-range -3,3 (README form)", ["in.onnx", "-o", "out.onnx", "--quantize", "w8a8", "--input-range", "-3,3", "-q"], 0,
         creates=("out.onnx",)),
    Case("--rex without --quantize", ["in.onnx", "-o", "out.onnx", "--rex", "2"], 7),
    Case("unknown pass", ["in.onnx", "-o", "out.onnx", "--passes", "fold-constant"], 7),
    Case("--max-rounds 0", ["in.onnx", "-o", "out.onnx", "--max-rounds", "0"], 7),
    Case("no -o", ["in.onnx"], 2),
    # sample data
    Case("--inputs .npy (single input)", ["in.onnx", "-o", "out.onnx", "--inputs", "x.npy", "-q"], 0, creates=("out.onnx",)),
    Case("--inputs pickled .npy", ["in.onnx", "-o", "out.onnx", "--inputs", "pickled.npy"], 11),
    Case("--inputs int64 for a float model", ["in.onnx", "-o", "out.onnx", "--inputs", "i64.npz"], 11),
    Case("--inputs missing file", ["in.onnx", "-o", "out.onnx", "--inputs", "nope.npz"], 11),
    Case("--inputs not numpy", ["in.onnx", "-o", "out.onnx", "--inputs", "garbage.onnx"], 11),
    Case("--input-shape unknown name", ["in.onnx", "-o", "out.onnx", "--input-shape", "nope=1,3,8,8"], 11),
    Case("--input-shape negative", ["in.onnx", "-o", "out.onnx", "--verify", "--input-shape", "input=-1,3,8,8"], 11),
    Case("--input-shape 2 TiB", ["in.onnx", "-o", "out.onnx", "--verify", "--input-shape", "input=1024,1024,1024,1024"], 11),
    Case("--calibration-data empty .npz", ["in.onnx", "-o", "out.onnx", "--quantize", "w8a8", "--calibration-data", "empty.npz"], 11),
    Case("--calibration-data with NaN", ["in.onnx", "-o", "out.onnx", "--quantize", "w8a8", "--calibration-data", "nan.npz"], 11),
    Case("--verify with real inputs", ["in.onnx", "-o", "out.onnx", "--inputs", "good.npz", "-q"], 0, creates=("out.onnx",)),
]


# --------------------------------------------------------------------------- running
def _digest(folder: Path) -> dict[str, str]:
    """Content hash of every regular file (and the kind of every other entry) in ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode):
            state[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[str(path.relative_to(folder))] = stat.filemode(info.st_mode)[0]
    return state


def run_case(case: Case, base: Path) -> dict:
    folder = base / case.name.replace(" ", "_").replace("/", "_").replace("'", "")
    folder.mkdir()
    _fixtures(folder)
    if case.setup:
        case.setup(folder)
    before = _digest(folder)
    devnull_before = os.stat("/dev/null")
    start = time.perf_counter()
    proc = subprocess.run([*ONNXOPT, *case.args], cwd=folder, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    after = _digest(folder)
    problems = []
    if proc.returncode != case.exit_code:
        problems.append(f"exit {proc.returncode}, expected {case.exit_code}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxopt: error") or line.startswith("onnxopt: internal")]
    if "Traceback" in proc.stderr:
        problems.append("traceback")
    if case.exit_code not in (0, 2) and len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    if case.fragment and not any(case.fragment in line for line in errors):
        problems.append(f"message lacks {case.fragment!r}")
    changed = sorted(name for name in before if name in after and before[name] != after[name])
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after) - {n for n in before if "onnxopt-staging" in n})
    if changed:
        problems.append(f"changed {changed}")
    if gone:
        problems.append(f"removed {gone}")
    unexpected = [n for n in new if n not in case.creates]
    if unexpected:
        problems.append(f"unexpected files {unexpected}")
    if any("onnxopt-staging" in n for n in after):
        problems.append("staging folder left")
    missing = [n for n in case.creates if n not in after]
    if missing:
        problems.append(f"did not write {missing}")
    if "out.onnx" in case.creates and (folder / "out.onnx").exists():
        problems += _check_output(folder / "out.onnx")
    if not stat.S_ISCHR(os.stat("/dev/null").st_mode) or os.stat("/dev/null").st_ino != devnull_before.st_ino:
        problems.append("/dev/null replaced")
    return {
        "case": case.name,
        "command": "onnxopt " + " ".join(case.args),
        "exit": proc.returncode,
        "expected_exit": case.exit_code,
        "message": errors[0] if errors else "",
        "seconds": round(seconds, 2),
        "clean": not problems,
        "problems": problems,
    }


def _check_output(path: Path) -> list[str]:
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure is a finding
        return [f"output invalid: {str(exc).splitlines()[0][:120]}"]
    return []


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(rows, indent=1) + "\n")
    clean = sum(r["clean"] for r in rows)
    lines = [
        "# Hostile inputs through the `onnxopt` command",
        "",
        "Generated by `python -m bench.hostile`. Each case runs in a fresh folder; clean = the",
        "expected exit code, one error line and no traceback, every input file unchanged, nothing",
        "written but the expected outputs, no staging folder left, outputs pass the full checker",
        "and load in ONNX Runtime.",
        "",
        f"**{len(rows)} tried, {clean} clean, {len(rows) - clean} wrong.**",
        "",
        "| case | exit (expected) | clean | message / problems |",
        "|---|---|---|---|",
    ]
    for r in rows:
        detail = "; ".join(r["problems"]) if r["problems"] else r["message"].replace("|", "\\|")[:140]
        lines.append(f"| {r['case']} | {r['exit']} ({r['expected_exit']}) | {'yes' if r['clean'] else '**no**'} | {detail} |")
    (out / "hostile.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("-k", dest="only", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-hostile-") as tmp:
        for case in CASES:
            if args.only and args.only not in case.name:
                continue
            rows.append(run_case(case, Path(tmp)))
            status = "clean" if rows[-1]["clean"] else "WRONG: " + "; ".join(rows[-1]["problems"])
            print(f"{case.name:45s} exit {rows[-1]['exit']:>3}  {status}", file=sys.stderr)
    write_results(rows, Path(args.out))
    print(f"{sum(r['clean'] for r in rows)}/{len(rows)} clean", file=sys.stderr)
    shutil.rmtree(Path(tempfile.gettempdir()) / "onnxopt-hostile-unused", ignore_errors=True)
    return 0 if all(r["clean"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
