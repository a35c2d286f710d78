"""DICOM reading: a real multi-echo scanner series, and series written from synthetic volumes."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.dicom import (AMBIGUOUS_ANGLE_DEG, assign_view, discover_dicom_cases, read_dicom_series,
                            read_slice_header, scan_dicom, write_dicom_series)
from orthonet.imageio import Geometry
from orthonet.synthetic.views import ViewGrid, rotation_matrix, view_direction

REAL = Path("/work/shared/data/knee_mskt/MESE_T2_dicom_anon")


def _volume(view: str, oblique=None, center=(12.0, -30.0, 41.0), seed: int = 0, integer: bool = True,
            fov=(40.0, 34.0), coverage=28.0, in_plane=2.0, slice_mm=3.5) -> sitk.Image:
    grid = ViewGrid.make(view, center, fov_mm=fov, coverage_mm=coverage, in_plane_mm=in_plane,
                         slice_mm=slice_mm, oblique_deg=oblique)
    g = grid.geometry
    rng = np.random.default_rng(seed)
    arr = rng.uniform(0, 900, g.array_shape)
    arr = np.round(arr) if integer else arr
    return g.apply_to(sitk.GetImageFromArray(arr.astype(np.float32)))


# ---- view assignment -------------------------------------------------------------------------------------
@pytest.mark.parametrize("view", ["sagittal", "coronal", "axial"])
def test_assign_view_standard_and_oblique(view):
    assert assign_view(view_direction(view).reshape(-1)) == (view, pytest.approx(1.0))
    tilted, conf = assign_view(view_direction(view, (20.0, 0.0, 15.0)).reshape(-1))
    assert tilted == view and 0.85 < conf < 1.0


def test_assign_view_ambiguous_near_45_degrees():
    # sagittal normal (x) rotated 45 deg about z lies exactly between x and y
    d = rotation_matrix((0, 0, 45)) @ view_direction("sagittal")
    view, conf = assign_view(d.reshape(-1))
    assert view == "ambiguous" and conf == pytest.approx(np.cos(np.pi / 4), abs=1e-6)
    # just inside the threshold it is assigned again
    d = rotation_matrix((0, 0, AMBIGUOUS_ANGLE_DEG - 1)) @ view_direction("sagittal")
    assert assign_view(d.reshape(-1))[0] == "sagittal"


def test_assign_view_uses_coarsest_axis_for_reoriented_images():
    # a sagittal stack stored with the thick slice axis first (e.g. a re-saved NIfTI): identity direction,
    # spacing (4, 0.6, 0.6) -> the slice normal is index axis 0 = x -> sagittal
    assert assign_view(np.eye(3).reshape(-1), spacing=(4.0, 0.6, 0.6))[0] == "sagittal"
    assert assign_view(np.eye(3).reshape(-1))[0] == "axial"


# ---- the real scanner series ------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL.is_dir(), reason=f"real DICOM sample not present at {REAL}")
def test_real_multi_echo_series_is_split_by_echo_time():
    cases = discover_dicom_cases(REAL)
    assert len(cases) == 1
    case = cases[0]
    vols = case.views["sagittal"]
    assert len(vols) == 8 and set(case.views) == {"sagittal"}
    assert all(v.num_slices == 24 and len(v.files) == 24 for v in vols)
    assert [v.echo_index for v in vols] == list(range(8))
    tes = [v.echo_time for v in vols]
    assert tes == sorted(tes) and tes[0] == pytest.approx(6.312) and tes[-1] == pytest.approx(50.496)
    for v in vols:
        assert v.geometry.spacing == pytest.approx((0.625, 0.625, 4.0), abs=1e-3)
        view, conf = v.view
        assert view == "sagittal" and conf > 0.95
        assert not v.warnings
    # missing views are reported as text, the case is still returned
    assert any("coronal" in p for p in case.problems) and any("axial" in p for p in case.problems)
    first, notes = case.channels("sagittal", 1)
    assert first == [vols[0]] and "8 echoes" in notes[0]
    all_echoes, _ = case.channels("sagittal", 8)
    assert all_echoes == vols

    image = vols[3].load()
    assert image.GetSize() == (256, 256, 24)
    # every slice of the volume sits where its own file's ImagePositionPatient says
    for k in (0, 11, 23):
        header = read_slice_header(vols[3].files[k])
        assert np.allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), header.position, atol=1e-3)
        assert header.echo_time == pytest.approx(vols[3].echo_time)
    # pixels equal a plain single-file read of that slice
    single = sitk.GetArrayFromImage(sitk.ReadImage(vols[3].files[5]))[0]
    assert np.array_equal(sitk.GetArrayFromImage(image)[5], single)


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real DICOM sample not present at {REAL}")
def test_read_dicom_series_returns_one_image_per_echo():
    images = read_dicom_series(REAL)
    assert len(images) == 8
    assert {img.GetSize() for img in images} == {(256, 256, 24)}
    means = [float(sitk.GetArrayViewFromImage(i).mean()) for i in images]
    assert means[0] > means[-1]  # T2 decay: later echoes are darker


# ---- synthetic series round trip --------------------------------------------------------------------------
def _shuffle_names(folder: Path, seed: int = 1) -> None:
    """Rename files randomly so file order says nothing about slice order."""
    files = sorted(folder.iterdir())
    names = [f"X{i:03d}" for i in range(len(files))]
    random.Random(seed).shuffle(names)
    for f, n in zip(files, names):
        f.rename(folder / n)  # no extension: detection must use the DICM magic


def test_oblique_coronal_round_trip(tmp_path):
    src = _volume("coronal", oblique=(14.0, -6.0, 9.0))
    write_dicom_series(src, tmp_path / "exam" / "cor", "COR PD", patient_id="P1")
    _shuffle_names(tmp_path / "exam" / "cor")
    cases = discover_dicom_cases(tmp_path / "exam")
    assert len(cases) == 1 and list(cases[0].views) == ["coronal"]
    vol = cases[0].views["coronal"][0]
    assert vol.series_description == "COR PD" and not vol.warnings
    out = vol.load()
    assert Geometry.of(src).differences(Geometry.of(out), spacing_rtol=1e-4, origin_atol=1e-3,
                                        direction_atol=1e-5) == []
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(src).astype(np.int16))
    view, conf = vol.view
    assert view == "coronal" and conf < 0.99


def test_float_volume_round_trip_with_rescale_slope(tmp_path):
    src = _volume("axial", oblique=(5.0, 8.0, 0.0), integer=False)
    write_dicom_series(src, tmp_path / "ax", "AX T1")
    (out,) = read_dicom_series(tmp_path / "ax")
    assert Geometry.of(src).differences(Geometry.of(out), origin_atol=1e-3, direction_atol=1e-5) == []
    err = np.abs(sitk.GetArrayFromImage(out) - sitk.GetArrayFromImage(src)).max()
    assert err <= 900 / 32000 * 0.51


def test_one_series_uid_with_two_orientations_and_a_missing_slice(tmp_path):
    """A localiser-like series: two orientations share one SeriesInstanceUID; one stack lacks a slice."""
    folder = tmp_path / "study"
    sag = _volume("sagittal", oblique=(0, 0, 8), seed=1)
    ax = _volume("axial", seed=2)
    write_dicom_series(sag, folder, "MIXED", series_uid="1.2.826.0.1.1", file_prefix="S")
    write_dicom_series(ax, folder, "MIXED", series_uid="1.2.826.0.1.1", file_prefix="A")
    os.remove(folder / "A0004.dcm")  # gap in the axial stack
    volumes, problems = scan_dicom(folder)
    assert problems == []
    assert sorted(v.view[0] for v in volumes) == ["axial", "sagittal"]
    axial = next(v for v in volumes if v.view[0] == "axial")
    sagittal = next(v for v in volumes if v.view[0] == "sagittal")
    assert axial.num_slices == ax.GetDepth() - 1 and sagittal.num_slices == sag.GetDepth()
    assert any("uneven slice spacing" in w for w in axial.warnings)
    assert sagittal.warnings == []
    expected = ax.GetSpacing()[2] * (ax.GetDepth() - 1) / (ax.GetDepth() - 2)
    assert axial.geometry.spacing[2] == pytest.approx(expected, rel=1e-4)


def test_studies_become_cases_with_problems_not_exceptions(tmp_path):
    root = tmp_path / "exams"
    # patient A: sagittal + coronal + an ambiguous oblique series
    write_dicom_series(_volume("sagittal", seed=3), root / "patA" / "s1", "SAG", patient_id="A", series_number=1)
    write_dicom_series(_volume("coronal", seed=4), root / "patA" / "s2", "COR", patient_id="A", series_number=2)
    oblique = _volume("sagittal", oblique=(0, 0, 45), seed=5)
    write_dicom_series(oblique, root / "patA" / "s3", "OBL", patient_id="A", series_number=3)
    # patient B: axial only, plus a file that is not DICOM
    write_dicom_series(_volume("axial", seed=6), root / "patB" / "s1", "AX", patient_id="B")
    (root / "patB" / "s1" / "notes.dcm").write_text("not a dicom file")
    cases = discover_dicom_cases(root)
    assert [c.case_id for c in cases] == ["patA", "patB"]
    a, b = cases
    assert a.found_views == ["sagittal", "coronal"]
    assert len(a.ambiguous) == 1 and any("ambiguous" in p and "OBL" in p for p in a.problems)
    assert any("no axial series" in p for p in a.problems)
    assert b.found_views == ["axial"]
    assert any("no sagittal series" in p for p in b.problems)
    assert a.study_uid != b.study_uid
