"""ortho_predict end to end on a tiny trained multitask model (two folds): exact output geometry for oblique,
anisotropic, off-centre inputs (folder, single case, DICOM, Python API), ensembling and TTA arithmetic, per-case
problems (missing views, corrupt files) that never stop the other cases, clean reruns, and the report."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.predict_helpers import copy_case, multiview_models, ortho_env

VIEWS = ("sagittal", "coronal", "axial")
PREDICTED = ["noseg", "test000", "test001", "test002", "trunc"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    info = multiview_models(tmp_path_factory)
    with ortho_env(info["root"]):
        yield info


def _predict(args) -> int:
    from orthonet.inference.cli import predict_cli
    return predict_cli([str(a) for a in args])


def _assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    """Every header field of ``image`` equals ``reference`` (size exactly; spacing/origin/direction to float32
    precision, as NIfTI stores them)."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def main_run(models, tmp_path_factory):
    """One prediction over a folder with complete cases, a case with only the segmentation view, a case without
    it, a case with a truncated file and a case whose files are all garbage."""
    raw = models["raw"]
    inp = tmp_path_factory.mktemp("pred_in")
    copy_case(raw, "test000", inp)
    copy_case(raw, "test001", inp)
    copy_case(raw, "test002", inp, views=("sagittal",))
    copy_case(raw, "test001", inp, views=("coronal", "axial"), new_id="noseg")
    trunc = copy_case(raw, "test000", inp, new_id="trunc")[0]
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    for view in VIEWS:
        (inp / f"broken_{view}_0000.nii.gz").write_bytes(b"this is not an image")
    out = tmp_path_factory.mktemp("pred_out")
    code = _predict(["-i", inp, "-o", out, "-d", models["id"], "-f", "0", "1", "--disable-tta",
                     "--save-probabilities", "--explain", "-npp", "1", "--no-progress"])
    return {"input": inp, "output": out, "code": code}


def test_segmentations_have_the_exact_input_geometry(main_run):
    inp, out = main_run["input"], main_run["output"]
    assert main_run["code"] == 0
    for case in ("test000", "test001", "test002"):
        ref = sitk.ReadImage(str(inp / f"{case}_sagittal_0000.nii.gz"))
        seg = sitk.ReadImage(str(out / f"{case}_sagittal.nii.gz"))
        # the inputs really are oblique, off-centre and anisotropic
        assert not np.allclose(ref.GetDirection(), np.eye(3).ravel(), atol=1e-3)
        assert max(ref.GetSpacing()) / min(ref.GetSpacing()) >= 2 and np.linalg.norm(ref.GetOrigin()) > 10
        _assert_same_grid(seg, ref)
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}
    assert not (out / "noseg_sagittal.nii.gz").exists() and not (out / "trunc_sagittal.nii.gz").exists()


