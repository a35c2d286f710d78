"""Training utilities: splits, losses, schedules, checkpoints, progress log, distributed helpers, metrics.

Every expected value below is worked out by hand in the comment next to it.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from orthonet import metrics
from orthonet.errors import OrthoError
from orthonet.training import distributed as D
from orthonet.training.checkpoint import (apply_checkpoint, capture_rng_state, load_checkpoint, restore_rng_state,
                                          save_checkpoint)
from orthonet.training.losses import (DeepSupervisionLoss, DiceCELoss, MaskedBCEWithLogitsLoss, SoftDiceLoss,
                                      compute_pos_weight, deep_supervision_weights, diffusion_mse_loss)
from orthonet.training.progress import ProgressLogger, loss_curve_png, moving_average
from orthonet.training.schedules import (cosine_factor, cosine_warmup_schedule, load_scheduler_state, poly_factor,
                                         poly_schedule, split_param_groups, warmup_poly_schedule)
from orthonet.training.splits import get_fold, label_fraction_subset, load_or_create_splits, make_splits
from tests.host_reads import HostReadGuard

torch.set_num_threads(1)
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------------------
def _diagnoses(n=40, seed=0):
    """40 cases: label a positive in 10 (every 4th), label b in 5 (every 8th + 1), some unknown values."""
    d = {}
    for i in range(n):
        a = 1.0 if i % 4 == 0 else 0.0
        b = 1.0 if i % 8 == 1 else 0.0
        d[f"c{i:03d}"] = np.array([a, b])
    d["c002"][1] = np.nan
    d["c003"][:] = np.nan  # entirely unknown: still placed
    return d


def test_make_splits_deterministic_complete_and_stratified():
    diag = _diagnoses()
    cases = sorted(diag) + ["no_diag_case"]
    splits = make_splits(cases, diag, n_folds=5, seed=12345)
    assert splits == make_splits(list(reversed(cases)), diag, n_folds=5, seed=12345)
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(cases)  # every case validated exactly once
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == len(cases)
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    # 10 positives of a and 5 of b over 5 folds: exactly 2 and 1 per fold
    pos_a = [sum(diag[c][0] == 1 for c in s["val"] if c in diag) for s in splits]
    pos_b = [sum(diag[c][1] == 1 for c in s["val"] if c in diag) for s in splits]
    assert pos_a == [2] * 5 and pos_b == [1] * 5
    assert make_splits(cases, diag, seed=1) != splits  # the seed matters
    # without diagnoses: plain shuffled k-fold, still deterministic
    plain = make_splits(cases, None, n_folds=5)
    assert plain == make_splits(cases, None, n_folds=5) and sorted(len(s["val"]) for s in plain) == [8, 8, 8, 8, 9]


def test_make_splits_few_cases():
    with pytest.raises(OrthoError, match="3 training case.*5 folds"):
        make_splits(["a", "b", "c"], None, n_folds=5)
    diag = {f"x{i}": np.array([1.0 if i < 4 else 0.0]) for i in range(7)}
    splits = make_splits(diag, diag, n_folds=5)
    assert all(len(s["val"]) >= 1 for s in splits) and sum(len(s["val"]) for s in splits) == 7


def test_load_or_create_splits_stores_once_and_warns(tmp_path):
    diag = _diagnoses(20)
    first = load_or_create_splits(tmp_path, diag, diag)
    stored = json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8"))
    assert stored == first and len(first) == 5
    # a second call with other inputs reuses the file (users may edit it), warning about the differences
    with pytest.warns(UserWarning) as rec:
        again = load_or_create_splits(tmp_path, list(diag)[:19] + ["new_case"], None)
    messages = [str(w.message) for w in rec]
    assert any("no longer" in m and "c019" in m for m in messages)
    assert any("new_case" in m and "will not be used" in m for m in messages)
    gone = list(diag)[19]
    assert all(gone not in s["train"] + s["val"] for s in again)
    (tmp_path / "splits_final.json").write_text('{"train": []}')
    with pytest.raises(OrthoError, match="splits_final.json"):
        load_or_create_splits(tmp_path, diag, diag)


def test_get_fold_and_all():
    splits = make_splits([f"c{i}" for i in range(10)], None)
    tr, va = get_fold(splits, 2)
    assert (tr, va) == (splits[2]["train"], splits[2]["val"])
    tr, va = get_fold(splits, "all")
    assert tr == va == sorted(f"c{i}" for i in range(10))
    with pytest.raises(OrthoError, match="fold 7 does not exist"):
        get_fold(splits, 7)


def test_label_fraction_subsets_nested_stratified_deterministic():
    diag = _diagnoses(40)
    train = sorted(diag) + ["unlabelled_extra"]
    seg = {c for i, c in enumerate(sorted(diag)) if i % 2 == 0}
    subsets = {f: label_fraction_subset(train, f, diag, seg, seed=7) for f in (0.1, 0.2, 0.5, 1.0)}
    assert "c003" not in seg  # c003: no known diagnosis and no segmentation -> not a candidate
    n_candidates = 39
    assert [len(subsets[f]) for f in (0.1, 0.2, 0.5, 1.0)] == [4, 8, 20, n_candidates]
    assert set(subsets[0.1]) <= set(subsets[0.2]) <= set(subsets[0.5]) <= set(subsets[1.0])
    assert "unlabelled_extra" not in subsets[1.0] and "c003" not in subsets[1.0]
    assert subsets[0.2] == label_fraction_subset(list(reversed(train)), 0.2, diag, seg, seed=7)
    assert label_fraction_subset(train, 0.2, diag, seg, seed=8) != subsets[0.2]
    # stratified: 20 % of 39 candidates (8 cases) holds 2 of the 10 'a' positives, 1 of the 5 'b' positives and
    # 4 of the 20 segmentations (proportional targets 2.05, 1.03, 4.1)
    s = subsets[0.2]
    assert sum(diag[c][0] == 1 for c in s) == 2
    assert sum(diag[c][1] == 1 for c in s) == 1
    assert sum(c in seg for c in s) == 4
    assert len(label_fraction_subset(train, 0.001, diag, seg)) == 1  # at least one case
    with pytest.raises(OrthoError, match="label fraction"):
        label_fraction_subset(train, 0.0, diag, seg)


# ------------------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------------------
def test_dice_ce_hand_values_and_ignore_and_padding():
    # 1 sample, 2 classes, 4 voxels, logits 0 -> p = 0.5 everywhere; target fg at voxels 1, 2
    logits = torch.zeros((1, 2, 4), requires_grad=True)
    target = torch.tensor([[[0, 1, 1, 0]]])
    loss = DiceCELoss(smooth=0.0)(logits, target)
    # Dice(fg) = 2 * (0.5 + 0.5) / (2 + 2) = 0.5 -> 1 - 0.5; CE = ln 2
    assert loss.item() == pytest.approx(0.5 + LN2, abs=1e-6)
    # voxel 3 is 'ignore' (label 2): Dice = 2 * 1 / (2 + 1.5) = 0.5714; CE still ln 2 per valid voxel
    ign = torch.tensor([[[0, 1, 1, 2]]])
    loss_ign = DiceCELoss(smooth=0.0, ignore_label=2)(logits, ign)
    assert loss_ign.item() == pytest.approx(1 - 2 / 3.5 + LN2, abs=1e-6)
    # -1 (padding) is excluded the same way, even without an ignore label
    pad = torch.tensor([[[0, 1, 1, -1]]])
    assert DiceCELoss(smooth=0.0)(logits, pad).item() == pytest.approx(loss_ign.item(), abs=1e-6)
    # excluded voxels get no gradient and their logits do not change the loss
    logits2 = torch.zeros((1, 2, 4))
    logits2[0, :, 3] = torch.tensor([5.0, -3.0])
    logits2.requires_grad_(True)
    l2 = DiceCELoss(smooth=0.0)(logits2, pad)
    assert l2.item() == pytest.approx(loss_ign.item(), abs=1e-6)
    l2.backward()
    assert torch.all(logits2.grad[0, :, 3] == 0) and torch.any(logits2.grad[0, :, :3] != 0)
    # nothing valid: zero loss that still backpropagates
    none = torch.full((1, 1, 4), -1)
    z = DiceCELoss()(logits, none)
    z.backward()
    assert z.item() == 0.0


def test_dice_ce_perfect_vs_wrong_and_batch_dice():
    target = torch.randint(0, 3, (2, 1, 6, 6, 6))
    onehot = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    perfect = DiceCELoss()(onehot * 40 - 20, target)
    wrong = DiceCELoss()((1 - onehot) * 40 - 20, target)
    assert float(perfect) < 1e-3 and float(wrong) > 1.9
    # batch dice pools statistics: sample 0 all 4 voxels fg and predicted fg; sample 1 no fg, one voxel
    # wrongly predicted fg. Per sample: Dice 1 and ~0 -> loss 0.5; pooled: 2 * 4 / (4 + 5) -> loss 1/9
    t = torch.zeros((2, 1, 4), dtype=torch.long)
    t[0, 0, :] = 1
    lg = torch.zeros((2, 2, 4))
    lg[0, 1] = 40.0
    lg[1, 0] = 40.0
    lg[1, :, 0] = torch.tensor([0.0, 40.0])
    per_sample = DiceCELoss(weight_ce=0, smooth=1e-5)(lg, t)
    pooled = DiceCELoss(weight_ce=0, smooth=1e-5, batch_dice=True)(lg, t)
    assert float(per_sample) == pytest.approx(0.5, abs=1e-4) and float(pooled) == pytest.approx(1 / 9, abs=1e-4)
    # a class absent from target and prediction scores Dice 1 through the smoothing term (as nnU-Net)
    assert float(DiceCELoss(weight_ce=0)(lg[:1], t[:1])) < 1e-4


def test_deep_supervision_weights_and_loss():
    w = deep_supervision_weights(3)
    assert np.allclose(w, [2 / 3, 1 / 3, 0.0])  # 1, 1/2, 0 normalised
    assert deep_supervision_weights(3, ddp=True)[-1] > 0
    ds = DeepSupervisionLoss(DiceCELoss(smooth=0.0), w)
    outs = [torch.zeros((1, 2, 4)), torch.zeros((1, 2, 2)), torch.zeros((1, 2, 1))]
    tgts = [torch.tensor([[[0, 1, 1, 0]]]), torch.tensor([[[0, 1]]]), torch.tensor([[[1]]])]
    # each level: Dice 0.5 and CE ln2 -> every term 0.5 + ln 2; weights sum to 1
    assert float(ds(outs, tgts)) == pytest.approx(0.5 + LN2, abs=1e-6)
    with pytest.raises(TypeError):
        ds(outs[0], tgts[0])


def test_masked_bce_and_pos_weight():
    labels = np.array([[1, 0], [0, np.nan], [0, 0], [np.nan, 1], [0, 1]], dtype=float)
    # label 0: 1 pos, 3 neg -> 3; label 1: 2 pos, 2 neg -> 1
    assert compute_pos_weight(labels).tolist() == [3.0, 1.0]
    assert compute_pos_weight(np.array([[1.0], [1.0]])).tolist() == [1.0]  # no negatives -> 1
    loss = MaskedBCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 1.0]))
    logits = torch.zeros((2, 2), requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    # known entries: (0,0) positive weighted 3 ln2, (1,0) ln2, (1,1) ln2 -> mean 5 ln2 / 3
    value = loss(logits, target)
    assert value.item() == pytest.approx(5 * LN2 / 3, abs=1e-6)
    value.backward()
    assert logits.grad[0, 1] == 0
    all_nan = loss(logits, torch.full((2, 2), float("nan")))
    assert all_nan.item() == 0.0 and all_nan.requires_grad


def test_training_losses_read_nothing_back_from_the_device_and_keep_their_values():
    """The losses of the training step have no Python branch on a tensor (which would stall the GPU every step);
    the clamped denominators give the same values as the old `if n > 0` branches, including the graph-connected
    zero of a batch without a valid voxel / known label."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    target[0, 0, 0] = -1                                             # padding, excluded
    dice_ce = DiceCELoss(ignore_label=2)
    bce = MaskedBCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0]))
    blogits = torch.randn(3, 2, requires_grad=True)
    btarget = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    with HostReadGuard():
        seg = dice_ce(logits, target)
        none_valid = dice_ce(logits, torch.full_like(target, -1))
        diag = bce(blogits, btarget)
        unknown = bce(blogits, torch.full_like(btarget, float("nan")))
        ds = DeepSupervisionLoss(dice_ce, [0.5, 0.5])(
            [logits, logits[:, :, ::2, ::2, ::2]], [target, target[:, :, ::2, ::2, ::2]])
    mask = (target >= 0) & (target != 2)
    ce = torch.nn.functional.cross_entropy(logits, torch.where(mask, target, 0)[:, 0], reduction="none")
    dice = SoftDiceLoss()(torch.softmax(logits, 1), torch.where(mask, target, 0), loss_mask=mask.float())
    assert seg.item() == pytest.approx((dice + (ce * mask[:, 0]).sum() / mask.sum()).item(), abs=1e-6)
    assert none_valid.requires_grad and none_valid.item() == pytest.approx(0.0, abs=1e-6)   # empty Dice is 1
    known = ~torch.isnan(btarget)
    per = torch.nn.functional.binary_cross_entropy_with_logits(
        blogits, torch.nan_to_num(btarget), pos_weight=torch.tensor([2.0, 1.0]), reduction="none")
    assert diag.item() == pytest.approx((per * known).sum().item() / 4, abs=1e-6)
    assert unknown.item() == 0.0 and unknown.requires_grad
    assert torch.isfinite(ds).all()
    (seg + diag + unknown + none_valid).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(blogits.grad).all()


