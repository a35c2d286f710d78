"""Trainers end to end on tiny data: every task trains and validates, learns something measurable, loads pretrained
weights, honours label fractions, ignore labels and missing views, and resumes after being killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.builders import write_tiny_dataset
from tests.host_reads import HostReadGuard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """ORTHO_* folders for this module (set for in-process calls and inherited by subprocesses)."""
    root = tmp_path_factory.mktemp("training")
    old = {k: os.environ.get(k) for k in ("ORTHO_raw", "ORTHO_preprocessed", "ORTHO_results")}
    os.environ.update(ORTHO_raw=str(root / "raw"), ORTHO_preprocessed=str(root / "pre"),
                      ORTHO_results=str(root / "res"))
    torch.set_num_threads(1)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _plan(dataset_id: int) -> None:
    from orthonet.planners.cli import main as plan_main
    assert plan_main(["-d", str(dataset_id), "-np", "1"]) == 0


@pytest.fixture(scope="module")
def multiview(env):
    """Three oblique views, segmentation + two diagnoses, 12 training cases."""
    write_tiny_dataset(env / "raw" / "Dataset951_Three", n_train=12, n_test=1, oblique=True)
    _plan(951)
    return "Dataset951_Three"


@pytest.fixture(scope="module")
def single_view(env):
    """One view only: fast enough to train long enough to measure learning."""
    write_tiny_dataset(env / "raw" / "Dataset952_One", n_train=20, n_test=1, views=["sagittal"])
    _plan(952)
    return "Dataset952_One"


def _options(dataset, **kw):
    from orthonet.training.options import TrainOptions
    base = dict(dataset_name=dataset, configuration="3d_fullres", fold=0, epochs=1, iterations_per_epoch=2,
                val_iterations=1, num_workers=0, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


@pytest.mark.parametrize("task", ["seg", "diag", "multitask"])
def test_each_task_trains_and_validates(multiview, task):
    from orthonet.training.trainers import get_trainer_class
    trainer = get_trainer_class(None, task)(_options(multiview, task=task))
    summary = trainer.run()
    out = trainer.output_dir
    for name in ("checkpoint_final.pt", "checkpoint_latest.pt", "progress.png", "log.txt", "run_config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert saved["cases"] == trainer.val_cases
    if task in ("seg", "multitask"):
        assert "segmentation" in summary and set(summary["segmentation"]["dice"]) == {"bone", "cartilage"}
        for case in trainer.val_cases:  # predictions exported in the exact original geometry
            pred = sitk.ReadImage(str(out / "validation" / f"{case}_sagittal.nii.gz"))
            ref = sitk.ReadImage(str(Path(os.environ["ORTHO_raw"]) / multiview / "labelsTr" / f"{case}_sagittal.nii.gz"))
            assert pred.GetSize() == ref.GetSize()
            np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-6)
    if task in ("diag", "multitask"):
        assert "diagnosis" in summary
        assert (out / "validation" / "diagnoses.csv").is_file()
    ckpt = torch.load(out / "checkpoint_final.pt", weights_only=True)
    assert ckpt["extra"]["model_config"]["task"] == task


def test_segmentation_learns(single_view):
    from orthonet.training.trainers import SegTrainer
    trainer = SegTrainer(_options(single_view, task="seg", epochs=4, iterations_per_epoch=10, val_iterations=2))
    summary = trainer.run()
    dice = summary["segmentation"]["dice"]
    # measured ~0.9 (bone) / ~0.6 (cartilage) after 40 iterations; an untrained network is near 0.1
    assert dice["bone"] > 0.6, dice
    assert summary["segmentation"]["mean_dice"] > 0.45, dice


def test_diagnosis_learns(single_view):
    from orthonet.training.trainers import DiagTrainer
    trainer = DiagTrainer(_options(single_view, task="diag", fold="all", epochs=4, iterations_per_epoch=12))
    summary = trainer.run()
    # lesion_a is a bright 6 mm sphere: clearly learnable; chance level is 0.5
    assert summary["diagnosis"]["auc"]["lesion_a"] > 0.75, summary["diagnosis"]


def _write_pretrained(dataset: str, folder: Path):
    """Denoiser-format encoder.pt files (random weights, FiLM folded at t = 100) for every view of ``dataset``;
    returns {view: encoder state dict}."""
    from orthonet.fileio import load_json
    from orthonet.networks import DiffusionUNet
    from orthonet.paths import preprocessed_root
    from orthonet.training.pretrained import save_encoder_file
    plans = load_json(preprocessed_root() / dataset / "orthoPlans.json")
    expected = {}
    for view in plans["views"]:
        spec = plans["views"][view]["configurations"]["3d_fullres"]["network"]
        torch.manual_seed(len(view))
        den = DiffusionUNet(spec, 1)
        with torch.no_grad():
            for p in den.time_proj.parameters():
                p.normal_(0, 0.01)
        enc = den.encoder_state_dict(t=100)
        expected[view] = enc
        save_encoder_file(folder / view / "encoder.pt", encoder_state_dict=enc, decoder_state_dict=den.decoder_state_dict(100),
                          view=view, dataset_name=dataset, plans_name="orthoPlans", configuration="3d_fullres",
                          network=spec, input_channels=1, feature_timestep=100, prediction_type="epsilon", steps=1)
    return expected


def test_pretrained_encoder_is_loaded(multiview, tmp_path):
    from orthonet.training.trainers import MultitaskTrainer
    folder = tmp_path / "Pretrain__orthoPlans__3d_fullres"
    expected = _write_pretrained(multiview, folder)
    trainer = MultitaskTrainer(_options(multiview, pretrained=str(folder)))
    trainer.setup()
    for view, enc in expected.items():
        target = trainer.model.encoders[view].state_dict()
        assert set(k[len("encoder."):] for k in enc) == set(target), view
        for k, v in enc.items():
            assert torch.equal(target[k[len("encoder."):]].cpu(), v), (view, k)
    assert trainer.pretrained_report["views"]["sagittal"]["decoder_tensors"] > 0
    # pretrained parameters start at a lower learning rate than the new head
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["pretrained"] < groups["new"]


def test_label_fraction_and_splits_are_deterministic(multiview):
    from orthonet.training.trainers import DiagTrainer
    a = DiagTrainer(_options(multiview, task="diag", label_fraction=0.25))
    a.configure_data()
    b = DiagTrainer(_options(multiview, task="diag", label_fraction=0.25))
    b.configure_data()
    assert a.train_cases == b.train_cases and a.keep_labels == b.keep_labels
    assert 1 <= len(a.train_cases) < 6
    c = DiagTrainer(_options(multiview, task="diag", label_fraction=0.5))
    c.configure_data()
    assert a.keep_labels <= c.keep_labels
    splits = json.loads((Path(os.environ["ORTHO_preprocessed"]) / multiview / "splits_final.json").read_text(encoding="utf-8"))
    assert len(splits) == 5 and sorted(sum((s["val"] for s in splits), [])) == [f"case{i:03d}" for i in range(12)]


def test_missing_view_at_inference(multiview):
    from orthonet.inference.predict_core import LoadedModel, diagnosis_logits
    from orthonet.training.trainers import DiagTrainer
    trainer = DiagTrainer(_options(multiview, task="diag"))
    trainer.setup()
    trainer.model.eval()
    loaded = LoadedModel(trainer.model, trainer.model_cfg, trainer.plans, trainer.output_dir, trainer.device)
    case = trainer.val_cases[0]
    data = {v: trainer.store.open(case, v, with_seg=False).data[:] for v in trainer.model_cfg.views}
    full = diagnosis_logits(loaded, data)
    partial = diagnosis_logits(loaded, {k: v for k, v in data.items() if k != "coronal"})
    only_one = diagnosis_logits(loaded, {"axial": data["axial"]})
    assert full.shape == partial.shape == only_one.shape == (2,)
    assert np.all(np.isfinite(partial)) and np.all(np.isfinite(only_one))
    assert not np.allclose(full, partial)


def test_ignore_label_is_excluded(env):
    """Half of each label map is marked 'ignore': the network never sees that value as a class (CE would fail on
    it) and training still learns from the annotated half."""
    root = write_tiny_dataset(env / "raw" / "Dataset953_Sparse", n_train=6, n_test=0, views=["sagittal"])
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["labels"]["ignore"] = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    for f in (root / "labelsTr").glob("*.nii.gz"):
        img = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(img)
        arr[: arr.shape[0] // 2] = 3
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(f))
    _plan(953)
    from orthonet.training.trainers import SegTrainer
    trainer = SegTrainer(_options("Dataset953_Sparse", task="seg", epochs=1, iterations_per_epoch=3))
    summary = trainer.run()
    assert trainer.model_cfg.num_classes == 3
    assert trainer.loss_fn.loss.ignore_label == 3
    assert np.isfinite(summary["segmentation"]["mean_dice"])


def test_resume_after_kill(multiview):
    """Kill a training run mid-way (SIGKILL), resume with --c, and finish with every epoch logged once."""
    cmd = [sys.executable, "-m", "orthonet.training.cli", multiview, "3d_fullres", "1", "--task", "seg",
           "--epochs", "4", "--iterations-per-epoch", "3", "--val-iterations", "1", "--num-workers", "0",
           "--device", "cpu", "--no-final-validation"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = Path(os.environ["ORTHO_results"]) / multiview / "SegTrainer__orthoPlans__3d_fullres" / "fold_1"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    progress = out / "progress.json"
    try:
        while time.time() < deadline:
            if progress.is_file() and len(json.loads(progress.read_text(encoding="utf-8"))["epochs"]) >= 2:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "checkpoint_final.pt").exists()
    done_before = len(json.loads(progress.read_text(encoding="utf-8"))["epochs"])
    assert 2 <= done_before < 4
    resumed = subprocess.run(cmd + ["--c"], cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    import re
    resumed_at = re.findall(r"resumed from checkpoint_latest.pt at epoch (\d+)", (out / "log.txt").read_text(encoding="utf-8"))
    assert len(resumed_at) == 1 and done_before <= int(resumed_at[0]) < 4, resumed_at
    epochs = [r["epoch"] for r in json.loads(progress.read_text(encoding="utf-8"))["epochs"]]
    assert epochs == [0, 1, 2, 3]
    ckpt = torch.load(out / "checkpoint_final.pt", weights_only=True)
    assert ckpt["step"] == 4 * 3


def test_fuse_views_segmentation(multiview):
    """--fuse-views: other views' crops are centred on the segmentation patch in physical space, the cross-view
    bottleneck is trained, and full-volume validation predicts through the same path."""
    from orthonet.training.trainers import SegTrainer
    trainer = SegTrainer(_options(multiview, task="seg", fuse_views=True, epochs=1, iterations_per_epoch=2))
    trainer.setup()
    assert trainer.model.cross_view is not None and set(trainer.model_cfg.views) == {"sagittal", "coronal", "axial"}
    batch = next(trainer._seg_loader(trainer.train_cases, True, 0))
    for view in ("coronal", "axial"):
        patch = batch["context"][view].shape[2:]
        for b in range(batch["data"].shape[0]):
            centre = lambda a, shape: (a.numpy() @ np.array([(s - 1) / 2 for s in shape] + [1.0]))[:3]
            seg_c = centre(batch["affines"]["sagittal"][b], batch["data"].shape[2:])
            other_c = centre(batch["affines"][view][b], patch)
            assert np.linalg.norm(seg_c - other_c) < 4.0, (view, seg_c, other_c)   # within one voxel (3-6 mm)
    before = trainer.model.cross_view.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    summary = trainer.run()
    after = trainer.model.cross_view.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(summary["segmentation"]["mean_dice"])


def test_ddp_two_processes_on_cpu(multiview):
    """ortho_train runs unchanged under torchrun (gloo on CPU): both ranks train, rank 0 writes the results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           "-m", "orthonet.training.cli", multiview, "3d_fullres", "2", "--task", "seg", "--epochs", "1",
           "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "0", "--device", "cpu",
           "--no-final-validation"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = Path(os.environ["ORTHO_results"]) / multiview / "SegTrainer__orthoPlans__3d_fullres" / "fold_2"
    assert (out / "checkpoint_final.pt").is_file()
    assert json.loads((out / "run_config.json").read_text(encoding="utf-8"))["world_size"] == 2


