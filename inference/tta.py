"""Mirroring test-time augmentation and ensemble averaging.

Why: averaging a network's predictions over mirrored copies of the input (and over the folds of a
cross-validation) is a cheap, reliable gain in nnU-Net. Both are plain functions over a ``predict_fn`` so they
compose with :func:`orthonet.inference.sliding_window.sliding_window_predict` (wrap the patch predictor with
:func:`make_tta_predictor`) and with any model.
"""
from __future__ import annotations

import itertools
from typing import Callable, List, Sequence, Tuple

import torch

PredictFn = Callable[[torch.Tensor], torch.Tensor]


def mirror_combinations(mirror_axes: Sequence[int]) -> List[Tuple[int, ...]]:
    """All non-empty subsets of the spatial ``mirror_axes`` (0 = first spatial axis), as tensor dims (+2)."""
    dims = sorted({int(a) + 2 for a in mirror_axes})
    return [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]


def mirror_tta(predict_fn: PredictFn, x: torch.Tensor, mirror_axes: Sequence[int]) -> torch.Tensor:
    """Mean of ``predict_fn`` over the input and all its flips along ``mirror_axes`` (each output flipped back).

    ``x`` is (B, C, *spatial); ``mirror_axes`` index the spatial axes (nnU-Net's ``allowed_mirroring_axes``).
    With n axes this costs 2**n forward passes. Flips that the model was not trained with should not be listed.
    """
    if any(a < 0 or a >= x.ndim - 2 for a in mirror_axes):
        raise ValueError(f"mirror axes {tuple(mirror_axes)} out of range for {x.ndim - 2} spatial axes")
    combos = mirror_combinations(mirror_axes)
    out = predict_fn(x).float()
    for dims in combos:
        out += torch.flip(predict_fn(torch.flip(x, dims)), dims).float()
    return out / (len(combos) + 1)


def make_tta_predictor(predict_fn: PredictFn, mirror_axes: Sequence[int]) -> PredictFn:
    """``predict_fn`` with mirroring TTA (identity when ``mirror_axes`` is empty), for the sliding window."""
    axes = tuple(mirror_axes or ())
    if not axes:
        return predict_fn
    return lambda x: mirror_tta(predict_fn, x, axes)


def mean_and_std(predictions: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Element-wise mean and (population) standard deviation over an ensemble's predictions (e.g. folds).

    The spread is what diagnoses.csv reports as ``{name}_std``; it is 0 for a single model.
    """
    if not predictions:
        raise ValueError("no predictions to average")
    stacked = torch.stack([p.float() for p in predictions])
    return stacked.mean(0), stacked.std(0, unbiased=False)


class RunningMeanStd:
    """Mean and standard deviation over predictions added one at a time (Welford), for fold ensembles whose
    full-volume outputs should not all be held in memory at once."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def add(self, prediction: torch.Tensor) -> None:
        x = prediction.float()
        self.count += 1
        if self.mean is None:
            self.mean = x.clone()
            self._m2 = torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (x - self.mean)

    @property
    def std(self) -> torch.Tensor:
        if self.mean is None:
            raise ValueError("no predictions added")
        return (self._m2 / self.count).sqrt()
