"""DistributedDataParallel plumbing for ``torchrun --nproc_per_node N``.

Why: the same training command must run unchanged on one CPU, one GPU or N GPUs. Outside torchrun every helper
is a no-op (world size 1, rank 0), so trainers call them unconditionally.

Batch and learning-rate rule (orthonet's choice, documented in docs/training.md):

* Each rank draws the plan's batch size, so the **effective batch = per-rank batch x world size**. Each rank's data
  loader gets its own seed (:func:`rank_seed`), so ranks see different patches.
* The learning rate is scaled with :func:`scale_lr`: ``sqrt`` (default; square-root rule, appropriate for Adam/
  AdamW as in diffusion pretraining) or ``linear`` (Goyal et al., for SGD), always relative to the single-process
  run. ``none`` keeps it unchanged (what nnU-Net does, which instead splits one global batch across GPUs).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: Optional[str]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None, timeout_s: int = 1800
                     ) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL is used on CUDA, gloo on CPU. Without those variables (or with WORLD_SIZE=1) nothing is initialised and
    rank 0 of 1 is returned. ``device`` ('cuda'/'cpu'/None=auto) picks the device; on CUDA each rank uses
    ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank if world > 1 else torch.cuda.current_device())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 0, 1, dev, None)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


_local_depth = 0   # > 0 inside local_only(): the collective helpers below act as in a single process


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Work one rank does alone (rank 0's online validation): the helpers below (barrier, all_reduce_mean,
    all_gather_objects, all_gather_with_grad, and with it batch Dice) stay on this rank, because a collective op
    there would wait forever for ranks that are elsewhere (at the epoch's barrier)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _collective() -> bool:
    """Whether the helpers talk to the other ranks: distributed and not inside :func:`local_only`."""
    return is_distributed() and _local_depth == 0


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, logs and plots; the other ranks only train."""
    return rank() == 0


def barrier() -> None:
    if _collective():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; the input is unchanged). Identity outside DDP."""
    if not _collective():
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_gather_objects(obj) -> List:
    """Gather one picklable object per rank (e.g. validation predictions); ``[obj]`` outside DDP."""
    if not _collective():
        return [obj]
    out: List = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Stack of ``tensor`` from every rank (world, ...); ``tensor[None]`` outside DDP (and in :func:`local_only`).

    Differentiable: ``torch.distributed.nn.functional.all_gather`` sends each rank's slice of the gradient back
    (summed over ranks; batch Dice across ranks); it exists in every torch orthonet supports (>= 2.4). Recent torch
    (2.14) warns that it is deprecated in favour of the private ``torch.distributed._functional_collectives``,
    whose autograd functions differ between those versions, so that FutureWarning is silenced here."""
    if not _collective():
        return tensor[None]
    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                                category=FutureWarning)
        return torch.stack(all_gather(tensor))


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in DistributedDataParallel when running distributed."""
    model = model.to(device)
    if not is_distributed():
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index,
                                                   find_unused_parameters=find_unused_parameters)
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def cleanup(synchronize: bool = False) -> None:
    """Leave the process group (call once at the end of training, also after errors). ``synchronize`` waits for
    every rank first. Why: with gloo, a rank that tears its connections down while a peer is still finishing can
    abort that peer at exit ("terminate called without an active exception", seen in CI); after an error a barrier
    could wait forever for a rank that died, so only a successful run synchronises."""
    if is_distributed():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """A different, deterministic seed per rank (data loading, augmentation)."""
    return int(seed) + 1_000_003 * rank()


def scale_lr(base_lr: float, world: Optional[int] = None, rule: str = "sqrt") -> float:
    """Scale a single-process learning rate to ``world`` ranks: 'sqrt', 'linear' or 'none'."""
    n = world_size() if world is None else int(world)
    if rule == "none" or n <= 1:
        return float(base_lr)
    if rule == "sqrt":
        return float(base_lr) * math.sqrt(n)
    if rule == "linear":
        return float(base_lr) * n
    raise ValueError(f"unknown LR scaling rule {rule!r} (sqrt, linear, none)")
