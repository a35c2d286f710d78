"""orthonet: self-configuring, diffusion-pretrained segmentation and diagnosis for multi-view MSK MRI.

The pipeline stages are the subpackages ``orthonet.planners``, ``orthonet.preprocessing``, ``orthonet.training`` and
``orthonet.inference``. In the repository they are the top-level folders ``planners/``, ``preprocessing/``,
``training/`` and ``inference/`` (the design card); ``pyproject.toml`` maps them into this package
(``[tool.setuptools.package-dir]``), so a wheel holds ``orthonet/planners/...`` and nothing installs a top-level
``inference`` or ``training`` that would clash with other distributions or with a user's own folders.

Running from a source checkout without installing it (``PYTHONPATH=. python benchmarks/x.py``, or a second clone
that shares a virtual environment where another checkout is installed in editable mode) has no such mapping:
``orthonet/planners`` does not exist there. :func:`_install_stage_finder` then registers a meta path finder that
resolves exactly the four names ``orthonet.<stage>`` to ``<checkout>/<stage>/``; their submodules are found the
usual way, through the package's ``__path__``. Why this and not the alternatives:

* appending the checkout to ``orthonet.__path__`` would also make ``orthonet.tests``, ``orthonet.benchmarks``,
  ``orthonet.docs`` (a namespace package) and even ``orthonet.orthonet`` importable: a finder names only the four;
* relying on the editable install's finder imports the *installed* checkout's stages together with this
  checkout's ``orthonet`` when the two differ (a second clone), silently mixing two versions;
* symlinks ``orthonet/planners -> ../planners`` are not portable (Windows, some archive tools) and would give the
  wheel builder two paths to each file.

The finder is registered only when all of these hold, so an installed orthonet (wheel: the stages are inside the
package folder) never uses it: ``orthonet/<stage>`` does not exist, the parent folder has ``<stage>/__init__.py``
for all four stages, and its ``pyproject.toml`` declares ``name = "orthonet"``. It goes first on
``sys.meta_path`` so it wins over an editable install's finder that points at another checkout.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path
from typing import Dict, Optional

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (dynamic)

#: The stage folders that install as ``orthonet.<stage>``.
STAGES = ("planners", "preprocessing", "training", "inference")


def _source_checkout(package_dir: Path) -> Optional[Path]:
    """The repository folder when ``package_dir`` is the ``orthonet/`` folder of an orthonet source checkout whose
    stages live beside it; None for an installed package (or anything else)."""
    if any((package_dir / stage).exists() for stage in STAGES):
        return None  # installed layout: the stages are inside the package
    repo = package_dir.parent
    if not all((repo / stage / "__init__.py").is_file() for stage in STAGES):
        return None
    try:
        text = (repo / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project is None or not re.search(r"""^name\s*=\s*["']orthonet["']\s*(#.*)?$""", project.group(1), re.M):
        return None
    return repo


class _StageFinder(importlib.abc.MetaPathFinder):
    """Finds ``orthonet.<stage>`` in ``<checkout>/<stage>/`` (and nothing else)."""

    orthonet_stage_finder = True  # how a re-import of this module recognises (and replaces) an older instance

    def __init__(self, repo: Path):
        self.repo = repo
        self.dirs: Dict[str, Path] = {f"{__name__}.{stage}": repo / stage for stage in STAGES}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])

    def __repr__(self) -> str:
        return f"<orthonet stage finder for {self.repo}>"


def _install_stage_finder() -> Optional[_StageFinder]:
    repo = _source_checkout(Path(__file__).resolve().parent)
    if repo is None:
        return None
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "orthonet_stage_finder", False)]
    finder = _StageFinder(repo)
    sys.meta_path.insert(0, finder)
    return finder


_install_stage_finder()
