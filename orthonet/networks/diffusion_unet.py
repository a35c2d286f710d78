"""The denoising U-Net of diffusion pretraining: the plan's DNA U-Net plus timestep conditioning.

Why this shape: the whole point of pretraining is that the encoder's weights load into the segmentation and
diagnosis networks built from the same plan. So the DNA encoder and decoder are kept *untouched* (same classes, same
parameter names) and the timestep enters from the side:

* ``time_embed``: sinusoidal embedding of t followed by an MLP (DDPM / guided-diffusion style);
* ``time_proj``: one ``Linear(time_dim, 2*C)`` per conv block that has a norm followed by a nonlinearity, in every
  encoder and decoder stage (including the residual encoder's stem and each residual block's first conv);
* a forward hook on each of those norm modules applies FiLM, ``h = norm(h) * (1 + scale) + shift``, before the
  block's nonlinearity runs.

The projections are zero-initialised, so an untrained denoiser computes exactly the plain U-Net. State-dict keys are
those of the DNA network (``encoder.*``, ``decoder.*``, incl. DNA's ``decoder.encoder.*`` alias) plus
``time_embed.*`` and ``time_proj.*``.

For a fixed timestep the FiLM is an affine map per channel, so it can be folded exactly into the norm's affine
weight and bias (:meth:`DiffusionUNet.folded_state_dict`): a plain DNA network loaded with the folded weights computes
what the denoiser computes at that t.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn

from orthonet.networks.build import build_network, encoder_output_channels

TimeLike = Union[int, float, torch.Tensor]


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of (possibly fractional) timesteps; no parameters."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError("embedding dim must be even")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t -> sinusoid -> Linear -> SiLU -> Linear (guided-diffusion's ``time_embed``)."""

    def __init__(self, freq_dim: int, time_dim: int):
        super().__init__()
        self.sinusoid = SinusoidalTimeEmbedding(freq_dim)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t))


class _FiLMHook:
    """Forward hook of one norm module: scale-shift its output with the owner's current time embedding.

    A callable object (not a closure) so that ``copy.deepcopy`` of the denoiser (e.g. for EMA) re-points the hook at
    the copy rather than at the original.
    """

    def __init__(self, owner: "DiffusionUNet", key: str):
        self.owner = owner
        self.key = key

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> Optional[torch.Tensor]:
        emb = self.owner._current_emb
        if emb is None:          # used outside a timestep-conditioned forward: the plain U-Net
            return None
        scale, shift = self.owner.time_proj[self.key](emb).chunk(2, dim=1)
        shape = (scale.shape[0], scale.shape[1]) + (1,) * (output.ndim - 2)
        scale = scale.reshape(shape).to(output.dtype)
        shift = shift.reshape(shape).to(output.dtype)
        return torch.addcmul(shift, output, 1 + scale)


def _film_points(root: nn.Module, prefix: str) -> List[Tuple[str, str, nn.Module, int]]:
    """(proj key, module path, module to hook, channels) for every conv block whose norm feeds a nonlinearity.

    The decoder's DNA alias of the encoder (``decoder.encoder``) is skipped so encoder blocks are hooked once.
    """
    points = []
    for name, m in root.named_modules():
        if prefix == "decoder" and (name == "encoder" or name.startswith("encoder.")):
            continue
        if isinstance(m, ConvDropoutNormReLU) and hasattr(m, "nonlin"):
            target, sub = (m.norm, "norm") if hasattr(m, "norm") else (m.conv, "conv")
            path = f"{prefix}.{name}.{sub}"
            points.append((path.replace(".", "__"), path, target, int(m.output_channels)))
    return points


