"""The ``network`` entry of a plan: a dynamic-network-architectures class name plus constructor arguments.

Why strings: plans.json must stay plain JSON a user can read and edit, and the trainer, the diffusion pretrainer and
the planner's memory estimate must all build exactly the same network from it. Arguments that are classes (conv,
norm, dropout, nonlinearity) are stored as dotted import paths and listed in ``kwargs_requiring_import``.
``input_channels``, ``num_classes`` and ``deep_supervision`` are never stored: the consumer supplies them.
This module writes entries; :mod:`orthonet.networks.build` is the one place that reads and builds them.
"""
from __future__ import annotations

from typing import Any, Dict

from orthonet.networks.build import CONSUMER_KEYS


def class_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def make_network_entry(network_class: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Build the plan entry; class-valued kwargs become import paths."""
    bad = [k for k in CONSUMER_KEYS if k in kwargs]
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
