"""``ortho_train`` (and re-exports of ``ortho_pretrain`` / ``ortho_sample``): parse arguments, run one trainer."""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence, Tuple

from orthonet.cli_utils import run_cli
from orthonet.dataset import parse_dataset_json
from orthonet.errors import OrthoError
from orthonet.paths import preprocessed_root, resolve_dataset_name
from orthonet.training.model_factory import TASKS
from orthonet.training.options import DEFAULT_PLANS, TrainOptions


def default_trainer(task: str, dataset_name: str, configuration: str, plans_name: str, pretrained: str,
                    fuse_views: bool = False) -> Tuple[str, str]:
    """The trainer ``ortho_train`` uses without ``-tr``, and why: the pyramid-head variant of the task's trainer
    when pretrained encoders will be loaded (where the benchmark shows them paying off), else the plain nnU-Net-style
    one. ``ortho_predict`` looks for either (``orthonet.inference.model_selection``)."""
    from orthonet.planners.plans import load_plans
    from orthonet.training.pretrained import find_pretrained
    from orthonet.training.trainers import DEFAULT_TRAINER_FOR_TASK, DEFAULT_TRAINER_WITH_PRETRAINING
    plain, with_pretraining = DEFAULT_TRAINER_FOR_TASK[task], DEFAULT_TRAINER_WITH_PRETRAINING[task]
    if plain == with_pretraining:
        return plain, f"the default for --task {task}"
    if pretrained == "none":
        return plain, "the default without pretrained encoders (--pretrained none)"
    from orthonet.training.model_factory import segmentation_view_of, task_model_views
    plans = load_plans(preprocessed_root() / dataset_name, plans_name)
    spec, _ = parse_dataset_json(preprocessed_root() / dataset_name)
    # the encoders that will load
    views = task_model_views(plans, configuration, task, segmentation_view_of(plans, spec), fuse_views)
    source = find_pretrained(pretrained, plans, configuration, views)
    if source is None:
        return plain, "the default without pretrained encoders (none found for --pretrained auto)"
    return with_pretraining, (f"the default with pretrained encoders ({source.description}): its pyramid head is "
                              "where they pay off, see docs/benchmarks.md; -tr " + plain + " for the U-Net decoder")


def default_task(dataset_name: str) -> str:
    """What the dataset has labels for: both -> multitask, else seg or diag."""
    spec, problems = parse_dataset_json(preprocessed_root() / dataset_name)
    if spec is None:
        raise OrthoError("dataset.json missing in the preprocessed folder", preprocessed_root() / dataset_name,
                         fix="run `ortho_plan_and_preprocess` first")
    seg = spec.has_segmentation
    diag = bool(spec.diagnoses)
    if seg and diag:
        return "multitask"
    if diag:
        return "diag"
    if seg:
        return "seg"
    raise OrthoError("the dataset declares neither segmentation labels nor diagnoses: nothing to train",
                     preprocessed_root() / dataset_name / "dataset.json")


