"""The realistic synthetic exam generator (orthonet.synthetic): geometry, labels, determinism, lesions, dataset
folder, CLI and speed. Tiny preset throughout except the speed test."""
from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.dataset import load_dataset
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry, array_to_image, read_array
from orthonet.synthetic import (VIEWS, case_seed, generate_case, get_joint, joint_names, make_dataset,
                                resolve_preset)
from orthonet.synthetic.acquisition import BiasField, acquire, noise_sigma, render_view
from orthonet.synthetic.cli import cli
from orthonet.synthetic.intensities import center_profile
from orthonet.synthetic.views import ViewGrid

#: Lesions that are spread out by nature (a displaced patella, an effusion in several recesses, a long ligament).
DIFFUSE = {"mcl_injury", "patellar_dislocation", "joint_effusion", "biceps_tendon_injury", "glenohumeral_effusion",
           "subacromial_bursitis"}


def _physical(geometry: Geometry, idx: np.ndarray) -> np.ndarray:
    aff = geometry.index_to_physical()
    return idx @ aff[:3, :3].T + aff[:3, 3]


def _centroid(view, value: int, ref=None, radius: float = 1e9) -> np.ndarray:
    pts = _physical(view.geometry, np.argwhere(view.labels == value).astype(float))
    if ref is not None:
        pts = pts[np.linalg.norm(pts - ref, axis=1) < radius]
    assert len(pts) > 0
    return pts.mean(0)


@pytest.fixture(scope="module")
def knee_case():
    return generate_case("knee", 11, size="tiny")


def _label_on_grid(src, dst):
    """``src``'s label map resampled (nearest, by SimpleITK from the headers alone) onto ``dst``'s grid, and the
    mask of ``dst`` voxels that lie inside ``src``'s field of view."""
    ref = array_to_image(dst.labels, dst.geometry)
    moved = sitk.Resample(array_to_image(src.labels, src.geometry), ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                          0, sitk.sitkUInt8)
    inside = sitk.Resample(array_to_image(np.ones_like(src.labels), src.geometry), ref, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(inside).astype(bool)


def test_views_do_not_share_a_grid_but_agree_in_physical_space(knee_case):
    geoms = {v: knee_case.views[v].geometry for v in VIEWS}
    pairs = (("sagittal", "coronal"), ("sagittal", "axial"), ("coronal", "axial"))
    for a, b in pairs:
        assert geoms[a].differences(geoms[b]), "views must have their own grids"
    for g in geoms.values():
        d = g.direction_matrix
        assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
        assert not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-3), "views are slightly oblique"
    # one view's labels carried through the headers onto another view's grid overlap that view's own labels
    # (an 8 mm header error drops the patella to ~0.55 and the bones to ~0.8)
    for a, b in pairs:
        moved, inside = _label_on_grid(knee_case.views[a], knee_case.views[b])
        own = knee_case.views[b].labels
        for name, least in (("femur", 0.9), ("tibia", 0.9), ("patella", 0.8)):
            x = (moved == knee_case.labels[name]) & inside
            y = (own == knee_case.labels[name]) & inside
            dice = 2.0 * (x & y).sum() / (x.sum() + y.sum())
            assert dice > least, f"{name}: {a} labels on the {b} grid overlap only {dice:.2f}"
    # and the centroid of a structure inside every field of view agrees across views
    cents = {v: _centroid(knee_case.views[v], knee_case.labels["patella"]) for v in VIEWS}
    slice_mm = max(g.spacing[2] for g in geoms.values())
    for a, b in pairs:
        assert np.linalg.norm(cents[a] - cents[b]) < 0.5 * slice_mm


