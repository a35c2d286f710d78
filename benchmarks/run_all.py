"""Run every ``benchmarks/bench_*.py`` one after the other (``make benchmarks``).

Each benchmark runs in its own process with the arguments of the chosen preset:

- ``default``: the benchmark's own defaults, i.e. the measurement documented in docs/benchmarks.md. This takes
  hours on 2 CPU cores, and the scripts that write docs/benchmarks.md update it.
- ``quick`` (``--quick``): tiny budgets that check every benchmark still runs end to end. These runs take
  minutes, never touch docs/benchmarks.md, and keep their data in ``benchmarks/.data/quick/`` so they never
  mix with a real run's data.

The runner stops at the first failure, names the benchmark, its exit code and the exact command, and lists the
benchmarks that did not run. Any new ``bench_*.py`` is picked up automatically. Give it a ``quick`` preset in
``PRESETS`` (tests/test_packaging.py checks that every benchmark has one).

    python benchmarks/run_all.py                 # every benchmark, default preset
    python benchmarks/run_all.py --quick         # smoke run of every benchmark
    python benchmarks/run_all.py --list          # what would run, with the exact commands
    python benchmarks/run_all.py --only bench_preprocess --quick
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
QUICK_DATA = BENCH_DIR / ".data" / "quick"

# Arguments per benchmark and preset. A benchmark missing here runs with no arguments.
PRESETS: Dict[str, Dict[str, List[str]]] = {
    "bench_label_efficiency": {
        "default": [],
        "quick": ["--quick", "--no-write", "--work", str(QUICK_DATA / "label_efficiency")],
    },
    "bench_preprocess": {
        # Needs nnunetv2 in benchmarks/.venv-nnunet (installed with pip on first use, also with --quick).
        "default": [],
        "quick": ["--cases", "4", "--repeats", "1", "--no-write", "--work", str(QUICK_DATA / "preprocess")],
    },
    "bench_pretrain_probe": {
        # Writes WORK/results.json only (docs/benchmarks.md is edited by hand from it).
        "default": [],
        "quick": ["--work", str(QUICK_DATA / "pretrain_probe"), "--n-train", "12", "--n-unlabeled", "4",
                  "--steps", "20", "--folds", "2", "--repeats", "1", "--poolings", "mean", "--no-dense"],
    },
    "bench_pretrain_cpu": {
        # pretraining patches/s per lever (planned patch, small patch, bf16, channels_last_3d, compile, parallel
        # views, the CPU plan) on 6 default-size knees (about 15 min on 2 cores); writes its section.
        "default": [],
        "quick": ["--quick", "--no-write", "--work", str(QUICK_DATA / "pretrain_cpu")],
    },
    "bench_throughput": {
        # orthonet vs nnU-Net training/prediction throughput; needs nnunetv2 in benchmarks/.venv-nnunet (installed
        # on first use); default: 10 small knees, 30 iterations x 2 rounds (about 40 min on 2 cores).
        "default": [],
        "quick": ["--quick", "--no-write", "--work", str(QUICK_DATA / "throughput")],
    },
    "bench_transfer": {
        # knee -> ankle/shoulder: reuses (or makes, about 20 min more) the whole-exam benchmark's knee encoders in
        # /tmp/orthonet_bench_whole_exam, 80 + 20 default-size exams per joint, knee/own/scratch encoders, 5-fold CV
        # (about 2.5 h on 2 cores with --threads 1, which a shared machine needs); writes its section. The quick
        # preset generates its own tiny knee source.
        "default": [],
        "quick": ["--quick", "--no-write", "--work", str(QUICK_DATA / "transfer"),
                  "--knee-work", str(QUICK_DATA / "transfer_knee")],
    },
    "bench_whole_exam_diagnosis": {
        # 120 + 40 default-size knees, 3 pretrained views, 5-fold CV; writes its section. Measured with 3 folds and
        # 1 subset: 21 min data + pretraining, 38 min diagnosis on 2 cores (the 5-fold 2-subset default: about 2 h).
        "default": [],
        "quick": ["--quick", "--no-write", "--work", str(QUICK_DATA / "whole_exam_diagnosis")],
    },
}


def discover(bench_dir: Optional[Path] = None) -> List[str]:
    """Names (without ``.py``) of every ``bench_*.py``, sorted."""
    return sorted(p.stem for p in (bench_dir or BENCH_DIR).glob("bench_*.py"))


def bench_arguments(name: str, preset: str) -> List[str]:
    return list(PRESETS.get(name, {}).get(preset, []))


def command(name: str, preset: str, bench_dir: Optional[Path] = None) -> List[str]:
    return [sys.executable, str((bench_dir or BENCH_DIR) / f"{name}.py")] + bench_arguments(name, preset)


def _normalise(name: str) -> str:
    name = Path(name).name
    name = name[:-3] if name.endswith(".py") else name
    return name if name.startswith("bench_") else f"bench_{name}"


def select(available: Sequence[str], only: Optional[Sequence[str]]) -> List[str]:
    """``available`` in order, or only the benchmarks named in ``only`` (``bench_preprocess``, ``preprocess`` or
    ``bench_preprocess.py``). An unknown name is an error that lists the available ones."""
    if not only:
        return list(available)
    wanted = [_normalise(n) for n in only]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return [n for n in available if n in wanted]


def _shell(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run_all.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", default="default",
                   help="quick preset: tiny budgets that check the benchmarks run (default: the full measurements)")
    p.add_argument("--preset", dest="preset", choices=["default", "quick"], help="preset by name")
    p.add_argument("--list", action="store_true", help="list the benchmarks and their commands, run nothing")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these benchmarks (bench_preprocess, preprocess or bench_preprocess.py)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    available = discover()
    if not available:
        print(f"run_all: no bench_*.py in {BENCH_DIR}", file=sys.stderr)
        return 1
    chosen = select(available, args.only)
    if args.list:
        print(f"{len(chosen)} benchmark(s), preset '{args.preset}':")
        for name in chosen:
            note = "" if name in PRESETS else "   (no preset in run_all.PRESETS: runs with its defaults)"
            print(f"  {name}: {_shell(command(name, args.preset))}{note}")
        return 0
    print(f"run_all: {len(chosen)} benchmark(s), preset '{args.preset}': {', '.join(chosen)}", flush=True)
    timings: List[str] = []
    start = time.time()
    for i, name in enumerate(chosen, 1):
        cmd = command(name, args.preset)
        print(f"\n[{i}/{len(chosen)}] {name}\n$ {_shell(cmd)}", flush=True)
        t = time.time()
        try:
            code = subprocess.call(cmd, cwd=str(REPO))
        except KeyboardInterrupt:
            print(f"\nrun_all: interrupted during {name}", file=sys.stderr)
            return 130
        elapsed = time.time() - t
        if code != 0:
            rest = chosen[i:]
            print(f"\nrun_all: {name} FAILED (exit code {code}) after {elapsed:.0f} s; stopping.\n"
                  f"  command: {_shell(cmd)}\n"
                  f"  rerun it alone: python benchmarks/run_all.py --only {name}"
                  f"{' --quick' if args.preset == 'quick' else ''}\n"
                  f"  not run: {', '.join(rest) if rest else 'none'}", file=sys.stderr)
            return code if code > 0 else 1
        timings.append(f"{name} {elapsed:.0f} s")
    print(f"\nrun_all: all {len(chosen)} benchmark(s) passed in {time.time() - start:.0f} s ({'; '.join(timings)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
