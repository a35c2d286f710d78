"""Signed-distance shapes for continuous phantoms (millimetres, negative inside).

Why signed distances: one function gives the inside test (``d < 0``) for the label map, a soft anti-aliased edge
(``d`` relative to the voxel size) for partial-volume images, shells such as cartilage (``0 <= d < t``) and
cortical bone (``-t < d <= 0``), and smooth unions that make bones look organic. Every shape also knows an
axis-aligned bounding box in its frame so the renderer evaluates it only where it can be non-empty.

All arithmetic stays in float32 (constants are Python floats) because the renderer evaluates tens of millions of
points per exam. The distances of ellipsoids, super-ellipsoids and smooth unions are first-order approximations
(exact on the surface, good near it), which is all that soft edges and thin shells need.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

Vec = Tuple[float, float, float]
_INF = float("inf")


def _vec(v: Sequence[float]) -> Vec:
    return tuple(float(a) for a in v)  # type: ignore[return-value]


def _rot(rotation: Optional[np.ndarray]) -> Optional[Tuple[Vec, Vec, Vec]]:
    """Rows of R^T (world->shape), as Python floats, or None for the identity."""
    if rotation is None:
        return None
    r = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    if np.allclose(r, np.eye(3)):
        return None
    rt = r.T
    return tuple(_vec(row) for row in rt)  # type: ignore[return-value]


def _to_local(x, y, z, center: Vec, rt):
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if rt is None:
        return dx, dy, dz
    return (rt[0][0] * dx + rt[0][1] * dy + rt[0][2] * dz,
            rt[1][0] * dx + rt[1][1] * dy + rt[1][2] * dz,
            rt[2][0] * dx + rt[2][1] * dy + rt[2][2] * dz)


def _rotated_half_extent(half: Vec, rotation: Optional[np.ndarray]) -> np.ndarray:
    h = np.asarray(half, dtype=np.float64)
    if rotation is None:
        return h
    return np.abs(np.asarray(rotation, dtype=np.float64).reshape(3, 3)) @ h


class Shape:
    """A region of space given by a signed distance (mm, negative inside) and a bounding box."""

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) corners of an axis-aligned box outside which the shape is empty (may be infinite)."""
        raise NotImplementedError

    # composition sugar -------------------------------------------------------------------------------------
    def __or__(self, other: "Shape") -> "Shape":
        return Union([self, other])

    def __and__(self, other: "Shape") -> "Shape":
        return Intersect(self, other)

    def __sub__(self, other: "Shape") -> "Shape":
        return Subtract(self, other)


# ------------------------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------------------------
class Ellipsoid(Shape):
    """Ellipsoid with semi-axes ``radii``, optionally rotated (``rotation`` maps shape axes to frame axes)."""

    def __init__(self, center: Sequence[float], radii: Sequence[float], rotation: Optional[np.ndarray] = None):
        self.center, self.radii = _vec(center), _vec(radii)
        self.rotation = None if rotation is None else np.asarray(rotation, dtype=np.float64)
        self._rt = _rot(rotation)

    def sdf(self, x, y, z):
        u, v, w = _to_local(x, y, z, self.center, self._rt)
        a, b, c = self.radii
        ia, ib, ic = 1.0 / a, 1.0 / b, 1.0 / c
        u = u * ia
        v = v * ib
        w = w * ic
        k0 = np.sqrt(u * u + v * v + w * w)
        u *= ia
        v *= ib
        w *= ic
        k1 = np.sqrt(u * u + v * v + w * w)
        np.maximum(k1, 1e-6, out=k1)
        return k0 * (k0 - 1.0) / k1

    def bounds(self):
        h = _rotated_half_extent(self.radii, self.rotation)
        c = np.asarray(self.center)
        return c - h, c + h


class Sphere(Shape):
    def __init__(self, center: Sequence[float], radius: float):
        self.center, self.radius = _vec(center), float(radius)

    def sdf(self, x, y, z):
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        return np.sqrt(dx * dx + dy * dy + dz * dz) - self.radius

    def bounds(self):
        c = np.asarray(self.center)
        return c - self.radius, c + self.radius


