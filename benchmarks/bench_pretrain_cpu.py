"""Benchmark: diffusion pretraining throughput on CPU, lever by lever (issue 10 item 2).

Why: on 2 CPU cores the default plan's denoiser takes about a minute per step, so nobody without a GPU can pretrain.
This measures, on one default-size synthetic knee dataset and one view, the patches/s of
``DiffusionPretrainer.train_step`` (data loading + noising + forward + backward + AdamW + EMA) for:

- ``planned``: the default plan's network at its planned patch, fp32, contiguous tensors (what ``ortho_pretrain``
  did before ``--patch-size``; the "before" row);
- ``patch``: the same network on ``--patch`` (``ortho_pretrain --patch-size``; the network is fully convolutional,
  so the encoder loads into the planned patch's trainer unchanged);
- ``patch+bf16``: the same under CPU bf16 autocast;
- ``patch+channels_last``: network and batches in ``torch.channels_last_3d``;
- ``patch+compile``: ``torch.compile`` (inductor; compile time excluded by the warm-up steps);
- ``patch+2 parallel views``: two processes with one thread each (sagittal and coronal at once), patches/s
  summed, against one process with every thread;
- ``cpu plan``: the plan the README recommends for CPUs (``-gpu_memory_target 1 --base-features 16``), planned
  patch.

Every variant runs in its own process (``--driver``), with ``--warmup`` steps left out of the rate. Speed only:
whether the faster denoiser helps is measured by the probe and whole-exam benchmarks.

Usage::

    python benchmarks/bench_pretrain_cpu.py                  # writes the pretrain_cpu section of docs/benchmarks.md
    python benchmarks/bench_pretrain_cpu.py --quick --no-write --work /tmp/pc   # smoke run (tiny, 2 steps)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import driver_job, driver_result, ints, synthetic_dataset, write_driver_result  # noqa: E402

CONFIG = "3d_fullres"
DATASETS = {"default": (995, "Dataset995_PretrainCpuKnee", ()),
            "cpu": (996, "Dataset996_PretrainCpuKneeCpuPlan", ("-gpu_memory_target", "1", "--base-features", "16"))}
VARIANTS = ("planned", "patch", "patch+bf16", "patch+channels_last", "patch+compile", "patch+2 parallel views",
            "cpu plan")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".data" / "pretrain_cpu")
    p.add_argument("--size", choices=["tiny", "small", "default"], default="default")
    p.add_argument("--cases", type=int, default=6, help="training exams (their images are the pretraining data)")
    p.add_argument("--patch", type=ints, default=[16, 64, 64], help="the small pretraining patch (z,y,x)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (after --warmup)")
    p.add_argument("--slow-steps", type=int, default=3,
                   help="timed steps of the slow variants (planned patch; bf16, which this CPU emulates: 30x slower)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the rate (compile: the compile itself)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tiny size, 2 timed steps, 1 warm-up)")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--driver", type=Path, default=None, help=argparse.SUPPRESS)   # internal: one job file
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.cases, args.steps, args.slow_steps, args.warmup = "tiny", 4, 2, 2, 1
        args.patch = [8, 32, 32]
    unknown = [v for v in args.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


# ------------------------------------------------------------------------------------------------------------
# driver: one variant per process
# ------------------------------------------------------------------------------------------------------------
def driver_main(job_path: Path) -> int:
    """Time ``job['steps']`` pretraining steps of one view with the job's levers; write the result JSON."""
    import torch

    import orthonet.training.trainers.pretrainer as pretrainer_mod
    from orthonet.fileio import load_json
    from orthonet.training.trainers.pretrainer import DiffusionPretrainer, PretrainSettings, segment_seed

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    torch.set_num_threads(int(job["threads"]))
    if job.get("bf16"):
        pretrainer_mod.autocast = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    if job.get("channels_last"):
        pretrainer_mod.memory_format_for = \
            lambda ndim, device: torch.channels_last_3d if ndim == 5 else torch.contiguous_format
    pre = Path(job["preprocessed"])
    plans = load_json(pre / "orthoPlans.json", "plans file")
    settings = PretrainSettings(steps=job["warmup"] + job["steps"], save_every=10 ** 9, log_every=10 ** 9,
                                progress=False, num_workers=0, patch_size=job.get("patch_size"))
    trainer = DiffusionPretrainer(plans, CONFIG, job["view"], pre, Path(job["out"]).parent / f"out_{job['name']}",
                                  settings, device="cpu")
    trainer.setup()
    if job.get("compile"):
        compiled = torch.compile(trainer.model)
        plain_loss = trainer.compute_loss
        trainer.compute_loss = lambda model, x0, generator: plain_loss(compiled, x0, generator)
    seed = segment_seed(settings.seed, 0, 0)
    loader = trainer.build_loader(trainer.store, trainer.cases, seed)
    trainer.generator = torch.Generator().manual_seed(seed)
    times: List[float] = []
    try:
        for _ in range(job["warmup"] + job["steps"]):
            t0 = time.perf_counter()
            trainer.train_step(next(loader))
            times.append(time.perf_counter() - t0)
    finally:
        loader.close()
    timed = times[job["warmup"]:]
    step_s = sum(timed) / len(timed)
    out = {"times": times, "step_s": step_s, "batch_size": trainer.batch_size, "patch_size": trainer.spec_patch(),
           "patches_per_s": trainer.batch_size / step_s, "view": job["view"],
           "parameters": sum(p.numel() for p in trainer.model.parameters())}
    write_driver_result(job, out)
    return 0


