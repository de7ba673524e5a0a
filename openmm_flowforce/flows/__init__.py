"""Normalizing flows on the unit cube: ``log_prob``, ``sample``, ``to_latent``, ``to_data``."""
from .coupling import CouplingFlow, CouplingLayer

__all__ = ["CouplingFlow", "CouplingLayer"]
