"""orthonet stage: planners."""
