"""What a released package has: licence, changelog, one version, py.typed, import names that do not clash with other
distributions or a user's folders, console scripts that resolve, benchmarks runner, option spelling."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

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


STAGES = ("planners", "preprocessing", "training", "inference")


def _package_folder(package: str) -> Path:
    """Where the source of ``package`` lives in the repository, following ``[tool.setuptools.package-dir]``."""
    mapping = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in mapping:
            return REPO.joinpath(mapping[prefix], *parts[n:])
    return REPO.joinpath(*parts)


def test_stages_install_inside_orthonet():
    """The stage folders stay top-level in the repository but install as ``orthonet.<stage>``: a top-level
    ``inference``/``training``/... would overwrite (or be shadowed by) other distributions and user folders."""
    setup = PYPROJECT["tool"]["setuptools"]
    assert setup["package-dir"] == {f"orthonet.{s}": s for s in STAGES}
    assert all(p == "orthonet" or p.startswith("orthonet.") for p in setup["packages"])
    for stage in STAGES:
        assert (REPO / stage / "__init__.py").is_file() and not (REPO / "orthonet" / stage).exists()


def test_packages_list_every_package_folder():
    """The explicit ``packages`` list names every folder with an ``__init__.py`` (a new subpackage must be added,
    or the wheel silently lacks it)."""
    listed = PYPROJECT["tool"]["setuptools"]["packages"]
    assert len(listed) == len(set(listed))
    found = set()
    for top, root in [("orthonet", REPO / "orthonet")] + [(f"orthonet.{s}", REPO / s) for s in STAGES]:
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((top, *rel)))
    assert sorted(listed) == sorted(found)
    for package in listed:
        assert (_package_folder(package) / "__init__.py").is_file(), package


def test_every_package_ships_py_typed():
    tops = ["orthonet"] + [f"orthonet.{s}" for s in STAGES]
    for top in tops:
        assert (_package_folder(top) / "py.typed").is_file(), f"{top}: py.typed missing"
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["*"]


def _installed_distribution():
    """orthonet's distribution as pip installed it (it has a RECORD; the ``orthonet.egg-info`` a build leaves in
    the checkout, which importlib.metadata also finds from here, has none), or None."""
    import importlib.metadata as md
    for dist in md.distributions(name="orthonet"):
        if dist.read_text("RECORD") is not None:
            return dist
    return None


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_entry_points_resolve(script):
    target = SCRIPTS[script]
    module, _, func = target.partition(":")
    assert module == "orthonet" or module.startswith("orthonet."), f"{script} = {target}: not inside orthonet"
    fn = getattr(importlib.import_module(module), func)
    assert callable(fn)


def test_installed_entry_points_match_pyproject():
    dist = _installed_distribution()
    if dist is None:
        pytest.skip("orthonet is not installed (pip install -e .)")
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == SCRIPTS, "reinstall (make install): the installed console scripts are stale"


# Fake top-level packages named like the stages, as another distribution or a user's own folder would have them:
# ``planners`` and ``preprocessing`` fail when imported; ``inference`` and ``training`` import and carry a marker.
_USER_PACKAGES = {
    "inference": "USER_PACKAGE = 'inference'\n",
    "training": "USER_PACKAGE = 'training'\n",
    "planners": "raise ImportError(\"the user's planners package was imported\")\n",
    "preprocessing": "raise ImportError(\"the user's preprocessing package was imported\")\n",
}

# Run in a subprocess: import every orthonet module, then check no stage was imported under its top-level name and
# that the user's packages are still the user's.
_CLASH_CHECK = r"""
import importlib, json, pkgutil, sys
from pathlib import Path
packages = json.loads(sys.argv[1])
expect_root = Path(sys.argv[2]).resolve()
user_dir = Path(sys.argv[3]).resolve()
import orthonet
for name in packages:
    pkg = importlib.import_module(name)
    for info in pkgutil.iter_modules(pkg.__path__, name + "."):
        if not info.ispkg:
            importlib.import_module(info.name)
clashing = sorted(m for m in sys.modules if m.split(".")[0] in ("planners", "preprocessing", "training", "inference"))
assert not clashing, f"top-level stage modules imported: {clashing}"
for stage in ("planners", "preprocessing", "training", "inference"):
    ours = sys.modules["orthonet." + stage]
    assert Path(ours.__file__).resolve().is_relative_to(expect_root), (stage, ours.__file__, expect_root)
