"""Planning: fingerprint, target spacing, transpose, topology, memory budget, planners, plans transfer, CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.dataset import load_dataset
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry
from orthonet.synthetic.views import ViewGrid
from orthonet.planners.memory import estimated_gb, feature_map_count
from orthonet.networks.build import build_network
from orthonet.planners.planner import DefaultPlanner
from orthonet.planners.plans import load_plans
from orthonet.planners.resenc_planner import ResEncPlanner
from orthonet.planners.topology import plan_topology
from tests.builders import write_tiny_dataset, write_tiny_nnunet_dataset

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------------------------------------------
# data helpers (shared with test_preprocessing)
# ------------------------------------------------------------------------------------------------------------
def permute_image(arr: np.ndarray, geom: Geometry, perm: Sequence[int]):
    """The same physical image stored with numpy axes permuted (e.g. slices along x instead of z)."""
    perm = list(perm)
    new_arr = np.ascontiguousarray(arr.transpose(perm))
    d = geom.direction_matrix
    # numpy axis a <-> ITK axis 2 - a
    itk_src = [2 - perm[2 - i] for i in range(3)]
    spacing = tuple(geom.spacing[j] for j in itk_src)
    direction = tuple(np.stack([d[:, j] for j in itk_src], 1).reshape(-1).tolist())
    size = tuple(int(s) for s in new_arr.shape[::-1])
    return new_arr, Geometry(size, spacing, geom.origin, direction)


def _phantom(points: np.ndarray, center: np.ndarray):
    rel = points - center
    body = ((rel / np.array([34.0, 30.0, 26.0])) ** 2).sum(-1) <= 1.0
    bone = ((rel / np.array([16.0, 12.0, 18.0])) ** 2).sum(-1) <= 1.0
    cart = (((rel / np.array([23.0, 19.0, 25.0])) ** 2).sum(-1) <= 1.0) & ~bone
    img = np.where(body, 50.0, 0.0) + np.where(bone, 70.0, 0.0) + np.where(cart, 140.0, 0.0)
    lab = np.zeros(points.shape[:-1], np.uint8)
    lab[bone] = 1
    lab[cart] = 2
    return img.astype(np.float32), lab, body


#: numpy axis permutation per view: thick axis at numpy 1 (sagittal), 0 (coronal), 2 (axial)
VIEW_PERMS = {"sagittal": (1, 0, 2), "coronal": (0, 1, 2), "axial": (1, 2, 0)}


def write_oblique_aniso_dataset(root: Path, n_train: int = 3, n_unlabeled: int = 1, seed: int = 0,
                                views: Sequence[str] = ("sagittal", "coronal", "axial"),
                                slice_mm: Sequence[float] = (5.0, 5.6, 6.2, 6.8),
                                in_plane_mm: Sequence[float] = (1.5, 1.4, 1.6, 1.5),
                                intensity_scale: float = 1.0, channels: int = 1) -> Path:
    """Oblique, off-centre, anisotropic multi-view dataset (slice and in-plane spacing vary per case, so every
    axis gets resampled) with zero background outside the body (so cropping matters) and the thick axis stored on
    a different numpy axis in each view."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cases = [("Tr", f"k{i:03d}") for i in range(n_train)] + [("Unlabeled", f"u{i:03d}") for i in range(n_unlabeled)]
    for idx, (split, case) in enumerate(cases):
        center = np.array([62.0, -48.0, 131.0]) + rng.uniform(-3, 3, 3)
        thick = float(slice_mm[idx % len(slice_mm)])
        fine = float(in_plane_mm[idx % len(in_plane_mm)])
        for view in views:
            grid = ViewGrid.make(view, center + rng.uniform(-2, 2, 3), fov_mm=(84.0, 78.0), coverage_mm=64.0,
                                 in_plane_mm=fine, slice_mm=thick, oblique_deg=rng.uniform(-15, 15, 3))
            img, lab, body = _phantom(grid.physical_points()[0], center)
            for c in range(channels):
                noisy = (img * (1 + 0.2 * c) + np.where(body, rng.normal(0, 3.0, img.shape), 0.0)) * intensity_scale
                arr, geom = permute_image(noisy.astype(np.float32), grid.geometry, VIEW_PERMS[view])
                out = sitk.GetImageFromArray(arr)
                geom.apply_to(out)
                sitk.WriteImage(out, str(root / f"images{split}" / f"{case}_{view}_{c:04d}.nii.gz"), True)
            if split == "Tr" and view == views[0]:
                arr, geom = permute_image(lab, grid.geometry, VIEW_PERMS[view])
                out = sitk.GetImageFromArray(arr)
                geom.apply_to(out)
                sitk.WriteImage(out, str(root / "labelsTr" / f"{case}_{view}.nii.gz"), True)
    meta = {"name": root.name.split("_", 1)[-1], "views": list(views), "segmentation_view": views[0],
            "channel_names": {str(c): f"MR{c}" for c in range(channels)},
            "labels": {"background": 0, "bone": 1, "cartilage": 2}, "diagnoses": [], "file_ending": ".nii.gz",
            "numTraining": n_train}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def run_cli(argv, raw: Path, pre: Path, monkeypatch) -> int:
    from orthonet.planners.cli import main

    monkeypatch.setenv("ORTHO_raw", str(raw))
    monkeypatch.setenv("ORTHO_preprocessed", str(pre))
    monkeypatch.setenv("ORTHO_results", str(pre.parent / "results"))
    return main(list(argv) + ["--no-progress"])


