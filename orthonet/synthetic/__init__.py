"""Synthetic multi-view MSK exams: continuous phantoms in physical millimetres, sampled per view like a scanner."""
