"""benchmarks/common.py's one-measurement-per-process helpers: a job file runs in its own interpreter and its
result comes back; a driver that fails or writes nothing gives one error naming the measurement and its log."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.common import driver_job, driver_result

REPO = Path(__file__).resolve().parents[1]


def _script(tmp_path, body: str):
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from benchmarks.common import write_driver_result
        job = json.loads(open(sys.argv[2]).read())
        {body}
    """), encoding="utf-8")
    return path


def test_a_job_runs_in_its_own_process_and_its_result_comes_back(tmp_path):
    script = _script(tmp_path, "write_driver_result(job, {'pid': os.getpid(), 'x': job['x'] * 2})")
    stale = tmp_path / "jobs" / "one.result.json"
    stale.parent.mkdir()
    stale.write_text('{"x": "stale"}')
    job, cmd = driver_job(script, {"x": 21}, tmp_path / "jobs" / "one.json")
    assert not stale.exists(), "an old result must not be mistaken for this run's"
    assert cmd[-2:] == ["--driver", str(tmp_path / "jobs" / "one.json")] and cmd[0] == sys.executable
    assert json.loads((tmp_path / "jobs" / "one.json").read_text())["out"] == job["out"]
    code = subprocess.call(cmd)
    result = driver_result(job, code, "doubling")
    assert result["x"] == 42 and result["pid"] > 0
    assert not list((tmp_path / "jobs").glob("*.tmp")), "the result is written atomically"


@pytest.mark.parametrize("body", ["sys.exit(3)", "pass"])
def test_a_failed_or_silent_driver_is_one_clear_error(tmp_path, body):
    job, cmd = driver_job(_script(tmp_path, body), {}, tmp_path / "j.json")
    code = subprocess.call(cmd)
    with pytest.raises(SystemExit, match=r"seg step failed \(exit code " + str(code) + r"\); see /x/log"):
        driver_result(job, code, "seg step", "/x/log")


def test_count_flops_sees_forward_and_backward_of_a_convolution():
    """A 3x3x3 convolution's forward costs 2 * Cout * Cin * 27 per output voxel; its backward the same again for
    the weight gradient and once more for the input gradient when the input needs one (3x in all)."""
    import torch

    from benchmarks.common import count_flops

    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    forward = 2 * 4 * 2 * 27 * (4 * 5 * 6)
    x = torch.randn(1, 2, 4, 5, 6)
    assert count_flops(lambda: conv(x)) == forward
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward
    assert count_flops(lambda: conv(x.requires_grad_()).sum().backward()) == 3 * forward


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756.0e12),
                                        ("NVIDIA H200", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312.0e12),
                                        ("cpu", None), (None, None)])
def test_bf16_peak_by_device_name(name, peak):
    from benchmarks.common import bf16_peak_flops
    assert bf16_peak_flops(name) == peak


def test_utilisation_is_achieved_over_peak_and_absent_without_a_peak():
    from benchmarks.common import utilisation

    gpu = utilisation(989.4e12 * 0.5, 2.0, "NVIDIA H100 80GB HBM3")       # half the peak's work, in 2 s
    assert gpu["mfu"] == pytest.approx(0.25) and gpu["tflops_per_s"] == pytest.approx(989.4 / 4)
    cpu = utilisation(2e12, 4.0, "cpu")
    assert cpu == {"tflops_per_s": pytest.approx(0.5), "mfu": None}
    assert utilisation(None, 1.0, "NVIDIA H100") == {"tflops_per_s": None, "mfu": None}


def test_throughput_flop_table_reports_mfu_on_a_known_gpu_only():
    from benchmarks.bench_throughput import flops_table

    def summary(device):
        from benchmarks.common import utilisation
        r = {"step_s": 0.5, "flops_per_step": 200e12}
        r.update(utilisation(r["flops_per_step"], r["step_s"], device))
        return {"medians": {"seg_orthonet": r}}, [{"seg_orthonet": {"device_name": device}}]

    gpu = flops_table(*summary("NVIDIA H100 80GB HBM3"))
    assert "| orthonet `SegTrainer` step | 200000.0 | 400.000 | **40.4 %** |" in gpu
    cpu = flops_table(*summary("cpu"))
    assert "n/a (no bf16 peak known" in cpu and "device `cpu`" in cpu
    assert flops_table({"medians": {"seg_orthonet": {"step_s": 1.0}}}, [{"seg_orthonet": {}}]) == ""
