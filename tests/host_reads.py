"""A test guard against device-to-host reads: on a GPU each tensor -> Python conversion stalls the stream."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

NAMES = ("__bool__", "__float__", "__int__", "item", "tolist")


class HostReadGuard:
    """Inside ``with``: any ``bool``/``float``/``int``/``item``/``tolist`` of a tensor raises, except of the ``host``
    tensors (kept on the host by design) and inside :meth:`allowing` (the one read a step is meant to make)."""

    def __init__(self, host: Iterable[torch.Tensor] = ()):
        self.host = list(host)
        self.real = {n: getattr(torch.Tensor, n) for n in NAMES}
        self.active = False

    def _forbid(self) -> None:
        for n in NAMES:
            def forbid(t, *a, _n=n, **k):
                if any(t is h for h in self.host):
                    return self.real[_n](t, *a, **k)
                raise AssertionError(f"a host read (Tensor.{_n}) where none is allowed")
            setattr(torch.Tensor, n, forbid)

    def _restore(self) -> None:
        for n, f in self.real.items():
            setattr(torch.Tensor, n, f)

    @contextlib.contextmanager
    def allowing(self):
        """Reads are allowed inside (a no-op when the guard is not active)."""
        if not self.active:
            yield
            return
        self._restore()
        try:
            yield
        finally:
            self._forbid()

    def __enter__(self):
        self.active = True
        self._forbid()
        return self

    def __exit__(self, *exc):
        self.active = False
        self._restore()
