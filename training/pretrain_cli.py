"""``ortho_pretrain`` (self-supervised diffusion pretraining per view) and ``ortho_sample`` (look at what it learned).

Thin wrappers: parse arguments, call :func:`orthonet.training.trainers.pretrainer.pretrain_views` or draw DDIM samples
and write them with :mod:`orthonet.training.sampling_output`. Both run unchanged under ``torchrun --nproc_per_node N``
(``ortho_sample`` then simply runs on rank 0 only).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from orthonet.cli_utils import run_cli
from orthonet.diffusion import PREDICTION_TYPES, ddim_sample
from orthonet.errors import OrthoError
from orthonet.paths import preprocessed_dataset_dir, resolve_dataset_name
from orthonet.planners.plans import DEFAULT_PLANS_NAME, data_folder, load_plans
from orthonet.training import distributed as dist_utils
from orthonet.training.runtime import resolve_device
from orthonet.training.sampling_output import as_volumes, montage_png, view_spacing_3d, write_sample_volumes
from orthonet.training.trainers.pretrainer import (PretrainSettings, load_denoiser_checkpoint, pretrain_checkpoint_path,
                                                   pretrain_views, split_views_arg)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def build_pretrain_parser() -> argparse.ArgumentParser:
    d = PretrainSettings()
    p = argparse.ArgumentParser(
        prog="ortho_pretrain",
        description="Self-supervised diffusion pretraining: one denoising U-Net per view on every preprocessed image "
                    "of imagesTr and imagesUnlabeled. Writes $ORTHO_results/DatasetXXX/Pretrain__PLANS__CONFIG/VIEW/"
                    "{checkpoint_latest,checkpoint_final,encoder}.pt, loss.png, log.txt. Runs unchanged under "
                    "torchrun --nproc_per_node N (docs/pretraining.md).")
    p.add_argument("dataset", help="dataset id or DatasetXXX_Name")
    p.add_argument("configuration", help="configuration, e.g. 3d_fullres (or 2d where planned)")
    p.add_argument("-v", "--views", nargs="+", default=None, help="views to pretrain (default: every planned view)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help=f"optimizer steps per view (default {d.steps})")
    p.add_argument("--c", "--continue", dest="resume", action="store_true",
                   help="continue from checkpoint_latest.pt (loses at most one --save-every interval)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="patches per step and rank (default: the plan's batch size)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"AdamW learning rate of a single process (default {d.lr:g}); under torchrun it is scaled "
                        "by --lr-scaling")
    p.add_argument("--lr-scaling", default=d.lr_scaling, choices=["sqrt", "linear", "none"],
                   help="learning-rate rule for N ranks (default sqrt: lr x sqrt(N))")
    p.add_argument("--prediction-type", default=d.prediction_type, choices=list(PREDICTION_TYPES),
                   help="what the network predicts (default epsilon)")
    p.add_argument("--save-every", type=_positive_int, default=d.save_every,
                   help=f"write checkpoint_latest.pt every N steps (default {d.save_every})")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"default {d.ema_decay}")
    p.add_argument("--feature-timestep", type=int, default=d.feature_timestep,
                   help=f"timestep at which encoder.pt folds the time conditioning (default {d.feature_timestep})")
    p.add_argument("--num-workers", type=int, default=None,
                   help="background data-loading processes (default: CPUs - 1, at most 8; 0 = in-process)")
    p.add_argument("--patch-size", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="pretraining patch (one number per axis; default: the plan's). Smaller patches pretrain "
                        "several times faster on a CPU and the encoders still load into the planned network")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("-p", "--plans", dest="plans_name", default=DEFAULT_PLANS_NAME,
                   help=f"plans name (default {DEFAULT_PLANS_NAME})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines on stdout instead)")
    return p


def settings_from_args(args: argparse.Namespace) -> PretrainSettings:
    if args.num_workers is not None and args.num_workers < 0:
        raise OrthoError(f"--num-workers must be >= 0 (got {args.num_workers})")
    return PretrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_scaling=args.lr_scaling,
                            prediction_type=args.prediction_type, save_every=args.save_every,
                            ema_decay=args.ema_decay, feature_timestep=args.feature_timestep,
                            num_workers=args.num_workers, seed=args.seed, progress=not args.no_progress,
                            patch_size=args.patch_size).validate()


def pretrain_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_pretrain_parser().parse_args(argv)
    settings = settings_from_args(args)
    device = resolve_device(args.device)
    info = dist_utils.init_distributed(device.type)
    try:
        encoders = pretrain_views(args.dataset, args.configuration, split_views_arg(args.views), settings,
                                  args.plans_name, info.device, args.resume)
    except BaseException:
        dist_utils.cleanup()
        raise
    dist_utils.cleanup(synchronize=True)
    if info.rank == 0:
        for view, path in encoders.items():
            print(f"{view}: {path}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# ortho_sample
# ------------------------------------------------------------------------------------------------------------
def build_sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ortho_sample",
        description="Draw DDIM samples from a pretrained view model (EMA weights) and write them as NIfTI (target "
                    "spacing, the view's original axis order) plus a PNG montage next to real patches.")
    p.add_argument("dataset", help="dataset id or DatasetXXX_Name")
    p.add_argument("configuration", help="configuration the model was pretrained for, e.g. 3d_fullres")
    p.add_argument("-v", "--view", required=True, help="view to sample")
    p.add_argument("-n", "--num-samples", type=_positive_int, default=4, help="number of samples (default 4)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    p.add_argument("--checkpoint", default="auto", choices=["auto", "final", "latest"],
                   help="which checkpoint (default auto: final if present, else latest)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--batch-size", type=_positive_int, default=None, help="samples per forward pass (default all)")
    p.add_argument("--clip-x0", default="auto",
                   help="clamp the clean-image estimate at every DDIM step to +-this value: 'auto' (default) = the "
                        "largest |intensity| of a few real preprocessed images of the view, 'none', or a number. "
                        "Keeps the first, almost-pure-noise steps from amplifying small errors")
    p.add_argument("--no-reference", action="store_true", help="leave real patches out of the montage")
    p.add_argument("-p", "--plans", dest="plans_name", default=DEFAULT_PLANS_NAME)
    p.add_argument("--no-progress", action="store_true")
    return p


@dataclass
class RealViewData:
    """What the real preprocessed images of a view tell the sampler: a few centre patches (montage), the direction
    of the view's first case (NIfTI header) and the largest absolute intensity (the x0 clip). None when absent."""

    patches: Optional[np.ndarray] = None
    direction: Optional[Sequence[float]] = None
    max_abs: Optional[float] = None


