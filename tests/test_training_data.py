"""Training data: case store, patch sampling, augmentation pipelines, batch loaders and their error reporting.

The preprocessed folder is written directly with ``orthonet.preprocessing.storage.save_case`` (random images, a blob
label with -1 border, class locations), so these tests do not depend on the preprocessor.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orthonet.errors import OrthoError
from orthonet.preprocessing import storage
from orthonet.training.data import BatchLoader, LoaderError, PreprocessedCaseStore
from orthonet.training.data.dataset import read_crop
from orthonet.training.data.augmentation import (build_pretraining_transforms, build_training_transforms,
                                                 build_validation_transforms, deep_supervision_scales,
                                                 initial_patch_size, pseudo2d_axis)
from orthonet.training.data.factory import make_multiview_loader, make_pretraining_loader, make_seg_loader
from orthonet.training.data.sampling import (center_bbox, foreground_bbox, need_to_pad, oversample_this_sample,
                                             parse_class_locations, random_bbox)
from orthonet.training.data.sources import ImageBatchSource, SegBatchSource

torch.set_num_threads(1)

VIEWS = {"sagittal": ((1, 10, 28, 24), [3.0, 0.8, 0.8]),
         "coronal": ((1, 26, 8, 22), [0.9, 3.5, 0.9]),
         "axial": ((2, 20, 20, 9), [1.0, 1.0, 1.0])}
PATCHES = {"sagittal": [8, 16, 16], "coronal": [16, 8, 16], "axial": [12, 12, 8]}


def _blob_seg(shape, rng):
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    r = ((z - c[0]) / (shape[0] / 3)) ** 2 + ((y - c[1]) / (shape[1] / 4)) ** 2 + ((x - c[2]) / (shape[2] / 4)) ** 2
    seg = np.zeros(shape, np.int16)
    seg[r < 1.0] = 1
    seg[r < 0.35] = 2
    seg[:, :2, :] = -1  # outside the nonzero crop region
    return seg


def write_preprocessed(root: Path, n_tr: int = 6, n_unl: int = 2, seed: int = 0, missing=()) -> Path:
    """A tiny preprocessed folder: 3 views, labels on the sagittal view of Tr cases."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "orthoPlans_3d_fullres"
    cases = [(f"case{i:02d}", "Tr") for i in range(n_tr)] + [(f"unl{i:02d}", "Unlabeled") for i in range(n_unl)]
    for case, split in cases:
        for view, (shape, _) in VIEWS.items():
            if (case, view) in missing:
                continue
            data = rng.normal(size=shape).astype(np.float32)
            seg = None
            props = {"case": case, "view": view, "split": split, "class_locations": {}}
            if view == "sagittal" and split == "Tr":
                seg = _blob_seg(shape[1:], rng)[None]
                data[0][seg[0] > 0] += 2.0
                locs = {}
                for lab in (1, 2):
                    idx = np.argwhere(seg[0] == lab)
                    locs[str(lab)] = idx[rng.choice(len(idx), min(20, len(idx)), replace=False)].tolist()
                props["class_locations"] = locs
            storage.save_case(folder, case, view, data, seg, props)
    return folder


def make_plans(batch_size: int = 2) -> dict:
    views = {}
    for v, (_, sp) in VIEWS.items():
        views[v] = {"configurations": {"3d_fullres": {
            "data_identifier": "orthoPlans_3d_fullres", "spacing": sp, "patch_size": PATCHES[v],
            "batch_size": batch_size, "network": {"kwargs": {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]}}}}}
    return {"dataset_name": "Dataset999_Tiny", "segmentation_view": "sagittal", "num_classes": 3,
            "diagnoses": ["a", "b"], "views": views}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_preprocessed(tmp_path_factory.mktemp("pp"))


@pytest.fixture(scope="module")
def store(folder) -> PreprocessedCaseStore:
    return PreprocessedCaseStore(folder, list(VIEWS), "sagittal")


def _signature(batch) -> tuple:
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    return tuple(batch["keys"]), round(float(batch["data"].double().sum()), 4), int(target.long().sum())


