"""Orchestration of whole jobs (model map, validation, refinement): no CLI code here."""
from .validate import compute_model_map, validate

__all__ = ["compute_model_map", "validate"]