def real_view_data(preprocessed_dir: Path, plans, view: str, configuration: str, patch, n: int,
                   seed: int) -> RealViewData:
    from orthonet.training.data import PreprocessedCaseStore
    from orthonet.training.data.sampling import center_bbox

    try:
        store = PreprocessedCaseStore(data_folder(preprocessed_dir, plans, view, configuration), [view])
    except OrthoError:
        return RealViewData()
    cases = store.cases(views=[view])
    if not cases:
        return RealViewData()
    rng = np.random.default_rng(seed)
    chosen = [cases[i] for i in sorted(rng.choice(len(cases), min(n, len(cases)), replace=False))]
    patch3 = [1, *patch] if len(patch) == 2 else list(patch)
    patches, max_abs = [], 0.0
    for case in chosen:
        arrays = store.open(case, view, with_seg=False)
        volume = np.asarray(arrays.data[:], dtype=np.float32)
        max_abs = max(max_abs, float(np.abs(volume).max()))
        patches.append(arrays.crop_image(center_bbox(arrays.shape, patch3)))
    # the direction of the view's first case: samples then open in a viewer oriented like the real scans
    direction = store.properties(cases[0], view).get("original_geometry", {}).get("direction")
    return RealViewData(np.stack(patches), direction, max_abs)


def parse_clip(text: str, data: RealViewData) -> Optional[float]:
    """``--clip-x0``: 'auto' = the largest |intensity| of a few real images of the view (None without data),
    'none', or a number."""
    if text == "none":
        return None
    if text == "auto":
        return data.max_abs
    try:
        value = float(text)
    except ValueError:
        raise OrthoError(f"--clip-x0 must be auto, none or a positive number (got '{text}')") from None
    if value <= 0:
        raise OrthoError(f"--clip-x0 must be positive (got {value})")
    return value


def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_sample_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 samples
        return 0
    device = resolve_device(args.device)
    name = resolve_dataset_name(args.dataset)
    path = pretrain_checkpoint_path(name, args.configuration, args.view, args.plans_name, args.checkpoint)
    bundle = load_denoiser_checkpoint(path, device)
    patch = [int(p) for p in bundle.identity["patch_size"]]
    channels = int(bundle.identity["input_channels"])
    pre = preprocessed_dataset_dir(name)
    plans = load_plans(pre, args.plans_name)
    if args.view not in plans["views"]:
        raise OrthoError(f"view '{args.view}' is not in the plans", pre / f"{args.plans_name}.json")
    vp = plans["views"][args.view]
    spacing = view_spacing_3d(plans, args.view, args.configuration)
    real = real_view_data(pre, plans, args.view, args.configuration, patch, min(args.num_samples, 4), args.seed)
    clip = parse_clip(args.clip_x0, real)
    chunks = []
    bs = args.batch_size or args.num_samples
    gen = torch.Generator().manual_seed(int(args.seed))
    for start in range(0, args.num_samples, bs):
        n = min(bs, args.num_samples - start)
        x = ddim_sample(bundle.model, (n, channels, *patch), steps=args.steps, eta=args.eta, generator=gen,
                        prediction_type=bundle.prediction_type, schedule=bundle.schedule, device=device,
                        clip_x0=clip, progress=not args.no_progress,
                        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
        chunks.append(x.float().cpu().numpy())
    samples = as_volumes(np.concatenate(chunks))
    out = Path(args.output)
    files = write_sample_volumes(samples, out, args.view, spacing, vp["transpose_backward"],
                                 real.direction or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    clip_text = "no x0 clip" if clip is None else f"x0 clipped to +-{clip:.3g}"
    png = montage_png(samples, out / f"samples_{args.view}.png", spacing,
                      title=f"{name} {args.configuration} {args.view}: {args.num_samples} DDIM samples "
                            f"({args.steps} steps, seed {args.seed}, {clip_text}; step {bundle.step} of pretraining)",
                      reference=None if args.no_reference else real.patches)
    print(f"wrote {len(files)} NIfTI file(s) and {png} to {out}")
    return 0


pretrain_cli = run_cli(pretrain_main)
sample_cli = run_cli(sample_main)

if __name__ == "__main__":
    sys.exit(pretrain_cli())
