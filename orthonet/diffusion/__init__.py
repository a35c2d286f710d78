"""Diffusion maths (schedule, sampling, EMA) and diffusion features. Networks live in :mod:`orthonet.networks`."""
from orthonet.diffusion.ema import EMA, unwrap
from orthonet.diffusion.features import DEFAULT_T, extract_features
from orthonet.diffusion.sampling import ddim_sample, ddim_timesteps
from orthonet.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule, diffusion_loss

__all__ = ["EMA", "unwrap", "DEFAULT_T", "extract_features", "ddim_sample", "ddim_timesteps", "PREDICTION_TYPES",
           "NoiseSchedule", "diffusion_loss"]