def _spec_only(tmp_path: Path, views=("sagittal",), channels=1, labels=None) -> "object":
    """A dataset.json without images: enough for the planner, which reads only the fingerprint."""
    root = tmp_path / "Dataset950_Plan"
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": "Plan", "views": list(views), "segmentation_view": views[0],
            "channel_names": {str(c): f"MR{c}" for c in range(channels)},
            "labels": labels or {"background": 0, "a": 1, "b": 2}, "diagnoses": [], "file_ending": ".nii.gz",
            "numTraining": 10}
    (root / "dataset.json").write_text(json.dumps(meta))
    return load_dataset(root)


def _fingerprint(spacings, shapes, views=("sagittal",)) -> Dict:
    stats = {"mean": 100.0, "median": 95.0, "std": 20.0, "min": 1.0, "max": 300.0, "percentile_00_5": 10.0,
             "percentile_99_5": 250.0}
    return {"views": {v: {"spacings": [list(map(float, s)) for s in spacings],
                          "shapes_before_crop": [list(map(int, s)) for s in shapes],
                          "shapes_after_crop": [list(map(int, s)) for s in shapes],
                          "num_cases": len(spacings), "median_relative_size_after_cropping": 1.0,
                          "foreground_intensity_properties_per_channel": {"0": dict(stats)}} for v in views}}


def _check_config_sane(cfg: Dict, budget_gb: float, n_channels: int = 1, n_classes: int = 3) -> None:
    kw = cfg["network"]["kwargs"]
    assert max(kw["features_per_stage"]) <= 320
    assert cfg["batch_size"] >= 2
    assert len(kw["kernel_sizes"]) == len(kw["strides"]) == kw["n_stages"]
    # every axis divisible by its total downsampling
    total = np.prod(np.asarray(kw["strides"]), axis=0)
    assert all(p % t == 0 for p, t in zip(cfg["patch_size"], total))
    # independently recomputed memory estimate fits the budget at the planned batch size
    ref = DefaultPlanner.reference_3d if len(cfg["patch_size"]) == 3 else DefaultPlanner.reference_2d
    if "ResidualEncoderUNet" in cfg["network"]["class_name"]:
        ref = ResEncPlanner.reference_3d if len(cfg["patch_size"]) == 3 else ResEncPlanner.reference_2d
    count = feature_map_count(cfg["network"], cfg["patch_size"], n_channels, n_classes)
    assert estimated_gb(count, cfg["batch_size"], ref) <= budget_gb + 1e-9
    assert abs(estimated_gb(count, cfg["batch_size"], ref) - cfg["estimated_gpu_memory_gb"]) < 1e-2
    # patch not larger than the median image beyond rounding to the network's divisibility
    assert all(p <= m + t for p, m, t in zip(cfg["patch_size"], cfg["median_image_size_in_voxels"], total))


