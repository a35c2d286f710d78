"""Run one function over many cases in worker processes, with a progress bar and per-case error capture.

Why: fingerprinting and preprocessing are embarrassingly parallel over cases. A failure in one case must name that
case and must not stop the others; a worker killed by the operating system (usually out of memory) must say so
instead of hanging. Workers never inherit a parent that already runs torch threads (see :func:`_context`), and
the pool is shared by fingerprinting and preprocessing.
"""
from __future__ import annotations

import multiprocessing
import os
import traceback
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from tqdm import tqdm

from orthonet.errors import OrthoError

Task = Tuple[Hashable, Tuple[Any, ...]]


def default_num_processes() -> int:
    """min(usable CPUs, 8): preprocessing is memory hungry, more processes rarely pay off."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _init_worker() -> None:
    """Keep each worker single-threaded: parallelism comes from the processes."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import blosc2
        blosc2.set_nthreads(1)
    except Exception:  # pragma: no cover
        pass


#: Modules the worker functions live in; a forkserver imports them once and forks ready workers from it.
WORKER_MODULES = ["orthonet.planners.fingerprint", "orthonet.preprocessing.preprocessor"]


def _context():
    """``forkserver`` where available: a clean server process (no torch threads inherited) imports the worker
    modules once, every worker is forked from it (no per-worker import, shared memory pages). Else ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_MODULES)
        return ctx
    return multiprocessing.get_context("spawn")


def make_pool(num_processes: int) -> Optional[Executor]:
    """A process pool for :func:`run_parallel`, or None for in-process execution (``num_processes <= 1``)."""
    if num_processes <= 1:
        return None
    return ProcessPoolExecutor(max_workers=num_processes, mp_context=_context(), initializer=_init_worker)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OrthoError):
        return str(exc)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _broken_pool_fix() -> str:
    """The fix for a dead worker. Called from a user's own script, the usual other cause is a script without an
    ``if __name__ == "__main__":`` guard: forkserver/spawn workers re-import it and die while it starts the pool."""
    import __main__
    fix = "rerun with fewer processes (-np 1 or 2); finished cases are kept"
    script = getattr(__main__, "__file__", None)
    if script and not os.path.basename(script).startswith("ortho_"):
        fix += (f". If the workers printed 'An attempt has been made to start a new process before the current "
                f"process has finished its bootstrapping phase', put the code of {script} under "
                f"`if __name__ == \"__main__\":` (workers re-import the script that starts them)")
    return fix


def run_parallel(fn: Callable[..., Any], tasks: Sequence[Task], pool: Optional[Executor] = None,
                 desc: str = "", progress: bool = True) -> Tuple[Dict[Hashable, Any], Dict[Hashable, str]]:
    """Call ``fn(*args)`` for every ``(key, args)`` task; return ({key: result}, {key: error message}).

    With ``pool`` None the tasks run in this process (easiest to debug, used for ``-np 1``).
    """
    results: Dict[Hashable, Any] = {}
    errors: Dict[Hashable, str] = {}
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress, dynamic_ncols=True, leave=True)
    try:
        if pool is None:
            for key, args in tasks:
                try:
                    results[key] = fn(*args)
                except Exception as e:  # noqa: BLE001 - reported per case
                    errors[key] = _describe(e)
                bar.update()
        else:
            futures = {}
            try:
                for key, args in tasks:
                    futures[pool.submit(fn, *args)] = key
                for fut in as_completed(futures):
                    key = futures[fut]
                    try:
                        results[key] = fut.result()
                    except BrokenProcessPool:
                        raise
                    except Exception as e:  # noqa: BLE001 - reported per case
                        errors[key] = _describe(e)
                    bar.update()
            except BrokenProcessPool:
                raise OrthoError("a worker process died without an error message (usually the operating system "
                                 "killed it for lack of memory)", fix=_broken_pool_fix()) from None
    finally:
        bar.close()
    return results, errors


def format_errors(errors: Dict[Hashable, str], what: str) -> str:
    lines: List[str] = [f"{len(errors)} {what} failed:"]
    for key in sorted(errors, key=str):
        label = " / ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
        lines.append(f"  - {label}: {errors[key]}")
    return "\n".join(lines)