def run_jobs(jobs: List[Dict], work: Path) -> List[Dict]:
    """Run the jobs at the same time (the parallel-views variant) or one job; return their results."""
    launched = []
    for job in jobs:
        tag = f"job_{job['name'].replace(' ', '_').replace(',', '').replace('+', '_')}_{job['view']}"
        job, cmd = driver_job(Path(__file__), job, work / f"{tag}.json")
        launched.append((job, subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(job["threads"])))))
    codes = [p.wait() for _, p in launched]
    return [driver_result(job, code, f"pretraining driver {job['name']} / {job['view']}")
            for (job, _), code in zip(launched, codes)]


# ------------------------------------------------------------------------------------------------------------
# orchestration and report
# ------------------------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> Dict:
    work = args.work.resolve()
    for kind in ("raw", "preprocessed", "results"):
        os.environ[f"ORTHO_{kind}"] = str(work / kind)
    work.mkdir(parents=True, exist_ok=True)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    needed = {"cpu" if v == "cpu plan" else "default" for v in chosen}
    pre = {key: synthetic_dataset(did, name, "knee", args.cases, 0, args.seed, args.size, CONFIG, plan_args)
           for key, (did, name, plan_args) in DATASETS.items() if key in needed}
    base = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "view": "sagittal"}
    results: Dict[str, Dict] = {}
    for variant in chosen:
        t0 = time.time()
        job = dict(base, name=variant, preprocessed=str(pre["cpu" if variant == "cpu plan" else "default"]))
        if variant in ("planned", "patch+bf16"):
            job["steps"] = args.slow_steps
            job["warmup"] = min(args.warmup, 1)
        if variant.startswith("patch"):
            job["patch_size"] = list(args.patch)
        job["bf16"] = variant == "patch+bf16"
        job["channels_last"] = variant == "patch+channels_last"
        job["compile"] = variant == "patch+compile"
        if variant == "patch+2 parallel views":
            jobs = [dict(job, threads=max(1, args.threads // 2), view=v) for v in ("sagittal", "coronal")]
            outs = run_jobs(jobs, work)
            res = dict(outs[0], patches_per_s=sum(o["patches_per_s"] for o in outs),
                       step_s=max(o["step_s"] for o in outs), processes=2, threads=jobs[0]["threads"],
                       per_process=[{"view": o["view"], "patches_per_s": o["patches_per_s"]} for o in outs])
        else:
            res = dict(run_jobs([job], work)[0], processes=1, threads=job["threads"])
        res["wall_s"] = time.time() - t0
        results[variant] = res
        print(f"[{variant}] patch {res['patch_size']}, batch {res['batch_size']}: {res['step_s']:.2f} s/step, "
              f"{res['patches_per_s']:.2f} patches/s ({res['wall_s']:.0f} s)", flush=True)
    summary = {"date": _dt.datetime.now().isoformat(timespec="minutes"), "args": {k: str(v) for k, v in
               vars(args).items()}, "results": results}
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    os.replace(tmp, work / "results.json")
    return summary


def report(summary: Dict, command: str) -> str:
    from benchmarks.report import machine_line
    res = summary["results"]
    before = res.get("planned")
    rows = []
    for variant, r in res.items():
        ratio = f"{r['patches_per_s'] / before['patches_per_s']:.1f}x" if before else "n/a"
        rows.append(f"| {variant} | {r['patch_size']} x {r['batch_size']} | {r['parameters'] / 1e6:.1f} M | "
                    f"{r['processes']} x {r['threads']} | {r['step_s']:.2f} | **{r['patches_per_s']:.2f}** | {ratio} |")
    table = "\n".join(rows)
    return f"""## Diffusion pretraining on CPU: patches/s lever by lever (`bench_pretrain_cpu.py`, issue 10 item 2)

- Date: {summary['date']}; machine: {machine_line()}.
- Command: `{command}`
- Data: {summary['args']['cases']} synthetic knees at the `{summary['args']['size']}` size, view sagittal,
  `DiffusionPretrainer.train_step` (loading + noising + forward + backward + AdamW + EMA), each variant in its own
  process, warm-up steps excluded (compile time too). Speed only; whether the denoiser helps is in the probe and
  whole-exam sections.

| variant | patch x batch | denoiser parameters | processes x threads | s/step | patches/s | vs planned |
|---|---|---|---|---|---|---|
{table}
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.driver is not None:
        return driver_main(args.driver)
    summary = measure(args)
    if not args.no_write:
        from benchmarks.report import write_section
        shown = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        path = write_section("pretrain_cpu", report(summary, f"python benchmarks/bench_pretrain_cpu.py {shown}".strip()))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
