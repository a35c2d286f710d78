"""Acquiring a phantom like a scanner: thick partial-volume slices through each view's grid, bias field, noise.

Why this way: real sagittal/coronal/axial stacks have thick slices (3-4 mm) and fine in-plane pixels, each thick
slice averages the tissue across its thickness (partial volume), a receive coil makes one side brighter (bias), and
magnitude reconstruction turns Gaussian k-space noise into Rician noise. A network trained on such data meets the
same problems as on clinical exams.

Speed: the phantom is evaluated chunk by chunk of slices, and each structure only inside the part of the chunk its
bounding box can reach (the box is clipped to the slab exactly), with vectorised float32 numpy. Memory is bounded
by the chunk size, not the volume.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Optional, Tuple

import numpy as np

from orthonet.errors import OrthoError
from orthonet.synthetic.intensities import CenterProfile
from orthonet.synthetic.phantom import Phantom
from orthonet.synthetic.views import ViewGrid

#: Voxel volume (mm^3) at which a centre's SNR is defined; other voxel sizes scale the noise by sqrt(volume).
REFERENCE_VOXEL_MM3 = 0.6 * 0.6 * 3.5


@dataclass(frozen=True)
class SizePreset:
    """Acquisition resolution. ``pv_samples`` thin sub-slices (odd: the middle one gives the label) are averaged
    into each thick slice; ``chunk_voxels`` bounds the memory of one evaluation block."""

    name: str
    in_plane_mm: float
    slice_mm: float
    pv_samples: int = 3
    fov_scale: float = 1.0
    chunk_voxels: int = 600_000

    def validate(self) -> "SizePreset":
        if not (self.in_plane_mm > 0 and self.slice_mm > 0):
            raise OrthoError(f"in-plane spacing and slice thickness must be positive (got {self.in_plane_mm}, "
                             f"{self.slice_mm})", fix="pass positive millimetres, e.g. --in-plane-mm 0.5")
        if self.pv_samples < 1 or self.pv_samples % 2 == 0:
            raise OrthoError(f"pv_samples must be a positive odd number (got {self.pv_samples})",
                             fix="use 1, 3 or 5 sub-slice samples per thick slice")
        if not self.fov_scale > 0:
            raise OrthoError(f"fov_scale must be positive (got {self.fov_scale})")
        return self


PRESETS: Dict[str, SizePreset] = {
    # realistic: ~240 x 240 in-plane, 3.5 mm slices averaged from 3 sub-slices
    "default": SizePreset("default", in_plane_mm=0.6, slice_mm=3.5, pv_samples=3),
    # end-to-end demo on 2 CPU cores: ~80 x 80 in-plane, ~20 slices per view
    "small": SizePreset("small", in_plane_mm=1.8, slice_mm=5.0, pv_samples=3),
    # unit tests: ~40 x 40 in-plane, ~11 slices per view
    "tiny": SizePreset("tiny", in_plane_mm=3.6, slice_mm=9.0, pv_samples=3),
}


def resolve_preset(size: str = "default", **overrides) -> SizePreset:
    """A preset by name with optional overrides (``in_plane_mm``, ``slice_mm``, ``pv_samples``, ``fov_scale``,
    ``chunk_voxels``); ``None`` values are ignored."""
    if size not in PRESETS:
        raise OrthoError(f"unknown size preset '{size}'", fix=f"use one of {sorted(PRESETS)}")
    known = {f.name for f in fields(SizePreset)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise OrthoError(f"unknown acquisition override(s) {unknown}", fix=f"known overrides: {sorted(known)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    for k in ("pv_samples", "chunk_voxels"):
        if k in given:
            given[k] = int(given[k])
    for k in ("in_plane_mm", "slice_mm", "fov_scale"):
        if k in given:
            given[k] = float(given[k])
    return replace(PRESETS[size], **given).validate()


# ------------------------------------------------------------------------------------------------------------
# partial-volume rendering
# ------------------------------------------------------------------------------------------------------------
_EDGES = [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7)]
_BIG_MM = 1.0e4


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    lo = np.clip(lo, -_BIG_MM, _BIG_MM)
    hi = np.clip(hi, -_BIG_MM, _BIG_MM)
    return np.array([[(hi if (c >> a) & 1 else lo)[a] for a in range(3)] for c in range(8)], dtype=np.float64)


_EDGE_A = np.array([e[0] for e in _EDGES])
_EDGE_B = np.array([e[1] for e in _EDGES])


def _slab_extent(corners: np.ndarray, k0: float, k1: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Min/max (z, y, x) index of the part of a parallelepiped (8 corners in index space, numpy order) whose z
    lies in [k0, k1]; None if empty. Exact for a convex box: corners inside plus edge crossings of both planes."""
    z = corners[:, 0]
    inside = corners[(z >= k0) & (z <= k1)]
    a, b = corners[_EDGE_A], corners[_EDGE_B]
    za, zb = a[:, 0], b[:, 0]
    dz = zb - za
    ok = dz != 0
    a, b, za, dz = a[ok], b[ok], za[ok], dz[ok]
    t = np.concatenate([(k0 - za) / dz, (k1 - za) / dz])
    aa, bb = np.concatenate([a, a]), np.concatenate([b, b])
    keep = (t > 0.0) & (t < 1.0)
    cross = aa[keep] + t[keep, None] * (bb[keep] - aa[keep])
    pts = np.concatenate([inside, cross]) if cross.size else inside
    if pts.shape[0] == 0:
        return None
    return pts.min(0), pts.max(0)


