"""Write one benchmark's section of docs/benchmarks.md between its own markers (other sections stay as they are)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"


def markers(name: str) -> tuple:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def machine_line() -> str:
    """'x86_64, 2 CPU cores, load average 1.3' (load matters: the machine may be shared)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    except OSError:
        load = ""
    gpu = ""
    try:
        import torch
        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # torch missing or broken: report the CPU only
        pass
    return f"{platform.processor() or platform.machine()}, {cpus} CPU cores{gpu}{load}"


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with ``body`` (markdown, no markers)."""
    begin, end = markers(name)
    text = f"{begin}\n{body.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# orthonet benchmarks\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")
    return path