def parse_feature_t(text: Optional[str]) -> Optional[Dict[str, int]]:
    """``100`` -> {'*': 100}; ``sagittal=100,coronal=50`` -> per view. Timesteps must lie in 0..999."""
    if text is None:
        return None
    out: Dict[str, int] = {}
    for part in text.split(","):
        view, _, value = part.rpartition("=")
        try:
            t = int(value)
        except ValueError:
            raise OrthoError(f"--feature-t: '{part}' is not a timestep",
                             fix="e.g. --feature-t 100 or --feature-t sagittal=100,coronal=50") from None
        if not 0 <= t < 1000:
            raise OrthoError(f"--feature-t: timestep {t} is outside 0..999")
        out[view.strip() or "*"] = t
    return out


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ortho_train", description="Train a segmentation, diagnosis or multitask model "
                                "for one cross-validation fold, configured from plans.json.")
    p.add_argument("dataset", help="dataset id (101) or name (Dataset101_Knee)")
    p.add_argument("configuration", help="plans configuration, e.g. 3d_fullres, 2d, 3d_lowres")
    p.add_argument("fold", help="0-4, or 'all' to train on every case")
    p.add_argument("-tr", "--trainer", default=None,
                   help="trainer class: SegTrainer, DiagTrainer, MultitaskTrainer or package.module.YourTrainer "
                        "(default: the one for --task)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: what the dataset has labels for (segmentation and diagnoses -> multitask)")
    p.add_argument("--pretrained", default="auto",
                   help="auto (this dataset's ortho_pretrain encoders, or those of the dataset its plans were "
                        "transferred from, through the plans' view map; from scratch only when neither is pretrained "
                        "nor transferred), none (from scratch), or a path to a Pretrain__ folder / encoder.pt "
                        "(finding nothing to load is an error)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="keep a deterministic, stratified fraction of the training cases' labels (e.g. 0.1)")
    p.add_argument("--epochs", type=int, default=None, help="override the trainer's number of epochs (1000)")
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="override iterations per epoch (250)")
    p.add_argument("--val-iterations", type=int, default=None, help="online validation batches per epoch (50)")
    p.add_argument("--c", dest="continue_training", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", dest="validation_only", action="store_true",
                   help="only rerun the final validation with the trained weights")
    p.add_argument("--device", default=None, help="cuda, cpu or auto (default: cuda when available)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="background data-loading processes (0 = in-process, for debugging)")
    p.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans name (default orthoPlans)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--fuse-views", action="store_true",
                   help="seg and multitask: sample the other views' bottleneck features into the segmentation "
                        "view (not for --task diag)")
    p.add_argument("--fusion", choices=["concat", "attention", "gating"], default="concat",
                   help="diagnosis fusion across views: concat + MLP (default), cross-view attention, or per-label "
                        "view gating")
    p.add_argument("--diagnosis-input", choices=["whole", "crop"], default="whole",
                   help="what the diagnosis reads: every view's whole volume with attention-MIL pooling (default) "
                        "or the old centre crop of each view's patch")
    p.add_argument("--feature-t", default=None, metavar="T|VIEW=T,...",
                   help="diffusion features: noise each view's input to this timestep (of 1000) before its encoder, "
                        "e.g. 100 or sagittal=100,coronal=50 (OrthoDiffusion uses 50-200); default: clean input")
    p.add_argument("--diagnosis-levels", type=int, nargs="+", default=None, metavar="L",
                   help="encoder levels the diagnosis pools, e.g. -3 -2 -1 (the default: the last three)")
    p.add_argument("--diagnosis-coarsen-levels", type=int, nargs="+", default=None, metavar="L",
                   help="whole-exam diagnosis: of --diagnosis-levels, those max-pooled onto the next coarser level's "
                        "grid before the attention pooling, e.g. -3 (fine detail at a coarse level's head cost)")
    p.add_argument("--loss-weights", type=float, nargs=2, metavar=("SEG", "DIAG"), default=None,
                   help="multitask: weights of the segmentation and diagnosis losses (default 1 1)")
    p.add_argument("--no-final-validation", action="store_true", help="skip the full-volume validation at the end")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (faster steps after a compile of a minute or more; backend from "
                        "ORTHO_COMPILE_BACKEND, default inductor, which needs a C++ compiler on the CPU)")
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_train_parser().parse_args(argv)
    from orthonet.training.trainers import get_trainer_class
    dataset_name = resolve_dataset_name(args.dataset)
    task = args.task
    if args.trainer is None and task is None:
        task = default_task(dataset_name)
    trainer_name, why = args.trainer, None
    if trainer_name is None:
        trainer_name, why = default_trainer(task, dataset_name, args.configuration, args.plans, args.pretrained,
                                            args.fuse_views)
        print(f"trainer: {trainer_name} ({why})")
    cls = get_trainer_class(trainer_name, task)
    options = TrainOptions(dataset_name=dataset_name, configuration=args.configuration, fold=args.fold,
                           task=cls.task, pretrained=args.pretrained, label_fraction=args.label_fraction,
                           epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
                           val_iterations=args.val_iterations, continue_training=args.continue_training,
                           validation_only=args.validation_only, device=args.device, num_workers=args.num_workers,
                           plans_name=args.plans, seed=args.seed, fuse_views=args.fuse_views, fusion=args.fusion,
                           final_validation=not args.no_final_validation, loss_weights=args.loss_weights,
                           diagnosis_input=args.diagnosis_input, feature_t=parse_feature_t(args.feature_t),
                           diagnosis_levels=args.diagnosis_levels,
                           diagnosis_coarsen_levels=args.diagnosis_coarsen_levels, compile=args.compile)
    trainer = cls(options)
    trainer.run()
    print(f"results: {trainer.output_dir}")
    return 0


train_cli = run_cli(train_main)


def pretrain_cli(argv: Optional[Sequence[str]] = None) -> int:
    from orthonet.training.pretrain_cli import pretrain_cli as _cli
    return _cli(argv)


def sample_cli(argv: Optional[Sequence[str]] = None) -> int:
    from orthonet.training.pretrain_cli import sample_cli as _cli
    return _cli(argv)


if __name__ == "__main__":
    import sys
    sys.exit(train_cli())
