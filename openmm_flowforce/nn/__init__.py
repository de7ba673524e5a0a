"""Conditioners and small networks."""
from .mlp import MLP

__all__ = ["MLP"]
