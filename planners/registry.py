"""Planner classes by name (``-pl``). Register your own with :func:`register_planner`.

Why a dictionary and not a search through modules: a user can see in one place which names exist, and a plugin
registers a subclass with one call (e.g. at the top of a script that then calls ``orthonet.planners.cli.main``).
"""
from __future__ import annotations

from typing import Dict, Type

from orthonet.errors import OrthoError
from orthonet.planners.planner import DefaultPlanner
from orthonet.planners.resenc_planner import ResEncPlanner

PLANNERS: Dict[str, Type[DefaultPlanner]] = {"DefaultPlanner": DefaultPlanner, "ResEncPlanner": ResEncPlanner}


def register_planner(cls: Type[DefaultPlanner], name: str = None) -> Type[DefaultPlanner]:
    """Add a planner class (usable as a decorator)."""
    PLANNERS[name or cls.__name__] = cls
    return cls


def get_planner(name: str) -> Type[DefaultPlanner]:
    if name not in PLANNERS:
        raise OrthoError(f"unknown planner '{name}'", fix=f"use one of {sorted(PLANNERS)} (-pl NAME), or register "
                         "yours with orthonet.planners.registry.register_planner")
    return PLANNERS[name]
