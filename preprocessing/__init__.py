"""Raw images -> preprocessed arrays: reorient, crop, normalise, resample, store; and the way back (``export``).

Modules: ``crop``, ``normalize``, ``resample``, ``preprocessor`` (one case, whole dataset), ``export`` (inverse),
``storage`` (on-disk format), ``parallel`` (worker pool with per-case errors).
"""
