"""The dataset format: orthonet multi-view datasets and plain nnU-Net v2 datasets, as DatasetSpec reads them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.dataset import (NNUNET_VIEW, load_dataset, parse_dataset_json, parse_dataset_json_detailed,
                              parse_diagnoses)
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry
from orthonet.verify import verify_dataset
from orthonet.verify_case import box_gap_mm
from tests.builders import DIAGNOSES, LABELS, VIEWS, write_tiny_dataset, write_tiny_nnunet_dataset

DOC = Path(__file__).resolve().parents[1] / "docs" / "dataset_format.md"


@pytest.fixture(scope="module")
def knee(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmt") / "Dataset101_Knee"
    return write_tiny_dataset(root, n_train=3, n_test=2, n_unlabeled=1, oblique=True, seed=5,
                              unlabeled_seg_cases=1, test_ground_truth=True, centers=["a", "b"])


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return write_tiny_nnunet_dataset(tmp_path_factory.mktemp("nn") / "Dataset102_Plain", n_train=3)


# ------------------------------------------------------------------------------------------------------------
# orthonet format
# ------------------------------------------------------------------------------------------------------------
def test_orthonet_dataset_json_is_parsed(knee):
    spec = load_dataset(knee)
    assert not spec.nnunet_format
    assert spec.views == VIEWS and spec.segmentation_view == "sagittal"
    assert spec.class_names == ["background", "bone", "cartilage"] and spec.num_classes == 3
    assert spec.diagnoses == DIAGNOSES and spec.file_ending == ".nii.gz" and spec.num_training == 3
    assert spec.channels("coronal") == ["MR0"] and spec.num_channels("axial") == 1


def test_case_discovery_and_naming(knee):
    spec = load_dataset(knee)
    assert spec.cases("Tr") == ["case000", "case001", "case002"]
    assert spec.cases("Ts") == ["test000", "test001"] and spec.cases("Unlabeled") == ["unl000"]
    # case000 was written without a label (diagnosis-only), the others have one
    assert spec.labelled_cases() == ["case001", "case002"]
    assert spec.image_path("case001", "coronal", 0) == knee / "imagesTr" / "case001_coronal_0000.nii.gz"
    assert spec.label_path("case001") == knee / "labelsTr" / "case001_sagittal.nii.gz"
    assert spec.label_path("test001", "Ts") == knee / "labelsTs" / "test001_sagittal.nii.gz"
    assert spec.has_label("test001", "Ts") and not spec.has_label("unl000", "Unlabeled")
    assert spec.find_split("test001") == "Ts" and spec.find_split("unl000") == "Unlabeled"
    assert spec.find_split("nobody") is None


def test_case_ids_may_contain_underscores_and_view_names(knee):
    spec = load_dataset(knee)
    assert spec.parse_image_name("knee_sagittal_07_coronal_0002.nii.gz") == ("knee_sagittal_07", "coronal", 2)
    assert spec.parse_image_name("knee_07_oblique_0000.nii.gz") is None
    assert spec.parse_image_name("knee_07_axial_0000.nii") is None
    assert spec.parse_label_name("knee_07_sagittal.nii.gz") == ("knee_07", "sagittal")
    assert spec.parse_label_name("knee_07.nii.gz") is None


def test_views_have_their_own_grids_and_meet_in_physical_space(knee):
    spec = load_dataset(knee)
    geoms = {}
    for view in spec.views:
        image, geom = spec.read_view("case001", view)
        assert image.shape == (1,) + geom.array_shape and image.dtype == np.float32
        assert geom == Geometry.of(sitk.ReadImage(str(spec.image_path("case001", view, 0))))
        geoms[view] = geom
    assert len({g.direction for g in geoms.values()}) == 3  # oblique, different per view
    for a in VIEWS:
        for b in VIEWS:
            assert box_gap_mm(geoms[a], geoms[b]) < -10.0  # deep overlap, not a touching corner
    label, lgeom = spec.read_label("case001")
    assert label.dtype == np.int16 and lgeom == geoms["sagittal"]
    assert set(np.unique(label)) == {0, 1, 2}
    assert spec.read_label("case000") is None


def test_diagnoses_tables(knee, tmp_path):
    spec = load_dataset(knee)
    table = spec.read_diagnoses()
    assert sorted(table) == ["case000", "case001", "case002"]
    np.testing.assert_array_equal(table["case001"], [1.0, 0.0])
    test_table = spec.read_diagnoses("Ts")
    assert sorted(test_table) == ["test000", "test001"]
    # an empty cell is unknown (NaN), not 0
    (tmp_path / "d.csv").write_text("case_id,lesion_b,lesion_a\ncase000,,1\n")
    parsed, problems = parse_diagnoses(spec, tmp_path / "d.csv")
    assert problems == []
    assert np.isnan(parsed["case000"][1]) and parsed["case000"][0] == 1.0  # columns follow dataset.json order


def test_broken_diagnoses_raise_on_read(knee, tmp_path):
    import shutil
    root = Path(shutil.copytree(knee, tmp_path / "Dataset101_Knee"))
    (root / "diagnoses.csv").write_text("case_id,lesion_a,lesion_b\ncase000,1,maybe\n")
    with pytest.raises(OrthoError, match="maybe"):
        load_dataset(root).read_diagnoses()


def test_centers(knee):
    centers = load_dataset(knee).read_centers()
    assert centers["case000"] == "a" and centers["case001"] == "b" and len(centers) == 6


def test_per_view_channel_names_and_ignore_label(tmp_path):
    root = write_tiny_dataset(tmp_path / "Dataset103_X", n_train=1, n_test=0)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["channel_names"] = {"sagittal": {"0": "PD_FS"}, "coronal": {"0": "T1"}, "axial": {"0": "T2_FS"}}
    meta["labels"] = dict(LABELS, ignore=3)
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    assert spec.channels("coronal") == ["T1"] and spec.channels("axial") == ["T2_FS"]
    assert spec.ignore_label == 3 and spec.num_classes == 3 and spec.label_values == [0, 1, 2, 3]


def test_all_dataset_json_problems_in_one_error(tmp_path):
    root = write_tiny_dataset(tmp_path / "Dataset104_X", n_train=1, n_test=0)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta.update(segmentation_view="oblique", labels={"background": 0, "bone": 2}, numTraining=-1)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(OrthoError) as info:
        load_dataset(root)
    text = str(info.value)
    assert "oblique" in text and "consecutive" in text and "numTraining" in text and "dataset.json" in text
    spec, problems = parse_dataset_json(root)
    assert spec is not None and len(problems) >= 3 and all(p.startswith(str(root / "dataset.json")) for p in problems)


def test_orthonet_keys_without_views_is_an_error(tmp_path):
    root = write_tiny_dataset(tmp_path / "Dataset105_X", n_train=1, n_test=0)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    del meta["views"]
    (root / "dataset.json").write_text(json.dumps(meta))
    _, errors, _ = parse_dataset_json_detailed(root)
    assert any("'views'" in e for e in errors)


# ------------------------------------------------------------------------------------------------------------
# nnU-Net acceptance
# ------------------------------------------------------------------------------------------------------------
def test_plain_nnunet_dataset_loads_as_one_view_named_image(plain):
    spec = load_dataset(plain)
    assert spec.nnunet_format and spec.views == [NNUNET_VIEW] == ["image"]
    assert spec.segmentation_view == "image" and spec.diagnoses == [] and spec.has_segmentation
    assert spec.cases("Tr") == ["pat_000", "pat_001", "pat_002"] and spec.labelled_cases() == spec.cases("Tr")
    assert spec.image_path("pat_001", "image", 0) == plain / "imagesTr" / "pat_001_0000.nii.gz"
    assert spec.label_path("pat_001") == plain / "labelsTr" / "pat_001.nii.gz"
    assert spec.parse_label_name("pat_001.nii.gz") == ("pat_001", "image")
    image, geom = spec.read_view("pat_001", "image")
    label, lgeom = spec.read_label("pat_001")
    assert image.shape == (1,) + label.shape and geom == lgeom
    assert spec.read_diagnoses() == {}


def test_nnunet_dataset_json_with_nnunet_extras_is_accepted(plain, tmp_path):
    import shutil
    root = Path(shutil.copytree(plain, tmp_path / "Dataset102_Plain"))
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta.update(description="from nnU-Net", reference="x", licence="CC0", release="1.0",
                overwrite_image_reader_writer="SimpleITKIO", converted_by="me", my_own_key=1)
    (root / "dataset.json").write_text(json.dumps(meta))
    spec, errors, warnings = parse_dataset_json_detailed(root)
    assert errors == [] and warnings == ["unknown keys in dataset.json are ignored (typo?): ['my_own_key']"]
    assert load_dataset(root).views == ["image"]
    report = verify_dataset(root, progress=False)
    assert report.ok and len(report.warnings) == 1


def test_nnunet_region_labels_are_reported(plain, tmp_path):
    import shutil
    root = Path(shutil.copytree(plain, tmp_path / "Dataset102_Plain"))
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(OrthoError, match="region"):
        load_dataset(root)


# ------------------------------------------------------------------------------------------------------------
# the documentation's examples are valid
# ------------------------------------------------------------------------------------------------------------
def test_documented_example_is_valid(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    meta = json.loads(blocks[0])
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    csv_block = next(b for b in fenced if b.startswith("case_id,acl_tear"))
    root = tmp_path / "Dataset101_Knee"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "diagnoses.csv").write_text(csv_block)
    spec, errors, warnings = parse_dataset_json_detailed(root)
    assert errors == [] and warnings == []
    assert spec.num_classes == 12 and len(spec.diagnoses) == 8
    table, problems = parse_diagnoses(spec)
    assert problems == [] and sorted(table) == ["knee_000", "knee_001", "knee_002"]
    assert int(np.isnan(table["knee_002"]).sum()) == 2
