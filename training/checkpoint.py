"""Checkpoints that are safe to write while being killed and safe to load from strangers.

* Atomic: written to a temporary file in the same folder and renamed, so ``checkpoint_latest.pt`` is always either
  the previous or the new complete checkpoint, never half of one.
* ``torch.load(path, weights_only=True)`` works: a checkpoint holds only tensors and plain Python types (dict,
  list, tuple, str, int, float, bool, None). :func:`save_checkpoint` checks ``extra`` for anything else.
* Exact resume: the RNG states of torch (CPU and CUDA), numpy and Python are stored as tensors/lists.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from orthonet.diffusion.ema import unwrap as unwrap_model  # noqa: F401 (one definition, re-exported)
from orthonet.errors import OrthoError
from orthonet.fileio import atomic_path
from orthonet.training.schedules import load_scheduler_state

PathLike = Union[str, Path]
FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def to_plain(obj: Any, where: str = "extra") -> Any:
    """Convert numpy scalars/arrays and Paths to plain types; raise TypeError on anything weights_only rejects."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict key {k!r} is not str/int")
            out[k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a weights_only checkpoint; "
                    "store tensors, numbers, strings, lists and dicts only")


def capture_rng_state() -> Dict[str, Any]:
    """RNG states of Python, numpy and torch (CPU + every CUDA device) as tensors and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only if the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    # .cpu(): a checkpoint loaded with map_location='cuda' puts these byte tensors on the GPU
    np.random.set_state((npst["kind"], npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _state_of(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        return unwrap_model(obj).state_dict()
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    return obj  # already a state dict


# ------------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler_state: Any = None, ema: Any = None, grad_scaler: Any = None,
                    epoch: Optional[int] = None, step: Optional[int] = None, extra: Optional[Dict] = None,
                    rng: bool = True) -> Path:
    """Write a training checkpoint atomically and return its path.

    ``scheduler_state``, ``ema`` and ``grad_scaler`` may be objects with ``state_dict()`` or state dicts already.
    ``extra`` holds anything else the trainer needs (plans identity, best metric, config...) as plain types.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "model": _state_of(model),
        "optimizer": _state_of(optimizer),
        "scheduler": _state_of(scheduler_state),
        "ema": _state_of(ema),
        "grad_scaler": _state_of(grad_scaler),
        "epoch": None if epoch is None else int(epoch),
        "step": None if step is None else int(step),
        "extra": to_plain(extra or {}),
        "rng": capture_rng_state() if rng else None,
    }
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; missing or corrupt files raise :class:`OrthoError`."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError("checkpoint not found", path,
                         fix="check the path, or train first (ortho_train / ortho_pretrain)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OrthoError(f"checkpoint cannot be read ({type(e).__name__}: {first})", path,
                         fix="the file is corrupt or not an orthonet checkpoint; delete it and resume from another "
                             "checkpoint (e.g. checkpoint_best.pt) or retrain") from None
    if not isinstance(ckpt, dict):
        raise OrthoError("file does not hold an orthonet checkpoint (expected a dict)", path)
    return ckpt


def apply_checkpoint(ckpt: Dict[str, Any], model: Optional[nn.Module] = None,
                     optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, ema: Any = None,
                     grad_scaler: Any = None, restore_rng: bool = True, strict: bool = True) -> None:
    """Load the parts of ``ckpt`` into the given objects (any of them may be None)."""
    if model is not None and ckpt.get("model") is not None:
        unwrap_model(model).load_state_dict(ckpt["model"], strict=strict)
    pairs = ((optimizer, "optimizer"), (scheduler, "scheduler"), (ema, "ema"), (grad_scaler, "grad_scaler"))
    for obj, key in pairs:
        if obj is not None and ckpt.get(key) is not None:
            target = unwrap_model(obj) if isinstance(obj, nn.Module) else obj
            if key == "scheduler":
                load_scheduler_state(target, ckpt[key])
            else:
                target.load_state_dict(ckpt[key])
    if restore_rng and ckpt.get("rng") is not None:
        restore_rng_state(ckpt["rng"])
