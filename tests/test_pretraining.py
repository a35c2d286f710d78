"""Diffusion pretraining (``ortho_pretrain``), sampling (``ortho_sample``) and the feature API, on tiny data.

The data go through the real ``ortho_plan_and_preprocess`` code path (tests/builders.py datasets). Training tests use
a hand-edited copy of the plans with a narrower network (``tinyPlans``: features 8..64), which is what a user who
edits plans.json gets; the shape test builds the denoiser of every planned configuration as planned.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from orthonet.diffusion import extract_features
from orthonet.errors import OrthoError
from orthonet.networks import (DiffusionUNet, MultiTaskModel, MultiViewDiagnosisModel, SegmentationModel,
                               build_encoder, load_pretrained_encoder)
from orthonet.planners.plans import load_plans, save_plans
from tests.builders import write_tiny_dataset
from tests.test_planning import write_oblique_aniso_dataset
from orthonet.training.checkpoint import load_checkpoint
from orthonet.training.pretrain_cli import pretrain_main, sample_main
from orthonet.training.pretrained import load_encoder_file, pretrain_view_dir
from orthonet.training.sampling_output import untranspose, view_spacing_3d
from orthonet.training.trainers.pretrainer import (DiffusionPretrainer, PretrainedFeatures, PretrainSettings,
                                                   load_denoiser_checkpoint, load_pretrained_denoiser, loss_drop,
                                                   weights_digest)

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
DS, DS_NAME = "981", "Dataset981_PretrainTiny"
ANISO, ANISO_NAME = "982", "Dataset982_PretrainAniso"
TINY = "tinyPlans"
TINY_FEATURES = [8, 16, 32, 64]


def _preprocess(argv) -> None:
    from orthonet.planners.cli import main
    assert main(list(argv) + ["-np", "1", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """raw / preprocessed / results roots with two preprocessed datasets; ORTHO_* point at them for the module."""
    root = tmp_path_factory.mktemp("pretrain")
    mp = pytest.MonkeyPatch()
    for kind in ("raw", "preprocessed", "results"):
        mp.setenv(f"ORTHO_{kind}", str(root / kind))
    write_tiny_dataset(root / "raw" / DS_NAME, n_train=4, n_test=2, n_unlabeled=2, seed=3)
    _preprocess(["-d", DS])
    pre = root / "preprocessed" / DS_NAME
    plans = load_plans(pre)
    tiny = copy.deepcopy(plans)
    tiny["plans_name"] = TINY
    for vp in tiny["views"].values():
        vp["configurations"]["3d_fullres"]["network"]["kwargs"]["features_per_stage"] = TINY_FEATURES
    save_plans(tiny, pre)
    # oblique, anisotropic, thick axis on a different numpy axis per view: 2d is planned, transposes are non-trivial
    write_oblique_aniso_dataset(root / "raw" / ANISO_NAME, n_train=3, n_unlabeled=1)
    _preprocess(["-d", ANISO, "-c", "2d"])
    yield {"root": root, "pre": pre, "plans": plans, "tiny": tiny,
           "aniso_pre": root / "preprocessed" / ANISO_NAME}
    mp.undo()


@pytest.fixture(scope="module")
def trained(env):
    """``ortho_pretrain 981 3d_fullres -v sagittal`` for 40 steps (the CLI, in-process)."""
    argv = [DS, "3d_fullres", "-v", "sagittal", "--steps", "40", "--save-every", "20", "--lr", "3e-3",
            "--num-workers", "0", "--device", "cpu", "-p", TINY, "--no-progress"]
    assert pretrain_main(argv) == 0
    return pretrain_view_dir(DS_NAME, TINY, "3d_fullres", "sagittal")


# ------------------------------------------------------------------------------------------------------------
# the denoiser of every planned configuration
# ------------------------------------------------------------------------------------------------------------
def test_denoiser_forward_backward_for_every_planned_configuration(env):
    aniso = load_plans(env["aniso_pre"])
    seen = set()
    for plans in (env["plans"], aniso):
        for view, vp in plans["views"].items():
            for config, cfg in vp["configurations"].items():
                seen.add(config)
                model = DiffusionUNet(cfg["network"], vp["num_input_channels"])
                x = torch.randn(2, vp["num_input_channels"], *cfg["patch_size"])
                out = model(x, torch.tensor([3, 700]))
                assert out.shape == x.shape, (view, config)
                out.square().mean().backward()
                trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                assert all(p.grad is not None for _, p in trainable), (view, config)
                film = [p.grad.abs().sum().item() for n, p in trainable if n.startswith("time_proj.")]
                assert film and all(g > 0 for g in film), "every FiLM projection must receive a gradient"
    assert {"3d_fullres", "2d"} <= seen


# ------------------------------------------------------------------------------------------------------------
# training: data, loss, files
# ------------------------------------------------------------------------------------------------------------
def test_pretraining_uses_tr_and_unlabeled_images_only(env):
    trainer = DiffusionPretrainer(env["tiny"], "3d_fullres", "coronal", env["pre"], env["root"] / "unused",
                                  PretrainSettings(steps=1, num_workers=0))
    trainer.setup()
    assert trainer.cases == ["case000", "case001", "case002", "case003", "unl000", "unl001"]
    assert not any(c.startswith("test") for c in trainer.cases)


def test_training_loss_falls_and_files_are_written(trained):
    ckpt = load_checkpoint(trained / "checkpoint_final.pt")
    assert ckpt["step"] == 40
    history = ckpt["extra"]["loss_history"].tolist()
    assert len(history) == 40
    first, last = loss_drop(history, 10)
    # measured over 5 seeds: first 10 ~0.8-1.1, last 10 ~0.24-0.40 (ratio 0.23-0.38; lr 3e-3, features 8..64).
    # Predicting zero noise scores 1.0, so the last steps must also beat that trivial denoiser, not merely undo the
    # random output scale of the initial network.
    assert last < 0.7 * first, (first, last)
    assert last < 0.85, last
    for name in ("encoder.pt", "loss.png", "log.txt"):
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0, name
    assert not (trained / "checkpoint_latest.pt").exists(), "latest is removed once the final checkpoint exists"
    log = (trained / "log.txt").read_text(encoding="utf-8")
    assert "6 cases (imagesTr + imagesUnlabeled)" in log and "patches/s" in log
    for f in ("checkpoint_final.pt", "encoder.pt"):
        torch.load(trained / f, weights_only=True)  # loadable by strangers


# ------------------------------------------------------------------------------------------------------------
# encoder.pt -> downstream networks
# ------------------------------------------------------------------------------------------------------------
def test_encoder_loads_into_downstream_networks_and_computes_the_denoiser_at_t(env, trained):
    payload = load_encoder_file(trained / "encoder.pt")
    assert payload["view"] == "sagittal" and payload["plans_name"] == TINY and payload["feature_timestep"] == 100
    plans = env["tiny"]
    specs = {v: vp["configurations"]["3d_fullres"]["network"] for v, vp in plans["views"].items()}
    assert payload["network"] == specs["sagittal"]
    channels = {v: vp["num_input_channels"] for v, vp in plans["views"].items()}
    sd = payload["encoder_state_dict"]
    models = {"segmentation": SegmentationModel(specs, channels, "sagittal", plans["num_classes"]),
              "diagnosis": MultiViewDiagnosisModel(specs, channels, len(plans["diagnoses"])),
              "multitask": MultiTaskModel(specs, channels, "sagittal", plans["num_classes"], len(plans["diagnoses"]))}
    for name, model in models.items():
        before = {k: v.clone() for k, v in model.encoders["coronal"].state_dict().items()} \
            if "coronal" in model.encoders else {}
        report = load_pretrained_encoder(model, sd, view="sagittal")
        assert report.complete and report.loaded, (name, report.summary())
        for k, v in model.encoders["sagittal"].state_dict().items():
            assert torch.equal(v, sd[f"encoder.{k}"]), (name, k)
        for k, v in before.items():  # other views untouched
            assert torch.equal(v, model.encoders["coronal"].state_dict()[k])
    # the folded encoder computes what the EMA denoiser computes at the feature timestep
    denoiser = load_pretrained_denoiser(DS, "3d_fullres", "sagittal", plans_name=TINY)
    encoder = build_encoder(specs["sagittal"], 1)
    assert load_pretrained_encoder(encoder, sd).complete
    x = torch.randn(1, 1, *plans["views"]["sagittal"]["configurations"]["3d_fullres"]["patch_size"])
    with torch.no_grad():
        plain = encoder.eval()(x)
        film = denoiser.forward_features(x, 100)["encoder"]
    for a, b in zip(plain, film):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_feature_api(trained):
    feats = PretrainedFeatures(DS, "3d_fullres", plans_name=TINY)
    volume = np.random.default_rng(0).normal(size=(1, 12, 32, 32)).astype(np.float32)
    f1 = feats(volume, "sagittal")
    assert [f.shape[0] for f in f1] == TINY_FEATURES[-3:]
    f2 = feats(volume, "sagittal")
    assert all(torch.equal(a, b) for a, b in zip(f1, f2)), "same volume, same features"
    multi = feats(volume, "sagittal", t=[50, 150], levels=[-1])
    assert len(multi) == 1 and multi[0].shape[0] == 2 * TINY_FEATURES[-1]
    direct = extract_features(load_pretrained_denoiser(DS, "3d_fullres", "sagittal", plans_name=TINY),
                              torch.from_numpy(volume), t=100)
    assert all(torch.equal(a, b) for a, b in zip(f1, direct))


# ------------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


class _KilledAt(DiffusionPretrainer):
    """Dies right after ``kill_at`` steps (after the checkpoint of that step was written), like a killed job."""

    kill_at = 6

    def on_step_end(self, step, loss):
        if step == self.kill_at:
            raise _Killed()


class _Recorder(DiffusionPretrainer):
    """Keeps a copy of the optimizer state at step 6 of an uninterrupted run."""

    def on_step_end(self, step, loss):
        if step == 6:
            self.state_at_6 = copy.deepcopy(self.optimizer.state_dict())


def _flat_optimizer_tensors(state):
    return [(f"{pid}/{k}", v) for pid, s in sorted(state["state"].items()) for k, v in sorted(s.items())]


def test_resume_continues_at_the_right_step_and_matches_an_uninterrupted_run(env):
    settings = PretrainSettings(steps=12, save_every=6, lr=3e-3, num_workers=0, seed=7, progress=False)
    args = (env["tiny"], "3d_fullres", "axial", env["pre"])
    straight = _Recorder(*args, env["root"] / "straight", settings)
    straight.run()
    killed = _KilledAt(*args, env["root"] / "killed", settings)
    with pytest.raises(_Killed):
        killed.run()
    latest = env["root"] / "killed" / "checkpoint_latest.pt"
    assert load_checkpoint(latest)["step"] == 6
    resumed = DiffusionPretrainer(*args, env["root"] / "killed", settings)
    resumed.setup()
    resumed.resume(latest)
    assert resumed.step == 6 and len(resumed.loss_history) == 6
    assert resumed.lr_scheduler.last_epoch == 6
    got, want = _flat_optimizer_tensors(resumed.optimizer.state_dict()), _flat_optimizer_tensors(straight.state_at_6)
    assert [k for k, _ in got] == [k for k, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    # the real thing: ``--c`` continues from the latest checkpoint to the end
    again = DiffusionPretrainer(*args, env["root"] / "killed", settings)
    again.run(resume=True)
    assert again.step == 12
    assert again.loss_history == straight.loss_history
    # bit-identical on CPU: same batches and noise per segment (re-seeded from (seed, rank, step)), same RNG states
    assert weights_digest(again.model) == weights_digest(straight.model)
    ema_a, ema_b = again.ema.state_dict()["shadow"], straight.ema.state_dict()["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_b)


def test_resume_refuses_a_checkpoint_of_another_network(env, trained):
    plans = copy.deepcopy(env["tiny"])
    plans["views"]["sagittal"]["configurations"]["3d_fullres"]["network"]["kwargs"]["features_per_stage"] = \
        [8, 16, 32, 48]
    trainer = DiffusionPretrainer(plans, "3d_fullres", "sagittal", env["pre"], trained,
                                  PretrainSettings(steps=2, num_workers=0, progress=False))
    trainer.setup()
    with pytest.raises(OrthoError, match="network_hash"):
        trainer.resume(trained / "checkpoint_final.pt")


# ------------------------------------------------------------------------------------------------------------
# torchrun / DDP (gloo on CPU)
# ------------------------------------------------------------------------------------------------------------
def test_two_process_gloo_ddp_run_completes_and_ranks_agree(env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "orthonet.training.pretrain_cli", DS, "3d_fullres", "-v", "coronal", "--steps", "4",
           "--save-every", "2", "--num-workers", "0", "--device", "cpu", "-p", TINY, "--prediction-type", "v", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = pretrain_view_dir(DS_NAME, TINY, "3d_fullres", "coronal")
    ckpt = load_checkpoint(folder / "checkpoint_final.pt")
    report = ckpt["extra"]["rank_report"]
    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["ranks"][0]["weights"] == report["ranks"][1]["weights"], "ranks must agree on the weights"
    assert report["ranks"][0]["first_batch"] != report["ranks"][1]["first_batch"], "ranks must see different data"
    assert ckpt["step"] == 4 and ckpt["extra"]["prediction_type"] == "v"
    assert ckpt["extra"]["lr"] == pytest.approx(PretrainSettings().lr * 2 ** 0.5)  # sqrt rule
    assert load_encoder_file(folder / "encoder.pt")["prediction_type"] == "v"


# ------------------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------------------
def test_untranspose_restores_the_original_axis_order():
    original = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    spacing = [4.0, 0.5, 0.7]
    fwd, back = [2, 0, 1], [1, 2, 0]
    arr, sp = untranspose(original.transpose(fwd), [spacing[a] for a in fwd], back)
    assert np.array_equal(arr, original) and sp == spacing


def test_sample_writes_nifti_and_png(env, trained, tmp_path):
    def argv(out):
        return [DS, "3d_fullres", "-v", "sagittal", "-n", "2", "-o", str(out), "--steps", "4", "--seed", "1",
                "--device", "cpu", "-p", TINY, "--no-progress"]

    out = tmp_path / "samples"
    assert sample_main(argv(out)) == 0
    files = sorted(out.glob("*.nii.gz"))
    assert [f.name for f in files] == ["sample_000_sagittal_0000.nii.gz", "sample_001_sagittal_0000.nii.gz"]
    img = sitk.ReadImage(str(files[0]))
    cfg = env["tiny"]["views"]["sagittal"]["configurations"]["3d_fullres"]
    assert img.GetSize() == tuple(cfg["patch_size"][::-1])
    assert np.allclose(img.GetSpacing(), cfg["spacing"][::-1])
    png = out / "samples_sagittal.png"
    assert png.is_file() and png.stat().st_size > 1000
    first = sitk.GetArrayFromImage(img)
    assert np.isfinite(first).all() and first.std() > 0
    assert sample_main(argv(tmp_path / "again")) == 0  # same seed, same samples
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again" / files[0].name))), first)


def test_2d_configuration_pretrains_and_samples_in_the_original_orientation(env, tmp_path):
    argv = [ANISO, "2d", "-v", "axial", "--steps", "3", "--save-every", "2", "--num-workers", "0", "--device",
            "cpu", "--no-progress"]
    assert pretrain_main(argv) == 0
    bundle = load_denoiser_checkpoint(pretrain_view_dir(ANISO_NAME, "orthoPlans", "2d", "axial")
                                      / "checkpoint_final.pt")
    assert bundle.step == 3 and bundle.model.spec["kwargs"]["conv_op"].endswith("Conv2d")
    out = tmp_path / "s2d"
    assert sample_main([ANISO, "2d", "-v", "axial", "-n", "1", "-o", str(out), "--steps", "2", "--device", "cpu",
                        "--no-progress"]) == 0
    img = sitk.ReadImage(str(out / "sample_000_axial_0000.nii.gz"))
    plans = load_plans(env["aniso_pre"])
    vp = plans["views"]["axial"]
    patch = [1] + list(vp["configurations"]["2d"]["patch_size"])
    back = vp["transpose_backward"]
    assert back != [0, 1, 2], "the anisotropic axial view is stored with its thick axis elsewhere"
    spacing = view_spacing_3d(plans, "axial", "2d")
    assert img.GetSize() == tuple(patch[b] for b in back)[::-1]
    assert np.allclose(img.GetSpacing(), [spacing[b] for b in back][::-1])
    case_dir = np.asarray(load_json_props(env["aniso_pre"], "orthoPlans_2d", "k000", "axial"))
    assert np.allclose(img.GetDirection(), case_dir), "samples carry the direction of a real case of the view"


def load_json_props(pre: Path, ident: str, case: str, view: str):
    from orthonet.fileio import load_json
    return load_json(pre / ident / f"{case}_{view}.json")["original_geometry"]["direction"]


def test_bad_view_is_a_clear_error(env):
    with pytest.raises(OrthoError, match="view"):
        pretrain_main([DS, "3d_fullres", "-v", "oblique", "--steps", "1", "--device", "cpu", "-p", TINY])


def test_pretraining_on_a_smaller_patch_loads_into_the_planned_network(env, tmp_path):
    """``--patch-size`` pretrains on smaller patches (the CPU lever); the encoder keeps the planned topology, so it
    loads into the task model; a patch that does not fit the strides is a clear error naming a fitting one."""
    plans = env["tiny"]
    cfg = plans["views"]["sagittal"]["configurations"]["3d_fullres"]
    from orthonet.networks.whole_exam import total_stride
    stride = total_stride(cfg["network"])
    small = [max(s, p // 2 // s * s) for p, s in zip(cfg["patch_size"], stride)]
    assert small != list(cfg["patch_size"])
    out = tmp_path / "small"
    seen = []

    class Spy(DiffusionPretrainer):
        def compute_loss(self, model, x0, generator):
            seen.append(tuple(x0.shape[2:]))
            return super().compute_loss(model, x0, generator)

    settings = PretrainSettings(steps=2, num_workers=0, progress=False, patch_size=small, save_every=2)
    trainer = Spy(plans, "3d_fullres", "sagittal", env["pre"], out, settings)
    trainer.run()
    assert seen and set(seen) == {tuple(small)}
    payload = load_encoder_file(out / "encoder.pt")
    model = SegmentationModel({"sagittal": cfg["network"]}, {"sagittal": 1}, "sagittal", 3)
    report = load_pretrained_encoder(model, payload["encoder_state_dict"], view="sagittal")
    assert report.loaded and not report.missing and not report.shape_mismatch
    bad = [p + 1 for p in small]
    with pytest.raises(OrthoError, match=r"multiple of the network's total stride") as err:
        DiffusionPretrainer(plans, "3d_fullres", "sagittal", env["pre"], tmp_path / "bad",
                            PretrainSettings(steps=1, num_workers=0, progress=False, patch_size=bad)).run()
    assert "--patch-size" in str(err.value)
