"""Tiny hand-made datasets for tests, independent of the realistic generator.

Why a second source of data: code that only ever sees our own generator's output tends to depend on its quirks.
These datasets are deliberately different: a few ellipsoids, odd grid sizes, optional oblique directions and
off-centre origins.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from orthonet.imageio import Geometry
from orthonet.synthetic.views import ViewGrid

VIEWS = ["sagittal", "coronal", "axial"]
LABELS = {"background": 0, "bone": 1, "cartilage": 2}
DIAGNOSES = ["lesion_a", "lesion_b"]


def _phantom(points: np.ndarray, center: np.ndarray, lesions: Sequence[bool]):
    """Intensity and label of a simple two-structure phantom at physical points (..., 3)."""
    rel = points - center
    bone = ((rel / np.array([18.0, 14.0, 22.0])) ** 2).sum(-1) <= 1.0
    shell = ((rel / np.array([21.0, 17.0, 25.0])) ** 2).sum(-1) <= 1.0
    cart = shell & ~bone
    body = ((rel / np.array([40.0, 36.0, 46.0])) ** 2).sum(-1) <= 1.0
    img = np.where(body, 40.0, 0.0) + np.where(bone, 60.0, 0.0) + np.where(cart, 120.0, 0.0)
    if lesions[0]:
        img = img + 150.0 * (((rel - np.array([0.0, 8.0, 0.0])) ** 2).sum(-1) <= 36.0)
    if len(lesions) > 1 and lesions[1]:
        img = img + 150.0 * (((rel - np.array([0.0, -8.0, 10.0])) ** 2).sum(-1) <= 25.0)
    lab = np.zeros(points.shape[:-1], np.uint8)
    lab[bone] = 1
    lab[cart] = 2
    return img.astype(np.float32), lab


def view_grids(rng: np.random.Generator, center: np.ndarray, oblique: bool, size_scale: float = 1.0
               ) -> Dict[str, ViewGrid]:
    grids = {}
    for view in VIEWS:
        tilt = rng.uniform(-12, 12, 3) if oblique else None
        grids[view] = ViewGrid.make(view, center, fov_mm=(96.0, 88.0), coverage_mm=72.0,
                                    in_plane_mm=3.0 / size_scale, slice_mm=6.0 / size_scale, oblique_deg=tilt)
    return grids


def _write(arr: np.ndarray, geom: Geometry, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    geom.apply_to(img)
    sitk.WriteImage(img, str(path), True)


def write_tiny_dataset(root: Path, n_train: int = 4, n_test: int = 1, n_unlabeled: int = 0, seed: int = 0,
                       oblique: bool = False, views: Sequence[str] = VIEWS, seg_view: str = "sagittal",
                       unlabeled_seg_cases: int = 0, channels: int = 1, size_scale: float = 1.0,
                       test_ground_truth: bool = False, centers: Optional[Sequence[str]] = None) -> Path:
    """Write a small orthonet-format dataset at ``root`` (a DatasetXXX_Name folder) and return ``root``.

    ``test_ground_truth`` also writes ``labelsTs/`` and ``diagnosesTs.csv``; ``centers`` (names, assigned round
    robin to all cases) writes ``centers.csv``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "imagesUnlabeled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    diag_rows: List[List[str]] = []
    test_rows: List[List[str]] = []
    splits = [("Tr", f"case{i:03d}") for i in range(n_train)] + [("Ts", f"test{i:03d}") for i in range(n_test)] \
        + [("Unlabeled", f"unl{i:03d}") for i in range(n_unlabeled)]
    for idx, (split, case) in enumerate(splits):
        center = np.array([10.0, -20.0, 35.0]) + rng.uniform(-4, 4, 3)
        lesions = [bool(idx % 2), bool((idx // 2) % 2)]
        grids = view_grids(rng, center, oblique, size_scale)
        for view in views:
            grid = grids[view]
            pts = grid.physical_points((-grid.slice_mm / 4, grid.slice_mm / 4))
            img, lab = _phantom(pts, center, lesions)
            img = img.mean(0)
            lab = lab[0]
            for c in range(channels):
                noisy = img * (1.0 + 0.1 * c) + rng.normal(0, 4.0, img.shape).astype(np.float32)
                _write(noisy.astype(np.float32), grid.geometry,
                       root / f"images{split}" / f"{case}_{view}_{c:04d}.nii.gz")
            if split == "Tr" and view == seg_view and idx >= unlabeled_seg_cases:
                _write(lab, grid.geometry, root / "labelsTr" / f"{case}_{view}.nii.gz")
            if split == "Ts" and view == seg_view and test_ground_truth:
                (root / "labelsTs").mkdir(exist_ok=True)
                _write(lab, grid.geometry, root / "labelsTs" / f"{case}_{view}.nii.gz")
        if split == "Tr":
            diag_rows.append([case] + [str(int(x)) for x in lesions])
        if split == "Ts":
            test_rows.append([case] + [str(int(x)) for x in lesions])
    with open(root / "diagnoses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id"] + DIAGNOSES)
        w.writerows(diag_rows)
    if test_ground_truth:
        with open(root / "diagnosesTs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id"] + DIAGNOSES)
            w.writerows(test_rows)
    if centers:
        with open(root / "centers.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "center"])
            w.writerows([case, centers[i % len(centers)]] for i, (_, case) in enumerate(splits))
    meta = {"name": root.name.split("_", 1)[-1], "views": list(views), "segmentation_view": seg_view,
            "channel_names": {str(c): f"MR{c}" for c in range(channels)}, "labels": LABELS,
            "diagnoses": DIAGNOSES, "file_ending": ".nii.gz", "numTraining": n_train}
    if n_unlabeled:
        meta["numUnlabeled"] = n_unlabeled
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def write_tiny_nnunet_dataset(root: Path, n_train: int = 4, seed: int = 0, anisotropic: bool = False) -> Path:
    """Write a plain nnU-Net v2 dataset (one view, ``{CASE}_0000.nii.gz``, ``labelsTr/{CASE}.nii.gz``)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        center = np.array([0.0, 0.0, 0.0]) + rng.uniform(-3, 3, 3)
        grid = ViewGrid.make("axial", center, fov_mm=(90.0, 84.0), coverage_mm=70.0, in_plane_mm=3.0,
                             slice_mm=6.0 if anisotropic else 3.0)
        pts = grid.physical_points()
        img, lab = _phantom(pts, center, [False, False])
        img = img[0] + rng.normal(0, 4.0, img.shape[1:]).astype(np.float32)
        _write(img.astype(np.float32), grid.geometry, root / "imagesTr" / f"pat_{i:03d}_0000.nii.gz")
        _write(lab[0], grid.geometry, root / "labelsTr" / f"pat_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": n_train, "file_ending": ".nii.gz",
            "name": root.name.split("_", 1)[-1]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
