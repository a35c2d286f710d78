"""``--fuse-views`` (cross-view bottleneck fusion) for every task, and training and prediction seeing a fused view
the same way: a view the exam lacks contributes zeros and coverage 0, and coverage marks the other view's image,
not the zero padding of its crop (issue 12, items 2 and 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from tests.builders import write_tiny_dataset
from tests.predict_helpers import copy_case, ortho_env, plan_small

NAME, ID = "Dataset991_FuseViews", 991          # complete exams
INCOMPLETE = "Dataset992_FuseViewsIncomplete"    # the same with one exam lacking its coronal view
LACKING = "case002"
RUN = ["--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "0",
       "--device", "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three oblique views, segmentation + diagnoses (so the default task is multitask), narrow networks; twice:
    complete, and with ``LACKING`` missing its coronal view after preprocessing (a training case of fold 0)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuse_views")
    with ortho_env(root):
        for name, dataset_id in ((NAME, ID), (INCOMPLETE, ID + 1)):
            write_tiny_dataset(root / "raw" / name, n_train=6, n_test=1, oblique=True, seed=5)
            plan_small(dataset_id, name, root)
        from orthonet.preprocessing import storage
        for folder in (root / "pre" / INCOMPLETE).iterdir():
            if folder.is_dir():
                storage.properties_file(folder, LACKING, "coronal").unlink(missing_ok=True)
        yield root


def _options(**kw):
    from orthonet.training.options import TrainOptions
    base = dict(dataset_name=INCOMPLETE, configuration="3d_fullres", fold=0, epochs=1, iterations_per_epoch=2,
                val_iterations=1, num_workers=0, device="cpu", fuse_views=True, pretrained="none")
    base.update(kw)
    return TrainOptions(**base)


@pytest.mark.parametrize("diagnosis_input, fold", [("whole", "0"), ("crop", "1")])
def test_default_multitask_task_trains_validates_and_predicts_with_fuse_views(dataset, tmp_path, diagnosis_input,
                                                                              fold):
    """`ortho_train D 3d_fullres 0 --fuse-views` on a dataset with segmentation and diagnoses (multitask by
    default) trains the cross-view fusion, validates (online and full-volume) and `ortho_predict` segments with it,
    with and without the other views."""
    from orthonet.inference.cli import predict_cli
    from orthonet.training.cli import train_main
    argv = [NAME, "3d_fullres", fold, "--fuse-views", "--pretrained", "none", "--diagnosis-input", diagnosis_input]
    assert train_main(argv + RUN) == 0
    model_dir = dataset / "res" / NAME / "MultitaskTrainer__orthoPlans__3d_fullres__scratch"
    ckpt = torch.load(model_dir / f"fold_{fold}" / "checkpoint_final.pt", weights_only=True)
    assert ckpt["extra"]["model_config"]["fuse_views"] and ckpt["extra"]["model_config"]["task"] == "multitask"
    mix = ckpt["model"]["cross_view.mix.weight"]
    seg_channels = mix.shape[0]
    assert mix[:, seg_channels:].abs().sum() > 0          # the other views' channels were trained (start at 0)
    summary = (model_dir / f"fold_{fold}" / "validation" / "summary.json").read_text(encoding="utf-8")
    assert '"segmentation"' in summary and '"diagnosis"' in summary
    raw = dataset / "raw" / NAME
    inp, out = tmp_path / "in", tmp_path / "out"
    copy_case(raw, "test000", inp)
    copy_case(raw, "test000", inp, views=("sagittal", "axial"), new_id="nocoronal")
    assert predict_cli(["-i", str(inp), "-o", str(out), "--model-folder", str(model_dir), "-f", fold,
                        "--disable-tta", "-npp", "1", "--no-progress", "--no-overview"]) == 0
    for case in ("test000", "nocoronal"):
        assert (out / f"{case}_sagittal.nii.gz").is_file(), sorted(p.name for p in out.iterdir())


def test_diag_task_refuses_fuse_views_clearly(dataset):
    """--task diag has no segmentation to fuse views into: refused (naming the flag and the fix), not ignored."""
    from orthonet.errors import OrthoError
    from orthonet.training.cli import train_main
    with pytest.raises(OrthoError, match="--fuse-views") as err:
        train_main([NAME, "3d_fullres", "0", "--task", "diag", "--fuse-views", "--pretrained", "none"] + RUN)
    assert err.value.fix and "drop --fuse-views" in err.value.fix
    from orthonet.training.trainers import DiagTrainer
    with pytest.raises(OrthoError, match="--fuse-views"):            # the Python API too
        DiagTrainer(_options(task=None)).run()


# ---------------------------------------------------------------------------------------------------------------
# the fusion's inputs in training and in prediction
# ---------------------------------------------------------------------------------------------------------------
def _trainer(task: str):
    """The task's trainer, set up on the incomplete dataset. Multitask diagnoses centre crops here: whole-exam
    diagnosis cannot yet encode a batch holding an exam that lacks a view (a 1-voxel stand-in volume), and the
    fusion's inputs do not depend on what the diagnosis reads."""
    from orthonet.training.trainers import get_trainer_class
    trainer = get_trainer_class(None, task)(_options(task=task, diagnosis_input="crop"))
    trainer.setup()
    trainer.model.eval()
    return trainer


