"""Exponential moving average of model weights (what downstream loads after diffusion pretraining).

Why: diffusion weights fluctuate strongly from step to step; the EMA is a much better denoiser and feature extractor.
With ``warmup=True`` (default) the effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so short
runs (a few hundred steps on a CPU) are not dominated by the random initialisation; ``warmup=False`` gives the plain
``shadow = decay * shadow + (1 - decay) * param`` from the first step.

The state dict holds only tensors, numbers and strings, so it loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """Shadow copy of a model's floating-point parameters and buffers (float32), updated with :meth:`update`.

    Non-float buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied as they are.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must lie in [0, 1)")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        # DNA networks register each tensor under several keys (``convs.0.norm`` / ``convs.0.all_modules.1`` and
        # ``decoder.encoder.*``); keep one shadow per tensor and remember the aliases.
        self.shadow: Dict[str, torch.Tensor] = {}
        self.aliases: Dict[str, str] = {}
        seen: Dict[tuple, str] = {}
        for k, v in unwrap(model).state_dict().items():
            ident = (v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else None
            if ident is not None and ident in seen:
                self.aliases[k] = seen[ident]
                continue
            if ident is not None:
                seen[ident] = k
            self.shadow[k] = v.detach().float().clone() if v.is_floating_point() else v.detach().clone()

    def current_decay(self) -> float:
        """Decay used by the next :meth:`update`."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current weights (call after every optimizer step)."""
        d = self.current_decay()
        current = unwrap(model).state_dict()
        shadows, targets = [], []
        for k in self.shadow:
            v, s = current[k], self.shadow[k]
            if s.is_floating_point():
                if s.device != v.device:
                    self.shadow[k] = s = s.to(v.device)
                shadows.append(s)
                targets.append(v.detach().float())
            else:
                s.copy_(v.detach())
        if shadows:
            # s <- d * s + (1 - d) * v for every tensor in one fused launch (per-tensor mul_/add_ are two kernel
            # launches per tensor: hundreds per step on a GPU)
            torch._foreach_lerp_(shadows, targets, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (cast to each parameter's dtype and device)."""
        full = self.model_state_dict()
        target = unwrap(model).state_dict()
        missing = set(target) - set(full)
        if missing:
            raise KeyError(f"EMA has no entry for {sorted(missing)[:5]} ...: it was made from a different model")
        for k, v in target.items():
            v.copy_(full[k].to(device=v.device, dtype=v.dtype))

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA weights as a full state dict of the model (aliases included; float32), for
        ``model.load_state_dict`` or for saving the weights downstream loads."""
        out = dict(self.shadow)
        for alias, key in self.aliases.items():
            out[alias] = self.shadow[key]
        return out

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily use the EMA weights in ``model`` (e.g. for validation or sampling), then restore."""
        backup = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in unwrap(model).state_dict().items():
                    v.copy_(backup[k])

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()},
                "aliases": dict(self.aliases)}

    def load_state_dict(self, state: Dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]} ...: it was made from a different model")
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", self.warmup))
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            if k in self.shadow:
                self.shadow[k] = v.to(device=self.shadow[k].device, dtype=self.shadow[k].dtype).clone()
