"""Atomic file writes and JSON I/O with clear errors.

Why atomic: a killed run must never leave a half-written plans.json, checkpoint or prediction behind. Everything
is written to a temporary file in the target folder and renamed into place (``os.replace`` is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

from orthonet.errors import OrthoError

PathLike = Union[str, Path]


def _default_mode() -> int:
    """Permissions a plain ``open(path, 'w')`` would give (mkstemp makes owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_mode()   # read once: os.umask is process-global, so never touch it while threads run


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only if the block succeeds.

    ``suffix`` lets writers that infer the format from the name (SimpleITK, numpy) see the right extension.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_json(obj: Any, path: PathLike, indent: int = 2, sort_keys: bool = False) -> None:
    """Write JSON atomically (numpy scalars and arrays are converted)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=_json_default)
            f.write("\n")


def load_json(path: PathLike, what: str = "JSON file") -> Any:
    """Read JSON; a missing or malformed file raises :class:`OrthoError` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError(f"{what} not found", path, fix=f"create {path.name} or check the path")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise OrthoError(f"{what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path,
                         fix="repair the JSON syntax (a JSON validator shows the exact spot)") from None
    except UnicodeDecodeError:
        raise OrthoError(f"{what} is not UTF-8 text", path, fix="save the file as UTF-8 JSON") from None


def save_text(text: str, path: PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# readable JSON (added for plans/fingerprint/properties files: short numeric lists stay on one line)
# ------------------------------------------------------------------------------------------------------------
def _is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str, np.generic))


def _readable(x: Any, level: int, indent: int) -> str:
    if isinstance(x, np.ndarray):
        x = x.tolist()
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(x, dict):
        if not x:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_readable(v, level + 1, indent)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, (list, tuple)):
        if not x:
            return "[]"
        if len(x) > 64:  # long data (e.g. sampled coordinates): compact, one line
            return json.dumps(x, separators=(",", ":"), default=_json_default)
        if all(_is_scalar(v) for v in x):
            return json.dumps(x, separators=(", ", ": "), default=_json_default)
        if all(isinstance(v, (list, tuple)) and all(_is_scalar(e) for e in v) for v in x):
            one_line = json.dumps(x, separators=(", ", ": "), default=_json_default)
            if len(one_line) <= 100:
                return one_line
        return "[\n" + ",\n".join(inner + _readable(v, level + 1, indent) for v in x) + "\n" + pad + "]"
    return json.dumps(x, default=_json_default)


def dumps_readable(obj: Any, indent: int = 2) -> str:
    """JSON text that stays pleasant to read and edit: nested objects indented, short lists of numbers on one line,
    very long lists (e.g. sampled coordinates) written compactly. Same content as ``json.dumps``."""
    return _readable(obj, 0, indent) + "\n"


def save_json_readable(obj: Any, path: PathLike, indent: int = 2) -> None:
    """Atomic :func:`dumps_readable` write."""
    save_text(dumps_readable(obj, indent), path)
