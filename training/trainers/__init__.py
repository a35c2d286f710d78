"""Trainer classes, chosen by name with ``-tr`` (a registered name, or ``package.module.ClassName`` for a user's
own subclass)."""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Type

from orthonet.errors import OrthoError
from orthonet.training.trainers.base import BaseTrainer
from orthonet.training.trainers.diagnosis import DiagTrainer
from orthonet.training.trainers.diffusion_features import (DiagTrainerDiffusionFeatures,
                                                           MultitaskTrainerDiffusionFeatures, MultitaskTrainerPyramid,
                                                           SegTrainerDiffusionFeatures, SegTrainerPyramid)
from orthonet.training.trainers.multitask import MultitaskTrainer
from orthonet.training.trainers.segmentation import SegTrainer

TRAINERS: Dict[str, Type[BaseTrainer]] = {}
DEFAULT_TRAINER_FOR_TASK = {"seg": "SegTrainer", "diag": "DiagTrainer", "multitask": "MultitaskTrainer"}
#: The default when pretrained encoders will be loaded. Why: the label-efficiency benchmark (docs/benchmarks.md)
#: shows the U-Net decoder gaining nothing from a denoiser (mean Dice 0.06-0.07 vs 0.15 from scratch at 10 % labels)
#: while the pyramid head on the same encoder gains +0.23 (0.689 vs 0.458 from scratch; 0.672 vs 0.352 at 100 %).
DEFAULT_TRAINER_WITH_PRETRAINING = {"seg": "SegTrainerPyramid", "diag": "DiagTrainer",
                                    "multitask": "MultitaskTrainerPyramid"}


def register_trainer(cls: Type[BaseTrainer]) -> Type[BaseTrainer]:
    """Class decorator: make a trainer available to ``-tr`` by its class name."""
    TRAINERS[cls.__name__] = cls
    return cls


for _cls in (SegTrainer, DiagTrainer, MultitaskTrainer, SegTrainerPyramid, MultitaskTrainerPyramid,
             SegTrainerDiffusionFeatures, DiagTrainerDiffusionFeatures, MultitaskTrainerDiffusionFeatures):
    register_trainer(_cls)


def get_trainer_class(name: Optional[str], task: Optional[str] = None) -> Type[BaseTrainer]:
    """Resolve ``-tr NAME`` (or the default trainer of ``task``)."""
    if name is None:
        if task is None:
            raise OrthoError("no trainer and no task given")
        name = DEFAULT_TRAINER_FOR_TASK[task]
    if name in TRAINERS:
        cls = TRAINERS[name]
    elif "." in name:
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as e:
            raise OrthoError(f"cannot import trainer '{name}' ({e})",
                             fix="make the module importable (e.g. on PYTHONPATH) and check the class name") from None
    else:
        raise OrthoError(f"unknown trainer '{name}'", fix=f"use one of {', '.join(sorted(TRAINERS))}, or a dotted "
                         "path to your own subclass (mypackage.module.MyTrainer)")
    if not (isinstance(cls, type) and issubclass(cls, BaseTrainer)):
        raise OrthoError(f"'{name}' is not an orthonet trainer class (subclass SegTrainer, DiagTrainer or "
                         "MultitaskTrainer)")
    if task is not None and cls.task != task:
        raise OrthoError(f"trainer {name} trains task '{cls.task}', but --task {task} was requested",
                         fix="drop --task, or pick a trainer for that task")
    return cls


__all__ = ["BaseTrainer", "SegTrainer", "DiagTrainer", "MultitaskTrainer", "SegTrainerPyramid",
           "MultitaskTrainerPyramid", "SegTrainerDiffusionFeatures",
           "DiagTrainerDiffusionFeatures", "MultitaskTrainerDiffusionFeatures", "TRAINERS", "register_trainer",
           "get_trainer_class", "DEFAULT_TRAINER_FOR_TASK", "DEFAULT_TRAINER_WITH_PRETRAINING"]
