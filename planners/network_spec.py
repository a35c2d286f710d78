"""The ``network`` entry of a plan: a dynamic-network-architectures class name plus constructor arguments.

Why strings: plans.json must stay plain JSON a user can read and edit, and the trainer, the diffusion pretrainer and
the planner's memory estimate must all build exactly the same network from it. Arguments that are classes (conv,
norm, dropout, nonlinearity) are stored as dotted import paths and listed in ``kwargs_requiring_import``.
``input_channels``, ``num_classes`` and ``deep_supervision`` are never stored: the consumer supplies them.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

from orthonet.errors import OrthoError

CONSUMER_ARGS = ("input_channels", "num_classes", "deep_supervision")


def class_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def import_object(path: str) -> Any:
    """Import ``package.module.Name`` (also accepts a re-export such as ``torch.nn.LeakyReLU``)."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise OrthoError(f"cannot import '{path}' named in the plans' network entry",
                         fix="use a dotted path such as dynamic_network_architectures.architectures.unet."
                             "PlainConvUNet or torch.nn.LeakyReLU") from None


def make_network_entry(network_class: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Build the plan entry; class-valued kwargs become import paths."""
    bad = [k for k in CONSUMER_ARGS if k in kwargs]
    if bad:
        raise ValueError(f"network kwargs must not contain {bad}")
    stored, needs_import = {}, []
    for key, value in kwargs.items():
        if isinstance(value, type):
            stored[key] = class_path(value)
            needs_import.append(key)
        else:
            stored[key] = value
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if key in stored and key not in needs_import:
            needs_import.append(key)
    return {"class_name": class_path(network_class) if isinstance(network_class, type) else str(network_class),
            "kwargs": stored, "kwargs_requiring_import": needs_import}


def resolve_kwargs(entry: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = dict(entry["kwargs"])
    for key in entry.get("kwargs_requiring_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = import_object(kwargs[key])
    return kwargs


def instantiate(entry: Dict[str, Any], input_channels: int, num_classes: int, deep_supervision: bool = False,
                device: Optional[str] = None):
    """Build the module of a network entry (``device='meta'`` builds it without allocating weights).

    The networks package (``orthonet.networks.build``) is the consumer-facing builder; this small version is what the
    planner needs to estimate memory without depending on it.
    """
    import torch

    cls = import_object(entry["class_name"])
    kwargs = resolve_kwargs(entry)
    if device is None:
        return cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                   **kwargs)
    with torch.device(device):
        return cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                   **kwargs)