def test_host_values_reads_every_scalar_at_once_in_order():
    from orthonet.training.runtime import host_values
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return real(self)
    torch.Tensor.tolist = counting
    try:
        out = host_values({"loss": torch.tensor(1.5), "plain": 2, "part": torch.tensor([0.25]),
                           "half": torch.tensor(3.0, dtype=torch.bfloat16)})
    finally:
        torch.Tensor.tolist = real
    assert out == {"loss": 1.5, "plain": 2.0, "part": 0.25, "half": 3.0}
    assert list(out) == ["loss", "plain", "part", "half"]
    assert calls == [(3,)]                                           # one read of the three tensors
    assert host_values({"a": 1.0}) == {"a": 1.0}


def test_diffusion_mse():
    a, b = torch.zeros((2, 1, 4)), torch.ones((2, 1, 4))
    b[:, :, :2] = 3.0
    assert float(diffusion_mse_loss(a, b)) == pytest.approx((9 + 9 + 1 + 1) / 4)
    mask = torch.zeros((2, 1, 4))
    mask[..., 2:] = 1
    assert float(diffusion_mse_loss(a, b, mask)) == pytest.approx(1.0)
    assert diffusion_mse_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------------------
def _opt(params=None, lr=0.01):
    params = params if params is not None else [nn.Parameter(torch.zeros(1))]
    return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True)


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer here
def test_poly_and_cosine():
    assert poly_factor(50, 100) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(100, 100) == 0.0 and poly_factor(150, 100) == 0.0
    sched = poly_schedule(_opt(), 100)
    assert sched.get_last_lr() == [0.01]
    for _ in range(50):
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert cosine_factor(0, 100, 10) == pytest.approx(0.1)
    assert cosine_factor(9, 100, 10) == pytest.approx(1.0)
    assert cosine_factor(55, 100, 10) == pytest.approx(0.5)  # half-way through the cosine part
    assert cosine_factor(100, 100, 10, min_factor=0.1) == pytest.approx(0.1)
    cos = cosine_warmup_schedule(_opt(lr=1e-4), 100, warmup_steps=10)
    assert cos.get_last_lr()[0] == pytest.approx(1e-5)


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer here
def test_schedules_load_the_step_only_state_of_older_checkpoints():
    """Checkpoints written before LambdaLR stored {'current_step': n}; resuming one gives the learning rates of n."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.SGD(split_param_groups(model, {"0.weight", "0.bias"}, lr=0.01), lr=0.01)
    sched = warmup_poly_schedule(opt, 100, 10, 0.1)
    load_scheduler_state(sched, {"current_step": 5})
    assert sched.last_epoch == 5
    assert sched.get_last_lr()[0] == pytest.approx(0.01 * poly_factor(5, 100) * 0.55)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * poly_factor(5, 100))
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * poly_factor(6, 100))


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer here
def test_warmup_for_pretrained_groups_and_exact_resume():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    groups = split_param_groups(model, {"0.weight", "0.bias"}, lr=0.01)
    assert [g["name"] for g in groups] == ["pretrained", "new"] and len(groups[0]["params"]) == 2
    opt = torch.optim.SGD(groups, lr=0.01)
    sched = warmup_poly_schedule(opt, max_steps=100, warmup_steps=10, pretrained_lr_multiplier=0.1)
    pre, new = sched.get_last_lr()
    assert pre == pytest.approx(0.001) and new == pytest.approx(0.01)
    for _ in range(5):
        sched.step()  # half-way through the warm-up: 0.1 + 0.9 * 0.5 = 0.55 of poly
    assert sched.get_last_lr()[0] == pytest.approx(0.01 * poly_factor(5, 100) * 0.55)
    for _ in range(5):
        sched.step()
    pre, new = sched.get_last_lr()
    assert pre == pytest.approx(new) == pytest.approx(0.01 * poly_factor(10, 100))
    # resume: a fresh optimizer + scheduler loaded from state reproduce the same learning rates
    state = sched.state_dict()
    opt2 = torch.optim.SGD(split_param_groups(model, {"0.weight", "0.bias"}, lr=0.01), lr=0.01)
    sched2 = warmup_poly_schedule(opt2, 100, 10, 0.1)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(7):
        sched.step()
        sched2.step()
        assert sched.get_last_lr() == sched2.get_last_lr()


# ------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------
def _train_steps(model, opt, sched, n):
    for _ in range(n):
        x = torch.randn(4, 3)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = _opt(model.parameters(), 0.05)
    return model, opt, poly_schedule(opt, 20)


def test_checkpoint_roundtrip_weights_only_and_exact_resume(tmp_path):
    straight = _fresh()
    _train_steps(*straight, 6)

    model, opt, sched = _fresh()
    _train_steps(model, opt, sched, 3)
    path = save_checkpoint(tmp_path / "checkpoint_latest.pt", model, opt, sched, ema={"w": torch.ones(2)},
                           grad_scaler=None, epoch=3, step=3,
                           extra={"best": np.float32(0.5), "plans": {"name": "orthoPlans"}, "arr": np.arange(3)})
    raw = torch.load(path, weights_only=True)  # plain torch.load with weights_only works
    assert raw["epoch"] == 3 and raw["extra"]["best"] == 0.5 and raw["extra"]["arr"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pt"]  # no temporary left behind
    torch.manual_seed(999)  # the RNG moves on in the killed process...
    np.random.seed(999)

    model2, opt2, sched2 = _fresh(seed=1)  # ...and a new process starts with other weights
    ckpt = load_checkpoint(path)
    apply_checkpoint(ckpt, model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _train_steps(model2, opt2, sched2, 3)
    for a, b in zip(straight[0].state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)  # bit-identical to the uninterrupted run (data, dropout, momentum)


def test_checkpoint_errors_and_atomicity(tmp_path, monkeypatch):
    model = nn.Linear(2, 1)
    with pytest.raises(OrthoError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(OrthoError, match="bad.pt.*cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "x.pt", model, extra={"obj": object()})
    good = save_checkpoint(tmp_path / "c.pt", model, epoch=1)
    before = good.read_bytes()

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(good, model, epoch=2)
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "c.pt"]


def test_rng_state_capture_restore():
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ------------------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------------------
def test_progress_logger_persists_resumes_and_plots(tmp_path):
    log = ProgressLogger(tmp_path, console=False)
    for e in range(3):
        log.log_epoch(e, train_loss=1.0 - 0.1 * e, val_loss=1.1 - 0.1 * e, lr=0.01 * (1 - e / 3), epoch_time=2.0,
                      dice={"bone": 0.5 + 0.1 * e, "cartilage": float("nan")}, auc={"lesion_a": 0.6 + 0.05 * e})
    log.log("epoch 2 done")
    data = json.loads((tmp_path / "progress.json").read_text(encoding="utf-8"))
    assert [r["epoch"] for r in data["epochs"]] == [0, 1, 2]
    assert data["epochs"][2]["dice"] == {"bone": pytest.approx(0.7), "cartilage": None}  # NaN stored as null
    png = (tmp_path / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "epoch 2 done" in (tmp_path / "log.txt").read_text(encoding="utf-8")
    # resume after a kill: the checkpoint was from epoch 1, so epoch 2 is redone
    again = ProgressLogger(tmp_path, console=False)
    assert again.series("train_loss")[1] == pytest.approx([1.0, 0.9, 0.8])
    again.truncate(2)
    again.log_epoch(2, train_loss=0.75)
    assert again.series("train_loss")[1] == pytest.approx([1.0, 0.9, 0.75])
    assert again.series("dice", "bone")[0] == [0, 1]
    off = ProgressLogger(tmp_path / "rank1", enabled=False)
    off.log_epoch(0, train_loss=1.0)
    assert not (tmp_path / "rank1").exists()
    curve = loss_curve_png(np.linspace(1, 0.1, 200), tmp_path / "loss.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


# ------------------------------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------------------------------
def test_distributed_helpers_single_process():
    info = D.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert D.world_size() == 1 and D.is_main_process() and D.rank_seed(5) == 5
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(D.all_reduce_mean(t), t)
    m = nn.Linear(2, 2)
    assert D.wrap_ddp(m, torch.device("cpu")) is m
    assert D.scale_lr(1e-4, 4, "sqrt") == pytest.approx(2e-4) and D.scale_lr(0.01, 4, "linear") == 0.04
    assert D.scale_lr(0.01, 4, "none") == 0.01
    D.barrier()
    D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = D.init_distributed(device="cpu")
    try:
        mean = D.all_reduce_mean(torch.tensor([float(rank + 1)]))
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        model = D.wrap_ddp(nn.Linear(3, 1), info.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank  # different data per rank
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        weights = D.all_gather_objects([p.detach().clone() for p in model.module.parameters()])
        # batch Dice pooled across ranks (gradient-preserving all_gather)
        torch.manual_seed(1)
        logits_all, target_all = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 1, 5))
        mine = logits_all[2 * rank:2 * rank + 2].clone().requires_grad_(True)
        dice = SoftDiceLoss(batch_dice=True, ddp=True)(mine.softmax(1), target_all[2 * rank:2 * rank + 2])
        dice.backward()
        dice_values = D.all_gather_objects(dice.detach())
        dice_grads = D.all_gather_objects(mine.grad.clone())
        if D.is_main_process():
            torch.save({"mean": mean, "weights": weights, "world": D.world_size(), "backend": info.backend,
                        "dice_values": dice_values, "dice_grads": dice_grads}, Path(out_dir) / "ddp.pt")
    finally:
        D.cleanup()


def test_two_process_gloo_ddp_agrees(tmp_path):
    # 'fork' avoids re-importing torch in each process (the code under test is start-method agnostic)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    res = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert res["world"] == 2 and res["backend"] == "gloo"
    assert float(res["mean"]) == pytest.approx(1.5)  # (1 + 2) / 2
    w0, w1 = res["weights"]
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))  # both ranks hold identical weights
    # and they equal one single-process step on the gradient averaged over both ranks' batches
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    ((ref(x).pow(2).mean() + ref(x + 10).pow(2).mean()) / 2).backward()
    with torch.no_grad():
        expected = [p - 0.1 * p.grad for p in ref.parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(w0, expected))
    # batch Dice under DDP equals batch Dice of the whole batch in one process; each rank's input gradient is
    # world_size x the single-process one, which DDP's gradient averaging over ranks divides back out
    torch.manual_seed(1)
    logits_all, target_all = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 1, 5))
    logits_all.requires_grad_(True)
    single = SoftDiceLoss(batch_dice=True)(logits_all.softmax(1), target_all)
    single.backward()
    assert all(float(v) == pytest.approx(single.item(), abs=1e-6) for v in res["dice_values"])
    assert torch.allclose(torch.cat(res["dice_grads"]), 2 * logits_all.grad, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------
def test_auc_hand_computed():
    # positives {0.35, 0.8}, negatives {0.1, 0.4, 0.4}: 0.35 beats one negative, 0.8 beats three -> 4 / 6
    assert metrics.roc_auc([0, 0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8, 0.4]) == pytest.approx(4 / 6)
    # with a tie: positives {0.4, 0.8}, negatives {0.1, 0.4, 0.3}: 0.4 -> 1 + 0.5 + 1, 0.8 -> 3 -> 5.5 / 6
    assert metrics.roc_auc([0, 0, 1, 1, 0], [0.1, 0.4, 0.4, 0.8, 0.3]) == pytest.approx(5.5 / 6)
    # unknown labels are dropped (this one would otherwise lower the AUC)
    assert metrics.roc_auc([0, 0, 1, 1, 0, np.nan], [0.1, 0.4, 0.4, 0.8, 0.3, 0.0]) == pytest.approx(5.5 / 6)
    assert math.isnan(metrics.roc_auc([1, 1, np.nan], [0.2, 0.3, 0.4]))


def test_ap_sens_spec_youden_hand_computed():
    # ranked: + (P 1, R .5), -, + (P 2/3, R 1) -> AP = .5 * 1 + .5 * 2/3
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    assert math.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))
    sens, spec = metrics.sensitivity_specificity([1, 1, 1, 0, 0, np.nan], [1, 0, 1, 0, 1, 1])
    assert (sens, spec) == (pytest.approx(2 / 3), pytest.approx(0.5))
    # thresholds: .9 -> J 1/3, .7 -> 2/3, .5 -> 2/3 + 3/4 - 1, .4 -> 1 + 3/4 - 1 = .75 (best), .3 -> .5
    assert metrics.youden_threshold([0, 0, 0, 1, 1, 1, 0], [0.1, 0.2, 0.3, 0.4, 0.7, 0.9, 0.5]) == 0.4
    values, mean = metrics.per_label(metrics.roc_auc, np.array([[0, 1], [1, 1], [np.nan, 1]]),
                                     np.array([[0.2, 0.1], [0.9, 0.2], [0.5, 0.3]]), ["a", "b"])
    assert values["a"] == 1.0 and math.isnan(values["b"]) and mean == 1.0


def test_auc_ap_match_sklearn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(float)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding creates many ties
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_dice_iou_two_cubes():
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros_like(a)
    a[0:10, 0:10, 0:10] = True  # 1000 voxels
    b[5:15, 0:10, 0:10] = True  # 1000 voxels, 500 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)  # 2 * 500 / 2000
    assert metrics.iou(a, b) == pytest.approx(1 / 3)  # 500 / 1500
    pred = a.astype(np.int16) + 2 * (b & ~a)
    ref = b.astype(np.int16)
    ref[0, 0, 0] = 9  # an ignored voxel; it is predicted as label 1 but must not count
    d = metrics.dice_per_class(pred, ref, [1, 2, 3], ignore=9)
    # label 1: pred 1000 minus the ignored voxel, ref 1000, overlap 500 -> 1000 / 1999
    assert d[1] == pytest.approx(1000 / 1999) and d[2] == 0.0 and math.isnan(d[3])
    assert math.isnan(metrics.dice(np.zeros(4, bool), np.zeros(4, bool)))


def test_hd95_known_distances():
    # two one-voxel-thick planes 3 slices apart with 2 mm slices: every surface distance is 6 mm
    a = np.zeros((12, 8, 8), bool)
    b = np.zeros_like(a)
    a[5] = True
    b[8] = True
    assert metrics.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    # a cube shifted by 2 voxels along x (0.5 mm): compare with brute-force nearest surface distances
    from scipy.spatial import cKDTree
    c = np.zeros((20, 20, 20), bool)
    d = np.zeros_like(c)
    c[5:13, 5:13, 4:12] = True
    d[5:13, 5:13, 6:14] = True
    sp = np.array([1.5, 1.0, 0.5])
    got = metrics.hd95(c, d, sp)
    sc = np.argwhere(metrics._surface(c)) * sp
    sd = np.argwhere(metrics._surface(d)) * sp
    brute = max(np.percentile(cKDTree(sd).query(sc)[0], 95), np.percentile(cKDTree(sc).query(sd)[0], 95))
    assert got == pytest.approx(brute) and got == pytest.approx(1.0)  # the 2-voxel shift: 2 x 0.5 mm
    assert metrics.hd95(c, np.zeros_like(c), sp) == float("inf")
    assert math.isnan(metrics.hd95(np.zeros_like(c), np.zeros_like(c), sp))
