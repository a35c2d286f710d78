"""ortho_evaluate, diagnoses.csv format, thresholds and configuration choice on hand-made cases."""
from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk

from orthonet.inference.diagnoses_table import (make_case_diagnoses, read_diagnoses_csv, write_diagnoses_csv,
                                                write_diagnoses_json)
from orthonet.inference.evaluate import evaluate, evaluate_cli, evaluate_main, roc_points
from orthonet.inference.thresholds import (choose_thresholds, configuration_score, rank_configurations,
                                           select_best_configuration)
from orthonet.dataset import load_dataset
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry

SPACING = (1.0, 1.5, 2.5)  # itk (x, y, z) -> numpy (z, y, x) = (2.5, 1.5, 1.0)
GEOM = Geometry((24, 20, 22), SPACING, (-10.0, 5.0, 30.0))
# probabilities and labels of six cases for two diagnoses (NaN = unknown)
PROBS = {"a": [0.9, 0.4, 0.35, 0.1, 0.8, 0.6], "b": [0.7, 0.2, 0.3, 0.8, 0.5, 0.6]}
LABELS = {"a": [1, 1, 0, 0, 1, 0], "b": [1, np.nan, 0, 0, np.nan, 1]}
CASES = [f"c{i}" for i in range(6)]


def _write_label(arr, path, geom=GEOM):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    geom.apply_to(img)
    sitk.WriteImage(img, str(path))


def _cube_case():
    """Reference: bone cube 10^3 and a one-voxel cartilage plane; prediction: cube shifted 5 voxels along x
    (Dice 0.5, IoU 1/3) and the plane shifted 3 slices along z (every surface distance 3 x 2.5 mm)."""
    ref = np.zeros(GEOM.array_shape, np.uint8)
    pred = np.zeros_like(ref)
    ref[5:15, 5:15, 5:15] = 1
    pred[5:15, 5:15, 10:20] = 1
    ref[17, 2:10, 2:10] = 2
    pred[20, 2:10, 2:10] = 2
    return ref, pred


