"""Model-level prediction on preprocessed arrays: the part shared by the trainers' final validation and
``ortho_predict``.

Why shared: the held-out validation that picks thresholds must predict exactly as deployment does (same sliding
window, same Gaussian weighting, same mirroring, same diagnosis crops), or the thresholds it picks are for a
different model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from orthonet.inference.sliding_window import sliding_window_predict
from orthonet.inference.tta import make_tta_predictor
from orthonet.errors import OrthoError
from orthonet.fileio import load_json
from orthonet.training.checkpoint import load_checkpoint
from orthonet.training.data.sampling import center_bbox
from orthonet.training.model_factory import ModelConfig, build_model, has_diagnosis, has_segmentation
from orthonet.training.runtime import autocast, memory_format_for

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class LoadedModel:
    """A trained model ready for inference plus what is needed to feed it."""

    model: nn.Module
    config: ModelConfig
    plans: Dict
    fold_dir: Path
    device: torch.device

    @property
    def configuration(self) -> str:
        return self.config.configuration

    def view_config(self, view: str) -> Dict:
        return self.plans["views"][view]["configurations"][self.config.configuration]

    def patch_size(self, view: str) -> List[int]:
        return [int(p) for p in self.view_config(view)["patch_size"]]

    def mirror_axes(self, view: str, requested: Sequence[int]) -> List[int]:
        """The ``requested`` TTA axes that ``view`` was mirrored along in training (the model description's
        ``allowed_mirroring_axes``; every spatial axis for models trained before it was stored)."""
        allowed = self.config.mirror_axes(view, len(self.patch_size(view)))
        return [int(a) for a in requested if int(a) in allowed]


def load_trained_model(fold_dir: Union[str, Path], device: torch.device,
                       checkpoint_name: str = "checkpoint_final.pt") -> LoadedModel:
    """Rebuild a trained model from its fold folder (checkpoint + the plans copy in the parent folder)."""
    fold_dir = Path(fold_dir)
    ckpt_path = fold_dir / checkpoint_name
    if not ckpt_path.is_file() and checkpoint_name == "checkpoint_final.pt":
        alt = fold_dir / "checkpoint_best.pt"
        if alt.is_file():
            ckpt_path = alt
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    extra = ckpt.get("extra") or {}
    if "model_config" not in extra:
        raise OrthoError("checkpoint has no model description (was it written by ortho_train?)", ckpt_path,
                         fix="point at a fold folder written by ortho_train")
    plans = load_json(fold_dir.parent / "plans.json", "plans copy of the trained model")
    cfg = ModelConfig.from_dict(extra["model_config"])
    model = build_model(plans, cfg)
    model.load_state_dict(ckpt["model"])
    # channels_last(_3d) on CUDA as in training (cuDNN's fast convolution layout); contiguous on the CPU
    spatial = len(next(iter(plans["views"].values()))["configurations"][cfg.configuration]["patch_size"])
    model.to(device, memory_format=memory_format_for(spatial + 2, device)).eval()
    return LoadedModel(model, cfg, plans, fold_dir, device)


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _segment_fn(model: nn.Module, device: torch.device):
    def predict(patch: torch.Tensor) -> torch.Tensor:
        x = patch.to(device).contiguous(memory_format=memory_format_for(patch.ndim, device))
        with torch.no_grad(), autocast(device):
            out = model.segment(x) if hasattr(model, "segment") else model(x)
        if isinstance(out, (list, tuple)):      # deep supervision: full resolution first
            out = out[0]
        return out.float()
    return predict


def _fused_segment_fn(loaded: LoadedModel, context: Mapping[str, ArrayLike],
                      properties_by_view: Mapping[str, Dict]):
    """Tile predictor for ``--fuse-views`` models: each tile gets the other views' crops centred on the same
    physical point, every crop's affine and image extent (the crop's voxels inside the view's volume), exactly as
    the aligned training loaders build them (:class:`orthonet.training.data.sources.AlignedContext`); a view the case lacks
    is not given, which the fusion treats as training treats an empty extent (zeros, coverage 0)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from orthonet.networks.cross_view import crop_extent, patch_affine, preprocessed_index_to_physical
    from orthonet.training.data.sampling import aligned_bbox, patch_center_physical
    cfg = loaded.config
    seg_view = cfg.segmentation_view
    arrays = {v: np.asarray(d) for v, d in context.items() if v in cfg.views and v != seg_view}
    affine = {v: preprocessed_index_to_physical(properties_by_view[v]) for v in [seg_view, *arrays]}
    patch = loaded.patch_size(seg_view)

    def predict(x: torch.Tensor, offsets) -> torch.Tensor:
        inputs = {seg_view: x.to(loaded.device)}
        affines = {seg_view: [], **{v: [] for v in arrays}}
        crops = {v: [] for v in arrays}
        extents = {v: [] for v in arrays}
        for off in offsets:
            bbox = [[int(o), int(o) + p] for o, p in zip(off, patch)]
            affines[seg_view].append(patch_affine(affine[seg_view], off))
            center = patch_center_physical(affine[seg_view], bbox)
            for v, arr in arrays.items():
                vb = aligned_bbox(affine[v], center, loaded.patch_size(v))
                crops[v].append(torch.from_numpy(np.asarray(crop_and_pad_nd(arr, vb, 0), dtype=np.float32)))
                affines[v].append(patch_affine(affine[v], [b[0] for b in vb]))
                extents[v].append(crop_extent(vb, arr.shape[1:]))
        for v in arrays:
            inputs[v] = torch.stack(crops[v]).to(loaded.device)
        aff = {v: torch.from_numpy(np.stack(a)).to(loaded.device) for v, a in affines.items()}
        ext = {v: torch.from_numpy(np.stack(e)).to(loaded.device) for v, e in extents.items()}
        with torch.no_grad(), autocast(loaded.device):
            out = loaded.model.segment(inputs, affines=aff, extents=ext)
        return (out[0] if isinstance(out, (list, tuple)) else out).float()
    return predict


