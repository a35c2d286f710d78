"""DDIM sampling (Song et al. 2021): draw images from a trained denoiser in a few dozen steps.

Why DDIM: with ``eta=0`` it is deterministic given the starting noise, so ``ortho_sample`` with a seed reproduces its
montage; ``eta=1`` recovers DDPM-like stochastic sampling.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from tqdm import tqdm

from orthonet.diffusion.schedule import NoiseSchedule


def ddim_timesteps(T: int, steps: int) -> torch.Tensor:
    """``steps`` integer timesteps evenly spread over [0, T-1], descending (first = T-1, last = 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, {T}]")
    ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.unique_consecutive(ts)


def _generator(generator: Union[None, int, torch.Generator]) -> Optional[torch.Generator]:
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


@torch.no_grad()
def ddim_sample(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: Sequence[int], steps: int = 50,
                eta: float = 0.0, generator: Union[None, int, torch.Generator] = None,
                prediction_type: str = "epsilon", schedule: Optional[NoiseSchedule] = None,
                device: Union[None, str, torch.device] = None, clip_x0: Optional[float] = None,
                x_T: Optional[torch.Tensor] = None, progress: bool = True,
                autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sample a batch of ``shape`` (B, C, *spatial) with DDIM.

    ``generator`` (a seed or a CPU ``torch.Generator``) drives all noise, drawn on the CPU so that a seed gives the
    same samples on any device. ``clip_x0`` clamps the clean-image estimate to [-clip_x0, clip_x0] at every step
    (useful for [-1, 1] data; z-scored MRI is unbounded, so off by default). The model is put in eval mode for the
    duration and restored afterwards. Returns float32 on ``device``.
    """
    schedule = schedule or NoiseSchedule()
    gen = _generator(generator)
    if device is None:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    x = (torch.randn(tuple(shape), generator=gen) if x_T is None else x_T.float().cpu()).to(device)
    ts = ddim_timesteps(schedule.T, steps)
    ab = schedule.alphas_cumprod
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        for i, t in enumerate(tqdm(ts.tolist(), desc="DDIM", disable=not progress, leave=False)):
            t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            if autocast_dtype is not None:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    out = model(x, t_batch)
            else:
                out = model(x, t_batch)
            x0 = schedule.predict_x0_from(x, t_batch, out, prediction_type)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            eps = schedule.eps_from_x0(x, t_batch, x0)
            a_t = float(ab[t])
            a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            x = a_prev ** 0.5 * x0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=gen).to(device)
    finally:
        if was_training:
            model.train()
    return x
