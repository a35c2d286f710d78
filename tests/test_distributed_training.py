"""Real trainers under DistributedDataParallel on 2 gloo ranks (CPU, forked processes).

Why: DDP runs with ``find_unused_parameters=False`` (fast), so every parameter must get a gradient on every rank
even when a rank's whole batch lacks a view (incomplete exams are the normal clinical case), and work only rank 0
does (online validation) must never wait in a collective op for ranks that are not there.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Sequence, Set

import pytest
import torch

from tests.builders import write_tiny_dataset
from tests.test_training import env  # noqa: F401  (the ORTHO_* folders fixture)

DATASET = "Dataset961_DDP"
MISSING = "coronal"          # the view rank 1's batches lack (every case it trains on lacks it)
WORLD = 2
TIMEOUT_S = 150              # a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def dataset(env):
    """Three views, segmentation + two diagnoses; half of the cases lack the coronal view after preprocessing."""
    write_tiny_dataset(env / "raw" / DATASET, n_train=10, n_test=0)
    from orthonet.planners.cli import main as plan_main
    assert plan_main(["-d", "961", "-np", "1"]) == 0
    from orthonet.preprocessing import storage
    for folder in (env / "pre" / DATASET).iterdir():
        if folder.is_dir():
            for i in range(1, 10, 2):
                storage.properties_file(folder, f"case{i:03d}", MISSING).unlink(missing_ok=True)
    return DATASET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_split(trainer, cases: List[str]) -> List[str]:
    """Rank 0 trains on complete exams, rank 1 only on exams lacking ``MISSING``: each rank-1 batch lacks it."""
    from orthonet.training import distributed as D
    lacking = [c for c in cases if not trainer.store.has_view(c, MISSING)]
    complete = [c for c in cases if trainer.store.has_view(c, MISSING)]
    assert lacking and complete, cases
    return lacking if D.rank() == 1 else complete


def _trainer_class(task: str, batch_dice: bool):
    """The task's trainer with rank-dependent training cases (and optionally batch Dice)."""
    from orthonet.training.trainers import get_trainer_class
    base = get_trainer_class(None, task)

    class RankSplitTrainer(base):
        def select_training_cases(self, train: Sequence[str], seg_labelled: Set[str]) -> List[str]:
            return _rank_split(self, super().select_training_cases(train, seg_labelled))

    if batch_dice:
        RankSplitTrainer.batch_dice = True
    return RankSplitTrainer


def _worker(rank: int, port: int, out: str, task: str, diagnosis_input: str, batch_dice: bool) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from orthonet.training import distributed as D
    from orthonet.training.options import TrainOptions
    D.init_distributed(device="cpu", timeout_s=TIMEOUT_S // 2)   # the trainer reuses this group
    try:
        opts = TrainOptions(dataset_name=DATASET, configuration="3d_fullres", fold=0, task=task, epochs=1,
                            iterations_per_epoch=3, val_iterations=1, num_workers=0, device="cpu",
                            diagnosis_input=diagnosis_input, pretrained="none", final_validation=False)
        trainer = _trainer_class(task, batch_dice)(opts)
        trainer.setup()
        initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        probe = trainer.build_train_loader()
        lacks = not bool(next(probe)["present"][MISSING].any())
        if hasattr(probe, "close"):
            probe.close()
        trainer.train_epochs()
        final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        gathered = D.all_gather_objects({"initial": initial, "final": final, "lacks": lacks})
        if rank == 0:
            torch.save(gathered, Path(out) / "states.pt")
    finally:
        D.cleanup()


def _run_two_ranks(tmp_path: Path, task: str, diagnosis_input: str = "whole", batch_dice: bool = False) -> List[Dict]:
    """Spawn both ranks (results under ``tmp_path``), fail (and stop them) if they do not finish in ``TIMEOUT_S``;
    the ranks' states."""
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(tmp_path), task, diagnosis_input, batch_dice), nprocs=WORLD, join=False,
        start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"2-rank {task} training did not finish in {TIMEOUT_S}s (hang in a collective op?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return torch.load(tmp_path / "states.pt", weights_only=True)