def test_validation_only_and_loss_weights(multiview):
    """--val reruns only the final validation from the trained weights (same numbers, no training);
    --loss-weights reaches the multitask trainer."""
    from orthonet.training.cli import train_main
    base = [multiview, "3d_fullres", "3", "--task", "multitask", "--epochs", "1", "--iterations-per-epoch", "2",
            "--val-iterations", "1", "--num-workers", "0", "--device", "cpu", "--loss-weights", "0.5", "2"]
    assert train_main(base) == 0
    out = Path(os.environ["ORTHO_results"]) / multiview / "MultitaskTrainer__orthoPlans__3d_fullres" / "fold_3"
    first = json.loads((out / "validation" / "summary.json").read_text(encoding="utf-8"))
    stamp = (out / "checkpoint_final.pt").stat().st_mtime_ns
    (out / "validation" / "summary.json").unlink()
    assert train_main(base + ["--val"]) == 0
    again = json.loads((out / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert (out / "checkpoint_final.pt").stat().st_mtime_ns == stamp
    assert again["segmentation"]["dice"] == first["segmentation"]["dice"]
    assert again["diagnosis"]["auc"] == first["diagnosis"]["auc"]
    from orthonet.training.options import TrainOptions
    from orthonet.training.trainers import MultitaskTrainer
    t = MultitaskTrainer(TrainOptions(multiview, "3d_fullres", 3, loss_weights=(0.5, 2.0), device="cpu"))
    assert (t.seg_loss_weight, t.diag_loss_weight) == (0.5, 2.0)


def test_diffusion_features_trainer_keeps_pretrained_encoders_frozen_and_resumes(multiview, tmp_path):
    """-tr MultitaskTrainerDiffusionFeatures: pretrained encoders load and never change, the pyramid and diagnosis
    heads train, final validation segments through the pyramid head, and --c rebuilds the same optimizer."""
    from orthonet.training.trainers import get_trainer_class
    folder = tmp_path / "Pretrain__orthoPlans__3d_fullres"
    expected = _write_pretrained(multiview, folder)
    cls = get_trainer_class("MultitaskTrainerDiffusionFeatures", "multitask")
    trainer = cls(_options(multiview, task="multitask", fold=2, pretrained=str(folder), epochs=2))
    summary = trainer.run()
    model = trainer.model
    assert model.decoder is None and model.pyramid is not None
    assert sorted(trainer.frozen_views) == sorted(expected)
    for view, enc in expected.items():
        state = model.encoders[view].state_dict()
        for k, v in enc.items():
            assert torch.equal(state[k[len("encoder."):]].cpu(), v), (view, k)      # untouched by training
    assert all(not p.requires_grad for p in model.encoders.parameters())
    trained = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert trained and all(p.requires_grad for p in trained)
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"new"}
    assert set(summary["segmentation"]["dice"]) == {"bone", "cartilage"} and "diagnosis" in summary
    config = json.loads((trainer.output_dir / "run_config.json").read_text(encoding="utf-8"))
    assert config["model_config"]["seg_head"] == "pyramid"
    assert sorted(config["pretrained"]["frozen_encoders"]) == sorted(expected)
    # resume (as after a kill): the encoders are frozen again from the checkpoint, so the optimizer state fits
    resumed = cls(_options(multiview, task="multitask", fold=2, pretrained=str(folder), epochs=3,
                           continue_training=True, final_validation=False))
    resumed.run()
    assert sorted(resumed.frozen_views) == sorted(expected)
    ckpt = torch.load(resumed.output_dir / "checkpoint_final.pt", weights_only=True)
    assert ckpt["step"] == 3 * 2 and ckpt["extra"]["frozen_encoders"] == sorted(expected)


def test_pyramid_head_segmentation_learns_from_scratch(single_view):
    """Without pretrained weights nothing is frozen and the pyramid-head network learns end to end."""
    from orthonet.training.trainers import SegTrainerDiffusionFeatures
    trainer = SegTrainerDiffusionFeatures(_options(single_view, task="seg", epochs=4, iterations_per_epoch=10,
                                                   val_iterations=2, pretrained="none"))
    summary = trainer.run()
    assert trainer.frozen_views == []
    dice = summary["segmentation"]["dice"]
    # measured 0.8-0.9 (bone) after 40 iterations; an untrained network is near 0.1
    assert dice["bone"] > 0.6, dice


def test_pyramid_trainer_fine_tunes_the_pretrained_encoder(single_view, tmp_path):
    """-tr SegTrainerPyramid: the encoder loads from the denoiser (tensors compared), no decoder is loaded or built,
    and the encoder is fine-tuned at the lower warm-up LR, not frozen."""
    from orthonet.training.trainers import SegTrainerPyramid
    folder = tmp_path / "Pretrain__orthoPlans__3d_fullres"
    expected = _write_pretrained(single_view, folder)["sagittal"]
    trainer = SegTrainerPyramid(_options(single_view, task="seg", fold=3, pretrained=str(folder),
                                         final_validation=False))
    trainer.setup()
    state = trainer.model.encoders["sagittal"].state_dict()
    assert all(torch.equal(state[k[len("encoder."):]].cpu(), v) for k, v in expected.items())
    assert trainer.model.decoder is None and "decoder_tensors" not in trainer.pretrained_report["views"]["sagittal"]
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["pretrained"] < groups["new"] and trainer.frozen_views == []
    trainer.train_epochs()
    state = trainer.model.encoders["sagittal"].state_dict()
    assert not all(torch.equal(state[k[len("encoder."):]].cpu(), v) for k, v in expected.items())


def test_whole_exam_diagnosis_is_the_default_and_the_centre_crop_model_stays_available(multiview):
    """The trainer's batches carry every view's whole volume (stride-padded, with the unpadded sizes), the model
    description says 'whole', and prediction reads whole volumes; ``--diagnosis-input crop`` still trains the old
    centre-crop model (what old checkpoints are)."""
    from orthonet.inference.predict_core import LoadedModel, diagnosis_logits
    from orthonet.networks.whole_exam import total_stride
    from orthonet.networks.build import network_spec
    from orthonet.training.trainers import DiagTrainer, MultitaskTrainer
    from orthonet.training.model_factory import ModelConfig, build_model
    trainer = DiagTrainer(_options(multiview, task="diag", fusion="gating", feature_t={"*": 100},
                                   diagnosis_coarsen_levels=[-3]))
    trainer.setup()
    assert trainer.model_cfg.diagnosis_input == "whole" and trainer.model.checkpoint_encoders == "auto"
    assert trainer.model_cfg.coarsen_levels == [-3]                      # recorded, so prediction rebuilds it
    rebuilt = build_model(trainer.plans, ModelConfig.from_dict(trainer.model_cfg.to_dict()))
    assert rebuilt.coarsened == trainer.model.coarsened and all(rebuilt.coarsened.values())
    assert trainer.model_cfg.fusion == "gating" and set(trainer.model_cfg.feature_t) == set(trainer.model_cfg.views)
    batch = next(iter(trainer.build_train_loader()))
    assert batch["data"] == {} and set(batch["whole"]) == set(trainer.model_cfg.views)
    for v, x in batch["whole"].items():
        shapes = batch["whole_shape"][v]
        stride = total_stride(network_spec(trainer.plans, v, "3d_fullres"))
        assert all(int(n) % s == 0 for n, s in zip(x.shape[2:], stride))
        for i, case in enumerate(batch["keys"]):
            assert list(shapes[i]) == list(trainer.store.open(case, v, with_seg=False).shape)
    stats = trainer.train_step(trainer.to_device(batch))
    assert np.isfinite(stats["loss"])
    trainer.model.eval()
    loaded = LoadedModel(trainer.model, trainer.model_cfg, trainer.plans, trainer.output_dir, trainer.device)
    case = trainer.val_cases[0]
    data = {v: trainer.store.open(case, v, with_seg=False).data[:] for v in trainer.model_cfg.views}
    assert np.array_equal(diagnosis_logits(loaded, data), diagnosis_logits(loaded, data))   # seeded noise
    edge = {k: v.copy() for k, v in data.items()}
    edge["sagittal"][:, :2, :6, :6] += 5.0                                 # a bright corner, far from the centre
    assert not np.allclose(diagnosis_logits(loaded, edge), diagnosis_logits(loaded, data))
    mt = MultitaskTrainer(_options(multiview, task="multitask"))
    mt.setup()
    batch = next(iter(mt.build_train_loader()))
    assert set(batch["data"]) == {mt.segmentation_view} and set(batch["whole"]) == set(mt.model_cfg.views)
    assert np.isfinite(mt.train_step(mt.to_device(batch))["loss"])
    old = DiagTrainer(_options(multiview, task="diag", diagnosis_input="crop"))
    old.setup()
    assert old.model_cfg.diagnosis_input == "crop" and not old.model.whole_exam


def test_compile_option_trains_through_torch_compile_and_saves_plain_weights(single_view, monkeypatch):
    """``ortho_train --compile``: the step runs through the torch.compile wrapper (the eager backend keeps this
    test free of a C++ toolchain), the same parameters are optimised, and the checkpoint keys are the plain model's
    (no ``_orig_mod.`` prefix), so prediction and fine-tuning load them as always."""
    from orthonet.training.trainers import SegTrainer
    monkeypatch.setenv("ORTHO_COMPILE_BACKEND", "eager")
    trainer = SegTrainer(_options(single_view, task="seg", fold=1, compile=True))
    trainer.run()
    assert type(trainer.network).__name__ == "OptimizedModule" and trainer.network._orig_mod is trainer.model
    assert "torch.compile (backend eager)" in (trainer.output_dir / "log.txt").read_text(encoding="utf-8")
    ckpt = torch.load(trainer.output_dir / "checkpoint_final.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert json.loads((trainer.output_dir / "run_config.json").read_text(encoding="utf-8"))["options"]["compile"]


def test_default_trainer_is_the_pyramid_head_when_pretrained_encoders_load(multiview, tmp_path, capsys):
    """Without -tr, ``ortho_train`` picks the head the label-efficiency benchmark shows profiting from pretraining
    (the pyramid) when encoders will be loaded, and the nnU-Net-style U-Net otherwise; it says which and why."""
    from orthonet.training.cli import default_trainer
    folder = tmp_path / "Pretrain__orthoPlans__3d_fullres"
    _write_pretrained(multiview, folder)
    name, why = default_trainer("multitask", multiview, "3d_fullres", "orthoPlans", str(folder))
    assert name == "MultitaskTrainerPyramid" and "pretrained encoders" in why and str(folder.name) in why
    assert default_trainer("seg", multiview, "3d_fullres", "orthoPlans", str(folder))[0] == "SegTrainerPyramid"
    assert default_trainer("diag", multiview, "3d_fullres", "orthoPlans", str(folder))[0] == "DiagTrainer"
    assert default_trainer("multitask", multiview, "3d_fullres", "orthoPlans", "none") == (
        "MultitaskTrainer", "the default without pretrained encoders (--pretrained none)")
    name, why = default_trainer("seg", multiview, "3d_fullres", "orthoPlans", "auto")   # nothing pretrained here
    assert name == "SegTrainer" and "none found" in why


def test_default_trainer_looks_only_at_the_encoders_the_task_loads(multiview, tmp_path):
    """A seg model reads the segmentation view alone: encoders for the other views do not make the pyramid head the
    default (nothing would load into it), while multitask (all views) and ``--fuse-views`` seg do take them."""
    import shutil
    from orthonet.errors import OrthoError
    from orthonet.fileio import load_json
    from orthonet.paths import preprocessed_root
    from orthonet.training.cli import default_trainer
    folder = tmp_path / "Pretrain__orthoPlans__3d_fullres"
    _write_pretrained(multiview, folder)
    plans = load_json(preprocessed_root() / multiview / "orthoPlans.json")
    seg_view = plans.get("segmentation_view") or "sagittal"
    shutil.rmtree(folder / seg_view)
    with pytest.raises(OrthoError, match="no pretrained encoders"):
        default_trainer("seg", multiview, "3d_fullres", "orthoPlans", str(folder))
    assert default_trainer("seg", multiview, "3d_fullres", "orthoPlans", str(folder), fuse_views=True)[0] == \
        "SegTrainerPyramid"
    assert default_trainer("multitask", multiview, "3d_fullres", "orthoPlans", str(folder))[0] == \
        "MultitaskTrainerPyramid"


@pytest.mark.parametrize("task", ["seg", "multitask"])
def test_training_step_reads_the_device_once_and_stops_on_a_nan_before_the_update(multiview, task, monkeypatch):
    """One device-to-host read per training step (loss, parts and gradient norm together), the rest of the step
    (losses, the auxiliary per-view loss of incomplete exams) free of Python branches on tensors; a NaN loss raises
    a clear error and leaves the weights as they were."""
    from orthonet.errors import OrthoError
    from orthonet.training.trainers import MultitaskTrainer, SegTrainer
    trainer = (SegTrainer if task == "seg" else MultitaskTrainer)(_options(multiview, task=task, fold=1))
    trainer.setup()
    batch = trainer.to_device(next(iter(trainer.build_train_loader())))
    if task == "multitask":                                  # an incomplete exam: the aux loss must mask, not index
        first = next(iter(batch["present"]))
        batch["present"][first] = torch.zeros_like(batch["present"][first])
    host = list((batch.get("whole_shape") or {}).values())          # exam sizes: kept on the host by to_device
    assert all(t.device.type == "cpu" for t in host)
    import orthonet.training.trainers.base as base
    guard, reads, real_host_values = HostReadGuard(host), [], base.host_values

    def counted(values):                                     # the step's one allowed read, counted
        reads.append(1)
        with guard.allowing():
            return real_host_values(values)
    monkeypatch.setattr(base, "host_values", counted)
    with guard:
        stats = trainer.train_step(batch)
    assert len(reads) == 1 and np.isfinite(stats["loss"]) and all(isinstance(v, float) for v in stats.values())
    if task == "multitask":
        assert {"seg_loss", "bce", "aux_bce"} <= set(stats)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    nan = lambda x: torch.full_like(x, float("nan"))                     # noqa: E731
    batch["data"] = ({v: nan(x) for v, x in batch["data"].items()} if isinstance(batch["data"], dict)
                     else nan(batch["data"]))
    with pytest.raises(OrthoError, match="training loss became nan"):
        trainer.train_step(batch)
    after = trainer.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_aux_view_loss_is_each_views_bce_on_its_own_exams(multiview):
    """The masked auxiliary loss equals the old indexed one: each view's BCE over the exams that have it, averaged
    over the views present in the batch (an absent view adds a graph-connected zero and does not count)."""
    from orthonet.training.trainers import DiagTrainer
    from orthonet.training.losses import MaskedBCEWithLogitsLoss
    trainer = DiagTrainer(_options(multiview, task="diag", fold=1))
    trainer.bce = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 1.0]))
    torch.manual_seed(0)
    target = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0]])
    logits = {"a": torch.randn(3, 2, requires_grad=True), "b": torch.randn(3, 2, requires_grad=True),
              "c": torch.randn(3, 2, requires_grad=True)}
    present = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, True, True]),
               "c": torch.tensor([False, False, False])}
    loss = trainer.aux_view_loss({"diagnosis": target, "present": present}, {"view_logits": logits},
                                 torch.tensor(0.0))
    expected = (trainer.bce(logits["a"][present["a"]], target[present["a"]]) + trainer.bce(logits["b"], target)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert logits["c"].grad is not None and torch.count_nonzero(logits["c"].grad) == 0
    assert torch.count_nonzero(logits["a"].grad[1]) == 0               # the exam without view a does not count