def sub_slice_offsets(pv_samples: int) -> np.ndarray:
    """Positions (in slice units) of the thin samples averaged into one thick slice: midpoints of equal parts."""
    return (np.arange(pv_samples, dtype=np.float64) - (pv_samples - 1) / 2.0) / pv_samples


#: Target spacing (mm) of the coarse pre-pass that finds where a structure's surface is (narrow band).
COARSE_MM = 2.4
#: Safety factor on the distance bound: approximate distances may grow slightly faster than true distances.
LIPSCHITZ = 1.3


@dataclass
class _Prepared:
    structure: object
    signal: object
    to_frame: np.ndarray          # 4x4 numpy index (z, y, x, 1) -> frame coords
    corners_idx: np.ndarray       # bounding-box corners in index space
    half_edge: float              # half the anti-aliasing ramp, frame mm
    inv_edge: float
    margin: np.ndarray            # index-space margin (z, y, x)
    inside_value: Optional[float]
    depth: float


def _coords(m: np.ndarray, kk: np.ndarray, yy: np.ndarray, xx: np.ndarray):
    """Frame coordinates (float32) of index points; broadcasting index arrays give a block, 1-D ones a list."""
    out = []
    for r in range(3):
        zy = (m[r, 0] * kk + m[r, 1] * yy + m[r, 3]).astype(np.float32)
        out.append(zy + np.float32(m[r, 2]) * xx.astype(np.float32))
    return out