def _assert_ranks_agree_and_trained(states: List[Dict]) -> None:
    r0, r1 = states
    assert r1["lacks"] and not r0["lacks"]                  # rank 1's batch really lacks the view
    for key, value in r0["final"].items():
        assert torch.equal(value, r1["final"][key]), key
    head = [k for k in r0["final"] if k.startswith(f"diagnosis.view_heads.{MISSING}.")]
    assert head and any(not torch.equal(r0["initial"][k], r0["final"][k]) for k in head)


@pytest.mark.parametrize("task,diagnosis_input", [("diag", "crop"), ("multitask", "crop"),
                                                  ("diag", "whole")])
def test_ddp_trains_with_a_view_missing_from_one_ranks_batch(dataset, tmp_path, monkeypatch, task, diagnosis_input):
    """The missing view's auxiliary head still takes part (zero weight) on rank 1, so DDP does not stop with
    'Expected to have finished reduction', and both ranks end with the same parameters."""
    monkeypatch.setenv("ORTHO_results", str(tmp_path / "res"))
    _assert_ranks_agree_and_trained(_run_two_ranks(tmp_path, task, diagnosis_input))


def test_ddp_batch_dice_validation_on_rank_0_does_not_hang(dataset, tmp_path, monkeypatch):
    """Rank 0's online validation computes the batch-Dice loss locally: it must not all_gather while rank 1
    waits at the epoch's barrier (multitask: segmentation and diagnosis losses in validation)."""
    monkeypatch.setenv("ORTHO_results", str(tmp_path / "res"))
    _assert_ranks_agree_and_trained(_run_two_ranks(tmp_path, "multitask", "crop", batch_dice=True))


def _gather_worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from orthonet.training import distributed as D
    D.init_distributed(device="cpu", timeout_s=TIMEOUT_S // 2)
    try:
        x = torch.arange(3, dtype=torch.float64).add(10.0 * rank).reshape(1, 3).requires_grad_()
        gathered = D.all_gather_with_grad(x)                      # (world, 1, 3)
        loss = (rank + 1) * gathered.sum(0).pow(2).sum()         # each rank's loss differs
        loss.backward()
        with D.local_only():                                      # rank-local: no collective, plain tensor[None]
            local = D.all_gather_with_grad(x)
        D.barrier()
        result = {"gathered": gathered.detach(), "grad": x.grad.detach(), "local": local.detach(),
                  "local_grad_fn": local.grad_fn is not None}
        results = D.all_gather_objects(result)
        if rank == 0:
            torch.save(results, Path(out) / "gather.pt")
    finally:
        D.cleanup()


def test_all_gather_with_grad_sums_every_ranks_gradient(tmp_path):
    """``all_gather_with_grad`` (torch.distributed.nn.functional.all_gather): forward stacks the ranks' tensors
    in rank order; backward gives each rank d(sum of every rank's loss)/d(its own slice); inside local_only() and
    with one process it is ``tensor[None]`` with its graph."""
    ctx = torch.multiprocessing.start_processes(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                                                join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("2-rank all_gather_with_grad did not finish")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = torch.load(tmp_path / "gather.pt", weights_only=True)
    xs = [torch.arange(3, dtype=torch.float64).add(10.0 * r).reshape(1, 3) for r in range(WORLD)]
    total = sum(xs)
    expected_grad = sum(2 * (k + 1) * total for k in range(WORLD))  # d/dx_r of sum_k (k+1) * |sum_j x_j|^2
    for r, res in enumerate(results):
        assert torch.equal(res["gathered"], torch.stack(xs))
        assert torch.allclose(res["grad"], expected_grad)
        assert torch.equal(res["local"], xs[r][None]) and res["local_grad_fn"]

    from orthonet.training import distributed as D
    assert not D.is_distributed()
    x = torch.ones(2, requires_grad=True)
    y = D.all_gather_with_grad(x)
    assert y.shape == (1, 2)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
