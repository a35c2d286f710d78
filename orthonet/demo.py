"""The end-to-end demo (``make demo``): every orthonet command, in order, on a generated synthetic knee dataset.

Why a script and not a notebook: it is the README's contract that one command on a fresh machine shows the whole
pipeline working, and CI-like reproducibility needs plain commands. Each step prints the exact command a user
would type; the data lives in ``demo_output/`` so nothing of the user's is touched.

The sizes are deliberately small (tiny images, a few minutes of pretraining, a few epochs of training) so the
demo finishes in about 15 minutes on 2 CPU cores. It ends with the method's claim in its own numbers: the same
trainer on 10 % of the labels from scratch and from the diffusion-pretrained encoders, Dice on the structures
resolvable at the demo's size and macro AUC, each difference with a paired bootstrap interval that says whether the
demo's test exams can tell the two apart (docs/benchmarks.md has the benchmark-size figures).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

DATASET_ID = 101


def _banner(text: str) -> None:
    print("\n" + "=" * 100 + f"\n{text}\n" + "=" * 100, flush=True)


def _run(title: str, command: str, fn: Callable[[Optional[Sequence[str]]], int], argv: List[str],
         timings: dict) -> None:
    """Run one orthonet command in-process (same code path as the console script) and stop on failure."""
    _banner(f"{title}\n$ {command} {' '.join(shlex.quote(a) for a in argv)}")
    start = time.time()
    code = fn(argv)
    timings[title] = time.time() - start
    if code not in (0, None):
        print(f"\ndemo stopped: `{command}` exited with code {code}", file=sys.stderr)
        sys.exit(int(code))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orthonet.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="demo_output", help="folder for the demo's data and results")
    p.add_argument("--train", type=int, default=40, help="labelled training cases")
    p.add_argument("--test", type=int, default=16, help="test cases (the comparison's intervals narrow with more)")
    p.add_argument("--unlabeled", type=int, default=24, help="unlabeled cases (pretraining only)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "default"], help="synthetic image size")
    p.add_argument("--pretrain-steps", type=int, default=300, help="diffusion steps per view")
    p.add_argument("--epochs", type=int, default=8, help="epochs of each of the two training runs")
    p.add_argument("--iterations-per-epoch", type=int, default=25)
    p.add_argument("--val-iterations", type=int, default=10,
                   help="online validation batches per epoch (ortho_train's default 50 would cost the demo minutes)")
    p.add_argument("--label-fraction", type=float, default=0.1,
                   help="labelled share of the training fold in both runs of the comparison (the paper's claim: 10 %%)")
    p.add_argument("--base-features", type=int, default=8,
                   help="U-Net width of the first stage (nnU-Net: 32); the demo uses a quarter: its denoisers then "
                        "train 2.4x faster on CPU (300 steps per view in under a minute), which the comparison needs")
    p.add_argument("--gpu-memory-target", type=float, default=None,
                   help="planner memory budget in GB (default: orthonet's default)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from orthonet.cli_utils import make_console_output_safe
    make_console_output_safe()
    args = build_parser().parse_args(argv)
    out = Path(args.output).resolve()
    for kind in ("raw", "preprocessed", "results"):
        os.environ[f"ORTHO_{kind}"] = str(out / kind)
    import torch
    from orthonet.inference.cli import evaluate_cli, predict_cli
    from orthonet.synthetic.cli import cli as make_synthetic_cli
    from orthonet.verify import cli as verify_cli
    from orthonet.show import cli as show_cli
    from orthonet.planners.cli import plan_and_preprocess_cli
    from orthonet.training.cli import pretrain_cli, train_cli

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    print(f"orthonet demo on {device}: {args.train} training / {args.unlabeled} unlabeled / {args.test} test knees "
          f"at '{args.size}' size, {args.pretrain_steps} pretraining steps per view, {args.epochs} x "
          f"{args.iterations_per_epoch} training iterations.\nThese are demo sizes chosen to finish in minutes on a "
          "laptop CPU: the figures show that the pipeline works end to end, not orthonet's accuracy with a real "
          f"training budget.\nAll data and results go to {out}")
    timings: dict = {}
    d = str(DATASET_ID)
    raw = out / "raw" / "Dataset101_Knee"
    _run("1. generate a synthetic multi-view knee dataset", "ortho_make_synthetic", make_synthetic_cli,
         ["--joint", "knee", "-d", d, "--train", str(args.train), "--test", str(args.test), "--unlabeled",
          str(args.unlabeled), "--seed", str(args.seed), "--size", args.size, "--overwrite"], timings)
    _run("2. verify it", "ortho_verify_dataset", verify_cli, ["-d", d], timings)
    first_case = sorted(p.name.split("_sagittal")[0] for p in (raw / "labelsTr").glob("*_sagittal.nii.gz"))[0]
    _run("3. look at one case", "ortho_show", show_cli, ["-d", d, "-c", first_case, "-o", str(out / "case.png")],
         timings)
    plan_args = ["-d", d, "--overwrite", "--base-features", str(args.base_features)]
    if args.gpu_memory_target:
        plan_args += ["-gpu_memory_target", str(args.gpu_memory_target)]
    _run("4. fingerprint, plan and preprocess", "ortho_plan_and_preprocess", plan_and_preprocess_cli, plan_args,
         timings)
    _run("5. self-supervised diffusion pretraining, one model per view", "ortho_pretrain", pretrain_cli,
         [d, "3d_fullres", "--steps", str(args.pretrain_steps), "--device", device], timings)
    train = [d, "3d_fullres", "0", "--label-fraction", str(args.label_fraction), "--epochs", str(args.epochs),
             "--iterations-per-epoch", str(args.iterations_per_epoch), "--val-iterations", str(args.val_iterations),
             "--device", device]
    _run(f"6. train fold 0 on {args.label_fraction:.0%} of the labels (segmentation + diagnosis) from the pretrained "
         "encoders; without -tr ortho_train picks the head that profits from them", "ortho_train", train_cli,
         train + ["--pretrained", "auto"], timings)
    pretrained_model = _trained_model(args.label_fraction, scratch=False)
    scratch_model = _trained_model(args.label_fraction, scratch=True)
    _run("7. the same trainer, the same labels and iterations, from scratch", "ortho_train", train_cli,
         train + ["-tr", pretrained_model.split("__")[0], "--pretrained", "none"], timings)
    pred, pred_scratch = out / "predictions", out / "predictions_scratch"
    _run("8. predict the test exams (pretrained model): segmentations, diagnoses, overviews, report.html",
         "ortho_predict", predict_cli, ["-i", str(raw / "imagesTs"), "-o", str(pred), "-d", d, "-tr",
                                        pretrained_model, "-f", "0", "--device", device], timings)
    _run("9. evaluate against the test ground truth", "ortho_evaluate", evaluate_cli,
         ["-ref", str(raw / "labelsTs"), "-pred", str(pred), "-d", d, "-o", str(pred / "summary.json")], timings)
    _run("10. predict the test exams with the scratch model the same way", "ortho_predict", predict_cli,
         ["-i", str(raw / "imagesTs"), "-o", str(pred_scratch), "-d", d, "-tr", scratch_model, "-f", "0",
          "--device", device, "--no-overview", "--no-progress"], timings)
    _run("11. evaluate the scratch model", "ortho_evaluate", evaluate_cli,
         ["-ref", str(raw / "labelsTs"), "-pred", str(pred_scratch), "-d", d, "-o",
          str(pred_scratch / "summary.json"), "--no-plots"], timings)
    _print_results(pred / "summary.json", pred, out, timings)
    _print_comparison(raw, {"scratch": pred_scratch, "pretrained": pred}, args.label_fraction, out)
    return 0


def _trained_model(fraction: float, scratch: bool) -> str:
    """The model folder of step 6 (the trainer ortho_train chooses without -tr) or of step 7 (its scratch twin)."""
    from orthonet.training.cli import default_task, default_trainer
    from orthonet.training.options import DEFAULT_PLANS, model_folder_name
    name = "Dataset101_Knee"
    trainer, _ = default_trainer(default_task(name), name, "3d_fullres", DEFAULT_PLANS, "auto")
    return model_folder_name(trainer, DEFAULT_PLANS, "3d_fullres", fraction, "none" if scratch else "auto")


def _print_comparison(raw: Path, runs: dict, fraction: float, out: Path) -> None:
    """The method's claim in the demo's own numbers: scratch vs pretrained at few labels, and what is noise."""
    from orthonet.dataset import load_dataset
    from orthonet.demo_comparison import compare_runs, format_comparison, resolvable_structures
    from orthonet.fileio import save_json
    spec = load_dataset(raw)
    summaries = {k: json.loads((Path(v) / "summary.json").read_text(encoding="utf-8")) for k, v in runs.items()}
    structures = resolvable_structures(spec, spec.cases("Ts"))
    result = compare_runs(spec, summaries, runs, spec.diagnoses_path("Ts"), structures)
    _banner(f"the claim, on this demo's data: {fraction:.0%} of the labels, scratch vs diffusion-pretrained "
            "(same trainer, labels and iterations)")
    print(format_comparison(result, {"scratch": "scratch", "pretrained": "diffusion-pretrained encoders"},
                            fraction))
    save_json(result, out / "comparison.json")
    print(f"(also in {out / 'comparison.json'}; demo-size runs: docs/benchmarks.md has the benchmark figures)")


def _fmt(v) -> str:
    return "  n/a" if v is None else f"{v:5.3f}"


def _print_results(summary_path: Path, pred: Path, out: Path, timings: dict) -> None:
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    _banner("results on the held-out synthetic test exams (demo-size training: see the note at the top)")
    seg = summary.get("segmentation") or {}
    if seg:
        print(f"{'structure':<22} {'Dice':>6} {'HD95 mm':>8}")
        for name, m in seg["mean"].items():
            print(f"{name:<22} {_fmt(m.get('dice')):>6} {_fmt(m.get('hd95_mm')):>8}")
        print(f"{'mean':<22} {_fmt(seg['foreground_mean'].get('dice')):>6} "
              f"{_fmt(seg['foreground_mean'].get('hd95_mm')):>8}")
    diag = summary.get("diagnosis") or {}
    if diag:
        print(f"\n{'diagnosis':<24} {'AUC':>6} {'AP':>6} {'sens':>6} {'spec':>6}")
        for name, m in list(diag["per_diagnosis"].items()) + [("macro mean", diag["macro"])]:
            print(f"{name:<24} {_fmt(m.get('auc')):>6} {_fmt(m.get('average_precision')):>6} "
                  f"{_fmt(m.get('sensitivity')):>6} {_fmt(m.get('specificity')):>6}")
    print("\nstep timings: " + ", ".join(f"{k.split('.')[0]}: {v:.0f}s" for k, v in timings.items())
          + f" (total {sum(timings.values()) / 60:.1f} min)")
    print(f"\npictures:\n  one training case:   {out / 'case.png'}\n  per test exam:       {pred}/*_overview.png\n"
          f"  report (open in a browser): {pred / 'report.html'}\n  evaluation plots:    {pred}/roc_curves.png, "
          f"{pred}/dice_boxplot.png\n  training curves:     {out}/results/Dataset101_Knee/*/fold_0/progress.png\n"
          f"  pretraining curves:  {out}/results/Dataset101_Knee/Pretrain__orthoPlans__3d_fullres/*/loss.png")


if __name__ == "__main__":
    sys.exit(main())
