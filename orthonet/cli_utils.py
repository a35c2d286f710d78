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


def entry_point(main: Callable[[Optional[Sequence[str]]], int]) -> None:
    """Call from ``if __name__ == '__main__'`` / console scripts: exit with main's code."""
    sys.exit(main(None))
