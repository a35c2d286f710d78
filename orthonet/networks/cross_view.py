"""Cross-view feature sampling through physical coordinates (``ortho_train ... --fuse-views``).

Why physical coordinates: the sagittal, coronal and axial stacks of an exam share no voxel grid, only the scanner's
patient coordinate system. Every preprocessed array knows where its voxels lie (original header, transpose, crop box,
resampling), so another view's feature map can be resampled into the segmentation view's grid with one
``grid_sample`` per view, whatever the direction matrices (oblique planes included).

Affines here are 4x4 matrices mapping a numpy index ``(z, y, x, 1)`` of an array to a physical point
``(x, y, z, 1)`` in mm (the convention of :meth:`orthonet.imageio.Geometry.index_to_physical`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orthonet.imageio import Geometry

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def preprocessed_index_to_physical(properties: Dict, spacing: Optional[Sequence[float]] = None,
                                   convention: str = "half_pixel") -> np.ndarray:
    """4x4 affine from an index of a preprocessed array (after transpose, crop and resampling) to physical mm.

    Reads the case properties written by preprocessing (docs/internals.md): ``original_geometry`` (ITK order),
    ``transpose_forward``, ``bbox_used_for_cropping`` (after transpose; half-open), ``shape_after_crop`` and
    ``shape_after_resampling``.

    * ``convention='half_pixel'`` (orthonet's and nnU-Net's resampling, which keeps the physical extent): output voxel
      ``i`` of ``n_out`` lies at cropped index ``(i + 0.5) * n_in / n_out - 0.5``. The shapes define the scale; if
      ``shape_after_resampling`` is absent, ``spacing`` (the target spacing, numpy order after transpose, default
      ``properties['target_spacing']``) and ``spacing_after_crop`` do.
    * ``convention='corner'``: the first voxel centre is kept and the spacing becomes exactly ``spacing``.
    """
    geom = Geometry.from_dict(properties["original_geometry"])
    tf = [int(a) for a in properties.get("transpose_forward", [0, 1, 2])]
    lo = np.array([int(b[0]) for b in properties["bbox_used_for_cropping"]], dtype=np.float64)
    n_in = np.asarray(properties["shape_after_crop"], dtype=np.float64)
    n_out = properties.get("shape_after_resampling")
    target = spacing if spacing is not None else properties.get("target_spacing")
    if convention == "half_pixel" and n_out is not None:
        k = n_in / np.asarray(n_out, dtype=np.float64)
    else:
        current = properties.get("spacing_after_crop")
        if target is None or current is None:
            raise ValueError("need shape_after_resampling, or spacing and spacing_after_crop, to locate voxels")
        k = np.asarray(target, dtype=np.float64) / np.asarray(current, dtype=np.float64)
    if convention not in ("half_pixel", "corner"):
        raise ValueError("convention must be 'half_pixel' or 'corner'")
    resample = np.eye(4)
    resample[:3, :3] = np.diag(k)
    if convention == "half_pixel":
        resample[:3, 3] = 0.5 * k - 0.5
    crop = np.eye(4)
    crop[:3, 3] = lo
    transpose = np.zeros((4, 4))
    transpose[3, 3] = 1.0
    for j, axis in enumerate(tf):           # transposed index q -> original index p with p[tf[j]] = q[j]
        transpose[axis, j] = 1.0
    return geom.index_to_physical() @ transpose @ crop @ resample


def _as_batch_affine(a: ArrayLike, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, dtype=torch.float64)
    t = t.to(device)
    if t.shape == (4, 4):
        t = t.expand(batch, 4, 4)
    if t.shape != (batch, 4, 4):
        raise ValueError(f"affine must be (4, 4) or ({batch}, 4, 4), got {tuple(t.shape)}")
    return t


def feature_affine(affine: ArrayLike, stride: Sequence[int]) -> ArrayLike:
    """Affine of a feature map downsampled by ``stride`` (per axis, cumulative) from an input with ``affine``.

    DNA's strided convs are 'same'-padded, so feature voxel j is centred on input voxel j * stride.
    """
    scale = np.diag(list(stride) + [1]).astype(np.float64)
    if isinstance(affine, torch.Tensor):
        return affine.double() @ torch.as_tensor(scale, device=affine.device)
    return np.asarray(affine, dtype=np.float64) @ scale


def patch_affine(affine: ArrayLike, offset: Sequence[int]) -> ArrayLike:
    """Affine of a patch whose first voxel is ``offset`` (z, y, x) in the array with ``affine``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(offset, dtype=np.float64)
    if isinstance(affine, torch.Tensor):
        return affine.double() @ torch.as_tensor(shift, device=affine.device)
    return np.asarray(affine, dtype=np.float64) @ shift


def crop_extent(bbox: Sequence[Sequence[int]], volume_shape: Sequence[int]) -> np.ndarray:
    """(3, 2) int64 ``[lo, hi)`` per axis: the voxels of a crop (``bbox`` in the volume's index, possibly reaching
    outside it and zero-padded there) that lie inside the volume, in the crop's own index.

    Why: the padding of a crop is not image; the fusion's coverage channel must say where the other view has
    image, whatever the crop box. A missing view is :data:`EMPTY_EXTENT`."""
    lo = np.array([int(b[0]) for b in bbox], dtype=np.int64)
    size = np.array([int(b[1]) - int(b[0]) for b in bbox], dtype=np.int64)
    start = np.clip(-lo, 0, size)
    stop = np.clip(np.asarray(volume_shape, dtype=np.int64) - lo, 0, size)
    return np.stack([start, np.maximum(stop, start)], axis=1)