def segmentation_logits(loaded: LoadedModel, data: ArrayLike, mirror_axes: Sequence[int] = (0, 1, 2),
                        step_size: float = 0.5, progress: bool = False,
                        context: Optional[Mapping[str, ArrayLike]] = None,
                        properties_by_view: Optional[Mapping[str, Dict]] = None,
                        tile_batch: int = 0) -> torch.Tensor:
    """Sliding-window (Gaussian-weighted, step 0.5) logits (K, *shape) of the segmentation view's preprocessed
    image (C, *shape), averaged over mirrorings along those of ``mirror_axes`` that the model allows
    (:meth:`LoadedModel.mirror_axes`; ``()`` turns TTA off).

    ``--fuse-views`` models also need the other views' preprocessed arrays (``context``) and every view's
    preprocessing properties; mirroring is not applied to them (a flip would break the physical alignment).
    ``tile_batch`` tiles go through the network at once (0: :func:`default_tile_batch` for the device).
    """
    batch = int(tile_batch) or default_tile_batch(loaded.device)
    cfg = loaded.config
    view = cfg.segmentation_view
    patch = loaded.patch_size(view)
    image = _as_tensor(data).float()
    if cfg.fuse_views:
        if context is None or properties_by_view is None:
            raise OrthoError("this model fuses views: segmentation needs the other views and their properties")
        fn = _fused_segment_fn(loaded, context, properties_by_view)
        return sliding_window_predict(fn, image, patch, cfg.num_classes, step_size=step_size,
                                      device=loaded.device, progress=progress, pass_offsets=True, batch_size=batch)
    fn = make_tta_predictor(_segment_fn(loaded.model, loaded.device), loaded.mirror_axes(view, mirror_axes))
    return sliding_window_predict(fn, image, patch, cfg.num_classes, step_size=step_size, device=loaded.device,
                                  progress=progress, batch_size=batch)


def default_tile_batch(device: torch.device) -> int:
    """Tiles per forward pass: 1 on the CPU (a bigger batch only adds memory there; the cores are busy with one
    tile), 4 on a GPU (one tile rarely fills it; nnU-Net's one-tile loop leaves it idle between launches)."""
    return 4 if torch.device(device).type == "cuda" else 1