import orthonet.inference.cli, orthonet.training.cli
for stage in ("inference", "training"):
    user = importlib.import_module(stage)
    assert user.USER_PACKAGE == stage and Path(user.__file__).resolve().parent.parent == user_dir, user.__file__
    assert sys.modules["orthonet." + stage] is not user
print("OK", len(sys.modules))
"""


def _user_packages(tmp_path: Path) -> Path:
    user = tmp_path / "user_site"
    for name, body in _USER_PACKAGES.items():
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(body, encoding="utf-8")
    return user


def _run_clash_check(tmp_path: Path, pythonpath: List[Path], expect_root: Path) -> None:
    user = _user_packages(tmp_path)
    neutral = tmp_path / "cwd"
    neutral.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [user, *pythonpath])}
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    r = subprocess.run([sys.executable, "-c", _CLASH_CHECK, json.dumps(packages), str(expect_root), str(user)],
                       cwd=neutral, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


def test_user_packages_named_like_stages_do_not_clash_from_the_source_tree(tmp_path):
    """A user's ``inference``/``training`` packages first on sys.path (and ``planners``/``preprocessing`` that
    fail on import) do not shadow orthonet's stages, and importing all of orthonet leaves them the user's.
    orthonet comes from this checkout (as with ``PYTHONPATH=.`` in a clone)."""
    _run_clash_check(tmp_path, [REPO], REPO)


@pytest.mark.slow
def test_wheel_holds_the_stages_inside_orthonet_and_does_not_clash(tmp_path):
    """Build the wheel (no network: the installed setuptools builds it), check its layout and entry points, and
    import every module from it (unpacked on PYTHONPATH) next to the user's packages."""
    import zipfile
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel offline needs setuptools >= 77 in this environment")
    src = tmp_path / "src"          # a copy, so that the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for top in ("orthonet", *STAGES):
        shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("orthonet-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        assert tops == {"orthonet", f"orthonet-{wheel.name.split('-')[1]}.dist-info"}, tops
        for package in PYPROJECT["tool"]["setuptools"]["packages"]:
            folder = package.replace(".", "/")
            assert f"{folder}/__init__.py" in names, package
        for stage in STAGES:
            assert f"orthonet/{stage}/py.typed" in names
        assert "orthonet/training/trainers/base.py" in names and "orthonet/inference/cli.py" in names
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(ep).decode("utf-8")
        for script, target in SCRIPTS.items():
            assert f"{script} = {target}" in text
        site = tmp_path / "site"
        z.extractall(site)
    _run_clash_check(tmp_path, [site], site)


def test_editable_install_maps_the_stages(tmp_path):
    """The editable install's own finder (not orthonet's source-tree finder) resolves ``orthonet.<stage>``."""
    dist = _installed_distribution()
    if dist is None:
        pytest.skip("orthonet is not installed")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct.get("dir_info", {}).get("editable"):
        pytest.skip("orthonet is not installed in editable mode")
    if Path(direct["url"].removeprefix("file://")).resolve() != REPO:
        pytest.skip("the editable install is another checkout")
    code = ("import sys, orthonet; "
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, 'orthonet_stage_finder', False)]; "
            "import orthonet.training.cli, orthonet.planners.cli; "
            "print(orthonet.training.cli.__file__); print(orthonet.planners.cli.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert [Path(p) for p in r.stdout.split()] == [REPO / "training" / "cli.py", REPO / "planners" / "cli.py"]


def test_source_tree_finder_only_in_a_checkout(tmp_path):
    """The source-tree finder is registered for this checkout, and not for an installed layout or a folder
    that merely looks like one."""
    import orthonet
    assert orthonet._source_checkout(REPO / "orthonet") == REPO
    installed = tmp_path / "site" / "orthonet"
    (installed / "planners").mkdir(parents=True)
    assert orthonet._source_checkout(installed) is None
    other = tmp_path / "other"
    (other / "orthonet").mkdir(parents=True)
    for stage in STAGES:
        (other / stage).mkdir()
        (other / stage / "__init__.py").write_text("", encoding="utf-8")
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n', encoding="utf-8")
    assert orthonet._source_checkout(other / "orthonet") is None
    (other / "pyproject.toml").write_text('[project]\nname = "orthonet"\n', encoding="utf-8")
    assert orthonet._source_checkout(other / "orthonet") == other
    stage_finders = [f for f in sys.meta_path if getattr(f, "orthonet_stage_finder", False)]
    assert len(stage_finders) == 1 and stage_finders[0].repo == REPO
    assert stage_finders[0].find_spec("orthonet.tests") is None and stage_finders[0].find_spec("training") is None


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
