"""discover_inputs: every accepted input layout, and problems collected per case instead of raised."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.inference.input_discovery import discover_inputs, input_case_from_images, load_source
from orthonet.dataset import load_dataset
from orthonet.dicom import DicomVolume, write_dicom_series
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry
from orthonet.synthetic.views import rotation_matrix, view_direction
from tests.builders import write_tiny_dataset, write_tiny_nnunet_dataset

VIEWS = ["sagittal", "coronal", "axial"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_tiny_dataset(tmp_path_factory.mktemp("raw") / "Dataset901_Tiny", n_train=1, n_test=2,
                              oblique=True, seed=3)
    return load_dataset(root)


@pytest.fixture(scope="module")
def dataset_2ch(tmp_path_factory):
    root = write_tiny_dataset(tmp_path_factory.mktemp("raw2") / "Dataset902_Two", n_train=1, n_test=1,
                              channels=2, seed=4)
    return load_dataset(root)


def _copy_case(spec, case, dest: Path, views=VIEWS, split="Ts") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for v in views:
        for p in spec.image_paths(case, v, split):
            shutil.copy(p, dest / p.name)
    return dest


def test_raw_naming_folder(dataset):
    cases = discover_inputs(dataset.images_dir("Ts"), dataset)
    assert [c.case_id for c in cases] == ["test000", "test001"]
    for c in cases:
        assert c.usable and c.problems == [] and list(c.views) == VIEWS
        assert c.views["coronal"] == [dataset.image_path(c.case_id, "coronal", 0, "Ts")]


def test_any_simpleitk_ending_is_accepted(dataset, tmp_path):
    folder = _copy_case(dataset, "test000", tmp_path / "in")
    for p in list(folder.iterdir()):
        ending = ".nrrd" if "sagittal" in p.name else ".mha"
        img = sitk.ReadImage(str(p))
        sitk.WriteImage(img, str(p).replace(".nii.gz", ending))
        p.unlink()
    (case,) = discover_inputs(folder, dataset)
    assert case.problems == [] and case.views["sagittal"][0].suffix == ".nrrd"
    img = case.load_view("axial")[0]
    ref = sitk.ReadImage(str(dataset.image_path("test000", "axial", 0, "Ts")))
    assert Geometry.of(img).differences(Geometry.of(ref)) == []


def test_nnunet_naming(tmp_path):
    root = write_tiny_nnunet_dataset(tmp_path / "Dataset903_Plain", n_train=2)
    spec = load_dataset(root)
    cases = discover_inputs(root / "imagesTr", spec)
    assert [c.case_id for c in cases] == ["pat_000", "pat_001"]
    assert all(list(c.views) == ["image"] and not c.problems for c in cases)


def test_single_named_file_brings_its_case(dataset):
    cases = discover_inputs(dataset.image_path("test001", "axial", 0, "Ts"), dataset)
    assert [c.case_id for c in cases] == ["test001"] and list(cases[0].views) == VIEWS


def test_single_case_folder_with_free_names(dataset, tmp_path):
    folder = tmp_path / "knee_patient7"
    folder.mkdir()
    for v, name in zip(VIEWS, ["series_a.nii.gz", "b.nrrd", "zz.nii.gz"]):
        shutil.copy(dataset.image_path("test000", v, 0, "Ts"), folder / name) if name.endswith(".nii.gz") else \
            sitk.WriteImage(sitk.ReadImage(str(dataset.image_path("test000", v, 0, "Ts"))), str(folder / name))
    (case,) = discover_inputs(folder, dataset)
    assert case.case_id == "knee_patient7" and case.problems == []
    assert case.views["sagittal"] == [folder / "series_a.nii.gz"]
    assert case.views["coronal"] == [folder / "b.nrrd"] and case.views["axial"] == [folder / "zz.nii.gz"]
    assert any("taken from its direction" in n for n in case.notes)
    # a single free-named file is a one-view case
    (single,) = discover_inputs(folder / "b.nrrd", dataset)
    assert single.case_id == "b" and list(single.views) == ["coronal"]
    assert "view sagittal missing" in single.problems


def test_dicom_tree_is_detected_and_matches_nifti(dataset, tmp_path):
    root = tmp_path / "dicom"
    for i, case in enumerate(["test000", "test001"]):
        for j, v in enumerate(VIEWS):
            img = sitk.Round(sitk.ReadImage(str(dataset.image_path(case, v, 0, "Ts"))))
            write_dicom_series(img, root / case / f"series{j}", v.upper(), patient_id=case, series_number=j + 1)
    cases = discover_inputs(root, dataset)
    assert [c.case_id for c in cases] == ["test000", "test001"]
    for c in cases:
        assert c.kind == "dicom" and c.problems == [] and list(c.views) == VIEWS
        assert isinstance(c.views["sagittal"][0], DicomVolume)
        (img,) = c.load_view("coronal")
        ref = sitk.ReadImage(str(dataset.image_path(c.case_id, "coronal", 0, "Ts")))
        assert Geometry.of(ref).differences(Geometry.of(img), origin_atol=1e-3, direction_atol=1e-5) == []
        assert np.abs(sitk.GetArrayFromImage(img) - np.round(sitk.GetArrayFromImage(ref))).max() == 0


def test_dicom_missing_and_ambiguous_views_are_per_case_problems(dataset, tmp_path):
    root = tmp_path / "dicom"
    sag = sitk.Round(sitk.ReadImage(str(dataset.image_path("test000", "sagittal", 0, "Ts"))))
    write_dicom_series(sag, root / "exam" / "s1", "SAG", series_number=1)
    tilted = sitk.Image(sag)
    tilted.SetDirection(tuple((rotation_matrix((0, 0, 45)) @ view_direction("sagittal")).reshape(-1)))  # x/y
    write_dicom_series(tilted, root / "exam" / "s2", "OBLIQUE", series_number=2)
    (case,) = discover_inputs(root, dataset)
    assert case.usable and list(case.views) == ["sagittal"]
    text = " | ".join(case.problems)
    assert "ambiguous" in text and "OBLIQUE" in text
    assert "view coronal missing" in text and "view axial missing" in text


def test_problems_are_collected_per_case(dataset_2ch, tmp_path):
    spec = dataset_2ch
    folder = tmp_path / "in"
    _copy_case(spec, "test000", folder)
    # case A: coronal lacks channel 0001; axial missing entirely
    for view, ch in (("coronal", 1), ("axial", 0), ("axial", 1)):
        (folder / spec.image_name("test000", view, ch)).unlink()
    # case B: a copy of the case whose sagittal channel 0 is corrupt (truncated gzip)
    for v in VIEWS:
        for ch in range(2):
            shutil.copy(spec.image_path("test000", v, ch, "Ts"), folder / spec.image_name("caseB", v, ch))
    bad = folder / spec.image_name("caseB", "sagittal", 0)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    # case C: nothing usable (its only file is garbage)
    (folder / spec.image_name("caseC", "axial", 0)).write_bytes(b"garbage")
    (folder / spec.image_name("caseC", "axial", 1)).write_bytes(b"garbage")
    cases = {c.case_id: c for c in discover_inputs(folder, spec)}
    assert sorted(cases) == ["caseB", "caseC", "test000"]

    a = cases["test000"]
    assert list(a.views) == ["sagittal"] and a.usable
    assert any("coronal" in p and "0001" in p and "missing" in p for p in a.problems)
    assert "view axial missing" in a.problems

    b = cases["caseB"]
    assert list(b.views) == ["coronal", "axial"]
    assert any("sagittal" in p and bad.name in p and "truncated" in p for p in b.problems)
    assert any("segmentation view 'sagittal'" in p for p in b.problems)

    c = cases["caseC"]
    assert not c.usable and any("no usable view" in p for p in c.problems)
    assert any("caseC_axial_0000" in p for p in c.problems)


def test_nothing_to_predict_raises_one_clear_error(dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(OrthoError, match="no images found"):
        discover_inputs(tmp_path / "empty", dataset)
    with pytest.raises(OrthoError, match="input not found"):
        discover_inputs(tmp_path / "nope", dataset)


def test_in_memory_images(dataset):
    img = sitk.ReadImage(str(dataset.image_path("test000", "axial", 0, "Ts")))
    case = input_case_from_images("mem1", {"axial": img}, dataset)
    assert case.kind == "memory" and case.usable and "view sagittal missing" in case.problems
    assert load_source(case.views["axial"][0]) is img


def test_predictions_next_to_inputs_are_not_taken_for_images(dataset, tmp_path):
    folder = _copy_case(dataset, "test000", tmp_path / "in")
    shutil.copy(dataset.image_path("test000", "sagittal", 0, "Ts"), folder / "test000_sagittal.nii.gz")
    (case,) = discover_inputs(folder, dataset)
    assert case.problems == [] and case.views["sagittal"] == [folder / "test000_sagittal_0000.nii.gz"]
    assert any("test000_sagittal.nii.gz ignored" in n for n in case.notes)
    # alone, the {CASE}_{VIEW} form is an image of that view
    (folder / "test000_sagittal_0000.nii.gz").unlink()
    (case,) = discover_inputs(folder, dataset)
    assert case.views["sagittal"] == [folder / "test000_sagittal.nii.gz"] and case.problems == []


REAL = Path("/work/shared/data/knee_mskt/MESE_T2_dicom_anon")


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real DICOM sample not present at {REAL}")
@pytest.mark.parametrize("channels", [1, 8])
def test_real_multi_echo_exam_as_one_or_eight_channels(tmp_path, channels):
    import json
    root = tmp_path / "Dataset905_T2map"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "name": "T2map", "views": ["sagittal", "coronal"], "segmentation_view": "sagittal",
        "channel_names": {str(i): f"TE{i + 1}" for i in range(channels)}, "labels": {"background": 0},
        "diagnoses": [], "file_ending": ".nii.gz", "numTraining": 0}))
    spec = load_dataset(root)
    (case,) = discover_inputs(REAL, spec)
    assert case.kind == "dicom" and list(case.views) == ["sagittal"] and case.usable
    vols = case.views["sagittal"]
    assert len(vols) == channels and [v.echo_index for v in vols] == list(range(channels))
    assert case.problems == ["view coronal missing: no coronal series found (found: sagittal)"]


def test_missing_views_are_reported_only_for_views_the_models_read(dataset, tmp_path):
    """A segmentation-only model given just its view: nothing is missing for it (the other views become a note);
    a model that reads every view still hears about each absent one; a diagnosis-only model is not told that the
    case gets no segmentation."""
    from orthonet.inference.input_discovery import restrict_to_models
    seg_view = dataset.segmentation_view
    assert seg_view and dataset.has_segmentation
    others = [v for v in VIEWS if v != seg_view]

    (case,) = discover_inputs(_copy_case(dataset, "test000", tmp_path / "only_seg", views=(seg_view,)), dataset)
    assert {f"view {v} missing" for v in others} <= set(case.problems)       # discovery alone: every view
    restrict_to_models(case, dataset, [seg_view], segments=True)
    assert case.problems == [] and case.usable
    assert any(all(v in n for v in others) and "does not read" in n for n in case.notes)

    (full,) = discover_inputs(_copy_case(dataset, "test000", tmp_path / "only_seg2", views=(seg_view,)), dataset)
    restrict_to_models(full, dataset, VIEWS, segments=True)
    assert sorted(full.problems) == sorted(f"view {v} missing" for v in others)

    (noseg,) = discover_inputs(_copy_case(dataset, "test000", tmp_path / "noseg", views=others), dataset)
    assert any("no segmentation" in p for p in noseg.problems)
    restrict_to_models(noseg, dataset, others, segments=False)
    assert noseg.problems == []
    restrict_to_models(noseg, dataset, VIEWS, segments=True)
    assert f"view {seg_view} missing" in noseg.problems and any("no segmentation" in p for p in noseg.problems)
