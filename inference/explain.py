"""``--explain``: a saliency map of every diagnosis on every view's encoder, on that view's original grid.

Method: the Grad-CAM family (Selvaraju et al. 2017) applied per view to the encoder levels the diagnosis head
pools, in its **HiResCAM** form (Draelos & Carin 2020) by default:

1. The diagnosis model sees what it sees in prediction (no mirroring): each view's whole volume for whole-exam
   models, the centre crop (:func:`orthonet.inference.predict_core.center_crop`) for the old centre-crop models.
2. For diagnosis d and a pooled encoder level A (C, z, y, x), with G = dlogit_d/dA (the fused logit):
   ``hirescam`` = ReLU(sum_c G_c * A_c) (element-wise); ``gradcam`` = ReLU(sum_c mean(G_c) * A_c) (Grad-CAM's
   channel weights). The map is smoothed with a 3-voxel box filter at feature resolution (max pooling routes each
   channel's gradient to a single voxel; smoothing makes the peak the densest cluster of evidence) and upsampled
   (trilinear) to the crop.
3. ``levels='finest'`` (default) uses the highest-resolution level the head pools; ``'all'`` averages every
   pooled level's map (each divided by its maximum over all views).
4. Maps are scaled to a maximum of 1 per diagnosis over all views (a view that barely contributed stays dark); an
   ensemble averages its members' maps.
5. The crop is put back into the preprocessed volume (0 outside) and mapped to the view's original grid with the
   same inverse path as segmentations (:mod:`orthonet.preprocessing.export`: resample back linearly, un-crop,
   un-transpose).

Why HiResCAM on the finest pooled level: the diagnosis head pools with mean, max *and attention* pooling, so the
gradient differs strongly between locations; Grad-CAM's channel-averaged gradient throws that away. On the test
phantom (a 6 mm bright sphere, tests/test_explain.py) Grad-CAM's maps were at chance level (1.4x the saliency a
uniform map puts into the lesion), HiResCAM on the finest pooled level 14-39x, its peak in or 6 mm (one feature
voxel) from the lesion; averaging in the coarser levels blurred the map over the whole joint (about 2x).
Maps are relative (0..1), not probabilities.

Whole-exam models also give their **attention map** (:func:`attention_saliency`): the weights each diagnosis's
attention-MIL head put on every feature position (:mod:`orthonet.networks.mil`), upsampled to the volume, levels
averaged. It says where the model *looked* for that diagnosis (HiResCAM says what raised the logit), scaled to a
maximum of 1 per view and diagnosis.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from orthonet.inference.predict_core import ArrayLike, LoadedModel, _as_tensor, center_crop
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry, array_to_image
from orthonet.networks.whole_exam import padded_shape, total_stride
from orthonet.preprocessing.crop import uncrop
from orthonet.preprocessing.resample import resample_probabilities
from orthonet.training.data.sampling import center_bbox
from orthonet.training.runtime import autocast


def _parts(model: torch.nn.Module):
    """(encoders, levels, diagnosis head) of an orthonet diagnosis-capable model."""
    for attr in ("encoders", "levels", "diagnosis"):
        if not hasattr(model, attr):
            raise OrthoError(f"--explain needs a diagnosis model with per-view encoders; {type(model).__name__} has "
                             f"no '{attr}'", fix="explain with a diag or multitask model")
    return model.encoders, model.levels, model.diagnosis


METHODS = ("hirescam", "gradcam")
LEVELS = ("finest", "all")


def _finest(features: Sequence[torch.Tensor]) -> int:
    """Index of the pooled level with the most voxels (the highest resolution)."""
    return int(np.argmax([f[0, 0].numel() for f in features]))


def _combine_levels(per_level: Sequence[Mapping[str, torch.Tensor]], shapes: Mapping[str, Tuple[int, ...]],
                    device: torch.device) -> Dict[str, torch.Tensor]:
    """Each level's maps divided by their maximum over all views (views stay comparable), then summed."""
    total = {v: torch.zeros(shape, device=device) for v, shape in shapes.items()}
    for maps in per_level:
        peak = max((float(m.max()) for m in maps.values()), default=0.0)
        if peak > 0:
            for v, m in maps.items():
                total[v] += m / peak
    return total


