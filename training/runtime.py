"""Device, precision and seeding: the few decisions every training and inference loop makes the same way.

Why one module: "use the GPU when there is one, bf16 autocast on CUDA, fp32 on CPU, seeds set and recorded" must
not drift between the pretrainer, the trainers and the predictor.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Dict, Optional, Union

import numpy as np
import torch

from orthonet.errors import OrthoError


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU. Under torchrun each rank takes its LOCAL_RANK GPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OrthoError("--device cuda was requested but no CUDA device is available",
                             fix="use --device cpu (or omit --device to pick automatically)")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        dev = torch.device(device)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        return dev
    if device != "cpu":
        raise OrthoError(f"unknown device '{device}'", fix="use cuda, cpu or auto")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no grad scaler needed), a no-op context on CPU (fp32 is faster there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def default_num_workers() -> int:
    """Background data workers: leave one core for the main process, at most 8 (overridable with
    ``ORTHO_NUM_WORKERS``)."""
    env = os.environ.get("ORTHO_NUM_WORKERS")
    if env is not None:
        return max(0, int(env))
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def host_values(values: Dict[str, Union[torch.Tensor, float]]) -> Dict[str, float]:
    """Scalar tensors (and plain numbers) -> Python floats in ONE device-to-host read.

    Each ``float(cuda_tensor)`` waits for the GPU; a training step that logs a loss and its parts would otherwise
    stall the stream once per value. Stacking them first makes it one synchronisation per step, which is what the
    progress bar needs anyway."""
    tensors = {k: v.detach().reshape(()).float() for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:                               # parts on several devices: gather them on one
            first = next(iter(devices))
            tensors = {k: t.to(first) for k, t in tensors.items()}
        out.update(zip(tensors, torch.stack(list(tensors.values())).tolist()))
    return {k: out[k] for k in values}


def memory_format_for(ndim: int, device: torch.device):
    """channels_last(_3d) on CUDA (faster convolutions with cuDNN), contiguous on CPU."""
    if device.type != "cuda":
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def compile_network(module: torch.nn.Module, log=None) -> torch.nn.Module:
    """``torch.compile(module)`` with the backend named by ``ORTHO_COMPILE_BACKEND`` (default ``inductor``).

    Why a wrapper: the compiled module shares the original's parameters, so optimizers, checkpoints (written from
    the unwrapped model) and EMA are unchanged; only the forward is traced. Shapes vary between whole-exam batches,
    so ``dynamic=None`` lets dynamo mark changing sizes dynamic after the first recompile instead of compiling each.
    """
    backend = os.environ.get("ORTHO_COMPILE_BACKEND", "inductor")
    if log is not None:
        log(f"torch.compile (backend {backend}): the first steps include the compilation")
    return torch.compile(module, backend=backend, dynamic=None)
