"""benchmarks/bench_transfer.py: the logic of its own (argument and view-map parsing, the all-views check, paired
differences, the verdict and the report table); the end-to-end path is its ``--quick`` run (run_all)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import bench_transfer as bt


def test_joint_view_maps_become_each_joints_view_map_arguments():
    out = bt.parse_joint_view_maps(["shoulder:sagittal=coronal", "Shoulder: axial=axial"], ["ankle", "shoulder"])
    assert out == {"ankle": [], "shoulder": ["sagittal=coronal", "axial=axial"]}
    for bad in ("sagittal=coronal", "shoulder:sagittal", "shoulder:=coronal", "shoulder:sagittal="):
        with pytest.raises(SystemExit, match="JOINT:TARGET=SOURCE"):
            bt.parse_joint_view_maps([bad], ["shoulder"])
    with pytest.raises(SystemExit, match="not in --joints"):
        bt.parse_joint_view_maps(["knee:sagittal=sagittal"], ["ankle", "shoulder"])


def test_arguments_defaults_quick_and_unknown_joints():
    args = bt.parse_args([])
    assert (args.n_train, args.n_unlabeled, args.size, args.folds, args.fraction) == (80, 20, "default", 5, 0.1)
    assert args.joint_list == ["ankle", "shoulder"] and args.knee_work == bt.KNEE_WORK
    quick = bt.parse_args(["--quick", "--work", "/tmp/x", "--joints", "shoulder"])
    assert quick.no_write and quick.size == "tiny" and quick.joint_list == ["shoulder"] and quick.threads == 1
    assert args.threads == 2
    assert quick.knee_work == str(Path("/tmp/x") / "knee_source")   # never a tiny knee in the real knee folder
    with pytest.raises(SystemExit):
        bt.parse_args(["--joints", "ankle,hip"])


def test_a_source_missing_a_view_stops_the_benchmark():
    views = ["sagittal", "coronal", "axial"]
    bt.check_complete(SimpleNamespace(files={v: Path(f"/x/{v}/encoder.pt") for v in views}), views, "knee")
    with pytest.raises(SystemExit, match=r"\['axial'\]"):
        bt.check_complete(SimpleNamespace(files={"sagittal": Path("a"), "coronal": Path("b")}), views, "knee")
    with pytest.raises(SystemExit, match="no pretrained encoder"):
        bt.check_complete(None, views, "knee")


def test_same_files_compares_the_file_of_every_view(tmp_path):
    a = SimpleNamespace(files={"sagittal": tmp_path / "s.pt", "axial": tmp_path / "a.pt"})
    assert bt.same_files(a, SimpleNamespace(files=dict(a.files)))
    assert not bt.same_files(a, SimpleNamespace(files={"sagittal": tmp_path / "s.pt"}))
    assert not bt.same_files(SimpleNamespace(files={}), SimpleNamespace(files={}))


def _row(macro, n=2):
    return {"labels": "10%", "encoders": "x", "macro_auc": macro, "macro_auc_ci": [macro - .1, macro + .1],
            "macro_ap": .5, "macro_ap_ci": [.4, .6], "auc": [macro] * n, "auc_ci": [[macro - .1, macro + .1]] * n}


def test_paired_difference_and_verdict_per_joint_and_for_both():
    rows = {"low_knee": _row(0.70), "low_scratch": _row(0.62)}
    boots = {"low_knee": [0.7, 0.72, 0.68], "low_scratch": [0.6, 0.64, 0.62]}
    d = bt.paired(boots, rows, "low_knee", "low_scratch")
    assert d["mean"] == pytest.approx(0.08) and d["ci"][0] <= d["ci"][1]
    assert bt.paired(boots, rows, "low_own", "low_scratch") is None
    ankle = {"rows": rows, "differences": {"low_knee_minus_scratch": d}}
    shoulder = {"rows": {"low_knee": _row(0.60), "low_scratch": _row(0.58)},
                "differences": {"low_knee_minus_scratch": {"mean": 0.02, "ci": [-0.05, 0.09]}}}
    lines = bt.verdict({"ankle": ankle, "shoulder": shoulder}, 0.1)
    assert "ankle" in lines[0] and lines[0].endswith("— met.")
    assert "shoulder" in lines[1] and lines[1].endswith("— not met.")
    assert lines[2] == "- Target on both joints: not met."
    assert bt.verdict({"ankle": ankle}, 0.1) == lines[:1]
    assert bt.verdict({"ankle": {"rows": {}, "differences": {}}}, 0.1)[0].endswith("not measured.")


def test_joint_table_orders_rows_and_shows_per_condition_intervals():
    res = {"conditions": ["a", "b"], "rows": {k: _row(0.6 + 0.01 * i) for i, k in enumerate(
        ["low_scratch", "100_knee", "low_knee", "100_scratch"])}}
    lines = bt.joint_table(res)
    assert lines[0].endswith("| a | b |") and len(lines) == 2 + 4
    assert [ln.split("|")[3].strip()[:5] for ln in lines[2:]] == ["0.610", "0.630", "0.620", "0.600"]
    assert "0.51 [0.41, 0.61]" not in lines[2] and "0.61 [0.51, 0.71]" in lines[2]
    assert bt.fmt_ci(float("nan"), [0, 1]) == "n/a"
    assert np.isfinite(bt.TARGET_GAIN)


def test_markdown_has_a_table_per_joint_the_dice_note_and_the_verdict():
    rows = {f"{t}_{e}": {**_row(0.6), "labels": "100 %" if t == "100" else "10%", "encoders": bt.ENCODER_LABEL[e]}
            for t in ("100", "low") for e in ("knee", "scratch")}
    joint = {"dataset": "Dataset993_AnkleTransfer", "n_train": 80, "conditions": ["a", "b"], "low_label_exams": 5,
             "views": {"sagittal": {"source_view": "sagittal", "why": "headers", "knee_patch": [16, 64, 64],
                                    "target_patch": [16, 64, 48]}},
             "shapes": {"sagittal": [30, 250, 250]}, "auto_check": None, "own_pretraining": {}, "rows": rows,
             "differences": {"low_knee_minus_scratch": {"mean": 0.0, "ci": [-0.1, 0.1]}}, "segmentation": None}
    results = {"date": "d", "machine": "m", "wall_min": 1.0, "n_train": 80, "n_unlabeled": 20, "size": "default",
               "feature_t": 100, "levels": "-2,-1", "pooling": "mil", "head_steps": 100, "head_batch": 8, "folds": 5,
               "bootstrap": 10, "fraction": 0.1, "subsets": 2, "joints": {"ankle": joint},
               "knee": {"dataset": "Dataset992_KneeWholeExam", "n_exams": 160, "size": "default", "plan_args": "p",
                        "pretraining": {"patch": "16,64,64", "steps": 400,
                                        "per_view": {"sagittal": {"steps": 400, "patches_per_s": 3.0}}}}}
    results["verdict"] = bt.verdict(results["joints"], 0.1)
    text = bt.markdown(results, "python benchmarks/bench_transfer.py")
    assert "### Ankle" in text and "| 10% | knee-transfer |" in text and "**not measured**" in text
    assert "(4 runs)" in text and "400 steps" in text and text.rstrip().endswith("— not met.")


def test_dice_intervals_resample_cases_and_pair_the_rows_of_one_fraction():
    cases = [f"c{i}" for i in range(12)]
    rng = np.random.default_rng(3)
    scratch = {c: float(v) for c, v in zip(cases, rng.uniform(0.2, 0.6, len(cases)))}
    knee = {c: v + 0.1 for c, v in scratch.items()}                 # the same cases, exactly 0.1 better
    res = bt.dice_intervals({"low_knee": knee, "low_scratch": scratch, "100_scratch": scratch}, n_boot=200)
    assert res["rows"]["low_knee"]["mean_dice"] == pytest.approx(np.mean(list(knee.values())))
    lo, hi = res["rows"]["low_scratch"]["ci"]
    assert lo < res["rows"]["low_scratch"]["mean_dice"] < hi and hi - lo > 0.02     # cases vary: a real interval
    d = res["differences"]["low_knee_minus_scratch"]
    assert d["mean"] == pytest.approx(0.1) and d["ci"] == pytest.approx([0.1, 0.1])  # paired: no spread
    assert "100_knee_minus_scratch" not in res["differences"] and "low_own_minus_scratch" not in res["differences"]
    with pytest.raises(SystemExit, match="different cases"):
        bt.dice_intervals({"low_knee": knee, "low_scratch": dict(list(scratch.items())[:-1])}, n_boot=10)


def test_case_mean_dice_averages_structures_per_case_and_names_a_summary_without_cases():
    summary = {"segmentation": {"per_case": {"a": {"x": 0.2, "y": 0.4}, "b": {"x": 1.0, "y": float("nan")}}}}
    assert bt.case_mean_dice(summary) == pytest.approx({"a": 0.3, "b": 1.0})
    with pytest.raises(SystemExit, match="run9/summary.json: no per-case Dice"):
        bt.case_mean_dice({"segmentation": {"mean_dice": 0.5}}, "run9/summary.json")


def test_dice_table_shows_intervals_and_paired_differences():
    runs = {k: {"labels": "100 %" if k.startswith("100") else "10%", "labelled": 64 if k.startswith("100") else 6,
                "encoders": bt.ENCODER_LABEL[k.split("_")[1]], "mean_dice": 0.5, "minutes": 80.0}
            for k in ("100_knee", "100_scratch", "low_knee", "low_scratch")}
    seg = {"trainer": "SegTrainerPyramid", "iterations": 300, "runs": runs,
           **bt.dice_intervals({k: {"a": 0.4, "b": 0.6} for k in runs}, n_boot=20)}
    text = "\n".join(bt.dice_table({"ankle": seg}, 20))
    assert "| ankle | 10% (6 exams) | knee-transfer | 300 | 0.500 [0.400, 0.600] | 80.0 |" in text
    assert "Paired mean-Dice differences, ankle, 10% labels: knee-transfer minus scratch +0.000" not in text
    assert "Paired mean-Dice differences, ankle, 10% labels: knee-transfer minus scratch 0.000 [0.000, 0.000]" in text
    assert "ankle, 100 % labels" in text


def test_seg_only_needs_seg_iterations():
    with pytest.raises(SystemExit):
        bt.parse_args(["--seg-only"])
    assert bt.parse_args(["--seg-only", "--seg-iterations", "300"]).seg_only


def test_seg_fractions_and_encoders_select_the_dice_rows():
    args = bt.parse_args(["--seg-only", "--seg-iterations", "3"])
    assert args.seg_fraction_list == [1.0, 0.1] and args.seg_encoder_list == list(bt.ENCODERS)
    args = bt.parse_args(["--seg-fractions", "0.1", "--seg-encoders", "Scratch, knee"])
    assert args.seg_fraction_list == [0.1] and args.seg_encoder_list == ["scratch", "knee"]
    for bad in (["--seg-fractions", "0.1,0.2"], ["--seg-fractions", "ten"], ["--seg-fractions", "0"],
                ["--seg-fractions", "1.5"], ["--seg-encoders", "hip"], ["--seg-encoders", ","]):
        with pytest.raises(SystemExit):
            bt.parse_args(bad)


def test_seg_source_view_follows_the_plans_view_map():
    plans = {"dataset_name": "D", "segmentation_view": "sagittal",
             "transferred_from": {"views": {"sagittal": "coronal", "axial": "axial"}}}
    assert bt.seg_source_view(plans) == "coronal"
    assert bt.seg_source_view({"dataset_name": "D", "segmentation_view": "axial"}) == "axial"
    with pytest.raises(SystemExit, match="segmentation_view"):
        bt.seg_source_view({"dataset_name": "D"})


def test_pretrain_knee_views_pretrains_only_the_requested_views_without_an_encoder(tmp_path, monkeypatch):
    from orthonet.training.pretrained import pretrain_view_dir
    monkeypatch.setenv("ORTHO_results", str(tmp_path / "results"))
    plans = {"dataset_name": "Dataset992_Knee", "plans_name": "orthoPlans",
             "views": {"sagittal": {"s": 1}, "coronal": {"c": 1}, "axial": {"a": 1}}}
    done = pretrain_view_dir("Dataset992_Knee", "orthoPlans", bt.CONFIG, "sagittal")
    done.mkdir(parents=True)
    (done / "encoder.pt").write_bytes(b"x")
    calls = []
    monkeypatch.setattr(bt.wx, "pretrain", lambda ns, pre, p: calls.append((ns.work, sorted(p["views"]))))
    args = bt.parse_args(["--knee-work", str(tmp_path / "knee")])
    bt.pretrain_knee_views(args, tmp_path / "pre", plans, ["sagittal"])
    assert calls == []                                   # the segmentation view's encoder exists: nothing to do
    bt.pretrain_knee_views(args, tmp_path / "pre", plans, ["sagittal", "coronal"])
    assert calls == [(str(tmp_path / "knee"), ["coronal"])]


def _finished_seg_run(folder: Path, start: str, dice: dict) -> None:
    import json
    (folder / "fold_0" / "validation").mkdir(parents=True)
    per_case = {c: {"femur": d, "tibia": d} for c, d in dice.items()}
    (folder / "fold_0" / "validation" / "summary.json").write_text(json.dumps(
        {"segmentation": {"mean_dice": float(np.mean(list(dice.values()))), "per_case": per_case},
         "cases": list(dice)}))
    (folder / "fold_0" / "run_config.json").write_text(json.dumps(
        {"pretrained_report": {"start": start}, "labelled_training_cases": ["a", "b"], "seed": 12345}))


def test_seg_rows_read_finished_runs_of_the_selected_rows_without_training(tmp_path, monkeypatch):
    import orthonet.training.cli as train_cli

    def no_training(argv):
        raise AssertionError(f"trained although the run was finished: {argv}")

    monkeypatch.setattr(train_cli, "train_main", no_training)
    dice = {"knee": {"c1": 0.2, "c2": 0.4, "c3": 0.3}, "scratch": {"c1": 0.1, "c2": 0.2, "c3": 0.3}}
    for enc, start in (("knee", "pretrained"), ("scratch", "scratch")):
        _finished_seg_run(tmp_path / "seg" / "shoulder" / f"low_{enc}", start, dice[enc])
    args = bt.parse_args(["--work", str(tmp_path), "--seg-only", "--seg-iterations", "300", "--seg-fractions", "0.1",
                          "--seg-encoders", "knee,scratch", "--bootstrap", "200"])
    out = bt.seg_rows(args, "shoulder", {"dataset_name": "D", "plans_name": "orthoPlans"}, "/knee", bt.ENCODERS)
    assert sorted(out["runs"]) == ["low_knee", "low_scratch"] and out["iterations"] == 300
    assert out["runs"]["low_knee"]["mean_dice"] == pytest.approx(0.3) and out["runs"]["low_knee"]["seed"] == 12345
    assert out["differences"]["low_knee_minus_scratch"]["mean"] == pytest.approx(0.1)
    assert out["runs"]["low_knee"]["minutes"] is None            # read, not trained: no time to report
    assert "| read |" in "\n".join(bt.dice_table({"shoulder": out}, 200))
    only = bt.parse_args(["--work", str(tmp_path), "--seg-only", "--seg-iterations", "300", "--seg-fractions", "0.1",
                          "--seg-encoders", "scratch", "--bootstrap", "200"])
    assert sorted(bt.seg_rows(only, "shoulder", {"dataset_name": "D", "plans_name": "orthoPlans"}, "/knee",
                              bt.ENCODERS)["runs"]) == ["low_scratch"]
    # a knee row whose run started from scratch is refused, never reported as transfer
    (tmp_path / "seg" / "shoulder" / "low_knee" / "fold_0" / "run_config.json").write_text(
        '{"pretrained_report": {"start": "scratch"}}')
    with pytest.raises(SystemExit, match="did not start from pretrained"):
        bt.seg_rows(args, "shoulder", {"dataset_name": "D", "plans_name": "orthoPlans"}, "/knee", bt.ENCODERS)