def grad_cam(loaded: LoadedModel, inputs_by_view: Mapping[str, ArrayLike],
             diagnoses: Optional[Sequence[int]] = None, method: str = "hirescam", levels: str = "finest"
             ) -> Dict[str, np.ndarray]:
    """Saliency maps ``{view: (D, *patch)}`` (float32, max 1 per diagnosis over all views) on each view's centre
    crop, for the diagnosis indices ``diagnoses`` (default: all). See the module docstring for ``method`` and
    ``levels``."""
    if method not in METHODS or levels not in LEVELS:
        raise ValueError(f"method must be one of {METHODS} and levels one of {LEVELS}")
    model = loaded.model
    encoders, model_levels, head = _parts(model)
    views = [v for v in loaded.config.views if v in inputs_by_view]
    if not views:
        raise OrthoError(f"none of the model's views {loaded.config.views} is available for diagnosis")
    device = loaded.device
    whole = loaded.config.diagnosis_input == "whole"
    if whole:
        crops = {v: _as_tensor(inputs_by_view[v]).float()[None].to(device) for v in views}
    else:
        crops = {v: center_crop(inputs_by_view[v], loaded.patch_size(v))[None].to(device) for v in views}
    present = {v: torch.ones(1, dtype=torch.bool, device=device) for v in views}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), autocast(device):
            if whole:
                feats, masks = model.whole_features(crops, generator=torch.Generator().manual_seed(0))
                logits = head(feats, present, masks)["logits"][0].float()
            else:
                feats = {}
                for v in views:
                    skips = encoders[v](crops[v])
                    feats[v] = [skips[i] for i in model_levels[v]]
                logits = head(feats, present)["logits"][0].float()
        used = {v: ([_finest(feats[v])] if levels == "finest" else list(range(len(feats[v])))) for v in views}
        flat = [(v, li, feats[v][li]) for v in views for li in used[v]]
        wanted = list(range(logits.shape[0])) if diagnoses is None else [int(d) for d in diagnoses]
        n_levels = max(len(u) for u in used.values())
        out = {v: np.zeros((len(wanted), *crops[v].shape[2:]), np.float32) for v in views}
        for k, d in enumerate(wanted):
            grads = torch.autograd.grad(logits[d], [f for _, _, f in flat], retain_graph=k < len(wanted) - 1,
                                        allow_unused=True)
            per_level: List[Dict[str, torch.Tensor]] = [dict() for _ in range(n_levels)]
            for (v, li, a), g in zip(flat, grads):
                if g is None:
                    continue
                a, g = a.detach().float(), g.float()
                if method == "gradcam":
                    g = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
                cam = F.relu((g * a).sum(1, keepdim=True))
                # max pooling sends each channel's gradient to one voxel: spread spikes over their neighbourhood so
                # the map's peak is the densest cluster of evidence, not an isolated voxel
                pool = F.avg_pool3d if cam.ndim == 5 else F.avg_pool2d
                cam = pool(cam, 3, stride=1, padding=1, count_include_pad=False)
                # features of a stride-padded volume cover the padded extent: upsample to it, keep the volume
                size = tuple(padded_shape(crops[v].shape[2:], total_stride(model.specs_by_view[v]))) if whole \
                    else tuple(crops[v].shape[2:])
                up = F.interpolate(cam, size=size, mode="trilinear" if cam.ndim == 5 else "bilinear",
                                   align_corners=False)[0, 0]
                per_level[used[v].index(li)][v] = up[tuple(slice(0, n) for n in crops[v].shape[2:])]
            total = _combine_levels(per_level, {v: tuple(crops[v].shape[2:]) for v in views}, device)
            peak = max(float(t.max()) for t in total.values())
            for v in views:
                out[v][k] = (total[v] / peak).cpu().numpy() if peak > 0 else 0.0
    finally:
        model.train(was_training)
    return out