def test_labels_are_the_structures_on_each_grid(knee_case):
    model = get_joint("knee")
    for v in VIEWS:
        view = knee_case.views[v]
        assert view.image.dtype == np.float32 and view.labels.dtype == np.uint8
        assert view.image.shape == view.labels.shape == view.geometry.array_shape
        assert np.all(np.isfinite(view.image)) and view.image.min() >= 0
        assert np.array_equal(view.image, np.rint(view.image)), "scanner magnitudes are integers"
        assert set(np.unique(view.labels)) <= set(range(len(model.labels) + 1))
    found = set(np.unique(knee_case.views["sagittal"].labels))
    # the big structures are always on the sagittal (segmentation) grid, even at the tiny preset
    for name in ("femur", "tibia", "patella", "femoral_cartilage", "tibial_cartilage"):
        assert knee_case.labels[name] in found
    # bone is darker than cartilage, cartilage darker than fluid-free fat is not required, but the menisci and
    # cruciates (dark) are darker than cartilage (intermediate-bright) on PD-FS
    sag = generate_case("knee", 11, size="tiny", in_plane_mm=1.2, slice_mm=3.0).views["sagittal"]
    lab = knee_case.labels

    def median(name):
        return float(np.median(sag.image[sag.labels == lab[name]]))
    assert median("femoral_cartilage") > 1.5 * median("medial_meniscus")
    assert median("femoral_cartilage") > 1.5 * median("pcl")
    assert median("femoral_cartilage") > median("femur")


def test_same_seed_same_bytes_different_seed_differs():
    a = generate_case("knee", 3, size="tiny")
    b = generate_case("knee", 3, size="tiny")
    c = generate_case("knee", 4, size="tiny")
    for v in VIEWS:
        assert a.views[v].image.tobytes() == b.views[v].image.tobytes()
        assert a.views[v].labels.tobytes() == b.views[v].labels.tobytes()
        assert a.views[v].geometry == b.views[v].geometry
        assert (a.views[v].image.shape != c.views[v].image.shape
                or a.views[v].image.tobytes() != c.views[v].image.tobytes())
    assert a.params == b.params and a.params != c.params


@pytest.mark.parametrize("joint,lesion", [(j, d) for j in ("knee", "ankle", "shoulder")
                                          for d in get_joint(j).diagnoses])
def test_each_lesion_changes_the_image_where_it_is(joint, lesion):
    on = generate_case(joint, 5, size="tiny", lesions={lesion: True})
    off = generate_case(joint, 5, size="tiny", lesions={lesion: False})
    assert on.present[lesion] and not off.present[lesion]
    assert on.diagnosis[list(on.diagnoses).index(lesion)] == 1
    others = [d for d in on.diagnoses if d != lesion]
    assert [on.present[d] for d in others] == [off.present[d] for d in others]
    site = on.lesion_sites_mm[lesion]
    for v in VIEWS:
        assert on.views[v].geometry == off.views[v].geometry      # same case, same acquisition
        diff = on.views[v].image - off.views[v].image
        changed = np.argwhere(diff != 0)
        assert len(changed) > 0 and np.abs(diff).max() > 50, f"{lesion} invisible in {v}"
        assert len(changed) < 0.1 * diff.size, f"{lesion} changes too much of the {v} image"
        pts = _physical(on.views[v].geometry, changed.astype(float))
        w = np.abs(diff[diff != 0])
        dist = np.linalg.norm(pts - site, axis=1)
        centre_err = np.linalg.norm((pts * w[:, None]).sum(0) / w.sum() - site)
        assert centre_err < 45.0, f"{lesion}: change centred {centre_err:.0f} mm from the lesion in {v}"
        if lesion not in DIFFUSE:
            assert w[dist < 30].sum() > 0.9 * w.sum(), f"{lesion}: change not concentrated at the lesion in {v}"
        # on a fluid-sensitive sequence the lesion region gets brighter
        assert diff[diff != 0][dist < 30].sum() > 0, f"{lesion} does not brighten its region in {v}"


#: Voxels that must change by more than 3 noise sigmas in every view when a lesion is added at the default size.
#: 150 voxels of 0.6 x 0.6 x 3.5 mm are ~190 mm^3: a patch of dozens of pixels on each of several slices, which
#: survives a network's first poolings. The generator once drew meniscal tears and partial ACL tears of 10-100
#: such voxels (a few pixels per slice, no more than isolated noise spikes), which no classifier can learn.
VISIBLE_VOXELS = 150
VISIBILITY_SEED = 3


@pytest.fixture(scope="module")
def lesion_free_default():
    """Per joint, the default-size case of VISIBILITY_SEED with no lesion at all (generated once, shared)."""
    cache = {}

    def get(joint):
        if joint not in cache:
            cache[joint] = generate_case(joint, VISIBILITY_SEED, size="default",
                                         lesions={d: False for d in get_joint(joint).diagnoses})
        return cache[joint]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("joint,lesion", [(j, d) for j in ("knee", "ankle", "shoulder")
                                          for d in get_joint(j).diagnoses])
