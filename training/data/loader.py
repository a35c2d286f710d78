"""Batches from ``torch.utils.data.DataLoader`` worker processes, with errors that name the case and view.

Why a wrapper around DataLoader (and not batchgenerators' augmenters): their workers print an exception and die,
and the main process later reports only "One or more background workers are no longer alive" — nnU-Net's most
reported complaint — and DataLoader itself re-raises a worker's exception without the case it was reading. This
module keeps only what is ours: a worker that raises sends the case, view, exception and traceback to the main
process, which raises :class:`LoaderError` naming them; a worker that is killed (e.g. by the out-of-memory killer)
or stuck is reported with the case it was reading (mirrored into shared memory). Worker processes, prefetching
(``num_cached`` = DataLoader's ``prefetch_factor``), memory pinning and shutdown are DataLoader's.

Determinism: worker ``w`` of ``n`` makes batches ``w, w + n, w + 2n, ...`` (an IterableDataset split by
``get_worker_info``) from seeds derived from ``(seed, w)``; DataLoader hands them out in index order. The batch
sequence therefore depends only on ``seed`` and ``num_workers``, and ``num_workers=0`` (everything in-process,
for debugging) gives exactly the batches of ``num_workers=1``. The global numpy/torch/python RNGs the transforms
use are sandboxed, so loading does not disturb (and is not disturbed by) the trainer's own random state.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sys
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orthonet.errors import OrthoError
from orthonet.training.data.sources import BatchSource, LoadTracker


class LoaderError(OrthoError):
    """Data loading failed: which worker, which case and view, what happened (with the worker's traceback)."""

    def __init__(self, summary: str, case: Optional[str] = None, view: Optional[str] = None,
                 cause: Optional[str] = None, worker: Optional[int] = None, traceback_text: Optional[str] = None,
                 path: Optional[str] = None, fix: Optional[str] = None):
        self.case, self.view, self.cause, self.worker, self.traceback_text = case, view, cause, worker, traceback_text
        super().__init__(summary, path, fix)

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback_text:
            body = "\n".join("    " + line for line in self.traceback_text.rstrip().splitlines())
            text = f"{text}\n  traceback from the data loader:\n{body}"
        return text


def _where(case: Optional[str], view: Optional[str]) -> str:
    return f"case '{case}'" + (f" (view '{view}')" if view else "")


def _error_info(exc: BaseException, tracker: LoadTracker) -> Dict[str, Any]:
    return {
        "case": tracker.case, "view": tracker.view,
        "exc_type": type(exc).__name__, "message": str(exc).strip() or type(exc).__name__,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "path": getattr(exc, "path", None) if isinstance(exc, OrthoError) else None,
        "fix": getattr(exc, "fix", None) if isinstance(exc, OrthoError) else None,
        "short": getattr(exc, "message", None) if isinstance(exc, OrthoError) else None,
    }


def _loader_error(info: Dict[str, Any], worker: Optional[int]) -> LoaderError:
    where = "in-process" if worker is None else f"in worker {worker}"
    cause = f"{info['exc_type']}: {info['short'] or info['message']}"
    doing = f"while loading {_where(info['case'], info['view'])}" if info["case"] else \
        "outside any case (while assembling the batch)"
    summary = f"data loading failed {where} {doing}: {cause}"
    fix = info["fix"] or ("rerun with --num-workers 0 to debug in-process; the traceback below shows where it "
                          "failed")
    return LoaderError(summary, info["case"], info["view"], cause, worker, info["traceback"], info["path"], fix)


class _RngSandbox:
    """Private global numpy / torch / python RNG streams, swapped in while a batch is made."""

    def __init__(self, seed: int):
        self.np_state = np.random.RandomState(seed % 2 ** 32).get_state()
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.torch_state = gen.get_state()
        self.py_state = random.Random(seed).getstate()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = (np.random.get_state(), torch.get_rng_state(), random.getstate())
        np.random.set_state(self.np_state)
        torch.set_rng_state(self.torch_state)
        random.setstate(self.py_state)
        try:
            yield
        finally:
            self.np_state, self.torch_state, self.py_state = np.random.get_state(), torch.get_rng_state(), \
                random.getstate()
            np.random.set_state(saved[0])
            torch.set_rng_state(saved[1])
            random.setstate(saved[2])


class _WorkerState:
    """Everything one stream of batches needs: its generator, its sandboxed global RNGs, its tracker."""

    def __init__(self, seed: int, worker_index: int, shared=None):
        ss = np.random.SeedSequence([int(seed) % 2 ** 63, int(worker_index)])
        a, b = ss.generate_state(2, dtype=np.uint64)
        self.rng = np.random.default_rng(int(a))
        self.sandbox = _RngSandbox(int(b) % 2 ** 63)
        self.tracker = LoadTracker(shared)

    def make(self, source: BatchSource, index: int) -> Dict[str, Any]:
        with self.sandbox.active():
            return source.make_batch(index, self.rng, self.tracker)


_ERROR_KEY = "__orthonet_loader_error__"
_STATUS_BYTES = 1024
_POLL_S = 1.0   # how often a waiting main process checks that its workers are alive


class _BatchStream(IterableDataset):
    """The batches of one worker (``w, w + n, ...``); an error travels as a batch carrying its description, so
    the main process can raise a :class:`LoaderError` with the case and view (DataLoader would drop them)."""

    def __init__(self, source: BatchSource, seed: int, total: Optional[int], status: List[Any], pids: Any):
        self.source, self.seed, self.total, self.status, self.pids = source, seed, total, status, pids

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        w, n = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
            torch.set_num_threads(1)
            self.pids[w] = os.getpid()
        state = _WorkerState(self.seed, w, self.status[w] if info is not None else None)
        index = w
        while self.total is None or index < self.total:
            try:
                batch = state.make(self.source, index)
            except BaseException as e:  # report everything (also SystemExit from a misbehaving library)
                yield {_ERROR_KEY: _error_info(e, state.tracker), "index": index}
                return
            yield {"index": index, "batch": batch}
            index += n


def _as_is(item: Any) -> Any:
    """DataLoader's per-item conversion, made a no-op: batches are already collated tensors."""
    return item


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class BatchLoader:
    """Iterator over batches of ``source``; ``num_workers`` DataLoader worker processes (0 = in-process).

    Each worker runs at most ``num_cached`` batches ahead of the consumer. ``timeout_s`` bounds how long the main
    process waits for one batch before reporting the worker as stuck. Use as a context manager or call
    :meth:`close` (DataLoader also stops its workers when the loader is garbage collected or the interpreter exits).
    """

    def __init__(self, source: BatchSource, num_workers: int = 0, seed: int = 12345, num_cached: int = 2,
                 start_method: Optional[str] = None, timeout_s: float = 900.0, pin_memory: bool = False):
        self.source = source
        self.num_workers = int(num_workers)
        self.num_cached = max(1, int(num_cached))
        self.seed = int(seed)
        self.start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        self.timeout_s = float(timeout_s)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.total = source.num_batches()
        self._index = 0
        self._iterator: Optional[Iterator] = None
        self._status: List[Any] = []
        self._pids: Any = None
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context(self.start_method)
        n = max(1, self.num_workers)
        self._status = [ctx.Array(ctypes.c_char, _STATUS_BYTES, lock=False) for _ in range(n)]
        self._pids = ctx.Array(ctypes.c_long, n, lock=False)
        stream = _BatchStream(self.source, self.seed, self.total, self._status, self._pids)
        # DataLoader's timeout is the polling slice: __next__ checks for dead workers after each one and reports a
        # stuck worker only after timeout_s in all
        workers = dict(num_workers=self.num_workers, multiprocessing_context=ctx, prefetch_factor=self.num_cached,
                       timeout=min(_POLL_S, self.timeout_s)) if self.num_workers else {}
        # its own generator: DataLoader draws the workers' base seed from it, never from the trainer's global RNG
        loader = DataLoader(stream, batch_size=None, collate_fn=_as_is, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.seed), **workers)
        previous = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
        self._iterator = iter(loader)
        if previous is not None and signal.getsignal(signal.SIGCHLD) is not previous:
            # DataLoader's SIGCHLD handler raises a bare RuntimeError wherever the main process happens to be;
            # a dead worker is found (and named, with its case) at the next batch instead
            signal.signal(signal.SIGCHLD, previous)

    def _stop_workers(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def close(self) -> None:
        """Stop the workers (idempotent); the loader cannot be used afterwards."""
        self._stop_workers()
        self._closed = True

    def reset(self) -> None:
        """Start again from batch 0 with the initial seeds (same batches as the first pass)."""
        self._stop_workers()
        self._index = 0
        self._closed = False

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def worker_pids(self) -> List[int]:
        """Process ids of the workers (starts them; each reports its pid when it begins its first batch)."""
        if self._iterator is None:
            self._start()
        if not self.num_workers:
            return []
        deadline = time.time() + 30.0
        while not all(self._pids[:]) and time.time() < deadline:
            time.sleep(0.01)
        return [int(p) for p in self._pids[:]]

    # ---- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> "BatchLoader":
        """Infinite loaders continue; a finished sequential loader starts a new, identical pass (so a validation
        loader can be iterated once per epoch)."""
        if self.total is not None and self._index >= self.total:
            self.reset()
        return self

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("an infinite (random-sampling) loader has no length")
        return self.total

    def __next__(self) -> Dict[str, Any]:
        if self._closed:
            raise RuntimeError("this data loader was closed (after an error or by close()); create a new one")
        if self.total is not None and self._index >= self.total:
            self._stop_workers()  # a finished pass frees its workers
            raise StopIteration
        if self._iterator is None:
            self._start()
        index = self._index
        item = self._receive(index % max(1, self.num_workers))
        if _ERROR_KEY in item:
            self.close()
            raise _loader_error(item[_ERROR_KEY], index % self.num_workers if self.num_workers else None)
        if item["index"] != index:  # cannot happen unless the order breaks; never hand out a wrong batch silently
            self.close()
            raise RuntimeError(f"data loader order error: expected batch {index}, got {item['index']}")
        self._index += 1
        return item["batch"]

    def _receive(self, w: int) -> Dict[str, Any]:
        """The next item from DataLoader (worker ``w``'s turn), waiting in slices so a dead worker is found within
        one slice and a stuck one after ``timeout_s``."""
        waited = 0.0
        while True:
            try:
                return next(self._iterator)
            except StopIteration:
                raise
            except RuntimeError as e:
                if not self.num_workers:
                    raise
                dead = self._dead_workers()
                if dead:
                    self._worker_died(dead[0], e)
                if "timed out" not in str(e):
                    self._worker_died(w, e)
                waited += min(_POLL_S, self.timeout_s)
                if waited >= self.timeout_s:
                    self._worker_stuck(w, waited, e)

    def _last_case(self, w: int):
        raw = self._status[w].value.decode("utf-8", "replace") if w < len(self._status) else ""
        if not raw:
            return None, None
        case, _, view = raw.partition("\t")
        return case, (view or None)

    def _exit_code(self, w: int) -> Optional[int]:
        workers = getattr(self._iterator, "_workers", None) or []   # DataLoader's worker processes
        if w < len(workers) and not workers[w].is_alive():
            workers[w].join(timeout=1.0)
            return workers[w].exitcode
        return None

    def _dead_workers(self) -> List[int]:
        return [i for i in range(self.num_workers) if self._exit_code(i) is not None]

    def _worker_died(self, w: int, error: BaseException) -> None:
        case, view = self._last_case(w)
        pid = int(self._pids[w]) if self._pids is not None else None
        code = self._exit_code(w)
        if code is not None and code < 0:
            cause = f"killed by {_signal_name(-code)}"
            fix = ("SIGKILL usually means the system ran out of memory (the OOM killer): use fewer workers "
                   "(--num-workers) or a smaller batch/patch" if -code == signal.SIGKILL else
                   "check what sent the signal; rerun with --num-workers 0 to debug in-process")
        else:
            cause = f"exited unexpectedly with code {code}" if code is not None else str(error)
            fix = "rerun with --num-workers 0 to see the error in-process"
        self.close()
        doing = f"while loading {_where(case, view)}" if case else \
            "(between cases: it was not reading a file at that moment)"
        raise LoaderError(f"data-loading worker {w} (pid {pid}) died {doing}: {cause}", case, view, cause, w,
                          None, None, fix) from error

    def _worker_stuck(self, w: int, waited: float, error: BaseException) -> None:
        case, view = self._last_case(w)
        self.close()
        raise LoaderError(f"data-loading worker {w} produced no batch for {waited:.0f} s (it is loading "
                          f"{_where(case, view)})", case, view, "timeout", w, None, None,
                          "a very large case or a stalled file system; raise the timeout or check the file") \
            from error