def _as_timesteps(t: TimeLike, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


class DiffusionUNet(nn.Module):
    """The plan's U-Net with timestep FiLM in every encoder and decoder stage. ``forward(x_t, t) -> prediction``.

    ``prediction_channels`` defaults to ``input_channels`` (epsilon or v has the image's channels).
    ``time_embed_dim`` defaults to 4x the first stage's features (at least 64), as in guided diffusion.
    """

    def __init__(self, spec: Dict, input_channels: int, time_embed_dim: Optional[int] = None,
                 prediction_channels: Optional[int] = None):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.input_channels = int(input_channels)
        self.prediction_channels = int(prediction_channels or input_channels)
        net = build_network(spec, self.input_channels, self.prediction_channels, deep_supervision=False)
        self.encoder = net.encoder
        self.decoder = net.decoder
        first = encoder_output_channels(spec)[0]
        freq_dim = max(32, first + first % 2)
        self.time_embed_dim = int(time_embed_dim or max(64, 4 * first))
        self.time_embed = TimestepEmbedding(freq_dim, self.time_embed_dim)
        self.time_proj = nn.ModuleDict()
        self._film_paths: Dict[str, str] = {}
        self._current_emb: Optional[torch.Tensor] = None
        points = _film_points(self.encoder, "encoder") + _film_points(self.decoder, "decoder")
        for key, path, module, channels in points:
            proj = nn.Linear(self.time_embed_dim, 2 * channels)
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
            self.time_proj[key] = proj
            self._film_paths[key] = path
            module.register_forward_hook(_FiLMHook(self, key))
        # DNA builds a 1x1 output conv per decoder stage; without deep supervision only the last runs. Freezing the
        # others keeps DistributedDataParallel free of unused parameters (no find_unused_parameters needed).
        for layer in list(self.decoder.seg_layers)[:-1]:
            layer.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _embed(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.time_embed(_as_timesteps(t, x.shape[0], x.device)))

    def forward(self, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
        self._current_emb = self._embed(t, x_t)
        try:
            return self.decoder(self.encoder(x_t))
        finally:
            self._current_emb = None

    def forward_features(self, x_t: torch.Tensor, t: Optional[TimeLike], include_decoder: bool = False
                         ) -> Dict[str, List[torch.Tensor]]:
        """Encoder skips (bottleneck last) and, optionally, each decoder stage's output (low to high resolution).

        ``t=None`` runs without time conditioning (the plain U-Net path).
        """
        self._current_emb = None if t is None else self._embed(t, x_t)
        try:
            skips = self.encoder(x_t)
            out: Dict[str, List[torch.Tensor]] = {"encoder": list(skips)}
            if include_decoder:
                captured: List[torch.Tensor] = []
                handles = [s.register_forward_hook(lambda m, i, o: captured.append(o)) for s in self.decoder.stages]
                try:
                    self.decoder(skips)
                finally:
                    for h in handles:
                        h.remove()
                out["decoder"] = captured
            return out
        finally:
            self._current_emb = None

    # ------------------------------------------------------------------ weights for downstream
    @torch.no_grad()
    def folded_state_dict(self, t: Optional[TimeLike] = None) -> Dict[str, torch.Tensor]:
        """``encoder.*`` and ``decoder.*`` weights; with ``t``, the FiLM at that timestep folded into the norms.

        A plain DNA network loaded with ``folded_state_dict(t)`` computes exactly ``self(x, t)``. Needs affine norms
        (nnU-Net's default ``affine: True``) or, for norm-free blocks, a conv bias.
        """
        # DNA registers each conv/norm twice (``convs.0.norm`` and ``convs.0.all_modules.N``; the decoder also aliases
        # the encoder), so replacements are matched by tensor identity rather than by key.
        raw = {k: v for k, v in self.state_dict(keep_vars=True).items()
               if k.startswith("encoder.") or k.startswith("decoder.")}
        replace: Dict[int, torch.Tensor] = {}
        if t is not None:
            device = next(self.parameters()).device
            emb = F.silu(self.time_embed(_as_timesteps(t, 1, device)))
            for key, path in self._film_paths.items():
                module = self.get_submodule(path)
                w, b = getattr(module, "weight", None), getattr(module, "bias", None)
                if w is None or b is None:
                    raise ValueError(f"cannot fold the time embedding into {path}: it has no affine weight and "
                                     "bias (use affine norms, or load the unfolded weights)")
                scale, shift = self.time_proj[key](emb)[0].float().chunk(2)
                view = (-1,) + (1,) * (w.ndim - 1)          # conv weights: per output channel
                replace[id(w)] = (w.float() * (1 + scale).reshape(view)).to(w.dtype)
                replace[id(b)] = (b.float() * (1 + scale) + shift).to(b.dtype)
        return {k: replace.get(id(v), v).detach().clone() for k, v in raw.items()}

    def encoder_state_dict(self, t: Optional[TimeLike] = None) -> Dict[str, torch.Tensor]:
        """The ``encoder.*`` entries (prefix kept, as in a DNA network's state dict); FiLM folded at ``t`` if given.

        Loads into ``build_network(spec, ...)`` (its ``encoder.`` keys) and, through
        :func:`orthonet.networks.multitask.load_pretrained_encoder`, into any orthonet model's encoders.
        """
        return {k: v for k, v in self.folded_state_dict(t).items() if k.startswith("encoder.")}

    def decoder_state_dict(self, t: Optional[TimeLike] = None) -> Dict[str, torch.Tensor]:
        """The ``decoder.*`` entries without DNA's ``decoder.encoder.*`` alias (the encoder travels separately).

        The output layers (``decoder.seg_layers.*``) are included; they only load where the class count matches.
        """
        return {k: v for k, v in self.folded_state_dict(t).items()
                if k.startswith("decoder.") and not k.startswith("decoder.encoder.")}