def test_each_lesion_is_visible_above_noise_at_the_default_size(joint, lesion, lesion_free_default):
    """Every diagnosis is learnable from the images: adding it alone to an otherwise lesion-free case changes
    at least VISIBLE_VOXELS voxels of each view by more than 3 noise sigmas, and only locally (< 10 %)."""
    off = lesion_free_default(joint)
    on = generate_case(joint, VISIBILITY_SEED, size="default",
                       lesions={d: d == lesion for d in get_joint(joint).diagnoses})
    assert on.present[lesion] and sum(on.present.values()) == 1
    threshold = 3.0 * on.params["noise_sigma"]
    assert off.params["noise_sigma"] == on.params["noise_sigma"]
    for v in VIEWS:
        assert on.views[v].geometry == off.views[v].geometry
        changed = np.abs(on.views[v].image - off.views[v].image) > threshold
        n = int(changed.sum())
        assert n >= VISIBLE_VOXELS, f"{lesion}: only {n} voxels above 3 sigma in the {v} view"
        assert n < 0.1 * changed.size, f"{lesion} changes {n / changed.size:.0%} of the {v} view"


def test_abnormalities_are_independent_with_their_prevalence():
    from orthonet.synthetic.case import draw_presence
    from orthonet.synthetic.joints import CaseRandom
    for joint in joint_names():
        model = get_joint(joint)
        assert all(0.25 <= model.prevalence[d] <= 0.45 for d in model.diagnoses)
        draws = np.array([[draw_presence(model, CaseRandom(s))[d] for d in model.diagnoses] for s in range(400)])
        rate = draws.mean(0)
        expected = np.array([model.prevalence[d] for d in model.diagnoses])
        assert np.all(np.abs(rate - expected) < 0.1), dict(zip(model.diagnoses, rate))
        if len(model.diagnoses) > 1:
            corr = np.corrcoef(draws.T.astype(float))
            assert np.abs(corr[~np.eye(len(corr), dtype=bool)]).max() < 0.2