def attention_saliency(loaded: LoadedModel, inputs_by_view: Mapping[str, ArrayLike]) -> Dict[str, np.ndarray]:
    """Attention-MIL maps ``{view: (D, *shape)}`` (float32, max 1 per view and diagnosis) of a whole-exam model on
    each view's whole preprocessed volume; ``{}`` for models without attention-MIL pooling (centre-crop models)."""
    model = loaded.model
    if loaded.config.diagnosis_input != "whole" or not hasattr(model, "diagnosis_attention"):
        return {}
    views = [v for v in loaded.config.views if v in inputs_by_view]
    x = {v: _as_tensor(inputs_by_view[v]).float()[None].to(loaded.device) for v in views}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(loaded.device):
            maps = model.diagnosis_attention(x, generator=torch.Generator().manual_seed(0))
    except ValueError:        # a head pooled without attention (e.g. pooling=['mean', 'max'])
        return {}
    finally:
        model.train(was_training)
    out = {}
    for v, m in maps.items():
        m = m[0].float().cpu().numpy()
        n_diag = loaded.config.n_diagnoses
        out[v] = (m if m.shape[0] == n_diag else np.repeat(m[:1], n_diag, axis=0)).astype(np.float32)
    return out


def ensemble_attention(models: Sequence[LoadedModel], inputs_by_view: Mapping[str, ArrayLike]
                       ) -> Dict[str, np.ndarray]:
    """Mean of the members' :func:`attention_saliency` maps (members without attention are skipped)."""
    total: Dict[str, np.ndarray] = {}
    count: Dict[str, int] = {}
    for m in models:
        for v, a in attention_saliency(m, inputs_by_view).items():
            total[v] = a if v not in total else total[v] + a
            count[v] = count.get(v, 0) + 1
    return {v: total[v] / count[v] for v in total}


def ensemble_grad_cam(models: Sequence[LoadedModel], inputs_by_view: Mapping[str, ArrayLike],
                      method: str = "hirescam", levels: str = "finest") -> Dict[str, np.ndarray]:
    """Mean of the members' :func:`grad_cam` maps (views any member saw)."""
    total: Dict[str, np.ndarray] = {}
    count: Dict[str, int] = {}
    for m in models:
        for v, cam in grad_cam(m, inputs_by_view, method=method, levels=levels).items():
            total[v] = cam if v not in total else total[v] + cam
            count[v] = count.get(v, 0) + 1
    return {v: total[v] / count[v] for v in total}


def uncrop_center(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of the centre crop: (D, *patch) maps placed into zeros of (D, *shape) (parts of the crop that
    were zero padding are dropped)."""
    patch = maps.shape[1:]
    bbox = center_bbox(shape, patch)
    out = np.zeros((maps.shape[0], *shape), np.float32)
    src, dst = [slice(None)], [slice(None)]
    for (lo, hi), n in zip(bbox, shape):
        s0, s1 = max(lo, 0), min(hi, n)
        dst.append(slice(s0, s1))
        src.append(slice(s0 - lo, s0 - lo + max(0, s1 - s0)))
    out[tuple(dst)] = maps[tuple(src)]
    return out


def restore_map(maps: np.ndarray, properties: Dict) -> np.ndarray:
    """Continuous maps (D, *preprocessed shape) -> (D, z, y, x) on the view's original numpy grid (0 outside the
    crop box), through the same inverse path as probabilities (:func:`orthonet.preprocessing.export`)."""
    crop_shape = [int(s) for s in properties["shape_after_crop"]]
    full_shape = [int(s) for s in properties["shape_before_crop"]]
    used = properties.get("resampling_used", {})
    resampled = resample_probabilities(np.asarray(maps, np.float32), crop_shape, order=1,
                                       order_z=int(used.get("order_z", 0)), z_axis=used.get("z_axis"))
    full = uncrop(resampled, properties["bbox_used_for_cropping"], full_shape, fill_value=0.0)
    backward = [int(a) for a in properties["transpose_backward"]]
    return np.ascontiguousarray(np.clip(full.transpose([0] + [a + 1 for a in backward]), 0.0, None))


def saliency_images(cams: Mapping[str, np.ndarray], properties_by_view: Mapping[str, Dict],
                    preprocessed_shapes: Mapping[str, Sequence[int]], diagnoses: Sequence[str]
                    ) -> Dict[str, Dict[str, sitk.Image]]:
    """``{view: {diagnosis: float32 image on the view's original grid}}`` from :func:`grad_cam` maps."""
    out: Dict[str, Dict[str, sitk.Image]] = {}
    for view, cam in cams.items():
        props = properties_by_view[view]
        restored = restore_map(uncrop_center(cam, preprocessed_shapes[view]), props)
        geometry = Geometry.from_dict(props["original_geometry"])
        out[view] = {d: array_to_image(restored[i].astype(np.float32), geometry) for i, d in enumerate(diagnoses)}
    return out