# ------------------------------------------------------------------------------------------------------------
# planner on fingerprints (no images: fast, exact control over spacings)
# ------------------------------------------------------------------------------------------------------------
def test_isotropic_plan_is_sane(tmp_path):
    spec = _spec_only(tmp_path)
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 6 + [[1.1, 1.1, 1.1]] * 4, [[300, 320, 310]] * 10)
    plans = DefaultPlanner(spec, fp, 8).plan()
    vp = plans["views"]["sagittal"]
    assert vp["transpose_forward"] == [0, 1, 2] and vp["transpose_backward"] == [0, 1, 2]
    full = vp["configurations"]["3d_fullres"]
    assert full["spacing"] == [1.0, 1.0, 1.0]                  # the median
    assert "2d" not in vp["configurations"]                   # isotropic: no 2d
    assert all(k == [3, 3, 3] for k in full["network"]["kwargs"]["kernel_sizes"])
    _check_config_sane(full, 8)
    assert full["patch_size"] == [128, 128, 128]
    # large images: a lowres configuration with a coarser spacing and at least 2x fewer voxels
    low = vp["configurations"]["3d_lowres"]
    assert all(ls > fs for ls, fs in zip(low["spacing"], full["spacing"]))
    assert np.prod(full["median_image_size_in_voxels"]) / np.prod(low["median_image_size_in_voxels"]) >= 2
    _check_config_sane(low, 8)


def test_anisotropic_plan_thick_axis_first_and_10th_percentile(tmp_path):
    spec = _spec_only(tmp_path)
    thick = [2.5, 3.0, 3.0, 3.3, 3.5, 4.0, 4.0, 4.5, 3.0, 3.0]
    spacings = [[0.4, 0.4, t] for t in thick]                 # thick axis stored LAST
    shapes = [[384, 384, int(round(100 / t))] for t in thick]
    plans = DefaultPlanner(spec, _fingerprint(spacings, shapes), 8).plan()
    vp = plans["views"]["sagittal"]
    assert vp["transpose_forward"] == [2, 0, 1]
    assert [vp["transpose_forward"][i] for i in vp["transpose_backward"]] == [0, 1, 2]
    full = vp["configurations"]["3d_fullres"]
    assert full["spacing"][0] == pytest.approx(np.percentile(thick, 10))   # not the median (3.15)
    assert full["spacing"][1:] == [0.4, 0.4]
    kernels = full["network"]["kwargs"]["kernel_sizes"]
    assert kernels[0] == [1, 3, 3]                            # no mixing of thick slices at full resolution
    assert kernels[-1] == [3, 3, 3]
    strides = full["network"]["kwargs"]["strides"]
    assert strides[1] == [1, 2, 2]                            # in-plane pooled first
    assert full["resampling"]["separate_z"] is True and full["resampling"]["anisotropy_axis"] == 0
    _check_config_sane(full, 8)
    assert "2d" in vp["configurations"]
    _check_config_sane(vp["configurations"]["2d"], 8)
    assert vp["configurations"]["2d"]["spacing"] == [0.4, 0.4]


def test_small_memory_target_shrinks_patch(tmp_path):
    spec = _spec_only(tmp_path)
    spacings = [[3.0, 0.4, 0.4]] * 8
    shapes = [[34, 384, 384]] * 8
    big = DefaultPlanner(spec, _fingerprint(spacings, shapes), 8).plan()["views"]["sagittal"]["configurations"]
    small = DefaultPlanner(spec, _fingerprint(spacings, shapes), 2).plan()["views"]["sagittal"]["configurations"]
    assert np.prod(small["3d_fullres"]["patch_size"]) < 0.5 * np.prod(big["3d_fullres"]["patch_size"])
    _check_config_sane(small["3d_fullres"], 2)
    _check_config_sane(big["3d_fullres"], 8)
    # an impossible budget still terminates, with the smallest patch the topology allows and batch 2
    planner = DefaultPlanner(spec, _fingerprint(spacings, shapes), 0.001)
    cfg = planner.plan_configuration("sagittal", [3.0, 0.4, 0.4], [34, 384, 384], 34 * 384 * 384 * 8, "3d_fullres")
    assert cfg["batch_size"] == 2 and np.prod(cfg["patch_size"]) < 2000