def test_centres_differ_in_noise_contrast_and_bias():
    a, c = center_profile(0), center_profile(2)
    assert a.snr > 2 * c.snr and a.gamma != c.gamma and a.bias_strength < c.bias_strength
    grid = ViewGrid.make("axial", (0.0, 0.0, 0.0), (60.0, 60.0), 20.0, 1.0, 4.0)
    flat = np.full(grid.geometry.array_shape, 0.5, np.float32)
    no_bias = BiasField((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0.0)
    vox = 1.0 * 1.0 * 4.0
    rel = []
    for prof in (a, c):
        img = acquire(flat, grid, prof, no_bias, noise_sigma(prof, vox, 1.0), np.random.default_rng(0))
        rel.append(img.std() / img.mean())
    assert rel[1] > 2 * rel[0]
    # the bias field is smooth, multiplicative and the same physical field in every view
    bias = BiasField.random(np.random.default_rng(1), (0.0, 0.0, 0.0), c.bias_strength)
    f = bias.on_grid(grid)
    assert f.min() > 0.5 and f.max() < 2.0 and f.std() > 0.01
    pts = grid.physical_points()[0] / 100.0
    ref = np.exp(pts @ np.asarray(bias.gradient) - bias.curvature * (pts ** 2).sum(-1))
    assert np.allclose(f, ref, rtol=1e-4)


def test_partial_volume_averages_thin_planes():
    """A thick slice is the mean of its thin sub-slices: a plate thinner than the slice shows intermediate
    signal in the stack but full signal in a thin-slice acquisition."""
    from orthonet.synthetic.phantom import Phantom, Structure
    from orthonet.synthetic.shapes import Box
    plate = Structure("plate", Box((0.0, 0.0, 0.0), (20.0, 20.0, 1.0)), "fluid", label=1)
    ph = Phantom("test", [plate], {"root": np.eye(4)}, np.eye(4), 1.0, {})
    table = {"fluid": 1.0}
    grid = ViewGrid.make("axial", (0.0, 0.0, 0.0), (30.0, 30.0), 6.0, 1.0, 6.0)   # one 6 mm slice
    thick, lab = render_view(ph, grid, table, pv_samples=5)
    centre = thick[0, 15, 15]
    assert 0.2 < centre < 0.5 and lab[0, 15, 15] == 1      # 2 mm plate in a 6 mm slice, labelled at the centre
    thin, _ = render_view(ph, ViewGrid.make("axial", (0.0, 0.0, 0.0), (30.0, 30.0), 1.0, 1.0, 1.0), table, 1)
    assert thin[0, 15, 15] > 0.99


@pytest.mark.parametrize("joint", ["knee", "shoulder"])
def test_narrow_band_rendering_equals_dense_rendering(joint, monkeypatch):
    """The speed trick (coarse pre-pass, skip far tiles, fill deep tiles) must not change the phantom."""
    import orthonet.synthetic.acquisition as acq
    from orthonet.synthetic.case import place_views
    from orthonet.synthetic.intensities import tissue_table
    from orthonet.synthetic.joints import CaseRandom
    model = get_joint(joint)
    rngs = CaseRandom(1)
    phantom = model.build(rngs, {d: True for d in model.diagnoses})
    preset = resolve_preset("default", fov_scale=0.4)
    grid = place_views(model, phantom, preset, 1.0, rngs.stream("views"))["coronal"]
    table = tissue_table(center_profile(0), rngs.stream("tissue"))
    fast, fast_lab = render_view(phantom, grid, table, 3)
    monkeypatch.setattr(acq, "COARSE_MM", 0.01)            # one-pixel tiles: every point evaluated
    dense, dense_lab = render_view(phantom, grid, table, 3)
    assert np.array_equal(fast_lab, dense_lab)
    assert np.abs(fast - dense).max() < 0.15 and np.abs(fast - dense).mean() < 1e-3


def test_presets_and_bad_arguments():
    assert resolve_preset("default").in_plane_mm <= 0.6 and 3.0 <= resolve_preset("default").slice_mm <= 4.0
    assert resolve_preset("tiny", slice_mm=6.0).slice_mm == 6.0
    with pytest.raises(OrthoError):
        resolve_preset("huge")
    with pytest.raises(OrthoError):
        resolve_preset("tiny", pv_samples=2)
    with pytest.raises(OrthoError):
        resolve_preset("tiny", voxel=1)
    with pytest.raises(OrthoError):
        generate_case("knee", 0, size="tiny", lesions={"broken_leg": True})
    with pytest.raises(OrthoError):
        generate_case("elbow", 0, size="tiny")
    for view in generate_case("knee", 0, size="small").views.values():
        assert 48 <= view.image.shape[1] <= 110 and 14 <= view.image.shape[0] <= 28
    for view in generate_case("knee", 0, size="tiny").views.values():
        assert 30 <= view.image.shape[1] <= 50 and 8 <= view.image.shape[0] <= 14


@pytest.mark.parametrize("joint", ["ankle", "shoulder"])
def test_transfer_joints_generate_their_own_structures(joint):
    model = get_joint(joint)
    case = generate_case(joint, 2, size="tiny", in_plane_mm=1.5, slice_mm=3.0)
    assert case.labels == model.label_dict() and case.joint == joint
    assert case.diagnosis.shape == (len(model.diagnoses),)
    seen = set()
    for v in VIEWS:
        seen |= set(np.unique(case.views[v].labels).tolist())
    assert seen == set(range(len(model.labels) + 1)), f"missing labels: {set(range(len(model.labels) + 1)) - seen}"


def _assert_same_case(spec, case_id: str, case, split="Tr"):
    for v in VIEWS:
        img, geom = read_array(spec.image_path(case_id, v, 0, split))
        assert geom.differences(case.views[v].geometry) == []
        assert np.array_equal(img, case.views[v].image)


def test_dataset_folder_is_complete_and_loads(tmp_path):
    root = tmp_path / "Dataset120_Knee"
    out = make_dataset(root, "knee", n_train=3, n_test=2, n_unlabeled=2, seed=7, size="tiny", n_centers=2,
                       progress=False)
    assert out == root.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    spec = load_dataset(root)
    model = get_joint("knee")
    assert spec.views == list(VIEWS) and spec.segmentation_view == "sagittal"
    assert spec.diagnoses == list(model.diagnoses) and spec.num_training == 3
    assert spec.labels == model.label_dict() and spec.raw["numUnlabeled"] == 2
    assert spec.cases("Tr") == ["knee_000", "knee_001", "knee_002"]
    assert spec.cases("Ts") == ["knee_test_000", "knee_test_001"]
    assert spec.cases("Unlabeled") == ["knee_unl_000", "knee_unl_001"]
    assert spec.labelled_cases() == spec.cases("Tr")
    diag = spec.read_diagnoses()
    assert sorted(diag) == spec.cases("Tr")
    centres = spec.read_centers()
    assert sorted(centres) == sorted(spec.cases("Tr") + spec.cases("Ts") + spec.cases("Unlabeled"))
    assert len(set(centres.values())) == 2
    for case in spec.cases("Tr"):
        img, g_img = read_array(spec.image_path(case, "sagittal", 0))
        lab, g_lab = read_array(spec.label_path(case), dtype=np.int16)
        assert g_img.differences(g_lab) == [] and g_img == g_lab       # exactly the image's grid
        assert set(np.unique(lab).tolist()) <= set(spec.label_values)
        assert lab.max() > 0
    # test ground truth for evaluation; no labels for unlabeled cases
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == [
        "knee_test_000_sagittal.nii.gz", "knee_test_001_sagittal.nii.gz"]
    assert (root / "diagnosesTs.csv").read_text(encoding="utf-8").splitlines()[0] == "case_id," + ",".join(model.diagnoses)
    assert not (root / "labelsUnlabeled").exists()
    # files are exactly generate_case(seed of the case): adding cases cannot change earlier ones
    first = generate_case("knee", case_seed(7, "Tr", 0), size="tiny", center=0)
    _assert_same_case(spec, "knee_000", first)
    assert np.array_equal(diag["knee_000"], first.diagnosis.astype(np.float32))


def test_cli_end_to_end_refuses_to_overwrite_and_is_process_count_independent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORTHO_raw", str(tmp_path / "raw"))
    args = ["--joint", "ankle", "-d", "102", "--train", "2", "--test", "1", "--unlabeled", "1", "--seed", "3",
            "--size", "tiny", "--quiet"]
    assert cli(args + ["-np", "2"]) == 0
    root = tmp_path / "raw" / "Dataset102_Ankle"
    spec = load_dataset(root)
    assert spec.cases("Tr") == ["ankle_000", "ankle_001"] and spec.raw["joint"] == "ankle"
    before = (root / "imagesTr" / "ankle_001_axial_0000.nii.gz").read_bytes()
    assert cli(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (root / "imagesTr" / "ankle_001_axial_0000.nii.gz").read_bytes() == before
    # one process gives the same data as two
    assert cli(args + ["--overwrite", "-np", "1"]) == 0
    assert (root / "imagesTr" / "ankle_001_axial_0000.nii.gz").read_bytes() == before
    _assert_same_case(load_dataset(root), "ankle_unl_000",
                      generate_case("ankle", case_seed(3, "Unlabeled", 0), size="tiny", center=0), "Unlabeled")
    assert cli(["-d", "103", "--train", "1", "--test", "0", "--size", "tiny", "--slice-mm", "7", "--quiet"]) == 0
    img, g = read_array(tmp_path / "raw" / "Dataset103_Knee" / "imagesTr" / "knee_000_coronal_0000.nii.gz")
    assert abs(g.spacing[2] - 7.0) < 1e-6


def test_a_failed_run_leaves_no_dataset(tmp_path, monkeypatch):
    import orthonet.synthetic.writer as writer
    calls = {"n": 0}
    real = writer._write_case

    def flaky(args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(args)
    monkeypatch.setattr(writer, "_write_case", flaky)
    with pytest.raises(RuntimeError):
        make_dataset(tmp_path / "Dataset121_Knee", "knee", n_train=3, n_test=0, size="tiny", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OrthoError):
        make_dataset(tmp_path / "Knee", "knee", n_train=1, size="tiny", progress=False)


@pytest.mark.slow
def test_default_preset_is_fast_on_one_core():
    """Well under 2 s per case on one core at the realistic default size (CPU time, so a busy machine does not
    fail it)."""
    generate_case("knee", 0, size="tiny")
    best = 1e9
    for seed in (1, 2):
        t0 = time.process_time()
        case = generate_case("knee", seed, size="default")
        best = min(best, time.process_time() - t0)
    for view in case.views.values():      # thick partial-volume slices, fine in-plane pixels, per-view protocol
        assert 0.3 <= view.geometry.spacing[0] <= 0.65 and 3.0 <= view.geometry.spacing[2] <= 4.1
        assert view.image.shape[1] >= 200
    print(f"default knee case: {best:.2f} s CPU")
    assert best < 2.0
