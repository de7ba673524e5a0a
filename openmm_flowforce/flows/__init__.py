"""Normalizing flows on the unit cube: ``log_prob``, ``sample``, ``to_latent``, ``to_data``."""
from .coupling import CouplingFlow, CouplingLayer
from .real import RealFlow, helmert_basis

__all__ = ["CouplingFlow", "CouplingLayer", "RealFlow", "helmert_basis"]