class SuperEllipsoid(Shape):
    """Box-like ellipsoid ``|u/a|^4 + |v/b|^4 + |w/c|^4 = 1``: flat faces with rounded edges (tibial plateau,
    talar body, glenoid). Distance is the implicit value over its gradient norm."""

    def __init__(self, center: Sequence[float], half: Sequence[float], rotation: Optional[np.ndarray] = None):
        self.center, self.half = _vec(center), _vec(half)
        self.rotation = None if rotation is None else np.asarray(rotation, dtype=np.float64)
        self._rt = _rot(rotation)

    def sdf(self, x, y, z):
        u, v, w = _to_local(x, y, z, self.center, self._rt)
        a, b, c = self.half
        u = u * (1.0 / a)
        v = v * (1.0 / b)
        w = w * (1.0 / c)
        u2, v2, w2 = u * u, v * v, w * w
        f = np.sqrt(np.sqrt(u2 * u2 + v2 * v2 + w2 * w2))
        # gradient of f = (u^3/a, v^3/b, w^3/c) / f^3
        gu, gv, gw = u2 * u * (1.0 / a), v2 * v * (1.0 / b), w2 * w * (1.0 / c)
        g = np.sqrt(gu * gu + gv * gv + gw * gw)
        f3 = f * f * f
        np.maximum(g, 1e-9, out=g)
        return (f - 1.0) * f3 / g

    def bounds(self):
        h = _rotated_half_extent(self.half, self.rotation)
        c = np.asarray(self.center)
        return c - h, c + h


class Box(Shape):
    """Oriented box with rounded edges (``rounding`` mm): flat ligaments, tendon bands, plates."""

    def __init__(self, center: Sequence[float], half: Sequence[float], rotation: Optional[np.ndarray] = None,
                 rounding: float = 0.0):
        self.center, self.half = _vec(center), _vec(half)
        self.rotation = None if rotation is None else np.asarray(rotation, dtype=np.float64)
        self._rt = _rot(rotation)
        self.rounding = float(rounding)

    def sdf(self, x, y, z):
        u, v, w = _to_local(x, y, z, self.center, self._rt)
        r = self.rounding
        qx = np.abs(u) - (self.half[0] - r)
        qy = np.abs(v) - (self.half[1] - r)
        qz = np.abs(w) - (self.half[2] - r)
        inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0.0)
        np.maximum(qx, 0.0, out=qx)
        np.maximum(qy, 0.0, out=qy)
        np.maximum(qz, 0.0, out=qz)
        return np.sqrt(qx * qx + qy * qy + qz * qz) + inside - r

    def bounds(self):
        h = _rotated_half_extent(self.half, self.rotation)
        c = np.asarray(self.center)
        return c - h, c + h