def _batch(trainer, cases: List[str], train: bool) -> Dict:
    if trainer.task == "seg":
        return next(trainer._seg_loader(cases, train, 0))
    return next(trainer.multiview_loader(cases, train, 0))


def _fusion_input(trainer, batch: Dict) -> torch.Tensor:
    """The tensor the cross-view 1x1 conv receives for ``batch`` on the trainer's own forward path."""
    seen = []
    hook = trainer.model.cross_view.mix.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            if trainer.task == "seg":
                inputs, kwargs = trainer.model_inputs(batch)
                trainer.model(inputs, **kwargs)
            else:
                trainer.run_model(trainer.model, batch)
    finally:
        hook.remove()
    return seen[-1]


def _split(model, mixed: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
    """{view: {'features', 'coverage'}} of the fusion input (segmentation channels first, then per view)."""
    fusion = model.cross_view
    start = mixed.shape[1] - sum(c + 1 for c in fusion.other_channels.values())
    parts = {}
    for v in fusion.views:
        c = fusion.other_channels[v]
        parts[v] = {"features": mixed[:, start:start + c], "coverage": mixed[:, start + c]}
        start += c + 1
    return parts


def _seg_patch_offset(trainer, batch: Dict, b: int, case: str) -> List[int]:
    from orthonet.networks.cross_view import preprocessed_index_to_physical
    seg = trainer.segmentation_view
    volume = preprocessed_index_to_physical(trainer.store.properties(case, seg))
    patch = batch["affines"][seg][b].numpy()
    return [int(round(x)) for x in np.linalg.solve(volume, patch[:, 3])[:3]]


def _predicted_fusion_input(trainer, case: str, offset: List[int]) -> torch.Tensor:
    """The fusion input of ``ortho_predict``'s tile predictor for the tile of ``case`` at ``offset``."""
    from orthonet.inference.predict_core import LoadedModel, _fused_segment_fn
    seg = trainer.segmentation_view
    views = [v for v in trainer.model_cfg.views if trainer.store.has_view(case, v)]
    data = {v: trainer.store.open(case, v, with_seg=False).data[:] for v in views}
    props = {v: trainer.store.properties(case, v) for v in views}
    loaded = LoadedModel(trainer.model, trainer.model_cfg, trainer.plans, trainer.output_dir, trainer.device)
    predict = _fused_segment_fn(loaded, data, props)
    patch = loaded.patch_size(seg)
    tile = trainer.store.open(case, seg, with_seg=False).crop_image([[o, o + p] for o, p in zip(offset, patch)])
    seen = []
    hook = trainer.model.cross_view.mix.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        predict(torch.from_numpy(tile)[None], [offset])
    finally:
        hook.remove()
    return seen[-1]


@pytest.mark.parametrize("task", ["seg", "multitask"])
def test_missing_view_has_zero_coverage_in_training_as_in_prediction(dataset, task):
    """A view the exam lacks: zeros and coverage 0 in training batches (augmented and not), and the whole fusion
    input of a training batch equals prediction's for the same tile (where the view is simply not given)."""
    trainer = _trainer(task)
    assert not trainer.store.has_view(LACKING, "coronal")
    for train in (True, False):
        batch = _batch(trainer, [LACKING], train)
        parts = _split(trainer.model, _fusion_input(trainer, batch))
        assert float(parts["coronal"]["coverage"].abs().max()) == 0.0, train
        assert float(parts["coronal"]["features"].abs().max()) == 0.0, train
        assert float(parts["axial"]["coverage"].max()) == 1.0       # the present view still fuses
    trained = _fusion_input(trainer, batch)                          # validation batch: no augmentation
    predicted = _predicted_fusion_input(trainer, LACKING, _seg_patch_offset(trainer, batch, 0, LACKING))
    torch.testing.assert_close(trained[:1], predicted, atol=1e-5, rtol=1e-4)


def test_coverage_marks_the_other_views_image_not_its_padded_crop(dataset):
    """Where the other view's aligned crop reaches past its volume (zero padding), the coverage channel is 0: each
    bottleneck voxel's centre is mapped into the whole other volume and checked against its shape."""
    from orthonet.networks.build import cumulative_strides
    from orthonet.networks.cross_view import feature_affine, preprocessed_index_to_physical
    trainer = _trainer("seg")
    cases = [c for c in trainer.train_cases if trainer.store.has_view(c, "axial")]
    batch = _batch(trainer, cases, True)
    mixed = _fusion_input(trainer, batch)
    coverage = _split(trainer.model, mixed)["axial"]["coverage"]
    seg = trainer.segmentation_view
    stride = cumulative_strides(trainer.model.specs_by_view[seg])[-1]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in coverage.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    outside_seen = 0
    for b, case in enumerate(batch["keys"]):
        dst = feature_affine(batch["affines"][seg][b].numpy(), stride)
        volume = preprocessed_index_to_physical(trainer.store.properties(case, "axial"))
        shape = np.array(trainer.store.open(case, "axial", with_seg=False).shape)
        points = (np.linalg.inv(volume) @ dst @ np.c_[grid, np.ones(len(grid))].T).T[:, :3]
        outside = ((points < -0.5) | (points > shape - 0.5)).any(1)
        cov = coverage[b].reshape(-1).numpy()
        assert cov[outside].max(initial=0.0) == 0.0, case
        outside_seen += int(outside.sum())
    assert outside_seen > 0 and coverage.sum() > 0     # the check had voxels on both sides of the volume's edge