# ------------------------------------------------------------------------------------------------------------
# store
# ------------------------------------------------------------------------------------------------------------
def test_store_lists_complete_cases_per_split(tmp_path, store):
    assert store.cases("Tr") == [f"case{i:02d}" for i in range(6)]
    assert store.cases("Unlabeled") == ["unl00", "unl01"]
    assert store.labelled_cases() == store.cases("Tr")
    arrays = store.open("case01", "axial")
    assert arrays.shape == (20, 20, 9) and arrays.seg is None and arrays.data.shape[0] == 2
    # an incomplete case (arrays written, properties JSON not yet) is not listed
    folder = write_preprocessed(tmp_path, n_tr=2, n_unl=0, missing={("case01", "coronal")})
    storage.save_array(np.zeros((1, 4, 4, 4), np.float32), storage.image_file(folder, "case09", "sagittal"))
    s = PreprocessedCaseStore(folder, ["sagittal", "coronal"], "sagittal")
    assert s.cases() == ["case00"]
    assert s.cases(require_all=False) == ["case00", "case01"]
    assert not s.has_view("case09", "sagittal")


def test_store_missing_and_corrupt_files_name_the_file(tmp_path):
    folder = write_preprocessed(tmp_path, n_tr=2, n_unl=0)
    s = PreprocessedCaseStore(folder, list(VIEWS), "sagittal")
    storage.image_file(folder, "case01", "coronal").write_bytes(b"this is not a blosc2 file")
    with pytest.raises(OrthoError, match="case01_coronal.b2nd"):
        a = s.open("case01", "coronal")
        a.crop_image([[0, 4], [0, 4], [0, 4]])
    storage.image_file(folder, "case00", "axial").unlink()
    with pytest.raises(OrthoError, match="case00_axial.b2nd.*not found|not found.*case00_axial"):
        s.open("case00", "axial")
    with pytest.raises(OrthoError, match="not found"):
        PreprocessedCaseStore(tmp_path / "nope", ["sagittal"])

    class FailsOnRead:  # blosc2 opens some damaged files and fails only when a chunk is decompressed
        shape = (1, 8, 8, 8)

        def __getitem__(self, item):
            raise RuntimeError("Error while decompressing chunk 3")

    with pytest.raises(OrthoError, match=r"(?s)case01_sagittal.b2nd.*cannot read.*decompressing chunk 3"):
        read_crop(FailsOnRead(), [[0, 4], [0, 4], [0, 4]], 0, np.float32, folder / "case01_sagittal.b2nd")


# ------------------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------------------
def test_small_volume_is_padded_image_zero_seg_minus_one(store):
    arrays = store.open("case00", "sagittal")  # (10, 28, 24)
    rng = np.random.default_rng(0)
    bbox = random_bbox(arrays.shape, (14, 16, 16), (0, 0, 0), rng)
    lo, hi = bbox[0]
    assert hi - lo == 14 and lo <= 0 and hi >= 10  # the whole z extent plus padding on both sides
    img, seg = arrays.crop_image(bbox), arrays.crop_seg(bbox)
    assert img.shape == (1, 14, 16, 16) and img.dtype == np.float32 and seg.dtype == np.int16
    z_pad = [i for i, z in enumerate(range(lo, hi)) if z < 0 or z >= 10]
    assert len(z_pad) == 4
    assert np.all(img[:, z_pad] == 0) and np.all(seg[:, z_pad] == -1)
    inside = [i for i in range(14) if i not in z_pad]
    assert np.any(img[:, inside] != 0)


def test_random_bbox_stays_within_need_to_pad_bounds():
    rng = np.random.default_rng(1)
    shape, patch, pad = (20, 30, 40), (10, 12, 16), need_to_pad((14, 20, 16), (10, 12, 16))
    assert pad.tolist() == [4, 8, 0]
    los = np.array([[b[0] for b in random_bbox(shape, patch, pad, rng)] for _ in range(2000)])
    assert los.min(0).tolist() == [-2, -4, 0]
    assert los.max(0).tolist() == [12, 22, 24]  # shape - patch + pad / 2


def test_foreground_bbox_contains_the_chosen_class(store):
    arrays = store.open("case02", "sagittal")
    locs = parse_class_locations(arrays.properties, 3)
    assert set(locs) == {1, 2} and locs[1].shape[1] == 3
    rng = np.random.default_rng(2)
    seg_full = np.asarray(arrays.seg[:])[0]
    for _ in range(50):
        bbox = foreground_bbox(arrays.shape, (8, 16, 16), (0, 0, 0), locs, rng, label=2)
        seg = arrays.crop_seg(bbox)
        assert np.any(seg == 2)
    assert np.count_nonzero(seg_full == 2) > 0
    assert foreground_bbox(arrays.shape, (8, 16, 16), (0, 0, 0), {}, rng) is None
    # with ignore label excluded and nnU-Net's (c, z, y, x) locations
    locs4 = parse_class_locations({"class_locations": {"1": [[0, 1, 2, 3]], "3": [[0, 4, 4, 4]]}}, 3, exclude=(3,))
    assert list(locs4) == [1] and locs4[1].tolist() == [[1, 2, 3]]


