"""Console scripts of the inference stage: ``ortho_predict``, ``ortho_evaluate``, ``ortho_find_best_configuration``.

Each is ``main(argv) -> int`` wrapped with :func:`orthonet.cli_utils.run_cli` (an OrthoError prints as one line and
exits 2). ``ortho_predict`` exits 0 when at least one case was predicted (problems of the other cases are listed
on the console, in ``OUT/problems.json`` and in ``OUT/report.html``) and 1 when no case could be predicted.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from orthonet.inference.best_configuration import find_best_configuration_cli, main as find_best_configuration_main
from orthonet.inference.evaluate import evaluate_cli, evaluate_main
from orthonet.cli_utils import run_cli
from orthonet.errors import OrthoError

__all__ = ["predict_main", "predict_cli", "evaluate_main", "evaluate_cli", "find_best_configuration_main",
           "find_best_configuration_cli"]


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ortho_predict", description=(
        "Predict segmentations (in the input's exact geometry), diagnoses (diagnoses.csv/.json), an overview PNG "
        "per case and OUT/report.html. IN: a folder in the raw naming ({CASE}_{VIEW}_0000.nii.gz, any "
        "SimpleITK-readable ending), a single case (file or folder), a folder tree of DICOM series, or a folder "
        "of case folders. Model: explicit -c/-tr/-p/-f or --model-folder, else the dataset's "
        "inference_instructions.json (ortho_find_best_configuration), else the default trainer of the dataset's "
        "task with 3d_fullres and every trained fold."))
    p.add_argument("-i", "--input", required=True, help="input folder or file")
    p.add_argument("-o", "--output", required=True, help="output folder (created; files are replaced atomically)")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name (needed unless --model-folder)")
    p.add_argument("-c", "--configuration", default=None, help="configuration (default 3d_fullres)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="folds to ensemble (default: every fold with a checkpoint)")
    p.add_argument("-tr", "--trainer", default=None,
                   help="trainer class name (or a full model folder name such as X__orthoPlans__3d_fullres__scratch)")
    p.add_argument("-p", "--plans", default=None, help="plans name (default orthoPlans)")
    p.add_argument("--model-folder", default=None, help="a trained model folder (holds plans.json and fold_k/)")
    p.add_argument("--checkpoint", default="checkpoint_final.pt",
                   help="checkpoint file in each fold (default checkpoint_final.pt, falling back to _best)")
    p.add_argument("--disable-tta", action="store_true",
                   help="no mirroring test-time augmentation (up to 8x faster; with it, each view is mirrored only "
                        "along the axes its training augmentation mirrored)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--tile-batch", type=int, default=0,
                   help="sliding-window tiles per forward pass (default 0: 1 on CPU, 4 on CUDA; more uses more GPU "
                        "memory, same result)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: CUDA when available)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write the softmax probabilities ({CASE}_{VIEW}.npz + .json with the geometry)")
    p.add_argument("--explain", action="store_true",
                   help="write Grad-CAM saliency maps {CASE}_{VIEW}_saliency_{DIAGNOSIS}.nii.gz and show the most "
                        "probable finding's map in the overview")
    p.add_argument("-npp", "--num-processes-preprocessing", type=int, default=1,
                   help="background threads reading/preprocessing the next cases while one is predicted "
                        "(default 1; 0 = no pipeline)")
    p.add_argument("--no-overview", action="store_true", help="skip the {CASE}_overview.png pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    from orthonet.inference.predictor import Predictor
    args = build_predict_parser().parse_args(argv)
    if not 0 < args.step_size <= 1:
        raise OrthoError(f"--step-size must be in (0, 1], got {args.step_size}")
    if args.tile_batch < 0:
        raise OrthoError(f"--tile-batch must be 0 (automatic) or more, got {args.tile_batch}")
    if args.num_processes_preprocessing < 0:
        raise OrthoError("-npp must be 0 or more")
    predictor = Predictor.from_dataset(
        args.dataset, args.configuration, args.trainer, args.folds, args.plans, args.checkpoint, args.model_folder,
        args.device, tta=not args.disable_tta, step_size=args.step_size, save_probabilities=args.save_probabilities,
        explain=args.explain, num_processes=args.num_processes_preprocessing, overview=not args.no_overview,
        tile_batch=args.tile_batch,
        progress=not args.no_progress)
    run = predictor.predict_folder(args.input, args.output)
    return 0 if run.num_predicted > 0 else 1


predict_cli = run_cli(predict_main)