def render_view(phantom: Phantom, grid: ViewGrid, table: Dict[str, float], pv_samples: int = 3,
                chunk_voxels: int = 600_000) -> Tuple[np.ndarray, np.ndarray]:
    """Noise-free signal (z, y, x float32, relative units) and label map (uint8) of one view.

    The image of each thick slice is the mean of ``pv_samples`` thin planes across the slice thickness; the label
    is the phantom's label at the slice centre plane (the middle sample).

    Each structure is first evaluated on a coarse in-plane lattice (~``COARSE_MM``); points provably far outside
    are skipped, points provably deep inside are filled with the interior signal, and only the band around the
    surface is evaluated at full resolution."""
    geom = grid.geometry
    nz, ny, nx = geom.array_shape
    spacing_z, spacing_y, spacing_x = geom.array_spacing
    index_to_patient = geom.index_to_physical()
    offsets = sub_slice_offsets(pv_samples)
    centre = pv_samples // 2
    image = np.zeros((nz, ny, nx), np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    in_plane = float(min(spacing_y, spacing_x))
    step = max(1, int(np.ceil(COARSE_MM / in_plane - 0.25)))     # tile size (pixels) of the coarse pre-pass
    scale = phantom.scale

    prepared = []
    for s in phantom.structures:
        lo, hi = s.shape.bounds()
        if np.any(lo > hi):
            continue
        to_frame = np.linalg.inv(phantom.frame_to_patient(s.frame)) @ index_to_patient
        from_frame = np.linalg.inv(to_frame)
        corners_idx = _box_corners(lo, hi) @ from_frame[:3, :3].T + from_frame[:3, 3]
        edge = (in_plane + s.soft_mm * scale) / scale           # frame mm
        margin_mm = edge * scale
        margin = np.array([margin_mm / spacing_z, margin_mm / spacing_y + 1, margin_mm / spacing_x + 1])
        signal = s.signal_fn()
        inside = signal.inside_value(table) if signal.uniform_inside else None
        prepared.append(_Prepared(s, signal, to_frame, corners_idx, edge / 2.0, 1.0 / edge, margin, inside,
                                  float(signal.depth_mm)))

    # distance (frame mm) from any fine pixel to its tile's coarse sample, inflated for approximate distances
    reach = LIPSCHITZ * (step - 1) / 2.0 * np.hypot(spacing_y, spacing_x) / scale
    n_ty, n_tx = -(-ny // step), -(-nx // step)
    slices_per_chunk = max(1, int(chunk_voxels // max(ny * nx * pv_samples, 1)))
    for s0 in range(0, nz, slices_per_chunk):
        s1 = min(nz, s0 + slices_per_chunk)
        kvals = (np.arange(s0, s1, dtype=np.float64)[:, None] + offsets[None, :]).reshape(-1)
        # tiled layout (plane, tile row, tile column, row in tile, column in tile): a tile is contiguous, so
        # gathering and scattering whole tiles is cheap; tiles may overhang the field of view
        block = np.zeros((kvals.size, n_ty, n_tx, step, step), np.float32)
        block_lab = np.zeros((s1 - s0, n_ty, n_tx, step, step), np.uint8)
        for pr in prepared:
            ext = _slab_extent(pr.corners_idx, kvals[0] - pr.margin[0], kvals[-1] + pr.margin[0])
            if ext is None:
                continue
            lo, hi = ext
            p0 = int(np.searchsorted(kvals, lo[0] - pr.margin[0], side="left"))
            p1 = int(np.searchsorted(kvals, hi[0] + pr.margin[0], side="right"))
            y0, y1 = max(0, int(np.floor(lo[1] - pr.margin[1]))), min(ny, int(np.ceil(hi[1] + pr.margin[1])) + 1)
            x0, x1 = max(0, int(np.floor(lo[2] - pr.margin[2]))), min(nx, int(np.ceil(hi[2] + pr.margin[2])) + 1)
            if p0 >= p1 or y0 >= y1 or x0 >= x1:
                continue
            region = _Region(kvals, p0, p1, y0 // step, -(-y1 // step), x0 // step, -(-x1 // step), pv_samples,
                             centre)
            if step == 1:
                _paint_dense(pr, block[..., 0, 0], block_lab[..., 0, 0], region, table)
            else:
                _paint_tiled(pr, block, block_lab, region, step, reach, table)
        full = block.transpose(0, 1, 3, 2, 4).reshape(kvals.size, n_ty * step, n_tx * step)[:, :ny, :nx]
        image[s0:s1] = full.reshape(s1 - s0, pv_samples, ny, nx).mean(1)
        labels[s0:s1] = block_lab.transpose(0, 1, 3, 2, 4).reshape(s1 - s0, n_ty * step, n_tx * step)[:, :ny, :nx]
    return image, labels


@dataclass(frozen=True)
class _Region:
    """Where one structure is painted in a chunk: planes [p0, p1) (chunk-local), tile rows [y0, y1), tile
    columns [x0, x1) (pixels when tiles are 1 x 1)."""

    kvals: np.ndarray
    p0: int
    p1: int
    y0: int
    y1: int
    x0: int
    x1: int
    pv_samples: int
    centre: int

    @property
    def first_centre(self) -> int:
        """Offset (from p0) of the first slice-centre plane in the region."""
        return (self.centre - self.p0) % self.pv_samples

    def centre_slices(self, planes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """For plane indices relative to p0: (mask of slice-centre planes, their slice index in the chunk)."""
        rel = planes - self.first_centre
        is_centre = rel % self.pv_samples == 0
        return is_centre, (self.p0 + self.first_centre) // self.pv_samples + rel // self.pv_samples


def _blend(cur: np.ndarray, alpha, val) -> np.ndarray:
    return cur + alpha * (val - cur)


def _paint_dense(pr: _Prepared, block: np.ndarray, block_lab: np.ndarray, rg: _Region,
                 table: Dict[str, float]) -> None:
    """Evaluate a structure at every pixel of its region and alpha-blend it (soft edge one pixel wide)."""
    s = pr.structure
    kk = rg.kvals[rg.p0:rg.p1, None, None]
    yy = np.arange(rg.y0, rg.y1, dtype=np.float64)[None, :, None]
    xx = np.arange(rg.x0, rg.x1, dtype=np.float64)[None, None, :]
    fx, fy, fz = _coords(pr.to_frame, kk, yy, xx)
    d = s.shape.sdf(fx, fy, fz)
    alpha = 0.5 - d * np.float32(pr.inv_edge)
    if not (alpha > 0).any():
        return
    np.clip(alpha, 0.0, 1.0, out=alpha)
    if s.opacity != 1.0:
        alpha *= np.float32(s.opacity)
    val = pr.signal(table, d, fx, fy, fz)
    sub = block[rg.p0:rg.p1, rg.y0:rg.y1, rg.x0:rg.x1]
    sub += alpha * (val - sub)
    if s.label is not None:
        dc = d[rg.first_centre::rg.pv_samples]
        if dc.shape[0]:
            g0 = (rg.p0 + rg.first_centre) // rg.pv_samples
            lab_sub = block_lab[g0:g0 + dc.shape[0], rg.y0:rg.y1, rg.x0:rg.x1]
            lab_sub[dc < 0] = s.label


def _paint_tiled(pr: _Prepared, block: np.ndarray, block_lab: np.ndarray, rg: _Region, step: int, reach: float,
                 table: Dict[str, float]) -> None:
    """Narrow-band painting: classify step x step tiles from their centre's distance; skip tiles surely outside,
    fill tiles surely deep inside with the interior signal, evaluate only the remaining tiles at full resolution."""
    s, m = pr.structure, pr.to_frame
    tys = np.arange(rg.y0, rg.y1, dtype=np.float64)
    txs = np.arange(rg.x0, rg.x1, dtype=np.float64)
    half = (step - 1) / 2.0
    fx, fy, fz = _coords(m, rg.kvals[rg.p0:rg.p1, None, None], (tys * step + half)[None, :, None],
                         (txs * step + half)[None, None, :])
    dc = s.shape.sdf(fx, fy, fz)
    near = dc < pr.half_edge + reach
    if not near.any():
        return
    opacity = np.float32(s.opacity)
    if pr.inside_value is not None:
        deep = dc < -(pr.half_edge + pr.depth + reach)
        near &= ~deep
        pi, yi, xi = np.nonzero(deep)
        if pi.size:
            pi_, yi_, xi_ = pi + rg.p0, yi + rg.y0, xi + rg.x0
            val = np.float32(pr.inside_value)
            if s.opacity == 1.0:
                block[pi_, yi_, xi_] = val
            else:
                block[pi_, yi_, xi_] = _blend(block[pi_, yi_, xi_], opacity, val)
            if s.label is not None:
                is_c, g = rg.centre_slices(pi)
                block_lab[g[is_c], yi_[is_c], xi_[is_c]] = s.label
    pb, yb, xb = np.nonzero(near)
    if pb.size == 0:
        return
    offs = np.arange(step, dtype=np.float32)
    dy, dx = offs[None, :, None], offs[None, None, :]
    k = rg.kvals[rg.p0 + pb]
    ys = ((yb + rg.y0) * step).astype(np.float64)
    xs = ((xb + rg.x0) * step).astype(np.float64)
    coords = []
    for r in range(3):
        base = (m[r, 0] * k + m[r, 1] * ys + m[r, 2] * xs + m[r, 3]).astype(np.float32)[:, None, None]
        coords.append(base + (np.float32(m[r, 1]) * dy + np.float32(m[r, 2]) * dx))
    fx, fy, fz = coords
    d = s.shape.sdf(fx, fy, fz)
    alpha = np.clip(0.5 - d * np.float32(pr.inv_edge), 0.0, 1.0)
    if s.opacity != 1.0:
        alpha *= opacity
    val = pr.signal(table, d, fx, fy, fz)
    pb_, yb_, xb_ = pb + rg.p0, yb + rg.y0, xb + rg.x0
    block[pb_, yb_, xb_] = _blend(block[pb_, yb_, xb_], alpha, val)
    if s.label is not None:
        is_c, g = rg.centre_slices(pb)
        if is_c.any():
            gi, yy, xx = g[is_c], yb_[is_c], xb_[is_c]
            block_lab[gi, yy, xx] = np.where(d[is_c] < 0, np.uint8(s.label), block_lab[gi, yy, xx])


# ------------------------------------------------------------------------------------------------------------
# scanner effects
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BiasField:
    """Smooth multiplicative receive-coil sensitivity in patient space (shared by all views of an exam)."""

    center_mm: Tuple[float, float, float]
    gradient: Tuple[float, float, float]   # log-bias per 100 mm along each patient axis
    curvature: float                        # log-bias fall-off with squared distance (per 100 mm^2)

    @classmethod
    def random(cls, rng: np.random.Generator, center_mm, strength: float) -> "BiasField":
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        g = direction * strength * rng.uniform(0.6, 1.0)
        return cls(tuple(float(c) for c in center_mm), tuple(float(v) for v in g),
                   float(strength * rng.uniform(0.2, 0.6)))

    def on_grid(self, grid: ViewGrid) -> np.ndarray:
        """The field sampled at the voxel centres of a view (z, y, x float32).

        The log-field (linear plus radial quadratic term in patient space) is a sum of one function per index
        axis because the grid's direction matrix is orthonormal, so the field is an outer product of three
        1-D factors."""
        geom = grid.geometry
        a = geom.index_to_physical()
        shape = geom.array_shape
        c0 = a[:3, 3] - np.asarray(self.center_mm)           # voxel (0,0,0) relative to the field centre
        g = np.asarray(self.gradient) / 100.0
        factors = []
        for axis, n in enumerate(shape):
            col = a[:3, axis]                                 # mm per index step along this axis
            t = np.arange(n, dtype=np.float64)
            lin = (g @ col) * t
            # |c0 + sum_a col_a t_a|^2 = |c0|^2 + sum_a (2 c0.col_a t_a + |col_a|^2 t_a^2) (cols orthogonal)
            quad = (2.0 * (c0 @ col) * t + (col @ col) * t * t) / 1.0e4
            const = (g @ c0 - self.curvature * (c0 @ c0) / 1.0e4) if axis == 0 else 0.0
            factors.append(np.exp(lin - self.curvature * quad + const).astype(np.float32))
        return factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]


def noise_sigma(center: CenterProfile, preset_voxel_mm3: float, fluid_signal: float) -> float:
    """Noise standard deviation (relative units) for a centre at a voxel volume: SNR grows with sqrt(volume).
    Clamped so very coarse test grids keep visible noise and very fine ones stay usable."""
    factor = float(np.clip(np.sqrt(REFERENCE_VOXEL_MM3 / preset_voxel_mm3), 0.35, 2.0))
    return fluid_signal / center.snr * factor


_NORMAL_TABLE: Optional[np.ndarray] = None


def standard_normal(rng: np.random.Generator, shape) -> np.ndarray:
    """Fast float32 standard normal noise: 16-bit uniform draws through the inverse normal CDF (tails cut at
    about 4.3 sigma, irrelevant for image noise); about three times faster than ``rng.standard_normal``."""
    global _NORMAL_TABLE
    if _NORMAL_TABLE is None:
        from scipy.special import ndtri
        _NORMAL_TABLE = ndtri((np.arange(65536) + 0.5) / 65536.0).astype(np.float32)
    return _NORMAL_TABLE[rng.integers(0, 65536, size=shape, dtype=np.uint16)]


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise (Rician), float32."""
    s = np.float32(sigma)
    re = standard_normal(rng, signal.shape)
    re *= s
    re += signal
    im = standard_normal(rng, signal.shape)
    im *= s
    re *= re
    im *= im
    re += im
    return np.sqrt(re, out=re)


def acquire(signal: np.ndarray, grid: ViewGrid, center: CenterProfile, bias: BiasField, sigma: float,
            rng: np.random.Generator) -> np.ndarray:
    """Scanner output of a noise-free relative signal: bias, Rician noise, gain, integer magnitudes (float32)."""
    biased = signal * bias.on_grid(grid)
    out = rician(biased, sigma, rng)
    out *= np.float32(center.gain)
    np.rint(out, out=out)
    np.clip(out, 0, 32767, out=out)
    return out
