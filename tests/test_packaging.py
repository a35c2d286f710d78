"""What a released package has: licence, changelog, one version, py.typed, benchmarks runner, option spelling."""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS = PYPROJECT["project"]["scripts"]


# ------------------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------------------
def test_license_is_an_spdx_string_with_its_file():
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str), "use the SPDX string form; the table form is deprecated"
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert not any("license" in r.lower() and "classifier" in r.lower()
                   for r in PYPROJECT["project"].get("classifiers", [])), "no License classifier beside SPDX"
    # setuptools >= 77 understands the SPDX string and license-files
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=\s*(\d+)", req).group(1)) >= 77


def test_version_has_one_source():
    import orthonet
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "orthonet.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[.-]?(?:a|b|rc|dev|post)\d*)?", orthonet.__version__)


def test_installed_metadata_matches_the_source_version():
    import importlib.metadata as md
    import orthonet
    try:
        installed = md.version("orthonet")
    except md.PackageNotFoundError:
        pytest.skip("orthonet is not installed (pip install -e .)")
    assert installed == orthonet.__version__


def test_changelog_has_an_unreleased_section():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog")
    assert "keepachangelog.com" in text
    assert re.search(r"^## \[Unreleased\]$", text, re.M)


def test_every_package_ships_py_typed():
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = sorted({p.rstrip("*") for p in packages})
    assert tops == sorted(["orthonet", "planners", "preprocessing", "training", "inference"])
    for top in tops:
        assert (REPO / top / "py.typed").is_file(), f"{top}/py.typed missing"
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["*"]


# ------------------------------------------------------------------------------------------------------------
# benchmarks
# ------------------------------------------------------------------------------------------------------------
def _run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), *args], cwd=str(REPO),
                          capture_output=True, text=True, encoding="utf-8", timeout=120)


def _import_run_all():
    return importlib.import_module("benchmarks.run_all")


def test_run_all_lists_every_benchmark():
    benches = sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))
    assert benches, "no benchmarks found"
    for preset in ([], ["--quick"]):
        r = _run_all("--list", *preset)
        assert r.returncode == 0, r.stderr
        listed = re.findall(r"^\s+(bench_\w+):", r.stdout, re.M)
        assert listed == benches, r.stdout
    run_all = _import_run_all()
    missing = [b for b in benches if "quick" not in run_all.PRESETS.get(b, {})]
    assert missing == [], f"add a quick preset to benchmarks/run_all.py PRESETS for {missing}"


def test_run_all_only_selects_and_rejects_unknown_names():
    r = _run_all("--list", "--quick", "--only", "preprocess")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^\s+(bench_\w+):", r.stdout, re.M) == ["bench_preprocess"]
    assert "--no-write" in r.stdout
    r = _run_all("--only", "no_such_bench")
    assert r.returncode != 0 and "bench_no_such_bench" in r.stderr and "bench_preprocess" in r.stderr


def test_run_all_stops_at_the_first_failure(tmp_path, monkeypatch, capsys):
    run_all = _import_run_all()
    (tmp_path / "bench_a.py").write_text("import sys; print('a ran'); sys.exit(0)\n", encoding="utf-8")
    (tmp_path / "bench_b.py").write_text("import sys; sys.exit(3)\n", encoding="utf-8")
    (tmp_path / "bench_c.py").write_text("raise SystemExit('c must not run')\n", encoding="utf-8")
    monkeypatch.setattr(run_all, "BENCH_DIR", tmp_path)
    assert run_all.main(["--quick"]) == 3
    err = capsys.readouterr().err
    assert "bench_b FAILED (exit code 3)" in err and "not run: bench_c" in err and "--only bench_b --quick" in err


def test_makefile_benchmarks_calls_run_all():
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^benchmarks:.*\n\t.*benchmarks/run_all\.py", text, re.M)
    assert (REPO / "benchmarks" / "run_all.py").is_file()


# ------------------------------------------------------------------------------------------------------------
# option spelling of the console scripts
# ------------------------------------------------------------------------------------------------------------
class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def console_script_parser(target: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser a console script (``module:function``) parses its arguments with, without running it."""
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with monkeypatch.context() as m, pytest.raises(_Captured) as info:
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        fn(["--help"])
    return info.value.parser


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_long_options_use_hyphens(script, monkeypatch):
    """``--num-processes``, not ``--num_processes``: an underscore spelling is at most a hidden alias of a hyphen
    spelling with the same destination. One-dash nnU-Net style flags (``-np``, ``-gpu_memory_target``) are fine."""
    parser = console_script_parser(SCRIPTS[script], monkeypatch)
    assert parser.prog == script
    problems = []
    for p in _all_parsers(parser):
        for action in p._actions:
            for opt in action.option_strings:
                if not (opt.startswith("--") and "_" in opt):
                    continue
                hyphen = opt.replace("_", "-")
                alias = p._option_string_actions.get(hyphen)
                if alias is None or alias.dest != action.dest:
                    problems.append(f"{opt}: no {hyphen} with the same destination")
                elif action.help is not argparse.SUPPRESS and hyphen not in action.option_strings:
                    problems.append(f"{opt}: shown in --help; hide it (help=argparse.SUPPRESS) behind {hyphen}")
    assert problems == [], f"{script}: {problems}"


def test_verify_dataset_accepts_both_spellings(monkeypatch, capsys):
    parser = console_script_parser(SCRIPTS["ortho_verify_dataset"], monkeypatch)
    new = parser.parse_args(["-d", "101", "--num-processes", "3", "--no-progress"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["-d", "101", "--num_processes", "3", "--no_progress"])
    assert vars(old) == vars(new) == {"dataset": "101", "num_processes": 3, "no_progress": True}
    err = capsys.readouterr().err
    assert "--num_processes is deprecated, use --num-processes" in err and "--no-progress" in err
    short = parser.parse_args(["-d", "101", "-np", "2"])
    assert short.num_processes == 2 and short.no_progress is False
    help_text = parser.format_help()
    assert "--num-processes" in help_text and "--no-progress" in help_text
    assert "--num_processes" not in help_text and "--no_progress" not in help_text