def test_probabilities_and_saliency_files(main_run):
    inp, out = main_run["input"], main_run["output"]
    ref = sitk.ReadImage(str(inp / "test000_sagittal_0000.nii.gz"))
    probs = np.load(out / "test000_sagittal.npz")["probabilities"]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "test000_sagittal.nii.gz")))
    assert probs.shape == (3, *sitk.GetArrayFromImage(ref).shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert np.array_equal(np.argmax(probs, 0), seg)
    meta = json.loads((out / "test000_sagittal.json").read_text(encoding="utf-8"))
    assert meta["class_names"] == ["background", "bone", "cartilage"]
    np.testing.assert_allclose(meta["geometry"]["direction"], ref.GetDirection(), atol=1e-6)
    for view in VIEWS:  # --explain: one map per view and diagnosis, on that view's own grid
        view_ref = sitk.ReadImage(str(inp / f"test000_{view}_0000.nii.gz"))
        for d in ("lesion_a", "lesion_b"):
            sal = sitk.ReadImage(str(out / f"test000_{view}_saliency_{d}.nii.gz"))
            _assert_same_grid(sal, view_ref)
            arr = sitk.GetArrayFromImage(sal)
            assert arr.min() >= 0 and arr.max() <= 1 + 1e-6
    assert (out / "test002_sagittal_saliency_lesion_a.nii.gz").exists()
    assert not (out / "test002_coronal_saliency_lesion_a.nii.gz").exists()


def test_diagnoses_tables_with_ensemble_spread(main_run):
    from orthonet.inference.diagnoses_table import read_diagnoses_csv
    out = main_run["output"]
    header = (out / "diagnoses.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == ["case_id", "lesion_a_prob", "lesion_a", "lesion_a_std", "lesion_b_prob", "lesion_b",
                      "lesion_b_std", "review"]
    rows = read_diagnoses_csv(out / "diagnoses.csv", ["lesion_a", "lesion_b"])
    assert sorted(rows) == PREDICTED                       # every predicted case, the broken one is not there
    table = json.loads((out / "diagnoses.json").read_text(encoding="utf-8"))
    assert table["thresholds"] == {"lesion_a": 0.5, "lesion_b": 0.5}    # no cross-validated thresholds yet
    for case, row in rows.items():
        for d in ("lesion_a", "lesion_b"):
            p, std = row.probabilities[d], row.std[d]
            assert 0 <= p <= 1 and std >= 0
            assert row.decisions[d] == int(p >= 0.5)
            entry = table["cases"][case][d]
            assert abs(entry["probability"] - p) < 1e-6
            assert entry["review"] == (abs(p - 0.5) < max(0.05, entry["std"]))


def test_problems_are_reported_per_case(main_run, capsys):
    out = main_run["output"]
    problems = json.loads((out / "problems.json").read_text(encoding="utf-8"))
    assert problems["num_cases"] == 6 and problems["num_predicted"] == 5
    assert problems["not_predicted"] == ["broken"]
    cases = problems["cases"]
    assert any("broken_sagittal_0000.nii.gz" in p for p in cases["broken"]["problems"])
    assert any("no usable view" in p for p in cases["broken"]["problems"])
    assert any("trunc_sagittal_0000.nii.gz" in p and "truncated" in p for p in cases["trunc"]["problems"])
    assert "view coronal missing" in cases["test002"]["problems"]
    assert any("degraded" in n for n in cases["test002"]["notes"])
    assert any("segmentation view 'sagittal'" in p for p in cases["noseg"]["problems"])
    assert "test000" not in cases and "test001" not in cases
    log = (out / "predict_log.txt").read_text(encoding="utf-8")
    assert "broken: NOT PREDICTED" in log and "done: 5 of 6 case(s) predicted" in log
    for case in PREDICTED:
        assert (out / f"{case}_overview.png").stat().st_size > 10_000
    assert not (out / "broken_overview.png").exists()


def _report_cases(path: Path):
    from tests.test_report import _Collector
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_lists_every_case_and_renders(main_run):
    from tests.test_report import _chromium
    out = main_run["output"]
    parsed = _report_cases(out / "report.html")
    assert parsed.summary_cases == sorted(PREDICTED + ["broken"])
    srcs = [a["src"] for t, a in parsed.attrs if t == "img"]
    assert srcs == [f"{c}_overview.png" for c in PREDICTED]
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (run .ci/install_system_deps.sh)")
    shot = out.parent / "report_shot.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1200,3000", (out / "report.html").resolve().as_uri()]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("headless chromium did not finish within 120 s on this machine")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    import matplotlib.image as mpimg
    assert shot.is_file() and shot.stat().st_size > 0, result.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (3000, 1200) and img.std() > 0.05
    # the overview PNGs were loaded: the saliency colour map's saturated blue/red appear on the page
    assert ((img[..., 2] > 0.5) & (img[..., 0] < 0.2)).sum() > 2000


def test_rerun_overwrites_cleanly(main_run, models, tmp_path):
    """A rerun replaces the outputs of its cases: a case whose segmentation view is now corrupt keeps no stale
    segmentation, probabilities or saliency maps from the earlier run."""
    out = tmp_path / "out"
    shutil.copytree(main_run["output"], out)
    inp = tmp_path / "in"
    copy_case(models["raw"], "test000", inp)
    (inp / "test000_sagittal_0000.nii.gz").write_bytes(b"corrupt")
    assert (out / "test000_sagittal.nii.gz").exists()
    code = _predict(["-i", inp, "-o", out, "-d", models["id"], "-f", "0", "--disable-tta", "--no-progress"])
    assert code == 0
    for stale in ("test000_sagittal.nii.gz", "test000_sagittal.npz", "test000_sagittal.json",
                  "test000_axial_saliency_lesion_a.nii.gz"):
        assert not (out / stale).exists(), stale
    assert (out / "test000_overview.png").exists()
    assert (out / "diagnoses.csv").read_text(encoding="utf-8").splitlines()[1].startswith("test000,")
    assert len((out / "diagnoses.csv").read_text(encoding="utf-8").splitlines()) == 2
    assert "lesion_a_std" not in (out / "diagnoses.csv").read_text(encoding="utf-8")      # one fold: no spread column
    assert not list(out.glob(".*.tmp*"))                                   # no temporary files left behind


def test_no_case_predicted_exits_nonzero(models, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "bad_sagittal_0000.nii.gz").write_bytes(b"garbage")
    code = _predict(["-i", inp, "-o", tmp_path / "out", "-d", models["id"], "-f", "0", "--no-progress"])
    assert code == 1
    assert json.loads((tmp_path / "out" / "problems.json").read_text(encoding="utf-8"))["not_predicted"] == ["bad"]


