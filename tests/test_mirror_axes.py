"""Mirroring test-time augmentation follows the axes the model's training augmentation mirrored (stored with the
model as nnU-Net's ``inference_allowed_mirroring_axes``); descriptions written before the field mirror every axis."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

from orthonet.inference.predict_core import LoadedModel, diagnosis_logits, load_trained_model, segmentation_logits
from orthonet.training.model_factory import ModelConfig


class RampModel(nn.Module):
    """Output = input x a ramp along spatial axis 0: a flip along axis 0 changes the TTA mean, flips along the
    other axes do not. Counts forward passes and keeps the diagnosis inputs it saw."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.num_classes, self.calls, self.seen = num_classes, 0, []

    @staticmethod
    def ramp(x: torch.Tensor) -> torch.Tensor:
        shape = [1, 1, x.shape[2]] + [1] * (x.ndim - 3)
        return torch.arange(1, x.shape[2] + 1, dtype=x.dtype).reshape(shape)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x * self.ramp(x)).repeat(1, self.num_classes, *[1] * (x.ndim - 2))

    def diagnose(self, x: Dict[str, torch.Tensor], present) -> Dict[str, torch.Tensor]:
        self.seen.append({v: t.clone() for v, t in x.items()})
        score = (x["sagittal"] * self.ramp(x["sagittal"])).sum(dim=tuple(range(1, x["sagittal"].ndim)))
        return {"logits": score[:, None]}


def _loaded(allowed: Optional[Dict[str, List[int]]], patches: Dict[str, Sequence[int]], task: str = "seg",
            include_field: bool = True) -> LoadedModel:
    """A LoadedModel around :class:`RampModel`; ``include_field=False`` reads an old description (no axes)."""
    desc = dict(task=task, configuration="3d_fullres", views=list(patches), segmentation_view="sagittal",
                channels_by_view={v: 1 for v in patches}, num_classes=2, n_diagnoses=1)
    if include_field:
        desc["allowed_mirroring_axes"] = allowed
    plans = {"views": {v: {"configurations": {"3d_fullres": {"patch_size": list(p)}}} for v, p in patches.items()}}
    return LoadedModel(RampModel(), ModelConfig.from_dict(desc), plans, Path("."), torch.device("cpu"))


def _flips(t: torch.Tensor, axes: Sequence[int]) -> List[torch.Tensor]:
    """``t`` (B, C, *spatial) flipped along every subset of the spatial ``axes``."""
    return [torch.flip(t, [a + 2 for a in c]) if c else t
            for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def test_segmentation_never_mirrors_along_an_axis_the_model_was_not_trained_to_mirror():
    loaded = _loaded({"sagittal": [1, 2]}, {"sagittal": (4, 6, 8)})
    x = torch.rand(1, 4, 6, 8)
    logits = segmentation_logits(loaded, x)
    torch.testing.assert_close(logits[0], (x[None] * RampModel.ramp(x[None]))[0, 0])  # no axis-0 flip averaged in
    assert loaded.model.calls == 4                                                     # but axes 1, 2 still are


def test_diagnosis_mirrors_each_view_only_along_its_stored_axes():
    loaded = _loaded({"sagittal": [1, 2], "coronal": [0, 1, 2]}, {"sagittal": (4, 6, 8), "coronal": (4, 6, 8)},
                     task="diag")
    inputs = {v: torch.rand(1, 4, 6, 8) for v in ("sagittal", "coronal")}
    diagnosis_logits(loaded, inputs)
    allowed_sag = _flips(inputs["sagittal"][None], (1, 2))
    for seen in loaded.model.seen:
        assert any(torch.equal(seen["sagittal"], f) for f in allowed_sag)
    assert any(torch.equal(seen["coronal"], torch.flip(inputs["coronal"][None], [2])) for seen in loaded.model.seen)


def test_old_descriptions_keep_mirroring_every_spatial_axis():
    loaded = _loaded(None, {"sagittal": (4, 6, 8)}, include_field=False)
    assert loaded.config.allowed_mirroring_axes is None
    x = torch.rand(1, 4, 6, 8)
    logits = segmentation_logits(loaded, x)
    assert loaded.model.calls == 8
    assert not torch.allclose(logits[0], (x[None] * RampModel.ramp(x[None]))[0, 0])
    flat = _loaded(None, {"sagittal": (6, 8)}, include_field=False)        # a 2D configuration has two axes
    segmentation_logits(flat, torch.rand(1, 6, 8))
    assert flat.model.calls == 4
    off = _loaded({"sagittal": [0, 1]}, {"sagittal": (6, 8)})
    segmentation_logits(off, torch.rand(1, 6, 8), mirror_axes=())         # --disable-tta still wins
    assert off.model.calls == 1


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A planned two-view dataset (5 cases, tiny volumes)."""
    from orthonet.planners.cli import main as plan_main
    from tests.builders import write_tiny_dataset
    from tests.predict_helpers import ortho_env
    root = tmp_path_factory.mktemp("mirror")
    with ortho_env(root):
        write_tiny_dataset(root / "raw" / "Dataset981_Mirror", n_train=5, n_test=0, views=["sagittal", "coronal"])
        assert plan_main(["-d", "981", "-np", "1", "--no-progress"]) == 0
        yield root


def _trainer(cls, task: str):
    from orthonet.training.options import TrainOptions
    trainer = cls(TrainOptions(dataset_name="Dataset981_Mirror", configuration="3d_fullres", fold=0, task=task,
                               epochs=1, iterations_per_epoch=1, val_iterations=1, num_workers=0, device="cpu"))
    trainer.configure_data()
    trainer.model_cfg = trainer.model_config()
    return trainer


def _mirror_transform_axes(transforms) -> tuple:
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    found = [t.allowed_axes for t in transforms.transforms if isinstance(t, MirrorTransform)]
    return tuple(found[0]) if found else ()


def test_trainer_stores_the_axes_its_augmentation_mirrors(planned, tmp_path):
    from orthonet.training.checkpoint import save_checkpoint
    from orthonet.training.trainers import get_trainer_class
    from orthonet.fileio import save_json

    class NoAxis0SegTrainer(get_trainer_class(None, "seg")):
        mirror_axes = (1, 2)

    seg = _trainer(NoAxis0SegTrainer, "seg")
    assert seg.model_cfg.allowed_mirroring_axes == {"sagittal": [1, 2]}
    assert _mirror_transform_axes(seg.build_train_loader().source.transforms) == (1, 2)
    fold = tmp_path / "fold_0"                          # the description travels in the checkpoint
    fold.mkdir()
    save_json(seg.plans, tmp_path / "plans.json")
    save_checkpoint(fold / "checkpoint_final.pt", seg.build_model(), extra=seg.checkpoint_extra())
    assert load_trained_model(fold, torch.device("cpu")).config.allowed_mirroring_axes == {"sagittal": [1, 2]}

    multi = _trainer(get_trainer_class(None, "multitask"), "multitask")   # whole-exam diagnosis: never mirrored
    assert multi.model_cfg.allowed_mirroring_axes == {"sagittal": [0, 1, 2], "coronal": []}
    loader = multi.build_train_loader()
    assert _mirror_transform_axes(loader.source.transforms["sagittal"]) == (0, 1, 2)
    assert "coronal" not in loader.source.transforms
