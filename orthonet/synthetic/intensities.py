"""Tissue signal on a fluid-sensitive fat-suppressed proton-density (PD-FS / T2-FS) sequence.

Why a table: radiologists read MSK MRI by relative signal. On PD-FS fluid, effusion and edema are bright; tendons,
ligaments, menisci, labrum and cortical bone are nearly black; hyaline cartilage is intermediate-bright; fat and
fatty marrow are suppressed (dark-intermediate); muscle is intermediate-low. Lesions are rendered as these
tissues (fluid through a dark ligament, edema in marrow), so the network learns the signal patterns a reader uses.
Centres change the table (fat-suppression quality, gamma, gain) rather than the anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

#: Relative signal (fluid = 1) of each tissue on PD-FS at a well-tuned 3 T scanner.
BASE_SIGNAL: Dict[str, float] = {
    "air": 0.0,
    "skin": 0.32,
    "fat": 0.17,            # subcutaneous / Hoffa / Kager fat, suppressed
    "marrow": 0.14,         # fatty marrow, suppressed
    "red_marrow": 0.24,     # metaphyseal / humeral head residual red marrow
    "cortex": 0.02,
    "muscle": 0.30,
    "tendon": 0.035,
    "ligament": 0.06,
    "acl": 0.08,            # the ACL is normally a little brighter than the PCL and striated
    "meniscus": 0.03,
    "labrum": 0.04,
    "cartilage": 0.50,
    "cartilage_deep": 0.40,
    "fluid": 1.0,
    "effusion": 0.95,
    "edema": 0.62,          # soft-tissue / marrow edema
    "bone_bruise": 0.58,
    "torn_fibres": 0.42,    # oedematous, partially torn tendon / ligament fibres
    "tendinosis": 0.28,
    "artery": 0.06,         # flow void
    "vein": 0.55,
    "nerve": 0.36,
    "bursa": 0.9,
    "synovium": 0.45,
}

#: Tissues whose signal depends on fat suppression quality.
FAT_TISSUES = ("fat", "marrow", "red_marrow")


@dataclass(frozen=True)
class CenterProfile:
    """What differs between scanners/sites: SNR (field strength), contrast, bias field, fat suppression, FOV."""

    name: str
    field_strength_t: float
    snr: float                 # fluid signal over noise sigma at the reference voxel volume
    gamma: float               # contrast curve applied to the relative signal (1 = linear)
    fat_suppression: float     # multiplier on fat/marrow signal (1 = perfect-ish, >1 = poorer suppression)
    bias_strength: float       # amplitude of the multiplicative receive-coil bias field (log scale)
    gain: float                # arbitrary scanner scaling of stored values
    fov_scale: float = 1.0     # protocol field of view relative to the joint's default

    def as_dict(self) -> Dict:
        return {"name": self.name, "field_strength_t": self.field_strength_t, "snr": self.snr,
                "gamma": self.gamma, "fat_suppression": self.fat_suppression,
                "bias_strength": self.bias_strength, "gain": self.gain, "fov_scale": self.fov_scale}


#: The built-in sites. More centres than listed are derived deterministically from these.
CENTERS: Tuple[CenterProfile, ...] = (
    CenterProfile("siteA_3T", 3.0, snr=30.0, gamma=1.0, fat_suppression=1.0, bias_strength=0.18, gain=1000.0),
    CenterProfile("siteB_1.5T", 1.5, snr=13.0, gamma=0.85, fat_suppression=1.7, bias_strength=0.38, gain=620.0,
                  fov_scale=1.06),
    CenterProfile("siteC_1T", 1.0, snr=12.0, gamma=1.15, fat_suppression=1.35, bias_strength=0.5, gain=1500.0,
                  fov_scale=0.95),
    CenterProfile("siteD_3T", 3.0, snr=20.0, gamma=0.92, fat_suppression=1.15, bias_strength=0.28, gain=820.0,
                  fov_scale=1.03),
)


def center_profile(index: int) -> CenterProfile:
    """Profile of centre ``index`` (0-based); indices beyond the built-in ones get a deterministic variant."""
    if index < 0:
        raise ValueError(f"centre index must be >= 0, got {index}")
    if index < len(CENTERS):
        return CENTERS[index]
    base = CENTERS[index % len(CENTERS)]
    rng = np.random.default_rng([7919, index])
    return replace(base, name=f"site{index}_{base.field_strength_t:g}T",
                   snr=float(base.snr * rng.uniform(0.8, 1.2)), gamma=float(base.gamma * rng.uniform(0.93, 1.07)),
                   fat_suppression=float(base.fat_suppression * rng.uniform(0.9, 1.15)),
                   bias_strength=float(base.bias_strength * rng.uniform(0.8, 1.25)),
                   gain=float(base.gain * rng.uniform(0.7, 1.4)))


def tissue_table(center: CenterProfile, rng: Optional[np.random.Generator] = None,
                 jitter: float = 0.06) -> Dict[str, float]:
    """Signal of every tissue for one exam at one centre (before gain, bias and noise).

    ``rng`` adds a small per-exam jitter (patients differ: hydration, marrow composition)."""
    out = {}
    names = sorted(BASE_SIGNAL)
    factors = (1.0 + rng.uniform(-jitter, jitter, len(names))) if rng is not None else np.ones(len(names))
    for name, f in zip(names, factors):
        v = BASE_SIGNAL[name] * float(f)
        if name in FAT_TISSUES:
            v *= center.fat_suppression
        out[name] = float(np.clip(v, 0.0, 1.2) ** center.gamma)
    out["air"] = 0.0
    return out


# ------------------------------------------------------------------------------------------------------------
# spatially varying signals
# ------------------------------------------------------------------------------------------------------------
class Signal:
    """Signal of a structure at frame points, given its signed distance there. Subclass for textures.

    ``depth_mm``: how far inside the surface the signal still depends on the distance (a cortex, a cartilage
    layer). ``uniform_inside``: deeper than that the signal is one value, so the renderer may fill the interior
    without evaluating the shape there."""

    depth_mm: float = 0.0
    uniform_inside: bool = True

    def __call__(self, table: Dict[str, float], d: np.ndarray, x: np.ndarray, y: np.ndarray,
                 z: np.ndarray):
        raise NotImplementedError

    def inside_value(self, table: Dict[str, float]) -> float:
        """The interior value (only meaningful when ``uniform_inside``)."""
        return float(self(table, np.float32(-1e4), None, None, None))


@dataclass(frozen=True)
class Tissue(Signal):
    """Constant signal of one tissue, optionally scaled."""

    name: str
    scale: float = 1.0

    def __call__(self, table, d, x, y, z):
        return table[self.name] * self.scale

    def inside_value(self, table) -> float:
        return table[self.name] * self.scale


@dataclass(frozen=True)
class Waves:
    """A few random plane waves (mm wavelengths): cheap stand-in for marrow / muscle heterogeneity."""

    k: Tuple[Tuple[float, float, float], ...]
    phase: Tuple[float, ...]
    amplitude: float

    @classmethod
    def random(cls, rng: np.random.Generator, n: int = 2, wavelength_mm: Sequence[float] = (6.0, 16.0),
               amplitude: float = 0.03) -> "Waves":
        ks, ph = [], []
        for _ in range(n):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            lam = rng.uniform(*wavelength_mm)
            ks.append(tuple(float(v) for v in direction * (2 * np.pi / lam)))
            ph.append(float(rng.uniform(0, 2 * np.pi)))
        return cls(tuple(ks), tuple(ph), float(amplitude))

    def __call__(self, x, y, z):
        out = None
        for (kx, ky, kz), p in zip(self.k, self.phase):
            w = np.cos(kx * x + ky * y + kz * z + p)
            out = w if out is None else out + w
        return out * (self.amplitude / max(len(self.k), 1))


@dataclass(frozen=True)
class Bone(Signal):
    """Dark cortical rim (``cortex_mm`` thick) around fat-suppressed marrow."""

    cortex_mm: float = 1.2
    marrow: str = "marrow"

    @property
    def depth_mm(self) -> float:  # type: ignore[override]
        return self.cortex_mm

    def __call__(self, table, d, x, y, z):
        return np.where(d > -self.cortex_mm, np.float32(table["cortex"]), np.float32(table[self.marrow]))


@dataclass(frozen=True)
class Rimmed(Signal):
    """A thin outer layer of one tissue over another (skin over subcutaneous fat)."""

    rim: str
    core: str
    rim_mm: float = 1.5

    @property
    def depth_mm(self) -> float:  # type: ignore[override]
        return self.rim_mm

    def __call__(self, table, d, x, y, z):
        return np.where(d > -self.rim_mm, np.float32(table[self.rim]), np.float32(table[self.core]))


@dataclass(frozen=True)
class Layered(Signal):
    """Cartilage-like layering: darker deep zone next to the bone (``d`` grows toward the bone's inside)."""

    outer: str = "cartilage"
    deep: str = "cartilage_deep"
    depth_mm: float = 1.0

    def __call__(self, table, d, x, y, z):
        return np.where(d < -self.depth_mm, np.float32(table[self.deep]), np.float32(table[self.outer]))


@dataclass(frozen=True)
class Striated(Signal):
    """Tissue with a fibre-like modulation (ACL bundles, muscle)."""

    name: str
    texture: Waves
    uniform_inside: bool = False

    def __call__(self, table, d, x, y, z):
        base = table[self.name]
        return base * (1.0 + self.texture(x, y, z))