@pytest.fixture()
def evalset(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    root = raw / "Dataset904_Eval"
    (root / "labelsTs").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Eval", "views": ["sagittal"], "segmentation_view": "sagittal", "channel_names": {"0": "T2"},
        "labels": {"background": 0, "bone": 1, "cartilage": 2}, "diagnoses": ["a", "b"],
        "file_ending": ".nii.gz", "numTraining": 0}))
    pred = tmp_path / "pred"
    pred.mkdir()
    ref0, pred0 = _cube_case()
    _write_label(ref0, root / "labelsTs" / "c0_sagittal.nii.gz")
    _write_label(pred0, pred / "c0_sagittal.nii.gz")
    _write_label(ref0, root / "labelsTs" / "c1_sagittal.nii.gz")       # perfect prediction
    _write_label(ref0, pred / "c1_sagittal.nii.gz")
    _write_label(ref0, root / "labelsTs" / "c2_sagittal.nii.gz")       # no prediction at all
    with open(root / "diagnosesTs.csv", "w") as f:
        f.write("case_id,a,b\n")
        for i, c in enumerate(CASES):
            cells = ["" if math.isnan(LABELS[d][i]) else str(int(LABELS[d][i])) for d in ("a", "b")]
            f.write(f"{c},{','.join(cells)}\n")
    rows = [make_case_diagnoses(c, {d: PROBS[d][i] for d in "ab"}, {"a": 0.38, "b": 0.5}) for i, c in
            enumerate(CASES)]
    write_diagnoses_csv(pred / "diagnoses.csv", rows, ["a", "b"])
    (root / "centers.csv").write_text("case_id,center\nc0,A\nc2,A\nc4,A\nc1,B\nc3,B\nc5,B\n")
    monkeypatch.setenv("ORTHO_raw", str(raw))
    monkeypatch.setenv("ORTHO_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("ORTHO_results", str(tmp_path / "res"))
    return load_dataset(root), pred


def test_segmentation_metrics_known_answers(evalset):
    spec, pred = evalset
    s = evaluate(spec.root / "labelsTs", pred, spec, plots=False)
    seg = s["segmentation"]
    c0, c1 = seg["per_case"]["c0"], seg["per_case"]["c1"]
    assert c0["bone"]["dice"] == pytest.approx(0.5) and c0["bone"]["iou"] == pytest.approx(1 / 3)
    assert c0["cartilage"]["dice"] == 0.0
    assert c0["cartilage"]["hd95_mm"] == pytest.approx(3 * 2.5)           # z spacing, not voxels
    assert c1["bone"]["dice"] == 1.0 and c1["bone"]["hd95_mm"] == 0.0
    assert c0["bone"]["n_ref"] == 1000 and c0["bone"]["n_pred"] == 1000
    # cube shifted by 5 voxels along x (1 mm): the largest surface distance is 5 mm, HD95 in (0, 5]
    assert 0 < c0["bone"]["hd95_mm"] <= 5.0
    assert seg["mean"]["bone"]["dice"] == pytest.approx(0.75)
    assert seg["foreground_mean"]["dice"] == pytest.approx((0.75 + 0.5) / 2)
    assert seg["missing_predictions"] == ["c2"]


def test_diagnosis_metrics_known_answers(evalset):
    spec, pred = evalset
    s = evaluate(spec.root / "labelsTs", pred, spec, plots=False)
    d = s["diagnosis"]
    a, b = d["per_diagnosis"]["a"], d["per_diagnosis"]["b"]
    assert a["auc"] == pytest.approx(8 / 9)                 # 8 of 9 positive/negative pairs ordered correctly
    assert a["average_precision"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    # the yes/no column (threshold 0.38) is used, not 0.5: yes for c0, c1, c4, c5
    assert a["sensitivity"] == pytest.approx(1.0) and a["specificity"] == pytest.approx(2 / 3)
    assert b["auc"] == pytest.approx(0.5) and b["n_unknown"] == 2 and b["n_positive"] == 2
    assert d["macro"]["auc"] == pytest.approx((8 / 9 + 0.5) / 2)
    assert d["reference_csv"].endswith("diagnosesTs.csv")     # found next to labelsTs by default


def test_per_center_breakdown(evalset):
    spec, pred = evalset
    s = evaluate(spec.root / "labelsTs", pred, spec, plots=False)
    pc = s["per_center"]
    assert sorted(pc) == ["A", "B"]
    assert pc["A"]["segmentation"]["mean"]["bone"]["dice"] == pytest.approx(0.5)   # c0
    assert pc["B"]["segmentation"]["mean"]["bone"]["dice"] == pytest.approx(1.0)   # c1
    assert pc["A"]["diagnosis"]["per_diagnosis"]["a"]["auc"] == pytest.approx(1.0)  # c0, c2, c4
    assert pc["B"]["diagnosis"]["per_diagnosis"]["a"]["auc"] == pytest.approx(0.5)  # c1, c3, c5


def test_cli_writes_summary_and_figures(evalset, capsys):
    spec, pred = evalset
    out = pred / "eval" / "summary.json"
    assert evaluate_main(["-ref", str(spec.root / "labelsTs"), "-pred", str(pred), "-d", "904",
                          "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text        # strict JSON
    summary = json.loads(text)
    assert summary["segmentation"]["mean"]["bone"]["dice"] == pytest.approx(0.75)
    for name in ("roc_curves.png", "dice_boxplot.png"):
        img = mpimg.imread(out.parent / name)
        assert img.shape[0] > 200 and img.std() > 0.01       # a real picture, not a blank canvas
    printed = capsys.readouterr().out
    assert "bone" in printed and "macro mean" in printed


def test_geometry_mismatch_names_the_case(evalset, capsys):
    spec, pred = evalset
    ref0, _ = _cube_case()
    shifted = Geometry(GEOM.size, GEOM.spacing, (-10.0, 5.0, 33.0))
    _write_label(ref0, pred / "c1_sagittal.nii.gz", shifted)
    with pytest.raises(OrthoError, match=r"case c1: prediction is not on the reference grid.*origin"):
        evaluate(spec.root / "labelsTs", pred, spec, plots=False)
    assert evaluate_cli(["-ref", str(spec.root / "labelsTs"), "-pred", str(pred), "-d", "904"]) == 2
    assert "case c1" in capsys.readouterr().err


def test_undeclared_label_value_is_an_error(evalset):
    spec, pred = evalset
    ref0, _ = _cube_case()
    ref0[0, 0, 0] = 7
    _write_label(ref0, pred / "c1_sagittal.nii.gz")
    with pytest.raises(OrthoError, match=r"values \[7\]"):
        evaluate(spec.root / "labelsTs", pred, spec, plots=False)


def test_roc_points():
    fpr, tpr = roc_points(np.array([1, 1, 0, 0.0]), np.array([0.9, 0.5, 0.5, 0.1]))
    assert np.allclose(fpr, [0, 0, 0.5, 1]) and np.allclose(tpr, [0, 0.5, 1, 1])


# ---- diagnoses.csv format ---------------------------------------------------------------------------------
def test_diagnoses_csv_round_trip_with_std_and_review(tmp_path):
    rows = [make_case_diagnoses("k1", {"x": 0.52, "y": 0.1}, {"x": 0.5, "y": 0.3}, std={"x": 0.01, "y": 0.02}),
            make_case_diagnoses("k2", {"x": 0.9, "y": 0.35}, {"x": 0.5, "y": 0.3}, std={"x": 0.0, "y": 0.2})]
    assert rows[0].review and rows[0].review_flags == {"x": True, "y": False}     # 0.02 from its threshold
    assert rows[1].review and rows[1].review_flags["y"]                           # wide ensemble spread
    write_diagnoses_csv(tmp_path / "diagnoses.csv", rows, ["x", "y"])
    lines = (tmp_path / "diagnoses.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "case_id,x_prob,x,x_std,y_prob,y,y_std,review"
    assert lines[1] == "k1,0.520000,1,0.010000,0.100000,0,0.020000,1"
    back = read_diagnoses_csv(tmp_path / "diagnoses.csv", ["x", "y"])
    assert back["k2"].probabilities == {"x": 0.9, "y": 0.35} and back["k2"].decisions == {"x": 1, "y": 1}
    write_diagnoses_json(tmp_path / "diagnoses.json", rows, ["x", "y"], {"x": 0.5, "y": 0.3})
    j = json.loads((tmp_path / "diagnoses.json").read_text(encoding="utf-8"))
    assert j["cases"]["k1"]["x"] == {"probability": 0.52, "positive": 1, "threshold": 0.5, "std": 0.01,
                                     "review": True}


def test_diagnoses_csv_without_std_has_no_review_column(tmp_path):
    write_diagnoses_csv(tmp_path / "d.csv", [make_case_diagnoses("k", {"x": 0.7}, {})], ["x"])
    assert (tmp_path / "d.csv").read_text(encoding="utf-8").splitlines() == ["case_id,x_prob,x", "k,0.700000,1"]
    (tmp_path / "bad.csv").write_text("case_id,x_prob,x\nk,high,1\n")
    with pytest.raises(OrthoError, match="'x_prob' holds 'high'"):
        read_diagnoses_csv(tmp_path / "bad.csv", ["x"])


# ---- thresholds and configuration choice ------------------------------------------------------------------
def test_youden_thresholds_known_answer():
    probs = {f"k{i}": np.array([p, 0.3]) for i, p in enumerate([0.05, 0.2, 0.3, 0.32, 0.7, 0.9, 0.31])}
    y1 = [0, 0, 0, 1, 1, 1, np.nan]        # the unknown label at 0.31 must be ignored
    labels = {f"k{i}": np.array([y, 0.0]) for i, y in enumerate(y1)}
    t = choose_thresholds(probs, labels, ["x", "only_negatives"])
    assert t == {"x": pytest.approx(0.32), "only_negatives": 0.5}


def test_select_best_configuration_ranking():
    multitask = {"A": {"mean_dice": 0.80, "macro_auc": 0.70}, "B": {"mean_dice": 0.70, "macro_auc": 0.85}}
    assert select_best_configuration(multitask) == "B"                      # 0.775 > 0.75
    assert select_best_configuration(multitask, task="seg") == "A"
    assert select_best_configuration({"z": {"mean_dice": 0.8}, "y": {"mean_dice": 0.8}}) == "y"   # tie: name
    # evaluation-summary layout is understood; a candidate without a needed metric is not eligible
    summary_like = {"segmentation": {"foreground_mean": {"dice": 0.9}}, "diagnosis": {"macro": {"auc": 0.9}}}
    cands = {"full": summary_like, "seg_only": {"mean_dice": 0.99}}
    assert rank_configurations(cands) == [("full", pytest.approx(0.9))]
    assert math.isnan(configuration_score({"mean_dice": 0.99}, "multitask"))
    with pytest.raises(OrthoError, match="no trained configuration"):
        select_best_configuration({})


def test_partial_predictions_are_evaluated_with_notes(evalset):
    spec, pred = evalset
    # diagnosis only: REF is the reference CSV itself
    s = evaluate(spec.root / "diagnosesTs.csv", pred, spec, plots=False)
    assert "segmentation" not in s and s["diagnosis"]["macro"]["auc"] == pytest.approx((8 / 9 + 0.5) / 2)
    # segmentation-only model: no diagnoses.csv in PRED -> evaluated with a note, not an error
    (pred / "diagnoses.csv").unlink()
    s = evaluate(spec.root / "labelsTs", pred, spec, plots=False)
    assert "diagnosis" not in s and any("diagnoses.csv not found" in n for n in s["notes"])
    # but naming the reference explicitly makes a missing prediction CSV an error
    with pytest.raises(OrthoError, match="diagnoses.csv not found"):
        evaluate(spec.root / "labelsTs", pred, spec, diagnoses_ref=spec.root / "diagnosesTs.csv", plots=False)