def test_missing_model_is_a_clear_error(models, tmp_path, capsys):
    code = _predict(["-i", tmp_path, "-o", tmp_path / "o", "-d", models["id"], "-tr", "DiagTrainer"])
    err = capsys.readouterr().err
    assert code == 2 and "DiagTrainer__orthoPlans__3d_fullres" in err
    assert "MultitaskTrainer__orthoPlans__3d_fullres (folds 0, 1)" in err
    code = _predict(["-i", tmp_path, "-o", tmp_path / "o", "-d", models["id"], "-f", "0", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "fold(s) 3 have no checkpoint_final.pt (available: 0, 1)" in err


def _read_views(raw: Path, case: str):
    return {v: sitk.ReadImage(str(raw / "imagesTs" / f"{case}_{v}_0000.nii.gz")) for v in VIEWS}


def test_ensemble_is_the_mean_of_the_folds_and_tta_keeps_shapes(models, monkeypatch):
    from orthonet.inference import Predictor, predict_images
    from orthonet.imageio import Geometry
    views = _read_views(models["raw"], "test000")
    kw = dict(tta=False, save_probabilities=True, progress=False, num_processes=0)
    both = Predictor.from_dataset(models["id"], folds=[0, 1], **kw).predict_images(views, "test000")
    f0 = Predictor.from_dataset(models["id"], folds=[0], **kw)
    one = f0.predict_images(views, "test000")
    two = Predictor.from_dataset(models["id"], folds=[1], **kw).predict_images(views, "test000")
    np.testing.assert_allclose(both.probabilities, (one.probabilities + two.probabilities) / 2, atol=1e-5)
    for d in ("lesion_a", "lesion_b"):
        p0, p1 = one.diagnoses.probabilities[d], two.diagnoses.probabilities[d]
        assert abs(both.diagnoses.probabilities[d] - (p0 + p1) / 2) < 1e-6
        assert abs(both.diagnoses.std[d] - abs(p0 - p1) / 2) < 1e-6
    assert one.diagnoses.std == {} and both.member_probabilities.shape == (2, 2)
    _assert_same_grid(both.segmentation, views["sagittal"])             # Python API: exact input grid
    # numpy arrays + geometry give the same answer as the SimpleITK images they came from
    arrays = {v: (sitk.GetArrayFromImage(img), Geometry.of(img)) for v, img in views.items()}
    again = predict_images(arrays, predictor=f0, case_id="test000")
    assert np.array_equal(sitk.GetArrayFromImage(again.segmentation), sitk.GetArrayFromImage(one.segmentation))
    assert again.diagnoses.probabilities == pytest.approx(one.diagnoses.probabilities, abs=1e-6)
    # mirroring TTA changes the values, never the shapes
    tta = Predictor.from_dataset(models["id"], folds=[0], **{**kw, "tta": True}).predict_images(views, "test000")
    assert tta.probabilities.shape == one.probabilities.shape
    assert tta.segmentation.GetSize() == one.segmentation.GetSize()
    np.testing.assert_allclose(tta.probabilities.sum(0), 1.0, atol=1e-4)
    assert np.abs(tta.probabilities - one.probabilities).max() > 1e-4
    assert set(tta.diagnoses.probabilities) == set(one.diagnoses.probabilities)
    # several sliding-window tiles per forward pass (--tile-batch; the GPU default) change nothing, TTA included
    from orthonet.inference import predict_core
    seen = []

    def recording(fn, *args, **kwargs):
        seen.append(kwargs["batch_size"])
        return sliding(fn, *args, **kwargs)
    sliding = predict_core.sliding_window_predict
    batched = Predictor.from_dataset(models["id"], folds=[0], **{**kw, "tta": True, "tile_batch": 3})
    monkeypatch.setattr(predict_core, "sliding_window_predict", recording)
    np.testing.assert_allclose(batched.predict_images(views, "test000").probabilities, tta.probabilities, atol=1e-5)
    assert seen == [3]


def test_dicom_series_predicts_like_its_nifti(models, tmp_path):
    from orthonet.dicom import write_dicom_series
    raw = models["raw"]
    nifti = tmp_path / "nifti"
    files = copy_case(raw, "test001", nifti)
    dicom = tmp_path / "dicom"
    for k, (view, f) in enumerate(zip(VIEWS, files)):
        # as a scanner stores MR: int16 pixels using most of their range. MR intensities have no absolute unit
        # and the plans z-score each image, so the scale is free; the rounding is the only difference left.
        img = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(img)
        as_int = sitk.GetImageFromArray(np.round(arr * (30000.0 / np.abs(arr).max())).astype(np.int16))
        as_int.CopyInformation(img)
        write_dicom_series(as_int, dicom / "test001" / view, view.upper(), patient_id="P1", series_number=k + 1)
    common = ["-d", models["id"], "-f", "0", "--disable-tta", "--no-progress", "--no-overview"]
    # a single case given as one of its files (its siblings are found by name)
    assert _predict(["-i", files[0], "-o", tmp_path / "out_n"] + common) == 0
    assert _predict(["-i", dicom, "-o", tmp_path / "out_d"] + common) == 0
    ref = sitk.ReadImage(str(files[0]))
    seg_n = sitk.ReadImage(str(tmp_path / "out_n" / "test001_sagittal.nii.gz"))
    seg_d = sitk.ReadImage(str(tmp_path / "out_d" / "test001_sagittal.nii.gz"))
    _assert_same_grid(seg_n, ref)
    assert seg_d.GetSize() == ref.GetSize()
    np.testing.assert_allclose(seg_d.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(seg_d.GetDirection(), ref.GetDirection(), atol=1e-5)
    agreement = float(np.mean(sitk.GetArrayFromImage(seg_n) == sitk.GetArrayFromImage(seg_d)))
    assert agreement > 0.99, agreement                                   # measured: 0.99991
    from orthonet.inference.diagnoses_table import read_diagnoses_csv
    dn = read_diagnoses_csv(tmp_path / "out_n" / "diagnoses.csv", ["lesion_a", "lesion_b"])["test001"]
    dd = read_diagnoses_csv(tmp_path / "out_d" / "diagnoses.csv", ["lesion_a", "lesion_b"])["test001"]
    for d in ("lesion_a", "lesion_b"):   # measured: |difference| < 1e-5 (float pixels are stored with a rescale
        # slope, 1/32000 of the range); the bound leaves room for a model more sensitive than this tiny one
        assert abs(dn.probabilities[d] - dd.probabilities[d]) < 0.005, (d, dn.probabilities, dd.probabilities)


def test_segmentation_only_nnunet_dataset_with_the_default_model(tmp_path):
    """A plain nnU-Net dataset (one view, {CASE}_0000.nii.gz): the default model (SegTrainer, every trained fold)
    writes {CASE}.nii.gz on the input grid, and no diagnosis table."""
    from tests.builders import write_tiny_nnunet_dataset
    from tests.predict_helpers import plan_small, train
    with ortho_env(tmp_path):
        name = "Dataset974_Plain"
        raw = write_tiny_nnunet_dataset(tmp_path / "raw" / name, n_train=5, anisotropic=True)
        plan_small(974, name, tmp_path)
        train(name, "seg", 0, final_validation=False)
        inp = tmp_path / "in"
        inp.mkdir()
        for case in ("pat_000", "pat_001"):
            shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inp)
        out = tmp_path / "out"
        assert _predict(["-i", inp, "-o", out, "-d", "974", "--disable-tta", "--no-progress"]) == 0
        for case in ("pat_000", "pat_001"):
            _assert_same_grid(sitk.ReadImage(str(out / f"{case}.nii.gz")),
                              sitk.ReadImage(str(inp / f"{case}_0000.nii.gz")))
            assert (out / f"{case}_overview.png").exists()
        assert not (out / "diagnoses.csv").exists()
        info = json.loads((out / "prediction_info.json").read_text(encoding="utf-8"))
        assert info["selection"]["source"] == "default" and list(info["roles"]) == ["seg"]
        assert _report_cases(out / "report.html").summary_cases == ["pat_000", "pat_001"]


def test_pipeline_keeps_order_and_bounds_the_cases_in_flight():
    """Background preparation yields the cases in input order and never holds more than npp + 1 prepared."""
    import threading
    import time
    from types import SimpleNamespace
    from orthonet.inference.predictor import PredictionSettings, Predictor
    lock, state = threading.Lock(), {"prepared": 0, "consumed": 0, "max_ahead": 0}

    def prepare(case):
        time.sleep(0.01 * (case.n % 3))            # uneven durations: completion order differs from input order
        with lock:
            state["prepared"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["prepared"] - state["consumed"])
        return f"prepared-{case.n}", None

    stub = SimpleNamespace(settings=PredictionSettings(num_processes=2), _safe_prepare=prepare)
    cases = [SimpleNamespace(n=i) for i in range(12)]
    seen = []
    for case, prepared, error in Predictor.prepared_stream(stub, cases):
        with lock:
            state["consumed"] += 1
        assert prepared == f"prepared-{case.n}" and error is None
        seen.append(case.n)
        time.sleep(0.02)                            # prediction is slower than preparation here
    assert seen == list(range(12))
    assert state["max_ahead"] <= 3, state
