"""ortho_verify_dataset: every problem it must find, each in its own broken copy of a tiny good dataset."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.image_integrity import nifti_truncation
from orthonet.imageio import Geometry
from orthonet.synthetic.views import rotation_matrix
from orthonet.verify import cli, verify_dataset
from orthonet.verify_case import box_gap_mm
from tests.builders import write_tiny_dataset, write_tiny_nnunet_dataset

NAME = "Dataset101_Knee"


# ------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One good oblique dataset (3 training cases, 1 test case, test ground truth, centres), built once."""
    root = tmp_path_factory.mktemp("pristine") / NAME
    return write_tiny_dataset(root, n_train=3, n_test=1, oblique=True, seed=3, test_ground_truth=True,
                              centers=["siteA", "siteB"])


@pytest.fixture(scope="module")
def pristine_2ch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine2") / NAME
    return write_tiny_dataset(root, n_train=2, n_test=0, oblique=True, seed=4, channels=2)


@pytest.fixture
def ds(pristine, tmp_path) -> Path:
    """A private copy of the good dataset to break."""
    return Path(shutil.copytree(pristine, tmp_path / NAME))


@pytest.fixture
def ds2(pristine_2ch, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_2ch, tmp_path / NAME))


def rewrite_image(path: Path, array_fn: Optional[Callable] = None, **geometry) -> None:
    """Rewrite an image with its array transformed and/or header fields replaced."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    new = sitk.GetImageFromArray(array_fn(arr) if array_fn else arr)
    new.SetSpacing(geometry.get("spacing", img.GetSpacing()))
    new.SetOrigin(geometry.get("origin", img.GetOrigin()))
    new.SetDirection(geometry.get("direction", img.GetDirection()))
    sitk.WriteImage(new, str(path), True)


def edit_json(root: Path, fn: Callable[[dict], None]) -> None:
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def edit_csv(path: Path, fn: Callable[[List[List[str]]], List[List[str]]]) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(fn(rows))


def run_cli(root: Path, monkeypatch, capsys, *extra: str):
    monkeypatch.setenv("ORTHO_raw", str(root.parent))
    rc = cli(["-d", root.name, "-np", "1", "--no_progress", *extra])
    return rc, capsys.readouterr().out


def expect_error(root: Path, monkeypatch, capsys, file: str, *needles: str, n_errors: Optional[int] = 1):
    """Assert verify reports an error naming ``file`` whose text contains every needle, and the CLI exits 1."""
    report = verify_dataset(root, progress=False)
    errors = [p for p in report.problems if p.severity == "error"]
    hits = [p for p in errors
            if p.file == file and all(n.lower() in p.message.lower() for n in needles)]
    assert hits, f"no error for {file} with {needles}:\n{report.format()}"
    assert all(p.fix.strip() for p in errors), "every error must say how to fix it"
    if n_errors is not None:
        assert len(errors) == n_errors, report.format()
    assert not report.ok
    rc, out = run_cli(root, monkeypatch, capsys)
    assert rc == 1
    assert file in out and "FAILED" in out
    return report


# ------------------------------------------------------------------------------------------------------------
# good datasets
# ------------------------------------------------------------------------------------------------------------
def test_good_oblique_dataset_is_clean(ds, monkeypatch, capsys):
    report = verify_dataset(ds, progress=False)
    assert report.ok and report.errors == [] and report.warnings == [], report.format()
    assert report.counts == {"Tr": 3, "Ts": 1, "Unlabeled": 0, "labelled": 3}
    monkeypatch.setenv("ORTHO_raw", str(ds.parent))
    rc = cli(["-d", "101", "-np", "1", "--no_progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "OK - 0 errors, 0 warnings" in out


def test_plain_nnunet_dataset_is_clean(tmp_path, monkeypatch, capsys):
    root = write_tiny_nnunet_dataset(tmp_path / "Dataset102_Plain", n_train=3, anisotropic=True)
    report = verify_dataset(root, progress=False)
    assert report.ok and report.warnings == [], report.format()
    assert report.views == ["image"] and report.counts["Tr"] == 3 and report.counts["labelled"] == 3
    rc, out = run_cli(root, monkeypatch, capsys)
    assert rc == 0


def test_nnunet_label_mismatch_names_nnunet_label_file(tmp_path, monkeypatch, capsys):
    root = write_tiny_nnunet_dataset(tmp_path / "Dataset102_Plain", n_train=2)
    rewrite_image(root / "labelsTr" / "pat_001.nii.gz", lambda a: a[1:])
    expect_error(root, monkeypatch, capsys, "labelsTr/pat_001.nii.gz", "size")


def test_nnunet_case_without_label_is_only_a_warning(tmp_path):
    root = write_tiny_nnunet_dataset(tmp_path / "Dataset102_Plain", n_train=2)
    (root / "labelsTr" / "pat_001.nii.gz").unlink()
    report = verify_dataset(root, progress=False)
    assert report.ok
    assert any("pat_001" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------------------------
# dataset.json
# ------------------------------------------------------------------------------------------------------------
def test_bad_json_syntax(ds, monkeypatch, capsys):
    (ds / "dataset.json").write_text('{"name": "Knee", "views": ["sagittal",\n')
    report = expect_error(ds, monkeypatch, capsys, "dataset.json", "not valid JSON", "line")
    assert "repair the JSON" in report.problems[0].fix


@pytest.mark.parametrize("key", ["channel_names", "file_ending", "labels", "diagnoses", "numTraining"])
def test_missing_required_key(ds, monkeypatch, capsys, key):
    edit_json(ds, lambda m: m.pop(key))
    expect_error(ds, monkeypatch, capsys, "dataset.json", "required key", key, n_errors=None)


def test_segmentation_view_not_in_views(ds, monkeypatch, capsys):
    edit_json(ds, lambda m: m.update(segmentation_view="oblique"))
    expect_error(ds, monkeypatch, capsys, "dataset.json", "segmentation_view", "oblique", n_errors=None)


def test_numtraining_mismatch(ds, monkeypatch, capsys):
    edit_json(ds, lambda m: m.update(numTraining=5))
    expect_error(ds, monkeypatch, capsys, "dataset.json", "numTraining", "5", "3 cases")


@pytest.mark.parametrize("key,folder", [("numTest", "imagesTs/"), ("numUnlabeled", "imagesUnlabeled/")])
def test_optional_counts_are_checked_when_given(ds, monkeypatch, capsys, key, folder):
    edit_json(ds, lambda m: m.update({key: 4}))
    expect_error(ds, monkeypatch, capsys, "dataset.json", key, folder)


def test_unknown_keys_are_a_warning_not_an_error(ds):
    edit_json(ds, lambda m: m.update(tensorImageSize="3D", my_note="x"))
    report = verify_dataset(ds, progress=False)
    assert report.ok
    assert any("my_note" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------
def test_missing_view_file(ds, monkeypatch, capsys):
    (ds / "imagesTr" / "case001_coronal_0000.nii.gz").unlink()
    expect_error(ds, monkeypatch, capsys, "imagesTr/case001_coronal_0000.nii.gz", "missing", "coronal")


def test_missing_channel_file(ds2, monkeypatch, capsys):
    (ds2 / "imagesTr" / "case001_axial_0001.nii.gz").unlink()
    expect_error(ds2, monkeypatch, capsys, "imagesTr/case001_axial_0001.nii.gz", "missing", "channel 1")


def test_truncated_image(ds, monkeypatch, capsys):
    path = ds / "imagesTr" / "case001_axial_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(ds, monkeypatch, capsys, "imagesTr/case001_axial_0000.nii.gz", "truncated")


def test_garbage_image(ds, monkeypatch, capsys):
    path = ds / "imagesTr" / "case002_coronal_0000.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    expect_error(ds, monkeypatch, capsys, "imagesTr/case002_coronal_0000.nii.gz", "not an image")


def test_truncated_label(ds, monkeypatch, capsys):
    path = ds / "labelsTr" / "case000_sagittal.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    expect_error(ds, monkeypatch, capsys, "labelsTr/case000_sagittal.nii.gz", "truncated")


def test_misnamed_file_is_a_named_warning(ds):
    shutil.copy(ds / "imagesTr" / "case001_axial_0000.nii.gz", ds / "imagesTr" / "case001_ax_0000.nii.gz")
    (ds / "imagesTr" / "notes.txt").write_text("x")
    report = verify_dataset(ds, progress=False)
    assert report.ok, report.format()
    files = {p.file for p in report.problems if p.severity == "warning"}
    assert {"imagesTr/case001_ax_0000.nii.gz", "imagesTr/notes.txt"} <= files


def test_label_without_images(ds, monkeypatch, capsys):
    shutil.copy(ds / "labelsTr" / "case001_sagittal.nii.gz", ds / "labelsTr" / "case777_sagittal.nii.gz")
    expect_error(ds, monkeypatch, capsys, "labelsTr/case777_sagittal.nii.gz", "case777", "no images")


def test_case_id_in_two_splits(ds, monkeypatch, capsys):
    for f in (ds / "imagesTr").glob("case001_*"):
        shutil.copy(f, ds / "imagesTs" / f.name)
    expect_error(ds, monkeypatch, capsys, "imagesTs/", "case001", "imagesTr and imagesTs")


def test_4d_image(ds, monkeypatch, capsys):
    path = ds / "imagesTr" / "case000_coronal_0000.nii.gz"
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([vol, vol]), isVector=False), str(path))
    expect_error(ds, monkeypatch, capsys, "imagesTr/case000_coronal_0000.nii.gz", "4D")


# ------------------------------------------------------------------------------------------------------------
# image content and geometry
# ------------------------------------------------------------------------------------------------------------
def _set_voxel(value):
    def fn(a):
        a = a.copy()
        a[a.shape[0] // 2, 3, 4] = value
        a[1, 2, 2] = value
        return a
    return fn


def test_nan_in_image(ds, monkeypatch, capsys):
    rewrite_image(ds / "imagesTr" / "case002_sagittal_0000.nii.gz", _set_voxel(np.nan))
    expect_error(ds, monkeypatch, capsys, "imagesTr/case002_sagittal_0000.nii.gz", "2 NaN")


def test_inf_in_image(ds, monkeypatch, capsys):
    rewrite_image(ds / "imagesTs" / "test000_axial_0000.nii.gz", _set_voxel(-np.inf))
    expect_error(ds, monkeypatch, capsys, "imagesTs/test000_axial_0000.nii.gz", "2 infinite")


def test_channels_not_on_one_grid(ds2, monkeypatch, capsys):
    path = ds2 / "imagesTr" / "case000_coronal_0001.nii.gz"
    origin = np.array(sitk.ReadImage(str(path)).GetOrigin()) + 2.0
    rewrite_image(path, origin=tuple(origin))
    expect_error(ds2, monkeypatch, capsys, "imagesTr/case000_coronal_0001.nii.gz", "channel 1", "origin")


def test_views_that_do_not_overlap(ds, monkeypatch, capsys):
    path = ds / "imagesTr" / "case001_axial_0000.nii.gz"
    origin = np.array(sitk.ReadImage(str(path)).GetOrigin()) + np.array([0.0, 0.0, 500.0])
    rewrite_image(path, origin=tuple(origin))
    report = expect_error(ds, monkeypatch, capsys, "imagesTr/case001_axial_0000.nii.gz", "do not overlap",
                          n_errors=2)
    # both pairs that involve the shifted view are reported, and only those
    assert all("case001_axial" in e for e in report.errors)


def test_separating_axis_test_is_exact_for_oblique_boxes():
    a = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    # a 10 mm cube rotated 45 degrees about z; its axis-aligned bounding box would overlap a's corner region
    d = rotation_matrix((0, 0, 45)).reshape(-1)
    centre = np.array([4.5, 4.5, 4.5]) + np.array([14.0, 14.0, 0.0])
    half = rotation_matrix((0, 0, 45)) @ np.array([4.5, 4.5, 4.5])
    b = Geometry((10, 10, 10), (1.0, 1.0, 1.0), tuple(centre - half), tuple(d))
    # centres 19.8 mm apart along the diagonal; a reaches 5*sqrt(2)=7.07 mm along it, b reaches 5 mm
    assert box_gap_mm(a, b) == pytest.approx(np.hypot(14, 14) - 5 * np.sqrt(2) - 5.0, abs=1e-6)
    assert box_gap_mm(a, a) < 0


# ------------------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------------------
LABEL = "labelsTr/case001_sagittal.nii.gz"


def test_label_size_mismatch(ds, monkeypatch, capsys):
    rewrite_image(ds / LABEL, lambda a: a[:-1])
    expect_error(ds, monkeypatch, capsys, LABEL, "size", "case001_sagittal_0000")


def test_label_spacing_mismatch(ds, monkeypatch, capsys):
    sp = np.array(sitk.ReadImage(str(ds / LABEL)).GetSpacing()) * np.array([1.0, 1.0, 1.1])
    rewrite_image(ds / LABEL, spacing=tuple(sp))
    report = expect_error(ds, monkeypatch, capsys, LABEL, "spacing")
    message = report.problems[0].message
    assert "origin" not in message and "size" not in message and "direction" not in message


def test_label_origin_mismatch(ds, monkeypatch, capsys):
    origin = np.array(sitk.ReadImage(str(ds / LABEL)).GetOrigin()) + np.array([0.0, 0.05, 0.0])
    rewrite_image(ds / LABEL, origin=tuple(origin))
    expect_error(ds, monkeypatch, capsys, LABEL, "origin")


def test_label_origin_within_tolerance_is_fine(ds):
    origin = np.array(sitk.ReadImage(str(ds / LABEL)).GetOrigin()) + 1e-4
    rewrite_image(ds / LABEL, origin=tuple(origin))
    assert verify_dataset(ds, progress=False).ok


def test_label_direction_mismatch(ds, monkeypatch, capsys):
    d = np.array(sitk.ReadImage(str(ds / LABEL)).GetDirection()).reshape(3, 3)
    rewrite_image(ds / LABEL, direction=tuple((rotation_matrix((0, 0, 5)) @ d).reshape(-1)))
    expect_error(ds, monkeypatch, capsys, LABEL, "direction")


def test_undeclared_label_value(ds, monkeypatch, capsys):
    rewrite_image(ds / LABEL, _set_voxel(7))
    expect_error(ds, monkeypatch, capsys, LABEL, "[7]", "not declared")


def test_fractional_float_label(ds, monkeypatch, capsys):
    rewrite_image(ds / LABEL, lambda a: a.astype(np.float32) * 0.5)
    expect_error(ds, monkeypatch, capsys, LABEL, "fractional")


def test_integer_valued_float_label_is_a_warning(ds):
    rewrite_image(ds / LABEL, lambda a: a.astype(np.float32))
    report = verify_dataset(ds, progress=False)
    assert report.ok
    assert any(LABEL in w and "integer type" in w for w in report.warnings)


def test_labels_ts_is_checked_too(ds, monkeypatch, capsys):
    rewrite_image(ds / "labelsTs" / "test000_sagittal.nii.gz", lambda a: a[:, :-2])
    expect_error(ds, monkeypatch, capsys, "labelsTs/test000_sagittal.nii.gz", "size")


# ------------------------------------------------------------------------------------------------------------
# diagnoses and centres
# ------------------------------------------------------------------------------------------------------------
def test_diagnoses_wrong_columns(ds, monkeypatch, capsys):
    edit_csv(ds / "diagnoses.csv", lambda rows: [["case_id", "lesion_a", "lesion_c"]] + rows[1:])
    report = expect_error(ds, monkeypatch, capsys, "diagnoses.csv", "lesion_c", "not in dataset.json", n_errors=2)
    assert any("missing" in e and "lesion_b" in e for e in report.errors)


@pytest.mark.parametrize("bad", ["2", "yes"])
def test_diagnoses_bad_value(ds, monkeypatch, capsys, bad):
    edit_csv(ds / "diagnoses.csv", lambda rows: rows[:2] + [[rows[2][0], bad, rows[2][2]]] + rows[3:])
    expect_error(ds, monkeypatch, capsys, "diagnoses.csv", "line 3", f"'{bad}'", "case001")


def test_diagnoses_unknown_case_id(ds, monkeypatch, capsys):
    edit_csv(ds / "diagnoses.csv", lambda rows: rows + [["case999", "1", "0"]])
    expect_error(ds, monkeypatch, capsys, "diagnoses.csv", "unknown case id", "case999")


def test_diagnoses_test_case_in_training_table(ds, monkeypatch, capsys):
    edit_csv(ds / "diagnoses.csv", lambda rows: rows + [["test000", "1", "0"]])
    expect_error(ds, monkeypatch, capsys, "diagnoses.csv", "test000", "diagnosesTs.csv")


def test_diagnoses_duplicated_case_id(ds, monkeypatch, capsys):
    edit_csv(ds / "diagnoses.csv", lambda rows: rows + [rows[1]])
    expect_error(ds, monkeypatch, capsys, "diagnoses.csv", "case000", "twice")


def test_training_case_without_row_is_a_warning(ds):
    edit_csv(ds / "diagnoses.csv", lambda rows: [r for r in rows if r[0] != "case002"])
    report = verify_dataset(ds, progress=False)
    assert report.ok
    assert any("case002" in w and "unknown" in w for w in report.warnings)


def test_empty_cells_mean_unknown_and_are_fine(ds):
    edit_csv(ds / "diagnoses.csv", lambda rows: rows[:2] + [[rows[2][0], "", rows[2][2]]] + rows[3:])
    assert verify_dataset(ds, progress=False).ok


def test_diagnoses_ts_unknown_case(ds, monkeypatch, capsys):
    edit_csv(ds / "diagnosesTs.csv", lambda rows: rows + [["test555", "0", "0"]])
    expect_error(ds, monkeypatch, capsys, "diagnosesTs.csv", "test555")


def test_centers_unknown_case(ds, monkeypatch, capsys):
    edit_csv(ds / "centers.csv", lambda rows: rows + [["nobody", "siteA"]])
    expect_error(ds, monkeypatch, capsys, "centers.csv", "nobody", "unknown case id")


# ------------------------------------------------------------------------------------------------------------
# behaviour of the checker itself
# ------------------------------------------------------------------------------------------------------------
def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def _break_three(root: Path) -> None:
    (root / "imagesTr" / "case000_axial_0000.nii.gz").unlink()
    rewrite_image(root / "imagesTr" / "case002_coronal_0000.nii.gz", _set_voxel(np.nan))
    edit_csv(root / "diagnoses.csv", lambda rows: rows[:2] + [[rows[2][0], "yes", rows[2][2]]] + rows[3:])


def test_all_problems_reported_at_once(ds, monkeypatch, capsys):
    _break_three(ds)
    report = verify_dataset(ds, progress=False)
    assert len(report.errors) == 3, report.format()
    files = sorted(p.file for p in report.problems if p.severity == "error")
    assert files == ["diagnoses.csv", "imagesTr/case000_axial_0000.nii.gz", "imagesTr/case002_coronal_0000.nii.gz"]
    rc, out = run_cli(ds, monkeypatch, capsys)
    assert rc == 1
    assert "ERRORS (3)" in out and "[missing files] (1)" in out and "[image content] (1)" in out
    assert out.strip().splitlines()[-1].startswith(f"{NAME}: FAILED - 3 errors")


def test_verify_never_modifies_the_dataset(ds):
    _break_three(ds)
    path = ds / "imagesTr" / "case001_axial_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    before = _tree_digest(ds)
    verify_dataset(ds, progress=False)
    assert _tree_digest(ds) == before


def test_parallel_run_reports_the_same(ds):
    _break_three(ds)
    serial = verify_dataset(ds, num_processes=1, progress=False)
    parallel = verify_dataset(ds, num_processes=2, progress=False)
    assert parallel.problems == serial.problems


def test_unusable_arguments_raise(tmp_path):
    from orthonet.errors import OrthoError
    with pytest.raises(OrthoError):
        verify_dataset(tmp_path / "nope", progress=False)
    with pytest.raises(OrthoError):
        verify_dataset(tmp_path, num_processes=0, progress=False)


def test_missing_dataset_json_is_reported(tmp_path):
    report = verify_dataset(tmp_path, progress=False)
    assert not report.ok and report.problems[0].file == "dataset.json" and "not found" in report.errors[0]


# ------------------------------------------------------------------------------------------------------------
# truncation detection on its own
# ------------------------------------------------------------------------------------------------------------
def test_truncation_detector(tmp_path):
    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    plain, packed = tmp_path / "a.nii", tmp_path / "a.nii.gz"
    sitk.WriteImage(img, str(plain), False)
    sitk.WriteImage(img, str(packed), True)
    assert nifti_truncation(plain) is None and nifti_truncation(packed) is None
    # a valid multi-member gzip (trailer size covers only the last member) is not flagged
    raw = gzip.decompress(packed.read_bytes())
    multi = tmp_path / "m.nii.gz"
    multi.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    assert nifti_truncation(multi) is None
    cut = tmp_path / "c.nii"
    cut.write_bytes(plain.read_bytes()[:-8])
    assert "truncated" in nifti_truncation(cut)
    assert os.path.getsize(cut) == os.path.getsize(plain) - 8
