"""orthonet stage: training."""