def test_topology_pools_inplane_until_isotropic():
    topo = plan_topology([4.0, 1.0, 1.0], [20, 160, 160])
    assert topo.strides[1] == (1, 2, 2) and topo.strides[2] == (1, 2, 2)
    assert topo.kernel_sizes[0] == (1, 3, 3) and topo.kernel_sizes[2] == (3, 3, 3)
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisible_by))
    # final feature map edge never below the minimum
    assert all(p // d >= 4 for p, d in zip(topo.patch_size, topo.divisible_by))


@pytest.mark.parametrize("planner_cls", [DefaultPlanner, ResEncPlanner])
def test_network_entry_builds_a_working_network(tmp_path, planner_cls):
    spec = _spec_only(tmp_path, channels=2)
    fp = _fingerprint([[4.0, 1.2, 1.2]] * 4, [[10, 40, 36]] * 4)
    fp["views"]["sagittal"]["foreground_intensity_properties_per_channel"]["1"] = \
        dict(fp["views"]["sagittal"]["foreground_intensity_properties_per_channel"]["0"])
    plans = planner_cls(spec, fp, 8).plan()
    cfg = plans["views"]["sagittal"]["configurations"]["3d_fullres"]
    entry = cfg["network"]
    assert not {"input_channels", "num_classes", "deep_supervision"} & set(entry["kwargs"])
    assert entry["class_name"].endswith("PlainConvUNet" if planner_cls is DefaultPlanner else "ResidualEncoderUNet")
    json.dumps(plans)                                          # plain JSON
    import torch

    torch.manual_seed(0)
    net = build_network(entry, input_channels=2, num_classes=3)
    with torch.no_grad():
        out = net(torch.zeros(1, 2, *cfg["patch_size"]))
    assert tuple(out.shape) == (1, 3, *cfg["patch_size"])


def test_planner_registry_and_cli_pl(tmp_path, monkeypatch):
    from orthonet.planners.registry import PLANNERS, get_planner, register_planner

    @register_planner
    class TinyFeaturesPlanner(DefaultPlanner):
        base_features = 8
        default_plans_name = "tinyPlans"

    try:
        assert get_planner("TinyFeaturesPlanner") is TinyFeaturesPlanner
        with pytest.raises(OrthoError, match="unknown planner"):
            get_planner("NoSuchPlanner")
        raw, pre = tmp_path / "raw", tmp_path / "pre"
        write_tiny_dataset(raw / "Dataset961_Reg", n_train=2, n_test=0, views=["sagittal"])
        assert run_cli(["-d", "961", "-pl", "TinyFeaturesPlanner", "--no-pp", "-np", "1"], raw, pre,
                       monkeypatch) == 0
        plans = load_plans(pre / "Dataset961_Reg", "tinyPlans")
        assert plans["planner"] == "TinyFeaturesPlanner"
        assert plans["views"]["sagittal"]["configurations"]["3d_fullres"]["network"]["kwargs"][
            "features_per_stage"][0] == 8
        assert not (pre / "Dataset961_Reg" / "plans.json").exists()   # only the default plans get the copy
    finally:
        PLANNERS.pop("TinyFeaturesPlanner", None)


# ------------------------------------------------------------------------------------------------------------
# fingerprint + plan from real files through the CLI
# ------------------------------------------------------------------------------------------------------------
def test_fingerprint_of_oblique_anisotropic_dataset(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_oblique_aniso_dataset(raw / "Dataset962_Obl", n_train=4, n_unlabeled=0)
    assert run_cli(["-d", "962", "--no-pp", "-np", "1"], raw, pre, monkeypatch) == 0
    fp = json.loads((pre / "Dataset962_Obl" / "fingerprint.json").read_text(encoding="utf-8"))
    sag = fp["views"]["sagittal"]
    assert sag["num_cases"] == 4 and sag["case_ids"] == ["k000", "k001", "k002", "k003"]
    # thick axis stored on numpy axis 1 for the sagittal view
    assert [s[1] for s in sag["spacings"]] == pytest.approx([5.0, 5.6, 6.2, 6.8])
    # zero background outside the body is cropped away
    assert all(np.prod(a) < np.prod(b) for a, b in zip(sag["shapes_after_crop"], sag["shapes_before_crop"]))
    assert sag["intensity_source"] == "labels" and fp["views"]["axial"]["intensity_source"] == "nonzero"
    # foreground statistics of the labelled view: bone (120) and cartilage (190) intensities
    st = sag["foreground_intensity_properties_per_channel"]["0"]
    assert 110 < st["percentile_00_5"] < st["median"] < st["percentile_99_5"] < 205
    plans = load_plans(pre / "Dataset962_Obl")
    expected_first = {"sagittal": 1, "coronal": 0, "axial": 2}
    for view, vp in plans["views"].items():
        assert vp["transpose_forward"][0] == expected_first[view]
        full = vp["configurations"]["3d_fullres"]
        thick = [s[expected_first[view]] for s in fp["views"][view]["spacings"]]
        assert full["spacing"][0] == pytest.approx(np.percentile(thick, 10), abs=1e-5)
        assert full["network"]["kwargs"]["kernel_sizes"][0] == [1, 3, 3]
        assert "2d" in vp["configurations"]


def test_plans_transfer_keeps_topology(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_oblique_aniso_dataset(raw / "Dataset963_Src", n_train=3, n_unlabeled=0, seed=1)
    write_oblique_aniso_dataset(raw / "Dataset964_Dst", n_train=3, n_unlabeled=0, seed=2,
                                slice_mm=(3.0, 3.3, 3.6), in_plane_mm=(1.2,), intensity_scale=3.0)
    assert run_cli(["-d", "963", "--no-pp", "-np", "1"], raw, pre, monkeypatch) == 0
    assert run_cli(["-d", "964", "--plans-from", "963", "-np", "1", "-c", "3d_fullres"], raw, pre,
                   monkeypatch) == 0
    src, dst = load_plans(pre / "Dataset963_Src"), load_plans(pre / "Dataset964_Dst")
    assert dst["transferred_from"]["dataset_name"] == "Dataset963_Src"
    own = DefaultPlanner(load_dataset(raw / "Dataset964_Dst"),
                         json.loads((pre / "Dataset964_Dst" / "fingerprint.json").read_text(encoding="utf-8")), 8).plan()
    for view in src["views"]:
        s, d = src["views"][view], dst["views"][view]
        assert set(s["configurations"]) == set(d["configurations"])
        for cname in s["configurations"]:
            assert d["configurations"][cname]["network"] == s["configurations"][cname]["network"]
            assert d["configurations"][cname]["patch_size"] == s["configurations"][cname]["patch_size"]
        # spacing and normalisation come from the target's own data
        assert d["configurations"]["3d_fullres"]["spacing"] == own["views"][view]["configurations"]["3d_fullres"][
            "spacing"] != s["configurations"]["3d_fullres"]["spacing"]
        assert d["normalization"]["per_channel"]["0"]["mean"] > 2 * s["normalization"]["per_channel"]["0"]["mean"]
    # preprocessed with the target spacing
    props = json.loads((pre / "Dataset964_Dst" / "orthoPlans_3d_fullres" / "k000_sagittal.json").read_text(encoding="utf-8"))
    assert props["target_spacing"] == dst["views"]["sagittal"]["configurations"]["3d_fullres"]["spacing"]


def test_plans_transfer_view_matching(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_tiny_dataset(raw / "Dataset965_Multi", n_train=2, n_test=0)
    write_tiny_nnunet_dataset(raw / "Dataset966_Single", n_train=2)
    assert run_cli(["-d", "965", "--no-pp", "-np", "1"], raw, pre, monkeypatch) == 0
    with pytest.raises(OrthoError, match="view 'image'.*no matching view"):
        run_cli(["-d", "966", "--plans-from", "965", "--no-pp", "-np", "1"], raw, pre, monkeypatch)
    assert run_cli(["-d", "966", "--plans-from", "965", "--view-map", "image=coronal", "--no-pp", "-np", "1"],
                   raw, pre, monkeypatch) == 0
    dst, src = load_plans(pre / "Dataset966_Single"), load_plans(pre / "Dataset965_Multi")
    assert dst["transferred_from"]["views"] == {"image": "coronal"}
    assert dst["views"]["image"]["configurations"]["3d_fullres"]["network"] == \
        src["views"]["coronal"]["configurations"]["3d_fullres"]["network"]


def test_existing_plans_are_kept_and_conflicts_named(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_tiny_dataset(raw / "Dataset967_Keep", n_train=2, n_test=0, views=["sagittal"])
    assert run_cli(["-d", "967", "--no-pp", "-np", "1"], raw, pre, monkeypatch) == 0
    path = pre / "Dataset967_Keep" / "orthoPlans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    plans["views"]["sagittal"]["configurations"]["3d_fullres"]["batch_size"] = 7
    path.write_text(json.dumps(plans, indent=2))
    assert run_cli(["-d", "967", "--no-pp", "-np", "1"], raw, pre, monkeypatch) == 0
    assert load_plans(pre / "Dataset967_Keep")["views"]["sagittal"]["configurations"]["3d_fullres"][
        "batch_size"] == 7
    with pytest.raises(OrthoError, match="gpu_memory_target 8.0 GB \\(requested 4.0 GB\\)"):
        run_cli(["-d", "967", "--no-pp", "-np", "1", "-gpu_memory_target", "4"], raw, pre, monkeypatch)
    assert run_cli(["-d", "967", "--no-pp", "-np", "1", "-gpu_memory_target", "4", "--overwrite"], raw, pre,
                   monkeypatch) == 0
    assert load_plans(pre / "Dataset967_Keep")["planner_settings"]["gpu_memory_target_gb"] == 4.0


def test_broken_plans_file_gives_clear_error(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_tiny_dataset(raw / "Dataset968_Bad", n_train=2, n_test=0, views=["sagittal"])
    assert run_cli(["-d", "968", "--no-pp", "-np", "1"], raw, pre, monkeypatch) == 0
    path = pre / "Dataset968_Bad" / "orthoPlans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    del plans["views"]["sagittal"]["configurations"]["3d_fullres"]["spacing"]
    path.write_text(json.dumps(plans))
    with pytest.raises(OrthoError, match="'3d_fullres' lacks 'spacing'"):
        load_plans(pre / "Dataset968_Bad")
    path.write_text("{ not json")
    with pytest.raises(OrthoError, match="not valid JSON"):
        load_plans(pre / "Dataset968_Bad")


def test_verify_errors_stop_planning(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    root = write_tiny_dataset(raw / "Dataset969_Ver", n_train=2, n_test=0, views=["sagittal"])
    label = root / "labelsTr" / "case001_sagittal.nii.gz"
    img = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(img)
    arr[arr == 2] = 9                                          # a value dataset.json does not declare
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(label))
    with pytest.raises(OrthoError, match="verification failed(.|\\n)*case001_sagittal"):
        run_cli(["-d", "969", "-np", "1"], raw, pre, monkeypatch)
    assert not (pre / "Dataset969_Ver" / "orthoPlans.json").exists()


def test_base_features_option_narrows_the_network(tmp_path, monkeypatch):
    """--base-features makes a narrower network of the same topology (CPU-only machines, quick experiments); a
    rerun asking for a different width without --overwrite is refused instead of silently mixing plans."""
    import json
    from orthonet.planners.cli import main
    from orthonet.errors import OrthoError
    from tests.builders import write_tiny_dataset
    for kind in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"ORTHO_{kind}", str(tmp_path / kind))
    write_tiny_dataset(tmp_path / "raw" / "Dataset962_Narrow", n_train=4, n_test=0)
    assert main(["-d", "962", "-np", "1", "--no-pp"]) == 0
    wide = json.loads((tmp_path / "preprocessed" / "Dataset962_Narrow" / "plans.json").read_text(encoding="utf-8"))
    assert main(["-d", "962", "-np", "1", "--no-pp", "--overwrite", "--base-features", "8"]) == 0
    narrow = json.loads((tmp_path / "preprocessed" / "Dataset962_Narrow" / "plans.json").read_text(encoding="utf-8"))
    for view in wide["views"]:
        w = wide["views"][view]["configurations"]["3d_fullres"]["network"]["kwargs"]
        n = narrow["views"][view]["configurations"]["3d_fullres"]["network"]["kwargs"]
        assert n["features_per_stage"] == [min(320, 8 * 2 ** i) for i in range(n["n_stages"])]
        assert n["strides"] == w["strides"] and n["kernel_sizes"] == w["kernel_sizes"]
    assert narrow["planner_settings"]["base_features"] == 8
    with pytest.raises(OrthoError, match="base_features"):
        main(["-d", "962", "-np", "1", "--no-pp", "--base-features", "16"])
