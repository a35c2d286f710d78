"""Shared plumbing for the ``ortho_*`` console scripts.

Why: every command must turn a user-fixable problem (:class:`OrthoError`) into one clear message and a non-zero
exit code instead of a traceback, and must behave the same way on Ctrl-C.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence

from orthonet.errors import OrthoError


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]]) -> Callable[[Optional[Sequence[str]]], int]:
    """Decorate a ``main(argv)`` so OrthoError prints as ``error: ...`` and exits 2 (set ORTHO_DEBUG=1 for the
    full traceback)."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        make_console_output_safe()
        try:
            code = main(argv)
        except OrthoError as e:
            if os.environ.get("ORTHO_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(code or 0)

    return wrapper


def make_console_output_safe() -> None:
    """Never crash on a non-ASCII character (an ellipsis, a +-) when the terminal or CI locale is plain ASCII.

    Why: Python falls back to an ``ascii`` stdout under ``LC_ALL=C`` with UTF-8 mode off, and a print of the
    progress text would then abort a finished training run. Characters the console cannot show are escaped.
    """
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a detached or closed stream: nothing to protect
                pass


def entry_point(main: Callable[[Optional[Sequence[str]]], int]) -> None:
    """Call from ``if __name__ == '__main__'`` / console scripts: exit with main's code."""
    sys.exit(main(None))
