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
