"""Logging to the console and to a file, one call.

Why: every long step logs to a file next to its output so a user can read what happened after the fact, and
shows progress on the console.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Union


def get_logger(name: str, log_file: Optional[Union[str, Path]] = None, console: bool = True) -> logging.Logger:
    """A logger writing plain timestamped lines to ``log_file`` (appending) and, optionally, to stdout."""
    logger = logging.getLogger(f"orthonet.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    wanted_file = str(Path(log_file).resolve()) if log_file else None
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler) and h.baseFilename != wanted_file:
            logger.removeHandler(h)
            h.close()
    have_file = any(isinstance(h, logging.FileHandler) for h in logger.handlers)
    have_console = any(type(h) is logging.StreamHandler for h in logger.handlers)
    if wanted_file and not have_file:
        Path(wanted_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(wanted_file, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if console and not have_console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    return logger
