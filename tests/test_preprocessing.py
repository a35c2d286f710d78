"""Preprocessing: resampling, cropping, normalisation, the export round trip, and the dataset-level CLI behaviour."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from orthonet.imageio import read_array
from orthonet.planners.plans import load_plans
from orthonet.preprocessing import storage
from orthonet.preprocessing.crop import OUTSIDE_LABEL, crop_to_nonzero, uncrop
from orthonet.preprocessing.export import restore_original_geometry, segmentation_to_image
from orthonet.preprocessing.normalize import normalize
from orthonet.preprocessing.preprocessor import preprocess_case
from orthonet.preprocessing.resample import resample_image, resample_labels
from tests.builders import write_tiny_dataset, write_tiny_nnunet_dataset
from tests.test_planning import run_cli, write_oblique_aniso_dataset

os.environ.setdefault("OMP_NUM_THREADS", "1")


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return 2.0 * np.logical_and(x, y).sum() / max(1, x.sum() + y.sum())


# ------------------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------------------
def test_separable_cubic_equals_3d_spline_interpolation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 23, 17)).astype(np.float32)
    new = (13, 18, 29)
    ours = resample_image(a[None], new, order=3)[0]
    coords = np.meshgrid(*[(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(a.shape, new)], indexing="ij")
    ref = map_coordinates(a.astype(np.float64), coords, order=3, mode="mirror")
    assert np.abs(ours - ref).max() < 1e-4
    # separate thick axis: nearest along axis 0, cubic in-plane
    sep = resample_image(a[None], (18, 23, 17), order=3, order_z=0, z_axis=0)[0]
    assert np.array_equal(sep[0], a[0]) and np.array_equal(sep[1], a[0]) and np.array_equal(sep[2], a[1])


def test_label_resampling():
    seg = np.zeros((10, 20, 20), np.int16)
    seg[2:8, 4:16, 5:15] = 1
    seg[4:6, 8:12, 8:12] = 2
    seg[0] = -1
    up = resample_labels(seg, (20, 40, 40), order=1)
    assert set(np.unique(up)) == {-1, 0, 1, 2}
    back = resample_labels(up, seg.shape, order=1)
    assert np.array_equal(back, seg)
    # nearest along a separate axis keeps whole slices
    sep = resample_labels(seg, (20, 20, 20), order=1, order_z=0, z_axis=0)
    assert np.array_equal(sep[::2], seg) and np.array_equal(sep[1::2], seg)
    # order 0
    assert np.array_equal(resample_labels(seg, (20, 40, 40), order=0)[::2, ::2, ::2], seg)


def test_crop_uncrop_and_fill_holes():
    data = np.zeros((2, 12, 14, 16), np.float32)
    data[0, 2:9, 3:11, 4:13] = 5.0
    data[0, 5, 6, 8] = 0.0                      # a hole inside the body is kept as inside
    data[1, 10, 4, 4] = 1.0                     # second channel extends the box
    seg = np.zeros((1, 12, 14, 16), np.int16)
    seg[0, 4:6, 5:8, 6:9] = 1
    cropped, cseg, bbox, mask = crop_to_nonzero(data, seg)
    assert bbox == [[2, 11], [3, 11], [4, 13]]
    assert mask[5 - 2, 6 - 3, 8 - 4]             # hole filled
    assert (cseg == OUTSIDE_LABEL).sum() == (~mask).sum() and (cseg == 1).sum() == 18
    assert np.array_equal(uncrop(cropped, bbox, data.shape[1:]), data)


def test_normalization_schemes():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (1, 8, 8, 8)).astype(np.float32)
    z = normalize(img, {"scheme": "zscore", "per_channel": {"0": {}}, "use_mask_for_norm": False})
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6] = True
    zm = normalize(img, {"scheme": "zscore", "per_channel": {"0": {}}, "use_mask_for_norm": True}, mask)
    assert np.all(zm[0][~mask] == 0) and abs(zm[0][mask].mean()) < 1e-4
    ct = normalize(img, {"scheme": "zscore", "per_channel": {"0": {"scheme": "ct", "mean": 100.0, "std": 10.0,
                                                                    "percentile_00_5": 90.0,
                                                                    "percentile_99_5": 110.0}}})
    assert ct.min() >= -1.0 - 1e-6 and ct.max() <= 1.0 + 1e-6


# ------------------------------------------------------------------------------------------------------------
# the contract: export(preprocess(x)) == x, on oblique, off-centre, anisotropic, multi-view data
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oblique_preprocessed(tmp_path_factory):
    base = tmp_path_factory.mktemp("obl")
    raw, pre = base / "raw", base / "pre"
    write_oblique_aniso_dataset(raw / "Dataset971_Obl", n_train=4, n_unlabeled=1, channels=2)
    mp = pytest.MonkeyPatch()
    try:
        assert run_cli(["-d", "971", "-np", "2", "-c", "3d_fullres", "2d"], raw, pre, mp) == 0
    finally:
        mp.undo()
    return raw / "Dataset971_Obl", pre / "Dataset971_Obl"


def test_roundtrip_restores_labels_and_geometry(oblique_preprocessed):
    raw, pre = oblique_preprocessed
    plans = load_plans(pre)
    for config in ("3d_fullres", "2d"):
        folder = pre / f"orthoPlans_{config}"
        for case in ("k000", "k001", "k002", "k003"):
            data, seg, props = storage.load_case(folder, case, "sagittal")
            # stored in the plan's orientation: thick axis (numpy axis 1 in the raw files) first
            assert props["transpose_forward"] == plans["views"]["sagittal"]["transpose_forward"] == [1, 0, 2]
            assert data.shape == (2, *props["shape_after_resampling"]) and seg.shape[1:] == data.shape[1:]
            assert abs(float(data[0].mean())) < 0.05            # z-scored
            label_path = raw / "labelsTr" / f"{case}_sagittal.nii.gz"
            original, geom = read_array(label_path, dtype=np.int16)
            restored = restore_original_geometry(seg, props)
            assert restored.shape == original.shape
            for c in (1, 2):
                assert dice(restored, original, c) > 0.99, (config, case, c, dice(restored, original, c))
            image = segmentation_to_image(seg, props)
            ref = sitk.ReadImage(str(label_path))
            assert image.GetSize() == ref.GetSize() and image.GetSpacing() == ref.GetSpacing()
            assert image.GetOrigin() == ref.GetOrigin() and image.GetDirection() == ref.GetDirection()


def test_preprocessed_layout_and_class_locations(oblique_preprocessed):
    raw, pre = oblique_preprocessed
    plans = load_plans(pre)
    folder = pre / "orthoPlans_3d_fullres"
    for view in ("sagittal", "coronal", "axial"):
        target = plans["views"][view]["configurations"]["3d_fullres"]["spacing"]
        for case, split in (("k001", "Tr"), ("u000", "Unlabeled")):
            data, seg, props = storage.load_case(folder, case, view)
            assert props["split"] == split and props["target_spacing"] == target
            assert (seg is not None) == (view == "sagittal" and split == "Tr")
    _, seg, props = storage.load_case(folder, "k000", "sagittal")
    for c in ("1", "2"):
        locs = np.asarray(props["class_locations"][c])
        assert len(locs) > 0 and np.all(seg[0][tuple(locs.T)] == int(c))
    # 2d keeps the slices: axis 0 is not resampled
    _, _, p2 = storage.load_case(pre / "orthoPlans_2d", "k000", "sagittal")
    assert p2["shape_after_resampling"][0] == p2["shape_after_crop"][0]
    assert not list(pre.glob("*/test*"))                      # imagesTs is never preprocessed


def test_preprocess_case_at_inference_matches_stored(oblique_preprocessed):
    raw, pre = oblique_preprocessed
    plans = load_plans(pre)
    paths = [raw / "imagesTr" / f"k002_axial_{c:04d}.nii.gz" for c in range(2)]
    data, props = preprocess_case({"axial": paths}, plans, "axial", "3d_fullres", case="k002")
    stored, _, sprops = storage.load_case(pre / "orthoPlans_3d_fullres", "k002", "axial")
    assert np.array_equal(data, stored) and "class_locations" not in props
    assert props["bbox_used_for_cropping"] == sprops["bbox_used_for_cropping"]
    # arrays + geometry give the same result as paths
    arr = np.stack([read_array(p)[0] for p in paths])
    geom = read_array(paths[0])[1]
    data2, _ = preprocess_case((arr, geom), plans, "axial", "3d_fullres", case="k002")
    assert np.array_equal(data2, stored)


# ------------------------------------------------------------------------------------------------------------
# dataset-level behaviour
# ------------------------------------------------------------------------------------------------------------
def test_nnunet_dataset_plans_and_preprocesses(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_tiny_nnunet_dataset(raw / "Dataset972_Plain", n_train=3, anisotropic=True)
    assert run_cli(["-d", "972", "-np", "1"], raw, pre, monkeypatch) == 0
    plans = load_plans(pre / "Dataset972_Plain")
    assert list(plans["views"]) == ["image"] and plans["segmentation_view"] == "image"
    data, seg, props = storage.load_case(pre / "Dataset972_Plain" / "orthoPlans_3d_fullres", "pat_001", "image")
    assert seg is not None and set(np.unique(seg)) <= {-1, 0, 1, 2} and (seg == 1).any()
    original, _ = read_array(raw / "Dataset972_Plain" / "labelsTr" / "pat_001.nii.gz", dtype=np.int16)
    assert dice(restore_original_geometry(seg, props), original, 1) > 0.99


def test_determinism_rerun_skip_and_overwrite(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_tiny_dataset(raw / "Dataset973_Det", n_train=3, n_test=1, n_unlabeled=1, oblique=True, channels=2)
    pre_a, pre_b = tmp_path / "pre_a", tmp_path / "pre_b"
    assert run_cli(["-d", "973", "-np", "1"], raw, pre_a, monkeypatch) == 0
    assert run_cli(["-d", "973", "-np", "2"], raw, pre_b, monkeypatch) == 0
    a, b = pre_a / "Dataset973_Det", pre_b / "Dataset973_Det"
    for name in ("plans.json", "orthoPlans.json", "fingerprint.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    files = sorted(p.name for p in (a / "orthoPlans_3d_fullres").iterdir())
    assert not [f for f in files if f.startswith("test")]      # imagesTs is never preprocessed
    assert files == sorted(p.name for p in (b / "orthoPlans_3d_fullres").iterdir()) and len(files) == 12 * 2 + 3
    for f in files:
        if f.endswith(".b2nd"):
            assert np.array_equal(storage.open_array(a / "orthoPlans_3d_fullres" / f, load=True),
                                  storage.open_array(b / "orthoPlans_3d_fullres" / f, load=True)), f
        else:
            assert (a / "orthoPlans_3d_fullres" / f).read_bytes() == (b / "orthoPlans_3d_fullres" / f).read_bytes()
    # rerun: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in (a / "orthoPlans_3d_fullres").iterdir()}
    assert run_cli(["-d", "973", "-np", "1"], raw, pre_a, monkeypatch) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert "0 preprocessed, 12 up to date" in (a / "plan_and_preprocess_log.txt").read_text(encoding="utf-8")
    # --overwrite redoes every case
    assert run_cli(["-d", "973", "-np", "1", "--overwrite"], raw, pre_a, monkeypatch) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_edited_plan_is_honoured(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    write_tiny_dataset(raw / "Dataset974_Edit", n_train=2, n_test=0, views=["sagittal"])
    assert run_cli(["-d", "974", "-np", "1"], raw, pre, monkeypatch) == 0
    folder = pre / "Dataset974_Edit" / "orthoPlans_3d_fullres"
    before = storage.load_case(folder, "case000", "sagittal")[2]["shape_after_resampling"]
    path = pre / "Dataset974_Edit" / "orthoPlans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    cfg = plans["views"]["sagittal"]["configurations"]["3d_fullres"]
    cfg["spacing"] = [s / 2 for s in cfg["spacing"]]
    cfg["patch_size"] = [16, 48, 48]
    path.write_text(json.dumps(plans, indent=2))
    assert run_cli(["-d", "974", "-np", "1"], raw, pre, monkeypatch) == 0   # stale cases are redone
    after = storage.load_case(folder, "case000", "sagittal")[2]
    assert after["shape_after_resampling"] == [2 * s for s in before]
    assert after["target_spacing"] == cfg["spacing"]
    reread = load_plans(pre / "Dataset974_Edit")["views"]["sagittal"]["configurations"]["3d_fullres"]
    assert reread["patch_size"] == [16, 48, 48]


def test_corrupt_case_is_named_and_others_finish(tmp_path, monkeypatch, capsys):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    root = write_tiny_dataset(raw / "Dataset975_Bad", n_train=3, n_test=0, n_unlabeled=1, views=["sagittal"])
    assert run_cli(["-d", "975", "-np", "1", "--no-pp"], raw, pre, monkeypatch) == 0
    bad = root / "imagesTr" / "case001_sagittal_0000.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti file" * 10))
    code = run_cli(["-d", "975", "-np", "2", "--skip-verify"], raw, pre, monkeypatch)
    assert code == 1
    err = capsys.readouterr().err
    assert "case001" in err and "sagittal" in err and "case000" not in err
    folder = pre / "Dataset975_Bad" / "orthoPlans_3d_fullres"
    assert storage.is_complete(folder, "case000", "sagittal") and storage.is_complete(folder, "case002", "sagittal")
    assert storage.is_complete(folder, "unl000", "sagittal")
    assert not storage.is_complete(folder, "case001", "sagittal")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]     # no temporary leftovers


def test_realistic_generator_tiny_preset(tmp_path, monkeypatch):
    synthetic = pytest.importorskip("orthonet.synthetic")
    if not hasattr(synthetic, "make_dataset"):
        pytest.skip("orthonet.synthetic.make_dataset is not available yet")
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    synthetic.make_dataset(raw / "Dataset976_Knee", joint="knee", n_train=2, n_test=0, n_unlabeled=1, seed=0,
                           size="tiny")
    assert run_cli(["-d", "976", "-np", "1", "-c", "3d_fullres"], raw, pre, monkeypatch) == 0
    plans = load_plans(pre / "Dataset976_Knee")
    seg_view = plans["segmentation_view"]
    from orthonet.dataset import load_dataset

    spec = load_dataset(raw / "Dataset976_Knee")
    case = spec.labelled_cases()[0]
    _, seg, props = storage.load_case(pre / "Dataset976_Knee" / "orthoPlans_3d_fullres", case, seg_view)
    original, _ = read_array(spec.label_path(case), dtype=np.int16)
    restored = restore_original_geometry(seg, props)
    present = [c for c in np.unique(original) if c > 0 and (original == c).sum() > 50]
    assert present and np.mean([dice(restored, original, c) for c in present]) > 0.95


@pytest.mark.parametrize("shape,patch", [((1, 27, 245, 245), (16, 160, 160)), ((2, 40, 512, 512), (20, 160, 128)),
                                         ((1, 27, 245, 245), (320, 320)), ((1, 6, 20, 20), (16, 64, 64))])
def test_arrays_are_chunked_for_the_plans_patch_and_read_back_exactly(tmp_path, shape, patch):
    """Blocks fit L1, chunks fit L3 and follow the patch (a 2D patch: one slice per chunk), and patch reads from
    the memory-mapped file equal the array."""
    import blosc2
    from orthonet.preprocessing import storage
    rng = np.random.default_rng(0)
    data = rng.random(shape, dtype=np.float32)
    storage.save_case(tmp_path, "c0", "sagittal", data, None, {"split": "Tr"}, patch)
    stored = storage.open_array(storage.image_file(tmp_path, "c0", "sagittal"))
    assert isinstance(stored, blosc2.NDArray)
    blocks, chunks = storage.blosc2_layout(shape, patch, 4)
    assert tuple(stored.blocks) == blocks and tuple(stored.chunks) == chunks
    assert np.prod(blocks) * 4 <= storage.L1_BYTES and np.prod(chunks) * 4 <= storage.L3_BYTES
    assert all(c <= n for c, n in zip(chunks, shape)) and all(c % b == 0 or c == n
                                                              for c, b, n in zip(chunks, blocks, shape))
    if len(patch) == 2:
        assert chunks[1] == 1
    z, y, x = (min(p, n) for p, n in zip(([1] + list(patch))[-3:], shape[1:]))
    window = (slice(None), slice(1, 1 + z), slice(2, 2 + y), slice(3, 3 + x))
    assert np.array_equal(stored[window], data[window])
    assert np.array_equal(storage.open_array(storage.image_file(tmp_path, "c0", "sagittal"), load=True), data)


def _die_in_worker(code: int) -> int:
    os._exit(code)          # what the kernel's OOM killer does to a worker, seen from the pool


def test_a_dead_worker_is_one_error_with_the_fix(monkeypatch):
    import __main__
    from orthonet.errors import OrthoError
    from orthonet.preprocessing.parallel import _broken_pool_fix, make_pool, run_parallel

    pool = make_pool(2)
    try:
        with pytest.raises(OrthoError, match="worker process died") as info:
            run_parallel(_die_in_worker, [("case_0", (3,)), ("case_1", (3,))], pool, progress=False)
    finally:
        pool.shutdown(cancel_futures=True)
    assert "-np 1" in str(info.value)
    # from a user's script the other usual cause, a missing __main__ guard, is named with the script ...
    monkeypatch.setattr(__main__, "__file__", "/home/me/make_my_dataset.py", raising=False)
    assert "/home/me/make_my_dataset.py" in _broken_pool_fix() and "__name__" in _broken_pool_fix()
    # ... but not from orthonet's own console scripts, which have the guard
    monkeypatch.setattr(__main__, "__file__", "/venv/bin/ortho_plan_and_preprocess", raising=False)
    assert "__name__" not in _broken_pool_fix()