def band(a: Sequence[float], b: Sequence[float], width_dir: Sequence[float], half_width: float,
         half_thickness: float, rounding: Optional[float] = None, overhang: float = 0.0) -> Box:
    """A flat band (ligament, tendon) from point ``a`` to ``b``; ``width_dir`` is projected perpendicular to the
    band axis and gives the wide direction."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    axis = b_ - a_
    length = float(np.linalg.norm(axis))
    axis /= max(length, 1e-9)
    w = np.asarray(width_dir, dtype=np.float64)
    w = w - axis * (w @ axis)
    if np.linalg.norm(w) < 1e-6:  # width direction parallel to the axis: pick any perpendicular
        w = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
    w /= np.linalg.norm(w)
    n = np.cross(axis, w)
    rot = np.stack([axis, w, n], axis=1)
    r = min(half_width, half_thickness) * 0.9 if rounding is None else rounding
    return Box((a_ + b_) / 2.0, (length / 2.0 + overhang, half_width, half_thickness), rot, rounding=r)


class Capsule(Shape):
    """Segment ``a``-``b`` swept by a sphere whose radius tapers linearly from ``ra`` to ``rb`` (bone shafts,
    cord-like ligaments, vessels, tendons)."""

    def __init__(self, a: Sequence[float], b: Sequence[float], ra: float, rb: Optional[float] = None):
        self.a, self.b = _vec(a), _vec(b)
        self.ra = float(ra)
        self.rb = float(ra if rb is None else rb)
        ba = np.subtract(self.b, self.a)
        self._ba = _vec(ba)
        self._inv_len2 = 1.0 / max(float(ba @ ba), 1e-12)

    def sdf(self, x, y, z):
        px, py, pz = x - self.a[0], y - self.a[1], z - self.a[2]
        bx, by, bz = self._ba
        t = (px * bx + py * by + pz * bz) * self._inv_len2
        np.clip(t, 0.0, 1.0, out=t)
        px -= t * bx
        py -= t * by
        pz -= t * bz
        d = np.sqrt(px * px + py * py + pz * pz)
        if self.ra == self.rb:
            return d - self.ra
        return d - (self.ra + (self.rb - self.ra) * t)

    def bounds(self):
        r = max(self.ra, self.rb)
        a, b = np.asarray(self.a), np.asarray(self.b)
        return np.minimum(a, b) - r, np.maximum(a, b) + r

    def point(self, t: float) -> np.ndarray:
        """Point at fraction ``t`` along the axis."""
        return np.asarray(self.a) + t * np.asarray(self._ba)


class EllipticCylinder(Shape):
    """Elliptic cylinder along frame z between ``z0`` and ``z1`` (limb envelopes)."""

    def __init__(self, center_xy: Sequence[float], radii_xy: Sequence[float], z0: float, z1: float):
        self.cx, self.cy = float(center_xy[0]), float(center_xy[1])
        self.rx, self.ry = float(radii_xy[0]), float(radii_xy[1])
        self.z0, self.z1 = float(min(z0, z1)), float(max(z0, z1))

    def sdf(self, x, y, z):
        u = (x - self.cx) * (1.0 / self.rx)
        v = (y - self.cy) * (1.0 / self.ry)
        k0 = np.sqrt(u * u + v * v)
        u *= 1.0 / self.rx
        v *= 1.0 / self.ry
        k1 = np.sqrt(u * u + v * v)
        np.maximum(k1, 1e-6, out=k1)
        d = k0 * (k0 - 1.0) / k1
        zc, zh = (self.z0 + self.z1) / 2.0, (self.z1 - self.z0) / 2.0
        return np.maximum(d, np.abs(z - zc) - zh)

    def bounds(self):
        return (np.array([self.cx - self.rx, self.cy - self.ry, self.z0]),
                np.array([self.cx + self.rx, self.cy + self.ry, self.z1]))


class HalfSpace(Shape):
    """Points with ``dot(normal, p) <= offset`` (normal is normalised). Unbounded: use it inside an intersection."""

    def __init__(self, normal: Sequence[float], offset: float):
        n = np.asarray(normal, dtype=np.float64)
        norm = float(np.linalg.norm(n))
        self.n = _vec(n / norm)
        self.offset = float(offset) / norm

    def sdf(self, x, y, z):
        return self.n[0] * x + self.n[1] * y + self.n[2] * z - self.offset

    def bounds(self):
        lo = np.full(3, -_INF)
        hi = np.full(3, _INF)
        # a half-space bounded along one axis (axis-aligned normal) restricts that axis
        for k in range(3):
            if abs(abs(self.n[k]) - 1.0) < 1e-9:
                if self.n[k] > 0:
                    hi[k] = self.offset / self.n[k]
                else:
                    lo[k] = self.offset / self.n[k]
        return lo, hi


class Wedge(Shape):
    """Meniscus-like ring wedge on the plane ``z = base``: between normalised elliptic radii ``rho_in`` and 1
    (semi-axes ``radii_xy`` around ``center_xy``) and below a roof rising from 0 at ``rho_in`` to ``height``
    at the rim. Its cross-section is the triangle radiologists look for."""

    def __init__(self, center_xy: Sequence[float], radii_xy: Sequence[float], rho_in: float, height: float,
                 base: float = 0.0):
        self.cx, self.cy = float(center_xy[0]), float(center_xy[1])
        self.rx, self.ry = float(radii_xy[0]), float(radii_xy[1])
        self.rho_in, self.height, self.base = float(rho_in), float(height), float(base)
        self._rmin = min(self.rx, self.ry)
        run = (1.0 - self.rho_in) * self._rmin
        self._roof_norm = 1.0 / float(np.hypot(1.0, self.height / run))

    def rho(self, x, y):
        u = (x - self.cx) * (1.0 / self.rx)
        v = (y - self.cy) * (1.0 / self.ry)
        return np.sqrt(u * u + v * v)

    def sdf(self, x, y, z):
        rho = self.rho(x, y)
        h = (rho - self.rho_in) * (self.height / (1.0 - self.rho_in))
        zz = z - self.base
        d_roof = (zz - h) * self._roof_norm
        d_rim = (rho - 1.0) * self._rmin
        return np.maximum(np.maximum(d_roof, d_rim), -zz)

    def bounds(self):
        return (np.array([self.cx - self.rx, self.cy - self.ry, self.base]),
                np.array([self.cx + self.rx, self.cy + self.ry, self.base + self.height]))


# ------------------------------------------------------------------------------------------------------------
# combinators
# ------------------------------------------------------------------------------------------------------------
def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (blend radius ``k`` mm): organic joins between bone parts."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + (0.5 / k) * (b - a), 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    return -smooth_min(-a, -b, k)


def _union_bounds(shapes: Sequence[Shape], margin: float = 0.0):
    lo = np.min([s.bounds()[0] for s in shapes], axis=0) - margin
    hi = np.max([s.bounds()[1] for s in shapes], axis=0) + margin
    return lo, hi


class Union(Shape):
    def __init__(self, shapes: Sequence[Shape], k: float = 0.0):
        self.shapes, self.k = list(shapes), float(k)

    def sdf(self, x, y, z):
        d = self.shapes[0].sdf(x, y, z)
        for s in self.shapes[1:]:
            d = smooth_min(d, s.sdf(x, y, z), self.k)
        return d

    def bounds(self):
        return _union_bounds(self.shapes, self.k * 0.25)


class Intersect(Shape):
    def __init__(self, a: Shape, b: Shape, k: float = 0.0):
        self.a, self.b, self.k = a, b, float(k)

    def sdf(self, x, y, z):
        return smooth_max(self.a.sdf(x, y, z), self.b.sdf(x, y, z), self.k)

    def bounds(self):
        (la, ha), (lb, hb) = self.a.bounds(), self.b.bounds()
        return np.maximum(la, lb), np.minimum(ha, hb)


class Subtract(Shape):
    """``a`` minus ``b`` (optionally smooth)."""

    def __init__(self, a: Shape, b: Shape, k: float = 0.0):
        self.a, self.b, self.k = a, b, float(k)

    def sdf(self, x, y, z):
        return smooth_max(self.a.sdf(x, y, z), -self.b.sdf(x, y, z), self.k)

    def bounds(self):
        return self.a.bounds()


class Offset(Shape):
    """Grow (``delta`` > 0) or shrink a shape by ``delta`` mm."""

    def __init__(self, shape: Shape, delta: float):
        self.shape, self.delta = shape, float(delta)

    def sdf(self, x, y, z):
        return self.shape.sdf(x, y, z) - self.delta

    def bounds(self):
        lo, hi = self.shape.bounds()
        return lo - max(self.delta, 0.0), hi + max(self.delta, 0.0)


class Shell(Shape):
    """The layer ``inner <= d(shape) <= outer`` around a shape (cartilage on bone: inner=0, outer=thickness)."""

    def __init__(self, shape: Shape, inner: float, outer: float):
        self.shape, self.inner, self.outer = shape, float(inner), float(outer)

    def sdf(self, x, y, z):
        mid, half = (self.inner + self.outer) / 2.0, (self.outer - self.inner) / 2.0
        return np.abs(self.shape.sdf(x, y, z) - mid) - half

    def bounds(self):
        lo, hi = self.shape.bounds()
        return lo - max(self.outer, 0.0), hi + max(self.outer, 0.0)


class Bounded(Shape):
    """A shape whose box is narrowed to ``lo``/``hi`` (use when a combinator's own box is too loose)."""

    def __init__(self, shape: Shape, lo: Sequence[float], hi: Sequence[float]):
        self.shape, self.lo, self.hi = shape, np.asarray(lo, float), np.asarray(hi, float)

    def sdf(self, x, y, z):
        return self.shape.sdf(x, y, z)

    def bounds(self):
        lo, hi = self.shape.bounds()
        return np.maximum(lo, self.lo), np.minimum(hi, self.hi)


def polyline(points: Sequence[Sequence[float]], radius: float, k: float = 0.0) -> Shape:
    """Chain of capsules through ``points`` (curved tendons: PCL, peroneal tendons, biceps)."""
    caps = [Capsule(points[i], points[i + 1], radius) for i in range(len(points) - 1)]
    return caps[0] if len(caps) == 1 else Union(caps, k)


class Transformed(Shape):
    """A shape placed by a rigid 4x4 transform (shape coords -> frame coords): lets one structure combine parts
    that live in different bone frames (a limb envelope spanning thigh and leg)."""

    def __init__(self, shape: Shape, matrix: np.ndarray):
        m = np.asarray(matrix, dtype=np.float64)
        self.shape, self.matrix = shape, m
        inv = np.linalg.inv(m)
        self._r = tuple(_vec(row) for row in inv[:3, :3])
        self._t = _vec(inv[:3, 3])

    def sdf(self, x, y, z):
        r, t = self._r, self._t
        u = r[0][0] * x + r[0][1] * y + r[0][2] * z + t[0]
        v = r[1][0] * x + r[1][1] * y + r[1][2] * z + t[1]
        w = r[2][0] * x + r[2][1] * y + r[2][2] * z + t[2]
        return self.shape.sdf(u, v, w)

    def bounds(self):
        lo, hi = self.shape.bounds()
        lo = np.clip(lo, -1e4, 1e4)
        hi = np.clip(hi, -1e4, 1e4)
        corners = np.array([[(hi if (c >> a) & 1 else lo)[a] for a in range(3)] for c in range(8)])
        pts = corners @ self.matrix[:3, :3].T + self.matrix[:3, 3]
        return pts.min(0), pts.max(0)


class Cone(Shape):
    """Infinite cone with apex ``apex``, axis ``axis`` and half-opening ``half_angle_deg``: with a spherical
    shell it cuts caps (rotator-cuff tendons over the humeral head, bursae). Bounded only by what it meets."""

    def __init__(self, apex: Sequence[float], axis: Sequence[float], half_angle_deg: float):
        a = np.asarray(axis, dtype=np.float64)
        self.apex, self.axis = _vec(apex), _vec(a / np.linalg.norm(a))
        self.theta = float(np.deg2rad(half_angle_deg))

    def sdf(self, x, y, z):
        qx, qy, qz = x - self.apex[0], y - self.apex[1], z - self.apex[2]
        length = np.sqrt(qx * qx + qy * qy + qz * qz)
        c = (qx * self.axis[0] + qy * self.axis[1] + qz * self.axis[2]) / np.maximum(length, 1e-6)
        phi = np.arccos(np.clip(c, -1.0, 1.0))
        ang = np.clip(phi - self.theta, -np.pi / 2, np.pi / 2)
        return length * np.sin(ang)

    def bounds(self):
        return np.full(3, -_INF), np.full(3, _INF)
