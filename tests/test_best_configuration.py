"""ortho_find_best_configuration: cross-validation pooled from the folds' validation, Youden thresholds on the
out-of-fold predictions (checked against an independent computation), the best model per task, the instructions
file, the printed command, and ortho_predict using all of it."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from orthonet.errors import OrthoError
from tests.predict_helpers import copy_case, multiview_models, ortho_env

DIAGNOSES = ["lesion_a", "lesion_b"]


def youden_reference(y, p) -> float:
    """Independent Youden's J: every observed score as a candidate threshold for ``p >= t``; the highest of the
    best; 0.5 when one class is missing."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[keep] > 0.5, p[keep]
    if y.all() or (~y).all():
        return 0.5
    best, best_j = None, -2.0
    for t in sorted(set(p.tolist())):
        pred = p >= t
        j = (pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum() - 1
        if j >= best_j - 1e-12:
            best, best_j = t, max(j, best_j)
    return float(best)


def _read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _labels(raw: Path):
    return {r["case_id"]: [float(r[d]) if r[d] != "" else np.nan for d in DIAGNOSES]
            for r in _read_csv(raw / "diagnoses.csv")}


# ------------------------------------------------------------------------------------------------------------
# on really trained folds
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    info = multiview_models(tmp_path_factory)
    with ortho_env(info["root"]):
        yield info


def test_find_best_configuration_on_two_trained_folds(models, tmp_path, capsys):
    from orthonet.inference.best_configuration import find_best_configuration_cli
    from orthonet.inference.cli import predict_cli
    results = Path(models["root"]) / "res" / models["dataset"]
    instructions_file = results / "inference_instructions.json"
    try:
        assert find_best_configuration_cli(["-d", str(models["id"]), "-f", "0", "1"]) == 0
        printed = capsys.readouterr().out
        instr = json.loads(instructions_file.read_text(encoding="utf-8"))
        # independent out-of-fold table: the folds' validation CSVs and the raw labels
        oof = {}
        for fold in (0, 1):
            for row in _read_csv(models["model_dir"] / f"fold_{fold}" / "validation" / "diagnoses.csv"):
                oof[row["case_id"]] = [float(row[f"{d}_prob"]) for d in DIAGNOSES]
        labels = _labels(models["raw"])
        cases = sorted(oof)
        assert len(cases) >= 2 and set(cases) <= set(labels)
        expected = {d: youden_reference([labels[c][i] for c in cases], [oof[c][i] for c in cases])
                    for i, d in enumerate(DIAGNOSES)}
        assert instr["thresholds"] == pytest.approx(expected, abs=1e-12)
        assert instr["models"] == [{"folder": "MultitaskTrainer__orthoPlans__3d_fullres", "folds": ["0", "1"],
                                    "task": "multitask", "roles": ["seg", "diag"],
                                    "cv_metrics": instr["models"][0]["cv_metrics"]}]
        cand = instr["candidates"][0]
        assert cand["num_diagnosis_cases"] == len(cases) and cand["num_segmentation_cases"] == len(cases)
        command = f"ortho_predict -d {models['dataset']} -i INPUT_FOLDER -o OUTPUT_FOLDER"
        assert command in printed and str(instructions_file) in printed
        assert (f"{command} -c 3d_fullres -tr MultitaskTrainer -p orthoPlans -f 0 1") in printed

        # ortho_predict without a model named uses the instructions: their folds and thresholds
        inp = tmp_path / "in"
        copy_case(models["raw"], "test000", inp)
        out = tmp_path / "out"
        assert predict_cli(["-i", str(inp), "-o", str(out), "-d", str(models["id"]), "--disable-tta",
                            "--no-progress", "--no-overview"]) == 0
        info = json.loads((out / "prediction_info.json").read_text(encoding="utf-8"))
        assert info["selection"]["source"] == "instructions"
        assert info["selection"]["models"][0]["folds"] == ["0", "1"]
        table = json.loads((out / "diagnoses.json").read_text(encoding="utf-8"))
        assert table["thresholds"] == pytest.approx(expected, abs=1e-12)
        for d in DIAGNOSES:
            entry = table["cases"]["test000"][d]
            assert entry["positive"] == int(entry["probability"] >= expected[d])
    finally:
        instructions_file.unlink(missing_ok=True)      # the other test modules predict without instructions


# ------------------------------------------------------------------------------------------------------------
# choosing among candidates (hand-made validation results, no training needed)
# ------------------------------------------------------------------------------------------------------------
LABELS = {f"c{i}": [i % 2, (i // 2) % 2] for i in range(8)}
FOLDS = {"0": ["c0", "c1", "c2", "c3"], "1": ["c4", "c5", "c6", "c7"]}


def _write_model(results: Path, name: str, task: str, dice: float = None, probs=None, folds=("0", "1")):
    for fold in folds:
        fdir = results / name / f"fold_{fold}"
        (fdir / "validation").mkdir(parents=True)
        (fdir / "checkpoint_final.pt").write_bytes(b"")       # selection only checks that it exists
        (fdir / "run_config.json").write_text(json.dumps({"model_config": {"task": task}}))
        summary = {"fold": fold, "cases": FOLDS[fold]}
        if dice is not None:
            summary["segmentation"] = {"per_case": {c: {"bone": dice, "cartilage": dice - 0.1} for c in FOLDS[fold]}}
        if probs is not None:
            summary["diagnosis"] = {"macro_auc": None}
            lines = ["case_id,lesion_a_prob,lesion_a,lesion_b_prob,lesion_b"]
            lines += [f"{c},{probs[c][0]:.6f},{int(probs[c][0] >= .5)},{probs[c][1]:.6f},{int(probs[c][1] >= .5)}"
                      for c in FOLDS[fold]]
            (fdir / "validation" / "diagnoses.csv").write_text("\n".join(lines) + "\n")
        (fdir / "validation" / "summary.json").write_text(json.dumps(summary))
    (results / name / "dataset.json").write_text((results.parent.parent / "raw" / results.name /
                                                  "dataset.json").read_text(encoding="utf-8"))


@pytest.fixture()
def fake_results(tmp_path):
    with ortho_env(tmp_path):
        raw = tmp_path / "raw" / "Dataset972_Fake"
        raw.mkdir(parents=True)
        (raw / "dataset.json").write_text(json.dumps({
            "name": "Fake", "views": ["sagittal"], "segmentation_view": "sagittal",
            "channel_names": {"0": "MR"}, "labels": {"background": 0, "bone": 1, "cartilage": 2},
            "diagnoses": DIAGNOSES, "file_ending": ".nii.gz", "numTraining": 8}))
        (raw / "diagnoses.csv").write_text("case_id,lesion_a,lesion_b\n" + "".join(
            f"{c},{a},{b}\n" for c, (a, b) in LABELS.items()))
        results = tmp_path / "res" / "Dataset972_Fake"
        rng = np.random.default_rng(0)
        good = {c: [0.2 + 0.5 * a + 0.05 * rng.random(), 0.3 + 0.3 * b + 0.05 * rng.random()]
                for c, (a, b) in LABELS.items()}                          # AUC 1.0
        noisy = {c: [float(rng.random()), float(rng.random())] for c in LABELS}
        _write_model(results, "SegTrainer__orthoPlans__3d_fullres", "seg", dice=0.9)
        _write_model(results, "DiagTrainer__orthoPlans__3d_fullres", "diag", probs=good)
        _write_model(results, "MultitaskTrainer__orthoPlans__3d_fullres", "multitask", dice=0.8, probs=noisy)
        _write_model(results, "DiagTrainer__orthoPlans__3d_fullres__lf0.1", "diag", probs=good)
        _write_model(results, "SegTrainer__orthoPlans__2d", "seg", dice=0.95, folds=("0",))   # fold 1 missing
        yield {"results": results, "good": good, "noisy": noisy}


def test_best_model_per_task_and_thresholds_from_the_diagnosis_model(fake_results, capsys):
    from orthonet.inference.best_configuration import find_best_configuration_cli
    from orthonet.inference.model_selection import resolve_models
    assert find_best_configuration_cli(["-d", "972", "-f", "0", "1"]) == 0
    printed = capsys.readouterr().out
    instr = json.loads((fake_results["results"] / "inference_instructions.json").read_text(encoding="utf-8"))
    assert [(m["folder"], m["roles"]) for m in instr["models"]] == [
        ("SegTrainer__orthoPlans__3d_fullres", ["seg"]), ("DiagTrainer__orthoPlans__3d_fullres", ["diag"])]
    good = fake_results["good"]
    cases = sorted(LABELS)
    expected = {d: youden_reference([LABELS[c][i] for c in cases], [round(good[c][i], 6) for c in cases])
                for i, d in enumerate(DIAGNOSES)}
    assert instr["thresholds"] == pytest.approx(expected, abs=1e-12)
    metrics = {c["folder"]: c["metrics"] for c in instr["candidates"]}
    assert set(metrics) == {"SegTrainer__orthoPlans__3d_fullres", "DiagTrainer__orthoPlans__3d_fullres",
                            "MultitaskTrainer__orthoPlans__3d_fullres"}        # lf runs and incomplete ones out
    assert metrics["SegTrainer__orthoPlans__3d_fullres"]["mean_dice"] == pytest.approx(0.85)
    assert metrics["DiagTrainer__orthoPlans__3d_fullres"]["macro_auc"] == pytest.approx(1.0)
    assert any("SegTrainer__orthoPlans__2d" in s and "fold(s) 1" in s for s in instr["skipped"])
    assert "explicit" not in instr["predict_command"] and instr["predict_command"]["default"] in printed

    # ortho_predict's model choice: the instructions (two models with their roles) ...
    sel = resolve_models(972)
    assert sel.source == "instructions" and sel.thresholds == pytest.approx(expected)
    assert [(m.name, m.roles, m.folds) for m in sel.models] == [
        ("SegTrainer__orthoPlans__3d_fullres", ("seg",), ["0", "1"]),
        ("DiagTrainer__orthoPlans__3d_fullres", ("diag",), ["0", "1"])]
    # ... an explicitly named diagnosis model keeps its cross-validated thresholds, another one decides at 0.5
    assert resolve_models(972, trainer="DiagTrainer").thresholds == pytest.approx(expected)
    other = resolve_models(972, trainer="MultitaskTrainer", folds=[0])
    assert other.thresholds == {} and any("0.5" in n for n in other.notes) and other.models[0].folds == ["0"]


def test_missing_folds_are_a_clear_error(fake_results, capsys):
    from orthonet.inference.best_configuration import find_best_configuration_cli
    assert find_best_configuration_cli(["-d", "972"]) == 2          # default folds 0-4: none has 2, 3, 4
    err = capsys.readouterr().err
    assert "no trained model of Dataset972_Fake has a validation of fold(s) 0, 1, 2, 3, 4" in err
    assert "SegTrainer__orthoPlans__3d_fullres (folds 0, 1)" in err and "fix:" in err
    assert find_best_configuration_cli(["-d", "972", "-f", "all"]) == 2


def test_prediction_finds_the_only_trained_variant_and_lists_several(fake_results):
    """``ortho_train ... --pretrained none`` writes ``...__scratch``; ``ortho_predict -d D -f 0`` must find it when
    it is the only trained model of that trainer/plans/configuration, and list the candidates when several are."""
    from orthonet.inference.model_selection import resolve_models
    results = fake_results["results"]
    _write_model(results, "SegTrainer__orthoPlans__3d_lowres__scratch", "seg", dice=0.7)
    sel = resolve_models(972, configuration="3d_lowres", trainer="SegTrainer", folds=[0])
    assert [m.name for m in sel.models] == ["SegTrainer__orthoPlans__3d_lowres__scratch"]
    assert any("using SegTrainer__orthoPlans__3d_lowres__scratch" in n for n in sel.notes)
    _write_model(results, "SegTrainer__orthoPlans__3d_lowres__lf0.1", "seg", dice=0.6)
    with pytest.raises(OrthoError) as err:
        resolve_models(972, configuration="3d_lowres", trainer="SegTrainer", folds=[0])
    assert "__scratch" in str(err.value) and "__lf0.1" in str(err.value)
    # the exact folder still wins over its variants
    assert resolve_models(972, trainer="DiagTrainer", folds=[0]).models[0].name == "DiagTrainer__orthoPlans__3d_fullres"


def test_prediction_finds_the_default_trainer_ortho_train_chose(fake_results):
    """Without -tr, ``ortho_train`` trains the pyramid variant when pretrained encoders load: ``ortho_predict``
    without -tr finds whichever of the two defaults was trained, and asks when both were."""
    from orthonet.inference.model_selection import resolve_models
    results = fake_results["results"]
    _write_model(results, "MultitaskTrainerPyramid__orthoPlans__3d_lowres", "multitask", dice=0.7)
    sel = resolve_models(972, configuration="3d_lowres", folds=[0])
    assert [m.name for m in sel.models] == ["MultitaskTrainerPyramid__orthoPlans__3d_lowres"]
    assert resolve_models(972, configuration="3d_fullres").models[0].name == "MultitaskTrainer__orthoPlans__3d_fullres"
    _write_model(results, "MultitaskTrainer__orthoPlans__3d_lowres", "multitask", dice=0.6)
    with pytest.raises(OrthoError) as err:
        resolve_models(972, configuration="3d_lowres", folds=[0])
    assert "MultitaskTrainerPyramid__orthoPlans__3d_lowres" in str(err.value) and "-tr" in str(err.value)
    assert resolve_models(972, configuration="3d_lowres", trainer="MultitaskTrainer").models[0].name == \
        "MultitaskTrainer__orthoPlans__3d_lowres"
