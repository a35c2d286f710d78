"""orthonet stage: inference (prediction, saliency, evaluation, best configuration).

The Python API is imported lazily (``from orthonet.inference import predict_images, Predictor``) so that modules which
only need a small part of this package (e.g. the diagnoses table during training) do not import the whole
prediction stack.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "predict_images": "orthonet.inference.api",
    "Predictor": "orthonet.inference.predictor",
    "PredictionSettings": "orthonet.inference.predictor",
    "CasePrediction": "orthonet.inference.predictor",
    "PredictionRun": "orthonet.inference.predictor",
    "resolve_models": "orthonet.inference.model_selection",
    "ModelSelection": "orthonet.inference.model_selection",
    "find_best_configuration": "orthonet.inference.best_configuration",
    "grad_cam": "orthonet.inference.explain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
