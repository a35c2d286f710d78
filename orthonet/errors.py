"""One exception type for every problem a user can fix.

Why: a user who feeds orthonet a broken file should read one sentence that names the file and the fix, never a
traceback from deep inside numpy. Command-line entry points catch :class:`OrthoError` and print it plainly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class OrthoError(Exception):
    """A user-fixable problem: what is wrong, with which file, and how to fix it."""

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None, fix: Optional[str] = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = self.message
        if self.path is not None and self.path not in text:
            text = f"{self.path}: {text}"
        if self.fix:
            text = f"{text}\n  fix: {self.fix}"
        return text
