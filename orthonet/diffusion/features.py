"""Diffusion features: noise a volume at timestep(s) t, run the denoiser once, keep multi-scale activations.

Why: a denoiser trained on unlabeled scans has learned anatomy; its activations at a moderate noise level are good
features for segmentation and diagnosis (Baranchuk et al. 2022; OrthoDiffusion 2026).

Defaults (see docs/networks.md):

* ``t = 100`` of T = 1000 (:data:`DEFAULT_T`). The literature finds t between about 50 and 250 best: smaller t gives
  features of an almost clean image (little denoising "effort"), larger t destroys the fine structure. Several
  timesteps, e.g. ``t=[50, 150, 250]``, can be concatenated along channels.
* ``levels = None``: the last three encoder stages (:data:`orthonet.networks.build.DEFAULT_FEATURE_LEVELS`), i.e.
  the semantic half of the encoder down to the bottleneck.
* the noise is drawn from ``seed`` on the CPU, identical for every t and every call: the same volume always gives the
  same features, on any device.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from orthonet.diffusion.ema import unwrap
from orthonet.diffusion.schedule import NoiseSchedule
from orthonet.networks.build import resolve_levels
from orthonet.networks.diffusion_unet import DiffusionUNet

#: Default feature timestep (of T = 1000).
DEFAULT_T = 100

TimeArg = Union[None, int, Sequence[int]]


def _spatial_dims(module: nn.Module) -> int:
    encoder = getattr(module, "encoder", module)
    conv_op = getattr(encoder, "conv_op", None)
    if conv_op is None:
        raise TypeError("expected a DiffusionUNet, a DNA U-Net or a DNA encoder (PlainConvEncoder/ResidualEncoder)")
    return 3 if conv_op.__name__.endswith("3d") else 2


def _run(module: nn.Module, x: torch.Tensor, t: Optional[int], include_decoder: bool):
    """(encoder skips, decoder stage outputs or None) of one forward pass."""
    if isinstance(module, DiffusionUNet):
        out = module.forward_features(x, t, include_decoder)
        return out["encoder"], out.get("decoder")
    encoder = getattr(module, "encoder", module)
    skips = encoder(x)
    if not isinstance(skips, (list, tuple)):
        raise TypeError("the encoder must return its skips (build it with return_skips=True / build_encoder)")
    decoder_feats = None
    if include_decoder:
        decoder = getattr(module, "decoder", None)
        if decoder is None:
            raise ValueError("include_decoder=True needs a model with a decoder, not an encoder alone")
        decoder_feats = []
        handles = [s.register_forward_hook(lambda m, i, o: decoder_feats.append(o)) for s in decoder.stages]
        try:
            decoder(skips)
        finally:
            for h in handles:
                h.remove()
    return list(skips), decoder_feats


def _total_stride(module: nn.Module, dims: int) -> List[int]:
    """Product of the encoder's strides per axis (the decoder needs inputs divisible by it)."""
    encoder = getattr(module, "encoder", module)
    total = [1] * dims
    for s in getattr(encoder, "strides", []):
        s = [int(s)] * dims if isinstance(s, int) else [int(v) for v in s]
        total = [a * b for a, b in zip(total, s)]
    return total


def _pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes at their end up to a multiple of ``multiple``."""
    pad: List[int] = []
    for n, m in zip(reversed(x.shape[2:]), reversed(list(multiple))):
        pad += [0, (-int(n)) % int(m)]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def _crop_like(feature: torch.Tensor, original: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """Crop a feature map of a padded input to the part that covers the original input."""
    keep = [-(-int(f) * int(o) // int(p)) for f, o, p in zip(feature.shape[2:], original, padded)]
    return feature[(slice(None), slice(None)) + tuple(slice(0, k) for k in keep)]


@torch.no_grad()
def extract_features(model_or_encoder: nn.Module, volume: torch.Tensor, t: TimeArg = DEFAULT_T,
                     levels: Optional[Sequence[int]] = None, seed: int = 0, include_decoder: bool = False,
                     schedule: Optional[NoiseSchedule] = None, decoder_levels: Optional[Sequence[int]] = None
                     ) -> List[torch.Tensor]:
    """Multi-scale feature maps of ``volume`` ((B, C, *spatial) or unbatched (C, *spatial)).

    * ``model_or_encoder``: a :class:`DiffusionUNet` (typically with EMA weights; time-conditioned at each t), a DNA
      U-Net, or a bare DNA encoder (e.g. a downstream encoder initialised from the denoiser). Non-diffusion modules
      see the noised input without time conditioning.
    * ``t``: a timestep, a list of timesteps (features concatenated along channels, in the order given), or
      ``None`` for the clean input (no noise).
    * ``levels``: encoder stage indices (negative allowed; None = the last three stages).
    * ``include_decoder``: also return decoder stage outputs (``decoder_levels``: indices into the decoder's
      stages in computation order, low to high resolution; None = all), appended after the encoder levels.

    Returns one tensor per selected level, shape (B, C_level * len(t), *spatial_level), float32. The module is run
    in eval mode and restored to its previous mode afterwards. With the decoder, volumes of any size work: the input
    is zero-padded to a multiple of the encoder's total stride and the feature maps are cropped back.
    """
    module = unwrap(model_or_encoder)
    dims = _spatial_dims(module)
    unbatched = volume.ndim == dims + 1
    x = volume[None] if unbatched else volume
    if x.ndim != dims + 2:
        raise ValueError(f"volume must be (B, C, *spatial) or (C, *spatial) with {dims} spatial dims, "
                         f"got shape {tuple(volume.shape)}")
    device = next(module.parameters()).device
    x = x.to(device=device, dtype=torch.float32)
    timesteps: List[Optional[int]] = [None] if t is None else ([int(t)] if isinstance(t, int) else [int(v) for v in t])
    if not timesteps:
        raise ValueError("t must be None, an int or a non-empty list of ints")
    schedule = schedule or NoiseSchedule()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed))).to(device)
    original = list(x.shape[2:])
    was_training = module.training
    module.eval()
    per_t: List[List[torch.Tensor]] = []
    try:
        for step in timesteps:
            x_in = x if step is None else schedule.q_sample(x, torch.full((x.shape[0],), step, device=device), noise)
            if include_decoder:
                x_in = _pad_to_multiple(x_in, _total_stride(module, dims))
            padded = list(x_in.shape[2:])
            skips, dec = _run(module, x_in, step, include_decoder)
            skips = [_crop_like(f, original, padded) for f in skips]
            dec = None if dec is None else [_crop_like(f, original, padded) for f in dec]
            chosen = [skips[i] for i in resolve_levels(levels, len(skips))]
            if include_decoder:
                dl = list(range(len(dec))) if decoder_levels is None else resolve_levels(decoder_levels, len(dec))
                chosen += [dec[i] for i in dl]
            per_t.append([f.float() for f in chosen])
    finally:
        module.train(was_training)
    feats = [torch.cat(level, dim=1) if len(level) > 1 else level[0] for level in zip(*per_t)]
    return [f[0] for f in feats] if unbatched else feats
