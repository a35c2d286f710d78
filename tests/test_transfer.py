"""Knee -> ankle / shoulder transfer on tiny synthetic data: plans transfer across image sizes and spacings, the
view map by what each series is (the shoulder's oblique stacks), and pretrained starts that load exactly the files
they name, or fail, never silently from scratch.

One module fixture plans the knee (narrow network), pretrains every view for 2 steps and transfers its plans to an
ankle with larger images and a shoulder with smaller, coarser ones; everything runs in-process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from orthonet.errors import OrthoError
from orthonet.synthetic.writer import make_dataset
from orthonet.planners.plans import load_plans
from orthonet.planners.transfer import orientation_from_name, resolve_view_map
from tests.predict_helpers import ortho_env
from orthonet.training.pretrained import find_pretrained, load_encoder_file, network_hash, pretrain_view_dir

KNEE, ANKLE, SHOULDER, RENAMED = "Dataset941_Knee", "Dataset942_Ankle", "Dataset943_Shoulder", "Dataset944_Series"
#: the renamed shoulder: view names that say nothing about the plane each series is
SERIES = {"coronal": "scan1", "axial": "scan2", "sagittal": "scan3"}
VIEWS = ("sagittal", "coronal", "axial")


def _plan(*argv: str) -> None:
    from orthonet.planners.cli import main
    assert main(list(argv) + ["-np", "1", "--no-progress", "-c", "3d_fullres"]) == 0


def _rename_views(src: Path, dst: Path) -> None:
    """Copy a synthetic dataset with its views renamed after SERIES (files and dataset.json)."""
    shutil.copytree(src, dst)
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((dst / sub).iterdir()):
            for old, new in SERIES.items():
                if f"_{old}" in f.name:
                    f.rename(f.with_name(f.name.replace(f"_{old}", f"_{new}")))
    meta = json.loads((dst / "dataset.json").read_text(encoding="utf-8"))
    meta["views"] = sorted(SERIES.values())
    meta["segmentation_view"] = SERIES[meta["segmentation_view"]]
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ortho_env(tmp_path_factory.mktemp("transfer")) as root:
        torch.set_num_threads(1)
        _make_datasets(root / "raw")
        yield root


def _make_datasets(raw: Path) -> None:
    """Knee planned and pretrained (2 steps per view); ankle, shoulder and the renamed shoulder transferred."""
    make_dataset(raw / KNEE, "knee", n_train=5, n_test=0, size="tiny", progress=False)
    # the ankle's images are larger than the knee's (finer spacing), the shoulder's smaller and coarser
    make_dataset(raw / ANKLE, "ankle", n_train=5, n_test=0, size="tiny", progress=False, in_plane_mm=3.0,
                 slice_mm=7.0)
    make_dataset(raw / SHOULDER, "shoulder", n_train=5, n_test=0, size="tiny", progress=False, in_plane_mm=5.0,
                 slice_mm=12.0)
    _rename_views(raw / SHOULDER, raw / RENAMED)
    _plan("-d", "941", "--base-features", "4")
    from orthonet.training.pretrain_cli import pretrain_main
    assert pretrain_main(["941", "3d_fullres", "--steps", "2", "--save-every", "2", "--num-workers", "0",
                          "--device", "cpu", "--no-progress"]) == 0
    for did in ("942", "943", "944"):
        _plan("-d", did, "--plans-from", "941")


def _options(dataset: str, **kw):
    from orthonet.training.options import TrainOptions
    base = dict(dataset_name=dataset, configuration="3d_fullres", fold=0, epochs=1, iterations_per_epoch=1,
                val_iterations=1, num_workers=0, device="cpu", final_validation=False)
    base.update(kw)
    return TrainOptions(**base)


def _knee_encoder(view: str) -> Path:
    return pretrain_view_dir(KNEE, "orthoPlans", "3d_fullres", view) / "encoder.pt"


# ------------------------------------------------------------------------------------------------------------
# plans transfer across sizes and spacings
# ------------------------------------------------------------------------------------------------------------
def test_transfer_keeps_the_network_and_clips_the_patch_to_smaller_images(env):
    knee = load_plans(env / "pre" / KNEE)
    clipped = 0
    for dataset in (ANKLE, SHOULDER):
        plans = load_plans(env / "pre" / dataset)
        for view in VIEWS:
            src = knee["views"][view]["configurations"]["3d_fullres"]
            cfg = plans["views"][view]["configurations"]["3d_fullres"]
            assert network_hash(cfg["network"]) == network_hash(src["network"]), (dataset, view)
            assert cfg["spacing"] != src["spacing"], (dataset, view)
            multiple = np.prod(np.asarray(cfg["network"]["kwargs"]["strides"]), axis=0)
            assert all(p % m == 0 for p, m in zip(cfg["patch_size"], multiple)), (dataset, view, cfg["patch_size"])
            for p, s, m, k in zip(cfg["patch_size"], src["patch_size"], cfg["median_image_size_in_voxels"], multiple):
                # the knee's patch where the target's image is as large; else just the image, rounded up
                assert p == (s if m >= s else min(s, -(-m // k) * k)), (dataset, view, cfg["patch_size"])
            clipped += cfg["patch_size"] != src["patch_size"]
        if dataset == ANKLE:
            assert all(plans["views"][v]["configurations"]["3d_fullres"]["patch_size"] ==
                       knee["views"][v]["configurations"]["3d_fullres"]["patch_size"] for v in VIEWS)
    assert clipped == 3, "every view of the smaller shoulder gets a smaller patch"


@pytest.mark.parametrize("dataset", [ANKLE, SHOULDER])
def test_knee_encoders_train_on_the_target_and_run_config_names_each_file(env, dataset):
    from orthonet.training.cli import train_main
    assert train_main([dataset, "3d_fullres", "0", "--epochs", "1", "--iterations-per-epoch", "2",
                       "--val-iterations", "1", "--num-workers", "0", "--device", "cpu",
                       "--no-final-validation"]) == 0
    run = env / "res" / dataset / "MultitaskTrainerPyramid__orthoPlans__3d_fullres" / "fold_0"  # default with encoders
    report = json.loads((run / "run_config.json").read_text(encoding="utf-8"))["pretrained"]
    assert report["start"] == "pretrained" and report["scratch_views"] == []
    for view in VIEWS:
        entry = report["views"][view]
        assert entry["file"] == str(_knee_encoder(view))
        assert (entry["pretrained_dataset"], entry["pretrained_view"]) == (KNEE, view)
        assert entry["encoder_tensors"] > 0
    assert (run / "checkpoint_final.pt").is_file()


# ------------------------------------------------------------------------------------------------------------
# the view map: what each series is
# ------------------------------------------------------------------------------------------------------------
def test_views_are_matched_by_the_plane_each_series_is(env):
    plans = load_plans(env / "pre" / RENAMED)
    origin = plans["transferred_from"]
    assert origin["views"] == {new: old for old, new in SERIES.items()}
    assert all(why.startswith("headers:") for why in origin["view_matching"].values())
    # the shoulder's oblique sagittal / coronal are ~30 deg off the body axes and still count as those planes
    shoulder = load_plans(env / "pre" / SHOULDER)["transferred_from"]
    assert shoulder["views"] == {v: v for v in VIEWS}


def test_headers_win_over_a_misleading_name_and_names_decide_when_headers_cannot():
    orient = {"coronal": ("sagittal", 0.9), "oblCor": ("ambiguous", 0.7)}
    mapping, why = resolve_view_map(["coronal", "oblCor", "T2AX"], ["sagittal", "coronal", "axial"],
                                    target_orientations=orient)
    assert mapping == {"coronal": "sagittal", "oblCor": "coronal", "T2AX": "axial"}
    assert why["coronal"].startswith("headers:") and why["oblCor"].startswith("name:")
    assert [orientation_from_name(n) for n in ("obliqueSagittal", "corPD", "transverse", "image", "scan1")] == \
        ["sagittal", "coronal", "axial", None, None]
    with pytest.raises(OrthoError, match="lacks"):
        resolve_view_map(["image"], ["sagittal"], {"image": "axial"})


# ------------------------------------------------------------------------------------------------------------
# pretrained starts: the mapping honoured, every file named, nothing silent
# ------------------------------------------------------------------------------------------------------------
def test_a_mapped_transfer_loads_the_source_views_encoders(env):
    from orthonet.training.trainers import MultitaskTrainer
    trainer = MultitaskTrainer(_options(RENAMED))
    trainer.setup()
    report = json.loads((trainer.output_dir / "run_config.json").read_text(encoding="utf-8"))["pretrained"]
    for old, new in SERIES.items():
        assert report["views"][new]["file"] == str(_knee_encoder(old))
        assert report["views"][new]["pretrained_view"] == old
        enc = load_encoder_file(_knee_encoder(old))["encoder_state_dict"]
        target = trainer.model.encoders[new].state_dict()
        assert set(k[len("encoder."):] for k in enc) == set(target)
        assert all(torch.equal(target[k[len("encoder."):]].cpu(), v) for k, v in enc.items()), new
    log = (trainer.output_dir / "log.txt").read_text(encoding="utf-8")
    assert f"view 'scan1' <- {_knee_encoder('coronal')}" in log


def test_transferred_plans_without_source_encoders_are_an_error(env):
    plans = {"dataset_name": RENAMED, "plans_name": "orthoPlans",
             "transferred_from": {"dataset_name": KNEE, "plans_name": "otherPlans", "views": {"scan1": "coronal"}}}
    with pytest.raises(OrthoError, match="transferred from") as err:
        find_pretrained("auto", plans, "3d_fullres", ["scan1"])
    assert "ortho_pretrain" in err.value.fix and "--pretrained none" in err.value.fix
    plans["transferred_from"]["plans_name"] = "orthoPlans"
    found = find_pretrained("auto", plans, "3d_fullres", ["scan1"])
    assert found.files == {"scan1": _knee_encoder("coronal")}
    # an explicit Pretrain__ folder follows the same map
    found = find_pretrained(str(_knee_encoder("coronal").parent.parent), plans, "3d_fullres", ["scan1"])
    assert found.files == {"scan1": _knee_encoder("coronal")}


def test_plain_auto_without_pretraining_trains_from_scratch_and_says_so(env):
    from orthonet.planners.plans import save_plans
    from orthonet.training.trainers import MultitaskTrainer
    pre = env / "pre" / SHOULDER
    plain = load_plans(pre)
    plain.update(plans_name="plainPlans", transferred_from=None)
    save_plans(plain, pre)
    trainer = MultitaskTrainer(_options(SHOULDER, plans_name="plainPlans"))
    trainer.setup()
    report = json.loads((trainer.output_dir / "run_config.json").read_text(encoding="utf-8"))["pretrained"]
    assert report["source"] is None and report["start"] == "scratch" and "auto" in report["reason"]


def test_an_encoder_for_a_view_the_model_lacks_is_an_error(env):
    from orthonet.training.trainers import SegTrainer
    trainer = SegTrainer(_options(KNEE, task="seg", pretrained=str(_knee_encoder("axial"))))
    assert trainer.model_views() == ["sagittal"]
    with pytest.raises(OrthoError, match="pretrained for view 'axial', which the model lacks") as err:
        trainer.setup()
    assert "--view-map" in err.value.fix


def test_resuming_keeps_the_record_of_what_was_loaded(env):
    from orthonet.training.cli import train_main
    base = [ANKLE, "3d_fullres", "1", "--iterations-per-epoch", "1", "--val-iterations", "1", "--num-workers", "0",
            "--device", "cpu", "--no-final-validation"]
    assert train_main(base + ["--epochs", "1"]) == 0
    assert train_main(base + ["--epochs", "2", "--c"]) == 0
    run = env / "res" / ANKLE / "MultitaskTrainerPyramid__orthoPlans__3d_fullres" / "fold_1"
    report = json.loads((run / "run_config.json").read_text(encoding="utf-8"))["pretrained"]
    assert report["start"] == "pretrained"
    assert {v: e["file"] for v, e in report["views"].items()} == {v: str(_knee_encoder(v)) for v in VIEWS}
