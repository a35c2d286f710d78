"""Raw images -> preprocessed arrays: reorient, crop, resample, normalise, store."""