def center_crop(data: ArrayLike, patch: Sequence[int]) -> torch.Tensor:
    """The deterministic centre crop (zero-padded where the volume is smaller) that training validates on."""
    arr = _as_tensor(data).float()
    bbox = center_bbox(arr.shape[1:], patch)
    out = torch.zeros((arr.shape[0], *patch), dtype=arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    for (lo, hi), n in zip(bbox, arr.shape[1:]):
        s0, s1 = max(lo, 0), min(hi, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo, s0 - lo + max(0, s1 - s0)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def diagnosis_logits(loaded: LoadedModel, inputs_by_view: Mapping[str, ArrayLike],
                     mirror_axes: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Fused diagnosis logits (D,) from the views present: whole volumes for whole-exam models
    (:func:`whole_exam_logits`); for the old centre-crop models the centre crop of each view's patch size, averaged
    over joint mirrorings of all views, each view flipped only along the axes it allows
    (:meth:`LoadedModel.mirror_axes`). Views the model does not know are ignored; missing views degrade gracefully."""
    views = [v for v in loaded.config.views if v in inputs_by_view]
    if not views:
        raise OrthoError(f"none of the model's views {loaded.config.views} is available for diagnosis")
    if loaded.config.diagnosis_input == "whole":
        return whole_exam_logits(loaded, {v: inputs_by_view[v] for v in views})
    crops = {v: center_crop(inputs_by_view[v], loaded.patch_size(v))[None].to(loaded.device) for v in views}
    present = {v: torch.ones(1, dtype=torch.bool, device=loaded.device) for v in views}
    allowed = {v: loaded.mirror_axes(v, mirror_axes) for v in views}
    axes = sorted({a for ax in allowed.values() for a in ax})
    combos = [()] + [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    total = None
    with torch.no_grad(), autocast(loaded.device):
        for combo in combos:
            x = {v: _flip(t, [a for a in combo if a in allowed[v]]) for v, t in crops.items()}
            out = loaded.model.diagnose(x, present)["logits"].float()
            total = out if total is None else total + out
    return (total / len(combos))[0].cpu().numpy()


def _flip(t: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """``t`` (B, C, *spatial) flipped along the spatial ``axes`` (itself when there are none)."""
    return torch.flip(t, [a + 2 for a in axes]) if axes else t


def whole_exam_logits(loaded: LoadedModel, inputs_by_view: Mapping[str, ArrayLike], seed: int = 0) -> np.ndarray:
    """Fused logits (D,) of a whole-exam model from each given view's whole preprocessed volume (C, *shape).

    No mirroring test-time augmentation: a flip swaps medial and lateral, and with them the meaning of half the
    knee's labels. Volumes above the model's ``tile_voxels`` are encoded tile by tile (bounded memory); the
    diffusion-feature noise (``feature_t``) is drawn from ``seed``, so an exam always gets the same answer."""
    x = {v: _as_tensor(a).float()[None].to(loaded.device) for v, a in inputs_by_view.items()}
    present = {v: torch.ones(1, dtype=torch.bool, device=loaded.device) for v in x}
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad(), autocast(loaded.device):
        out = loaded.model.diagnose(x, present, None, generator=gen)["logits"].float()
    return out[0].cpu().numpy()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def predict_preprocessed_case(models: Sequence[LoadedModel], data_by_view: Mapping[str, ArrayLike],
                              mirror_axes: Sequence[int] = (0, 1, 2), step_size: float = 0.5,
                              progress: bool = False, properties_by_view: Optional[Mapping[str, Dict]] = None,
                              segmentation: bool = True, diagnosis: bool = True, tile_batch: int = 0) -> Dict:
    """Ensemble prediction of one preprocessed case over ``models`` (e.g. folds).

    Returns ``{'seg_probabilities': (K, *shape) tensor or None, 'diag_probabilities': (n_models, D) array or None}``;
    segmentation probabilities are the mean of each segmenting model's softmax, diagnosis probabilities are kept
    per model so the caller can report the ensemble's spread. ``segmentation=False`` / ``diagnosis=False`` skip
    that part (e.g. a multitask model used only for its segmentation).
    """
    seg_sum, n_seg, diag = None, 0, []
    seg_view = models[0].config.segmentation_view
    for m in models:
        if segmentation and has_segmentation(m.config) and seg_view in data_by_view:
            logits = segmentation_logits(m, data_by_view[seg_view], mirror_axes, step_size, progress,
                                         context=data_by_view, properties_by_view=properties_by_view,
                                         tile_batch=tile_batch)
            probs = torch.softmax(logits, 0)
            seg_sum = probs if seg_sum is None else seg_sum + probs
            n_seg += 1
        if diagnosis and has_diagnosis(m.config):
            diag.append(sigmoid(diagnosis_logits(m, data_by_view, mirror_axes)))
    return {"seg_probabilities": None if seg_sum is None else seg_sum / n_seg,
            "diag_probabilities": np.stack(diag) if diag else None}