def test_oversampling_rule_and_center_crops():
    assert [oversample_this_sample(i, 2, 0.33) for i in range(2)] == [False, True]
    assert [oversample_this_sample(i, 3, 0.33) for i in range(3)] == [False, False, True]
    assert [oversample_this_sample(i, 12, 0.33) for i in range(12)].count(True) == 4
    rng = np.random.default_rng(0)
    share = np.mean([oversample_this_sample(0, 1, 0.33, rng) for _ in range(3000)])
    assert 0.30 < share < 0.36  # batch size 1: probabilistic
    assert center_bbox((20, 31, 8), (10, 11, 12)) == [[5, 15], [10, 21], [-2, 10]]
    jit = np.array([[b[0] for b in center_bbox((40, 40, 40), (10, 20, 10), 0.1, rng)] for _ in range(500)])
    assert jit.min(0).tolist() == [14, 8, 14] and jit.max(0).tolist() == [16, 12, 16]


# ------------------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------------------
def test_configuration_helpers():
    assert pseudo2d_axis([3.0, 0.8, 0.8]) == 0
    assert pseudo2d_axis([0.9, 3.5, 0.9]) == 1
    assert pseudo2d_axis([2.0, 0.8, 0.8]) is None
    assert pseudo2d_axis([0.5, 0.5]) is None
    ds = deep_supervision_scales([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    assert ds == [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]
    # 3-D isotropic: +-30 deg on every axis, 1/0.85 enlargement (nnU-Net's get_patch_size):
    # 64 * (cos 30 + sin 30) / 0.85 = 102.85 -> 102
    assert initial_patch_size([64, 64, 64], [1, 1, 1]) == (102, 102, 102)
    # pseudo-2D: thick axis keeps its size; in-plane the worst angle is 45 deg: 16 * sqrt(2) / 0.85 = 26.6
    assert initial_patch_size([8, 16, 16], [3.0, 0.8, 0.8]) == (8, 26, 26)
    assert initial_patch_size([16, 8, 16], [0.9, 3.5, 0.9]) == (26, 8, 26)
    # rectangular in-plane patch: worst angle atan(128/160), extent hypot(160, 128) / 0.85 = 241.1
    assert initial_patch_size([32, 160, 128], [3.0, 0.5, 0.5]) == (32, 241, 241)


def test_training_transforms_one_sample_shapes_dtypes_labels():
    torch.manual_seed(0)
    np.random.seed(0)
    ds = [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]
    patch = (8, 16, 16)
    sample = initial_patch_size(patch, [3.0, 0.8, 0.8])
    t = build_training_transforms(patch, [3.0, 0.8, 0.8], None, None, ds, ignore_label=3)
    for _ in range(8):
        img = torch.randn((2, *sample))
        seg = torch.randint(-1, 4, (1, *sample), dtype=torch.int16)
        out = t(image=img, segmentation=seg)
        assert out["image"].shape == (2, 8, 16, 16) and out["image"].dtype == torch.float32
        segs = out["segmentation"]
        assert [tuple(s.shape) for s in segs] == [(1, 8, 16, 16), (1, 8, 8, 8), (1, 4, 4, 4)]
        for s in segs:
            assert s.dtype == torch.int16
            assert set(torch.unique(s).tolist()) <= {0, 1, 2, 3}  # -1 -> background, ignore label kept
        assert torch.isfinite(out["image"]).all()
    val = build_validation_transforms((8, 16, 16), ds)
    out = val(image=torch.randn((1, 10, 20, 20)), segmentation=torch.full((1, 10, 20, 20), -1, dtype=torch.int16))
    assert out["image"].shape == (1, 8, 16, 16) and torch.all(out["segmentation"][0] == 0)
    keep = build_validation_transforms(None, None, padding_label=-1)
    out = keep(image=torch.zeros((1, 4, 4, 4)), segmentation=torch.full((1, 4, 4, 4), -1, dtype=torch.int16))
    assert torch.all(out["segmentation"] == -1)


@pytest.mark.parametrize("spacing,thick", [([0.9, 3.5, 0.9], 1), ([1.0, 1.0, 1.0], None)])
def test_pseudo2d_augmentation_never_mixes_thick_slices(spacing, thick):
    """Label = 4 x (index of the slice along axis 1) + in-plane quadrant. With pseudo-2D augmentation every output
    slice along the thick axis holds labels of a single input slice; with 3-D rotation slices get mixed."""
    torch.manual_seed(1)
    np.random.seed(1)
    patch = (16, 8, 16)
    sample = initial_patch_size(patch, spacing)
    t = build_training_transforms(patch, spacing, None, mirror_axes=(), padding_label=-1)
    z, y, x = np.indices(sample)
    quadrant = (z >= sample[0] // 2).astype(int) * 2 + (x >= sample[2] // 2).astype(int)
    label = torch.from_numpy((4 * (y + 1) + quadrant).astype(np.int16))[None]
    lo = [(s - p) // 2 for s, p in zip(sample, patch)]
    plain = label[0, lo[0]:lo[0] + 16, lo[1]:lo[1] + 8, lo[2]:lo[2] + 16]
    mixed, changed = 0, 0
    for _ in range(40):
        out = t(image=torch.randn((1, *sample)), segmentation=label.clone())["segmentation"][0]
        slices = [set((torch.unique(out[:, j])[torch.unique(out[:, j]) >= 0] // 4).tolist())
                  for j in range(out.shape[1])]
        mixed += sum(len(s) > 1 for s in slices)
        changed += int(not torch.equal(out, plain))
    assert changed > 5  # the spatial transform did act
    if thick is not None:
        assert mixed == 0
    else:
        assert mixed > 0  # full 3-D rotation does mix slices (the check above can fail)


def test_pretraining_transforms_are_light():
    torch.manual_seed(0)
    t = build_pretraining_transforms((0, 1, 2), 0.1)
    img = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 4, 6, 8)
    for _ in range(10):
        out = t(image=img.clone())["image"]
        assert out.shape == img.shape
        # mirroring + brightness/contrast within +-10 %: the sorted values stay an affine-ish image of the input
        ratio = out.std() / img.std()
        assert 0.8 < float(ratio) < 1.22


# ------------------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------------------
def test_seg_loader_batches_and_reproducibility(store):
    plans = make_plans()
    cases = store.labelled_cases()

    def run(workers, seed, n=4):
        with make_seg_loader(store, cases, plans, "sagittal", "3d_fullres", num_workers=workers, seed=seed) as L:
            batches = [next(L) for _ in range(n)]
        return batches

    b0 = run(0, 7)
    first = b0[0]
    assert first["data"].shape == (2, 1, 8, 16, 16) and first["data"].dtype == torch.float32
    assert [tuple(t.shape) for t in first["target"]] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8)]
    assert all(k in cases for b in b0 for k in b["keys"])
    # second sample of each batch is foreground-centred: it must contain foreground
    assert all(torch.any(b["target"][0][1] > 0) for b in b0)
    sig0 = [_signature(b) for b in b0]
    assert sig0 == [_signature(b) for b in run(1, 7)]  # in-process == one worker
    sig2 = [_signature(b) for b in run(2, 7)]
    assert sig2 == [_signature(b) for b in run(2, 7)]  # two workers: reproducible too
    assert sig0 != [_signature(b) for b in run(0, 8)]  # and the seed matters


def test_2d_configuration_samples_slices(store):
    plans = make_plans()
    plans["views"]["sagittal"]["configurations"]["2d"] = {
        "patch_size": [24, 20], "batch_size": 3, "spacing": [0.8, 0.8],
        "network": {"kwargs": {"strides": [[1, 1], [2, 2], [2, 2]]}}}
    with make_seg_loader(store, store.labelled_cases(), plans, "sagittal", "2d", seed=0) as L:
        b = next(L)
    assert b["data"].shape == (3, 1, 24, 20)
    assert [tuple(t.shape) for t in b["target"]] == [(3, 1, 24, 20), (3, 1, 12, 10)]
    assert torch.any(b["target"][0][2] > 0)  # the foreground-centred slice holds foreground


def test_seg_loader_does_not_touch_global_rng(store):
    plans = make_plans()
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(123)
    np.random.seed(123)
    with make_seg_loader(store, store.labelled_cases(), plans, "sagittal", "3d_fullres") as L:
        next(L)
    assert (torch.rand(1).item(), np.random.rand()) == expected


def test_multiview_loader_views_diagnoses_label_fraction_missing_view(tmp_path):
    folder = write_preprocessed(tmp_path, n_tr=4, n_unl=1, missing={("case03", "coronal")})
    store = PreprocessedCaseStore(folder, list(VIEWS), "sagittal")
    cases = store.cases(require_all=False)
    diag = {"case00": np.array([1.0, 0.0]), "case01": np.array([np.nan, 1.0]), "case02": np.array([0.0, 0.0]),
            "case03": np.array([1.0, 1.0])}
    keep = {"case00", "case01", "case03"}  # label fraction: case02 loses its labels
    with make_multiview_loader(store, cases, make_plans(), "3d_fullres", ["coronal", "axial"], "sagittal",
                               diagnoses=diag, keep_labels=keep, train=False) as L:
        batches = list(L)
    assert len(batches) == 3 and [k for b in batches for k in b["keys"]] == cases
    b = batches[0]
    assert {v: tuple(t.shape) for v, t in b["data"].items()} == {
        "coronal": (2, 1, 16, 8, 16), "axial": (2, 2, 12, 12, 8), "sagittal": (2, 1, 8, 16, 16)}
    assert [tuple(t.shape) for t in b["target"]] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8)]
    rows = {k: i for i, k in enumerate(b["keys"])}
    assert torch.equal(b["diagnosis"][rows["case00"]], torch.tensor([1.0, 0.0]))
    assert torch.isnan(b["diagnosis"][rows["case01"]][0]) and b["diagnosis"][rows["case01"]][1] == 1
    assert b["has_seg"].tolist() == [True, True]
    b1 = batches[1]  # case02 (labels dropped), case03 (coronal missing)
    r2, r3 = b1["keys"].index("case02"), b1["keys"].index("case03")
    assert torch.isnan(b1["diagnosis"][r2]).all() and not b1["has_seg"][r2]
    assert torch.all(b1["target"][0][r2] == -1) and torch.all(b1["target"][1][r2] == -1)
    assert b1["has_seg"][r3] and not b1["present"]["coronal"][r3] and b1["present"]["axial"][r3]
    assert torch.all(b1["data"]["coronal"][r3] == 0)
    b2 = batches[2]  # the unlabeled case
    assert b2["keys"] == ["unl00"] and not b2["has_seg"][0] and torch.isnan(b2["diagnosis"]).all()
    # validation crops are deterministic
    with make_multiview_loader(store, cases, make_plans(), "3d_fullres", ["coronal", "axial"], "sagittal",
                               diagnoses=diag, keep_labels=keep, train=False) as L:
        again = next(L)
    assert torch.equal(again["data"]["axial"], b["data"]["axial"])
    # training mode with augmentation and 2 workers
    with make_multiview_loader(store, cases, make_plans(), "3d_fullres", ["coronal", "axial"], "sagittal",
                               diagnoses=diag, num_workers=2, seed=3) as L:
        tb = [next(L) for _ in range(3)]
    assert all(t["data"]["coronal"].shape == (2, 1, 16, 8, 16) for t in tb)


def test_pretraining_loader_uses_unlabeled_cases(store):
    with make_pretraining_loader(store, store.cases(), make_plans(batch_size=3), "coronal", "3d_fullres",
                                 seed=0) as L:
        keys = [k for _ in range(6) for k in next(L)["keys"]]
        b = next(L)
    assert b["data"].shape == (3, 1, 16, 8, 16) and "target" not in b
    assert any(k.startswith("unl") for k in keys) and any(k.startswith("case") for k in keys)


class _CountCalls:
    """Appends one line to a file per sample (visible across processes)."""

    def __init__(self, path):
        self.path = str(path)

    def __call__(self, **kw):
        with open(self.path, "a") as f:
            f.write("x\n")
        return kw


def test_workers_stay_at_most_num_cached_batches_ahead(store, tmp_path):
    log = tmp_path / "calls.txt"
    source = ImageBatchSource(store, store.cases(), "axial", 1, (4, 4, 4), transforms=_CountCalls(log))
    with BatchLoader(source, num_workers=2, seed=0, num_cached=2) as loader:
        next(loader)
        time.sleep(1.0)
        made = len(log.read_text(encoding="utf-8").splitlines())
    # one batch taken: worker 0 may have made 2 + 1, worker 1 2 -> at most 5 (unbounded it would be hundreds)
    assert 4 <= made <= 5


@pytest.mark.parametrize("workers", [0, 2])
def test_sequential_loader_repeats_identical_passes(store, workers):
    source = ImageBatchSource(store, store.cases(), "axial", 3, (8, 8, 8), sequential=True, center_crop=True)
    loader = BatchLoader(source, num_workers=workers, seed=0)
    first = [(b["keys"], b["data"].clone()) for b in loader]
    second = [(b["keys"], b["data"].clone()) for b in loader]  # e.g. the next epoch's validation
    assert len(loader) == 3 and [k for k, _ in first] == [store.cases()[i:i + 3] for i in (0, 3, 6)]
    assert all(k1 == k2 and torch.equal(d1, d2) for (k1, d1), (k2, d2) in zip(first, second))
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_case_names_case_view_and_cause(tmp_path, workers):
    folder = write_preprocessed(tmp_path, n_tr=3, n_unl=0)
    store = PreprocessedCaseStore(folder, ["sagittal"], "sagittal")
    storage.seg_file(folder, "case01", "sagittal").write_bytes(b"\x00garbage" * 10)
    source = SegBatchSource(store, ["case01"], "sagittal", 1, (8, 16, 16))
    loader = BatchLoader(source, num_workers=workers, seed=0)
    with pytest.raises(LoaderError) as info:
        for _ in range(4):
            next(loader)
    loader.close()
    err = info.value
    text = str(err)
    assert err.case == "case01" and err.view == "sagittal"
    assert "case 'case01' (view 'sagittal')" in text
    assert "corrupt" in text and "case01_sagittal_seg.b2nd" in text  # the cause, naming the file
    assert "Traceback" in text and "open_array" in text  # the original traceback
    assert ("worker" in text) == (workers > 0)
    assert isinstance(err, OrthoError)


def test_exception_in_transform_is_reported_with_traceback(store):
    class Boom:
        def __call__(self, **kw):
            raise ValueError("augmentation exploded")

    source = ImageBatchSource(store, ["case04"], "axial", 1, (8, 8, 8), transforms=Boom())
    with BatchLoader(source, num_workers=1) as loader:
        with pytest.raises(LoaderError, match=r"(?s)case 'case04' \(view 'axial'\).*ValueError: augmentation "
                                              r"exploded.*Traceback"):
            next(loader)


class _Hang:
    """A transform that never finishes (stands in for a huge case), so the worker is killed mid-read."""

    def __call__(self, **kw):
        time.sleep(60)
        return kw


def _wait_until_loading(loader, worker, timeout=20.0):
    t0 = time.time()
    while loader._last_case(worker)[0] is None:
        assert time.time() - t0 < timeout, "worker never started loading"
        time.sleep(0.02)


def test_killed_worker_is_detected_with_clear_message(store):
    source = ImageBatchSource(store, ["case04"], "sagittal", 1, (8, 8, 8), transforms=_Hang())
    loader = BatchLoader(source, num_workers=2, seed=0)
    try:
        pid = loader.worker_pids[0]
        _wait_until_loading(loader, 0)
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(LoaderError) as info:
            next(loader)
        assert time.time() - t0 < 10
    finally:
        loader.close()
    text = str(info.value)
    assert f"worker 0 (pid {pid}) died while loading case 'case04' (view 'sagittal'): killed by SIGKILL" in text
    assert "out of memory" in text
    assert info.value.worker == 0 and info.value.case == "case04"


def test_stuck_worker_is_reported_after_the_timeout_with_its_case(store):
    source = ImageBatchSource(store, ["case04"], "sagittal", 1, (8, 8, 8), transforms=_Hang())
    loader = BatchLoader(source, num_workers=1, seed=0, timeout_s=2.0)
    try:
        t0 = time.time()
        with pytest.raises(LoaderError, match=r"worker 0 produced no batch for 2 s \(it is loading case 'case04' "
                                              r"\(view 'sagittal'\)\)"):
            next(loader)
        assert time.time() - t0 < 15
    finally:
        loader.close()


def test_worker_killed_between_batches_is_detected(store):
    source = ImageBatchSource(store, store.cases(), "coronal", 2, (16, 8, 16))
    loader = BatchLoader(source, num_workers=2, seed=1)
    try:
        next(loader)
        pid = loader.worker_pids[1]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(LoaderError, match=rf"worker 1 \(pid {pid}\) died .*killed by SIGKILL"):
            for _ in range(20):
                next(loader)
    finally:
        loader.close()


def test_seg_source_rejects_unlabelled_cases(store):
    with pytest.raises(OrthoError, match="unl00"):
        SegBatchSource(store, ["case00", "unl00"], "sagittal", 2, (8, 16, 16))
