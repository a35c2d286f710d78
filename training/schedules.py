"""Learning-rate schedules as pure functions of the step.

Why pure functions: a run resumed after a kill must continue with exactly the learning rate it would have had,
so the only state is the step counter (stored in the checkpoint). Each scheduler sets
``group['lr'] = group['initial_lr'] * factor(step, group)``; ``factor`` is where subclasses differ.

Parameter groups: mark pretrained parameters with ``group['pretrained'] = True`` (see :func:`split_param_groups`)
and :class:`WarmupPolyLRScheduler` gives them a lower learning rate during a short linear warm-up, so the freshly
initialised decoder/head does not wreck the pretrained encoder with large early gradients; afterwards every
group follows the same poly schedule.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Set

import torch
from torch import nn


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
# schedulers (state = the step)
# ------------------------------------------------------------------------------------------------------------
class StepScheduler:
    """Base: holds the optimizer and the step; ``step()`` advances by one, ``step(k)`` jumps to step k."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: Optional[float] = None, current_step: int = 0):
        self.optimizer = optimizer
        for g in optimizer.param_groups:
            if initial_lr is not None and "initial_lr" not in g:
                g["initial_lr"] = initial_lr * g.get("lr_scale", 1.0)
            g.setdefault("initial_lr", g["lr"])
        self.current_step = int(current_step)
        self._apply()

    def factor(self, step: int, group: Dict) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def lr_at(self, step: int, group_index: int = 0) -> float:
        """Learning rate of one parameter group at ``step`` (no side effects; for plots and tests)."""
        g = self.optimizer.param_groups[group_index]
        return g["initial_lr"] * self.factor(step, g)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * self.factor(self.current_step, g)

    def step(self, current_step: Optional[int] = None) -> None:
        self.current_step = self.current_step + 1 if current_step is None else int(current_step)
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict:
        return {"current_step": self.current_step}

    def load_state_dict(self, state: Dict) -> None:
        self.current_step = int(state["current_step"])
        self._apply()


class PolyLRScheduler(StepScheduler):
    """lr = initial_lr * (1 - step / max_steps) ** exponent, as nnU-Net (step = iteration or epoch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: Optional[float], max_steps: int,
                 exponent: float = 0.9, current_step: int = 0):
        self.max_steps = int(max_steps)
        self.exponent = exponent
        super().__init__(optimizer, initial_lr, current_step)

    def factor(self, step: int, group: Dict) -> float:
        return poly_factor(step, self.max_steps, self.exponent)


class WarmupPolyLRScheduler(PolyLRScheduler):
    """Poly schedule where groups with ``pretrained=True`` start at ``pretrained_lr_multiplier`` x their poly LR
    and ramp linearly to 1 x over ``warmup_steps``; other groups follow plain poly (optionally with their own
    warm-up start ``new_lr_multiplier``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: Optional[float], max_steps: int,
                 warmup_steps: int, pretrained_lr_multiplier: float = 0.1, new_lr_multiplier: float = 1.0,
                 exponent: float = 0.9, current_step: int = 0):
        self.warmup_steps = int(warmup_steps)
        self.pretrained_lr_multiplier = float(pretrained_lr_multiplier)
        self.new_lr_multiplier = float(new_lr_multiplier)
        super().__init__(optimizer, initial_lr, max_steps, exponent, current_step)

    def factor(self, step: int, group: Dict) -> float:
        start = self.pretrained_lr_multiplier if group.get("pretrained", False) else self.new_lr_multiplier
        return poly_factor(step, self.max_steps, self.exponent) * linear_warmup_factor(step, self.warmup_steps, start)


class CosineWarmupScheduler(StepScheduler):
    """Linear warm-up then cosine decay (diffusion pretraining with AdamW)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: Optional[float], max_steps: int,
                 warmup_steps: int = 0, min_factor: float = 0.0, current_step: int = 0):
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_factor = float(min_factor)
        super().__init__(optimizer, initial_lr, current_step)

    def factor(self, step: int, group: Dict) -> float:
        return cosine_factor(step, self.max_steps, self.warmup_steps, self.min_factor)


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