#: the extent of a view the case lacks: no voxel has image (the fusion then gives zeros and coverage 0)
EMPTY_EXTENT = np.zeros((3, 2), dtype=np.int64)


def feature_extent(extent: ArrayLike, stride: Sequence[int]) -> torch.Tensor:
    """Continuous interval ``[a, b]`` (..., 3, 2) in the index of a feature map downsampled by ``stride`` covered by
    the input voxels ``[lo, hi)`` of ``extent`` (input voxel i spans i +- 0.5; feature voxel j sits on input voxel
    j * stride, see :func:`feature_affine`); empty extents give ``a > b``."""
    e = torch.as_tensor(np.asarray(extent) if not isinstance(extent, torch.Tensor) else extent).double()
    s = torch.as_tensor([float(v) for v in stride], dtype=torch.float64, device=e.device)
    lo, hi = e[..., 0], e[..., 1]
    a = torch.where(hi > lo, (lo - 0.5) / s, torch.full_like(lo, float("inf")))
    return torch.stack([a, (hi - 0.5) / s], dim=-1)


def sample_into_grid(features: torch.Tensor, src_affine: ArrayLike, dst_affine: ArrayLike,
                     dst_shape: Sequence[int], mode: str = "bilinear", return_coverage: bool = False,
                     src_extent: Optional[ArrayLike] = None
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Resample ``features`` (B, C, z, y, x) from the grid ``src_affine`` into the grid ``dst_affine`` of
    ``dst_shape`` through physical coordinates; zeros outside the source. Affines: (4, 4) or per sample (B, 4, 4).

    ``mode='bilinear'`` is trilinear for 3D. Computed in float32 (coordinates need it, also under autocast) and
    returned in the features' dtype. With ``return_coverage`` also returns (B, 1, *dst_shape), 1 where the
    destination voxel lies inside the source feature map and, given ``src_extent`` ((3, 2) or (B, 3, 2) intervals
    in source index, :func:`feature_extent`), inside that part of it (the other view's image, not its padding).
    """
    if features.ndim != 5:
        raise ValueError(f"features must be (B, C, z, y, x), got {tuple(features.shape)}")
    batch, device = features.shape[0], features.device
    src = _as_batch_affine(src_affine, batch, device)
    dst = _as_batch_affine(dst_affine, batch, device)
    m = (torch.linalg.inv(src) @ dst).float()                                 # dst index -> src index
    axes = [torch.arange(int(n), device=device, dtype=torch.float32) for n in dst_shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)           # (z, y, x, 3)
    src_idx = torch.einsum("bij,...j->b...i", m[:, :3, :3], idx) + m[:, None, None, None, :3, 3]
    size = torch.tensor(features.shape[2:], device=device, dtype=torch.float32)
    norm = (2 * src_idx + 1) / size - 1                                        # align_corners=False
    grid = norm.flip(-1)                                                      # grid_sample wants (x, y, z)
    with torch.autocast(device_type=device.type, enabled=False):
        out = F.grid_sample(features.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    out = out.to(features.dtype)
    if not return_coverage:
        return out
    inside = ((src_idx >= -0.5) & (src_idx <= size - 0.5)).all(dim=-1)
    if src_extent is not None:
        ext = torch.as_tensor(src_extent, device=device).float().expand(batch, 3, 2)
        a, b = ext[:, None, None, None, :, 0], ext[:, None, None, None, :, 1]
        inside &= ((src_idx >= a) & (src_idx <= b)).all(dim=-1)
    return out, inside[:, None].to(features.dtype)


class CrossViewBottleneckFusion(nn.Module):
    """Concatenate other views' bottleneck features, sampled into the segmentation view's bottleneck grid (plus a
    coverage channel per view), to the segmentation bottleneck; a 1x1 conv maps back to the bottleneck width.

    The 1x1 conv starts as the identity on the segmentation channels (zero on the others), so a pretrained decoder
    sees unchanged features at the start of training. A view contributes only where it has image (its features are
    multiplied by its coverage): views missing from ``others``, and samples whose extent is empty (a view that
    exam lacks), contribute zeros and coverage 0 alike, in training and at inference.
    """

    def __init__(self, seg_channels: int, other_channels: Dict[str, int], conv_op: type = nn.Conv3d):
        super().__init__()
        self.views = list(other_channels)
        self.other_channels = dict(other_channels)
        in_ch = seg_channels + sum(c + 1 for c in other_channels.values())
        self.mix = conv_op(in_ch, seg_channels, 1, bias=True)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.bias.zero_()
            eye = torch.eye(seg_channels).reshape(seg_channels, seg_channels, *([1] * (self.mix.weight.ndim - 2)))
            self.mix.weight[:, :seg_channels] = eye

    def forward(self, seg_bottleneck: torch.Tensor, seg_affine: ArrayLike,
                others: Dict[str, Tuple]) -> torch.Tensor:
        """``seg_affine``: affine of the bottleneck grid (see :func:`feature_affine`); ``others``:
        ``{view: (bottleneck features, their affine[, their image extent (B, 3, 2), see feature_extent])}``."""
        parts = [seg_bottleneck]
        shape = seg_bottleneck.shape[2:]
        for v in self.views:
            if v in others:
                feats, affine, extent = (tuple(others[v]) + (None,))[:3]
                sampled, cover = sample_into_grid(feats, affine, seg_affine, shape, return_coverage=True,
                                                  src_extent=extent)
                cover = cover.to(seg_bottleneck.dtype)
                parts += [sampled.to(seg_bottleneck.dtype) * cover, cover]
            else:
                parts.append(seg_bottleneck.new_zeros((seg_bottleneck.shape[0], self.other_channels[v] + 1)
                                                      + tuple(shape)))
        return self.mix(torch.cat(parts, dim=1))
