"""`make demo` runs every orthonet command in order; a miniature run keeps that contract tested."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthonet import demo


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path: Path, monkeypatch, capsys):
    for kind in ("raw", "preprocessed", "results"):      # the demo sets these itself; restore them afterwards
        monkeypatch.setenv(f"ORTHO_{kind}", str(tmp_path / "unused" / kind))
    out = tmp_path / "demo"
    code = demo.main(["-o", str(out), "--train", "6", "--test", "2", "--unlabeled", "2", "--pretrain-steps", "3",
                      "--epochs", "1", "--iterations-per-epoch", "2", "--base-features", "8", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "results on the held-out synthetic test exams" in printed and "macro mean" in printed
    pred = out / "predictions"
    assert len(list(pred.glob("*_sagittal.nii.gz"))) == 2
    summary = json.loads((pred / "summary.json").read_text(encoding="utf-8"))
    assert set(summary) >= {"segmentation", "diagnosis"}
    assert (out / "case.png").stat().st_size > 0 and (pred / "report.html").is_file()
    # the two-row claim: same trainer at 10 % labels, scratch vs pretrained, with the noise verdict
    assert "scratch vs diffusion-pretrained" in printed and "paired bootstrap" in printed
    comparison = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert set(comparison["runs"]) == {"scratch", "pretrained"} and "dice" in comparison["runs"]["pretrained"]
    assert "within_noise" in comparison["dice_difference"]
    models = sorted(p.name for p in (out / "results" / "Dataset101_Knee").iterdir() if "lf0.1" in p.name)
    assert models == ["MultitaskTrainerPyramid__orthoPlans__3d_fullres__lf0.1",
                      "MultitaskTrainerPyramid__orthoPlans__3d_fullres__lf0.1__scratch"]
    plans = json.loads((out / "preprocessed" / "Dataset101_Knee" / "orthoPlans.json").read_text(encoding="utf-8"))
    net = plans["views"]["sagittal"]["configurations"]["3d_fullres"]["network"]["kwargs"]
    assert net["features_per_stage"][0] == 8                       # --base-features reached the planner
