"""Forward-process maths of DDPM: noise schedule, noising, prediction targets and their conversions.

Why a small class of plain tensors: trainers, the sampler and the feature extractor all need the same alpha-bar
table; everything else is a closed-form formula on it. Conventions (Ho et al. 2020; Salimans & Ho 2022)::

    x_t = sqrt(ab_t) * x0 + sqrt(1 - ab_t) * eps          (ab = alpha_bar = cumulative product of 1 - beta)
    v   = sqrt(ab_t) * eps - sqrt(1 - ab_t) * x0

Timesteps are integers 0..T-1; t = 0 is the least noisy step (ab_0 ~ 1), t = T-1 almost pure noise.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v")


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule: ab(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), betas clipped."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T + s) / (1 + s)) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020) linear schedule, rescaled so that any T spans the same noise range as T = 1000."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{prediction_type}'")


class NoiseSchedule:
    """alpha-bar table of a ``kind`` ('cosine' | 'linear') schedule with ``T`` steps, plus the closed-form maths."""

    def __init__(self, T: int = 1000, kind: str = "cosine"):
        if kind == "cosine":
            betas = cosine_betas(T)
        elif kind == "linear":
            betas = linear_betas(T)
        else:
            raise ValueError(f"unknown schedule kind '{kind}' (use 'cosine' or 'linear')")
        self.T = int(T)
        self.kind = kind
        self.betas = betas                                       # float64, CPU
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)    # float64, CPU
        self._cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.T}, kind='{self.kind}')"

    # --------------------------------------------------------------- gathering
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            ab = self.alphas_cumprod
            table = {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(), "ab": ab}[name]
            self._cache[key] = table.to(device=device, dtype=torch.float32)
        return self._cache[key]

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample coefficient at integer timesteps ``t`` (B,), shaped to broadcast against ``like`` (B, C, ...)."""
        t = torch.as_tensor(t, device=like.device).long()
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if t.min() < 0 or t.max() >= self.T:
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}]")
        out = self._table(name, like.device)[t]
        return out.reshape((-1,) + (1,) * (like.ndim - 1))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[torch.as_tensor(t).long().cpu()]

    def sample_timesteps(self, batch: int, generator: Optional[torch.Generator] = None,
                         device: Optional[torch.device] = None) -> torch.Tensor:
        """Uniform integer timesteps; drawn on the CPU so a seeded generator gives the same t on any device."""
        t = torch.randint(0, self.T, (batch,), generator=generator)
        return t.to(device) if device is not None else t

    # --------------------------------------------------------------- forward process and targets
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (computed in float32, returned in x0's dtype)."""
        a = self._gather("sqrt_ab", t, x0)
        s = self._gather("sqrt_1m_ab", t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str = "epsilon"
               ) -> torch.Tensor:
        """What the network learns to predict: the noise ('epsilon') or the velocity ('v')."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise
        return self.velocity(x0, noise, t)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._gather("sqrt_ab", t, x0)
        s = self._gather("sqrt_1m_ab", t, x0)
        return a * noise.float() - s * x0.float()

    def predict_x0_from(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor,
                        prediction_type: str = "epsilon") -> torch.Tensor:
        """Clean-image estimate from a network output of the given type."""
        _check_prediction_type(prediction_type)
        a = self._gather("sqrt_ab", t, x_t)
        s = self._gather("sqrt_1m_ab", t, x_t)
        x_t, out = x_t.float(), model_output.float()
        if prediction_type == "epsilon":
            return (x_t - s * out) / a
        return a * x_t - s * out

    def predict_eps_from(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor,
                         prediction_type: str = "epsilon") -> torch.Tensor:
        """Noise estimate from a network output of the given type."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return model_output.float()
        a = self._gather("sqrt_ab", t, x_t)
        s = self._gather("sqrt_1m_ab", t, x_t)
        return s * x_t.float() + a * model_output.float()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self._gather("sqrt_ab", t, x_t)
        s = self._gather("sqrt_1m_ab", t, x_t)
        return (x_t.float() - a * x0.float()) / s


def diffusion_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                   x0: torch.Tensor, prediction_type: str = "epsilon", generator: Optional[torch.Generator] = None,
                   t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between ``model(x_t, t)`` and the target, with t uniform and Gaussian noise (both from ``generator``,
    drawn on the CPU so a seed gives the same batch on any device). The MSE is taken in float32 (safe under AMP)."""
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator=generator)
    t = t.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    prediction = model(x_t, t)
    return F.mse_loss(prediction.float(), schedule.target(x0, noise, t, prediction_type).float())
