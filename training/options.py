"""What one ``ortho_train`` run was asked to do, and where its results go.

Why a dataclass: the command line, the Python API and tests all describe a run the same way, and the result folder
name is derived from it in one place (so prediction finds what training wrote).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from orthonet.errors import OrthoError
from orthonet.paths import results_root

DEFAULT_PLANS = "orthoPlans"


@dataclass
class TrainOptions:
    dataset_name: str
    configuration: str
    fold: Union[int, str]
    task: Optional[str] = None                 # None: what the dataset has labels for
    pretrained: str = "auto"                   # auto | none | PATH
    label_fraction: float = 1.0
    epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    val_iterations: Optional[int] = None
    continue_training: bool = False
    validation_only: bool = False
    device: Optional[str] = None
    num_workers: Optional[int] = None
    plans_name: str = DEFAULT_PLANS
    seed: int = 12345
    fuse_views: bool = False
    fusion: str = "concat"
    final_validation: bool = True
    loss_weights: Optional[Tuple[float, float]] = None   # multitask: (segmentation, diagnosis)
    diagnosis_input: str = "whole"             # whole exams (attention-MIL) | crop (the old centre-crop model)
    feature_t: Optional[Dict[str, Optional[int]]] = None   # diffusion-feature timestep per view (None: clean)
    diagnosis_levels: Optional[List[int]] = None            # encoder levels the diagnosis pools (None: last 3)
    diagnosis_coarsen_levels: Optional[List[int]] = None    # of those, max-pooled onto the next level's grid
    compile: bool = False                      # torch.compile the training network (ORTHO_COMPILE_BACKEND)

    def __post_init__(self) -> None:
        if str(self.fold) != "all":
            try:
                self.fold = int(self.fold)
            except ValueError:
                raise OrthoError(f"fold must be 0-4 or 'all', got '{self.fold}'") from None
            if not 0 <= self.fold <= 4:
                raise OrthoError(f"fold must be 0-4 or 'all', got {self.fold}")
        if not 0.0 < float(self.label_fraction) <= 1.0:
            raise OrthoError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        self.label_fraction = float(self.label_fraction)
        if self.diagnosis_input not in ("whole", "crop"):
            raise OrthoError(f"--diagnosis-input must be 'whole' or 'crop', got '{self.diagnosis_input}'")
        check_fuse_views(self.task, self.fuse_views)

    def to_dict(self) -> Dict:
        return asdict(self)


def check_fuse_views(task: Optional[str], fuse_views: bool) -> None:
    """Refuse ``--fuse-views`` for the diagnosis-only task instead of ignoring it: the flag fuses the other views
    into the segmentation view's decoder, and a diagnosis model has no decoder (its head already fuses every
    view)."""
    if fuse_views and task == "diag":
        raise OrthoError("--fuse-views fuses the other views into the segmentation and does nothing for --task diag "
                         "(the diagnosis head already fuses every view)",
                         fix="drop --fuse-views, or train --task multitask (segmentation + diagnosis) with it")


def model_folder_name(trainer: str, plans_name: str, configuration: str, label_fraction: float = 1.0,
                      pretrained: str = "auto") -> str:
    """``{Trainer}__{plans}__{config}``, with ``__lf{F}`` for label fractions and ``__scratch`` for
    ``--pretrained none``, so the runs a label-efficiency study compares never overwrite each other."""
    name = f"{trainer}__{plans_name}__{configuration}"
    if label_fraction < 1.0:
        name += f"__lf{label_fraction:g}"
    if pretrained == "none":
        name += "__scratch"
    return name


def model_dir(dataset_name: str, folder_name: str) -> Path:
    return results_root() / dataset_name / folder_name


def fold_dir_name(fold: Union[int, str]) -> str:
    return f"fold_{fold}"
