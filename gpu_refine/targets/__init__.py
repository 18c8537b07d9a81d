"""Data targets for a batch: each is a ``Target`` (value, gradient, statistics)."""
from .base import Gradients, Target
from .map_value import MapValueTarget
from .model_map import ModelMapTarget

__all__ = ["Gradients", "Target", "MapValueTarget", "ModelMapTarget"]
