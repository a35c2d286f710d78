"""benchmarks/bench_pretrain_cpu.py: each lever really runs (own process, the planned vs the small patch,
channels_last_3d, two views in parallel processes) on a tiny generated dataset, and the report compares every row
with the planned one."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_pretrain_cpu as bpc


def test_arguments_quick_and_unknown_variants():
    args = bpc.parse_args([])
    assert args.size == "default" and args.patch == [16, 64, 64] and args.variants.split(",") == list(bpc.VARIANTS)
    quick = bpc.parse_args(["--quick"])
    assert quick.size == "tiny" and quick.steps == 2
    with pytest.raises(SystemExit):
        bpc.parse_args(["--variants", "planned,fp8"])


def test_levers_run_in_their_own_processes_and_are_reported(tmp_path, monkeypatch):
    for kind in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"ORTHO_{kind}", str(tmp_path / kind))
    args = bpc.parse_args(["--quick", "--work", str(tmp_path / "work"), "--threads", "1",
                           "--variants", "planned,patch+channels_last,patch+2 parallel views"])
    summary = bpc.measure(args)
    res = summary["results"]
    assert list(res) == ["planned", "patch+channels_last", "patch+2 parallel views"]
    assert res["patch+channels_last"]["patch_size"] == [8, 32, 32] and res["planned"]["patch_size"] != [8, 32, 32]
    for r in res.values():
        assert len(r["times"]) == 1 + 2 and r["patches_per_s"] > 0
    parallel = res["patch+2 parallel views"]
    assert parallel["processes"] == 2 and [p["view"] for p in parallel["per_process"]] == ["sagittal", "coronal"]
    assert parallel["patches_per_s"] == pytest.approx(sum(p["patches_per_s"] for p in parallel["per_process"]))
    assert json.loads((tmp_path / "work" / "results.json").read_text(encoding="utf-8"))["results"].keys() == res.keys()
    text = bpc.report(summary, "python benchmarks/bench_pretrain_cpu.py --quick")
    assert text.count("\n| ") == 1 + 3 and "1.0x" in text
