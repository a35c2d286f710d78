"""Batch iterator with background worker processes that fail loudly and precisely.

Why our own small worker pool instead of batchgenerators' augmenters: their workers print an exception and die,
and the main process later reports only "One or more background workers are no longer alive" — nnU-Net's most
reported complaint. Here a worker that raises sends the case, view, exception and traceback to the main process,
which raises :class:`LoaderError` naming them; a worker that is killed (e.g. by the out-of-memory killer) is
detected by its exit code, and the case it was reading is read from shared memory. The per-sample work itself
(patch sampling, batchgeneratorsv2 transforms) is the same in-process and in workers.

Determinism: worker ``w`` owns batches ``w, w + n, w + 2n, ...`` and draws from seeds derived from
``(seed, w)``; the main process takes batches in index order. The batch sequence therefore depends only on
``seed`` and ``num_workers``, and ``num_workers=0`` (everything in-process, for debugging) gives exactly the
batches of ``num_workers=1``. The global numpy/torch/python RNGs the transforms use are sandboxed, so loading does
not disturb (and is not disturbed by) the trainer's own random state.
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
import weakref
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.multiprocessing as mp

from orthonet.errors import OrthoError
from training.data.sources import BatchSource, LoadTracker


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


def _worker_main(source: BatchSource, worker_index: int, num_workers: int, seed: int, conn, slots, stop_event,
                 shared_status, parent_pid: int, total: Optional[int]) -> None:
    """Worker loop: make batches worker_index, worker_index + n, ...; report the first error and stop.

    ``conn`` is the write end of a one-way pipe. ``slots`` (a semaphore the main process releases for every batch
    it takes) bounds the batches in flight per worker: tensors travel as shared-memory handles, so the pipe
    itself would never push back.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process, which stops us
    torch.set_num_threads(1)
    state = _WorkerState(seed, worker_index, shared_status)
    index = worker_index

    def alive() -> bool:
        return not stop_event.is_set() and os.getppid() == parent_pid  # stopped, or the trainer died

    def send(item) -> bool:
        if not alive():
            return False
        try:
            conn.send(item)
            return True
        except (BrokenPipeError, EOFError, OSError):
            return False

    def linger() -> None:
        # stay alive until stopped: the main process can open the shared-memory handles of batches it has not
        # read yet only while this process (their sender) exists
        while alive():
            time.sleep(0.05)

    try:
        while alive():
            if total is not None and index >= total:
                send(("done", index, None))
                linger()
                return
            if not slots.acquire(timeout=0.1):
                continue
            try:
                batch = state.make(source, index)
            except BaseException as e:  # report everything (also SystemExit from a misbehaving library)
                send(("error", index, _error_info(e, state.tracker)))
                linger()
                return
            if not send(("batch", index, batch)):
                return
            index += num_workers
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class BatchLoader:
    """Iterator over batches of ``source``; ``num_workers`` background processes (0 = in-process).

    Each worker runs at most ``num_cached`` batches ahead of the consumer. ``timeout_s`` bounds how long the main process waits for one batch of a live worker before reporting it as
    stuck. Use as a context manager or call :meth:`close` (workers are also stopped when the loader is garbage
    collected or the interpreter exits).
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
        self._procs: List[Any] = []
        self._conns: List[Any] = []
        self._slots: List[Any] = []
        self._status: List[Any] = []
        self._stop = None
        self._local: Optional[_WorkerState] = None
        self._started = False
        self._closed = False
        self._finalizer = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _start(self) -> None:
        self._started = True
        if self.num_workers == 0:
            self._local = _WorkerState(self.seed, 0)
            return
        ctx = mp.get_context(self.start_method)
        self._stop = ctx.Event()
        for w in range(self.num_workers):
            reader, writer = ctx.Pipe(duplex=False)
            slots = ctx.Semaphore(self.num_cached)
            status = ctx.Array(ctypes.c_char, 1024, lock=False)
            p = ctx.Process(target=_worker_main, name=f"orthonet-loader-{w}",
                            args=(self.source, w, self.num_workers, self.seed, writer, slots, self._stop, status,
                                  os.getpid(), self.total), daemon=True)
            p.start()
            writer.close()  # only the worker writes: if it dies mid-message, the read ends in EOF, not a hang
            self._procs.append(p)
            self._conns.append(reader)
            self._slots.append(slots)
            self._status.append(status)
        self._finalizer = weakref.finalize(self, BatchLoader._shutdown, self._procs, self._conns, self._stop)

    @staticmethod
    def _shutdown(procs, conns, stop) -> None:
        if stop is not None:
            stop.set()
        for c in conns:  # a worker blocked in send() gets BrokenPipeError and exits
            with contextlib.suppress(Exception):
                c.close()
        deadline = time.time() + 2.0
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.time()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=1.0)

    def _stop_workers(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._procs, self._conns, self._slots, self._status = [], [], [], []
        self._started = False
        self._local = None

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
        if not self._started:
            self._start()
        return [p.pid for p in self._procs]

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
        if not self._started:
            self._start()
        index = self._index
        if self.num_workers == 0:
            try:
                batch = self._local.make(self.source, index)
            except Exception as e:
                err = _loader_error(_error_info(e, self._local.tracker), None)
                self.close()
                raise err from e
        else:
            batch = self._receive(index)
        self._index += 1
        if self.pin_memory:
            batch = _pin(batch)
        return batch

    def _receive(self, index: int) -> Dict[str, Any]:
        w = index % self.num_workers
        conn, p = self._conns[w], self._procs[w]
        waited = 0.0
        while True:
            try:
                ready = conn.poll(0.2)
                if ready:
                    kind, got, payload = conn.recv()
                    break
            except (EOFError, OSError, ConnectionError):
                p.join(timeout=1.0)  # the pipe closed: the worker is gone (killed mid-message or exited)
                self._dead_worker(w)
            except Exception as e:  # a message that cannot be unpickled
                self.close()
                raise LoaderError(f"data-loading worker {w} sent a batch that cannot be read ({type(e).__name__}: "
                                  f"{e})", None, None, str(e), w, None, None,
                                  "rerun with --num-workers 0 to debug in-process") from e
            waited += 0.2
            if not p.is_alive() and not conn.poll(0):
                self._dead_worker(w)
            if waited >= self.timeout_s:
                self._stuck_worker(w, waited)
        if kind == "error":
            self.close()
            raise _loader_error(payload, w)
        if kind == "done":
            raise StopIteration
        if got != index:  # cannot happen unless the protocol is broken; never hand out a wrong batch silently
            self.close()
            raise RuntimeError(f"data loader protocol error: expected batch {index}, worker {w} sent {got}")
        self._slots[w].release()  # the worker may start another batch
        return payload

    def _last_case(self, w: int):
        raw = self._status[w].value.decode("utf-8", "replace") if w < len(self._status) else ""
        if not raw:
            return None, None
        case, _, view = raw.partition("\t")
        return case, (view or None)

    def _dead_worker(self, w: int) -> None:
        p = self._procs[w]
        code = p.exitcode
        case, view = self._last_case(w)
        if code is not None and code < 0:
            cause = f"killed by {_signal_name(-code)}"
            fix = ("SIGKILL usually means the system ran out of memory (the OOM killer): use fewer workers "
                   "(--num-workers) or a smaller batch/patch" if -code == signal.SIGKILL else
                   "check what sent the signal; rerun with --num-workers 0 to debug in-process")
        else:
            cause = f"exited unexpectedly with code {code}"
            fix = "rerun with --num-workers 0 to see the error in-process"
        self.close()
        doing = f"while loading {_where(case, view)}" if case else \
            "(between cases: it was not reading a file at that moment)"
        raise LoaderError(f"data-loading worker {w} (pid {p.pid}) died {doing}: {cause}", case, view, cause, w,
                          None, None, fix)

    def _stuck_worker(self, w: int, waited: float) -> None:
        case, view = self._last_case(w)
        self.close()
        raise LoaderError(f"data-loading worker {w} produced no batch for {waited:.0f} s (it is loading "
                          f"{_where(case, view)})", case, view, "timeout", w, None, None,
                          "a very large case or a stalled file system; raise the timeout or check the file")


def _pin(obj):
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {k: _pin(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_pin(v) for v in obj]
    return obj
