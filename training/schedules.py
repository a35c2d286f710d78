"""Learning-rate schedules: torch's ``LambdaLR`` with one pure factor function of the step per parameter group.

Why LambdaLR with pure functions: a run resumed after a kill must continue with exactly the learning rate it would
have had; the scheduler's state is the step (``last_epoch``) and the groups' base learning rates, both in its
``state_dict`` (checkpoints store it), and the factor is recomputed from them. The factory functions below build the
schedules orthonet uses; ``lr = base_lr * factor(step)`` per group, ``base_lr`` being the group's ``lr`` when the
scheduler is built.

Parameter groups: mark pretrained parameters with ``group['pretrained'] = True`` (see :func:`split_param_groups`)
and :func:`warmup_poly_schedule` gives them a lower learning rate during a short linear warm-up, so the freshly
initialised decoder/head does not wreck the pretrained encoder with large early gradients; afterwards every
group follows the same poly schedule.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, Iterable, List, Set

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


# ------------------------------------------------------------------------------------------------------------
# pure factor functions
# ------------------------------------------------------------------------------------------------------------
def poly_factor(step: int, max_steps: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly decay (1 - step / max_steps) ** exponent, clamped at 0 past the end."""
    if max_steps <= 0:
        return 1.0
    return max(0.0, 1.0 - min(step, max_steps) / max_steps) ** exponent


def linear_warmup_factor(step: int, warmup_steps: int, start: float) -> float:
    """Linear ramp from ``start`` at step 0 to 1 at ``warmup_steps`` (1 afterwards)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


def cosine_factor(step: int, max_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_factor`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------------
# schedulers (LambdaLR; state = the step)
# ------------------------------------------------------------------------------------------------------------
def _warmup_poly(step: int, max_steps: int, warmup_steps: int, start: float, exponent: float) -> float:
    return poly_factor(step, max_steps, exponent) * linear_warmup_factor(step, warmup_steps, start)


def poly_schedule(optimizer: torch.optim.Optimizer, max_steps: int, exponent: float = 0.9) -> LambdaLR:
    """lr = base_lr * (1 - step / max_steps) ** exponent, as nnU-Net (step = iteration or epoch)."""
    return LambdaLR(optimizer, partial(poly_factor, max_steps=int(max_steps), exponent=exponent))


def warmup_poly_schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int,
                         pretrained_lr_multiplier: float = 0.1, new_lr_multiplier: float = 1.0,
                         exponent: float = 0.9) -> LambdaLR:
    """Poly schedule where groups with ``pretrained=True`` start at ``pretrained_lr_multiplier`` x their poly LR
    and ramp linearly to 1 x over ``warmup_steps``; other groups follow plain poly (optionally with their own
    warm-up start ``new_lr_multiplier``)."""
    lambdas = [partial(_warmup_poly, max_steps=int(max_steps), warmup_steps=int(warmup_steps), exponent=exponent,
                       start=float(pretrained_lr_multiplier if g.get("pretrained", False) else new_lr_multiplier))
               for g in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas)


def cosine_warmup_schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0,
                           min_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up then cosine decay (diffusion pretraining with AdamW)."""
    return LambdaLR(optimizer, partial(cosine_factor, max_steps=int(max_steps), warmup_steps=int(warmup_steps),
                                       min_factor=float(min_factor)))


def scheduler_step(scheduler: LambdaLR) -> int:
    """The step the scheduler's learning rates are for (LambdaLR counts it in ``last_epoch``)."""
    return int(scheduler.last_epoch)


def load_scheduler_state(scheduler: LambdaLR, state: Dict) -> None:
    """Load a LambdaLR state, or the ``{'current_step': n}`` state of checkpoints written before orthonet used
    LambdaLR (the schedule is a pure function of the step, so setting the step restores it exactly)."""
    if "current_step" not in state:
        scheduler.load_state_dict(state)
        return
    step = int(state["current_step"])
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs   # what get_last_lr() reports, as LambdaLR.step() would have set it


def split_param_groups(model: nn.Module, pretrained_names: Iterable[str], **group_kwargs) -> List[Dict]:
    """Two optimizer parameter groups: parameters whose names are in ``pretrained_names`` (``pretrained=True``)
    and the rest. Names are as in ``model.named_parameters()``; empty groups are left out."""
    wanted: Set[str] = set(pretrained_names)
    pre, new = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (pre if name in wanted else new).append(p)
    groups = []
    if pre:
        groups.append({"params": pre, "pretrained": True, "name": "pretrained", **group_kwargs})
    if new:
        groups.append({"params": new, "pretrained": False, "name": "new", **group_kwargs})
    return groups
