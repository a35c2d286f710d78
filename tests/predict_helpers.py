"""Trained models shared by tests/test_predict.py, test_best_configuration.py and test_explain.py.

Training is the slow part of these tests, so each model is trained once per pytest session (a module-level cache)
in its own ORTHO_* folders, and every test module enters those folders with :func:`ortho_env` while it runs.
The networks are narrowed in plans.json (features 8-64 instead of 32-256: plans are user-editable and the
network does not change the preprocessed arrays) so that CPU training and prediction stay fast.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import torch

from tests.builders import write_tiny_dataset

ENV_KEYS = ("ORTHO_raw", "ORTHO_preprocessed", "ORTHO_results")
SMALL_FEATURES = [8, 16, 32, 64, 64, 64]
_CACHE: Dict[str, Dict] = {}


@contextlib.contextmanager
def ortho_env(root: Path) -> Iterator[Path]:
    """ORTHO_raw/preprocessed/results under ``root`` for the duration of the block (restored afterwards)."""
    old = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(ORTHO_raw=str(root / "raw"), ORTHO_preprocessed=str(root / "pre"),
                      ORTHO_results=str(root / "res"))
    try:
        yield root
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_small(dataset_id: int, dataset_name: str, root: Path) -> Dict:
    """Plan and preprocess, then narrow every network of the plans (both plans files)."""
    from orthonet.planners.cli import main as plan_main
    assert plan_main(["-d", str(dataset_id), "-np", "1", "--no-progress"]) == 0
    pre = root / "pre" / dataset_name
    plans = json.loads((pre / "orthoPlans.json").read_text(encoding="utf-8"))
    for view in plans["views"].values():
        for cfg in view["configurations"].values():
            kw = cfg["network"]["kwargs"]
            kw["features_per_stage"] = SMALL_FEATURES[:len(kw["features_per_stage"])]
    for name in ("orthoPlans.json", "plans.json"):
        (pre / name).write_text(json.dumps(plans, indent=1))
    return plans


def train(dataset_name: str, task: str, fold, **kw):
    from orthonet.training.options import TrainOptions
    from orthonet.training.trainers import get_trainer_class
    opts = dict(dataset_name=dataset_name, configuration="3d_fullres", fold=fold, task=task, epochs=1,
                iterations_per_epoch=2, val_iterations=1, num_workers=0, device="cpu")
    opts.update(kw)
    return get_trainer_class(None, task)(TrainOptions(**opts)).run()


def multiview_models(tmp_path_factory) -> Dict:
    """Three oblique, anisotropic, off-centre views; a multitask model trained on folds 0 and 1 (1 epoch x 2
    iterations each, with the trainer's full-volume validation). Keys: root, dataset, id, model_dir, test_cases."""
    if "multiview" not in _CACHE:
        torch.set_num_threads(1)
        root = tmp_path_factory.mktemp("predict_models")
        name = "Dataset971_PredictKnee"
        with ortho_env(root):
            write_tiny_dataset(root / "raw" / name, n_train=6, n_test=3, oblique=True, seed=3)
            plan_small(971, name, root)
            for fold in (0, 1):
                train(name, "multitask", fold)
        _CACHE["multiview"] = {"root": root, "dataset": name, "id": 971,
                               "model_dir": root / "res" / name / "MultitaskTrainer__orthoPlans__3d_fullres",
                               "raw": root / "raw" / name,
                               "test_cases": ["test000", "test001", "test002"]}
    return _CACHE["multiview"]


def copy_case(raw: Path, case: str, dest: Path, views: Sequence[str] = ("sagittal", "coronal", "axial"),
              new_id: str = None, split: str = "Ts") -> List[Path]:
    """Copy a raw case's channel files into ``dest`` (optionally under another case id)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for view in views:
        src = raw / f"images{split}" / f"{case}_{view}_0000.nii.gz"
        target = dest / f"{new_id or case}_{view}_0000.nii.gz"
        shutil.copy(src, target)
        out.append(target)
    return out
