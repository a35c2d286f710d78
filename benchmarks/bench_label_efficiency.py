"""Label efficiency: what diffusion pretraining buys at 100 % and 10 % of the labels (issue 5's evidence).

On a synthetic knee dataset with unlabeled scans: pretrain one diffusion model per view, then train fold 0 with each
trainer of ``--trainers`` (default: the multitask model, segmentation + diagnosis) at every label fraction (1.0 and
0.1), each from scratch and from the pretrained encoders, and report mean Dice and macro AUC of the fold's
full-volume validation. ``--task seg --trainers SegTrainer SegTrainerPyramid`` compares the U-Net with the pyramid
head (docs/training.md); ``--trainers default`` runs ``ortho_train`` without ``-tr``, so each initialisation gets the
trainer a user gets (the pyramid head when encoders load, the U-Net without). Results go to docs/benchmarks.md
(section ``bench_label_efficiency``).

    python benchmarks/bench_label_efficiency.py            # ~40-60 min on 2 CPU cores
    python benchmarks/bench_label_efficiency.py --quick    # a smoke run of the whole path (minutes)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import machine_line, write_section  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "benchmarks" / ".data" / "label_efficiency"))
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "default"])
    p.add_argument("--train", type=int, default=50)
    p.add_argument("--unlabeled", type=int, default=50)
    p.add_argument("--test", type=int, default=20)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iterations-per-epoch", type=int, default=25)
    p.add_argument("--base-features", type=int, default=None,
                   help="U-Net width of the first stage passed to the planner (default: the planner's 32)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--task", default="multitask", choices=["seg", "diag", "multitask"])
    p.add_argument("--trainers", nargs="+", default=None,
                   help="trainer classes to compare; 'default' = no -tr, the trainer ortho_train picks for each "
                        "initialisation (default: the task's plain trainer)")
    p.add_argument("--val-iterations", type=int, default=None, help="online validation batches per epoch")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the path, not the claim")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.unlabeled, args.test = 12, 12, 4
        args.pretrain_steps, args.epochs, args.iterations_per_epoch = 20, 2, 3
    return args


#: ``--trainers`` entry for "no -tr": the trainer ``ortho_train`` itself picks (``training.cli.default_trainer``).
DEFAULT = "default"


def _call(fn, argv: List[str]) -> None:
    print("$", fn.__module__, " ".join(argv), flush=True)
    code = fn(argv)
    if code not in (0, None):
        raise SystemExit(f"command failed with exit code {code}: {argv}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    for kind in ("raw", "preprocessed", "results"):
        os.environ[f"ORTHO_{kind}"] = str(work / kind)
    from orthonet.synthetic.cli import cli as make_synthetic
    from orthonet.planners.cli import plan_and_preprocess_cli
    from orthonet.training.cli import pretrain_cli, train_cli

    d = "101"
    timings: Dict[str, float] = {}
    start = time.time()
    if not (work / "raw" / "Dataset101_Knee").is_dir():
        _call(make_synthetic, ["--joint", "knee", "-d", d, "--train", str(args.train), "--test", str(args.test),
                               "--unlabeled", str(args.unlabeled), "--seed", str(args.seed), "--size", args.size,
                               "--quiet"])
    if not (work / "preprocessed" / "Dataset101_Knee" / "orthoPlans.json").is_file():
        _call(plan_and_preprocess_cli, ["-d", d, "-c", "3d_fullres"]
              + (["--base-features", str(args.base_features)] if args.base_features else []))
    timings["data"] = time.time() - start
    t = time.time()
    from orthonet.training.cli import default_trainer
    from orthonet.training.trainers import DEFAULT_TRAINER_FOR_TASK
    trainers = args.trainers or [DEFAULT_TRAINER_FOR_TASK[args.task]]
    # segmentation alone needs only the segmentation view's denoiser
    plans = json.loads((work / "preprocessed" / "Dataset101_Knee" / "orthoPlans.json").read_text(encoding="utf-8"))
    views = ["-v", plans["segmentation_view"]] if args.task == "seg" else []
    _call(pretrain_cli, [d, "3d_fullres", "--steps", str(args.pretrain_steps), "--device", args.device, "--c"] + views)
    timings["pretraining"] = time.time() - t
    results = []
    for fraction in args.fractions:
        for trainer in trainers:
            for pretrained in ("none", "auto"):
                t = time.time()
                used = trainer
                if trainer == DEFAULT:     # what ortho_train picks without -tr, for this initialisation
                    used = default_trainer(args.task, "Dataset101_Knee", "3d_fullres", "orthoPlans", pretrained)[0]
                _call(train_cli, [d, "3d_fullres", "0"] + (["-tr", trainer] if trainer != DEFAULT else [])
                      + ["--task", args.task, "--label-fraction", str(fraction), "--pretrained", pretrained,
                         "--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations_per_epoch),
                         "--device", args.device, "--seed", str(args.seed)]
                      + (["--val-iterations", str(args.val_iterations)] if args.val_iterations else []))
                folder = f"{used}__orthoPlans__3d_fullres" + (f"__lf{fraction:g}" if fraction < 1 else "") + \
                         ("__scratch" if pretrained == "none" else "")
                fold = work / "results" / "Dataset101_Knee" / folder / "fold_0"
                summary = json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))
                run = json.loads((fold / "run_config.json").read_text(encoding="utf-8"))
                results.append({"fraction": fraction, "trainer": trainer, "trainer_used": used,
                                "init": "pretrained" if pretrained == "auto" else "scratch",
                                "labelled": len(run["labelled_training_cases"]), "val_cases": len(summary["cases"]),
                                "mean_dice": summary.get("segmentation", {}).get("mean_dice"),
                                "macro_auc": summary.get("diagnosis", {}).get("macro_auc"),
                                "minutes": (time.time() - t) / 60})
                print(results[-1], flush=True)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                   "timings_s": timings}, indent=2))
    if not args.no_write and not args.quick:
        write_section("bench_label_efficiency", report(args, results, timings))
    return 0


def _trainer(r: Dict) -> str:
    used = r.get("trainer_used", r["trainer"])
    return used if used == r["trainer"] else f"{r['trainer']} ({used})"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _diff(a, b) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.3f}"


def report(args, results: List[Dict], timings: Dict[str, float]) -> str:
    rows = "\n".join(f"| {r['fraction']:g} ({r['labelled']} cases) | {_trainer(r)} | {r['init']} | "
                     f"{_f(r['mean_dice'])} | {_f(r['macro_auc'])} | {r['minutes']:.1f} |" for r in results)
    by = {(r["fraction"], r["trainer"], r["init"]): r for r in results}
    lines = []
    for f in args.fractions:
        for trainer in sorted({r["trainer"] for r in results}):
            s, p = by.get((f, trainer, "scratch")), by.get((f, trainer, "pretrained"))
            if s and p:
                lines.append(f"- label fraction {f:g}, {trainer}: pretrained - scratch = Dice "
                             f"{_diff(p['mean_dice'], s['mean_dice'])}, macro AUC "
                             f"{_diff(p['macro_auc'], s['macro_auc'])}")
    return f"""## Label efficiency: diffusion-pretrained vs scratch at 100 % and 10 % labels

- Date: {_dt.date.today().isoformat()}; machine: {machine_line()}.
- Data: synthetic knees (`{args.size}` preset), {args.train} training cases, {args.unlabeled} unlabeled cases
  (pretraining only), seed {args.seed}; fold 0 (validation on its held-out fifth of the training cases).
- Pretraining: {args.pretrain_steps} diffusion steps per view ({timings['pretraining'] / 60:.1f} min in all).
- Training: task `{args.task}`, trainers {', '.join(sorted({r['trainer'] for r in results}))}, {args.epochs} epochs x
  {args.iterations_per_epoch} iterations, the same seed for every run.
- Command: `python benchmarks/bench_label_efficiency.py --size {args.size} --train {args.train} --unlabeled {args.unlabeled}
  --pretrain-steps {args.pretrain_steps} --epochs {args.epochs} --iterations-per-epoch {args.iterations_per_epoch}
  --task {args.task} --trainers {' '.join(sorted({r['trainer'] for r in results}))}`

| labels | trainer | initialisation | mean Dice | macro AUC | minutes |
|---|---|---|---|---|---|
{rows}

{chr(10).join(lines)}
"""


if __name__ == "__main__":
    sys.exit(main())
