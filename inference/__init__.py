"""orthonet stage: inference."""
