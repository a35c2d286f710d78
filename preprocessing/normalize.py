"""Intensity normalisation, per channel, chosen by name in the plan.

Why per image for MRI: MR intensities have no physical unit and vary between scanners and sessions, so nnU-Net
normalises every MR image with its own mean and standard deviation (z-score). We do the same (scheme ``zscore``):
the dataset statistics in the plan are then informative only. CT-like channels (channel name ``CT``) use the
dataset's foreground statistics instead (scheme ``ct``: clip to the 0.5/99.5 percentiles, subtract the mean,
divide by the standard deviation). With ``use_mask_for_norm`` (set by the planner when cropping removed a large
part of the images) the z-score is computed inside the nonzero mask only and the outside is set to 0.

A new scheme is one function registered in :data:`NORMALIZERS`; a plan names it per view or per channel.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from orthonet.errors import OrthoError

Normalizer = Callable[[np.ndarray, Dict, Optional[np.ndarray]], np.ndarray]
_EPS = 1e-8


def zscore(image: np.ndarray, stats: Dict, mask: Optional[np.ndarray]) -> np.ndarray:
    """Per-image z-score (inside ``mask`` only when a mask is given; the outside becomes 0)."""
    image = image.astype(np.float32, copy=False)
    if mask is not None:
        values = image[mask]
        mean, std = (float(values.mean()), float(values.std())) if values.size else (0.0, 1.0)
        out = np.zeros_like(image)
        out[mask] = (values - mean) / max(std, _EPS)
        return out
    mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    image = image - np.float32(mean)
    image /= np.float32(max(std, _EPS))
    return image


def ct(image: np.ndarray, stats: Dict, mask: Optional[np.ndarray]) -> np.ndarray:
    """Clip to the dataset's foreground percentiles, then z-score with the dataset's foreground mean/std."""
    for key in ("mean", "std", "percentile_00_5", "percentile_99_5"):
        if key not in stats:
            raise OrthoError(f"normalisation scheme 'ct' needs '{key}' in the plan's per-channel statistics",
                             fix="re-plan with `ortho_plan_and_preprocess --overwrite` or add the value to the plans")
    image = np.clip(image.astype(np.float32, copy=False), stats["percentile_00_5"], stats["percentile_99_5"])
    image -= np.float32(stats["mean"])
    image /= np.float32(max(float(stats["std"]), _EPS))
    return image


def rescale_to_0_1(image: np.ndarray, stats: Dict, mask: Optional[np.ndarray]) -> np.ndarray:
    """Per-image min-max scaling to [0, 1]."""
    image = image.astype(np.float32, copy=False)
    lo, hi = float(image.min()), float(image.max())
    return (image - np.float32(lo)) / np.float32(max(hi - lo, _EPS))


def no_normalization(image: np.ndarray, stats: Dict, mask: Optional[np.ndarray]) -> np.ndarray:
    return image.astype(np.float32, copy=False)


#: scheme name -> function(image (z, y, x), channel statistics, mask or None) -> normalised float32 image
NORMALIZERS: Dict[str, Normalizer] = {"zscore": zscore, "ct": ct, "rescale_to_0_1": rescale_to_0_1,
                                      "none": no_normalization}
#: schemes whose result is only meaningful inside the nonzero mask (the planner may turn on use_mask_for_norm)
MASKABLE = {"zscore"}


def register_normalizer(name: str, fn: Normalizer, maskable: bool = False) -> None:
    """Make a custom scheme available to plans (call before preprocessing, e.g. in a plugin module)."""
    NORMALIZERS[name] = fn
    if maskable:
        MASKABLE.add(name)


def scheme_for_channel(channel_name: str) -> str:
    """Default scheme for a channel, from its name in dataset.json (nnU-Net's convention)."""
    key = channel_name.strip().lower()
    if key == "ct":
        return "ct"
    if key in ("nonorm", "none"):
        return "none"
    if key in ("rescale_to_0_1", "rgb_to_0_1"):
        return "rescale_to_0_1"
    return "zscore"


def channel_scheme(normalization: Dict, channel: int) -> str:
    per = normalization.get("per_channel", {}).get(str(channel), {})
    return str(per.get("scheme", normalization.get("scheme", "zscore")))


def normalize(data: np.ndarray, normalization: Dict, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Normalise every channel of ``data`` (C, z, y, x) as the plan's ``normalization`` entry says.

    ``mask`` is the nonzero mask, used only when ``use_mask_for_norm`` is set and the scheme is maskable.
    """
    out = np.empty(data.shape, np.float32)
    use_mask = bool(normalization.get("use_mask_for_norm", False))
    for c in range(data.shape[0]):
        scheme = channel_scheme(normalization, c)
        if scheme not in NORMALIZERS:
            raise OrthoError(f"unknown normalisation scheme '{scheme}' in the plans",
                             fix=f"use one of {sorted(NORMALIZERS)} or register yours with "
                                 "orthonet.preprocessing.normalize.register_normalizer")
        stats = normalization.get("per_channel", {}).get(str(c), {})
        m = mask if (use_mask and scheme in MASKABLE) else None
        out[c] = NORMALIZERS[scheme](data[c], stats, m)
    return out
